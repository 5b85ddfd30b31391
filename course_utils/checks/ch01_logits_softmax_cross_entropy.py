"""Check batteries of chapter 01: softmax, log-softmax, cross-entropy, GroupSoftmax, Gumbel-softmax."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..checking import Tester, exercise
from ..gradcheck import numerical_gradient
from ..stats import hoeffding_radius

CHAPTER = "01_logits_softmax_cross_entropy"
#: The operators chapter 01 rebuilds, forbidden inside its exercises in every form.
SOFTMAX_OPS = ("softmax", "log_softmax", "logsumexp")
Tensor = torch.Tensor

UNSTABLE = (
    "the output has NaN or inf for logits of magnitude 1e4: exp overflows. Subtract the "
    "maximum along `dim` (keepdim=True) before exponentiating; the result does not change."
)
LOG_OF_SOFTMAX = (
    "the output is -inf for logits of magnitude 1e4, though it is finite at each maximum: "
    "log(softmax(logits)) underflows, because softmax rounds probabilities below 1e-308 to 0 "
    "and log(0) = -inf. Stay in log space: logits - logsumexp(logits), with the maximum "
    "subtracted inside the logsumexp."
)


# ---- reference implementations ---------------------------------------------------------
def ref_softmax(logits: Tensor, dim: int = -1) -> Tensor:
    """Stable softmax along ``dim``."""
    return torch.softmax(logits, dim)


def ref_log_softmax(logits: Tensor, dim: int = -1) -> Tensor:
    """Stable log-softmax along ``dim``."""
    return torch.log_softmax(logits, dim)


def ref_cross_entropy(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy of (N, C) logits and (N,) targets, and its gradient (p - y) / N."""
    n = logits.shape[0]
    loss = F.cross_entropy(logits, target)
    dlogits = (torch.softmax(logits, -1) - F.one_hot(target, logits.shape[1]).to(logits.dtype)) / n
    return loss, dlogits


def ref_group_softmax_cross_entropy(logits: Tensor, target_mask: Tensor) -> tuple[Tensor, Tensor]:
    """GroupSoftmax loss -log sum_{c in mask} softmax(logits)_c, mean over rows, and its gradient."""
    n = logits.shape[0]
    lse_all = torch.logsumexp(logits, -1)
    lse_in = torch.logsumexp(logits.masked_fill(~target_mask, float("-inf")), -1)
    loss = (lse_all - lse_in).mean()
    p = torch.softmax(logits, -1)
    q = torch.softmax(logits.masked_fill(~target_mask, float("-inf")), -1)
    return loss, (p - q) / n


def ref_gumbel_softmax(
    logits: Tensor, tau: float = 1.0, hard: bool = False, dim: int = -1
) -> Tensor:
    """Gumbel-softmax sample; straight-through one-hot when ``hard``."""
    return F.gumbel_softmax(logits, tau=tau, hard=hard, dim=dim)


# ---- softmax and log-softmax --------------------------------------------------------------
def _softmax_cases(t: Tester) -> list[tuple[str, Tensor, int]]:
    return [
        ("logits (4, 5) float64, dim=-1", t.randn(4, 5, scale=3.0), -1),
        ("logits (5, 5) float64, dim=-1", t.randn(5, 5, scale=3.0), -1),
        ("logits (5, 5) float64, dim=0", t.randn(5, 5, scale=3.0), 0),
        ("logits (3, 4, 5) float64, dim=1", t.randn(3, 4, 5, scale=3.0), 1),
        ("logits (2, 3, 4) float64, dim=-3", t.randn(2, 3, 4, scale=3.0), -3),
        ("logits (7,) float64, dim=0", t.randn(7, scale=3.0), 0),
        ("logits (8, 10) float32, dim=-1", t.randn(8, 10, dtype=torch.float32, scale=3.0), -1),
        ("logits (6, 6) float32, dim=0", t.randn(6, 6, dtype=torch.float32, scale=3.0), 0),
        (
            "all-equal logits (3, 4) float64, dim=-1",
            torch.full((3, 4), 2.5, dtype=torch.float64),
            -1,
        ),
        ("extreme logits (4, 6) of magnitude 1e4 float64, dim=-1", t.randn(4, 6, scale=1e4), -1),
        (
            "extreme logits (4, 6) of magnitude 1e4 float32, dim=0",
            t.randn(4, 6, dtype=torch.float32, scale=1e4),
            0,
        ),
    ]


