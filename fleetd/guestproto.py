"""The FLEET console protocol (guest/PROTOCOL.md, proto=1): lines to typed guest events.

Pure parsing, no I/O. A line that is not a FLEET line (or is malformed)
yields None: hosts ignore what they do not understand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PROTO = 1


@dataclass(frozen=True)
class GuestBoot:
    proto: int
    cmdline: str
    kind = "boot"


@dataclass(frozen=True)
class GuestReady:
    online: int
    expected: int
    bringup_us: int | None
    kind = "ready"


@dataclass(frozen=True)
class GuestHeartbeat:
    seq: int
    up_ms: int | None
    counters: tuple[int, ...]
    kind = "heartbeat"


@dataclass(frozen=True)
class GuestPanic:
    cpu: int | None
    msg: str
    kind = "panic"


@dataclass(frozen=True)
class GuestExit:
    code: int
    kind = "exit"


GuestEvent = GuestBoot | GuestReady | GuestHeartbeat | GuestPanic | GuestExit

_LINE = re.compile(r"FLEET (BOOT|READY|HB|PANIC|EXIT)\b(.*)$")
_KV = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)=("(?:[^"\\]|\\.)*"|\S*)')
_ESC = re.compile(r"\\(x[0-9a-fA-F]{2}|.)")


def unquote(text: str) -> str:
    """Decode a protocol string: surrounding quotes, ``\\"``, ``\\\\`` and ``\\xNN`` escapes."""
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]

    def sub(m: re.Match[str]) -> str:
        e = m.group(1)
        if e[0] == "x" and len(e) == 3:
            return chr(int(e[1:], 16))
        return {"n": "\n", "t": "\t", "r": "\r"}.get(e, e)

    return _ESC.sub(sub, text)


def fields(text: str) -> dict[str, str]:
    """``key=value`` pairs of a FLEET line (values may be quoted)."""
    return {k: v for k, v in _KV.findall(text)}


def _int(v: str | None) -> int | None:
    if v is None:
        return None
    try:
        return int(v)
    except ValueError:
        return None


def _fast_heartbeat(line: str) -> GuestHeartbeat | None:
    """The common case, without regular expressions: ``FLEET HB seq=.. up_ms=.. c0=..``."""
    words = line.split()
    if len(words) < 3 or words[1] != "HB":
        return None
    kv = {}
    for w in words[2:]:
        k, sep, v = w.partition("=")
        if not sep or not v.isdigit():
            return None
        kv[k] = int(v)
    seq = kv.get("seq")
    if seq is None:
        return None
    counters = []
    i = 0
    while (c := kv.get(f"c{i}")) is not None:
        counters.append(c)
        i += 1
    if len(kv) != 2 + len(counters) - ("up_ms" not in kv):
        return None             # something unexpected: let the general parser decide
    return GuestHeartbeat(seq, kv.get("up_ms"), tuple(counters))


def parse_line(line: str) -> GuestEvent | None:
    """Parse one console line; None if it is not a well-formed FLEET line."""
    if line.startswith("FLEET HB "):
        hb = _fast_heartbeat(line)
        if hb is not None:
            return hb
    m = _LINE.search(line.rstrip("\r\n"))
    if not m:
        return None
    kind, rest = m.group(1), m.group(2)
    kv = fields(rest)
    if kind == "HB":
        seq = _int(kv.get("seq"))
        if seq is None:
            return None
        counters = []
        i = 0
        while f"c{i}" in kv:
            c = _int(kv[f"c{i}"])
            if c is None:
                return None
            counters.append(c)
            i += 1
        return GuestHeartbeat(seq, _int(kv.get("up_ms")), tuple(counters))
    if kind == "READY":
        online, sep, expected = kv.get("cpus", "").partition("/")
        if not sep or _int(online) is None or _int(expected) is None:
            return None
        return GuestReady(int(online), int(expected), _int(kv.get("bringup_us")))
    if kind == "BOOT":
        return GuestBoot(_int(kv.get("proto")) or 0, unquote(kv.get("cmdline", "")))
    if kind == "PANIC":
        return GuestPanic(_int(kv.get("cpu")), unquote(kv.get("msg", "")))
    if kind == "EXIT":
        code = _int(kv.get("code"))
        return None if code is None else GuestExit(code)
    return None
