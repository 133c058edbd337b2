"""A thin synchronous client of fleetd's control socket.

Blocking sockets, one request at a time, ids counting up per client::

    with Client() as c:                      # connects (and reads the greeting) on first use
        ps = c.call("ps", all=True)          # -> PsResult
        result, events = c.stream("logs", name="web-0", follow=True)
        for kind, data in events:            # ends at the daemon's "end" event
            ...

Requests are validated locally with the same models the daemon uses, so a bad
argument fails before anything is sent (:class:`~fleetd.errors.ProtocolError`).
"""

from __future__ import annotations

import base64
import errno
import json
import os
import select
import socket
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from pydantic import BaseModel, ValidationError

from fleetd.errors import FleetError, ProtocolError
from fleetd.paths import default_socket
from fleetd.protocol import PROTOCOL_VERSION, RESULTS, Greeting, decode_request, parse_message

__all__ = ["ApiError", "Client", "DaemonUnreachable", "InvalidRequest", "default_socket"]

#: The daemon's replies may be larger than the 1 MiB request limit (failure bundles).
MAX_REPLY = 64 * 1024 * 1024
START_HINT = "start it: fleetd &, or systemctl start fleetd"


class DaemonUnreachable(FleetError):
    """Nothing answers on the control socket."""

    code = "unreachable"

    def __init__(self, path: Path | str, reason: str | None = None) -> None:
        message = (f"fleetd is not running at {path} ({START_HINT})" if reason is None
                   else f"{reason} ({path})")
        super().__init__(message, path=str(path))
        self.path = Path(path)


class ApiError(FleetError):
    """The daemon answered a request with an error reply (``code``/``message``/``data``)."""

    code = "api_error"

    def __init__(self, code: str, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message, **(data or {}))
        self.code = code
        self.data = dict(data or {})

    @classmethod
    def from_body(cls, body: Any) -> ApiError:
        if not isinstance(body, dict):
            return cls("protocol_error", f"daemon sent a malformed error: {body!r:.200}")
        data = body.get("data")
        return cls(str(body.get("code", "error")), str(body.get("message", "unknown error")),
                   data if isinstance(data, dict) else None)


class InvalidRequest(ProtocolError):
    """A request failed local validation; nothing was sent (a usage error)."""


