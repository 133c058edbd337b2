"""One QEMU guest's whole life: spawn paused, pin vCPUs, run, watch, stop without orphans.

A :class:`Vm` is one QEMU process, from spawn to reap. Restarting a guest
means a new :class:`Vm` (the supervisor owns that). Its life is an explicit
state machine (:class:`VmState`); every change is reported to the observer.

Usage (structured: readiness through ``tg.start``)::

    async with anyio.create_task_group() as tg:
        vm = Vm(name, spec, launch, pins)
        await tg.start(vm.run)        # returns once pinned and running
        ...
        await vm.stop()               # powerdown -> quit -> SIGTERM -> SIGKILL

Cancelling :meth:`Vm.run` at any point kills and reaps QEMU (teardown is
shielded); :meth:`Vm.detach` instead leaves QEMU running for re-adoption.
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import anyio
from anyio.abc import TaskStatus

from fleetd import pinning
from fleetd.argv import Launch, build_argv
from fleetd.console import Console, ConsoleSweeper
from fleetd.errors import FleetError, QemuStartError, QmpError, StateError, VmError, single_error
from fleetd.log import get_logger
from fleetd.process import ExitStatus, QemuProcess, find_qemu, proc_cmdline
from fleetd.qmp import EventQueue, QmpConnection, QmpEvent
from fleetd.spec import GuestSpec

WATCHED_EVENTS = ("SHUTDOWN", "RESET", "STOP", "RESUME", "GUEST_PANICKED", "WATCHDOG",
                  "POWERDOWN", "GUEST_CRASHLOADED", "SUSPEND", "WAKEUP")


class VmState(StrEnum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    PANICKED = "panicked"     # guest panicked; QEMU kept alive (paused) for a post-mortem
    STOPPING = "stopping"
    STOPPED = "stopped"       # ended as asked, or the guest shut down / exited on purpose
    CRASHED = "crashed"       # ended unexpectedly: signal, QEMU error, panic

    @property
    def terminal(self) -> bool:
        return self in (VmState.STOPPED, VmState.CRASHED)


_ALLOWED: dict[VmState, frozenset[VmState]] = {
    VmState.CREATED: frozenset({VmState.STARTING, VmState.STOPPED, VmState.CRASHED}),
    VmState.STARTING: frozenset({VmState.RUNNING, VmState.PAUSED, VmState.PANICKED,
                                 VmState.STOPPING, VmState.STOPPED, VmState.CRASHED}),
    VmState.RUNNING: frozenset({VmState.PAUSED, VmState.PANICKED, VmState.STOPPING,
                                VmState.STOPPED, VmState.CRASHED}),
    VmState.PAUSED: frozenset({VmState.RUNNING, VmState.PANICKED, VmState.STOPPING,
                               VmState.STOPPED, VmState.CRASHED}),
    VmState.PANICKED: frozenset({VmState.STOPPING, VmState.CRASHED}),
    VmState.STOPPING: frozenset({VmState.STOPPED, VmState.CRASHED}),
    VmState.STOPPED: frozenset(),
    VmState.CRASHED: frozenset(),
}


def check_transition(vm: str, old: VmState, new: VmState, operation: str = "") -> None:
    """Raise :class:`StateError` unless ``old -> new`` is allowed."""
    if new not in _ALLOWED[old]:
        raise StateError(f"{vm}: cannot {operation or new.value} while {old.value}", vm=vm,
                         state=old.value, operation=operation or new.value)


class VmObserver(Protocol):
    """What a VM reports. Every method is called from the VM's tasks and must not block."""

    def state_changed(self, vm: "Vm", old: VmState, new: VmState, reason: str) -> None: ...
    def qmp_event(self, vm: "Vm", event: QmpEvent) -> None: ...
    def console_line(self, vm: "Vm", line: str, when: float) -> None: ...


class NullObserver:
    def state_changed(self, vm: "Vm", old: VmState, new: VmState, reason: str) -> None:
        pass

    def qmp_event(self, vm: "Vm", event: QmpEvent) -> None:
        pass

    def console_line(self, vm: "Vm", line: str, when: float) -> None:
        pass


