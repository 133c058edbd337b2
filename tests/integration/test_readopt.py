"""Survive the daemon: persisted state, re-adoption after kill -9 / SIGTERM, bad state files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import qemu_pids
from tests.integration.daemon import DaemonProc
from fleetd.process import proc_start_time

pytestmark = pytest.mark.usefixtures("guest_kernel", "no_leaked_qemu")


@pytest.fixture
def dirs(short_tmp: Path, tmp_path: Path) -> tuple[Path, Path]:
    return short_tmp, tmp_path / "state"


def fresh(dirs: tuple[Path, Path]) -> DaemonProc:
    return DaemonProc(*dirs).start()


def cleanup(d: DaemonProc) -> None:
    d.stop(stop_guests=True)
    for pid in d.guests():
        os.kill(pid, signal.SIGKILL)


def test_kill9_then_restart_adopts_same_pids(dirs: tuple[Path, Path]) -> None:
    d = fresh(dirs)
    d.call("start", name="w", replicas=4, spec={"cpus": 2})
    rows = d.wait_healthy("w", 4)
    pids = {r.name: r.pid for r in rows}
    # restarts survive too: give w-1 one restart first
    os.kill(pids["w-1"], signal.SIGKILL)
    d.wait_for(lambda: (r := d.call("ps", targets=["w-1"]).replicas[0]).restarts == 1
               and r.health == "healthy", 30, "w-1 restarted")
    pids["w-1"] = d.call("ps", targets=["w-1"]).replicas[0].pid
    d.kill9()
    assert set(pids.values()) <= d.guests(), "guests must survive the daemon"
    os.kill(pids["w-3"], signal.SIGKILL)          # dies while nobody watches
    time.sleep(0.2)
    d2 = DaemonProc(*dirs).start()
    try:
        rows = {r.name: r for r in d2.wait_healthy("w", 4)}
        for name in ("w-0", "w-1", "w-2"):
            assert rows[name].pid == pids[name], f"{name} not re-adopted"
            assert rows[name].guest_cpus_online == 2
        assert rows["w-0"].restarts == 0 and rows["w-1"].restarts == 1
        assert rows["w-3"].pid != pids["w-3"] and rows["w-3"].restarts == 1
        assert "while fleetd was not running" in rows["w-3"].last_failure
        assert len(d2.guests()) == 4, "no duplicate QEMU"
        info = d2.call("info")
        assert info.readopt_s is not None and info.problems == []
        # supervision really resumed: a crash after adoption is detected and restarted
        os.kill(pids["w-0"], signal.SIGKILL)
        d2.wait_for(lambda: (r := d2.call("ps", targets=["w-0"]).replicas[0]).restarts == 1
                    and r.health == "healthy", 30, "w-0 restarted after adoption")
        det = d2.call("inspect", name="w-2")
        assert [v.cpus_allowed_list for v in det.vcpus] and all(v.allowed for v in det.vcpus)
    finally:
        cleanup(d2)


def test_sigterm_detaches_then_adopts_and_stop_guests_leaves_nothing(dirs: tuple[Path, Path]) -> None:
    d = fresh(dirs)
    d.call("start", name="t", replicas=2, spec={"cpus": 1})
    pids = {r.name: r.pid for r in d.wait_healthy("t", 2)}
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0
    assert set(pids.values()) <= d.guests()
    d2 = DaemonProc(*dirs).start()
    try:
        rows = d2.wait_healthy("t", 2)
        assert {r.name: r.pid for r in rows} == pids
    finally:
        assert d2.stop(stop_guests=True) == 0
    assert not d2.guests(), "daemon stop --stop-guests must leave nothing running"
    d3 = DaemonProc(*dirs).start()
    try:
        rows = d3.call("ps").replicas
        assert [r.state for r in rows] == ["stopped", "stopped"]
        assert not d3.guests()
    finally:
        cleanup(d3)


def test_reused_pid_is_neither_adopted_nor_killed(dirs: tuple[Path, Path]) -> None:
    d = fresh(dirs)
    d.call("start", name="u", replicas=1, spec={"cpus": 1})
    qpid = d.wait_healthy("u", 1)[0].pid
    d.kill9()
    os.kill(qpid, signal.SIGKILL)
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        f = dirs[1] / "fleets" / "u.json"
        doc = json.loads(f.read_text())
        doc["replicas"]["0"]["pid"] = sleeper.pid
        doc["replicas"]["0"]["start_time"] = proc_start_time(sleeper.pid)
        f.write_text(json.dumps(doc))
        d2 = DaemonProc(*dirs).start()
        try:
            row = d2.wait_healthy("u", 1)[0]
            assert row.pid != sleeper.pid
            assert sleeper.poll() is None, "a process that is not our QEMU must not be killed"
        finally:
            cleanup(d2)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_corrupt_state_file_is_kept_and_others_adopted(dirs: tuple[Path, Path]) -> None:
    d = fresh(dirs)
    d.call("start", name="good", replicas=1, spec={"cpus": 1})
    d.call("start", name="bad", replicas=1, spec={"cpus": 1})
    good = d.wait_healthy("good", 1)[0].pid
    bad = d.wait_healthy("bad", 1)[0].pid
    d.kill9()
    f = dirs[1] / "fleets" / "bad.json"
    f.write_bytes(f.read_bytes()[:40])            # truncated mid-write
    d2 = DaemonProc(*dirs).start()
    try:
        assert d2.wait_healthy("good", 1)[0].pid == good
        info = d2.call("info")
        assert any("bad.json" in p and "unreadable" in p for p in info.problems), info.problems
        assert list(f.parent.glob("bad.json.corrupt-*")), "a copy of the corrupt file is kept"
        assert bad in qemu_pids(), "what fleetd cannot identify it must not kill"
        assert "bad.json" in d2.log_tail(200)
    finally:
        cleanup(d2)
        os.kill(bad, signal.SIGKILL)


def test_failed_state_write_never_touches_guests(dirs: tuple[Path, Path]) -> None:
    d = fresh(dirs)
    try:
        d.call("start", name="ro", replicas=1, spec={"cpus": 1})
        row = d.wait_healthy("ro", 1)[0]
        blocker = dirs[1] / "fleets" / "ro.json.partial"
        blocker.mkdir()                              # every write of ro.json now fails
        os.kill(row.pid, signal.SIGKILL)
        d.wait_for(lambda: (r := d.call("ps").replicas[0]).restarts == 1 and r.health == "healthy",
                   30, "restarted despite failed writes")
        info = d.call("info")
        assert info.store["failures"] >= 1 and "ro.json" in info.store["last_error"]
        blocker.rmdir()
        d.wait_for(lambda: d.call("info").store["last_error"] is None, 10, "store recovered")
    finally:
        cleanup(d)


def test_readonly_state_dir_as_unprivileged_daemon(short_tmp: Path) -> None:
    """A daemon that cannot write its state still adopts, supervises, and says why."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the daemon as another user")
    state = short_tmp / "state"
    state.mkdir()
    for p in (short_tmp, state):
        os.chmod(p, 0o777)

    def as_nobody() -> DaemonProc:
        d = DaemonProc(short_tmp, state)
        d.argv = lambda: ["setpriv", "--reuid=65534", "--regid=65534",  # type: ignore[method-assign]
                          "--clear-groups", *DaemonProc.argv(d)]
        return d.start()

    d = as_nobody()
    d.call("start", name="rs", replicas=1, spec={"cpus": 1})
    pid = d.wait_healthy("rs", 1)[0].pid
    d.kill9()
    os.chmod(state / "fleets", 0o555)             # read-only from now on (for uid 65534)
    os.chmod(state, 0o555)
    d2 = as_nobody()
    try:
        row = d2.wait_for(lambda: (r := d2.call("ps").replicas[0]).state == "running"
                          and r.health == "healthy" and r, 20, "adopted")
        assert row.pid == pid
        d2.call("pause", targets=["rs-0"])        # a change that must be written, and can't
        d2.wait_for(lambda: d2.call("info").store["failures"] >= 1, 10, "write failure seen")
        info = d2.call("info")
        assert "rs.json" in info.store["last_error"] and "ermission" in info.store["last_error"]
        d2.call("resume", targets=["rs-0"])
        assert d2.call("ps").replicas[0].pid == pid and d2.alive()
    finally:
        os.chmod(state, 0o777)
        os.chmod(state / "fleets", 0o777)
        cleanup(d2)


