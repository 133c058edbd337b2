#!/usr/bin/env python3
"""Guest creation rate: guests brought to READY per second per host core, fleetd vs bare.

fleetd: start an ``--replicas``-replica idle fleet (1 vCPU each by default) and time, client
side, from the ``start`` request until the last replica's ``health: healthy`` event;
rate = replicas / t / host cores. Bare: the same number of QEMUs (fleetd's argv minus -S and
-pidfile) spawned at once, until the last ``FLEET READY``. Alternating, medians of ``--runs``.

    .venv/bin/python bench/create_rate.py [--runs 5] [--replicas 32] [--accel tcg|auto] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median, write_json  # noqa: E402
from _fleet import (bare_fleet_run, cpu_seconds, foreign_qemus, fresh_daemon, loadavg,  # noqa: E402
                    print_rows, row, start_fleet)


def run(runs: int = 5, replicas: int = 32, accel: str = "tcg", cpus: int = 1) -> dict[str, Any]:
    spec = {"cpus": cpus, "workload": "idle"}
    ncores = len(os.sched_getaffinity(0))
    load0 = loadavg()
    bare, fleet, cpu = [], [], []
    with fresh_daemon(accel) as d:
        start_fleet(d, "warm", 1, spec)
        d.call("rm", targets=["warm"])
        for i in range(runs):
            bare.append(bare_fleet_run(replicas, spec, accel)["all_ready"])
            c0 = cpu_seconds(d.pid)
            fleet.append(start_fleet(d, f"c{i}", replicas, spec))
            cpu.append(cpu_seconds(d.pid) - c0)
            d.call("rm", targets=[f"c{i}"])
    tb, tf = median(bare), median(fleet)
    rb, rf = replicas / tb / ncores, replicas / tf / ncores
    rows = [
        row(f"{replicas}x{cpus} bare spawn -> all READY", tb * 1000, "ms"),
        row(f"{replicas}x{cpus} fleetd start -> all healthy", tf * 1000, "ms"),
        row("bare creation rate", rb, "guests/s/core"),
        row("fleetd creation rate", rf, "guests/s/core", note=f"{rf / rb:.2f} of bare"),
        row("fleetd CPU per guest started", median(cpu) / replicas * 1000, "ms",
            note="daemon utime+stime from start request to all healthy"),
    ]
    return {"bench": "create_rate", "accel": accel, "runs": runs, "replicas": replicas,
            "cpus": cpus, "host_cores": ncores, "loadavg_before": load0,
            "foreign_qemus": foreign_qemus(), "bare_s": bare, "fleetd_s": fleet,
            "fleetd_cpu_s": cpu, "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--replicas", type=int, default=32)
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--accel", default="tcg", choices=["tcg", "auto"])
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    res = run(a.runs, a.replicas, a.accel, a.cpus)
    print_rows(f"create_rate: {a.replicas} idle guests to READY (accel {a.accel}, "
               f"{res['host_cores']} host cores, medians of {a.runs}; load before "
               f"{res['loadavg_before']})", res["rows"])
    write_json(a.json, res)
    return res


if __name__ == "__main__":
    t = time.monotonic()
    main()
    print(f"({time.monotonic() - t:.0f} s)")
