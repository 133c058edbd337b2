"""fleetd.sdnotify against real AF_UNIX datagram sockets (path and abstract namespace)."""

from __future__ import annotations

import errno
import os
import socket
import statistics
import subprocess
import sys
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import anyio
import pytest

from fleetd.sdnotify import (
    SYSTEMD_VARIABLES,
    Notifier,
    guest_status,
    listen_fds,
    listen_fds_with_names,
    without_systemd_variables,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def receiver(short_tmp: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd's notification socket."""
    path = str(short_tmp / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    try:
        yield sock, path
    finally:
        sock.close()


def env_for(path: str, **extra: str) -> dict[str, str]:
    return {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000",
            "WATCHDOG_PID": str(os.getpid()), **extra}


def drain(sock: socket.socket) -> list[bytes]:
    """Every datagram already queued on ``sock``."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2.0)
    return out


# -- sending -------------------------------------------------------------------------------------

def test_datagrams_arrive_exactly(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    with Notifier(env_for(path)) as n:
        assert n.enabled
        assert n.ready()
        assert sock.recv(4096) == b"READY=1\n"
        assert n.ready("8 guests: 8 running, 0 backoff, 0 failed")
        assert sock.recv(4096) == b"READY=1\nSTATUS=8 guests: 8 running, 0 backoff, 0 failed\n"
        assert n.status("7 guests: 6 running, 1 backoff, 0 failed")
        assert sock.recv(4096) == b"STATUS=7 guests: 6 running, 1 backoff, 0 failed\n"
        assert n.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1\n"
        assert n.stopping()
        assert sock.recv(4096) == b"STOPPING=1\n"
        assert n.stopping("detaching from 8 guests")
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=detaching from 8 guests\n"
        assert n.extend_timeout(1.5)
        assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=1500000\n"
        assert n.last_error is None
    assert drain(sock) == []


def test_fields_in_order_one_datagram_newlines_flattened(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    with Notifier(env_for(path)) as n:
        assert n.notify(STATUS="two\nlines", MAINPID=42, READY=1)
        assert sock.recv(4096) == b"STATUS=two lines\nMAINPID=42\nREADY=1\n"
        assert not n.notify()  # nothing to say: nothing sent
    assert drain(sock) == []


def test_reloading_carries_monotonic_usec(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    with Notifier(env_for(path)) as n:
        assert n.reloading()
    lines = sock.recv(4096).decode().splitlines()
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC" and int(value) > 0


def test_status_not_resent_when_unchanged(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    with Notifier(env_for(path)) as n:
        assert n.ready("1 guest: 1 running, 0 backoff, 0 failed")
        assert n.status("1 guest: 1 running, 0 backoff, 0 failed")  # same as READY's: not sent
        assert n.status("2 guests: 2 running, 0 backoff, 0 failed")
        assert n.status("2 guests: 2 running, 0 backoff, 0 failed")
    assert drain(sock) == [b"READY=1\nSTATUS=1 guest: 1 running, 0 backoff, 0 failed\n",
                           b"STATUS=2 guests: 2 running, 0 backoff, 0 failed\n"]


def test_abstract_namespace_socket() -> None:
    name = f"fleetd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    try:
        sock.bind(b"\0" + name.encode())
        with Notifier({"NOTIFY_SOCKET": "@" + name}) as n:
            assert n.enabled
            assert n.ready("up")
            assert n.stopping()
        assert sock.recv(4096) == b"READY=1\nSTATUS=up\n"
        assert sock.recv(4096) == b"STOPPING=1\n"
    finally:
        sock.close()


def test_default_env_is_the_process_environment(receiver: tuple[socket.socket, str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with Notifier() as n:
        assert n.enabled and n.watchdog_interval is None
        assert n.ready()
    assert sock.recv(4096) == b"READY=1\n"


# -- disabled and failing ------------------------------------------------------------------------

@pytest.mark.anyio
async def test_no_notify_socket_every_call_is_a_no_op() -> None:
    for env in ({}, {"NOTIFY_SOCKET": ""}, {"WATCHDOG_USEC": "200000",
                                            "WATCHDOG_PID": str(os.getpid())}):
        with Notifier(env) as n:
            assert not n.enabled
            assert n.watchdog_interval is None
            assert not n.ready()
            assert not n.ready("x")
            assert not n.status("x")
            assert not n.watchdog()
            assert not n.stopping()
            assert not n.reloading()
            assert not n.notify(READY=1)
            assert n.last_error is None
            with anyio.fail_after(1):
                await n.run_watchdog()  # returns at once


def test_socket_pointing_to_nothing_returns_false(short_tmp: Path) -> None:
    with Notifier({"NOTIFY_SOCKET": str(short_tmp / "nobody.sock")}) as n:
        assert n.enabled
        assert not n.ready()
        assert isinstance(n.last_error, FileNotFoundError)
        assert not n.status("x")
        assert not n.stopping()


def test_bound_then_closed_socket_returns_false(short_tmp: Path) -> None:
    path = str(short_tmp / "gone.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.close()  # the file stays, nobody receives
    with Notifier(env_for(path)) as n:
        assert not n.ready()
        assert isinstance(n.last_error, ConnectionRefusedError)
        assert not n.watchdog()


def test_abstract_socket_pointing_to_nothing_returns_false() -> None:
    with Notifier({"NOTIFY_SOCKET": f"@fleetd-nobody-{uuid.uuid4().hex}"}) as n:
        assert not n.ready()
        assert isinstance(n.last_error, ConnectionRefusedError)


@pytest.mark.parametrize("value", ["relative/notify.sock", "@", "vsock:2:1234"])
def test_unsupported_address_is_disabled(value: str) -> None:
    with Notifier({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "200000"}) as n:
        assert not n.enabled
        assert n.watchdog_interval is None
        assert not n.ready()
        assert isinstance(n.last_error, OSError)


def test_too_long_path_returns_false() -> None:
    with Notifier({"NOTIFY_SOCKET": "/" + "x" * 200}) as n:
        assert not n.ready()
        assert isinstance(n.last_error, OSError)


def test_full_queue_does_not_block(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver  # never read: the receive queue fills up
    with Notifier(env_for(path)) as n:
        for i in range(100_000):
            if not n.status(f"filling {i}"):
                break
        else:
            pytest.fail("100000 datagrams queued on a socket nobody reads")
        assert isinstance(n.last_error, BlockingIOError)
        assert n.last_error.errno == errno.EAGAIN
        drain(sock)
        assert n.ready()  # the queue drained: sending works again


# -- watchdog ------------------------------------------------------------------------------------

def test_watchdog_interval_is_half_of_watchdog_usec(short_tmp: Path) -> None:
    path = str(short_tmp / "n.sock")
    cases = {
        ("200000", str(os.getpid())): 0.1,
        ("200000", None): 0.1,                      # systemd does not always set WATCHDOG_PID
        ("30000000", str(os.getpid())): 15.0,
        ("200000", str(os.getpid() + 1)): None,     # another process's watchdog
        ("200000", "garbage"): None,
        ("0", None): None,
        ("-5", None): None,
        ("abc", None): None,
        (None, str(os.getpid())): None,
    }
    for (usec, pid), want in cases.items():
        env = {"NOTIFY_SOCKET": path}
        if usec is not None:
            env["WATCHDOG_USEC"] = usec
        if pid is not None:
            env["WATCHDOG_PID"] = pid
        with Notifier(env) as n:
            assert n.watchdog_interval == want, (usec, pid)


async def _collect(sock: socket.socket, stamps: list[tuple[float, bytes]]) -> None:
    sock.setblocking(False)
    while True:
        await anyio.wait_readable(sock)
        try:
            while True:
                stamps.append((anyio.current_time(), sock.recv(4096)))
        except BlockingIOError:
            pass


@pytest.mark.anyio
async def test_run_watchdog_pets_at_half_the_interval(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    stamps: list[tuple[float, bytes]] = []
    with Notifier(env_for(path)) as n:
        assert n.watchdog_interval == pytest.approx(0.1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_collect, sock, stamps)
            await tg.start(n.run_watchdog)
            await anyio.sleep(0.55)
            tg.cancel_scope.cancel()
    assert all(d == b"WATCHDOG=1\n" for _, d in stamps), stamps
    # One pet at once, then one every 0.1 s: about 6 in 0.55 s (sane range, not exact timing).
    assert 4 <= len(stamps) <= 8, len(stamps)
    gaps = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    assert 0.07 <= statistics.median(gaps) <= 0.2, gaps


@pytest.mark.anyio
async def test_run_watchdog_other_pid_sends_nothing(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    with Notifier(env_for(path, WATCHDOG_PID=str(os.getpid() + 1))) as n:
        assert n.watchdog_interval is None
        assert not n.watchdog()
        with anyio.fail_after(1):
            await n.run_watchdog()  # returns at once
        assert n.ready()  # notifications still work; only the watchdog is not ours
    assert drain(sock) == [b"READY=1\n"]


@pytest.mark.anyio
async def test_unhealthy_daemon_stops_petting(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    stamps: list[tuple[float, bytes]] = []
    healthy = True
    with Notifier(env_for(path)) as n:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_collect, sock, stamps)
            await tg.start(partial(n.run_watchdog, healthy=lambda: healthy))
            await anyio.sleep(0.35)
            healthy = False
            wedged_at = anyio.current_time()
            await anyio.sleep(0.5)
            tg.cancel_scope.cancel()
    before = [t for t, _ in stamps if t < wedged_at]
    after = [t for t, _ in stamps if t >= wedged_at + 0.02]
    assert len(before) >= 2, stamps
    assert after == [], stamps


@pytest.mark.anyio
async def test_health_check_that_raises_counts_as_unhealthy(
        receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver

    def broken() -> bool:
        raise RuntimeError("health check bug")

    with Notifier(env_for(path)) as n:
        with anyio.move_on_after(0.35):
            await n.run_watchdog(healthy=broken)
    assert drain(sock) == []


@pytest.mark.anyio
async def test_run_watchdog_never_raises_when_systemd_is_gone(short_tmp: Path) -> None:
    path = str(short_tmp / "gone.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.close()
    with Notifier(env_for(path)) as n:
        with anyio.move_on_after(0.35) as scope:
            await n.run_watchdog()
        assert scope.cancelled_caught
        assert isinstance(n.last_error, ConnectionRefusedError)


# -- socket activation ---------------------------------------------------------------------------

def test_listen_fds_parsing() -> None:
    pid = 4242  # not ours: nothing is done to fds 3.. of this process
    assert listen_fds({"LISTEN_PID": "4242", "LISTEN_FDS": "1"}, pid) == [3]
    assert listen_fds({"LISTEN_PID": "4242", "LISTEN_FDS": "3"}, pid) == [3, 4, 5]
    assert listen_fds({"LISTEN_PID": "4243", "LISTEN_FDS": "1"}, pid) == []   # someone else's
    assert listen_fds({"LISTEN_FDS": "1"}, pid) == []                         # no LISTEN_PID
    assert listen_fds({"LISTEN_PID": "4242"}, pid) == []
    for bad in ("0", "-1", "x", ""):
        assert listen_fds({"LISTEN_PID": "4242", "LISTEN_FDS": bad}, pid) == []
    assert listen_fds({"LISTEN_PID": "x", "LISTEN_FDS": "1"}, pid) == []
    assert listen_fds({}) == []


def test_listen_fds_with_names() -> None:
    env = {"LISTEN_PID": "7", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "fleetd:metrics"}
    assert listen_fds_with_names(env, 7) == [(3, "fleetd"), (4, "metrics")]
    assert listen_fds_with_names({**env, "LISTEN_FDNAMES": "fleetd"}, 7) == [
        (3, "unknown"), (4, "unknown")]                 # wrong count: names ignored
    assert listen_fds_with_names({"LISTEN_PID": "7", "LISTEN_FDS": "1"}, 7) == [(3, "unknown")]


def test_listen_fds_defaults_to_our_pid_and_marks_fds_cloexec() -> None:
    """In a child (fds 3.. of this process are pytest's): fd 3 is a real listening socket."""
    code = (
        "import os, socket\n"
        "from fleetd.sdnotify import listen_fds, listen_fds_with_names\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        "if s.fileno() != 3:\n"
        "    os.dup2(s.fileno(), 3)\n"
        "os.set_inheritable(3, True)  # as systemd passes it\n"
        "env = {'LISTEN_PID': str(os.getpid()), 'LISTEN_FDS': '1', 'LISTEN_FDNAMES': 'fleetd'}\n"
        "os.environ.update(env)\n"
        "assert listen_fds() == [3], listen_fds()\n"
        "assert listen_fds_with_names() == [(3, 'fleetd')]\n"
        "assert not os.get_inheritable(3)\n"
        "assert all(os.environ[k] == v for k, v in env.items())  # nothing unset\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_without_systemd_variables() -> None:
    env = {"PATH": "/usr/bin", "NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1",
           "WATCHDOG_PID": "1", "LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert without_systemd_variables(env) == {"PATH": "/usr/bin"}
    assert set(env) - {"PATH"} == set(SYSTEMD_VARIABLES)


def test_guest_status() -> None:
    assert guest_status([]) == "0 guests: 0 running, 0 backoff, 0 failed"
    assert guest_status(["running"]) == "1 guest: 1 running, 0 backoff, 0 failed"
    assert guest_status(["running"] * 8) == "8 guests: 8 running, 0 backoff, 0 failed"
    states = ["running", "backoff", "failed", "starting", "starting", "stopped"]
    assert guest_status(states) == ("6 guests: 1 running, 1 backoff, 1 failed, "
                                    "2 starting, 1 stopped")


def test_guest_status_takes_replica_states() -> None:
    from fleetd.supervisor import ReplicaState
    assert guest_status([ReplicaState.RUNNING, ReplicaState.BACKOFF]) == (
        "2 guests: 1 running, 1 backoff, 0 failed")
