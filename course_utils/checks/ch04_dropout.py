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
#: PyTorch's dropout operators, which the dropout exercises rebuild and may not call.
DROPOUT_OPS = (
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "native_dropout",
    "feature_dropout",
    "alpha_dropout",
    "feature_alpha_dropout",
)


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
    forbidden=DROPOUT_OPS,
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


# =============================================================================================
# dropout_function: the backward pass, as an autograd Function that saves its mask
# =============================================================================================
class RefDropoutFunction(torch.autograd.Function):
    """Inverted dropout whose backward reuses the mask its forward drew (saved on ctx)."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float, training: bool) -> Tensor:  # noqa: D102
        if not training or p == 0:
            ctx.save_for_backward(None)
            ctx.scale = 1.0
            return x.clone()
        keep = torch.rand_like(x) >= p if p < 1 else torch.zeros_like(x, dtype=torch.bool)
        ctx.save_for_backward(keep)  # a bool mask: one byte an entry, not a copy of x
        ctx.scale = 0.0 if p == 1 else 1.0 / (1.0 - p)
        return x * keep * ctx.scale

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:  # noqa: D102
        (keep,) = ctx.saved_tensors
        if keep is None:
            return grad_output.clone(), None, None
        return grad_output * keep * ctx.scale, None, None


def _forward_backward(cls: type, x: Tensor, p: float, training: bool, dout: Tensor) -> tuple:
    """y = cls.apply(x, p, training), then d(sum(y * dout))/dx through the learner's backward."""
    xr = x.detach().clone().requires_grad_(True)
    y = cls.apply(xr, p, training)
    if not torch.is_tensor(y):
        return y, None
    if y.grad_fn is None:
        raise CheckFailure(
            f"the output of {cls.__name__}.apply carries no gradient; return a tensor computed "
            "from x in forward (autograd then calls your backward)."
        )
    try:
        (g,) = torch.autograd.grad(y, xr, dout)
    except RuntimeError as err:
        text = str(err)
        if "incorrect number of gradients" in text:
            raise CheckFailure(
                f"{cls.__name__}.backward returned the wrong number of gradients ({text.split('(')[-1].rstrip(')')}): "
                "backward returns one value per argument of forward after ctx, so (dx, None, None) "
                "for (x, p, training); p and training get no gradient."
            ) from None
        raise
    return y.detach(), g


def _check_function_train(t: Tester, cls: type, run: object) -> None:
    cases = [
        ((6, 8), torch.float64, 0.25),
        ((2, 3, 4, 5), torch.float32, 0.5),
        ((40, 25), torch.float64, 0.7),
    ]
    for shape, dtype, p in cases:
        case = f"x {shape} {_dt(dtype)}, p={p}, training=True, forward then backward"
        x = _nonzero(t, *shape, dtype=dtype)
        dout = _nonzero(t, *shape, dtype=dtype)
        y, g = t.call(case, x, p, True, dout, fn=run)
        y = _output(t, case, y, x)
        dropped = _judge_survivors(t, case, y, x, p)
        g = t.expect_tensor(case, "grad x", g, shape=x.shape, dtype=x.dtype)
        keep = (~dropped).to(dtype)
        expected = dout * keep / (1 - p)
        try:
            t.compare(
                case,
                "grad x (= grad_output * mask / (1-p), the forward's mask)",
                g,
                expected,
                mistakes=[
                    (
                        "backward forgot the 1/(1-p) scale: the forward multiplied the survivors by "
                        "1/(1-p), so the gradient of each survivor carries the same factor.",
                        dout * keep,
                    ),
                    (
                        "backward passed grad_output through unchanged: y depends on x only through the "
                        "kept entries, so multiply by the saved mask and by 1/(1-p).",
                        dout,
                    ),
                    (
                        "backward scaled grad_output by 1/(1-p) but forgot the mask: dropped entries get "
                        "no gradient.",
                        dout / (1 - p),
                    ),
                ],
            )
        except CheckFailure as err:
            if "It looks like" in str(err):
                raise
            g_zero = g == 0
            differ = int((g_zero != dropped).sum())
            if differ:
                raise CheckFailure(
                    f"{err} The gradient is zero at a different set of entries from the output "
                    f"({differ} of {x.numel()} entries differ): it looks like backward drew a fresh mask. "
                    "Save the forward's mask on ctx (ctx.save_for_backward) and reuse it in backward."
                ) from None
            raise
        t.ok(case, "zeros of grad x = zeros of the output", "ok (the same mask)")

    # The fraction zeroed, and a fresh mask on every forward call.
    p = 0.5
    shape = (60, 50)
    case = f"x {shape} float64, p={p}, two forward calls"
    x = _nonzero(t, *shape)
    dout = torch.ones_like(x)
    first = _judge_survivors(
        t, case, _output(t, case, t.call(case, x, p, True, dout, fn=run)[0], x), x, p
    )
    second = _judge_survivors(
        t, case, _output(t, case, t.call(case, x, p, True, dout, fn=run)[0], x), x, p
    )
    if torch.equal(first, second):
        t.fail(
            case,
            "both forward calls zeroed exactly the same entries: draw a new mask on every forward "
            "(not once, in a class attribute, nor after torch.manual_seed inside forward).",
        )
    n = first.numel()
    q = float(first.double().mean())
    bound = _hoeffding(n)
    if abs(q - p) > bound:
        t.fail(
            case,
            f"{q:.2%} of the entries were zeroed with p={p}; a correct dropout zeroes {p:.0%} of them, "
            f"± {bound:.2%} except once in {1 / DELTA:.0e} runs.",
        )
    t.ok(case, "fraction zeroed = p", f"ok ({q:.3f}, bound ±{bound:.3f})")
    both = float((first & second).double().mean())
    if abs(both - p * p) > bound:
        t.fail(
            case,
            f"the same entry was zeroed by both calls {both:.1%} of the time; independent masks give "
            f"{p * p:.0%} ± {bound:.1%}. Draw a new mask on every forward call.",
        )
    t.ok(case, "P(zeroed in both calls) = p^2", f"ok ({both:.3f}, bound ±{bound:.3f})")


