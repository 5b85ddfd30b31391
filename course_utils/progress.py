"""A learner's progress, recorded by every check cell and read back at once by ``course status``.

Each ``cu.check`` run in a notebook kernel writes the exercise's latest status into
``.course_progress.json`` in the notebook's folder (the kernel's working directory). Nothing is
written outside a notebook kernel (scripts, the course's own tests) or when ``COURSE_PROGRESS=0``;
a folder that cannot be written to is skipped silently, since a progress file must never fail
a check.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

#: The progress file's name, in the folder of the notebooks.
PROGRESS_FILE = ".course_progress.json"


def enabled() -> bool:
    """True inside a notebook kernel, unless ``COURSE_PROGRESS=0``."""
    if os.environ.get("COURSE_PROGRESS", "").strip() == "0":
        return False
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)() if ipython else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def read(folder: Path | str) -> dict[str, dict[str, Any]]:
    """Exercise id -> {"chapter", "status", "when"} recorded in ``folder`` (empty if none or unreadable)."""
    path = Path(folder) / PROGRESS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict) and "status" in v}


def record(exercise_id: str, chapter: str, status: str, folder: Path | str | None = None) -> None:
    """Store ``status`` as the latest result of ``exercise_id`` (atomically; never raises)."""
    if folder is None and not enabled():
        return
    folder = Path.cwd() if folder is None else Path(folder)
    try:
        data = read(folder)
        data[exercise_id] = {
            "chapter": chapter,
            "status": status,
            "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        fd, tmp = tempfile.mkstemp(prefix=".course_progress.", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, folder / PROGRESS_FILE)
    except OSError:
        return
