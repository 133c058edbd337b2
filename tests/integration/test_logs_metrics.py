"""Console logs rotate under a running QEMU and read across rotations; stats; bundle caps."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.daemon import ROOT, DaemonProc

pytestmark = pytest.mark.usefixtures("guest_kernel", "no_leaked_qemu")


@pytest.fixture
def fast_rotate(short_tmp: Path, tmp_path: Path):
    cfg = tmp_path / "fleetd.toml"
    cfg.write_text("[daemon]\nrotate_interval = 0.2\n")
    d = DaemonProc(short_tmp, tmp_path / "state", extra=["--config", str(cfg)]).start()
    yield d
    assert d.stop() == 0


def test_console_log_rotates_while_qemu_appends(fast_rotate: DaemonProc) -> None:
    d = fast_rotate
    d.call("start", name="lg", replicas=1, spec={"cpus": 2, "append": "hb_ms=10"},
           policy={"logs": {"console_max_bytes": 8192, "console_keep": 2}})
    d.wait_healthy("lg", 1)
    log = d.state_dir / "vms" / "lg-0" / "console.log"
    d.wait_for(lambda: log.with_name("console.log.2").exists(), 30, "two rotations")
    assert log.stat().st_size < 64 * 1024, "rotated in place while QEMU keeps appending"
    assert not log.with_name("console.log.3").exists(), "keeps only console_keep copies"
    # QEMU's O_APPEND writes land at the new end: no hole of zeros at the start
    assert b"\x00" not in log.read_bytes()[:256]
    lines = d.call("logs", name="lg-0", tail=400).lines
    seqs = [int(m.group(1)) for ln in lines if (m := re.search(r"FLEET HB seq=(\d+)", ln))]
    assert len(seqs) > 200, "reads across the rotated files"
    assert seqs == sorted(seqs), "in order across files"
    gaps = sum(1 for a, b in zip(seqs, seqs[1:]) if b != a + 1)
    assert gaps <= 3, f"{gaps} gaps: only a rotation's copy/truncate window may lose lines"
    assert d.call("ps").replicas[0].health == "healthy"
    assert any(e["kind"] == "log_rotated" for e in d.call("events", tail=1000).events)


def test_stats_and_prometheus(daemon: DaemonProc) -> None:
    daemon.call("start", name="st", replicas=2, spec={"cpus": 2, "workload": "spin"})
    daemon.wait_healthy("st", 2)
    daemon.wait_for(lambda: all(r["heartbeats_total"] >= 5 for r in
                                daemon.call("stats").replicas), 20, "heartbeats")
    env = {**os.environ, "FLEETD_SOCKET": str(daemon.socket), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "fleetctl.main", "stats", "--json"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    reps = data["replicas"] if isinstance(data, dict) else data
    for rep in reps:
        assert rep["qemu_rss_bytes"] > 1024 * 1024 and rep["qemu_cpu_seconds"] > 0
        assert len(rep["vcpus"]) == 2 and all(v["cpu_seconds"] > 0 for v in rep["vcpus"])
        assert all(v["counter_rate"] > 0 for v in rep["vcpus"]), rep["vcpus"]
        assert rep["heartbeat_rate"] > 0
    r = subprocess.run([sys.executable, "-m", "fleetctl.main", "stats", "--prometheus"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert re.search(r'^fleetd_vcpu_cpu_seconds_total\{[^}]*vm="st-0"[^}]*vcpu="1"[^}]*\} [0-9.]+$',
                     text, re.M), text[:2000]
    assert "# TYPE" in text and "# HELP" in text


def test_bundles_are_capped_per_replica(daemon: DaemonProc) -> None:
    daemon.call("start", name="cap", replicas=1, spec={"cpus": 1, "append": "panic_after=1"},
                policy={"logs": {"bundles_max": 2, "bundle_max_bytes": 65536},
                        "restart": {"backoff_initial": 0.05, "backoff_max": 0.05,
                                    "crash_loop_failures": 4}})
    daemon.wait_for(lambda: daemon.call("ps").replicas[0].state == "failed", 30, "crash loop")
    fs = daemon.call("failures", name="cap-0").failures
    assert len(fs) == 2, [f["id"] for f in fs]
    for f in fs:
        size = sum(p.stat().st_size for p in Path(f["path"]).iterdir())
        assert size <= 65536 + 8192, size
