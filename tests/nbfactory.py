"""Tiny notebooks for the grading tests: code cells (a source starting '#md ' is markdown)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook


def notebook(*sources: str, chapter: str | None = None) -> nbformat.NotebookNode:
    """A notebook of these cells, with ``course.chapter`` in its metadata when given."""
    cells = [
        new_markdown_cell(s[4:]) if s.startswith("#md ") else new_code_cell(s) for s in sources
    ]
    nb = new_notebook(cells=cells)
    if chapter:
        nb.metadata["course"] = {"chapter": chapter}
    return nb


def write(path: Path, nb: nbformat.NotebookNode) -> Path:
    """Write ``nb`` to ``path``, making its folders; return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path
