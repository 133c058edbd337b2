"""FLEET console protocol parsing (guest/PROTOCOL.md)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetd.guestproto import (GuestBoot, GuestExit, GuestHeartbeat, GuestPanic, GuestReady,
                               parse_line, unquote)


def test_boot() -> None:
    ev = parse_line('FLEET BOOT proto=1 cmdline="workload=idle x=\\"q\\" \\\\ \\x07"')
    assert ev == GuestBoot(1, 'workload=idle x="q" \\ \x07')


def test_ready() -> None:
    assert parse_line("FLEET READY cpus=3/4 bringup_us=1234") == GuestReady(3, 4, 1234)


def test_heartbeat_counters_in_order() -> None:
    ev = parse_line("FLEET HB seq=7 up_ms=700 c0=10 c1=20 c2=30\r")
    assert ev == GuestHeartbeat(7, 700, (10, 20, 30))


def test_panic_and_exit() -> None:
    assert parse_line('FLEET PANIC cpu=1 msg="smp-test: sum 5 != 6"') == GuestPanic(
        1, "smp-test: sum 5 != 6")
    assert parse_line("FLEET EXIT code=3") == GuestExit(3)


def test_interleaved_prefix_is_tolerated() -> None:
    assert parse_line("[    1.0] FLEET HB seq=1 up_ms=5 c0=1") == GuestHeartbeat(1, 5, (1,))


@pytest.mark.parametrize("line", [
    "", "hello", "FLEET", "FLEET HB", "FLEET HB seq=x", "FLEET READY cpus=2",
    "FLEET READY cpus=a/b", "FLEET EXIT", "FLEET HB seq=1 c0=x", "FLEETX HB seq=1",
    "FLEET UNKNOWN a=1"])
def test_garbage_is_ignored(line: str) -> None:
    assert parse_line(line) is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_never_raises(text: str) -> None:
    parse_line(text)
    unquote(text)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**12), st.one_of(st.none(), st.integers(0, 10**12)),
       st.lists(st.integers(0, 2**63), max_size=16), st.sampled_from(["", "\r", " "]))
def test_fast_heartbeat_path_agrees_with_the_grammar(seq: int, up: int | None, cs: list[int],
                                                       tail: str) -> None:
    line = f"FLEET HB seq={seq}" + (f" up_ms={up}" if up is not None else "") + "".join(
        f" c{i}={c}" for i, c in enumerate(cs)) + tail
    assert parse_line(line) == GuestHeartbeat(seq, up, tuple(cs))
    assert parse_line("x " + line) == GuestHeartbeat(seq, up, tuple(cs))   # the regex path
