"""course_utils.cli: each subcommand's happy path, and one clear line for each user error."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from course_utils import __version__, grade
from course_utils.cli import main

CHAPTER = "01_logits_softmax_cross_entropy"
SOFTMAX = '''import torch

def softmax(logits, dim=-1):
    """Stable softmax along dim."""
    shifted = logits - logits.amax(dim=dim, keepdim=True)
    return shifted.exp() / shifted.exp().sum(dim=dim, keepdim=True)'''
LOG_SOFTMAX_STUB = (
    "def log_softmax(logits, dim=-1):\n    raise NotImplementedError('log_softmax: write it')"
)
CROSS_ENTROPY_WRONG = "def cross_entropy(logits, target):\n    return logits.sum()"


def write_notebook(path: Path, *sources: str, chapter: str | None = CHAPTER) -> Path:
    nb = new_notebook(cells=[new_code_cell(s) for s in sources])
    if chapter:
        nb.metadata["course"] = {"chapter": chapter}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_in_a_real_subprocess() -> None:
    command = (
        [shutil.which("course")]
        if shutil.which("course")
        else [sys.executable, "-m", "course_utils.cli"]
    )
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == ""
    for name in ("list", "check", "status", "grade", "build"):
        assert name in done.stdout


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--version"], capsys)[:2] == (0, f"course {__version__}\n")


def test_list_shows_chapters_exercises_and_notebooks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_notebook(tmp_path / f"{CHAPTER}.ipynb", SOFTMAX)
    code, out, err = run(["list", "--course", str(tmp_path)], capsys)
    assert code == 0 and err == ""
    assert f"{CHAPTER}  ({tmp_path / CHAPTER}.ipynb)" in out
    assert "  softmax(logits, dim=-1) -> Tensor" in out


@pytest.fixture
def user_errors(tmp_path: Path) -> dict[str, list[str]]:
    """Command lines a user can get wrong, by what is wrong with them."""
    good = write_notebook(tmp_path / f"{CHAPTER}.ipynb", SOFTMAX)
    bad_json = tmp_path / "01_bad.ipynb"
    bad_json.write_text("{not json")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    nameless = write_notebook(tmp_path / "homework.ipynb", SOFTMAX, chapter=None)
    (tmp_path / "empty").mkdir()
    return {
        "no command": [],
        "unknown command": ["frobnicate"],
        "missing argument": ["check"],
        "missing file": ["check", str(tmp_path / "nope.ipynb")],
        "a folder": ["check", str(tmp_path)],
        "not a notebook": ["check", str(text)],
        "bad JSON": ["check", str(bad_json)],
        "unknown chapter": ["check", str(nameless)],
        "unknown exercise": ["check", str(good), "--exercise", "sofmax"],
        "bad timeout": ["check", str(good), "--timeout", "soon"],
        "empty submissions": ["grade", str(tmp_path / "empty"), "--out", str(tmp_path / "g.csv")],
        "missing submissions": ["grade", str(tmp_path / "nowhere")],
        "missing status dir": ["status", str(tmp_path / "nowhere")],
        "missing solutions": ["build", "--solutions", str(tmp_path / "nowhere")],
    }


@pytest.mark.parametrize(
    "case",
    [
        "no command",
        "unknown command",
        "missing argument",
        "missing file",
        "a folder",
        "not a notebook",
        "bad JSON",
        "unknown chapter",
        "unknown exercise",
        "bad timeout",
        "empty submissions",
        "missing submissions",
        "missing status dir",
        "missing solutions",
    ],
)
def test_user_errors_are_one_line_exit_2(
    case: str, user_errors: dict[str, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(user_errors[case], capsys)
    assert code == 2, (case, out, err)
    assert err.startswith("course: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in out + err
    if case == "unknown exercise":
        assert "did you mean softmax" in err


def test_grade_without_kernels_writes_csv(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    subs = tmp_path / "subs"
    (subs / "erin").mkdir(parents=True)
    (subs / "erin" / "01_x.ipynb").write_text("{")
    write_notebook(subs / "frank" / "homework.ipynb", "1", chapter=None)
    code, out, _ = run(["grade", str(subs), "--out", str(tmp_path / "g.csv")], capsys)
    assert code == 0 and "graded 2 notebooks of 2 students: 0/2 exercises passed" in out
    assert (tmp_path / "g.csv").exists() and (tmp_path / "g.xml").exists()


@pytest.mark.slow
def test_check_one_line_per_exercise(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_notebook(
        tmp_path / "01_mine.ipynb", SOFTMAX, LOG_SOFTMAX_STUB, CROSS_ENTROPY_WRONG, chapter=None
    )
    code, out, err = run(["check", str(path), "--timeout", "240"], capsys)
    assert code == 1, err
    lines = dict(line.strip().split(": ", 1) for line in out.splitlines()[1:-1])
    assert list(lines) == [e.id for e in grade.chapter_exercises(CHAPTER)]
    assert lines["softmax"] == "passed"
    assert lines["log_softmax"] == "pending (not implemented yet)"
    assert lines["cross_entropy"].startswith("FAILED: in case ")
    assert lines["gumbel_softmax"] == "missing (the notebook defines no `gumbel_softmax`)"
    assert out.splitlines()[-1] == f"1/{len(lines)} passed"


@pytest.mark.slow
def test_check_one_exercise_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_notebook(tmp_path / "mine.ipynb", SOFTMAX, CROSS_ENTROPY_WRONG)
    code, out, _ = run(["check", str(path), "--exercise", "softmax", "--timeout", "240"], capsys)
    assert code == 0 and out.splitlines()[1:] == ["  softmax: passed", "1/1 passed"]


@pytest.mark.slow
def test_status_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_notebook(tmp_path / f"{CHAPTER}.ipynb", SOFTMAX, LOG_SOFTMAX_STUB)
    code, out, _ = run(["status", str(tmp_path), "--run", "--timeout", "240"], capsys)
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert rows["00_gradient_checking"].endswith("not started")
    assert (
        "1/5" in rows[CHAPTER]
        and "log_softmax" in rows[CHAPTER]
        and "cross_entropy (missing)" in rows[CHAPTER]
    )


def test_status_reads_what_the_check_cells_recorded_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from course_utils import progress

    progress.record("softmax", CHAPTER, "passed", folder=tmp_path)
    progress.record("log_softmax", CHAPTER, "pending", folder=tmp_path)
    progress.record("cross_entropy", CHAPTER, "failed", folder=tmp_path)
    code, out, _ = run(["status", str(tmp_path)], capsys)
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert rows["00_gradient_checking"].endswith("not started")
    row = rows[CHAPTER]
    assert "1/5" in row and "log_softmax," in row and "cross_entropy (failed)" in row
    assert "changed since" not in row
    # a notebook saved after its last check is flagged
    nb = write_notebook(tmp_path / f"{CHAPTER}.ipynb", SOFTMAX)
    os.utime(nb, (time.time() + 60, time.time() + 60))
    _, out, _ = run(["status", str(tmp_path)], capsys)
    assert "notebook changed since its last check" in out


def test_status_with_nothing_recorded_says_how_to_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(["status", str(tmp_path)], capsys)
    assert code == 0 and "No check has run" in out and "--run" in out


@pytest.mark.slow
def test_a_check_cell_records_progress_beside_its_notebook(tmp_path: Path) -> None:
    from course_utils import bench, progress

    path = write_notebook(
        tmp_path / f"{CHAPTER}.ipynb",
        SOFTMAX,
        'import course_utils as cu\ncu.check("softmax", softmax)',
    )
    bench.time_notebook(path, strict=False, timeout=240)
    assert progress.read(tmp_path)["softmax"]["status"] == "passed"
