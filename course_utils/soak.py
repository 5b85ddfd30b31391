"""Soak the grader: grade solution notebooks over and over and count the runs that hang.

Run ``python -m course_utils.soak`` from the repository root. Every notebook that
``--notebooks`` matches is graded ``--runs`` times through ``grade.grade_notebook``,
the path ``course grade`` takes (a child process, nbclient, a fresh kernel each run),
round-robin so a busy spell on the machine does not fall on one notebook. A solution
notebook should pass every run; a run that hits ``--timeout`` is a hang. It prints a
markdown table (``--out`` appends it to a file, e.g. ``.ci/soak.md``) and exits 1 if any
run hung or failed. It takes minutes, so it is not part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import os
import platform
import statistics
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tqdm.auto import tqdm

from .grade import grade_notebook

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GLOB = str(ROOT / "solutions" / "[0-9][0-9]_*.ipynb")
#: The packages whose versions decide whether a widget cell can hang the grader.
PACKAGES = ("nbclient", "jupyter_client", "ipykernel", "ipywidgets", "pyzmq", "torch")


@dataclass
class Soak:
    """The outcomes of one notebook's runs: seconds per run, and which runs hung or failed."""

    notebook: str
    seconds: list[float] = field(default_factory=list)
    hangs: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def runs(self) -> int:
        """How many times the notebook was graded."""
        return len(self.seconds)


def soak(paths: list[Path], runs: int, timeout: float) -> list[Soak]:
    """Grade each of ``paths`` ``runs`` times, round-robin; a run reaching ``timeout`` is a hang."""
    results = {p: Soak(p.stem) for p in paths}
    with tqdm(total=runs * len(paths), unit="run", file=sys.stderr) as bar:
        for _ in range(runs):
            for path in paths:
                result = grade_notebook(path, timeout=timeout)
                entry = results[path]
                entry.seconds.append(result.seconds)
                if result.status == "timeout":
                    entry.hangs += 1
                elif not result.passed:
                    bad = [r for r in result.rows if r["status"] != "passed"]
                    first = bad[0] if bad else {"exercise": "*", "message": result.message}
                    entry.failures.append(
                        f"{result.status}: {first['exercise']}: {first['message']}"
                    )
                bar.set_postfix(
                    hangs=sum(s.hangs for s in results.values()),
                    failures=sum(len(s.failures) for s in results.values()),
                )
                bar.update()
    return list(results.values())


def versions() -> str:
    """One line: Python and the versions of the packages in ``PACKAGES`` (and libzmq's)."""
    found = [f"Python {platform.python_version()}"]
    for name in PACKAGES:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    try:
        import zmq

        found.append(f"libzmq {zmq.zmq_version()}")
    except ImportError:
        pass
    return ", ".join(found)


def table(results: list[Soak], *, timeout: float, label: str = "") -> str:
    """A markdown section: when, on what, and one row per notebook with its hangs and seconds."""
    runs = sum(r.runs for r in results)
    hangs = sum(r.hangs for r in results)
    failures = sum(len(r.failures) for r in results)
    title = f"## {dt.date.today().isoformat()}" + (f": {label}" if label else "")
    lines = [
        title,
        "",
        f"{runs} runs, {hangs} hung, {failures} failed; timeout {timeout:g} s per run, "
        f"{os.cpu_count()} CPU cores ({platform.machine()}). {versions()}.",
        "",
        "| notebook | runs | hangs | failures | min (s) | median (s) | max (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        secs = r.seconds or [float("nan")]
        lines.append(
            f"| {r.notebook} | {r.runs} | {r.hangs} | {len(r.failures)} | {min(secs):.1f} "
            f"| {statistics.median(secs):.1f} | {max(secs):.1f} |"
        )
    for r in results:
        lines += [f"- {r.notebook}: {failure}" for failure in r.failures]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Soak the notebooks, print the table (and append it to ``--out``); 1 if any run hung or failed."""
    parser = argparse.ArgumentParser(
        prog="python -m course_utils.soak", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--runs", type=int, default=2, metavar="N", help="gradings per notebook (default: 2)"
    )
    parser.add_argument(
        "--notebooks",
        default=DEFAULT_GLOB,
        metavar="GLOB",
        help="notebooks to grade (default: every solutions/NN_*.ipynb)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds before a run counts as hung (default: 120)",
    )
    parser.add_argument("--out", type=Path, help="markdown file to append the table to")
    parser.add_argument("--label", default="", help="a few words for the table's title")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    paths = sorted(Path(p) for p in glob.glob(args.notebooks))
    if not paths:
        parser.error(f"no notebooks match {args.notebooks!r}")
    results = soak(paths, args.runs, args.timeout)
    text = table(results, timeout=args.timeout, label=args.label)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a", encoding="utf-8") as f:
            f.write("\n" + text)
    bad = any(r.hangs or r.failures for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
