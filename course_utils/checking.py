"""The checking API: ``check``, ``exercises``, ``CheckFailure``, reports, learn and strict mode.

A check battery is a function ``battery(t: Tester)`` registered with ``@exercise``.
It calls the learner's function through ``t.call`` (which guards inputs, autograd
and exceptions) and judges outputs with ``t.compare`` (which names the case, the
quantity, the error, the worst index and any known mistake the output matches).
"""

from __future__ import annotations

import contextlib
import difflib
import html
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import progress
from .gradcheck import Comparison, compare
from .invoke import code_fingerprint, invoke, reference_functions
from .invoke_world import invoke_world

Tensor = torch.Tensor

#: Default tolerances, by dtype: (rtol, atol relative to the expected tensor's scale).
TOLERANCES = {
    torch.float64: (1e-7, 1e-10),
    torch.float32: (2e-4, 2e-6),
    torch.float16: (2e-2, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


#: The fewest nonzero expected entries for which "off by a constant factor" is a finding: any two
#: single numbers differ by one, and a scalar loss that is off for another reason would otherwise
#: be blamed on a missing 1/N.
_MIN_FACTOR_ENTRIES = 3


class CheckFailure(AssertionError):
    """A learner's function gave a wrong answer; the message says where and how."""

    def _render_traceback_(self) -> list[str]:
        # IPython calls this instead of printing the checker's own stack frames.
        return [f"\x1b[31mCheckFailure\x1b[0m: {self}"]


class _Pending(Exception):
    """The learner's function raised NotImplementedError."""


@dataclass
class Row:
    """One judged quantity in one case."""

    case: str
    quantity: str
    max_abs: float | None
    max_rel: float | None
    verdict: str


@dataclass
class Report:
    """What a check found: status ``passed``, ``failed`` or ``pending``, and the rows judged."""

    exercise_id: str
    status: str
    rows: list[Row] = field(default_factory=list)
    seconds: float = 0.0
    message: str = ""

    @property
    def passed(self) -> bool:
        """True when every case passed."""
        return self.status == "passed"

    def headline(self) -> str:
        """One line: the exercise, its status and how long the check took."""
        if self.status == "pending":
            return f"{self.exercise_id}: not implemented yet (pending). {self.message}".strip()
        if self.status == "passed":
            return f"{self.exercise_id}: passed {len(self.rows)} checks in {self.seconds:.2f} s"
        return f"{self.exercise_id}: FAILED. {self.message}"

    def table(self) -> str:
        """The rows as a plain-text table."""
        head = ("case", "quantity", "max abs err", "max rel err", "verdict")
        body = [
            (r.case, r.quantity, _fmt(r.max_abs), _fmt(r.max_rel), r.verdict) for r in self.rows
        ]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=False)]
        lines = [
            "  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True))
            for line in [head, *body]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.headline() if not self.rows else f"{self.headline()}\n{self.table()}"

    __repr__ = __str__

    def _ipython_display_(self) -> None:
        # A pending report shows nothing at all (check() already printed its one line); an
        # empty HTML repr would still leave an empty output area in JupyterLab.
        if self.status == "pending":
            return
        from IPython.display import display

        display({"text/plain": str(self), "text/html": self._repr_html_()}, raw=True)

    def _repr_html_(self) -> str:
        if self.status == "pending":
            return ""  # check() already printed the one line; showing it again is noise
        colour = {"passed": "#1a7f37", "failed": "#cf222e", "pending": "#9a6700"}[self.status]
        head = f'<p style="color:{colour};font-weight:bold">{html.escape(self.headline())}</p>'
        if not self.rows:
            return head
        cells = "".join(
            f"<tr><td>{html.escape(r.case)}</td><td>{html.escape(r.quantity)}</td>"
            f"<td>{_fmt(r.max_abs)}</td><td>{_fmt(r.max_rel)}</td><td>{html.escape(r.verdict)}</td></tr>"
            for r in self.rows
        )
        return (
            f"{head}<details><summary>{len(self.rows)} checks</summary><table>"
            "<tr><th>case</th><th>quantity</th><th>max abs err</th><th>max rel err</th>"
            f"<th>verdict</th></tr>{cells}</table></details>"
        )


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.1e}"


