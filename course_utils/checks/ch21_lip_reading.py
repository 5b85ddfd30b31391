"""Check batteries of chapter 21: CTC's loss (the forward recursion in log space) and its two decoders.

``ctc_loss`` is judged against ``F.ctc_loss(..., reduction='none')`` on batches with varying input
and target lengths, targets padded with real labels past their length, repeated labels, a blank
that is not 0, an empty target, an impossible alignment (+inf) and long inputs whose probabilities
underflow any recursion run in probability space; its gradient (autograd through the learner's
recursion) is judged through a log_softmax, where PyTorch's kernel returns the true gradient (see
``ctc_gradient_probe``). Wrong values are matched against models of the usual mistakes.

``ctc_greedy_decode`` is compared with the reference on paths built to separate the collapse
rules. ``ctc_beam_search`` is judged by its contract, not by one implementation's tie-breaking:
with a beam wide enough to be exhaustive it must return the most probable labelling (computed
exactly, every labelling's probability summed over its alignments), on hand-made inputs it must
return the labelling the prefix algorithm defines (beam_width=1 included), and on random inputs
its answer must be at least as probable as the greedy one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..checking import Tester, exercise

CHAPTER = "21_lip_reading"
#: PyTorch's CTC operators, forbidden inside ctc_loss (every form: F., torch., torch.ops.aten).
CTC_OPS = ("ctc_loss", "ctc_loss_backward", "cudnn_ctc_loss")
Tensor = torch.Tensor
NEG_INF = float("-inf")


# =========================================================================================
# References
# =========================================================================================
def log_add(*terms: Tensor) -> Tensor:
    """log(sum(exp(terms))) elementwise, -inf where every term is -inf, with a finite gradient there.

    torch.logsumexp and torch.logaddexp return -inf for all -inf inputs, but their gradient there
    is exp(-inf - (-inf)) = NaN, and the recursion meets such states (unreachable ones) at every
    step; the double ``where`` keeps the NaN out of both the value and the gradient.
    """
    stacked = torch.stack(terms)  # (k, ...)
    top = stacked.amax(0).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.exp(stacked - top).sum(0)
    alive = total > 0
    safe = torch.where(alive, total, torch.ones_like(total))
    return torch.where(alive, torch.log(safe) + top, torch.full_like(total, NEG_INF))


def extended_labels(targets: Tensor, blank: int = 0) -> Tensor:
    """(N, S) padded targets -> (N, 2S+1): blank, l_1, blank, l_2, ..., l_S, blank."""
    n, s = targets.shape
    ext = torch.full((n, 2 * s + 1), blank, dtype=torch.long, device=targets.device)
    ext[:, 1::2] = targets
    return ext


def ref_ctc_loss(
    log_probs: Tensor,
    targets: Tensor,
    input_lengths: Tensor,
    target_lengths: Tensor,
    blank: int = 0,
) -> Tensor:
    """-log p(target | input) per sequence by the forward (alpha) recursion, in log space.

    log_probs (T, N, C), targets (N, S) int64 padded, input_lengths (N,), target_lengths (N,) ->
    (N,), equal to F.ctc_loss(..., reduction='none', zero_infinity=False); differentiable.
    """
    T, n, _ = log_probs.shape
    ext = extended_labels(targets.long(), blank)  # (N, L), L = 2S + 1
    L = ext.shape[1]
    emit = log_probs.gather(2, ext[None].expand(T, n, L))  # (T, N, L): log y_t(l'_s)
    # The skip s-2 -> s is allowed into a label that differs from the label two states back.
    skip = torch.zeros(n, L, dtype=torch.bool, device=ext.device)
    skip[:, 2:] = (ext[:, 2:] != blank) & (ext[:, 2:] != ext[:, :-2])
    alpha = torch.full((n, L), NEG_INF, dtype=log_probs.dtype, device=log_probs.device)
    alpha[:, :2] = emit[0, :, :2]  # start in the first blank or on the first label
    lengths = input_lengths.to(ext.device)
    for t in range(1, T):
        step = F.pad(alpha, (1, 0), value=NEG_INF)[:, :L]  # from s - 1
        jump = F.pad(alpha, (2, 0), value=NEG_INF)[:, :L]  # from s - 2
        jump = torch.where(skip, jump, torch.full_like(jump, NEG_INF))
        new = log_add(alpha, step, jump) + emit[t]
        alpha = torch.where((t < lengths)[:, None], new, alpha)  # frozen after each input's end
    last = 2 * target_lengths.long().to(ext.device)  # (N,): the final blank
    end_blank = alpha.gather(1, last[:, None])[:, 0]
    end_label = alpha.gather(1, (last - 1).clamp(min=0)[:, None])[:, 0]
    end_label = torch.where(last > 0, end_label, torch.full_like(end_label, NEG_INF))
    return -log_add(end_blank, end_label)


def ref_ctc_greedy_decode(log_probs: Tensor, blank: int = 0) -> list[int]:
    """Best path: the most probable class of every frame, repeats collapsed, then blanks dropped."""
    best = log_probs.argmax(-1).tolist()  # (T,)
    out, previous = [], None
    for k in best:
        if k != previous and k != blank:
            out.append(int(k))
        previous = k
    return out


def _lae(a: float, b: float) -> float:
    """log(exp(a) + exp(b)) for Python floats, -inf allowed."""
    if a == NEG_INF:
        return b
    if b == NEG_INF:
        return a
    top = max(a, b)
    return top + math.log1p(math.exp(-abs(a - b)))


def _grow(beams: dict, prefix: tuple[int, ...], slot: int, value: float) -> None:
    """Add probability exp(value) to ``prefix``'s blank-ending (slot 0) or label-ending (1) mass."""
    entry = beams.setdefault(prefix, [NEG_INF, NEG_INF])
    entry[slot] = _lae(entry[slot], value)


