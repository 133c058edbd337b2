"""The Linux guest profile (guest/linux/) with plain QEMU under TCG: FLEET protocol, SMP, HTTP.

Builds the profile with guest/linux/build.sh (apt-get download of Debian 12's stock kernel and
busybox-static; a no-op when up to date), boots one guest with 2 vCPUs, and checks FLEET BOOT,
FLEET READY cpus=2/2, heartbeats whose two per-CPU counters advance, the HTTP server on the
forwarded port answering with the SMBIOS serial (the replica name), and the console command
``exit 7`` ending QEMU through isa-debug-exit.

TCG only: on this project's machines /dev/kvm is a nested, software-assisted KVM (kvm_pvm) under
which this kernel does not boot at all (guest/linux/README.md). The fleetd-level test (fleetctl
start --config configs/linux-busybox.toml) belongs next to the daemon tests.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fleetd.guestproto import GuestBoot, GuestEvent, GuestExit, GuestHeartbeat, GuestReady, parse_line
from tests.conftest import ROOT

LINUX = ROOT / "guest" / "linux"
BUILD_SH = LINUX / "build.sh"
KERNEL = LINUX / "build" / "vmlinuz"
INITRD = LINUX / "build" / "initramfs.cpio.gz"
APPEND = "console=ttyS0 hb_ms=1000"
NAME = "lin-0"
READY_TIMEOUT = 180.0   # QEMU start -> FLEET READY; ~5-10 s here, generous for a loaded CI machine

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leaked_qemu")]


@pytest.fixture(scope="module")
def linux_profile() -> tuple[Path, Path]:
    """guest/linux/build/{vmlinuz,initramfs.cpio.gz}, built (or confirmed up to date) by build.sh.

    Skipped only where apt-get does not exist: build.sh takes the kernel and busybox from
    Debian's packages (apt-get download), so a non-Debian host cannot build the profile. On a
    Debian host (CI) a failing build is a test failure, not a skip.
    """
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        if KERNEL.is_file() and INITRD.is_file():
            return KERNEL, INITRD
        pytest.skip("apt-get/dpkg-deb not available: guest/linux/build.sh needs Debian's packages")
    proc = subprocess.run(["bash", str(BUILD_SH)], capture_output=True, text=True, timeout=240,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"build.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert KERNEL.is_file() and INITRD.is_file(), proc.stderr
    return KERNEL, INITRD


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Console:
    """Reads the guest's serial console (a unix socket) in a thread; lines with arrival times."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.lines: list[tuple[float, str]] = []
        self.events: list[tuple[float, GuestEvent]] = []
        self.closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = b""
        try:
            while True:
                data = self.sock.recv(4096)
                if not data:
                    break
                buf += data
                while b"\n" in buf:
                    raw, buf = buf.split(b"\n", 1)
                    line = raw.decode("utf-8", "replace").rstrip("\r")
                    now = time.monotonic()
                    with self._cond:
                        self.lines.append((now, line))
                        ev = parse_line(line)
                        if ev is not None:
                            self.events.append((now, ev))
                        self._cond.notify_all()
        except OSError:
            pass
        finally:
            with self._cond:
                self.closed = True
                self._cond.notify_all()

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode() + b"\n")

    def wait(self, pred, timeout: float, what: str):
        """Wait until ``pred(events)`` is truthy; fail with the console's tail."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (res := pred([e for _, e in self.events])):
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    break
                self._cond.wait(min(left, 0.5))
            if not res:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; console:\n"
                            + self.tail())
            return res

    def first(self, kind: type) -> tuple[float, GuestEvent] | None:
        with self._cond:
            return next(((t, e) for t, e in self.events if isinstance(e, kind)), None)

    def tail(self, n: int = 40) -> str:
        return "\n".join(line for _, line in self.lines[-n:])

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)


def _http_get(port: int, timeout: float = 20.0) -> str:
    """GET / on 127.0.0.1:port (never through a proxy); retried while the forward settles."""
    deadline = time.monotonic() + timeout
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/")
            resp = conn.getresponse()
            body = resp.read().decode("utf-8", "replace")
            assert resp.status == 200, (resp.status, body)
            return body
        except (OSError, http.client.HTTPException):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
        finally:
            conn.close()


def _boot(short_tmp: Path, kernel: Path, initrd: Path) -> tuple[subprocess.Popen, Console, int, float]:
    """Start QEMU (retrying if the host port was taken meanwhile) and attach to its console."""
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu, "qemu-system-x86_64 not installed (apt-get install qemu-system-x86)"
    err = ""
    for attempt in range(3):
        port = _free_port()
        sock = short_tmp / f"con{attempt}.sock"
        argv = [qemu, "-smp", "2", "-m", "256M", "-accel", "tcg", "-machine", "q35",
                "-nodefaults", "-no-user-config", "-display", "none",
                # wait=on: QEMU starts the guest only once we are connected: no line is lost
                "-chardev", f"socket,id=con0,path={sock},server=on,wait=on",
                "-serial", "chardev:con0",
                "-kernel", str(kernel), "-initrd", str(initrd), "-append", APPEND,
                "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:8080",
                "-device", "virtio-net-pci,netdev=n0",
                "-smbios", f"type=1,serial={NAME}",
                "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
        t0 = time.monotonic()
        with open(short_tmp / "qemu.err", "w") as err_file:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err_file)
        while not sock.exists() and proc.poll() is None and time.monotonic() - t0 < 30:
            time.sleep(0.02)
        if proc.poll() is None and sock.exists():
            try:
                return proc, Console(sock), port, t0
            except OSError:
                proc.kill()
                proc.wait()
                raise
        proc.kill()
        proc.wait()
        err = (short_tmp / "qemu.err").read_text()
        if "hostfwd" not in err and "host forwarding" not in err:
            pytest.fail(f"QEMU did not start ({proc.returncode}): {err}")
    pytest.fail(f"QEMU could not forward a free port three times: {err}")


@pytest.mark.timeout(300)
def test_linux_guest_boots_smp_serves_http_and_exits(linux_profile: tuple[Path, Path],
                                                     short_tmp: Path) -> None:
    kernel, initrd = linux_profile
    proc, con, port, t0 = _boot(short_tmp, kernel, initrd)
    try:
        boot = con.wait(lambda evs: next((e for e in evs if isinstance(e, GuestBoot)), None),
                        READY_TIMEOUT, "FLEET BOOT")
        assert boot.proto == 1 and boot.cmdline == APPEND, boot

        ready = con.wait(lambda evs: next((e for e in evs if isinstance(e, GuestReady)), None),
                         READY_TIMEOUT, "FLEET READY")
        assert (ready.online, ready.expected) == (2, 2), ready
        assert ready.bringup_us is not None and ready.bringup_us >= 0, ready

        def three_heartbeats(evs: list[GuestEvent]) -> list[GuestHeartbeat] | None:
            hbs = [e for e in evs if isinstance(e, GuestHeartbeat)]
            return hbs if len(hbs) >= 3 else None

        hbs = con.wait(three_heartbeats, 30, "three FLEET HB lines")
        assert all(len(h.counters) == 2 for h in hbs), hbs
        assert [h.seq for h in hbs] == list(range(1, len(hbs) + 1)), hbs
        assert all(b.up_ms > a.up_ms for a, b in zip(hbs, hbs[1:])), hbs
        for a, b in zip(hbs, hbs[1:]):
            assert all(y >= x for x, y in zip(a.counters, b.counters)), (a, b)
        assert all(y > x for x, y in zip(hbs[0].counters, hbs[-1].counters)), hbs

        body = _http_get(port)
        assert NAME in body, body

        t_ready = con.first(GuestReady)[0] - t0
        t_hb = con.first(GuestHeartbeat)[0] - t0
        print(f"linux guest under TCG, -smp 2: QEMU start -> FLEET READY {t_ready:.1f} s, "
              f"-> first FLEET HB {t_hb:.1f} s, bringup_us={ready.bringup_us}")

        # A console command: FLEET EXIT, then QEMU exits through isa-debug-exit: (7 << 1) | 1.
        con.send("exit 7")
        ex = con.wait(lambda evs: next((e for e in evs if isinstance(e, GuestExit)), None),
                      30, "FLEET EXIT")
        assert ex.code == 7
        assert proc.wait(30) == 15
        assert not any("Kernel panic" in line or "FLEET PANIC" in line for _, line in con.lines), \
            con.tail()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        con.close()
