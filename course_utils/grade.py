"""Grade notebooks by what they define, not by where: run the notebook, then check its names.

A notebook is copied to a temporary folder and executed with nbclient in a child
process (its own session, so a timeout kills it and its kernel together). Then,
with the kernel still running, the child grades each exercise the notebook defines
(``remote.grade_in_kernel``): the battery runs in the child, and every call of the
learner's function is sent to the kernel and its result judged back in the child,
so no cell can write its own verdict. Cells may be inserted, split, deleted or
reordered freely: only the final definitions count.
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

from . import checking
from .build import read_notebook, show

DEFAULT_TIMEOUT = 600.0
#: Longest one call of a learner's function may take when graded (a check takes under 2 s).
CALL_TIMEOUT = 60.0
#: Variables the learner's kernel gets inside its sandbox (nothing else of the grader's).
KERNEL_ENV = {"COURSE_STRICT": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
CSV_FIELDS = ("student", "notebook", "chapter", "exercise", "status", "message", "seconds")
#: Notebook-level outcomes; each exercise row (or one "*" row) carries it as its status.
NOTEBOOK_PROBLEMS = ("timeout", "crashed", "malformed", "missing chapter")
_SKIP_DIRS = {".ipynb_checkpoints", ".backups"}
# Child graders running now (pid -> the child and its kernel's pid file), so an interrupted batch
# can end them.
_LIVE: dict[int, tuple[Any, Path]] = {}
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


def isolation_level() -> tuple[str, str]:
    """The isolation grading uses and why: ``COURSE_ISOLATION`` if set, else the best available."""
    from .sandbox import LEVELS, isolation_available

    asked = os.environ.get("COURSE_ISOLATION", "").strip().lower()
    if not asked:
        return isolation_available()
    if asked not in LEVELS:
        raise ValueError(f"COURSE_ISOLATION must be one of {', '.join(LEVELS)}, not {asked!r}")
    return asked, "COURSE_ISOLATION asks for it"


def candidate_names(ex: checking.Exercise) -> list[str]:
    """Names a notebook may define the exercise under; a class exercise's class name comes first.

    A notebook may also bind the id to something else (``silu_function = SiLUFunction.apply``);
    the class is what its own check cell passes, so the class is what gets graded.
    """
    declared = re.match(r"\s*class\s+(\w+)", ex.signature)
    return [declared.group(1), ex.id] if declared else [ex.id]


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
    call_timeout: float = CALL_TIMEOUT,
    forbidden: Sequence[Path | str] = (),
) -> NotebookResult:
    """Execute a copy of the notebook (strict mode) within ``timeout`` seconds and grade what it defines.

    One call of a learner's function may take ``call_timeout`` seconds before it is stopped
    and its case failed; the other exercises are still graded. The kernel runs in a
    ``sandbox.Sandbox`` that never shows the notebook's own folder nor the ``forbidden``
    paths (the other submissions, the output files).
    """
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
    from . import sandbox

    with tempfile.TemporaryDirectory(prefix="course-grade-") as tmp:
        work = Path(tmp)
        copy = work / "run" / path.name
        copy.parent.mkdir()
        shutil.copyfile(path, copy)
        # Made here, not in the child: closing it ends whatever the notebook started, even
        # when the child is killed at the timeout.
        with sandbox.Sandbox(
            copy.parent,
            forbidden=[path.parent, *forbidden],
            env=KERNEL_ENV,
            level=isolation_level()[0],
        ) as box:
            outcome = _run_child(copy, chapter, exercise, timeout, work, call_timeout, box)
    seconds = time.perf_counter() - start
    if outcome["status"] != "graded":
        return _problem(path, chapter, outcome["status"], outcome["message"], seconds, exercise)
    return NotebookResult(path, chapter, "graded", "", seconds, outcome["rows"])


def _run_child(
    copy: Path,
    chapter: str,
    exercise: str | None,
    timeout: float,
    work: Path,
    call_timeout: float,
    box: Any,
) -> dict[str, Any]:
    result_file, pid_file, log = work / "result.json", work / "kernel.pid", work / "stderr.txt"
    box_file = work / "sandbox.json"
    box_file.write_text(
        json.dumps(
            {
                "kernels": str(box.kernel_spec_dir()),
                "runtime": str(box.runtime_dir),
                "connection": str(box.connection_dir),
                "prefix": box.wrap([]),
            }
        ),
        encoding="utf-8",
    )
    env = dict(os.environ, COURSE_STRICT="1", MPLBACKEND="Agg", PYDEVD_DISABLE_FILE_VALIDATION="1")
    # Connection files of a killed kernel then vanish with the temporary folder.
    env["JUPYTER_RUNTIME_DIR"] = str(work / "runtime")
    # The kernel must import this very course_utils, not another one on its path.
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    argv = [
        str(copy),
        "--chapter",
        chapter,
        "--cell-timeout",
        str(timeout),
        # Judging must end before this process kills the child at `timeout`.
        "--deadline",
        str(time.time() + timeout - min(5.0, 0.1 * timeout)),
        "--call-timeout",
        str(call_timeout),
        "--result",
        str(result_file),
        "--kernel-pid-file",
        str(pid_file),
        "--sandbox",
        str(box_file),
    ]
    if exercise:
        argv += ["--exercise", exercise]
    log.touch()  # a child that dies before it opens its log still leaves one to read
    proc = _start_child(argv, str(copy.parent), env, log)
    with _LIVE_LOCK:
        _LIVE[proc.pid] = (proc, pid_file)
    try:
        if _wait(proc, timeout) is None:
            return {
                "status": "timeout",
                "message": f"the notebook did not finish within {timeout:g} s (an endless loop?)",
            }
    finally:
        # Also on Ctrl-C: nothing this notebook started may outlive its grading.
        _end(proc, pid_file)
        code = _wait(proc)
    try:
        return json.loads(result_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        return {
            "status": "crashed",
            "message": f"the grader process failed (exit {code}): {tail[-1] if tail else 'no message'}",
        }


def _start_child(argv: list[str], cwd: str, env: dict[str, str], log: Path) -> Any:
    """Start the grading child: forked from the fork server where that is safe, else a fresh interpreter.

    multiprocessing imports the parent's ``__main__`` again in a forked child; a script run by
    path (``python grade_all.py``) may not guard its top level, so it gets fresh interpreters.
    """
    import multiprocessing as mp

    main = sys.modules.get("__main__")
    forkable = "forkserver" in mp.get_all_start_methods() and (
        getattr(sys.modules.get("course_utils.cli"), "console_script", False)
        or getattr(main, "__spec__", None) is not None  # run with -m
        or getattr(main, "__file__", None) is None  # -c, a REPL, an embedding
    )
    if forkable:
        proc = _child_context().Process(
            target=_child_entry, args=(argv, cwd, env, str(log)), name="course-grade-child"
        )
        proc.start()
        return proc
    with log.open("ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "course_utils.grade_child", *argv],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )


def _wait(child: Any, timeout: float | None = None) -> int | None:
    """The child's exit code, or None while it still runs after ``timeout`` seconds."""
    if isinstance(child, subprocess.Popen):
        try:
            return child.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
    child.join(timeout)
    return child.exitcode


