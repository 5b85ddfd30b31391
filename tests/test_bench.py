"""course_utils.bench: the timing script still runs (its table is measured, never asserted)."""

from __future__ import annotations

import math

import torch

from course_utils import bench, checking


def test_time_checks_times_every_exercise_on_its_reference() -> None:
    threads = torch.get_num_threads()
    try:
        seconds = bench.time_checks(seeds=1)
    finally:
        torch.set_num_threads(threads)  # time_checks pins one thread, as the budget is per core
    assert set(seconds) == {e.id for e in checking.exercises()}
    assert all(math.isfinite(s) and s >= 0 for s in seconds.values())
