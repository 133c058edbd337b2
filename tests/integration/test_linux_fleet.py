"""A fleet of real Linux guests through fleetd (configs/linux-busybox.toml), under TCG."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request

import pytest

from fleetctl.main import build_start_request
from tests.integration.daemon import ROOT, DaemonProc

BUILD = ROOT / "guest" / "linux" / "build.sh"


def free_base(n: int) -> int:
    """A port p with p..p+n-1 all free on 127.0.0.1."""
    for _ in range(50):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        base = s.getsockname()[1]
        s.close()
        if base + n >= 65535:
            continue
        ok = True
        for p in range(base, base + n):
            t = socket.socket()
            try:
                t.bind(("127.0.0.1", p))
            except OSError:
                ok = False
            finally:
                t.close()
        if ok:
            return base
    raise RuntimeError("no free port range")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_linux_fleet_healthy_serves_each_replica_and_frees_ports(daemon: DaemonProc) -> None:
    r = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    req = build_start_request(config=ROOT / "configs" / "linux-busybox.toml")
    base = free_base(2)
    req["spec"]["network"] = {"model": "virtio-net-pci", "ports": [f"{base}:8080"]}
    req["name"] = "lin"
    t0 = time.monotonic()
    res = daemon.call("start", **req)
    assert res.replicas == ["lin-0", "lin-1"]
    rows = daemon.wait_healthy("lin", 2, timeout=240)
    took = time.monotonic() - t0
    print(f"2x2 Linux fleet healthy in {took:.1f}s (TCG)")
    assert all(r.accel == "tcg" and r.guest_cpus_online == 2 for r in rows)
    for i, row in enumerate(rows):
        port = base + i
        assert row.ports == [f"127.0.0.1:{port}->8080/tcp"]
        body = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                    body = resp.read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert f"lin-{i}" in body, (port, body)
    daemon.call("stop", targets=["lin"])
    assert not daemon.guests()
    for p in (base, base + 1):
        s = socket.socket()
        s.bind(("127.0.0.1", p))      # the forwards are gone with their QEMUs
        s.close()
