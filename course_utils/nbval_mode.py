"""pytest plugin: strict checks in solutions/ notebooks, learn mode in course/ notebooks.

nbval starts a notebook's kernel while setting up its first cell, after this
plugin's ``tryfirst`` wrapper has set ``COURSE_STRICT`` (and ``MPLBACKEND``, ``OMP_NUM_THREADS``);
the variables are restored once the kernel is up, so other tests never see them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

_MODES = {"solutions": "1", "course": "0"}


def strict_value(path: Path) -> str | None:
    """ "1" for a notebook under solutions/, "0" under course/ (the nearer folder wins), else None."""
    if path.suffix != ".ipynb":
        return None
    for part in reversed(path.parent.parts):
        if part in _MODES:
            return _MODES[part]
    return None


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
