"""Grade notebooks by what they define, not by where: run the notebook, then check its names.

A notebook is copied to a temporary folder and executed with nbclient in a child
process (its own session, so a timeout kills it and its kernel together). After
the learner's cells, one extra cell in the same kernel calls ``grade_namespace``
on the kernel's globals and prints the rows as JSON after a marker line. Cells may
be inserted, split, deleted or reordered freely: only the final definitions count.
Grading trusts the learner's kernel; it stops mistakes, not a determined cheat.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

from . import checking
from .build import read_notebook, show

MARKER = "<<COURSE-GRADE>>"
DEFAULT_TIMEOUT = 600.0
CSV_FIELDS = ("student", "notebook", "chapter", "exercise", "status", "message", "seconds")
#: Notebook-level outcomes; each exercise row (or one "*" row) carries it as its status.
NOTEBOOK_PROBLEMS = ("timeout", "crashed", "malformed", "missing chapter")
_SKIP_DIRS = {".ipynb_checkpoints", ".backups"}
# Child graders running now (pid -> its kernel's pid file), so an interrupted batch can end them.
_LIVE: dict[int, Path] = {}
_LIVE_LOCK = threading.Lock()


def known_chapters() -> list[str]:
    """Every chapter that has exercises, in registry order."""
    return list(dict.fromkeys(e.chapter for e in checking._registry().values()))


def chapter_exercises(chapter: str) -> list[checking.Exercise]:
    """The exercises of ``chapter``, in registry order."""
    return [e for e in checking._registry().values() if e.chapter == chapter]


def chapter_of(nb: nbformat.NotebookNode, path: Path | str) -> str | None:
    """The notebook's chapter: metadata ``course.chapter``, else its ``NN_`` file prefix; None if unknown."""
    chapters = known_chapters()
    meta = nb.get("metadata", {}).get("course", {})
    named = meta.get("chapter") if isinstance(meta, dict) else None
    if isinstance(named, str) and named in chapters:
        return named
    stem = Path(path).stem
    if stem in chapters:
        return stem
    prefix = re.match(r"(\d+)_", stem)
    if prefix:
        matches = [c for c in chapters if c.split("_")[0] == prefix.group(1).zfill(2)]
        if len(matches) == 1:
            return matches[0]
    return None


def _candidate_names(ex: checking.Exercise) -> list[str]:
    # Class exercises are defined under the class name of their signature (silu_function -> SiLUFunction).
    names = [ex.id]
    declared = re.match(r"\s*class\s+(\w+)", ex.signature)
    if declared:
        names.append(declared.group(1))
    return names


def _row(exercise: str, status: str, message: str = "", seconds: float = 0.0) -> dict[str, Any]:
    return {
        "exercise": exercise,
        "status": status,
        "message": message,
        "seconds": round(seconds, 3),
    }


def _first_line(text: str, exercise_id: str = "") -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    prefix = f"{exercise_id}: "
    return line[len(prefix) :] if exercise_id and line.startswith(prefix) else line


def grade_namespace(
    chapter: str, namespace: dict[str, Any], *, exercise: str | None = None
) -> list[dict[str, Any]]:
    """Strictly check every exercise of ``chapter`` (or just ``exercise``) that ``namespace`` defines; never raises."""
    try:
        exercises = [e for e in chapter_exercises(chapter) if exercise is None or e.id == exercise]
    except Exception as err:  # noqa: BLE001 - a broken install must still give a row, not a traceback
        return [
            _row(
                "*",
                "crashed",
                f"course_utils could not load its checks: {type(err).__name__}: {err}",
            )
        ]
    if not exercises:
        return [
            _row(
                exercise or "*",
                "missing chapter",
                f"no exercises are registered for chapter {chapter!r}",
            )
        ]
    rows = []
    for ex in exercises:
        fn = next((namespace[n] for n in _candidate_names(ex) if n in namespace), None)
        if fn is None:
            wanted = " or ".join(f"`{n}`" for n in _candidate_names(ex))
            rows.append(_row(ex.id, "missing", f"the notebook defines no {wanted}"))
            continue
        # check() records "pending" just before strict mode turns it into a CheckFailure.
        checking._LAST_STATUS.pop(ex.id, None)
        start = time.perf_counter()
        try:
            # The learner's prints must not be mistaken for the grader's output.
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                report = checking.check(ex.id, fn, strict=True)
            rows.append(
                _row(
                    ex.id,
                    report.status,
                    f"{len(report.rows)} checks passed",
                    time.perf_counter() - start,
                )
            )
        except checking.CheckFailure as failure:
            status = "pending" if checking.last_status(ex.id) == "pending" else "failed"
            rows.append(
                _row(ex.id, status, _first_line(str(failure), ex.id), time.perf_counter() - start)
            )
        except BaseException as err:  # noqa: BLE001 - sys.exit or Ctrl-C inside a check still only fails it
            rows.append(
                _row(
                    ex.id,
                    "failed",
                    f"the check stopped: {type(err).__name__}: {_first_line(str(err))}",
                    time.perf_counter() - start,
                )
            )
    return rows


