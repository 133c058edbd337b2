"""The run-time console: bad input never hurts the guest."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.anyio

HB_MS = 50


async def test_unknown_and_malformed_commands(launch, accel):
    vm = await launch(accel=accel, smp=2, append=f"hb_ms={HB_MS}")
    await vm.ready()
    await vm.heartbeats(1)
    cases = [
        ("bogus", r'^FLEET ERR unknown command "bogus"$'),
        ("PANIC", r'^FLEET ERR unknown command "PANIC"$'),  # commands are case-sensitive
        ("panic now", r'^FLEET ERR bad arguments "panic now"$'),
        ("exit x", r'^FLEET ERR bad arguments "exit x"$'),
        ("stall", r'^FLEET ERR bad arguments "stall"$'),
        ("stall 99", r"^FLEET ERR stall: no cpu 99$"),
        ("corrupt", r"^FLEET ERR corrupt: only with workload=smp-test$"),
        (b"\x01\xff \"q\" \\", r'^FLEET ERR unknown command "\\x01\\xff \\"q\\" \\\\"$'),
        ("x" * 300, r"^FLEET ERR command too long$"),
    ]
    for cmd, expect in cases:
        mark = await vm.send(cmd)
        await vm.wait_line(expect, timeout=10, start=mark)
    # blank lines and CRLF are fine, and the guest is still heartbeating with both CPUs
    await vm.send(b"\r\n\n   \r\n")
    have = len(vm.heartbeat_lines())
    hbs = await vm.heartbeats(have + 3)
    assert all(b > a for a, b in zip(hbs[have].counters, hbs[-1].counters)), vm.text()
    assert vm.matching(r"^FLEET PANIC") == [], vm.text()


async def test_commands_split_across_writes(launch, accel_tcg):
    vm = await launch(accel=accel_tcg, smp=1, append=f"hb_ms={HB_MS}")
    await vm.ready()
    await vm.heartbeats(1)
    assert vm._writer is not None
    for chunk in (b"ex", b"it", b" 1", b"2\n"):
        vm._writer.write(chunk)
        await vm._writer.drain()
    assert await vm.wait_exit() == (12 << 1) | 1, vm.text()


async def test_commands_before_ready_are_kept(launch, accel_tcg):
    """Input that arrives while the guest is still booting is acted on after READY."""
    vm = await launch(accel=accel_tcg, smp=2, append=f"hb_ms={HB_MS}")
    await vm.send("exit 3")  # right after `cont`
    assert await vm.wait_exit() == 7, vm.text()
    assert vm.matching(r"^FLEET READY cpus=2/2 "), vm.text()