def test_wedged_qemu_does_not_delay_the_others(dirs: tuple[Path, Path]) -> None:
    d = fresh(dirs)
    d.call("start", name="z", replicas=3, spec={"cpus": 1})
    pids = {r.name: r.pid for r in d.wait_healthy("z", 3)}
    d.kill9()
    os.kill(pids["z-0"], signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        d2 = DaemonProc(*dirs).start()
        try:
            def others_ok() -> bool:
                rows = {r.name: r for r in d2.call("ps").replicas}
                return all(rows[n].state == "running" and rows[n].health == "healthy"
                           and rows[n].pid == pids[n] for n in ("z-1", "z-2"))
            d2.wait_for(others_ok, 10, "z-1, z-2 adopted")
            took = time.monotonic() - t0
            assert took < 4.0, f"others waited for the wedged one: {took:.1f}s"
            row = d2.wait_for(lambda: (r := d2.call("ps", targets=["z-0"]).replicas[0]).health
                              == "healthy" and r.restarts == 1 and r, 40, "z-0 replaced")
            assert row.pid != pids["z-0"] and row.state == "running"
            assert "z-0" in row.name and row.last_failure.startswith("start-failed")
        finally:
            cleanup(d2)
    finally:
        try:
            os.kill(pids["z-0"], signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_released_state_sample_is_restored(dirs: tuple[Path, Path]) -> None:
    """A daemon started on v1's stored sample restores the fleet and restarts its dead guests."""
    import shutil
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "state" / "v1"
    shutil.copytree(fixture, dirs[1])
    doc = json.loads((fixture / "fleets" / "web.json").read_text())
    d = DaemonProc(*dirs).start()
    try:
        rows = {r.name: r for r in d.wait_healthy("web", 2)}
        for name, rec in ((f"web-{k}", v) for k, v in doc["replicas"].items()):
            assert rows[name].pid != rec["pid"]
            assert rows[name].restarts == rec["restarts"] + 1   # its QEMU died: one more restart
            assert "while fleetd was not running" in rows[name].last_failure
    finally:
        cleanup(d)


def test_kill9_right_after_readoption_loses_no_guest(dirs: tuple[Path, Path]) -> None:
    """The records written during re-adoption keep every QEMU's handles: a daemon killed the
    moment it is ready must leave a state the next one adopts completely."""
    d = fresh(dirs)
    d.call("start", name="q", replicas=6, spec={"cpus": 1})
    pids = {r.name: r.pid for r in d.wait_healthy("q", 6)}
    d.kill9()
    for _ in range(2):
        d2 = DaemonProc(*dirs).start()
        d2.wait_for(lambda: d2.call("info").readopt_s is not None, 20, "re-adopted")
        d2.kill9()
    d3 = DaemonProc(*dirs).start()
    try:
        rows = d3.wait_healthy("q", 6)
        assert {r.name: r.pid for r in rows} == pids
        assert all(r.restarts == 0 for r in rows), [(r.name, r.last_failure) for r in rows]
        assert len(d3.guests()) == 6
    finally:
        cleanup(d3)
