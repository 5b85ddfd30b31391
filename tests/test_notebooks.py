"""The chapter notebooks themselves: in sync, on template, no solutions in course/.

nbval executes every notebook in the same test run (solutions strict, course learn), and
course_utils.nbval_mode fails any course/ check cell whose exercise is not pending, so an
untouched student notebook is proven to run with every stub raising NotImplementedError.
"""

import ast
import re
from pathlib import Path

import nbformat
import pytest

import course_utils as cu
from course_utils.build import build

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))
COURSE = sorted((ROOT / "course").glob("[0-9][0-9]_*.ipynb"))
SECTIONS = [
    "## 1. Why this matters",
    "## 2. Derivation",
    "## 3. Implement and check",
    "## 4. Explore",
    "## 5. Exercises",
    "## 6. Summary and further reading",
]


def _ids(paths):
    return [p.stem for p in paths]


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_there_are_chapters():
    assert SOLUTIONS, "no solution notebooks found"
    assert [p.name for p in SOLUTIONS] == [p.name for p in COURSE]


def test_course_is_in_sync_with_solutions():
    result = build(ROOT / "solutions", ROOT / "course", check=True)
    assert result.ok, "\n".join(result.errors + result.messages) + "\nrun `course build`"


@pytest.mark.parametrize("path", SOLUTIONS, ids=_ids(SOLUTIONS))
def test_solution_follows_the_template(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata["course"]["chapter"] == path.stem
    assert nb.metadata["kernelspec"]["name"] == "python3"
    headings = [
        line.strip()
        for c in nb.cells
        if c.cell_type == "markdown"
        for line in c.source.splitlines()
        if line.startswith("## ")
    ]
    positions = []
    for section in SECTIONS:
        assert section in headings, f"{path.name} lacks the section {section!r}"
        positions.append(headings.index(section))
    assert positions == sorted(positions), f"{path.name}: sections out of order"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")


@pytest.mark.parametrize("path", SOLUTIONS, ids=_ids(SOLUTIONS))
def test_solution_has_no_stored_outputs_and_no_tolerated_errors(path):
    nb = nbformat.read(path, as_version=4)
    for cell in _code(nb):
        assert not cell.outputs, f"{path.name}: a code cell has stored outputs (clear them)"
        assert "raises-exception" not in cell.metadata.get("tags", []), (
            f"{path.name}: a cell is tagged raises-exception, which hides failing checks"
        )


@pytest.mark.parametrize("path", SOLUTIONS, ids=_ids(SOLUTIONS))
def test_every_exercise_is_implemented_then_checked(path):
    nb = nbformat.read(path, as_version=4)
    sources = [c.source for c in _code(nb)]
    for ex in cu.exercises():
        if ex.chapter != path.stem:
            continue
        names = [ex.id] + re.findall(r"class\s+(\w+)", ex.signature)
        defining = [
            i
            for i, s in enumerate(sources)
            if "### BEGIN SOLUTION" in s
            and any(re.search(rf"^(def|class) {n}\b", s, re.M) for n in names)
        ]
        assert defining, f"{path.name}: no exercise cell defines {ex.id}"
        checking = [
            i for i, s in enumerate(sources) if re.search(rf"cu\.check\(\s*['\"]{ex.id}['\"]", s)
        ]
        assert checking and checking[0] > defining[0], (
            f"{path.name}: {ex.id} is not checked after it is defined"
        )
        assert checking[0] == defining[0] + 1, (
            f"{path.name}: the check of {ex.id} should follow its cell"
        )


@pytest.mark.parametrize("path", COURSE, ids=_ids(COURSE))
def test_student_notebook_is_generated_and_has_no_solutions(path):
    nb = nbformat.read(path, as_version=4)
    assert "generated" in nb.cells[0].source.lower()
    assert nb.metadata["course"]["generated_from"] == f"solutions/{path.name}"
    for cell in nb.cells:
        assert "BEGIN SOLUTION" not in cell.source
        if cell.cell_type == "code":
            assert not cell.outputs


@pytest.mark.parametrize("path", SOLUTIONS, ids=_ids(SOLUTIONS))
def test_no_hidden_answer_is_a_gradable_exercise(path):
    """Code in an exercise's hidden answer never defines something a graded check would pass."""
    graded = {e.id for e in cu.exercises()} | {
        m.group(1) for e in cu.exercises() if (m := re.match(r"class (\w+)", e.signature))
    }
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        for answer in re.findall(r"<details>(.*?)</details>", cell.source, re.S):
            for code in re.findall(r"```python\n(.*?)```", answer, re.S):
                for node in ast.walk(ast.parse(code)):
                    if isinstance(node, ast.ClassDef | ast.FunctionDef):
                        assert node.name not in graded, f"{path.name}: answer defines {node.name}"
                    if isinstance(node, ast.ClassDef):
                        bases = " ".join(ast.unparse(b) for b in node.bases)
                        assert "Function" not in bases and "Module" not in bases, (
                            f"{path.name}: a hidden answer defines the class {node.name}({bases}), "
                            "which a class exercise's check could pass"
                        )