def _check_function_edges(t: Tester, run: object) -> None:
    for shape, dtype in (((4, 6), torch.float64), ((3, 5), torch.float32)):
        case = f"x {shape} {_dt(dtype)}, p=1, training=True, forward then backward"
        x, dout = _nonzero(t, *shape, dtype=dtype), _nonzero(t, *shape, dtype=dtype)
        y, g = t.call(case, x, 1.0, True, dout, fn=run)
        y = _output(t, case, y, x)
        g = t.expect_tensor(case, "grad x", g, shape=x.shape, dtype=x.dtype)
        for name, got in (("output", y), ("grad x", g)):
            if not torch.isfinite(got).all():
                where = "forward" if name == "output" else "backward"
                t.fail(
                    case,
                    f"with p=1 the {name} has NaN or inf: {where} divided by 1-p = 0. Every entry is "
                    f"dropped, so the {name} is all zeros (use a scale of 0 when p == 1).",
                )
            t.compare(case, f"{name} (= 0)", got, torch.zeros_like(x))

    for shape, dtype, p in (
        ((5, 4), torch.float64, 0.5),
        ((2, 3, 4), torch.float32, 1.0),
        ((3, 3), torch.float64, 0.0),
    ):
        case = f"x {shape} {_dt(dtype)}, p={p}, training=False, forward then backward"
        if p == 0:
            case = f"x {shape} {_dt(dtype)}, p=0, training=True, forward then backward"
        training = p == 0
        x, dout = _nonzero(t, *shape, dtype=dtype), _nonzero(t, *shape, dtype=dtype)
        y, g = t.call(case, x, p, training, dout, fn=run)
        y = _output(t, case, y, x)
        mistakes = (
            []
            if p in (0, 1)
            else [
                ("the output was divided by (1-p) in eval mode; eval is the identity.", x / (1 - p))
            ]
        )
        t.compare(case, "output (= x)", y, x, mistakes=mistakes)
        g = t.expect_tensor(case, "grad x", g, shape=x.shape, dtype=x.dtype)
        if not torch.isfinite(g).all():
            t.fail(
                case,
                "grad x has NaN or inf: the identity's gradient is grad_output itself, with no "
                "division by (1-p).",
            )
        g_mistakes = (
            []
            if p in (0, 1)
            else [
                (
                    "backward scaled grad_output by 1/(1-p) although the forward was the identity: "
                    "remember on ctx whether the forward dropped anything.",
                    dout / (1 - p),
                )
            ]
        )
        t.compare(case, "grad x (= grad_output)", g, dout, mistakes=g_mistakes)


