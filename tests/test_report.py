"""course_utils.report: a page per learner and a class summary, with every submitted string escaped."""

from __future__ import annotations

from pathlib import Path

from course_utils import report
from course_utils.grade import NotebookResult


def _result(student: str, rows: list[tuple[str, str, str]]) -> NotebookResult:
    return NotebookResult(
        path=Path(f"{student}/01.ipynb"),
        chapter="01_logits_softmax_cross_entropy",
        status="graded",
        rows=[{"exercise": e, "status": s, "message": m, "seconds": 0.1} for e, s, m in rows],
        student=student,
        notebook=f"{student}/01.ipynb",
    )


SHIFT = "It looks like the row maximum was not subtracted."
CLASS = [
    _result(
        "alice",
        [
            ("softmax", "passed", "3 checks passed"),
            ("cross_entropy", "failed", f"in case (3, 4), `dx` is wrong: error 1.2e-01. {SHIFT}"),
        ],
    ),
    _result(
        "bob",
        [
            ("softmax", "failed", f"in case (5, 2), `out` is wrong: error 9.9e-01. {SHIFT}"),
            ("cross_entropy", "failed", f"in case (7, 1), `dx` is wrong: error 3.0e-02. {SHIFT}"),
        ],
    ),
    _result("<script>alert(1)</script>", [("softmax", "pending", "not implemented yet")]),
]


def test_the_class_summary_counts_passes_and_groups_failures_by_mistake(tmp_path):
    text = report.write_reports(CLASS, tmp_path).read_text()
    assert "1 / 3" in text  # softmax: alice passed, bob failed, one pending
    assert "0 / 2" in text  # cross_entropy
    assert f"2 &times; {SHIFT}" in text  # two learners, one mistake, different numbers
    assert "1 &times; pending" in text


def test_every_learner_gets_a_page_and_nothing_submitted_runs_as_html(tmp_path):
    report.write_reports(CLASS, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert {"alice.html", "bob.html", "index.html"} <= set(names) and len(names) == 4
    for page in tmp_path.iterdir():
        assert "<script>" not in page.read_text()
    assert "error 1.2e-01" in (tmp_path / "alice.html").read_text()


def test_file_names_are_safe_and_unique():
    taken: set[str] = set()
    assert report.student_file("../etc/passwd", taken) == "etc_passwd.html"
    assert report.student_file("index", taken) == "index_2.html"
    assert report.student_file("a b", taken) == "a_b.html"
    assert report.student_file("a?b", taken) == "a_b_2.html"


def test_failure_kind_drops_the_case_numbers():
    a = report.failure_kind("in case (3, 4), `dx` is wrong: error 1.2e-01 at index (0, 1).")
    b = report.failure_kind("in case (5, 2), `dx` is wrong: error 3.3e-02 at index (4, 0).")
    assert a == b


def test_reports_sit_next_to_the_csv():
    assert report.report_dir("out/grades.csv") == Path("out/grades_report")
