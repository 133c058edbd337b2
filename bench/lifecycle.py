#!/usr/bin/env python3
"""One guest's lifecycle latencies through fleetd's Vm vs the same argv run bare.

Prints medians (ms): QEMU spawn -> QMP ready, -> vCPUs pinned, -> guest READY,
and SIGKILL -> exit detected; bare = the same QEMU argv without -S, started
with posix_spawn, QMP connected by a plain socket, READY read from the
console socket, death seen by waitpid.

    .venv/bin/python bench/lifecycle.py [--runs 7] [--accel tcg|kvm] [--cpus 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median, table, write_json  # noqa: E402

from fleetd.accel import choose, probe  # noqa: E402
from fleetd.argv import Launch, VmPaths, build_argv  # noqa: E402
from fleetd.guestproto import GuestReady, parse_line  # noqa: E402
from fleetd.log import configure  # noqa: E402
from fleetd.process import find_qemu  # noqa: E402
from fleetd.spec import parse_spec  # noqa: E402
from fleetd.vm import Pins, Vm, VmState  # noqa: E402


class Obs:
    def __init__(self) -> None:
        self.ready_at: float | None = None
        self.ev = anyio.Event()

    def state_changed(self, vm, old, new, reason) -> None:  # noqa: ANN001
        self.ev.set()

    def qmp_event(self, vm, event) -> None:  # noqa: ANN001
        pass

    def console_line(self, vm, line, when) -> None:  # noqa: ANN001
        if self.ready_at is None and isinstance(parse_line(line), GuestReady):
            self.ready_at = when
            self.ev.set()


async def fleetd_run(spec, choice, cpus: int) -> dict[str, float]:  # noqa: ANN001
    d = Path(tempfile.mkdtemp(prefix="bl", dir="/tmp"))
    host = sorted(os.sched_getaffinity(0))
    pins = Pins(tuple(frozenset({host[i % len(host)]}) for i in range(cpus)), frozenset(host))
    obs = Obs()
    vm = Vm(spec, Launch("bench", VmPaths(d / "r", d / "s"), choice), pins, observer=obs)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(vm.run)
            with anyio.fail_after(60):
                while obs.ready_at is None:
                    obs.ev = anyio.Event()
                    await obs.ev.wait()
            t = vm.timeline
            t_kill = time.monotonic()
            os.kill(vm.pid, signal.SIGKILL)
            with anyio.fail_after(10):
                while vm.state != VmState.CRASHED:
                    obs.ev = anyio.Event()
                    await obs.ev.wait()
            detected = (vm.timeline.exited or time.monotonic()) - t_kill
        return {"qmp": t.qmp_ready - t.spawned, "pinned": t.pinned - t.spawned,
                "ready": obs.ready_at - t.spawned, "kill": detected}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def bare_run(argv: list[str]) -> dict[str, float]:
    d = Path(tempfile.mkdtemp(prefix="bb", dir="/tmp"))
    qmp, con = d / "q.sock", d / "c.sock"
    argv = [a for a in argv if a != "-S"]
    out = []
    for a in argv:
        if a.startswith("socket,id=qmp,"):
            a = f"socket,id=qmp,path={qmp},server=on,wait=off"
        elif a.startswith("socket,id=con0,"):
            a = f"socket,id=con0,path={con},server=on,wait=off"
        out.append(a)
    idx = out.index("-pidfile")
    del out[idx:idx + 2]
    try:
        t0 = time.monotonic()
        pid = os.posix_spawn(out[0], out, dict(os.environ), setsid=True, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
            (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0)])

        def connect(path: Path) -> socket.socket:
            while True:
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(str(path))
                    return s
                except OSError:
                    s.close()
                    time.sleep(0.002)

        c = connect(con)
        q = connect(qmp)
        q.recv(4096)
        q.sendall(b'{"execute":"qmp_capabilities"}\n')
        q.recv(4096)
        t_qmp = time.monotonic()
        buf = b""
        c.settimeout(60)
        while b"FLEET READY" not in buf:
            chunk = c.recv(65536)
            if not chunk:
                break
            buf += chunk
        t_ready = time.monotonic()
        t_kill = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        t_dead = time.monotonic()
        q.close()
        c.close()
        return {"qmp": t_qmp - t0, "ready": t_ready - t0, "kill": t_dead - t_kill}
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def main() -> None:
    configure("warning")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--accel", default="auto", choices=["auto", "tcg", "kvm"])
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    decision = await probe()
    spec = parse_spec({"cpus": a.cpus, "accel": a.accel})
    choice = choose(spec, decision)
    d = Path(tempfile.mkdtemp(prefix="ba", dir="/tmp"))
    argv = build_argv(spec, Launch("bench", VmPaths(d, d), choice))
    argv[0] = find_qemu(argv[0])
    fl, bare = [], []
    for _ in range(a.runs):
        bare.append(await anyio.to_thread.run_sync(bare_run, argv))
        fl.append(await fleetd_run(spec, choice, a.cpus))
    shutil.rmtree(d, ignore_errors=True)

    def med(rows: list[dict[str, float]], k: str) -> float:
        return median([r[k] * 1000 for r in rows if k in r])

    rows = []
    for k, label in (("qmp", "spawn -> QMP ready"), ("pinned", "spawn -> vCPUs pinned"),
                     ("ready", "spawn -> guest READY"), ("kill", "SIGKILL -> exit detected")):
        f, b = med(fl, k), med(bare, k)
        rows.append([label, f, b, f / b if k in bare[0] and b else float("nan")])
    print(f"accel {choice.accel} (-cpu {choice.cpu_model}), smp {a.cpus}, runs {a.runs}; "
          f"probe: {decision.reason}")
    print(table(["step (median ms)", "fleetd", "bare", "ratio"], rows))
    write_json(a.json, {"accel": choice.accel, "cpus": a.cpus, "runs": a.runs,
                        "fleetd": fl, "bare": bare})


if __name__ == "__main__":
    anyio.run(main)
