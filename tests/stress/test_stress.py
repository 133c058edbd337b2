"""Bounded stress tests against a real fleetd and real QEMU: nothing may leak or break.

* start/stop cycles of 32 idle guests (plain ``rm``; ``stop`` then ``rm``; SIGKILLed guests
  restarted by policy; ``scale`` up and down): afterwards no QEMU, no per-VM runtime dirs or
  sockets, no state file of a removed fleet; the daemon's fds back to their baseline and its
  RSS growth bounded;
* 200 concurrent API clients while a fleet runs (each calling ps/info/inspect, a quarter of
  them also holding ``events``/``logs`` subscriptions they drop without a goodbye): every
  reply well-formed, no error, the daemon still serving, its fds back to their baseline.

The whole file takes well under a minute on a 2-core machine. No timing is asserted.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from fleetctl.client import Client
from tests.integration.daemon import DaemonProc

pytestmark = pytest.mark.usefixtures("guest_kernel", "no_leaked_qemu")

IDLE_1CPU = {"cpus": 1, "workload": "idle"}
#: fds the daemon may hold above its baseline afterwards (logger, epoll, lazily opened files)
FD_MARGIN = 4
RSS_GROWTH_LIMIT = 40 * 2**20


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def start_healthy(d: DaemonProc, name: str, n: int, timeout: float = 90.0) -> list[Any]:
    """Start an n-replica idle fleet and wait until every replica is healthy."""
    res = d.call("start", name=name, replicas=n, spec=IDLE_1CPU)
    assert res.replicas == [f"{name}-{i}" for i in range(n)]
    return d.wait_healthy(name, n, timeout=timeout)


def settle(d: DaemonProc, baseline: int, what: str) -> int:
    """Wait (bounded) for the daemon's fd count to come back near ``baseline``; return it."""
    assert d.pid is not None
    return d.wait_for(lambda: (n := fds(d.pid)) <= baseline + FD_MARGIN and n, 15,
                      f"{what}: daemon fds back to {baseline} + {FD_MARGIN} "
                      f"(now {fds(d.pid)})")


@pytest.mark.stress
@pytest.mark.timeout(240)
def test_start_stop_cycles_leave_nothing_behind(daemon: DaemonProc) -> None:
    d = daemon
    assert d.pid is not None
    run_vm = d.run_dir / "vm"
    state_fleets = d.state_dir / "fleets"
    # warm-up: the first guest pays one-time costs (imports, caches) that are not leaks
    start_healthy(d, "warm", 1)
    assert d.call("rm", targets=["warm"]).errors == {}
    d.wait_for(lambda: not d.guests(), 15, "warm-up QEMU gone")
    time.sleep(0.5)
    fd0, rss0 = fds(d.pid), rss(d.pid)
    cycles = 6
    for cycle in range(cycles):
        name = f"cyc{cycle}"
        rows = start_healthy(d, name, 32)
        pids = {r.pid for r in rows}
        assert None not in pids and len(pids) == 32
        assert d.guests() == pids, "exactly the fleet's QEMUs run"
        assert fds(d.pid) > fd0 + 32, "the daemon holds fds for its guests (sanity)"
        if cycle % 3 == 1:      # crash a few guests: post-mortem, backoff, restart
            victims = rows[:4]
            for r in victims:
                os.kill(r.pid, 9)
            d.wait_for(lambda: all((x := d.call("ps", targets=[r.name]).replicas[0]).restarts == 1
                                   and x.health == "healthy" for r in victims), 60,
                       f"cycle {cycle}: killed guests restarted")
            assert len(d.guests()) == 32, "a crashed guest's QEMU is gone, its replacement runs"
        if cycle % 3 == 2:      # scale up, then down below the start size
            res = d.call("scale", fleet=name, replicas=40)
            assert len(res.added) == 8
            d.wait_healthy(name, 40, timeout=90)
            res = d.call("scale", fleet=name, replicas=16)
            assert len(res.removed) == 24
            d.wait_for(lambda: len(d.guests()) == 16, 30, f"cycle {cycle}: scaled down to 16 QEMUs")
        if cycle % 2:           # stop everything first, then remove
            res = d.call("stop", targets=[name])
            assert res.errors == {}
            d.wait_for(lambda: not d.guests(), 30, f"cycle {cycle}: stopped QEMUs gone")
            assert all(r.state == "stopped" for r in d.call("ps", targets=[name]).replicas)
        res = d.call("rm", targets=[name])
        assert res.errors == {} and len(res.done) == (16 if cycle % 3 == 2 else 32)
        assert d.call("ps").replicas == []
        d.wait_for(lambda: not d.guests(), 15, f"cycle {cycle}: every QEMU gone")
        d.wait_for(lambda: not run_vm.exists() or not any(run_vm.iterdir()), 15,
                   f"cycle {cycle}: per-VM runtime dirs (sockets) removed")
        d.wait_for(lambda: not (state_fleets / f"{name}.json").exists(), 15,
                   f"cycle {cycle}: state file of the removed fleet deleted")
        settle(d, fd0, f"cycle {cycle}")
        print(f"cycle {cycle}: fds {fds(d.pid)} (baseline {fd0}), "
              f"RSS {rss(d.pid) / 2**20:.1f} MiB (baseline {rss0 / 2**20:.1f})")
    leftovers = sorted(p.name for p in state_fleets.glob("*")) if state_fleets.exists() else []
    assert leftovers == [], f"state entries left: {leftovers}"
    assert not list(d.run_dir.rglob("*.sock")) or {p.name for p in d.run_dir.rglob("*.sock")} == {
        "fleetd.sock"}, "only the control socket may remain under the run dir"
    info = d.call("info")
    assert info.fleets == 0 and info.replicas == 0
    growth = rss(d.pid) - rss0
    assert growth < RSS_GROWTH_LIMIT, f"daemon RSS grew by {growth / 2**20:.1f} MiB over {cycles} cycles"


