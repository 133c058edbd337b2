"""The long soak: `fleetctl soak` of 8x2 with every chaos kind for FLEETD_SOAK_DURATION (10m).

Deselected by default (marker ``soak``); run it with ``pytest -m soak`` (or
``make soak``). FLEETD_SOAK_INTERVAL (20s) and FLEETD_SOAK_SEED (1) tune the
chaos; the report stays in the test's tmp dir (its path is printed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from fleetctl.report import ALL_KINDS
from fleetctl.soak import parse_duration, plan_chaos
from tests.integration.daemon import DaemonProc
from tests.integration.test_soak import (assert_nothing_left, call, fleetd_pids,
                                         settle_resources, shut_down)

ROOT = Path(__file__).resolve().parents[2]
DURATION = parse_duration(os.environ.get("FLEETD_SOAK_DURATION", "10m"))
INTERVAL = parse_duration(os.environ.get("FLEETD_SOAK_INTERVAL", "20s"))
SEED = int(os.environ.get("FLEETD_SOAK_SEED", "1"))
REPLICAS, CPUS = 8, 2

pytestmark = pytest.mark.usefixtures("guest_kernel", "no_leaked_qemu")


@pytest.mark.soak
@pytest.mark.timeout(DURATION + 900)
def test_long_soak_every_kind(short_tmp: Path, tmp_path: Path) -> None:
    d = DaemonProc(short_tmp, tmp_path / "state").start()
    report = tmp_path / "report"
    print(f"soak report: {report}")
    try:
        pid0 = d.pid
        assert pid0 is not None
        fds0, rss0 = settle_resources(pid0)
        argv = [sys.executable, "-m", "fleetctl.main", "--socket", str(d.socket), "soak",
                "--name", "long", "--replicas", str(REPLICAS), "--cpus", str(CPUS),
                "--duration", f"{DURATION:g}s", "--chaos", ",".join(ALL_KINDS),
                "--chaos-interval", f"{INTERVAL:g}s", "--seed", str(SEED),
                "--report-dir", str(report), "--json"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=DURATION + 600,
                              cwd=ROOT, env=env)
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        summary = json.loads((report / "summary.json").read_text())
        diag = (f"exit {proc.returncode}; reasons {summary['reasons'][:20]}\n"
                f"stderr:\n{proc.stderr[-3000:]}")
        assert proc.returncode == 0, diag
        assert summary["verdict"] == "pass", diag
        planned = {f.kind for f in plan_chaos(SEED, DURATION, INTERVAL, list(ALL_KINDS),
                                              REPLICAS, CPUS) if f.at < DURATION - 60}
        for kind in planned:
            k = summary["faults"][kind]
            assert k["injected"] >= 1, (kind, diag)
            assert k["ok"] == k["injected"] == k["detected_right"], (kind, k)
        assert summary["totals"]["unexpected_failures"] == 0
        for i in summary["injections"]:
            if i["kind"] == "daemon-restart":
                assert i["adopted"] == i["before"]
        assert lines[-1]["event"] == "verdict" and lines[-1]["verdict"] == "pass"
        cases = ET.parse(report / "junit.xml").getroot().find("testsuite").findall("testcase")
        assert len(cases) == REPLICAS
        page = (report / "report.html").read_text()
        assert "<svg" in page and "https://" not in page and "http://" not in page

        info = call(d.socket, "info")
        if "daemon-restart" in planned:
            assert info.pid != pid0
        assert fleetd_pids(d.socket) == {info.pid}
        assert [r.name for r in call(d.socket, "ps").replicas if r.fleet == "long"] == []
        assert_nothing_left(d, tmp_path / "state" / "fleets" / "long.json", info.pid,
                            fds0, rss0, summary)
    finally:
        shut_down(d)
    assert not fleetd_pids(d.socket), "no fleetd left"
