"""One call of a learner's function, with the guards that must run around it.

``invoke`` is the only code that calls a learner's function. In learn mode it runs in the
notebook's own process; when grading it is shipped by value (cloudpickle) into the learner's
kernel for every single call, so a patched ``course_utils`` inside the kernel cannot disarm
it, and what it returns is plain data that the grader judges in its own process.

Guards, each armed just before the call and checked just after it:
- references: the course's reference implementations trip if the learner's code runs them;
- autograd (backward exercises): every entry into autograd is refused and remembered (the
  Python entry points, a fresh engine, ``torch.nn.grad``, ``torch.func``, backward kernels
  such as ``aten.convolution_backward``, and any graph recorded during the call);
- forbidden calls: the PyTorch operator an exercise rebuilds, in any of its forms
  (``torch.``, ``Tensor.``, ``F.``, ``torch.ops.aten``), is refused and remembered;
- a watch (for example chapter 09's shape recorder) that observes every torch call.
A guard switched off during the call counts as a broken guard, not as a pass.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import marshal
import sys
import traceback
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

#: Outcome kinds: the call returned, raised NotImplementedError, raised something else,
#: used autograd, ran a course reference, called a forbidden operator, or switched a guard off.
KINDS = ("ok", "pending", "error", "autograd", "reference", "forbidden", "guard")


class Violation(Exception):
    """Raised inside the learner's call when it steps on a guard (remembered even if caught)."""


class _Flags:
    """Sticky record of guard violations: catching the exception does not erase it."""

    def __init__(self) -> None:
        self.autograd: str = ""
        self.reference: str = ""
        self.forbidden: str = ""

    def trip_autograd(self, what: str) -> None:
        self.autograd = self.autograd or what
        raise Violation(what)


# ---- autograd ------------------------------------------------------------------------------
_AUTOGRAD_FUNCTIONS = (
    (torch.autograd, ("backward", "grad")),
    (torch.autograd.functional, ("vjp", "jvp", "jacobian", "hessian", "vhp", "hvp")),
    (torch.nn.grad, tuple(f"conv{d}d_{of}" for d in (1, 2, 3) for of in ("input", "weight"))),
)
_FUNC_TRANSFORMS = ("grad", "grad_and_value", "vjp", "jvp", "jacrev", "jacfwd", "hessian")


class _AutogradWatch(TorchFunctionMode):
    """Sees every torch call of the learner's: a backward kernel, or a recorded graph, trips it."""

    def __init__(self, flags: _Flags) -> None:
        super().__init__()
        self.flags = flags

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's hook
        name = getattr(func, "__name__", "") or str(func)
        if "backward" in name:
            self.flags.trip_autograd(f"the backward kernel {name}")
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, tuple | list) else (out,):
            if torch.is_tensor(x) and x.grad_fn is not None:
                self.flags.trip_autograd(f"an autograd graph (recorded by {name})")
        return out


@contextlib.contextmanager
def _autograd_forbidden(flags: _Flags) -> Iterator[Callable[[], str]]:
    """Refuse every route into autograd for the duration; yield a check that the guard held."""

    def refuse(what: str) -> Callable[..., Any]:
        def refused(*_args: Any, **_kwargs: Any) -> Any:
            flags.trip_autograd(what)

        return refused

    class _Engine:
        # Every route through the shared engine (a `grad` imported before the check) ends here.
        def __getattr__(self, name: str) -> Any:
            return refuse(f"the autograd engine ({name})")

    variable = torch.autograd.variable.Variable
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        if hasattr(owner, name):
            saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, value)

    for owner, names in _AUTOGRAD_FUNCTIONS:
        for name in names:
            patch(owner, name, refuse(f"{owner.__name__}.{name}"))
    func_module = sys.modules.get("torch.func")
    if func_module is not None:
        for name in _FUNC_TRANSFORMS:
            patch(func_module, name, refuse(f"torch.func.{name}"))
    patch(torch.Tensor, "backward", refuse("Tensor.backward"))
    patch(variable, "_execution_engine", _Engine())
    patch(
        torch._C, "_ImperativeEngine", refuse("a new autograd engine (torch._C._ImperativeEngine)")
    )
    installed = {(id(owner), name): getattr(owner, name) for owner, name, _ in saved}

    def pack(t: torch.Tensor) -> torch.Tensor:
        flags.autograd = flags.autograd or "an autograd graph (a tensor was saved for backward)"
        return t

    watch = _AutogradWatch(flags)
    try:
        with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), watch:

            def intact() -> str:
                if not _on_stack(watch):
                    return "the autograd guard's torch-function mode was removed"
                if torch.is_grad_enabled():
                    return "gradient mode was switched back on and left on"
                for owner, name, _ in saved:
                    if getattr(owner, name, None) is not installed[(id(owner), name)]:
                        return (
                            f"the guard on {getattr(owner, '__name__', owner)}.{name} was replaced"
                        )
                return ""

            yield intact
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def _on_stack(mode: Any) -> bool:
    """Whether ``mode`` is still on the torch-function mode stack."""
    return any(m is mode for m in _get_current_function_mode_stack())