def _wrong_keepdim(x: Tensor, dim: int, log: bool) -> Tensor | None:
    # max/sum without keepdim=True broadcast against the last axis instead of `dim`.
    if x.dim() != 2 or x.shape[0] != x.shape[1]:
        return None
    m = x.max(dim).values
    z = x - m
    e = z.exp()
    s = e.sum(dim)
    return z - s.log() if log else e / s


def _softmax_mistakes(x: Tensor, dim: int, log: bool) -> list:
    other = 0 if dim in (-1, x.dim() - 1) and x.dim() > 1 else -1
    f = torch.log_softmax if log else torch.softmax
    return [
        (
            f"the {'log-' if log else ''}softmax was taken along dim={other}, not the requested dim={dim}.",
            lambda: f(x, other) if x.dim() > 1 else None,
        ),
        (
            "max or sum was taken without keepdim=True, so it broadcast along the wrong axis.",
            lambda: _wrong_keepdim(x, dim, log),
        ),
        (
            "the output is exp(logits) / sum(exp(logits)) over all entries, not along `dim`.",
            lambda: (
                (x - x.logsumexp(tuple(range(x.dim()))))
                if log
                else (x - x.logsumexp(tuple(range(x.dim())))).exp()
            ),
        ),
        (
            "the logits were divided by their sum instead of exponentiated first.",
            lambda: x / x.sum(dim, keepdim=True),
        ),
    ]


def _log_underflow_only(got: Tensor, x: Tensor, dim: int) -> bool:
    # log(softmax) of a stable softmax is -inf only where a probability underflowed, never at a
    # slice's maximum (whose probability is at least 1/C); exp overflow breaks the maximum too.
    g = got.detach()
    at_max = g.gather(dim, x.argmax(dim, keepdim=True))
    return bool(torch.isfinite(at_max).all() and (torch.isfinite(g) | (g == float("-inf"))).all())


def _check_softmax_like(t: Tester, log: bool) -> None:
    ref = torch.log_softmax if log else torch.softmax
    for case, x, dim in _softmax_cases(t):
        got = t.call(case, x, dim)
        expected = ref(x.double(), dim).to(x.dtype)
        got = t.expect_tensor(case, "output", got, shape=x.shape, dtype=x.dtype)
        if not torch.isfinite(got).all() and torch.isfinite(expected).all():
            t.fail(case, LOG_OF_SOFTMAX if log and _log_underflow_only(got, x, dim) else UNSTABLE)
        scale = float(x.abs().max())
        rtol, atol = t.tolerances(x.dtype)
        if log:
            # log-softmax values are differences of numbers of size |logits|: judge them on that scale.
            atol = atol * max(1.0, scale)
        t.compare(
            case,
            "output",
            got,
            expected,
            rtol=rtol,
            atol=atol,
            mistakes=_softmax_mistakes(x, dim, log),
        )


@exercise(
    "softmax",
    forbidden=SOFTMAX_OPS,
    chapter=CHAPTER,
    signature="(logits, dim=-1) -> Tensor",
    summary="numerically stable softmax along dim; finite for logits of magnitude 1e4",
    reference=ref_softmax,
)
def check_softmax(t: Tester) -> None:
    """Many shapes, dims and dtypes, all-equal and extreme logits."""
    _check_softmax_like(t, log=False)


@exercise(
    "log_softmax",
    forbidden=SOFTMAX_OPS,
    chapter=CHAPTER,
    signature="(logits, dim=-1) -> Tensor",
    summary="log-softmax in the stable log-sum-exp form",
    reference=ref_log_softmax,
)
def check_log_softmax(t: Tester) -> None:
    """Many shapes, dims and dtypes; log(softmax) underflow is caught at extreme logits."""
    _check_softmax_like(t, log=True)


