"""Check batteries, one module per chapter (chNN_slug.py); importing this package registers them all."""

import importlib
import pkgutil

# Discovered rather than listed, so adding a chapter touches no shared file.
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("ch"):
        importlib.import_module(f"{__name__}.{_info.name}")
