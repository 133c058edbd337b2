"""Health model as pure logic: lines and events in, health and failures out (no QEMU)."""

from __future__ import annotations

from fleetd.health import Health, HealthMonitor
from fleetd.policy import HealthPolicy
from fleetd.qmp import QmpEvent

POLICY = HealthPolicy(boot_timeout=10, heartbeat_timeout=2, stall_timeout=1)


def mon(cpus: int = 2, **kw: object) -> HealthMonitor:
    m = HealthMonitor("v", cpus, POLICY.model_copy(update=kw) if kw else POLICY)
    m.vm_running(now=0.0)
    return m


def hb(m: HealthMonitor, seq: int, t: float, *counters: int) -> None:
    cs = " ".join(f"c{i}={c}" for i, c in enumerate(counters))
    m.line(f"FLEET HB seq={seq} up_ms={int(t * 1000)} {cs}", t)


def test_ready_then_healthy_and_deadlines() -> None:
    m = mon()
    assert m.health == Health.BOOTING
    assert [n for _, n in m.deadlines(0.0)] == ["boot"]
    m.line("FLEET READY cpus=2/2 bringup_us=5", 0.1)
    assert m.health == Health.HEALTHY and m.failure is None
    assert [n for _, n in m.deadlines(0.2)] == ["heartbeat"]
    assert m.expired(0.1 + 2.01) == ["heartbeat"]


def test_fewer_cpus_is_a_failure() -> None:
    m = mon(cpus=4)
    m.line("FLEET READY cpus=3/4 bringup_us=5", 0.1)
    assert m.failure and m.failure.cause == "cpus-missing" and "3 of 4" in m.failure.detail


def test_stall_named_by_vcpu_while_heartbeats_flow() -> None:
    m = mon()
    m.line("FLEET READY cpus=2/2", 0.0)
    for k in range(1, 12):
        hb(m, k, k * 0.1, k * 10, 5)          # vCPU 1 never advances
        if m.failure:
            break
    assert m.failure and m.failure.cause == "stall" and m.failure.vcpu == 1
    assert 1.0 < k * 0.1 <= 1.2


def test_no_heartbeats_is_a_hang_not_a_stall() -> None:
    """stall_timeout < heartbeat_timeout: a hung guest must not be called a stalled vCPU 0."""
    m = mon()
    m.line("FLEET READY cpus=2/2", 0.0)
    hb(m, 1, 0.1, 1, 1)
    hb(m, 2, 0.2, 2, 2)
    assert m.failure is None
    assert [n for _, n in m.deadlines(1.5)] == ["heartbeat"]   # no stall timer to win the race
    assert m.expired(2.3) == ["heartbeat"]


def test_panic_line_and_pvpanic() -> None:
    m = mon()
    m.line('FLEET PANIC cpu=1 msg="boom"', 0.5)
    assert m.failure and m.failure.cause == "panic" and m.failure.vcpu == 1
    m2 = mon()
    m2.line("[   3.1] Kernel panic - not syncing: VFS", 0.5)
    assert m2.failure and m2.failure.cause == "panic"
    m3 = mon()
    m3.qmp_event(QmpEvent("GUEST_PANICKED", {"action": "pause"}))
    assert m3.failure and m3.failure.cause == "panic"


def test_unexpected_reboot_is_a_reset_but_a_requested_one_is_not() -> None:
    m = mon()
    m.line('FLEET BOOT proto=1 cmdline=""', 0.0)
    m.reset_expected = True
    m.line('FLEET BOOT proto=1 cmdline=""', 1.0)
    assert m.failure is None
    m.line('FLEET BOOT proto=1 cmdline=""', 2.0)
    assert m.failure and m.failure.cause == "reset"


def test_pause_by_fleetd_suspends_checks_external_pause_fails_later() -> None:
    m = mon()
    m.line("FLEET READY cpus=2/2", 0.0)
    m.pause_expected = True
    m.vm_paused(now=1.0)
    assert m.health == Health.PAUSED and m.deadlines(100.0) == []
    m.vm_running(now=50.0)
    assert [n for _, n in m.deadlines(50.0)] == ["heartbeat"]
    m.vm_paused(now=60.0)                          # nobody asked
    assert m.expired(62.1) == ["paused"]


def test_patterns_for_guests_without_the_protocol() -> None:
    m = mon(fleet_protocol=False, ready_pattern=r"login:", heartbeat_pattern=r"tick (?P<c0>\d+)")
    m.line("FLEET READY cpus=2/2", 0.0)            # ignored: not a FLEET guest
    assert m.ready_at is None
    m.line("Debian login:", 1.0)
    assert m.health == Health.HEALTHY
    m.line("tick 5", 1.1)
    assert m.hb_count == 1 and m.counters == (5,)
