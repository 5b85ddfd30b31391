"""pytest plugin: strict checks in solutions/ notebooks, learn mode in course/ notebooks.

nbval starts a notebook's kernel while setting up its first cell, after this
plugin's ``tryfirst`` wrapper has set ``COURSE_STRICT`` (and ``MPLBACKEND``, ``OMP_NUM_THREADS``);
the variables are restored once the kernel is up, so other tests never see them.

Test files and notebooks run longest first, by the seconds ``.ci/durations.json`` recorded
(``course_utils.run_order``), so the two xdist workers (``--dist loadscope
--no-loadscope-reorder``) end the run on short items, not one of them alone on a long
notebook; without that table, notebooks marked long (metadata ``course.long``) go first.

In course/ notebooks, a cell marked ``course.repeat`` in its metadata (an experiment an earlier
cell already ran, repeated with other settings) is skipped with its reason: CI runs it, unchanged,
in the solution twin, and in the student twin it would only train the same models again.

In course/ notebooks it also checks the stubs, at no extra cost: every cell that calls
``cu.check(...)`` must report its exercise as pending. A stub that returns instead of
raising NotImplementedError (or leaks a solution) fails that cell, while nbval itself
fails any cell that errors.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .build import is_long
from .run_order import load_durations, order_key

_MODES = {"solutions": "1", "course": "0"}


def strict_value(path: Path) -> str | None:
    """ "1" for a notebook under solutions/, "0" under course/ (the nearer folder wins), else None."""
    if path.suffix != ".ipynb":
        return None
    for part in reversed(path.parent.parts):
        if part in _MODES:
            return _MODES[part]
    return None


def repeat_reason(cell: Any) -> str | None:
    """What a cell marked ``course.repeat`` repeats (its cell metadata), or None."""
    course = (getattr(cell, "metadata", None) or {}).get("course")
    reason = course.get("repeat") if isinstance(course, dict) else None
    return reason if isinstance(reason, str) and reason.strip() else None


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """Set COURSE_STRICT and MPLBACKEND for the kernel a notebook item's setup starts."""
    value = strict_value(Path(str(item.path)))
    if value is None:
        return (yield)
    saved = {key: os.environ.get(key) for key in ("COURSE_STRICT", "MPLBACKEND", "OMP_NUM_THREADS")}
    os.environ["COURSE_STRICT"] = value
    os.environ["MPLBACKEND"] = "Agg"
    # Two xdist workers share two cores: one thread per kernel avoids oversubscription,
    # which slows the chapters' small tensors several times over.
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        return (yield)
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest recorded files first (unknown ones before them), long notebooks first among ties.

    Also marks skipped, in course/ notebooks, the cells marked ``course.repeat``.
    """
    long: dict[Path, bool] = {}
    for item in items:
        path = Path(str(item.path))
        if path.suffix == ".ipynb" and path not in long:
            long[path] = is_long(path)
        reason = repeat_reason(getattr(item, "cell", None))
        if reason and strict_value(path) == "0":
            # Its code is its solution twin's, which CI runs in strict mode, and it reaches the
            # learner's functions only through helpers this notebook already ran in learn mode.
            item.add_marker(pytest.mark.skip(reason=f"repeats {reason}; CI runs it in solutions/"))
    by_duration = order_key(load_durations(Path(config.rootpath)))
    items.sort(
        key=lambda item: (
            *by_duration(item.nodeid),
            not long.get(Path(str(item.path)), False),
        )
    )


_CHECK_CALL = re.compile(r"^\s*(?:\w+\s*=\s*)?cu\.check\(\s*['\"](\w+)['\"]", re.M)


def _printed(outputs: list | None) -> str:
    return "".join(
        str(o.get("text", "")) for o in outputs or [] if o.get("output_type") == "stream"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """In a course/ notebook, fail a check cell whose exercise did not report pending."""
    result = yield
    cell = getattr(item, "cell", None)
    if cell is None or strict_value(Path(str(item.path))) != "0":
        return result
    ids = _CHECK_CALL.findall(cell.get("source", ""))
    printed = _printed(getattr(item, "test_outputs", None))
    for exercise_id in ids:
        if f"{exercise_id}: not implemented yet" not in printed:
            raise AssertionError(
                f"{exercise_id}: its check in this student notebook did not report pending, so its "
                "stub does not raise NotImplementedError (or the solution leaked into course/)."
            )
    return result