def _child_context() -> Any:
    """Where forked grading children come from: a fork server with the grader's imports loaded.

    A fresh interpreter spends about 2.5 s of CPU importing torch, nbclient and the grader
    before it can start a notebook's kernel; forked from multiprocessing's fork server, which
    imported them once, a child starts at once.
    """
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    # Only takes effect when the server starts (the first child of this process); the grading
    # child module goes first so that its lean imports apply to everything after it.
    ctx.set_forkserver_preload(list(_CHILD_PRELOAD))
    return ctx


#: What the fork server imports once for every grading child.
_CHILD_PRELOAD = (
    "course_utils.grade_child",
    "torch",
    "nbclient",
    "jupyter_client.blocking",
    "course_utils.kernel",
    "course_utils.remote",
)


def _child_entry(argv: list[str], cwd: str, env: dict[str, str], log: str) -> None:
    """Body of the grading child: its own session, folder, environment and stderr, then the grading."""
    # A session of its own: a timeout ends the child and everything it started with one killpg.
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    err = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    for fd, target in ((0, null), (1, null), (2, err)):
        os.dup2(target, fd)
    os.close(null)
    os.close(err)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.exit(_child_main(argv))


def _end(child: Any, pid_file: Path) -> None:
    """Kill the grading child, everything in its session, and its kernel's session."""
    if _wait(child, 0) is None:
        child.kill()  # also a forked child stopped before it made its session
    # The child's group has its pid once the child made its session, and while the group lives
    # no new process can get that pid: killing it cannot hit anything else, not even the grader
    # when the child was stopped before its setsid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
    # jupyter_client starts the kernel in a session of its own: end it and anything it spawned.
    _kill_group(_read_pid(pid_file))
    with _LIVE_LOCK:
        _LIVE.pop(child.pid, None)


