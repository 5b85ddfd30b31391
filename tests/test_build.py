"""course_utils.build: student notebooks generated from solutions, rebuilt safely."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from course_utils import build
from course_utils.cli import main

CHAPTER = "01_logits_softmax_cross_entropy"

SOFTMAX = '''def softmax(logits, dim=-1):
    """Stable softmax along dim: (..., C) -> (..., C)."""
    ### BEGIN SOLUTION
    shifted = logits - logits.amax(dim=dim, keepdim=True)
    e = shifted.exp()
    return e / e.sum(dim=dim, keepdim=True)
    ### END SOLUTION
'''


def solution_notebook(softmax_source: str = SOFTMAX) -> nbformat.NotebookNode:
    """A one-exercise chapter in the authoring conventions, with outputs as if it had been run."""
    check = new_code_cell('cu.check("softmax", softmax)', execution_count=3)
    check.outputs = [new_output("stream", name="stdout", text="softmax: passed 11 checks\n")]
    cells = [
        new_markdown_cell("# Softmax\nWhy it matters: $p_i = e^{z_i} / \\sum_j e^{z_j}$."),
        new_markdown_cell(
            "Why subtract the max?\n<!-- BEGIN SOLUTION -->\nexp overflows.\n<!-- END SOLUTION -->"
        ),
        new_code_cell("import torch\nimport course_utils as cu", execution_count=1),
        new_code_cell(softmax_source, execution_count=2),
        check,
    ]
    for i, cell in enumerate(cells):
        cell.id = f"sol-{i}"
    nb = new_notebook(cells=cells)
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python", "version": "3.11.7"},
        "course": {"chapter": CHAPTER},
        "widgets": {"state": {"some": "view state"}},
    }
    return nb


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository with solutions/01_... and an empty course/, as the working directory."""
    (tmp_path / "solutions").mkdir()
    (tmp_path / "course").mkdir()
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    nbformat.write(solution_notebook(), tmp_path / "solutions" / f"{CHAPTER}.ipynb")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_build(repo: Path, **kwargs: bool) -> build.BuildResult:
    return build.build(repo / "solutions", repo / "course", **kwargs)


def student(repo: Path) -> nbformat.NotebookNode:
    return nbformat.read(repo / "course" / f"{CHAPTER}.ipynb", as_version=4)


def test_round_trip_stubs_outputs_banner_metadata(repo: Path) -> None:
    result = run_build(repo)
    assert result.ok and result.written == [repo / "course" / f"{CHAPTER}.ipynb"]
    nb = student(repo)
    banner = nb.cells[0].source
    assert "course build" in banner and f"solutions/{CHAPTER}.ipynb" in banner
    assert "never overwrites your edits" in banner
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "BEGIN SOLUTION" not in code and "amax" not in code
    assert '"""Stable softmax along dim: (..., C) -> (..., C)."""' in code, (
        "signature and docstring stay"
    )
    assert all(
        c.outputs == [] and c.execution_count is None for c in nb.cells if c.cell_type == "code"
    )
    assert "*Your answer here.*" in nb.cells[2].source and "overflows" not in nb.cells[2].source
    namespace: dict = {}
    exec(nb.cells[4].source, namespace)
    with pytest.raises(NotImplementedError, match=r"^softmax: "):
        namespace["softmax"](None)
    meta = nb.metadata
    assert meta["course"] == {
        "chapter": CHAPTER,
        "generated_from": f"solutions/{CHAPTER}.ipynb",
        "content_hash": build.content_hash(nb),
    }
    assert meta["kernelspec"]["name"] == "python3" and "widgets" not in meta
    assert [c.id for c in nb.cells] == ["course-banner", *(f"sol-{i}" for i in range(5))]
    nbformat.validate(nb)


