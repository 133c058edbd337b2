"""The guest spec: everything needed to run one QEMU guest, validated.

A :class:`GuestSpec` is pure data (pydantic, ``extra="forbid"``). It says what
the user wants; :mod:`fleetd.argv` turns it, together with the accelerator
decision and the VM's paths, into QEMU's argv.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fleetd.errors import SpecError

MAX_CPUS = 255
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,47}$", re.IGNORECASE)

_GUEST_DIR = Path(__file__).resolve().parent.parent / "guest" / "build"
QBOOT_PATHS = ("/usr/share/qemu/qboot.rom", "/usr/share/qboot/bios.bin")


def bundled_kernel() -> Path:
    """Path of the bundled SMP guest image (``FLEETD_GUEST_KERNEL`` overrides)."""
    env = os.environ.get("FLEETD_GUEST_KERNEL")
    return Path(env) if env else _GUEST_DIR / "fleet-guest.elf"


def bundled_symbols() -> Path:
    """Path of the bundled guest's unstripped ELF, for gdb."""
    return bundled_kernel().with_name("fleet-guest.debug.elf")


def find_qboot() -> Path | None:
    """The qboot firmware image if installed, else None."""
    for p in QBOOT_PATHS:
        if os.path.isfile(p):
            return Path(p)
    return None


def validate_name(name: str, *, field: str = "name") -> str:
    """Check a fleet or VM name: 1-48 chars of ``[A-Za-z0-9_.-]``, not starting with ``.``/``-``.

    Raises:
        SpecError: naming ``field``.
    """
    if not isinstance(name, str) or not NAME_RE.match(name):
        shown = name if isinstance(name, str) and len(name) <= 60 else f"{str(name)[:60]}..."
        raise SpecError(
            f"{field}: invalid name {shown!r} (1-48 characters of letters, digits, '_', '.', '-', "
            "starting with a letter or digit)", field=field)
    return name


_MEM_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_MEM_SCALE = {"k": 1 / 1024, "": 1, "m": 1, "g": 1024, "t": 1024 * 1024}


def parse_memory(value: int | str) -> int:
    """Parse a memory size to MiB: an int is MiB; strings like ``64M``, ``1G``, ``953MiB``.

    Raises:
        ValueError: when the text is not a size.
    """
    if isinstance(value, bool):
        raise ValueError("expected a size like 64M or 1G")
    if isinstance(value, int):
        mib = value
    elif isinstance(value, str):
        m = _MEM_RE.match(value)
        if not m:
            raise ValueError(f"{value!r} is not a size (use e.g. 64M, 953M, 1G)")
        mib_f = int(m.group(1)) * _MEM_SCALE[m.group(2).lower()]
        if mib_f != int(mib_f):
            raise ValueError(f"{value!r} is not a whole number of MiB")
        mib = int(mib_f)
    else:
        raise ValueError("expected a size like 64M or 1G")
    if mib < 8:
        raise ValueError(f"{mib} MiB is too small (at least 8M)")
    if mib > 1024 * 1024:
        raise ValueError(f"{mib} MiB is too large (at most 1T)")
    return mib


class PortForward(BaseModel):
    """``host:guest`` TCP forward; replica i listens on ``host + i``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    host: int = Field(ge=1, le=65535)
    guest: int = Field(ge=1, le=65535)
    proto: Literal["tcp", "udp"] = "tcp"

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, v: Any) -> Any:
        if isinstance(v, str):
            text, _, proto = v.partition("/")
            host, sep, guest = text.partition(":")
            if not sep or not host.strip().isdigit() or not guest.strip().isdigit():
                raise ValueError(f"{v!r} is not HOST:GUEST (e.g. 8080:8080)")
            return {"host": int(host), "guest": int(guest), "proto": proto or "tcp"}
        return v

    def __str__(self) -> str:
        return f"{self.host}:{self.guest}" + ("" if self.proto == "tcp" else f"/{self.proto}")


class NetworkSpec(BaseModel):
    """User-mode networking, one NIC per replica with a unique MAC."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str = Field(default="virtio-net-pci", pattern=r"^[a-z0-9][a-z0-9_-]*$")
    ports: tuple[PortForward, ...] = ()
    mac_prefix: str = Field(default="02:fd", pattern=r"^[0-9a-f]{2}:[0-9a-f]{2}$")


