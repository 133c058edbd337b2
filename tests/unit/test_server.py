"""The control server on a real Unix socket, with a small Handlers written here."""

from __future__ import annotations

import json
import os
import socket
import stat
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from pydantic import BaseModel

from fleetd.errors import ConflictError, FleetError, NotFoundError, SpecError
from fleetd.protocol import (
    MAX_LINE,
    LogsResult,
    NamesResult,
    OkResult,
    PsResult,
    ReplicaInfo,
)
from fleetd.server import (
    AccessPolicy,
    ControlServer,
    Peer,
    Streaming,
    denial_message,
    peer_credentials,
    peer_groups,
    peer_role,
    proc_groups,
)

ROOT = os.geteuid() == 0
NOBODY = 65534


def replica(name: str = "web-0") -> ReplicaInfo:
    return ReplicaInfo(name=name, fleet="web", index=0, state="running", health="healthy",
                       cpus=2, host_cpus=[[0], [1]])


class FakeHandlers:
    """Enough of a daemon to exercise the transport."""

    def __init__(self) -> None:
        self.peers: list[Peer] = []
        self.console_input: list[str] = []
        self.stream_closed = anyio.Event()
        self.in_flight = 0
        self.max_in_flight = 0
        self.stopped: list[str] = []

    async def dispatch(self, request: Any, peer: Peer) -> BaseModel | Streaming:
        self.peers.append(peer)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._dispatch(request)
        finally:
            self.in_flight -= 1

    async def _dispatch(self, request: Any) -> BaseModel | Streaming:
        p = request.params
        match request.method:
            case "ps":
                return PsResult(replicas=[replica(t) for t in p.targets] or [replica()])
            case "inspect":
                if p.name == "boom":
                    raise RuntimeError("secret-payload-do-not-leak")
                if p.name == "group":
                    async with anyio.create_task_group():
                        raise NotFoundError("no replica 'group'")
                raise NotFoundError(f"no replica {p.name!r}", name=p.name)
            case "stop":
                await anyio.sleep(0.5 if "slow" in p.targets else 0.01)
                self.stopped += p.targets
                return NamesResult(done=list(p.targets))
            case "plan":
                return OkResult()  # the wrong result type: a handler bug
            case "console":
                return Streaming(OkResult(), self._console(big=p.name == "big"))
            case "console_input":
                self.console_input.append(p.data)
                return OkResult()
            case "logs":
                result = LogsResult(name=p.name, lines=["old line"])
                if not p.follow:
                    return result
                return Streaming(result, self._logs(p.name, p.tail))
        raise FleetError(f"{request.method}: not in the fake")

    async def _console(self, *, big: bool) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        try:
            n = 0
            while True:
                yield "console", {"vm": "web-0", "data": ("x" * 65536) if big else f"chunk{n}"}
                n += 1
                await anyio.sleep(0 if big else 0.01)
        finally:
            self.stream_closed.set()

    async def _logs(self, name: str, tail: int) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        for i in range(3):
            yield "log", {"vm": name, "line": f"line {i}"}
        if tail == 7:
            raise NotFoundError(f"{name} was removed")


