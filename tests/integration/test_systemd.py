"""fleetd under systemd's protocols: the unit files, socket activation, sd_notify.

Real tools and real sockets: ``systemd-analyze verify`` on the shipped units,
``systemd-socket-activate`` handing fleetd its listening socket, and a
datagram socket standing in for systemd's ``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fleetd.sdnotify import SYSTEMD_VARIABLES
from tests.conftest import qemu_pids

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
VENV_FLEETD = Path(sys.executable).parent / "fleetd"


# -- helpers -------------------------------------------------------------------------------------

def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without systemd's variables (pytest itself may run under systemd)."""
    env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Make sure ``proc`` and its process group (started with a new session) are gone."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything it left in its own group
    except (ProcessLookupError, PermissionError):
        pass


class Conn:
    """A raw line-oriented connection to the control socket."""

    def __init__(self, path: Path, timeout: float = 20.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError:
            self.sock.close()
            raise
        self.file = self.sock.makefile("rwb")

    def read(self) -> Any:
        line = self.file.readline()
        assert line, "connection closed"
        return json.loads(line)

    def call(self, id: int, method: str, **params: Any) -> Any:
        req: dict[str, Any] = {"id": id, "method": method}
        if params:
            req["params"] = params
        self.file.write(json.dumps(req).encode() + b"\n")
        self.file.flush()
        reply = self.read()
        assert reply.get("id") == id, reply
        assert "result" in reply, reply
        return reply["result"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def log_tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# -- the unit files ------------------------------------------------------------------------------

def unit_copies(dest: Path, *, socket_group: str | None = None) -> list[Path]:
    """The shipped units copied to ``dest`` with ExecStart pointing at a real fleetd."""
    exe = VENV_FLEETD if os.access(VENV_FLEETD, os.X_OK) else Path("/bin/true")
    out = []
    for name in ("fleetd.socket", "fleetd.service"):
        text = (UNITS / name).read_text()
        text, n = re.subn(r"(?m)^ExecStart=/usr/local/bin/fleetd\b", f"ExecStart={exe}", text)
        if name == "fleetd.service":
            assert n == 1, "fleetd.service: expected ExecStart=/usr/local/bin/fleetd"
        if socket_group is not None:
            text = re.sub(r"(?m)^SocketGroup=.*$", f"SocketGroup={socket_group}", text)
        (dest / name).write_text(text)
        out.append(dest / name)
    return out


def verify(units: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True,
                          text=True, timeout=60, cwd=units[0].parent)


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    units = unit_copies(tmp_path)
    res = verify(units)
    out = res.stdout + res.stderr
    if res.returncode != 0 and "fleetd" in out and re.search(r"group", out, re.I):
        # Only when verify resolves SocketGroup= and the group is missing (installation
        # creates it: groupadd --system fleetd): verify a copy naming root instead.
        units = unit_copies(tmp_path, socket_group="root")
        res = verify(units)
        out = res.stdout + res.stderr
    assert res.returncode == 0, out
    # verify only warns (exit 0) about unknown keys and bad values: any line naming our
    # units is a defect too.
    ours = [ln for ln in out.splitlines() if "fleetd" in ln or str(tmp_path) in ln]
    assert ours == [], out


def test_units_are_coherent() -> None:
    """What the two units promise each other and fleetd (systemd-analyze does not check it)."""
    service = (UNITS / "fleetd.service").read_text()
    sock = (UNITS / "fleetd.socket").read_text()

    def values(text: str, key: str) -> list[str]:
        return re.findall(rf"(?m)^{key}=(.*)$", text)

    assert values(service, "Type") == ["notify"]
    assert values(service, "NotifyAccess") == ["main"]
    assert values(service, "KillMode") == ["process"]
    assert values(service, "Restart") == ["on-failure"]
    assert values(service, "RuntimeDirectory") == ["fleetd"]
    assert values(service, "RuntimeDirectoryPreserve") == ["yes"]
    assert values(service, "StateDirectory") == ["fleetd"]
    assert "/dev/kvm rw" in values(service, "DeviceAllow")
    assert not values(service, "MemoryDenyWriteExecute"), "TCG needs W+X memory"
    assert not values(service, "PrivateDevices"), "PrivateDevices hides /dev/kvm"
    assert not values(service, "ExecStop"), "SIGTERM detaches from guests by itself"
    assert "fleetd.socket" in values(service, "Also")
    assert "fleetd.socket" in " ".join(values(service, "Requires"))
    assert "fleetd.socket" in " ".join(values(service, "After"))
    # The socket lives in the service's runtime directory, at fleetd's default path.
    assert values(sock, "ListenStream") == ["/run/fleetd/fleetd.sock"]
    assert values(sock, "SocketMode") == ["0660"]
    assert values(sock, "SocketGroup") == ["fleetd"]
    assert values(sock, "WantedBy") == ["sockets.target"]
    assert not values(sock, "Accept") or values(sock, "Accept") == ["no"]
    usec = values(service, "WatchdogSec")
    assert usec and usec[0].endswith("s") and int(usec[0][:-1]) >= 10


# -- socket activation ---------------------------------------------------------------------------

def test_socket_activation(short_tmp: Path) -> None:
    if shutil.which("systemd-socket-activate") is None:
        pytest.skip("systemd-socket-activate is not installed (apt-get install systemd)")
    sock_path = short_tmp / "fleetd.sock"
    state = short_tmp / "state"
    log = short_tmp / "activate.log"
    # The activator passes its children only the -E variables (plus LISTEN_*).
    argv = ["systemd-socket-activate", "-l", str(sock_path), "--fdname=fleetd",
            "-E", "PATH", "-E", f"PYTHONPATH={ROOT}", "-E", f"FLEETD_STATE_DIR={state}",
            sys.executable, "-m", "fleetd.main", "--socket", str(sock_path),
            "--state-dir", str(state), "--accel", "tcg", "--log-json"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=clean_env(),
                                cwd=ROOT, start_new_session=True)
    conn: Conn | None = None
    try:
        deadline = time.monotonic() + 10
        while b"Listening on" not in log.read_bytes():  # logged once listen() is done
            assert proc.poll() is None, log_tail(log)
            assert time.monotonic() < deadline, f"activator never listened:\n{log_tail(log)}"
            time.sleep(0.02)
        # Lazy: so far only the activator runs; fleetd runs from the first connection on.
        argv0 = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[0]
        assert argv0 == b"systemd-socket-activate", argv0
        conn = Conn(sock_path)
        greeting = conn.read()
        assert greeting["greeting"]["daemon"] == "fleetd", greeting
        info = conn.call(1, "info")
        assert info["daemon"] == "fleetd"
        assert info["pid"] == proc.pid  # the activator exec'd fleetd in place (LISTEN_PID)
        assert conn.call(2, "daemon_stop", stop_guests=True) == {"ok": True}
        conn.close()
        conn = None
        try:
            rc = proc.wait(20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"fleetd did not exit after daemon_stop:\n{log_tail(log)}")
        assert rc == 0, log_tail(log)
        text = log.read_text(errors="replace")
        assert '"activated": true' in text, text
        # fleetd never unlinks a socket it was given: the path belongs to the activator/unit.
        assert sock_path.exists()
    finally:
        if conn is not None:
            conn.close()
        stop_process(proc)
    assert proc.poll() is not None
    assert not qemu_pids(str(short_tmp) + "/")


# -- sd_notify from the real daemon --------------------------------------------------------------

class NotifyReceiver:
    """A bound datagram socket recording (time, fields) for each notification."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.got: list[tuple[float, dict[str, str]]] = []

    def _receive(self, until: float) -> dict[str, str] | None:
        """One datagram's fields (recorded), or None at ``until``."""
        left = until - time.monotonic()
        if left <= 0:
            return None
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.got.append((time.monotonic(), fields))
        return fields

    def wait_for(self, key: str, value: str, timeout: float) -> dict[str, str]:
        """Receive until a datagram carries ``key=value``; return its fields."""
        for _, fields in self.got:
            if fields.get(key) == value:
                return fields
        deadline = time.monotonic() + timeout
        while (fields := self._receive(deadline)) is not None:
            if fields.get(key) == value:
                return fields
        raise AssertionError(f"no {key}={value} in {timeout}s; got {self.got}")

    def collect(self, seconds: float) -> None:
        """Record whatever arrives for ``seconds``."""
        deadline = time.monotonic() + seconds
        while self._receive(deadline) is not None:
            pass

    def close(self) -> None:
        self.sock.close()


def test_daemon_speaks_sd_notify(short_tmp: Path) -> None:
    notify_path = short_tmp / "notify.sock"
    sock_path = short_tmp / "fleetd.sock"
    state = short_tmp / "state"
    log = short_tmp / "fleetd.log"
    rx = NotifyReceiver(notify_path)
    # WATCHDOG_PID deliberately unset: systemd does not always set it.
    env = clean_env(NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="400000")
    argv = [sys.executable, "-m", "fleetd.main", "--socket", str(sock_path),
            "--state-dir", str(state), "--accel", "tcg", "--log-json"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
    try:
        try:
            ready = rx.wait_for("READY", "1", timeout=15)
        except AssertionError as err:
            raise AssertionError(f"{err}\n(is fleetd.sdnotify.Notifier wired into "
                                 f"Daemon.run?)\n{log_tail(log)}") from None
        assert "STATUS" in ready, ready
        assert re.match(r"\d+ guests?: ", ready["STATUS"]), ready
        ready_at = time.monotonic()
        # Petting at half of WATCHDOG_USEC: every 0.2 s.
        rx.collect(1.3)
        pets = [t for t, f in rx.got if f.get("WATCHDOG") == "1" and t >= ready_at]
        assert 3 <= len(pets) <= 10, rx.got
        gaps = [b - a for a, b in zip(pets, pets[1:])]
        assert 0.1 <= statistics.median(gaps) <= 0.35, gaps
        assert proc.poll() is None, log_tail(log)
        conn = Conn(sock_path)
        try:
            conn.read()  # greeting
            assert conn.call(1, "daemon_stop", stop_guests=True) == {"ok": True}
        finally:
            conn.close()
        rx.wait_for("STOPPING", "1", timeout=10)
        try:
            rc = proc.wait(20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"fleetd did not exit after daemon_stop:\n{log_tail(log)}")
        assert rc == 0, log_tail(log)
        stopping_at = next(t for t, f in rx.got if f.get("STOPPING") == "1")
        assert all(t <= stopping_at for t, f in rx.got if f.get("READY") == "1")
    finally:
        stop_process(proc)
        rx.close()
    assert not qemu_pids(str(short_tmp) + "/")
