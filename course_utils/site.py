"""``course site OUT``: the solution notebooks, run and rendered to a static HTML site.

Each solution notebook is executed in a scratch copy of its folder (strict mode, as CI runs
it), so the pages carry fresh outputs and the repository is never written to; it is then
rendered with nbconvert's HTML exporter, every image embedded in the page. An index lists
the chapters in order with their exercises and links to each chapter's page and its student
notebook (copied into the site, outputs cleared). Every page gets a navigation line. The
finished site is verified: every chapter page exists, every image is embedded, and every
internal link and anchor resolves; a problem fails the build with one line each.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import html
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import nbformat

from . import __version__, build
from .release import SOLUTION_MARKERS, clean_copy

#: A file that marks a folder as a site this command wrote (and may write again).
MARKER = ".course-site"
INDEX = "index.html"
STUDENT_DIR = "course"

_CHAPTER_LINK = re.compile(r"\]\((\d\d_[A-Za-z0-9_]+)\.ipynb(#[^)\s]*)?\)")


class SiteError(ValueError):
    """A site that could not be built: one line saying why."""


def chapters(root: Path) -> list[Path]:
    """The solution notebooks of the repository at ``root``, in chapter order."""
    found = sorted((root / "solutions").glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise FileNotFoundError(f"{root / 'solutions'}: no chapter notebooks (NN_slug.ipynb)")
    return found


def title(nb: nbformat.NotebookNode, fallback: str) -> str:
    """The chapter's title: the first markdown heading, without its number prefix."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return re.sub(r"^(Chapter\s+)?\d+\s*[·:.\-—]\s*", "", line[2:]).strip()
    return fallback