def test_rebuild_is_byte_identical(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    target = repo / "course" / f"{CHAPTER}.ipynb"
    run_build(repo)
    first = target.read_bytes()
    again = run_build(repo)
    assert again.ok and again.written == [] and again.unchanged == [target]
    assert target.read_bytes() == first and first.endswith(b"}\n")
    elsewhere = tmp_path_factory.mktemp("other") / "course"
    build.build(repo / "solutions", elsewhere)
    assert (elsewhere / target.name).read_bytes() == first, "ids and hash do not depend on the run"


def test_check_reports_missing_stale_and_orphans(repo: Path) -> None:
    missing = run_build(repo, check=True)
    assert (
        not missing.ok
        and missing.missing
        and f"course/{CHAPTER}.ipynb is missing" in missing.errors[0]
    )
    assert not (repo / "course" / f"{CHAPTER}.ipynb").exists(), "--check writes nothing"
    run_build(repo)
    in_sync = run_build(repo, check=True)
    assert in_sync.ok and in_sync.messages == ["course/ is in sync with solutions/ (1 notebooks)"]

    nbformat.write(
        solution_notebook(SOFTMAX.replace("Stable", "Numerically stable")),
        repo / "solutions" / f"{CHAPTER}.ipynb",
    )
    nbformat.write(new_notebook(), repo / "course" / "99_orphan.ipynb")
    stale = run_build(repo, check=True)
    assert not stale.ok and stale.exit_code == 1
    assert stale.stale == [repo / "course" / f"{CHAPTER}.ipynb"]
    assert stale.orphans == [repo / "course" / "99_orphan.ipynb"]
    assert any("is stale" in line for line in stale.errors)
    assert any("99_orphan.ipynb has no solution" in line for line in stale.errors)


def test_check_compares_content_not_bytes(repo: Path) -> None:
    run_build(repo)
    target = repo / "course" / f"{CHAPTER}.ipynb"
    target.write_text(json.dumps(json.loads(target.read_text()), indent=4))
    assert run_build(repo, check=True).ok


def test_untouched_stale_notebook_is_overwritten(repo: Path) -> None:
    run_build(repo)
    nbformat.write(
        solution_notebook(SOFTMAX.replace("Stable", "Numerically stable")),
        repo / "solutions" / f"{CHAPTER}.ipynb",
    )
    result = run_build(repo)
    assert result.ok and result.written and not result.backups
    assert "Numerically stable" in student(repo).cells[4].source


def test_learner_edit_is_never_overwritten_without_force(repo: Path) -> None:
    target = repo / "course" / f"{CHAPTER}.ipynb"
    run_build(repo)
    nb = student(repo)
    nb.cells[4].source = nb.cells[4].source.replace(
        "raise NotImplementedError", "return logits.softmax(dim)  #"
    )
    nbformat.write(nb, target)
    edited = target.read_bytes()
    nbformat.write(
        solution_notebook(SOFTMAX.replace("Stable", "Numerically stable")),
        repo / "solutions" / f"{CHAPTER}.ipynb",
    )

    refused = run_build(repo)
    assert not refused.ok and refused.exit_code == 1 and refused.refused == [target]
    assert len(refused.errors) == 1 and "\n" not in refused.errors[0]
    assert f"course/{CHAPTER}.ipynb was edited" in refused.errors[0]
    assert target.read_bytes() == edited

    forced = run_build(repo, force=True)
    assert forced.ok and forced.written == [target] and len(forced.backups) == 1
    backup = forced.backups[0]
    assert backup.parent == repo / "course" / ".backups" and backup.name.startswith(f"{CHAPTER}-")
    assert backup.read_bytes() == edited
    assert any(str(backup.relative_to(repo)) in line for line in forced.messages)
    assert "Numerically stable" in student(repo).cells[4].source


def test_outputs_alone_are_not_an_edit_but_are_backed_up(repo: Path) -> None:
    target = repo / "course" / f"{CHAPTER}.ipynb"
    run_build(repo)
    nb = student(repo)
    nb.cells[5].execution_count = 1
    nb.cells[5].outputs = [new_output("stream", name="stdout", text="softmax: pending\n")]
    nbformat.write(nb, target)
    result = run_build(repo)
    assert result.ok and result.written == [target] and len(result.backups) == 1
    assert student(repo).cells[5].outputs == []


def test_what_running_writes_is_not_an_edit(repo: Path) -> None:
    """Jupyter writes timings, kernel and widget state when a learner runs the notebook."""
    target = repo / "course" / f"{CHAPTER}.ipynb"
    run_build(repo)
    nb = student(repo)
    nb.cells[3].metadata["ExecuteTime"] = {"start_time": "2026-01-01T10:00:00"}
    nb.cells[3].metadata["execution"] = {"iopub.status.busy": "2026-01-01T10:00:00"}
    nb.cells[3].metadata["tags"] = []
    nb.metadata["language_info"] = {"name": "python", "version": "3.12.1"}
    nb.metadata["kernelspec"]["display_name"] = "Python 3 (ipykernel)"
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nbformat.write(nb, target)
    ran = target.read_bytes()
    result = run_build(repo)
    assert result.ok and result.written == [target] and not result.refused
    assert len(result.backups) == 1 and result.backups[0].read_bytes() == ran
    assert "ExecuteTime" not in student(repo).cells[3].metadata


def learner_edit(nb: nbformat.NotebookNode, kind: str) -> None:
    """What a learner may change besides code: each must survive `course build`."""
    if kind == "notebook metadata":
        nb.metadata["authors"] = [{"name": "Ada"}]
    elif kind == "cell tags":
        nb.cells[4].metadata["tags"] = ["my-favourite"]
    elif kind == "cell metadata":
        nb.cells[4].metadata["jupyter"] = {"source_hidden": True}
    elif kind == "course metadata":
        nb.metadata["course"]["note"] = "ask about max-subtraction"
    elif kind == "cell type":
        nb.cells[2] = nbformat.v4.new_raw_cell(nb.cells[2].source, id=nb.cells[2].id)


@pytest.mark.parametrize(
    "kind", ["notebook metadata", "cell tags", "cell metadata", "course metadata", "cell type"]
)
def test_metadata_and_tag_edits_are_kept_and_backed_up(repo: Path, kind: str) -> None:
    target = repo / "course" / f"{CHAPTER}.ipynb"
    run_build(repo)
    nb = student(repo)
    learner_edit(nb, kind)
    nbformat.write(nb, target)
    edited = target.read_bytes()
    nbformat.write(
        solution_notebook(SOFTMAX.replace("Stable", "Numerically stable")),
        repo / "solutions" / f"{CHAPTER}.ipynb",
    )

    refused = run_build(repo)
    assert not refused.ok and refused.refused == [target] and not refused.backups
    assert f"course/{CHAPTER}.ipynb was edited" in refused.errors[0]
    assert target.read_bytes() == edited

    forced = run_build(repo, force=True)
    assert forced.ok and forced.written == [target] and len(forced.backups) == 1
    assert forced.backups[0].read_bytes() == edited
    assert "Numerically stable" in student(repo).cells[4].source
    assert run_build(repo).unchanged == [target], "the regenerated notebook is not an edit"


def test_unedited_notebook_is_regenerated_without_a_backup(repo: Path) -> None:
    target = repo / "course" / f"{CHAPTER}.ipynb"
    run_build(repo)
    nb = student(repo)
    assert build.content_hash(nb) == nb.metadata["course"]["content_hash"]
    # Another writer (Jupyter, nbformat) may split lines and order keys differently: no edit.
    target.write_text(json.dumps(json.loads(nbformat.writes(nb)), indent=2, sort_keys=False))
    nbformat.write(
        solution_notebook(SOFTMAX.replace("Stable", "Numerically stable")),
        repo / "solutions" / f"{CHAPTER}.ipynb",
    )
    result = run_build(repo)
    assert result.ok and result.written == [target] and not result.backups
    assert "Numerically stable" in student(repo).cells[4].source


def test_notebook_built_before_content_hash_is_judged_by_its_sources(repo: Path) -> None:
    """An older course_utils recorded only the sources' hash: untouched ones still rebuild."""
    target = repo / "course" / f"{CHAPTER}.ipynb"
    run_build(repo)

    def legacy(nb: nbformat.NotebookNode) -> None:
        del nb.metadata["course"]["content_hash"]
        nb.metadata["course"]["source_hash"] = build.source_hash(nb)
        nbformat.write(nb, target)

    legacy(student(repo))
    nbformat.write(
        solution_notebook(SOFTMAX.replace("Stable", "Numerically stable")),
        repo / "solutions" / f"{CHAPTER}.ipynb",
    )
    rebuilt = run_build(repo)
    assert rebuilt.ok and rebuilt.written == [target], "no refusal after an upgrade"
    assert len(rebuilt.backups) == 1, "a metadata edit cannot be ruled out: keep a copy"

    nb = student(repo)
    legacy(nb)
    nb.cells[4].source = "def softmax(logits, dim=-1):\n    return logits.softmax(dim)"
    nbformat.write(nb, target)
    assert run_build(repo).refused == [target], "a source edit is still refused"


def test_malformed_solution_is_one_line_and_others_still_build(repo: Path) -> None:
    (repo / "solutions" / "02_broken.ipynb").write_text('{"cells": [')
    result = run_build(repo)
    assert result.exit_code == 1 and len(result.errors) == 1
    assert result.errors[0].startswith("solutions/02_broken.ipynb: not a notebook: invalid JSON")
    assert "\n" not in result.errors[0]
    assert (repo / "course" / f"{CHAPTER}.ipynb").exists()
    assert not (repo / "course" / "02_broken.ipynb").exists()


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "def f():\n    ### BEGIN SOLUTION\n    return 1\n",
            "cell 4, line 2: '### BEGIN SOLUTION' is never closed",
        ),
        (
            "def f():\n    return 1\n    ### END SOLUTION\n",
            "cell 4, line 3: '### END SOLUTION' with no",
        ),
        (
            "def f():\n    ### BEGIN SOLUTION\n    ### BEGIN SOLUTION\n    ### END SOLUTION\n",
            "cell 4, line 3: '### BEGIN SOLUTION' inside the region opened on line 2",
        ),
    ],
)
def test_unbalanced_markers_name_notebook_and_cell(repo: Path, source: str, expected: str) -> None:
    nbformat.write(solution_notebook(source), repo / "solutions" / f"{CHAPTER}.ipynb")
    result = run_build(repo)
    assert not result.ok and len(result.errors) == 1
    assert result.errors[0].startswith(f"solutions/{CHAPTER}.ipynb: {expected}")
    assert not (repo / "course" / f"{CHAPTER}.ipynb").exists()


