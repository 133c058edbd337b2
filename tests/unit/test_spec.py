"""Guest spec validation: bad input gets one clear error naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetd.errors import SpecError
from fleetd.spec import GuestSpec, parse_memory, parse_spec, validate_name


@pytest.mark.parametrize(("data", "field", "text"), [
    ({"cpus": 0}, "cpus", "greater than or equal to 1"),
    ({"cpus": 1000}, "cpus", "less than or equal to 255"),
    ({"cpus": "two"}, "cpus", "valid integer"),
    ({"memory": "lots"}, "memory", "'lots' is not a size"),
    ({"memory": "4M"}, "memory", "too small"),
    ({"colour": "red"}, "colour", "unknown field"),
    ({"machine": "virt"}, "machine", "'pc' or 'q35'"),
    ({"accel": "hvf"}, "accel", "'auto', 'kvm' or 'tcg'"),
    ({"append": "a\nb"}, "append", "one line"),
    ({"extra_args": ["-qmp"]}, "extra_args", "managed by fleetd"),
    ({"network": {"ports": ["80"]}}, "network.ports.0", "HOST:GUEST"),
    ({"cpus": 4, "sockets": 2, "cores": 3, "threads": 1}, "cpus", "sockets*cores*threads = 6"),
    ({"kernel": "/k", "workload": "spin"}, "workload", "bundled guest"),
])
def test_invalid_spec_names_field(data: dict, field: str, text: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert info.value.field is not None and info.value.field.startswith(field.split(".")[0])
    msg = str(info.value)
    assert msg.startswith(field), msg
    assert text in msg
    assert "\n" not in msg


def test_missing_kernel_file(tmp_path: Path) -> None:
    spec = parse_spec({"kernel": str(tmp_path / "nope")})
    with pytest.raises(SpecError, match="kernel: file not found") as info:
        spec.check_files()
    assert info.value.field == "kernel"


def test_missing_initrd_file(tmp_path: Path) -> None:
    k = tmp_path / "k"
    k.write_bytes(b"x")
    spec = parse_spec({"kernel": str(k), "initrd": str(tmp_path / "i")})
    with pytest.raises(SpecError, match="initrd: file not found"):
        spec.check_files()


@pytest.mark.parametrize(("text", "mib"), [
    (64, 64), ("64M", 64), ("64m", 64), ("953M", 953), ("1G", 1024), ("2GiB", 2048),
    ("8192K", 8), ("64", 64)])
def test_memory_sizes(text: int | str, mib: int) -> None:
    assert parse_memory(text) == mib


def test_defaults() -> None:
    spec = GuestSpec()
    assert spec.bundled and spec.cpus == 1 and spec.memory == 64
    assert spec.machine == "q35" and spec.accel == "auto"
    assert spec.guest_cmdline() == "workload=idle"
    assert spec.effective_powerdown_timeout == 0.0
    assert parse_spec({"kernel": "/k"}).effective_powerdown_timeout > 0


@pytest.mark.parametrize("name", ["", "../x", "a/b", "x" * 300, "-x", ".x", "a b", "é"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(SpecError, match="name: invalid name"):
        validate_name(name)


@pytest.mark.parametrize("name", ["web", "web-0", "a", "A.b_c-9", "x" * 48])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name
