"""Start the course's command-line processes faster by leaving out an import they never use."""

from __future__ import annotations

import sys


def skip_unused_imports() -> None:
    """Keep jsonschema (imported by nbformat) from loading rfc3987_syntax in this process.

    jsonschema loads it only to offer the "iri" format checks, which nbformat's validation never
    runs; loading it builds dozens of grammars, over a second of every process that reads a
    notebook (each graded notebook starts one). Does nothing once jsonschema is imported.
    """
    if "jsonschema" not in sys.modules:
        # None in sys.modules makes the import raise ImportError, which jsonschema tolerates.
        sys.modules.setdefault("rfc3987_syntax", None)
