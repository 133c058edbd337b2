"""The serial console of one VM: a unix-socket client that reads and writes it.

QEMU's socket chardev takes one client; fleetd holds that connection for the
VM's whole life, splits output into lines for the health checker, keeps a
bounded tail in memory, fans raw bytes out to bounded subscriber streams
(``fleetctl console``, ``logs -f``) and writes console commands. Every byte
also lands in the console logfile, written by QEMU itself.

QEMU's 16550 emulation hands the chardev one byte at a time, so a console
read per arrival woke the daemon several times per heartbeat line. Once a
guest is heartbeating and nobody watches its console interactively, its
console is *swept* instead: one :class:`ConsoleSweeper` task reads every such
console on a short grid (50 ms), which bounds how late a line is seen.
"""

from __future__ import annotations

import select
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import anyio
from anyio.abc import SocketStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from fleetd.errors import VmError, VmTimeout

MAX_LINE = 64 * 1024
SWEEP_READ = 4096

LineSink = Callable[[str, float], None]


class Console:
    """Client of a VM's serial console socket.

    ``on_line(line, monotonic_time)`` is called for each complete line (without
    the newline); it must not block.
    """

    def __init__(self, vm: str, path: str, on_line: LineSink, *, tail_lines: int = 500) -> None:
        self.vm = vm
        self.path = path
        self.on_line = on_line
        self.tail: deque[str] = deque(maxlen=tail_lines)
        self.bytes_read = 0
        self.last_output: float | None = None
        self._stream: SocketStream | None = None
        self._partial = bytearray()
        self._subscribers: list[MemoryObjectSendStream[bytes]] = []
        self._write_lock = anyio.Lock()
        self.sweeper: ConsoleSweeper | None = None
        self.sweepable = False          # the owner says: steady output, latency of a grid is fine
        self._mode_change = anyio.Event()
        self._eof = False
        self._raw: socket.socket | None = None

    @property
    def connected(self) -> bool:
        return self._stream is not None

    async def connect(self, *, timeout: float = 5.0, alive: Callable[[], bool] | None = None) -> None:
        """Connect to the console socket, retrying until it exists.

        Raises:
            VmTimeout: when it does not accept within ``timeout``.
            VmError: when QEMU exited meanwhile.
        """
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            try:
                self._stream = await anyio.connect_unix(self.path)
                return
            except OSError as err:
                if alive is not None and not alive():
                    raise VmError(f"{self.vm}: QEMU exited before its console accepted",
                                  vm=self.vm) from err
                if time.monotonic() >= deadline:
                    raise VmTimeout(f"{self.vm}: console socket {self.path} not accepting: "
                                    f"{err.strerror}", vm=self.vm, what="console",
                                    seconds=timeout) from err
            await anyio.sleep(delay)
            delay = min(delay * 1.5, 0.02)

    async def run(self) -> None:
        """Read until EOF, feeding lines, tail and subscribers. Returns when QEMU closes it."""
        if self._stream is None:      # closed before this reader got to run
            return
        try:
            while self._stream is not None and not self._eof:
                if self.sweeper is not None and self.sweepable and not self._subscribers:
                    self._mode_change = anyio.Event()
                    self.sweeper.add(self)
                    try:
                        await self._mode_change.wait()
                    finally:
                        self.sweeper.discard(self)
                    continue
                try:
                    data = await self._stream.receive(65536)
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                        OSError):
                    break
                self.feed(data)
        finally:
            self.flush()
            await self.close()

    def fileno(self) -> int:
        """The console socket's fd (-1 when closed)."""
        stream = self._stream
        if stream is None:
            return -1
        if self._raw is None:
            self._raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        return self._raw.fileno()

    def sweep(self, now: float | None = None, limit: int = 1 << 20) -> None:
        """Read whatever is pending without waiting (the sweeper's grid, or a health check
        that wants the latest output before judging)."""
        stream = self._stream
        if stream is None or self._eof:
            return
        sock = self._raw
        if sock is None:
            sock = self._raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        got = 0
        while got < limit:
            try:
                # small reads: recv(n) allocates n bytes first, and a sweep finds a few lines
                chunk = sock.recv(SWEEP_READ)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                chunk = b""
            if not chunk:
                self._eof = True
                self._mode_change.set()
                break
            got += len(chunk)
            self.feed(chunk, now)
            if len(chunk) < SWEEP_READ:
                break               # drained (more arrives by the next sweep)

    def feed(self, data: bytes, now: float | None = None) -> None:
        """Process bytes as if read from the console (also used to replay a logfile)."""
        now = time.monotonic() if now is None else now
        self.bytes_read += len(data)
        self.last_output = now
        for s in list(self._subscribers):
            try:
                s.send_nowait(data)
            except anyio.WouldBlock:
                pass  # a slow watcher loses bytes rather than slowing the guest
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.remove(s)
        buf = self._partial
        buf += data
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > MAX_LINE:
                    self._emit(bytes(buf[:MAX_LINE]), now)
                    del buf[:MAX_LINE]
                break
            self._emit(bytes(buf[:nl]), now)
            del buf[:nl + 1]

    def flush(self) -> None:
        if self._partial:
            self._emit(bytes(self._partial), time.monotonic())
            self._partial.clear()

    def _emit(self, raw: bytes, now: float) -> None:
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        self.tail.append(line)
        self.on_line(line, now)

    async def write(self, data: bytes) -> None:
        """Send bytes to the guest's serial input.

        Raises:
            VmError: when the console is not connected.
        """
        if self._stream is None:
            raise VmError(f"{self.vm}: console not connected", vm=self.vm)
        async with self._write_lock:
            try:
                await self._stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as err:
                raise VmError(f"{self.vm}: console write failed", vm=self.vm) from err

    @contextmanager
    def subscribe(self, buffer: int = 256) -> Iterator[MemoryObjectReceiveStream[bytes]]:
        """A bounded stream of raw console output for the duration of the block."""
        send, recv = anyio.create_memory_object_stream[bytes](buffer)
        self._subscribers.append(send)
        self._mode_change.set()         # a watcher wants every byte at once: leave the sweep
        try:
            yield recv
        finally:
            if send in self._subscribers:
                self._subscribers.remove(send)
            send.close()
            recv.close()

    async def close(self) -> None:
        self._mode_change.set()
        stream, self._stream = self._stream, None
        if stream is not None:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
        for s in self._subscribers:
            s.close()
        self._subscribers.clear()


class ConsoleSweeper:
    """One task that reads every swept console every ``interval`` seconds.

    One ``poll(2)`` over all swept sockets per round; only the readable ones are read.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self._by_fd: dict[int, Console] = {}
        self._poll = select.poll()

    def add(self, console: Console) -> None:
        fd = console.fileno()
        if fd >= 0 and fd not in self._by_fd:
            self._by_fd[fd] = console
            self._poll.register(fd, select.POLLIN)

    def discard(self, console: Console) -> None:
        for fd, c in list(self._by_fd.items()):
            if c is console:
                del self._by_fd[fd]
                self._poll.unregister(fd)

    def __len__(self) -> int:
        return len(self._by_fd)

    async def run(self) -> None:
        """Sweep forever (cancel to stop)."""
        while True:
            await anyio.sleep(self.interval)
            if not self._by_fd:
                continue
            now = time.monotonic()
            for fd, _ in self._poll.poll(0):
                c = self._by_fd.get(fd)
                if c is not None:
                    c.sweep(now)
