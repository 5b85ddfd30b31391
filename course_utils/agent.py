"""The grader's agent inside a learner's kernel: look up names, make one guarded call, export a class.

The grader ships this module by value (cloudpickle) with every request, so the kernel runs
the grader's copy even if the learner patched ``course_utils``. Whatever it sends back is
plain data (tensors, numbers, strings and containers of them) written with ``torch.save``
and read by the grader with ``torch.load(weights_only=True)``; anything else travels as a
description of its type.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from .invoke import code_fingerprint, invoke
from .invoke_world import invoke_world

OPAQUE = "__course_opaque__"
NUMPY = "__course_numpy__"
_MAX_DEPTH = 8
_MAX_ITEMS = 100_000
_SCALARS = (bool, int, float, complex, str, bytes, type(None))


def plain(x: Any, depth: int = 0) -> Any:
    """``x`` as data that ``torch.load(weights_only=True)`` reads back; other objects by type name."""
    if depth > _MAX_DEPTH:
        return {OPAQUE: "a structure nested too deeply"}
    if type(x) in _SCALARS or isinstance(x, torch.dtype | torch.Size):
        return x
    if torch.is_tensor(x):
        if x.device.type != "cpu" or x.is_sparse or x.is_quantized:
            return {
                OPAQUE: f"torch.Tensor on {x.device}"
                if x.device.type != "cpu"
                else "torch.Tensor (sparse or quantized)"
            }
        return x.detach().as_subclass(torch.Tensor).clone()
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(x, numpy.ndarray | numpy.generic):
        try:
            return {
                NUMPY: torch.from_numpy(numpy.array(x, copy=True)),
                "scalar": isinstance(x, numpy.generic),
            }
        except (TypeError, RuntimeError):
            return {OPAQUE: f"numpy.{type(x).__name__}"}
    if type(x) in (tuple, list, set) and len(x) <= _MAX_ITEMS:
        items = [plain(v, depth + 1) for v in x]
        if type(x) is set:
            return set(items) if all(type(v) in _SCALARS for v in items) else {OPAQUE: "set"}
        return type(x)(items)
    if type(x) is dict and len(x) <= _MAX_ITEMS and all(type(k) is str for k in x):
        return {k: plain(v, depth + 1) for k, v in x.items()}
    kind = type(x)
    module = getattr(kind, "__module__", "") or ""
    return {
        OPAQUE: kind.__name__ if module == "builtins" else f"{module.split('.')[0]}.{kind.__name__}"
    }


def describe_name(obj: Any) -> dict[str, Any]:
    """What the grader needs to know about one name the notebook defines."""
    return {
        "is_class": isinstance(obj, type),
        "callable": callable(obj),
        "type": type(obj).__name__,
        "name": str(getattr(obj, "__name__", "")),
        "fingerprint": code_fingerprint(obj),
    }


def export_bytes(obj: Any) -> bytes:
    """``obj`` (a learner's class) pickled by value, so that a fresh process can rebuild it.

    A method decorated with ``torch.autograd.function.once_differentiable`` is sent as "that
    decorator applied to the learner's function": its wrapper refers to a torch internal that
    cloudpickle would otherwise copy, and that cannot be rebuilt elsewhere.
    """
    import io

    import cloudpickle
    import torch.autograd.function as autograd_function

    wrapper_code = autograd_function.once_differentiable(lambda ctx: None).__code__

    class _Pickler(cloudpickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            if getattr(obj, "__code__", None) is wrapper_code and hasattr(obj, "__wrapped__"):
                return autograd_function.once_differentiable, (obj.__wrapped__,)
            return super().reducer_override(obj)

    buffer = io.BytesIO()
    _Pickler(buffer).dump(obj)
    return buffer.getvalue()


def serve(namespace: dict[str, Any], request: dict[str, Any]) -> None:
    """Answer one request of the grader and write the answer to ``request['out']``."""
    op = request["op"]
    if op == "inspect":
        found = {
            name: describe_name(namespace[name]) for name in request["names"] if name in namespace
        }
        answer: dict[str, Any] = {"names": found}
    elif op == "call":
        fn = namespace.get(request["name"])
        probe = request.get("probe")
        target = fn if probe is None else (lambda *a, **k: probe(fn, *a, **k))
        outcome = invoke(
            target,
            request["args"],
            request["kwargs"],
            backward=request["backward"],
            watch=request.get("watch"),
            forbidden=tuple(request.get("forbidden", ())),
        )
        outcome.pop("exception", None)
        outcome["args"], outcome["kwargs"] = request["args"], request["kwargs"]
        answer = {k: plain(v) for k, v in outcome.items()}
    elif op == "world":
        outcome = invoke_world(
            namespace.get(request["name"]),
            request["world_size"],
            request["args"],
            request["kwargs"],
            probe=request.get("probe"),
            backward=request["backward"],
            forbidden=tuple(request.get("forbidden", ())),
            watch=request.get("watch"),
            timeout=request["timeout"],
            encode=plain,
        )
        answer = {k: plain(v) for k, v in outcome.items()}
    elif op == "export":
        with open(request["blob"], "wb") as f:
            f.write(export_bytes(namespace[request["name"]]))
        answer = {"exported": True}
    else:
        answer = {"error": f"unknown request {op!r}"}
    torch.save(answer, request["out"])
