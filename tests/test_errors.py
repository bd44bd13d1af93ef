"""Which errors a task group's wrapping gives back to callers."""

from __future__ import annotations

from nanobatch.errors import NanobatchError, RunAborted, sole_error


def test_our_errors_come_out_of_nested_task_groups_first_one_first() -> None:
    disk = NanobatchError("cannot write results")
    group = ExceptionGroup("outer", [ExceptionGroup("inner", [disk]), RunAborted("budget reached")])
    assert sole_error(group) is disk


def test_a_group_holding_a_bug_is_not_unwrapped() -> None:
    # Reporting only our error would hide the bug's traceback.
    group = ExceptionGroup("outer", [NanobatchError("cannot write results"), ExceptionGroup("inner", [KeyError("x")])])
    assert sole_error(group) is None
