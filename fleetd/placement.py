"""vCPU placement: which host CPU each guest vCPU thread is pinned to.

:func:`make_pool` decides which host CPUs vCPUs may use at all;
:class:`Placer` holds what is placed and plans new replicas around it.

Shared-mode policy, in priority order:

1. balance: every vCPU goes to a least-loaded CPU of the pool (so placing
   onto an empty pool keeps max load - min load <= 1);
2. a guest's vCPUs go to distinct CPUs while the pool has enough;
3. among equally loaded CPUs, keep the guest in one NUMA node if it fits
   (else in as few nodes as possible), choosing the least-loaded node;
4. SMT siblings last: prefer a CPU whose sibling threads carry less load;
5. lowest CPU id.

Exclusive mode uses the same order over the CPUs with zero load. Mode
``none`` pins nothing: each vCPU may float over the whole pool, and such
vCPUs add no per-CPU load.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from fractions import Fraction
from types import MappingProxyType
from typing import Any

from fleetd.errors import NotFoundError, PlacementError
from fleetd.topology import Topology, format_cpulist


class PinMode(StrEnum):
    """How a fleet's vCPU threads are pinned to host CPUs."""

    EXCLUSIVE = "exclusive"
    SHARED = "shared"
    NONE = "none"


DEFAULT_MODE = PinMode.SHARED


def _fmt(cpus: frozenset[int] | set[int]) -> str:
    return format_cpulist(cpus) or "(none)"


def _cpus_word(n: int) -> str:
    return f"{n} host CPU" if n == 1 else f"{n} host CPUs"


@dataclass(frozen=True)
class CpuPool:
    """The host CPUs available to vCPUs.

    ``allowed`` is what vCPUs may use (housekeeping already removed, unless
    housekeeping covered everything); ``housekeeping`` is where QEMU's
    emulator/I-O threads and fleetd itself go; ``description`` is for
    messages, e.g. ``"0-1 minus housekeeping 0"``; ``notes`` explain any
    input that was ignored or any fallback taken.
    """

    allowed: frozenset[int]
    housekeeping: frozenset[int]
    description: str
    notes: tuple[str, ...] = ()

    @property
    def emulator_cpus(self) -> frozenset[int]:
        """Where QEMU's non-vCPU threads go: housekeeping if any, else the vCPU CPUs."""
        return self.housekeeping or self.allowed


def make_pool(topology: Topology, *, affinity: frozenset[int], cgroup: frozenset[int] | None,
              configured: frozenset[int] | None, housekeeping: frozenset[int]) -> CpuPool:
    """Build the pool: online ∩ affinity ∩ cgroup cpuset ∩ configured ``cpus``, minus housekeeping.

    ``cgroup`` / ``configured`` of None mean no restriction. Housekeeping CPUs
    only need to be online and within affinity and cgroup (they may lie
    outside ``configured``). If housekeeping covers every usable CPU, vCPUs
    fall back to the usable set and the pool says so in ``notes``.

    Raises:
        PlacementError: when no CPU survives the intersection (the message
            names every input).
    """
    online = topology.online()
    reachable = online & affinity
    if cgroup is not None:
        reachable &= cgroup
    usable = reachable & configured if configured is not None else reachable
    if not usable:
        inputs = [f"online {_fmt(online)}", f"affinity {_fmt(affinity)}"]
        if cgroup is not None:
            inputs.append(f"cgroup cpuset {_fmt(cgroup)}")
        if configured is not None:
            inputs.append(f"configured cpus {_fmt(configured)}")
        raise PlacementError("no usable host CPUs: nothing is in all of " + ", ".join(inputs),
                             needed=1, available=0)
    notes: list[str] = []
    if configured is not None and (ignored := configured - reachable):
        notes.append(f"configured cpus {_fmt(ignored)} ignored: offline, absent, or outside "
                     "the daemon's affinity or cgroup cpuset")
    if ignored_hk := housekeeping - reachable:
        notes.append(f"housekeeping {_fmt(ignored_hk)} ignored: offline, absent, or outside "
                     "the daemon's affinity or cgroup cpuset")
    hk = housekeeping & reachable
    allowed = usable - hk
    if not allowed:
        notes.append(f"housekeeping {_fmt(hk)} covers every usable CPU ({_fmt(usable)}): "
                     "vCPUs use them too")
        return CpuPool(allowed=usable, housekeeping=hk,
                       description=f"{_fmt(usable)} (all housekeeping)", notes=tuple(notes))
    if taken := usable & hk:
        description = f"{_fmt(usable)} minus housekeeping {_fmt(taken)}"
    else:
        description = _fmt(usable)
    return CpuPool(allowed=allowed, housekeeping=hk, description=description, notes=tuple(notes))


