"""Shared fixtures: the course's own tests may hand the references in as answers; chapter tests use one thread."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import nbformat
import pytest
import torch

from course_utils import checking


@pytest.fixture(autouse=True)
def _references_allowed(request: pytest.FixtureRequest) -> Iterator[None]:
    # Planted mistakes are often a reference plus one change; learners get no such pass.
    with contextlib.ExitStack() as stack:
        if not request.node.get_closest_marker("references_forbidden"):
            stack.enter_context(checking.references_allowed())
        if request.node.get_closest_marker("forbidden_calls_allowed"):
            # A planted mistake is often a PyTorch operator plus one change; its message is
            # what the test judges, not how it was built.
            stack.enter_context(checking.forbidden_calls_allowed())
        yield


@pytest.fixture(scope="session")
def solution_cells() -> Callable[[str, list[str]], list[str]]:
    """A function: the solution notebook's cells of ``chapter`` that define ``names``."""

    def cells(chapter: str, names: list[str]) -> list[str]:
        path = Path(__file__).resolve().parents[1] / "solutions" / f"{chapter}.ipynb"
        nb = nbformat.read(path, as_version=4)
        heads = tuple(f"def {n}(" for n in names) + tuple(f"class {n}(" for n in names)
        return [c.source for c in nb.cells if c.cell_type == "code" and c.source.startswith(heads)]

    return cells


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """In the chapter tests, one intra-op thread, as the checks use: on tiny tensors a second
    thread only adds hand-off cost (up to 10x on a busy 2-core machine)."""
    if not request.module.__name__.startswith("test_ch"):
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