# ---- cross-entropy -------------------------------------------------------------------
def _ce_cases(t: Tester) -> list[tuple[str, Tensor, Tensor]]:
    cases = [
        ("N=4, C=5 float64", t.randn(4, 5, scale=2.0), t.randint(5, 4)),
        ("N=1, C=3 float64", t.randn(1, 3, scale=2.0), t.randint(3, 1)),
        (
            "N=6, C=6 float64, repeated targets",
            t.randn(6, 6, scale=2.0),
            torch.tensor([0, 0, 3, 3, 5, 5]),
        ),
        ("N=16, C=10 float32", t.randn(16, 10, dtype=torch.float32, scale=2.0), t.randint(10, 16)),
        (
            "N=5, C=4 float64, extreme logits of magnitude 1e4",
            t.randn(5, 4, scale=1e4),
            t.randint(4, 5),
        ),
        (
            "N=3, C=7 float32, extreme logits of magnitude 1e4",
            t.randn(3, 7, dtype=torch.float32, scale=1e4),
            t.randint(7, 3),
        ),
    ]
    confident = t.randn(4, 5)
    target = t.randint(5, 4)
    confident[torch.arange(4), target] += 40.0  # loss near 0: a relative error test of tiny values
    cases.append(("N=4, C=5 float64, confident and correct (loss near 0)", confident, target))
    return cases


def _unstable_loss(logits: Tensor, loss: Tensor, dlogits: Tensor, log_space: str) -> str:
    bad = [
        name for name, v in (("loss", loss), ("dlogits", dlogits)) if not torch.isfinite(v).all()
    ]
    return (
        f"{' and '.join(f'`{b}`' for b in bad)} {'has' if len(bad) == 1 else 'have'} NaN or inf for "
        f"logits as large as {float(logits.abs().max()):.0e} in magnitude. Either exp overflowed (subtract each "
        "row's maximum before exponentiating) or a probability underflowed to 0 and was then logged "
        f"or divided by (log(0) = -inf, 0/0 = NaN). Stay in log space: {log_space}"
    )


def _check_loss_and_grad(
    t: Tester,
    cases: list[tuple[str, Tensor, Tensor]],
    reference,
    loss_mistakes,
    grad_mistakes,
    log_space: str,
) -> None:
    for case, logits, target in cases:
        out = t.call(case, logits, target)
        loss, dlogits = t.unpack(case, out, ("loss", "dlogits"))
        ref_loss, ref_grad = reference(logits.double(), target)
        ref_loss, ref_grad = ref_loss.to(logits.dtype), ref_grad.to(logits.dtype)
        if torch.is_tensor(loss) and loss.dim() != 0:
            t.fail(
                case,
                f"`loss` should be a 0-d tensor (a scalar, the mean over the batch), but it has shape {tuple(loss.shape)}.",
            )
        t.expect_tensor(case, "loss", loss, dtype=logits.dtype)
        t.expect_tensor(case, "dlogits", dlogits, shape=logits.shape, dtype=logits.dtype)
        if not torch.isfinite(loss) or not torch.isfinite(dlogits).all():
            t.fail(case, _unstable_loss(logits, loss, dlogits, log_space))
        scale = float(logits.abs().max())
        rtol, atol = t.tolerances(logits.dtype)
        # The loss is a difference of numbers as large as the logits: absolute error scales with them.
        t.compare(
            case,
            "loss",
            loss,
            ref_loss,
            rtol=rtol,
            atol=atol * max(1.0, scale),
            mistakes=loss_mistakes(logits.double(), target, ref_loss),
        )
        t.compare(
            case,
            "dlogits",
            dlogits,
            ref_grad,
            rtol=rtol,
            atol=atol,
            mistakes=grad_mistakes(logits.double(), target),
        )
    # The gradient must be the gradient of the learner's own loss (central differences).
    case, logits, target = cases[0]

    def own_loss(z: Tensor) -> Tensor:
        return t.call(f"{case}, perturbed for the numerical gradient", z, target)[0]

    (numeric,) = numerical_gradient(own_loss, [logits])
    _, dlogits = t.call(case, logits, target)
    t.compare(
        f"{case}, against central differences of your own loss",
        "dlogits",
        dlogits,
        numeric,
        rtol=1e-5,
        atol=1e-8,
    )


#: Floors learners put under a probability before its log: powers of ten, the float eps and tiny
#: values, and exp(-100) (log(p).clamp(min=-100), the floor of PyTorch's BCELoss).
_LOG_FLOORS = (
    *(10.0**-k for k in range(3, 46)),
    float(torch.finfo(torch.float32).eps),
    float(torch.finfo(torch.float32).tiny),
    float(torch.finfo(torch.float64).eps),
    math.exp(-100.0),
)