@dataclass(frozen=True)
class Pins:
    """Where QEMU's threads go: one host-CPU set per vCPU (None: unpinned) and the emulator set."""

    vcpus: tuple[frozenset[int] | None, ...]
    emulator: frozenset[int] | None = None

    @classmethod
    def none(cls, cpus: int) -> "Pins":
        return cls(tuple([None] * cpus), None)


@dataclass(frozen=True)
class ExitInfo:
    """How a VM ended."""

    state: VmState
    reason: str                    # requested | killed | guest-shutdown | guest-exit | guest-reset
    #                                | panic | signal | qemu-exit | start-failed | detached
    status: ExitStatus | None = None
    guest_exit_code: int | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state.value, "reason": self.reason,
                "status": self.status.to_dict() if self.status else None,
                "guest_exit_code": self.guest_exit_code, "detail": self.detail}


@dataclass
class Timeline:
    """Timestamps (monotonic) of a VM's milestones, for events and benchmarks."""

    spawned: float | None = None
    qmp_ready: float | None = None
    pinned: float | None = None
    running: float | None = None
    exited: float | None = None
    events: deque[tuple[float, str, dict[str, Any]]] = field(
        default_factory=lambda: deque(maxlen=512))


def _size(path: os.PathLike[str] | str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _tail_file(path: os.PathLike[str] | str, limit: int = 2048) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


class Vm:
    """One QEMU process running one guest."""

    def __init__(self, spec: GuestSpec, launch: Launch, pins: Pins | None = None, *,
                 observer: VmObserver | None = None, start_timeout: float = 15.0,
                 halted: bool = False, adopt: QemuProcess | None = None,
                 sweeper: ConsoleSweeper | None = None) -> None:
        self.name = launch.name
        self.spec = spec
        self.launch = launch
        self.paths = launch.paths
        self.pins = pins or Pins.none(spec.cpus)
        self.observer: VmObserver = observer or NullObserver()
        self.start_timeout = start_timeout
        self.halted = halted
        self.adopted = adopt
        self.sweeper = sweeper
        self.console_start_offset = 0
        self.state = VmState.CREATED
        self.argv: list[str] = []
        self.proc: QemuProcess | None = None
        self.qmp: QmpConnection | None = None
        self.console: Console | None = None
        self.vcpus: list[pinning.VcpuThread] = []
        self._pinned_threads: set[int] = set()
        self.timeline = Timeline()
        self.exit_info: ExitInfo | None = None
        self.log = get_logger(vm=self.name)
        self._stop_requested: str | None = None   # "requested" | "killed"
        self._detach = False
        self._run_scope: anyio.CancelScope | None = None
        self._events = EventQueue(WATCHED_EVENTS, maxlen=1024)
        self._last_shutdown: QmpEvent | None = None
        self._panicked = False
        self._start_error: FleetError | None = None
        self._done = anyio.Event()

    # -- state -----------------------------------------------------------------------------------

    def _to(self, new: VmState, reason: str = "", *, operation: str = "") -> None:
        old = self.state
        if old == new:
            return
        check_transition(self.name, old, new, operation)
        self.state = new
        self.timeline.events.append((time.monotonic(), "state", {"from": old.value,
                                                                  "to": new.value,
                                                                  "reason": reason}))
        self.log.debug("vm.state", old=old.value, new=new.value, reason=reason)
        self.observer.state_changed(self, old, new, reason)

    def _maybe(self, new: VmState, reason: str = "") -> None:
        """Event-driven transition: ignored when not allowed (e.g. STOP while stopping)."""
        if new in _ALLOWED[self.state]:
            self._to(new, reason)

    @property
    def done(self) -> anyio.Event:
        """Set once QEMU has ended (or never started) and :attr:`exit_info` is known."""
        return self._done

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive

    # -- run -------------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[Vm] = anyio.TASK_STATUS_IGNORED) -> ExitInfo:
        """Spawn QEMU paused, pin, start the guest; then watch it until QEMU ends.

        Signals readiness (``task_status.started(self)``) once the vCPUs are
        pinned and the guest runs (or is halted for gdb).

        Raises:
            StateError: when called twice.
            FleetError: (QemuStartError, QmpError, PinningError, VmTimeout) when
                start fails; QEMU is then killed and reaped before this returns.
        """
        self._to(VmState.STARTING, "start", operation="start")
        started = False
        try:
            with anyio.CancelScope() as self._run_scope:
                try:
                    async with anyio.create_task_group() as tg:
                        await self._start(tg)
                        task_status.started(self)
                        started = True
                        await self._done.wait()
                        tg.cancel_scope.cancel()
                except BaseExceptionGroup as group:
                    err = single_error(group)
                    if err is None:
                        raise
                    raise err from None
        except FleetError as err:
            if self._stop_requested is None:
                self._start_error = err
                self._fail_start(err)
                raise
        finally:
            with anyio.CancelScope(shield=True):
                await self._teardown()
        assert self.exit_info is not None
        if not started:
            # stopped (or detached) before it ever ran: tg.start() callers need an error
            raise StateError(f"{self.name}: {self.exit_info.reason} while starting", vm=self.name,
                             state=self.state.value, operation="start")
        return self.exit_info

    def _fail_start(self, err: FleetError) -> None:
        stderr = _tail_file(self.paths.stderr)
        if stderr and isinstance(err, (QemuStartError, QmpError)):
            err.fields["stderr"] = stderr[-1000:]
        self.log.warning("vm.start_failed", error=str(err))

    async def _start(self, tg: anyio.abc.TaskGroup) -> None:
        if self.adopted is not None:
            await self._adopt(tg)
            return
        spec, paths = self.spec, self.paths
        paths.check()
        spec.check_files()
        for d in (paths.run_dir, paths.state_dir):
            try:
                d.mkdir(parents=True, exist_ok=True, mode=0o750)
            except OSError as err:
                raise QemuStartError(f"{self.name}: cannot create {d}: {err.strerror}",
                                     vm=self.name) from err
        for stale in (paths.qmp, paths.console, paths.gdb, paths.pidfile):
            stale.unlink(missing_ok=True)
        argv = build_argv(spec, self.launch)
        argv[0] = find_qemu(argv[0])
        self.argv = argv
        self.timeline.spawned = time.monotonic()
        self.proc = QemuProcess.spawn(argv, stdout=paths.stdout, stderr=paths.stderr)
        self.log.info("vm.spawned", pid=self.proc.pid, accel=self.launch.accel.accel,
                      cpu_model=self.launch.accel.cpu_model, cpus=spec.cpus)
        tg.start_soon(self._watch_process)
        await self._connect(spec)
        await self._pin()
        await self.console.connect(timeout=self.start_timeout, alive=lambda: self.alive)
        tg.start_soon(self._read_console)
        tg.start_soon(self._pump_events)
        self.console_start_offset = _size(paths.console_log)
        if self.halted:
            self._to(VmState.PAUSED, "halted for debugging")
        else:
            await self.qmp.execute("cont")
            self.timeline.running = time.monotonic()
            self._to(VmState.RUNNING, "cont")
        if self.pins.emulator:
            tg.start_soon(self._repin_new_threads)

    async def _adopt(self, tg: anyio.abc.TaskGroup) -> None:
        """Take over a running QEMU left by a previous daemon: reconnect, re-read, no ``cont``."""
        proc = self.adopted
        assert proc is not None
        self.proc = proc
        self.argv = proc_cmdline(proc.pid) or []
        self.timeline.spawned = time.monotonic()
        tg.start_soon(self._watch_process)
        await self._connect(self.spec)
        status = await self.qmp.execute("query-status")
        cpus = await self.qmp.execute("query-cpus-fast")
        tids = [int(c["thread-id"]) for c in sorted(cpus, key=lambda c: c["cpu-index"])]
        asked = list(self.pins.vcpus) if len(self.pins.vcpus) == len(tids) else [None] * len(tids)
        self.vcpus = pinning.read_vcpus(proc.pid, tids, asked)
        self.timeline.pinned = time.monotonic()
        await self.console.connect(timeout=self.start_timeout, alive=lambda: self.alive)
        tg.start_soon(self._read_console)
        tg.start_soon(self._pump_events)
        self.timeline.running = time.monotonic()
        run_state = status.get("status")
        self.log.info("vm.adopted", pid=proc.pid, status=run_state)
        if run_state == "running":
            self._to(VmState.RUNNING, "adopted")
        elif run_state in ("guest-panicked", "internal-error"):
            self._panicked = True
            self._to(VmState.PANICKED, f"adopted ({run_state})")
        else:
            self._to(VmState.PAUSED, f"adopted ({run_state})")

    async def _connect(self, spec: GuestSpec) -> None:
        assert self.proc is not None
        self.qmp = QmpConnection(self.name, str(self.paths.qmp))
        self.qmp.add_queue(self._events)
        self.console = Console(self.name, str(self.paths.console), self._on_line)
        self.console.sweeper = self.sweeper
        try:
            await self.qmp.connect(timeout=self.start_timeout, alive=lambda: self.alive)
        except FleetError as err:
            what = "could not reconnect to QEMU" if self.adopted else "QEMU did not start"
            raise QemuStartError(f"{self.name}: {what}: "
                                 f"{_tail_file(self.paths.stderr, 400) or err}",
                                 vm=self.name) from err
        self.timeline.qmp_ready = time.monotonic()

    async def _pin(self) -> None:
        assert self.qmp is not None and self.proc is not None
        tids = pinning.vcpu_threads_from_proc(self.proc.pid, self.spec.cpus)
        if tids is None:
            cpus = await self.qmp.execute("query-cpus-fast")
            tids = [int(c["thread-id"]) for c in sorted(cpus, key=lambda c: c["cpu-index"])]
        if len(tids) != self.spec.cpus:
            raise QemuStartError(f"{self.name}: QEMU created {len(tids)} vCPUs, spec asks "
                                 f"{self.spec.cpus}", vm=self.name)
        self._pinned_threads = set(self.proc.threads())
        self.vcpus = pinning.pin_threads(self.name, self.proc.pid, tids, self.pins.vcpus,
                                         self.pins.emulator)
        self.timeline.pinned = time.monotonic()

    async def _repin_new_threads(self) -> None:
        """Threads born after ``cont`` (KVM's nx-lpage-recovery, thread-pool workers spawned
        by a vCPU thread) inherit their creator's affinity: move them to the emulator set."""
        assert self.proc is not None and self.pins.emulator
        known = set(self._pinned_threads)
        vcpu = {v.thread_id for v in self.vcpus}
        delay = 0.25
        while True:
            await anyio.sleep(delay)
            delay = min(delay * 4, 10.0)
            tids = set(self.proc.threads())
            for tid in tids - known - vcpu:
                try:
                    os.sched_setaffinity(tid, self.pins.emulator)
                except OSError:
                    pass  # gone already
            known = tids

    def _on_line(self, line: str, when: float) -> None:
        self.observer.console_line(self, line, when)

    async def _read_console(self) -> None:
        assert self.console is not None
        await self.console.run()

    async def _pump_events(self) -> None:
        while True:
            ev = await self._events.get()
            self.timeline.events.append((time.monotonic(), "qmp", {"event": ev.name,
                                                                    "data": ev.data}))
            if ev.name == "STOP" and self.state == VmState.RUNNING:
                self._maybe(VmState.PAUSED, "STOP event")
            elif ev.name == "RESUME" and self.state == VmState.PAUSED:
                self._maybe(VmState.RUNNING, "RESUME event")
            elif ev.name == "GUEST_PANICKED":
                self._panicked = True
                self._maybe(VmState.PANICKED, f"guest panicked ({ev.data.get('action', '')})")
            elif ev.name == "SHUTDOWN":
                self._last_shutdown = ev
            self.observer.qmp_event(self, ev)

    async def _watch_process(self) -> None:
        assert self.proc is not None
        status = await self.proc.watch()
        self.timeline.exited = time.monotonic()
        # Drain events QMP delivered before the socket closed (SHUTDOWN reason, panic).
        await anyio.sleep(0)
        while (ev := self._events.get_nowait()) is not None:
            if ev.name == "SHUTDOWN":
                self._last_shutdown = ev
            elif ev.name == "GUEST_PANICKED":
                self._panicked = True
            self.observer.qmp_event(self, ev)
        self.exit_info = self._classify(status)
        self.log.info("vm.exited", status=status.describe(), reason=self.exit_info.reason,
                      state=self.exit_info.state.value)
        self._maybe(self.exit_info.state, self.exit_info.reason)
        self._done.set()

    def _classify(self, status: ExitStatus) -> ExitInfo:
        if self._panicked:
            return ExitInfo(VmState.CRASHED, "panic", status, detail="guest panicked")
        if self._stop_requested:
            return ExitInfo(VmState.STOPPED, self._stop_requested, status)
        shutdown = self._last_shutdown.data if self._last_shutdown else {}
        if status.signal is not None:
            return ExitInfo(VmState.CRASHED, "signal", status, detail=status.describe())
        code = status.code
        if code is not None and code & 1 and not shutdown and self.state != VmState.STARTING:
            return ExitInfo(VmState.STOPPED, "guest-exit", status, guest_exit_code=code >> 1,
                            detail=f"guest exited with code {code >> 1} (isa-debug-exit)")
        if code == 0 and shutdown.get("guest"):
            reason = shutdown.get("reason", "")
            if reason == "guest-reset":
                return ExitInfo(VmState.CRASHED, "guest-reset", status,
                                detail="guest reset with -no-reboot")
            return ExitInfo(VmState.STOPPED, "guest-shutdown", status, detail=reason)
        if code == 0 and shutdown:
            return ExitInfo(VmState.STOPPED, "host-shutdown", status,
                            detail=shutdown.get("reason", ""))
        if self.state == VmState.STARTING:
            return ExitInfo(VmState.CRASHED, "start-failed", status,
                            detail=_tail_file(self.paths.stderr, 400) or status.describe())
        return ExitInfo(VmState.CRASHED, "qemu-exit", status,
                        detail=_tail_file(self.paths.stderr, 400) or status.describe())

    # -- teardown ------------------------------------------------------------------------------

    async def _teardown(self) -> None:
        """Shielded by the caller: kill (unless detaching), reap, close, remove sockets."""
        proc = self.proc
        if proc is not None and not self._detach and proc.alive:
            if self._stop_requested is None:
                self._stop_requested = "cancelled"
            await self._escalate(grace=0.0, quit_timeout=1.0)
        if self.qmp is not None:
            await self.qmp.close()
        if self.console is not None:
            await self.console.close()
        if proc is not None and not self._detach:
            if proc.status is None:
                await proc.watch()
            proc.close()
        if self._detach:
            if self.exit_info is None:
                self.exit_info = ExitInfo(self.state, "detached")
            return
        for p in (self.paths.qmp, self.paths.console, self.paths.gdb, self.paths.pidfile):
            p.unlink(missing_ok=True)
        try:
            self.paths.run_dir.rmdir()
        except OSError:
            pass  # not empty or already gone
        if self.exit_info is None:
            status = proc.status if proc else None
            if status is not None and self.state != VmState.STARTING:
                self.exit_info = self._classify(status)
            elif self._stop_requested:
                self.exit_info = ExitInfo(VmState.STOPPED, self._stop_requested, status)
            elif self._start_error is not None:
                self.exit_info = ExitInfo(VmState.CRASHED, "start-failed", status,
                                          detail=str(self._start_error))
            else:
                self.exit_info = ExitInfo(VmState.STOPPED, "cancelled", status)
        if not self.state.terminal:
            self._to(self.exit_info.state, self.exit_info.reason)
        self._done.set()

    async def _escalate(self, *, grace: float, quit_timeout: float = 2.0,
                        term_timeout: float = 2.0) -> None:
        """powerdown (grace) -> quit -> SIGTERM -> SIGKILL, each step only if still alive."""
        proc = self.proc
        assert proc is not None
        qmp_ok = self.qmp is not None and self.qmp.connected
        if grace > 0 and qmp_ok and self.state in (VmState.RUNNING, VmState.STOPPING):
            try:
                await self.qmp.execute("system_powerdown", timeout=1.0)
                if await self._wait_exit(grace):
                    return
            except QmpError:
                pass
        if qmp_ok and proc.alive:
            try:
                await self.qmp.quit(timeout=quit_timeout)
            except QmpError:
                pass
            if await self._wait_exit(quit_timeout):
                return
        if proc.send_signal(signal.SIGTERM) and await self._wait_exit(term_timeout):
            return
        proc.send_signal(signal.SIGKILL)
        await self._wait_exit(None)

    async def _wait_exit(self, timeout: float | None) -> bool:
        assert self.proc is not None
        if self.proc.status is not None:
            return True
        with anyio.move_on_after(timeout):
            while self.proc.status is None:
                # The watcher task may be gone (teardown): poll the pidfd ourselves.
                with anyio.move_on_after(0.05):
                    await self.proc.exited.wait()
                self.proc.alive  # noqa: B018 - polls and reaps
        return self.proc.status is not None

    # -- operations ------------------------------------------------------------------------------

    async def stop(self, *, grace: float | None = None, kill: bool = False) -> ExitInfo:
        """Stop QEMU: ACPI powerdown (``grace`` seconds), then quit, SIGTERM, SIGKILL.

        Shielded from cancellation; returns once QEMU is reaped. Works in every state.
        """
        with anyio.CancelScope(shield=True):
            if self.exit_info is not None and self.state.terminal:
                return self.exit_info
            if self._stop_requested is None:
                self._stop_requested = "killed" if kill else "requested"
            if self.state == VmState.CREATED:
                self._to(VmState.STOPPED, "never started")
                self.exit_info = ExitInfo(VmState.STOPPED, "requested")
                self._done.set()
                return self.exit_info
            self._maybe(VmState.STOPPING, self._stop_requested)
            if self.proc is None:  # cancelled before spawn
                if self._run_scope is not None:
                    self._run_scope.cancel()
                await self._done.wait()
            elif kill:
                self.proc.send_signal(signal.SIGKILL)
                await self._wait_exit(None)
            else:
                g = self.spec.effective_powerdown_timeout if grace is None else grace
                await self._escalate(grace=g)
            await self._done.wait()
            assert self.exit_info is not None
            return self.exit_info

    def detach(self) -> None:
        """End :meth:`run` without touching QEMU (the daemon is going away; re-adopt later)."""
        self._detach = True
        if self._run_scope is not None:
            self._run_scope.cancel()

    async def pause(self) -> None:
        """Pause the vCPUs (QMP ``stop``).

        Raises:
            StateError: unless running.
        """
        if self.state != VmState.RUNNING:
            raise StateError(f"{self.name}: cannot pause while {self.state.value}", vm=self.name,
                             state=self.state.value, operation="pause")
        await self._qmp().execute("stop")
        self._maybe(VmState.PAUSED, "pause")

    async def resume(self) -> None:
        """Resume the vCPUs (QMP ``cont``).

        Raises:
            StateError: unless paused (a panicked guest cannot resume).
        """
        if self.state != VmState.PAUSED:
            raise StateError(f"{self.name}: cannot resume while {self.state.value}", vm=self.name,
                             state=self.state.value, operation="resume")
        await self._qmp().execute("cont")
        self._maybe(VmState.RUNNING, "resume")

    async def reset(self) -> None:
        """Hard-reset the machine (QMP ``system_reset``).

        Raises:
            StateError: unless running or paused.
        """
        if self.state not in (VmState.RUNNING, VmState.PAUSED):
            raise StateError(f"{self.name}: cannot reset while {self.state.value}", vm=self.name,
                             state=self.state.value, operation="reset")
        await self._qmp().execute("system_reset")

    async def send_console(self, text: str | bytes) -> None:
        """Write to the guest's serial input (e.g. a fault command line)."""
        if self.console is None:
            raise VmError(f"{self.name}: no console", vm=self.name)
        await self.console.write(text.encode() if isinstance(text, str) else text)

    async def query_status(self, timeout: float = 2.0) -> dict[str, Any]:
        """QMP ``query-status`` (used by the responsiveness check)."""
        return await self._qmp().execute("query-status", timeout=timeout)

    def _qmp(self) -> QmpConnection:
        if self.qmp is None or not self.qmp.connected:
            raise VmError(f"{self.name}: QMP not connected ({self.state.value})", vm=self.name)
        return self.qmp

    def vcpu_info(self) -> list[dict[str, Any]]:
        """Per-vCPU thread id, host CPUs asked, ``Cpus_allowed_list`` read back now."""
        if not self.vcpus or not self.alive or self.proc is None:
            return [v.to_dict() for v in self.vcpus]
        try:
            fresh = pinning.read_vcpus(self.proc.pid, [v.thread_id for v in self.vcpus],
                                       [v.asked for v in self.vcpus])
        except FleetError:
            fresh = self.vcpus
        return [v.to_dict() for v in fresh]


def vcpu_cpus(vcpus: Sequence[pinning.VcpuThread]) -> list[list[int]]:
    return [sorted(v.allowed) for v in vcpus]