def _json_default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (Path, bytes)):
        return os.fsdecode(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


class Client:
    """One connection to fleetd. Not thread-safe."""

    def __init__(self, path: Path | str | None = None, timeout: float = 30.0) -> None:
        self.path = Path(path) if path is not None else default_socket()
        self.timeout = timeout
        self.greeting: Greeting | None = None
        #: Error replies to requests fired with :meth:`send` (e.g. rejected console input).
        self.send_errors: deque[ApiError] = deque(maxlen=100)
        #: True once the daemon sent ``end`` for the current stream.
        self.stream_ended = False
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._next_id = 1
        self._events: deque[tuple[str, dict[str, Any]]] = deque()
        self._error_event: ApiError | None = None

    # -- connection --------------------------------------------------------------------------

    def connect(self) -> Greeting:
        """Connect and read the greeting.

        Raises:
            DaemonUnreachable: no daemon at the path (or it does not answer).
            ApiError: the daemon refused us (``permission_denied``) or speaks another protocol.
        """
        if self._sock is not None:
            assert self.greeting is not None
            return self.greeting
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(os.fsencode(self.path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as err:
            sock.close()
            raise DaemonUnreachable(self.path) from err
        except PermissionError as err:
            sock.close()
            raise ApiError("permission_denied",
                           f"cannot connect to {self.path}: permission denied (ask to be added "
                           "to fleetd's socket group)") from err
        except (TimeoutError, OSError) as err:
            sock.close()
            raise DaemonUnreachable(
                self.path, f"cannot connect to fleetd: {getattr(err, 'strerror', None) or err}"
            ) from err
        self._sock = sock
        try:
            msg = self._read_message(time.monotonic() + self.timeout)
            if "error" in msg:
                raise ApiError.from_body(msg["error"])
            if not isinstance(msg.get("greeting"), dict):
                raise ApiError("protocol_error", "daemon did not send a greeting")
            try:
                greeting = Greeting.model_validate(msg["greeting"])
            except ValidationError as err:
                raise ApiError("protocol_error", "daemon sent a bad greeting: "
                               f"{err.errors()[0].get('msg')}") from err
            if greeting.protocol != PROTOCOL_VERSION:
                raise ApiError("protocol_error",
                               f"daemon speaks protocol {greeting.protocol}, fleetctl speaks "
                               f"{PROTOCOL_VERSION} (fleetd {greeting.version}); upgrade one")
        except BaseException:
            self.close()
            raise
        self.greeting = greeting
        return greeting

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def fileno(self) -> int:
        """The socket's fd, for ``select`` (see :meth:`poll`)."""
        if self._sock is None:
            raise ProtocolError("not connected")
        return self._sock.fileno()

    # -- requests ----------------------------------------------------------------------------

    def call(self, method: str, **params: Any) -> BaseModel:
        """Send one request and wait (at most ``timeout``) for its reply.

        Raises:
            ProtocolError: the request is invalid (checked before sending) or the reply is.
            ApiError: the daemon replied with an error.
            DaemonUnreachable: the connection failed or timed out.
        """
        rid = self._send_request(method, params)
        return self._result(method, self._wait_reply(rid, time.monotonic() + self.timeout))

    def stream(self, method: str,
               **params: Any) -> tuple[BaseModel, Iterator[tuple[str, dict[str, Any]]]]:
        """Start a subscription: its reply, and an iterator of ``(kind, data)`` events.

        The iterator ends at the daemon's ``end`` event and raises
        :class:`ApiError` for an ``error`` event; it waits for events without a
        timeout. Replies to :meth:`send` requests are skipped (errors go to
        :attr:`send_errors`).

        Raises:
            Same as :meth:`call`.
        """
        self.stream_ended = False
        result = self.call(method, **params)
        return result, self._iter_events()

    def send(self, method: str, **params: Any) -> int:
        """Fire a request without waiting for its reply (console input while streaming).

        Returns:
            The request id.

        Raises:
            ProtocolError: the request is invalid.
            DaemonUnreachable: the connection failed.
        """
        return self._send_request(method, params)

    def send_console_input(self, name: str, data: bytes) -> None:
        """Forward raw bytes to a replica's console (chunks fit the 64 KiB param limit).

        Raises:
            DaemonUnreachable: the connection failed.
        """
        for i in range(0, len(data), 32768):
            self.send("console_input", name=name,
                      data=base64.b64encode(data[i:i + 32768]).decode("ascii"))

    def poll(self, timeout: float | None = 0.0) -> list[tuple[str, dict[str, Any]]]:
        """Events that arrived, waiting up to ``timeout`` seconds (None: until one arrives).

        After it returns no complete message is left buffered, so ``select`` on
        :meth:`fileno` is a reliable wait for the next one.

        Raises:
            ApiError: the daemon sent an ``error`` event.
            DaemonUnreachable: the daemon closed the connection.
        """
        self._drain_buffer()
        if not self._events and self._error_event is None and not self.stream_ended:
            deadline = None if timeout is None else time.monotonic() + timeout
            if self._wait_readable(deadline):
                self._recv_some()
                self._drain_buffer()
        out = list(self._events)
        self._events.clear()
        if not out and self._error_event is not None:
            err, self._error_event = self._error_event, None
            raise err
        return out

    # -- internals ---------------------------------------------------------------------------

    def _result(self, method: str, msg: dict[str, Any]) -> BaseModel:
        if "error" in msg:
            raise ApiError.from_body(msg["error"])
        try:
            return RESULTS[method].model_validate(msg.get("result"))
        except ValidationError as err:
            raise ProtocolError(f"daemon sent an invalid {method} result: "
                                f"{err.errors()[0].get('msg')}") from err

    def _send_request(self, method: str, params: dict[str, Any]) -> int:
        rid = self._next_id
        line = json.dumps({"id": rid, "method": method, "params": params},
                          separators=(",", ":"), default=_json_default).encode()
        try:
            decode_request(line)  # the daemon's own validation, before anything is sent
        except ProtocolError as err:
            raise InvalidRequest(err.message, **err.fields) from err
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        self._next_id += 1
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(line + b"\n")
        except OSError as err:
            self.close()
            raise DaemonUnreachable(self.path, f"lost the connection to fleetd: {err}") from err
        return rid

    def _wait_reply(self, rid: int, deadline: float) -> dict[str, Any]:
        while True:
            msg = self._read_message(deadline)
            if "event" in msg:
                self._on_event(msg)
                continue
            mid = msg.get("id")
            if mid == rid:
                return msg
            if mid is None and "error" in msg:  # an error about the connection itself
                raise ApiError.from_body(msg["error"])
            self._on_fired_reply(msg)

    def _on_event(self, msg: dict[str, Any]) -> None:
        kind = str(msg["event"])
        data = msg.get("data") if isinstance(msg.get("data"), dict) else {}
        if kind == "end":
            self.stream_ended = True
        elif kind == "error":
            self._error_event = ApiError.from_body(data)
            self.stream_ended = True
        else:
            self._events.append((kind, data))

    def _on_fired_reply(self, msg: dict[str, Any]) -> None:
        if "error" in msg:
            self.send_errors.append(ApiError.from_body(msg["error"]))

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if "event" in msg:
            self._on_event(msg)
        elif "id" in msg:
            if msg["id"] is None and "error" in msg:
                self._error_event = ApiError.from_body(msg["error"])
            else:
                self._on_fired_reply(msg)

    def _iter_events(self) -> Iterator[tuple[str, dict[str, Any]]]:
        while True:
            events = self.poll(None)
            yield from events
            if self.stream_ended and not self._events and self._error_event is None:
                return

    def _drain_buffer(self) -> None:
        while (line := self._take_line()) is not None:
            self._dispatch(parse_message(line))

    def _take_line(self) -> bytes | None:
        idx = self._buf.find(b"\n")
        if idx < 0:
            return None
        line = bytes(self._buf[:idx])
        del self._buf[: idx + 1]
        return line

    def _read_message(self, deadline: float | None) -> dict[str, Any]:
        while (line := self._take_line()) is None:
            if not self._wait_readable(deadline):
                self.close()
                raise DaemonUnreachable(self.path, "fleetd did not answer in time "
                                        f"(timeout {self.timeout:g}s; it may still be at work)")
            self._recv_some()
        return parse_message(line)

    def _wait_readable(self, deadline: float | None) -> bool:
        if self._sock is None:
            raise DaemonUnreachable(self.path, "not connected to fleetd")
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                ready, _, _ = select.select([self._sock], [], [], left)
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
            return bool(ready)

    def _recv_some(self) -> None:
        assert self._sock is not None
        try:
            chunk = self._sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as err:
            self.close()
            if err.errno in (errno.ECONNRESET, errno.EPIPE):
                raise DaemonUnreachable(self.path, "fleetd closed the connection") from err
            raise DaemonUnreachable(self.path, f"lost the connection to fleetd: {err}") from err
        if not chunk:
            self.close()
            raise DaemonUnreachable(self.path, "fleetd closed the connection")
        self._buf += chunk
        if len(self._buf) > MAX_REPLY and b"\n" not in self._buf:
            self.close()
            raise ProtocolError(f"daemon sent a line longer than {MAX_REPLY} bytes")