def test_stub_names_the_enclosing_function_and_keeps_indentation() -> None:
    source = (
        "class Norm:\n"
        "    def forward(self, x):\n"
        '        """Doc\nwith a line at column 0.\n        """\n'
        "        ### BEGIN SOLUTION\n"
        "        return x\n"
        "        ### END SOLUTION\n"
        "\n"
        "### BEGIN SOLUTION\n"
        "y = 1\n"
        "### END SOLUTION\n"
    )
    out = build.strip_code(source)
    assert '        raise NotImplementedError("Norm.forward: replace this line' in out
    assert "\n# YOUR CODE HERE\nraise NotImplementedError(" in out
    assert "return x" not in out and "y = 1" not in out
    magic = build.strip_code(
        "%timeit 1\ndef g():\n    ### BEGIN SOLUTION\n    pass\n    ### END SOLUTION\n"
    )
    assert 'raise NotImplementedError("g: ' in magic


def test_markdown_regions_must_balance() -> None:
    assert (
        build.strip_markdown("a <!-- BEGIN SOLUTION -->b<!-- END SOLUTION --> c")
        == "a *Your answer here.* c"
    )
    with pytest.raises(ValueError, match="never closed"):
        build.strip_markdown("<!-- BEGIN SOLUTION -->b", "nb: cell 2")


def test_find_repo_root_walks_up(repo: Path) -> None:
    deep = repo / "course" / "sub"
    deep.mkdir()
    assert build.find_repo_root(deep) == repo
    assert build.find_repo_root(repo.parent) == repo.parent


def test_cli_build_and_check(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", "--check"]) == 1
    assert capsys.readouterr().err.startswith("course: error: course/")
    assert main(["build"]) == 0
    assert f"wrote course/{CHAPTER}.ipynb" in capsys.readouterr().out
    assert main(["build", "--check"]) == 0
    assert capsys.readouterr().out == "course/ is in sync with solutions/ (1 notebooks)\n"
    assert main(["build", "--check", "--force"]) == 2
    assert main(["build", "--solutions", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "nowhere: no such folder" in err and "Traceback" not in err
