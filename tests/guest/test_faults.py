"""Every injectable fault, from the command line and from the console, has its observable."""

from __future__ import annotations

import asyncio
import time

import pytest

pytestmark = pytest.mark.anyio

HB_MS = 50
SOURCES = ["cmdline", "console"]


async def boot(launch, accel, source, fault_words, smp=2, workload="spin"):
    """Start a guest; for source=cmdline the fault words go on -append, for console they are
    returned for the test to send once the guest is heartbeating."""
    append = f"hb_ms={HB_MS} workload={workload}"
    if source == "cmdline":
        append += " " + fault_words
    vm = await launch(accel=accel, smp=smp, append=append)
    await vm.ready()
    return vm


async def no_heartbeat_for(vm, seconds: float) -> None:
    before = len(vm.heartbeat_lines())
    await asyncio.sleep(seconds)
    after = vm.heartbeat_lines()
    assert len(after) == before, f"heartbeats went on: {after[before:]}\n{vm.text()}"


@pytest.mark.parametrize("source", SOURCES)
async def test_exit(launch, accel, source):
    vm = await boot(launch, accel, source, "exit_after=3 exit_code=7")
    if source == "console":
        await vm.heartbeats(2)
        await vm.send("exit 9")
        code = 9
    else:
        code = 7
    rc = await vm.wait_exit()
    assert rc == (code << 1) | 1, vm.text()
    await vm.wait_line(rf"^FLEET EXIT code={code}$", timeout=5)
    if source == "cmdline":
        seqs = [hb.seq for hb in vm.heartbeat_lines()]
        assert seqs == [1, 2, 3], vm.text()  # exactly N heartbeats, then EXIT


async def test_exit_code_defaults_to_zero(launch, accel):
    vm = await launch(accel=accel, smp=1, append=f"hb_ms={HB_MS} exit_after=0")
    assert await vm.wait_exit() == 1, vm.text()
    await vm.wait_line(r"^FLEET EXIT code=0$", timeout=5)
    assert vm.heartbeat_lines() == [], vm.text()  # after=0: right after READY


@pytest.mark.parametrize("source", SOURCES)
async def test_panic(launch, accel, source):
    vm = await boot(launch, accel, source, "panic_after=2")
    if source == "console":
        await vm.heartbeats(2)
        await vm.send("panic")
    idx, m = await vm.wait_line(r'^FLEET PANIC cpu=(\d+) msg="(.*)"$')
    assert m.group(1) == "0", vm.text()
    ev = await vm.wait_event("GUEST_PANICKED")
    assert ev["data"]["action"] == "pause", ev
    assert await vm.status() == "guest-panicked"
    if source == "cmdline":
        assert [hb.seq for hb in vm.heartbeat_lines()] == [1, 2], vm.text()
    assert vm.heartbeat_lines(idx) == [], vm.text()  # nothing after PANIC


@pytest.mark.parametrize("source", SOURCES)
async def test_hang(launch, accel, source):
    vm = await boot(launch, accel, source, "hang_after=3")
    if source == "console":
        await vm.heartbeats(2)
        await vm.send("hang")
    else:
        await vm.heartbeats(3)
    await asyncio.sleep(0.3)  # let an in-flight heartbeat land
    await no_heartbeat_for(vm, 1.0)  # 20 heartbeat periods
    assert vm.alive() and await vm.status() == "running", vm.text()
    if source == "cmdline":
        assert vm.heartbeat_lines()[-1].seq == 3, vm.text()


async def wait_frozen(vm, k: int, periods: int = 4, timeout: float = 20.0) -> int:
    """Wait until counter k has stayed constant for `periods` heartbeats; return the index of
    the heartbeat where that run started."""
    deadline = time.monotonic() + timeout
    while True:
        hbs = vm.heartbeat_lines()
        for i in range(len(hbs) - periods):
            run = hbs[i : i + periods + 1]
            if all(hb.counters[k] == run[0].counters[k] for hb in run):
                return i
        assert time.monotonic() < deadline, f"cpu {k} never froze\n{vm.text()}"
        await asyncio.sleep(HB_MS / 1000)


