"""The daemon's configuration (``fleetd --config fleetd.toml``; see configs/fleetd.toml).

Command-line options and environment (``FLEETD_SOCKET``, ``FLEETD_STATE_DIR``)
override the file. Errors name the file, the line when it can be found, and
the field.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fleetd.errors import SpecError
from fleetd.paths import default_socket, default_state_dir
from fleetd.topology import parse_cpulist


class DaemonConfig(BaseModel):
    """Everything the daemon itself is configured with."""

    model_config = ConfigDict(extra="forbid")
    socket: Path = Field(default_factory=default_socket)
    state_dir: Path = Field(default_factory=default_state_dir)
    run_dir: Path | None = None             # per-VM sockets; default: the socket's directory
    socket_group: str | None = None         # chgrp of the control socket (mode 0660)
    control_group: str | None = None        # members may control fleets
    readonly_group: str | None = None       # members may only list and watch
    cpus: str | None = None                 # host CPUs fleetd may use (cpulist), default all
    housekeeping: str = ""                  # host CPUs kept for QEMU's non-vCPU threads and fleetd
    qemu: str = "qemu-system-x86_64"
    accel: str = Field(default="auto", pattern="^(auto|kvm|tcg)$")  # auto: the probe's choice;
    #   kvm: KVM whenever usable (even nested kvm_pvm); tcg: never KVM
    stop_guests_on_exit: bool = False       # SIGTERM stops every guest instead of detaching
    log_level: str = Field(default="info", pattern="^(debug|info|warning|error)$")
    log_json: bool | None = None
    start_timeout: float = Field(default=15.0, gt=0, le=600)
    rotate_interval: float = Field(default=5.0, gt=0, le=3600)
    watchdog: bool = True

    @field_validator("cpus", "housekeeping")
    @classmethod
    def _cpulist(cls, v: str | None) -> str | None:
        if v:
            parse_cpulist(v)
        return v

    @property
    def run_root(self) -> Path:
        return self.run_dir or self.socket.parent


def _line_of(text: str, key: str) -> int | None:
    for i, line in enumerate(text.splitlines(), 1):
        if re.match(rf"^\s*{re.escape(key)}\s*=", line):
            return i
    return None


def load_toml(path: Path) -> tuple[dict[str, Any], str]:
    """Read a TOML file.

    Raises:
        SpecError: unreadable or not TOML (naming the file and line).
    """
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError(f"{path}: {err.strerror}", field="config") from err
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{path}: {err}", field="config") from err


def validation_error(path: Path, text: str, err: ValidationError, prefix: str = "") -> SpecError:
    """One line naming the file, line and field of the first validation error."""
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ())]
    field = prefix + ".".join(loc)
    msg = first.get("msg", "invalid").removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    line = _line_of(text, loc[-1]) if loc else None
    where = f"{path}:{line}" if line else str(path)
    return SpecError(f"{where}: {field}: {msg}", field=field, line=line)


def load_config(path: Path | None, **overrides: Any) -> DaemonConfig:
    """The daemon config from ``path`` (optional) with non-None ``overrides`` applied.

    Raises:
        SpecError: naming the file, line and field.
    """
    data: dict[str, Any] = {}
    text = ""
    if path is not None:
        data, text = load_toml(path)
        data = data.get("daemon", data)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return DaemonConfig.model_validate(data)
    except ValidationError as err:
        raise validation_error(path or Path("<options>"), text, err) from err