@pytest.mark.stress
@pytest.mark.timeout(180)
def test_200_concurrent_clients(daemon: DaemonProc) -> None:
    d = daemon
    assert d.pid is not None
    n_guests, n_clients, rounds = 4, 200, 3
    start_healthy(d, "api", n_guests)
    names = [f"api-{i}" for i in range(n_guests)]
    time.sleep(0.3)
    fd0 = fds(d.pid)
    barrier = threading.Barrier(n_clients)
    errors: list[str] = []
    replies = [0] * n_clients

    def client(k: int) -> None:
        sub: Client | None = None
        try:
            with Client(d.socket, timeout=60) as c:
                c.connect()
                if k % 4 == 0:                    # a subscriber that will vanish mid-stream
                    sub = Client(d.socket, timeout=60)
                    if k % 8 == 0:
                        res, _ = sub.stream("events", follow=True, tail=5)
                        assert isinstance(res.events, list)
                    else:
                        res, _ = sub.stream("logs", name=names[k % n_guests], follow=True, tail=3)
                        assert res.name == names[k % n_guests]
                barrier.wait(timeout=60)          # everyone connected at once
                for r in range(rounds):
                    ps = c.call("ps")
                    got = sorted(row.name for row in ps.replicas)
                    assert got == names, f"ps: {got}"
                    assert all(row.state == "running" and row.pid for row in ps.replicas)
                    info = c.call("info")
                    assert info.pid == d.pid and info.replicas == n_guests and info.fleets == 1
                    name = names[(k + r) % n_guests]
                    det = c.call("inspect", name=name)
                    assert det.name == name and det.fleet == "api" and len(det.vcpus) == 1
                    assert det.argv and det.spec["workload"] == "idle"
                    replies[k] += 3
                if sub is not None:
                    sub.poll(timeout=0.2)         # whatever streamed meanwhile must parse
        except BaseException as err:  # noqa: BLE001 - collected and asserted below
            errors.append(f"client {k}: {type(err).__name__}: {err}")
        finally:
            if sub is not None:
                sub.close()                       # no goodbye: the daemon must clean up

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert errors == [], f"{len(errors)} clients failed:\n" + "\n".join(errors[:10])
    assert sum(replies) == n_clients * rounds * 3
    # still serving, still supervising
    print(f"daemon fds: baseline {fd0}, after the clients {fds(d.pid)}")
    rows = d.call("ps").replicas
    assert len(rows) == n_guests and all(r.health == "healthy" for r in rows)
    settle(d, fd0, "after 200 clients")
    stats = d.call("stats")
    assert stats.daemon["api_connections"] == 1, stats.daemon   # just this call's
    assert d.call("rm", targets=["api"]).errors == {}
