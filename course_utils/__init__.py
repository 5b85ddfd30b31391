"""course_utils: gradient checkers, check batteries and the notebook pipeline of the course.

The public API is the exercise contract: ``check``, ``exercises``, ``CheckFailure``.
"""

from .checking import (
    CheckFailure,
    Report,
    check,
    exercises,
    last_status,
    learner_or_reference,
    reference,
    strict_mode,
)
from .gradcheck import (
    check_gradients,
    compare,
    gradcheck_function,
    numerical_gradient,
    relative_error,
)

__all__ = [
    "CheckFailure",
    "Report",
    "check",
    "check_gradients",
    "compare",
    "exercises",
    "gradcheck_function",
    "last_status",
    "learner_or_reference",
    "numerical_gradient",
    "reference",
    "relative_error",
    "strict_mode",
]

__version__ = "0.1.0"
