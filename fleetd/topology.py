"""Host CPU topology: which CPUs exist, how they group into cores, packages and NUMA nodes.

Pure data plus the readers that fill it: :meth:`Topology.from_sysfs` (the real
host, or a fake sysfs tree in tests), :meth:`Topology.synthetic` (made-up hosts
for tests and ``fleetctl plan`` previews), :func:`daemon_affinity` and
:func:`cgroup_cpuset` (which CPUs this process may use at all).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

_RANGE_RE = re.compile(r"^(\d+)(?:-(\d+))?$")
_CPU_DIR_RE = re.compile(r"^cpu(\d+)$")
_NODE_DIR_RE = re.compile(r"^node(\d+)$")
MAX_CPU_ID = 1 << 16  # far above any real host; guards against "0-999999999"


def parse_cpulist(text: str) -> frozenset[int]:
    """Parse a Linux cpulist such as ``"0-3,8,10-11"`` into a set of CPU ids.

    Whitespace around items and a trailing newline are fine; empty text is the
    empty set.

    Raises:
        ValueError: when an item is not ``N`` or ``A-B`` with ``A <= B``.
    """
    cpus: set[int] = set()
    stripped = text.strip()
    if not stripped:
        return frozenset()
    for item in stripped.split(","):
        m = _RANGE_RE.match(item.strip())
        if not m:
            raise ValueError(f"invalid cpulist {text.strip()!r}: {item.strip()!r} is not N or A-B")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"invalid cpulist {text.strip()!r}: range {lo}-{hi} runs backwards")
        if hi >= MAX_CPU_ID:
            raise ValueError(f"invalid cpulist {text.strip()!r}: CPU {hi} is out of range")
        cpus.update(range(lo, hi + 1))
    return frozenset(cpus)


def format_cpulist(cpus: Iterable[int]) -> str:
    """Format CPU ids as a compact cpulist (``{0,1,2,3,8}`` -> ``"0-3,8"``; empty -> ``""``)."""
    ids = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


@dataclass(frozen=True)
class HostCpu:
    """One logical host CPU.

    ``core`` is the kernel's ``core_id`` (unique only within its package);
    ``siblings`` is its SMT thread set *including itself*, like sysfs
    ``thread_siblings_list``.
    """

    id: int
    core: int
    package: int
    node: int
    siblings: frozenset[int]
    online: bool


@dataclass(frozen=True)
class Topology:
    """The host's logical CPUs by id (read-only mapping, sorted by id)."""

    cpus: Mapping[int, HostCpu]

    def __post_init__(self) -> None:
        for key, cpu in self.cpus.items():
            if key != cpu.id:
                raise ValueError(f"topology: key {key} holds CPU {cpu.id}")
        object.__setattr__(self, "cpus", MappingProxyType(dict(sorted(self.cpus.items()))))

    def __hash__(self) -> int:
        return hash(tuple(self.cpus.values()))

    def online(self) -> frozenset[int]:
        """Ids of the online CPUs."""
        return frozenset(c.id for c in self.cpus.values() if c.online)

    def node_of(self, cpu: int) -> int:
        """The NUMA node of ``cpu``.

        Raises:
            KeyError: for an unknown CPU id.
        """
        return self._get(cpu).node

    def siblings_of(self, cpu: int) -> frozenset[int]:
        """The SMT siblings of ``cpu``, including ``cpu`` itself.

        Raises:
            KeyError: for an unknown CPU id.
        """
        return self._get(cpu).siblings

    def nodes(self) -> dict[int, frozenset[int]]:
        """NUMA node id -> ids of its CPUs (online or not), sorted by node."""
        out: dict[int, set[int]] = {}
        for c in self.cpus.values():
            out.setdefault(c.node, set()).add(c.id)
        return {n: frozenset(ids) for n, ids in sorted(out.items())}

    def summary(self) -> str:
        """One line for logs, e.g. ``"32 CPUs (0-31 online), 2 packages, 16 cores, 2 NUMA nodes"``."""
        cores = {(c.package, c.core) for c in self.cpus.values()}
        packages = {c.package for c in self.cpus.values()}
        online = format_cpulist(self.online()) or "none"
        return (f"{len(self.cpus)} CPUs ({online} online), {len(packages)} packages, "
                f"{len(cores)} cores, {len(self.nodes())} NUMA nodes")

    def _get(self, cpu: int) -> HostCpu:
        try:
            return self.cpus[cpu]
        except KeyError:
            raise KeyError(f"no host CPU {cpu} (known: {format_cpulist(self.cpus)})") from None

    @classmethod
    def from_sysfs(cls, root: str | Path = "/") -> Topology:
        """Read the topology under ``<root>/sys/devices/system/{cpu,node}``.

        Missing files get defaults: a CPU without topology files is its own
        core in package 0; without NUMA information everything is node 0;
        without ``online`` files every CPU is online.

        Raises:
            FileNotFoundError: when no CPUs can be found at all.
            ValueError: when a sysfs file holds junk.
        """
        cpu_dir = Path(root) / "sys/devices/system/cpu"
        node_dir = Path(root) / "sys/devices/system/node"
        ids = set()
        if cpu_dir.is_dir():
            ids = {int(m.group(1)) for p in cpu_dir.iterdir() if (m := _CPU_DIR_RE.match(p.name))}
        if not ids:
            ids = set(_read_cpulist(cpu_dir / "present") or _read_cpulist(cpu_dir / "online") or ())
        if not ids:
            raise FileNotFoundError(f"no CPUs found under {cpu_dir}")

        online_all = _read_cpulist(cpu_dir / "online")
        node_of: dict[int, int] = {}
        if node_dir.is_dir():
            for p in sorted(node_dir.iterdir()):
                if m := _NODE_DIR_RE.match(p.name):
                    for cpu in _read_cpulist(p / "cpulist") or ():
                        node_of.setdefault(cpu, int(m.group(1)))

        cpus: dict[int, HostCpu] = {}
        for i in sorted(ids):
            d = cpu_dir / f"cpu{i}"
            if online_all is not None:
                online = i in online_all
            else:
                online = _read_text(d / "online") != "0"
            siblings = (_read_cpulist(d / "topology/thread_siblings_list") or frozenset()) & ids
            cpus[i] = HostCpu(
                id=i,
                core=_read_int(d / "topology/core_id", default=i),
                package=max(_read_int(d / "topology/physical_package_id", default=0), 0),
                node=node_of.get(i, 0),
                siblings=siblings | {i},
                online=online,
            )
        return cls(cpus)

    @classmethod
    def synthetic(cls, *, packages: int = 1, cores_per_package: int = 2, threads_per_core: int = 1,
                  nodes: int = 1, offline: Iterable[int] = ()) -> Topology:
        """A made-up host, numbered like Linux on x86.

        Core ``c`` (0 .. packages*cores_per_package - 1, package-major) has threads
        ``c``, ``c + ncores``, ``c + 2*ncores``...; nodes split the cores into
        equal contiguous runs (so with ``nodes == packages`` a node is a package).

        Raises:
            ValueError: for counts below 1, more nodes than cores, or offline
                ids that do not exist.
        """
        for label, value in (("packages", packages), ("cores_per_package", cores_per_package),
                             ("threads_per_core", threads_per_core), ("nodes", nodes)):
            if value < 1:
                raise ValueError(f"synthetic topology: {label} must be >= 1, got {value}")
        ncores = packages * cores_per_package
        total = ncores * threads_per_core
        if nodes > ncores:
            raise ValueError(f"synthetic topology: {nodes} nodes but only {ncores} cores")
        off = frozenset(offline)
        if bad := off - set(range(total)):
            raise ValueError(f"synthetic topology: offline CPUs {format_cpulist(bad)} do not exist "
                             f"(0-{total - 1})")
        cpus: dict[int, HostCpu] = {}
        for c in range(ncores):
            threads = frozenset(c + t * ncores for t in range(threads_per_core))
            for cpu in threads:
                cpus[cpu] = HostCpu(id=cpu, core=c % cores_per_package, package=c // cores_per_package,
                                    node=c * nodes // ncores, siblings=threads, online=cpu not in off)
        return cls(cpus)


def daemon_affinity() -> frozenset[int]:
    """The CPUs this process may run on (``sched_getaffinity(0)``; all CPUs where unsupported)."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is None:
        return frozenset(range(os.cpu_count() or 1))
    return frozenset(getaffinity(0))


def cgroup_cpuset(proc_root: str | Path = "/proc",
                  cgroup_root: str | Path = "/sys/fs/cgroup") -> frozenset[int] | None:
    """The effective cpuset of this process's cgroup, or None when there is none.

    cgroup v2: the ``0::<path>`` line of ``<proc_root>/self/cgroup``, then
    ``<cgroup_root>/<path>/cpuset.cpus.effective``, walking up towards the
    root while the file is missing. A cgroup v1 ``cpuset`` hierarchy
    (``<cgroup_root>/cpuset/<path>/cpuset.effective_cpus``) is used when v2
    gives nothing. An empty file counts as missing.

    Raises:
        ValueError: when a cpuset file holds junk.
    """
    text = _read_text(Path(proc_root) / "self/cgroup")
    if text is None:
        return None
    v2_path = v1_path = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier, controllers, path = parts
        if hier == "0" and controllers == "":
            v2_path = path
        elif "cpuset" in controllers.split(","):
            v1_path = path
    base = Path(cgroup_root)
    if v2_path is not None:
        found = _walk_up(base, v2_path, "cpuset.cpus.effective")
        if found is not None:
            return found
    if v1_path is not None:
        return _walk_up(base / "cpuset", v1_path, "cpuset.effective_cpus")
    return None


def _walk_up(base: Path, cgroup_path: str, filename: str) -> frozenset[int] | None:
    parts = [p for p in cgroup_path.strip().split("/") if p and p not in (".", "..")]
    while True:
        cpus = _read_cpulist(base.joinpath(*parts) / filename)
        if cpus:
            return cpus
        if not parts:
            return None
        parts.pop()


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _read_cpulist(path: Path) -> frozenset[int] | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        return parse_cpulist(text)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _read_int(path: Path, *, default: int) -> int:
    text = _read_text(path)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}: expected an integer, got {text!r}") from None
