"""Write a batch's grades: a CSV, a JUnit XML and a journal, safely and as the batch goes.

``grade_dir`` grades every notebook below a folder (``grade.grade_notebook`` does the
judging) and owns the files around it:

- ``grades.csv``: one row per (student, notebook, exercise); ``--out`` names it and it
  must end in ``.csv``.
- ``grades.xml``: JUnit XML for CI systems; ``--junit`` names it (it must end in
  ``.xml``), by default the CSV's name with ``.xml``.
- ``grades.csv.partial.jsonl``: the journal, one JSON line per graded notebook, flushed
  and fsynced as each finishes. ``--resume`` reuses its lines whose notebook has the same
  relative path and the same content (sha256 of its bytes); the journal is deleted once
  the complete files are written.

Both files are rewritten after every notebook, each through a temporary file in the same
folder and ``os.replace``, so a reader (or an interrupted run) never sees half a file.
Text a learner controls (messages, folder names) can hold characters that XML 1.0 forbids
or that no one can see; they are written as ``\\x1b``-style escapes in both files.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from . import grade, report
from .build import show
from .grade import CSV_FIELDS, DEFAULT_TIMEOUT, NOTEBOOK_PROBLEMS, NotebookResult

JOURNAL_SUFFIX = ".partial.jsonl"
JOURNAL_VERSION = 1

# XML 1.0 forbids C0 controls but tab, newline and return, surrogates, U+FFFE and U+FFFF;
# DEL and the C1 controls are legal but invisible, so a reader could not tell them apart.
_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")
_UNSAFE_IN_NAMES = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: Any, *, name: bool = False) -> str:
    """``text`` with every character XML 1.0 forbids, or no one can see, written as ``\\x1b`` or ``\\ud800``.

    Messages keep tab, newline and carriage return; a ``name`` (student, notebook,
    chapter, exercise) escapes them too, so a name always stays on one line.
    """
    return (_UNSAFE_IN_NAMES if name else _UNSAFE).sub(_escape, str(text))


# ---- where the files go ----------------------------------------------------------------------


def journal_path(out_csv: Path | str) -> Path:
    """The journal of ``out_csv``: ``grades.csv`` -> ``grades.csv.partial.jsonl`` beside it."""
    out_csv = Path(out_csv)
    return out_csv.with_name(out_csv.name + JOURNAL_SUFFIX)


def output_paths(
    submissions_dir: Path | str, out_csv: Path | str, junit_xml: Path | str | None = None
) -> tuple[Path, Path]:
    """The CSV and JUnit paths to write; ``ValueError`` (one line) for any pair that is unsafe.

    The CSV must end in ``.csv`` and the JUnit file in ``.xml`` (default: the CSV's name with
    ``.xml``); neither may be a folder, the same file as the other, or lie inside the
    submissions folder, where learners could read or overwrite them.
    """
    root, out = Path(submissions_dir), Path(out_csv)
    if out.suffix.lower() != ".csv":
        raise ValueError(
            f"--out {out}: the grades file must be named *.csv "
            "(the JUnit XML goes to --junit, by default the CSV's name with .xml)"
        )
    junit = Path(junit_xml) if junit_xml is not None else out.with_suffix(".xml")
    if junit.suffix.lower() != ".xml":
        raise ValueError(f"--junit {junit}: the JUnit file must be named *.xml")
    files = {"--out": out, "--junit": junit, "the journal": journal_path(out)}
    for option, path in files.items():
        if path.is_dir():
            raise ValueError(f"{option} {path} is a folder; name a file inside it instead")
        if path.parent.exists() and not path.parent.is_dir():
            raise ValueError(f"{option} {path}: {path.parent} is a file, not a folder")
        inside = path.resolve()
        if inside == root.resolve() or root.resolve() in inside.parents:
            raise ValueError(
                f"{option} {path} is inside the submissions folder {root}; "
                "write the grades outside it, where learners cannot see or overwrite them"
            )
    if _same_file(out, junit) or _same_file(journal_path(out), junit):
        raise ValueError(f"--out {out} and --junit {junit} are the same file; name two files")
    return out, junit


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# ---- writing a file in one step --------------------------------------------------------------


@functools.cache
def _new_file_mode() -> int:
    # There is no way to read the umask without setting it; the batch writes from one thread.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path | str, data: bytes) -> None:
    """Replace ``path`` by ``data`` in one step: a reader sees the old file or the new, never half."""
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = target.stat().st_mode & 0o777 if target.exists() else _new_file_mode()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_folder(target.parent)


def _sync_folder(folder: Path) -> None:
    # Makes the rename itself survive a power cut; not every system can open a folder.
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---- the CSV and the JUnit XML ---------------------------------------------------------------


def _flat(results: Iterable[NotebookResult]) -> Iterable[tuple[NotebookResult, dict[str, Any]]]:
    for result in results:
        for row in result.rows:
            yield result, row


def csv_bytes(results: list[NotebookResult]) -> bytes:
    """The CSV of ``results``: one row per (student, notebook, exercise), printable text only."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(CSV_FIELDS)
    for result, row in _flat(results):
        writer.writerow(
            [
                printable(result.student, name=True),
                printable(result.notebook, name=True),
                printable(result.chapter or "", name=True),
                printable(row["exercise"], name=True),
                printable(row["status"], name=True),
                printable(row["message"]),
                f"{row['seconds']:.3f}",
            ]
        )
    return buffer.getvalue().encode("utf-8")


