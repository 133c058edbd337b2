"""Supervision of one replica: run its guest, watch its health, restart it by policy.

A :class:`Replica` owns a sequence of QEMU lifetimes (:class:`~fleetd.vm.Vm`),
one at a time. Its task (:meth:`Replica.run`, in the daemon's task group)
starts a VM with the replica's pinned host CPUs, runs a
:class:`~fleetd.health.HealthMonitor` beside it, and when the guest fails
(detected by health, or QEMU died) collects a post-mortem bundle while QEMU
is still alive, kills it, and restarts after a capped exponential backoff,
unless the policy says otherwise or a crash loop ends it in ``failed``.
``stop``/``rm`` act at once in every state, backoff included.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from fleetd import postmortem
from fleetd.accel import AccelChoice, AccelDecision, choose
from fleetd.argv import Launch, VmPaths, host_ports
from fleetd.backoff import RestartTracker
from fleetd.console import ConsoleSweeper
from fleetd.errors import FleetError, PlacementError, StateError, VmError
from fleetd.events import EventBus
from fleetd.health import Failure, Health, HealthMonitor
from fleetd.log import get_logger
from fleetd.placement import Assignment, Placer
from fleetd.qmp import QmpEvent
from fleetd.process import QemuProcess, proc_cmdline
from fleetd.vm import Pins, Vm, VmState

if TYPE_CHECKING:
    from fleetd.fleet import Fleet


REPLAY_TAIL = 64 * 1024     # bytes of console log replayed into health after re-adoption


class ReplicaState(StrEnum):
    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    PANICKED = "panicked"
    STOPPING = "stopping"
    BACKOFF = "backoff"
    STOPPED = "stopped"
    FAILED = "failed"
    COMPLETED = "completed"


class Want(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"
    REMOVED = "removed"


@dataclass
class Runtime:
    """What every replica shares: where files go, the accelerator, the event bus."""

    run_root: Path
    state_root: Path
    decision: AccelDecision
    bus: EventBus
    placer: Placer | None = None
    qemu: str = "qemu-system-x86_64"
    changed: Callable[["Replica"], None] = lambda r: None
    start_timeout: float = 15.0
    adopt_timeout: float = 5.0
    sweeper: ConsoleSweeper | None = None

    def vm_paths(self, name: str) -> VmPaths:
        return VmPaths(self.run_root / "vm" / name, self.state_root / "vms" / name)


@dataclass(frozen=True)
class Outcome:
    """How one lifetime ended, from the supervisor's point of view."""

    kind: str                      # stopped | completed | failure
    failure: Failure | None = None
    bundle: str | None = None


async def _first(*events: anyio.Event) -> None:
    """Return as soon as any of ``events`` is set."""
    async with anyio.create_task_group() as tg:
        async def waiter(ev: anyio.Event) -> None:
            await ev.wait()
            tg.cancel_scope.cancel()
        for ev in events:
            tg.start_soon(waiter, ev)


