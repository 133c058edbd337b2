"""fleetctl soak, the pure parts: the chaos plan, ingest of fleetd events, the summary and verdict,
junit.xml and report.html (no daemon, no QEMU)."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from typing import Any
from xml.etree import ElementTree as ET

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetctl import report as R
from fleetctl.soak import (
    SOAK_POLICY,
    Fault,
    daemon_argv,
    hb_period_of,
    merge_policy,
    parse_duration,
    parse_kinds,
    plan_chaos,
)
from fleetd.policy import FleetPolicy

KINDS = list(R.ALL_KINDS)
T0 = 1_700_000_000.0
POLICY = FleetPolicy.model_validate(SOAK_POLICY).model_dump(mode="json")


# -- durations, kinds, policy ---------------------------------------------------------------

@pytest.mark.parametrize("text,want", [
    ("90s", 90.0), ("10m", 600.0), ("1h", 3600.0), ("1.5s", 1.5), ("500ms", 0.5), ("45", 45.0),
    ("1h30m", 5400.0), (".5m", 30.0), (" 2m ", 120.0), ("2 min", 120.0), (30, 30.0),
])
def test_parse_duration(text: Any, want: float) -> None:
    assert parse_duration(text) == pytest.approx(want)


@pytest.mark.parametrize("text", ["", "abc", "10x", "m", "-5s", "1.2.3s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_parse_kinds() -> None:
    assert parse_kinds("kill, panic,kill") == ["kill", "panic"]
    assert parse_kinds("all") == KINDS
    assert parse_kinds("") == [] and parse_kinds(None) == []
    with pytest.raises(ValueError, match="unknown chaos kind 'explode'"):
        parse_kinds("kill,explode")


def test_soak_policy_defaults_and_config_override() -> None:
    p = merge_policy(SOAK_POLICY, {"health": {"heartbeat_timeout": 5}, "pin": "none"})
    assert p["health"] == {"heartbeat_timeout": 5, "stall_timeout": 3.0}
    assert p["restart"]["backoff_max"] == 2.0 and p["restart"]["crash_loop_failures"] == 1000
    assert p["pin"] == "none"
    assert SOAK_POLICY["health"]["heartbeat_timeout"] == 2.0, "the defaults are not mutated"
    FleetPolicy.model_validate(p)


def test_hb_period() -> None:
    assert hb_period_of({}) == 0.1
    assert hb_period_of({"append": "workload=spin hb_ms=250"}) == 0.25
    assert hb_period_of({"kernel": "/boot/vmlinuz", "append": "console=ttyS0"}) is None


def test_daemon_argv_reuses_the_old_command_line() -> None:
    info = {"socket": "/tmp/s/fleetd.sock", "state_dir": "/tmp/s/state",
            "accel": {"reason": "KVM disabled by configuration (FLEETD_ACCEL=tcg)"}}
    old = ["/venv/bin/python3", "/venv/bin/fleetd", "--socket", "/tmp/s/fleetd.sock",
           "--state-dir=/tmp/s/state", "--run-dir", "/tmp/r"]
    assert daemon_argv(info, old) == old + ["--accel", "tcg"]
    old_tcg = ["/usr/bin/python", "-m", "fleetd.main", "--accel", "tcg", "--log-json"]
    assert daemon_argv(info, old_tcg) == old_tcg + ["--socket", "/tmp/s/fleetd.sock",
                                                    "--state-dir", "/tmp/s/state"]
    # unreadable or not fleetd: python -m fleetd.main with the socket and state dir
    kvm = {**info, "accel": {"reason": "KVM usable"}}
    assert daemon_argv(kvm, None, python="/py") == [
        "/py", "-m", "fleetd.main", "--socket", "/tmp/s/fleetd.sock", "--state-dir", "/tmp/s/state"]
    assert daemon_argv(kvm, ["/bin/sleep", "100"], python="/py")[:3] == ["/py", "-m", "fleetd.main"]


# -- the chaos plan -------------------------------------------------------------------------

def test_plan_is_reproducible_from_the_seed() -> None:
    a = plan_chaos(42, 600, 20, KINDS, 8, 2)
    b = plan_chaos(42, 600, 20, KINDS, 8, 2)
    assert a == b and len(a) >= 20
    assert plan_chaos(43, 600, 20, KINDS, 8, 2) != a
    assert plan_chaos("nightly", 600, 20, KINDS, 8, 2) == plan_chaos("nightly", 600, 20, KINDS, 8, 2)
    # the options are part of it
    assert plan_chaos(42, 600, 20, KINDS, 4, 2) != a
    assert plan_chaos(42, 600, 20, KINDS[:3], 8, 2) != a


def test_plan_shape() -> None:
    plan = plan_chaos(1, 600, 20, KINDS, 8, 2)
    times = [f.at for f in plan]
    assert times == sorted(times) and 0 < times[0] and times[-1] < 600
    gaps = [b - a for a, b in zip([0.0] + times[:-1], times, strict=True)]
    assert all(15 - 1e-6 <= g <= 25 + 1e-6 for g in gaps), gaps
    # each round of len(kinds) faults has every kind once
    for i in range(0, len(plan) - len(KINDS) + 1, len(KINDS)):
        assert sorted(f.kind for f in plan[i:i + len(KINDS)]) == sorted(KINDS)
    for f in plan:
        assert isinstance(f, Fault) and f.index == plan.index(f)
        if f.kind == "daemon-restart":
            assert f.target is None and f.arg is None
        else:
            assert 0 <= f.target < 8
        if f.kind == "stall":
            assert f.arg in (0, 1)
        else:
            assert f.arg is None
    assert plan_chaos(1, 600, 20, [], 8, 2) == []
    assert plan_chaos(1, 10, 20, KINDS, 8, 2) == []


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32), n=st.integers(1, 16), cpus=st.integers(1, 8),
       interval=st.floats(1, 60), kinds=st.lists(st.sampled_from(KINDS), min_size=1, unique=True))
def test_plan_properties(seed: int, n: int, cpus: int, interval: float, kinds: list[str]) -> None:
    plan = plan_chaos(seed, 300, interval, kinds, n, cpus)
    assert plan == plan_chaos(seed, 300, interval, kinds, n, cpus)
    assert all(f.kind in kinds and f.at < 300 for f in plan)
    assert all(f.target is None or 0 <= f.target < n for f in plan)
    assert all(f.arg is None or 0 <= f.arg < cpus for f in plan)
    assert set(f.kind for f in plan[:len(kinds)]) == set(kinds[:len(plan)]) or len(plan) < len(kinds)


# -- ingest and summary ----------------------------------------------------------------------

def ev(t: float, kind: str, vm: str | None = None, fleet: str | None = "f", **data: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"time": T0 + t, "kind": kind}
    if vm is not None:
        d["vm"] = vm
    if fleet is not None:
        d["fleet"] = fleet
    d.update(data)
    return d


def boot(vm: str, t: float, pid: int, restarts: int = 0) -> list[dict[str, Any]]:
    return [ev(t, "state", vm, old="pending", new="starting", reason="start"),
            ev(t + 0.1, "state", vm, old="starting", new="running", reason="cont"),
            ev(t + 0.1, "started", vm, pid=pid, host_cpus=[[0], [1]], restarts=restarts),
            ev(t + 0.2, "health", vm, health="healthy", reason="")]


def crash_and_restart(vm: str, t: float, cause: str, pid: int, restarts: int, *,
                      vcpu: int | None = None, recover: float = 1.0) -> list[dict[str, Any]]:
    return [ev(t, "health", vm, health="unhealthy", reason=f"{cause}: x"),
            ev(t, "failure", vm, cause=cause, detail=f"{cause} detail", vcpu=vcpu, pid=pid - 1),
            ev(t + 0.01, "backoff", vm, delay_s=0.2, cause=cause, attempt=1),
            ev(t + 0.01, "state", vm, old="running", new="backoff", reason=f"{cause}; restart"),
            ev(t + 0.2, "restart", vm, restarts=restarts),
            ev(t + 0.2, "state", vm, old="backoff", new="starting", reason="restart"),
            ev(t + recover - 0.1, "state", vm, old="starting", new="running", reason="cont"),
            ev(t + recover - 0.1, "started", vm, pid=pid, restarts=restarts),
            ev(t + recover, "health", vm, health="healthy", reason="")]


def record(n: int = 2) -> R.SoakRecord:
    rec = R.new_record("f", replicas=n, started_at=T0, policy=POLICY, hb_period=0.1,
                       options={"seed": 7, "chaos": ["kill", "hang", "panic"], "cpus": 2,
                                "chaos_interval_s": 10})
    return rec


def feed(rec: R.SoakRecord, events: list[dict[str, Any]]) -> None:
    for e in sorted(events, key=lambda e: e["time"]):
        R.ingest(rec, e)


def scenario(*, unexpected: bool) -> R.SoakRecord:
    """Two replicas, 0..40 s: kill into f-0 at 10, hang into f-1 at 20, and (optionally) a
    panic of f-0 at 30 that nobody injected."""
    rec = record()
    feed(rec, boot("f-0", 0.0, 100) + boot("f-1", 0.0, 200)
         + [ev(1, "state", "other-0", fleet="other", old="pending", new="starting")])
    rec.window_start = T0 + 1.0
    R.sample_heartbeats(rec, "f-0", 100, 0, 8, baseline=True)
    R.sample_heartbeats(rec, "f-1", 200, 0, 8, baseline=True)
    R.add_injection(rec, "kill", "f-0", at=T0 + 10.0, planned_at=9.0)
    feed(rec, crash_and_restart("f-0", 10.01, "crashed", 101, 1, recover=0.6))
    R.add_injection(rec, "hang", "f-1", at=T0 + 20.0)
    feed(rec, crash_and_restart("f-1", 22.5, "hang", 201, 1, recover=2.5))
    if unexpected:
        feed(rec, crash_and_restart("f-0", 30.0, "panic", 102, 2, vcpu=0))
    R.sample_heartbeats(rec, "f-0", 100, 0, 98)
    R.sample_heartbeats(rec, "f-0", 101, 1, 300)
    R.sample_heartbeats(rec, "f-1", 200, 0, 190)
    R.sample_heartbeats(rec, "f-1", 201, 1, 150)
    rec.window_end = T0 + 41.0
    rec.ended_at = T0 + 41.0
    R.check_timeouts(rec, T0 + 41.0)
    return rec


def test_ingest_matches_injections_and_latencies() -> None:
    rec = scenario(unexpected=False)
    kill, hang = rec.injections
    assert kill.vm == "f-0" and kill.cause == "crashed" and kill.outcome == "ok"
    assert kill.detection_s == pytest.approx(0.01) and kill.recovery_s == pytest.approx(0.61)
    assert hang.cause == "hang" and hang.outcome == "ok"
    assert hang.detection_s == pytest.approx(2.5) and hang.recovery_s == pytest.approx(5.0)
    assert not rec.pending and not rec.unexpected
    assert "other-0" not in rec.replicas, "events of other fleets are ignored"
    s = R.summarize(rec)
    assert s["verdict"] == "pass" and s["reasons"] == []
    assert s["faults"]["kill"]["detection_s"] == {"n": 1, "p50": 0.01, "p95": 0.01, "max": 0.01}
    assert s["faults"]["hang"]["recovery_s"]["max"] == 5.0
    assert s["faults"]["panic"]["injected"] == 0, "a requested kind shows up even when unused"
    assert s["totals"]["injected"] == 2 and s["totals"]["failures"] == 2
    assert s["totals"]["unexpected_failures"] == 0
    assert s["window"]["duration_s"] == 40.0
    r0, r1 = s["replicas"]
    # f-0 unhealthy (no health) from 10.01 to 10.61 -> 0.6 s down of 40
    assert r0["uptime_pct"] == pytest.approx(100 * 39.4 / 40, abs=0.01)
    assert r1["uptime_pct"] == pytest.approx(100 * 37.5 / 40, abs=0.01)
    assert r0["restarts"] == 1 and r0["failures_by_cause"] == {"crashed": 1}
    # heartbeats: per lifetime, from the window's baseline
    assert r0["heartbeats_seen"] == (98 - 8) + 300
    assert r1["heartbeats_seen"] == (190 - 8) + 150
    # expected: healthy time minus injection->detection, / 0.1 s
    assert r0["heartbeats_expected"] == int((39.4 - 0.01) / 0.1)
    assert r1["heartbeats_expected"] == int((37.5 - 2.5) / 0.1)
    json.dumps(s)  # JSON-ready


def test_unexpected_failure_fails_the_verdict() -> None:
    rec = scenario(unexpected=True)
    assert [(f.vm, f.cause, f.vcpu) for f in rec.unexpected] == [("f-0", "panic", 0)]
    s = R.summarize(rec)
    assert s["verdict"] == "fail"
    assert len(s["reasons"]) == 1 and "unexpected failure: f-0 panic" in s["reasons"][0]
    assert s["totals"]["unexpected_failures"] == 1
    assert s["replicas"][0]["unexpected_failures"] == 1
    assert s["unexpected_failures"][0]["cause"] == "panic"


def test_fail_on_any_counts_injected_failures_too() -> None:
    rec = scenario(unexpected=False)
    assert R.summarize(rec, fail_on="unexpected")["verdict"] == "pass"
    s = R.summarize(rec, fail_on="any")
    assert s["verdict"] == "fail" and len(s["reasons"]) == 2
    assert all("--fail-on any" in r for r in s["reasons"])
    with pytest.raises(ValueError):
        R.summarize(rec, fail_on="sometimes")


def test_wrong_cause_late_missed_and_not_recovered() -> None:
    rec = record(4)
    feed(rec, [e for i in range(4) for e in boot(f"f-{i}", 0.0, 100 + i)])
    rec.window_start = T0 + 1
    b = rec.bounds
    # sigstop seen as a hang: wrong cause
    R.add_injection(rec, "sigstop", "f-0", at=T0 + 10)
    feed(rec, crash_and_restart("f-0", 12.0, "hang", 110, 1))
    # stall of vCPU 1 reported on vCPU 0
    R.add_injection(rec, "stall", "f-1", at=T0 + 10, arg=1)
    feed(rec, crash_and_restart("f-1", 13.0, "stall", 111, 1, vcpu=0))
    # panic detected too late
    R.add_injection(rec, "panic", "f-2", at=T0 + 10)
    late = 10 + b["panic"]["detect_s"] + 1
    feed(rec, crash_and_restart("f-2", late, "panic", 112, 1))
    # hang never detected
    R.add_injection(rec, "hang", "f-3", at=T0 + 10)
    assert [i.outcome for i in rec.injections] == ["wrong-cause", "wrong-cause", "late", "pending"]
    assert R.check_timeouts(rec, T0 + 10 + b["hang"]["recover_s"] - 1) == []
    done = R.check_timeouts(rec, T0 + 10 + b["hang"]["recover_s"])
    assert [i.kind for i in done] == ["hang"] and done[0].outcome == "missed"
    assert rec.replicas["f-3"].pending is None
    # a replica that never comes back
    R.add_injection(rec, "kill", "f-0", at=T0 + 100)
    feed(rec, [ev(100.01, "failure", "f-0", cause="crashed", detail="SIGKILL"),
               ev(100.02, "state", "f-0", old="running", new="backoff")])
    R.check_timeouts(rec, T0 + 100 + b["kill"]["recover_s"] + 0.1)
    assert rec.injections[-1].outcome == "not-recovered"
    rec.window_end = T0 + 200
    s = R.summarize(rec)
    assert s["verdict"] == "fail"
    assert s["faults"]["sigstop"]["wrong_cause"] == 1 and s["faults"]["stall"]["wrong_cause"] == 1
    assert s["faults"]["panic"]["late"] == 1 and s["faults"]["hang"]["missed"] == 1
    assert s["faults"]["kill"]["not_recovered"] == 1
    assert s["totals"]["unexpected_failures"] == 0, "answers to injections are not unexpected"
    text = "\n".join(s["reasons"])
    assert "detected as 'hang' (expected 'unresponsive')" in text
    assert "stall of vCPU 1 in f-1 was reported on vCPU 0" in text
    assert "no failure reported (expected hang)" in text


def test_failure_before_the_injection_is_unexpected() -> None:
    rec = record()
    feed(rec, boot("f-0", 0.0, 100) + boot("f-1", 0.0, 200))
    R.add_injection(rec, "panic", "f-0", at=T0 + 10)
    R.ingest(rec, ev(9.9, "failure", "f-0", cause="hang", detail="raced"))
    assert len(rec.unexpected) == 1 and rec.injections[0].detected_at is None


def test_inject_error_is_a_warning() -> None:
    rec = record()
    feed(rec, boot("f-0", 0.0, 100) + boot("f-1", 0.0, 200))
    inj = R.add_injection(rec, "panic", "f-0", at=T0 + 10)
    R.injection_failed(rec, inj, "state: cannot inject panic while backoff", T0 + 10.1)
    assert inj.outcome == "inject-failed" and rec.replicas["f-0"].pending is None
    rec.window_end = T0 + 20
    s = R.summarize(rec)
    assert s["verdict"] == "pass" and s["faults"]["panic"]["inject_failed"] == 1
    assert any("inject-failed" in w for w in s["warnings"])
    assert R.summarize(rec, fail_on="any")["verdict"] == "fail"


def readopt_events(t: float, pids: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    out = [ev(t, "fleet", None, action="restored", replicas=len(pids))]
    for vm, (pid, restarts) in pids.items():
        out += [ev(t + 0.01, "health", vm, health="healthy", reason=""),
                ev(t + 0.01, "replayed", vm, bytes=900, heartbeats=50),
                ev(t + 0.02, "state", vm, old="pending", new="starting", reason="adopt"),
                ev(t + 0.03, "state", vm, old="starting", new="running", reason="adopted"),
                ev(t + 0.03, "started", vm, pid=pid, host_cpus=[[0]], restarts=restarts)]
    out.append(ev(t + 0.05, "daemon", None, fleet=None, state="ready", pid=999, version="0.1.0"))
    return out


def test_daemon_restart_readopted() -> None:
    rec = record()
    feed(rec, boot("f-0", 0.0, 100) + boot("f-1", 0.0, 200, restarts=3))
    rec.window_start = T0 + 1
    before = {"f-0": (100, 0), "f-1": (200, 3)}
    inj = R.add_injection(rec, "daemon-restart", None, at=T0 + 10, before=before)
    rec.daemon_down.append([T0 + 10.0, T0 + 10.5])
    feed(rec, readopt_events(10.4, before))
    assert inj.detection_s == pytest.approx(0.45) and inj.recovery_s == pytest.approx(0.45)
    # judged a few seconds after fleetd is back: failures right after re-adoption count
    assert inj.outcome == "pending" and R.check_timeouts(rec, T0 + 10.46) == []
    assert R.check_timeouts(rec, T0 + 10.45 + R.DAEMON_SETTLE_S) == [inj]
    assert inj.outcome == "ok" and not rec.unexpected
    rec.window_end = T0 + 20
    s = R.summarize(rec)
    assert s["verdict"] == "pass" and s["faults"]["daemon-restart"]["ok"] == 1
    assert s["totals"]["daemon_restarts"] == 1
    assert s["replicas"][0]["uptime_pct"] > 99  # re-adoption keeps replicas healthy


def test_daemon_restart_with_a_changed_pid_and_a_failure() -> None:
    rec = record()
    feed(rec, boot("f-0", 0.0, 100) + boot("f-1", 0.0, 200))
    before = {"f-0": (100, 0), "f-1": (200, 0)}
    inj = R.add_injection(rec, "daemon-restart", None, at=T0 + 10, before=before)
    feed(rec, [ev(10.3, "failure", "f-1", cause="crashed",
                  detail="QEMU (pid 200) ended while fleetd was not running")]
         + readopt_events(10.4, {"f-0": (100, 0), "f-1": (201, 1)}))
    R.check_timeouts(rec, T0 + 20)
    assert inj.outcome == "guest-failure" and len(inj.problems) == 1, "one problem per replica"
    assert "f-1 failed during the daemon restart (crashed" in inj.problems[0]
    assert "came back with pid 201 restarts 1" in inj.problems[0]
    # the failure belongs to the daemon restart: a problem, not an unexpected failure
    f = rec.failures[0]
    assert f.injection == inj.id and f.problem and not f.expected and not rec.unexpected
    assert f.note == f"during daemon-restart #{inj.id}"
    rec.window_end = T0 + 20
    s = R.summarize(rec)
    assert s["verdict"] == "fail" and len(s["reasons"]) == 1
    assert s["totals"]["unexpected_failures"] == 0
    case = ET.fromstring(R.junit_xml(rec, s)).find("testsuite").findall("testcase")[1]
    assert [x.get("type") for x in case.findall("failure")] == ["daemon-restart:crashed"]
    assert "DURING A DAEMON RESTART: failure crashed on f-1" in R.html_report(rec, s)


def test_daemon_restart_failure_right_after_readoption() -> None:
    """fleetd's replay of a re-adopted guest's console can fail it at once (a second BOOT
    line): that failure arrives after fleetd is ready, and still belongs to the restart."""
    rec = record()
    feed(rec, boot("f-0", 0.0, 100) + boot("f-1", 0.0, 200))
    before = {"f-0": (100, 0), "f-1": (200, 0)}
    inj = R.add_injection(rec, "daemon-restart", None, at=T0 + 10, before=before)
    feed(rec, readopt_events(10.4, before))
    feed(rec, crash_and_restart("f-0", 11.0, "reset", 101, 1, recover=0.4))
    R.check_timeouts(rec, T0 + 10.45 + R.DAEMON_SETTLE_S)
    assert inj.outcome == "guest-failure" and not rec.unexpected
    assert "pid 101 restarts 1" in inj.problems[0]


def test_daemon_that_never_comes_back_is_a_miss() -> None:
    rec = record()
    feed(rec, boot("f-0", 0.0, 100) + boot("f-1", 0.0, 200))
    inj = R.add_injection(rec, "daemon-restart", None, at=T0 + 10,
                          before={"f-0": (100, 0), "f-1": (200, 0)})
    R.check_timeouts(rec, T0 + 10 + inj.recover_bound)
    assert inj.outcome == "missed" and "fleetd did not come back" in inj.problems[0]


def test_interrupted_soak_closes_pending_without_failing() -> None:
    rec = record()
    feed(rec, boot("f-0", 0.0, 100) + boot("f-1", 0.0, 200))
    R.add_injection(rec, "hang", "f-0", at=T0 + 10)
    rec.interrupted = True
    R.check_timeouts(rec, T0 + 11, final=True)
    rec.window_end = T0 + 11
    s = R.summarize(rec)
    assert s["verdict"] == "pass" and s["interrupted"]
    assert any("interrupted" in w for w in s["warnings"])


def test_states_and_display_intervals() -> None:
    rec = record(1)
    feed(rec, boot("f-0", 0.0, 100) + [
        ev(5, "state", "f-0", old="running", new="paused", reason="STOP event"),
        ev(5, "health", "f-0", health="paused", reason="paused (not by fleetd)"),
        ev(7, "health", "f-0", health="unhealthy", reason="paused"),
        ev(7, "failure", "f-0", cause="paused", detail="x"),
        ev(7.01, "state", "f-0", old="paused", new="stopping", reason="killed"),
        ev(7.02, "state", "f-0", old="stopping", new="backoff", reason="paused; restart"),
        ev(7.5, "state", "f-0", old="backoff", new="starting", reason="restart"),
        ev(7.6, "state", "f-0", old="starting", new="running", reason="cont"),
        ev(7.6, "started", "f-0", pid=101, restarts=1),
        ev(7.8, "health", "f-0", health="healthy"),
    ])
    disp = [(round(i.start - T0, 2), i.display) for i in rec.replicas["f-0"].intervals]
    assert disp == [(0.0, "pending"), (0.0, "starting"), (0.1, "booting"), (0.2, "healthy"),
                    (5.0, "paused"), (7.01, "stopping"), (7.02, "backoff"), (7.5, "starting"),
                    (7.6, "booting"), (7.8, "healthy")]
    assert len(rec.unexpected) == 1


def test_dropped_events_warn() -> None:
    rec = record()
    R.ingest(rec, {"time": T0 + 1, "kind": "dropped", "count": 12})
    assert rec.dropped == 12 and "dropped 12 events" in rec.warnings[0]


def test_percentiles() -> None:
    assert R.percentile([], 50) is None
    assert R.percentile([3.0], 95) == 3.0
    assert R.percentile([1, 2, 3, 4], 50) == 2.5
    assert R.percentile(list(range(1, 101)), 95) == pytest.approx(95.05)
    assert R.latency_stats([1.0, 2.0, 10.0]) == {"n": 3, "p50": 2.0, "p95": 9.2, "max": 10.0}


def test_bounds_follow_the_policy() -> None:
    b = R.fault_bounds(POLICY, hb_period=0.1, margin=3, boot_allowance=30)
    assert b["hang"]["detect_s"] == 2 + 0.5 + 3
    assert b["stall"]["detect_s"] == pytest.approx(3 + 0.1 + 3)
    assert b["sigstop"]["detect_s"] == max(2, 1 + 3) + 0.5 + 3
    assert b["kill"]["recover_s"] == 3 + 3 + 2 + 30
    slow = merge_policy(POLICY, {"health": {"heartbeat_timeout": 10}})
    assert R.fault_bounds(slow)["hang"]["detect_s"] == 10 + 0.5 + 3


# -- junit and html -------------------------------------------------------------------------

def with_bundles_and_consoles(rec: R.SoakRecord) -> R.SoakRecord:
    for f in rec.failures:
        f.console = ["FLEET HB seq=1", f"boom <{f.cause}> & \x07bell"]
        rec.bundles.append({"id": f"{f.vm}.x.{f.cause}", "vm": f.vm, "cause": f.cause,
                            "time": f.time - 0.01,
                            "path": f"/tmp/state/vms/{f.vm}/failures/{f.vm}.x.{f.cause}"})
    return rec


def test_junit_xml() -> None:
    rec = with_bundles_and_consoles(scenario(unexpected=True))
    summary = R.summarize(rec)
    root = ET.fromstring(R.junit_xml(rec, summary))
    suites = root.findall("testsuite")
    assert suites[0].get("name") == "soak.f"
    cases = suites[0].findall("testcase")
    assert [c.get("name") for c in cases] == ["f-0", "f-1"]
    f0 = cases[0].findall("failure")
    assert len(f0) == 1 and f0[0].get("type") == "unexpected:panic"
    assert "panic" in f0[0].get("message") and "boom <panic>" in f0[0].text
    assert "/tmp/state/vms/f-0/failures/f-0.x.panic" in f0[0].text
    assert cases[1].findall("failure") == []
    assert suites[0].get("tests") == "2" and suites[0].get("failures") == "1"
    props = {p.get("name"): p.get("value") for p in suites[0].iter("property")}
    assert props["seed"] == "7" and props["verdict"] == "fail"
    # with --fail-on any the injected failures are <failure>s too
    root = ET.fromstring(R.junit_xml(rec, R.summarize(rec, fail_on="any")))
    f0 = root.find("testsuite").findall("testcase")[0].findall("failure")
    assert sorted(f.get("type") for f in f0) == ["injected:crashed", "unexpected:panic"]


def test_junit_injection_problems_and_daemon_suite() -> None:
    rec = record()
    feed(rec, boot("f-0", 0.0, 100) + boot("f-1", 0.0, 200))
    R.add_injection(rec, "hang", "f-1", at=T0 + 5)
    R.check_timeouts(rec, T0 + 5 + rec.bounds["hang"]["recover_s"])
    rec.injections[-1].console = ["last line"]
    d = R.add_injection(rec, "daemon-restart", None, at=T0 + 60,
                        before={"f-0": (100, 0), "f-1": (200, 0)})
    feed(rec, readopt_events(60.3, {"f-0": (100, 0), "f-1": (200, 0)}))
    R.check_timeouts(rec, T0 + 65)
    assert d.outcome == "ok"
    rec.window_end = T0 + 70
    summary = R.summarize(rec)
    root = ET.fromstring(R.junit_xml(rec, summary))
    main, daemon = root.findall("testsuite")
    f1 = main.findall("testcase")[1].findall("failure")
    assert len(f1) == 1 and f1[0].get("type") == "injected:hang:missed"
    assert "last line" in f1[0].text
    assert daemon.get("name") == "soak.f.fleetd" and len(daemon.findall("testcase")) == 1
    assert daemon.find("testcase").find("failure") is None


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs.extend(attrs)


def test_html_report_is_self_contained() -> None:
    rec = with_bundles_and_consoles(scenario(unexpected=True))
    rec.daemon_down.append([T0 + 15, T0 + 15.4])
    R.add_injection(rec, "daemon-restart", None, at=T0 + 15, before={})
    summary = R.summarize(rec)
    page = R.html_report(rec, summary)
    p = _Collect()
    p.feed(page)
    assert p.tags.count("svg") == 1 and "style" in p.tags and "script" in p.tags
    # nothing external: no http(s) anywhere, no src/link/import of other files
    assert not re.search(r"https?://", page)
    assert not re.search(r"@import|url\(", page)
    assert "link" not in p.tags and "img" not in p.tags and "iframe" not in p.tags
    assert all(k != "src" for k, _ in p.attrs)
    hrefs = [v for k, v in p.attrs if k == "href"]
    assert hrefs and all(v.startswith("file:///tmp/state/vms/") for v in hrefs)
    svg = page[page.index("<svg"):page.index("</svg>")]
    assert svg.count('class="iv"') >= 10, "state intervals are drawn"
    assert "<title>" in svg and "UNEXPECTED failure panic on f-0" in svg
    assert "injected kill into f-0" in svg and "fleetd down" in svg
    for name in ("f-0", "f-1"):
        assert f">{name}<" in svg
    # escaping
    assert "boom &lt;panic&gt; &amp;" in page and "<panic>" not in page
    assert "FAIL" in page and "Faults by kind" in page


def test_html_report_empty_record() -> None:
    rec = R.new_record("e", replicas=0, started_at=T0)
    s = R.summarize(rec)
    page = R.html_report(rec, s)
    assert "<svg" in page and s["verdict"] == "pass"
    ET.fromstring(R.junit_xml(rec, s))


def test_record_round_trips_through_json() -> None:
    rec = with_bundles_and_consoles(scenario(unexpected=True))
    again = R.load_record(json.loads(json.dumps(R.record_dict(rec))))
    assert R.summarize(again) == R.summarize(rec)
    assert R.html_report(again, R.summarize(again)) == R.html_report(rec, R.summarize(rec))


def test_soak_deduplicates_events_across_resubscriptions(tmp_path: Any) -> None:
    """After a (re)subscription the same events come from the history, a second look at it
    and the stream: each is ingested once, and history from before the soak not at all."""
    import io

    from fleetctl.soak import Soak, SoakOptions
    s = Soak(SoakOptions(name="f", json=True), socket=tmp_path / "none.sock",
             out=io.StringIO(), err=io.StringIO())
    s.rec = R.new_record("f", replicas=1, started_at=T0, policy=POLICY)
    old = ev(-50, "failure", "f-0", cause="hang", detail="long before the soak")
    evs = boot("f-0", 0.0, 100) + [ev(5, "failure", "f-0", cause="panic", detail="x")]
    s._on_events([old] + evs[:3])
    s._on_events(evs[1:] + evs[2:])           # overlapping batches
    s._on_events(sorted(evs, key=lambda e: e["time"]))
    assert [f.cause for f in s.rec.failures] == ["panic"]
    assert s.rec.events_seen == len(evs)
    out = s.out.getvalue().splitlines()       # --json echoes each event once
    assert len([x for x in out if json.loads(x).get("kind") == "failure"]) == 1
