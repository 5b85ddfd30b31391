"""course release: the learners' handout holds the student notebooks, a README and a wheel, no answers."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import nbformat
import pytest

from course_utils import __version__, build, release
from course_utils.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def handout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("handout") / "release"
    release.release(out, ROOT)
    return out


@pytest.mark.slow
def test_the_handout_holds_every_student_notebook_a_readme_and_a_wheel(handout: Path) -> None:
    names = sorted(p.name for p in (handout / "course").iterdir())
    assert names == sorted(p.name for p in (ROOT / "course").glob("[0-9][0-9]_*.ipynb"))
    assert "jupyter lab course/" in (handout / "README.md").read_text()
    [wheel] = list((handout / "wheels").glob("course_utils-*.whl"))
    with zipfile.ZipFile(wheel) as whl:
        files = whl.namelist()
    assert "course_utils/checking.py" in files
    # installed into JupyterLab's settings overrides: widget state is saved with the notebook
    overrides = f"course_utils-{__version__}.data/data/share/jupyter/lab/settings/overrides.d/"
    assert overrides + "course-utils.json" in files
    assert not any(n.startswith("solutions/") or n.endswith(".ipynb") for n in files)
    assert sorted(p.name for p in handout.iterdir()) == ["README.md", "course", "wheels"]


@pytest.mark.slow
def test_nothing_in_the_handout_contains_a_solution_region(handout: Path) -> None:
    for path in (handout / "course").iterdir():
        assert release.solution_text(path) == [], path.name
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), path.name
    # and the solutions' code is nowhere in it: every solution region became a stub
    solution = (ROOT / "solutions" / "01_logits_softmax_cross_entropy.ipynb").read_text()
    student = (handout / "course" / "01_logits_softmax_cross_entropy.ipynb").read_text()
    assert "### BEGIN SOLUTION" in solution and build.STUB_HINT in student


def test_a_notebook_with_a_solution_region_stops_the_release(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    shutil.copytree(ROOT / "solutions", root / "solutions")
    shutil.copytree(ROOT / "course", root / "course")
    leaked = root / "course" / "00_gradient_checking.ipynb"
    shutil.copy(root / "solutions" / leaked.name, leaked)  # a solution copied over its twin
    with pytest.raises(ValueError, match="out of date|contains '### BEGIN SOLUTION'"):
        release.release(tmp_path / "out", root)
    assert not (tmp_path / "out").exists()


def test_it_never_writes_into_an_existing_folder_or_the_repository(tmp_path, capsys) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    assert main(["release", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="inside the repository"):
        release.release(ROOT / "handout", ROOT)
