"""`fleetctl soak` end to end: a real fleetd, real QEMU, every chaos kind, and the aftermath.

The soak SIGKILLs fleetd and starts it again (``daemon-restart``), so the
DaemonProc's process is stale afterwards: the live daemon is found through
``info`` and stopped through the API, and no fleetd or QEMU of the test may be
left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import pytest

from fleetctl.client import Client, DaemonUnreachable
from fleetctl.report import ALL_KINDS
from tests.integration.daemon import DaemonProc

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("guest_kernel", "no_leaked_qemu")


def fleetd_pids(socket: Path) -> set[int]:
    """fleetd processes serving ``socket`` (their command line names it)."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[-1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        if any(b"fleetd" in a for a in argv) and str(socket).encode() in argv:
            out.add(int(entry))
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def call(socket: Path, method: str, **params: Any) -> Any:
    with Client(socket, timeout=60) as c:
        return c.call(method, **params)


def settle_resources(pid: int, seconds: float = 1.0) -> tuple[int, int]:
    time.sleep(seconds)
    return fd_count(pid), rss_kib(pid)


def shut_down(d: DaemonProc) -> None:
    """Stop whichever fleetd serves d.socket now (with its guests), reap the original."""
    for _ in range(3):
        pids = fleetd_pids(d.socket)
        if not pids:
            break
        try:
            call(d.socket, "daemon_stop", stop_guests=True)
        except (DaemonUnreachable, OSError):
            pass
        deadline = time.monotonic() + 30
        while fleetd_pids(d.socket) and time.monotonic() < deadline:
            time.sleep(0.1)
    for pid in fleetd_pids(d.socket):          # only ours: the command line names our socket
        os.kill(pid, signal.SIGKILL)
    if d.proc is not None:
        if d.proc.poll() is None:
            d.proc.kill()
        d.proc.wait(30)
    for pid in d.guests():
        os.kill(pid, signal.SIGKILL)


@pytest.mark.stress
@pytest.mark.slow
@pytest.mark.timeout(240)
def assert_nothing_left(d: DaemonProc, state_file: Path, pid: int, fds0: int, rss0: int,
                        summary: dict[str, Any]) -> None:
    """After a soak: no state entry, no QEMU, fleetd's fds and RSS back near where they were
    (and bounded within each daemon's life during the soak)."""
    deadline = time.monotonic() + 10
    while (state_file.exists() or d.guests()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not state_file.exists(), "rm leaves no state entry"
    assert not d.guests(), "no QEMU left"
    fds1, rss1 = settle_resources(pid)
    assert fds1 <= fds0 + 4, f"fleetd fds {fds0} before, {fds1} after"
    assert rss1 - rss0 < 30 * 1024, f"fleetd RSS {rss0} KiB before, {rss1} KiB after"
    for p, res in summary["daemon"].items():
        if res["samples"] >= 2:
            assert res["rss_mib"]["last"] - res["rss_mib"]["first"] < 30, (p, res)


def test_chaos_mini_soak_every_kind(short_tmp: Path, tmp_path: Path) -> None:
    d = DaemonProc(short_tmp, tmp_path / "state").start()
    report = tmp_path / "report"
    try:
        pid0 = d.pid
        assert pid0 is not None
        fds0, rss0 = settle_resources(pid0)
        argv = [sys.executable, "-m", "fleetctl.main", "--socket", str(d.socket), "soak",
                "--name", "mini", "--replicas", "3", "--cpus", "2", "--duration", "60s",
                "--chaos", ",".join(ALL_KINDS), "--chaos-interval", "4s", "--seed", "3",
                "--report-dir", str(report), "--json"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=200, cwd=ROOT, env=env)
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        diag = (f"exit {proc.returncode}\nstderr:\n{proc.stderr[-3000:]}\nsoak notices:\n"
                + "\n".join(str(x.get("message")) for x in lines if x.get("kind") == "soak")
                + f"\nfleetd log:\n{d.log_tail(30)}")
        summary = json.loads((report / "summary.json").read_text())
        assert proc.returncode == 0, diag
        assert summary["verdict"] == "pass", (summary["reasons"], diag)

        # every kind injected, detected with the right cause, recovered; nothing unexpected
        faults = summary["faults"]
        for kind in ALL_KINDS:
            k = faults[kind]
            assert k["injected"] >= 1, (kind, diag)
            assert k["ok"] == k["injected"] == k["detected_right"], (kind, k)
        causes = {(i["kind"], i["cause"]) for i in summary["injections"]}
        assert causes >= {("kill", "crashed"), ("sigstop", "unresponsive"), ("pause", "paused"),
                          ("panic", "panic"), ("hang", "hang"), ("stall", "stall"),
                          ("reset", "reset"), ("daemon-restart", "readopted")}
        for i in summary["injections"]:
            if i["kind"] == "stall":
                assert i["vcpu"] == i["arg"]
            if i["kind"] == "daemon-restart":
                assert i["adopted"] == i["before"], "same pids and restart counts"
        assert summary["totals"]["unexpected_failures"] == 0
        assert summary["unexpected_failures"] == []
        assert summary["seed"] == 3 and summary["options"]["chaos"] == list(ALL_KINDS)
        assert len(summary["replicas"]) == 3
        assert all(r["uptime_pct"] > 50 for r in summary["replicas"])

        # the --json stream: fleetd events and the soak's own lines
        kinds = {x.get("kind") for x in lines}
        assert {"state", "failure", "inject", "daemon", "soak"} <= kinds
        assert lines[-1]["event"] == "verdict" and lines[-1]["verdict"] == "pass"

        # the reports
        root = ET.parse(report / "junit.xml").getroot()
        cases = root.find("testsuite").findall("testcase")
        assert [c.get("name") for c in cases] == ["mini-0", "mini-1", "mini-2"]
        assert not list(root.iter("failure"))
        page = (report / "report.html").read_text()
        assert "<svg" in page and "https://" not in page and "http://" not in page

        # the aftermath: the daemon was restarted, the fleet is gone, nothing leaked
        info = call(d.socket, "info")
        assert info.pid != pid0, "daemon-restart replaced fleetd"
        assert fleetd_pids(d.socket) == {info.pid}, "exactly one fleetd serves the socket"
        assert (Path(info.state_dir) / "fleetd.log").is_file()
        assert [r.name for r in call(d.socket, "ps").replicas if r.fleet == "mini"] == []
        assert_nothing_left(d, tmp_path / "state" / "fleets" / "mini.json", info.pid,
                            fds0, rss0, summary)
    finally:
        shut_down(d)
    assert not fleetd_pids(d.socket), "no fleetd left"
