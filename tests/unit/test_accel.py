"""Accelerator choice for a spec under a probe decision (pure)."""

from __future__ import annotations

import pytest

from fleetd.accel import AccelDecision, choose
from fleetd.errors import AccelError
from fleetd.spec import parse_spec

KVM = AccelDecision("kvm", True, "kvm_pvm", "host,-arch-capabilities", "ok")
TCG = AccelDecision("tcg", False, None, None, "no /dev/kvm")


def test_auto_follows_probe() -> None:
    assert choose(parse_spec({}), KVM).accel == "kvm"
    assert choose(parse_spec({}), KVM).cpu_model == "host,-arch-capabilities"
    assert choose(parse_spec({}), TCG).accel == "tcg"
    assert choose(parse_spec({}), TCG).cpu_model == "max"


def test_host_flags_kept_and_probe_flag_added() -> None:
    spec = parse_spec({"cpu_model": "host,+x2apic,-pmu"})
    c = choose(spec, KVM)
    assert c.cpu_model == "host,+x2apic,-pmu,-arch-capabilities"
    c = choose(spec, TCG)
    assert c.cpu_model == "max,+x2apic,-pmu"
    assert c.notes


def test_explicit_kvm_unusable_is_a_clear_error() -> None:
    with pytest.raises(AccelError, match="accel: kvm requested but not usable"):
        choose(parse_spec({"accel": "kvm"}), TCG)


def test_explicit_tcg_under_kvm_host() -> None:
    c = choose(parse_spec({"accel": "tcg"}), KVM)
    assert (c.accel, c.cpu_model) == ("tcg", "max")