def grading_cell(chapter: str, exercise: str | None = None) -> str:
    """The source of the cell appended to a notebook to grade it in its own kernel."""
    return (
        "import json, course_utils.grade as _g\n"
        f'print("{MARKER}" + json.dumps(_g.grade_namespace({chapter!r}, globals(), exercise={exercise!r})))'
    )


@dataclass
class NotebookResult:
    """The grade of one notebook: a notebook-level ``status`` and one row per exercise."""

    path: Path
    chapter: str | None
    status: str
    message: str = ""
    seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)
    student: str = ""
    notebook: str = ""

    @property
    def passed(self) -> bool:
        """True when every exercise passed."""
        return (
            self.status == "graded"
            and bool(self.rows)
            and all(r["status"] == "passed" for r in self.rows)
        )


def _problem(
    path: Path,
    chapter: str | None,
    status: str,
    message: str,
    seconds: float = 0.0,
    exercise: str | None = None,
) -> NotebookResult:
    # With a known chapter every exercise gets the row, so a gradebook has no holes.
    try:
        ids = (
            [exercise]
            if exercise
            else [e.id for e in chapter_exercises(chapter)]
            if chapter
            else []
        )
    except Exception:  # noqa: BLE001 - no registry: one notebook-level row is all we can say
        ids = []
    rows = [_row(i, status, message) for i in ids] or [_row("*", status, message)]
    return NotebookResult(Path(path), chapter, status, message, seconds, rows)


def grade_notebook(
    path: Path | str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    chapter: str | None = None,
    exercise: str | None = None,
) -> NotebookResult:
    """Execute a copy of the notebook (strict mode) within ``timeout`` seconds and grade what it defines."""
    path = Path(path)
    start = time.perf_counter()
    try:
        nb = read_notebook(path)
    except ValueError as err:
        return _problem(path, None, "malformed", str(err))
    chapter = chapter or chapter_of(nb, path)
    if chapter is None:
        return _problem(
            path,
            None,
            "missing chapter",
            f"{show(path)}: cannot tell its chapter: no known course.chapter in its metadata "
            "and its name does not start with a chapter number such as 01_",
        )
    with tempfile.TemporaryDirectory(prefix="course-grade-") as tmp:
        work = Path(tmp)
        copy = work / "run" / path.name
        copy.parent.mkdir()
        shutil.copyfile(path, copy)
        outcome = _run_child(copy, chapter, exercise, timeout, work)
    seconds = time.perf_counter() - start
    if outcome["status"] != "graded":
        return _problem(path, chapter, outcome["status"], outcome["message"], seconds, exercise)
    return NotebookResult(path, chapter, "graded", "", seconds, outcome["rows"])