@dataclass(frozen=True)
class Assignment:
    """Where one replica's vCPUs run: one host-CPU set per vCPU, in vCPU order.

    exclusive/shared: a single CPU each; none: the pool's whole allowed set.
    """

    name: str
    mode: PinMode
    vcpus: tuple[frozenset[int], ...]

    def host_cpus(self) -> frozenset[int]:
        """Every host CPU any of this replica's vCPUs may run on."""
        return frozenset().union(*self.vcpus)


@dataclass(frozen=True)
class Plan:
    """The result of :meth:`Placer.plan`: new assignments and the load they leave.

    ``load_after`` maps every pool CPU (and any restored CPU outside it) to its
    pinned vCPU count once committed; ``overcommitted`` is true when there will
    be more vCPUs than pool CPUs or any CPU carries more than one vCPU.
    """

    assignments: tuple[Assignment, ...]
    load_after: Mapping[int, int]
    overcommitted: bool
    notes: tuple[str, ...]
    pool: CpuPool | None = None
    token: object = field(default=None, repr=False, compare=False)

    @property
    def mode(self) -> PinMode | None:
        """The mode of the planned replicas (None for an empty plan)."""
        return self.assignments[0].mode if self.assignments else None

    def to_json(self) -> dict[str, Any]:
        """The plan as plain JSON-able data (CPU ids as string keys in ``load``)."""
        return {
            "mode": str(self.mode) if self.mode else None,
            "pool": self.pool.description if self.pool else None,
            "replicas": {a.name: [sorted(c) for c in a.vcpus] for a in self.assignments},
            "load": {str(cpu): n for cpu, n in sorted(self.load_after.items())},
            "overcommitted": self.overcommitted,
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """One line for the daemon's log, e.g. ``"8 replicas, 16 vCPUs, shared on 0-1; overcommitted ..."``."""
        nvcpus = sum(len(a.vcpus) for a in self.assignments)
        text = f"{len(self.assignments)} replicas, {nvcpus} vCPUs, {self.mode or 'nothing'}"
        if self.pool:
            text += f" on {self.pool.description}"
        if self.overcommitted:
            peak = max(self.load_after.values(), default=0)
            text += f"; overcommitted (up to {peak} pinned vCPUs per host CPU)"
        return text

    def render_table(self) -> str:
        """A human-readable map: one line per replica, then pinned vCPUs per host CPU, then notes."""
        lines = [f"pool {self.pool.description}" if self.pool else "pool (unknown)"]
        lines[0] += f", mode {self.mode or '-'}" + (", overcommitted" if self.overcommitted else "")
        width = max((len(a.name) for a in self.assignments), default=0)
        for a in self.assignments:
            cells = " ".join(f"vcpu{i}→{format_cpulist(c)}" for i, c in enumerate(a.vcpus))
            lines.append(f"{a.name.ljust(width)}  {cells}")
        items = sorted(self.load_after.items())
        for start in range(0, len(items), 16):
            row = items[start:start + 16]
            widths = [max(len(str(cpu)), len(str(n))) for cpu, n in row]
            lines.append("host CPU  " + " ".join(str(c).rjust(w) for (c, _), w in zip(row, widths)))
            lines.append("vCPUs     " + " ".join(str(n).rjust(w) for (_, n), w in zip(row, widths)))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


class Placer:
    """Placement state for one host: what is placed where, and planning around it.

    Not thread-safe; the daemon calls it from its event loop only.
    """

    def __init__(self, topology: Topology, pool: CpuPool) -> None:
        """Start with nothing placed.

        Raises:
            ValueError: when the pool names CPUs the topology does not have.
        """
        if unknown := pool.allowed - set(topology.cpus):
            raise ValueError(f"pool CPUs {format_cpulist(unknown)} are not in the topology")
        self.topology = topology
        self.pool = pool
        self._assignments: dict[str, Assignment] = {}
        self._load: dict[int, int] = {c: 0 for c in sorted(pool.allowed)}
        self._token = object()
        self._by_node: dict[int, frozenset[int]] = {}
        for c in pool.allowed:
            node = topology.node_of(c)
            self._by_node[node] = self._by_node.get(node, frozenset()) | {c}

    def load(self) -> dict[int, int]:
        """Pinned vCPUs per host CPU: every pool CPU (0 if idle) plus any restored CPU outside it."""
        return dict(self._load)

    def assignments(self) -> dict[str, Assignment]:
        """Current placements by replica name."""
        return dict(self._assignments)

    def plan(self, requests: Sequence[tuple[str, int]], mode: PinMode | str = DEFAULT_MODE) -> Plan:
        """Plan placing ``(name, vcpus)`` replicas, in order, around what is placed. Mutates nothing.

        Raises:
            ValueError: for an unknown mode, an empty name, vcpus < 1, or a
                name given twice.
            PlacementError: when a name is already placed, or exclusive mode
                lacks idle CPUs, or shared mode finds every CPU held
                exclusively.
        """
        mode = PinMode(mode)
        self._check_requests(requests)
        load = dict(self._load)
        notes = list(self.pool.notes)
        if mode is PinMode.NONE:
            new = [Assignment(name, mode, (self.pool.allowed,) * n) for name, n in requests]
            if held := self._exclusive_cpus():
                notes.append(f"mode none floats over all of {_fmt(self.pool.allowed)}, "
                             f"including CPUs held exclusively ({_fmt(held)})")
        else:
            new = self._plan_pinned(requests, mode, load, notes)
        floating = sum(len(a.vcpus) for a in [*self._assignments.values(), *new]
                       if a.mode is PinMode.NONE)
        over = (sum(load.values()) + floating > len(self.pool.allowed)
                or any(n > 1 for n in load.values()))
        return Plan(assignments=tuple(new), load_after=MappingProxyType(dict(sorted(load.items()))),
                    overcommitted=over, notes=tuple(notes), pool=self.pool, token=self._token)

    def commit(self, plan: Plan) -> None:
        """Apply a plan made by :meth:`plan` on this placer, with nothing changed since.

        Raises:
            PlacementError: when the plan is stale or from another placer.
        """
        if plan.token is not self._token:
            raise PlacementError("placement plan is stale (placements changed since it was made, "
                                 "or it is from another placer); plan again")
        for a in plan.assignments:
            self._add(a)
        self._token = object()

    def place(self, requests: Sequence[tuple[str, int]], mode: PinMode | str = DEFAULT_MODE) -> Plan:
        """Plan and commit in one step: all replicas are placed, or none.

        Raises:
            ValueError, PlacementError: as :meth:`plan`.
        """
        plan = self.plan(requests, mode)
        self.commit(plan)
        return plan

    def release(self, name: str) -> Assignment:
        """Forget a replica's placement, freeing its CPUs; returns what it had.

        Raises:
            NotFoundError: when nothing is placed under ``name``.
        """
        try:
            a = self._assignments.pop(name)
        except KeyError:
            raise NotFoundError(f"no placement for replica {name!r}") from None
        if a.mode is not PinMode.NONE:
            for cpus in a.vcpus:
                (cpu,) = cpus
                self._load[cpu] -= 1
                if self._load[cpu] == 0 and cpu not in self.pool.allowed:
                    del self._load[cpu]
        self._token = object()
        return a

    def restore(self, name: str, host_cpus: Sequence[frozenset[int] | None],
                mode: PinMode | str) -> Assignment:
        """Re-register a running replica's placement (after a daemon restart).

        ``host_cpus`` holds each vCPU's CPUs: exactly one for exclusive/shared;
        for mode none, None means the whole pool. CPUs outside the pool are
        accepted (they still count as load).

        Raises:
            ValueError: for an unknown mode, no vCPUs, or a pinned vCPU
                without exactly one CPU.
            PlacementError: when the name is placed, or the CPUs clash with
                exclusive placements.
        """
        mode = PinMode(mode)
        self._check_requests([(name, len(host_cpus))])
        if mode is PinMode.NONE:
            vcpus = tuple(frozenset(c) if c else self.pool.allowed for c in host_cpus)
        else:
            for i, c in enumerate(host_cpus):
                if c is None or len(c) != 1:
                    raise ValueError(f"restore {name}: vcpu{i} has host CPUs "
                                     f"{_fmt(frozenset(c or ()))}; mode {mode} needs exactly one")
            vcpus = tuple(frozenset(c) for c in host_cpus if c is not None)
            cpus = [next(iter(c)) for c in vcpus]
            held = self._exclusive_cpus()
            if mode is PinMode.EXCLUSIVE:
                clash = {c for c in cpus if self._load.get(c, 0) > 0 or cpus.count(c) > 1}
            else:
                clash = set(cpus) & held
            if clash:
                raise PlacementError(f"restore {name}: host CPUs {_fmt(clash)} clash with "
                                     f"exclusive placement", needed=len(cpus),
                                     available=len(set(cpus) - clash))
        a = Assignment(name, mode, vcpus)
        self._add(a)
        self._token = object()
        return a

    # -- internals ---------------------------------------------------------------

    def _check_requests(self, requests: Sequence[tuple[str, int]]) -> None:
        seen: set[str] = set()
        for name, n in requests:
            if not isinstance(name, str) or not name:
                raise ValueError(f"replica name must be a non-empty string, got {name!r}")
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"replica {name}: vcpus must be an integer >= 1, got {n!r}")
            if name in seen:
                raise ValueError(f"replica {name} requested twice")
            if name in self._assignments:
                raise PlacementError(f"replica {name} is already placed", name=name)
            seen.add(name)

    def _exclusive_cpus(self) -> frozenset[int]:
        return frozenset().union(*(a.host_cpus() for a in self._assignments.values()
                                   if a.mode is PinMode.EXCLUSIVE))

    def _add(self, a: Assignment) -> None:
        self._assignments[a.name] = a
        if a.mode is not PinMode.NONE:
            for cpus in a.vcpus:
                (cpu,) = cpus
                self._load[cpu] = self._load.get(cpu, 0) + 1

    def _plan_pinned(self, requests: Sequence[tuple[str, int]], mode: PinMode,
                     load: dict[int, int], notes: list[str]) -> list[Assignment]:
        allowed = self.pool.allowed
        held = self._exclusive_cpus() & allowed
        if mode is PinMode.EXCLUSIVE:
            free = frozenset(c for c in allowed if load[c] == 0)
            needed = sum(n for _, n in requests)
            if needed > len(free):
                detail = self.pool.description
                if in_use := allowed - free:
                    detail += f"; in use: {_fmt(in_use)}"
                raise PlacementError(f"needs {_cpus_word(needed)}, {len(free)} available ({detail})",
                                     needed=needed, available=len(free))
        elif held == allowed and requests:
            needed = sum(n for _, n in requests)
            raise PlacementError(f"needs {_cpus_word(needed)}, 0 available ({self.pool.description}; "
                                 f"all held exclusively)", needed=needed, available=0)
        out = []
        # vCPU 0 boots the guest (and carries most of its work early on): spread the boot
        # vCPUs over the host CPUs instead of stacking every replica's vCPU 0 on one of them
        boot = Counter(next(iter(a.vcpus[0])) for a in self._assignments.values()
                       if a.mode is not PinMode.NONE and a.vcpus and len(a.vcpus[0]) == 1)
        for name, n in requests:
            if mode is PinMode.EXCLUSIVE:
                candidates = frozenset(c for c in allowed if load[c] == 0)
            else:
                candidates = allowed - held
            cpus = self._pick(n, candidates, load)
            if mode is PinMode.SHARED and len(cpus) > 1:
                k = min(range(len(cpus)), key=lambda i: (boot[cpus[i]], i))
                cpus = cpus[k:] + cpus[:k]
            boot[cpus[0]] += 1
            nodes = {self.topology.node_of(c) for c in cpus}
            biggest = max(len(candidates & cs) for cs in self._by_node.values())
            if len(nodes) > 1 and n <= biggest:
                kind = "idle" if mode is PinMode.EXCLUSIVE else "least-loaded"
                notes.append(f"{name} spans NUMA nodes {format_cpulist(nodes)} "
                             f"(no single node had {n} {kind} CPUs)")
            out.append(Assignment(name, mode, tuple(frozenset({c}) for c in cpus)))
        return out

    def _pick(self, n: int, candidates: frozenset[int], load: dict[int, int]) -> list[int]:
        """Choose a CPU for each of n vCPUs (in vCPU order), adding to ``load``."""
        chosen: list[int] = []
        while len(chosen) < n:
            round_n = min(n - len(chosen), len(candidates))
            in_round: set[int] = set()
            while len(in_round) < round_n:
                rest = candidates - in_round
                low = min(load[c] for c in rest)
                tie = frozenset(c for c in rest if load[c] == low)
                k = min(round_n - len(in_round), len(tie))
                picked = self._pick_among(tie, k, load, chosen)
                in_round.update(picked)
                chosen.extend(picked)
        return chosen

    def _pick_among(self, tie: frozenset[int], k: int, load: dict[int, int],
                    chosen: list[int]) -> list[int]:
        """Pick k of the equally loaded CPUs in ``tie``: NUMA first, then SMT, then id."""
        node_of = self.topology.node_of
        by_node: dict[int, set[int]] = {}
        for c in tie:
            by_node.setdefault(node_of(c), set()).add(c)
        guest_nodes = Counter(node_of(c) for c in chosen)

        def node_load(node: int) -> Fraction:  # mean over the node's pool CPUs, exclusive ones too
            cpus = self._by_node[node]
            return Fraction(sum(load[c] for c in cpus), len(cpus))

        fitting = [node for node, cpus in by_node.items() if len(cpus) >= k]
        if fitting:
            order = [min(fitting, key=lambda node: (-guest_nodes[node], node_load(node), node))]
        else:
            order = sorted(by_node, key=lambda node: (-guest_nodes[node], -len(by_node[node]),
                                                      node_load(node), node))
        picked: list[int] = []
        for node in order:
            left = by_node[node]
            while left and len(picked) < k:
                cpu = min(left, key=lambda c: (self._sibling_load(c, load), c))
                left.remove(cpu)
                load[cpu] += 1
                picked.append(cpu)
        return picked

    def _sibling_load(self, cpu: int, load: dict[int, int]) -> int:
        return sum(load.get(s, 0) for s in self.topology.siblings_of(cpu) if s != cpu)
