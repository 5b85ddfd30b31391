"""Check battery of chapter 04: inverted dropout.

Dropout is random, so most of this battery judges properties rather than numbers:
every output entry must be 0 or exactly x/(1-p), and the pattern of zeros must look
like independent coin flips with probability p (right fraction, no shared masks
along any dimension, a fresh mask on every call, the mean preserved). Each statistical
test uses a Hoeffding bound with false-alarm probability ``DELTA``; the battery runs at
most ``MAX_STAT_TESTS`` of them, so a correct dropout fails it less than once in 10^6
runs, however it draws its random numbers (torch.rand, torch.bernoulli, numpy, Python's
``random``, ...).
"""

from __future__ import annotations

import math

import torch

from ..checking import CheckFailure, Tester, exercise
from ..stats import hoeffding_radius

CHAPTER = "04_dropout"
Tensor = torch.Tensor

#: False-alarm probability of each statistical test of the battery.
DELTA = 5e-8
#: Upper bound on the number of statistical tests one run performs (16 today); the total
#: false-alarm probability is at most MAX_STAT_TESTS * DELTA = 1e-6, by the union bound.
MAX_STAT_TESTS = 20
FALSE_ALARM = MAX_STAT_TESTS * DELTA


# ---- reference implementation ------------------------------------------------------------
def ref_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout: zero each entry with probability p, scale survivors by 1/(1-p)."""
    if not training or p == 0:
        return x.clone()
    if p == 1:
        return torch.zeros_like(x)  # 1/(1-p) would be 1/0: every entry is dropped anyway
    keep = torch.rand_like(x) >= p  # P(keep) = 1 - p
    return x * keep / (1 - p)


# ---- helpers -----------------------------------------------------------------------------
def _hoeffding(n: int, delta: float = DELTA) -> float:
    """The Hoeffding half-width at this chapter's per-test false-alarm rate."""
    return hoeffding_radius(n, delta)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _nonzero(t: Tester, *shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Normal numbers pushed away from 0, so that a zero in the output can only mean 'dropped'."""
    r = t.randn(*shape)
    return (r + 0.25 * torch.where(r >= 0, 1.0, -1.0)).to(dtype)


def _positive(t: Tester, *shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Uniform numbers in [0.5, 1.5): a positive input for the mean test."""
    return (0.5 + t.rand(*shape)).to(dtype)


def _call(
    t: Tester, case: str, x: Tensor, p: float, training: bool | None, keyword: bool
) -> object:
    """Call dropout as (x, p), (x, p, training) or (x, p, training=...); add a hint to a division by zero."""
    try:
        if training is None:
            return t.call(case, x, p)
        if keyword:
            return t.call(case, x, p, training=training)
        return t.call(case, x, p, training)
    except CheckFailure as err:
        if "ZeroDivisionError" in str(err):
            raise CheckFailure(
                f"{err} With p=1 the factor 1/(1-p) is a division by zero: every entry is dropped, "
                "so return zeros (torch.zeros_like(x)) when p == 1."
            ) from None
        raise


def _output(t: Tester, case: str, got: object, x: Tensor) -> Tensor:
    """Type, shape and dtype of dropout's output, with words for the usual wrong returns."""
    if isinstance(got, tuple | list):
        t.fail(
            case,
            f"dropout returned a {type(got).__name__} of length {len(got)}; the contract returns "
            "only the output tensor (not the mask as well).",
        )
    if torch.is_tensor(got) and got.dtype == torch.bool:
        t.fail(
            case,
            "dropout returned a bool tensor: that looks like the mask itself. Return "
            "x * mask / (1 - p), a tensor of x's dtype.",
        )
    return t.expect_tensor(case, "output", got, shape=x.shape, dtype=x.dtype).detach()


def _judge_survivors(t: Tester, case: str, out: Tensor, x: Tensor, p: float) -> Tensor:
    """Every entry is 0 or x/(1-p); return the dropped mask (bool, shape of x)."""
    if not torch.isfinite(out).all():
        t.fail(
            case,
            f"the output has NaN or inf with p={p} (x is finite): in training mode each entry is "
            "either 0 or x/(1-p).",
        )
    dropped = out == 0
    x64 = x.double()
    zero = torch.zeros_like(x64)
    expected = torch.where(dropped, zero, x64 / (1 - p)).to(x.dtype)
    mistakes: list[tuple[str, object]] = [
        (
            "survivors were scaled by (1-p), as in the original (non-inverted) dropout; inverted dropout "
            "scales them by 1/(1-p), so that nothing needs scaling at test time.",
            lambda: torch.where(dropped, zero, x64 * (1 - p)),
        ),
        (
            "survivors were not rescaled: inverted dropout divides them by (1-p), so that the expected "
            "output equals x.",
            lambda: torch.where(dropped, zero, x64),
        ),
        (
            "survivors were scaled by 1/p; p is the probability of DROPPING an entry, so survivors "
            "are scaled by 1/(1-p), the inverse of the keep probability.",
            lambda: torch.where(dropped, zero, x64 / p),
        ),
        (
            "the output is the scaled mask m/(1-p) itself; multiply it by x.",
            lambda: torch.where(dropped, zero, torch.full_like(x64, 1 / (1 - p))),
        ),
        (
            "the output is the 0/1 mask itself; return x * mask / (1 - p).",
            lambda: torch.where(dropped, zero, torch.ones_like(x64)),
        ),
    ]
    if p != 0.5:
        mistakes.append(
            (
                "survivors were scaled by 2 whatever p is: p seems to be hard-coded to 0.5 instead of "
                "taken from the argument.",
                lambda: torch.where(dropped, zero, 2 * x64),
            )
        )
    try:
        t.compare(case, "output (0 or x/(1-p))", out, expected, mistakes=mistakes)
    except CheckFailure as err:
        if "It looks like" in str(err):
            raise
        ratio = (out.double() / x64)[~dropped]
        if ratio.numel() > 1 and float(ratio.max() - ratio.min()) > 1e-3 * float(ratio.abs().max()):
            raise CheckFailure(
                f"{err} The surviving entries are not x times one common factor: the mask must be 0 or 1 "
                "(compare uniform numbers with p), not the uniform numbers themselves, and every "
                "survivor is multiplied by the same 1/(1-p)."
            ) from None
        raise
    return dropped


def _train_output(
    t: Tester, case: str, x: Tensor, p: float, training: bool | None = True, keyword: bool = False
) -> Tensor:
    """Call dropout in training mode, judge type and values, and return the dropped mask."""
    out = _output(t, case, _call(t, case, x, p, training, keyword), x)
    return _judge_survivors(t, case, out, x, p)


# ---- training mode: values ---------------------------------------------------------------------
def _check_values(t: Tester) -> None:
    cases = [
        ((4, 5), torch.float64, 0.25, True, False),
        ((7,), torch.float64, 0.6, True, False),
        ((2, 3, 4), torch.float32, 0.4, True, False),
        ((2, 3, 5, 5), torch.float64, 0.1, True, False),
        ((3, 8), torch.float32, 0.75, True, True),
        ((1, 1), torch.float64, 0.5, True, False),
    ]
    for shape, dtype, p, training, keyword in cases:
        how = "training=True as a keyword" if keyword else "training=True"
        case = f"x {shape} {_dt(dtype)}, p={p}, {how}"
        _train_output(t, case, _nonzero(t, *shape, dtype=dtype), p, training, keyword)

    # Two arguments only: the default must be training=True. 100 entries at p=0.5 all
    # surviving has probability 2^-100, so "nothing dropped" means dropout was off.
    case = "x (10, 10) float64, p=0.5, training left at its default"
    x = _nonzero(t, 10, 10)
    out = _output(t, case, _call(t, case, x, 0.5, None, False), x)
    if torch.equal(out, x):
        t.fail(
            case,
            "the output equals x: with `training` left out dropout must be active, "
            "the contract's default is training=True.",
        )
    _judge_survivors(t, case, out, x, 0.5)


# ---- the edge cases p=0 and p=1 ------------------------------------------------------------------
def _check_p0_p1(t: Tester) -> None:
    for shape, dtype in (((5, 4), torch.float64), ((3, 4, 5), torch.float32)):
        case = f"x {shape} {_dt(dtype)}, p=0, training=True"
        x = _nonzero(t, *shape, dtype=dtype)
        out = _output(t, case, _call(t, case, x, 0.0, True, False), x)
        t.compare(
            case,
            "output (= x)",
            out,
            x,
            mistakes=[
                (
                    "with p=0 every entry was zeroed: p is the probability of DROPPING an entry, so p=0 keeps "
                    "everything (keep where rand >= p, not where rand < p).",
                    torch.zeros_like(x),
                ),
            ],
        )

    for shape, dtype in (((4, 6), torch.float64), ((2, 3, 4, 4), torch.float32)):
        case = f"x {shape} {_dt(dtype)}, p=1, training=True"
        x = _nonzero(t, *shape, dtype=dtype)
        out = _output(t, case, _call(t, case, x, 1.0, True, False), x)
        if not torch.isfinite(out).all():
            t.fail(
                case,
                "with p=1 the output has NaN or inf: x * mask / (1 - p) is 0/0 = NaN (or x/0 = inf) "
                "when every entry is dropped. Return zeros (torch.zeros_like(x)) when p == 1.",
            )
        t.compare(
            case,
            "output (= 0)",
            out,
            torch.zeros_like(x),
            mistakes=[
                (
                    "with p=1 the input came back unchanged: p=1 drops every entry, so the output is all zeros.",
                    x,
                ),
            ],
        )


# ---- eval mode ---------------------------------------------------------------------------------
def _check_eval(t: Tester) -> None:
    cases = [
        ((5, 6), torch.float64, 0.5, True),
        ((2, 3, 4, 4), torch.float32, 0.3, False),
        ((4, 4), torch.float64, 1.0, True),
        ((3, 5), torch.float64, 0.0, False),
        ((6,), torch.float32, 0.8, True),
    ]
    for shape, dtype, p, keyword in cases:
        how = "as a keyword" if keyword else "positionally"
        case = f"x {shape} {_dt(dtype)}, p={p}, training=False passed {how}"
        x = _nonzero(t, *shape, dtype=dtype)
        got = _call(t, case, x, p, False, keyword)
        out = _output(t, case, got, x)
        zeroed = int(((out == 0) & (x != 0)).sum())
        if zeroed:
            t.fail(
                case,
                f"{zeroed} of {x.numel()} entries were zeroed with training=False: in eval mode "
                "dropout is switched off and returns x unchanged.",
            )
        if not torch.isfinite(out).all():
            t.fail(
                case,
                f"with training=False the output has NaN or inf (p={p}): in eval mode dropout "
                "returns x unchanged, with no division by (1-p).",
            )
        mistakes: list[tuple[str, object]] = [
            (
                "in eval mode the output was multiplied by (1-p): that is the test-time rule of the original "
                "dropout. Inverted dropout already scaled the survivors by 1/(1-p) during training, so eval "
                "is the identity.",
                x * (1 - p),
            ),
        ]
        if p < 1:
            mistakes.insert(
                0,
                (
                    "in eval mode the output was divided by (1-p): the scaling belongs to training only; "
                    "with training=False dropout returns x unchanged.",
                    x / (1 - p),
                ),
            )
        t.compare(case, "output (= x)", out, x, mistakes=mistakes)
        # Returning x itself is allowed here (F.dropout does the same); the input must still be intact,
        # which t.call has verified.
        note = "ok (x itself, allowed)" if got is x else "ok (a new tensor)"
        t.ok(case, "input untouched, identity", note)


# ---- independence: no mask shared along a dimension or across calls ---------------------------
def _pairs(dropped: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Neighbouring entries (2k, 2k+1) along ``dim``: disjoint pairs, so their indicators are iid."""
    size = dropped.shape[dim] - dropped.shape[dim] % 2
    even = dropped.index_select(dim, torch.arange(0, size, 2))
    odd = dropped.index_select(dim, torch.arange(1, size, 2))
    return even, odd


def _shared_hint(ndim: int, dim: int) -> str:
    if dim == 0:
        return (
            "the same mask for every sample (a mask without the batch dimension, such as "
            "torch.rand(x.shape[1:]) or torch.rand(x.shape[-1]), broadcast over rows)"
        )
    if ndim >= 3 and dim >= 2:
        return (
            "one coin flip per channel, shared by all its positions (as nn.Dropout1d/2d do); this "
            "exercise drops every entry independently"
        )
    return f"one coin flip shared along dim {dim} (a mask with size 1 there, broadcast)"


def _check_independence(t: Tester) -> None:
    p = 0.5  # p = 1 - p, so a swapped keep/drop probability cannot disguise itself as dependence
    for shape, dtype in (((16, 10, 40), torch.float64), ((16, 4, 8, 8), torch.float32)):
        case = f"x {shape} {_dt(dtype)}, p={p}, independence of the zeros"
        x = _nonzero(t, *shape, dtype=dtype)
        dropped = _train_output(t, case, x, p)
        n = dropped.numel()
        q = float(dropped.double().mean())
        q_bound = _hoeffding(n)
        stats = []
        for dim in range(x.dim()):
            even, odd = _pairs(dropped, dim)
            both = float((even & odd).double().mean())
            stats.append((dim, both, _hoeffding(even.numel())))
        # A mask shared along a dim makes each pair identical: co-dropping at rate q, not q^2.
        for dim, both, bound in stats:
            if abs(both - p * p) > bound and both > (q + q * q) / 2:
                t.fail(
                    case,
                    f"neighbouring entries along dim {dim} were zeroed together {both:.1%} of the "
                    f"time while {q:.1%} of all entries were zeroed; independent coin flips give "
                    f"{p * p:.0%} ± {bound:.1%}. It looks like {_shared_hint(x.dim(), dim)}. Draw a "
                    "mask of the full shape of x.",
                )
        if abs(q - p) > q_bound:
            t.fail(
                case,
                f"{q:.2%} of the entries were zeroed with p={p}; a correct dropout zeroes "
                f"{p:.0%} of them, ± {q_bound:.2%} except once in {1 / DELTA:.0e} runs.",
            )
        t.ok(case, "fraction zeroed = p", f"ok ({q:.3f}, bound ±{q_bound:.3f})")
        for dim, both, bound in stats:
            if abs(both - p * p) > bound:
                t.fail(
                    case,
                    f"neighbouring entries along dim {dim} were zeroed together {both:.1%} of the "
                    f"time; independent coin flips with p={p} give {p * p:.0%} ± {bound:.1%}. Draw "
                    "one independent coin flip per entry.",
                )
            t.ok(
                case,
                f"P(pair along dim {dim} both zeroed) = p^2",
                f"ok ({both:.3f}, bound ±{bound:.3f})",
            )


def _check_fresh_masks(t: Tester) -> None:
    p = 0.5
    shape = (50, 40)
    x = _nonzero(t, *shape)
    case = f"x {shape} float64, p={p}, two calls on the same input"
    first = _train_output(t, f"{case} (first call)", x, p)
    second = _train_output(t, f"{case} (second call)", x, p)
    reuse = (
        "It looks like the mask was drawn once and reused (kept in a global or cached by shape), "
        "or the generator was reseeded inside the function (torch.manual_seed); draw a new mask on "
        "every call."
    )
    # Two independent masks of 2000 entries agree everywhere with probability 2^-2000.
    if torch.equal(first, second):
        t.fail(case, f"both calls zeroed exactly the same entries. {reuse}")
    q = float(torch.cat([first, second]).double().mean())
    both = float((first & second).double().mean())
    bound = _hoeffding(first.numel())
    if abs(both - p * p) > bound:
        why = reuse if both > (q + q * q) / 2 else "The masks of two calls must be independent."
        t.fail(
            case,
            f"the same entry was zeroed by both calls {both:.1%} of the time; independent calls "
            f"with p={p} give {p * p:.0%} ± {bound:.1%}. {why}",
        )
    t.ok(case, "P(zeroed in both calls) = p^2", f"ok ({both:.3f}, bound ±{bound:.3f})")


# ---- fraction zeroed and the mean, at several p ------------------------------------------------
def _check_fraction_and_mean(t: Tester) -> None:
    for shape, dtype, p in (
        ((60, 100), torch.float64, 0.2),
        ((15, 20, 20), torch.float32, 0.7),
        ((6000,), torch.float64, 0.9),
    ):
        case = f"x {shape} {_dt(dtype)}, p={p}, {math.prod(shape)} entries"
        x = _positive(t, *shape, dtype=dtype)
        out = _output(t, case, _call(t, case, x, p, True, False), x)
        dropped = _judge_survivors(t, case, out, x, p)
        n = dropped.numel()
        q = float(dropped.double().mean())
        bound = _hoeffding(n)
        if abs(q - p) > bound:
            hint = ""
            if abs(q - (1 - p)) <= bound:
                hint = (
                    " It looks like p was used as the probability of KEEPING an entry (keep where "
                    "rand < p); p is the probability of dropping it."
                )
            elif q == 0:
                hint = " Nothing was dropped at all."
            t.fail(
                case,
                f"{q:.2%} of the entries were zeroed with p={p}; a correct dropout zeroes "
                f"{p:.0%} of them, ± {bound:.2%} except once in {1 / DELTA:.0e} runs.{hint}",
            )
        t.ok(case, "fraction zeroed = p", f"ok ({q:.3f}, bound ±{bound:.3f})")

        # E[out_i] = x_i. Each out_i - x_i lies in an interval of length x_i/(1-p), so
        # Hoeffding gives |sum(out - x)| <= sqrt(log(2/delta) * sum(r_i^2) / 2) except with
        # probability delta.
        x64, o64 = x.double(), out.double()
        ranges = x64 / (1 - p)
        slack = math.sqrt(math.log(2 / DELTA) * float((ranges**2).sum()) / 2) / n
        m_out, m_x = float(o64.mean()), float(x64.mean())
        if abs(m_out - m_x) > slack:
            t.fail(
                case,
                f"the output's mean is {m_out:.4f} but the input's mean is {m_x:.4f}: inverted "
                f"dropout keeps the mean in expectation (E[m/(1-p)] = 1), within ±{slack:.4f} here.",
            )
        t.ok(
            case,
            "mean(output) = mean(x) in expectation",
            f"ok ({m_out - m_x:+.4f}, bound ±{slack:.4f})",
        )


@exercise(
    "dropout",
    forbidden=(
        "dropout",
        "dropout1d",
        "dropout2d",
        "dropout3d",
        "native_dropout",
        "feature_dropout",
        "alpha_dropout",
        "feature_alpha_dropout",
    ),
    chapter=CHAPTER,
    signature="(x, p, training=True) -> Tensor",
    summary="inverted dropout: zero each entry with probability p, scale survivors by 1/(1-p); "
    "identity when not training; p=1 gives zeros",
    reference=ref_dropout,
)
def check_dropout(t: Tester) -> None:
    """Values (0 or x/(1-p)), p=0, p=1, eval mode, independence, fresh masks, fraction and mean."""
    _check_values(t)
    _check_eval(t)
    _check_p0_p1(t)
    _check_independence(t)
    _check_fresh_masks(t)
    _check_fraction_and_mean(t)