def _clamped_log_mistakes(row_loss: Callable[[], Tensor], form: str) -> list:
    """Mean losses of -log(max(p, eps)) and -log(p + eps), from each row's exact -log p (float64).

    A clamp is identifiable only on a case where some row's probability lies below eps (an
    extreme-logits case, where it underflows); elsewhere its model equals the true loss and is
    left out. An added eps shifts every row a little, by about eps / p.
    ``row_loss`` is called once, on failure only.
    """
    sentence = (
        "clamping/epsilon in the log changes the loss where a probability underflows, and "
        "log(p + eps) shifts it wherever p is small: use log_softmax / the log-sum-exp form, "
        f"{form} (the loss matches FORM)."
    )
    cache: list[Tensor] = []

    def model(eps: float, add: bool) -> Callable[[], Tensor | None]:
        def lazy() -> Tensor | None:
            if not cache:
                cache.append(row_loss())
            r, floor = cache[0], -math.log(eps)
            if add:  # -log(p + eps) = -logaddexp(log p, log eps): off a little everywhere
                return -torch.logaddexp(-r, torch.full_like(r, -floor)).mean()
            if not bool((r > floor).any()):
                return None  # no probability below eps here: the clamp changes nothing
            return r.clamp(max=floor).mean()

        return lazy

    return [
        (
            sentence.replace(
                "FORM", f"log({'p + eps' if add else 'max(p, eps)'}) with eps = {eps:.3g}"
            ),
            model(eps, add),
        )
        for eps in _LOG_FLOORS
        for add in (False, True)
    ]


def _ce_loss_mistakes(logits: Tensor, target: Tensor, ref_loss: Tensor) -> list:
    n = logits.shape[0]
    logp = torch.log_softmax(logits, -1)
    return [
        ("the loss is summed over the batch; the contract asks for the mean.", ref_loss * n),
        ("the loss is missing its minus sign: cross-entropy is -log p[target].", -ref_loss),
        ("the loss averages -log p over all classes, not just the target class.", -logp.mean()),
        (
            "the loss is -p[target] (no log).",
            lambda: -torch.softmax(logits, -1)[torch.arange(n), target].mean(),
        ),
        *_clamped_log_mistakes(
            lambda: -logp[torch.arange(n), target],
            "-log p[target] = logsumexp(logits) - logits[target]",
        ),
    ]


def _ce_grad_mistakes(logits: Tensor, target: Tensor) -> list:
    n = logits.shape[0]
    p = torch.softmax(logits, -1)
    y = F.one_hot(target, logits.shape[1]).to(logits.dtype)
    return [
        (
            "dlogits is not divided by N: the loss is a mean over the batch, so its gradient is (p - y) / N.",
            p - y,
        ),
        (
            "dlogits is softmax(logits) / N: the one-hot target must be subtracted, (p - y) / N.",
            p / n,
        ),
        ("dlogits has the wrong sign: it is (p - y) / N, softmax minus target.", (y - p) / n),
        (
            "dlogits uses the softmax over the batch (dim=0) instead of over classes (dim=1).",
            (torch.softmax(logits, 0) - y) / n,
        ),
    ]


@exercise(
    "cross_entropy",
    forbidden=(*SOFTMAX_OPS, "cross_entropy", "nll_loss"),
    chapter=CHAPTER,
    signature="(logits (N,C), target (N,) int64) -> (loss 0-d, dlogits (N,C))",
    summary="mean cross-entropy and its gradient (softmax - one_hot) / N, stable at extreme logits",
    reference=ref_cross_entropy,
    backward=True,
)
def check_cross_entropy(t: Tester) -> None:
    """Loss against F.cross_entropy, dlogits against (p - y)/N and against your own loss numerically."""
    _check_loss_and_grad(
        t,
        _ce_cases(t),
        ref_cross_entropy,
        _ce_loss_mistakes,
        _ce_grad_mistakes,
        "-log p[target] = logsumexp(logits) - logits[target], and p = exp(logits - logsumexp(logits)).",
    )


# ---- GroupSoftmax ---------------------------------------------------------------------
def _random_mask(t: Tester, n: int, c: int) -> Tensor:
    mask = t.rand(n, c) < 0.4
    mask[torch.arange(n), t.randint(c, n)] = True  # every row names at least one class
    return mask