def write_csv(results: list[NotebookResult], path: Path | str) -> None:
    """One row per (student, notebook, exercise): student, notebook, chapter, exercise, status, message, seconds."""
    atomic_write(path, csv_bytes(results))


def junit_bytes(results: list[NotebookResult]) -> bytes:
    """JUnit XML of ``results``: one testsuite per notebook, one testcase per exercise."""
    suites = ET.Element("testsuites", name="course grade")
    total = failed = 0
    for result in results:
        bad = [r for r in result.rows if r["status"] != "passed"]
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=printable(result.notebook or str(result.path), name=True),
            tests=str(len(result.rows)),
            failures=str(len(bad)),
            errors="0",
            skipped="0",
            time=f"{result.seconds:.3f}",
        )
        for row in result.rows:
            student, chapter = result.student, result.chapter or "notebook"
            case = ET.SubElement(
                suite,
                "testcase",
                classname=printable(f"{student}.{chapter}", name=True),
                name=printable(row["exercise"], name=True),
                time=f"{row['seconds']:.3f}",
            )
            if row["status"] != "passed":
                status, message = printable(row["status"], name=True), printable(row["message"])
                failure = ET.SubElement(case, "failure", type=status, message=message)
                failure.text = f"{status}: {message}"
        total, failed = total + len(result.rows), failed + len(bad)
    suites.set("tests", str(total))
    suites.set("failures", str(failed))
    ET.indent(suites)
    buffer = io.BytesIO()
    ET.ElementTree(suites).write(buffer, encoding="utf-8", xml_declaration=True)
    return buffer.getvalue()


def write_junit(results: list[NotebookResult], path: Path | str) -> None:
    """One testsuite per notebook and one testcase per exercise; anything but passed is a failure."""
    atomic_write(path, junit_bytes(results))


def summary(results: list[NotebookResult], out_csv: Path, junit: Path) -> str:
    """One line: notebooks, students, exercises passed, notebook-level problems and the files written."""
    rows = [row for _, row in _flat(results)]
    passed = sum(r["status"] == "passed" for r in rows)
    problems = [
        f"{sum(r.status == s for r in results)} {s}"
        for s in NOTEBOOK_PROBLEMS
        if any(r.status == s for r in results)
    ]
    students = len({r.student for r in results})
    return (
        f"graded {len(results)} notebooks of {students} students: {passed}/{len(rows)} exercises passed"
        + (f"; {', '.join(problems)}" if problems else "")
        + f". Wrote {show(out_csv)} and {show(junit)}."
    )


