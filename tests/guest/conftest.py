"""QEMU harness for the fleet-guest kernel tests.

Every VM is started paused (``-S``) with a QMP unix socket and COM1 on a unix-socket chardev
(with a logfile). The harness connects to both, reads console lines continuously (so the
guest is never back-pressured), then ``cont``s. Tests talk to the guest with ``vm.send()``
and observe it through ``vm.lines`` / ``vm.heartbeats()`` / QMP events / the exit status.

Everything is exposed through fixtures (``launch``, ``accel``, ``guest_image``), so test
modules never import this file by name.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import pytest
from qemu.qmp import QMPClient

REPO = Path(__file__).resolve().parents[2]
GUEST_DIR = REPO / "guest"
IMAGE = GUEST_DIR / "build" / "fleet-guest.elf"
QEMU = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
QBOOT_CANDIDATES = ("/usr/share/qemu/qboot.rom", "/usr/share/qboot/bios.bin", "/usr/local/share/qemu/qboot.rom")
KVM_CPU = "host,-arch-capabilities"  # plain "host" trips an MSR assertion on some nested KVMs

HB_RE = re.compile(r"^FLEET HB seq=(\d+) up_ms=(\d+)((?: c\d+=\d+)*)$")
READY_RE = re.compile(r"^FLEET READY cpus=(\d+)/(\d+) bringup_us=(\d+)$")
BOOT_RE = re.compile(r'^FLEET BOOT proto=(\d+) cmdline="(.*)"$')
PANIC_RE = re.compile(r'^FLEET PANIC cpu=(\d+) msg="(.*)"$')
EXIT_RE = re.compile(r"^FLEET EXIT code=(\d+)$")

# Every QEMU the harness ever started; the autouse reaper kills leftovers after each test.
_LIVE: set[subprocess.Popen[bytes]] = set()


def qboot_path() -> str | None:
    for p in QBOOT_CANDIDATES:
        if os.path.exists(p):
            return p
    return None


@dataclasses.dataclass(frozen=True)
class Heartbeat:
    seq: int
    up_ms: int
    counters: tuple[int, ...]
    t: float  # host monotonic time the line arrived

    @staticmethod
    def parse(line: str, t: float = 0.0) -> "Heartbeat | None":
        m = HB_RE.match(line)
        if not m:
            return None
        counters = []
        for i, word in enumerate(m.group(3).split()):
            name, _, value = word.partition("=")
            assert name == f"c{i}", f"counter {i} is named {name!r} in {line!r}"
            counters.append(int(value))
        return Heartbeat(int(m.group(1)), int(m.group(2)), tuple(counters), t)


async def _retry_refused(connect: Callable[[], Awaitable[Any]], deadline: float) -> Any:
    while True:
        try:
            return await connect()
        except (ConnectionRefusedError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)


async def _qmp_connect(path: Path, name: str, deadline: float) -> QMPClient:
    while True:
        qmp = QMPClient(name)
        try:
            await qmp.connect(str(path))
            return qmp
        except Exception:
            with contextlib.suppress(Exception):
                await qmp.disconnect()
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)


class GuestVM:
    """One QEMU running fleet-guest. Use through the ``launch`` fixture."""

    def __init__(
        self,
        *,
        accel: str = "tcg",
        machine: str = "q35",
        smp: str | int = 2,
        firmware: str = "qboot",
        append: str = "",
        mem: int = 64,
        panic_action: str = "pause",
        exit_device: bool = True,
        pvpanic: bool = True,
        extra_args: Sequence[str] = (),
        image: Path = IMAGE,
    ) -> None:
        self.accel, self.machine, self.smp, self.firmware = accel, machine, str(smp), firmware
        self.append, self.mem, self.panic_action = append, mem, panic_action
        self.exit_device, self.pvpanic, self.extra_args, self.image = exit_device, pvpanic, list(extra_args), image
        # AF_UNIX paths are limited to 107 bytes: keep the directory short.
        self.dir = Path(tempfile.mkdtemp(prefix="fg", dir="/tmp"))
        self.qmp_path = self.dir / "q"
        self.ser_path = self.dir / "s"
        self.log_path = self.dir / "serial.log"
        self.err_path = self.dir / "stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QMPClient | None = None
        self.lines: list[tuple[float, str]] = []
        self.t_start = 0.0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._returncode: int | None = None

    # ---------------------------------------------------------------- lifecycle
    def argv(self) -> list[str]:
        a = [
            QEMU,
            "-S",
            "-nodefaults",
            "-no-user-config",
            "-display", "none",
            "-machine", self.machine,
            "-accel", self.accel,
            "-m", str(self.mem),
            "-smp", self.smp,
            "-kernel", str(self.image),
            "-append", self.append,
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-chardev", f"socket,id=ser0,path={self.ser_path},server=on,wait=off,logfile={self.log_path}",
            "-serial", "chardev:ser0",
            "-action", f"panic={self.panic_action}",
        ]
        if self.accel == "kvm":
            a += ["-cpu", KVM_CPU]
        if self.firmware == "qboot":
            qb = qboot_path()
            if qb is None:
                pytest.skip("qboot firmware not installed")
            a += ["-bios", qb]
        elif self.firmware != "seabios":
            raise ValueError(self.firmware)
        if self.exit_device:
            a += ["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
        if self.pvpanic:
            a += ["-device", "pvpanic"]
        return a + self.extra_args

    async def start(self, timeout: float = 15.0) -> "GuestVM":
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        _LIVE.add(self.proc)
        self.t_start = time.monotonic()
        deadline = self.t_start + timeout
        while not (self.qmp_path.exists() and self.ser_path.exists()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited early ({self.proc.returncode}): {self.stderr()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"QEMU sockets did not appear: {self.stderr()}")
            await asyncio.sleep(0.01)
        # The socket files appear at bind(), a moment before listen(): retry refused connects.
        self._reader, self._writer = await _retry_refused(
            lambda: asyncio.open_unix_connection(str(self.ser_path)), deadline
        )
        self._pump_task = asyncio.create_task(self._pump())
        self.qmp = await _qmp_connect(self.qmp_path, "fleet-guest-test", deadline)
        await self.qmp.execute("cont")
        return self

    async def _pump(self) -> None:
        assert self._reader is not None
        buf = b""
        while True:
            data = await self._reader.read(65536)
            if not data:
                break
            buf += data
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                self.lines.append((time.monotonic(), raw.decode("ascii", "replace").rstrip("\r")))

    async def close(self) -> None:
        if self._pump_task is not None:
            self._pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump_task
            self._pump_task = None
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.disconnect(), 5)
            self.qmp = None
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
            self._writer = None
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def kill(self) -> None:
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        self._returncode = p.returncode
        _LIVE.discard(p)

    # ---------------------------------------------------------------- observation
    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stderr(self) -> str:
        try:
            return self.err_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def text(self, last: int = 40) -> str:
        """Console tail, for assertion messages."""
        tail = "\n".join(line for _, line in self.lines[-last:])
        return f"--- console (last {last} lines) ---\n{tail}\n--- qemu stderr ---\n{self.stderr()}"

    def matching(self, regex: re.Pattern[str] | str, start: int = 0) -> list[re.Match[str]]:
        rx = re.compile(regex) if isinstance(regex, str) else regex
        return [m for _, line in self.lines[start:] if (m := rx.match(line))]

    async def wait_line(self, regex: re.Pattern[str] | str, timeout: float = 30.0, start: int = 0) -> tuple[int, re.Match[str]]:
        """Wait for a console line matching ``regex`` at index >= start; returns (index, match)."""
        rx = re.compile(regex) if isinstance(regex, str) else regex
        deadline = time.monotonic() + timeout
        i = start
        while True:
            while i < len(self.lines):
                m = rx.match(self.lines[i][1])
                if m:
                    return i, m
                i += 1
            if time.monotonic() > deadline:
                raise AssertionError(f"no line matching {rx.pattern!r} within {timeout}s\n{self.text()}")
            if self.proc is not None and self.proc.poll() is not None and self._pump_task is not None and self._pump_task.done():
                raise AssertionError(f"QEMU exited ({self.proc.returncode}) before {rx.pattern!r}\n{self.text()}")
            await asyncio.sleep(0.01)

    async def ready(self, timeout: float = 30.0) -> tuple[int, int, int]:
        _, m = await self.wait_line(READY_RE, timeout)
        return int(m.group(1)), int(m.group(2)), int(m.group(3))

    def heartbeat_lines(self, start: int = 0) -> list[Heartbeat]:
        out = []
        for t, line in self.lines[start:]:
            hb = Heartbeat.parse(line, t)
            if hb is not None:
                out.append(hb)
        return out

    async def heartbeats(self, count: int, timeout: float = 30.0, start: int = 0) -> list[Heartbeat]:
        """The first ``count`` heartbeats at line index >= start (waits for them)."""
        deadline = time.monotonic() + timeout
        while True:
            hbs = self.heartbeat_lines(start)
            if len(hbs) >= count:
                return hbs[:count]
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(hbs)}/{count} heartbeats within {timeout}s\n{self.text()}")
            await asyncio.sleep(0.01)

    async def send(self, command: str | bytes) -> int:
        """Write one console line; returns the current line index (for ``start=``)."""
        assert self._writer is not None
        data = command if isinstance(command, bytes) else command.encode()
        if not data.endswith(b"\n"):
            data += b"\n"
        mark = len(self.lines)
        self._writer.write(data)
        await self._writer.drain()
        return mark

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        if self.qmp is None:
            return []
        return [dict(e) for e in self.qmp.events.history if name is None or e["event"] == name]

    async def wait_event(self, name: str, timeout: float = 30.0, count: int = 1) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            evs = self.events(name)
            if len(evs) >= count:
                return evs[count - 1]
            if time.monotonic() > deadline:
                raise AssertionError(f"no QMP event {name} (#{count}) within {timeout}s; got {self.events()}\n{self.text()}")
            await asyncio.sleep(0.01)

    async def status(self) -> str:
        assert self.qmp is not None
        res = await self.qmp.execute("query-status")
        assert isinstance(res, dict)
        return str(res["status"])

    async def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"QEMU still running after {timeout}s\n{self.text()}")
            await asyncio.sleep(0.01)
        # let the console pump drain what QEMU wrote before it exited
        if self._pump_task is not None:
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(self._pump_task), 2)
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self) -> float:
        """utime + stime of the QEMU process so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------ KVM probe
