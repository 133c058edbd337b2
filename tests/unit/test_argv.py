"""argv builder: pure spec -> argv list, snapshot-tested."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fleetd.accel import AccelChoice
from fleetd.argv import Launch, VmPaths, build_argv, host_ports, replica_mac
from fleetd.errors import SpecError
from fleetd.spec import parse_spec

SNAP = Path(__file__).parent / "snapshots"
PATHS = VmPaths(Path("/run/fleetd/vm/web-0"), Path("/var/lib/fleetd/vms/web-0"))


def snapshot(name: str, argv: list[str]) -> None:
    path = SNAP / f"{name}.json"
    if os.environ.get("UPDATE_SNAPSHOTS") or not path.exists():
        path.write_text(json.dumps(argv, indent=1) + "\n")
    assert argv == json.loads(path.read_text()), f"argv differs from snapshot {path.name}"


def test_bundled_guest_tcg() -> None:
    spec = parse_spec({"kernel": "/opt/fleet-guest.elf", "cpus": 2,
                       "firmware": "/usr/share/qemu/qboot.rom"})
    argv = build_argv(spec, Launch("web-0", PATHS, AccelChoice("tcg", "max")))
    snapshot("custom_tcg", argv)
    # the parts fleetd owns, whatever the snapshot says
    assert argv[argv.index("-name") + 1] == "web-0,debug-threads=on"
    for flag in ("-S", "-nodefaults", "-no-user-config"):
        assert flag in argv
    assert argv[argv.index("-display") + 1] == "none"
    assert argv[argv.index("-pidfile") + 1] == "/run/fleetd/vm/web-0/qemu.pid"
    assert "socket,id=qmp,path=/run/fleetd/vm/web-0/qmp.sock,server=on,wait=off" in argv
    con = [a for a in argv if a.startswith("socket,id=con0,")][0]
    assert "logfile=/var/lib/fleetd/vms/web-0/console.log" in con
    assert argv[argv.index("-action") + 1] == "panic=pause"
    assert "pvpanic" in argv
    assert any(a.startswith("isa-debug-exit,iobase=0xf4") for a in argv)
    assert argv[argv.index("-smp") + 1] == "cpus=2"
    assert all(isinstance(a, str) for a in argv)


def test_bundled_kvm_workload_in_cmdline() -> None:
    spec = parse_spec({"cpus": 4, "workload": "spin", "append": "hb_ms=50",
                       "firmware": "seabios", "machine": "pc", "memory": "1G"})
    argv = build_argv(spec, Launch("a-1", PATHS, AccelChoice("kvm", "host,-arch-capabilities")))
    assert argv[argv.index("-append") + 1] == "workload=spin hb_ms=50"
    assert argv[argv.index("-accel") + 1] == "kvm"
    assert argv[argv.index("-cpu") + 1] == "host,-arch-capabilities"
    assert argv[argv.index("-m") + 1] == "1024M"
    assert "-bios" not in argv
    assert argv[argv.index("-machine") + 1] == "pc"


def test_default_workload_is_idle() -> None:
    argv = build_argv(parse_spec({}), Launch("x", PATHS, AccelChoice("tcg", "max")))
    assert argv[argv.index("-append") + 1] == "workload=idle"


def test_append_passes_byte_for_byte() -> None:
    text = 'vfs.fstab=[ "initrd0:/:extract:::" ] env.vars=[ "PATH=/usr/bin:/bin" ] -- /smp-poc'
    spec = parse_spec({"kernel": "/k", "initrd": "/i", "append": text})
    argv = build_argv(spec, Launch("x", PATHS, AccelChoice("tcg", "max")))
    assert argv[argv.index("-append") + 1] == text
    assert argv[argv.index("-initrd") + 1] == "/i"


def test_topology_and_network() -> None:
    spec = parse_spec({"kernel": "/k", "cpus": 6, "sockets": 2, "cores": 3, "threads": 1,
                       "network": {"ports": ["8080:80", "2222:22"]}, "rtc": "base=utc",
                       "no_reboot": True, "devices": ["virtio-rng-pci"]})
    argv = build_argv(spec, Launch("w-3", PATHS, AccelChoice("tcg", "max"), index=3, fleet="w"))
    assert argv[argv.index("-smp") + 1] == "cpus=6,sockets=2,cores=3,threads=1"
    netdev = argv[argv.index("-netdev") + 1]
    assert netdev == "user,id=net0,hostfwd=tcp:127.0.0.1:8083-:80,hostfwd=tcp:127.0.0.1:2225-:22"
    assert f"mac={replica_mac('02:fd', 'w', 3)}" in argv[argv.index("-netdev") + 3]
    assert host_ports(spec, 3) == [("tcp", 8083, 80), ("tcp", 2225, 22)]
    assert "-no-reboot" in argv and argv[argv.index("-rtc") + 1] == "base=utc"
    assert "virtio-rng-pci" in argv


def test_macs_unique_per_replica() -> None:
    macs = {replica_mac("02:fd", "web", i) for i in range(256)}
    assert len(macs) == 256
    assert all(m.startswith("02:fd:") and len(m) == 17 for m in macs)


def test_comma_in_path_is_escaped() -> None:
    paths = VmPaths(Path("/tmp/a,b"), Path("/tmp/s,t"))
    argv = build_argv(parse_spec({"kernel": "/k"}), Launch("x", paths, AccelChoice("tcg", "max")))
    assert "socket,id=qmp,path=/tmp/a,,b/qmp.sock,server=on,wait=off" in argv


def test_gdb_unix_and_tcp() -> None:
    spec = parse_spec({"kernel": "/k", "gdb": True})
    argv = build_argv(spec, Launch("x", PATHS, AccelChoice("tcg", "max")))
    assert argv[argv.index("-gdb") + 1] == "unix:/run/fleetd/vm/web-0/gdb.sock,server=on,wait=off"
    argv = build_argv(spec, Launch("x", PATHS, AccelChoice("tcg", "max"), gdb_port=1234))
    assert argv[argv.index("-gdb") + 1] == "tcp:127.0.0.1:1234"


def test_socket_path_length_checked() -> None:
    long = VmPaths(Path("/tmp/" + "d" * 100), Path("/tmp"))
    with pytest.raises(SpecError, match="too long for AF_UNIX"):
        long.check()
