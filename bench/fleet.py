#!/usr/bin/env python3
"""Start -> healthy through a real fleetd vs the same QEMU argv spawned bare, side by side.

Two cases, each ``--runs`` times, bare and fleetd alternating:

* 1 replica (``--cpus`` vCPUs): fleetd = client-side time from sending ``start`` to the
  ``health: healthy`` event on an ``events`` stream opened beforehand; bare = spawn ->
  ``FLEET READY`` on the console socket (the same milestone: fleetd calls a replica healthy
  when READY arrives). Spawn -> first heartbeat is shown too.
* ``--replicas`` x ``--cpus`` fleet: the same, until the last replica is healthy, vs that many
  bare QEMUs spawned at once.

Context (measured earlier on this kind of machine, not run here): libvirt 9.0 ``virsh create``
of 8 such 2-vCPU domains took 19-20 s; one domain ~0.93 s.

    .venv/bin/python bench/fleet.py [--runs 5] [--accel tcg|auto] [--workload idle|spin] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median, pct, write_json  # noqa: E402
from _fleet import (bare_fleet_run, foreign_qemus, fresh_daemon, loadavg, print_rows, row,  # noqa: E402
                    start_fleet)

TARGET_ONE = 1.10
TARGET_FLEET = 1.15
VIRSH_8X2_S = 19.0


def measure(d: Any, n: int, spec: dict[str, Any], accel: str, runs: int, tag: str) -> dict[str, Any]:
    bare, fleet = [], []
    for i in range(runs):
        bare.append(bare_fleet_run(n, spec, accel))
        fleet.append(start_fleet(d, f"{tag}{i}", n, spec))
        d.call("rm", targets=[f"{tag}{i}"])
    return {"bare_ready": [b["all_ready"] for b in bare], "bare_hb": [b["all_hb"] for b in bare],
            "fleetd_healthy": fleet}


def run(runs: int = 5, accel: str = "tcg", replicas: int = 8, cpus: int = 2,
        workload: str = "idle") -> dict[str, Any]:
    spec = {"cpus": cpus, "workload": workload}
    load0 = loadavg()
    with fresh_daemon(accel) as d:
        start_fleet(d, "warm", 1, spec)          # first start pays imports and caches
        d.call("rm", targets=["warm"])
        one = measure(d, 1, spec, accel, runs, "one")
        many = measure(d, replicas, spec, accel, runs, "many")
    rows = []
    for label, res, target in ((f"1x{cpus}", one, TARGET_ONE),
                               (f"{replicas}x{cpus}", many, TARGET_FLEET)):
        f = median(res["fleetd_healthy"]) * 1000
        b = median(res["bare_ready"]) * 1000
        h = median(res["bare_hb"]) * 1000
        ratio = f / b
        rows += [
            row(f"{label} bare spawn -> READY", b, "ms", note=f"p95 {pct(res['bare_ready'], 95) * 1000:.0f}"),
            row(f"{label} bare spawn -> first HB", h, "ms"),
            row(f"{label} fleetd start -> healthy", f, "ms",
                note=f"p95 {pct(res['fleetd_healthy'], 95) * 1000:.0f}, +{f - b:.0f} ms"),
            row(f"{label} fleetd / bare (READY)", ratio, "x", f"<= {target:.2f}", ratio <= target),
        ]
    rows.append(row(f"{replicas}x{cpus} libvirt virsh create (earlier, not run)", VIRSH_8X2_S * 1000,
                    "ms", note="context: ../shared/notes/measured-here.md"))
    return {"bench": "fleet", "accel": accel, "runs": runs, "workload": workload,
            "replicas": replicas, "cpus": cpus, "loadavg_before": load0,
            "foreign_qemus": foreign_qemus(), "one": one, "fleet": many, "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--accel", default="tcg", choices=["tcg", "auto"])
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--workload", default="idle", choices=["idle", "spin", "smp-test"])
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    res = run(a.runs, a.accel, a.replicas, a.cpus, a.workload)
    print_rows(f"fleet: start -> healthy, fleetd vs bare (accel {a.accel}, workload {a.workload}, "
               f"medians of {a.runs}; load before {res['loadavg_before']})", res["rows"])
    write_json(a.json, res)
    return res


if __name__ == "__main__":
    t = time.monotonic()
    main()
    print(f"({time.monotonic() - t:.0f} s)")
