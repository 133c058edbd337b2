"""Shared fixtures: the anyio backend, the accelerator probe, short temp dirs, leak checks."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import anyio
import pytest

from fleetd.accel import AccelDecision, probe
from fleetd.spec import bundled_kernel

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


_decision: AccelDecision | None = None


def accel_decision() -> AccelDecision:
    """The accelerator probe, run once per test session."""
    global _decision
    if _decision is None:
        _decision = anyio.run(probe)
    return _decision


def pytest_sessionstart(session: pytest.Session) -> None:
    accel_decision()  # probe once, outside any event loop


def pytest_report_header(config: pytest.Config) -> list[str]:
    d = accel_decision()
    return [f"fleetd accel probe: {d.accel} ({d.reason}); kvm module: {d.kvm_module}",
            f"bundled guest: {bundled_kernel()} "
            f"({'present' if bundled_kernel().exists() else 'MISSING: make -C guest'})"]


@pytest.fixture(params=["tcg", "kvm"])
def accel(request: pytest.FixtureRequest) -> str:
    """Each integration test runs under TCG, and under KVM when the probe says it is usable."""
    if request.param == "kvm" and not accel_decision().kvm_usable:
        pytest.skip(f"KVM not usable here: {accel_decision().reason}")
    return request.param


@pytest.fixture
def guest_kernel() -> Path:
    """The bundled guest image; a missing image is an error, not a skip (CI builds it)."""
    k = bundled_kernel()
    assert k.is_file(), f"bundled guest missing: {k} (run: make -C guest)"
    return k


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path, for AF_UNIX sockets (107-byte limit)."""
    d = Path(tempfile.mkdtemp(prefix="ft", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def qemu_pids(marker: str | None = None) -> set[int]:
    """PIDs of qemu-system processes (only those whose argv contains ``marker``, if given)."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if not f.read().startswith("qemu-system"):
                        continue
                if marker is not None:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        if marker.encode() not in f.read():
                            continue
                out.add(int(entry))
            except OSError:
                pass
    return out


@pytest.fixture
def no_leaked_qemu(short_tmp: Path) -> Iterator[None]:
    """Fail the test if a QEMU it started (its argv names the test's short_tmp) outlives it."""
    marker = str(short_tmp) + "/"
    yield
    leaked: set[int] = set()
    for _ in range(50):
        leaked = qemu_pids(marker)
        if not leaked:
            break
        time.sleep(0.1)
    for pid in leaked:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    assert not leaked, f"QEMU processes leaked: {sorted(leaked)}"


@pytest.fixture
def daemon(short_tmp: Path, tmp_path: Path, no_leaked_qemu: None) -> Iterator[Any]:
    """A running fleetd (TCG) for the test; stopped with its guests afterwards, and the test
    fails if fleetd logged an internal error meanwhile."""
    from tests.integration.daemon import DaemonProc
    d = DaemonProc(short_tmp, tmp_path / "state")
    d.start()
    try:
        yield d
    finally:
        rc = d.stop(stop_guests=True)
        if rc not in (0, None):
            print(d.log_tail(80))
        assert rc == 0, f"fleetd exited with {rc}"
        bugs = d.internal_errors()
        assert not bugs, "fleetd logged internal errors:\n" + "\n".join(bugs)