@exercise(
    "dropout_function",
    forbidden=(*DROPOUT_OPS, "native_dropout_backward"),
    chapter=CHAPTER,
    signature="class DropoutFunction(torch.autograd.Function): forward(ctx, x, p, training), "
    "backward(ctx, grad_output) -> (dx, None, None)",
    summary="inverted dropout as an autograd Function: forward saves its mask, backward multiplies "
    "grad_output by that same mask and 1/(1-p); identity (and identity gradient) when not training",
    reference=RefDropoutFunction,
)
def check_dropout_function(t: Tester) -> None:
    """Forward values and statistics, backward on the forward's own mask, p=1, p=0 and eval mode."""
    cls = t.function_class('cu.check("dropout_function", DropoutFunction)')

    def run(x: Tensor, p: float, training: bool, dout: Tensor) -> tuple:
        return _forward_backward(cls, x, p, training, dout)

    run.__name__ = f"{cls.__name__}.apply"
    _check_function_train(t, cls, run)
    _check_function_edges(t, run)


# =============================================================================================
# dropout2d: one coin per (sample, channel)
# =============================================================================================
def ref_dropout2d(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Channel dropout of x (N, C, H, W) or (N, C, L): zero whole channels with probability p."""
    if not training or p == 0:
        return x.clone()
    if p == 1:
        return torch.zeros_like(x)
    coin = torch.rand(*x.shape[:2], *([1] * (x.dim() - 2)), dtype=x.dtype)  # (N, C, 1, ...)
    return x * (coin >= p) / (1 - p)


def _channel_mask(t: Tester, case: str, dropped: Tensor) -> Tensor:
    """The (N, C) mask of dropped channels; fail if some channel is only partly zeroed."""
    flat = dropped.flatten(2)  # (N, C, positions)
    whole = flat.all(-1)
    mixed = flat.any(-1) & ~whole
    if mixed.any():
        n, c = (int(i) for i in mixed.nonzero()[0])
        t.fail(
            case,
            f"channel (n={n}, c={c}) has {int(flat[n, c].sum())} of its {flat.shape[-1]} entries zeroed "
            f"and the others kept ({int(mixed.sum())} of {mixed.numel()} channels are mixed like this). "
            "It looks like an elementwise mask: Dropout2d draws one coin per (sample, channel), a mask "
            "of shape (N, C, 1, 1) broadcast over the spatial positions.",
        )
    return whole


def _check_dropout2d_values(t: Tester) -> None:
    cases = [
        ((4, 6, 3, 3), torch.float64, 0.3),
        ((3, 5, 7), torch.float32, 0.5),
        ((2, 8, 4, 5), torch.float32, 0.8),
    ]
    for shape, dtype, p in cases:
        case = f"x {shape} {_dt(dtype)}, p={p}, training=True"
        x = _nonzero(t, *shape, dtype=dtype)
        out = _output(t, case, _call(t, case, x, p, True, False), x)
        _channel_mask(t, case, _judge_survivors(t, case, out, x, p))
        t.ok(case, "every channel all zero or all x/(1-p)")

    for shape, dtype, p, training in (
        ((3, 4, 5, 5), torch.float64, 0.5, False),
        ((2, 3, 6), torch.float32, 1.0, False),
        ((3, 4, 2, 2), torch.float64, 0.0, True),
    ):
        case = f"x {shape} {_dt(dtype)}, p={p}, training={training}"
        x = _nonzero(t, *shape, dtype=dtype)
        out = _output(t, case, _call(t, case, x, p, training, False), x)
        if bool(((out == 0) & (x != 0)).any()):
            t.fail(
                case,
                f"{int(((out == 0) & (x != 0)).sum())} of {x.numel()} entries were zeroed with "
                f"training={training}, p={p}: "
                + (
                    "p=0 drops nothing."
                    if training
                    else "in eval mode dropout returns x unchanged."
                ),
            )
        mistakes = (
            []
            if p in (0, 1)
            else [
                ("in eval mode the output was divided by (1-p); eval is the identity.", x / (1 - p))
            ]
        )
        t.compare(case, "output (= x)", out, x, mistakes=mistakes)

    for shape in ((3, 4, 5, 5), (2, 3, 6)):
        case = f"x {shape} float64, p=1, training=True"
        x = _nonzero(t, *shape)
        out = _output(t, case, _call(t, case, x, 1.0, True, False), x)
        if not torch.isfinite(out).all():
            t.fail(
                case,
                "with p=1 the output has NaN or inf: every channel is dropped, so return zeros "
                "instead of dividing by 1-p = 0.",
            )
        t.compare(case, "output (= 0)", out, torch.zeros_like(x))


def _check_dropout2d_statistics(t: Tester) -> None:
    p = 0.5
    for shape, dtype in (((64, 32, 5), torch.float64), ((48, 40, 2, 2), torch.float32)):
        case = f"x {shape} {_dt(dtype)}, p={p}, statistics of the {shape[0] * shape[1]} channels"
        x = _nonzero(t, *shape, dtype=dtype)
        out = _output(t, case, _call(t, case, x, p, True, False), x)
        ch = _channel_mask(t, case, _judge_survivors(t, case, out, x, p))  # (N, C) bool
        q = float(ch.double().mean())
        for dim, what in (
            (
                0,
                "the same channel mask for every sample of the batch (a mask of shape (1, C, 1, 1) or (C, 1, 1))",
            ),
            (1, "one coin per sample shared by all its channels (a mask of shape (N, 1, 1, 1))"),
        ):
            even, odd = _pairs(ch, dim)
            both = float((even & odd).double().mean())
            bound = _hoeffding(even.numel())
            if abs(both - p * p) > bound:
                like = f" It looks like {what}." if both > (q + q * q) / 2 else ""
                t.fail(
                    case,
                    f"channels that are neighbours along dim {dim} were dropped together {both:.1%} of the "
                    f"time; independent coins with p={p} give {p * p:.0%} ± {bound:.1%}.{like} Draw one "
                    "coin per (sample, channel).",
                )
            t.ok(
                case,
                f"P(pair of channels along dim {dim} both dropped) = p^2",
                f"ok ({both:.3f}, bound ±{bound:.3f})",
            )
        bound = _hoeffding(ch.numel())
        if abs(q - p) > bound:
            t.fail(
                case,
                f"{q:.2%} of the channels were dropped with p={p}; a correct Dropout2d drops {p:.0%} of "
                f"them, ± {bound:.2%} except once in {1 / DELTA:.0e} runs.",
            )
        t.ok(case, "fraction of channels dropped = p", f"ok ({q:.3f}, bound ±{bound:.3f})")

    shape = (40, 30, 3)
    case = f"x {shape} float64, p={p}, two calls on the same input"
    x = _nonzero(t, *shape)
    first = _channel_mask(
        t,
        case,
        _judge_survivors(t, case, _output(t, case, _call(t, case, x, p, True, False), x), x, p),
    )
    second = _channel_mask(
        t,
        case,
        _judge_survivors(t, case, _output(t, case, _call(t, case, x, p, True, False), x), x, p),
    )
    both = float((first & second).double().mean())
    bound = _hoeffding(first.numel())
    if torch.equal(first, second) or abs(both - p * p) > bound:
        t.fail(
            case,
            f"the same channel was dropped by both calls {both:.1%} of the time; independent calls give "
            f"{p * p:.0%} ± {bound:.1%}. Draw a new mask on every call (no cached mask, no reseeding).",
        )
    t.ok(case, "P(channel dropped in both calls) = p^2", f"ok ({both:.3f}, bound ±{bound:.3f})")


@exercise(
    "dropout2d",
    forbidden=DROPOUT_OPS,
    chapter=CHAPTER,
    signature="(x (N,C,H,W) or (N,C,L), p, training=True) -> Tensor",
    summary="channel (spatial) dropout: each (sample, channel) is zeroed whole with probability p, "
    "survivors scaled by 1/(1-p); identity when not training; p=1 gives zeros",
    reference=ref_dropout2d,
)
def check_dropout2d(t: Tester) -> None:
    """Whole channels zero or x/(1-p), eval, p=0, p=1, independence across samples, channels and calls."""
    _check_dropout2d_values(t)
    _check_dropout2d_statistics(t)


# =============================================================================================
# mc_dropout_predict: Monte Carlo dropout, mean and spread of n_samples stochastic passes
# =============================================================================================
def _dropout_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]


def ref_mc_dropout_predict(
    model: torch.nn.Module, x: Tensor, n_samples: int
) -> tuple[Tensor, Tensor]:
    """Mean and (unbiased) std over n_samples passes with only the dropout layers in train mode."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for m in _dropout_layers(model):
        m.train()
    try:
        with torch.no_grad():
            ys = torch.stack([model(x) for _ in range(n_samples)])  # (n_samples, *out)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return ys.mean(0), ys.std(0)


class _Scale(torch.nn.Module):
    """Multiplies its input by a fixed vector w (the last dim); no parameters to train."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.w


def _mc_model(w: Tensor, p: float, start_training: bool) -> torch.nn.Sequential:
    """BatchNorm1d (running mean 0, running var 4: eval halves x) -> Dropout(p) -> times w."""
    bn = torch.nn.BatchNorm1d(w.numel(), affine=False).double()
    bn.running_var.fill_(4.0 - bn.eps)
    model = torch.nn.Sequential(bn, torch.nn.Dropout(p), _Scale(w))
    return model.train(start_training)


def mc_probe(
    fn: object, x: Tensor, w: Tensor, p: float, n_samples: int, start_training: bool
) -> dict:
    """Run the learner's mc_dropout_predict on a known model; report its answer and the layers' modes."""
    model = _mc_model(w, p, start_training)
    before = [m.training for m in model.modules()]
    bn_modes: list[bool] = []
    drop_modes: list[bool] = []
    bn = model[0]
    # Hooks read the flag of the module they run on, so a deep copy of the model reports its own.
    bn.register_forward_pre_hook(lambda m, a: bn_modes.append(m.training))
    model[1].register_forward_pre_hook(lambda m, a: drop_modes.append(m.training))
    got = fn(model, x, n_samples)
    seen = list(zip(bn_modes, drop_modes, strict=False))
    after = [m.training for m in model.modules()]
    stats = bn.running_mean.abs().max().item()
    if isinstance(got, tuple | list):
        got = tuple(g.detach() if torch.is_tensor(g) else g for g in got)
    return {"got": got, "seen": seen, "before": before, "after": after, "running_mean_moved": stats}


def _maurer_pontil(n: int, delta: float) -> float:
    """Half-width r with P(|sample std - std| > r) <= delta for n iid variables in [0, 1].

    Maurer & Pontil (2009), Theorem 10, each side at delta/2; the sample std is the unbiased one.
    """
    return math.sqrt(2 * math.log(2 / delta) / (n - 1))


def _check_mc_case(t: Tester, p: float, start_training: bool) -> None:
    b, d, n_samples = 4, 3, 1000
    x = 3.0 + t.randn(b, d)  # its batch mean is near 3, far from the running mean 0
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    mode = "train" if start_training else "eval"
    case = f"Sequential(BatchNorm1d, Dropout({p}), times w) in {mode} mode, x ({b}, {d}), n_samples={n_samples}"
    seen = t.probe(case, mc_probe, x, w, p, n_samples, start_training)
    if not isinstance(seen, dict):
        t.fail(case, "the probe could not run the function.")
    mean, std = t.unpack(case, seen["got"], ["mean", "std"])
    calls = seen["seen"]
    if not calls:
        t.fail(case, "the model was never called: run it n_samples times on x.")
    if any(bn_training for bn_training, _ in calls) or seen["running_mean_moved"] > 0:
        t.fail(
            case,
            "BatchNorm ran in training mode during the passes (it normalised with the batch's own "
            "statistics and changed its running statistics). It looks like the whole model was in "
            "training mode (model.train(), or a model handed over in training mode and left so): put "
            "the model in eval mode and switch on only its dropout layers (the modules that are "
            "instances of nn.Dropout and its siblings).",
        )
    if not any(drop_training for _, drop_training in calls):
        t.fail(
            case,
            "the dropout layer was in eval mode during every pass, so all passes agree and the std is "
            "zero. It looks like model.eval() was called and left so: Monte Carlo dropout keeps the "
            "dropout layers in training mode at prediction time.",
        )
    if seen["after"] != seen["before"]:
        t.fail(
            case,
            f"the model came back with the modes (training flags, one per module) {seen['after']} instead "
            f"of {seen['before']}: it looks like the model's mode was not restored afterwards. Remember "
            "each module's training flag before and put it back after the passes.",
        )
    a = x / 2.0  # BatchNorm in eval: (x - 0) / sqrt(4)
    centre = a * w  # (b, d): E[output]
    sd = (a * w).abs() * math.sqrt(p / (1 - p))  # (b, d): std of the output
    span = (a * w).abs() / (1 - p)  # each output lies in [0, span] (or [-span, 0])
    for name, got in (("mean", mean), ("std", std)):
        if torch.is_tensor(got) and got.shape != centre.shape:
            t.fail(
                case,
                f"`{name}` has shape {tuple(got.shape)} but the model's output has shape {tuple(centre.shape)}: "
                "the mean and std were taken over the wrong axis. Stack the n_samples predictions along "
                "a new first axis and reduce over that axis only.",
            )
    mean = t.expect_tensor(case, "mean", mean, shape=centre.shape, dtype=torch.float64)
    std = t.expect_tensor(case, "std", std, shape=centre.shape, dtype=torch.float64)
    k = centre.numel()
    mean_r = span * hoeffding_radius(n_samples, DELTA / k)
    err = (mean - centre).abs()
    if (err > mean_r).any():
        i = int((err / mean_r).argmax())
        t.fail(
            case,
            f"`mean` is {mean.reshape(-1)[i]:.4f} at flat index {i}, expected {centre.reshape(-1)[i]:.4f} "
            f"± {mean_r.reshape(-1)[i]:.4f} (the mean of the passes; dropout keeps the mean of each output).",
        )
    t.ok(
        case,
        "mean within its Hoeffding bound",
        f"ok (worst {float((err / mean_r).max()):.2f} of the bound)",
    )
    std_r = span * _maurer_pontil(n_samples, DELTA / k) + sd / n_samples  # /n or /(n-1): both pass
    err = (std - sd).abs()
    if (err > std_r).any():
        i = int((err / std_r).argmax())
        zero = " All stds are zero: every pass gave the same answer." if not std.any() else ""
        t.fail(
            case,
            f"`std` is {std.reshape(-1)[i]:.4f} at flat index {i}, expected {sd.reshape(-1)[i]:.4f} "
            f"± {std_r.reshape(-1)[i]:.4f}: the spread of one output over the passes is "
            f"|w a| sqrt(p/(1-p)) here.{zero}",
        )
    t.ok(
        case,
        "std within its Maurer-Pontil bound",
        f"ok (worst {float((err / std_r).max()):.2f} of the bound)",
    )


@exercise(
    "mc_dropout_predict",
    chapter=CHAPTER,
    signature="(model, x, n_samples) -> (mean, std)",
    summary="Monte Carlo dropout: n_samples passes with only the dropout layers in training mode; mean "
    "and std over the passes (output's shape each); every module's mode restored afterwards",
    reference=ref_mc_dropout_predict,
)
def check_mc_dropout_predict(t: Tester) -> None:
    """A model with known output mean and std per entry; BatchNorm must stay in eval; modes restored."""
    _check_mc_case(t, 0.5, start_training=False)
    _check_mc_case(t, 0.2, start_training=True)


# =============================================================================================
# grid_search_cv: k-fold cross-validation over a grid of hyper-parameters
# =============================================================================================
def ref_grid_search_cv(
    make_model: object,
    param_grid: dict,
    X: Tensor,
    y: Tensor,
    n_splits: int,
    fit: object,
    score: object,
) -> tuple[dict, Tensor]:
    """K-fold CV (contiguous folds, sizes differing by at most one) over every grid candidate."""
    import itertools

    n = len(X)
    sizes = [n // n_splits + (1 if i < n % n_splits else 0) for i in range(n_splits)]
    bounds = [0, *itertools.accumulate(sizes)]
    folds = [torch.arange(bounds[i], bounds[i + 1]) for i in range(n_splits)]
    names = list(param_grid)
    candidates = [
        dict(zip(names, values, strict=True)) for values in itertools.product(*param_grid.values())
    ]
    means = []
    for params in candidates:
        scores = []
        for k, val in enumerate(folds):
            train = torch.cat([f for j, f in enumerate(folds) if j != k])
            model = make_model(**params)
            fit(model, X[train], y[train])
            scores.append(float(score(model, X[val], y[val])))
        means.append(sum(scores) / n_splits)
    mean_scores = torch.tensor(means, dtype=torch.float64)
    return candidates[int(mean_scores.argmax())], mean_scores


class _FakeModel:
    """A model whose validation score is a fixed number per hyper-parameter setting (plus a small
    term from which samples it is scored on); it scores high only on samples it was trained on."""

    def __init__(self, log: list, quality: float, memorise: float, params: dict) -> None:
        self.log, self.quality, self.memorise = log, quality, memorise
        self.entry = {"params": dict(params), "fits": [], "scored": []}
        log.append(self.entry)

    def ids(self, X: object) -> list[int]:
        return [int(v) for v in torch.as_tensor(X)[:, 0].tolist()]


def grid_probe(fn: object, grid: dict, X: Tensor, y: Tensor, n_splits: int, table: list) -> dict:
    """Run the learner's grid_search_cv with fake models; report its answer and every fit and score."""
    log: list = []
    n = len(X)

    def make_model(**params: object) -> _FakeModel:
        for row_params, quality, memorise in table:
            if row_params == params:
                return _FakeModel(log, quality, memorise, params)
        raise ValueError(f"make_model got unknown hyper-parameters {params}")

    def fit(model: _FakeModel, X_train: object, y_train: object) -> None:
        model.entry["fits"].append(model.ids(X_train))

    def score(model: _FakeModel, X_val: object, y_val: object) -> float:
        ids = model.ids(X_val)
        seen = {i for f in model.entry["fits"] for i in f}
        if ids and all(i in seen for i in ids):
            value = model.memorise
        else:
            value = model.quality + 0.01 * sum(ids) / (len(ids) * n) if ids else model.quality
        model.entry["scored"].append((ids, value))
        return value

    got = fn(make_model, grid, X, y, n_splits, fit, score)
    if isinstance(got, tuple | list):
        got = tuple(
            torch.as_tensor(g, dtype=torch.float64) if isinstance(g, list) else g for g in got
        )
    return {"got": got, "log": log}


def _check_grid_case(t: Tester, grid: dict, table: list, n: int, n_splits: int) -> None:
    import itertools

    X = torch.stack([torch.arange(n, dtype=torch.float64), t.randn(n)], 1)  # (n, 2): id, feature
    y = t.randn(n)
    case = f"grid {grid}, {n} samples, n_splits={n_splits}"
    seen = t.probe(case, grid_probe, grid, X, y, n_splits, table)
    best, mean_scores = t.unpack(case, seen["got"], ["best_params", "mean_scores"])
    log = seen["log"]
    names = list(grid)
    candidates = [dict(zip(names, v, strict=True)) for v in itertools.product(*grid.values())]
    everyone = set(range(n))
    for entry in log:
        if len(entry["fits"]) != 1 or len(entry["scored"]) != 1:
            t.fail(
                case,
                f"one model with {entry['params']} was fitted {len(entry['fits'])} times and scored "
                f"{len(entry['scored'])} times: build a fresh model with make_model for every (candidate, "
                "fold) pair, fit it once on the training folds and score it once on the held-out fold.",
            )
        train, (val, _) = set(entry["fits"][0]), entry["scored"][0]
        if set(val) & train:
            same = " (the very samples it was trained on)" if set(val) <= train else ""
            t.fail(
                case,
                f"a model with {entry['params']} was scored on {len(set(val) & train)} samples it was "
                f"trained on{same}. It looks like it was scored on the training fold: score each model "
                "on the held-out fold only.",
            )
        if train | set(val) != everyone:
            t.fail(
                case,
                f"a model with {entry['params']} was trained on {len(train)} and scored on {len(val)} "
                f"samples, leaving {len(everyone - train - set(val))} of the {n} unused: train on every "
                "fold but the held-out one.",
            )
    for params in candidates:
        mine = [e for e in log if e["params"] == params]
        if len(mine) != n_splits:
            t.fail(
                case,
                f"the candidate {params} was fitted {len(mine)} times; k-fold cross-validation fits it "
                f"n_splits = {n_splits} times, once per held-out fold.",
            )
        vals = [e["scored"][0][0] for e in mine]
        flat = [i for v in vals for i in v]
        if len(flat) != len(set(flat)):
            t.fail(
                case,
                f"for the candidate {params} the held-out folds overlap ({len(flat) - len(set(flat))} samples "
                "are held out more than once): the folds must be disjoint.",
            )
        if set(flat) != everyone:
            t.fail(
                case,
                f"for the candidate {params} the held-out folds cover {len(set(flat))} of the {n} samples: "
                f"the folds must cover every sample (with {n} samples and {n_splits} folds, sizes "
                f"{n // n_splits} or {n // n_splits + 1}, not {n // n_splits} each with the rest dropped).",
            )
        sizes = sorted(len(v) for v in vals)
        if sizes[-1] - sizes[0] > 1:
            t.fail(
                case,
                f"for the candidate {params} the held-out folds have sizes {sizes}; split the samples "
                "into n_splits folds whose sizes differ by at most one.",
            )
    t.ok(case, "folds: disjoint, covering, balanced; fresh model per fold", "ok")

    fold_scores = [[e["scored"][0][1] for e in log if e["params"] == c] for c in candidates]
    expected = torch.tensor([sum(s) / n_splits for s in fold_scores], dtype=torch.float64)
    if not torch.is_tensor(mean_scores):
        t.fail(
            case,
            f"`mean_scores` should be a list of floats or a 1-D tensor, not {type(mean_scores).__name__}.",
        )
    mean_scores = mean_scores.to(torch.float64) if mean_scores.is_floating_point() else mean_scores
    if (
        mean_scores.shape == expected.shape
        and torch.allclose(mean_scores.sort().values, expected.sort().values)
        and not torch.allclose(mean_scores, expected)
    ):
        t.fail(
            case,
            "the mean scores are right but listed in another order: list the candidates in the order "
            "of itertools.product(*param_grid.values()), the first key varying slowest.",
        )
    t.compare(
        case,
        "mean_scores (mean of the fold scores, one per candidate)",
        mean_scores,
        expected,
        mistakes=[
            ("the fold scores were summed, not averaged.", expected * n_splits),
            (
                "only the last fold's score was kept.",
                torch.tensor([s[-1] for s in fold_scores], dtype=torch.float64),
            ),
        ],
    )
    i_best, i_worst = int(expected.argmax()), int(expected.argmin())
    if not isinstance(best, dict):
        t.fail(
            case,
            f"`best_params` should be a dict such as {candidates[i_best]}, not {type(best).__name__}.",
        )
    if best != candidates[i_best]:
        worst = (
            " It looks like the minimum was picked: score is higher-is-better, pick the maximum mean score."
            if best == candidates[i_worst]
            else ""
        )
        t.fail(
            case,
            f"`best_params` is {best} but the highest mean score is that of {candidates[i_best]}.{worst}",
        )
    t.ok(case, "best_params = argmax of mean_scores", f"ok ({best})")


_GRID_CASES = [
    (
        {"width": [8, 32, 128], "p": [0.0, 0.3]},
        # (params, validation quality, score on samples it was trained on)
        [
            ({"width": 8, "p": 0.0}, 0.61, 0.70),
            ({"width": 8, "p": 0.3}, 0.55, 0.66),
            ({"width": 32, "p": 0.0}, 0.74, 0.90),
            ({"width": 32, "p": 0.3}, 0.83, 0.86),
            ({"width": 128, "p": 0.0}, 0.68, 1.00),
            ({"width": 128, "p": 0.3}, 0.79, 0.95),
        ],
        12,
        4,
    ),
    (
        {"alpha": [0.1, 1.0, 10.0, 100.0]},
        [
            ({"alpha": 0.1}, 0.40, 0.99),
            ({"alpha": 1.0}, 0.65, 0.80),
            ({"alpha": 10.0}, 0.72, 0.70),
            ({"alpha": 100.0}, 0.30, 0.31),
        ],
        10,
        3,
    ),
]


@exercise(
    "grid_search_cv",
    chapter=CHAPTER,
    signature="(make_model, param_grid, X, y, n_splits, fit, score) -> (best_params, mean_scores)",
    summary="k-fold cross-validated grid search: every candidate of itertools.product(*param_grid.values()) "
    "fitted on n_splits-1 folds and scored on the held-out one; mean fold score per candidate, best = max",
    reference=ref_grid_search_cv,
)
def check_grid_search_cv(t: Tester) -> None:
    """Fake models log every fit and score: folds disjoint and covering, scores averaged, max picked."""
    for grid, table, n, n_splits in _GRID_CASES:
        _check_grid_case(t, grid, table, n, n_splits)
