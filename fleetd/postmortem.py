"""Post-mortem bundles: what a failed guest left behind, one directory per failure.

A bundle holds ``meta.json`` (cause, detail, times, exit status, restarts),
``console.txt`` (the last 256 KiB of console output), ``registers.txt``
(``info registers -a`` through QMP while QEMU is still alive: the spec uses
``-action panic=pause`` so a panicked guest is), ``qemu-stderr.txt``,
``events.json`` (the VM's QMP and state timeline), ``spec.json`` and
``argv.json``. Bundles are capped per replica in number and size; the
oldest go first.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from fleetd.consolelog import tail_bytes
from fleetd.errors import FleetError, NotFoundError

if TYPE_CHECKING:
    from fleetd.health import Failure
    from fleetd.vm import Vm

CONSOLE_TAIL = 256 * 1024
STDERR_TAIL = 64 * 1024


def _write(path: Path, data: bytes | str, limit: int) -> int:
    raw = data.encode(errors="replace") if isinstance(data, str) else data
    if len(raw) > limit:
        raw = b"[... truncated ...]\n" + raw[-limit:]
    path.write_bytes(raw)
    return len(raw)


def bundle_id(vm: str, cause: str, when: float) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(when))
    return f"{vm}.{stamp}.{int((when % 1) * 1000):03d}.{cause}"


async def collect(vm: "Vm", failure: "Failure", dest_root: Path, *, restarts: int,
                  max_bytes: int, keep: int, extra: dict[str, Any] | None = None) -> str:
    """Write a bundle for ``failure`` of ``vm`` under ``dest_root`` and return its id.

    Never raises for a missing piece (a dead QEMU has no registers): the
    bundle says what could not be collected.
    """
    bid = bundle_id(vm.name, failure.cause, failure.wall)
    d = dest_root / bid
    d.mkdir(parents=True, exist_ok=True)
    budget = max_bytes
    notes: list[str] = []
    # registers first, while QEMU is alive
    regs = ""
    if vm.alive and vm.qmp is not None and vm.qmp.connected:
        try:
            with anyio.fail_after(3):
                regs = await vm.qmp.hmp("info registers -a")
        except (FleetError, TimeoutError) as err:
            notes.append(f"registers: {err}")
    else:
        notes.append("registers: QEMU not running")
    if regs:
        budget -= _write(d / "registers.txt", regs, min(budget // 4, 256 * 1024))
    console = tail_bytes(vm.paths.console_log, CONSOLE_TAIL)
    budget -= _write(d / "console.txt", console, max(4096, min(CONSOLE_TAIL, budget // 2)))
    stderr = tail_bytes(vm.paths.stderr, STDERR_TAIL, keep=0)
    budget -= _write(d / "qemu-stderr.txt", stderr, max(1024, min(STDERR_TAIL, budget // 4)))
    events = [{"t": round(t, 6), "kind": k, **data} for t, k, data in vm.timeline.events]
    _write(d / "events.json", json.dumps(events, indent=1, default=str), max(4096, budget // 2))
    (d / "spec.json").write_text(vm.spec.model_dump_json(indent=1))
    (d / "argv.json").write_text(json.dumps(vm.argv, indent=1))
    meta = {
        "id": bid, "vm": vm.name, "cause": failure.cause, "detail": failure.detail,
        "vcpu": failure.vcpu, "time": failure.wall,
        "time_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(failure.wall)),
        "pid": vm.pid, "restarts": restarts, "accel": vm.launch.accel.accel,
        "exit": vm.exit_info.to_dict() if vm.exit_info else None,
        "alive_at_collection": vm.alive, "notes": notes, **(extra or {}),
    }
    (d / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    prune(dest_root, keep)
    return bid


def update_meta(dest_root: Path, bid: str, **fields: Any) -> None:
    """Add fields (e.g. the exit status known only after the kill) to a bundle's meta.json."""
    p = dest_root / bid / "meta.json"
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError):
        return
    meta.update(fields)
    tmp = p.with_suffix(".partial")
    tmp.write_text(json.dumps(meta, indent=1, default=str))
    os.replace(tmp, p)


def prune(dest_root: Path, keep: int) -> None:
    """Delete the oldest bundles beyond ``keep``."""
    bundles = sorted((p for p in dest_root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in bundles[:-keep] if keep else bundles:
        shutil.rmtree(old, ignore_errors=True)


def list_bundles(roots: list[Path]) -> list[dict[str, Any]]:
    """Every bundle's meta under the given per-replica failure dirs, newest first."""
    out = []
    for root in roots:
        if not root.is_dir():
            continue
        for d in root.iterdir():
            try:
                meta = json.loads((d / "meta.json").read_text())
            except (OSError, ValueError):
                continue
            meta["path"] = str(d)
            out.append(meta)
    out.sort(key=lambda m: m.get("time", 0), reverse=True)
    return out


def read_bundle(roots: list[Path], bid: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Meta and file contents of one bundle.

    Raises:
        NotFoundError: no bundle with that id.
    """
    for root in roots:
        d = root / bid
        if (d / "meta.json").is_file():
            meta = json.loads((d / "meta.json").read_text())
            files = {p.name: p.read_text(errors="replace") for p in sorted(d.iterdir())
                     if p.is_file() and p.name != "meta.json"}
            return meta, files
    raise NotFoundError(f"no failure bundle {bid!r}", id=bid)