def execute(path: Path, timeout: int = 600) -> nbformat.NotebookNode:
    """Run a solution notebook top to bottom in strict mode, in a scratch copy of its folder."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    from .kernel import client_options

    nb = build.read_notebook(path)
    # Figures must come back as images whatever backend the caller's environment names.
    os.environ.update(
        COURSE_STRICT="1",
        COURSE_PROGRESS="0",
        OMP_NUM_THREADS="1",
        MPLBACKEND="module://matplotlib_inline.backend_inline",
    )
    with tempfile.TemporaryDirectory(prefix="course_site_") as scratch:
        work = Path(scratch) / path.parent.name
        # Notebooks may write files next to themselves (scripts for torchrun, caches).
        shutil.copytree(path.parent, work, ignore=shutil.ignore_patterns("*.ipynb", ".*"))
        client = NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(work)}},
            **client_options(),
        )
        try:
            # The kernel's own log (transport warnings) would break up the progress bar.
            client.execute(stderr=subprocess.DEVNULL)
        except CellTimeoutError:
            raise SiteError(f"{path.name}: a cell ran longer than {timeout} s") from None
        except CellExecutionError as err:
            last = [line for line in str(err).strip().splitlines() if line.strip()]
            raise SiteError(f"{path.name}: a cell failed: {last[-1] if last else err}") from None
    return nb


def _strip_markers(nb: nbformat.NotebookNode) -> None:
    # The pages show the solutions as code; the markers are for the build, not the reader.
    for cell in nb.cells:
        lines = cell.source.splitlines()
        kept = [line for line in lines if not line.strip().startswith(SOLUTION_MARKERS)]
        if len(kept) != len(lines):
            cell.source = "\n".join(kept)


def _relink(nb: nbformat.NotebookNode) -> None:
    # A link to another chapter's notebook goes to that chapter's page.
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = _CHAPTER_LINK.sub(lambda m: f"]({m[1]}.html{m[2] or ''})", cell.source)


def _nav(pages: list[tuple[str, str]], i: int) -> str:
    stem, name = pages[i]
    parts = [f"[Course index]({INDEX})", f"[Student notebook]({STUDENT_DIR}/{stem}.ipynb)"]
    if i > 0:
        parts.insert(1, f"[← {pages[i - 1][1]}]({pages[i - 1][0]}.html)")
    if i + 1 < len(pages):
        parts.append(f"[{pages[i + 1][1]} →]({pages[i + 1][0]}.html)")
    return (
        " · ".join(parts)
        + f"\n\n*Chapter {stem[:2]}: {name}. Rendered from `solutions/{stem}.ipynb`.*"
    )


def render(nb: nbformat.NotebookNode, nav: str) -> str:
    """The chapter page: navigation, then the notebook with its outputs, images embedded."""
    from nbconvert import HTMLExporter

    nb = nbformat.from_dict(nb)
    _strip_markers(nb)
    _relink(nb)
    nb.cells.insert(0, nbformat.v4.new_markdown_cell(nav))
    nb.cells.append(nbformat.v4.new_markdown_cell(nav.split("\n\n")[0]))
    exporter = HTMLExporter(template_name="lab", embed_images=True)
    body, _ = exporter.from_notebook_node(nb)
    return body


def _exercise_ids(stem: str) -> list[str]:
    from .checking import exercises

    return [e.id for e in exercises(stem[:2])]


def _index(rows: list[dict[str, Any]], executed: bool) -> str:
    when = datetime.date.today().isoformat()
    how = "with outputs from a fresh run" if executed else "without running them (no outputs)"
    lines = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>Deep-learning internals, derived by hand and verified by machine</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;"
        "padding:0 1rem;line-height:1.5}table{border-collapse:collapse;width:100%}"
        "td,th{border-bottom:1px solid #ddd;padding:.4rem;text-align:left;vertical-align:top}"
        "code{font-size:.85em}</style>",
        "</head><body>",
        "<h1>Deep-learning internals, derived by hand and verified by machine</h1>",
        "<p>Every chapter derives one topic, has the learner implement it, checks the work "
        "with <code>course_utils</code>, then explores it. These pages are the complete "
        "chapters (the solutions) "
        f"{how}; each links to its student notebook, where the exercises are left to you.</p>",
        "<table><thead><tr><th>#</th><th>Chapter</th><th>What you implement</th>"
        "<th>Student notebook</th></tr></thead><tbody>",
    ]
    for row in rows:
        ids = ", ".join(f"<code>{html.escape(i)}</code>" for i in row["exercises"]) or "—"
        lines.append(
            f'<tr id="ch{row["stem"][:2]}"><td>{row["stem"][:2]}</td>'
            f'<td><a href="{row["stem"]}.html">{html.escape(row["title"])}</a></td>'
            f"<td>{ids}</td>"
            f'<td><a href="{STUDENT_DIR}/{row["stem"]}.ipynb" download>{row["stem"]}.ipynb</a>'
            "</td></tr>"
        )
    lines += [
        "</tbody></table>",
        f"<p><small>Built {when} by <code>course site</code> (course_utils {__version__}).</small></p>",
        "</body></html>",
    ]
    return "\n".join(lines) + "\n"


def _prepare(out: Path) -> None:
    # Never write over something this command did not write: the folder is new, empty, or ours.
    if out.exists():
        if not out.is_dir():
            raise SiteError(f"{out} exists and is not a folder")
        if any(out.iterdir()) and not (out / MARKER).exists():
            raise SiteError(
                f"{out} is not empty and not a site `course site` wrote; give a new folder"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by `course site`; rebuilt on every run\n")


def _page(path: str, nav: str, execute_it: bool, timeout: int) -> str:
    nb = execute(Path(path), timeout) if execute_it else build.read_notebook(Path(path))
    return render(nb, nav)


def build_site(
    out: Path,
    root: Path | None = None,
    *,
    only: list[str] | None = None,
    execute_notebooks: bool = True,
    jobs: int = 1,
    timeout: int = 600,
    progress: bool = True,
) -> list[Path]:
    """Build the site into ``out``; the pages written. ``SiteError`` (one line) if it fails its checks."""
    root = build.find_repo_root() if root is None else root
    paths = chapters(root)
    if only:
        wanted = {n.zfill(2) for n in only}
        unknown = wanted - {p.name[:2] for p in paths}
        if unknown:
            raise SiteError(f"no chapter {', '.join(sorted(unknown))} in {root / 'solutions'}")
        paths = [p for p in paths if p.name[:2] in wanted]
    out = Path(out).resolve()
    if out == root.resolve() or root.resolve() in out.parents:
        raise SiteError(f"{out} is inside the repository; give a folder outside it")
    # Everything that can be wrong with the inputs fails here, before anything runs.
    pages = [(p.stem, title(build.read_notebook(p), p.stem)) for p in paths]
    for p in paths:
        if not (root / "course" / p.name).exists():
            raise SiteError(f"{root / 'course' / p.name} is missing; run `course build`")
    _prepare(out)

    written = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {
            pool.submit(_page, str(p), _nav(pages, i), execute_notebooks, timeout): p
            for i, p in enumerate(paths)
        }
        done = concurrent.futures.as_completed(futures)
        if progress:
            from tqdm.auto import tqdm

            desc = "running and rendering" if execute_notebooks else "rendering"
            done = tqdm(done, total=len(futures), desc=desc, unit="chapter")
        for future in done:
            path = futures[future]
            page = out / f"{path.stem}.html"
            page.write_text(future.result(), encoding="utf-8")
            written.append(page)
    (out / STUDENT_DIR).mkdir()
    for path in paths:
        clean_copy(root / "course" / path.name, out / STUDENT_DIR / path.name)
    rows = [{"stem": s, "title": t, "exercises": _exercise_ids(s)} for s, t in pages]
    (out / INDEX).write_text(_index(rows, execute_notebooks), encoding="utf-8")
    problems = verify(out, [p.stem for p in paths])
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise SiteError(f"the site in {out} failed its check: {problems[0]}{more}")
    return sorted(written)


class _Links(HTMLParser):
    """The images, links and element ids of one page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.images: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and "name" in a:
            self.ids.add(a["name"])
        if tag == "img":
            self.images.append(a.get("src", ""))
        elif tag == "a" and "href" in a:
            self.links.append(a["href"])


def _external(url: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", url)) or url.startswith("//")


def verify(out: Path, stems: list[str]) -> list[str]:
    """What is wrong with the site in ``out``: missing pages, images not embedded, broken links."""
    problems = []
    pages = {p.name: p for p in out.glob("*.html")}
    for stem in stems:
        if f"{stem}.html" not in pages:
            problems.append(f"no page for chapter {stem}")
        if not (out / STUDENT_DIR / f"{stem}.ipynb").exists():
            problems.append(f"no student notebook for chapter {stem}")
    if INDEX not in pages:
        problems.append("no index.html")
    parsed = {}
    for name, page in sorted(pages.items()):
        p = _Links()
        p.feed(page.read_text(encoding="utf-8"))
        parsed[name] = p
    for name, p in parsed.items():
        for src in p.images:
            if not src.startswith("data:image/"):
                problems.append(f"{name}: an image is not embedded ({src[:60] or 'no src'})")
        for href in p.links:
            if _external(href) or href == "":
                continue
            target, _, anchor = href.partition("#")
            if target and not (out / target).is_file():
                problems.append(f"{name}: broken link {href}")
                continue
            on = parsed.get(target or name)  # anchors are judged on the site's own pages
            if anchor and on is not None and anchor not in on.ids:
                problems.append(f"{name}: link {href} names no anchor on its page")
    return problems
