"""The control server: newline-delimited JSON over a Unix socket (docs/api.md).

:class:`ControlServer` owns the transport only: binding (or adopting a
socket-activated fd), peer credentials and roles, framing with a bounded
line buffer, bounded writes, and streaming. What each method does is the
daemon's business: it hands every decoded request to a :class:`Handlers`
implementation.

Per connection:

1. the peer is identified with ``SO_PEERCRED`` (+ ``SO_PEERGROUPS``, or
   ``/proc/<pid>/status`` on older kernels) and given a role
   (:func:`peer_role`); a peer without a role gets one ``permission_denied``
   error and the connection is closed;
2. the greeting line is sent;
3. requests are read one line at a time and handled one at a time, in order;
   every request gets exactly one reply carrying its ``id``;
4. a handler may return :class:`Streaming`: the ok reply is sent, then the
   stream's events are pumped as ``{"event", "data"}`` lines *while* further
   requests on the same connection are still read and handled (that is how
   ``console_input`` reaches a console being streamed). When the stream ends
   the server sends ``{"event": "end", "data": {}}`` and the connection stays
   open for more requests. When the client goes away (or shuts down its
   write side) the stream iterator is closed. One stream per connection.

Limits: a request line longer than :data:`~fleetd.protocol.MAX_LINE` gets an
error and the connection is closed (at most that much is ever buffered); a
write that takes longer than ``send_timeout`` (a client that stopped reading)
drops the connection. A request being handled when its client leaves runs to
completion; only its reply is lost. Handler errors: :class:`FleetError` becomes
an error reply with its ``code``; anything else is logged with its traceback
and answered with code ``internal``.

Usage (structured: readiness through ``tg.start``)::

    server = ControlServer(handlers, path, access=AccessPolicy(os.geteuid(), gid, None))
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)     # returns once the socket accepts connections
        ...
        tg.cancel_scope.cancel()         # closes the listener, connections, unlinks the socket
"""

from __future__ import annotations

import errno
import grp
import itertools
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import anyio
import anyio.abc
from anyio.abc import TaskStatus
from pydantic import BaseModel

from fleetd.errors import (
    ConflictError,
    FleetError,
    InternalError,
    PermissionDeniedError,
    ProtocolError,
    SpecError,
    single_error,
)
from fleetd.log import get_logger
from fleetd.protocol import (
    MAX_LINE,
    READ_ONLY_METHODS,
    RESULTS,
    decode_request,
    error_reply,
    event_line,
    greeting_line,
    ok_reply,
)

Role = Literal["admin", "control", "readonly"]

#: Seconds one write to a client may take before the connection is dropped.
SEND_TIMEOUT = 10.0
#: Seconds a stream iterator gets to clean up after its client went away.
STREAM_CLOSE_TIMEOUT = 5.0
#: Linux ``SO_PEERGROUPS`` (4.13+); Python does not export the constant.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
#: Longest ``sun_path`` Linux accepts (108 bytes including the NUL).
MAX_SOCKET_PATH = 107
_RECV_CHUNK = 65536


