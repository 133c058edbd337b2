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
from fleetd.errors import FleetError, PlacementError, StateError, VmError
from fleetd.events import EventBus
from fleetd.health import Failure, Health, HealthMonitor
from fleetd.log import get_logger
from fleetd.placement import Assignment, Placer
from fleetd.qmp import QmpEvent
from fleetd.vm import Pins, Vm, VmState

if TYPE_CHECKING:
    from fleetd.fleet import Fleet


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
        if new == self.state and reason == self.state_reason:
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
        self.rt.bus.publish("health", vm=self.name, fleet=self.fleet.name, health=health.value,
                            reason=reason)
        self.log.info("replica.health", health=health.value, reason=reason)
        self._notify()

    # -- the supervision loop --------------------------------------------------------------------

    def _choice(self) -> AccelChoice:
        return choose(self.spec, self.rt.decision)

    def _new_vm(self) -> Vm:
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
        return Vm(spec, launch, pins, observer=self, start_timeout=self.rt.start_timeout,
                  halted=self.debug)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Supervise until removed. Runs in the daemon's task group."""
        task_status.started()
        try:
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
                    self.log.exception("replica.internal_error", error=repr(err))
                    self.want = Want.STOPPED
                    self._set_state(ReplicaState.FAILED, f"internal error: {err!r}")
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

    async def _life(self) -> Outcome:
        self.lifetimes += 1
        vm = self._new_vm()
        monitor = HealthMonitor(self.name, self.spec.cpus, self.policy.health,
                                on_change=self._health_changed)
        monitor.suspended = self.debug
        self.vm, self.monitor = vm, monitor
        self._set_state(ReplicaState.STARTING, "restart" if self.lifetimes > 1 else "start")
        async with anyio.create_task_group() as tg:
            try:
                await tg.start(vm.run)
            except FleetError as err:
                return Outcome("failure", Failure("start-failed", str(err)))
            if vm.state == VmState.RUNNING:
                monitor.vm_running()
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
                    ReplicaState.STOPPED, ReplicaState.FAILED, ReplicaState.COMPLETED,
                    ReplicaState.PENDING), timeout=15)

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
            up = out["uptime_s"]
            out["heartbeat_rate"] = round(mon.hb_count / up, 2) if up else 0.0
        return out
