"""The sweep's image writer thread: writes in order, and after a failure runs no more and
raises in the caller, so what is on disk is what an inline writer would have left."""

from __future__ import annotations

import time

import pytest

from charaforge.generate.sweep_methods import ImageWriter


def test_writes_run_in_order_and_all_are_done_on_leaving() -> None:
    done: list[int] = []
    with ImageWriter() as writer:
        for index in range(20):
            writer.submit(done.append, index)
    assert done == list(range(20))


def test_after_a_failed_write_none_runs_and_the_error_reaches_the_caller() -> None:
    done: list[int] = []

    def write(index: int) -> None:
        if index == 3:
            raise KeyboardInterrupt  # as a test's on_image interrupts a sweep
        done.append(index)

    with pytest.raises(KeyboardInterrupt), ImageWriter() as writer:
        for index in range(10):
            writer.submit(write, index)
    assert done == [0, 1, 2]


def test_the_caller_stops_at_its_next_submit_after_a_failure() -> None:
    """So a sweep stops rendering as soon as a write failed, not only at the end of a cell."""
    submitted: list[int] = []

    def fail() -> None:
        raise OSError(28, "No space left on device")

    with ImageWriter() as writer:
        writer.submit(fail)
        while writer._error is None:  # the writer thread records it
            time.sleep(0.01)
        with pytest.raises(OSError, match="No space"):
            writer.submit(submitted.append, 1)
    assert submitted == []
