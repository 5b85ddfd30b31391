"""The child process that runs and grades one notebook: ``grade.grade_notebook`` starts one each."""

from __future__ import annotations

import sys

from .lean_imports import skip_unused_imports

skip_unused_imports()

from .grade import _child_main  # noqa: E402 - after the import it trims

if __name__ == "__main__":
    sys.exit(_child_main())