@pytest.mark.parametrize("workload", ["spin", "idle"])
@pytest.mark.parametrize("source", SOURCES)
async def test_stall(launch, accel, source, workload):
    n, k = 3, 1
    vm = await boot(launch, accel, source, f"stall_cpu={k} stall_after=2", smp=n, workload=workload)
    if source == "console":
        await vm.heartbeats(2)
        await vm.send(f"stall {k}")
    await vm.wait_line(rf"^FLEET OK stall {k}$")
    start = await wait_frozen(vm, k)
    have = len(vm.heartbeat_lines())
    await vm.heartbeats(have + 6)
    hbs = vm.heartbeat_lines()[start:]
    frozen = hbs[0].counters[k]
    assert all(hb.counters[k] == frozen for hb in hbs), vm.text()
    for j in range(n):
        if j != k:  # the others keep going
            assert hbs[-1].counters[j] > hbs[0].counters[j], (j, vm.text())
    assert hbs[-1].seq - hbs[0].seq >= 6


async def test_stall_bsp_keeps_heartbeating(launch, accel):
    vm = await launch(accel=accel, smp=2, append=f"hb_ms={HB_MS}")
    await vm.ready()
    await vm.heartbeats(2)
    await vm.send("stall 0")
    start = await wait_frozen(vm, 0)
    await vm.heartbeats(len(vm.heartbeat_lines()) + 4)
    hbs = vm.heartbeat_lines()[start:]
    assert all(hb.counters[0] == hbs[0].counters[0] for hb in hbs), vm.text()
    assert hbs[-1].counters[1] > hbs[0].counters[1], vm.text()


@pytest.mark.parametrize("source", SOURCES)
async def test_reset(launch, accel, source):
    vm = await boot(launch, accel, source, "reset_after=2")
    if source == "console":
        await vm.heartbeats(2)
        await vm.send("reset")
    ev = await vm.wait_event("RESET")
    assert ev["data"]["guest"] is True, ev
    # the machine boots again from scratch
    boots = await vm.wait_line(r"^FLEET BOOT proto=1 ", start=1)
    await vm.wait_line(r"^FLEET READY cpus=2/2 ", start=boots[0])
    await vm.wait_line(r"^FLEET HB seq=1 ", start=boots[0])
    assert vm.alive(), vm.text()


@pytest.mark.parametrize("what,needle", [("crash", "rust panic: crash requested"), ("fault", "cpu exception 6 #UD")])
@pytest.mark.parametrize("cpu", [0, 1])
async def test_guest_bug_reports_panic(launch, accel, what, needle, cpu):
    """The guest's own bugs (Rust panics, CPU exceptions) on any CPU end in FLEET PANIC too
    (triggered through the `crash K` / `fault K` console test hooks)."""
    vm = await launch(accel=accel, smp=2, append=f"hb_ms={HB_MS}")
    await vm.ready()
    await vm.heartbeats(2)
    await vm.send(f"{what} {cpu}")
    _, m = await vm.wait_line(r'^FLEET PANIC cpu=(\d+) msg="(.*)"$')
    assert int(m.group(1)) == cpu and needle in m.group(2), vm.text()
    await vm.wait_event("GUEST_PANICKED")


async def test_panic_without_pvpanic_device_halts(launch, accel):
    """No pvpanic device: the PANIC line is the only signal, heartbeats stop."""
    vm = await launch(accel=accel, smp=2, append=f"hb_ms={HB_MS} panic_after=2", pvpanic=False)
    await vm.wait_line(r"^FLEET PANIC cpu=0 ")
    await no_heartbeat_for(vm, 0.5)
    assert vm.alive() and vm.events("GUEST_PANICKED") == []
