"""The workloads: smp-test's exact atomicity check, and idle being cheap for the host."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.anyio


@pytest.mark.slow
@pytest.mark.stress
async def test_smp_test_runs_clean(launch, accel):
    n = 4
    vm = await launch(accel=accel, smp=n, append="hb_ms=100 workload=smp-test")
    assert (await vm.ready())[:2] == (n, n), vm.text()
    hbs = await vm.heartbeats(40, timeout=60)  # ~4 s, 40 exact checks
    assert vm.matching(r"^FLEET (PANIC|ERR)") == [], vm.text()
    for i in range(n):
        assert hbs[-1].counters[i] > hbs[0].counters[i], (i, vm.text())
    assert vm.alive() and await vm.status() == "running"


async def test_smp_test_detects_a_lost_update(launch, accel):
    """`corrupt` adds to the shared counter behind the bookkeeping: the next check must fail."""
    vm = await launch(accel=accel, smp=3, append="hb_ms=50 workload=smp-test")
    await vm.ready()
    await vm.heartbeats(3)
    await vm.send("corrupt")
    _, m = await vm.wait_line(r'^FLEET PANIC cpu=0 msg="(.*)"$')
    assert m.group(1).startswith("smp-test: shared counter "), vm.text()
    shared, total = [int(w) for w in m.group(1).split() if w.isdigit()][:2]
    assert shared == total + 1, vm.text()
    await vm.wait_event("GUEST_PANICKED")


async def test_idle_counts_ticks(launch, accel):
    vm = await launch(accel=accel, smp=3, append="hb_ms=100 workload=idle")
    await vm.ready()
    hbs = await vm.heartbeats(8)
    for i in range(3):
        per_hb = (hbs[-1].counters[i] - hbs[1].counters[i]) / (len(hbs) - 2)
        assert 1.5 <= per_hb <= 2.5, (i, per_hb, vm.text())  # tick = hb_ms / 2


async def host_cpu_over(vm, seconds: float) -> float:
    c0 = vm.cpu_seconds()
    await asyncio.sleep(seconds)
    return vm.cpu_seconds() - c0


@pytest.mark.slow
async def test_idle_is_cheaper_than_spin(launch, accel):
    usage = {}
    for workload in ("idle", "spin"):
        vm = await launch(accel=accel, smp=2, append=f"hb_ms=100 workload={workload}")
        await vm.ready()
        await vm.heartbeats(3)
        usage[workload] = await host_cpu_over(vm, 2.0)
        await vm.close()
    assert usage["idle"] < 0.25 * usage["spin"], usage
    assert usage["idle"] < 0.3, usage  # CPU-seconds over 2 s for a 2-vCPU idle guest