# ---- the journal -----------------------------------------------------------------------------


def file_hash(path: Path) -> str | None:
    """sha256 of the file's bytes, or None when it cannot be read (it is then never reused)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _header(root: Path) -> dict[str, Any]:
    return {"journal": "course grade", "version": JOURNAL_VERSION, "submissions": str(root)}


def _entry(result: NotebookResult, sha256: str | None) -> dict[str, Any]:
    return {
        "notebook": result.notebook,
        "sha256": sha256,
        "student": result.student,
        "chapter": result.chapter,
        "status": result.status,
        "message": result.message,
        "seconds": result.seconds,
        "rows": result.rows,
    }


def _result(root: Path, entry: dict[str, Any]) -> NotebookResult:
    rows = entry["rows"]
    if not isinstance(rows, list) or not all(
        isinstance(r, dict) and {"exercise", "status", "message", "seconds"} <= set(r) for r in rows
    ):
        raise ValueError("rows")
    return NotebookResult(
        root / entry["notebook"],
        entry["chapter"],
        str(entry["status"]),
        str(entry["message"]),
        float(entry["seconds"]),
        rows,
        str(entry["student"]),
        str(entry["notebook"]),
    )


def _line(data: dict[str, Any]) -> str:
    # ensure_ascii keeps the line ASCII, so even a lone surrogate in a name is written and read back.
    return json.dumps(data, ensure_ascii=True) + "\n"


def read_journal(path: Path, root: Path) -> tuple[dict[str, tuple[str, NotebookResult]], str]:
    """The journal's notebooks (relative path -> (sha256, result)) and a note on what was skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return {}, f"no journal {show(path)} of an interrupted run; grading every notebook"
    except (OSError, UnicodeDecodeError) as err:
        return {}, f"cannot read the journal {show(path)} ({err}); grading every notebook"
    try:
        header = json.loads(lines[0]) if lines else None
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("journal") != "course grade":
        return {}, f"{show(path)} is not a journal of `course grade`; grading every notebook"
    if header != _header(root):
        return {}, (
            f"the journal {show(path)} was written for {header.get('submissions')} "
            f"(version {header.get('version')}), not {root}; grading every notebook"
        )
    found: dict[str, tuple[str, NotebookResult]] = {}
    torn = 0
    for text in lines[1:]:
        try:
            entry = json.loads(text)
            found[entry["notebook"]] = (entry["sha256"], _result(root, entry))
        except (ValueError, KeyError, TypeError):
            # A run killed in the middle of a line leaves half of it; that notebook is graded again.
            torn += 1
    note = f"; skipped {torn} unreadable lines" if torn else ""
    return found, f"resuming from {show(path)}: {len(found)} notebooks graded before{note}"


class Journal:
    """The open journal of one batch: a header line, then one line per graded notebook."""

    def __init__(self, path: Path, root: Path, kept: Iterable[tuple[NotebookResult, str]]) -> None:
        """Start the journal afresh with ``kept`` (the notebooks reused from an earlier run)."""
        self.path = path
        text = _line(_header(root)) + "".join(_line(_entry(r, sha)) for r, sha in kept)
        atomic_write(path, text.encode("ascii"))
        self._file = path.open("a", encoding="ascii")

    def add(self, result: NotebookResult, sha256: str | None) -> None:
        """Append one notebook and force it to disk before the next one is graded."""
        self._file.write(_line(_entry(result, sha256)))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self, *, remove: bool = False) -> None:
        """Close the journal; ``remove`` deletes it (the complete files are written)."""
        self._file.close()
        if remove:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


# ---- the batch -------------------------------------------------------------------------------


def isolation_warning() -> str | None:
    """A loud one-line warning when learners' notebooks cannot be sandboxed here, else None."""
    level, reason = grade.isolation_level()
    if level == "bwrap":
        return None
    return (
        f"WARNING: learners' notebooks will NOT be isolated from each other or from you "
        f"({reason}); install bubblewrap (apt-get install bubblewrap) and see the README's "
        "grading section."
    )


