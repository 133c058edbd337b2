"""configs/: every file validates; the seed's setup builds the seed's command line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fleetctl.main import app, build_start_request
from fleetd.accel import AccelDecision, choose
from fleetd.argv import Launch, VmPaths, build_argv
from fleetd.config import load_config
from fleetd.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
SNAP = Path(__file__).parent / "snapshots"
SEED_APPEND = ('vfs.fstab=[ "initrd0:/:extract:::" ] env.vars=[ "PATH=/usr/local/sbin:/usr/local/'
               'bin:/usr/sbin:/usr/bin:/sbin:/bin" ] -- /smp-poc')
NESTED_KVM = AccelDecision("kvm", True, "kvm_pvm", "host,-arch-capabilities", "probe")
NO_KVM = AccelDecision("tcg", False, None, None, "no /dev/kvm")


def seed_argv(decision: AccelDecision) -> list[str]:
    req = build_start_request(config=CONFIGS / "smp-poc.toml")
    spec = parse_spec(req["spec"])
    paths = VmPaths(Path("/run/fleetd/vm/smp-poc-0"), Path("/var/lib/fleetd/vms/smp-poc-0"))
    return build_argv(spec, Launch("smp-poc-0", paths, choose(spec, decision), index=0,
                                   fleet="smp-poc"))


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_seed_command_line_under_kvm() -> None:
    argv = seed_argv(NESTED_KVM)
    # the config's relative paths resolve against wherever this checkout lives
    argv = [a.replace(str(ROOT.parent), "<checkout>/..") for a in argv]
    path = SNAP / "seed_smp_poc_kvm.json"
    if os.environ.get("UPDATE_SNAPSHOTS") or not path.exists():
        path.write_text(json.dumps(argv, indent=1) + "\n")
    # the seed, element by element (modulo fleetd's own sockets and the probe's CPU fallback):
    assert opt(argv, "-kernel")[0].endswith("base_kernel/kernel")                 # -kernel
    assert opt(argv, "-initrd")[0].endswith(".unikraft/build/initramfs-x86_64.cpio")
    assert opt(argv, "-machine") == ["pc"] and opt(argv, "-accel") == ["kvm"]  # pc,accel=kvm
    assert opt(argv, "-cpu") == ["host,+x2apic,-pmu,-arch-capabilities"]        # flags kept
    assert opt(argv, "-m") == ["953M"] and opt(argv, "-smp") == ["cpus=3"]
    assert opt(argv, "-append") == [SEED_APPEND]                                # byte for byte
    netdev, = opt(argv, "-netdev")
    assert netdev == "user,id=net0,hostfwd=tcp:127.0.0.1:8080-:8080"            # loopback only
    dev = [d for d in opt(argv, "-device") if d.startswith("virtio-net-pci")]
    assert dev and "netdev=net0" in dev[0] and "mac=02:fd:" in dev[0]            # unique MAC
    assert "-no-reboot" in argv and opt(argv, "-rtc") == ["base=utc"]
    assert "-nodefaults" in argv                 # implies -parallel none; -nographic -> -display none
    assert opt(argv, "-display") == ["none"]
    assert argv == json.loads(path.read_text()), "argv differs from snapshot"


def test_seed_command_line_falls_back_to_tcg() -> None:
    argv = seed_argv(NO_KVM)
    assert opt(argv, "-accel") == ["tcg,thread=multi"]
    assert opt(argv, "-cpu") == ["max,+x2apic,-pmu"]


@pytest.mark.parametrize("path", sorted(p.name for p in CONFIGS.glob("*.toml")))
def test_every_config_parses(path: str) -> None:
    p = CONFIGS / path
    if "[daemon]" in p.read_text():
        load_config(p)
    else:
        req = build_start_request(config=p)
        parse_spec(req["spec"])


def test_validate_names_line_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nreplicas = 2\n\n[spec]\ncpus = 0\n')
    r = CliRunner().invoke(app, ["config", "validate", str(bad)])
    assert r.exit_code == 2
    assert f"{bad}:5: spec.cpus:" in r.output
    bad.write_text('name = "x"\n[policy.health]\nheartbeat_timeout = "soon"\n')
    r = CliRunner().invoke(app, ["config", "validate", str(bad)])
    assert r.exit_code == 2 and ":3: policy.health.heartbeat_timeout:" in r.output
    bad.write_text('[daemon]\nhousekeeping = "x-y"\n')
    r = CliRunner().invoke(app, ["config", "validate", str(bad)])
    assert r.exit_code == 2 and ":2: housekeeping:" in r.output


def test_validate_reports_missing_kernel_with_its_line(tmp_path: Path) -> None:
    f = tmp_path / "k.toml"
    f.write_text('name = "k"\n[spec]\nkernel = "nope.elf"\n')
    r = CliRunner().invoke(app, ["config", "validate", str(f)])
    assert r.exit_code == 2 and ":3: spec.kernel: file not found" in r.output
