"""course_utils.progress: check cells record progress beside the notebooks; nothing else writes it."""

from __future__ import annotations

import json

import course_utils as cu
from course_utils import progress


def test_record_and_read_round_trip_and_keep_other_exercises(tmp_path):
    progress.record("softmax", "01_x", "failed", folder=tmp_path)
    progress.record("log_softmax", "01_x", "pending", folder=tmp_path)
    progress.record("softmax", "01_x", "passed", folder=tmp_path)
    got = progress.read(tmp_path)
    assert got["softmax"]["status"] == "passed" and got["log_softmax"]["status"] == "pending"
    assert got["softmax"]["chapter"] == "01_x" and got["softmax"]["when"]
    assert [p.name for p in tmp_path.iterdir()] == [progress.PROGRESS_FILE]  # no temp left over


def test_a_damaged_file_reads_as_nothing_and_is_replaced(tmp_path):
    (tmp_path / progress.PROGRESS_FILE).write_text("{not json")
    assert progress.read(tmp_path) == {}
    progress.record("softmax", "01_x", "passed", folder=tmp_path)
    assert (
        json.loads((tmp_path / progress.PROGRESS_FILE).read_text())["softmax"]["status"] == "passed"
    )


def test_an_unwritable_folder_never_fails_a_check(tmp_path):
    missing = tmp_path / "gone"
    progress.record("softmax", "01_x", "passed", folder=missing)  # no error
    assert progress.read(missing) == {}


def test_outside_a_notebook_kernel_check_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not progress.enabled()
    cu.check("softmax", cu.reference("softmax"))
    assert not (tmp_path / progress.PROGRESS_FILE).exists()


def test_course_progress_0_switches_it_off(monkeypatch):
    monkeypatch.setenv("COURSE_PROGRESS", "0")
    assert not progress.enabled()
