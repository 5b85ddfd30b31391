"""HTML reports of a graded class: one page per learner and a class summary that shows where it is stuck.

``course grade`` writes them next to its CSV (``grades.csv`` -> ``grades_report/index.html``
and ``grades_report/<student>.html``). Every string that came from a submission is escaped.
"""

from __future__ import annotations

import collections
import html
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .grade import NotebookResult

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; color: #1f2328; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #d0d7de; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
.passed { color: #1a7f37; font-weight: 600; }
.failed, .crashed, .timeout, .missing, .error { color: #cf222e; font-weight: 600; }
.pending { color: #9a6700; font-weight: 600; }
td.message { font-family: ui-monospace, monospace; font-size: 0.9em; white-space: pre-wrap; }
"""
_LOOKS_LIKE = re.compile(r"It looks like [^.]*(?:\.[^ ][^.]*)*\.")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def _page(title: str, body: str) -> bytes:
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    ).encode()


def _cell(status: str) -> str:
    kind = re.sub(r"[^a-z]", "", status.lower()) or "error"
    return f"<td class='{kind}'>{html.escape(status)}</td>"


def student_file(student: str, taken: set[str]) -> str:
    """A safe, unique file name for ``student``'s page."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", student).strip("._") or "student"
    name, n = f"{base}.html", 2
    while name.lower() in taken or name.lower() == "index.html":
        name, n = f"{base}_{n}.html", n + 1
    taken.add(name.lower())
    return name


def failure_kind(message: str) -> str:
    """What a failure message says went wrong, with the case's numbers taken out, for counting."""
    found = _LOOKS_LIKE.search(message)
    if found:
        return found.group(0)
    core = message.split(", ", 1)[-1] if message.startswith("in case ") else message
    return _NUMBER.sub("#", core)[:200]


def student_html(student: str, results: Iterable[NotebookResult]) -> bytes:
    """One learner's page: each notebook, each exercise, its status and message."""
    parts = []
    for result in results:
        parts.append(
            f"<h2>{html.escape(result.notebook or str(result.path))}</h2>"
            f"<p>chapter {html.escape(result.chapter or '?')}: {html.escape(result.status)}"
            + (f" ({html.escape(result.message)})" if result.message else "")
            + "</p>"
        )
        if result.rows:
            rows = "".join(
                f"<tr><td>{html.escape(r['exercise'])}</td>{_cell(r['status'])}"
                f"<td class='message'>{html.escape(r['message'])}</td></tr>"
                for r in result.rows
            )
            parts.append(
                f"<table><tr><th>exercise</th><th>status</th><th>message</th></tr>{rows}</table>"
            )
    return _page(f"Grades of {student}", "".join(parts) or "<p>No notebooks graded.</p>")


def class_html(results: list[NotebookResult], pages: dict[str, str]) -> bytes:
    """The class summary: per exercise how many passed and the most common failures; links to learners."""
    per_exercise: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
    for result in results:
        for row in result.rows:
            per_exercise[(result.chapter or "?", row["exercise"])].append(row)
    lines = []
    for (chapter, exercise), rows in sorted(per_exercise.items()):
        passed = sum(r["status"] == "passed" for r in rows)
        kinds = collections.Counter(
            failure_kind(r["message"]) if r["status"] == "failed" else r["status"]
            for r in rows
            if r["status"] != "passed"
        )
        common = "<br>".join(
            f"{count} &times; {html.escape(kind)}" for kind, count in kinds.most_common(3)
        )
        lines.append(
            f"<tr><td>{html.escape(chapter)}</td><td>{html.escape(exercise)}</td>"
            f"<td>{passed} / {len(rows)}</td><td class='message'>{common}</td></tr>"
        )
    learners = "".join(
        f"<li><a href='{html.escape(page)}'>{html.escape(student)}</a></li>"
        for student, page in sorted(pages.items())
    )
    body = (
        f"<p>{len(pages)} learners, {len(results)} notebooks.</p>"
        "<h2>Where the class is stuck</h2>"
        "<table><tr><th>chapter</th><th>exercise</th><th>passed</th>"
        f"<th>most common problems</th></tr>{''.join(lines)}</table>"
        f"<h2>Learners</h2><ul>{learners}</ul>"
    )
    return _page("Class summary", body)


def report_dir(out_csv: Path | str) -> Path:
    """Where the HTML reports of a run writing ``out_csv`` go: ``grades.csv`` -> ``grades_report/``."""
    out_csv = Path(out_csv)
    return out_csv.with_name(f"{out_csv.stem}_report")


def write_reports(results: list[NotebookResult], folder: Path | str) -> Path:
    """Write ``index.html`` and one page per learner into ``folder``; return the index's path."""
    from .gradebook import atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    by_student: dict[str, list[NotebookResult]] = collections.defaultdict(list)
    for result in results:
        by_student[result.student or "(no name)"].append(result)
    taken: set[str] = set()
    pages = {student: student_file(student, taken) for student in sorted(by_student)}
    for student, page in pages.items():
        atomic_write(folder / page, student_html(student, by_student[student]))
    index = folder / "index.html"
    atomic_write(index, class_html(results, pages))
    return index
