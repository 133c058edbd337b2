"""Bounded console logs: copy-truncate rotation and reading across rotated files.

QEMU's chardev ``logfile=`` keeps its file descriptor (opened with O_APPEND)
for the VM's whole life and never reopens it, so rotation copies the file to
``console.log.1`` (shifting older ones) and truncates the original in place;
QEMU's next write lands at the new end. Bytes written between the copy and
the truncate can be lost; the window is one copy of at most ``max_bytes``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def rotated(path: Path, keep: int) -> list[Path]:
    """Existing rotated files, oldest first (``.N`` ... ``.1``)."""
    return [p for p in (path.with_name(f"{path.name}.{i}") for i in range(keep, 0, -1)) if p.exists()]


def rotate_if_needed(path: Path, max_bytes: int, keep: int) -> bool:
    """Rotate ``path`` when it exceeds ``max_bytes``; keep ``keep`` old copies. True if rotated."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size <= max_bytes:
        return False
    if keep > 0:
        for i in range(keep - 1, 0, -1):
            src = path.with_name(f"{path.name}.{i}")
            if src.exists():
                os.replace(src, path.with_name(f"{path.name}.{i + 1}"))
        shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    with open(path, "r+b") as f:
        f.truncate(0)
    return True


def _read_back(p: Path, lines: int, budget: int) -> bytes:
    """The end of one file holding at least ``lines`` newlines (or the whole file), in blocks."""
    block = 64 * 1024
    with open(p, "rb") as f:
        f.seek(0, os.SEEK_END)
        pos = f.tell()
        data = b""
        while pos > 0 and data.count(b"\n") <= lines and len(data) < budget:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
        return data


def tail_lines(path: Path, n: int, keep: int = 10, *, max_bytes: int = 64 * 1024 * 1024) -> list[str]:
    """The last ``n`` lines across the rotated files and the current one."""
    if n <= 0:
        return []
    chunks: list[bytes] = []
    have = 0
    for p in reversed([*rotated(path, keep), path]):
        try:
            data = _read_back(p, n - have, max_bytes)
        except OSError:
            continue
        chunks.append(data)
        have += data.count(b"\n")
        if have > n:
            break
    text = b"".join(reversed(chunks)).decode(errors="replace")
    return text.splitlines()[-n:]


def tail_bytes(path: Path, limit: int, keep: int = 10) -> bytes:
    """The last ``limit`` bytes across the rotated files and the current one."""
    chunks: list[bytes] = []
    need = limit
    for p in reversed([*rotated(path, keep), path]):
        try:
            with open(p, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                take = min(size, need)
                f.seek(size - take)
                chunks.append(f.read())
                need -= take
        except OSError:
            continue
        if need <= 0:
            break
    return b"".join(reversed(chunks))


class FileFollower:
    """Follow a growing console log, surviving copy-truncate rotation."""

    def __init__(self, path: Path, *, from_end: bool = True) -> None:
        self.path = path
        self.pos = path.stat().st_size if from_end and path.exists() else 0
        self._partial = b""

    def read_lines(self) -> list[str]:
        """New complete lines since the last call."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.pos:   # truncated by rotation
            self.pos = 0
        if size == self.pos:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read(size - self.pos)
        self.pos += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        return [line.decode(errors="replace").rstrip("\r") for line in lines]