def _group_cases(t: Tester) -> list[tuple[str, Tensor, Tensor]]:
    one_hot_target = t.randint(6, 5)
    return [
        ("N=4, C=6 float64, random groups", t.randn(4, 6, scale=2.0), _random_mask(t, 4, 6)),
        ("N=8, C=5 float64, random groups", t.randn(8, 5, scale=2.0), _random_mask(t, 8, 5)),
        (
            "N=5, C=6 float64, one-hot mask (ordinary cross-entropy)",
            t.randn(5, 6, scale=2.0),
            F.one_hot(one_hot_target, 6).bool(),
        ),
        (
            "N=3, C=4 float64, a row whose group is every class (loss 0)",
            t.randn(3, 4, scale=2.0),
            torch.tensor([[True] * 4, [True, False, True, False], [False, False, False, True]]),
        ),
        (
            "N=12, C=8 float32, random groups",
            t.randn(12, 8, dtype=torch.float32, scale=2.0),
            _random_mask(t, 12, 8),
        ),
        (
            "N=4, C=5 float64, extreme logits of magnitude 1e4",
            t.randn(4, 5, scale=1e4),
            _random_mask(t, 4, 5),
        ),
        (
            "N=4, C=5 float32, extreme logits of magnitude 1e4",
            t.randn(4, 5, dtype=torch.float32, scale=1e4),
            _random_mask(t, 4, 5),
        ),
    ]


def _group_loss_mistakes(logits: Tensor, mask: Tensor, ref_loss: Tensor) -> list:
    n = logits.shape[0]
    logp = torch.log_softmax(logits, -1)
    per_class = torch.where(mask, -logp, torch.zeros_like(logp))
    return [
        (
            "the loss sums -log p over the group's classes (a multi-label loss); GroupSoftmax takes "
            "-log of the summed probability of the group.",
            per_class.sum(-1).mean(),
        ),
        (
            "the loss averages -log p over the group's classes; GroupSoftmax takes -log of the summed "
            "probability.",
            (per_class.sum(-1) / mask.sum(-1)).mean(),
        ),
        ("the loss is summed over the batch; the contract asks for the mean.", ref_loss * n),
        *_clamped_log_mistakes(
            lambda: (
                torch.logsumexp(logits, -1)
                - torch.logsumexp(logits.masked_fill(~mask, float("-inf")), -1)
            ),
            "-log sum_{c in G} p_c = logsumexp(all logits) - logsumexp(logits in G)",
        ),
    ]


def _group_grad_mistakes(logits: Tensor, mask: Tensor) -> list:
    n = logits.shape[0]
    p = torch.softmax(logits, -1)
    m = mask.to(logits.dtype)
    return [
        (
            "dlogits subtracts the mask itself; the target is the posterior within the group, "
            "p * mask / sum(p * mask).",
            (p - m) / n,
        ),
        (
            "dlogits subtracts a uniform distribution over the group; the target is the posterior "
            "within the group, p * mask / sum(p * mask).",
            (p - m / m.sum(-1, keepdim=True)) / n,
        ),
        (
            "dlogits is not divided by N.",
            p - torch.softmax(logits.masked_fill(~mask, float("-inf")), -1),
        ),
    ]


@exercise(
    "group_softmax_cross_entropy",
    forbidden=(*SOFTMAX_OPS, "cross_entropy", "nll_loss"),
    chapter=CHAPTER,
    signature="(logits (N,C), target_mask (N,C) bool) -> (loss, dlogits)",
    summary="GroupSoftmax: -log of the summed softmax probability over each row's group, mean over rows",
    reference=ref_group_softmax_cross_entropy,
    backward=True,
)
def check_group_softmax_cross_entropy(t: Tester) -> None:
    """Random groups, one-hot groups (equals cross-entropy), full groups, extreme logits."""
    _check_loss_and_grad(
        t,
        _group_cases(t),
        ref_group_softmax_cross_entropy,
        _group_loss_mistakes,
        _group_grad_mistakes,
        "-log sum_{c in G} p_c = logsumexp(all logits) - logsumexp(logits in G), and the in-group "
        "posterior q is the softmax of the logits with the classes outside G set to -inf.",
    )


# ---- Gumbel-softmax -------------------------------------------------------------------
#: Total false-alarm probability of each statistical test below (all together stay under 1e-6).
FALSE_ALARM = 1e-7


def _is_one_hot(y: Tensor, dim: int) -> bool:
    return bool(((y == 0) | (y == 1)).all() and (y.sum(dim) == 1).all())