class GuestSpec(BaseModel):
    """What to run: one QEMU guest. Every replica of a fleet shares one spec.

    ``kernel=None`` means the bundled SMP guest. Paths are checked by
    :meth:`check_files` (on the daemon's host), not at parse time, so a stored
    spec still loads after a file moved.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kernel: Path | None = None
    initrd: Path | None = None
    append: str = Field(default="", max_length=4096)
    workload: Literal["spin", "idle", "smp-test"] | None = None
    cpus: Annotated[int, Field(ge=1, le=MAX_CPUS)] = 1
    sockets: Annotated[int, Field(ge=1, le=MAX_CPUS)] | None = None
    cores: Annotated[int, Field(ge=1, le=MAX_CPUS)] | None = None
    threads: Annotated[int, Field(ge=1, le=MAX_CPUS)] | None = None
    memory: int = 64
    machine: Literal["pc", "q35"] = "q35"
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    cpu_model: str = Field(default="auto", pattern=r"^[A-Za-z0-9_.,+=-]+$", max_length=512)
    firmware: str = Field(default="auto", max_length=4096)
    devices: tuple[Annotated[str, Field(min_length=1, max_length=1024)], ...] = ()
    network: NetworkSpec | None = None
    rtc: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.,=:-]+$")
    no_reboot: bool = False
    gdb: bool = False
    powerdown_timeout: float = Field(default=-1.0, le=600)
    extra_args: tuple[Annotated[str, Field(max_length=4096)], ...] = ()

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, v: Any) -> int:
        return parse_memory(v)

    @field_validator("append")
    @classmethod
    def _append(cls, v: str) -> str:
        if "\n" in v or "\x00" in v:
            raise ValueError("must be one line without NUL bytes")
        return v

    @field_validator("devices", "extra_args")
    @classmethod
    def _no_fleetd_owned(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        owned = {"-qmp", "-monitor", "-serial", "-pidfile", "-daemonize", "-S", "-name",
                 "-chardev", "-mon", "-kernel", "-initrd", "-append", "-smp", "-m"}
        for arg in v:
            if arg in owned:
                raise ValueError(f"{arg} is managed by fleetd; use the spec's own fields")
        return v

    @model_validator(mode="after")
    def _topology(self) -> "GuestSpec":
        given = [x for x in (self.sockets, self.cores, self.threads) if x is not None]
        if given:
            s, c, t = self.sockets or 1, self.cores or 1, self.threads or 1
            if self.sockets and self.cores and self.threads and s * c * t != self.cpus:
                raise ValueError(f"cpus: sockets*cores*threads = {s * c * t} but cpus = {self.cpus}")
            if s * c * t > self.cpus and not (self.sockets and self.cores and self.threads):
                pass  # QEMU derives the missing parts; it rejects impossible ones itself
        if self.workload is not None and self.kernel is not None:
            raise ValueError("workload: only applies to the bundled guest (kernel not set)")
        return self

    @property
    def bundled(self) -> bool:
        """True when this spec runs the bundled guest."""
        return self.kernel is None

    @property
    def kernel_path(self) -> Path:
        return self.kernel if self.kernel is not None else bundled_kernel()

    @property
    def effective_powerdown_timeout(self) -> float:
        """Grace for ACPI powerdown at stop; the bundled guest has no ACPI power button."""
        if self.powerdown_timeout >= 0:
            return self.powerdown_timeout
        return 0.0 if self.bundled else 3.0

    def guest_cmdline(self) -> str:
        """The kernel command line passed with ``-append`` (byte for byte for custom kernels)."""
        if not self.bundled:
            return self.append
        words = self.append.split()
        if not any(w.startswith("workload=") for w in words):
            words.insert(0, f"workload={self.workload or 'idle'}")
        return " ".join(words)

    def check_files(self) -> None:
        """Check that kernel, initrd and firmware exist and are readable files.

        Raises:
            SpecError: naming the field and the path.
        """
        for field, path in (("kernel", self.kernel_path), ("initrd", self.initrd)):
            if path is None:
                continue
            if not path.is_file():
                hint = " (build the bundled guest with: make -C guest)" if (
                    field == "kernel" and self.bundled) else ""
                raise SpecError(f"{field}: file not found: {path}{hint}", field=field, path=str(path))
            if not os.access(path, os.R_OK):
                raise SpecError(f"{field}: not readable: {path}", field=field, path=str(path))
        if self.firmware not in ("auto", "qboot", "seabios") and not Path(self.firmware).is_file():
            raise SpecError(f"firmware: file not found: {self.firmware}", field="firmware",
                            path=self.firmware)
        if self.firmware == "qboot" and find_qboot() is None:
            raise SpecError("firmware: qboot requested but not installed "
                            f"(looked in {', '.join(QBOOT_PATHS)})", field="firmware")

    def firmware_path(self) -> Path | None:
        """The ``-bios`` image to use, or None for QEMU's default (SeaBIOS)."""
        if self.firmware == "seabios":
            return None
        if self.firmware in ("auto", "qboot"):
            return find_qboot()
        return Path(self.firmware)


def spec_error_from_validation(err: ValidationError, *, prefix: str = "") -> SpecError:
    """Turn pydantic's ValidationError into one clear SpecError naming the first bad field."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    field = f"{prefix}{loc}" if loc else (prefix.rstrip(".") or "spec")
    msg = first.get("msg", "invalid")
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    msg = msg.removeprefix("Value error, ")
    m = re.match(r"^([a-z_][a-z0-9_.]*): (.*)$", msg)
    if m and first.get("type") == "value_error":  # a model-level check names its field
        field, msg = (f"{field}.{m.group(1)}" if loc else f"{prefix}{m.group(1)}"), m.group(2)
    more = len(err.errors()) - 1
    suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    return SpecError(f"{field}: {msg}{suffix}", field=field)


def parse_spec(data: dict[str, Any], *, prefix: str = "") -> GuestSpec:
    """Validate plain data into a GuestSpec.

    Raises:
        SpecError: naming the first invalid field.
    """
    try:
        return GuestSpec.model_validate(data)
    except ValidationError as err:
        raise spec_error_from_validation(err, prefix=prefix) from err
