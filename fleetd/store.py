"""Persisted state: desired fleets and each replica's runtime handles, written atomically.

One file per fleet, ``<state>/fleets/<fleet>.json``: the spec, the policy, and
per replica what a restarted daemon needs to find and re-adopt its QEMU (pid,
the process start time from /proc/<pid>/stat to defeat PID reuse, socket
paths, host CPUs, restarts, last failure, desired state). Writes go to
``*.partial``, are fsynced, renamed over the file, and the directory is
fsynced. One file per fleet means a corrupt file costs one fleet, not all.

Writes are coalesced (every change marks the fleet dirty; a writer task
flushes dirty fleets every ``interval``). A failed write is logged and
retried; it never touches a guest.

The schema is versioned (:data:`SCHEMA`); :func:`migrate` upgrades older
files. A sample of each released version's file is kept under
``tests/fixtures/state/`` and loaded by the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from fleetd.errors import StateStoreError
from fleetd.log import get_logger

SCHEMA = 1


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: ``*.partial``, fsync, rename, fsync the directory.

    Raises:
        OSError: when any step fails (the old file is then untouched).
    """
    tmp = path.with_name(path.name + ".partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def migrate(doc: dict[str, Any]) -> dict[str, Any]:
    """Upgrade a fleet document to :data:`SCHEMA`.

    Raises:
        StateStoreError: unknown (newer) schema or not a fleet document.
    """
    version = doc.get("schema")
    if not isinstance(version, int):
        raise StateStoreError("no schema version", field="schema")
    if version > SCHEMA:
        raise StateStoreError(f"schema {version} is newer than this fleetd ({SCHEMA})",
                              field="schema")
    # (no older schemas exist yet: the first migration goes here, version by version)
    for key in ("name", "spec", "policy", "replicas"):
        if key not in doc:
            raise StateStoreError(f"missing {key!r}", field=key)
    return doc


class Store:
    """The fleets directory, with coalesced atomic writes."""

    def __init__(self, state_dir: Path, *, interval: float = 0.05) -> None:
        self.dir = state_dir / "fleets"
        self.interval = interval
        self.log = get_logger(component="store")
        self._dirty: dict[str, Callable[[], dict[str, Any]]] = {}
        self._removed: set[str] = set()
        self._wake = anyio.Event()
        self.failures = 0
        self.writes = 0
        self.last_error: str | None = None

    def path(self, fleet: str) -> Path:
        return self.dir / f"{fleet}.json"

    def load_all(self) -> tuple[list[dict[str, Any]], list[str]]:
        """Every readable fleet document, and one problem line per file that is not.

        A file that cannot be parsed is copied to ``<file>.corrupt-<time>`` (kept
        for a person to look at) and skipped; nothing else is touched.
        """
        docs, problems = [], []
        if not self.dir.is_dir():
            return docs, problems
        for p in sorted(self.dir.glob("*.json")):
            try:
                doc = migrate(json.loads(p.read_bytes()))
            except (OSError, ValueError, StateStoreError) as err:
                why = err.strerror if isinstance(err, OSError) else str(err)
                keep = p.with_name(f"{p.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
                try:
                    shutil.copyfile(p, keep)
                    kept = f"; copy kept as {keep.name}"
                except OSError:
                    kept = ""
                problems.append(f"state file {p} unreadable: {why}{kept}")
                self.log.error("store.unreadable", file=str(p), error=why, copy=str(keep) if kept else None)
                continue
            docs.append(doc)
        return docs, problems

    def mark(self, fleet: str, snapshot: Callable[[], dict[str, Any]]) -> None:
        """The fleet changed; ``snapshot()`` will be written soon."""
        self._removed.discard(fleet)
        self._dirty[fleet] = snapshot
        self._wake.set()

    def remove(self, fleet: str) -> None:
        """The fleet is gone; its file will be deleted."""
        self._dirty.pop(fleet, None)
        self._removed.add(fleet)
        self._wake.set()

    def flush(self) -> bool:
        """Write every dirty fleet now; True when all writes succeeded."""
        ok = True
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            self._failed("<dir>", err)
            return False
        for fleet in list(self._removed):
            try:
                self.path(fleet).unlink(missing_ok=True)
                self._removed.discard(fleet)
            except OSError as err:
                ok = False
                self._failed(fleet, err)
        for fleet, snap in list(self._dirty.items()):
            try:
                doc = {"schema": SCHEMA, **snap()}
                atomic_write(self.path(fleet), json.dumps(doc, indent=1, default=str).encode())
                if self._dirty.get(fleet) is snap:
                    del self._dirty[fleet]
                self.writes += 1
            except OSError as err:
                ok = False
                self._failed(fleet, err)
        if ok and self.last_error is not None:
            self.log.info("store.recovered")
            self.last_error = None
        return ok

    def _failed(self, fleet: str, err: OSError) -> None:
        self.failures += 1
        msg = f"{self.path(fleet)}: {err.strerror or err}"
        if msg != self.last_error:
            self.log.warning("store.write_failed", error=msg)
        self.last_error = msg

    async def run(self) -> None:
        """The writer task: flush dirty fleets every ``interval``; retry failures after 1 s."""
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            await anyio.sleep(self.interval)
            if not self.flush():
                await anyio.sleep(1.0)
                self._wake.set()