def _expect_sample(t: Tester, case: str, y: object, logits: Tensor, hard: bool, dim: int) -> Tensor:
    """Type, shape, dtype and finiteness of a sample, with the hard-sample mistakes named."""
    shape, dtype = tuple(logits.shape), logits.dtype
    if torch.is_tensor(y) and hard:
        reduced = shape[: dim % len(shape)] + shape[dim % len(shape) + 1 :]
        if tuple(y.shape) == reduced and y.dtype != torch.bool:
            t.fail(
                case,
                f"with hard=True the function returned argmax indices instead of a one-hot tensor "
                f"(shape {tuple(y.shape)}, not {shape}). Return the one-hot of the logits' shape and dtype, "
                "as y_hard - y_soft.detach() + y_soft.",
            )
        if tuple(y.shape) == shape and not y.is_floating_point():
            t.fail(
                case,
                f"with hard=True the function returned a one-hot of dtype "
                f"{str(y.dtype).replace('torch.', '')}; it should have the logits' dtype "
                f"({str(dtype).replace('torch.', '')}) and carry the soft sample's gradient: "
                "y_hard - y_soft.detach() + y_soft (an integer or bool tensor has no gradient).",
            )
    y = t.expect_tensor(case, "sample", y, shape=shape, dtype=dtype)
    bad = ~torch.isfinite(y.detach())
    if bad.any():
        t.fail(
            case,
            f"the sample has NaN or inf in {int(bad.sum())} of {y.numel()} entries. The Gumbel "
            "noise is infinite where u is exactly 0 or 1 in -log(-log(u)) (or E = 0 in -log(E)): "
            "keep u inside the open interval (0, 1), for example by clamping it.",
        )
    return y


def _check_gumbel_shapes(t: Tester, layouts: tuple) -> None:
    for shape, dim, dtype in layouts:
        logits = t.randn(*shape, dtype=dtype)
        for hard in (False, True):
            case = f"logits {shape} {str(dtype)[6:]}, dim={dim}, tau=1, hard={hard}"
            y = _expect_sample(t, case, t.call(case, logits, 1.0, hard, dim), logits, hard, dim)
            if hard:
                if not _is_one_hot(y.detach(), dim):
                    t.fail(
                        case,
                        f"with hard=True the sample should be exactly one-hot along dim={dim} "
                        "(one 1 and zeros elsewhere in every slice).",
                    )
                t.ok(case, "one-hot along dim")
            else:
                sums = y.detach().double().sum(dim)
                if (y < 0).any() or not torch.allclose(
                    sums, torch.ones_like(sums), atol=1e-4 if dtype == torch.float32 else 1e-10
                ):
                    t.fail(
                        case,
                        f"a soft sample is a probability vector along dim={dim}: non-negative and summing to 1.",
                    )
                t.ok(case, "probability vector along dim")


def _check_gumbel_frequencies(t: Tester) -> None:
    probs_logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5], dtype=torch.float64)
    n = 20000
    case = f"{n} hard samples of logits {probs_logits.tolist()}"
    logits = probs_logits.expand(n, 5).clone()
    y = _expect_sample(t, case, t.call(case, logits, 1.0, True, -1), logits, True, -1).detach()
    if not _is_one_hot(y, -1):
        t.fail(case, "with hard=True the sample should be exactly one-hot in every row.")
    freq = y.mean(0)
    p = torch.softmax(probs_logits, 0)
    # A union bound over the 5 classes keeps the total false-alarm probability at FALSE_ALARM.
    bound = hoeffding_radius(n, FALSE_ALARM / 5)
    worst = int(torch.argmax((freq - p).abs()))
    if float((freq - p).abs().max()) > bound:
        t.fail(
            case,
            f"class {worst} came up {float(freq[worst]):.2%} of the time, but softmax(logits) gives it "
            f"{float(p[worst]):.2%} (a correct sampler stays within ±{bound:.2%} except once in "
            f"{1 / FALSE_ALARM:.0e} runs). Check the noise: Gumbel noise is -log(-log(U)) with U uniform "
            "in (0, 1), added to the logits.",
        )
    t.ok(
        case,
        "sample frequencies = softmax(logits)",
        f"ok (max dev {float((freq - p).abs().max()):.3f} <= {bound:.3f})",
    )


def _logistic_cdf(x: Tensor) -> Tensor:
    return torch.sigmoid(x)


def _ks_logistic(sorted_x: Tensor) -> float:
    n = sorted_x.numel()
    cdf = _logistic_cdf(sorted_x)
    hi = torch.arange(1, n + 1, dtype=torch.float64) / n - cdf
    lo = cdf - torch.arange(0, n, dtype=torch.float64) / n
    return float(torch.nan_to_num(torch.maximum(hi, lo), nan=1.0).max())


