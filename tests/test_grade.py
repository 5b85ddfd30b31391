"""course_utils.grade: notebooks graded by what they define, in a kernel that cannot hurt the batch."""

from __future__ import annotations

import csv
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import nbfactory
import nbformat
import pytest
from nbfactory import write

from course_utils import build, grade

CHAPTER = "01_logits_softmax_cross_entropy"
# A chapter may gain exercises, never lose these; the tests follow the registry.
IDS = [e.id for e in grade.chapter_exercises(CHAPTER)]

IMPORTS = "import torch\nimport course_utils as cu"
SOFTMAX = '''def softmax(logits, dim=-1):
    """Stable softmax along dim."""
    shifted = logits - logits.amax(dim=dim, keepdim=True)
    e = shifted.exp()
    return e / e.sum(dim=dim, keepdim=True)'''


def notebook(*sources: str, chapter: str | None = CHAPTER) -> nbformat.NotebookNode:
    """A notebook of chapter 01 unless told otherwise."""
    return nbfactory.notebook(*sources, chapter=chapter)


def snapshot(folder: Path) -> dict[Path, tuple[bytes, int]]:
    return {
        p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()
    }


def by_exercise(result: grade.NotebookResult) -> dict[str, str]:
    return {row["exercise"]: row["status"] for row in result.rows}


# ---- chapter_of: in this process, no kernel ---------------------------------------------------


def test_chapter_of_metadata_then_file_prefix() -> None:
    assert grade.chapter_of(notebook(), "whatever.ipynb") == CHAPTER
    assert grade.chapter_of(notebook(chapter=None), "01_my_work.ipynb") == CHAPTER
    assert grade.chapter_of(notebook(chapter=None), f"{CHAPTER}.ipynb") == CHAPTER
    assert grade.chapter_of(notebook(chapter="77_unknown"), "homework.ipynb") is None
    assert grade.chapter_of(notebook(chapter=None), "99_x.ipynb") is None


def test_grade_dir_needs_notebooks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no notebooks"):
        grade.grade_dir(tmp_path, tmp_path / "g.csv")
    with pytest.raises(FileNotFoundError):
        grade.grade_dir(tmp_path / "missing", tmp_path / "g.csv")


# ---- one batch of real submissions, executed once for the tests below ------------------------


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory, solution_cells) -> dict:
    """Grade a class: correct, stubbed, rearranged, crashing, malformed and chapterless notebooks."""
    # The other exercises come from the solution notebook (the course's references never pass).
    others = "\n\n".join(solution_cells(CHAPTER, [i for i in IDS if i != "softmax"]))
    root = tmp_path_factory.mktemp("grading")
    subs = root / "submissions"
    name = f"{CHAPTER}.ipynb"
    write(subs / "alice" / name, notebook(IMPORTS, SOFTMAX, 'cu.check("softmax", softmax)', others))
    write(subs / "alice" / ".ipynb_checkpoints" / name, notebook("raise SystemExit"))
    # bob's notebook is what `course build` gives a learner: every exercise a stub.
    solution = notebook(
        IMPORTS, SOFTMAX.replace('."""', '."""\n    ### BEGIN SOLUTION') + "\n    ### END SOLUTION"
    )
    write(
        subs / "bob" / name, build.student_notebook(solution, chapter=CHAPTER, generated_from="s")
    )
    # carol split, reordered, deleted and added cells; a wrong softmax comes first, then the right one.
    write(
        subs / "carol" / "my_copy.ipynb",
        notebook(
            "#md my notes",
            "def softmax(logits, dim=-1):\n    return logits",
            "import torch",
            "import course_utils as cu",
            "1 / 0",
            SOFTMAX,
            others,
            "#md the end",
        ),
    )
    write(subs / "dave" / name, notebook(IMPORTS, SOFTMAX, "import os\nos._exit(1)", others))
    (subs / "erin").mkdir()
    (subs / "erin" / name).write_text('{"cells": [}')
    write(subs / "frank.ipynb", notebook(IMPORTS, SOFTMAX, chapter=None))
    before = snapshot(subs)
    results = grade.grade_dir(subs, root / "out" / "grades.csv", timeout=240, jobs=2, quiet=True)
    return {
        "root": root,
        "subs": subs,
        "before": before,
        "results": {r.student: r for r in results},
    }


@pytest.mark.slow
def test_correct_notebook_passes(batch: dict) -> None:
    alice = batch["results"]["alice"]
    assert alice.status == "graded" and alice.passed, alice.rows
    assert [r["exercise"] for r in alice.rows] == IDS
    assert set(batch["results"]) == {"alice", "bob", "carol", "dave", "erin", "frank"}, (
        "checkpoints skipped"
    )


@pytest.mark.slow
def test_stub_notebook_fails_in_strict_mode(batch: dict) -> None:
    bob = batch["results"]["bob"]
    assert not bob.passed
    assert by_exercise(bob) == {i: "pending" if i == "softmax" else "missing" for i in IDS}
    assert "not implemented yet" in bob.rows[IDS.index("softmax")]["message"]


@pytest.mark.slow
def test_rearranged_notebook_is_graded_like_the_original(batch: dict) -> None:
    results = batch["results"]
    assert by_exercise(results["carol"]) == by_exercise(results["alice"])
    assert (
        results["carol"].chapter == CHAPTER and results["carol"].notebook == "carol/my_copy.ipynb"
    )


@pytest.mark.slow
def test_notebook_level_problems(batch: dict) -> None:
    dave, erin, frank = (batch["results"][s] for s in ("dave", "erin", "frank"))
    assert dave.status == "crashed" and by_exercise(dave) == {i: "crashed" for i in IDS}
    assert "cell 3" in dave.message and "os._exit" in dave.message
    assert erin.status == "malformed" and [r["exercise"] for r in erin.rows] == ["*"]
    assert "invalid JSON" in erin.message
    assert frank.status == "missing chapter" and frank.rows[0]["exercise"] == "*"


