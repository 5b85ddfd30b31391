"""One guarded call of a learner's distributed function on every rank of a forked gloo world.

``invoke_world`` is ``invoke`` for the distributed exercises: it forks a world with
``distributed.run_world`` and, on each rank, calls the learner's function under the same
guards as ``invoke`` plus one more, the guard on ``torch.distributed`` calls an exercise may
not use (``ring_all_reduce`` must build its sum from point-to-point messages, so every
collective is refused in it). When grading it is shipped by value into the learner's kernel,
like ``invoke``, and its outcome is plain data.

Forbidden entries of an exercise are read three ways:
- ``"dist.all_reduce"``: a ``torch.distributed`` call, refused in every form the learner can
  reach from Python: the ``torch.distributed`` function (also under a name imported before the
  check), the ``ProcessGroup``/``Backend`` method under it, and the functional collectives;
- ``"torch.nn.parallel.DistributedDataParallel"``: a class the learner may not construct;
- anything else: a torch operator, as in ``invoke``.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from .distributed import WorldError, run_world
from .invoke import Violation, invoke

#: For each ``torch.distributed`` call, the ProcessGroup/Backend methods that carry it out.
PROCESS_GROUP_METHODS: dict[str, tuple[str, ...]] = {
    "all_reduce": ("allreduce", "allreduce_coalesced"),
    "all_gather": ("allgather", "allgather_coalesced", "_allgather_base", "all_gather_single"),
    "all_gather_into_tensor": (
        "_allgather_base",
        "allgather_into_tensor_coalesced",
        "all_gather_single",
        "all_gather_single_coalesced",
    ),
    "reduce_scatter": ("reduce_scatter", "_reduce_scatter_base", "reduce_scatter_single"),
    "reduce_scatter_tensor": (
        "_reduce_scatter_base",
        "reduce_scatter_tensor_coalesced",
        "reduce_scatter_single",
        "reduce_scatter_single_coalesced",
    ),
    "broadcast": ("broadcast",),
    "reduce": ("reduce",),
    "gather": ("gather", "gather_into_tensor", "gather_single"),
    "scatter": ("scatter",),
    "all_to_all": ("alltoall", "alltoall_base", "all_to_all_single"),
    "all_to_all_single": ("alltoall_base", "all_to_all_single"),
    "send": ("send",),
    "isend": ("send",),
    "recv": ("recv", "recv_anysource"),
    "irecv": ("recv", "recv_anysource"),
    "barrier": ("barrier",),
}
#: ``torch.distributed`` functions built on another one: forbidding the base forbids them too.
DERIVED_CALLS: dict[str, tuple[str, ...]] = {
    "all_gather": (
        "all_gather_object",
        "all_gather_coalesced",
        "all_gather_into_tensor",
        "all_gather_single",
    ),
    "all_gather_into_tensor": ("all_gather_single",),
    "reduce_scatter": ("reduce_scatter_tensor", "reduce_scatter_single"),
    "reduce_scatter_tensor": ("reduce_scatter_single",),
    "all_reduce": ("all_reduce_coalesced",),
    "gather": ("gather_object", "gather_single"),
    "scatter": ("scatter_object_list",),
    "broadcast": ("broadcast_object_list",),
    "send": ("send_object_list",),
    "recv": ("recv_object_list",),
}
#: Names the functional collectives and the c10d dispatcher ops give the same calls.
OP_ALIASES: dict[str, str] = {
    "allreduce": "all_reduce",
    "allreduce_coalesced": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "allgather": "all_gather",
    "allgather_into_tensor_coalesced": "all_gather_into_tensor",
    "all_gather_into_tensor_coalesced": "all_gather_into_tensor",
    "reduce_scatter_tensor_coalesced": "reduce_scatter_tensor",
    "alltoall": "all_to_all",
    "alltoall_base": "all_to_all_single",
}


def split_forbidden(
    forbidden: tuple[str, ...],
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(torch operators, ``torch.distributed`` call names, dotted class paths) of an exercise."""
    ops, calls, classes = [], [], []
    for entry in forbidden:
        if entry.startswith("dist."):
            calls.append(entry.removeprefix("dist."))
        elif entry.startswith("torch.") and entry.rsplit(".", 1)[-1][:1].isupper():
            classes.append(entry)
        else:
            ops.append(entry)
    return tuple(ops), tuple(calls), tuple(classes)


