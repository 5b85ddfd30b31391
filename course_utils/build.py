"""Generate the student notebooks ``course/NN_slug.ipynb`` from ``solutions/NN_slug.ipynb``.

Authoring conventions for a solution notebook (the single source of chapter NN):
name it ``solutions/NN_slug.ipynb`` and set its notebook metadata
``{"course": {"chapter": "NN_slug"}}``; write one exercise per code cell, as a
function (or class) named by its exercise id with the contract's signature and a
docstring giving shapes, and put the code a learner must write between a line
``### BEGIN SOLUTION`` and a line ``### END SOLUTION`` (nbgrader's markers, indented
like the code they enclose; a region is never nested in another). ``course build``
replaces each region by ``raise NotImplementedError("<function>: ...")`` at the
marker's indentation, so keep the signature and docstring outside it. Follow each
exercise cell with a check cell ``cu.check("softmax", softmax)``; in the student
copy it reports "pending" until the learner writes the function. Answers in
markdown cells go between ``<!-- BEGIN SOLUTION -->`` and ``<!-- END SOLUTION -->``
and become "*Your answer here.*". Outputs are never copied. Run ``course build``
after editing a solution and commit both notebooks; ``course build --check`` (CI)
fails when they disagree. A code cell that repeats an earlier experiment with other
settings (an ablation, a sweep) may carry the cell metadata ``{"course": {"repeat":
"<what it repeats>"}}``: CI then runs it in the solution notebook only (see
``course_utils.nbval_mode``).

A student notebook records ``course.content_hash`` (see ``content_hash``): any change a
learner makes to a cell's source, type, attachments or metadata (tags included), or to
the notebook metadata, makes ``course build`` refuse to overwrite it without ``--force``,
which keeps a backup in ``course/.backups/``. What running writes (outputs, execution
counts, timings, kernel and widget state) is not an edit: such a notebook is regenerated,
after a backup, since running it again gives it back.
"""

from __future__ import annotations

import ast
import copy
import datetime as dt
import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
from nbformat.v4.rwbase import rejoin_lines

BANNER_ID = "course-banner"
STUB_HINT = "replace this line with your implementation (see the derivation above)"
ANSWER_STUB = "*Your answer here.*"

_BEGIN = re.compile(r"^([ \t]*)### BEGIN SOLUTION[ \t]*$")
_END = re.compile(r"^[ \t]*### END SOLUTION[ \t]*$")
_DEF = re.compile(r"^([ \t]*)(?:async[ \t]+)?(?:def|class)[ \t]+(\w+)")
_MD_MARKER = re.compile(r"<!--[ \t]*(BEGIN|END) SOLUTION[ \t]*-->")
_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_CELL_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def show(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (for messages)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def find_repo_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: cwd) with pyproject.toml and solutions/."""
    here = Path.cwd() if start is None else Path(start)
    for folder in [here.resolve(), *here.resolve().parents]:
        if (folder / "pyproject.toml").is_file() and (folder / "solutions").is_dir():
            return folder
    return here


def is_long(path: Path) -> bool:
    """Whether the notebook at ``path`` is marked long in its metadata (``course.long``)."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8")).get("metadata", {})
    except (OSError, ValueError):
        return False
    return bool(isinstance(meta, dict) and (meta.get("course") or {}).get("long"))


