"""A fleet: a named set of replicas from one guest spec and one policy.

Replica ``i`` of fleet ``web`` is ``web-i`` (0-based). Names of fleets and
replicas share one namespace, so ``fleetctl stop web`` and ``stop web-3`` are
never ambiguous: a fleet may not be named like another fleet's replica.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

from fleetd.errors import ConflictError
from fleetd.policy import FleetPolicy
from fleetd.spec import GuestSpec

if TYPE_CHECKING:
    from fleetd.supervisor import Replica


class Fleet:
    """Desired state of one fleet plus its live replicas."""

    def __init__(self, name: str, spec: GuestSpec, policy: FleetPolicy, *,
                 emulator_cpus: frozenset[int] | None = None, created: float | None = None) -> None:
        self.name = name
        self.spec = spec
        self.policy = policy
        self.emulator_cpus = emulator_cpus
        self.replicas: dict[int, "Replica"] = {}
        self.created = created if created is not None else time.time()

    @property
    def size(self) -> int:
        return len(self.replicas)

    def sorted_replicas(self) -> list["Replica"]:
        return [self.replicas[i] for i in sorted(self.replicas)]

    def record(self) -> dict[str, object]:
        """The fleet as persisted by :mod:`fleetd.store`."""
        return {"name": self.name, "spec": self.spec.model_dump(mode="json"),
                "policy": self.policy.model_dump(mode="json"), "created": self.created,
                "emulator_cpus": sorted(self.emulator_cpus) if self.emulator_cpus else None,
                "replicas": {str(i): r.record() for i, r in sorted(self.replicas.items())}}

    def next_indexes(self, n: int) -> list[int]:
        """The ``n`` lowest free replica indexes."""
        out, i = [], 0
        while len(out) < n:
            if i not in self.replicas:
                out.append(i)
            i += 1
        return out


def check_fleet_name(name: str, existing: list[str]) -> None:
    """Refuse a fleet name that collides with a fleet or a replica name.

    Raises:
        ConflictError: naming the clash.
    """
    for other in existing:
        if name == other:
            raise ConflictError(f"fleet {name!r} already exists", fleet=name)
        if re.fullmatch(rf"{re.escape(other)}-\d+", name):
            raise ConflictError(f"fleet name {name!r} clashes with a replica of fleet {other!r}",
                                fleet=name)
        if re.fullmatch(rf"{re.escape(name)}-\d+", other):
            raise ConflictError(f"fleet name {name!r} would name replicas like fleet {other!r}",
                                fleet=name)