def _diagnose_noise(diff: Tensor, tau: float) -> str:
    # Only chooses the sentence; pass or fail was decided by the unstandardised KS test.
    # A wrong temperature rescales (and shifts) logistic differences; wrong noise changes their shape.
    finite = diff[torch.isfinite(diff)]
    scale = float(finite.std()) / (math.pi / math.sqrt(3)) if finite.numel() > 1 else float("nan")
    if math.isfinite(scale) and scale > 0:
        standardised, _ = torch.sort((finite - finite.median()) / scale)
        if _ks_logistic(standardised) < 0.017:
            return (
                f"The noise has the Gumbel shape but {scale:.2f} times the expected scale: check that "
                f"you divide (logits + g) by tau (tau={tau} here), once."
            )
    return (
        "The noise is not Gumbel: draw g = -log(-log(u)) with u uniform in (0, 1), one independent "
        "draw per element, and divide (logits + g) by tau."
    )


def _check_gumbel_temperature(t: Tester) -> None:
    # log of a soft sample, times tau, minus the logits, is the Gumbel noise up to a per-row shift;
    # the difference of two independent Gumbel variables follows the standard logistic law.
    n, tau = 20000, 0.5
    base = torch.tensor([0.3, -0.2, 1.0, 0.0], dtype=torch.float64)
    case = f"{n} soft samples, tau={tau}"
    logits = base.expand(n, 4).clone()
    y = _expect_sample(t, case, t.call(case, logits, tau, False, -1), logits, False, -1).detach()
    zeros = float((y <= 0).double().mean())
    if zeros > 0.01:
        t.fail(
            case,
            f"with hard=False the sample should be soft, softmax((logits + g) / tau), but "
            f"{zeros:.0%} of its entries are exactly 0: it looks like a one-hot (hard) sample was returned.",
        )
    if bool((y == y[0]).all()):
        t.fail(
            case,
            "every row got the same sample although every row has the same logits: draw "
            "independent noise for every element (noise of the logits' shape, not one vector).",
        )
    # A correct sampler with float32 noise can legitimately give an exact 0 (u = 0 makes g = -inf);
    # clamping keeps such rare rows finite without moving the empirical distribution.
    z = tau * y.clamp_min(1e-300).log() - logits
    diff, _ = torch.sort(z[:, 0] - z[:, 1])
    ks = _ks_logistic(diff)
    bound = hoeffding_radius(
        n, FALSE_ALARM
    )  # the DKW inequality (Massart's constant) has the same form
    if not ks <= bound:
        t.fail(
            case,
            f"the soft samples do not have the law of softmax((logits + g) / tau) with Gumbel g "
            f"(KS distance {ks:.3f} > {bound:.3f} between the recovered noise differences and the "
            f"logistic law). {_diagnose_noise(diff, tau)}",
        )
    t.ok(case, "noise recovered from the sample is Gumbel", f"ok (KS {ks:.3f} <= {bound:.3f})")


def straight_through_probe(fn: Callable[..., Any], logits: Tensor, tau: float) -> dict[str, Any]:
    """Run where the learner's gumbel_softmax lives: its hard sample and the Jacobian through it."""
    logits = logits.clone().requires_grad_(True)
    y = fn(logits, tau, True, -1)
    if not torch.is_tensor(y) or y.grad_fn is None or y.dim() != 2:
        return {"y": y, "has_grad": torch.is_tensor(y) and y.grad_fn is not None, "grads": None}
    grads = [
        torch.autograd.grad(y[:, k].sum(), logits, retain_graph=True, allow_unused=True)[0]
        for k in range(y.shape[1])
    ]
    return {"y": y.detach(), "has_grad": True, "grads": grads}


