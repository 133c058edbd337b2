"""Health of one running guest: ready, heartbeat, per-vCPU progress, panic, hang, responsiveness.

A :class:`HealthMonitor` watches one QEMU lifetime. It is fed console lines
and QMP events (from the VM's observer callbacks) and runs one checker task
that sleeps until the earliest deadline (boot, heartbeat, stall, no-output,
external pause) instead of polling, so a hang is detected within
``heartbeat_timeout`` plus a QMP round trip. The first failure is final for
this lifetime: it is stored in :attr:`HealthMonitor.failure` and
:attr:`HealthMonitor.failed` is set; the supervisor acts on it.

Causes: ``panic``, ``hang``, ``stall`` (with the vCPU index), ``boot-timeout``,
``cpus-missing``, ``unresponsive``, ``watchdog``, ``reset``, ``no-output``,
``paused`` (paused by something other than fleetd).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import anyio

from fleetd.errors import FleetError
from fleetd.guestproto import GuestBoot, GuestExit, GuestHeartbeat, GuestPanic, GuestReady, parse_line
from fleetd.policy import HealthPolicy
from fleetd.qmp import QmpEvent

if TYPE_CHECKING:
    from fleetd.vm import Vm

CONFIRM_TIMEOUT = 0.5


class Health(StrEnum):
    BOOTING = "booting"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    PAUSED = "paused"
    DOWN = "down"


@dataclass(frozen=True)
class Failure:
    """A detected failure: its cause, a one-line detail, and when (monotonic and wall clock)."""

    cause: str
    detail: str
    vcpu: int | None = None
    at: float = field(default_factory=time.monotonic)
    wall: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"cause": self.cause, "detail": self.detail, "time": self.wall}
        if self.vcpu is not None:
            d["vcpu"] = self.vcpu
        return d


class ConsolePatterns:
    """Compiled console patterns of a fleet (for guests that do not speak FLEET)."""

    def __init__(self, policy: HealthPolicy) -> None:
        self.fleet = policy.fleet_protocol
        self.ready = re.compile(policy.ready_pattern) if policy.ready_pattern else None
        self.heartbeat = re.compile(policy.heartbeat_pattern) if policy.heartbeat_pattern else None
        self.panic = [re.compile(p) for p in policy.panic_patterns]

    @property
    def has_ready_signal(self) -> bool:
        return self.fleet or self.ready is not None

    @property
    def has_heartbeat(self) -> bool:
        return self.fleet or self.heartbeat is not None


class HealthMonitor:
    """Health of one QEMU lifetime; see the module docstring."""

    def __init__(self, name: str, cpus: int, policy: HealthPolicy, *,
                 on_change: Callable[[Health, str], None] | None = None,
                 patterns: ConsolePatterns | None = None) -> None:
        self.name = name
        self.cpus = cpus
        self.policy = policy
        self.patterns = patterns or ConsolePatterns(policy)
        self.on_change = on_change or (lambda h, r: None)
        self.health = Health.BOOTING
        self.reason = "waiting for the guest"
        self.failure: Failure | None = None
        self.failed = anyio.Event()
        self.suspended = False                    # debug mode: no timeouts
        self.pause_expected = False               # fleetd itself paused the guest
        self.reset_expected = False
        now = time.monotonic()
        self.running_since: float | None = None
        self.ready_at: float | None = None
        self.online: int | None = None
        self.last_output: float | None = None
        self.last_hb: float | None = None
        self.hb_seq: int | None = None
        self.hb_count = 0
        self.counters: tuple[int, ...] = ()
        self.counter_advanced: list[float] = []
        self.counter_rates: list[float] = []
        self._prev_hb: tuple[float, tuple[int, ...]] | None = None
        self.paused_at: float | None = None
        self.panic_msg: str | None = None
        self.guest_exit_code: int | None = None
        self.boots = 0
        self.qmp_failures = 0
        self.last_qmp_ok: float | None = None
        self.created = now
        self.replaying = False              # feeding a console log after re-adoption
        self.hb_live = 0                    # heartbeats seen live (not replayed)
        self._wake = anyio.Event()

    # -- feeding -------------------------------------------------------------------------------

    def _set(self, health: Health, reason: str) -> None:
        if (health, reason) != (self.health, self.reason):
            self.health, self.reason = health, reason
            self.on_change(health, reason)

    def fail(self, cause: str, detail: str, vcpu: int | None = None) -> None:
        """Record the (first) failure of this lifetime."""
        if self.failure is not None:
            return
        self.failure = Failure(cause, detail, vcpu)
        self._set(Health.UNHEALTHY, f"{cause}: {detail}")
        self.failed.set()
        self._poke()

    def _poke(self) -> None:
        self._wake.set()

    def vm_running(self, now: float | None = None) -> None:
        """The guest's vCPUs run (after ``cont``, a resume, or re-adoption)."""
        now = time.monotonic() if now is None else now
        if self.running_since is None:
            self.running_since = now
        if self.paused_at is not None:
            # timers restart after a pause: the guest could not make progress meanwhile
            self.last_hb = now if self.last_hb is not None else None
            self.counter_advanced = [now] * len(self.counter_advanced)
            self.last_output = now if self.last_output is not None else None
            if self.ready_at is None:
                self.running_since = now
        self.paused_at = None
        self.pause_expected = False
        if self.failure is None:
            self._set(Health.HEALTHY if self.ready_at else Health.BOOTING,
                      "" if self.ready_at else "waiting for the guest")
        self._poke()

    def vm_paused(self, now: float | None = None) -> None:
        self.paused_at = time.monotonic() if now is None else now
        if self.failure is None:
            self._set(Health.PAUSED, "paused by fleetd" if self.pause_expected
                      else "paused (not by fleetd)")
        self._poke()

    def line(self, line: str, when: float) -> None:
        """One console line."""
        self.last_output = when
        ev = parse_line(line) if self.patterns.fleet else None
        if ev is not None:
            self._guest_event(ev, when)
            return
        p = self.patterns
        if p.heartbeat is not None and (m := p.heartbeat.search(line)):
            groups = m.groupdict()
            counters = []
            i = 0
            while groups.get(f"c{i}") is not None:
                try:
                    counters.append(int(groups[f"c{i}"]))
                except ValueError:
                    break
                i += 1
            self._heartbeat(GuestHeartbeat(self.hb_count, None, tuple(counters)), when)
            if self.ready_at is None and p.ready is None and not p.fleet:
                self._ready(self.cpus, when)
            return
        if p.ready is not None and self.ready_at is None and (m := p.ready.search(line)):
            online = m.groupdict().get("cpus")
            self._ready(int(online) if online and online.isdigit() else self.cpus, when)
            return
        for pat in p.panic:
            if pat.search(line):
                self.panic_msg = line.strip()[:500]
                self.fail("panic", f"console: {self.panic_msg}")
                return

    def _guest_event(self, ev: Any, when: float) -> None:
        if isinstance(ev, GuestHeartbeat):
            self._heartbeat(ev, when)
        elif isinstance(ev, GuestReady):
            self._ready(ev.online, when, expected=ev.expected)
        elif isinstance(ev, GuestPanic):
            self.panic_msg = ev.msg
            where = f" on cpu {ev.cpu}" if ev.cpu is not None else ""
            self.fail("panic", f"guest panic{where}: {ev.msg}", ev.cpu)
        elif isinstance(ev, GuestExit):
            self.guest_exit_code = ev.code
        elif isinstance(ev, GuestBoot):
            self.boots += 1
            if self.boots > 1 and not self.reset_expected and self.failure is None:
                self.fail("reset", "guest rebooted (second BOOT line)")
            self.reset_expected = False

    def _ready(self, online: int, when: float, expected: int | None = None) -> None:
        if self.ready_at is not None:
            return
        self.online = online
        if online < self.cpus:
            self.fail("cpus-missing", f"guest reports {online} of {self.cpus} CPUs online"
                      + (f" (found {expected})" if expected is not None else ""))
            return
        self.ready_at = when
        self.counter_advanced = [when] * self.cpus
        if self.failure is None:
            self._set(Health.HEALTHY, "")
        self._poke()

    def _heartbeat(self, hb: GuestHeartbeat, when: float) -> None:
        self.last_hb = when
        self.hb_seq = hb.seq
        self.hb_count += 1
        if not self.replaying:
            self.hb_live += 1
        c = hb.counters
        if c:
            if len(self.counter_advanced) != len(c):
                self.counter_advanced = [when] * len(c)
            elif len(self.counters) == len(c):
                for i, (old, new) in enumerate(zip(self.counters, c)):
                    if new != old:
                        self.counter_advanced[i] = when
            if self._prev_hb is not None and len(self._prev_hb[1]) == len(c):
                dt = when - self._prev_hb[0]
                if dt > 0:
                    self.counter_rates = [max(0.0, (n - o) / dt) for o, n in zip(self._prev_hb[1], c)]
            self._prev_hb = (when, c)
            self.counters = c
            self._check_stall(when)

    def _check_stall(self, when: float) -> None:
        """A vCPU is stalled when a heartbeat (so the guest and the others run) shows its
        counter unchanged for ``stall_timeout``. Judged on heartbeats, not on a timer, so a
        hung guest (no heartbeats at all) is a hang, never a stall of vCPU 0."""
        if (self.failure is not None or self.suspended or self.ready_at is None
                or self.paused_at is not None or self.replaying):
            return
        limit = self.policy.stall_timeout
        for i, t in enumerate(self.counter_advanced):
            if when - t > limit:
                val = self.counters[i] if i < len(self.counters) else "?"
                self.fail("stall", f"vCPU {i} counter stuck at {val} for {when - t:.1f}s "
                          "while the others run", vcpu=i)
                return

    def qmp_event(self, ev: QmpEvent) -> None:
        if ev.name == "WATCHDOG":
            self.fail("watchdog", f"watchdog fired ({ev.data.get('action', '')})")
        elif ev.name == "GUEST_PANICKED":
            msg = f"guest panic: {self.panic_msg}" if self.panic_msg else "guest panicked (pvpanic)"
            self.fail("panic", msg)
        elif ev.name == "RESET":
            if ev.data.get("guest") and not self.reset_expected:
                self.fail("reset", f"unexpected reset ({ev.data.get('reason', 'guest')})")
        elif ev.name == "GUEST_CRASHLOADED":
            self.fail("panic", "guest crashloaded")

    # -- checking ------------------------------------------------------------------------------

    def deadlines(self, now: float) -> list[tuple[float, str]]:
        """Pending (deadline, check) pairs; empty while suspended, paused by us, or failed."""
        p = self.policy
        if self.failure is not None or self.suspended or self.running_since is None:
            return []
        if self.paused_at is not None:
            return [] if self.pause_expected else [(self.paused_at + p.heartbeat_timeout, "paused")]
        out = []
        if self.ready_at is None and self.patterns.has_ready_signal:
            out.append((self.running_since + p.boot_timeout, "boot"))
        if self.ready_at is not None and self.patterns.has_heartbeat:
            out.append(((self.last_hb or self.ready_at) + p.heartbeat_timeout, "heartbeat"))
            # (a stall is judged when a heartbeat arrives: see _check_stall)
        if p.no_output_timeout is not None:
            out.append(((self.last_output or self.running_since) + p.no_output_timeout, "output"))
        return out

    def expired(self, now: float) -> list[str]:
        return [name for when, name in self.deadlines(now) if when <= now]

    async def run(self, vm: "Vm") -> None:
        """The checker task: wakes at the earliest deadline, and for periodic QMP checks."""
        p = self.policy
        next_qmp = time.monotonic() + p.check_interval
        while self.failure is None:
            now = time.monotonic()
            for name in self.expired(now):
                await self._expire(name, vm, now)
                if self.failure is not None:
                    return
            if now >= next_qmp:
                await self._check_qmp(vm)
                # Heartbeats flowing through QEMU's serial device already prove QEMU alive
                # (and a stop is confirmed over QMP at once): poll QMP ten times less often.
                flowing = self.ready_at is not None and self.patterns.has_heartbeat
                next_qmp = time.monotonic() + p.check_interval * (10 if flowing else 1)
                continue
            wake = min([w for w, _ in self.deadlines(now)] + [next_qmp])
            self._wake = anyio.Event()
            with anyio.move_on_after(max(0.0, wake - time.monotonic()) + 0.001):
                await self._wake.wait()

    async def _expire(self, name: str, vm: "Vm", now: float) -> None:
        p = self.policy
        if name in ("heartbeat", "output") and vm.console is not None:
            vm.console.sweep()          # judge on the latest output, not the last sweep's
            now = time.monotonic()
            if name not in self.expired(now):
                return
        if name == "boot":
            self.fail("boot-timeout", f"no READY within {p.boot_timeout:g}s")
        elif name == "paused":
            self.fail("paused", f"paused by something other than fleetd for {p.heartbeat_timeout:g}s")
        elif name == "output":
            self.fail("no-output", f"no console output for {p.no_output_timeout:g}s")
        elif name == "heartbeat":
            # Is QEMU itself wedged (SIGSTOP, stuck main loop), or the guest?
            status = await self._status(vm, CONFIRM_TIMEOUT)
            if self.failure is not None:
                return
            if status is None:
                self.fail("unresponsive", f"no heartbeat for {p.heartbeat_timeout:g}s and QMP "
                          f"does not answer within {CONFIRM_TIMEOUT}s")
            elif status.get("status") == "running":
                age = now - (self.last_hb or self.ready_at or now)
                self.fail("hang", f"no heartbeat for {age:.1f}s (timeout "
                          f"{p.heartbeat_timeout:g}s), last seq {self.hb_seq}")
            elif self.paused_at is None:
                self.vm_paused()  # the STOP event is on its way; the pause deadline takes over

    async def _status(self, vm: "Vm", timeout: float) -> dict[str, Any] | None:
        try:
            st = await vm.query_status(timeout=timeout)
        except FleetError:
            return None
        self.last_qmp_ok = time.monotonic()
        return st

    async def _check_qmp(self, vm: "Vm") -> None:
        st = await self._status(vm, self.policy.qmp_timeout)
        if st is None:
            self.qmp_failures += 1
            if self.qmp_failures >= self.policy.unresponsive_after and self.failure is None:
                self.fail("unresponsive", f"QMP query-status failed {self.qmp_failures} times "
                          f"(timeout {self.policy.qmp_timeout:g}s)")
        else:
            self.qmp_failures = 0

    def checks(self) -> dict[str, Any]:
        """The health model as data, for ``inspect``."""
        now = time.monotonic()

        def age(t: float | None) -> float | None:
            return None if t is None else round(now - t, 3)

        return {
            "health": self.health.value, "reason": self.reason,
            "ready": self.ready_at is not None, "cpus_online": self.online,
            "heartbeat": {"count": self.hb_count, "seq": self.hb_seq, "age_s": age(self.last_hb)},
            "progress": [{"vcpu": i, "counter": c, "age_s": age(self.counter_advanced[i])
                          if i < len(self.counter_advanced) else None,
                          "rate": round(self.counter_rates[i], 1) if i < len(self.counter_rates) else None}
                         for i, c in enumerate(self.counters)],
            "responsive": {"qmp_failures": self.qmp_failures, "last_ok_age_s": age(self.last_qmp_ok)},
            "last_output_age_s": age(self.last_output),
            "panic": self.panic_msg,
            "failure": self.failure.to_dict() if self.failure else None,
            "suspended": self.suspended,
        }
