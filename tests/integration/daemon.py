"""A real fleetd process for tests: started as users start it, talked to over its socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fleetctl.client import Client, DaemonUnreachable
from tests.conftest import qemu_pids

ROOT = Path(__file__).resolve().parents[2]


class DaemonProc:
    """``fleetd`` in a subprocess with a short socket path and its own state dir."""

    def __init__(self, run_dir: Path, state_dir: Path, *, accel: str = "tcg",
                 extra: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.run_dir = run_dir
        self.state_dir = state_dir
        self.socket = run_dir / "fleetd.sock"
        self.accel = accel
        self.extra = extra or []
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = state_dir.parent / f"{state_dir.name}-fleetd.log"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "fleetd.main", "--socket", str(self.socket),
                "--state-dir", str(self.state_dir), "--log-json", "--log-level", "debug",
                *(["--accel", "tcg"] if self.accel == "tcg" else []), *self.extra]

    def start(self, timeout: float = 30.0) -> "DaemonProc":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONPATH": str(ROOT), **self.env}
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                     cwd=ROOT)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fleetd exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with Client(self.socket, timeout=5) as c:
                    c.connect()
                return self
            except DaemonUnreachable:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"fleetd did not come up:\n{self.log_tail()}") from None
                time.sleep(0.05)

    def client(self, timeout: float = 60.0) -> Client:
        c = Client(self.socket, timeout=timeout)
        c.connect()
        return c

    def call(self, method: str, **params: Any) -> Any:
        with self.client() as c:
            return c.call(method, **params)

    def wait_healthy(self, fleet: str, n: int, timeout: float = 60.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        rows: list[Any] = []
        while time.monotonic() < deadline:
            rows = self.call("ps", targets=[fleet]).replicas
            if len(rows) == n and all(r.health == "healthy" for r in rows):
                return rows
            time.sleep(0.1)
        raise AssertionError(f"fleet {fleet} not healthy in {timeout}s: "
                             f"{[(r.name, r.state, r.health, r.health_reason) for r in rows]}")

    def wait_for(self, pred: Any, timeout: float = 30.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = pred()
            if last:
                return last
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what or pred}: last={last!r}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def internal_errors(self) -> list[str]:
        """Log lines where fleetd reported a bug of its own (with their tracebacks)."""
        out = []
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return out
        for line in text.splitlines():
            if '"internal_error"' in line or '"level": "critical"' in line or (
                    '"exception"' in line and '"level": "error"' in line):
                out.append(line[-4000:])
        return out

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, *, stop_guests: bool = True, timeout: float = 60.0) -> int | None:
        """Ask the daemon to stop (stopping guests by default); returns its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.call("daemon_stop", stop_guests=stop_guests)
            except Exception:  # noqa: BLE001 - fall back to a signal
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def guests(self) -> set[int]:
        """QEMU processes belonging to this daemon (their argv names our run dir)."""
        return qemu_pids(str(self.run_dir) + "/")
