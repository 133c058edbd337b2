"""QMP for one VM, through qemu.qmp (QEMU's own asyncio client).

qemu.qmp's default ``events`` listener keeps an unbounded queue and history;
:class:`QmpConnection` bypasses it and dispatches events to its own bounded,
filtered :class:`EventQueue` objects instead. A disconnect right after
``quit`` counts as success.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from qemu.qmp import ExecInterruptedError, ExecuteError, QMPClient
from qemu.qmp.message import Message
from qemu.qmp.error import QMPError
from qemu.qmp.protocol import Runstate

from fleetd.errors import QmpError, VmTimeout

# qemu.qmp logs every disconnect at ERROR; fleetd reports those itself.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class QmpEvent:
    """One QMP event: its name, data and QEMU's timestamp (seconds since the epoch)."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    timestamp: float = 0.0

    @classmethod
    def from_message(cls, msg: Message | dict[str, Any]) -> "QmpEvent":
        ts = msg.get("timestamp") or {}
        t = float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6
        return cls(name=str(msg.get("event")), data=dict(msg.get("data") or {}), timestamp=t)


class EventQueue:
    """A bounded FIFO of QMP events, optionally filtered by name.

    When full, the oldest event is dropped and ``dropped`` counts it, so a slow
    consumer never grows memory.
    """

    def __init__(self, names: Iterable[str] | None = None, maxlen: int = 256) -> None:
        self.names = frozenset(names) if names else None
        self._items: deque[QmpEvent] = deque(maxlen=maxlen)
        self._ready = anyio.Event()
        self.dropped = 0

    def accepts(self, event: QmpEvent) -> bool:
        return self.names is None or event.name in self.names

    def put(self, event: QmpEvent) -> None:
        if len(self._items) == self._items.maxlen:
            self.dropped += 1
        self._items.append(event)
        self._ready.set()

    async def get(self) -> QmpEvent:
        while not self._items:
            if self._ready.is_set():
                self._ready = anyio.Event()
            await self._ready.wait()
        return self._items.popleft()

    def get_nowait(self) -> QmpEvent | None:
        return self._items.popleft() if self._items else None

    def __len__(self) -> int:
        return len(self._items)


class _Client(QMPClient):
    """QMPClient whose events go only to our bounded queues (no unbounded default listener)."""

    def __init__(self, name: str, sink: Callable[[QmpEvent], None]) -> None:
        super().__init__(name)
        self._sink = sink

    async def _event_dispatch(self, msg: Message) -> None:  # overrides the mixin's fan-out
        self._sink(QmpEvent.from_message(msg))


class QmpConnection:
    """A QMP session with one QEMU.

    Commands run under a per-command timeout and raise :class:`QmpError`
    naming the VM and the command. Events are delivered to every registered
    :class:`EventQueue` that accepts them.
    """

    def __init__(self, vm: str, path: str) -> None:
        self.vm = vm
        self.path = path
        self._queues: list[EventQueue] = []
        self._client = _Client(vm, self._dispatch)
        self.qemu_version = ""

    def _dispatch(self, event: QmpEvent) -> None:
        for q in self._queues:
            if q.accepts(event):
                q.put(event)

    @contextmanager
    def listen(self, names: Iterable[str] | None = None, maxlen: int = 256) -> Iterator[EventQueue]:
        """Register a bounded event queue for the duration of the block."""
        q = EventQueue(names, maxlen)
        self._queues.append(q)
        try:
            yield q
        finally:
            self._queues.remove(q)

    def add_queue(self, q: EventQueue) -> None:
        self._queues.append(q)

    @property
    def connected(self) -> bool:
        return self._client.runstate == Runstate.RUNNING

    async def connect(self, *, timeout: float, alive: Callable[[], bool] | None = None,
                      interval: float = 0.005) -> None:
        """Connect, retrying while the socket does not exist or refuses, until ``timeout``.

        ``alive`` is polled between attempts; when it returns False the wait ends early.

        Raises:
            VmTimeout: when no session could be established in time.
            QmpError: when QEMU died while we waited.
        """
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            if alive is not None and not alive():
                raise QmpError(f"{self.vm}: QEMU exited before QMP answered", vm=self.vm,
                               command="qmp_capabilities") from last
            try:
                with anyio.fail_after(max(0.05, deadline - time.monotonic())):
                    await self._client.connect(self.path)
                    greeting = self._client.greeting
                    if greeting is not None:
                        q = greeting.QMP.version.get("qemu", {})
                        self.qemu_version = f"{q.get('major')}.{q.get('minor')}.{q.get('micro')}"
                return
            except TimeoutError as err:
                last = err
                await self._reset()
            except (QMPError, OSError, EOFError, AssertionError) as err:
                # AssertionError: qemu.qmp asserts its runstate is RUNNING right after the
                # handshake; a QEMU dying during the handshake trips it (a library race).
                last = err
                await self._reset()
            if time.monotonic() >= deadline:
                raise VmTimeout(f"{self.vm}: no QMP session within {timeout:.1f}s ({last})",
                                vm=self.vm, what="qmp_connect", seconds=timeout) from last
            await anyio.sleep(interval)
            interval = min(interval * 1.5, 0.02)  # QEMU needs ~30-40 ms: poll finely

    async def _reset(self) -> None:
        # After a failed connect qemu.qmp must be back in IDLE before it can retry.
        if self._client.runstate != Runstate.IDLE:
            try:
                await self._client.disconnect()
            except Exception:  # noqa: BLE001 - the error was already reported by connect()
                pass

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                      timeout: float = 10.0) -> Any:
        """Run one QMP command and return its ``return`` value.

        Raises:
            QmpError: the command failed, the session broke, or it timed out.
        """
        if not self.connected:
            raise QmpError(f"{self.vm}: QMP not connected", vm=self.vm, command=command)
        try:
            with anyio.fail_after(timeout):
                return await self._client.execute(command, arguments)
        except ExecuteError as err:
            raise QmpError(f"{self.vm}: {command}: {err.error.desc}", vm=self.vm,
                           command=command, error_class=err.error_class) from err
        except TimeoutError as err:
            raise QmpError(f"{self.vm}: {command}: no reply within {timeout:g}s", vm=self.vm,
                           command=command, error_class="timeout") from err
        except (ExecInterruptedError, OSError, EOFError) as err:
            raise QmpError(f"{self.vm}: {command}: connection lost", vm=self.vm,
                           command=command, error_class="disconnected") from err

    async def hmp(self, command_line: str, *, timeout: float = 10.0) -> str:
        """Run a human monitor command through ``human-monitor-command``."""
        out = await self.execute("human-monitor-command", {"command-line": command_line},
                                 timeout=timeout)
        return str(out)

    async def quit(self, *, timeout: float = 5.0) -> None:
        """Ask QEMU to quit. A session that drops right after counts as success.

        Raises:
            QmpError: only when QEMU explicitly refused.
        """
        try:
            await self.execute("quit", timeout=timeout)
        except QmpError as err:
            if err.error_class not in ("disconnected", "timeout"):
                raise

    async def close(self) -> None:
        """Disconnect (never raises for an already broken session)."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            try:
                await self._client.disconnect()
            except Exception:  # noqa: BLE001 - the peer is gone; nothing left to report
                pass


def qmp_time_to_monotonic(ts: float) -> float:
    """Map a QMP wall-clock timestamp to this process's monotonic clock."""
    if not ts or math.isnan(ts):
        return time.monotonic()
    return time.monotonic() - (time.time() - ts)
