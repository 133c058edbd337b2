#!/usr/bin/env python3
"""Re-adoption after a daemon crash: new daemon start -> READY=1 with N running guests.

For each N (``--sizes 8,32,64``): a daemon starts an N-replica idle fleet (1 vCPU) and is
SIGKILLed; then ``--runs`` times a new daemon is started on the same state dir with
``NOTIFY_SOCKET`` pointing at a datagram socket this script binds, and the time from the
daemon's spawn to its ``READY=1`` datagram is taken (fleetd sends READY=1 once every
recorded guest is re-adopted). After each READY the script checks that every replica is
running with the *same* QEMU pid and is healthy, lets the state store flush (0.5 s), then
SIGKILLs that daemon too (the next run re-adopts the same guests again). A daemon start on an
empty state dir is timed the same way as the baseline (Python start-up, imports, accelerator
decision, socket).

Aged logs (``--aged-mib M``, on 8 guests): fleetd replays each guest's console log from
its boot offset when it re-adopts; M MiB of heartbeat lines are appended to every console
log while no daemon runs (what ~M*0.7 hours of 100 ms heartbeats write), then re-adoption
is timed the same way.

Crash probe (once per N): a daemon that re-adopted the guests is SIGKILLed right after its
READY=1; the next daemon must still adopt every guest. Counted: QEMUs of this run dir that no
replica supervises afterwards (orphans; target 0).

    .venv/bin/python bench/readopt.py [--sizes 8,32,64] [--runs 3] [--accel tcg|auto] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median, write_json  # noqa: E402
from _fleet import (NotifyListener, daemon, foreign_qemus, loadavg, print_rows, row, short_dir,  # noqa: E402
                    start_in_batches)


def timed_start(run: Path, accel: str, listener: NotifyListener) -> tuple[Any, float, float]:
    """Start a daemon; (daemon, spawn -> READY=1 s, spawn -> socket accepts s)."""
    listener.reset()
    d = daemon(run, accel, env={"NOTIFY_SOCKET": str(listener.path)})
    t0 = time.monotonic()
    d.start(timeout=120)
    t_sock = time.monotonic() - t0
    t_ready = listener.wait_ready(120)
    if t_ready is None:
        d.kill9()
        raise RuntimeError(f"no READY=1 from fleetd:\n{d.log_tail()}")
    return d, t_ready - t0, t_sock


def kill_guests(d: Any) -> None:
    for pid in d.guests():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def measure(size: int, runs: int, accel: str, batch: int, probes: int = 3) -> dict[str, Any]:
    run = short_dir("bo")
    listener = NotifyListener(run / "notify.sock")
    d = daemon(run, accel)
    res: dict[str, Any] = {"size": size, "ready_s": [], "socket_s": [], "readopt_s": [],
                           "same_pids": [], "healthy": []}
    try:
        d.start()
        start_in_batches(d, "r", size, batch, {"cpus": 1, "workload": "idle"})
        pids = {r.name: r.pid for r in d.call("ps", targets=["r"]).replicas}
        d.kill9()
        for _ in range(runs):
            d, t_ready, t_sock = timed_start(run, accel, listener)
            rows = d.call("ps", targets=["r"]).replicas
            info = d.call("info")
            res["ready_s"].append(t_ready)
            res["socket_s"].append(t_sock)
            res["readopt_s"].append(info.readopt_s)
            res["same_pids"].append(sum(r.pid == pids.get(r.name) for r in rows))
            # health is re-derived from the replayed console log and live heartbeats
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                healthy = sum(r.health == "healthy" for r in rows)
                if healthy == size:
                    break
                time.sleep(0.2)
                rows = d.call("ps", targets=["r"]).replicas
            res["healthy"].append(healthy)
            time.sleep(0.5)                     # let the coalesced state writes land
            d.kill9()
        # crash probe: SIGKILL right after READY=1, then see what the next daemon makes of it
        # (a race: repeated up to `probes` times, stopping at the first orphan)
        res["probe_orphans"], res["probe_same_pids"], res["probes"] = 0, size, 0
        d = daemon(run, accel)
        for _ in range(probes):
            res["probes"] += 1
            d, _, _ = timed_start(run, accel, listener)
            d.kill9()
            d = daemon(run, accel)
            d.start()
            time.sleep(2)
            rows = d.call("ps", targets=["r"]).replicas
            supervised = {r.pid for r in rows if r.pid}
            res["probe_same_pids"] = sum(r.pid == pids.get(r.name) for r in rows)
            res["probe_orphans"] = len(d.guests() - supervised)
            if res["probe_orphans"] or res["probe_same_pids"] != size:
                break
            time.sleep(0.5)
            d.kill9()
            d = daemon(run, accel)
        if not d.alive():
            d.start()
    finally:
        teardown(d, listener, run)
    return res


def teardown(d: Any, listener: NotifyListener, run: Path) -> None:
    """Stop the daemon and its guests (killing any left), close the listener, remove the dir."""
    try:
        d.stop(stop_guests=True, timeout=300)
    finally:
        kill_guests(d)
        listener.close()
        shutil.rmtree(run, ignore_errors=True)


def aged(mib: int, accel: str, n: int = 8, batch: int = 32) -> dict[str, Any]:
    run = short_dir("bo")
    listener = NotifyListener(run / "notify.sock")
    d = daemon(run, accel)
    out: dict[str, Any] = {"guests": n, "mib": mib}
    try:
        d.start()
        start_in_batches(d, "r", n, batch, {"cpus": 1, "workload": "idle"})
        time.sleep(0.5)
        d.kill9()
        d, out["fresh_s"], _ = timed_start(run, accel, listener)
        time.sleep(0.5)
        d.kill9()
        line = 38
        blob = "".join(f"FLEET HB seq={i} up_ms={i * 100} c0={i * 2}\n"
                       for i in range(1, mib * 2**20 // line + 2)).encode()[: mib * 2**20]
        for i in range(n):
            with open(run / "state" / "vms" / f"r-{i}" / "console.log", "ab") as f:
                f.write(blob)
        d, out["aged_s"], _ = timed_start(run, accel, listener)
        out["adopted"] = sum(1 for r in d.call("ps", targets=["r"]).replicas if r.pid)
        out["readopt_s"] = d.call("info").readopt_s
    finally:
        teardown(d, listener, run)
    return out


def baseline(runs: int, accel: str) -> list[float]:
    out = []
    for _ in range(runs):
        run = short_dir("bo")
        listener = NotifyListener(run / "notify.sock")
        try:
            d, t_ready, _ = timed_start(run, accel, listener)
            d.stop()
            out.append(t_ready)
        finally:
            listener.close()
            shutil.rmtree(run, ignore_errors=True)
    return out


def run(sizes: list[int], runs: int = 3, accel: str = "tcg", batch: int = 32,
        probes: int = 3, aged_mib: int = 0) -> dict[str, Any]:
    load0 = loadavg()
    base = baseline(runs, accel)
    results = [measure(n, runs, accel, batch, probes) for n in sizes]
    old = aged(aged_mib, accel, batch=batch) if aged_mib else None
    b = median(base) * 1000
    rows = [row("daemon start -> READY=1, no guests", b, "ms", note="Python start-up, imports, socket")]
    for r in results:
        n = r["size"]
        t = median(r["ready_s"]) * 1000
        adopted = min(r["same_pids"])
        rows.append(row(f"daemon start -> READY=1, {n} running guests", t, "ms",
                        f"all {n} adopted", adopted == n and min(r["healthy"]) == n,
                        f"+{t - b:.0f} ms over empty ({(t - b) / n:.1f} ms/guest); in-daemon "
                        f"{median([x for x in r['readopt_s'] if x is not None]) * 1000:.0f} ms; "
                        f"same pids {adopted}/{n}, healthy {min(r['healthy'])}/{n}"))
        if not r["probes"]:
            continue
        rows.append(row(f"SIGKILL right after READY=1, {n} guests: orphaned QEMUs",
                        r["probe_orphans"], "QEMUs", "0", r["probe_orphans"] == 0,
                        f"race probe x{r['probes']}: next daemon adopted {r['probe_same_pids']}/{n} by pid"))
    if old is not None:
        rows.append(row(f"daemon start -> READY=1, {old['guests']} guests, console logs +{old['mib']} MiB",
                        old["aged_s"] * 1000, "ms", note=f"same guests fresh: {old['fresh_s'] * 1000:.0f} ms; "
                        f"in-daemon readopt_s says {old['readopt_s'] * 1000:.0f} ms"))
    return {"bench": "readopt", "accel": accel, "sizes": sizes, "runs": runs, "aged": old,
            "loadavg_before": load0, "foreign_qemus": foreign_qemus(), "baseline_s": base,
            "results": results, "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="8,32,64")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--probes", type=int, default=3, help="crash probes per size (0: none)")
    ap.add_argument("--aged-mib", type=int, default=8,
                    help="also time re-adopting 8 guests with this much console log (0: skip)")
    ap.add_argument("--accel", default="tcg", choices=["tcg", "auto"])
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    res = run([int(s) for s in a.sizes.split(",")], a.runs, a.accel, a.batch, a.probes,
              a.aged_mib)
    print_rows(f"readopt: SIGKILLed daemon, new daemon spawn -> READY=1 (accel {a.accel}, "
               f"medians of {a.runs}; load before {res['loadavg_before']})", res["rows"])
    write_json(a.json, res)
    return res


if __name__ == "__main__":
    t = time.monotonic()
    main()
    print(f"({time.monotonic() - t:.0f} s)")