def _end_all() -> None:
    """End every child grader still running and its kernel (the batch was interrupted)."""
    with _LIVE_LOCK:
        live = list(_LIVE.values())
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
    path: Path,
    chapter: str,
    exercise: str | None,
    cell_timeout: float,
    pid_file: Path | None,
    deadline: float | None,
    call_timeout: float,
    box: dict[str, Any],
) -> dict[str, Any]:
    """Run the notebook in its kernel, then grade it from here (inside the child process).
    ``box`` describes the sandbox the parent made (see ``_run_child``).

    The batteries run in this process; the kernel only answers calls of the learner's
    functions (see ``remote``), so nothing a cell does can write the verdict.
    """
    from jupyter_client.blocking import BlockingKernelClient
    from jupyter_core.utils import run_sync
    from nbclient import NotebookClient
    from nbclient.exceptions import DeadKernelError

    from . import remote
    from .kernel import GradingKernelManager

    # `deadline` is wall-clock time (from the parent); the link counts on the monotonic clock.
    left = cell_timeout if deadline is None else deadline - time.time()
    deadline_mono = time.monotonic() + left
    nb = read_notebook(path)
    running = {"index": 0}

    def on_start(**_: Any) -> None:
        provisioner = getattr(km, "provisioner", None)
        pid = getattr(provisioner, "pid", None) or getattr(
            getattr(provisioner, "process", None), "pid", None
        )
        if pid_file is not None and pid:
            pid_file.write_text(str(pid))

    def on_cell(cell: Any = None, cell_index: int = 0, **_: Any) -> None:
        running["index"] = cell_index

    from jupyter_client.kernelspec import KernelSpecManager

    from .sandbox import KERNEL_NAME

    # GradingKernelManager: its shell channel cannot lose a cell's reply to a widget's sync.
    km = GradingKernelManager(
        kernel_name=KERNEL_NAME,
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[box["kernels"]]),
        transport="ipc",
        ip=f"{box['runtime']}/kernel",
        connection_file=f"{box['connection']}/kernel.json",
    )
    # Requests go where the kernel can read but not write (no symlink can be planted for the
    # grader to follow); answers come back through its own runtime folder.
    requests, answers, prefix = Path(box["connection"]), Path(box["runtime"]), box["prefix"]
    client = NotebookClient(
        nb,
        km=km,
        timeout=max(1, math.ceil(cell_timeout)),
        kernel_name=km.kernel_name,
        allow_errors=True,
        interrupt_on_timeout=True,
        record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
        on_notebook_start=on_start,
        on_cell_start=on_cell,
    )
    try:
        try:
            client.execute()
        except DeadKernelError:
            return {"status": "crashed", "message": _death_message(nb, running["index"])}
        except Exception as err:  # noqa: BLE001 - whatever stops the kernel, the row says it in one line
            return {
                "status": "crashed",
                "message": f"the notebook could not run: {type(err).__name__}: {_first_line(str(err))}",
            }
        if client.kc is not None:
            client.kc.stop_channels()
        kc = BlockingKernelClient()
        kc.load_connection_info(km.get_connection_info())
        kc.start_channels()
        link = remote.KernelLink(
            kc,
            requests,
            answers,
            deadline_mono,
            interrupt=run_sync(km.interrupt_kernel),
            call_timeout=call_timeout,
            prefix=prefix,
        )
        exercises = [e for e in chapter_exercises(chapter) if exercise in (None, e.id)]
        try:
            rows = remote.grade_in_kernel(link, chapter, exercises)
        finally:
            kc.stop_channels()
        return {"status": "graded", "rows": rows}
    finally:
        with contextlib.suppress(Exception):
            run_sync(km.shutdown_kernel)(now=True)


def _death_message(nb: nbformat.NotebookNode, index: int) -> str:
    first = _first_line(nb.cells[index].source)[:60] if index < len(nb.cells) else ""
    return f"the kernel died while running cell {index + 1} (`{first}`): does it call os._exit, exit() or crash Python?"


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


def _grade_safely(
    path: Path, timeout: float, forbidden: Sequence[Path | str] = ()
) -> NotebookResult:
    try:
        return grade_notebook(path, timeout=timeout, forbidden=forbidden)
    except Exception as err:  # noqa: BLE001 - one bad notebook never stops the batch
        return _problem(
            path,
            None,
            "crashed",
            f"could not grade it: {type(err).__name__}: {_first_line(str(err))}",
        )


def _child_main(argv: list[str] | None = None) -> int:
    """Entry point of the child process that runs one notebook (used by ``grade_notebook``)."""
    parser = argparse.ArgumentParser(
        prog="python -m course_utils.grade_child", description=_child_main.__doc__
    )
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--chapter", required=True)
    parser.add_argument("--exercise")
    parser.add_argument("--cell-timeout", type=float, default=DEFAULT_TIMEOUT)
    parser.add_argument("--deadline", type=float, help="wall-clock time by which judging ends")
    parser.add_argument("--call-timeout", type=float, default=CALL_TIMEOUT)
    parser.add_argument("--sandbox", type=Path, required=True, help="the parent's sandbox (JSON)")
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--kernel-pid-file", type=Path)
    args = parser.parse_args(argv)
    outcome = _execute(
        args.notebook,
        args.chapter,
        args.exercise,
        args.cell_timeout,
        args.kernel_pid_file,
        args.deadline,
        args.call_timeout,
        json.loads(args.sandbox.read_text(encoding="utf-8")),
    )
    args.result.write_text(json.dumps(outcome), encoding="utf-8")
    return 0


# The batch and its files live in gradebook; these names stay importable from here.
_MOVED_TO_GRADEBOOK = {"grade_dir", "write_csv", "write_junit", "summary", "_flat"}


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_GRADEBOOK:
        from . import gradebook

        return getattr(gradebook, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