# -- peers and roles ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Peer:
    """The process on the other end of a connection, as the kernel reports it."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]
    role: Role


@dataclass
class AccessPolicy:
    """Who may use the control socket.

    ``daemon_uid`` (and root) are admins; members of ``control_gid`` may call
    every method; members of ``readonly_gid`` only :data:`~fleetd.protocol.READ_ONLY_METHODS`.
    The socket file's own mode/group must also let those users connect.
    """

    daemon_uid: int
    control_gid: int | None = None
    readonly_gid: int | None = None

    @classmethod
    def resolve(cls, *, daemon_uid: int | None = None, control_group: str | int | None = None,
                readonly_group: str | int | None = None) -> AccessPolicy:
        """Build a policy from group names or ids (``daemon_uid`` defaults to our euid).

        Raises:
            SpecError: a named group does not exist.
        """
        return cls(daemon_uid=os.geteuid() if daemon_uid is None else daemon_uid,
                   control_gid=resolve_group(control_group, field="control_group"),
                   readonly_gid=resolve_group(readonly_group, field="readonly_group"))


def resolve_group(group: str | int | None, *, field: str = "socket_group") -> int | None:
    """A group name or id as a gid (None stays None).

    Raises:
        SpecError: naming the group when no group has that name.
    """
    if group is None or isinstance(group, int):
        return group
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError as err:
        raise SpecError(f"{field}: group {group!r} does not exist", field=field,
                        group=group) from err


def peer_role(uid: int, gid: int, groups: frozenset[int], policy: AccessPolicy) -> Role | None:
    """The role of a peer with these credentials, or None when it may not connect.

    Root and the daemon's own user are ``admin``; a member (primary or
    supplementary) of the control group is ``control``; of the read-only group
    ``readonly``.
    """
    if uid == 0 or uid == policy.daemon_uid:
        return "admin"
    member = groups | {gid}
    if policy.control_gid is not None and policy.control_gid in member:
        return "control"
    if policy.readonly_gid is not None and policy.readonly_gid in member:
        return "readonly"
    return None


def _group_label(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name} (gid {gid})"
    except KeyError:
        return f"gid {gid}"


def denial_message(uid: int, policy: AccessPolicy) -> str:
    """The one-line message a peer without a role gets."""
    groups = [_group_label(g) for g in (policy.control_gid, policy.readonly_gid) if g is not None]
    why = ("not in group " + " or ".join(groups)) if groups else "and no control group is configured"
    return (f"uid {uid} is not allowed to use fleetd (not root, not the daemon's user "
            f"uid {policy.daemon_uid}, {why})")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of a connected Unix-socket peer (``SO_PEERCRED``).

    Raises:
        OSError: the kernel would not say.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("iII", raw)
    return pid, uid, gid


def proc_groups(pid: int) -> frozenset[int]:
    """Supplementary groups of a process, from ``/proc/<pid>/status`` (empty if unreadable)."""
    if pid <= 0:
        return frozenset()
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:] if g.isdigit())
    except OSError:
        pass
    return frozenset()


def peer_groups(sock: socket.socket, pid: int) -> frozenset[int]:
    """Supplementary groups of the peer at ``connect()`` time.

    ``SO_PEERGROUPS`` when the kernel has it (no PID-reuse race), else
    ``/proc/<pid>/status``.
    """
    for count in (64, 65536):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * count)
        except OSError as err:
            if err.errno == errno.ERANGE:
                continue
            break
        return frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    return proc_groups(pid)


# -- handlers ----------------------------------------------------------------------------------

class Streaming:
    """A handler's answer for a streaming method: the reply, then events.

    ``events`` yields ``(kind, data)``; ``data`` must be JSON-serialisable. The
    server closes the iterator (``aclose``) when the client goes away.
    Raising :class:`FleetError` from it ends the stream with an ``error`` event.
    """

    __slots__ = ("events", "result")

    def __init__(self, result: BaseModel, events: AsyncIterator[tuple[str, dict[str, Any]]]) -> None:
        self.result = result
        self.events = events


class Handlers(Protocol):
    """What the daemon implements: one call per request."""

    async def dispatch(self, request: Any, peer: Peer) -> BaseModel | Streaming:
        """Handle one decoded request (a model from :data:`fleetd.protocol.REQUEST_MODELS`).

        Returns the method's result model (:data:`fleetd.protocol.RESULTS`), or
        :class:`Streaming` for subscriptions.

        Raises:
            FleetError: sent to the client as an error reply with the error's ``code``.
        """
        ...


# -- framing -----------------------------------------------------------------------------------

class _LineTooLong(Exception):
    pass


class _LineReader:
    """Reads ``\\n``-terminated lines, never buffering more than ``limit`` + one chunk."""

    def __init__(self, stream: anyio.abc.ByteReceiveStream, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self._buf = bytearray()
        self._scanned = 0

    async def readline(self) -> bytes | None:
        """The next line without its newline; None at end of stream.

        Raises:
            _LineTooLong: a line exceeds the limit (the reader is then unusable).
            anyio.BrokenResourceError: the connection broke.
        """
        while True:
            idx = self._buf.find(b"\n", self._scanned)
            if idx >= 0:
                line = bytes(self._buf[:idx])
                del self._buf[: idx + 1]
                self._scanned = 0
                if len(line) > self._limit:
                    raise _LineTooLong
                return line
            if len(self._buf) > self._limit:
                raise _LineTooLong
            self._scanned = len(self._buf)
            try:
                self._buf += await self._stream.receive(_RECV_CHUNK)
            except anyio.EndOfStream:
                return None  # a trailing partial line is dropped: its sender is gone


def _internal_reply(rid: Any, err: BaseException) -> bytes:
    return error_reply(rid, InternalError(f"internal error: {type(err).__name__}"))


def _fleet_error_in(err: Exception) -> FleetError | None:
    """The FleetError a handler raised, also when a task group wrapped it alone in a group."""
    if isinstance(err, ExceptionGroup):
        leaf = single_error(err)
        return leaf if isinstance(leaf, FleetError) else None
    return err if isinstance(err, FleetError) else None


async def _aclose(events: Any) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is None:
        return
    with anyio.move_on_after(STREAM_CLOSE_TIMEOUT, shield=True):
        try:
            await aclose()
        except Exception as err:
            get_logger(component="server").warning("server.stream_close_failed",
                                                    error=type(err).__name__)


# -- one connection ----------------------------------------------------------------------------

class _Connection:
    def __init__(self, server: ControlServer, stream: anyio.abc.SocketStream, peer: Peer,
                 log: Any) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.log = log
        self.send_lock = anyio.Lock()
        self.streaming = False
        self.tg: anyio.abc.TaskGroup | None = None
        self.pump_scope: anyio.CancelScope | None = None
        self.dispatching = False
        self.closing = False

    def close(self) -> None:
        """Close the connection; a request being handled finishes first (its reply is dropped)."""
        self.closing = True
        if self.pump_scope is not None:
            self.pump_scope.cancel()
        if not self.dispatching and self.tg is not None:
            self.tg.cancel_scope.cancel()

    async def send(self, data: bytes) -> bool:
        """Write one message; False (and the connection is closing) if the peer is gone or stuck."""
        if self.closing:
            return False
        try:
            with anyio.fail_after(self.server.send_timeout):
                async with self.send_lock:
                    await self.stream.send(data)
            return True
        except TimeoutError:
            self.log.warning("conn.send_timeout", timeout=self.server.send_timeout)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.log.debug("conn.peer_gone")
        self.close()
        return False

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self.tg = tg
            if await self.send(greeting_line()):
                tg.start_soon(self._read_loop)

    async def _read_loop(self) -> None:
        reader = _LineReader(self.stream, MAX_LINE)
        while True:
            try:
                line = await reader.readline()
            except _LineTooLong:
                self.log.warning("conn.line_too_long", limit=MAX_LINE)
                err = ProtocolError(f"line too long (> {MAX_LINE} bytes)", reason="too_long")
                await self.send(error_reply(None, err))
                self.close()
                return
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                line = None
            if line is None:
                self.log.debug("conn.eof")
                self.close()
                return
            if line.strip():
                await self._handle(line)
            if self.closing:
                self.close()
                return

    async def _handle(self, line: bytes) -> None:
        try:
            req = decode_request(line)
        except ProtocolError as err:
            field = err.fields.get("field")  # client-chosen text: never logged in full
            self.log.info("request.invalid", reason=err.fields.get("reason"),
                          method=err.fields.get("method"),
                          field=field[:80].encode("unicode_escape").decode()
                          if isinstance(field, str) else None)
            await self.send(error_reply(err.fields.get("id"), err))
            return
        reply, events = await self._call(req)
        if events is None:
            await self.send(reply)
        elif self.streaming:
            await _aclose(events)
            err = ConflictError(f"{req.method}: this connection is already streaming; "
                                "open another connection", method=req.method)
            await self.send(error_reply(req.id, err))
        elif not await self.send(reply):
            await _aclose(events)
        else:
            self.streaming = True
            assert self.tg is not None
            self.tg.start_soon(self._pump, events, req.method)

    async def _call(self, req: Any) -> tuple[bytes, AsyncIterator[tuple[str, dict[str, Any]]] | None]:
        """Authorise and dispatch one request: its reply line, and its events when streaming."""
        method = req.method
        if self.peer.role == "readonly" and method not in READ_ONLY_METHODS:
            self.log.info("request.denied", method=method, role=self.peer.role)
            return error_reply(req.id, PermissionDeniedError(
                f"{method}: permission denied (uid {self.peer.uid} has read-only access)",
                method=method)), None
        self.dispatching = True
        try:
            result = await self.server.handlers.dispatch(req, self.peer)
        except Exception as exc:
            fleet_err = _fleet_error_in(exc)
            if fleet_err is not None:
                self.log.info("request.failed", method=method, code=fleet_err.code)
                return error_reply(req.id, fleet_err), None
            self.log.error("request.crashed", method=method, error=type(exc).__name__,
                           exc_info=exc)
            return _internal_reply(req.id, exc), None
        finally:
            self.dispatching = False
        events = result.events if isinstance(result, Streaming) else None
        model = result.result if isinstance(result, Streaming) else result
        try:
            if not isinstance(model, RESULTS[method]):
                raise TypeError(f"{method} handler returned {type(model).__name__}, "
                                f"not {RESULTS[method].__name__}")
            return ok_reply(req.id, model), events
        except Exception as exc:  # a handler bug: wrong result type, or not serialisable
            self.log.error("request.bad_result", method=method, error=str(exc)[:200])
            if events is not None:
                await _aclose(events)
            return _internal_reply(req.id, exc), None

    async def _pump(self, events: AsyncIterator[tuple[str, dict[str, Any]]], method: str) -> None:
        with anyio.CancelScope() as self.pump_scope:
            await self._pump_events(events, method)
        self.pump_scope = None

    async def _pump_events(self, events: AsyncIterator[tuple[str, dict[str, Any]]],
                           method: str) -> None:
        try:
            try:
                async for kind, data in events:
                    if not await self.send(event_line(kind, data)):
                        return
            except Exception as exc:
                fleet_err = _fleet_error_in(exc)
                if fleet_err is not None:
                    self.log.info("stream.failed", method=method, code=fleet_err.code)
                    body = fleet_err.to_dict()
                else:
                    self.log.error("stream.crashed", method=method, error=type(exc).__name__,
                                   exc_info=exc)
                    body = {"code": "internal", "message": f"internal error: {type(exc).__name__}",
                            "data": {}}
                if not await self.send(event_line("error", body)):
                    return
            if await self.send(event_line("end", {})):
                self.streaming = False
        finally:
            await _aclose(events)


# -- the server --------------------------------------------------------------------------------

class ControlServer:
    """Serves the control API on a Unix socket; see the module docstring.

    ``listen_fd`` adopts an already-listening socket (systemd socket
    activation); the server then owns that fd but never unlinks its path.
    """

    def __init__(self, handlers: Handlers, path: Path, *, access: AccessPolicy,
                 socket_group: str | int | None = None, mode: int = 0o660,
                 listen_fd: int | None = None, log: Any = None,
                 send_timeout: float = SEND_TIMEOUT) -> None:
        self.handlers = handlers
        self.path = Path(path)
        self.access = access
        self.socket_group = socket_group
        self.mode = mode
        self.listen_fd = listen_fd
        self.send_timeout = send_timeout
        self.log = log if log is not None else get_logger(component="server")
        self._connections = 0
        self._ids = itertools.count(1)

    @property
    def connections(self) -> int:
        """Connections currently open."""
        return self._connections

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind (or adopt ``listen_fd``), report readiness, and accept until cancelled.

        Raises:
            ConflictError: another fleetd is listening on the path, or the path is not a socket.
            SpecError: ``socket_group`` names no group.
            FleetError: the socket cannot be created, bound or adopted.
        """
        created_ino: int | None = None
        if self.listen_fd is not None:
            sock = self._adopt(self.listen_fd)
        else:
            sock = self._bind()
            created_ino = os.stat(self.path).st_ino
        sock.setblocking(False)
        self.log.info("server.listening", path=str(self.path),
                      activated=self.listen_fd is not None)
        try:
            async with anyio.create_task_group() as tg:
                task_status.started()
                await self._accept_loop(sock, tg)
        finally:
            sock.close()
            if created_ino is not None:
                self._unlink_if_ours(created_ino)
            self.log.info("server.closed", path=str(self.path))

    async def _accept_loop(self, sock: socket.socket, tg: anyio.abc.TaskGroup) -> None:
        # Our own loop rather than anyio's UNIX listener/streams: connections are wrapped
        # as transport-backed streams (bounded reads and writes, no raw-socket reader
        # races on cancellation).
        while True:
            await anyio.wait_readable(sock)
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as err:  # EMFILE, ENFILE, ENOBUFS...: back off, keep serving
                self.log.warning("server.accept_failed", error=err.strerror or str(err))
                await anyio.sleep(0.1)
                continue
            tg.start_soon(self._connection, conn)

    # -- binding -----------------------------------------------------------------------------

    def _bind(self) -> socket.socket:
        path = self.path
        gid = resolve_group(self.socket_group)
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise FleetError(f"socket path too long ({len(os.fsencode(path))} > "
                             f"{MAX_SOCKET_PATH} bytes): {path}", path=str(path))
        try:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as err:
            raise FleetError(f"cannot create {path.parent}: {err.strerror}",
                             path=str(path.parent)) from err
        self._clear_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            try:
                sock.bind(str(path))
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise ConflictError(f"another fleetd is listening on {path}",
                                        path=str(path)) from err
                raise FleetError(f"cannot bind {path}: {err.strerror or err}",
                                 path=str(path)) from err
            bound = True
            try:
                os.chmod(path, self.mode)
                if gid is not None:
                    os.chown(path, -1, gid)
            except OSError as err:
                raise FleetError(f"cannot set mode/group of {path}: {err.strerror}",
                                 path=str(path), group=self.socket_group) from err
            sock.listen(128)
        except BaseException:
            sock.close()
            if bound:
                path.unlink(missing_ok=True)
            raise
        return sock

    def _clear_stale(self, path: Path) -> None:
        """Remove a socket file nobody listens on; refuse to touch anything else."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as err:
            raise FleetError(f"cannot stat {path}: {err.strerror}", path=str(path)) from err
        if not stat.S_ISSOCK(st.st_mode):
            raise ConflictError(f"{path} exists and is not a socket; refusing to replace it",
                                path=str(path))
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink(missing_ok=True)
            self.log.info("server.stale_socket_removed", path=str(path))
            return
        except FileNotFoundError:
            return
        except BlockingIOError as err:  # backlog full: very much alive
            raise ConflictError(f"another fleetd is listening on {path}", path=str(path)) from err
        except OSError as err:
            raise ConflictError(f"{path} exists and cannot be probed ({err.strerror}); remove it "
                                "if no fleetd is running", path=str(path)) from err
        finally:
            probe.close()
        raise ConflictError(f"another fleetd is listening on {path}", path=str(path))

    def _adopt(self, fd: int) -> socket.socket:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as err:
            raise FleetError(f"listen fd {fd} is not a socket: {err.strerror}", fd=fd) from err
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise FleetError(f"listen fd {fd} is not a Unix stream socket", fd=fd)
        return sock

    def _unlink_if_ours(self, ino: int) -> None:
        try:
            if os.stat(self.path).st_ino == ino:
                self.path.unlink()
        except OSError:
            pass

    # -- connections -------------------------------------------------------------------------

    async def _connection(self, conn: socket.socket) -> None:
        log = self.log.bind(conn=next(self._ids))
        self._connections += 1
        try:
            try:
                pid, uid, gid = peer_credentials(conn)
                groups = peer_groups(conn, pid)
                stream = await anyio.abc.SocketStream.from_socket(conn)
            except (OSError, ValueError) as err:
                conn.close()
                log.warning("conn.setup_failed", error=str(err))
                return
            async with stream:
                log = log.bind(pid=pid, uid=uid)
                role = peer_role(uid, gid, groups, self.access)
                if role is None:
                    log.warning("conn.refused")
                    err = PermissionDeniedError(denial_message(uid, self.access), uid=uid)
                    with anyio.move_on_after(self.send_timeout):
                        try:
                            await stream.send(error_reply(None, err))
                        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                            pass
                    return
                peer = Peer(pid=pid, uid=uid, gid=gid, groups=groups, role=role)
                log.debug("conn.open", role=role)
                await _Connection(self, stream, peer, log).run()
        except Exception as exc:  # a bug here must not take the listener down
            log.error("conn.crashed", error=type(exc).__name__, exc_info=exc)
        finally:
            self._connections -= 1
            log.debug("conn.closed")
