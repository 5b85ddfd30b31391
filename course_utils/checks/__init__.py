"""Check batteries, one module per chapter (chNN_slug.py); importing this package registers them all."""

import importlib
import os
import pkgutil

import torch

# Without a CUDA device Triton can only interpret (chapter 13). Triton reads TRITON_INTERPRET
# when each @triton.jit function is defined, its own library included, and the import below
# pulls Triton in: so the switch must be set before it, or interpreted kernels fail calling
# Triton's library (tl.max, tl.sum). With a GPU the environment is left alone.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# autograd.grad with an explicit grad_outputs imports this (and sympy) on first use: about
# a second. Paid here, at import, so that no check's 2 s budget pays it.
import torch.fx.experimental.symbolic_shapes  # noqa: F401

# Discovered rather than listed, so adding a chapter touches no shared file.
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("ch"):
        importlib.import_module(f"{__name__}.{_info.name}")
