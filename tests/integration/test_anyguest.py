"""Run any guest: port forwards and their conflicts, gdb debug mode, missing files, configs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fleetctl.client import ApiError
from tests.integration.daemon import ROOT, DaemonProc

pytestmark = pytest.mark.usefixtures("guest_kernel")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_port_conflict_with_host_socket_is_clear_and_starts_nothing(daemon: DaemonProc) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        with pytest.raises(ApiError) as info:
            daemon.call("start", name="pc", replicas=2,
                        spec={"cpus": 1, "network": {"ports": [f"{port - 1}:80"]}})
        msg = str(info.value)
        assert f"port {port}/tcp" in msg and f"pid {os.getpid()}" in msg, msg
        assert info.value.code == "conflict"
        assert daemon.call("ps").replicas == [] and not daemon.guests()
    finally:
        holder.close()


def test_ports_forwarded_per_replica_and_checked_across_fleets(daemon: DaemonProc) -> None:
    base = free_port()
    daemon.call("start", name="net", replicas=2,
                spec={"cpus": 1, "network": {"ports": [f"{base}:8080"]}})
    rows = daemon.wait_healthy("net", 2)
    assert rows[0].ports == [f"127.0.0.1:{base}->8080/tcp"]
    assert rows[1].ports == [f"127.0.0.1:{base + 1}->8080/tcp"]
    # QEMU (slirp) really listens on them
    for r in rows:
        port = int(r.ports[0].split(":")[1].split("-")[0])
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    with pytest.raises(ApiError, match=rf"port {base + 1}/tcp .* already forwarded to net-1"):
        daemon.call("start", name="net2", replicas=1,
                    spec={"cpus": 1, "network": {"ports": [f"{base + 1}:22"]}})
    daemon.call("rm", targets=["net"])
    # stopping frees the ports
    for p in (base, base + 1):
        s = socket.socket()
        s.bind(("127.0.0.1", p))
        s.close()


def test_missing_initrd_reported_before_any_qemu(daemon: DaemonProc, tmp_path: Path) -> None:
    with pytest.raises(ApiError, match="initrd: file not found"):
        daemon.call("start", name="mi", spec={"kernel": str(ROOT / "guest/build/fleet-guest.elf"),
                                              "initrd": str(tmp_path / "nope.cpio")})
    assert not daemon.guests()


@pytest.mark.skipif(not os.path.exists("/usr/bin/gdb"), reason="gdb not installed")
def test_gdb_attaches_to_a_debug_replica(daemon: DaemonProc) -> None:
    res = daemon.call("start", name="dbg", replicas=1, spec={"cpus": 2}, debug=True)
    note = next(n for n in res.notes if "halted for gdb" in n)
    row = daemon.wait_for(lambda: (r := daemon.call("ps").replicas[0]).state == "paused" and r,
                          20, "halted")
    det = daemon.call("inspect", name="dbg-0")
    assert det.gdb and det.gdb.startswith("127.0.0.1:")
    assert "-gdb" in det.argv
    port = int(det.gdb.split(":")[1])
    assert f"target remote 127.0.0.1:{port}" in note and "fleet-guest.debug.elf" in note
    # the guest has not run a single instruction: no BOOT line yet
    assert "FLEET BOOT" not in "\n".join(daemon.call("logs", name="dbg-0", tail=50).lines)
    sym = ROOT / "guest/build/fleet-guest.debug.elf"
    out = subprocess.run(["gdb", "-nx", "-batch", "-ex", f"file {sym}",
                          "-ex", f"target remote 127.0.0.1:{port}",
                          "-ex", "info registers rip", "-ex", "detach"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "rip" in out.stdout, out.stdout
    # detached: the guest runs and becomes ready; health timeouts were suspended meanwhile
    row = daemon.wait_for(lambda: (r := daemon.call("ps").replicas[0]).health == "healthy" and r,
                          30, "guest ready after gdb detached")
    assert row.guest_cpus_online == 2 and row.restarts == 0


def test_debug_command_restarts_a_replica_halted(daemon: DaemonProc) -> None:
    daemon.call("start", name="dc", replicas=1, spec={"cpus": 1})
    daemon.wait_healthy("dc", 1)
    env = {**os.environ, "FLEETD_SOCKET": str(daemon.socket), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "fleetctl.main", "debug", "dc-0"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "gdb -ex 'target remote 127.0.0.1:" in r.stdout
    row = daemon.call("ps").replicas[0]
    assert row.state == "paused" and row.restarts == 1
