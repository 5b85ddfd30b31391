"""course_utils: gradient checkers, check batteries and the notebook pipeline of the course.

The public API is the exercise contract: ``check``, ``exercises``, ``CheckFailure``.
Names are imported on first use, so the ``course`` command starts without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckFailure": "checking",
    "Report": "checking",
    "check": "checking",
    "exercises": "checking",
    "last_status": "checking",
    "learner_or_reference": "checking",
    "reference": "checking",
    "strict_mode": "checking",
    "check_gradients": "gradcheck",
    "compare": "gradcheck",
    "gradcheck_function": "gradcheck",
    "numerical_gradient": "gradcheck",
    "relative_error": "gradcheck",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


#: Helper modules a notebook reaches as ``cu.gpu``, ``cu.distributed``.
_MODULES = ("distributed", "gpu")


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'course_utils' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
