"""course site: every chapter page exists, every image is embedded, no internal link is broken."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from course_utils import site
from course_utils.cli import main

ROOT = Path(__file__).resolve().parents[1]

PLOT = """\
import matplotlib.pyplot as plt
plt.plot([0, 1, 4, 9])
plt.title("a plot")
plt.show()"""


def tiny_repo(tmp_path: Path, *code: str) -> Path:
    """A repository with two chapters; the first runs ``code`` and links to the second."""
    root = tmp_path / "repo"
    for folder in ("solutions", "course"):
        (root / folder).mkdir(parents=True)
    first = nbformat.v4.new_notebook()
    first.cells = [
        nbformat.v4.new_markdown_cell(
            "# 00 · A first chapter\n\n## Why this matters\n\n"
            "See [the next chapter](01_second.ipynb) and [why](#Why-this-matters)."
        ),
        *(nbformat.v4.new_code_cell(c) for c in code),
    ]
    second = nbformat.v4.new_notebook()
    second.cells = [nbformat.v4.new_markdown_cell("# 01 · The second chapter")]
    for name, nb in (("00_first.ipynb", first), ("01_second.ipynb", second)):
        nbformat.write(nb, root / "solutions" / name)
        nbformat.write(nb, root / "course" / name)
    return root


def images(page: Path) -> list[str]:
    return re.findall(r"<img[^>]*src=\"([^\"]*)\"", page.read_text(encoding="utf-8"))


@pytest.mark.slow
def test_every_chapter_of_the_course_gets_a_page_in_order_with_its_student_notebook(
    tmp_path: Path,
) -> None:
    out = tmp_path / "site"
    pages = site.build_site(out, ROOT, execute_notebooks=False, jobs=2, progress=False)
    stems = [p.stem for p in site.chapters(ROOT)]
    assert [p.stem for p in pages] == stems
    index = (out / "index.html").read_text(encoding="utf-8")
    positions = [index.index(f'href="{s}.html"') for s in stems]
    assert positions == sorted(positions), "the index lists the chapters in chapter order"
    for stem in stems:
        assert f'href="course/{stem}.ipynb"' in index
        student = nbformat.read(out / "course" / f"{stem}.ipynb", as_version=4)
        assert not any(c.get("outputs") for c in student.cells if c.cell_type == "code")
        page = (out / f"{stem}.html").read_text(encoding="utf-8")
        assert "BEGIN SOLUTION" not in page and "Course index" in page
    assert site.verify(out, stems) == []


def test_an_executed_chapter_embeds_its_plot_and_links_across_chapters(tmp_path: Path) -> None:
    out = tmp_path / "site"
    site.build_site(out, tiny_repo(tmp_path, PLOT, "print(6 * 7)"), jobs=1, progress=False)
    page = out / "00_first.html"
    srcs = images(page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    text = page.read_text(encoding="utf-8")
    assert "42" in text
    assert 'href="01_second.html"' in text and "01_second.ipynb)" not in text
    assert "The second chapter →" in text
    assert site.verify(out, ["00_first", "01_second"]) == []


def test_a_failing_cell_fails_the_build_in_one_line_naming_the_notebook(tmp_path: Path) -> None:
    repo = tiny_repo(tmp_path, "raise RuntimeError('the model diverged')")
    with pytest.raises(site.SiteError) as err:
        site.build_site(tmp_path / "site", repo, jobs=1, progress=False)
    assert str(err.value).startswith("00_first.ipynb: a cell failed")
    assert "the model diverged" in str(err.value) and "\n" not in str(err.value)


def test_the_check_finds_a_missing_page_an_image_not_embedded_and_broken_links(
    tmp_path: Path,
) -> None:
    out = tmp_path / "site"
    site.build_site(out, tiny_repo(tmp_path, "1"), execute_notebooks=False, progress=False)
    assert site.verify(out, ["00_first", "01_second"]) == []
    (out / "01_second.html").unlink()
    page = out / "00_first.html"
    planted = '<img src="figure.png"><a href="nowhere.html">x</a><a href="#no-such-anchor">y</a>'
    page.write_text(page.read_text(encoding="utf-8").replace("</body>", planted + "</body>"))
    problems = site.verify(out, ["00_first", "01_second"])
    assert "no page for chapter 01_second" in problems
    assert "00_first.html: an image is not embedded (figure.png)" in problems
    assert "00_first.html: broken link nowhere.html" in problems
    assert "00_first.html: broken link 01_second.html" in problems
    assert "00_first.html: link #no-such-anchor names no anchor on its page" in problems


def test_it_never_writes_over_a_folder_it_did_not_write(tmp_path: Path, capsys) -> None:
    repo = tiny_repo(tmp_path, "1")
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("keep me")
    with pytest.raises(site.SiteError, match="not a site `course site` wrote"):
        site.build_site(mine, repo, execute_notebooks=False, progress=False)
    assert (mine / "todo.txt").read_text() == "keep me"
    with pytest.raises(site.SiteError, match="inside the repository"):
        site.build_site(repo / "site", repo, execute_notebooks=False, progress=False)
    out = tmp_path / "site"
    site.build_site(out, repo, execute_notebooks=False, progress=False)
    site.build_site(out, repo, execute_notebooks=False, progress=False)  # its own: rebuilt
    assert (out / "index.html").exists()


def test_bad_input_is_one_line_from_the_command(tmp_path: Path, capsys, monkeypatch) -> None:
    repo = tiny_repo(tmp_path, "1")
    (repo / "solutions" / "01_second.ipynb").write_text("{not json")
    monkeypatch.chdir(repo)
    assert main(["site", str(tmp_path / "site"), "--no-execute"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("course: error: ") and "01_second.ipynb: not a notebook" in err
    assert "\n" not in err
    assert main(["site", str(tmp_path / "site"), "--only", "07"]) == 2
    assert "no chapter 07" in capsys.readouterr().err
