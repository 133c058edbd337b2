"""One QEMU process: spawn detached, watch through a pidfd, signal, reap.

QEMU runs in its own session with stdin on /dev/null and stdout/stderr in
files (never pipes), so it survives the daemon. Exit is detected through a
pidfd, which also works for a process that is not our child (re-adoption);
a SIGKILLed QEMU sends no QMP event, so exit detection never depends on QMP.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import anyio

from fleetd.errors import QemuStartError

_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ExitStatus:
    """How a process ended. ``code``/``signal`` are None when unknown (not our child)."""

    code: int | None = None
    signal: int | None = None
    known: bool = True

    def describe(self) -> str:
        if not self.known:
            return "exited (status unknown: not our child)"
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name}"
        return f"exited with status {self.code}"

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "signal": self.signal, "known": self.known,
                "text": self.describe()}


def proc_start_time(pid: int, proc_root: str = "/proc") -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot), or None if gone."""
    try:
        with open(f"{proc_root}/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(b")") + 2:].split()
    return int(rest[19])


def proc_cmdline(pid: int) -> list[str] | None:
    """The argv of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def find_qemu(binary: str = "qemu-system-x86_64") -> str:
    """Absolute path of the QEMU binary.

    Raises:
        QemuStartError: when it is not installed.
    """
    path = binary if os.path.isabs(binary) else shutil.which(binary)
    if not path or not os.access(path, os.X_OK):
        raise QemuStartError(f"{binary} not found (install it: apt-get install qemu-system-x86)",
                             binary=binary)
    return path


class QemuProcess:
    """A QEMU process we spawned (a child) or adopted (identified by pid + start time)."""

    def __init__(self, pid: int, start_time: int, *, is_child: bool) -> None:
        self.pid = pid
        self.start_time = start_time
        self.is_child = is_child
        self.spawned_at = time.monotonic()
        self._pidfd: int | None = os.pidfd_open(pid)
        self.status: ExitStatus | None = None
        self.exited = anyio.Event()

    @classmethod
    def spawn(cls, argv: list[str], *, stdout: Path, stderr: Path,
              env: dict[str, str] | None = None) -> "QemuProcess":
        """Start ``argv`` in a new session, stdin /dev/null, output appended to files.

        Raises:
            QemuStartError: when the program cannot be executed.
        """
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND  # no O_CLOEXEC: these become fds 1 and 2
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(stdout), flags, 0o640),
            (os.POSIX_SPAWN_OPEN, 2, str(stderr), flags, 0o640),
        ]
        try:
            pid = os.posix_spawn(argv[0], argv, env if env is not None else dict(os.environ),
                                 file_actions=actions, setsid=True,
                                 setsigdef=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP,
                                            signal.SIGPIPE, signal.SIGCHLD))
        except OSError as err:
            raise QemuStartError(f"cannot execute {argv[0]}: {err.strerror}",
                                 binary=argv[0]) from err
        st = proc_start_time(pid) or 0
        return cls(pid, st, is_child=True)

    @classmethod
    def adopt(cls, pid: int, start_time: int) -> "QemuProcess | None":
        """Attach to a running process if it is still the one recorded (pid + start time)."""
        if proc_start_time(pid) != start_time:
            return None
        try:
            proc = cls(pid, start_time, is_child=False)
        except ProcessLookupError:
            return None
        if proc_start_time(pid) != start_time:  # reused between the check and pidfd_open
            proc.close()
            return None
        return proc

    @property
    def alive(self) -> bool:
        return self.status is None and self._poll() is None

    def _poll(self) -> ExitStatus | None:
        if self.status is not None:
            return self.status
        if self._pidfd is None:
            return self.status
        if self.is_child:
            try:
                res = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                res = None
                if proc_start_time(self.pid) != self.start_time:
                    self._set(ExitStatus(known=False))
                return self.status
            if res is None:
                return None
            if res.si_code == os.CLD_EXITED:
                self._set(ExitStatus(code=res.si_status))
            else:
                self._set(ExitStatus(signal=res.si_status))
            return self.status
        # Not our child: the pidfd becomes readable when it exits; we cannot read the status.
        r, _, _ = select.select([self._pidfd], [], [], 0)
        if r:
            self._set(ExitStatus(known=False))
        return self.status

    def _set(self, status: ExitStatus) -> None:
        self.status = status
        self.exited.set()

    async def watch(self) -> ExitStatus:
        """Wait for the process to end (reaping it when it is our child); return how it ended."""
        while True:
            st = self._poll()
            if st is not None:
                return st
            assert self._pidfd is not None
            await anyio.wait_readable(self._pidfd)

    async def wait(self, timeout: float | None = None) -> ExitStatus | None:
        """Wait until :meth:`watch` (running elsewhere) saw the exit, up to ``timeout``."""
        if self._poll() is not None:
            return self.status
        with anyio.move_on_after(timeout):
            await self.exited.wait()
        return self._poll()

    def send_signal(self, sig: int) -> bool:
        """Signal the process through its pidfd; False when it is already gone."""
        if self._pidfd is None or self.status is not None:
            return False
        try:
            signal.pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError:
            return False
        except OSError as err:
            if err.errno == errno.ESRCH:
                return False
            raise
        return True

    def threads(self) -> list[int]:
        """Thread ids of the process (empty when it is gone)."""
        try:
            return sorted(int(t) for t in os.listdir(f"/proc/{self.pid}/task"))
        except OSError:
            return []

    def close(self) -> None:
        """Release the pidfd (does not signal the process)."""
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def cpu_seconds(self) -> float | None:
        """utime + stime of the whole process, in seconds."""
        return thread_cpu_seconds(self.pid, None)


def thread_cpu_seconds(pid: int, tid: int | None) -> float | None:
    """CPU time (utime + stime) of a process or one of its threads, in seconds."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(b")") + 2:].split()
    return (int(rest[11]) + int(rest[12])) / _CLK_TCK