def _run_child(
    copy: Path, chapter: str, exercise: str | None, timeout: float, work: Path
) -> dict[str, Any]:
    result_file, pid_file, log = work / "result.json", work / "kernel.pid", work / "stderr.txt"
    env = dict(os.environ, COURSE_STRICT="1", MPLBACKEND="Agg", PYDEVD_DISABLE_FILE_VALIDATION="1")
    # Connection files of a killed kernel then vanish with the temporary folder.
    env["JUPYTER_RUNTIME_DIR"] = str(work / "runtime")
    # The kernel must import this very course_utils, not another one on its path.
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    cmd = [
        sys.executable,
        "-m",
        "course_utils.grade",
        str(copy),
        "--chapter",
        chapter,
        "--cell-timeout",
        str(timeout),
        "--result",
        str(result_file),
        "--kernel-pid-file",
        str(pid_file),
    ]
    if exercise:
        cmd += ["--exercise", exercise]
    with log.open("wb") as err:
        proc = subprocess.Popen(
            cmd,
            cwd=copy.parent,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
        with _LIVE_LOCK:
            _LIVE[proc.pid] = pid_file
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return {
                "status": "timeout",
                "message": f"the notebook did not finish within {timeout:g} s (an endless loop?)",
            }
        finally:
            # Also on Ctrl-C: nothing this notebook started may outlive its grading.
            _end(proc.pid, pid_file)
            proc.wait()
    try:
        return json.loads(result_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        return {
            "status": "crashed",
            "message": f"the grader process failed (exit {proc.returncode}): {tail[-1] if tail else 'no message'}",
        }


def _end(child: int, pid_file: Path) -> None:
    _kill_group(child)
    # jupyter_client starts the kernel in a session of its own: end it and anything it spawned.
    _kill_group(_read_pid(pid_file))
    with _LIVE_LOCK:
        _LIVE.pop(child, None)


def _end_all() -> None:
    """End every child grader still running and its kernel (the batch was interrupted)."""
    with _LIVE_LOCK:
        live = list(_LIVE.items())
    for child, pid_file in live:
        _end(child, pid_file)


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _kill_group(pid: int | None) -> None:
    if not pid:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(os.getpgid(pid), signal.SIGKILL)


def _execute(
    path: Path, chapter: str, exercise: str | None, cell_timeout: float, pid_file: Path | None
) -> dict[str, Any]:
    """Run the notebook and the grading cell in one kernel (inside the child process)."""
    from nbclient import NotebookClient
    from nbclient.exceptions import DeadKernelError

    from .kernel import client_options

    nb = read_notebook(path)
    nb.cells.append(nbformat.v4.new_code_cell(grading_cell(chapter, exercise)))
    running = {"index": 0}

    def on_start(**_: Any) -> None:
        provisioner = getattr(client.km, "provisioner", None)
        pid = getattr(provisioner, "pid", None) or getattr(
            getattr(provisioner, "process", None), "pid", None
        )
        if pid_file is not None and pid:
            pid_file.write_text(str(pid))

    def on_cell(cell: Any = None, cell_index: int = 0, **_: Any) -> None:
        running["index"] = cell_index

    client = NotebookClient(
        nb,
        timeout=max(1, math.ceil(cell_timeout)),
        kernel_name="python3",
        allow_errors=True,
        interrupt_on_timeout=True,
        record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
        on_notebook_start=on_start,
        on_cell_start=on_cell,
        **client_options(),
    )
    try:
        client.execute()
    except DeadKernelError:
        return {"status": "crashed", "message": _death_message(nb, running["index"])}
    except Exception as err:  # noqa: BLE001 - whatever stops the kernel, the row says it in one line
        return {
            "status": "crashed",
            "message": f"the notebook could not run: {type(err).__name__}: {_first_line(str(err))}",
        }
    return _parse_grading_outputs(nb.cells[-1])


def _death_message(nb: nbformat.NotebookNode, index: int) -> str:
    if index >= len(nb.cells) - 1:
        return "the kernel died while the functions were being checked (does one of them end the process?)"
    first = _first_line(nb.cells[index].source)[:60]
    return f"the kernel died while running cell {index + 1} (`{first}`): does it call os._exit, exit() or crash Python?"


def _parse_grading_outputs(cell: nbformat.NotebookNode) -> dict[str, Any]:
    text = "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")
    lines = [line for line in text.splitlines() if line.startswith(MARKER)]
    if lines:
        try:
            return {"status": "graded", "rows": json.loads(lines[-1][len(MARKER) :])}
        except ValueError:
            pass
    errors = [
        f"{o.get('ename')}: {_first_line(o.get('evalue', ''))}"
        for o in cell.outputs
        if o.get("output_type") == "error"
    ]
    detail = errors[0] if errors else "it printed no result"
    return {
        "status": "crashed",
        "message": f"the grading cell failed ({detail}); did the notebook replace print, json or globals?",
    }


def find_submissions(submissions_dir: Path) -> list[Path]:
    """Every notebook below ``submissions_dir``, skipping checkpoints, backups and hidden folders."""
    root = Path(submissions_dir)
    found = []
    for path in sorted(root.rglob("*.ipynb")):
        parts = path.relative_to(root).parts
        if any(p in _SKIP_DIRS or p.startswith(".") for p in parts):
            continue
        if path.is_file():
            found.append(path)
    return found


def _student(root: Path, path: Path) -> str:
    rel = path.relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def grade_dir(
    submissions_dir: Path | str,
    out_csv: Path | str,
    junit_xml: Path | str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    jobs: int = 1,
    quiet: bool = False,
) -> list[NotebookResult]:
    """Grade every notebook below ``submissions_dir``; write a long-format CSV and a JUnit XML."""
    root = Path(submissions_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{show(root)}: no such folder of submissions")
    paths = find_submissions(root)
    if not paths:
        raise ValueError(f"{show(root)}: no notebooks (*.ipynb) below it to grade")
    results: dict[Path, NotebookResult] = {}
    from tqdm import tqdm

    with (
        ThreadPoolExecutor(max_workers=max(1, jobs)) as pool,
        tqdm(total=len(paths), unit="notebook", disable=quiet, file=sys.stderr) as bar,
    ):
        futures = {pool.submit(_grade_safely, p, timeout): p for p in paths}
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
        except BaseException:
            # Ctrl-C or SIGTERM: stop queued notebooks and end running ones, or they run to the timeout.
            pool.shutdown(wait=False, cancel_futures=True)
            _end_all()
            raise
    ordered = []
    for path in paths:
        result = results[path]
        result.student, result.notebook = _student(root, path), path.relative_to(root).as_posix()
        ordered.append(result)
    out_csv = Path(out_csv)
    junit = Path(junit_xml) if junit_xml else out_csv.with_suffix(".xml")
    write_csv(ordered, out_csv)
    write_junit(ordered, junit)
    if not quiet:
        print(summary(ordered, out_csv, junit))
    return ordered


def _grade_safely(path: Path, timeout: float) -> NotebookResult:
    try:
        return grade_notebook(path, timeout=timeout)
    except Exception as err:  # noqa: BLE001 - one bad notebook never stops the batch
        return _problem(
            path,
            None,
            "crashed",
            f"could not grade it: {type(err).__name__}: {_first_line(str(err))}",
        )


def _flat(results: Iterable[NotebookResult]) -> Iterable[tuple[NotebookResult, dict[str, Any]]]:
    for result in results:
        for row in result.rows:
            yield result, row


def write_csv(results: list[NotebookResult], path: Path) -> None:
    """One row per (student, notebook, exercise): student, notebook, chapter, exercise, status, message, seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for result, row in _flat(results):
            writer.writerow(
                [
                    result.student,
                    result.notebook,
                    result.chapter or "",
                    row["exercise"],
                    row["status"],
                    row["message"],
                    f"{row['seconds']:.3f}",
                ]
            )


def write_junit(results: list[NotebookResult], path: Path) -> None:
    """One testsuite per notebook and one testcase per exercise; anything but passed is a failure."""
    suites = ET.Element("testsuites", name="course grade")
    total = failed = 0
    for result in results:
        bad = [r for r in result.rows if r["status"] != "passed"]
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=result.notebook or str(result.path),
            tests=str(len(result.rows)),
            failures=str(len(bad)),
            errors="0",
            skipped="0",
            time=f"{result.seconds:.3f}",
        )
        for row in result.rows:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"{result.student}.{result.chapter or 'notebook'}",
                name=row["exercise"],
                time=f"{row['seconds']:.3f}",
            )
            if row["status"] != "passed":
                failure = ET.SubElement(case, "failure", type=row["status"], message=row["message"])
                failure.text = f"{row['status']}: {row['message']}"
        total, failed = total + len(result.rows), failed + len(bad)
    suites.set("tests", str(total))
    suites.set("failures", str(failed))
    ET.indent(suites)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)


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


def _child_main(argv: list[str] | None = None) -> int:
    """Entry point of the child process that runs one notebook (used by ``grade_notebook``)."""
    parser = argparse.ArgumentParser(
        prog="python -m course_utils.grade", description=_child_main.__doc__
    )
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--chapter", required=True)
    parser.add_argument("--exercise")
    parser.add_argument("--cell-timeout", type=float, default=DEFAULT_TIMEOUT)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--kernel-pid-file", type=Path)
    args = parser.parse_args(argv)
    outcome = _execute(
        args.notebook, args.chapter, args.exercise, args.cell_timeout, args.kernel_pid_file
    )
    args.result.write_text(json.dumps(outcome), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
