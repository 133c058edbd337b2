"""The VM lifecycle state machine: guarded transitions."""

from __future__ import annotations

import pytest

from fleetd.errors import StateError
from fleetd.vm import VmState, check_transition


def test_terminal_states_have_no_way_out() -> None:
    for end in (VmState.STOPPED, VmState.CRASHED):
        for new in VmState:
            if new != end:
                with pytest.raises(StateError) as info:
                    check_transition("v", end, new)
                assert info.value.state == end.value
                assert info.value.vm == "v"


@pytest.mark.parametrize(("old", "new"), [
    (VmState.CREATED, VmState.RUNNING),
    (VmState.PANICKED, VmState.RUNNING),
    (VmState.STOPPING, VmState.RUNNING),
    (VmState.CREATED, VmState.PAUSED),
])
def test_invalid_transitions_name_the_state(old: VmState, new: VmState) -> None:
    with pytest.raises(StateError, match=f"while {old.value}"):
        check_transition("web-0", old, new, "resume")


def test_happy_path_allowed() -> None:
    seq = [VmState.CREATED, VmState.STARTING, VmState.RUNNING, VmState.PAUSED, VmState.RUNNING,
           VmState.STOPPING, VmState.STOPPED]
    for a, b in zip(seq, seq[1:]):
        check_transition("v", a, b)
    for a, b in [(VmState.RUNNING, VmState.PANICKED), (VmState.PANICKED, VmState.CRASHED),
                 (VmState.RUNNING, VmState.CRASHED)]:
        check_transition("v", a, b)
