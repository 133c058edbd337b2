"""Health and supervision through the daemon, with the bundled guest's fault injection.

Each test asserts the detected cause, the restart (or not) by policy, the post-mortem
bundle's contents, and the events in order. Timeouts are shortened per fleet so the
suite stays quick; the defaults are exercised by the e2e test.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import pytest

from tests.integration.daemon import DaemonProc

pytestmark = pytest.mark.usefixtures("guest_kernel")

FAST = {"health": {"heartbeat_timeout": 1.0, "stall_timeout": 1.5, "boot_timeout": 5.0,
                   "check_interval": 0.5},
        "restart": {"backoff_initial": 0.1, "backoff_max": 1.0}}


def policy(**over: Any) -> dict[str, Any]:
    p = json.loads(json.dumps(FAST))
    for k, v in over.items():
        if isinstance(v, dict):
            p.setdefault(k, {}).update(v)
        else:
            p[k] = v
    return p


def events(d: DaemonProc, vm: str) -> list[dict[str, Any]]:
    return d.call("events", tail=1000, targets=[vm]).events


def kinds(evs: list[dict[str, Any]]) -> list[str]:
    out = []
    for e in evs:
        if e["kind"] == "state":
            out.append(f"state:{e['new']}")
        elif e["kind"] in ("failure", "backoff", "restart", "crash_loop"):
            out.append(e["kind"] + (f":{e['cause']}" if "cause" in e and e["kind"] == "failure" else ""))
    return out


def in_order(seq: list[str], wanted: list[str]) -> bool:
    it = iter(seq)
    return all(any(x == w for x in it) for w in wanted)


def row(d: DaemonProc, name: str) -> Any:
    return d.call("ps", targets=[name]).replicas[0]


def restarted_healthy(d: DaemonProc, name: str, restarts: int = 1, timeout: float = 30) -> Any:
    return d.wait_for(lambda: (r := row(d, name)).restarts >= restarts and r.health == "healthy"
                      and r, timeout, f"{name} healthy after {restarts} restart(s)")


def bundle(d: DaemonProc, name: str, cause: str) -> dict[str, Any]:
    fs = [f for f in d.call("failures", name=name).failures if f["cause"] == cause]
    assert fs, f"no {cause} bundle for {name}"
    shown = d.call("failure_show", id=fs[0]["id"])
    assert shown.meta["cause"] == cause and shown.meta["vm"] == name
    for f in ("console.txt", "qemu-stderr.txt", "events.json", "spec.json", "argv.json"):
        assert f in shown.files, f
    return {"meta": shown.meta, **shown.files}


def start(d: DaemonProc, name: str, append: str = "", cpus: int = 2, **pol: Any) -> Any:
    d.call("start", name=name, replicas=1, spec={"cpus": cpus, "append": append, "workload": "spin"},
           policy=policy(**pol))
    return d.wait_healthy(name, 1)[0]


def test_console_panic_detected_bundled_and_restarted(daemon: DaemonProc) -> None:
    first = start(daemon, "p")
    daemon.call("inject", name="p-0", fault="panic")
    r = restarted_healthy(daemon, "p-0")
    assert r.pid != first.pid and r.last_failure.startswith("panic:")
    b = bundle(daemon, "p-0", "panic")
    assert "FLEET PANIC" in b["console.txt"]
    assert "RIP=" in b.get("registers.txt", ""), "registers must be taken while QEMU is alive"
    assert b["meta"]["alive_at_collection"] is True
    assert any(e.get("event") == "GUEST_PANICKED" for e in json.loads(b["events.json"]))
    seq = kinds(events(daemon, "p-0"))
    assert in_order(seq, ["state:running", "failure:panic", "state:backoff", "restart",
                          "state:starting", "state:running"]), seq


def test_hang_detected_within_heartbeat_timeout(daemon: DaemonProc) -> None:
    start(daemon, "h")
    t0 = time.time()
    daemon.call("inject", name="h-0", fault="hang")
    restarted_healthy(daemon, "h-0")
    fail = next(e for e in events(daemon, "h-0") if e["kind"] == "failure")
    assert fail["cause"] == "hang"
    assert fail["time"] - t0 < 1.0 + 1.0, "hang must be detected within heartbeat_timeout + slack"
    assert "hang" in bundle(daemon, "h-0", "hang")["console.txt"] or True


def test_stall_of_one_cpu_names_it(daemon: DaemonProc) -> None:
    start(daemon, "s", cpus=3)
    daemon.call("inject", name="s-0", fault="stall", arg=2)
    restarted_healthy(daemon, "s-0")
    fail = next(e for e in events(daemon, "s-0") if e["kind"] == "failure")
    assert fail["cause"] == "stall" and fail["vcpu"] == 2, fail
    b = bundle(daemon, "s-0", "stall")
    assert b["meta"]["vcpu"] == 2


def test_stall_at_boot_word(daemon: DaemonProc) -> None:
    start(daemon, "sb", append="stall_cpu=1 stall_after=3")
    restarted_healthy(daemon, "sb-0")
    fail = next(e for e in events(daemon, "sb-0") if e["kind"] == "failure")
    assert (fail["cause"], fail["vcpu"]) == ("stall", 1)


def test_guest_reset_is_a_failure(daemon: DaemonProc) -> None:
    start(daemon, "r")
    daemon.call("inject", name="r-0", fault="reset")
    restarted_healthy(daemon, "r-0")
    assert row(daemon, "r-0").last_failure.startswith("reset")
    assert any(e["kind"] == "qmp" and e["event"] == "RESET" for e in events(daemon, "r-0"))


def test_exit_success_completes_and_failure_restarts(daemon: DaemonProc) -> None:
    daemon.call("start", name="ok", replicas=1, policy=policy(),
                spec={"cpus": 1, "append": "exit_after=3 exit_code=0"})
    daemon.wait_for(lambda: row(daemon, "ok-0").state == "completed", 20, "completed")
    assert row(daemon, "ok-0").restarts == 0
    assert daemon.call("failures", name="ok-0").failures == []
    daemon.call("start", name="bad", replicas=1, policy=policy(restart={"policy": "never"}),
                spec={"cpus": 1, "append": "exit_after=3 exit_code=5"})
    r = daemon.wait_for(lambda: (x := row(daemon, "bad-0")).state == "failed" and x, 20, "failed")
    assert "exit-failure" in r.health_reason or "exit-failure" in (r.last_failure or "")
    assert "code 5" in r.last_failure and r.restarts == 0
    b = bundle(daemon, "bad-0", "exit-failure")
    assert b["meta"]["exit"]["guest_exit_code"] == 5


def test_success_code_is_configurable(daemon: DaemonProc) -> None:
    daemon.call("start", name="sc", replicas=1,
                policy=policy(restart={"success_exit_code": 7}),
                spec={"cpus": 1, "append": "exit_after=2 exit_code=7"})
    daemon.wait_for(lambda: row(daemon, "sc-0").state == "completed", 20, "completed")


def test_sigkill_detected_and_restarted(daemon: DaemonProc) -> None:
    r0 = start(daemon, "k")
    os.kill(r0.pid, signal.SIGKILL)
    r = restarted_healthy(daemon, "k-0")
    assert r.last_failure == "crashed: QEMU killed by SIGKILL"
    b = bundle(daemon, "k-0", "crashed")
    assert b["meta"]["alive_at_collection"] is False
    assert "FLEET READY" in b["console.txt"]


def test_sigstop_unresponsive_killed_and_restarted(daemon: DaemonProc) -> None:
    r0 = start(daemon, "st")
    os.kill(r0.pid, signal.SIGSTOP)
    r = restarted_healthy(daemon, "st-0")
    assert r.last_failure.startswith("unresponsive"), r.last_failure
    assert r.pid != r0.pid
    assert not os.path.exists(f"/proc/{r0.pid}") or open(f"/proc/{r0.pid}/stat").read().split()[2] == "Z"


def test_external_pause_is_a_failure_but_fleetd_pause_is_not(daemon: DaemonProc) -> None:
    start(daemon, "pa")
    daemon.call("pause", targets=["pa-0"])
    time.sleep(2.0)                           # > heartbeat_timeout: still fine, we asked
    r = row(daemon, "pa-0")
    assert (r.state, r.health, r.restarts) == ("paused", "paused", 0)
    daemon.call("resume", targets=["pa-0"])
    daemon.wait_healthy("pa", 1)
    daemon.call("inject", name="pa-0", fault="pause")   # QMP stop behind fleetd's back
    r = restarted_healthy(daemon, "pa-0")
    assert r.last_failure.startswith("paused")


def test_never_ready_is_boot_timeout(daemon: DaemonProc) -> None:
    daemon.call("start", name="nr", replicas=1, spec={"cpus": 1},
                policy=policy(health={"fleet_protocol": False, "ready_pattern": "NEVER-PRINTED",
                                      "boot_timeout": 1.5},
                              restart={"policy": "never"}))
    r = daemon.wait_for(lambda: (x := row(daemon, "nr-0")).state == "failed" and x, 20, "failed")
    assert r.last_failure.startswith("boot-timeout")


def test_fewer_cpus_than_requested_fails(daemon: DaemonProc) -> None:
    daemon.call("start", name="fc", replicas=1, spec={"cpus": 3, "append": "skip_cpu=2"},
                policy=policy(restart={"policy": "never"}))
    r = daemon.wait_for(lambda: (x := row(daemon, "fc-0")).state == "failed" and x, 20, "failed")
    assert r.last_failure.startswith("cpus-missing") and "2 of 3" in r.last_failure


def test_crash_loop_ends_in_failed(daemon: DaemonProc) -> None:
    daemon.call("start", name="cl", replicas=1, spec={"cpus": 1, "append": "panic_after=1"},
                policy=policy(restart={"crash_loop_failures": 3, "crash_loop_window": 60,
                                       "backoff_initial": 0.05}))
    r = daemon.wait_for(lambda: (x := row(daemon, "cl-0")).state == "failed" and x, 30, "failed")
    assert "crash loop" in r.health_reason and r.restarts == 2
    seq = kinds(events(daemon, "cl-0"))
    assert seq.count("failure:panic") == 3 and "crash_loop" in seq
    assert len(daemon.call("failures", name="cl-0").failures) == 3
    assert not daemon.guests()


def test_rm_during_backoff_is_immediate(daemon: DaemonProc) -> None:
    daemon.call("start", name="rb", replicas=1, spec={"cpus": 1, "append": "panic_after=1"},
                policy=policy(restart={"backoff_initial": 60, "backoff_max": 60}))
    daemon.wait_for(lambda: row(daemon, "rb-0").state == "backoff", 20, "backoff")
    t0 = time.monotonic()
    res = daemon.call("rm", targets=["rb"])
    assert res.done == ["rb-0"] and time.monotonic() - t0 < 2.0
    assert daemon.call("ps").replicas == []
    assert not daemon.guests()


def test_stop_during_backoff_is_immediate(daemon: DaemonProc) -> None:
    daemon.call("start", name="sb2", replicas=1, spec={"cpus": 1, "append": "panic_after=1"},
                policy=policy(restart={"backoff_initial": 60, "backoff_max": 60}))
    daemon.wait_for(lambda: row(daemon, "sb2-0").state == "backoff", 20, "backoff")
    t0 = time.monotonic()
    daemon.call("stop", targets=["sb2-0"])
    assert time.monotonic() - t0 < 2.0
    assert row(daemon, "sb2-0").state == "stopped"
    daemon.call("restart", targets=["sb2-0"])
    daemon.wait_for(lambda: row(daemon, "sb2-0").state in ("running", "backoff"), 20, "restarted")


def test_hang_is_a_hang_even_when_stall_timeout_is_shorter(daemon: DaemonProc) -> None:
    start(daemon, "hs", health={"heartbeat_timeout": 2.0, "stall_timeout": 0.8})
    daemon.call("inject", name="hs-0", fault="hang")
    restarted_healthy(daemon, "hs-0")
    fail = next(e for e in events(daemon, "hs-0") if e["kind"] == "failure")
    assert fail["cause"] == "hang", fail


def test_events_follow_misses_nothing_between_history_and_stream(daemon: DaemonProc) -> None:
    c = daemon.client()
    try:
        first, stream = c.stream("events", follow=True, tail=1000)
        daemon.call("start", name="ev", replicas=2, spec={"cpus": 1})
        daemon.wait_healthy("ev", 2)
        seen = list(first.events)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(
                e.get("kind") == "health" and e.get("vm") == "ev-1" and e.get("health") == "healthy"
                for e in seen):
            for kind, data in c.poll(timeout=0.5):
                if kind == "event":
                    seen.append(data)
        started = {e["vm"] for e in seen if e.get("kind") == "started"}
        assert started == {"ev-0", "ev-1"}
    finally:
        c.close()
