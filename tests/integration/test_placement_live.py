"""Placement with real guests: vCPU threads follow the plan (also after a restart), modes,
scaling around running replicas, and `fleetctl plan`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from fleetctl.client import ApiError
from fleetd import pinning
from tests.integration.daemon import ROOT, DaemonProc

pytestmark = pytest.mark.usefixtures("guest_kernel")
HOST = sorted(os.sched_getaffinity(0))


def vcpu_cpus(d: DaemonProc, name: str) -> tuple[int, list[list[int]]]:
    """(pid, each vCPU thread's CPUs as read from /proc by the test)."""
    det = d.call("inspect", name=name)
    return det.pid, [sorted(pinning.read_allowed(det.pid, v.thread_id)) for v in det.vcpus]


def test_threads_match_the_plan_and_again_after_restart(daemon: DaemonProc) -> None:
    res = daemon.call("start", name="pl", replicas=3, spec={"cpus": 2})
    plan = res.plan["replicas"]
    daemon.wait_healthy("pl", 3)
    for i in range(3):
        pid, got = vcpu_cpus(daemon, f"pl-{i}")
        assert got == plan[f"pl-{i}"], (i, got, plan)
        assert daemon.call("ps", targets=[f"pl-{i}"]).replicas[0].host_cpus == got
    if len(HOST) > 1:
        assert all(len({c[0] for c in plan[f"pl-{i}"]}) == 2 for i in range(3)), \
            "a guest's vCPUs go to distinct host CPUs while there are enough"
    pid, _ = vcpu_cpus(daemon, "pl-1")
    os.kill(pid, signal.SIGKILL)
    daemon.wait_for(lambda: (r := daemon.call("ps", targets=["pl-1"]).replicas[0]).restarts == 1
                    and r.health == "healthy", 30, "restarted")
    pid2, got = vcpu_cpus(daemon, "pl-1")
    assert pid2 != pid and got == plan["pl-1"], "re-pinned as planned after the restart"


@pytest.mark.skipif(len(HOST) < 2, reason="needs 2 host CPUs")
def test_exclusive_never_shares_and_refuses_clearly(daemon: DaemonProc) -> None:
    n = len(HOST)
    daemon.call("start", name="ex", replicas=1, spec={"cpus": n}, policy={"pin": "exclusive"})
    daemon.wait_healthy("ex", 1)
    _, got = vcpu_cpus(daemon, "ex-0")
    assert sorted(c[0] for c in got) == HOST
    with pytest.raises(ApiError) as info:
        daemon.call("start", name="ex2", replicas=8, spec={"cpus": 2}, policy={"pin": "exclusive"})
    assert "needs 16 host CPUs, 0 available" in str(info.value), str(info.value)
    with pytest.raises(ApiError, match="host CPU"):
        daemon.call("start", name="sh", replicas=1, spec={"cpus": 1})   # shared can't use them
    assert [r.name for r in daemon.call("ps").replicas] == ["ex-0"]
    daemon.call("rm", targets=["ex"])
    daemon.call("start", name="sh", replicas=1, spec={"cpus": 1})
    daemon.wait_healthy("sh", 1)


def test_pin_none_leaves_vcpus_floating(daemon: DaemonProc) -> None:
    daemon.call("start", name="pn", replicas=1, spec={"cpus": 2}, policy={"pin": "none"})
    daemon.wait_healthy("pn", 1)
    _, got = vcpu_cpus(daemon, "pn-0")
    assert got == [HOST, HOST]


def test_scale_places_around_running_replicas(daemon: DaemonProc) -> None:
    daemon.call("start", name="sc", replicas=1, spec={"cpus": 1})
    daemon.wait_healthy("sc", 1)
    before = daemon.call("plan", replicas=1, cpus=1).plan
    daemon.call("scale", fleet="sc", replicas=len(HOST))
    daemon.wait_healthy("sc", len(HOST))
    cpus = sorted(vcpu_cpus(daemon, f"sc-{i}")[1][0][0] for i in range(len(HOST)))
    assert cpus == HOST, "balanced: one replica per host CPU"
    daemon.call("scale", fleet="sc", replicas=1)
    after = daemon.call("plan", replicas=1, cpus=1).plan
    assert after["load"] == before["load"], "scaling down frees the CPUs"


def test_fleetctl_plan_here_and_on_a_synthetic_32_cpu_host(daemon: DaemonProc) -> None:
    env = {**os.environ, "FLEETD_SOCKET": str(daemon.socket), "PYTHONPATH": str(ROOT)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "fleetctl.main", "plan", *a],  # noqa: E731
                                    env=env, capture_output=True, text=True, timeout=30)
    r = run("--replicas", "8", "--cpus", "2")
    assert r.returncode == 0, r.stderr
    assert "plan-7" in r.stdout and "overcommit" in r.stdout + r.stderr
    print(r.stdout)
    r = run("--replicas", "8", "--cpus", "2", "--topology", "2x8x2n2", "--housekeeping", "0,16")
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    assert "synthetic host" in r.stdout + r.stderr
    r = run("--replicas", "8", "--cpus", "2", "--pin", "exclusive", "--json")
    assert r.returncode == 1 and "needs 16 host CPUs" in r.stderr, r.stderr
    assert not daemon.guests()