def _check_straight_through(t: Tester) -> None:
    n, c, tau = 64, 4, 0.7
    case = f"straight-through gradient, logits ({n}, {c}), tau={tau}, hard=True"
    base = torch.tensor([0.5, -0.5, 1.0, 0.0], dtype=torch.float64)
    logits = base.expand(n, c).clone()
    seen = t.probe(case, straight_through_probe, logits, tau)
    y = _expect_sample(t, case, seen["y"], logits, True, -1)
    no_gradient = (
        "no gradient flows through the hard sample. Use the straight-through trick: "
        "y_hard - y_soft.detach() + y_soft."
    )
    if not seen["has_grad"]:
        t.fail(case, no_gradient)
    if not _is_one_hot(y.detach(), -1):
        t.fail(case, "with hard=True the forward value should be exactly one-hot.")
    grads = seen["grads"]
    if all(g is None or not g.any() for g in grads):
        t.fail(case, no_gradient)
    jac = torch.stack([torch.zeros_like(logits) if g is None else g for g in grads], 1).detach()
    m = tau * jac  # (n, c, c): tau * d y[:, k] / d logits
    if not torch.allclose(m, m.transpose(1, 2), atol=1e-9) or not torch.allclose(
        m.sum(-1), torch.zeros(n, c, dtype=m.dtype), atol=1e-9
    ):
        t.fail(
            case,
            "the gradient is not that of a softmax of (logits + g) / tau (its Jacobian should be "
            "symmetric with rows summing to 0). Return y_hard - y_soft.detach() + y_soft.",
        )
    if torch.allclose(m, m[:1].expand_as(m), atol=1e-9):
        t.fail(
            case,
            "every row has the same Jacobian, so the gradient does not depend on the noise: it "
            "looks like the gradient is that of softmax(logits / tau) without the noise. It should flow "
            "through the noisy soft sample y_soft whose argmax gives the one-hot.",
        )
    # Recover the soft sample from its Jacobian: M = diag(s) - s s^T, so s_k^2 = -M_ki M_kj / M_ij.
    # That needs s_i s_j != 0. A correct sampler with float32 noise can put an exact 0 in a soft
    # sample (u = 0 gives g = -inf), so such rows are set aside rather than counted as wrong.
    off_diagonal = ~torch.eye(c, dtype=torch.bool)
    usable = (m[:, off_diagonal] != 0).all(-1)  # (n,)
    if int(usable.sum()) < n // 2:
        t.fail(
            case,
            "the gradient of the hard sample vanishes between most pairs of classes; it should be "
            "the Jacobian of the soft sample, (diag(y_soft) - y_soft y_soft^T) / tau.",
        )
    m, y_used = m[usable], y.detach()[usable]
    idx = torch.arange(c)
    i, j = (idx + 1) % c, (idx + 2) % c
    s_sq = -m[:, idx, i] * m[:, idx, j] / m[:, i, j]
    s = s_sq.clamp_min(0).sqrt()
    rebuilt = torch.diag_embed(s) - s[:, :, None] * s[:, None, :]
    if not torch.allclose(rebuilt, m, atol=1e-7) or not torch.allclose(
        s.sum(-1), torch.ones_like(s[:, 0]), atol=1e-6
    ):
        t.fail(
            case,
            "the gradient is not that of softmax((logits + g) / tau): check the 1/tau factor "
            "of the soft sample the gradient flows through.",
        )
    # The one-hot must sit on the largest entry of that soft sample (a tolerance absorbs near-ties).
    chosen = (s * y_used).sum(-1)
    if bool((chosen < s.max(-1).values - 1e-6).any()):
        t.fail(
            case,
            "the one-hot sample is not the argmax of the soft sample whose gradient is used: "
            "draw the noise once and take both from the same y_soft.",
        )
    t.ok(case, "d sample / d logits = Jacobian of the soft sample")


@exercise(
    "gumbel_softmax",
    forbidden=("gumbel_softmax",),
    chapter=CHAPTER,
    signature="(logits, tau=1.0, hard=False, dim=-1) -> Tensor",
    summary="Gumbel-softmax samples; hard=True gives one-hot forward with the soft sample's gradient",
    reference=ref_gumbel_softmax,
)
def check_gumbel_softmax(t: Tester) -> None:
    """Shapes and one-hot output, temperature law, sample frequencies, other dims, straight-through."""
    # The laws are tested on the plainest layout (rows, dim=-1) before other dims and dtypes, so a
    # sampler that shares one noise vector across rows is named as such, not as a broadcast error;
    # the soft law comes first because identical soft rows can only come from shared noise.
    _check_gumbel_shapes(t, (((6, 5), -1, torch.float64),))
    _check_gumbel_temperature(t)
    _check_gumbel_frequencies(t)
    _check_gumbel_shapes(t, (((4, 5, 3), 1, torch.float64), ((8, 4), 0, torch.float32)))
    _check_straight_through(t)
