"""The daemon through its real socket: fleets end to end, bad input, concurrency, authorisation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetctl.client import ApiError
from fleetd import pinning
from fleetd.topology import format_cpulist
from tests.integration.daemon import ROOT, DaemonProc

pytestmark = pytest.mark.usefixtures("guest_kernel")


def raw(sock: Path, *lines: bytes, read: int = 1) -> list[dict]:
    """Send raw lines, return the greeting plus ``read`` reply messages per line."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(sock))
    f = s.makefile("rwb")
    out = [json.loads(f.readline())]
    for line in lines:
        f.write(line + b"\n")
        f.flush()
        for _ in range(read):
            out.append(json.loads(f.readline()))
    s.close()
    return out


def test_start_8x2_end_to_end_with_fleetctl(daemon: DaemonProc) -> None:
    """`fleetctl start --replicas 8 --cpus 2`, `ps --json`: 8 healthy, 2 CPUs each, pinned; stop --all."""
    env = {**os.environ, "FLEETD_SOCKET": str(daemon.socket), "PYTHONPATH": str(ROOT)}
    fleetctl = [sys.executable, "-m", "fleetctl.main"]
    t0 = time.monotonic()
    r = subprocess.run([*fleetctl, "start", "--replicas", "8", "--cpus", "2", "--timeout", "90"],
                       env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    print(f"8x2 start -> all healthy through fleetctl: {took:.2f}s")
    ps = subprocess.run([*fleetctl, "ps", "--json"], env=env, capture_output=True, text=True,
                        timeout=30)
    assert ps.returncode == 0, ps.stderr
    rows = json.loads(ps.stdout)
    assert len(rows) == 8
    for row in rows:
        for key in ("name", "fleet", "index", "state", "health", "pid", "cpus", "host_cpus",
                    "guest_cpus_online", "restarts", "uptime_s"):
            assert key in row, key
        assert row["state"] == "running" and row["health"] == "healthy", row
        assert row["cpus"] == 2 and row["guest_cpus_online"] == 2
        assert len(row["host_cpus"]) == 2
        detail = daemon.call("inspect", name=row["name"])
        assert len(detail.vcpus) == 2
        for v in detail.vcpus:
            # pinned as planned, read back from /proc by the test itself
            allowed = pinning.read_allowed(row["pid"], v.thread_id)
            assert sorted(allowed) == row["host_cpus"][v.vcpu]
            assert v.cpus_allowed_list == format_cpulist(allowed)
    assert sorted(r["name"] for r in rows) == [f"fleet-{i}" for i in range(8)]
    stop = subprocess.run([*fleetctl, "stop", "--all"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert stop.returncode == 0, stop.stderr
    assert not daemon.guests(), "QEMU left behind after stop --all"
    rows = daemon.call("ps").replicas
    assert all(r.state == "stopped" and r.pid is None for r in rows)


@pytest.mark.parametrize(("params", "field"), [
    ({"replicas": 0}, "replicas"), ({"replicas": -1}, "replicas"),
    ({"replicas": 100000}, "replicas"), ({"spec": {"cpus": 0}}, "cpus"),
    ({"spec": {"cpus": 1000}}, "cpus"), ({"spec": {"memory": "lots"}}, "memory"),
    ({"name": "../x"}, "name"), ({"name": ""}, "name"), ({"name": "x" * 300}, "name"),
    ({"spec": {"colour": 1}}, "colour"), ({"replicas": "two"}, "replicas"),
    ({"spec": {"kernel": "/nonexistent/k"}}, "kernel"),
])
def test_bad_start_requests_get_clear_errors(daemon: DaemonProc, params: dict, field: str) -> None:
    # raw, so the daemon's own validation is tested (fleetctl validates before sending too)
    reply = raw(daemon.socket, json.dumps({"id": 7, "method": "start", "params": params}).encode())[1]
    assert reply["id"] == 7
    msg = reply["error"]["message"]
    assert field in msg and "\n" not in msg, msg
    assert not daemon.guests()
    assert daemon.call("ps").replicas == []


def test_protocol_abuse_keeps_daemon_serving(daemon: DaemonProc) -> None:
    daemon.call("start", name="keep", replicas=1, spec={"cpus": 1})
    daemon.wait_healthy("keep", 1)
    pid_before = daemon.call("ps").replicas[0].pid
    replies = raw(daemon.socket, b'{"id":1,"method":"nope"}', b"{not json", b"[1,2]",
                  b'{"id":"x","method":"ps","params":{"targets":["../x"]}}',
                  b'{"id":2,"method":"ps","params":{"bogus":1}}',
                  b'{"id":3,"method":"inspect","params":{"name":"nosuch-9"}}')
    assert "greeting" in replies[0]
    codes = [r["error"]["code"] for r in replies[1:]]
    assert codes[0] == "protocol_error" and "unknown method" in replies[1]["error"]["message"]
    assert codes[1] == "protocol_error" and codes[2] == "protocol_error"
    assert "targets" in replies[4]["error"]["message"]
    assert replies[4]["id"] == "x"
    assert codes[-1] == "not_found"
    # a 2 MiB line is refused, the connection dropped, the daemon unharmed
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(daemon.socket))
    s.settimeout(10)
    f = s.makefile("rwb")
    f.readline()
    try:
        f.write(b'{"id":1,"method":"ps","params":{"x":"' + b"a" * (2 * 1024 * 1024) + b'"}}\n')
        f.flush()
    except OSError:
        pass
    reply = f.readline()
    if reply:
        assert "too long" in json.loads(reply)["error"]["message"]
    s.close()
    # a client that disconnects mid-stream
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(daemon.socket))
    s.sendall(b'{"id":1,"method":"events","params":{"follow":true}}\n')
    time.sleep(0.2)
    s.close()
    rows = daemon.call("ps").replicas
    assert rows[0].pid == pid_before and rows[0].health == "healthy"
    assert daemon.alive()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(["id", "method", "params", "x"]),
                       st.one_of(st.none(), st.integers(), st.text(max_size=20),
                                 st.sampled_from(["ps", "start", "stop", "inspect", "scale", "rm",
                                                  "logs", "plan", "info"]),
                                 st.dictionaries(st.sampled_from(
                                     ["replicas", "targets", "name", "spec", "cpus", "all",
                                      "fleet", "tail"]),
                                     st.one_of(st.integers(-5, 5), st.text(max_size=5),
                                               st.lists(st.text(max_size=5), max_size=3),
                                               st.booleans(), st.none()), max_size=4)),
                       max_size=4))