class Conn:
    """A raw protocol client for tests."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.buf = BufferedByteReceiveStream(stream)
        self.events: list[dict[str, Any]] = []

    async def msg(self) -> dict[str, Any]:
        with anyio.fail_after(10):
            return json.loads(await self.buf.receive_until(b"\n", 4 * MAX_LINE))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send(data)

    async def send(self, rid: Any, method: str, **params: Any) -> None:
        await self.send_raw(json.dumps({"id": rid, "method": method, "params": params}).encode()
                            + b"\n")

    async def reply(self, rid: Any) -> dict[str, Any]:
        while True:
            m = await self.msg()
            if "event" in m:
                self.events.append(m)
            elif m.get("id") == rid:
                return m

    async def call(self, rid: Any, method: str, **params: Any) -> dict[str, Any]:
        await self.send(rid, method, **params)
        return await self.reply(rid)

    async def eof(self) -> bool:
        with anyio.fail_after(10):
            try:
                while True:
                    await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return True


@asynccontextmanager
async def connect(path: Path) -> AsyncIterator[Conn]:
    stream = await anyio.connect_unix(path)
    async with stream:
        conn = Conn(stream)
        greeting = await conn.msg()
        assert greeting["greeting"]["daemon"] == "fleetd"
        yield conn


@asynccontextmanager
async def serving(server: ControlServer) -> AsyncIterator[ControlServer]:
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        yield server
        tg.cancel_scope.cancel()


def admin_policy() -> AccessPolicy:
    return AccessPolicy(daemon_uid=os.geteuid())


async def wait_for(pred: Any, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not pred():
            await anyio.sleep(0.01)


@pytest.fixture
def sock_path(short_tmp: Path) -> Path:
    return short_tmp / "run" / "fleetd.sock"


# -- roles (pure) --------------------------------------------------------------------------------

@pytest.mark.parametrize(("uid", "gid", "groups", "role"), [
    (0, 0, frozenset(), "admin"),
    (1000, 1000, frozenset(), "admin"),            # the daemon's own user
    (2000, 500, frozenset(), "control"),           # primary group
    (2000, 2000, frozenset({500}), "control"),     # supplementary group
    (2000, 2000, frozenset({500, 600}), "control"),  # control wins over readonly
    (2000, 600, frozenset(), "readonly"),
    (2000, 2000, frozenset({600}), "readonly"),
    (2000, 2000, frozenset({700}), None),
])
def test_peer_role(uid: int, gid: int, groups: frozenset[int], role: str | None) -> None:
    policy = AccessPolicy(daemon_uid=1000, control_gid=500, readonly_gid=600)
    assert peer_role(uid, gid, groups, policy) == role


def test_peer_role_without_groups_configured() -> None:
    policy = AccessPolicy(daemon_uid=1000)
    assert peer_role(2000, 0, frozenset({0}), policy) is None
    msg = denial_message(2000, policy)
    assert msg.startswith("uid 2000 is not allowed to use fleetd (not root")
    assert "no control group is configured" in msg


def test_denial_message_names_groups() -> None:
    msg = denial_message(4242, AccessPolicy(daemon_uid=1000, control_gid=0, readonly_gid=NOBODY))
    assert "uid 4242" in msg and "gid 0" in msg and f"gid {NOBODY}" in msg and "\n" not in msg


def test_access_policy_resolve_unknown_group() -> None:
    with pytest.raises(SpecError, match="control_group: group 'no-such-group-xyz' does not exist"):
        AccessPolicy.resolve(control_group="no-such-group-xyz")
    assert AccessPolicy.resolve(readonly_group="0", daemon_uid=5).readonly_gid == 0


def test_credentials_and_groups_of_a_socketpair() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        pid, uid, gid = peer_credentials(a)
        assert (pid, uid, gid) == (os.getpid(), os.geteuid(), os.getegid())
        assert peer_groups(a, pid) == frozenset(os.getgroups())
    assert proc_groups(os.getpid()) == frozenset(os.getgroups())
    assert proc_groups(0) == frozenset()
    assert proc_groups(2**22 + 12345) == frozenset()  # no such process


# -- the wire ------------------------------------------------------------------------------------

@pytest.mark.anyio
async def test_greeting_and_reply_ids(sock_path: Path) -> None:
    handlers = FakeHandlers()
    async with serving(ControlServer(handlers, sock_path, access=admin_policy())) as server:
        async with connect(sock_path) as c:
            await c.send(7, "ps", targets=["a-1"])
            await c.send("x-y", "ps", targets=["b-2"])
            first, second = await c.msg(), await c.msg()  # in order
            assert first["id"] == 7 and first["result"]["replicas"][0]["name"] == "a-1"
            assert second["id"] == "x-y" and second["result"]["replicas"][0]["name"] == "b-2"
            assert server.connections == 1
        peer = handlers.peers[0]
        assert (peer.pid, peer.uid, peer.role) == (os.getpid(), os.geteuid(), "admin")
        await wait_for(lambda: server.connections == 0)


@pytest.mark.anyio
async def test_errors_keep_the_connection_usable(sock_path: Path) -> None:
    async with serving(ControlServer(FakeHandlers(), sock_path, access=admin_policy())):
        async with connect(sock_path) as c:
            await c.send_raw(b"{not json\n")
            m = await c.msg()
            assert m["id"] is None and m["error"]["code"] == "protocol_error"
            assert m["error"]["message"].startswith("invalid JSON")

            await c.send_raw(b"\n   \n")  # blank lines are ignored
            m = await c.call(2, "frobnicate")
            assert m["error"]["code"] == "protocol_error"
            assert m["error"]["message"] == "unknown method 'frobnicate'"

            m = await c.call(3, "ps", targets=["../x"])
            assert m["error"]["code"] == "protocol_error" and "targets.0" in m["error"]["message"]

            m = await c.call(4, "inspect", name="nope")
            assert m["error"] == {"code": "not_found", "message": "no replica 'nope'",
                                  "data": {"name": "nope"}}

            m = await c.call(5, "inspect", name="group")  # wrapped in an exception group
            assert m["error"]["code"] == "not_found"

            m = await c.call(6, "inspect", name="boom")
            assert m["error"] == {"code": "internal", "message": "internal error: RuntimeError",
                                  "data": {}}
            assert "secret" not in json.dumps(m)

            m = await c.call(8, "plan", replicas=1, cpus=1)
            assert m["error"]["code"] == "internal"

            m = await c.call(9, "ps")
            assert m["result"]["replicas"][0]["name"] == "web-0"


@pytest.mark.anyio
async def test_requests_on_one_connection_run_one_at_a_time(sock_path: Path) -> None:
    handlers = FakeHandlers()
    async with serving(ControlServer(handlers, sock_path, access=admin_policy())):
        async with connect(sock_path) as c:
            for i in range(10):
                await c.send(i, "stop", targets=[f"w-{i}"])
            for i in range(10):
                m = await c.msg()
                assert m["id"] == i and m["result"]["done"] == [f"w-{i}"]
    assert handlers.max_in_flight == 1


@pytest.mark.anyio
async def test_too_long_line_is_refused_and_others_are_served(sock_path: Path) -> None:
    async with serving(ControlServer(FakeHandlers(), sock_path, access=admin_policy())) as server:
        async with connect(sock_path) as big, connect(sock_path) as other:
            async def flood() -> None:
                try:
                    await big.send_raw(b'{"id":1,"method":"ps","params":{"x":"' + b"a" * (2 * MAX_LINE))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass  # the server hung up on us mid-line: expected

            async with anyio.create_task_group() as tg:
                tg.start_soon(flood)
                m = await big.msg()
                assert m == {"id": None, "error": {"code": "protocol_error",
                                                   "message": "line too long (> 1048576 bytes)",
                                                   "data": {"reason": "too_long"}}}
                assert await big.eof()
            m = await other.call(1, "ps")
            assert "result" in m
        async with connect(sock_path) as again:
            assert "result" in await again.call(1, "ps")
        await wait_for(lambda: server.connections == 0)


@pytest.mark.anyio
async def test_line_at_the_limit_is_read(sock_path: Path) -> None:
    async with serving(ControlServer(FakeHandlers(), sock_path, access=admin_policy())):
        async with connect(sock_path) as c:
            head = b'{"id":1,"method":"ps","params":{"targets":["a"]},"pad":"'
            line = head + b"p" * (MAX_LINE - len(head) - 2) + b'"}'
            assert len(line) == MAX_LINE
            await c.send_raw(line + b"\n")
            m = await c.msg()
            assert m["id"] == 1 and m["error"]["message"] == "ps: pad: unknown field"


@pytest.mark.anyio
async def test_stream_then_end_then_more_requests(sock_path: Path) -> None:
    async with serving(ControlServer(FakeHandlers(), sock_path, access=admin_policy())):
        async with connect(sock_path) as c:
            m = await c.call(1, "logs", name="web-0", follow=True)
            assert m["result"] == {"name": "web-0", "lines": ["old line"]}
            got = [await c.msg() for _ in range(4)]
            assert [g["event"] for g in got] == ["log", "log", "log", "end"]
            assert got[0]["data"] == {"vm": "web-0", "line": "line 0"}
            assert (await c.call(2, "ps"))["result"]["replicas"]
            # a second stream on the same connection, now that the first ended
            m = await c.call(3, "logs", name="web-1", follow=True, tail=7)
            got = [await c.msg() for _ in range(5)]
            assert [g["event"] for g in got] == ["log", "log", "log", "error", "end"]
            assert got[3]["data"]["code"] == "not_found"


@pytest.mark.anyio
async def test_console_input_while_streaming(sock_path: Path) -> None:
    handlers = FakeHandlers()
    async with serving(ControlServer(handlers, sock_path, access=admin_policy())):
        async with connect(sock_path) as c:
            m = await c.call(1, "console", name="web-0")
            assert m["result"] == {"ok": True}
            assert (await c.msg())["event"] == "console"
            m = await c.call(2, "console_input", name="web-0", data="aGkK")
            assert m["result"] == {"ok": True}
            assert handlers.console_input == ["aGkK"]
            # a second stream on a streaming connection is refused, the first goes on
            m = await c.call(3, "console", name="web-0")
            assert m["error"]["code"] == "conflict"
            assert (await c.msg())["event"] == "console"
            assert "result" in await c.call(4, "ps")
            assert all(e["event"] == "console" for e in c.events)
            assert (await c.msg())["event"] == "console"  # still streaming


@pytest.mark.anyio
async def test_client_disconnecting_mid_stream_closes_the_stream(sock_path: Path) -> None:
    handlers = FakeHandlers()
    async with serving(ControlServer(handlers, sock_path, access=admin_policy())) as server:
        async with connect(sock_path) as c:
            await c.call(1, "console", name="web-0")
            for _ in range(3):
                assert (await c.msg())["event"] == "console"
        with anyio.fail_after(5):
            await handlers.stream_closed.wait()
        await wait_for(lambda: server.connections == 0)
        async with connect(sock_path) as c:
            assert "result" in await c.call(1, "ps")


@pytest.mark.anyio
async def test_request_in_flight_finishes_when_a_streaming_client_leaves(sock_path: Path) -> None:
    handlers = FakeHandlers()
    async with serving(ControlServer(handlers, sock_path, access=admin_policy())) as server:
        async with connect(sock_path) as c:
            await c.call(1, "console", name="web-0")
            await c.send(2, "stop", targets=["slow"])
            await anyio.sleep(0.1)  # the stop is being handled
        # the stream notices first; the stop is not cut short by the disconnect
        with anyio.fail_after(5):
            await handlers.stream_closed.wait()
        await wait_for(lambda: server.connections == 0)
        assert handlers.stopped == ["slow"]


@pytest.mark.anyio
async def test_client_that_does_not_read_is_dropped(sock_path: Path) -> None:
    handlers = FakeHandlers()
    server = ControlServer(handlers, sock_path, access=admin_policy(), send_timeout=0.3)
    async with serving(server):
        stream = await anyio.connect_unix(sock_path)
        async with stream:
            await stream.send(b'{"id":1,"method":"console","params":{"name":"big"}}\n')
            with anyio.fail_after(10):
                await handlers.stream_closed.wait()  # the server gave up writing
            await wait_for(lambda: server.connections == 0)
        async with connect(sock_path) as c:
            assert "result" in await c.call(1, "ps")


@pytest.mark.anyio
async def test_fifty_concurrent_clients(sock_path: Path) -> None:
    handlers = FakeHandlers()
    async with serving(ControlServer(handlers, sock_path, access=admin_policy())) as server:
        results: dict[int, list[str]] = {}

        async def client(i: int) -> None:
            async with connect(sock_path) as c:
                names = []
                for j in range(5):
                    m = await c.call(j, "ps", targets=[f"c{i}-{j}"])
                    names.append(m["result"]["replicas"][0]["name"])
                results[i] = names

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(client, i)
        assert results == {i: [f"c{i}-{j}" for j in range(5)] for i in range(50)}
        await wait_for(lambda: server.connections == 0)


# -- binding -------------------------------------------------------------------------------------

@pytest.mark.anyio
async def test_socket_mode_and_cleanup(sock_path: Path) -> None:
    async with serving(ControlServer(FakeHandlers(), sock_path, access=admin_policy())):
        st = os.stat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
    assert not sock_path.exists()  # unlinked on the way out


@pytest.mark.anyio
async def test_stale_socket_is_replaced(sock_path: Path) -> None:
    sock_path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))  # bound, never listening: what a crashed daemon leaves
    stale.close()
    assert stat.S_ISSOCK(os.stat(sock_path).st_mode)
    async with serving(ControlServer(FakeHandlers(), sock_path, access=admin_policy())):
        async with connect(sock_path) as c:
            assert "result" in await c.call(1, "ps")


@pytest.mark.anyio
async def test_live_socket_is_not_stolen(sock_path: Path) -> None:
    async with serving(ControlServer(FakeHandlers(), sock_path, access=admin_policy())):
        ino = os.stat(sock_path).st_ino
        second = ControlServer(FakeHandlers(), sock_path, access=admin_policy())
        with pytest.raises(ConflictError, match=f"another fleetd is listening on {sock_path}$"):
            await second.serve()
        assert os.stat(sock_path).st_ino == ino
        async with connect(sock_path) as c:
            assert "result" in await c.call(1, "ps")


@pytest.mark.anyio
async def test_path_that_is_not_a_socket_is_refused(sock_path: Path) -> None:
    sock_path.parent.mkdir()
    sock_path.write_text("precious")
    server = ControlServer(FakeHandlers(), sock_path, access=admin_policy())
    with pytest.raises(ConflictError, match=f"{sock_path} exists and is not a socket"):
        await server.serve()
    assert sock_path.read_text() == "precious"


@pytest.mark.anyio
async def test_unknown_socket_group_is_named(sock_path: Path) -> None:
    server = ControlServer(FakeHandlers(), sock_path, access=admin_policy(),
                           socket_group="no-such-group-xyz")
    with pytest.raises(SpecError, match="group 'no-such-group-xyz' does not exist"):
        await server.serve()
    assert not sock_path.exists()


@pytest.mark.anyio
async def test_socket_group(sock_path: Path) -> None:
    if not ROOT:
        pytest.skip("chown to another group needs root")
    server = ControlServer(FakeHandlers(), sock_path, access=admin_policy(), socket_group="nogroup")
    async with serving(server):
        assert os.stat(sock_path).st_gid == NOBODY


@pytest.mark.anyio
async def test_socket_activation(short_tmp: Path) -> None:
    path = short_tmp / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    fd = listener.detach()  # the server owns it now, as with systemd's LISTEN_FDS
    server = ControlServer(FakeHandlers(), path, access=admin_policy(), listen_fd=fd)
    async with serving(server):
        async with connect(path) as c:
            assert "result" in await c.call(1, "ps")
    assert path.exists()  # not ours to unlink
    with pytest.raises(OSError):
        os.fstat(fd)  # but the fd was closed with the server


@pytest.mark.anyio
async def test_socket_activation_rejects_a_non_socket(short_tmp: Path) -> None:
    r, w = os.pipe()
    try:
        server = ControlServer(FakeHandlers(), short_tmp / "x.sock", access=admin_policy(),
                               listen_fd=r)
        with pytest.raises(FleetError, match=f"listen fd {r} is not a socket"):
            await server.serve()
    finally:
        os.close(r)
        os.close(w)


# -- authorisation on the socket -----------------------------------------------------------------

def _child(path: Path, requests: tuple[dict[str, Any], ...], wfd: int) -> None:
    """In a forked child: become nobody, talk to the server, report, _exit."""
    code = 1
    try:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(path))
        f = s.makefile("rwb")
        out: list[Any] = [json.loads(f.readline())]
        for req in requests:
            f.write(json.dumps(req).encode() + b"\n")
            f.flush()
            line = f.readline()
            out.append(json.loads(line) if line else "EOF")
        if not requests:
            out.append(f.readline().decode() or "EOF")
        os.write(wfd, json.dumps(out).encode())
        code = 0
    except BaseException as err:
        os.write(wfd, json.dumps({"child_error": repr(err)}).encode())
    finally:
        os._exit(code)


async def run_as_nobody(path: Path, *requests: dict[str, Any]) -> list[Any]:
    """Run a client as uid/gid 65534 (a forked child; the server keeps running here)."""
    rfd, wfd = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        _child(path, requests, wfd)
    os.close(wfd)

    def collect() -> tuple[bytes, int]:
        chunks = []
        while chunk := os.read(rfd, 65536):
            chunks.append(chunk)
        os.close(rfd)
        return b"".join(chunks), os.waitpid(pid, 0)[1]

    data, status = await anyio.to_thread.run_sync(collect)
    result = json.loads(data)
    assert status == 0, result
    return result


def open_to_nobody(short_tmp: Path) -> None:
    os.chmod(short_tmp, 0o755)


@pytest.mark.anyio
async def test_readonly_peer_is_refused_control_methods(sock_path: Path, short_tmp: Path) -> None:
    handlers = FakeHandlers()
    if not ROOT:  # our own uid is not the "daemon's", our group is the read-only group
        policy = AccessPolicy(daemon_uid=os.geteuid() + 1, readonly_gid=os.getgid())
        async with serving(ControlServer(handlers, sock_path, access=policy)):
            async with connect(sock_path) as c:
                assert "result" in await c.call(1, "ps")
                m = await c.call(2, "stop", targets=["web-0"])
                assert m["error"]["code"] == "permission_denied"
        return
    open_to_nobody(short_tmp)
    policy = AccessPolicy(daemon_uid=0, readonly_gid=NOBODY)
    async with serving(ControlServer(handlers, sock_path, access=policy, socket_group=NOBODY)):
        greeting, ps, stop, ps2 = await run_as_nobody(
            sock_path, {"id": 1, "method": "ps", "params": {}},
            {"id": 2, "method": "stop", "params": {"targets": ["web-0"]}},
            {"id": 3, "method": "ps", "params": {}})
    assert "greeting" in greeting
    assert ps["id"] == 1 and "result" in ps
    assert stop["id"] == 2 and stop["error"]["code"] == "permission_denied"
    assert stop["error"]["message"] == ("stop: permission denied (uid 65534 has read-only "
                                        "access)")
    assert "result" in ps2
    assert {(p.uid, p.role) for p in handlers.peers} == {(NOBODY, "readonly")}


@pytest.mark.anyio
async def test_other_uid_is_refused(sock_path: Path, short_tmp: Path) -> None:
    if not ROOT:
        pytest.skip("connecting as another uid needs root (setuid in a child)")
    open_to_nobody(short_tmp)
    handlers = FakeHandlers()
    policy = AccessPolicy(daemon_uid=0, control_gid=0)
    async with serving(ControlServer(handlers, sock_path, access=policy, socket_group=NOBODY)) as s:
        first, rest = await run_as_nobody(sock_path)
        await wait_for(lambda: s.connections == 0)
    assert first["id"] is None and first["error"]["code"] == "permission_denied"
    assert first["error"]["message"].startswith(
        "uid 65534 is not allowed to use fleetd (not root, not the daemon's user uid 0, "
        "not in group root (gid 0))")
    assert rest == "EOF"
    assert handlers.peers == []
