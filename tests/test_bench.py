"""course_utils.bench: the timing script still runs (its table is measured, never asserted)."""

from __future__ import annotations

import math

import torch

from course_utils import bench, checking


def test_time_checks_times_every_exercise_of_the_chapters_asked_on_its_reference() -> None:
    # Two chapters: every reference passing its own battery is test_checking's job; this one
    # is about the timing loop (and all chapters would cost a minute of CI).
    threads = torch.get_num_threads()
    try:
        seconds = bench.time_checks(seeds=1, chapters=["00", "03"])
    finally:
        torch.set_num_threads(threads)  # time_checks pins one thread, as the budget is per core
    wanted = {e.id for e in checking.exercises() if e.chapter[:2] in ("00", "03")}
    assert set(seconds) == wanted and len(wanted) >= 5
    assert all(math.isfinite(s) and s >= 0 for s in seconds.values())


def test_the_table_reads_back_what_it_wrote(tmp_path) -> None:
    (tmp_path / ".ci").mkdir()
    ids = [e.id for e in checking.exercises()][:2]
    notebooks = {"00_gradient_checking": (6.1, 5.9, 60.0), "01_logits": (8.0, 7.5, 60.0)}
    path = bench.write_table(tmp_path, notebooks, {ids[0]: 0.25, ids[1]: 0.5})
    got_notebooks, got_checks = bench.read_table(path)
    assert got_notebooks == notebooks
    assert got_checks == {ids[0]: 0.25, ids[1]: 0.5}


def test_a_check_over_its_own_budget_is_flagged(tmp_path) -> None:
    (tmp_path / ".ci").mkdir()
    ex = checking.exercises()[0]
    text = bench.write_table(
        tmp_path, {ex.chapter: (1.0, 1.0, 60.0)}, {ex.id: ex.budget + 0.5}
    ).read_text()
    assert f"| {ex.chapter} |" in text and "| NO |" in text