def test_generated_requests_get_wellformed_replies(hyp_daemon: DaemonProc, req: dict) -> None:
    if req.get("method") in ("start", "scale") :
        req["method"] = "plan"   # don't let the fuzzer boot guests
    line = json.dumps(req).encode()
    replies = raw(hyp_daemon.socket, line)
    reply = replies[1]
    assert ("result" in reply) != ("error" in reply), reply
    if "error" in reply:
        assert set(reply["error"]) == {"code", "message", "data"}
        assert reply["error"]["code"] != "internal", reply
    assert hyp_daemon.alive()


@pytest.fixture(scope="module")
def hyp_daemon(tmp_path_factory: pytest.TempPathFactory):
    import tempfile
    run = Path(tempfile.mkdtemp(prefix="fh", dir="/tmp"))
    d = DaemonProc(run, tmp_path_factory.mktemp("hyp") / "state").start()
    yield d
    assert d.stop() == 0


def test_fifty_clients_list_while_a_fleet_starts(daemon: DaemonProc) -> None:
    errors: list[BaseException] = []
    counts: list[int] = []

    def lister() -> None:
        try:
            for _ in range(5):
                counts.append(len(daemon.call("ps").replicas))
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=lister) for _ in range(50)]
    for t in threads:
        t.start()
    daemon.call("start", name="busy", replicas=4, spec={"cpus": 2})
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert len(counts) == 250 and all(c in (0, 4) for c in counts)
    daemon.wait_healthy("busy", 4)


def test_two_fleets_at_once_and_stop_during_start(daemon: DaemonProc) -> None:
    results: dict[str, object] = {}

    def start(name: str) -> None:
        results[name] = daemon.call("start", name=name, replicas=3, spec={"cpus": 1})

    ts = [threading.Thread(target=start, args=(n,)) for n in ("alpha", "beta")]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert set(results) == {"alpha", "beta"}
    # stop beta immediately, while it may still be booting
    res = daemon.call("stop", targets=["beta"])
    assert sorted(res.done) == ["beta-0", "beta-1", "beta-2"] and not res.errors
    daemon.wait_healthy("alpha", 3)
    rows = {r.name: r for r in daemon.call("ps").replicas}
    assert all(rows[f"beta-{i}"].state == "stopped" for i in range(3)), [(r.name, r.state, r.health_reason) for r in rows.values()]
    assert all(rows[f"alpha-{i}"].state == "running" for i in range(3))
    # the stopped fleet's QEMUs are gone, the running one's are there
    assert len(daemon.guests()) == 3
    with pytest.raises(ApiError, match="already exists"):
        daemon.call("start", name="alpha")
    with pytest.raises(ApiError, match="clashes"):
        daemon.call("start", name="alpha-1")


def test_scale_up_and_down(daemon: DaemonProc) -> None:
    daemon.call("start", name="sc", replicas=2, spec={"cpus": 1})
    daemon.wait_healthy("sc", 2)
    res = daemon.call("scale", fleet="sc", replicas=4)
    assert res.added == ["sc-2", "sc-3"]
    daemon.wait_healthy("sc", 4)
    res = daemon.call("scale", fleet="sc", replicas=1)
    assert res.removed == ["sc-1", "sc-2", "sc-3"]
    assert [r.name for r in daemon.call("ps").replicas] == ["sc-0"]
    assert len(daemon.guests()) == 1
    res = daemon.call("rm", targets=["sc"])
    assert res.done == ["sc-0"]
    assert daemon.call("ps").replicas == [] and not daemon.guests()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_unauthorised_uid_is_refused(daemon: DaemonProc) -> None:
    os.chmod(daemon.socket, 0o666)          # let uid 65534 reach the socket at all
    os.chmod(daemon.socket.parent, 0o755)
    code = ("import json,socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
            "f=s.makefile('rwb'); print(f.readline().decode().strip())")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        sys.executable, "-c", code, str(daemon.socket)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    msg = json.loads(r.stdout)
    assert msg["error"]["code"] == "permission_denied", msg
    assert "65534" in msg["error"]["message"]