def read_notebook(path: Path, *, validate: bool = False) -> nbformat.NotebookNode:
    """Read a notebook (as nbformat 4); ``ValueError`` with one line naming the file if it is not one."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(f"{show(path)}: no such notebook") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{show(path)}: cannot read it ({err})") from None
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{show(path)}: not a notebook: invalid JSON at line {err.lineno}, column {err.colno} ({err.msg})"
        ) from None
    try:
        nb = nbformat.convert(nbformat.reader.reads(text), 4)
        if validate:
            nbformat.validate(nb)
    except Exception as err:  # noqa: BLE001 - nbformat raises many types for one user mistake
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{show(path)}: not a valid notebook ({first})") from None
    return nb


#: What running a notebook writes into it. Not an edit (running is not editing), though a
#: notebook holding any of it is backed up before it is regenerated.
RUN_CELL_FIELDS = ("outputs", "execution_count")
RUN_CELL_METADATA = ("execution", "ExecuteTime")
RUN_NOTEBOOK_METADATA = ("kernelspec", "language_info", "widgets")
_HASHES = ("content_hash", "source_hash")


def content_hash(nb: dict[str, Any]) -> str:
    """sha256 of everything a learner edits: each cell's type, source, attachments and metadata
    (tags included), in order, and the notebook metadata.

    Left out: what running writes (outputs, execution counts, ``execution``/``ExecuteTime``
    cell metadata, ``kernelspec``, ``language_info`` and ``widgets``), cell ids and the
    nbformat version (Jupyter's, not the learner's), an empty ``tags`` list, and the hash itself.
    """
    data = _normalised(dict(nb))
    cells = []
    for cell in data.get("cells", []):
        kept = {k: v for k, v in cell.items() if k not in {*RUN_CELL_FIELDS, "id"}}
        metadata = {k: v for k, v in cell.get("metadata", {}).items() if k not in RUN_CELL_METADATA}
        if metadata.get("tags") == []:
            del metadata["tags"]
        cells.append({**kept, "metadata": metadata})
    metadata = {k: v for k, v in data.get("metadata", {}).items() if k not in RUN_NOTEBOOK_METADATA}
    if isinstance(metadata.get("course"), dict):
        metadata["course"] = {k: v for k, v in metadata["course"].items() if k not in _HASHES}
    payload = json.dumps({"cells": cells, "metadata": metadata}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def source_hash(nb: nbformat.NotebookNode) -> str:
    """sha256 of the cells' types and sources: the edit check of notebooks built before ``content_hash``."""
    payload = [[cell.cell_type, _text(cell.get("source", ""))] for cell in nb.cells]
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def _text(source: Any) -> str:
    return "".join(source) if isinstance(source, list) else str(source)


def strip_code(source: str, where: str = "cell") -> str:
    """``source`` with each ``### BEGIN/END SOLUTION`` region replaced by a stub that raises."""
    lines = source.split("\n")
    out: list[str] = []
    begin: int | None = None
    for number, line in enumerate(lines, 1):
        opened = _BEGIN.match(line)
        if opened:
            if begin is not None:
                raise ValueError(
                    f"{where}, line {number}: '### BEGIN SOLUTION' inside the region opened on "
                    f"line {begin} (regions cannot be nested; close it with '### END SOLUTION' first)"
                )
            begin = number
            indent = opened.group(1)
            out.extend(
                indent + stub for stub in _stub(_enclosing_name(source, lines, number, len(indent)))
            )
        elif _END.match(line):
            if begin is None:
                raise ValueError(
                    f"{where}, line {number}: '### END SOLUTION' with no '### BEGIN SOLUTION' above it"
                )
            begin = None
        elif begin is None:
            out.append(line)
    if begin is not None:
        raise ValueError(
            f"{where}, line {begin}: '### BEGIN SOLUTION' is never closed by '### END SOLUTION'"
        )
    return "\n".join(out)


def _stub(name: str | None) -> list[str]:
    if name is None:
        return [
            "# YOUR CODE HERE",
            'raise NotImplementedError("replace this line with your code (see the derivation above)")',
        ]
    note = _forbidden_note(name)
    return [*note, f'raise NotImplementedError("{name}: {STUB_HINT}")']


def _forbidden_note(name: str) -> list[str]:
    """The comment that tells the learner which PyTorch calls this exercise may not use."""
    from .checking import REGISTRY, _registry

    exercise = (_registry() if not REGISTRY else REGISTRY).get(name)
    if exercise is None or not exercise.forbidden_text():
        return []
    text = exercise.forbidden_text()
    return [f"# This exercise {text}: the check refuses them."]


