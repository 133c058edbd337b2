#!/usr/bin/env python3
"""Boot-time benchmark for the bundled fleet-guest kernel.

For each accelerator (tcg, and kvm when usable), firmware (seabios, qboot) and -smp count,
start QEMU `--runs` times and measure, from the moment QEMU is spawned, when the console
shows the first FLEET line (BOOT), READY (all CPUs online) and the first heartbeat. Prints
the medians as a table; `--json FILE` also writes every sample.

Standalone: needs only Python 3.11, qemu-system-x86_64 and the built guest
(`make -C guest`). Usage:

    .venv/bin/python bench/guest_boot.py [--runs 5] [--smp 1,2,4,8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = REPO / "guest" / "build" / "fleet-guest.elf"
QBOOT_CANDIDATES = ("/usr/share/qemu/qboot.rom", "/usr/share/qboot/bios.bin")
KVM_CPU = "host,-arch-capabilities"


def qboot_path() -> str | None:
    return next((p for p in QBOOT_CANDIDATES if os.path.exists(p)), None)


def qemu_argv(qemu: str, image: Path, accel: str, firmware: str, smp: int, machine: str, append: str) -> list[str]:
    argv = [
        qemu, "-nodefaults", "-no-user-config", "-display", "none",
        "-machine", machine, "-accel", accel, "-m", "64", "-smp", str(smp),
        "-kernel", str(image), "-append", append, "-serial", "stdio",
    ]
    if accel == "kvm":
        argv += ["-cpu", KVM_CPU]
    if firmware == "qboot":
        argv += ["-bios", qboot_path() or "qboot.rom"]
    return argv


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def one_run(argv: list[str], timeout: float) -> dict[str, float | None]:
    """Spawn QEMU and time BOOT / READY / first HB (ms since spawn)."""
    out: dict[str, float | None] = {"boot_ms": None, "ready_ms": None, "hb_ms": None, "bringup_us": None}
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        buf = b""
        deadline = t0 + timeout
        while out["hb_ms"] is None:
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                break
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                break
            chunk = os.read(fd, 65536)
            now = (time.monotonic() - t0) * 1000
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.startswith(b"FLEET BOOT ") and out["boot_ms"] is None:
                    out["boot_ms"] = now
                elif line.startswith(b"FLEET READY ") and out["ready_ms"] is None:
                    out["ready_ms"] = now
                    for word in line.split():
                        if word.startswith(b"bringup_us="):
                            out["bringup_us"] = float(word.split(b"=")[1])
                elif line.startswith(b"FLEET HB ") and out["hb_ms"] is None:
                    out["hb_ms"] = now
    finally:
        kill(proc)
    return out


def kvm_usable(qemu: str, image: Path) -> tuple[bool, str]:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        return False, f"/dev/kvm: {e.strerror}"
    r = one_run(qemu_argv(qemu, image, "kvm", "qboot" if qboot_path() else "seabios", 1, "q35", "hb_ms=50"), 20)
    if r["hb_ms"] is None:
        return False, "a KVM guest did not reach its first heartbeat"
    return True, "ok"


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="runs per configuration (median reported)")
    ap.add_argument("--smp", default="1,2,4,8", help="comma-separated CPU counts")
    ap.add_argument("--accel", default="auto", help="tcg, kvm, or auto (tcg + kvm when usable)")
    ap.add_argument("--firmware", default="seabios,qboot", help="comma-separated: seabios, qboot")
    ap.add_argument("--machine", default="q35")
    ap.add_argument("--append", default="hb_ms=100", help="guest command line")
    ap.add_argument("--timeout", type=float, default=60.0, help="per-run timeout (s)")
    ap.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    ap.add_argument("--qemu", default=shutil.which("qemu-system-x86_64") or "qemu-system-x86_64")
    ap.add_argument("--json", type=Path, help="also write all samples to this file")
    args = ap.parse_args()

    if not args.image.exists():
        print(f"guest image {args.image} missing: run `make -C guest` first", file=sys.stderr)
        return 2
    smps = [int(s) for s in args.smp.split(",") if s]
    firmwares = [f for f in args.firmware.split(",") if f]
    if "qboot" in firmwares and qboot_path() is None:
        print("qboot not installed: skipping it", file=sys.stderr)
        firmwares.remove("qboot")
    notes: list[str] = []
    if args.accel == "auto":
        accels = ["tcg"]
        ok, why = kvm_usable(args.qemu, args.image)
        if ok:
            accels.append("kvm")
        else:
            notes.append(f"kvm skipped: {why}")
    else:
        accels = [a for a in args.accel.split(",") if a]

    results = []
    header = f"{'accel':5} {'firmware':8} {'smp':>3}  {'BOOT ms':>8} {'READY ms':>9} {'1st HB ms':>10} {'bringup us':>10}  ok"
    print(header)
    print("-" * len(header))
    for accel in accels:
        for firmware in firmwares:
            for smp in smps:
                argv = qemu_argv(args.qemu, args.image, accel, firmware, smp, args.machine, args.append)
                samples = [one_run(argv, args.timeout) for _ in range(args.runs)]
                good = [s for s in samples if s["hb_ms"] is not None]
                row = {
                    "accel": accel, "firmware": firmware, "smp": smp, "machine": args.machine,
                    "append": args.append, "runs": args.runs, "ok": len(good), "samples": samples,
                    "median": {k: median([s[k] for s in good if s[k] is not None])  # type: ignore[misc]
                               for k in ("boot_ms", "ready_ms", "hb_ms", "bringup_us")},
                }
                results.append(row)
                m = row["median"]
                print(f"{accel:5} {firmware:8} {smp:>3}  {fmt(m['boot_ms']):>8} {fmt(m['ready_ms']):>9} "
                      f"{fmt(m['hb_ms']):>10} {fmt(m['bringup_us']):>10}  {len(good)}/{args.runs}", flush=True)
    for n in notes:
        print(n)
    if args.json:
        qv = subprocess.run([args.qemu, "--version"], capture_output=True, text=True).stdout.splitlines()
        meta = {
            "qemu": qv[0] if qv else "?", "host": platform.node(), "cpus": os.cpu_count(),
            "image": str(args.image), "image_bytes": args.image.stat().st_size, "notes": notes,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(r["ok"] == r["runs"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
