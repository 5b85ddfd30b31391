"""Each chapter's report of how long its checks take: printed with -s, never asserted (timed tests are flaky)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import course_utils as cu


def report_check_seconds(
    styles: Mapping[str, Callable[..., Any] | Sequence[Callable[..., Any]]], capsys: Any
) -> None:
    """Time each exercise's check on its reference and on ``styles[id]`` (one or more correct styles)."""
    rows = []
    for exercise_id, fns in styles.items():
        fns = [fns] if callable(fns) else list(fns)
        for label, fn in [
            ("reference", cu.reference(exercise_id)),
            *((f.__name__, f) for f in fns),
        ]:
            start = time.perf_counter()
            cu.check(exercise_id, fn, strict=True)  # one thread: the check pins it, as its budget
            rows.append((exercise_id, label, time.perf_counter() - start))
    width = max(len(r[0]) for r in rows) + 2, max(len(r[1]) for r in rows) + 2
    with capsys.disabled():
        print("\n" + "\n".join(f"{e:{width[0]}s}{n:{width[1]}s}{s:.3f} s" for e, n, s in rows))