def ref_ctc_beam_search(log_probs: Tensor, beam_width: int = 8, blank: int = 0) -> list[int]:
    """CTC prefix beam search: each prefix keeps log p(ends in blank), log p(ends in a label)."""
    beams: dict[tuple[int, ...], list[float]] = {(): [0.0, NEG_INF]}
    for frame in log_probs.double().tolist():  # (C,) per frame
        grown: dict[tuple[int, ...], list[float]] = {}
        for prefix, (p_b, p_nb) in beams.items():
            total = _lae(p_b, p_nb)
            _grow(grown, prefix, 0, total + frame[blank])  # a blank keeps the prefix
            for c, y in enumerate(frame):
                if c == blank:
                    continue
                if prefix and prefix[-1] == c:
                    _grow(grown, prefix, 1, p_nb + y)  # a repeat without a blank collapses
                    _grow(grown, prefix + (c,), 1, p_b + y)  # after a blank it is a new label
                else:
                    _grow(grown, prefix + (c,), 1, total + y)
        ranked = sorted(grown.items(), key=lambda kv: _lae(*kv[1]), reverse=True)
        beams = dict(ranked[:beam_width])
    return list(max(beams.items(), key=lambda kv: _lae(*kv[1]))[0])


def ref_ctc_variant(
    log_probs: Tensor,
    targets: Tensor,
    input_lengths: Tensor,
    target_lengths: Tensor,
    blank: int = 0,
    *,
    skip: str = "differ",
    start: str = "both",
    final: str = "both",
    per_length: bool = False,
) -> Tensor:
    """ref_ctc_loss with one rule changed, in float64: the models of the mistakes learners make.

    skip: "differ" (right), "always" (also between equal labels) or "never"; start: "both" or
    "blank"; final: "both", "blank" or "label"; per_length divides by the target length.
    """
    lp = log_probs.detach().double()
    T, n, _ = lp.shape
    ext = extended_labels(targets.long(), blank)
    L = ext.shape[1]
    emit = lp.gather(2, ext[None].expand(T, n, L))
    allowed = torch.zeros(n, L, dtype=torch.bool)
    if skip != "never":
        allowed[:, 2:] = ext[:, 2:] != blank
        if skip == "differ":
            allowed[:, 2:] &= ext[:, 2:] != ext[:, :-2]
    alpha = torch.full((n, L), NEG_INF, dtype=torch.float64)
    alpha[:, : 1 if start == "blank" else 2] = emit[0, :, : 1 if start == "blank" else 2]
    for t in range(1, T):
        jump = F.pad(alpha, (2, 0), value=NEG_INF)[:, :L].masked_fill(~allowed, NEG_INF)
        new = log_add(alpha, F.pad(alpha, (1, 0), value=NEG_INF)[:, :L], jump) + emit[t]
        alpha = torch.where((t < input_lengths)[:, None], new, alpha)
    last = 2 * target_lengths.long()
    end_blank = alpha.gather(1, last[:, None])[:, 0]
    end_label = alpha.gather(1, (last - 1).clamp(min=0)[:, None])[:, 0].masked_fill(
        last == 0, NEG_INF
    )
    ends = {"both": (end_blank, end_label), "blank": (end_blank,), "label": (end_label,)}[final]
    nll = -log_add(*ends)
    return nll / target_lengths.double().clamp(min=1) if per_length else nll


# =========================================================================================
# ctc_loss
# =========================================================================================
def _labels(t: Tester, n: int, s: int, num_classes: int, blank: int) -> Tensor:
    """(n, s) int64 labels drawn from every class but the blank."""
    draw = t.randint(num_classes - 1, n, s)
    return draw + (draw >= blank).long()