class _DistFlags:
    """Sticky record of the first forbidden ``torch.distributed`` call or class."""

    def __init__(self) -> None:
        self.forbidden = ""

    def trip(self, shown: str) -> Any:
        self.forbidden = self.forbidden or shown
        raise Violation(f"{shown} is not allowed in this exercise")


class _CollectiveWatch(torch.overrides.TorchFunctionMode):
    """Sees the functional collectives and c10d dispatcher ops the learner calls from Python."""

    def __init__(self, flags: _DistFlags, calls: tuple[str, ...]) -> None:
        super().__init__()
        self.flags, self.calls = flags, calls

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's hook
        text = str(getattr(func, "__module__", "")) + " " + str(func)
        if "c10d" in text:
            base = str(getattr(func, "__name__", "") or "").split(".")[0].strip("_")
            base = OP_ALIASES.get(base, base)
            if base in self.calls or any(base in DERIVED_CALLS.get(c, ()) for c in self.calls):
                op = type(func).__name__.startswith("OpOverload")
                self.flags.trip(f"dist.{base} (as torch.ops.{func})" if op else f"dist.{base}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def dist_guard(
    calls: tuple[str, ...], classes: tuple[str, ...]
) -> Iterator[tuple[_DistFlags, Callable[[], str]]]:
    """Refuse ``calls`` (``torch.distributed`` names) and constructing ``classes`` for the duration.

    Yields the flags and a check that every patch is still in place.
    """
    flags = _DistFlags()
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        saved.append(
            (owner, name, owner.__dict__[name] if name in vars(owner) else getattr(owner, name))
        )
        setattr(owner, name, value)

    def refuse(shown: str) -> Callable[..., Any]:
        def refused(*_args: Any, **_kwargs: Any) -> Any:
            return flags.trip(shown)

        return refused

    c10d = importlib.import_module("torch._C._distributed_c10d")
    owners = [c10d.ProcessGroup, getattr(c10d, "Backend", None)]
    methods: dict[str, str] = {}
    for call in calls:
        for name in (call, *DERIVED_CALLS.get(call, ())):
            for method in PROCESS_GROUP_METHODS.get(name, ()):
                methods.setdefault(method, call)
    for call in calls:
        for name in (call, *DERIVED_CALLS.get(call, ())):
            if hasattr(dist, name):
                patch(dist, name, refuse(f"dist.{call}"))
    for owner in owners:
        for method, call in methods.items():
            if owner is not None and method in vars(owner):
                patch(owner, method, refuse(f"dist.{call} (ProcessGroup.{method})"))
    for path in classes:
        module_name, _, class_name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue
        shown = f"{class_name} ({path})"

        def init(self: Any, *_args: Any, _shown: str = shown, **_kwargs: Any) -> None:
            flags.trip(_shown)

        patch(cls, "__init__", init)
    installed = {(id(owner), name): getattr(owner, name) for owner, name, _ in saved}
    mode = _CollectiveWatch(flags, calls) if calls else None

    def intact() -> str:
        if mode is not None and not any(
            m is mode for m in torch.overrides._get_current_function_mode_stack()
        ):
            return "the guard on torch.distributed calls was removed"
        for owner, name, _ in saved:
            if getattr(owner, name, None) is not installed[(id(owner), name)]:
                return f"the guard on {getattr(owner, '__name__', owner)}.{name} was replaced"
        return ""

    try:
        with mode if mode is not None else contextlib.nullcontext():
            yield flags, intact
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


