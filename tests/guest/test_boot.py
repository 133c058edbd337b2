"""fleet-guest boots, finds every CPU and keeps every one of them counting."""

from __future__ import annotations

import re
import time

import pytest

pytestmark = pytest.mark.anyio

HB_MS = 50


async def assert_all_cpus_alive(vm, n: int, timeout: float = 30.0) -> None:
    online, expected, bringup_us = await vm.ready(timeout)
    assert (online, expected) == (n, n), vm.text()
    assert bringup_us < 2_000_000, vm.text()
    hbs = await vm.heartbeats(4, timeout=timeout)
    for a, b in zip(hbs, hbs[1:]):
        assert b.seq == a.seq + 1, vm.text()
        assert b.up_ms >= a.up_ms, vm.text()
    for hb in hbs:
        assert len(hb.counters) == n, vm.text()
        assert all(x <= y for x, y in zip(hbs[0].counters, hb.counters)), vm.text()
    # every counter advances (waiting, not a fixed window: vCPU threads share 2 host cores)
    first = hbs[0].counters
    deadline = time.monotonic() + timeout
    while True:
        last = vm.heartbeat_lines()[-1].counters
        if all(b > a for a, b in zip(first, last)):
            break
        assert time.monotonic() < deadline, f"counters did not all advance: {first} -> {last}\n{vm.text()}"
        await vm.heartbeats(len(vm.heartbeat_lines()) + 1, timeout=timeout)


@pytest.mark.parametrize("machine", ["pc", "q35"])
@pytest.mark.parametrize("smp", [1, 2, 3, 4, 8], ids=lambda n: f"smp{n}")
async def test_boot_smp(launch, accel, machine, smp):
    vm = await launch(accel=accel, machine=machine, smp=smp, append=f"hb_ms={HB_MS}")
    _, m = await vm.wait_line(r'^FLEET BOOT proto=1 cmdline="(.*)"$')
    assert m.group(1) == f"hb_ms={HB_MS}"
    await assert_all_cpus_alive(vm, smp)


@pytest.mark.parametrize(
    "topology,n",
    [("6,sockets=2,cores=3", 6), ("4,sockets=1,cores=2,threads=2", 4)],
    ids=["s2c3", "c2t2"],
)
async def test_boot_topology(launch, accel, topology, n):
    # non-contiguous APIC ids (cores=3 -> 0,1,2,4,5,6)
    vm = await launch(accel=accel, machine="q35", smp=topology, append=f"hb_ms={HB_MS}")
    await assert_all_cpus_alive(vm, n)


@pytest.mark.parametrize("machine,smp", [("pc", 2), ("q35", 4)])
async def test_boot_seabios(launch, accel_tcg, machine, smp):
    """Default firmware (SeaBIOS) finds the RSDP/MADT as well as qboot does (TCG)."""
    vm = await launch(accel=accel_tcg, firmware="seabios", machine=machine, smp=smp, append=f"hb_ms={HB_MS}")
    await assert_all_cpus_alive(vm, smp)


async def test_madt_disabled_cpus_not_expected(launch, accel):
    """-smp 2,maxcpus=4: the MADT lists 4 CPUs, 2 of them disabled (hot-pluggable)."""
    vm = await launch(accel=accel, smp="2,maxcpus=4", append=f"hb_ms={HB_MS}")
    await assert_all_cpus_alive(vm, 2)


async def test_missing_ap_reported_after_deadline(launch, accel):
    """An AP that never comes up: READY still arrives, with online < expected."""
    vm = await launch(accel=accel, smp=3, append=f"hb_ms={HB_MS} skip_cpu=1 ap_timeout_ms=300")
    online, expected, bringup_us = await vm.ready()
    assert (online, expected) == (2, 3), vm.text()
    assert bringup_us >= 250_000, vm.text()
    hbs = await vm.heartbeats(6)
    assert all(len(hb.counters) == 3 for hb in hbs)
    assert all(hb.counters[1] == 0 for hb in hbs), vm.text()
    assert hbs[-1].counters[0] > hbs[0].counters[0] and hbs[-1].counters[2] > hbs[0].counters[2], vm.text()


async def test_cmdline_echo_escaping_and_unknown_words(launch, accel_tcg):
    append = 'console=ttyS0 hb_ms=40 quiet say="hi" back\\slash bell\x07 tab\tx hb_ms=zz workload=nope'
    vm = await launch(accel=accel_tcg, smp=1, append=append)
    _, m = await vm.wait_line(r'^FLEET BOOT proto=1 cmdline="(.*)"$')
    assert m.group(1) == (
        'console=ttyS0 hb_ms=40 quiet say=\\"hi\\" back\\\\slash bell\\x07 tab\\x09x hb_ms=zz workload=nope'
    ), vm.text()
    await vm.wait_line(r'^FLEET ERR bad cmdline word "hb_ms=zz"')
    await vm.wait_line(r'^FLEET ERR bad cmdline word "workload=nope"')
    await vm.ready()
    hbs = await vm.heartbeats(6)
    # the good hb_ms=40 stands (bad words are ignored, not "reset to default")
    period = (hbs[-1].up_ms - hbs[0].up_ms) / (len(hbs) - 1)
    assert 30 <= period <= 60, (period, vm.text())


async def test_empty_cmdline_defaults(launch, accel_tcg):
    vm = await launch(accel=accel_tcg, smp=2, append="")
    _, m = await vm.wait_line(r'^FLEET BOOT proto=1 cmdline="(.*)"$')
    assert m.group(1) == "", vm.text()
    await vm.wait_line(r"^fleet-guest: .*workload=spin hb_ms=100 ")
    await assert_all_cpus_alive(vm, 2)


@pytest.mark.slow
async def test_uptime_tracks_wall_clock(launch, accel):
    vm = await launch(accel=accel, smp=2, append="hb_ms=100")
    await vm.ready()
    first = (await vm.heartbeats(1))[0]
    await vm.heartbeats(first.seq + 25, timeout=30)
    last = vm.heartbeat_lines()[-1]
    host_ms = (last.t - first.t) * 1000
    guest_ms = last.up_ms - first.up_ms
    assert 0.85 <= guest_ms / host_ms <= 1.15, (guest_ms, host_ms, vm.text())
    period = guest_ms / (last.seq - first.seq)
    assert 90 <= period <= 115, (period, vm.text())
    assert re.search(r"tsc_khz=\d{6,}", "\n".join(line for _, line in vm.lines)), vm.text()