# ---- forbidden operators -------------------------------------------------------------------
# The forbidden-call guard names every torch call a learner's function makes (millions in a
# loop-heavy style); the name of a torch callable never changes, so it is worked out once.
@functools.lru_cache(maxsize=65536)
def _op_name(func: Any) -> tuple[str, str]:
    name = str(getattr(func, "__name__", "") or "")
    module = str(getattr(func, "__module__", "") or "")
    qualname = str(getattr(func, "__qualname__", "") or "")
    if module.startswith("torch._ops") or type(func).__name__.startswith("OpOverload"):
        form, name = "aten", name.split(".")[0]
    elif module == "torch.nn.functional":
        form = "F"
    elif qualname.startswith(("TensorBase.", "Tensor.")):
        form = "Tensor"
    else:
        form = "torch"
    base = name.lstrip("_")
    for prefix in ("special_", "linalg_"):
        base = base.removeprefix(prefix)
    return form, base


def op_name(func: Any) -> tuple[str, str]:
    """(form, base name) of a torch callable: ``F.softmax`` -> ("F", "softmax"), ``aten._softmax.default`` -> ("aten", "softmax")."""
    try:
        return _op_name(func)
    except TypeError:  # an unhashable callable is not remembered, only worked out
        return _op_name.__wrapped__(func)


def forbidden_match(func: Any, forbidden: tuple[str, ...]) -> str:
    """How the learner's call is shown if ``func`` is forbidden by ``forbidden``, else ''."""
    form, base = op_name(func)
    if base in forbidden or f"{form}.{base}" in forbidden:
        return f"{'torch.ops.aten' if form == 'aten' else form}.{base}"
    return ""


class _ForbiddenWatch(TorchFunctionMode):
    """Sees every torch call of the learner's: the operator the exercise rebuilds trips it."""

    def __init__(self, flags: _Flags, forbidden: tuple[str, ...]) -> None:
        super().__init__()
        self.flags, self.forbidden = flags, forbidden

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's hook
        shown = forbidden_match(func, self.forbidden)
        if shown:
            self.flags.forbidden = self.flags.forbidden or shown
            raise Violation(f"{shown} is the operator this exercise asks you to build")
        return func(*args, **(kwargs or {}))


# ---- references ----------------------------------------------------------------------------
# A check compares the learner's function with every reference by these digests; code objects
# are immutable, so each one's digest is computed once (the entry holds the code, so its id
# cannot be reused while it is cached).
_CODE_DIGESTS: dict[int, tuple[types.CodeType, bytes, str]] = {}
_CODE_DIGESTS_MAX = 65536


def _code_digest(code: types.CodeType) -> tuple[bytes, str]:
    """The marshalled bytes of ``code`` (without its file and first line) and their sha256."""
    cached = _CODE_DIGESTS.get(id(code))
    if cached is not None and cached[0] is code:
        return cached[1], cached[2]
    if len(_CODE_DIGESTS) >= _CODE_DIGESTS_MAX:
        _CODE_DIGESTS.clear()
    data = marshal.dumps(code.replace(co_filename="", co_firstlineno=1))
    digest = hashlib.sha256(data).hexdigest()
    _CODE_DIGESTS[id(code)] = (code, data, digest)
    return data, digest


def code_fingerprint(obj: Any) -> str:
    """A digest of the code of a function, or of every method of a class ('' if it has none)."""
    codes = []
    if isinstance(obj, type):
        for value in vars(obj).values():
            fn = getattr(value, "__func__", value)
            if isinstance(fn, types.FunctionType):
                codes.append(fn.__code__)
    else:
        fn = getattr(obj, "__func__", obj)
        if isinstance(fn, types.FunctionType):
            codes.append(fn.__code__)
    if not codes:
        return ""
    if len(codes) == 1:
        return _code_digest(codes[0])[1]  # the sha256 of one code's bytes, as below
    digest = hashlib.sha256()
    for code in codes:
        digest.update(_code_digest(code)[0])
    return digest.hexdigest()


# reference_functions runs before every call of a learner's function; scanning all of
# sys.modules (thousands of entries once torch is loaded) each time took half of some checks.
_battery_names: dict[str, Any] = {"size": -1, "names": ()}
_module_refs: dict[str, tuple[types.ModuleType, int, list[tuple[str, types.FunctionType]]]] = {}


def battery_modules() -> list[types.ModuleType]:
    """The loaded modules of course_utils.checks; the names are rescanned when sys.modules grows or shrinks."""
    if len(sys.modules) != _battery_names["size"]:
        _battery_names["names"] = tuple(
            name for name in list(sys.modules) if name.startswith("course_utils.checks.")
        )
        _battery_names["size"] = len(sys.modules)
    modules = (sys.modules.get(name) for name in _battery_names["names"])
    return [m for m in modules if isinstance(m, types.ModuleType)]


