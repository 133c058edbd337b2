"""Build QEMU's argv from a guest spec: a pure function, never a shell string.

fleetd owns these parts of every command line: ``-S`` (start paused, so
vCPUs are pinned before the first guest instruction), ``-nodefaults
-no-user-config -display none``, ``-name <vm>,debug-threads=on`` (named
threads), ``-pidfile``, the QMP socket, the serial console as a unix-socket
chardev with ``logfile=`` (every byte lands on disk even with nobody
connected), ``-device pvpanic`` with ``-action panic=pause`` (QEMU stays up
for a post-mortem) and ``-device isa-debug-exit``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fleetd.accel import AccelChoice
from fleetd.errors import SpecError
from fleetd.spec import GuestSpec

AF_UNIX_MAX = 107
DEBUG_EXIT_IOBASE = 0xF4


@dataclass(frozen=True)
class VmPaths:
    """Where one VM's files live: sockets under a short runtime dir, logs under the state dir."""

    run_dir: Path
    state_dir: Path

    @property
    def qmp(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def console(self) -> Path:
        return self.run_dir / "con.sock"

    @property
    def gdb(self) -> Path:
        return self.run_dir / "gdb.sock"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "qemu.pid"

    @property
    def console_log(self) -> Path:
        return self.state_dir / "console.log"

    @property
    def stdout(self) -> Path:
        return self.state_dir / "qemu.out"

    @property
    def stderr(self) -> Path:
        return self.state_dir / "qemu.err"

    def check(self) -> None:
        """Raise if a socket path is too long for AF_UNIX (107 bytes).

        Raises:
            SpecError: naming the path.
        """
        for p in (self.qmp, self.console, self.gdb):
            if len(str(p).encode()) > AF_UNIX_MAX:
                raise SpecError(f"socket path too long for AF_UNIX ({len(str(p))} > {AF_UNIX_MAX}): "
                                f"{p}; use a shorter runtime directory", field="socket", path=str(p))


@dataclass(frozen=True)
class Launch:
    """Per-replica facts the argv needs beyond the spec."""

    name: str
    paths: VmPaths
    accel: AccelChoice
    index: int = 0
    fleet: str = ""
    gdb_port: int | None = None        # None with spec.gdb: gdbstub on the unix socket
    qemu: str = "qemu-system-x86_64"


def _opt(path: Path | str) -> str:
    """Escape a value for QEMU's key=value option syntax (a comma is doubled)."""
    return str(path).replace(",", ",,")


def replica_mac(prefix: str, fleet: str, index: int) -> str:
    """A stable, unique, locally administered MAC for replica ``index`` of ``fleet``."""
    digest = hashlib.sha256(f"{fleet}/{index}".encode()).digest()
    return prefix + "".join(f":{b:02x}" for b in digest[:4])


def host_ports(spec: GuestSpec, index: int) -> list[tuple[str, int, int]]:
    """(proto, host port, guest port) forwards of replica ``index``: host port is base + index."""
    if spec.network is None:
        return []
    return [(p.proto, p.host + index, p.guest) for p in spec.network.ports]


def build_argv(spec: GuestSpec, launch: Launch) -> list[str]:
    """The complete QEMU argv for one replica. Pure: reads no files, starts nothing."""
    p = launch.paths
    smp = f"cpus={spec.cpus}"
    for key in ("sockets", "cores", "threads"):
        val = getattr(spec, key)
        if val is not None:
            smp += f",{key}={val}"
    accel = "kvm" if launch.accel.accel == "kvm" else "tcg,thread=multi"
    argv = [
        launch.qemu,
        "-name", f"{_opt(launch.name)},debug-threads=on",
        "-S", "-nodefaults", "-no-user-config", "-display", "none",
        "-machine", spec.machine,
        "-accel", accel,
        "-cpu", launch.accel.cpu_model,
        "-smp", smp,
        "-m", f"{spec.memory}M",
    ]
    fw = spec.firmware_path()
    if fw is not None:
        argv += ["-bios", str(fw)]
    argv += ["-kernel", str(spec.kernel_path)]
    if spec.initrd is not None:
        argv += ["-initrd", str(spec.initrd)]
    cmdline = spec.guest_cmdline()
    if cmdline:
        argv += ["-append", cmdline]
    argv += [
        "-pidfile", str(p.pidfile),
        "-chardev", f"socket,id=qmp,path={_opt(p.qmp)},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", f"socket,id=con0,path={_opt(p.console)},server=on,wait=off,"
                    f"logfile={_opt(p.console_log)},logappend=on",
        "-serial", "chardev:con0",
        "-device", "pvpanic",
        "-action", "panic=pause",
        "-device", f"isa-debug-exit,iobase={DEBUG_EXIT_IOBASE:#x},iosize=0x04",
    ]
    # who am I, for guests that care (Linux: /sys/class/dmi/id/product_serial)
    argv += ["-smbios", f"type=1,manufacturer=fleetd,product={_opt(launch.fleet or launch.name)},"
                        f"serial={_opt(launch.name)}"]
    if spec.rtc:
        argv += ["-rtc", spec.rtc]
    if spec.no_reboot:
        argv += ["-no-reboot"]
    if spec.network is not None:
        fwds = "".join(f",hostfwd={proto}:127.0.0.1:{h}-:{g}"
                       for proto, h, g in host_ports(spec, launch.index))
        argv += ["-netdev", f"user,id=net0{fwds}",
                 "-device", f"{spec.network.model},netdev=net0,"
                            f"mac={replica_mac(spec.network.mac_prefix, launch.fleet or launch.name, launch.index)}"]
    if spec.gdb:
        target = f"tcp:127.0.0.1:{launch.gdb_port}" if launch.gdb_port else (
            f"unix:{_opt(p.gdb)},server=on,wait=off")
        argv += ["-gdb", target]
    for dev in spec.devices:
        argv += ["-device", dev]
    argv += list(spec.extra_args)
    return argv
