#!/usr/bin/env python3
"""Control-API round trips with a large fleet running: ps, info, inspect (and stats).

Starts ``--guests`` idle 1-vCPU guests, then times, from a client in this process on one
persistent connection (``fleetctl.client.Client``), ``--calls`` calls of ``ps`` (every
replica), and fewer of ``info``, ``inspect <replica>`` and ``stats``. ``ps`` is also timed
raw (request line out, reply line in, no client-side validation) to split the daemon's
share from the client's pydantic parsing. One ``fleetctl ps --json`` process (Python start
included) is timed as context.

    .venv/bin/python bench/api.py [--guests 256] [--calls 1000] [--accel tcg|auto] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median, pct, write_json  # noqa: E402
from _fleet import ROOT, foreign_qemus, fresh_daemon, loadavg, print_rows, row, start_in_batches  # noqa: E402

TARGET_PS_P99_MS = 5.0


def timed(fn: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


class RawConn:
    """A bare socket speaking the protocol: one request line out, one reply line in."""

    def __init__(self, path: Path) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(str(path))
        self.buf = b""
        self.id = 0
        self.readline()  # greeting

    def readline(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.s.recv(1 << 20)
            if not chunk:
                raise ConnectionError("daemon closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def call(self, method: str, params: dict[str, Any]) -> bytes:
        self.id += 1
        self.s.sendall(json.dumps({"id": self.id, "method": method, "params": params}).encode() + b"\n")
        return self.readline()

    def close(self) -> None:
        self.s.close()


def run(guests: int = 256, calls: int = 1000, accel: str = "tcg", batch: int = 32) -> dict[str, Any]:
    load0 = loadavg()
    spec = {"cpus": 1, "workload": "idle"}
    small = max(50, calls // 5)
    with fresh_daemon(accel) as d:
        t_up = start_in_batches(d, "a", guests, batch, spec)
        c = d.client()
        names = [f"a-{i}" for i in range(guests)]
        for _ in range(20):                            # warm up both sides
            c.call("ps")
        ps = timed(lambda: c.call("ps"), calls)
        n_rows = len(c.call("ps").replicas)
        raw = RawConn(d.socket)
        reply_bytes = len(raw.call("ps", {}))
        ps_raw = timed(lambda: raw.call("ps", {}), calls)
        raw.close()
        info = timed(lambda: c.call("info"), small)
        inspect = timed(lambda: c.call("inspect", name=random.choice(names)), small)
        ps_one = timed(lambda: c.call("ps", targets=[random.choice(names)]), small)
        stats = timed(lambda: c.call("stats"), max(10, small // 10))
        c.close()
        env = {**os.environ, "FLEETD_SOCKET": str(d.socket), "PYTHONPATH": str(ROOT)}
        cli = []
        for _ in range(5):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "fleetctl.main", "ps", "--json"], env=env,
                           check=True, capture_output=True, cwd=ROOT)
            cli.append((time.perf_counter() - t) * 1000)
        healthy = sum(r.health == "healthy" for r in d.call("ps").replicas)
    res = {"bench": "api", "accel": accel, "guests": guests, "calls": calls, "startup_s": t_up,
           "loadavg_before": load0, "foreign_qemus": foreign_qemus(), "ps_rows": n_rows,
           "ps_reply_bytes": reply_bytes, "healthy_after": healthy,
           "ms": {"ps": ps, "ps_raw": ps_raw, "info": info, "inspect": inspect, "ps_one": ps_one,
                  "stats": stats, "fleetctl_ps": cli}}
    p99 = pct(ps, 99)
    rows = [
        row(f"ps ({n_rows} replicas) p50", median(ps), "ms", note=f"Client.call, {calls} calls"),
        row(f"ps ({n_rows} replicas) p99", p99, "ms", f"<= {TARGET_PS_P99_MS:g} ms",
            p99 <= TARGET_PS_P99_MS, f"max {max(ps):.1f}; reply {reply_bytes / 1024:.0f} KiB"),
        row("ps raw socket (no client parsing) p50/p99", median(ps_raw), "ms",
            note=f"p99 {pct(ps_raw, 99):.2f}"),
        row("ps one replica p50/p99", median(ps_one), "ms", note=f"p99 {pct(ps_one, 99):.2f}"),
        row("info p50/p99", median(info), "ms", note=f"p99 {pct(info, 99):.2f}"),
        row("inspect p50/p99", median(inspect), "ms", note=f"p99 {pct(inspect, 99):.2f}"),
        row(f"stats ({n_rows} replicas) p50", median(stats), "ms", note=f"p99 {pct(stats, 99):.1f}"),
        row("fleetctl ps --json (new process) median", median(cli), "ms", note="context"),
    ]
    res["rows"] = rows
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", type=int, default=256)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--accel", default="tcg", choices=["tcg", "auto"])
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    res = run(a.guests, a.calls, a.accel, a.batch)
    print_rows(f"api: round trips with {a.guests} idle guests (accel {a.accel}; load before "
               f"{res['loadavg_before']})", res["rows"])
    write_json(a.json, res)
    return res


if __name__ == "__main__":
    t = time.monotonic()
    main()
    print(f"({time.monotonic() - t:.0f} s)")
