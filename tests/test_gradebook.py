"""course_utils.gradebook: grades written safely, as the batch goes, and resumed after a stop."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nbfactory import notebook, write

from course_utils import grade, gradebook
from course_utils.cli import main

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = "01_logits_softmax_cross_entropy"
# Every code point, lone surrogates and controls included: what a learner's text may hold.
ANY_TEXT = st.text(
    st.one_of(
        st.characters(exclude_categories=()),
        st.sampled_from("\x00\x01\x1b\x7f\x85\ud800\udcff\ufffe\uffff\t\n\r&<>\"'"),
    ),
    max_size=40,
)


def result(
    student: str = "alice",
    notebook: str = "alice/01.ipynb",
    message: str = "expected 1.0, got 2.0",
    status: str = "failed",
    exercise: str = "softmax",
) -> grade.NotebookResult:
    rows = [grade._row(exercise, status, message, 0.25)]
    return grade.NotebookResult(
        Path(notebook), CHAPTER, "graded", "", 1.5, rows, student=student, notebook=notebook
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_notebook(path: Path, *sources: str) -> Path:
    return write(path, notebook(*sources, chapter=CHAPTER))


# ---- printable text: the XML always parses, the CSV always round-trips -----------------------


def test_forbidden_characters_are_written_as_visible_escapes() -> None:
    assert gradebook.printable("a\x1bb\x00c\x7f") == "a\\x1bb\\x00c\\x7f"
    assert gradebook.printable("lone \ud800 and \ufffe") == "lone \\ud800 and \\ufffe"
    assert gradebook.printable("tab\tnew\nline") == "tab\tnew\nline", "messages keep them"
    assert gradebook.printable("bob\nsmith\t", name=True) == "bob\\x0asmith\\x09"
    assert gradebook.printable("Zoë 中文 😀 \\x41") == "Zoë 中文 😀 \\x41", "the rest is kept"


@settings(max_examples=60, deadline=None)
@given(message=ANY_TEXT, student=ANY_TEXT, exercise=ANY_TEXT)
def test_any_text_gives_parseable_xml_and_a_csv_that_round_trips(
    message: str, student: str, exercise: str
) -> None:
    results = [result(student, f"{student}/01.ipynb", message, exercise=exercise)]
    suites = ET.parse(io.BytesIO(gradebook.junit_bytes(results))).getroot()
    failure = suites.find("testsuite/testcase/failure")
    assert failure is not None
    assert failure.get("message") == gradebook.printable(message)
    assert suites.find("testsuite").get("name") == gradebook.printable(
        f"{student}/01.ipynb", name=True
    )
    assert suites.find("testsuite/testcase").get("name") == gradebook.printable(exercise, name=True)
    text = gradebook.csv_bytes(results).decode("utf-8")
    [header, row] = list(csv.reader(io.StringIO(text, newline="")))
    assert header == list(grade.CSV_FIELDS)
    assert row[0] == gradebook.printable(student, name=True)
    assert row[3] == gradebook.printable(exercise, name=True)
    assert row[5] == gradebook.printable(message)
    assert "\x00" not in text


def test_one_line_messages_and_names_keep_one_line_per_row(tmp_path: Path) -> None:
    results = [
        result("eve\n\x1b[31m", "eve\n\x1b[31m/01.ipynb", "bad \x01 value\x0b here"),
        result("frank", "frank/01.ipynb", "fine"),
    ]
    gradebook.write_csv(results, tmp_path / "g.csv")
    lines = (tmp_path / "g.csv").read_bytes().split(b"\r\n")
    assert len(lines) == 4 and lines[-1] == b"", "header, two rows, final newline"
    rows = read_csv(tmp_path / "g.csv")
    assert (
        rows[0]["student"] == "eve\\x0a\\x1b[31m"
        and rows[0]["message"] == "bad \\x01 value\\x0b here"
    )
    gradebook.write_junit(results, tmp_path / "g.xml")
    ET.parse(tmp_path / "g.xml")


# ---- where the files go ----------------------------------------------------------------------


@pytest.fixture
def subs(tmp_path: Path) -> Path:
    """A folder of three tiny submissions (not graded for real: these tests stub the grader)."""
    folder = tmp_path / "subs"
    for student in ("ann", "ben", "cat"):
        write_notebook(folder / student / f"{CHAPTER}.ipynb", f"# {student}")
    return folder


def test_output_paths_default_and_explicit(subs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "grades.csv"
    assert gradebook.output_paths(subs, out) == (out, tmp_path / "out" / "grades.xml")
    assert gradebook.output_paths(subs, out, tmp_path / "ci.xml") == (out, tmp_path / "ci.xml")
    assert gradebook.journal_path(out) == tmp_path / "out" / "grades.csv.partial.jsonl"


def unsafe_outputs(subs: Path, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Command lines whose files would be unsafe, and a word the error must contain."""
    (tmp_path / "folder.csv").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "link.xml").symlink_to(tmp_path / "same.csv")
    return {
        "xml as --out": (["--out", str(tmp_path / "report.xml")], "*.csv"),
        "csv as --junit": (
            ["--out", str(tmp_path / "g.csv"), "--junit", str(tmp_path / "g.csv")],
            "*.xml",
        ),
        "same file": (
            ["--out", str(tmp_path / "same.csv"), "--junit", str(tmp_path / "link.xml")],
            "same file",
        ),
        "inside submissions": (["--out", str(subs / "grades.csv")], "inside the submissions"),
        "junit inside": (
            ["--out", str(tmp_path / "g.csv"), "--junit", str(subs / "ann" / "g.xml")],
            "inside the submissions",
        ),
        "a folder": (["--out", str(tmp_path / "folder.csv")], "is a folder"),
        "folder is a file": (["--out", str(tmp_path / "afile" / "g.csv")], "is a file"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "xml as --out",
        "csv as --junit",
        "same file",
        "inside submissions",
        "junit inside",
        "a folder",
        "folder is a file",
    ],
)
def test_unsafe_outputs_are_refused_in_one_line(
    case: str, subs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, word = unsafe_outputs(subs, tmp_path)[case]
    before = sorted(p for p in tmp_path.rglob("*"))
    assert main(["grade", str(subs), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("course: error: --") and captured.err.count("\n") == 1
    assert word in captured.err and "Traceback" not in captured.out + captured.err
    assert sorted(p for p in tmp_path.rglob("*")) == before, "nothing graded, nothing written"


def test_atomic_write_keeps_the_old_file_when_writing_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "g.csv"
    gradebook.atomic_write(target, b"old\n")
    target.chmod(0o640)
    gradebook.atomic_write(target, b"new\n")
    assert target.read_bytes() == b"new\n" and target.stat().st_mode & 0o777 == 0o640

    def fail(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(gradebook.os, "replace", fail)
    with pytest.raises(KeyboardInterrupt):
        gradebook.atomic_write(target, b"half")
    assert target.read_bytes() == b"new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["g.csv"], "no temporary file left"


# ---- the journal, with a stub grader (no kernels) --------------------------------------------


@pytest.fixture
def graded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the grader by a stub that records whom it grades; a file "stop" beside a notebook is Ctrl-C."""
    calls: list[str] = []

    def stub(path: Path, timeout: float, forbidden: object = ()) -> grade.NotebookResult:
        student = path.parent.name
        if (path.parent / "stop").exists():
            raise KeyboardInterrupt
        calls.append(student)
        rows = [grade._row(i, "passed", "3 checks passed", 0.1) for i in ("softmax", "log_softmax")]
        return grade.NotebookResult(path, CHAPTER, "graded", "", 0.2, rows)

    monkeypatch.setattr(grade, "_grade_safely", stub)
    return calls


def interrupt_at_cat(subs: Path, out: Path, **kwargs: object) -> None:
    """Grade until cat's notebook (the stub raises KeyboardInterrupt there), then let cat go."""
    (subs / "cat" / "stop").touch()
    with pytest.raises(KeyboardInterrupt):
        gradebook.grade_dir(subs, out, **kwargs)
    (subs / "cat" / "stop").unlink()


def test_interrupt_keeps_graded_rows_then_resume_grades_only_the_rest(
    subs: Path, tmp_path: Path, graded: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out" / "grades.csv"
    (subs / "ben" / "stop").touch()
    with pytest.raises(KeyboardInterrupt):
        gradebook.grade_dir(subs, out)
    assert "interrupted after 1 of 3 notebooks" in capsys.readouterr().err
    assert [(r["student"], r["exercise"]) for r in read_csv(out)] == [
        ("ann", "softmax"),
        ("ann", "log_softmax"),
    ]
    assert len(ET.parse(out.with_suffix(".xml")).getroot().findall("testsuite")) == 1
    journal = gradebook.journal_path(out).read_text().splitlines()
    assert json.loads(journal[0])["journal"] == "course grade"
    assert [json.loads(line)["notebook"] for line in journal[1:]] == [f"ann/{CHAPTER}.ipynb"]

    (subs / "ben" / "stop").unlink()
    graded.clear()
    results = gradebook.grade_dir(subs, out, resume=True)
    assert sorted(graded) == ["ben", "cat"], "ann was not graded again"
    assert [r.student for r in results] == ["ann", "ben", "cat"]
    assert [r["student"] for r in read_csv(out)] == ["ann", "ann", "ben", "ben", "cat", "cat"]
    assert not gradebook.journal_path(out).exists(), "a complete run removes its journal"
    printed = capsys.readouterr()
    assert "resuming from" in printed.err and "1 notebooks were graded by the interrupted" in (
        printed.out
    )


def test_files_are_rewritten_after_every_notebook(
    subs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "grades.csv"
    seen: list[list[str]] = []

    def students() -> list[str]:
        return [r["student"] for r in read_csv(out)] if out.exists() else []

    def stub(path: Path, timeout: float, forbidden: object = ()) -> grade.NotebookResult:
        # The grader runs in a worker thread: give the batch a moment to write the last result.
        deadline = time.monotonic() + 10
        while len(students()) < len(seen) and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(students())
        return grade.NotebookResult(
            path, CHAPTER, "graded", "", 0.1, [grade._row("softmax", "passed")]
        )

    monkeypatch.setattr(grade, "_grade_safely", stub)
    gradebook.grade_dir(subs, out, quiet=True)
    assert seen == [[], ["ann"], ["ann", "ben"]]


def test_resume_grades_changed_and_new_notebooks_again(
    subs: Path, tmp_path: Path, graded: list[str]
) -> None:
    out = tmp_path / "grades.csv"
    interrupt_at_cat(subs, out, quiet=True)
    write_notebook(subs / "ben" / f"{CHAPTER}.ipynb", "# ben, edited after the stop")
    write_notebook(subs / "dan" / f"{CHAPTER}.ipynb", "# dan, late")
    graded.clear()
    gradebook.grade_dir(subs, out, quiet=True, resume=True)
    assert sorted(graded) == ["ben", "cat", "dan"]


def test_without_resume_an_old_journal_is_discarded_with_a_note(
    subs: Path, tmp_path: Path, graded: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "grades.csv"
    interrupt_at_cat(subs, out)
    capsys.readouterr()
    graded.clear()
    gradebook.grade_dir(subs, out)
    assert sorted(graded) == ["ann", "ben", "cat"]
    err = capsys.readouterr().err
    assert "discarding" in err and "--resume" in err


def test_a_torn_journal_line_or_another_folder_means_grading_again(
    subs: Path, tmp_path: Path, graded: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "grades.csv"
    interrupt_at_cat(subs, out)
    journal = gradebook.journal_path(out)
    header, ann, ben = journal.read_text().splitlines()
    journal.write_text(f"{header}\n{ann}\n{ben[: len(ben) // 2]}")  # killed mid-line
    graded.clear()
    gradebook.grade_dir(subs, out, resume=True)
    assert sorted(graded) == ["ben", "cat"]
    assert "skipped 1 unreadable lines" in capsys.readouterr().err

    other = tmp_path / "other"
    other.mkdir()
    journal.write_text(json.dumps({**json.loads(header), "submissions": str(other)}) + f"\n{ann}\n")
    graded.clear()
    gradebook.grade_dir(subs, out, resume=True)
    assert sorted(graded) == ["ann", "ben", "cat"]
    assert "was written for" in capsys.readouterr().err


def test_cli_resume_without_journal_grades_everything(
    subs: Path, tmp_path: Path, graded: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "grades.csv"
    assert main(["grade", str(subs), "--out", str(out), "--resume"]) == 0
    assert sorted(graded) == ["ann", "ben", "cat"]
    captured = capsys.readouterr()
    assert "no journal" in captured.err and "graded 3 notebooks of 3 students" in captured.out


# ---- a real `course grade`, stopped by SIGTERM mid-batch, then resumed -----------------------


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_mid_batch_then_resume(tmp_path: Path) -> None:
    subs, out = tmp_path / "subs", tmp_path / "out" / "grades.csv"
    runs, hold = tmp_path / "runs.txt", tmp_path / "hold"
    hold.touch()
    count = f"open({str(runs)!r}, 'a').write('{{}}\\n')"
    write_notebook(subs / "ann" / f"{CHAPTER}.ipynb", count.format("ann"))
    wait = f"import os, time\nwhile os.path.exists({str(hold)!r}):\n    time.sleep(0.05)"
    write_notebook(subs / "bob" / f"{CHAPTER}.ipynb", count.format("bob"), wait)
    # The notebooks signal through files of the test's, which a sandbox rightly hides.
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        COURSE_ISOLATION="none",
    )
    command = [sys.executable, "-m", "course_utils.cli", "grade", str(subs), "--out", str(out)]
    command += ["--timeout", "120"]

    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    journal = gradebook.journal_path(out)
    # ann is in the journal and bob's notebook is running: stop now.
    while not (
        runs.exists() and "bob" in runs.read_text() and len(journal.read_text().splitlines()) == 2
    ):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err.decode() and "--resume" in err.decode()
    assert {r["student"] for r in read_csv(out)} == {"ann"}
    assert {r["status"] for r in read_csv(out)} == {"missing"}, "graded, defining nothing"
    assert len(ET.parse(out.with_suffix(".xml")).getroot().findall("testsuite")) == 1

    hold.unlink()
    done = subprocess.run([*command, "--resume"], env=env, capture_output=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert runs.read_text().split() == ["ann", "bob", "bob"], "ann's notebook ran once"
    assert [r["student"] for r in read_csv(out)].count("ann") == len(
        grade.chapter_exercises(CHAPTER)
    )
    assert {r["student"] for r in read_csv(out)} == {"ann", "bob"}
    assert not gradebook.journal_path(out).exists()
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "grades.csv",
        "grades.xml",
        "grades_report",
    ]
    assert sorted(p.name for p in (out.parent / "grades_report").iterdir()) == [
        "ann.html",
        "bob.html",
        "index.html",
    ]
