"""Pin QEMU's threads to host CPUs and read the result back from /proc.

vCPU threads (thread ids from QMP ``query-cpus-fast``) go to the host CPUs
placement chose; every other QEMU thread (main loop, I/O, RCU, workers) goes
to the emulator (housekeeping) set. Threads QEMU creates later inherit the
affinity of their creator, which is never a vCPU thread pinned elsewhere
before ``cont``. Everything here is synchronous and fast: a few syscalls.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fleetd.errors import PinningError
from fleetd.topology import format_cpulist, parse_cpulist


@dataclass(frozen=True)
class VcpuThread:
    """One vCPU: its index, QEMU thread id, asked and actual host CPUs."""

    index: int
    thread_id: int
    asked: frozenset[int] | None
    allowed: frozenset[int]

    def to_dict(self) -> dict[str, object]:
        return {"vcpu": self.index, "thread_id": self.thread_id,
                "asked": sorted(self.asked) if self.asked is not None else None,
                "cpus_allowed_list": format_cpulist(self.allowed),
                "allowed": sorted(self.allowed)}


_VCPU_COMM = re.compile(r"^CPU (\d+)/(?:TCG|KVM|HVF|WHPX)$")


def vcpu_threads_from_proc(pid: int, cpus: int) -> list[int] | None:
    """vCPU thread ids by index from thread names (QEMU runs with ``debug-threads=on``).

    Saves a QMP round trip at start; None when the names do not give exactly one thread per
    vCPU (single-threaded TCG names one thread "ALL CPUs/TCG"): then ask QMP.
    """
    found: dict[int, int] = {}
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{t}/comm") as f:
                    m = _VCPU_COMM.match(f.read().strip())
            except OSError:
                continue
            if m:
                found[int(m.group(1))] = int(t)
    except OSError:
        return None
    if sorted(found) != list(range(cpus)):
        return None
    return [found[i] for i in range(cpus)]


def read_allowed(pid: int, tid: int) -> frozenset[int]:
    """``Cpus_allowed_list`` of a thread, from /proc/<pid>/task/<tid>/status.

    Raises:
        PinningError: when the thread is gone.
    """
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("Cpus_allowed_list:"):
                    return parse_cpulist(line.split(":", 1)[1])
    except OSError as err:
        raise PinningError(f"thread {tid} of pid {pid} is gone", tid=tid, pid=pid) from err
    raise PinningError(f"no Cpus_allowed_list for thread {tid}", tid=tid, pid=pid)


def _set(vm: str, tid: int, cpus: frozenset[int]) -> None:
    try:
        os.sched_setaffinity(tid, cpus)
    except OSError as err:
        raise PinningError(f"{vm}: cannot pin thread {tid} to {format_cpulist(cpus)}: "
                           f"{err.strerror}", vm=vm, tid=tid, cpus=sorted(cpus)) from err


def pin_threads(vm: str, pid: int, vcpu_tids: Sequence[int],
                vcpu_cpus: Sequence[frozenset[int] | None],
                emulator_cpus: frozenset[int] | None) -> list[VcpuThread]:
    """Pin each vCPU thread and the remaining QEMU threads, then verify from /proc.

    ``vcpu_cpus[i]`` None leaves vCPU i unpinned (pin mode ``none``). When
    several vCPUs share one thread (single-threaded TCG) that thread gets the
    union of their CPUs.

    Raises:
        PinningError: a thread could not be pinned or reads back other CPUs.
    """
    if len(vcpu_cpus) != len(vcpu_tids):
        raise PinningError(f"{vm}: {len(vcpu_tids)} vCPU threads but {len(vcpu_cpus)} "
                           "placements", vm=vm)
    wanted: dict[int, frozenset[int] | None] = {}
    for tid, cpus in zip(vcpu_tids, vcpu_cpus):
        prev = wanted.get(tid, frozenset())
        wanted[tid] = None if cpus is None or (tid in wanted and prev is None) else (
            (prev or frozenset()) | cpus)
    try:
        all_tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError as err:
        raise PinningError(f"{vm}: QEMU (pid {pid}) is gone", vm=vm, pid=pid) from err
    if emulator_cpus:
        for tid in all_tids:
            if tid not in wanted:
                try:
                    _set(vm, tid, emulator_cpus)
                except PinningError:
                    if os.path.exists(f"/proc/{pid}/task/{tid}"):
                        raise  # a short-lived worker thread may vanish: that is fine
    for tid, cpus in wanted.items():
        if cpus is not None:
            _set(vm, tid, cpus)
    return verify(vm, pid, vcpu_tids, vcpu_cpus)


def verify(vm: str, pid: int, vcpu_tids: Sequence[int],
           vcpu_cpus: Sequence[frozenset[int] | None]) -> list[VcpuThread]:
    """Read every vCPU thread's affinity back; raise if one differs from what was asked.

    Raises:
        PinningError: naming the vCPU, what was asked and what /proc says.
    """
    out = []
    union: dict[int, frozenset[int]] = {}
    for tid, cpus in zip(vcpu_tids, vcpu_cpus):
        if cpus is not None:
            union[tid] = union.get(tid, frozenset()) | cpus
    for i, (tid, cpus) in enumerate(zip(vcpu_tids, vcpu_cpus)):
        allowed = read_allowed(pid, tid)
        if cpus is not None and allowed != union[tid]:
            raise PinningError(
                f"{vm}: vCPU {i} (thread {tid}) asked {format_cpulist(union[tid])}, "
                f"/proc says {format_cpulist(allowed)}", vm=vm, vcpu=i, tid=tid)
        out.append(VcpuThread(i, tid, cpus, allowed))
    return out


def read_vcpus(pid: int, vcpu_tids: Sequence[int],
               asked: Sequence[frozenset[int] | None] | None = None) -> list[VcpuThread]:
    """Current affinity of each vCPU thread (for ``inspect`` and re-adoption)."""
    asked = asked if asked is not None else [None] * len(vcpu_tids)
    return [VcpuThread(i, tid, a, read_allowed(pid, tid))
            for i, (tid, a) in enumerate(zip(vcpu_tids, asked))]


def vcpu_map(vcpus: Sequence[VcpuThread]) -> Mapping[int, frozenset[int]]:
    return {v.index: v.allowed for v in vcpus}
