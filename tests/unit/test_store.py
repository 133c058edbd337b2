"""Persisted state: atomic writes, migration, corrupt files, every released sample loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fleetd.errors import StateStoreError
from fleetd.policy import FleetPolicy
from fleetd.spec import GuestSpec
from fleetd.store import SCHEMA, Store, atomic_write, migrate

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "state"


def test_atomic_write_replaces_and_leaves_no_partial(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    atomic_write(p, b"one")
    atomic_write(p, b"two")
    assert p.read_bytes() == b"two"
    assert not list(tmp_path.glob("*.partial"))


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    atomic_write(p, b"old")
    (tmp_path / "a.json.partial").mkdir()
    with pytest.raises(OSError):
        atomic_write(p, b"new")
    assert p.read_bytes() == b"old"


@pytest.mark.parametrize("version", sorted(d.name for d in FIXTURES.iterdir() if d.is_dir()))
def test_every_released_sample_loads(tmp_path: Path, version: str) -> None:
    shutil.copytree(FIXTURES / version, tmp_path / "state")
    docs, problems = Store(tmp_path / "state").load_all()
    assert problems == [] and docs
    for doc in docs:
        assert doc["schema"] == SCHEMA
        GuestSpec.model_validate(doc["spec"])
        FleetPolicy.model_validate(doc["policy"])
        for rec in doc["replicas"].values():
            for key in ("pid", "start_time", "restarts", "want", "host_cpus", "console_offset"):
                assert key in rec, key


def test_newer_schema_is_refused_clearly() -> None:
    with pytest.raises(StateStoreError, match="newer than this fleetd"):
        migrate({"schema": SCHEMA + 1, "name": "x", "spec": {}, "policy": {}, "replicas": {}})
    with pytest.raises(StateStoreError, match="no schema"):
        migrate({"name": "x"})


def test_corrupt_file_is_kept_and_reported(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.dir.mkdir()
    (store.dir / "good.json").write_text(json.dumps(
        {"schema": 1, "name": "good", "spec": {}, "policy": {}, "replicas": {}}))
    (store.dir / "bad.json").write_text('{"schema": 1, "na')
    docs, problems = store.load_all()
    assert [d["name"] for d in docs] == ["good"]
    assert len(problems) == 1 and "bad.json" in problems[0] and "unreadable" in problems[0]
    assert list(store.dir.glob("bad.json.corrupt-*"))
    assert (store.dir / "bad.json").exists(), "never deleted"


def test_marks_coalesce_and_remove_deletes(tmp_path: Path) -> None:
    store = Store(tmp_path)
    n = {"calls": 0}

    def snap() -> dict:
        n["calls"] += 1
        return {"name": "f", "spec": {}, "policy": {}, "replicas": {}}

    for _ in range(50):
        store.mark("f", snap)
    assert store.flush() and n["calls"] == 1 and store.writes == 1
    assert json.loads(store.path("f").read_text())["schema"] == SCHEMA
    store.remove("f")
    assert store.flush() and not store.path("f").exists()