def _refs_of(module: types.ModuleType) -> list[tuple[str, types.FunctionType]]:
    """The ``ref_*`` functions of one module, rescanned when its namespace changes."""
    namespace = vars(module)
    cached = _module_refs.get(module.__name__)
    if (
        cached is not None
        and cached[0] is module
        and cached[1] == len(namespace)
        and all(namespace.get(attr) is fn for attr, fn in cached[2])
    ):
        return cached[2]
    refs = [
        (attr, value)
        for attr, value in list(namespace.items())
        if attr.startswith("ref_") and isinstance(value, types.FunctionType)
    ]
    _module_refs[module.__name__] = (module, len(namespace), refs)
    return refs


def reference_functions() -> list[types.FunctionType]:
    """Every reference implementation the course ships (functions named ``ref_*`` in its batteries)."""
    found: dict[int, types.FunctionType] = {}
    for module in battery_modules():
        for _, fn in _refs_of(module):
            # once each: a reference one chapter imports from another is the same function
            found.setdefault(id(fn), fn)
    return list(found.values())


@contextlib.contextmanager
def _references_trip(flags: _Flags, refs: list[types.FunctionType]) -> Iterator[None]:
    """While armed, running any course reference raises and is remembered."""
    saved = []
    key = "_course_reference_tripped"

    # The tripwire runs with the reference module's globals, so it may only use builtins.
    def trip(*_args: Any, **_kwargs: Any) -> Any:
        __import__("sys").__dict__["_course_reference_tripped"] = True
        raise RuntimeError("the course's reference implementation is not an answer")

    for fn in refs:
        if fn.__code__.co_freevars:
            continue
        saved.append((fn, fn.__code__))
        fn.__code__ = trip.__code__.replace(co_name=fn.__code__.co_name)
    sys.__dict__.pop(key, None)
    try:
        yield
    finally:
        for fn, code in reversed(saved):  # undo in reverse, so a repeat can never stick
            fn.__code__ = code
        if sys.__dict__.pop(key, False):
            flags.reference = flags.reference or "it ran the course's reference implementation"


# ---- the call ------------------------------------------------------------------------------
def _learner_line(tb: Any) -> str:
    frames = [
        f
        for f in traceback.extract_tb(tb)
        if "course_utils" not in f.filename
        and f.name != "__torch_function__"  # a guard's mode, wherever its code was shipped
        and "site-packages" not in f.filename
        and "/lib/python" not in f.filename
    ]
    if not frames:
        return ""
    f = frames[-1]
    code = (f.line or "").strip()
    return (
        f" (in {f.name}, line {f.lineno}: `{code}`)" if code else f" (in {f.name}, line {f.lineno})"
    )


def invoke(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    backward: bool = False,
    watch: Callable[[], Any] | None = None,
    references: list[types.FunctionType] | None = None,
    forbidden: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Call ``fn(*args, **kwargs)`` under the guards; return an outcome dict (never raises)."""
    flags = _Flags()
    outcome: dict[str, Any] = {"kind": "ok", "value": None, "watch": None}
    refs = reference_functions() if references is None else references
    observer = watch() if watch is not None else None
    broken = ""
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_references_trip(flags, refs))
            intact = stack.enter_context(_autograd_forbidden(flags)) if backward else None
            guard = _ForbiddenWatch(flags, tuple(forbidden)) if forbidden else None
            if guard is not None:
                stack.enter_context(guard)
            if observer is not None:
                stack.enter_context(observer)
            try:
                outcome["value"] = fn(*args, **kwargs)
            finally:
                if observer is not None and not _on_stack(observer):
                    broken = "the check's watch on torch calls was removed during the call"
                if guard is not None and not _on_stack(guard):
                    broken = broken or "the check's guard against forbidden calls was removed"
                if intact is not None:
                    broken = broken or intact()
    except NotImplementedError as err:
        outcome.update(kind="pending", message=str(err).strip())
    except BaseException as err:  # noqa: BLE001 - whatever the learner raised becomes data
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        outcome.update(
            kind="error",
            exception=err,
            error_type=type(err).__name__,
            message=text,
            where=_learner_line(err.__traceback__),
        )
    if observer is not None:
        report = getattr(observer, "report", None)
        outcome["watch"] = report() if callable(report) else None
    if flags.reference:
        outcome.update(kind="reference", message=flags.reference)
    elif flags.forbidden:
        outcome.update(kind="forbidden", message=flags.forbidden)
    elif flags.autograd:
        outcome.update(kind="autograd", message=flags.autograd)
    elif broken:
        outcome.update(kind="guard", message=broken)
    return outcome