async def _probe_kvm_async() -> tuple[bool, str]:
    vm = GuestVM(accel="kvm", smp=1, append="hb_ms=50", firmware="qboot" if qboot_path() else "seabios")
    try:
        with open(vm.err_path, "wb") as err:
            vm.proc = subprocess.Popen(vm.argv(), stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        _LIVE.add(vm.proc)
        deadline = time.monotonic() + 10
        while not vm.qmp_path.exists():
            if vm.proc.poll() is not None:
                return False, f"QEMU -accel kvm exited with {vm.proc.returncode}: {vm.stderr().strip()[-300:]}"
            if time.monotonic() > deadline:
                return False, "QEMU -accel kvm did not open its QMP socket"
            await asyncio.sleep(0.02)
        vm.qmp = await _qmp_connect(vm.qmp_path, "kvm-probe", time.monotonic() + 10)
        st = await vm.status()
        if st not in ("prelaunch", "paused"):
            return False, f"unexpected initial status {st!r}"
        await vm.qmp.execute("cont")
        await asyncio.sleep(0.7)
        if vm.proc.poll() is not None:
            return False, f"QEMU -accel kvm died after cont ({vm.proc.returncode}): {vm.stderr().strip()[-300:]}"
        st = await vm.status()
        if st != "running":
            return False, f"KVM guest not running after cont (status {st!r}): {vm.stderr().strip()[-300:]}"
        return True, "ok"
    except Exception as e:  # noqa: BLE001 - any failure means "not usable"
        return False, f"KVM probe failed: {e!r}"
    finally:
        await vm.close()


@functools.cache
def kvm_usable() -> tuple[bool, str]:
    """Is KVM usable here? (cached for the session)"""
    if os.environ.get("FLEETD_ACCEL") == "tcg":
        return False, "disabled by FLEETD_ACCEL=tcg"
    if not os.path.exists("/dev/kvm"):
        return False, "no /dev/kvm"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
    except OSError as e:
        return False, f"cannot open /dev/kvm read-write: {e.strerror}"
    if not IMAGE.exists():
        return False, "guest image not built"
    # Own thread and event loop: never entangled with the test's loop.
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, _probe_kvm_async()).result(timeout=60)