@dataclass
class Exercise:
    """A registered exercise: its id, chapter, contract signature, battery and reference."""

    id: str
    chapter: str
    signature: str
    summary: str
    battery: Callable[[Tester], None]
    reference: Callable[..., Any] | None
    arg_names: tuple[str, ...]
    backward: bool = False
    forbidden: tuple[str, ...] = ()
    budget: float = 2.0
    """Seconds the check may take on its reference (2 s; distributed checks state 10 s)."""

    def forbidden_text(self) -> str:
        """The calls this exercise may not use, as a learner reads them ('' if none)."""
        if not self.forbidden:
            return ""
        ops = [f for f in self.forbidden if not f.startswith(("dist.", "torch."))]
        calls = [f for f in self.forbidden if f.startswith("dist.")]
        classes = [f.rsplit(".", 1)[-1] for f in self.forbidden if f.startswith("torch.")]
        parts = []
        if ops:
            parts.append(
                f"may not call {', '.join(ops)} (in any form: torch., Tensor., F., torch.ops.aten)"
            )
        if calls:
            parts.append(f"may not call {', '.join(calls)} (torch.distributed)")
        if classes:
            parts.append(f"may not build {', '.join(classes)}")
        if self.backward:
            parts.append("nor autograd, torch.nn.grad or backward kernels")
        return "; ".join(parts)


REGISTRY: dict[str, Exercise] = {}
_LAST_STATUS: dict[str, str] = {}
# Only the course's own tests switch these on: to prove each reference passes its battery,
# and to plant mistakes built from the very operators an exercise forbids.
_REFERENCES_ALLOWED = False
_FORBIDDEN_CALLS_ALLOWED = False


@contextlib.contextmanager
def forbidden_calls_allowed() -> Iterator[None]:
    """For the course's own tests: switch off the guard against an exercise's forbidden calls."""
    global _FORBIDDEN_CALLS_ALLOWED
    saved, _FORBIDDEN_CALLS_ALLOWED = _FORBIDDEN_CALLS_ALLOWED, True
    try:
        yield
    finally:
        _FORBIDDEN_CALLS_ALLOWED = saved


@contextlib.contextmanager
def references_allowed() -> Iterator[None]:
    """For the course's own tests: let check() accept the course's references as answers."""
    global _REFERENCES_ALLOWED
    saved, _REFERENCES_ALLOWED = _REFERENCES_ALLOWED, True
    try:
        yield
    finally:
        _REFERENCES_ALLOWED = saved


def exercise(
    id: str,
    *,
    chapter: str,
    signature: str,
    summary: str,
    reference: Callable[..., Any] | None = None,
    backward: bool = False,
    forbidden: tuple[str, ...] = (),
    budget: float = 2.0,
) -> Callable[[Callable[[Tester], None]], Callable[[Tester], None]]:
    """Register the decorated function as the check battery of exercise ``id``.

    ``forbidden`` names the PyTorch operators the exercise rebuilds: a bare name
    (``"softmax"``) forbids every form of it, a qualified one (``"F.unfold"``) that form only;
    ``"dist.all_reduce"`` forbids a torch.distributed call and a dotted class path
    (``"torch.nn.parallel.DistributedDataParallel"``) building that class (see ``invoke_world``).
    ``budget`` is the seconds its check may take on one core (the contract's 2 s; 10 s for
    distributed exercises), measured by ``course_utils.bench``.
    """

    def register(battery: Callable[[Tester], None]) -> Callable[[Tester], None]:
        if id in REGISTRY:
            raise ValueError(f"exercise {id!r} is registered twice")
        REGISTRY[id] = Exercise(
            id,
            chapter,
            signature,
            summary,
            battery,
            reference,
            _arg_names(signature),
            backward,
            tuple(forbidden),
            float(budget),
        )
        return battery

    return register


