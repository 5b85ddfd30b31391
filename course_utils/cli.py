"""The ``course`` command: list, check, status, grade and build the course's notebooks."""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

from . import __version__
from .lean_imports import skip_unused_imports


class _OnFirstUse:
    """A submodule imported when first touched: `course --help` must not wait for torch."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(f"course_utils.{self._name}"), attr)


build = _OnFirstUse("build")
grade = _OnFirstUse("grade")
gradebook = _OnFirstUse("gradebook")
DEFAULT_TIMEOUT = 600.0  # seconds per notebook; the same default as grade.DEFAULT_TIMEOUT


class UsageError(Exception):
    """A mistake in how the command was called: exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``course: error:`` line, not the usage text."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _parser() -> _Parser:
    parser = _Parser(
        prog="course",
        description="Deep-learning internals, derived by hand and verified by machine.",
    )
    parser.add_argument("--version", action="version", version=f"course {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("list", help="chapters and their exercises")
    p.add_argument(
        "--course",
        type=Path,
        help="folder of chapter notebooks (default: course/ of the repository)",
    )
    p.set_defaults(run=cmd_list)

    p = sub.add_parser(
        "check", help="grade one notebook (strict mode) and print one line per exercise"
    )
    p.add_argument("notebook", type=Path, metavar="NOTEBOOK")
    p.add_argument("--exercise", metavar="ID", help="check only this exercise")
    p.add_argument(
        "--timeout",
        type=_positive,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help="seconds for the whole notebook",
    )
    p.set_defaults(run=cmd_check)

    p = sub.add_parser(
        "status", help="your progress over all chapters, as your check cells recorded it"
    )
    p.add_argument(
        "--run",
        dest="execute",
        action="store_true",
        help="execute every chapter notebook instead (slow, but verified)",
    )
    p.add_argument(
        "dir",
        type=Path,
        nargs="?",
        metavar="DIR",
        help="folder of chapter notebooks (default: course/)",
    )
    p.add_argument(
        "--timeout",
        type=_positive,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help="seconds per notebook",
    )
    p.set_defaults(run=cmd_status)

    p = sub.add_parser("grade", help="grade every notebook below a folder of submissions")
    p.add_argument(
        "submissions",
        type=Path,
        metavar="SUBMISSIONS_DIR",
        help="one sub-folder (or notebook) per student",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("grades.csv"),
        metavar="FILE.csv",
        help="CSV to write, outside SUBMISSIONS_DIR (default: grades.csv)",
    )
    p.add_argument(
        "--junit",
        type=Path,
        metavar="FILE.xml",
        help="JUnit XML to write (default: the CSV's name with .xml)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep what an interrupted run graded (FILE.csv.partial.jsonl); grade only the rest",
    )
    p.add_argument(
        "--timeout",
        type=_positive,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help="seconds per notebook",
    )
    p.add_argument(
        "--jobs", type=int, default=1, metavar="N", help="notebooks graded at once (default: 1)"
    )
    p.set_defaults(run=cmd_grade)

    p = sub.add_parser("build", help="generate course/ (student notebooks) from solutions/")
    p.add_argument(
        "--check", action="store_true", help="write nothing; fail if course/ is not in sync"
    )
    p.add_argument(
        "--force", action="store_true", help="overwrite edited notebooks too, keeping a backup"
    )
    p.add_argument(
        "--solutions", type=Path, metavar="DIR", help="default: solutions/ of the repository"
    )
    p.add_argument("--course", type=Path, metavar="DIR", help="default: course/ of the repository")
    p.set_defaults(run=cmd_build)

    p = sub.add_parser(
        "release",
        help="write the learners' handout (student notebooks, README, wheel; no solutions)",
    )
    p.add_argument("out", type=Path, metavar="OUT", help="a new folder outside the repository")
    p.set_defaults(run=cmd_release)

    p = sub.add_parser(
        "site",
        help="run the solution notebooks and render them, with the index, to a static HTML site",
    )
    p.add_argument("out", type=Path, metavar="OUT", help="a folder outside the repository")
    p.add_argument(
        "--no-execute",
        action="store_true",
        help="render the notebooks as stored (no outputs) instead of running them",
    )
    p.add_argument("--only", nargs="*", metavar="NN", help="only these chapters (numbers)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="notebooks run at once")
    p.add_argument(
        "--timeout",
        type=_positive,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help="seconds a cell may run (default: 600)",
    )
    p.set_defaults(run=cmd_site)

    p = sub.add_parser(
        "gpu", help="run every GPU cell and benchmark of the course; write .ci/gpu.md (needs CUDA)"
    )
    p.add_argument("--out", type=Path, metavar="FILE.md", help="default: .ci/gpu.md")
    p.add_argument("--only", nargs="*", metavar="NN", help="only these chapters (numbers)")
    p.set_defaults(run=cmd_gpu)
    return parser


def cmd_release(args: argparse.Namespace) -> int:
    """Write the learners' handout into a new folder."""
    from . import release

    written = release.release(args.out)
    print(f"wrote {args.out}: {release.describe(written)}")
    return 0


def cmd_site(args: argparse.Namespace) -> int:
    """Build the static site of the course into a folder."""
    from . import site

    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    pages = site.build_site(
        args.out,
        only=args.only,
        execute_notebooks=not args.no_execute,
        jobs=args.jobs,
        timeout=int(args.timeout),
    )
    print(f"wrote {args.out / site.INDEX} and {len(pages)} chapter pages; every link checked")
    return 0


def cmd_gpu(args: argparse.Namespace) -> int:
    """Run the GPU cells of every chapter and write the dated table."""
    from . import gpu

    argv = ["--out", str(args.out)] if args.out else []
    if args.only:
        argv += ["--only", *args.only]
    return gpu.main(argv)


#: True in the installed ``course`` script: its top level is guarded, so multiprocessing may
#: import it again in each grading child it forks (see ``grade._start_child``).
console_script = False


def console_main() -> int:
    """Entry point of the installed ``course`` script."""
    global console_script
    console_script = True
    return main()


def main(argv: list[str] | None = None) -> int:
    """Run the ``course`` command; return its exit code."""
    skip_unused_imports()
    parser = _parser()
    if threading.current_thread() is threading.main_thread():
        # Turn `kill` into KeyboardInterrupt so graders and kernels we started are ended too.
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "run", None):
            raise UsageError(
                "give a command: list, check, status, grade, build, release, site or gpu (see `course --help`)"
            )
        return args.run(args)
    except SystemExit as done:  # --help and --version
        return done.code if isinstance(done.code, int) else 0
    except UsageError as err:
        return _error(str(err), 2)
    except (FileNotFoundError, ValueError, KeyError) as err:
        # Our own errors carry one sentence; the operating system's carry errno and a file name.
        return _error(err.args[0] if len(err.args) == 1 else str(err), 2)
    except BrokenPipeError:
        # The reader went away (`course list | head`); say nothing more on the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as err:
        return _error(str(err), 1)
    except KeyboardInterrupt:
        return _error("interrupted", 130)
    except Exception as err:
        if os.environ.get("COURSE_DEBUG"):
            raise
        return _error(
            f"unexpected {type(err).__name__}: {err} (run with COURSE_DEBUG=1 for the traceback)", 1
        )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _error(message: str, code: int) -> int:
    print(f"course: error: {message}", file=sys.stderr)
    return code


def _course_dir(given: Path | None) -> Path:
    return given if given is not None else build.find_repo_root() / "course"


def cmd_list(args: argparse.Namespace) -> int:
    """Print every chapter with its exercises and, where one exists, the notebook that holds them."""
    folder = _course_dir(args.course)
    homes: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*.ipynb")) if folder.is_dir() else []:
        try:
            chapter = grade.chapter_of(build.read_notebook(path), path)
        except ValueError:
            continue
        homes.setdefault(chapter or "", []).append(path)
    for chapter in grade.known_chapters():
        where = ", ".join(build.show(p) for p in homes.get(chapter, []))
        print(chapter + (f"  ({where})" if where else ""))
        for ex in grade.chapter_exercises(chapter):
            signature = ex.signature if ex.signature.startswith("(") else f": {ex.signature}"
            print(f"  {ex.id}{signature}")
            print(f"      {ex.summary}")
    return 0


def _notebook_arg(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(
            f"{path} is a folder; give one notebook (.ipynb), or use `course status {path}`"
        )
    if path.suffix != ".ipynb":
        raise UsageError(f"{path} is not a notebook (expected a .ipynb file)")
    return path


def _describe(row: dict) -> str:
    status, message = row["status"], row["message"]
    if status == "passed":
        return "passed"
    if status == "failed":
        return f"FAILED: {message}"
    if status == "pending":
        return "pending (not implemented yet)"
    if status == "missing":
        return f"missing ({message})"
    return f"{status.upper()}: {message}"


def cmd_check(args: argparse.Namespace) -> int:
    """Grade one notebook strictly; exit 0 only if every (or the chosen) exercise passes."""
    path = _notebook_arg(args.notebook)
    nb = build.read_notebook(path)
    chapter = grade.chapter_of(nb, path)
    if chapter is None:
        raise UsageError(
            f"{path}: unknown chapter: set course.chapter in its metadata or name it like "
            f"{grade.known_chapters()[0] if grade.known_chapters() else '01_slug'}.ipynb"
        )
    if args.exercise is not None:
        ids = [e.id for e in grade.chapter_exercises(chapter)]
        if args.exercise not in ids:
            close = difflib.get_close_matches(args.exercise, ids, n=3, cutoff=0.5)
            hint = (
                f"; did you mean {', '.join(close)}?"
                if close
                else f"; its exercises are {', '.join(ids)}"
            )
            raise UsageError(f"chapter {chapter} has no exercise {args.exercise!r}{hint}")
    print(f"{build.show(path)} ({chapter}, strict mode):")
    result = grade.grade_notebook(
        path, timeout=args.timeout, chapter=chapter, exercise=args.exercise
    )
    if result.status == "malformed":
        raise ValueError(result.message)
    for row in result.rows:
        print(f"  {row['exercise']}: {_describe(row)}")
    passed = sum(r["status"] == "passed" for r in result.rows)
    print(f"{passed}/{len(result.rows)} passed")
    return 0 if result.passed else 1


def cmd_status(args: argparse.Namespace) -> int:
    """Show passed/total per chapter: from what the check cells recorded, or (``--run``) by running."""
    if not args.execute:
        return _status_recorded(_course_dir(args.dir))
    folder = _course_dir(args.dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of chapter notebooks")
    by_chapter: dict[str, Path] = {}
    for path in sorted(folder.glob("*.ipynb")):
        try:
            chapter = grade.chapter_of(build.read_notebook(path), path)
        except ValueError as err:
            print(f"skipping {err}", file=sys.stderr)
            continue
        # A learner's copy named exactly like the chapter wins over renamed ones.
        if chapter and (chapter not in by_chapter or path.stem == chapter):
            by_chapter[chapter] = path
    chapters = grade.known_chapters()
    width = max(map(len, chapters), default=10)
    print(f"{'chapter':<{width}}  {'passed':>7}  still to do")
    for chapter in chapters:
        path = by_chapter.get(chapter)
        if path is None:
            print(f"{chapter:<{width}}  {'-':>7}  not started")
            continue
        result = grade.grade_notebook(path, timeout=args.timeout, chapter=chapter)
        passed = sum(r["status"] == "passed" for r in result.rows)
        todo = [
            f"{r['exercise']} ({r['status']})" if r["status"] != "pending" else r["exercise"]
            for r in result.rows
            if r["status"] != "passed"
        ]
        if result.status != "graded":
            todo = [f"{result.status}: {result.message}"]
        print(
            f"{chapter:<{width}}  {f'{passed}/{len(result.rows)}':>7}  {', '.join(todo) or 'done'}"
        )
    return 0


def _status_recorded(folder: Path) -> int:
    """Print the progress the notebooks' check cells recorded in ``folder``, without running anything."""
    from . import checking, progress

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of chapter notebooks")
    recorded = progress.read(folder)
    by_chapter: dict[str, list[checking.Exercise]] = {}
    for ex in checking.exercises():
        by_chapter.setdefault(ex.chapter, []).append(ex)
    width = max(map(len, by_chapter), default=10)
    print(f"{'chapter':<{width}}  {'passed':>7}  still to do")
    for chapter, exs in by_chapter.items():
        seen = [recorded.get(e.id) for e in exs]
        if not any(seen):
            print(f"{chapter:<{width}}  {'-':>7}  not started")
            continue
        passed = sum(1 for r in seen if r and r.get("status") == "passed")
        todo = [
            e.id if not r or r.get("status") == "pending" else f"{e.id} ({r.get('status')})"
            for e, r in zip(exs, seen, strict=True)
            if not r or r.get("status") != "passed"
        ]
        note = ""
        notebook = folder / f"{chapter}.ipynb"
        last = max(str(r.get("when", "")) for r in seen if r)
        if notebook.exists() and _modified_after(notebook, last):
            note = "  (notebook changed since its last check)"
        print(f"{chapter:<{width}}  {f'{passed}/{len(exs)}':>7}  {', '.join(todo) or 'done'}{note}")
    if not recorded:
        print(
            f"No check has run in {folder} yet; run a chapter's check cells, "
            "or `course status --run` to execute every notebook."
        )
    return 0


def _modified_after(path: Path, when: str) -> bool:
    """Whether ``path`` was saved after the ISO time ``when``."""
    import datetime

    try:
        stamp = datetime.datetime.fromisoformat(when)
    except ValueError:
        return False
    return path.stat().st_mtime > stamp.timestamp() + 1


def cmd_grade(args: argparse.Namespace) -> int:
    """Grade a folder of submissions into a CSV and a JUnit XML."""
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    gradebook.grade_dir(
        args.submissions,
        args.out,
        args.junit,
        args.timeout,
        jobs=args.jobs,
        resume=args.resume,
    )
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    """Generate course/ from solutions/ (or, with --check, report what is out of sync)."""
    root = build.find_repo_root()
    solutions = args.solutions if args.solutions is not None else root / "solutions"
    course = args.course if args.course is not None else root / "course"
    if args.check and args.force:
        raise UsageError("--check writes nothing, so --force makes no sense with it")
    result = build.build(solutions, course, force=args.force, check=args.check)
    for line in result.messages:
        print(line)
    for line in result.errors:
        print(f"course: error: {line}", file=sys.stderr)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