class Replica:
    """Replica ``index`` of a fleet; see the module docstring."""

    def __init__(self, fleet: "Fleet", index: int, rt: Runtime) -> None:
        self.fleet = fleet
        self.index = index
        self.name = f"{fleet.name}-{index}"
        self.rt = rt
        self.paths = rt.vm_paths(self.name)
        self.state = ReplicaState.PENDING
        self.want = Want.RUNNING
        self.vm: Vm | None = None
        self.monitor: HealthMonitor | None = None
        self.assignment: Assignment | None = None
        self.restarts = 0
        self.tracker = RestartTracker(fleet.policy.restart)
        self.last_failure: Failure | None = None
        self.last_bundle: str | None = None
        self.failures_by_cause: Counter[str] = Counter()
        self.state_reason = ""
        self.debug = False
        self.gdb_port: int | None = None
        self.backoff_until: float | None = None
        self.log = get_logger(vm=self.name, fleet=fleet.name)
        self._cmd = anyio.Event()
        self._changed = anyio.Event()
        self.lifetimes = 0
        self.detaching = False
        self.adopt_rec: dict[str, Any] | None = None
        self._pending: dict[str, Any] | None = None
        self._running_wall: float | None = None
        self.paused_by_us = False
        self.adopt_done = anyio.Event()

    # -- bookkeeping -----------------------------------------------------------------------------

    @property
    def spec(self) -> Any:
        return self.fleet.spec

    @property
    def policy(self) -> Any:
        return self.fleet.policy

    @property
    def failures_dir(self) -> Path:
        return self.paths.state_dir / "failures"

    def _poke(self) -> None:
        self._cmd.set()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()
        self.rt.changed(self)

    def _set_state(self, new: ReplicaState, reason: str = "") -> None:
        if new == self.state:
            self.state_reason = reason or self.state_reason
            return
        old, self.state, self.state_reason = self.state, new, reason
        if new in (ReplicaState.STOPPED, ReplicaState.FAILED, ReplicaState.COMPLETED):
            self.release()
        self.rt.bus.publish("state", vm=self.name, fleet=self.fleet.name, old=old.value,
                            new=new.value, reason=reason)
        self.log.info("replica.state", old=old.value, new=new.value, reason=reason)
        self._notify()

    async def wait_until(self, pred: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait until ``pred()`` holds (re-checked on every change); False on timeout."""
        with anyio.move_on_after(timeout):
            while not pred():
                await self._changed.wait()
            return True
        return False

    @property
    def health(self) -> str:
        if self.vm is None or self.vm.state.terminal or self.monitor is None:
            return "-"
        if self.vm.state == VmState.STARTING:
            return Health.BOOTING.value     # (an adoption's replay may already say healthy)
        return self.monitor.health.value

    @property
    def host_cpus(self) -> list[list[int]]:
        if self.assignment is None:
            return []
        return [sorted(c) for c in self.assignment.vcpus]

    # -- the VM observer -------------------------------------------------------------------------

    def state_changed(self, vm: Vm, old: VmState, new: VmState, reason: str) -> None:
        if vm is not self.vm:
            return
        mon = self.monitor
        if new == VmState.RUNNING and mon is not None:
            mon.vm_running()
        elif new == VmState.PAUSED and mon is not None and old != VmState.STARTING:
            mon.vm_paused()
        if not new.terminal:
            self._set_state(ReplicaState(new.value), reason)

    def qmp_event(self, vm: Vm, event: QmpEvent) -> None:
        if vm is not self.vm:
            return
        if self.monitor is not None:
            self.monitor.qmp_event(event)
        self.rt.bus.publish("qmp", vm=self.name, fleet=self.fleet.name, event=event.name,
                            qmp_data=event.data)

    def console_line(self, vm: Vm, line: str, when: float) -> None:
        if vm is self.vm and self.monitor is not None:
            self.monitor.line(line, when)

    def _health_changed(self, health: Health, reason: str) -> None:
        vm = self.vm
        if health == Health.HEALTHY and vm is not None and vm.console is not None:
            vm.console.sweepable = True      # steady heartbeats: read it on the sweeper's grid
        self.rt.bus.publish("health", vm=self.name, fleet=self.fleet.name, health=health.value,
                            reason=reason)
        self.log.info("replica.health", health=health.value, reason=reason)
        self._notify()

    # -- the supervision loop --------------------------------------------------------------------

    def _choice(self) -> AccelChoice:
        return choose(self.spec, self.rt.decision)

    def _replay(self, monitor: HealthMonitor, offset: int, ready: bool, online: int | None) -> None:
        """Feed what the guest printed while no daemon watched (from the console log) to health."""
        from fleetd.consolelog import FileFollower
        f = FileFollower(self.paths.console_log, from_end=False)
        try:
            size = self.paths.console_log.stat().st_size
        except OSError:
            size = 0
        f.pos = offset if offset <= size else 0      # rotated meanwhile: the current file only
        # Only the tail: what a guest printed while no daemon watched is recent; a long-lived
        # guest's log holds hours of heartbeats. (A panic older than this is still found: the
        # guest sits in guest-panicked, which query-status reports.)
        f.pos = max(f.pos, size - REPLAY_TAIL)
        now = time.monotonic()
        monitor.running_since = now
        monitor.replaying = True
        try:
            for line in f.read_lines():
                monitor.line(line, now)
        finally:
            monitor.replaying = False
        monitor.created = time.monotonic()
        if ready and monitor.ready_at is None:
            monitor._ready(online or self.spec.cpus, now)
        self.rt.bus.publish("replayed", vm=self.name, fleet=self.fleet.name,
                            bytes=max(0, f.pos - offset), heartbeats=monitor.hb_count)

    async def _readopt(self, rec: dict[str, Any]) -> None:
        """After a daemon restart: re-adopt the recorded QEMU, or account for its death."""
        pid, st = rec.get("pid"), rec.get("start_time")
        if not pid or self.want != Want.RUNNING:
            return
        proc = QemuProcess.adopt(pid, st) if st else None
        if proc is not None and not self.argv_matches(proc_cmdline(pid) or []):
            self.log.warning("replica.pid_reused", pid=pid)  # not ours: neither adopt nor kill
            proc.close()
            proc = None
        if proc is None:
            self._adoption_over()
            self.lifetimes += 1
            outcome = Outcome("failure", Failure(
                "crashed", f"QEMU (pid {pid}) ended while fleetd was not running"))
            self.last_failure = outcome.failure
            self.rt.bus.publish("failure", vm=self.name, fleet=self.fleet.name,
                                cause="crashed", detail=outcome.failure.detail, pid=pid)
            self._after(outcome)
            if self.want == Want.RUNNING and self.state == ReplicaState.BACKOFF:
                await self._backoff()
            return
        self._running_wall = rec.get("running_wall")
        outcome = await self._life(adopt=proc, replay=(int(rec.get("console_offset") or 0),
                                                       bool(rec.get("ready")), rec.get("online")))
        self._after(outcome)
        if self.want == Want.RUNNING and self.state == ReplicaState.BACKOFF:
            await self._backoff()

    def argv_matches(self, argv: list[str]) -> bool:
        """Whether a process's argv is this replica's QEMU (its ``-name`` and QMP socket)."""
        return (bool(argv) and "qemu-system" in os.path.basename(argv[0])
                and f"{self.name},debug-threads=on" in argv
                and any(str(self.paths.qmp) in a for a in argv))

    def record(self) -> dict[str, Any]:
        """What a restarted daemon needs to re-adopt this replica (see fleetd.store)."""
        vm = self.vm
        live = vm is not None and not vm.state.terminal and vm.proc is not None
        mon = self.monitor
        pending = self._pending if not live else None   # an adoption not concluded yet
        handles = {
            "running_wall": (time.time() - (time.monotonic() - vm.timeline.running)
                             if live and vm.timeline.running is not None else None),
            "pid": vm.proc.pid if live else None,
            "start_time": vm.proc.start_time if live else None,
            "console_offset": vm.console_start_offset if live else None,
            "ready": bool(mon and mon.ready_at is not None) if live else False,
            "online": mon.online if live and mon else None,
        }
        if pending is not None:
            handles = {k: pending.get(k) for k in handles}
        return {
            "index": self.index, "name": self.name, "want": self.want.value,
            "state": self.state.value, "state_reason": self.state_reason,
            "restarts": self.restarts, "lifetimes": self.lifetimes,
            "failures_by_cause": dict(self.failures_by_cause),
            "last_failure": self.last_failure.to_dict() if self.last_failure else None,
            "last_bundle": self.last_bundle,
            "host_cpus": self.host_cpus if self.assignment is not None else None,
            "debug": self.debug, "gdb_port": self.gdb_port,
            **handles,
            "qmp": str(self.paths.qmp), "console": str(self.paths.console),
            "console_log": str(self.paths.console_log),
            "paused_by_us": bool(live and mon and mon.paused_at is not None and mon.pause_expected),
            "saved_at": time.time(),
        }

    def restore(self, rec: dict[str, Any]) -> None:
        """Take counters, desired state and the QEMU to re-adopt from a record."""
        self.want = Want(rec.get("want", "running"))
        self.restarts = int(rec.get("restarts", 0))
        self.lifetimes = int(rec.get("lifetimes", 0))
        self.failures_by_cause = Counter(rec.get("failures_by_cause") or {})
        lf = rec.get("last_failure")
        if lf:
            self.last_failure = Failure(lf.get("cause", "?"), lf.get("detail", ""), lf.get("vcpu"),
                                        wall=lf.get("time", 0.0))
        self.last_bundle = rec.get("last_bundle")
        self.debug = bool(rec.get("debug"))
        self.gdb_port = rec.get("gdb_port")
        state = rec.get("state", "pending")
        if self.want != Want.RUNNING:
            self.state = ReplicaState(state) if state in ReplicaState.__members__.values() else \
                ReplicaState.STOPPED
            if self.state not in (ReplicaState.FAILED, ReplicaState.COMPLETED):
                self.state = ReplicaState.STOPPED
            self.state_reason = rec.get("state_reason", "")
        self.paused_by_us = bool(rec.get("paused_by_us"))
        if rec.get("pid"):
            self.adopt_rec = rec
            self._pending = rec

    def _new_vm(self, adopt: QemuProcess | None = None) -> Vm:
        pins = None
        if self.assignment is not None and self.policy.pin != "none":
            pins = Pins(tuple(self.assignment.vcpus), self.fleet.emulator_cpus)
        elif self.fleet.emulator_cpus:
            pins = Pins(tuple([None] * self.spec.cpus), self.fleet.emulator_cpus)
        spec = self.spec
        if self.debug and not spec.gdb:
            spec = spec.model_copy(update={"gdb": True})
        launch = Launch(self.name, self.paths, self._choice(), index=self.index,
                        fleet=self.fleet.name, gdb_port=self.gdb_port if self.debug else None,
                        qemu=self.rt.qemu)
        return Vm(spec, launch, pins, observer=self,
                  start_timeout=self.rt.adopt_timeout if adopt else self.rt.start_timeout,
                  halted=self.debug and adopt is None, adopt=adopt, sweeper=self.rt.sweeper)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Supervise until removed. Runs in the daemon's task group."""
        task_status.started()
        try:
            if self.adopt_rec is not None:
                rec, self.adopt_rec = self.adopt_rec, None
                try:
                    await self._readopt(rec)
                except Exception as err:  # noqa: BLE001 - a bug must not take the daemon down
                    self._internal_error(err)
                finally:
                    self._adoption_over()
            else:
                self._adoption_over()
            while self.want != Want.REMOVED:
                if self.want == Want.STOPPED:
                    if self.state not in (ReplicaState.STOPPED, ReplicaState.FAILED,
                                          ReplicaState.COMPLETED):
                        self._set_state(ReplicaState.STOPPED, "stopped")
                    self._cmd = anyio.Event()
                    if self.want == Want.STOPPED:
                        await self._cmd.wait()
                    continue
                try:
                    self.acquire()
                except PlacementError as err:
                    self.want = Want.STOPPED
                    self._set_state(ReplicaState.FAILED, f"placement: {err}")
                    continue
                try:
                    outcome = await self._life()
                    self._after(outcome)
                except Exception as err:  # noqa: BLE001 - a bug must not take the daemon down
                    self._internal_error(err)
                    continue
                if self.want == Want.RUNNING and self.state == ReplicaState.BACKOFF:
                    await self._backoff()
        finally:
            with anyio.CancelScope(shield=True):
                vm = self.vm
                if vm is not None and not vm.state.terminal and not self.detaching:
                    await vm.stop(kill=True)
            if self.want == Want.REMOVED:
                self.release()

    def _adoption_over(self) -> None:
        self._pending = None
        self.adopt_done.set()

    def _internal_error(self, err: Exception) -> None:
        self.log.exception("replica.internal_error", error=repr(err))
        self.want = Want.STOPPED
        self._set_state(ReplicaState.FAILED, f"internal error: {err!r}")

    def acquire(self) -> None:
        """Take host CPUs for this replica (a no-op when it already holds them).

        Raises:
            PlacementError: when its pin mode no longer fits.
        """
        if self.assignment is None and self.rt.placer is not None:
            plan = self.rt.placer.place([(self.name, self.spec.cpus)], self.policy.pin)
            self.assignment = plan.assignments[0]

    def release(self) -> None:
        """Give this replica's host CPUs back to the placer."""
        if self.assignment is not None and self.rt.placer is not None:
            if self.name in self.rt.placer.assignments():
                self.rt.placer.release(self.name)
        self.assignment = None

    async def _life(self, adopt: QemuProcess | None = None,
                    replay: tuple[int, bool, int | None] | None = None) -> Outcome:
        self.lifetimes += 1
        vm = self._new_vm(adopt)
        monitor = HealthMonitor(self.name, self.spec.cpus, self.policy.health,
                                on_change=self._health_changed)
        monitor.suspended = self.debug
        self.vm, self.monitor = vm, monitor
        if adopt is not None and replay is not None:
            vm.console_start_offset = replay[0]      # this lifetime's output starts there
            self._replay(monitor, *replay)
        self._set_state(ReplicaState.STARTING, "adopt" if adopt else
                        "restart" if self.lifetimes > 1 else "start")
        async with anyio.create_task_group() as tg:
            try:
                await tg.start(vm.run)
            except FleetError as err:
                self._adoption_over()
                return Outcome("failure", Failure("start-failed", str(err)))
            if adopt is not None and self._running_wall:
                # uptime continues from the previous daemon's record
                vm.timeline.running = time.monotonic() - max(0.0, time.time() - self._running_wall)
            self._adoption_over()
            if vm.state == VmState.RUNNING:
                monitor.vm_running()
            elif vm.state == VmState.PAUSED and adopt is not None:
                monitor.pause_expected = self.paused_by_us
                monitor.vm_paused()
            self.rt.bus.publish("started", vm=self.name, fleet=self.fleet.name, pid=vm.pid,
                                host_cpus=self.host_cpus, restarts=self.restarts)
            self._notify()
            tg.start_soon(monitor.run, vm)
            await _first(vm.done, monitor.failed)
            outcome = await self._conclude(vm, monitor)
            tg.cancel_scope.cancel()
        return outcome

    async def _conclude(self, vm: Vm, monitor: HealthMonitor) -> Outcome:
        """Turn what happened into an Outcome; collect the post-mortem; make sure QEMU is gone."""
        failure = monitor.failure
        if failure is None and vm.done.is_set():
            failure = self._exit_failure(vm)
            if failure is None:
                info = vm.exit_info
                kind = "stopped" if info is not None and info.reason in (
                    "requested", "killed", "cancelled") else "completed"
                return Outcome(kind)
        if failure is None:
            await vm.stop()
            return Outcome("stopped")
        if self.want != Want.RUNNING and vm.done.is_set():
            return Outcome("stopped")
        self.rt.bus.publish("failure", vm=self.name, fleet=self.fleet.name, cause=failure.cause,
                            detail=failure.detail, vcpu=failure.vcpu, pid=vm.pid)
        self.log.warning("replica.failure", cause=failure.cause, detail=failure.detail)
        bundle = None
        with anyio.CancelScope(shield=True):
            try:
                bundle = await postmortem.collect(
                    vm, failure, self.failures_dir, restarts=self.restarts,
                    max_bytes=self.policy.logs.bundle_max_bytes, keep=self.policy.logs.bundles_max,
                    extra={"fleet": self.fleet.name, "host_cpus": self.host_cpus})
            except OSError as err:
                self.log.warning("replica.postmortem_failed", error=str(err))
            if not vm.state.terminal:
                await vm.stop(kill=True)
            if bundle and vm.exit_info is not None:
                postmortem.update_meta(self.failures_dir, bundle, exit=vm.exit_info.to_dict())
        return Outcome("failure", failure, bundle)

    def _exit_failure(self, vm: Vm) -> Failure | None:
        info = vm.exit_info
        if info is None:
            return Failure("crashed", "QEMU ended without a status")
        mon = self.monitor
        if (info.status is not None and not info.status.known and mon is not None
                and mon.guest_exit_code is not None and info.reason not in ("requested", "killed")):
            # an adopted QEMU is not our child: its exit status is unknowable, the guest said it
            code = mon.guest_exit_code
            if code == self.policy.restart.success_exit_code:
                return None
            return Failure("exit-failure", f"guest exited with code {code}")
        if info.reason in ("requested", "killed", "cancelled", "detached"):
            return None
        if info.reason == "guest-exit":
            code = info.guest_exit_code
            if code == self.policy.restart.success_exit_code:
                return None
            return Failure("exit-failure", f"guest exited with code {code}")
        if info.reason in ("guest-shutdown", "host-shutdown"):
            return None
        if info.reason == "panic":
            return Failure("panic", info.detail or "guest panicked")
        if info.reason == "guest-reset":
            return Failure("reset", info.detail)
        if info.reason == "signal":
            return Failure("crashed", f"QEMU {info.status.describe() if info.status else 'died'}")
        return Failure("crashed" if info.reason == "qemu-exit" else info.reason,
                       info.detail or (info.status.describe() if info.status else ""))

    def _after(self, outcome: Outcome) -> None:
        now = time.monotonic()
        vm = self.vm
        ran = None
        if vm is not None and vm.timeline.running is not None:
            ran = (vm.timeline.exited or now) - vm.timeline.running
        if self.want != Want.RUNNING:
            self._set_state(ReplicaState.STOPPED, "stopped")
            return
        if outcome.kind == "stopped":
            self.want = Want.STOPPED
            self._set_state(ReplicaState.STOPPED, "stopped")
            return
        if outcome.kind == "completed":
            self.tracker.record_success()
            if self.tracker.wants_restart(failed=False):
                self.backoff_until = now + self.policy.restart.backoff_initial
                self._set_state(ReplicaState.BACKOFF, "completed; restart policy always")
            else:
                self.want = Want.STOPPED
                self._set_state(ReplicaState.COMPLETED, "guest exited successfully")
            return
        assert outcome.failure is not None
        f = outcome.failure
        self.last_failure = f
        self.last_bundle = outcome.bundle
        self.failures_by_cause[f.cause] += 1
        self.tracker.record_failure(now, ran)
        if not self.tracker.wants_restart(failed=True):
            self.want = Want.STOPPED
            self._set_state(ReplicaState.FAILED, f"{f.cause}: {f.detail} (restart policy never)")
        elif self.tracker.crash_loop():
            self.want = Want.STOPPED
            self._set_state(ReplicaState.FAILED, f"{self.tracker.describe_loop()}; last: {f.cause}")
            self.rt.bus.publish("crash_loop", vm=self.name, fleet=self.fleet.name,
                                failures=len(self.tracker.failures), cause=f.cause)
        else:
            delay = self.tracker.delay()
            self.backoff_until = now + delay
            self.rt.bus.publish("backoff", vm=self.name, fleet=self.fleet.name,
                                delay_s=round(delay, 3), cause=f.cause, attempt=self.tracker.consecutive)
            self._set_state(ReplicaState.BACKOFF, f"{f.cause}; restart in {delay:.2f}s")

    async def _backoff(self) -> None:
        delay = max(0.0, (self.backoff_until or 0) - time.monotonic())
        self._cmd = anyio.Event()
        if self.want == Want.RUNNING:
            with anyio.move_on_after(delay):
                await self._cmd.wait()
        self.backoff_until = None
        if self.want == Want.RUNNING:
            self.restarts += 1
            self.rt.bus.publish("restart", vm=self.name, fleet=self.fleet.name, restarts=self.restarts)

    # -- operations ------------------------------------------------------------------------------

    async def stop(self, *, grace: float | None = None, kill: bool = False,
                   remove: bool = False) -> None:
        """Stop the guest now, in any state (backoff included); with ``remove`` end supervision."""
        with anyio.CancelScope(shield=True):
            self.want = Want.REMOVED if remove else Want.STOPPED
            self._poke()
            vm = self.vm
            if vm is not None and not vm.state.terminal:
                await vm.stop(grace=grace, kill=kill)
            if not remove:
                await self.wait_until(lambda: self.state in (
                    ReplicaState.STOPPED, ReplicaState.FAILED, ReplicaState.COMPLETED),
                    timeout=15)

    def detach(self) -> None:
        """Leave the guest running for the next daemon to adopt; the caller then cancels run()."""
        self.detaching = True
        if self.vm is not None:
            self.vm.detach()

    def start(self, *, reset_failures: bool = True) -> None:
        """Ask for the replica to run (after stop, failed or completed)."""
        if self.want == Want.REMOVED:
            raise StateError(f"{self.name}: removed", vm=self.name, state="removed",
                             operation="start")
        if reset_failures:
            self.tracker.failures.clear()
            self.tracker.consecutive = 0
        if self.want != Want.RUNNING:
            self.want = Want.RUNNING
            if self.state != ReplicaState.PENDING and self.lifetimes:
                self.restarts += 1
            self._poke()

    async def restart(self) -> None:
        """Stop (if running) and start again; counts as a restart."""
        vm = self.vm
        if vm is not None and not vm.state.terminal:
            await self.stop()
        self.start()

    def _live_vm(self, op: str) -> Vm:
        vm = self.vm
        if vm is None or vm.state.terminal:
            raise StateError(f"{self.name}: cannot {op} while {self.state.value}", vm=self.name,
                             state=self.state.value, operation=op)
        return vm

    async def pause(self) -> None:
        vm = self._live_vm("pause")
        if self.monitor is not None:
            self.monitor.pause_expected = True
        try:
            await vm.pause()
        except FleetError:
            if self.monitor is not None:
                self.monitor.pause_expected = False
            raise

    async def resume(self) -> None:
        await self._live_vm("resume").resume()

    async def inject(self, fault: str, arg: int | None = None) -> None:
        """Inject a fault (chaos): host-side signals/QMP, or guest-side console commands."""
        vm = self._live_vm(f"inject {fault}")
        if fault in ("kill", "sigstop", "sigcont"):
            sig = {"kill": signal.SIGKILL, "sigstop": signal.SIGSTOP, "sigcont": signal.SIGCONT}[fault]
            if vm.proc is None or not vm.proc.send_signal(sig):
                raise VmError(f"{self.name}: QEMU is not running", vm=self.name)
        elif fault == "pause":
            await vm._qmp().execute("stop")    # an external pause, not fleetd's
        elif fault == "stall":
            await vm.send_console(f"stall {arg if arg is not None else 0}\n")
        elif fault == "exit":
            await vm.send_console(f"exit {arg if arg is not None else 0}\n")
        else:
            await vm.send_console(f"{fault}\n")

    # -- views -----------------------------------------------------------------------------------

    def uptime(self) -> float | None:
        vm = self.vm
        if vm is None or vm.state.terminal or vm.timeline.running is None:
            return None
        return time.monotonic() - vm.timeline.running

    def info(self) -> dict[str, Any]:
        """A ``ps`` row."""
        vm = self.vm
        live = vm is not None and not vm.state.terminal
        mon = self.monitor
        return {
            "name": self.name, "fleet": self.fleet.name, "index": self.index,
            "state": self.state.value, "health": self.health,
            "health_reason": (mon.reason if mon and live else self.state_reason),
            "pid": vm.pid if live and vm is not None else None,
            "cpus": self.spec.cpus, "host_cpus": self.host_cpus,
            "guest_cpus_online": mon.online if mon and live else None,
            "restarts": self.restarts,
            "uptime_s": round(u, 3) if (u := self.uptime()) is not None else None,
            "ports": [f"127.0.0.1:{h}->{g}/{p}" for p, h, g in host_ports(self.spec, self.index)],
            "accel": vm.launch.accel.accel if vm is not None else "",
            "last_failure": (f"{self.last_failure.cause}: {self.last_failure.detail}"
                             if self.last_failure else None),
        }

    def detail(self) -> dict[str, Any]:
        """``inspect``."""
        vm = self.vm
        d = self.info()
        d.update({
            "spec": self.spec.model_dump(mode="json"),
            "policy": self.policy.model_dump(mode="json"),
            "vcpus": vm.vcpu_info() if vm is not None and not vm.state.terminal else [],
            "argv": vm.argv if vm is not None else [],
            "paths": {"qmp": str(self.paths.qmp), "console": str(self.paths.console),
                      "console_log": str(self.paths.console_log),
                      "stderr": str(self.paths.stderr), "failures": str(self.failures_dir)},
            "checks": self.monitor.checks() if self.monitor is not None else {},
            "exit": vm.exit_info.to_dict() if vm is not None and vm.exit_info else None,
            "console_tail": list(vm.console.tail)[-20:] if vm is not None and vm.console else [],
            "recent_events": [e.to_dict() for e in self.rt.bus.recent(20, [self.name])],
            "gdb": self.gdb_target(),
        })
        return d

    def symbols(self) -> str | None:
        """The file gdb should load symbols from (the bundled guest's unstripped ELF)."""
        from fleetd.spec import bundled_symbols
        if self.spec.bundled:
            return str(bundled_symbols())
        return str(self.spec.kernel) if self.spec.kernel else None

    def gdb_command(self) -> str:
        """The command line that attaches gdb to this replica's gdbstub."""
        target = self.gdb_target() or "?"
        if not target.startswith("127.0.0.1:"):
            target = f"unix::{target}"
        sym = self.symbols()
        return f"gdb -ex 'target remote {target}'" + (f" {sym}" if sym else "")

    def gdb_target(self) -> str | None:
        if not (self.debug or self.spec.gdb):
            return None
        return f"127.0.0.1:{self.gdb_port}" if self.gdb_port else str(self.paths.gdb)

    def stats(self) -> dict[str, Any]:
        """CPU time per vCPU thread and for QEMU, RSS, heartbeat and counter rates."""
        from fleetd.process import thread_cpu_seconds
        vm, mon = self.vm, self.monitor
        out: dict[str, Any] = {"name": self.name, "fleet": self.fleet.name,
                               "state": self.state.value, "restarts": self.restarts,
                               "uptime_s": self.uptime() or 0.0,
                               "failures": sum(self.failures_by_cause.values())}
        if vm is None or vm.state.terminal or vm.proc is None:
            return out
        pid = vm.proc.pid
        out["pid"] = pid
        out["qemu_cpu_seconds"] = thread_cpu_seconds(pid, None) or 0.0
        try:
            with open(f"/proc/{pid}/statm") as f:
                out["qemu_rss_bytes"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
        vcpus = []
        for v in vm.vcpus:
            entry: dict[str, Any] = {"vcpu": v.index,
                                     "cpu_seconds": thread_cpu_seconds(pid, v.thread_id) or 0.0}
            if mon is not None and v.index < len(mon.counter_rates):
                entry["counter_rate"] = round(mon.counter_rates[v.index], 1)
            if mon is not None and v.index < len(mon.counters):
                entry["counter"] = mon.counters[v.index]
            vcpus.append(entry)
        out["vcpus"] = vcpus
        if mon is not None:
            out["heartbeats_total"] = mon.hb_count
            live = time.monotonic() - mon.created
            out["heartbeat_rate"] = round(mon.hb_live / live, 2) if live > 0 else 0.0
        return out