@pytest.mark.slow
def test_csv_and_junit_are_written(batch: dict) -> None:
    out = batch["root"] / "out"
    with (out / "grades.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(grade.CSV_FIELDS)
    assert {(r["student"], r["exercise"], r["status"]) for r in rows} >= {
        ("alice", "softmax", "passed"),
        ("bob", "softmax", "pending"),
        ("erin", "*", "malformed"),
        ("frank", "*", "missing chapter"),
    }
    assert len(rows) == sum(len(r.rows) for r in batch["results"].values())
    suites = ET.parse(out / "grades.xml").getroot()
    assert len(suites.findall("testsuite")) == 6
    alice = next(s for s in suites if s.get("name") == f"alice/{CHAPTER}.ipynb")
    assert alice.get("failures") == "0" and len(alice.findall("testcase")) == len(IDS)
    failures = suites.findall(".//failure")
    assert {f.get("type") for f in failures} == {
        "pending",
        "missing",
        "crashed",
        "malformed",
        "missing chapter",
    }


@pytest.mark.slow
def test_submissions_are_left_untouched(batch: dict) -> None:
    assert snapshot(batch["subs"]) == batch["before"]


@pytest.mark.slow
def test_endless_loop_times_out_and_the_batch_goes_on(tmp_path: Path) -> None:
    subs = tmp_path / "subs"
    write(subs / "hank" / f"{CHAPTER}.ipynb", notebook(IMPORTS, "while True:\n    pass"))
    (subs / "ivy").mkdir()
    (subs / "ivy" / "01_x.ipynb").write_text("not json")
    results = grade.grade_dir(subs, tmp_path / "g.csv", tmp_path / "j.xml", timeout=8, quiet=True)
    hank, ivy = results
    assert hank.status == "timeout" and by_exercise(hank) == {i: "timeout" for i in IDS}
    assert 8 <= hank.seconds < 30
    assert ivy.status == "malformed"
    assert (tmp_path / "j.xml").exists() and not (tmp_path / "g.xml").exists()


# ---- the grading child: forked from a fork server, or a fresh interpreter --------------------


def test_a_child_forked_here_reports_its_errors_in_its_log(tmp_path: Path) -> None:
    import multiprocessing

    # pytest's process may fork children (its __main__ is a module or -c): no interpreter start
    log = tmp_path / "stderr.txt"
    child = grade._start_child(["--no-such-option"], str(tmp_path), {"PATH": "/usr/bin"}, log)
    assert isinstance(child, multiprocessing.process.BaseProcess)
    assert grade._wait(child, 60) == 2
    assert "the following arguments are required: notebook" in log.read_text()


@pytest.mark.slow
def test_a_script_run_by_path_grades_in_fresh_interpreters(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = write(tmp_path / "subs" / f"{CHAPTER}.ipynb", notebook(IMPORTS, SOFTMAX))
    # No `if __name__ == "__main__"` guard: a forked child would run this script again.
    script = tmp_path / "grade_all.py"
    script.write_text(
        "from course_utils import grade\n"
        f"result = grade.grade_notebook({str(path)!r}, timeout=120, exercise='softmax')\n"
        "print(result.status, result.rows[0]['status'])\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, done.stderr[-800:]
    assert done.stdout.split() == ["graded", "passed"], done.stdout + done.stderr[-800:]


# ---- one learner cannot reach another, nor the grader's files --------------------------------


@pytest.mark.slow
def test_a_learner_cannot_touch_another_or_the_grades(tmp_path: Path) -> None:
    from course_utils import sandbox

    level, reason = sandbox.isolation_available()
    if level != "bwrap":
        pytest.skip(f"no bubblewrap isolation here ({reason}); `apt-get install bubblewrap`")
    subs, out = tmp_path / "subs", tmp_path / "out" / "grades.csv"
    name = f"{CHAPTER}.ipynb"
    alice = write(subs / "alice" / name, notebook(IMPORTS, SOFTMAX))
    bob = write(subs / "bob" / name, notebook(IMPORTS, SOFTMAX))
    marker = tmp_path / "escaped.txt"
    attacks = f"""
import os, time
for victim in ({str(alice)!r}, "../alice/{name}", {str(out)!r}):
    try:
        with open(victim, "w") as f:
            f.write("overwritten")
    except OSError:
        pass
try:
    import nbformat
    stolen = nbformat.read({str(bob)!r}, as_version=4)
    exec(next(c.source for c in stolen.cells if "def softmax" in c.source))
except Exception:
    def softmax(logits, dim=-1):
        return logits
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(4)
        for target in ({str(out)!r}, {str(marker)!r}):
            try:
                open(target, "a").write("FORGED")
            except OSError:
                pass
    os._exit(0)
"""
    greedy = "try:\n    hog = bytearray(30 * 2**30)\nexcept MemoryError:\n    hog = None"
    write(subs / "mallory" / name, notebook(IMPORTS, attacks))
    write(subs / "gus" / name, notebook(IMPORTS, greedy, SOFTMAX))
    before = snapshot(subs)
    results = {r.student: r for r in grade.grade_dir(subs, out, timeout=120, jobs=2, quiet=True)}
    time.sleep(6)  # longer than the double-forked process would sleep
    assert snapshot(subs) == before, "a submission was changed"
    assert by_exercise(results["alice"])["softmax"] == "passed"
    assert by_exercise(results["mallory"])["softmax"] == "failed", "it read bob's notebook"
    assert by_exercise(results["gus"])["softmax"] == "passed", "the kernel died of the 30 GB"
    assert "FORGED" not in out.read_text() and not marker.exists()
