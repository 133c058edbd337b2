"""One VM's whole life with real QEMU and the bundled guest (TCG always, KVM when usable)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import anyio
import pytest

from fleetd import pinning
from fleetd.errors import QemuStartError, SpecError, StateError
from fleetd.guestproto import GuestPanic
from fleetd.vm import Pins, Vm, VmState
from tests.conftest import qemu_pids
from tests.integration.conftest import Recorder

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("guest_kernel", "no_leaked_qemu")]

MakeVm = Callable[..., tuple[Vm, Recorder]]
HOST = sorted(os.sched_getaffinity(0))


def _pins(cpus: int) -> Pins:
    # vCPU i -> host CPU (i+1) mod n: deliberately not the identity, so a no-op would show
    return Pins(tuple(frozenset({HOST[(i + 1) % len(HOST)]}) for i in range(cpus)),
                frozenset(HOST))


async def test_start_ready_heartbeats_stop_leaves_nothing(make_vm: MakeVm) -> None:
    vm, rec = make_vm(cpus=2, pins=_pins(2))
    async with anyio.create_task_group() as tg:
        await tg.start(vm.run)
        assert vm.state == VmState.RUNNING
        pid = vm.pid
        assert pid in qemu_pids()
        ready = await rec.wait_for(rec.ready, 30)
        assert (ready.online, ready.expected) == (2, 2)
        hbs = await rec.wait_heartbeats(3)
        assert all(len(h.counters) == 2 for h in hbs)
        assert all(b > a for a, b in zip(hbs[0].counters, hbs[-1].counters)), hbs
        info = await vm.stop()
    assert info.state == VmState.STOPPED and info.reason == "requested"
    assert rec.states == [VmState.STARTING, VmState.RUNNING, VmState.STOPPING, VmState.STOPPED]
    assert pid not in qemu_pids()
    for p in (vm.paths.qmp, vm.paths.console, vm.paths.pidfile):
        assert not p.exists(), p
    assert vm.paths.console_log.read_text().count("FLEET HB") >= 3


async def test_vcpus_pinned_before_first_instruction(make_vm: MakeVm) -> None:
    pins = _pins(2)
    vm, rec = make_vm(cpus=2, pins=pins)
    async with anyio.create_task_group() as tg:
        await tg.start(vm.run)
        # read back from /proc, independently of fleetd's own verification
        for i, v in enumerate(vm.vcpus):
            allowed = pinning.read_allowed(vm.pid, v.thread_id)
            assert allowed == pins.vcpus[i], (i, allowed)
        # every other QEMU thread is on the emulator set (threads born after cont, like KVM's
        # nx-lpage-recovery, are moved there within a moment)
        await rec.wait_heartbeats(1)
        await anyio.sleep(0.6)
        for tid in os.listdir(f"/proc/{vm.pid}/task"):
            if int(tid) not in {v.thread_id for v in vm.vcpus}:
                assert pinning.read_allowed(vm.pid, int(tid)) == frozenset(HOST)
        assert vm.timeline.pinned is not None and vm.timeline.running is not None
        assert vm.timeline.pinned < vm.timeline.running
        await rec.wait_heartbeats(1)
        first_line_at = min(t for t, _ in rec.guest)
        assert vm.timeline.pinned < first_line_at
        await vm.stop()


@pytest.mark.parametrize("point", ["connect", "pin", "console", "cont"])
async def test_cancel_start_at_each_await_point_leaves_no_orphan(
        make_vm: MakeVm, point: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reached = anyio.Event()
    orig = {"connect": Vm._connect, "pin": Vm._pin}

    def hold(name: str) -> Callable:
        async def wrapper(self: Vm, *a: object) -> None:
            if name in orig:
                await orig[name](self, *a)
            reached.set()
            await anyio.sleep_forever()
        return wrapper

    if point in orig:
        monkeypatch.setattr(Vm, f"_{point}", hold(point))
    elif point == "console":
        from fleetd.console import Console
        orig_c = Console.connect

        async def hold_console(self: Console, **kw: object) -> None:
            await orig_c(self, **kw)
            reached.set()
            await anyio.sleep_forever()
        monkeypatch.setattr(Console, "connect", hold_console)
    else:
        from fleetd.qmp import QmpConnection
        orig_x = QmpConnection.execute

        async def hold_cont(self: QmpConnection, cmd: str, *a: object, **kw: object) -> object:
            if cmd == "cont":
                reached.set()
                await anyio.sleep_forever()
            return await orig_x(self, cmd, *a, **kw)
        monkeypatch.setattr(QmpConnection, "execute", hold_cont)

    vm, rec = make_vm(cpus=2)
    with anyio.move_on_after(30) as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(vm.run)
            await reached.wait()
            pid = vm.pid
            assert pid is not None and pid in qemu_pids()
            tg.cancel_scope.cancel()
    assert not scope.cancelled_caught
    assert pid not in qemu_pids(), f"QEMU {pid} orphaned after cancel at {point}"
    assert vm.state.terminal
    assert not vm.paths.qmp.exists() and not vm.paths.console.exists()


async def test_cancel_start_at_random_moments(make_vm: MakeVm) -> None:
    for delay in (0.0, 0.002, 0.01, 0.03, 0.06, 0.1, 0.2):
        vm, _ = make_vm(cpus=2)
        async with anyio.create_task_group() as tg:
            tg.start_soon(vm.run)
            await anyio.sleep(delay)
            tg.cancel_scope.cancel()
        if vm.pid is not None:
            assert vm.pid not in qemu_pids(), f"orphan after cancel at {delay}s"


async def test_sigkill_is_crashed_with_signal(make_vm: MakeVm) -> None:
    vm, rec = make_vm(cpus=2)
    async with anyio.create_task_group() as tg:
        await tg.start(vm.run)
        await rec.wait_heartbeats(1)
        t0 = time.monotonic()
        os.kill(vm.pid, signal.SIGKILL)
        await rec.wait_for(lambda: vm.state == VmState.CRASHED, 5)
        detect_ms = (time.monotonic() - t0) * 1000
    assert vm.exit_info.reason == "signal"
    assert vm.exit_info.status.signal == signal.SIGKILL
    assert "SIGKILL" in vm.exit_info.status.describe()
    assert rec.states[-1] == VmState.CRASHED
    print(f"SIGKILL detected in {detect_ms:.1f} ms")


async def test_pause_stops_heartbeats_resume_brings_them_back(make_vm: MakeVm) -> None:
    vm, rec = make_vm(cpus=2, append="hb_ms=50")
    async with anyio.create_task_group() as tg:
        await tg.start(vm.run)
        await rec.wait_heartbeats(2)
        await vm.pause()
        assert vm.state == VmState.PAUSED
        n = len(rec.heartbeats())
        await anyio.sleep(0.5)
        assert len(rec.heartbeats()) <= n + 1   # one may have been in flight
        with pytest.raises(StateError, match="cannot pause while paused"):
            await vm.pause()
        await vm.resume()
        assert vm.state == VmState.RUNNING
        await rec.wait_heartbeats(2, timeout=10)
        await vm.stop()
    assert rec.states[:5] == [VmState.STARTING, VmState.RUNNING, VmState.PAUSED, VmState.RUNNING,
                              VmState.STOPPING]
    assert "STOP" in rec.qmp_names() and "RESUME" in rec.qmp_names()


async def test_guest_panic_yields_event_and_message(make_vm: MakeVm) -> None:
    vm, rec = make_vm(cpus=2)
    async with anyio.create_task_group() as tg:
        await tg.start(vm.run)
        await rec.wait_heartbeats(1)
        await vm.send_console("panic\n")
        await rec.wait_for(lambda: vm.state == VmState.PANICKED, 10)
        assert "GUEST_PANICKED" in rec.qmp_names()
        panic = next(e for _, e in rec.guest if isinstance(e, GuestPanic))
        assert panic.msg
        assert vm.alive, "QEMU must stay up after a panic for the post-mortem"
        regs = await vm.qmp.hmp("info registers")
        assert "RIP=" in regs or "RAX=" in regs
        with pytest.raises(StateError):
            await vm.resume()
        info = await vm.stop()
    assert info.state == VmState.CRASHED and info.reason == "panic"
    assert rec.states == [VmState.STARTING, VmState.RUNNING, VmState.PANICKED, VmState.STOPPING,
                          VmState.CRASHED]


async def test_debug_exit_yields_code(make_vm: MakeVm) -> None:
    vm, rec = make_vm(cpus=2)
    async with anyio.create_task_group() as tg:
        await tg.start(vm.run)
        await rec.wait_heartbeats(1)
        await vm.send_console("exit 3\n")
        await rec.wait_for(lambda: vm.state.terminal, 10)
    assert vm.exit_info.reason == "guest-exit"
    assert vm.exit_info.guest_exit_code == 3
    assert vm.exit_info.status.code == 7
    assert vm.state == VmState.STOPPED


async def test_guest_reset_yields_reset_event(make_vm: MakeVm) -> None:
    vm, rec = make_vm(cpus=2)
    async with anyio.create_task_group() as tg:
        await tg.start(vm.run)
        await rec.wait_heartbeats(1)
        await vm.send_console("reset\n")
        ev = await rec.wait_for(lambda: next((e for e in rec.qmp if e.name == "RESET"), None), 10)
        assert ev.data.get("guest") is True
        # the machine boots again
        await rec.wait_for(lambda: sum(1 for line in rec.lines if "FLEET BOOT" in line) >= 2, 20)
        await vm.stop()


async def test_bad_spec_fails_before_any_process(make_vm: MakeVm, tmp_path) -> None:
    vm, _ = make_vm(kernel=str(tmp_path / "missing.elf"))
    with pytest.raises(SpecError, match="kernel: file not found"):
        await vm.run()
    assert vm.pid is None and not qemu_pids(str(vm.paths.run_dir))
    assert vm.state == VmState.CRASHED and vm.exit_info.reason == "start-failed"


async def test_qemu_that_cannot_start_reports_stderr(make_vm: MakeVm) -> None:
    vm, _ = make_vm(devices=["no-such-device-xyz"])
    with pytest.raises(QemuStartError) as info:
        await vm.run()
    assert "no-such-device-xyz" in str(info.value)
    assert vm.state == VmState.CRASHED