def _ctc_case(
    t: Tester,
    T: int,
    num_classes: int,
    rows: Sequence[Sequence[int]],
    input_lengths: Sequence[int],
    *,
    blank: int = 0,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(log_probs (T, N, C), targets (N, S) padded with real labels, input_lengths, target_lengths)."""
    n, s = len(rows), max(max((len(r) for r in rows), default=0), 1)
    targets = _labels(t, n, s, num_classes, blank)  # the padding past each length is labels too
    for i, row in enumerate(rows):
        targets[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    logits = t.randn(T, n, num_classes, scale=scale)
    return (
        torch.log_softmax(logits, -1).to(dtype),
        targets,
        torch.tensor(input_lengths, dtype=torch.long),
        torch.tensor([len(r) for r in rows], dtype=torch.long),
    )


def _random_rows(
    t: Tester, lengths: Sequence[int], num_classes: int, blank: int
) -> list[list[int]]:
    return [_labels(t, 1, k, num_classes, blank)[0].tolist() if k else [] for k in lengths]


def _peaky(
    t: Tester, T: int, rows: Sequence[Sequence[int]], num_classes: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A long case whose probabilities peak on random classes: -log p(target) runs to hundreds."""
    return _ctc_case(t, T, num_classes, rows, [T] * len(rows), scale=6.0, dtype=dtype)


def _loss_cases(t: Tester) -> list[tuple[str, tuple, dict, str]]:
    """(case, (log_probs, targets, input_lengths, target_lengths), kwargs, kind) for value checks."""
    f32 = torch.float32
    cases = []
    rows = _random_rows(t, [4, 2, 3], 5, 0)
    cases.append(
        (
            "log_probs (12, 3, 5) float64, input_lengths [12, 9, 10], target_lengths [4, 2, 3], "
            "targets padded with labels past their lengths",
            _ctc_case(t, 12, 5, rows, [12, 9, 10]),
            {},
            "plain",
        )
    )
    cases.append(
        (
            "repeated labels: targets [1, 1, 2] and [3, 3, 3, 3], log_probs (14, 2, 4) float64, "
            "input_lengths [14, 11]",
            _ctc_case(t, 14, 4, [[1, 1, 2], [3, 3, 3, 3]], [14, 11]),
            {},
            "plain",
        )
    )
    rows = _random_rows(t, [5, 3, 4, 1], 6, 0)
    rows[2][1] = rows[2][0]  # one repeat
    cases.append(
        (
            "log_probs (20, 4, 6) float32, input_lengths [20, 14, 17, 9], target_lengths [5, 3, 4, 1]",
            _ctc_case(t, 20, 6, rows, [20, 14, 17, 9], dtype=f32),
            {},
            "plain",
        )
    )
    cases.append(
        (
            "blank=4 (the last class; label 0 is a real label), targets [0, 2, 0] and [3, 3], "
            "log_probs (10, 2, 5) float64",
            _ctc_case(t, 10, 5, [[0, 2, 0], [3, 3]], [10, 8], blank=4),
            {"blank": 4},
            "plain",
        )
    )
    cases.append(
        (
            "an empty target (target_length 0: the loss is -sum_t log y_t(blank)) beside [2, 1], "
            "log_probs (8, 2, 4) float64",
            _ctc_case(t, 8, 4, [[], [2, 1]], [8, 6]),
            {},
            "plain",
        )
    )
    cases.append(
        (
            "an impossible alignment: target [1, 1, 2] needs 4 frames (a blank between the two 1s) "
            "but input_length is 3, beside [2, 3] in 5 frames and [1] in 1 frame; log_probs (6, 3, 4) "
            "float64",
            _ctc_case(t, 6, 4, [[1, 1, 2], [2, 3], [1]], [3, 5, 1]),
            {},
            "impossible",
        )
    )
    rows = _random_rows(t, [25, 18], 8, 0)
    cases.append(
        (
            "long: log_probs (200, 2, 8) float64 peaked on random classes, target_lengths [25, 18]",
            _peaky(t, 200, rows, 8, torch.float64),
            {},
            "long",
        )
    )
    rows = _random_rows(t, [12, 20], 8, 0)
    cases.append(
        (
            "long: log_probs (120, 2, 8) float32 peaked on random classes, target_lengths [12, 20]",
            _peaky(t, 120, rows, 8, f32),
            {},
            "long",
        )
    )
    return cases


def _loss_mistakes(
    log_probs: Tensor, targets: Tensor, il: Tensor, tl: Tensor, blank: int
) -> list[tuple[str, Callable[[], Tensor]]]:
    T, n = log_probs.shape[:2]
    S = targets.shape[1]

    def model(**kw: Any) -> Callable[[], Tensor]:
        args = {"input_lengths": il, "target_lengths": tl, "blank": blank}
        options = {k: v for k, v in kw.items() if k not in args}
        args.update({k: v for k, v in kw.items() if k in args})
        return lambda: ref_ctc_variant(log_probs, targets, **args, **options)

    out = []
    if bool((il < T).any()):
        out.append(
            (
                "input_lengths were ignored: the recursion ran over all T frames of the padded batch. "
                "Each sequence stops at its own input_length: freeze alpha after it, or read alpha at "
                "t = input_lengths[n] - 1.",
                model(input_lengths=torch.full((n,), T)),
            )
        )
    if bool((tl < S).any()):
        out.append(
            (
                "the padded entries of targets past target_length were read as labels. Row n's "
                "target is targets[n, :target_lengths[n]]: its final states are 2 * target_lengths[n] "
                "and the one before it, not those of the padded length S.",
                model(target_lengths=torch.full((n,), S)),
            )
        )
    out += [
        (
            "the skip transition s-2 -> s was allowed between two equal labels: then 'a a' collapses "
            "to one 'a', so p(target) also counts alignments of another labelling. Allow the skip only "
            "into a label that differs from the label two states back (l'[s] != l'[s-2]).",
            model(skip="always"),
        ),
        (
            "there is no skip transition: alpha_t(s) must also add alpha_{t-1}(s-2) when l'[s] is a "
            "label different from l'[s-2] (the blank between two different labels is optional).",
            model(skip="never"),
        ),
        (
            "the likelihood was read from the final blank only; a path may also end on the last "
            "label: p = alpha_T(2U) + alpha_T(2U - 1) (0-based states, U = target_length).",
            model(final="blank"),
        ),
        (
            "the likelihood was read from the last label only; a path may also end in the final "
            "blank: p = alpha_T(2U) + alpha_T(2U - 1) (0-based states, U = target_length).",
            model(final="label"),
        ),
        (
            "the recursion started in the first blank only; a path may also start on the first "
            "label: alpha_1(0) = y_1(blank) and alpha_1(1) = y_1(l_1).",
            model(start="blank"),
        ),
        (
            "each loss was divided by its target length (what reduction='mean' does before it "
            "averages); return -log p(target | input) itself for every sequence.",
            model(per_length=True),
        ),
    ]
    if blank != 0:
        out.append(
            (
                f"the blank was taken to be class 0, but blank={blank} here: use the blank argument "
                "for the extended sequence, the skip rule and the starting states.",
                model(blank=0),
            )
        )
    return out


UNDERFLOW = (
    "the loss is {got} for batch entry {n}, where F.ctc_loss gives {want:.1f}: p(target) is about "
    "e^-{want:.0f}, far below the smallest {dtype} (about e^-{floor}), so a recursion run on "
    "probabilities underflows to 0 and -log(0) = inf. Run it on log-probabilities with log-sum-exp "
    "(or rescale alpha at every step, as Graves et al. do)."
)
SENTINEL = (
    "the alignment is impossible, so the loss must be inf (F.ctc_loss returns inf), but batch entry "
    "{n} got {got:.4g}: a finite stand-in for -inf (such as -1e30) reached the result. Keep -inf "
    "(with a log-sum-exp that is safe when every term is -inf), or map such results back to inf."
)
NAN_VALUE = (
    "the loss has NaN at batch entry {n}: a hand-written log-sum-exp subtracted its maximum when "
    "every term was -inf (-inf - (-inf) = NaN). Where the maximum is -inf, subtract 0 instead "
    "(torch.where), or use torch.logsumexp."
)


def _judge_loss_value(
    t: Tester,
    case: str,
    got: Any,
    expected: Tensor,
    dtype: torch.dtype,
    mistakes: list[tuple[str, Callable[[], Tensor]]],
    kind: str,
) -> Tensor:
    """The per-sequence losses: shape (N,), the inputs' dtype, inf exactly where F.ctc_loss has inf."""
    n = expected.shape[0]
    if torch.is_tensor(got) and got.dim() == 0:
        t.fail(
            case,
            f"ctc_loss returned one number, but it returns the loss of every sequence, shape ({n},), "
            "as F.ctc_loss(..., reduction='none'): it looks like the losses were averaged (or "
            "summed). Leave the reduction to the caller.",
        )
    got = t.expect_tensor(case, "loss", got, shape=expected.shape, dtype=dtype)
    g, e = got.detach().double(), expected.double()
    for i in range(n):
        if math.isnan(g[i]) and not math.isnan(e[i]):
            t.fail(case, NAN_VALUE.format(n=i))
        if math.isinf(e[i]) and math.isfinite(g[i]):
            if g[i] > 1e20:
                t.fail(case, SENTINEL.format(n=i, got=float(g[i])))
            break  # a mistake model may explain it: compare() names it
        if math.isfinite(e[i]) and math.isinf(g[i]) and kind == "long":
            floor = 745 if dtype == torch.float64 else 103
            t.fail(
                case,
                UNDERFLOW.format(
                    got=float(g[i]),
                    n=i,
                    want=float(e[i]),
                    dtype=str(dtype).replace("torch.", ""),
                    floor=floor,
                ),
            )
    t.compare(case, "loss", got, expected.to(dtype), mistakes=mistakes)
    return got


def _torch_ctc(log_probs: Tensor, targets: Tensor, il: Tensor, tl: Tensor, blank: int) -> Tensor:
    with torch.no_grad():
        return F.ctc_loss(log_probs.double(), targets, il, tl, blank=blank, reduction="none")


def ctc_gradient_probe(
    fn: Callable[..., Any],
    logits: Tensor,
    targets: Tensor,
    input_lengths: Tensor,
    target_lengths: Tensor,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run where the learner's ctc_loss lives: the losses of log_softmax(logits), and d sum / d logits.

    The gradient is taken through the log_softmax because that is where F.ctc_loss's is right:
    PyTorch's kernel returns exp(log_probs) + d loss / d log_probs, which is the gradient with
    respect to the logits when log_probs = log_softmax(logits), and not the one with respect to
    log_probs itself.
    """
    x = logits.clone().requires_grad_(True)
    out = fn(torch.log_softmax(x, -1), targets, input_lengths, target_lengths, **kwargs)
    if not torch.is_tensor(out):
        return {"type": type(out).__name__}
    seen: dict[str, Any] = {"type": "Tensor", "loss": out.detach(), "grad": None}
    seen["requires_grad"] = bool(out.requires_grad)
    if out.requires_grad:
        (grad,) = torch.autograd.grad(out.sum(), x, allow_unused=True)
        seen["grad"] = torch.zeros_like(logits) if grad is None else grad.detach()
    return seen


def _gradient_cases(t: Tester) -> list[tuple[str, Tensor, tuple, dict]]:
    """(case, logits (T, N, C), (targets, input_lengths, target_lengths), kwargs)."""
    f32 = torch.float32
    out = []
    spec = [
        (
            "logits (10, 3, 5) float64, target_lengths [3, 2, 3] with a repeat, input_lengths [10, 7, 9]",
            10,
            5,
            [[1, 1, 3], [2, 4], None],
            [10, 7, 9],
            0,
            torch.float64,
        ),
        (
            "logits (16, 2, 6) float32, blank=2, input_lengths [16, 12]",
            16,
            6,
            [None, [0, 5, 5, 1]],
            [16, 12],
            2,
            f32,
        ),
        (
            "logits (60, 2, 5) float64, target_lengths [8, 12], input_lengths [60, 45]",
            60,
            5,
            [None, None],
            [60, 45],
            0,
            torch.float64,
        ),
    ]
    for case, T, C, rows, il, blank, dtype in spec:
        rows = [
            r if r is not None else _random_rows(t, [3 if T < 20 else 8 + 4 * i], C, blank)[0]
            for i, r in enumerate(rows)
        ]
        log_probs, targets, lengths, tl = _ctc_case(t, T, C, rows, il, blank=blank)
        logits = t.randn(T, len(rows), C).to(dtype)
        out.append((case, logits, (targets, lengths, tl), {"blank": blank} if blank else {}))
    return out


def _expected_gradient(logits: Tensor, targets: Tensor, il: Tensor, tl: Tensor, blank: int):
    x = logits.detach().double().requires_grad_(True)
    with torch.enable_grad():
        loss = F.ctc_loss(torch.log_softmax(x, -1), targets, il, tl, blank=blank, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


NAN_GRADIENT = (
    "the loss is right but its gradient has NaN: torch.logsumexp (or logaddexp) of terms that are "
    "all -inf returns -inf, with the gradient exp(-inf - (-inf)) = NaN, and the recursion meets such "
    "unreachable states at every step. Keep the NaN out of the graph: take the log-sum-exp only "
    "where some term is finite (torch.where on both the input and the output), or use a large "
    "finite negative number instead of -inf inside the recursion and turn the result back into inf."
)


def _judge_gradient_case(t: Tester, case: str, logits: Tensor, args: tuple, kwargs: dict) -> None:
    targets, il, tl = args
    blank = kwargs.get("blank", 0)
    seen = t.probe(case, ctc_gradient_probe, logits, targets, il, tl, **kwargs)
    if seen["type"] != "Tensor":
        t.fail(
            case,
            f"ctc_loss should return a tensor differentiable in log_probs, but it returned a "
            f"{seen['type']}: it looks like .item(), .tolist() or numpy was used.",
        )
    want, grad = _expected_gradient(logits, targets, il, tl, blank)
    lp = torch.log_softmax(logits.double(), -1)
    _judge_loss_value(
        t,
        case,
        seen["loss"],
        want,
        logits.dtype,
        _loss_mistakes(lp, targets, il, tl, blank),
        "plain",
    )
    if not seen["requires_grad"]:
        t.fail(
            case,
            "the loss has the right value but no gradient flows to log_probs (it does not require "
            "grad): it looks like the computation was detached (.detach(), .item(), torch.tensor(...) "
            "or numpy). Training backpropagates through ctc_loss, so build it from torch operations.",
        )
    got = seen["grad"]
    if torch.is_tensor(got) and got.shape == grad.shape and torch.isnan(got).any():
        t.fail(case, NAN_GRADIENT)
    t.compare(case, "d loss.sum() / d logits (through log_softmax)", got, grad.to(logits.dtype))


@exercise(
    "ctc_loss",
    forbidden=CTC_OPS,
    chapter=CHAPTER,
    signature=(
        "(log_probs (T,N,C), targets (N,S) int64 padded, input_lengths (N,) int64, "
        "target_lengths (N,) int64, blank=0) -> (N,)"
    ),
    summary="-log p(target | input) per sequence by the CTC forward recursion in log space, as "
    "F.ctc_loss(..., reduction='none'): +inf for an impossible alignment; differentiable in log_probs",
    reference=ref_ctc_loss,
)
def check_ctc_loss(t: Tester) -> None:
    """Values against F.ctc_loss (lengths, repeats, blank != 0, empty and impossible targets, long
    inputs), then gradients through a log_softmax against F.ctc_loss's."""
    for case, (lp, targets, il, tl), kwargs, kind in _loss_cases(t):
        blank = kwargs.get("blank", 0)
        got = t.call(case, lp, targets, il, tl, **kwargs)
        want = _torch_ctc(lp, targets, il, tl, blank)
        mistakes = _loss_mistakes(lp, targets, il, tl, blank)
        _judge_loss_value(t, case, got, want, lp.dtype, mistakes, kind)
    for case, logits, args, kwargs in _gradient_cases(t):
        _judge_gradient_case(t, case, logits, args, kwargs)


# =========================================================================================
# Decoders: shared helpers
# =========================================================================================
def _path_log_probs(
    t: Tester, path: Sequence[int], num_classes: int, dtype: torch.dtype = torch.float64
) -> Tensor:
    """(T, C) log-probabilities whose most probable class at frame i is path[i], by a clear margin."""
    logits = t.randn(len(path), num_classes, scale=0.5)
    logits[torch.arange(len(path)), torch.tensor(path, dtype=torch.long)] += 4.0
    return torch.log_softmax(logits, -1).to(dtype)


def _as_labels(t: Tester, case: str, got: Any, name: str) -> list[int]:
    """The decoder's answer as a list of ints; a one-line failure for anything else."""
    if torch.is_tensor(got):
        t.fail(
            case,
            f"{name} should return a list of Python ints, but it returned a tensor of shape "
            f"{tuple(got.shape)}: convert it with .tolist().",
        )
    ok = isinstance(got, list | tuple) and all(
        isinstance(k, int) and not isinstance(k, bool) for k in got
    )
    if not ok:
        t.fail(
            case,
            f"{name} should return a list of Python ints (the labels, blanks removed), but it "
            f"returned {got!r:.80}.",
        )
    return list(got)


def _collapse(
    path: Sequence[int], blank: int, *, merge: bool = True, drop: bool = True
) -> list[int]:
    out: list[int] = []
    previous = None
    for k in path:
        if (not merge or k != previous) and (not drop or k != blank):
            out.append(int(k))
        previous = k
    return out


# =========================================================================================
# ctc_greedy_decode
# =========================================================================================
def _greedy_mistakes(path: Sequence[int], blank: int) -> list[tuple[str, list[int]]]:
    no_blanks = [k for k in path if k != blank]
    return [
        (
            "the blanks were removed before the repeats were collapsed, so 'a, blank, a' became one "
            "'a'. Collapse the repeats of the frame-by-frame path first, then drop the blanks: the "
            "blank is what separates two equal labels.",
            _collapse(no_blanks, blank),
        ),
        (
            "the repeats were not collapsed: consecutive frames with the same label are one label.",
            _collapse(path, blank, merge=False),
        ),
        (
            "the blanks were not removed after collapsing the repeats.",
            _collapse(path, blank, drop=False),
        ),
        (
            f"the blank was taken to be class 0, but blank={blank} here: drop the frames of the "
            "blank argument's class.",
            _collapse(path, 0) if blank != 0 else None,
        ),
    ]


def _greedy_cases(t: Tester) -> list[tuple[str, Tensor, dict]]:
    f32 = torch.float32
    path = [1, 1, 0, 1, 2, 2, 0, 0, 3, 3, 0, 2]
    blank_last = [0, 0, 3, 0, 1, 3, 3, 2, 2, 0]
    random = t.randn(25, 6, scale=2.0)
    return [
        (f"best path {path}, C=4 float64", _path_log_probs(t, path, 4), {}),
        (
            f"best path {blank_last}, C=4 float32, blank=3 (label 0 is a real label)",
            _path_log_probs(t, blank_last, 4, f32),
            {"blank": 3},
        ),
        ("best path all blank, T=6, C=3", _path_log_probs(t, [0] * 6, 3), {}),
        ("T=1, best class 2, C=3", _path_log_probs(t, [2], 3), {}),
        ("random log_probs (25, 6) float32", torch.log_softmax(random, -1).to(f32), {}),
    ]


@exercise(
    "ctc_greedy_decode",
    chapter=CHAPTER,
    signature="(log_probs (T,C), blank=0) -> list[int]",
    summary="best-path decoding: the most probable class of each frame, repeats collapsed, then "
    "blanks removed",
    reference=ref_ctc_greedy_decode,
)
def check_ctc_greedy_decode(t: Tester) -> None:
    """Paths built so that each collapse rule changes the answer; blank != 0; all blank; T = 1."""
    for case, lp, kwargs in _greedy_cases(t):
        got = _as_labels(t, case, t.call(case, lp, **kwargs), "ctc_greedy_decode")
        blank = kwargs.get("blank", 0)
        want = ref_ctc_greedy_decode(lp, blank)
        if got != want:
            path = lp.argmax(-1).tolist()
            why = next(
                (s for s, alt in _greedy_mistakes(path, blank) if alt == got and alt != want), ""
            )
            t.fail(
                case,
                f"expected {want}, got {got}." + (f" It looks like {why}" if why else ""),
            )
        t.ok(case, "labels", f"ok ({len(got)} labels)")


# =========================================================================================
# ctc_beam_search
# =========================================================================================
def labelling_log_probs(
    log_probs: Tensor, labellings: Sequence[Sequence[int]], blank: int = 0
) -> Tensor:
    """log p(l | x) of each labelling l, every alignment summed (the forward recursion, batched)."""
    T, C = log_probs.shape
    n = len(labellings)
    filler = 1 if blank == 0 else 0
    width = max(max((len(lab) for lab in labellings), default=0), 1)
    targets = torch.full((n, width), filler, dtype=torch.long)
    for i, lab in enumerate(labellings):
        targets[i, : len(lab)] = torch.tensor(list(lab), dtype=torch.long)
    lp = log_probs.detach().double()[:, None, :].expand(T, n, C)
    lengths = torch.tensor([len(lab) for lab in labellings], dtype=torch.long)
    with torch.no_grad():
        return -ref_ctc_loss(lp, targets, torch.full((n,), T), lengths, blank)


def _every_labelling(T: int, num_classes: int, blank: int) -> list[tuple[int, ...]]:
    labels = [c for c in range(num_classes) if c != blank]
    return [lab for k in range(T + 1) for lab in itertools.product(labels, repeat=k)]


def _exhaustive_case(
    t: Tester, T: int, num_classes: int, blank: int, dtype: torch.dtype
) -> tuple[Tensor, list[int]]:
    """Random log_probs whose most probable labelling differs from the greedy one, clearly ahead."""
    every = _every_labelling(T, num_classes, blank)
    for _ in range(200):
        logits = t.randn(T, num_classes)
        logits[:, blank] += 0.8  # a blank-heavy input, where summing alignments matters most
        lp = torch.log_softmax(logits, -1).to(dtype)
        scores = labelling_log_probs(lp, every, blank)
        top2 = scores.topk(2)
        best = list(every[int(top2.indices[0])])
        if (
            best != ref_ctc_greedy_decode(lp, blank)
            and float(top2.values[0] - top2.values[1]) > 0.05
        ):
            return lp, best
    raise RuntimeError(
        "no input separated the beam search from greedy decoding"
    )  # pragma: no cover


def ref_beam_variant(
    log_probs: Tensor,
    beam_width: int = 8,
    blank: int = 0,
    *,
    merge: bool = True,
    repeat: str = "right",
) -> list[int]:
    """The beam-search mistakes: a path beam (merge=False), or a repeat rule changed.

    repeat="new": a label equal to the prefix's last one always starts a new label (from p_b
    and p_nb alike); repeat="collapse": it never does (not even after a blank).
    """
    lp = log_probs.double().tolist()
    if not merge:  # beams of single alignments, collapsed only at the end
        paths: dict[tuple[int, ...], float] = {(): 0.0}
        for frame in lp:
            grown = {p + (c,): s + y for p, s in paths.items() for c, y in enumerate(frame)}
            paths = dict(sorted(grown.items(), key=lambda kv: kv[1], reverse=True)[:beam_width])
        return _collapse(max(paths.items(), key=lambda kv: kv[1])[0], blank)
    beams: dict[tuple[int, ...], list[float]] = {(): [0.0, NEG_INF]}
    for frame in lp:
        nxt: dict[tuple[int, ...], list[float]] = {}
        for prefix, (p_b, p_nb) in beams.items():
            total = _lae(p_b, p_nb)
            _grow(nxt, prefix, 0, total + frame[blank])
            for c, y in enumerate(frame):
                if c == blank:
                    continue
                same = bool(prefix) and prefix[-1] == c
                if same and repeat == "new":
                    _grow(nxt, prefix + (c,), 1, total + y)
                elif same and repeat == "collapse":
                    _grow(nxt, prefix, 1, total + y)
                elif same:
                    _grow(nxt, prefix, 1, p_nb + y)
                    _grow(nxt, prefix + (c,), 1, p_b + y)
                else:
                    _grow(nxt, prefix + (c,), 1, total + y)
        beams = dict(sorted(nxt.items(), key=lambda kv: _lae(*kv[1]), reverse=True)[:beam_width])
    return list(max(beams.items(), key=lambda kv: _lae(*kv[1]))[0])


def _beam_mistakes(lp: Tensor, width: int, blank: int) -> list[tuple[str, Callable[[], list[int]]]]:
    out = [
        (
            "the answer is the labelling of the single most probable path, which greedy decoding "
            "returns (and so does a beam over paths that never merges the alignments of one "
            "prefix). Prefix beam search adds up every alignment of each prefix: p_b for those "
            "ending in a blank, p_nb for those ending in its last label.",
            lambda: ref_ctc_greedy_decode(lp, blank),
        ),
        (
            "the alignments of one prefix were never merged: this is a beam search over paths "
            "(frame-by-frame alignments), collapsed at the end. Prefix beam search keeps one entry "
            "per labelling prefix and adds up the probability of every alignment that reaches it "
            "(p_b for those ending in a blank, p_nb for those ending in its last label).",
            lambda: ref_beam_variant(lp, width, blank, merge=False),
        ),
        (
            "a label equal to the prefix's last label was appended as a new label from every "
            "alignment. Only the alignments ending in a blank (p_b) start a new label; those ending "
            "in that label (p_nb) collapse into the same prefix: 'a a' is one 'a'.",
            lambda: ref_beam_variant(lp, width, blank, repeat="new"),
        ),
        (
            "a label equal to the prefix's last label was always collapsed into the prefix, even "
            "after a blank: 'a blank a' is two a's, so the alignments ending in a blank (p_b) extend "
            "the prefix with a new label.",
            lambda: ref_beam_variant(lp, width, blank, repeat="collapse"),
        ),
    ]
    if lp.shape[0] <= 6:  # unpruned, the prefixes grow like (C - 1)^T
        out.append(
            (
                "beam_width was not applied: after every frame keep only the beam_width prefixes "
                "of largest p_b + p_nb.",
                lambda: ref_ctc_beam_search(lp, 10**9, blank),
            )
        )
    if blank != 0:
        out.append(
            (
                f"the blank was taken to be class 0, but blank={blank} here.",
                lambda: ref_ctc_beam_search(lp, width, 0),
            )
        )
    return out


def _name_beam_mistake(lp: Tensor, width: int, blank: int, got: list[int], want: list[int]) -> str:
    for sentence, model in _beam_mistakes(lp, width, blank):
        alt = model()
        if alt == got and alt != want:
            return f" It looks like {sentence}"
    return ""


def _log_p(lp: Tensor, labels: Sequence[int], blank: int) -> float:
    return float(labelling_log_probs(lp, [labels], blank)[0])


def _judge_labels(
    t: Tester, case: str, got: Any, lp: Tensor, blank: int, name: str = "ctc_beam_search"
) -> list[int]:
    labels = _as_labels(t, case, got, name)
    C = lp.shape[-1]
    if any(k == blank for k in labels):
        hint = ""
        if blank != 0 and 0 not in labels:
            hint = f" It looks like the blank was taken to be class 0, but blank={blank} here."
        t.fail(case, f"{labels} contains the blank ({blank}); a labelling holds labels only.{hint}")
    if any(not 0 <= k < C for k in labels):
        t.fail(case, f"{labels} holds a class outside 0..{C - 1}.")
    return labels


def _normalised_log(probs: list[list[float]]) -> Tensor:
    p = torch.tensor(probs, dtype=torch.float64)
    return (p / p.sum(-1, keepdim=True)).log()


def _beam_cases(t: Tester) -> list[tuple[str, Tensor, dict, list[int] | None]]:
    """(case, log_probs (T, C), kwargs, the answer or None for a property case)."""
    f32 = torch.float32
    two = torch.tensor([[0.6, 0.4], [0.6, 0.4]], dtype=torch.float64).log()
    same = _normalised_log([[0.1, 0.9, 0.002]] * 3)
    split = _normalised_log([[0.1, 0.9, 0.002], [0.9, 0.1, 0.002], [0.1, 0.9, 0.002]])
    lp5, best5 = _exhaustive_case(t, 5, 3, 0, torch.float64)
    lp4, best4 = _exhaustive_case(t, 4, 4, 3, f32)
    return [
        (
            "2 frames with p(blank) = 0.6, p(1) = 0.4 each, beam_width=2: p([]) = 0.36 < "
            "p([1]) = 0.64 although the best path is blank, blank",
            two,
            {"beam_width": 2},
            [1],
        ),
        (
            "the same 2 frames, beam_width=1: the only beam kept after frame 1 is [] (0.6 > 0.4)",
            two,
            {"beam_width": 1},
            [],
        ),
        (
            "3 frames with p(1) = 0.9 each, beam_width=4: the answer is one 1",
            same,
            {"beam_width": 4},
            [1],
        ),
        (
            "frames 1, blank, 1 at p = 0.9, beam_width=4: the answer is two 1s",
            split,
            {"beam_width": 4},
            [1, 1],
        ),
        (
            f"random log_probs (5, 3) float64, beam_width=64 (exhaustive): the most probable "
            f"labelling {best5} is not the greedy one",
            lp5,
            {"beam_width": 64},
            best5,
        ),
        (
            f"random log_probs (4, 4) float32, blank=3, beam_width=128 (exhaustive): the most "
            f"probable labelling {best4} is not the greedy one",
            lp4,
            {"beam_width": 128, "blank": 3},
            best4,
        ),
        (
            "random log_probs (12, 5) float64, default beam_width",
            torch.log_softmax(t.randn(12, 5, scale=1.5), -1),
            {},
            None,
        ),
        (
            "random log_probs (30, 6) float32, beam_width=16",
            torch.log_softmax(t.randn(30, 6, scale=2.0), -1).to(f32),
            {"beam_width": 16},
            None,
        ),
    ]


@exercise(
    "ctc_beam_search",
    chapter=CHAPTER,
    signature="(log_probs (T,C), beam_width=8, blank=0) -> list[int]",
    summary="CTC prefix beam search in log space (per prefix: p(ends in blank), p(ends in a label)); "
    "exhaustive beams return the most probable labelling",
    reference=ref_ctc_beam_search,
)
def check_ctc_beam_search(t: Tester) -> None:
    """Hand-made inputs, exhaustive beams (the exact most probable labelling), then random inputs
    where the answer must be at least as probable as the greedy decoding (or the prefix search's)."""
    for case, lp, kwargs, want in _beam_cases(t):
        blank = kwargs.get("blank", 0)
        width = kwargs.get("beam_width", 8)
        got = _judge_labels(t, case, t.call(case, lp, **kwargs), lp, blank)
        if want is not None:
            if got != want:
                why = _name_beam_mistake(lp, width, blank, got, want)
                t.fail(case, f"expected {want}, got {got}.{why}")
            t.ok(case, "labels", "ok (the labelling the prefix search defines)")
            continue
        # Pruning can lose the greedy prefix on some inputs, so the bar is the less probable of
        # the greedy answer and the prefix search's own (no correct search returns less).
        greedy = ref_ctc_greedy_decode(lp, blank)
        ref = ref_ctc_beam_search(lp, width, blank)
        p_got, p_greedy = _log_p(lp, got, blank), _log_p(lp, greedy, blank)
        bar = min(p_greedy, _log_p(lp, ref, blank))
        if p_got < bar - 1e-6:
            why = _name_beam_mistake(lp, width, blank, got, ref)
            t.fail(
                case,
                f"the answer {got} has log p = {p_got:.4f}, less than the greedy decoding {greedy} "
                f"(log p = {p_greedy:.4f}) and than the prefix search's answer (log p = {bar:.4f} "
                f"at the least): merging the alignments of each prefix should find a labelling at "
                f"least as probable.{why}",
            )
        t.ok(case, "log p(labels)", f"ok ({p_got:.3f} >= greedy {p_greedy:.3f})")
