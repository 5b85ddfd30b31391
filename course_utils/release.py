"""``course release OUT``: what a learner receives, with no solutions in it.

The release holds the student notebooks (outputs cleared), a README for learners and an
installable wheel of ``course_utils``. It never holds ``solutions/``; before it is written,
every notebook is scanned for solution regions and the wheel for notebooks. The check
batteries, and with them the course's reference implementations, are in the wheel: a
determined learner can read them there (the checks still refuse them as answers), which the
instructor notes in the README say.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat

from . import __version__, build

LEARNER_README = """# Deep-learning internals, derived by hand and verified by machine

Your copy of the course: the chapter notebooks in `course/` and the package that checks your
work, in `wheels/`.

```bash
python3 -m pip install "$(ls wheels/course_utils-*.whl)[chapters,bert,kernels]" && python3 -m jupyter lab course/
```

You need Python 3.11 or newer (a virtual environment is a good idea:
`python3 -m venv .venv && . .venv/bin/activate` first). Without a GPU, install the smaller
CPU build of torch first: `python3 -m pip install torch --index-url https://download.pytorch.org/whl/cpu`.

- Each notebook derives one topic, asks you to write it, and checks it: replace each
  `raise NotImplementedError(...)` with your code and run the check cell under it.
- A wrong answer raises `CheckFailure` saying what is wrong, where, and what it looks like
  you did; a pending one prints one line; a right one shows the cases it passed.
- `course status` shows your progress over every chapter; `course check course/NN_*.ipynb`
  grades one notebook as your instructor's grader will.
- Hand in your notebooks as they are: the grader finds each exercise by its name.
"""

#: Text that only a solution notebook contains.
SOLUTION_MARKERS = (
    "### BEGIN SOLUTION",
    "### END SOLUTION",
    "<!-- BEGIN SOLUTION",
    "<!-- END SOLUTION",
)


def clean_copy(src: Path, dst: Path) -> None:
    """Write ``src`` to ``dst`` with outputs and execution counts cleared."""
    nb = build.read_notebook(src)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nbformat.write(nb, dst)


def solution_text(path: Path) -> list[str]:
    """The solution markers found in notebook ``path`` (empty when it is clean)."""
    text = path.read_text(encoding="utf-8")
    return [m for m in SOLUTION_MARKERS if m in text]


def _wheel(root: Path, folder: Path) -> Path:
    """Build the ``course_utils`` wheel into ``folder``; its path."""
    folder.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    done = subprocess.run(
        [*cmd, "--wheel-dir", str(folder), str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    wheels = sorted(folder.glob("course_utils-*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeError(f"the wheel could not be built: {last[-1] if last else 'no output'}")
    with zipfile.ZipFile(wheels[0]) as whl:
        leaked = [n for n in whl.namelist() if n.endswith(".ipynb") or n.startswith("solutions/")]
    if leaked:
        raise RuntimeError(f"the wheel contains notebooks ({leaked[0]}); nothing was released")
    return wheels[0]


def release(out: Path | str, root: Path | str | None = None) -> list[Path]:
    """Write the learners' handout into the new folder ``out``; the files written."""
    root = Path(root) if root is not None else build.find_repo_root()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: already exists and is not empty; give a new folder")
    if out.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{out}: inside the repository; give a folder outside it")
    if not build.build(root / "solutions", root / "course", check=True).ok:
        raise ValueError("course/ is out of date with solutions/: run `course build` first")
    notebooks = sorted((root / "course").glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"{root / 'course'}: no student notebooks to release")
    for path in notebooks:
        found = solution_text(path)
        if found:
            raise ValueError(f"{path.name} contains '{found[0]}': nothing was released")
    (out / "course").mkdir(parents=True, exist_ok=True)
    written = []
    for path in notebooks:
        clean_copy(path, out / "course" / path.name)
        written.append(out / "course" / path.name)
    readme = out / "README.md"
    readme.write_text(LEARNER_README, encoding="utf-8")
    written.append(readme)
    written.append(_wheel(root, out / "wheels"))
    return written


def describe(written: list[Path]) -> str:
    """One line saying what a release holds."""
    notebooks = sum(p.suffix == ".ipynb" for p in written)
    return f"course {__version__}: {notebooks} student notebooks, README.md and the wheel"
