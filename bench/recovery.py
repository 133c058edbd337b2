#!/usr/bin/env python3
"""Failure detection and recovery latencies through a real fleetd, beside a plain boot.

Prints medians and p95 (ms) for: SIGKILL -> detected, SIGKILL -> healthy again,
hang -> detected (against heartbeat_timeout), stall -> detected (against
stall_timeout); and, measured in the same run, one guest's plain boot (bare
QEMU spawn -> READY) and fleetd's own start -> healthy.

    .venv/bin/python bench/recovery.py [--runs 10] [--accel tcg|auto] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median, pct, table, write_json  # noqa: E402
from lifecycle import bare_run  # noqa: E402

from tests.integration.daemon import DaemonProc  # noqa: E402

HB_TIMEOUT = 1.0
STALL_TIMEOUT = 1.5
WORKLOAD = "spin"
POLICY = {"health": {"heartbeat_timeout": HB_TIMEOUT, "stall_timeout": STALL_TIMEOUT},
          "restart": {"backoff_initial": 0.001, "backoff_max": 0.001, "crash_loop_failures": 1000}}


def next_event(c, kind: str, vm: str, pred=lambda e: True, timeout: float = 30.0) -> dict:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for k, data in c.poll(timeout=0.5):
            if k == "event" and data.get("kind") == kind and data.get("vm") == vm and pred(data):
                return data
    raise TimeoutError(f"no {kind} event for {vm}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--accel", default="tcg", choices=["tcg", "auto"])
    ap.add_argument("--workload", default="idle", choices=["idle", "spin"])
    ap.add_argument("--json")
    a = ap.parse_args()
    global WORKLOAD
    WORKLOAD = a.workload
    run = Path(tempfile.mkdtemp(prefix="br", dir="/tmp"))
    d = DaemonProc(run, run / "state", accel=a.accel)
    d.start()
    res: dict[str, list[float]] = {k: [] for k in ("kill_detect", "kill_healthy", "hang_detect",
                                                 "stall_detect", "start_healthy", "bare_boot")}
    try:
        from fleetd.accel import choose, probe
        from fleetd.argv import Launch, VmPaths, build_argv
        from fleetd.process import find_qemu
        from fleetd.spec import parse_spec
        import anyio
        spec = parse_spec({"cpus": 2, "workload": WORKLOAD})
        choice = choose(spec, anyio.run(probe) if a.accel == "auto" else
                        __import__("fleetd.accel", fromlist=["AccelDecision"]).AccelDecision(
                            "tcg", False, None, None, "tcg"))
        argv = build_argv(spec, Launch("bench", VmPaths(run / "b", run / "b"), choice))
        argv[0] = find_qemu(argv[0])
        for i in range(a.runs):
            res["bare_boot"].append(bare_run(argv)["ready"])
            name = f"r{i}"
            c = d.client()
            c.stream("events", follow=True, tail=0)
            t0 = time.time()
            d.call("start", name=name, replicas=1, spec={"cpus": 2, "workload": WORKLOAD},
                   policy=POLICY, debug=False)
            vm = f"{name}-0"
            h = next_event(c, "health", vm, lambda e: e["health"] == "healthy")
            res["start_healthy"].append(h["time"] - t0)
            pid = d.call("ps", targets=[vm]).replicas[0].pid
            t0 = time.time()
            os.kill(pid, signal.SIGKILL)
            f = next_event(c, "failure", vm)
            res["kill_detect"].append(f["time"] - t0)
            h = next_event(c, "health", vm, lambda e: e["health"] == "healthy")
            res["kill_healthy"].append(h["time"] - t0)
            t0 = time.time()
            d.call("inject", name=vm, fault="hang")
            f = next_event(c, "failure", vm)
            assert f["cause"] == "hang", f
            res["hang_detect"].append(f["time"] - t0)
            next_event(c, "health", vm, lambda e: e["health"] == "healthy")
            t0 = time.time()
            d.call("inject", name=vm, fault="stall", arg=1)
            f = next_event(c, "failure", vm)
            assert f["cause"] == "stall" and f["vcpu"] == 1, f
            res["stall_detect"].append(f["time"] - t0)
            c.close()
            d.call("rm", targets=[name])
    finally:
        d.stop()
        shutil.rmtree(run, ignore_errors=True)
    ms = {k: [x * 1000 for x in v] for k, v in res.items()}
    boot = median(ms["bare_boot"])
    rows = [
        ["plain boot (bare QEMU spawn -> READY)", boot, pct(ms["bare_boot"], 95), "-"],
        ["fleetd start -> healthy", median(ms["start_healthy"]), pct(ms["start_healthy"], 95),
         f"{median(ms['start_healthy']) / boot:.2f}x boot"],
        ["SIGKILL -> detected", median(ms["kill_detect"]), pct(ms["kill_detect"], 95),
         "target <= 10 ms"],
        ["SIGKILL -> healthy again", median(ms["kill_healthy"]), pct(ms["kill_healthy"], 95),
         f"boot + {median(ms['kill_healthy']) - boot:.0f} ms (target boot + 50)"],
        ["hang -> detected", median(ms["hang_detect"]), pct(ms["hang_detect"], 95),
         f"timeout {HB_TIMEOUT * 1000:.0f} + {median(ms['hang_detect']) - HB_TIMEOUT * 1000:.0f} ms"],
        ["stall -> detected", median(ms["stall_detect"]), pct(ms["stall_detect"], 95),
         f"timeout {STALL_TIMEOUT * 1000:.0f} + {median(ms['stall_detect']) - STALL_TIMEOUT * 1000:.0f} ms"],
    ]
    print(f"accel {choice.accel}, smp 2, workload {a.workload}, runs {a.runs}")
    print(table(["latency (ms)", "median", "p95", "vs"], rows))
    write_json(a.json, {"accel": choice.accel, "runs": a.runs, "ms": ms})


if __name__ == "__main__":
    main()