def _enclosing_name(source: str, lines: list[str], number: int, indent: int) -> str | None:
    """Dotted name of the def/class enclosing line ``number`` (1-based), or None at top level."""
    chain: list[str] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, _DEFS):
                visit(child)
            elif child.lineno <= number <= (child.end_lineno or child.lineno):
                chain.append(child.name)
                visit(child)

    try:
        visit(ast.parse(source))
    except SyntaxError:
        pass  # IPython magics are not Python; the indentation tells us instead
    if chain:
        return ".".join(chain)
    # A region of comments only ends after the def's last statement, so ast misses it.
    return _enclosing_name_by_indent(lines[: number - 1], indent) if indent else None


def _enclosing_name_by_indent(above: list[str], indent: int) -> str | None:
    chain: list[str] = []
    limit = indent
    for line in reversed(above):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        width = len(line) - len(line.lstrip())
        if width >= limit:
            continue
        limit = width
        found = _DEF.match(line)
        if found:
            chain.append(found.group(2))
        if limit == 0:
            break
    return ".".join(reversed(chain)) if chain else None


def strip_markdown(source: str, where: str = "cell") -> str:
    """``source`` with each ``<!-- BEGIN/END SOLUTION -->`` region replaced by "*Your answer here.*"."""
    out, pos, begin = [], 0, None
    for marker in _MD_MARKER.finditer(source):
        if marker.group(1) == "BEGIN":
            if begin is not None:
                raise ValueError(
                    f"{where}: '<!-- BEGIN SOLUTION -->' inside another solution region"
                )
            out.append(source[pos : marker.start()])
            begin = marker
        else:
            if begin is None:
                raise ValueError(
                    f"{where}: '<!-- END SOLUTION -->' with no '<!-- BEGIN SOLUTION -->' before it"
                )
            out.append(ANSWER_STUB)
            begin = None
        pos = marker.end()
    if begin is not None:
        raise ValueError(
            f"{where}: '<!-- BEGIN SOLUTION -->' is never closed by '<!-- END SOLUTION -->'"
        )
    out.append(source[pos:])
    return "".join(out)


def banner(generated_from: str) -> str:
    """The first cell of every student notebook: generated, from what, and whose copy it is."""
    return (
        f"> **Generated notebook.** `course build` made this file from `{generated_from}`.\n"
        "> Maintainers: edit the solution notebook, not this file, then run `course build`.\n"
        "> Learners: this copy is yours; work in it freely. `course build` never overwrites your edits."
    )


def student_notebook(
    solution: nbformat.NotebookNode, *, chapter: str, generated_from: str, where: str = ""
) -> nbformat.NotebookNode:
    """The student version of ``solution``: stubs for solutions, no outputs, a banner, stable ids."""
    v4 = nbformat.v4
    first = v4.new_markdown_cell(banner(generated_from))
    first.id = BANNER_ID
    cells, used = [first], {BANNER_ID}
    for number, cell in enumerate(solution.cells, 1):
        here = f"{where}: cell {number}" if where else f"cell {number}"
        source = _text(cell.get("source", ""))
        metadata = {
            k: v
            for k, v in cell.get("metadata", {}).items()
            if k not in {"execution", "ExecuteTime"}
        }
        if cell.cell_type == "code":
            new = v4.new_code_cell(strip_code(source, here), metadata=metadata)
        elif cell.cell_type == "markdown":
            new = v4.new_markdown_cell(strip_markdown(source, here), metadata=metadata)
            if cell.get("attachments"):
                new.attachments = copy.deepcopy(cell.attachments)
        else:
            new = v4.new_raw_cell(source, metadata=metadata)
        new.id = _stable_id(cell.get("id"), number, used)
        cells.append(new)
    keep = {
        k: copy.deepcopy(solution.metadata[k])
        for k in ("kernelspec", "language_info")
        if k in solution.metadata
    }
    nb = v4.new_notebook(cells=cells, metadata=keep)
    # Flags such as ``long`` (a notebook allowed 180 s) apply to the student copy too.
    flags = {k: v for k, v in solution.metadata.get("course", {}).items() if k not in {"chapter"}}
    nb.metadata["course"] = {**flags, "chapter": chapter, "generated_from": generated_from}
    nb.metadata["course"]["content_hash"] = content_hash(nb)
    return nb


