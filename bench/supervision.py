#!/usr/bin/env python3
"""The daemon's own cost of supervising idle guests: CPU % of one core and RSS.

For each fleet size (``--sizes 64,256``): start that many bundled guests (``workload=idle``,
1 vCPU, 100 ms heartbeats; brought up ``--batch`` at a time), let them settle, then over
``--window`` seconds read from /proc: the daemon's utime+stime (-> % of one core), its VmRSS
and fd count, the CPU used by all of its QEMUs (context) and by the whole host. Checks at
the end that every guest is still healthy and none failed during the window.

    .venv/bin/python bench/supervision.py [--sizes 64,256] [--window 30] [--accel tcg|auto] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_json  # noqa: E402
from _fleet import (cpu_seconds, fd_count, foreign_qemus, fresh_daemon, host_cpu_seconds,  # noqa: E402
                    loadavg, print_rows, row, rss_bytes, start_in_batches)

TARGET_CPU_64 = 1.0   # % of one core


def qemu_cpu(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        try:
            total += cpu_seconds(p)
        except OSError:
            pass
    return total


def hb_total(d: Any) -> int:
    return sum(r.get("heartbeats_total", 0) for r in d.call("stats", targets=["s"]).replicas)


def measure(size: int, window: float, accel: str, batch: int, settle: float,
            policy: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = {"cpus": 1, "workload": "idle"}
    with fresh_daemon(accel) as d:
        pid = d.pid
        rss_empty = rss_bytes(pid)
        t_up = start_in_batches(d, "s", size, batch, spec, policy=policy)
        rows = d.call("ps", targets=["s"]).replicas
        pids = [r.pid for r in rows if r.pid]
        time.sleep(settle)
        hb0 = hb_total(d)
        ev = d.client()
        ev.stream("events", follow=True, tail=0)
        c0, q0, h0, w0 = cpu_seconds(pid), qemu_cpu(pids), host_cpu_seconds(), time.monotonic()
        rss_samples = [rss_bytes(pid)]
        events: list[dict[str, Any]] = []
        while time.monotonic() - w0 < window:
            for kind, e in ev.poll(timeout=min(1.0, max(0.0, window - (time.monotonic() - w0)))):
                if kind == "event":
                    events.append(e)
            rss_samples.append(rss_bytes(pid))
        c1, q1, h1, w1 = cpu_seconds(pid), qemu_cpu(pids), host_cpu_seconds(), time.monotonic()
        ev.close()
        hb1 = hb_total(d)
        wall = w1 - w0
        final = d.call("ps", targets=["s"]).replicas
        stats = d.call("stats", targets=["s"])
        hb = [r.get("heartbeat_rate", 0.0) for r in stats.replicas]
        res = {
            "size": size, "window_s": wall, "startup_s": t_up,
            "daemon_cpu_pct": (c1 - c0) / wall * 100,
            "daemon_rss_mib": rss_samples[-1] / 2**20, "daemon_rss_max_mib": max(rss_samples) / 2**20,
            "daemon_rss_empty_mib": rss_empty / 2**20,
            "daemon_fds": fd_count(pid),
            "qemu_cpu_pct": (q1 - q0) / wall * 100,
            "qemu_cpu_per_guest_pct": (q1 - q0) / wall * 100 / max(1, len(pids)),
            "host_cpu_pct": (h1 - h0) / wall * 100,
            "healthy_at_end": sum(r.health == "healthy" for r in final),
            "failures_in_window": sum(e.get("kind") == "failure" for e in events),
            "events_in_window": len(events),
            "heartbeat_rate_median": sorted(hb)[len(hb) // 2] if hb else 0.0,
            "heartbeats_per_s": (hb1 - hb0) / wall,
            "daemon_us_per_heartbeat": (c1 - c0) / max(1, hb1 - hb0) * 1e6,
            "policy": policy,
            "loadavg": loadavg(),
        }
    return res


def run(sizes: list[int], window: float = 30.0, accel: str = "tcg", batch: int = 32,
        settle: float = 3.0, policy: dict[str, Any] | None = None) -> dict[str, Any]:
    load0 = loadavg()
    results = [measure(n, window, accel, batch, settle, policy) for n in sizes]
    rows = []
    for r in results:
        n = r["size"]
        target = f"<= {TARGET_CPU_64:g} %" if n <= 64 else ""
        ok = r["daemon_cpu_pct"] <= TARGET_CPU_64 if n <= 64 else None
        rows += [
            row(f"{n} idle guests: fleetd CPU", r["daemon_cpu_pct"], "% of 1 core", target, ok,
                f"{r['window_s']:.0f} s window; {r['daemon_cpu_pct'] / n * 1000:.0f} m%/guest; "
                f"{r['heartbeats_per_s']:.0f} HB/s, {r['daemon_us_per_heartbeat']:.0f} us/HB"),
            row(f"{n} idle guests: fleetd RSS", r["daemon_rss_mib"], "MiB",
                note=f"empty daemon {r['daemon_rss_empty_mib']:.0f} MiB; "
                     f"{(r['daemon_rss_mib'] - r['daemon_rss_empty_mib']) * 1024 / n:.0f} KiB/guest"),
            row(f"{n} idle guests: QEMUs CPU (context)", r["qemu_cpu_pct"], "% of 1 core",
                note=f"{r['qemu_cpu_per_guest_pct']:.2f} %/guest; host total {r['host_cpu_pct']:.0f} %"),
            row(f"{n} idle guests: healthy at end", r["healthy_at_end"], f"of {n}",
                f"{n}", r["healthy_at_end"] == n and r["failures_in_window"] == 0,
                f"{r['failures_in_window']} failures, hb {r['heartbeat_rate_median']:.1f}/s"),
        ]
    return {"bench": "supervision", "accel": accel, "sizes": sizes, "window_s": window,
            "loadavg_before": load0, "foreign_qemus": foreign_qemus(), "results": results,
            "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,256")
    ap.add_argument("--window", type=float, default=30.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--accel", default="tcg", choices=["tcg", "auto"])
    ap.add_argument("--check-interval", type=float,
                    help="fleet policy health.check_interval (diagnosis; default: fleetd's)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    policy = {"health": {"check_interval": a.check_interval}} if a.check_interval else None
    res = run([int(s) for s in a.sizes.split(",")], a.window, a.accel, a.batch, policy=policy)
    print_rows(f"supervision: fleetd's cost with idle 1-vCPU guests, 100 ms heartbeats "
               f"(accel {a.accel}, {a.window:g} s windows; load before {res['loadavg_before']})",
               res["rows"])
    write_json(a.json, res)
    return res


if __name__ == "__main__":
    t = time.monotonic()
    main()
    print(f"({time.monotonic() - t:.0f} s)")