# ------------------------------------------------------------------------ fixtures
ACCELS = [pytest.param("tcg", id="tcg"), pytest.param("kvm", id="kvm", marks=pytest.mark.kvm)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # `accel`: every accelerator (kvm cases skip, with the reason, where KVM is unusable).
    # `accel_tcg`: TCG only (e.g. SeaBIOS cases: KVM cases use qboot); still named in the id.
    if "accel" in metafunc.fixturenames:
        metafunc.parametrize("accel", ACCELS, indirect=True)
    if "accel_tcg" in metafunc.fixturenames:
        metafunc.parametrize("accel_tcg", [pytest.param("tcg", id="tcg")], indirect=True)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # qemu.qmp is asyncio-only


@pytest.fixture(scope="session")
def guest_image() -> Path:
    """Build the guest once per session (fast no-op when up to date)."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed")
    if shutil.which("cargo") is not None:
        r = subprocess.run(["make", "-C", str(GUEST_DIR)], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            pytest.fail(f"building the guest failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    elif not IMAGE.exists():
        pytest.skip("no cargo and no prebuilt guest image")
    return IMAGE


@pytest.fixture
def accel(request: pytest.FixtureRequest, guest_image: Path) -> str:
    a: str = request.param
    if a == "kvm":
        ok, why = kvm_usable()
        if not ok:
            pytest.skip(f"KVM not usable: {why}")
    return a


@pytest.fixture
def accel_tcg(request: pytest.FixtureRequest, guest_image: Path) -> str:
    return str(request.param)


Launcher = Callable[..., Awaitable[GuestVM]]


@pytest.fixture
async def launch(anyio_backend: str, guest_image: Path) -> Any:
    """``vm = await launch(accel=..., smp=..., append=...)``; every VM is torn down after the test."""
    vms: list[GuestVM] = []

    async def _launch(**kw: Any) -> GuestVM:
        vm = GuestVM(**kw)
        vms.append(vm)
        await vm.start()
        return vm

    try:
        yield _launch
    finally:
        for vm in vms:
            await vm.close()


@pytest.fixture(autouse=True)
def _reap_qemu() -> Any:
    """Safety net: no QEMU survives a test, whatever happened in it."""
    yield
    for p in list(_LIVE):
        if p.poll() is None:
            p.kill()
        with contextlib.suppress(Exception):
            p.wait(10)
        _LIVE.discard(p)