def _stable_id(solution_id: Any, number: int, used: set[str]) -> str:
    # Reusing the solution's id lets a maintainer map a student cell back to its source.
    base = (
        solution_id
        if isinstance(solution_id, str) and _CELL_ID.match(solution_id)
        else f"cell-{number}"
    )
    cell_id, n = base, 1
    while cell_id in used:
        cell_id = f"{base[:58]}-{n}"
        n += 1
    used.add(cell_id)
    return cell_id


def notebook_text(nb: nbformat.NotebookNode) -> str:
    """The file content nbformat writes for ``nb`` (indent 1, sorted keys, trailing newline)."""
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def _normalised(data: dict[str, Any]) -> dict[str, Any]:
    # Joining split lines makes two files with the same content compare equal however they were written.
    node = nbformat.from_dict(copy.deepcopy(data))
    if isinstance(node.get("cells"), list):
        rejoin_lines(node)
    return json.loads(json.dumps(node, sort_keys=True))


@dataclass
class BuildResult:
    """What ``build`` found and did; ``messages`` and ``errors`` are one line each."""

    check: bool = False
    written: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    stale: list[Path] = field(default_factory=list)
    missing: list[Path] = field(default_factory=list)
    orphans: list[Path] = field(default_factory=list)
    refused: list[Path] = field(default_factory=list)
    backups: list[Path] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the build succeeded, or for a check, when course/ is in sync."""
        if self.check:
            return not (self.stale or self.missing or self.orphans or self.errors)
        return not (self.refused or self.errors)

    @property
    def exit_code(self) -> int:
        """0 when ``ok``, else 1."""
        return 0 if self.ok else 1


def build(
    solutions_dir: Path, course_dir: Path, *, force: bool = False, check: bool = False
) -> BuildResult:
    """Generate every course notebook from its solution; with ``check``, only compare and report."""
    solutions_dir, course_dir = Path(solutions_dir), Path(course_dir)
    if not solutions_dir.is_dir():
        raise FileNotFoundError(f"{show(solutions_dir)}: no such folder of solution notebooks")
    result = BuildResult(check=check)
    sources = sorted(p for p in solutions_dir.glob("*.ipynb") if not p.name.startswith("."))
    for solution_path in sources:
        target = course_dir / solution_path.name
        try:
            generated = _generate(solution_path, course_dir)
        except (ValueError, FileNotFoundError) as err:
            result.errors.append(str(err))
            continue
        if check:
            _compare(target, generated, solution_path, result)
        else:
            _write(target, generated, force, result)
    names = {p.name for p in sources}
    existing = sorted(course_dir.glob("*.ipynb")) if course_dir.is_dir() else []
    for orphan in (p for p in existing if p.name not in names and not p.name.startswith(".")):
        result.orphans.append(orphan)
        line = f"{show(orphan)} has no solution {show(solutions_dir / orphan.name)}"
        (result.errors if check else result.messages).append(
            line + ("" if check else "; left as it is (delete it if the chapter was removed)")
        )
    if check and result.ok:
        result.messages.append(
            f"{show(course_dir)}/ is in sync with {show(solutions_dir)}/ ({len(sources)} notebooks)"
        )
    elif not check:
        result.messages.append(
            f"course build: {len(sources)} solution notebooks, {len(result.written)} written, "
            f"{len(result.unchanged)} up to date, {len(result.refused)} refused, {len(result.errors)} errors"
        )
    return result


def _generate(solution_path: Path, course_dir: Path) -> nbformat.NotebookNode:
    solution = read_notebook(solution_path, validate=True)
    chapter = solution.metadata.get("course", {}).get("chapter") or solution_path.stem
    try:
        generated_from = solution_path.resolve().relative_to(course_dir.resolve().parent).as_posix()
    except ValueError:
        generated_from = f"{solution_path.parent.name}/{solution_path.name}"
    return student_notebook(
        solution, chapter=chapter, generated_from=generated_from, where=show(solution_path)
    )


def _existing(target: Path) -> dict[str, Any] | None:
    try:
        return _normalised(json.loads(target.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError):
        return None


def _compare(
    target: Path, generated: nbformat.NotebookNode, solution_path: Path, result: BuildResult
) -> None:
    if not target.exists():
        result.missing.append(target)
        result.errors.append(
            f"{show(target)} is missing (run `course build` to generate it from {show(solution_path)})"
        )
    elif _existing(target) != _normalised(json.loads(notebook_text(generated))):
        result.stale.append(target)
        result.errors.append(
            f"{show(target)} is stale: it differs from what {show(solution_path)} generates (run `course build`)"
        )
    else:
        result.unchanged.append(target)


def _write(
    target: Path, generated: nbformat.NotebookNode, force: bool, result: BuildResult
) -> None:
    text = notebook_text(generated)
    if target.exists():
        current = _existing(target)
        if current == _normalised(json.loads(text)):
            result.unchanged.append(target)
            return
        edited = current is None or _edited(current)
        if edited and not force:
            result.refused.append(target)
            result.errors.append(
                f"{show(target)} was edited since it was generated; not overwriting it "
                "(run `course build --force` to regenerate it, keeping a backup of the edited file)"
            )
            return
        if edited or force or _ran(current, generated) or _legacy(current):
            backup = _backup(target)
            result.backups.append(backup)
            result.messages.append(f"kept a copy of the previous {show(target)} in {show(backup)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(text.encode("utf-8"))
    result.written.append(target)
    result.messages.append(f"wrote {show(target)}")


def _edited(current: dict[str, Any]) -> bool:
    """True unless ``current`` is what the build generated, give or take what running wrote."""
    course = current.get("metadata", {}).get("course", {})
    try:
        if isinstance(course, dict) and "content_hash" in course:
            return course["content_hash"] != content_hash(current)
        if isinstance(course, dict) and "source_hash" in course:
            return course["source_hash"] != source_hash(nbformat.from_dict(current))
    except (AttributeError, TypeError, ValueError):
        pass
    return True


def _legacy(current: dict[str, Any]) -> bool:
    # Built before content_hash: a metadata or tag edit cannot be told apart, so keep a copy.
    course = current.get("metadata", {}).get("course", {})
    return not isinstance(course, dict) or "content_hash" not in course


def _ran(current: dict[str, Any], generated: nbformat.NotebookNode) -> bool:
    """True when ``current`` holds anything running wrote (outputs, timings, kernel or widget state)."""
    cells = current.get("cells", [])
    for cell in cells:
        if cell.get("cell_type") == "code" and (
            cell.get("outputs") or cell.get("execution_count") is not None
        ):
            return True
        if any(k in cell.get("metadata", {}) for k in RUN_CELL_METADATA):
            return True
    meta = current.get("metadata", {})
    return any(meta.get(k) != generated.metadata.get(k) for k in RUN_NOTEBOOK_METADATA)


def _backup(target: Path) -> Path:
    folder = target.parent / ".backups"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    backup, n = folder / f"{target.stem}-{stamp}.ipynb", 1
    while backup.exists():
        backup, n = folder / f"{target.stem}-{stamp}-{n}.ipynb", n + 1
    shutil.copy2(target, backup)
    return backup
