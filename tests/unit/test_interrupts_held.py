"""interrupts.held(): a signal during a section that must not be cut in two is raised as the section ends."""

from __future__ import annotations

import pytest

from bnbcli import interrupts


def test_a_signal_inside_a_held_section_is_raised_when_it_ends() -> None:
    done = []
    with pytest.raises(KeyboardInterrupt), interrupts.held():
        with interrupts.held():
            assert interrupts.hold_if_held()  # what the handler does when a signal comes here
            done.append("inner")
        done.append("outer")  # the inner end is not the section's end: it goes on
    assert done == ["inner", "outer"]


def test_outside_a_held_section_the_handler_raises_at_once() -> None:
    assert not interrupts.hold_if_held()
    with interrupts.held():
        pass  # no signal: nothing raised
