"""Integration-test helpers: a recording VM observer and a VM factory on short paths."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from fleetd.accel import AccelChoice, choose
from fleetd.argv import Launch, VmPaths
from fleetd.guestproto import GuestEvent, GuestHeartbeat, GuestReady, parse_line
from fleetd.qmp import QmpEvent
from fleetd.spec import parse_spec
from fleetd.vm import Pins, Vm, VmState
from tests.conftest import accel_decision


class Recorder:
    """Records everything a VM reports; tests wait on predicates over it."""

    def __init__(self) -> None:
        self.states: list[VmState] = []
        self.qmp: list[QmpEvent] = []
        self.guest: list[tuple[float, GuestEvent]] = []
        self.lines: list[str] = []
        self._changed = anyio.Event()

    def _poke(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def state_changed(self, vm: Vm, old: VmState, new: VmState, reason: str) -> None:
        self.states.append(new)
        self._poke()

    def qmp_event(self, vm: Vm, event: QmpEvent) -> None:
        self.qmp.append(event)
        self._poke()

    def console_line(self, vm: Vm, line: str, when: float) -> None:
        self.lines.append(line)
        ev = parse_line(line)
        if ev is not None:
            self.guest.append((when, ev))
        self._poke()

    async def wait_for(self, pred: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
        with anyio.fail_after(timeout):
            while not (res := pred()):
                await self._changed.wait()
            return res

    def heartbeats(self) -> list[GuestHeartbeat]:
        return [e for _, e in self.guest if isinstance(e, GuestHeartbeat)]

    def ready(self) -> GuestReady | None:
        return next((e for _, e in self.guest if isinstance(e, GuestReady)), None)

    def qmp_names(self) -> list[str]:
        return [e.name for e in self.qmp]

    async def wait_heartbeats(self, n: int, timeout: float = 20.0) -> list[GuestHeartbeat]:
        start = len(self.heartbeats())
        await self.wait_for(lambda: len(self.heartbeats()) >= start + n, timeout)
        return self.heartbeats()[start:]


def accel_choice(accel: str, spec_data: dict[str, Any]) -> tuple[Any, AccelChoice]:
    spec = parse_spec({**spec_data, "accel": accel})
    return spec, choose(spec, accel_decision())


@pytest.fixture
def make_vm(short_tmp: Path, tmp_path: Path, accel: str) -> Callable[..., tuple[Vm, Recorder]]:
    """Build a Vm for the bundled guest under the test's accelerator."""
    counter = iter(range(1000))

    def factory(*, pins: Pins | None = None, name: str | None = None, halted: bool = False,
                **spec_data: Any) -> tuple[Vm, Recorder]:
        spec, choice = accel_choice(accel, spec_data)
        n = next(counter)
        name = name or f"t{n}"
        paths = VmPaths(short_tmp / name, tmp_path / name)
        rec = Recorder()
        vm = Vm(spec, Launch(name, paths, choice), pins, observer=rec, halted=halted)
        return vm, rec

    return factory


def elapsed_ms(t0: float) -> float:
    return (time.monotonic() - t0) * 1000
