"""The daemon's event stream: every state and health change, restart, backoff and failure.

Publishing never blocks: the history is a bounded ring, and each subscriber
has a bounded buffer; a subscriber too slow to keep up loses events and is
told how many (a ``dropped`` event) rather than slowing the daemon.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream


@dataclass(frozen=True)
class Event:
    """One event: a kind (``state``, ``health``, ``restart``, ``backoff``, ``failure``,
    ``fleet``, ``qmp``, ``daemon``), the replica and fleet it is about, and details."""

    kind: str
    vm: str | None = None
    fleet: str | None = None
    data: dict[str, Any] | None = None
    time: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"time": round(self.time, 6), "kind": self.kind}
        if self.vm is not None:
            d["vm"] = self.vm
        if self.fleet is not None:
            d["fleet"] = self.fleet
        if self.data:
            d.update(self.data)
        return d


class EventBus:
    """Fan-out of events to bounded subscribers, with a bounded history."""

    def __init__(self, history: int = 5000, buffer: int = 1000) -> None:
        self.history: deque[Event] = deque(maxlen=history)
        self.buffer = buffer
        self._subs: list[tuple[MemoryObjectSendStream[Event], frozenset[str] | None, list[int]]] = []
        self.published = 0

    def publish(self, kind: str, *, vm: str | None = None, fleet: str | None = None,
                **data: Any) -> Event:
        ev = Event(kind, vm, fleet, data or None, time.time())
        self.history.append(ev)
        self.published += 1
        for send, names, dropped in list(self._subs):
            if names is not None and vm not in names and fleet not in names:
                continue
            try:
                if dropped[0]:
                    send.send_nowait(Event("dropped", data={"count": dropped[0]}, time=ev.time))
                    dropped[0] = 0
                send.send_nowait(ev)
            except anyio.WouldBlock:
                dropped[0] += 1
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subs = [s for s in self._subs if s[0] is not send]
        return ev

    def recent(self, n: int, names: Iterable[str] | None = None) -> list[Event]:
        sel = frozenset(names) if names else None
        out = [e for e in self.history if sel is None or e.vm in sel or e.fleet in sel]
        return out[-n:] if n else []

    def open(self, names: Iterable[str] | None = None) -> "Subscription":
        """Subscribe now (synchronously): nothing published after this call is missed.

        Take a history snapshot *after* opening, so history + stream have no gap.
        """
        send, recv = anyio.create_memory_object_stream[Event](self.buffer)
        self._subs.append((send, frozenset(names) if names else None, [0]))
        return Subscription(self, send, recv)

    def _drop(self, send: MemoryObjectSendStream[Event]) -> None:
        self._subs = [s for s in self._subs if s[0] is not send]
        send.close()

    @asynccontextmanager
    async def subscribe(self, names: Iterable[str] | None = None) -> AsyncIterator[Any]:
        """A bounded receive stream of events (optionally only about ``names``)."""
        sub = self.open(names)
        try:
            async with sub.recv:
                yield sub.recv
        finally:
            sub.close()

    @property
    def subscribers(self) -> int:
        return len(self._subs)


class Subscription:
    """An open subscription: iterate :attr:`recv`; :meth:`close` when done."""

    def __init__(self, bus: EventBus, send: MemoryObjectSendStream[Event],
                 recv: Any) -> None:
        self.bus, self._send, self.recv = bus, send, recv

    def close(self) -> None:
        self.bus._drop(self._send)
        self.recv.close()
