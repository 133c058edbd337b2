#!/usr/bin/env python3
"""Run every fleetd benchmark, print one table, write one JSON (and optionally Markdown).

Each benchmark runs as its own process (``bench/<name>.py --json ...``; each also runs
alone), one after the other, and every fleetd-vs-bare ratio is measured side by side inside
that benchmark's run. ``--quick`` uses fewer runs, 64 instead of 256 guests and 10 s windows
(a few minutes); the full run takes about a quarter of an hour on a 2-core machine.

    .venv/bin/python bench/run_all.py [--quick] [--accel tcg|auto] [--only fleet,api]
                                      [--json bench/results/latest.json] [--md FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import machine, median, pct, table, write_json  # noqa: E402
from _fleet import foreign_qemus, loadavg, row, verdict  # noqa: E402

ORDER = ["fleet", "create_rate", "supervision", "api", "readopt", "recovery", "lifecycle"]


def bench_args(name: str, quick: bool, accel: str) -> list[str]:
    full = {
        "fleet": ["--runs", "7"],
        "create_rate": ["--runs", "5"],
        "supervision": ["--sizes", "64,256", "--window", "30"],
        "api": ["--guests", "256", "--calls", "1000"],
        "readopt": ["--sizes", "8,32,64", "--runs", "3", "--probes", "3", "--aged-mib", "8"],
        "recovery": ["--runs", "10"],
        "lifecycle": ["--runs", "7"],
    }
    short = {
        "fleet": ["--runs", "3"],
        "create_rate": ["--runs", "2"],
        "supervision": ["--sizes", "64", "--window", "10"],
        "api": ["--guests", "64", "--calls", "300"],
        "readopt": ["--sizes", "8,32", "--runs", "2", "--probes", "1", "--aged-mib", "2"],
        "recovery": ["--runs", "3"],
        "lifecycle": ["--runs", "3"],
    }
    return (short if quick else full)[name] + ["--accel", accel]


def lifecycle_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    def med(rows: list[dict[str, float]], k: str) -> float:
        return median([r[k] * 1000 for r in rows if k in r])

    f, b = res["fleetd"], res["bare"]
    ready = med(f, "ready") / med(b, "ready")
    return [
        row("Vm spawn -> QMP ready (fleetd / bare)", med(f, "qmp"), "ms",
            note=f"bare {med(b, 'qmp'):.0f} ms"),
        row("Vm spawn -> vCPUs pinned", med(f, "pinned"), "ms"),
        row("Vm spawn -> guest READY (fleetd / bare)", med(f, "ready"), "ms",
            note=f"bare {med(b, 'ready'):.0f} ms, ratio {ready:.2f}"),
        row("Vm SIGKILL -> exit detected", med(f, "kill"), "ms",
            note=f"bare waitpid {med(b, 'kill'):.1f} ms"),
    ]


def recovery_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    ms = res["ms"]
    boot = median(ms["bare_boot"])
    kd, kh = median(ms["kill_detect"]), median(ms["kill_healthy"])
    hang, stall = median(ms["hang_detect"]), median(ms["stall_detect"])
    return [
        row("plain boot (bare spawn -> READY)", boot, "ms", note=f"p95 {pct(ms['bare_boot'], 95):.0f}"),
        row("fleetd start -> healthy (1 replica)", median(ms["start_healthy"]), "ms",
            note=f"{median(ms['start_healthy']) / boot:.2f}x boot"),
        row("SIGKILL -> detected", kd, "ms", "<= 10 ms", kd <= 10,
            f"p95 {pct(ms['kill_detect'], 95):.1f}"),
        row("SIGKILL -> healthy again", kh, "ms", "<= boot + 50 ms", kh <= boot + 50,
            f"boot + {kh - boot:.0f} ms; p95 {pct(ms['kill_healthy'], 95):.0f}"),
        row("hang -> detected (heartbeat_timeout 1 s)", hang, "ms",
            note=f"timeout + {hang - 1000:.0f} ms"),
        row("stall -> detected (stall_timeout 1.5 s)", stall, "ms",
            note=f"timeout + {stall - 1500:.0f} ms"),
    ]


def run_one(name: str, args: list[str], out: Path) -> tuple[dict[str, Any] | None, float, str]:
    cmd = [sys.executable, str(HERE / f"{name}.py"), *args, "--json", str(out)]
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    t = time.monotonic()
    p = subprocess.run(cmd, cwd=HERE.parent)
    dt = time.monotonic() - t
    if p.returncode != 0 or not out.exists():
        return None, dt, f"exit status {p.returncode}"
    return json.loads(out.read_text()), dt, ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs, 64 guests, 10 s windows")
    ap.add_argument("--accel", default="tcg", choices=["tcg", "auto"])
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(ORDER)}")
    ap.add_argument("--json", help="write every result here (e.g. bench/results/latest.json)")
    ap.add_argument("--md", help="also write the table as Markdown here")
    a = ap.parse_args()
    names = a.only.split(",") if a.only else ORDER
    for n in names:
        if n not in ORDER:
            ap.error(f"unknown benchmark {n!r} (choose from {', '.join(ORDER)})")
    t0 = time.monotonic()
    load0, foreign0 = loadavg(), foreign_qemus()
    results: dict[str, Any] = {}
    rows: list[tuple[str, dict[str, Any]]] = []
    durations: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bxall") as tmp:
        for name in names:
            res, dt, err = run_one(name, bench_args(name, a.quick, a.accel), Path(tmp) / f"{name}.json")
            durations[name] = round(dt, 1)
            if res is None:
                rows.append((name, row("FAILED", None, "", "", False, err)))
                continue
            results[name] = res
            if name == "lifecycle":
                brows = lifecycle_rows(res)
            elif name == "recovery":
                brows = recovery_rows(res)
            else:
                brows = res["rows"]
            rows += [(name, r) for r in brows]
    total = time.monotonic() - t0
    m = machine()
    header = (f"fleetd benchmarks ({'quick' if a.quick else 'full'}, accel {a.accel}) on {m['host']}: "
              f"{m['cpus']} CPUs ({m['cpu']}), kernel {m['kernel']}, Python {m['python']}, {m['date']}; "
              f"load before {load0}, {foreign0} other QEMUs on the host; {total / 60:.1f} min")
    cells = [[b, r["metric"], float("nan") if r["value"] is None else r["value"], r["unit"],
              r["target"] or "-", verdict(r["ok"]), r["note"]] for b, r in rows]
    print("\n" + header)
    print(table(["bench", "metric", "value", "unit", "target", "verdict", "note"], cells))
    met = [r for _, r in rows if r["ok"] is True]
    missed = [r for _, r in rows if r["ok"] is False]
    print(f"targets: {len(met)} met, {len(missed)} missed"
          + (": " + "; ".join(r["metric"] for r in missed) if missed else ""))
    write_json(a.json, {"quick": a.quick, "accel": a.accel, "loadavg_before": load0,
                        "foreign_qemus_before": foreign0, "duration_s": round(total, 1),
                        "durations_s": durations,
                        "rows": [{"bench": b, **r} for b, r in rows], "results": results})
    if a.md:
        lines = [f"_{header}_", "", "| bench | metric | value | unit | target | verdict | note |",
                 "|---|---|---:|---|---|---|---|"]
        for c in cells:
            v = c[2]
            val = "-" if v != v else (f"{v:.1f}" if isinstance(v, float) and abs(v) >= 10 else
                                      f"{v:.2f}" if isinstance(v, float) else str(v))
            lines.append("| " + " | ".join([c[0], c[1], val, c[3], c[4], c[5], c[6]]) + " |")
        Path(a.md).parent.mkdir(parents=True, exist_ok=True)
        Path(a.md).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
