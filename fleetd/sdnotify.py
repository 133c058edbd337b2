"""systemd's notification and socket-activation protocols, spoken directly (no libsystemd).

:class:`Notifier` sends ``sd_notify(3)`` datagrams to ``$NOTIFY_SOCKET``:
``READY=1`` once fleetd serves (after re-adopting running guests),
``STATUS=`` lines for ``systemctl status``, ``WATCHDOG=1`` petting for
``WatchdogSec=``, and ``STOPPING=1`` at shutdown. Without ``NOTIFY_SOCKET``
(not under systemd, or ``Type=`` other than notify) every call is a no-op that
returns False. Sending never raises and never blocks: a failure is returned as
False and kept in :attr:`Notifier.last_error`.

:func:`listen_fds` reads ``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES``
(``sd_listen_fds(3)``): the sockets systemd (or ``systemd-socket-activate``)
passed, starting at fd 3.

Neither touches the environment: the variables stay set for the process.
Children that must not see them (QEMU) should get an environment without
:data:`SYSTEMD_VARIABLES` (see :func:`without_systemd_variables`); nothing
else is needed, since ``NotifyAccess=main`` makes systemd ignore datagrams
from any process but fleetd's main one, and ``LISTEN_PID`` never matches a
child.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping

import anyio
from anyio.abc import TaskStatus

SD_LISTEN_FDS_START = 3

#: Environment variables systemd hands to a service for these protocols.
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                     "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def without_systemd_variables(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` without :data:`SYSTEMD_VARIABLES` (for children such as QEMU)."""
    return {k: v for k, v in env.items() if k not in SYSTEMD_VARIABLES}