def _arg_names(signature: str) -> tuple[str, ...]:
    """Argument names of a contract signature such as ``(x, weight (F,C,KH,KW), bias=None) -> out``."""
    if signature.lstrip().startswith("class") or "(" not in signature:
        return ()  # class exercises name their own arguments in the battery's messages
    depth, part, parts = 0, "", []
    for ch in signature[signature.index("(") + 1 :]:
        if ch == "(":
            depth += 1
        elif ch == ")":
            if depth == 0:
                break
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(part)
            part = ""
        elif depth == 0 and ch not in "()":
            part += ch
    parts.append(part)
    names = []
    for piece in parts:
        # "weight ", "bias  or None", "momentum=0.1", "word: str" -> the leading identifier
        name = piece.strip().split("=")[0].split(":")[0].split(" ")[0].strip()
        if name and name != "*":
            names.append(name)
    return tuple(names)


def _registry() -> dict[str, Exercise]:
    from . import checks  # noqa: F401  (importing registers every battery)

    return REGISTRY


def get_exercise(exercise_id: str) -> Exercise:
    """The registered exercise ``exercise_id``; ``KeyError`` naming close matches otherwise."""
    reg = _registry()
    if exercise_id not in reg:
        close = difflib.get_close_matches(str(exercise_id), list(reg), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(
            f"No exercise is called {exercise_id!r}.{hint} cu.exercises() lists them all."
        )
    return reg[exercise_id]


class ExerciseList(list):
    """The list of exercises; prints as a table."""

    def __str__(self) -> str:
        def usage(e: Exercise) -> str:
            return e.signature if e.signature.startswith("class") else f"{e.id}{e.signature}"

        def rules(e: Exercise) -> str:
            return f"\n{'':<38}   {e.forbidden_text()}" if e.forbidden else ""

        return "\n".join(
            f"{e.chapter:<38} {usage(e)}\n{'':<38}   {e.id}: {e.summary}{rules(e)}" for e in self
        )

    __repr__ = __str__


def exercises(chapter: str | None = None) -> ExerciseList:
    """Every exercise (optionally of one chapter, by number or name) with signature and summary."""
    out = ExerciseList(_registry().values())
    if chapter is not None:
        chapter = str(chapter)
        out = ExerciseList(
            e for e in out if e.chapter == chapter or e.chapter.split("_")[0] == chapter.zfill(2)
        )
    return out


def strict_mode(strict: bool | None = None) -> bool:
    """Strict when asked, else when the environment sets COURSE_STRICT=1."""
    if strict is not None:
        return bool(strict)
    return os.environ.get("COURSE_STRICT", "").strip().lower() in {"1", "true", "yes", "on"}


def check(
    exercise_id: str, fn: Callable[..., Any], *, strict: bool | None = None, seed: int = 0
) -> Report:
    """Run the battery of ``exercise_id`` on ``fn`` and return a Report; raise CheckFailure if wrong."""
    ex = get_exercise(exercise_id)
    if not callable(fn):
        raise CheckFailure(
            f"{exercise_id}: expected a function (or class), got {type(fn).__name__}."
        )
    handed_in = reference_named(fn)
    if handed_in and _REFERENCES_ALLOWED:
        # The course's tests prove a reference passes: it may use the operators it stands for.
        with forbidden_calls_allowed():
            return run_battery(ex, Tester(ex, fn, seed), strict=strict, seed=seed)
    try:
        if handed_in:
            _LAST_STATUS[exercise_id] = "failed"
            raise CheckFailure(
                f"{exercise_id}: this is the course's own reference ({handed_in}), not your code; "
                "the check passes only your own implementation."
            )
        report = run_battery(ex, Tester(ex, fn, seed), strict=strict, seed=seed)
    except CheckFailure:
        progress.record(exercise_id, ex.chapter, "failed")
        raise
    progress.record(exercise_id, ex.chapter, report.status)
    return report


def run_battery(ex: Exercise, tester: Tester, *, strict: bool | None, seed: int) -> Report:
    """Run ``ex``'s battery with ``tester`` (local or remote); the Report, or CheckFailure."""
    exercise_id = ex.id
    start = time.perf_counter()
    try:
        with _seeded(seed):
            ex.battery(tester)
    except _Pending:
        _LAST_STATUS[exercise_id] = "pending"
        if strict_mode(strict):
            raise CheckFailure(
                f"{exercise_id} is not implemented yet (it raised NotImplementedError), "
                "and strict mode (grading, COURSE_STRICT=1) counts that as a failure."
            ) from None
        report = Report(
            exercise_id, "pending", message="Write the function above, then run this cell again."
        )
        print(report.headline())
        return report
    except CheckFailure as failure:
        _LAST_STATUS[exercise_id] = "failed"
        raise CheckFailure(f"{exercise_id}: {failure}") from None
    _LAST_STATUS[exercise_id] = "passed"
    return Report(exercise_id, "passed", tester.rows, time.perf_counter() - start)


def reference_fingerprints() -> dict[str, str]:
    """Code digest of every reference the course ships -> how a learner would name it."""
    found: dict[str, str] = {}
    for e in _registry().values():
        if e.reference is not None:
            found.setdefault(code_fingerprint(e.reference), f"cu.reference({e.id!r})")
    for fn in reference_functions():
        found.setdefault(code_fingerprint(fn), f"{fn.__module__}.{fn.__name__}")
    found.pop("", None)
    return found


def reference_named(fn: Any) -> str:
    """How ``fn`` is known if it is (a copy of) one of the course's references, else ''."""
    return reference_fingerprints().get(code_fingerprint(fn), "")


def last_status(exercise_id: str) -> str | None:
    """The status of the latest check of ``exercise_id`` in this session, or None."""
    return _LAST_STATUS.get(exercise_id)


def learner_or_reference(exercise_id: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` if its latest check passed, else the course's reference (so explore cells always run)."""
    if _LAST_STATUS.get(exercise_id) == "passed":
        return fn
    ref = get_exercise(exercise_id).reference
    if ref is None:
        raise KeyError(f"{exercise_id} has no reference implementation")
    print(f"(Using the course's reference {exercise_id} until yours passes its check.)")
    return ref


def reference(exercise_id: str) -> Callable[..., Any]:
    """The course's reference implementation of ``exercise_id``."""
    ref = get_exercise(exercise_id).reference
    if ref is None:
        raise KeyError(f"{exercise_id} has no reference implementation")
    return ref


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # The learner's own code may draw from the global generator; keep the caller's stream intact.
    # One thread: the budget is per core, and small tensors run faster without thread hand-offs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            if torch.cuda.is_initialized():
                torch.manual_seed(seed)
            else:
                # torch.manual_seed would also queue a seeding of CUDA for whenever it starts,
                # formatting a stack trace for each of three device types: milliseconds per check.
                torch.random.default_generator.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


class Opaque:
    """An object a learner's kernel returned that is not plain data: only its type name travels."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def __repr__(self) -> str:
        return f"<{self.type_name} from the kernel>"


def _describe(x: Any) -> str:
    if isinstance(x, Opaque):
        return f"a {x.type_name}"
    if torch.is_tensor(x):
        return f"a {str(x.dtype).replace('torch.', '')} tensor of shape {tuple(x.shape)}"
    if x is None:
        return "None"
    if isinstance(x, tuple | list):
        return f"a {type(x).__name__} of length {len(x)}"
    return (
        f"a {type(x).__module__.split('.')[0]}.{type(x).__name__}"
        if type(x).__module__ != "builtins"
        else f"a {type(x).__name__}"
    )


def _snapshot(x: Any) -> Any:
    if torch.is_tensor(x):
        return x.detach().clone()
    if isinstance(x, tuple | list):
        return type(x)(_snapshot(v) for v in x)
    return x


def _unchanged(before: Any, after: Any) -> bool:
    if torch.is_tensor(before):
        return before.shape == after.shape and bool(
            torch.equal(torch.nan_to_num(before), torch.nan_to_num(after.detach()))
        )
    if isinstance(before, tuple | list):
        return all(_unchanged(b, a) for b, a in zip(before, after, strict=True))
    return True


def _bind_probe(probe: Callable[..., Any], fn: Callable[..., Any]) -> Callable[..., Any]:
    def bound(*args: Any, **kwargs: Any) -> Any:
        return probe(fn, *args, **kwargs)

    return bound


class Tester:
    """What a battery uses to call the learner's function and judge what it returns."""

    __test__ = False  # not a pytest test class, despite its name

    def __init__(self, ex: Exercise, fn: Callable[..., Any], seed: int) -> None:
        self.exercise = ex
        self.fn = fn
        self.seed = seed
        self.rows: list[Row] = []
        self.gen = torch.Generator().manual_seed(seed)
        self.last_watch: Any = None
        self.last_args: tuple[Any, ...] = ()
        self.last_kwargs: dict[str, Any] = {}

    # ---- making inputs -------------------------------------------------------------
    def randn(self, *shape: int, dtype: torch.dtype = torch.float64, scale: float = 1.0) -> Tensor:
        """Standard normal numbers from the check's own seeded generator."""
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64).mul_(scale).to(dtype)

    def randint(self, high: int, *shape: int) -> Tensor:
        """Integers in [0, high) from the check's own seeded generator."""
        return torch.randint(0, high, shape, generator=self.gen)

    def rand(self, *shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
        """Uniform numbers in [0, 1) from the check's own seeded generator."""
        return torch.rand(*shape, generator=self.gen, dtype=torch.float64).to(dtype)

    # ---- calling the learner's function ---------------------------------------------
    def call(
        self,
        case: str,
        *args: Any,
        fn: Callable[..., Any] | None = None,
        watch: Callable[[], Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Call the learner's function on ``args``; guard inputs, autograd and exceptions.

        ``watch`` makes an observer (a context manager with a ``report()``) armed around the
        call; its report is left in ``self.last_watch``.
        """
        fn = self.fn if fn is None else fn
        name = getattr(fn, "__name__", self.exercise.id)
        return self._guarded(case, name, fn, None, args, kwargs, watch)

    def probe(self, case: str, probe: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``probe(learner_fn, *args, **kwargs)`` where the learner's function lives; return its result.

        For properties that need the learner's function itself (a gradient through its
        output, say): when grading, the probe runs in the learner's kernel and only its
        plain result comes back. ``probe`` must be a module-level function of the battery.
        """
        name = getattr(self.fn, "__name__", self.exercise.id)
        return self._guarded(case, name, self.fn, probe, args, kwargs, None)

    def world(
        self,
        case: str,
        world_size: int,
        args_per_rank: Sequence[tuple[Any, ...]],
        kwargs_per_rank: Sequence[dict[str, Any]] | None = None,
        *,
        probe: Callable[..., Any] | None = None,
        watch: Callable[[], Any] | None = None,
        timeout: float = 5.0,
    ) -> list[Any]:
        """Call the learner's function on every rank of a forked gloo world; the values by rank.

        Rank ``r`` gets ``args_per_rank[r]`` and ``kwargs_per_rank[r]``. The exercise's guards
        (references, forbidden operators and ``torch.distributed`` calls, autograd for backward
        exercises, ``watch``) are armed on every rank, and each rank's inputs must come back
        unchanged. With ``probe``, each rank runs ``probe(learner_fn, *args, **kwargs)`` instead
        (a module-level function of the battery returning plain data). A rank that raises, dies
        or deadlocks, or trips a guard, fails the case with a message naming the rank.
        ``self.last_watch`` holds the watch reports by rank.
        """
        if len(args_per_rank) != world_size or (
            kwargs_per_rank is not None and len(kwargs_per_rank) != world_size
        ):
            raise ValueError(f"a world of {world_size} needs arguments for each of its ranks")
        args_list = [tuple(a) for a in args_per_rank]
        kwargs_list = [dict(k) for k in kwargs_per_rank or [{} for _ in range(world_size)]]
        name = getattr(self.fn, "__name__", self.exercise.id)
        before = [_snapshot(a) for a in args_list]
        before_kw = [{k: _snapshot(v) for k, v in kw.items()} for kw in kwargs_list]
        outcome = self._invoke_world(
            world_size, args_list, kwargs_list, probe, watch, float(timeout)
        )
        kind = outcome["kind"]
        if kind != "ok":
            self._world_failure(case, name, world_size, outcome)
        self.last_watch = outcome.get("watch")
        names = self.exercise.arg_names
        for rank in range(world_size):
            after = outcome["args"][rank]
            for i, (b, a) in enumerate(zip(before[rank], after, strict=True)):
                if not _unchanged(b, a):
                    arg = names[i] if i < len(names) else f"argument {i + 1}"
                    self.fail(
                        case,
                        f"on rank {rank} of {world_size}, {name} changed its input `{arg}` in "
                        "place. Build new tensors instead (for example `buf = tensor.clone()`, "
                        "then work on `buf`).",
                    )
            for k, b in before_kw[rank].items():
                if not _unchanged(b, outcome["kwargs"][rank].get(k)):
                    self.fail(
                        case,
                        f"on rank {rank} of {world_size}, {name} changed its input `{k}` in place.",
                    )
        return list(outcome["values"])

    def _world_failure(
        self, case: str, name: str, world_size: int, outcome: dict[str, Any]
    ) -> None:
        """Turn a failed world outcome into the CheckFailure a learner reads."""
        kind, rank = outcome["kind"], outcome.get("rank", 0)
        on = f"on rank {rank} of {world_size}, "
        message = str(outcome.get("message", ""))
        if kind == "pending":
            raise _Pending
        if kind == "deadlock":
            self.fail(
                case,
                f"{name} deadlocked (every rank waits for a message no rank sends): {message}. "
                "Look at the order of sends and receives.",
            )
        if kind == "died":
            self.fail(case, f"{name} did not come back from the world: {message}.")
        if kind == "reference":
            self.fail(
                case,
                f"{on}{name} ran the course's reference implementation; the check "
                "passes only your own code.",
            )
        if kind == "forbidden":
            self.fail(
                case,
                f"{on}{name} called {message}, which this exercise does not allow; "
                f"build it yourself ({self.exercise.forbidden_text()}).",
            )
        if kind == "autograd":
            self.fail(case, f"{on}{name} called autograd ({message}); derive the gradient by hand.")
        if kind == "guard":
            self.fail(
                case,
                f"{on}a guard of the check was switched off while {name} ran "
                f"({message}); the case cannot be judged.",
            )
        where = outcome.get("where", "")
        self.fail(
            case, f"{on}{name} raised {outcome.get('error_type', 'an error')}: {message}{where}."
        )

    def _invoke_world(
        self,
        world_size: int,
        args_per_rank: list[tuple[Any, ...]],
        kwargs_per_rank: list[dict[str, Any]],
        probe: Callable[..., Any] | None,
        watch: Callable[[], Any] | None,
        timeout: float,
    ) -> dict[str, Any]:
        """Run one guarded world here, forked from this process (the grader runs it in the kernel)."""
        return invoke_world(
            self.fn,
            world_size,
            args_per_rank,
            kwargs_per_rank,
            probe=probe,
            backward=self.exercise.backward,
            forbidden=() if _FORBIDDEN_CALLS_ALLOWED else self.exercise.forbidden,
            watch=watch,
            references=[] if _REFERENCES_ALLOWED else None,
            timeout=timeout,
        )

    def _invoke(
        self,
        fn: Callable[..., Any],
        probe: Callable[..., Any] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        watch: Callable[[], Any] | None,
    ) -> dict[str, Any]:
        """Run one guarded call here, in this process (the grader replaces this with a remote call)."""
        target = fn if probe is None else _bind_probe(probe, fn)
        refs = [] if _REFERENCES_ALLOWED else None
        return invoke(
            target,
            args,
            kwargs,
            backward=self.exercise.backward,
            watch=watch,
            references=refs,
            forbidden=() if _FORBIDDEN_CALLS_ALLOWED else self.exercise.forbidden,
        )

    def _guarded(
        self,
        case: str,
        name: str,
        fn: Callable[..., Any],
        probe: Callable[..., Any] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        watch: Callable[[], Any] | None,
    ) -> Any:
        before = [_snapshot(a) for a in args]
        before_kw = {k: _snapshot(v) for k, v in kwargs.items()}
        outcome = self._invoke(fn, probe, args, kwargs, watch)
        self.last_watch = outcome.get("watch")
        kind = outcome["kind"]
        if kind == "pending":
            raise _Pending
        if kind == "reference":
            raise CheckFailure(
                f"in case {case}, {name} ran the course's reference implementation; "
                "the check passes only your own code."
            )
        if kind == "forbidden":
            raise CheckFailure(
                f"in case {case}, {name} called {outcome['message']}, the operator this exercise "
                "asks you to build yourself; write it from more basic operations "
                f"({self.exercise.forbidden_text()})."
            )
        if kind == "autograd":
            raise CheckFailure(
                f"in case {case}, {name} called autograd ({outcome['message']}); "
                "this exercise asks you to derive the gradient by hand."
            )
        if kind == "guard":
            raise CheckFailure(
                f"in case {case}, a guard of the check was switched off while {name} ran "
                f"({outcome['message']}); the case cannot be judged."
            )
        if kind == "error":
            err = outcome.get("exception")
            if isinstance(err, CheckFailure):
                raise err
            text, where = outcome["message"], outcome.get("where", "")
            hint = ""
            if self.exercise.backward and "does not require grad" in text:
                hint = " It looks like it used autograd; derive the gradient by hand instead."
            elif "must match the size" in text and not isinstance(fn, type):
                hint = " A reduction (max, sum, mean) without keepdim=True often causes this."
            raise CheckFailure(
                f"in case {case}, {name} raised {outcome['error_type']}: {text}{where}.{hint}"
            )
        after, after_kw = outcome.get("args", args), outcome.get("kwargs", kwargs)
        # What the call left in its arguments, wherever it ran: an exercise whose contract
        # updates a dict argument (chapter 06's bn_state) is judged on these.
        self.last_args, self.last_kwargs = tuple(after), dict(after_kw)
        names = self.exercise.arg_names
        for i, (b, a) in enumerate(zip(before, after, strict=True)):
            if not _unchanged(b, a):
                arg = names[i] if i < len(names) else f"argument {i + 1}"
                raise CheckFailure(
                    f"in case {case}, {name} changed its input `{arg}` in place. Build new tensors "
                    "instead (for example `x = x - m` rather than `x -= m`)."
                )
        for k, b in before_kw.items():
            if not _unchanged(b, after_kw[k]):
                raise CheckFailure(f"in case {case}, {name} changed its input `{k}` in place.")
        return outcome["value"]

    def function_class(self, example: str) -> type:
        """The learner's ``torch.autograd.Function`` subclass; CheckFailure if something else was passed."""
        cls = self.fn
        if isinstance(cls, type) and issubclass(cls, torch.autograd.Function):
            return cls
        if isinstance(cls, torch.autograd.Function):
            got = f"an instance, {type(cls).__name__}(); drop the parentheses"
        elif isinstance(cls, type):
            got = f"the class {cls.__name__}, which does not subclass torch.autograd.Function"
        else:
            got = f"{type(cls).__name__} {getattr(cls, '__name__', '')}".strip()
        raise CheckFailure(
            f"pass the class itself, a subclass of torch.autograd.Function, but got {got}. "
            f"For example: {example}."
        )

    # ---- judging outputs -------------------------------------------------------------
    def fail(self, case: str, message: str) -> None:
        """Fail the check with a message about ``case``."""
        raise CheckFailure(f"in case {case}, {message}")

    def ok(self, case: str, quantity: str, note: str = "ok") -> None:
        """Record a passed property test (no error numbers)."""
        self.rows.append(Row(case, quantity, None, None, note))

    def unpack(self, case: str, out: Any, names: Sequence[str]) -> tuple[Any, ...]:
        """Check that ``out`` is a tuple of ``len(names)`` things and return it."""
        if not isinstance(out, tuple | list) or len(out) != len(names):
            self.fail(
                case,
                f"expected a tuple ({', '.join(names)}), but the function returned {_describe(out)}.",
            )
        return tuple(out)

    def expect_tensor(
        self,
        case: str,
        quantity: str,
        got: Any,
        *,
        shape: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = "cpu",
    ) -> Tensor:
        """Check type, shape, dtype and device of one output; return it."""
        want = []
        if shape is not None:
            want.append(f"shape {tuple(shape)}")
        if dtype is not None:
            want.append(f"dtype {str(dtype).replace('torch.', '')}")
        wanted = f"a tensor of {' and '.join(want)}" if want else "a tensor"
        if not torch.is_tensor(got):
            self.fail(case, f"`{quantity}` should be {wanted}, but it is {_describe(got)}.")
        if shape is not None and tuple(got.shape) != tuple(shape):
            self.fail(
                case,
                f"`{quantity}` should have shape {tuple(shape)}, but it has shape {tuple(got.shape)}.",
            )
        if dtype is not None and got.dtype != dtype:
            self.fail(
                case,
                f"`{quantity}` should have dtype {str(dtype).replace('torch.', '')} (the dtype of the inputs), "
                f"but it has dtype {str(got.dtype).replace('torch.', '')}.",
            )
        if device is not None and got.device != torch.device(device):
            self.fail(case, f"`{quantity}` should be on {device}, but it is on {got.device}.")
        return got

    def tolerances(self, dtype: torch.dtype, scale: float = 1.0) -> tuple[float, float]:
        """Default (rtol, atol) for ``dtype``, atol scaled by ``scale``."""
        rtol, atol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
        return rtol, atol * max(scale, 1.0)

    def compare(
        self,
        case: str,
        quantity: str,
        got: Any,
        expected: Tensor,
        *,
        rtol: float | None = None,
        atol: float | None = None,
        mistakes: Sequence[tuple[str, Any]] = (),
        dtype: torch.dtype | None = None,
        generic_hints: bool = True,
    ) -> Comparison:
        """Judge ``got`` against ``expected``; on failure name the worst index and any known mistake.

        ``mistakes`` pairs a sentence with what a mistaken implementation would return
        (a tensor, or a callable making one lazily); if ``got`` matches it, the sentence
        is part of the failure message.
        """
        dtype = expected.dtype if dtype is None else dtype
        got = self.expect_tensor(case, quantity, got, shape=expected.shape, dtype=dtype)
        scale = (
            float(expected.detach().abs().max())
            if expected.numel() and torch.isfinite(expected).all()
            else 1.0
        )
        d_rtol, d_atol = self.tolerances(dtype, scale)
        rtol = d_rtol if rtol is None else rtol
        atol = d_atol if atol is None else atol
        result = compare(got, expected, rtol, atol)
        if result.ok:
            self.rows.append(Row(case, quantity, result.max_abs, result.max_rel, "ok"))
            return result
        diagnosis = self._diagnose(got, expected, rtol, atol, mistakes, generic_hints)
        where = f" at index {result.worst_index}" if result.worst_index else ""
        msg = (
            f"`{quantity}` is wrong: max relative error {result.max_rel:.2e}{where} "
            f"(got {result.actual_value:.6g}, expected {result.expected_value:.6g})."
        )
        self.fail(case, msg + (f" {diagnosis}" if diagnosis else ""))
        raise AssertionError  # unreachable; fail() raised

    def _diagnose(
        self,
        got: Tensor,
        expected: Tensor,
        rtol: float,
        atol: float,
        mistakes: Sequence[tuple[str, Any]],
        generic: bool,
    ) -> str:
        for sentence, alt in mistakes:
            try:
                alt_t = alt() if callable(alt) else alt
            except Exception:  # noqa: BLE001 - a mistake model that cannot run does not match
                continue
            if torch.is_tensor(alt_t) and alt_t.shape == got.shape:
                if compare(got, alt_t.to(got.dtype), max(rtol, 1e-6), atol * 10).ok:
                    return f"It looks like {sentence}"
        if not generic:
            return ""
        g, e = got.detach().double(), expected.detach().double()
        if not torch.isfinite(g).all() and torch.isfinite(e).all():
            return "The output has NaN or inf where the true values are finite: look for an overflow (exp of a large number) or log(0)."
        if compare(g, -e, rtol, atol).ok:
            return "It looks like the sign is flipped."
        denom = (e * e).sum()
        # Any two numbers differ by a constant factor: the hint needs several nonzero entries.
        nonzero = int((e.abs() > atol).sum())
        if nonzero >= _MIN_FACTOR_ENTRIES and float(denom) > 0:
            k = float((g * e).sum() / denom)
            if abs(k) > 1e-12 and abs(k - 1) > 1e-3 and compare(g, k * e, rtol * 10, atol * 10).ok:
                return f"It is off by a constant factor of {k:.4g} everywhere (a missing or extra scale, such as 1/N)."
        if g.dim() == 2 and g.shape[0] == g.shape[1] and compare(g, e.T, rtol, atol).ok:
            return "It looks transposed."
        return ""
