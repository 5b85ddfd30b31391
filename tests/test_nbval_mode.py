"""course_utils.nbval_mode: the kernel of a solutions/ notebook is strict, of a course/ one is not."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from course_utils import run_order
from course_utils.build import is_long
from course_utils.nbval_mode import pytest_collection_modifyitems, strict_value


def test_strict_value_by_nearest_folder() -> None:
    assert strict_value(Path("repo/solutions/01_x.ipynb")) == "1"
    assert strict_value(Path("repo/course/01_x.ipynb")) == "0"
    assert strict_value(Path("course/solutions/01_x.ipynb")) == "1"
    assert strict_value(Path("repo/tests/test_x.py")) is None
    assert strict_value(Path("repo/notes/01_x.ipynb")) is None


def test_long_notebooks_run_first_and_the_rest_keep_their_order(tmp_path: Path) -> None:
    paths = {}
    for name, long in (("01_short", False), ("02_long", True), ("03_short", False)):
        nb = new_notebook(metadata={"course": {"long": True}} if long else {})
        paths[name] = tmp_path / f"{name}.ipynb"
        nbformat.write(nb, paths[name])
    (tmp_path / "broken.ipynb").write_text("{not json")
    assert is_long(paths["02_long"]) and not is_long(paths["01_short"])
    assert not is_long(tmp_path / "broken.ipynb") and not is_long(tmp_path / "missing.ipynb")
    order = [
        tmp_path / "test_a.py",
        paths["01_short"],
        paths["02_long"],
        paths["02_long"],
        tmp_path / "broken.ipynb",
        paths["03_short"],
    ]
    items = [
        type("Item", (), {"path": p, "n": i, "nodeid": f"{p.name}::{i}"})()
        for i, p in enumerate(order)
    ]
    config = type("Config", (), {"rootpath": tmp_path})()  # no .ci/durations.json there
    pytest_collection_modifyitems(config, items)
    assert [item.n for item in items] == [2, 3, 0, 1, 4, 5]


def test_recorded_durations_order_the_files_longest_first_and_new_ones_before_them(
    tmp_path: Path,
) -> None:
    report = tmp_path / "run.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_quick" name="a" time="1.0"/>'
        '<testcase classname="tests.test_slow" name="a" time="20.0"/>'
        '<testcase classname="tests.test_quick" name="b" time="2.5"/>'
        '<testcase classname="solutions.17_ppo.ipynb" name="Cell 0" time="30.0"/>'
        '<testcase classname="solutions.17_ppo.ipynb" name="Cell 1" time="40.0"/>'
        "</testsuite></testsuites>"
    )
    assert run_order.main([str(report), "--root", str(tmp_path)]) == 0
    assert run_order.load_durations(tmp_path) == {
        "solutions.17_ppo.ipynb": 70.0,
        "tests.test_quick": 3.5,
        "tests.test_slow": 20.0,
    }
    nodeids = [
        "tests/test_quick.py::a",
        "tests/test_new.py::a",
        "tests/test_slow.py::a",
        "solutions/17_ppo.ipynb::Cell 0",
        "tests/test_quick.py::b[1]",
        "solutions/17_ppo.ipynb::Cell 1",
        "tests/test_new.py::b",
    ]
    items = [
        type("Item", (), {"path": tmp_path / n.split("::")[0], "nodeid": n})() for n in nodeids
    ]
    config = type("Config", (), {"rootpath": tmp_path})()
    pytest_collection_modifyitems(config, items)
    assert [item.nodeid for item in items] == [
        "tests/test_new.py::a",
        "tests/test_new.py::b",
        "solutions/17_ppo.ipynb::Cell 0",
        "solutions/17_ppo.ipynb::Cell 1",
        "tests/test_slow.py::a",
        "tests/test_quick.py::a",
        "tests/test_quick.py::b[1]",
    ]


def test_a_bad_report_or_table_is_one_line_or_ignored(tmp_path: Path, capsys) -> None:
    (tmp_path / "bad.xml").write_text("<testsuites><testsuite")
    with pytest.raises(SystemExit) as info:
        run_order.main([str(tmp_path / "bad.xml"), "--root", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot read the JUnit XML report") and "\n" not in err
    (tmp_path / ".ci").mkdir()
    (tmp_path / ".ci" / "durations.json").write_text("[1, 2")
    assert run_order.load_durations(tmp_path) == {}


@pytest.mark.slow
def test_kernels_see_the_mode_and_other_tests_do_not(tmp_path: Path) -> None:
    for folder, want in (("solutions", "1"), ("course", "0")):
        source = (
            "import os\n"
            f"assert os.environ.get('COURSE_STRICT') == {want!r}, os.environ.get('COURSE_STRICT')\n"
            "assert os.environ.get('MPLBACKEND') == 'Agg'"
        )
        # a repeated experiment: run in solutions/, skipped in course/
        repeat = new_code_cell(
            "open('repeat_ran', 'w').close()", metadata={"course": {"repeat": "the run above"}}
        )
        (tmp_path / folder).mkdir()
        nbformat.write(
            new_notebook(cells=[new_code_cell(source), repeat]), tmp_path / folder / "01_x.ipynb"
        )
    (tmp_path / "test_after.py").write_text(
        "import os\n\ndef test_env_restored():\n    assert 'COURSE_STRICT' not in os.environ\n"
    )
    # Its own folder as rootdir, so the repository's addopts (-n 2, testpaths) do not apply.
    env = {k: v for k, v in os.environ.items() if k not in ("COURSE_STRICT", "MPLBACKEND")}
    plugins = ["-p", "course_utils.nbval_mode", "-p", "no:cacheprovider", "-p", "no:xdist"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            *plugins,
            "--nbval-lax",
            "-rs",
            "solutions",
            "course",
            "test_after.py",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "4 passed, 1 skipped" in done.stdout
    assert "course/01_x.ipynb: repeats the run above; CI runs it in solutions/" in done.stdout
    assert (tmp_path / "solutions" / "repeat_ran").exists()
    assert not (tmp_path / "course" / "repeat_ran").exists()


def test_a_repeat_skipped_in_a_student_notebook_is_its_solution_cell_and_calls_no_exercise() -> (
    None
):
    """What CI leaves out of a student notebook must be run, unchanged, in its solution twin."""
    from course_utils import checking
    from course_utils.nbval_mode import repeat_reason

    root = Path(__file__).resolve().parents[1]
    marked = 0
    for path in sorted((root / "course").glob("[0-9][0-9]_*.ipynb")):
        student = nbformat.read(path, as_version=4)
        solution = nbformat.read(root / "solutions" / path.name, as_version=4)
        twins = {c.source: c for c in solution.cells if repeat_reason(c)}
        ids = [e.id for e in checking.exercises(path.name[:2])]
        code = [c for c in student.cells if c.cell_type == "code"]
        for n, cell in enumerate(code):
            if not repeat_reason(cell):
                continue
            marked += 1
            where = f"{path.name}, code cell {n}"
            assert n > 0 and not repeat_reason(code[0]), where
            assert cell.source in twins, f"{where}: not its solution cell, or not marked there"
            assert "cu.check" not in cell.source, f"{where}: a check cell is never skipped"
            called = [i for i in ids if re.search(rf"\b{i}\b", cell.source)]
            assert not called, f"{where} names the exercise {called}: it would skip learner code"
        for cell in student.cells:
            assert cell.cell_type == "code" or not repeat_reason(cell), path.name
    assert marked >= 1  # the rule is in use, so this test can fail


@pytest.mark.slow
def test_a_course_stub_that_does_not_raise_fails_its_check_cell(tmp_path: Path) -> None:
    setup = "import torch\nimport course_utils as cu"
    stub = 'def softmax(logits, dim=-1):\n    raise NotImplementedError("softmax: write me")'
    leaked = (
        "def softmax(logits, dim=-1):\n"
        "    e = (logits - logits.amax(dim, keepdim=True)).exp()\n"
        "    return e / e.sum(dim, keepdim=True)"
    )
    check = 'cu.check("softmax", softmax)'
    (tmp_path / "course").mkdir()
    for name, body in (("01_honest", stub), ("01_leaked", leaked)):
        cells = [new_code_cell(setup), new_code_cell(body), new_code_cell(check)]
        nbformat.write(new_notebook(cells=cells), tmp_path / "course" / f"{name}.ipynb")
    env = {k: v for k, v in os.environ.items() if k not in ("COURSE_STRICT", "MPLBACKEND")}
    plugins = ["-p", "course_utils.nbval_mode", "-p", "no:cacheprovider", "-p", "no:xdist"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *plugins, "--nbval-lax", "-rf", "course"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = done.stdout
    assert done.returncode == 1, out[-3000:] + done.stderr[-2000:]
    assert "1 failed, 5 passed" in out
    assert "01_leaked.ipynb" in out and "did not report pending" in out