class RankOutcome(Exception):
    """A rank's call did not end well; the outcome travels to the parent in ``course_report``."""

    def __init__(self, outcome: dict[str, Any]) -> None:
        super().__init__(f"{outcome.get('kind')}: {outcome.get('message', '')}")
        self.course_report = outcome


def _rank_call(
    rank: int,
    world_size: int,
    fn: Callable[..., Any],
    probe: Callable[..., Any] | None,
    args_per_rank: list[tuple[Any, ...]],
    kwargs_per_rank: list[dict[str, Any]],
    backward: bool,
    forbidden: tuple[str, ...],
    watch: Callable[[], Any] | None,
    references: list[Any] | None,
    encode: Callable[[Any], Any],
) -> dict[str, Any]:
    """Body of one rank: the guarded call; its value, inputs and watch report, or RankOutcome."""
    ops, calls, classes = split_forbidden(forbidden)
    args, kwargs = tuple(args_per_rank[rank]), dict(kwargs_per_rank[rank])
    target = fn if probe is None else (lambda *a, **k: probe(fn, *a, **k))
    broken = ""
    with dist_guard(calls, classes) as (flags, intact):
        outcome = invoke(
            target,
            args,
            kwargs,
            backward=backward,
            watch=watch,
            references=references,
            forbidden=ops,
        )
        broken = intact()
    outcome.pop("exception", None)
    if flags.forbidden and outcome["kind"] in ("ok", "error"):
        outcome.update(kind="forbidden", message=flags.forbidden)
    elif broken and outcome["kind"] == "ok":
        outcome.update(kind="guard", message=broken)
    if outcome["kind"] != "ok":
        raise RankOutcome({k: encode(v) for k, v in outcome.items() if k != "value"})
    return {
        "value": encode(outcome["value"]),
        "args": encode(args),
        "kwargs": encode(kwargs),
        "watch": encode(outcome.get("watch")),
    }


def invoke_world(
    fn: Callable[..., Any],
    world_size: int,
    args_per_rank: list[tuple[Any, ...]],
    kwargs_per_rank: list[dict[str, Any]] | None = None,
    *,
    probe: Callable[..., Any] | None = None,
    backward: bool = False,
    forbidden: tuple[str, ...] = (),
    watch: Callable[[], Any] | None = None,
    references: list[Any] | None = None,
    timeout: float = 5.0,
    encode: Callable[[Any], Any] = lambda x: x,
) -> dict[str, Any]:
    """Call ``fn`` on every rank of a forked world under the guards; an outcome dict (never raises).

    ``kind`` is ``"ok"`` with ``values``, ``args``, ``kwargs`` and ``watch`` as lists by rank,
    or one of ``invoke``'s failure kinds, ``"deadlock"`` or ``"died"``, with ``rank`` (the rank
    that failed first; a list of ranks for a deadlock) and ``message``.
    """
    kwargs_per_rank = kwargs_per_rank or [{} for _ in range(world_size)]
    try:
        per_rank = run_world(
            _rank_call,
            world_size,
            fn,
            probe,
            args_per_rank,
            kwargs_per_rank,
            backward,
            tuple(forbidden),
            watch,
            references,
            encode,
            timeout=timeout,
        )
    except WorldError as err:
        report = getattr(err, "report", None)
        if isinstance(report, dict):
            return dict(report, rank=err.ranks[0])
        kind = "deadlock" if "did not finish" in str(err) else "died"
        if "raised" in str(err):
            kind = "error"
        return {"kind": kind, "rank": err.ranks[0], "ranks": list(err.ranks), "message": str(err)}
    except Exception as err:  # noqa: BLE001 - a world that cannot start is one line, not a trace
        return {"kind": "died", "rank": 0, "message": f"the world could not start ({err})"}
    return {
        "kind": "ok",
        "values": [r["value"] for r in per_rank],
        "args": [r["args"] for r in per_rank],
        "kwargs": [r["kwargs"] for r in per_rank],
        "watch": [r["watch"] for r in per_rank],
    }
