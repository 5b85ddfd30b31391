"""Time every notebook and every check, and write the timings table kept in the repo.

Run ``python -m course_utils.bench`` (or ``course bench``) from the repository root; it
writes ``.ci/timings.md``. Budgets (2-core machine): a notebook under 60 s (180 s for
those marked long in their metadata), a check under 2 s, the whole CI under 20 min.
These are measured and recorded, never asserted in tests, so a slow machine fails nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import time
from pathlib import Path

import nbformat
import torch
from nbclient import NotebookClient
from tqdm.auto import tqdm

from .build import is_long
from .checking import check, exercises, references_allowed
from .kernel import client_options

NOTEBOOK_BUDGET_S = 60.0
LONG_NOTEBOOK_BUDGET_S = 180.0
CHECK_BUDGET_S = 2.0


def time_notebook(path: Path, strict: bool, timeout: int = 600) -> float:
    """Seconds to execute one notebook top to bottom in a fresh kernel (kernel start included)."""
    nb = nbformat.read(path, as_version=4)
    env_before = os.environ.get("COURSE_STRICT")
    os.environ["COURSE_STRICT"] = "1" if strict else "0"
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as under nbval in CI (course_utils.nbval_mode)
    try:
        start = time.perf_counter()
        NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
            **client_options(),
        ).execute()
        return time.perf_counter() - start
    finally:
        if env_before is None:
            os.environ.pop("COURSE_STRICT", None)
        else:
            os.environ["COURSE_STRICT"] = env_before


def time_checks(seeds: int = 5, chapters: list[str] | None = None) -> dict[str, float]:
    """Slowest time of each exercise's check on its reference, over ``seeds`` seeds, after a warm-up run.

    ``chapters`` (numbers such as "14") limits it to those chapters' exercises.
    """
    out: dict[str, float] = {}
    torch.set_num_threads(1)  # the contract's budget is for one CPU core
    chosen = [e for e in exercises() if chapters is None or e.chapter[:2] in chapters]
    for ex in tqdm(chosen, desc="checks"):
        # One untimed run first: a judge's one-off imports (transformers for chapter 11, the
        # Triton interpreter) are paid once per kernel, not by every check.
        with references_allowed():
            check(ex.id, ex.reference, seed=seeds)
        worst = 0.0
        for seed in range(seeds):
            start = time.perf_counter()
            # The course's own measurement: its references stand in for a learner's answer.
            with references_allowed():
                check(ex.id, ex.reference, seed=seed)
            worst = max(worst, time.perf_counter() - start)
        out[ex.id] = worst
    return out


def _budget(path: Path) -> float:
    return LONG_NOTEBOOK_BUDGET_S if is_long(path) else NOTEBOOK_BUDGET_S


def write_table(
    root: Path, notebooks: dict[str, tuple[float, float, float]], checks: dict[str, float]
) -> Path:
    """Write the markdown timings table to ``.ci/timings.md`` and return its path."""
    budgets = {ex.id: ex.budget for ex in exercises()}
    # the check that used most of its budget speaks for its chapter
    by_chapter: dict[str, tuple[str, float]] = {}
    for ex in exercises():
        secs = checks.get(ex.id, 0.0)
        worst = by_chapter.get(ex.chapter)
        if worst is None or secs / ex.budget >= worst[1] / budgets.get(worst[0], 2.0):
            by_chapter[ex.chapter] = (ex.id, secs)
    lines = [
        "# Timings",
        "",
        f"Measured {dt.date.today().isoformat()} by `python -m course_utils.bench` on "
        f"{os.cpu_count()} CPU cores ({platform.machine()}), Python {platform.python_version()}, "
        f"torch {torch.__version__}. Budgets: notebook {NOTEBOOK_BUDGET_S:.0f} s "
        f"({LONG_NOTEBOOK_BUDGET_S:.0f} s if marked long), check {CHECK_BUDGET_S:.0f} s on one core "
        "(distributed checks 10 s, as each exercise states).",
        "",
        "| notebook | solution, strict (s) | student, learn (s) | budget (s) | slowest check (s) | within budget |",
        "|---|---:|---:|---:|---|---|",
    ]
    for stem, (sol, stu, budget) in sorted(notebooks.items()):
        ex_id, secs = by_chapter.get(stem, ("-", 0.0))
        ok = sol < budget and stu < budget and secs < budgets.get(ex_id, CHECK_BUDGET_S)
        lines.append(
            f"| {stem} | {sol:.1f} | {stu:.1f} | {budget:.0f} | {ex_id} {secs:.2f} | {'yes' if ok else 'NO'} |"
        )
    lines += ["", "| exercise | slowest check over 5 seeds (s) | budget (s) |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.3f} | {budgets.get(k, CHECK_BUDGET_S):g} |" for k, v in checks.items()]
    path = root / ".ci" / "timings.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def read_table(path: Path) -> tuple[dict[str, tuple[float, float, float]], dict[str, float]]:
    """The notebook rows and check times of an existing timings table (empty if there is none)."""
    notebooks: dict[str, tuple[float, float, float]] = {}
    checks: dict[str, float] = {}
    if not path.exists():
        return notebooks, checks
    for line in path.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        try:
            if len(cells) == 6 and cells[0][:2].isdigit():
                notebooks[cells[0]] = (float(cells[1]), float(cells[2]), float(cells[3]))
            elif len(cells) in (2, 3) and not cells[0].startswith(("exercise", "-")):
                checks[cells[0]] = float(cells[1])
        except ValueError:
            continue
    return notebooks, checks


def main(argv: list[str] | None = None) -> int:
    """Measure and write the table; ``--only NN`` limits the notebooks timed."""
    parser = argparse.ArgumentParser(prog="course bench", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="repository root")
    parser.add_argument(
        "--only", nargs="*", default=None, help="chapter numbers to time, e.g. 00 01"
    )
    args = parser.parse_args(argv)
    root = args.root
    notebooks: dict[str, tuple[float, float, float]] = {}
    paths = sorted((root / "solutions").glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        paths = [p for p in paths if p.name[:2] in args.only]
    for sol in tqdm(paths, desc="notebooks"):
        stu = root / "course" / sol.name
        notebooks[sol.stem] = (
            time_notebook(sol, strict=True),
            time_notebook(stu, strict=False) if stu.exists() else float("nan"),
            _budget(sol),
        )
    checks = time_checks(chapters=args.only)
    if args.only:  # keep the rows of the chapters not re-measured
        old_notebooks, old_checks = read_table(root / ".ci" / "timings.md")
        notebooks = {**old_notebooks, **notebooks}
        checks = {k: checks.get(k, old_checks.get(k)) for k in [e.id for e in exercises()]}
        checks = {k: v for k, v in checks.items() if v is not None}
    print(f"wrote {write_table(root, notebooks, checks)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