def grade_dir(
    submissions_dir: Path | str,
    out_csv: Path | str,
    junit_xml: Path | str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    jobs: int = 1,
    quiet: bool = False,
    resume: bool = False,
) -> list[NotebookResult]:
    """Grade every notebook below ``submissions_dir`` into a CSV and a JUnit XML, rewritten as each finishes.

    With ``resume``, notebooks the journal of an interrupted run holds (same relative path,
    same content) are not graded again. Interrupted, it writes what was graded and re-raises.
    """
    root = Path(submissions_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{show(root)}: no such folder of submissions")
    paths = grade.find_submissions(root)
    if not paths:
        raise ValueError(f"{show(root)}: no notebooks (*.ipynb) below it to grade")
    out_csv, junit = output_paths(root, out_csv, junit_xml)

    def note(text: str) -> None:
        if not quiet:
            print(f"course grade: {text}", file=sys.stderr)

    journal_file = journal_path(out_csv)
    warning = isolation_warning()
    if warning:
        print(f"course grade: {warning}", file=sys.stderr)
    hashes = {path: file_hash(path) for path in paths}
    names = {path: path.relative_to(root).as_posix() for path in paths}
    done: dict[Path, NotebookResult] = {}
    if resume:
        found, message = read_journal(journal_file, root.resolve())
        note(message)
        for path in paths:
            sha, result = found.get(names[path], (None, None))
            if result is not None and sha is not None and sha == hashes[path]:
                result.path = path
                done[path] = result
        if found and len(done) < len(found):
            note(f"{len(found) - len(done)} of them changed or are gone and are graded again")
    elif journal_file.exists():
        note(
            f"discarding {show(journal_file)}, left by an interrupted run "
            "(use --resume to keep the notebooks it had graded)"
        )
    journal = Journal(journal_file, root.resolve(), ((done[p], hashes[p]) for p in done))
    reused = len(done)

    reports = report.report_dir(out_csv)

    def write_files() -> list[NotebookResult]:
        ordered = [done[path] for path in paths if path in done]
        write_csv(ordered, out_csv)
        write_junit(ordered, junit)
        report.write_reports(ordered, reports)
        return ordered

    from tqdm import tqdm

    try:
        with (
            ThreadPoolExecutor(max_workers=max(1, jobs)) as pool,
            tqdm(
                total=len(paths), initial=reused, unit="notebook", disable=quiet, file=sys.stderr
            ) as bar,
        ):
            todo = [path for path in paths if path not in done]
            # No learner's sandbox may show the other submissions or what the grader writes.
            hidden = [root, out_csv, junit, journal_file, reports]
            futures = {
                pool.submit(grade._grade_safely, path, timeout, hidden): path for path in todo
            }
            try:
                for future in as_completed(futures):
                    path = futures[future]
                    result = future.result()
                    result.student = grade._student(root, path)
                    result.notebook = names[path]
                    journal.add(result, hashes[path])
                    done[path] = result
                    write_files()
                    bar.update()
            except BaseException:
                # Ctrl-C or SIGTERM: stop queued notebooks and end running ones, or they run to the timeout.
                pool.shutdown(wait=False, cancel_futures=True)
                grade._end_all()
                write_files()
                note(
                    f"interrupted after {len(done)} of {len(paths)} notebooks; {show(out_csv)} and "
                    f"{show(junit)} hold those graded; run again with --resume to grade the rest"
                )
                raise
    except BaseException:
        journal.close()
        raise
    ordered = write_files()
    journal.close(remove=True)
    if not quiet:
        line = summary(ordered, out_csv, junit) + f" Reports: {show(reports / 'index.html')}."
        if reused:
            line += f" {reused} notebooks were graded by the interrupted run and not again."
        print(line)
    return ordered
