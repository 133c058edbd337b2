"""Helpers shared by the fleet-level benchmarks: bare QEMU fleets, daemons, /proc readings.

A *bare* run is the argv fleetd would build for a replica (``fleetd.argv.build_argv``) minus
``-S`` and ``-pidfile``, spawned with ``posix_spawn`` and watched through its console socket:
no QMP, no pinning, no supervision. It is what a careful shell script would do, and the
floor fleetd is compared against.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fleetd.accel import AccelDecision, choose, probe  # noqa: E402
from fleetd.argv import Launch, VmPaths, build_argv  # noqa: E402
from fleetd.process import find_qemu  # noqa: E402
from fleetd.spec import parse_spec  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def short_dir(prefix: str = "bx") -> Path:
    """A fresh temp dir with a short path (AF_UNIX paths are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


# -- accelerator --------------------------------------------------------------------------------

_decision: AccelDecision | None = None


def decision(accel: str) -> AccelDecision:
    """What the daemon would decide for ``--accel`` (``tcg``: never KVM; ``auto``: probe)."""
    global _decision
    if accel == "tcg":
        return AccelDecision("tcg", False, None, None, "tcg (--accel tcg)")
    if _decision is None:
        import anyio
        _decision = anyio.run(probe)
    return _decision


# -- bare QEMU fleets ---------------------------------------------------------------------------

def bare_argv(spec_data: dict[str, Any], accel: str, run: Path, name: str) -> list[str]:
    """fleetd's argv for ``spec_data`` with sockets under ``run/name``, minus -S and -pidfile."""
    spec = parse_spec(spec_data)
    choice = choose(spec, decision(accel))
    d = run / name
    d.mkdir(parents=True, exist_ok=True)
    argv = build_argv(spec, Launch(name, VmPaths(d, d), choice, fleet="bare"))
    argv[0] = find_qemu(argv[0])
    argv = [a for a in argv if a != "-S"]
    i = argv.index("-pidfile")
    del argv[i:i + 2]
    return argv


@dataclass
class BareGuest:
    pid: int
    console: Path
    sock: socket.socket | None = None
    buf: bytearray = field(default_factory=bytearray)
    ready: float | None = None       # seconds since the fleet was spawned
    first_hb: float | None = None


def _connect(path: Path, deadline: float) -> socket.socket:
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            s.setblocking(False)
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise TimeoutError(f"console socket {path} never accepted") from None
            time.sleep(0.001)


def bare_fleet(argvs: list[list[str]], *, timeout: float = 120.0) -> dict[str, Any]:
    """Spawn every argv at once (no -S: guests run at once); time READY and the first heartbeat.

    Returns per-guest times and the fleet times (the last guest's), in seconds from the
    first spawn. Every QEMU is SIGKILLed and reaped before returning.
    """
    guests: list[BareGuest] = []
    t0 = time.monotonic()
    deadline = t0 + timeout
    try:
        for argv in argvs:
            con = Path(next(a for a in argv if a.startswith("socket,id=con0,")).split("path=")[1]
                       .split(",")[0])
            pid = os.posix_spawn(argv[0], argv, dict(os.environ), setsid=True, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
                (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0)])
            guests.append(BareGuest(pid, con))
        sel = selectors.DefaultSelector()
        for g in guests:            # the console socket exists before the guest runs
            g.sock = _connect(g.console, deadline)
            sel.register(g.sock, selectors.EVENT_READ, g)
        pending = len(guests)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{pending} bare guests without a heartbeat after {timeout}s")
            for key, _ in sel.select(min(left, 1.0)):
                g: BareGuest = key.data
                now = time.monotonic() - t0
                try:
                    chunk = g.sock.recv(65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    raise RuntimeError(f"bare QEMU {g.pid} closed its console")
                g.buf += chunk
                if g.ready is None and b"FLEET READY" in g.buf:
                    g.ready = now
                if g.first_hb is None and b"FLEET HB" in g.buf:
                    g.first_hb = now
                    if g.ready is None:
                        g.ready = now
                    sel.unregister(g.sock)
                    pending -= 1
                    g.buf.clear()
        sel.close()
    finally:
        for g in guests:
            try:
                os.kill(g.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for g in guests:
            try:
                os.waitpid(g.pid, 0)
            except ChildProcessError:
                pass
            if g.sock is not None:
                g.sock.close()
    ready = [g.ready for g in guests]
    hb = [g.first_hb for g in guests]
    return {"ready": ready, "first_hb": hb, "all_ready": max(ready), "all_hb": max(hb)}


def bare_fleet_run(n: int, spec_data: dict[str, Any], accel: str) -> dict[str, Any]:
    """``n`` bare copies of fleetd's argv for ``spec_data``, spawned at once."""
    run = short_dir("bb")
    try:
        argvs = [bare_argv(spec_data, accel, run, f"b{i}") for i in range(n)]
        return bare_fleet(argvs)
    finally:
        shutil.rmtree(run, ignore_errors=True)


# -- a daemon -----------------------------------------------------------------------------------

def daemon(run: Path, accel: str, *, env: dict[str, str] | None = None,
           log_level: str = "info") -> Any:
    """A :class:`tests.integration.daemon.DaemonProc` (not started) logging at ``log_level``.

    The benchmarks run the daemon as it is deployed (``info``, the default), not at the
    test suite's ``debug``.
    """
    from tests.integration.daemon import DaemonProc
    return DaemonProc(run, run / "state", accel=accel, env=env,
                      extra=["--log-level", log_level])


def wait_healthy_events(client: Any, names: set[str], t0: float, timeout: float = 300.0,
                        failed_ok: bool = False) -> dict[str, float]:
    """Follow an ``events`` stream until every replica in ``names`` reported ``healthy``.

    Returns name -> seconds from ``t0`` (``time.monotonic()``) at which the client saw it.
    """
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(names):
        if time.monotonic() > deadline:
            missing = sorted(names - set(seen))
            raise TimeoutError(f"{len(missing)} replicas not healthy after {timeout}s: "
                               f"{missing[:8]}")
        for kind, e in client.poll(timeout=0.5):
            now = time.monotonic() - t0
            if kind != "event":
                continue
            vm = e.get("vm")
            if e.get("kind") == "health" and e.get("health") == "healthy" and vm in names:
                seen.setdefault(vm, now)
            elif e.get("kind") == "failure" and vm in names and not failed_ok:
                raise RuntimeError(f"{vm} failed while starting: {e}")
    return seen


def start_fleet(d: Any, name: str, replicas: int, spec: dict[str, Any],
                policy: dict[str, Any] | None = None, timeout: float = 120.0) -> float:
    """Start a fleet and wait (events stream) until all healthy; seconds from the request."""
    c = d.client(timeout=120)
    try:
        c.stream("events", follow=True, tail=0)
        t0 = time.monotonic()
        params: dict[str, Any] = {"name": name, "replicas": replicas, "spec": spec}
        if policy:
            params["policy"] = policy
        c.call("start", **params)
        seen = wait_healthy_events(c, {f"{name}-{i}" for i in range(replicas)}, t0, timeout)
        return max(seen.values())
    finally:
        c.close()


def start_in_batches(d: Any, name: str, total: int, batch: int, spec: dict[str, Any],
                     timeout: float = 600.0, policy: dict[str, Any] | None = None) -> float:
    """Start a ``total``-replica fleet ``batch`` replicas at a time (start, then scale).

    Large fleets on two cores are brought up in steps so that no QEMU hits the daemon's
    start timeout while hundreds boot at once; returns the total seconds.
    """
    t0 = time.monotonic()
    n = min(batch, total)
    start_fleet(d, name, n, spec, policy=policy, timeout=timeout)
    while n < total:
        m = min(total, n + batch)
        c = d.client(timeout=120)
        try:
            c.stream("events", follow=True, tail=0)
            t1 = time.monotonic()
            c.call("scale", fleet=name, replicas=m)
            wait_healthy_events(c, {f"{name}-{i}" for i in range(n, m)}, t1, timeout)
        finally:
            c.close()
        n = m
    return time.monotonic() - t0


# -- /proc --------------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    rest = data[data.rindex(b")") + 2:].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    """VmRSS of a process."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def host_cpu_seconds() -> float:
    """CPU time used on the whole host (all CPUs, user+nice+system+irq+softirq+steal)."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = vals[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def foreign_qemus(marker: str | None = None) -> int:
    """QEMU processes on the host that are not ours (other users of a shared machine)."""
    from tests.conftest import qemu_pids
    mine = qemu_pids(marker) if marker else set()
    return len(qemu_pids() - mine)


# -- sd_notify ----------------------------------------------------------------------------------

class NotifyListener:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET; timestamps each datagram."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, str]] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            now = time.monotonic()
            text = data.decode(errors="replace")
            self.messages.append((now, text))
            if "READY=1" in text.splitlines():
                self._ready.set()

    def wait_ready(self, timeout: float) -> float | None:
        """Monotonic time READY=1 arrived, or None."""
        if not self._ready.wait(timeout):
            return None
        return next(t for t, m in self.messages if "READY=1" in m.splitlines())

    def reset(self) -> None:
        self.messages.clear()
        self._ready.clear()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


@contextmanager
def fresh_daemon(accel: str, *, env: dict[str, str] | None = None,
                 prefix: str = "bx") -> Iterator[Any]:
    """A started daemon in a short temp dir; stopped with its guests (and the dir removed)."""
    run = short_dir(prefix)
    d = daemon(run, accel, env=env)
    try:
        d.start()
        yield d
    finally:
        try:
            d.stop(stop_guests=True, timeout=300)
        finally:
            for pid in d.guests():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            shutil.rmtree(run, ignore_errors=True)


# -- rows ---------------------------------------------------------------------------------------

def row(metric: str, value: float | None, unit: str, target: str = "", ok: bool | None = None,
        note: str = "") -> dict[str, Any]:
    """One result line, as run_all.py collects them."""
    return {"metric": metric, "value": value, "unit": unit, "target": target, "ok": ok,
            "note": note}


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "MISSED")


def print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    from _common import table
    print(title)
    print(table(["metric", "value", "unit", "target", "verdict", "note"],
                [[r["metric"], float("nan") if r["value"] is None else r["value"], r["unit"],
                  r["target"] or "-", verdict(r["ok"]), r["note"]] for r in rows]))