def _address(value: str) -> str | bytes | None:
    """``NOTIFY_SOCKET`` as a ``sendto`` address: a path, or ``@name`` for the abstract namespace."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return value
    return None  # relative paths and vsock: addresses are not supported


def _positive_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        n = int(value.strip())
    except ValueError:
        return None
    return n if n > 0 else None


class Notifier:
    """``sd_notify`` over an ``AF_UNIX``/``SOCK_DGRAM`` socket; see the module docstring.

    ``env`` defaults to ``os.environ`` and is read once, here. The watchdog is
    configured when ``WATCHDOG_USEC`` is a positive integer and
    ``WATCHDOG_PID`` is either unset (systemd does not always set it) or our
    pid; a ``WATCHDOG_PID`` naming another process means the watchdog is not
    ours to pet.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.socket_name: str | None = env.get("NOTIFY_SOCKET") or None
        self._addr = _address(self.socket_name) if self.socket_name else None
        self.last_error: OSError | None = None
        if self.socket_name and self._addr is None:
            self.last_error = OSError(f"unsupported NOTIFY_SOCKET address: {self.socket_name!r}")
        usec = _positive_int(env.get("WATCHDOG_USEC"))
        wpid = env.get("WATCHDOG_PID")
        if wpid is not None and _positive_int(wpid) != os.getpid():
            usec = None
        self._watchdog_usec = usec if self._addr is not None else None
        self._sock: socket.socket | None = None
        self._last_status: str | None = None

    # -- state -----------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """True when there is a notification socket to send to."""
        return self._addr is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pets (half of ``WATCHDOG_USEC``), or None."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def close(self) -> None:
        """Close the sending socket (a later call opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sending ---------------------------------------------------------------------------------

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines (in argument order) as one datagram.

        Newlines in values are replaced by spaces (one field per line).
        Returns True when the kernel accepted the datagram; False when
        notifications are disabled or sending failed (:attr:`last_error`).
        Never raises, never blocks.
        """
        if self._addr is None or not fields:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value).replace("\r", " ").replace("\n", " ")
            lines.append(f"{key}={text}")
        data = ("\n".join(lines) + "\n").encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # CLOEXEC
                self._sock.setblocking(False)
            self._sock.sendto(data, self._addr)
        except OSError as err:  # ENOENT, ECONNREFUSED, EAGAIN (full queue), EMFILE...
            self.last_error = err
            return False
        except ValueError as err:  # an address Python refuses (embedded NUL in a path)
            self.last_error = OSError(str(err))
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (with ``STATUS=`` when given): startup is complete."""
        if status is None:
            return self.notify(READY=1)
        if self.notify(READY=1, STATUS=status):
            self._last_status = status
            return True
        return False

    def status(self, text: str) -> bool:
        """``STATUS=text``; a text equal to the last one sent is not sent again (returns True)."""
        if self._addr is not None and text == self._last_status:
            return True
        if self.notify(STATUS=text):
            self._last_status = text
            return True
        return False

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1`` (with ``STATUS=`` when given): shutdown has begun."""
        if status is None:
            return self.notify(STOPPING=1)
        return self.notify(STOPPING=1, STATUS=status)

    def reloading(self) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (as ``Type=notify-reload`` expects).

        Send :meth:`ready` when the reload is done.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=usec)

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC``: ask for ``seconds`` more before the start/stop times out."""
        return self.notify(EXTEND_TIMEOUT_USEC=max(1, math.ceil(seconds * 1_000_000)))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: one pet (a no-op returning False without a watchdog)."""
        if self._watchdog_usec is None:
            return False
        return self.notify(WATCHDOG=1)

    async def run_watchdog(self, *, healthy: Callable[[], bool] = lambda: True,
                           task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Pet the watchdog every :attr:`watchdog_interval` while ``healthy()`` holds.

        Pets once at once, then on a fixed schedule (no drift; a late tick pets
        at once and reschedules from now). When ``healthy()`` is false (or
        raises) that tick sends nothing, so a wedged daemon lets systemd's
        watchdog fire. Returns at once when no watchdog is configured; runs
        until cancelled otherwise.
        """
        interval = self.watchdog_interval
        task_status.started()
        if interval is None:
            return
        deadline = anyio.current_time()
        while True:
            try:
                ok = bool(healthy())
            except Exception:  # a broken health check is an unhealthy daemon
                ok = False
            if ok:
                self.watchdog()
            deadline += interval
            now = anyio.current_time()
            if deadline < now:
                deadline = now
            await anyio.sleep(deadline - now)


def listen_fds(env: Mapping[str, str] | None = None, pid: int | None = None) -> list[int]:
    """The fds passed by socket activation (``[3, 4, ...]``), or ``[]``.

    Only when ``LISTEN_PID`` is ``pid`` (default: ours) and ``LISTEN_FDS`` is a
    positive count. Like ``sd_listen_fds(3)`` the fds are marked close-on-exec
    (so QEMU never inherits them); unlike it, the variables are not unset
    (callers pass children :func:`without_systemd_variables`).
    """
    return [fd for fd, _ in listen_fds_with_names(env, pid)]


def listen_fds_with_names(env: Mapping[str, str] | None = None,
                          pid: int | None = None) -> list[tuple[int, str]]:
    """Like :func:`listen_fds`, with each fd's ``LISTEN_FDNAMES`` name.

    A missing ``LISTEN_FDNAMES`` (or one with the wrong number of names) names
    every fd ``"unknown"``, as ``sd_listen_fds_with_names(3)`` does.
    """
    env = os.environ if env is None else env
    pid = os.getpid() if pid is None else pid
    if _positive_int(env.get("LISTEN_PID")) != pid:
        return []
    n = _positive_int(env.get("LISTEN_FDS"))
    if n is None:
        return []
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n))
    names = env.get("LISTEN_FDNAMES", "").split(":")
    if len(names) != n or not all(names):
        names = ["unknown"] * n
    if pid == os.getpid():
        for fd in fds:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass  # not open: whoever adopts it reports that
    return list(zip(fds, names))


def guest_status(states: Iterable[str]) -> str:
    """A ``STATUS=`` text from replica states: ``"8 guests: 8 running, 0 backoff, 0 failed"``.

    Running, backoff and failed are always shown; any other state only when
    some guest is in it (``", 2 starting"``).
    """
    counts: dict[str, int] = {}
    total = 0
    for s in states:
        key = str(s)
        counts[key] = counts.get(key, 0) + 1
        total += 1
    parts = [f"{counts.pop(k, 0)} {k}" for k in ("running", "backoff", "failed")]
    parts += [f"{n} {k}" for k, n in sorted(counts.items())]
    return f"{total} guest{'' if total == 1 else 's'}: " + ", ".join(parts)
