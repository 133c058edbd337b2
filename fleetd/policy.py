"""Per-fleet policy: restart, backoff, health timeouts and console patterns (pure data).

Defaults suit the bundled guest and test workloads: short backoff, timeouts
of a few seconds. Guests that do not speak the FLEET protocol configure
``ready_pattern``, ``heartbeat_pattern`` and ``panic_patterns`` instead.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fleetd.placement import PinMode

DEFAULT_PANIC_PATTERNS = (
    r"Kernel panic - not syncing",
    r"\bBUG: ",
    r"\bOops: ",
    r"general protection fault",
    r"panicked at",                       # Rust
    r"\[\s*CRIT\]",                       # Unikraft critical log lines
    r"Unikraft.*(?:crash|CRASH)",
    r"ukplat_crash|UK_CRASH|Crash dump",  # Unikraft crash paths
)


class RestartPolicy(BaseModel):
    """When and how fast to restart a replica whose guest ended."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    policy: Literal["never", "on-failure", "always"] = "on-failure"
    success_exit_code: int = Field(default=0, ge=0, le=255)
    backoff_initial: float = Field(default=0.2, gt=0, le=3600)
    backoff_factor: float = Field(default=2.0, ge=1.0, le=10)
    backoff_max: float = Field(default=10.0, gt=0, le=86400)
    stable_after: float = Field(default=30.0, gt=0, le=86400)
    crash_loop_failures: int = Field(default=5, ge=1, le=1000)
    crash_loop_window: float = Field(default=60.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _order(self) -> "RestartPolicy":
        if self.backoff_max < self.backoff_initial:
            raise ValueError("backoff_max: must be >= backoff_initial")
        return self


def _check_regex(v: str | None) -> str | None:
    if v is not None:
        try:
            re.compile(v)
        except re.error as err:
            raise ValueError(f"invalid regular expression: {err}") from err
    return v


class HealthPolicy(BaseModel):
    """Health-check timeouts (seconds) and console patterns."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    boot_timeout: float = Field(default=30.0, gt=0, le=3600)
    heartbeat_timeout: float = Field(default=3.0, gt=0, le=3600)
    stall_timeout: float = Field(default=5.0, gt=0, le=3600)
    no_output_timeout: float | None = Field(default=None, gt=0, le=86400)
    qmp_timeout: float = Field(default=3.0, gt=0, le=600)
    check_interval: float = Field(default=1.0, gt=0, le=600)
    unresponsive_after: int = Field(default=2, ge=1, le=100)
    ready_pattern: str | None = None
    heartbeat_pattern: str | None = None
    panic_patterns: tuple[str, ...] = DEFAULT_PANIC_PATTERNS
    fleet_protocol: bool = True

    _regex = field_validator("ready_pattern", "heartbeat_pattern")(_check_regex)

    @field_validator("panic_patterns")
    @classmethod
    def _patterns(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for p in v:
            _check_regex(p)
        return v


class LogPolicy(BaseModel):
    """Console log rotation and post-mortem bundle caps."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    console_max_bytes: int = Field(default=8 * 1024 * 1024, ge=4096)
    console_keep: int = Field(default=3, ge=0, le=100)
    bundles_max: int = Field(default=10, ge=1, le=1000)
    bundle_max_bytes: int = Field(default=2 * 1024 * 1024, ge=16 * 1024)


class FleetPolicy(BaseModel):
    """Everything per fleet that is not the guest spec."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    pin: PinMode = PinMode.SHARED
    restart: RestartPolicy = RestartPolicy()
    health: HealthPolicy = HealthPolicy()
    logs: LogPolicy = LogPolicy()
    stop_timeout: float = Field(default=10.0, gt=0, le=600)
