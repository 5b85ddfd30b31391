"""course_utils.lean_imports: processes that read notebooks start without rfc3987_syntax."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_nbformat_still_validates_without_rfc3987_syntax() -> None:
    done = run(
        """
        import sys
        from course_utils.lean_imports import skip_unused_imports
        skip_unused_imports()
        import nbformat
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")])
        nbformat.validate(nb)
        broken = nbformat.v4.new_notebook()
        broken.cells.append({"cell_type": "code"})
        try:
            nbformat.validate(broken)
        except nbformat.ValidationError:
            print("invalid notebook refused")
        print(sys.modules["rfc3987_syntax"] is None)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["invalid", "notebook", "refused", "True"]


def test_it_changes_nothing_once_jsonschema_is_imported() -> None:
    done = run(
        """
        import sys
        import jsonschema
        had = "rfc3987_syntax" in sys.modules and sys.modules["rfc3987_syntax"] is not None
        from course_utils.lean_imports import skip_unused_imports
        skip_unused_imports()
        now = "rfc3987_syntax" in sys.modules and sys.modules["rfc3987_syntax"] is not None
        print(had == now)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_the_grading_child_and_the_cli_skip_it() -> None:
    done = run(
        """
        import sys
        import course_utils.grade_child
        print(sys.modules.get("rfc3987_syntax", "absent") is None)
        from course_utils.cli import main
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    done = run(
        """
        import sys
        from course_utils.cli import main
        main(["list"])
        import nbformat  # what `course grade` reads notebooks with
        print(sys.modules.get("rfc3987_syntax", "absent") is None)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "True"
