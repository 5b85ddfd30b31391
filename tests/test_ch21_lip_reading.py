"""Chapter 21 batteries: correct CTC losses and decoders in several styles pass, planted mistakes are named.

Styles: the references; a loop over the sequences that reads each alpha at its own input length and
uses a finite stand-in for -inf; Graves's rescaled probability-space recursion; a torch.logsumexp
recursion made safe with masks; three greedy decoders (unique_consecutive, numpy, groupby); two prefix
beam searches (numpy's logaddexp with heapq, and probabilities rescaled at every frame).
Mistakes: the lattice's (skip between equal labels, no skip, wrong start or end states), the batch's
(input_lengths ignored, padded targets read, blank hard-coded), log space's (probabilities that
underflow, NaN from -inf - -inf, the NaN gradient of torch.logsumexp, a finite -inf leaking into an
impossible alignment), the reduction's (mean, division by the target length), the decoders' collapse
rules, path beams, repeat rules and unapplied beam widths, each rejected with the sentence naming it.
"""

from __future__ import annotations

import heapq
import itertools
import math
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from check_times import report_check_seconds

import course_utils as cu
from course_utils.checks import ch21_lip_reading as ch21

SEEDS = range(8)
MISTAKE_SEEDS = (0, 1, 5)
NEG = float("-inf")


# =====================================================================================
# Correct implementations
# =====================================================================================
def ctc_loss_per_sequence(log_probs, targets, input_lengths, target_lengths, blank=0):
    """One sequence at a time, alpha kept for every frame and read at T_n - 1; -1e30 stands for -inf."""
    big = -1e30
    out = []
    for n in range(log_probs.shape[1]):
        T_n, U_n = int(input_lengths[n]), int(target_lengths[n])
        labels = [blank]
        for label in targets[n, :U_n].tolist():
            labels += [label, blank]
        ext = torch.tensor(labels)
        lp = log_probs[:T_n, n, :][:, ext]  # (T_n, L)
        L = len(labels)
        skip = torch.tensor(
            [s >= 2 and labels[s] != blank and labels[s] != labels[s - 2] for s in range(L)]
        )
        first = torch.full((L,), big, dtype=log_probs.dtype)
        first = torch.cat([lp[0, : min(2, L)], first[min(2, L) :]])
        alphas = [first]
        for t in range(1, T_n):
            a = alphas[-1]
            pad = torch.full((2,), big, dtype=a.dtype)
            shifted1 = torch.cat([pad[:1], a[:-1]])
            shifted2 = torch.where(skip, torch.cat([pad, a[:-2]])[:L], torch.full_like(a, big))
            alphas.append(torch.logsumexp(torch.stack([a, shifted1, shifted2]), 0) + lp[t])
        final = alphas[-1]
        ends = final[-2:] if L > 1 else final[-1:]
        ll = torch.logsumexp(ends, 0)
        out.append(torch.where(ll < big / 2, torch.tensor(math.inf, dtype=ll.dtype), -ll))
    return torch.stack(out)


def ctc_loss_rescaled(log_probs, targets, input_lengths, target_lengths, blank=0):
    """Graves et al.'s scheme: probabilities, alpha renormalised every frame, log of the scales summed.

    In float64 inside: in float32 a state e^-90 below the frame's best flushes to 0 and is lost, which
    the peaked long cases show (a 1 % error); the result comes back in the input's dtype.
    """
    dtype = log_probs.dtype
    log_probs = log_probs.double()
    T, N, _ = log_probs.shape
    L = 2 * targets.shape[1] + 1
    ext = torch.full((N, L), blank, dtype=torch.long)
    ext[:, 1::2] = targets
    y = log_probs.exp().gather(2, ext.expand(T, N, L))  # (T, N, L)
    skip = torch.zeros(N, L)
    skip[:, 2:] = ((ext[:, 2:] != blank) & (ext[:, 2:] != ext[:, :-2])).to(skip.dtype)
    skip = skip.to(log_probs.dtype)
    alpha = torch.zeros(N, L, dtype=log_probs.dtype)
    alpha = torch.cat([y[0, :, :2], alpha[:, 2:]], 1)
    scale = alpha.sum(1, keepdim=True)
    log_scale = scale.log()[:, 0]
    alpha = alpha / scale
    zero = torch.zeros(N, 2, dtype=log_probs.dtype)
    for t in range(1, T):
        new = (
            alpha
            + torch.cat([zero[:, :1], alpha[:, :-1]], 1)
            + skip * torch.cat([zero, alpha[:, :-2]], 1)[:, :L]
        ) * y[t]
        c = new.sum(1, keepdim=True)
        live = (t < input_lengths)[:, None]
        alpha = torch.where(live, new / c, alpha)
        log_scale = log_scale + torch.where(live[:, 0], c.log()[:, 0], torch.zeros_like(log_scale))
    end = 2 * target_lengths
    p_end = alpha.gather(1, end[:, None])[:, 0]
    p_end = p_end + torch.where(
        end > 0, alpha.gather(1, (end - 1).clamp(min=0)[:, None])[:, 0], 0.0
    )
    return -(p_end.log() + log_scale).to(dtype)


def _safe_logsumexp(x, dim):
    dead = torch.isinf(x).all(dim, keepdim=True) & (x < 0).all(dim, keepdim=True)
    value = torch.logsumexp(torch.where(dead, torch.zeros_like(x), x), dim)
    return torch.where(dead.squeeze(dim), torch.full_like(value, NEG), value)


def ctc_loss_masked_logsumexp(log_probs, targets, input_lengths, target_lengths, blank=0):
    """torch.logsumexp with all -inf groups masked out, alpha for every frame stacked, einsum gather."""
    T, N, C = log_probs.shape
    L = 2 * targets.shape[1] + 1
    ext = torch.full((N, L), blank, dtype=torch.long)
    ext[:, 1::2] = targets
    onehot = F.one_hot(ext, C).to(log_probs.dtype)  # (N, L, C)
    emit = torch.einsum("tnc,nlc->tnl", log_probs.exp(), onehot).log()  # (T, N, L)
    skip = torch.zeros(N, L, dtype=torch.bool)
    skip[:, 2:] = (ext[:, 2:] != blank) & (ext[:, 2:] != ext[:, :-2])
    alpha = [
        torch.cat([emit[0, :, :2], torch.full((N, L - 2), NEG, dtype=log_probs.dtype)], 1)[:, :L]
    ]
    for t in range(1, T):
        a = alpha[-1]
        prev1 = F.pad(a, (1, 0), value=NEG)[:, :L]
        prev2 = F.pad(a, (2, 0), value=NEG)[:, :L].masked_fill(~skip, NEG)
        alpha.append(_safe_logsumexp(torch.stack([a, prev1, prev2], -1), -1) + emit[t])
    alphas = torch.stack(alpha)  # (T, N, L)
    at_end = alphas[input_lengths - 1, torch.arange(N)]  # (N, L)
    end = 2 * target_lengths
    pair = torch.stack(
        [
            at_end.gather(1, end[:, None])[:, 0],
            at_end.gather(1, (end - 1).clamp(min=0)[:, None])[:, 0],
        ],
        -1,
    )
    pair[:, 1] = torch.where(end > 0, pair[:, 1], torch.full_like(pair[:, 1], NEG))
    return -_safe_logsumexp(pair, -1)


def greedy_unique(log_probs, blank=0):
    labels = torch.unique_consecutive(log_probs.argmax(-1))
    return labels[labels != blank].tolist()


def greedy_numpy(log_probs, blank=0):
    best = np.argmax(log_probs.numpy(), axis=-1)
    keep = np.ones(len(best), dtype=bool)
    keep[1:] = best[1:] != best[:-1]
    return [int(k) for k in best[keep] if k != blank]


def greedy_groupby(log_probs, blank=0):
    return [k for k, _ in itertools.groupby(log_probs.argmax(-1).tolist()) if k != blank]


def beam_numpy_heapq(log_probs, beam_width=8, blank=0):
    """np.logaddexp over float64 numpy arrays, heapq.nlargest for the pruning."""
    lp = log_probs.detach().double().numpy()
    beams = {(): (0.0, -np.inf)}
    for frame in lp:
        nxt = {}

        def add(prefix, b=-np.inf, nb=-np.inf, nxt=nxt):
            old_b, old_nb = nxt.get(prefix, (-np.inf, -np.inf))
            nxt[prefix] = (np.logaddexp(old_b, b), np.logaddexp(old_nb, nb))

        for prefix, (pb, pnb) in beams.items():
            total = np.logaddexp(pb, pnb)
            add(prefix, b=total + frame[blank])
            for c in range(len(frame)):
                if c == blank:
                    continue
                if prefix and prefix[-1] == c:
                    add(prefix, nb=pnb + frame[c])
                    add(prefix + (c,), nb=pb + frame[c])
                else:
                    add(prefix + (c,), nb=total + frame[c])
        beams = dict(heapq.nlargest(beam_width, nxt.items(), key=lambda kv: np.logaddexp(*kv[1])))
    return list(max(beams.items(), key=lambda kv: np.logaddexp(*kv[1]))[0])


def beam_rescaled(log_probs, beam_width=8, blank=0):
    """Probabilities, divided after every frame by the best beam's total so nothing underflows."""
    y = log_probs.detach().double().exp().tolist()
    beams = {(): [1.0, 0.0]}
    for frame in y:
        nxt = {}
        for prefix, (pb, pnb) in beams.items():
            nxt.setdefault(prefix, [0.0, 0.0])[0] += (pb + pnb) * frame[blank]
            for c, p in enumerate(frame):
                if c == blank:
                    continue
                if prefix and prefix[-1] == c:
                    nxt[prefix][1] += pnb * p
                    nxt.setdefault(prefix + (c,), [0.0, 0.0])[1] += pb * p
                else:
                    nxt.setdefault(prefix + (c,), [0.0, 0.0])[1] += (pb + pnb) * p
        kept = sorted(nxt.items(), key=lambda kv: -sum(kv[1]))[:beam_width]
        top = sum(kept[0][1])
        beams = {k: [v[0] / top, v[1] / top] for k, v in kept}
    return list(max(beams.items(), key=lambda kv: sum(kv[1]))[0])


CORRECT = {
    "ctc_loss": [ctc_loss_per_sequence, ctc_loss_rescaled, ctc_loss_masked_logsumexp],
    "ctc_greedy_decode": [greedy_unique, greedy_numpy, greedy_groupby],
    "ctc_beam_search": [beam_numpy_heapq, beam_rescaled],
}
PAIRS = [(e, f) for e, fs in CORRECT.items() for f in fs]


@pytest.mark.parametrize(("exercise_id", "fn"), PAIRS, ids=[f.__name__ for _, f in PAIRS])
def test_correct_implementation_passes_on_every_seed(exercise_id, fn):
    for seed in SEEDS:
        cu.check(exercise_id, fn, strict=True, seed=seed)


@pytest.mark.parametrize("exercise_id", list(CORRECT))
def test_reference_passes_its_own_battery(exercise_id):
    for seed in range(12):
        cu.check(exercise_id, cu.reference(exercise_id), strict=True, seed=seed)


def test_references_agree_with_hand_computed_numbers():
    # Two frames of (blank 0.6, a 0.4): p(a) = 0.16 + 0.24 + 0.24, p() = 0.36, p(aa) = 0 (needs 3 frames).
    lp = torch.tensor([[0.6, 0.4], [0.6, 0.4]], dtype=torch.float64).log()[:, None].expand(2, 3, 2)
    nll = ch21.ref_ctc_loss(
        lp, torch.tensor([[1, 1], [1, 1], [1, 1]]), torch.tensor([2, 2, 2]), torch.tensor([1, 0, 2])
    )
    assert torch.allclose(nll[:2], -torch.tensor([0.64, 0.36], dtype=torch.float64).log())
    assert nll[2] == math.inf
    assert ch21.ref_ctc_greedy_decode(lp[:, 0]) == []
    assert ch21.ref_ctc_beam_search(lp[:, 0], beam_width=2) == [1]
    assert ch21.ref_ctc_beam_search(lp[:, 0], beam_width=1) == []


def test_every_labelling_sums_to_one_and_the_exhaustive_cases_separate_beam_from_greedy():
    t = cu.checking.Tester(cu.checking.get_exercise("ctc_beam_search"), None, 0)
    for T, C, blank in ((5, 3, 0), (4, 4, 3)):
        lp, best = ch21._exhaustive_case(t, T, C, blank, torch.float64)
        every = ch21._every_labelling(T, C, blank)
        scores = ch21.labelling_log_probs(lp, every, blank)
        assert abs(float(scores.exp().sum()) - 1) < 1e-12
        assert list(every[int(scores.argmax())]) == best != ch21.ref_ctc_greedy_decode(lp, blank)


def test_pytorch_gradient_is_the_logit_gradient_which_is_why_the_check_goes_through_log_softmax():
    gen = torch.Generator().manual_seed(0)
    lp = (
        torch.randn(7, 2, 4, generator=gen, dtype=torch.float64)
        .log_softmax(-1)
        .requires_grad_(True)
    )
    args = (torch.tensor([[1, 2, 2], [3, 1, 1]]), torch.tensor([7, 5]), torch.tensor([3, 2]))
    (ours,) = torch.autograd.grad(ch21.ref_ctc_loss(lp, *args).sum(), lp)
    (theirs,) = torch.autograd.grad(F.ctc_loss(lp, *args, reduction="none").sum(), lp)
    inside = (torch.arange(7)[:, None] < args[1])[..., None]
    assert torch.allclose(theirs, ours + lp.exp() * inside, atol=1e-12)
    assert not torch.allclose(theirs, ours, atol=1e-3)


def test_long_cases_underflow_in_probability_space_for_every_seed():
    for seed in range(10):
        t = cu.checking.Tester(cu.checking.get_exercise("ctc_loss"), None, seed)
        longs = [c for c in ch21._loss_cases(t) if c[3] == "long"]
        assert len(longs) == 2
        for case, (lp, targets, il, tl), _, _ in longs:
            nll = F.ctc_loss(lp.double(), targets, il, tl, reduction="none")
            floor = 760 if lp.dtype == torch.float64 else 110
            assert float(nll.min()) > floor, (seed, case, nll)


# =====================================================================================
# Planted mistakes in ctc_loss, each with the words its message must contain
# =====================================================================================
def _model(**kw):
    """ref_ctc_variant with a mistake, cast back to the input's dtype (differentiable: no detach)."""

    def fn(log_probs, targets, input_lengths, target_lengths, blank=0):
        lengths = {"input_lengths": input_lengths, "target_lengths": target_lengths, "blank": blank}
        if kw.get("ignore_input_lengths"):
            lengths["input_lengths"] = torch.full_like(input_lengths, log_probs.shape[0])
        if kw.get("read_padding"):
            lengths["target_lengths"] = torch.full_like(target_lengths, targets.shape[1])
        if kw.get("blank_zero"):
            lengths["blank"] = 0
        options = {k: v for k, v in kw.items() if k in ("skip", "start", "final", "per_length")}
        return _variant_with_grad(log_probs, targets, options, **lengths)

    return fn


def _variant_with_grad(log_probs, targets, options, input_lengths, target_lengths, blank):
    # ref_ctc_variant detaches (it models values); rebuild the same value with a gradient path
    # through a zero-sum term so that the gradient probes see a differentiable loss.
    value = ch21.ref_ctc_variant(
        log_probs, targets, input_lengths, target_lengths, blank, **options
    ).to(log_probs.dtype)
    return value + 0.0 * log_probs.sum((0, 2))


def ctc_probability_space(log_probs, targets, input_lengths, target_lengths, blank=0):
    """The recursion on probabilities, without rescaling."""
    T, N, _ = log_probs.shape
    L = 2 * targets.shape[1] + 1
    ext = torch.full((N, L), blank, dtype=torch.long)
    ext[:, 1::2] = targets
    y = log_probs.exp().gather(2, ext.expand(T, N, L))
    skip = torch.zeros(N, L, dtype=log_probs.dtype)
    skip[:, 2:] = ((ext[:, 2:] != blank) & (ext[:, 2:] != ext[:, :-2])).to(log_probs.dtype)
    alpha = torch.cat([y[0, :, :2], torch.zeros(N, L - 2, dtype=log_probs.dtype)], 1)[:, :L]
    for t in range(1, T):
        new = (alpha + F.pad(alpha, (1, 0))[:, :L] + skip * F.pad(alpha, (2, 0))[:, :L]) * y[t]
        alpha = torch.where((t < input_lengths)[:, None], new, alpha)
    end = 2 * target_lengths
    p = alpha.gather(1, end[:, None])[:, 0]
    p = p + torch.where(end > 0, alpha.gather(1, (end - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    return -p.log()


def _recursion(lse, neg=NEG, finish=None):
    """A batched log-space recursion with a given log-sum-exp and -inf stand-in."""

    def fn(log_probs, targets, input_lengths, target_lengths, blank=0):
        T, N, _ = log_probs.shape
        L = 2 * targets.shape[1] + 1
        ext = torch.full((N, L), blank, dtype=torch.long)
        ext[:, 1::2] = targets
        emit = log_probs.gather(2, ext.expand(T, N, L))
        skip = torch.zeros(N, L, dtype=torch.bool)
        skip[:, 2:] = (ext[:, 2:] != blank) & (ext[:, 2:] != ext[:, :-2])
        alpha = torch.cat([emit[0, :, :2], torch.full((N, L), neg, dtype=log_probs.dtype)], 1)
        alpha = alpha[:, :L]
        for t in range(1, T):
            a1 = F.pad(alpha, (1, 0), value=neg)[:, :L]
            a2 = F.pad(alpha, (2, 0), value=neg)[:, :L].masked_fill(~skip, neg)
            new = lse(torch.stack([alpha, a1, a2])) + emit[t]
            alpha = torch.where((t < input_lengths)[:, None], new, alpha)
        end = 2 * target_lengths
        last = alpha.gather(1, end[:, None])[:, 0]
        prev = alpha.gather(1, (end - 1).clamp(min=0)[:, None])[:, 0].masked_fill(end == 0, neg)
        nll = -lse(torch.stack([last, prev]))
        return nll if finish is None else finish(nll)

    return fn


def _max_subtracted(x):
    m = x.amax(0)
    return m + torch.log(torch.exp(x - m).sum(0))


ctc_naive_logsumexp = _recursion(lambda x: torch.logsumexp(x, 0))
ctc_unguarded_lse = _recursion(_max_subtracted)
ctc_finite_stand_in = _recursion(lambda x: torch.logsumexp(x, 0), neg=-1e30)


def ctc_mean(log_probs, targets, input_lengths, target_lengths, blank=0):
    return ch21.ref_ctc_loss(log_probs, targets, input_lengths, target_lengths, blank).mean()


def ctc_detached(log_probs, targets, input_lengths, target_lengths, blank=0):
    with torch.no_grad():
        return ch21.ref_ctc_loss(log_probs, targets, input_lengths, target_lengths, blank)


def ctc_float64_out(log_probs, targets, input_lengths, target_lengths, blank=0):
    return ch21.ref_ctc_loss(log_probs.double(), targets, input_lengths, target_lengths, blank)


def ctc_column(log_probs, targets, input_lengths, target_lengths, blank=0):
    return ch21.ref_ctc_loss(log_probs, targets, input_lengths, target_lengths, blank)[:, None]


def ctc_in_place(log_probs, targets, input_lengths, target_lengths, blank=0):
    out = ch21.ref_ctc_loss(log_probs, targets, input_lengths, target_lengths, blank)
    targets[:, -1] = blank  # "clearing the padding" in the caller's tensor
    return out


LOSS_MISTAKES = [
    (
        _model(skip="always"),
        r"`loss` is wrong.*skip transition s-2 -> s was allowed between two equal labels",
    ),
    (_model(skip="never"), r"`loss` is wrong.*there is no skip transition"),
    (_model(final="blank"), r"`loss` is wrong.*read from the final blank only"),
    (_model(final="label"), r"`loss` is wrong.*read from the last label only"),
    (_model(start="blank"), r"`loss` is wrong.*started in the first blank only"),
    (_model(per_length=True), r"`loss` is wrong.*divided by its target length"),
    (_model(ignore_input_lengths=True), r"`loss` is wrong.*input_lengths were ignored"),
    (_model(read_padding=True), r"`loss` is wrong.*padded entries of targets past target_length"),
    (_model(blank_zero=True), r"blank=4.*`loss` is wrong.*blank was taken to be class 0"),
    (ctc_probability_space, r"long: .*underflows to 0 and -log\(0\) = inf"),
    (ctc_naive_logsumexp, r"right but its gradient has NaN.*torch.logsumexp"),
    (ctc_unguarded_lse, r"the loss has NaN.*subtracted its maximum when every term was -inf"),
    (ctc_finite_stand_in, r"impossible alignment.*must be inf.*finite stand-in for -inf"),
    (ctc_mean, r"returned one number.*shape \(3,\).*averaged"),
    (ctc_detached, r"no gradient flows to log_probs.*detached"),
    (ctc_float64_out, r"float32.*`loss` should have dtype float32.*float64"),
    (ctc_column, r"`loss` should have shape \(3,\), but it has shape \(3, 1\)"),
    (ctc_in_place, r"changed its input `targets` in place"),
]


@pytest.mark.parametrize(
    ("fn", "pattern"), LOSS_MISTAKES, ids=[str(i) for i in range(len(LOSS_MISTAKES))]
)
def test_loss_mistake_is_named(fn, pattern):
    for seed in MISTAKE_SEEDS:
        with pytest.raises(cu.CheckFailure, match=pattern):
            cu.check("ctc_loss", fn, strict=True, seed=seed)


def _torch_ctc(form):
    def fn(log_probs, targets, input_lengths, target_lengths, blank=0):
        if form == "F":
            return F.ctc_loss(
                log_probs, targets, input_lengths, target_lengths, blank, reduction="none"
            )
        if form == "torch":
            return torch.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank, 0)
        if form == "module":
            return torch.nn.CTCLoss(blank, reduction="none")(
                log_probs, targets, input_lengths, target_lengths
            )
        return torch.ops.aten._ctc_loss(log_probs, targets, input_lengths, target_lengths, blank)[0]

    return fn


@pytest.mark.parametrize("form", ["F", "torch", "module", "aten"])
def test_pytorch_ctc_is_refused_in_every_form(form):
    with pytest.raises(
        cu.CheckFailure, match=r"called (F|torch|torch\.ops\.aten)\.ctc_loss.*may not call ctc_loss"
    ):
        cu.check("ctc_loss", _torch_ctc(form), strict=True)


def test_loss_impossible_alignment_is_inf_and_its_mistake_named():
    # Allowing the skip between equal labels makes [1, 1, 2] fit in 3 frames: finite, and named.
    with pytest.raises(cu.CheckFailure) as info:
        cu.check("ctc_loss", _model(skip="always"), strict=True, seed=3)
    assert "skip transition s-2 -> s was allowed between two equal labels" in str(info.value)


# =====================================================================================
# Planted mistakes in the decoders
# =====================================================================================
def greedy_blanks_first(log_probs, blank=0):
    best = [k for k in log_probs.argmax(-1).tolist() if k != blank]
    return [k for i, k in enumerate(best) if i == 0 or best[i - 1] != k]


def greedy_no_collapse(log_probs, blank=0):
    return [k for k in log_probs.argmax(-1).tolist() if k != blank]


def greedy_keeps_blanks(log_probs, blank=0):
    return torch.unique_consecutive(log_probs.argmax(-1)).tolist()


def greedy_blank_zero(log_probs, blank=0):
    return greedy_unique(log_probs, 0)


def greedy_tensor(log_probs, blank=0):
    labels = torch.unique_consecutive(log_probs.argmax(-1))
    return labels[labels != blank]


def greedy_numpy_ints(log_probs, blank=0):
    return list(np.array(greedy_unique(log_probs, blank), dtype=np.int64))


GREEDY_MISTAKES = [
    (greedy_blanks_first, r"blanks were removed before the repeats were collapsed"),
    (greedy_no_collapse, r"repeats were not collapsed"),
    (greedy_keeps_blanks, r"blanks were not removed after collapsing"),
    (greedy_blank_zero, r"blank=3.*blank was taken to be class 0"),
    (greedy_tensor, r"should return a list of Python ints, but it returned a tensor.*\.tolist\(\)"),
    (greedy_numpy_ints, r"should return a list of Python ints"),
]


@pytest.mark.parametrize(
    ("fn", "pattern"), GREEDY_MISTAKES, ids=[f.__name__ for f, _ in GREEDY_MISTAKES]
)
def test_greedy_mistake_is_named(fn, pattern):
    for seed in MISTAKE_SEEDS:
        with pytest.raises(cu.CheckFailure, match=pattern):
            cu.check("ctc_greedy_decode", fn, strict=True, seed=seed)


def _beam(**kw):
    def fn(log_probs, beam_width=8, blank=0):
        return ch21.ref_beam_variant(log_probs, beam_width, blank, **kw)

    return fn


def beam_is_greedy(log_probs, beam_width=8, blank=0):
    return greedy_unique(log_probs, blank)


def beam_unpruned(log_probs, beam_width=8, blank=0):
    return ch21.ref_ctc_beam_search(log_probs, 10**9, blank)


def beam_with_blanks(log_probs, beam_width=8, blank=0):
    return [blank, *ch21.ref_ctc_beam_search(log_probs, beam_width, blank)]


def beam_blank_zero(log_probs, beam_width=8, blank=0):
    return ch21.ref_ctc_beam_search(log_probs, beam_width, 0)


BEAM_MISTAKES = [
    (
        _beam(merge=False),
        r"never merge[sd]? the alignments of one prefix|alignments of one prefix were never merged",
    ),
    (_beam(repeat="new"), r"appended as a new label from every alignment"),
    (_beam(repeat="collapse"), r"always collapsed into the prefix, even after a blank"),
    (
        beam_is_greedy,
        r"the labelling of the single most probable path, which greedy decoding returns",
    ),
    (beam_unpruned, r"beam_width=1.*beam_width was not applied"),
    (beam_with_blanks, r"contains the blank"),
    (beam_blank_zero, r"blank=3.*contains the blank \(3\).*blank was taken to be class 0"),
]


@pytest.mark.parametrize(
    ("fn", "pattern"), BEAM_MISTAKES, ids=[str(i) for i in range(len(BEAM_MISTAKES))]
)
def test_beam_mistake_is_named(fn, pattern):
    for seed in MISTAKE_SEEDS:
        with pytest.raises(cu.CheckFailure, match=pattern):
            cu.check("ctc_beam_search", fn, strict=True, seed=seed)


def test_contract_signatures():
    listed = {e.id: e for e in cu.exercises("21")}
    assert set(listed) == set(CORRECT)
    assert listed["ctc_loss"].signature.startswith("(log_probs (T,N,C), targets (N,S) int64 padded")
    assert listed["ctc_greedy_decode"].signature == "(log_probs (T,C), blank=0) -> list[int]"
    assert (
        listed["ctc_beam_search"].signature
        == "(log_probs (T,C), beam_width=8, blank=0) -> list[int]"
    )
    assert "ctc_loss" in listed["ctc_loss"].forbidden


def test_report_check_seconds(capsys):
    """Times each check on the reference and the slowest correct style; reported, never asserted."""
    report_check_seconds(CORRECT, capsys)


# =====================================================================================
# The chapter's own helpers: bad input gets one line
# =====================================================================================
@pytest.fixture(scope="module")
def helpers():
    """The notebook's cells that define the data generator and the error rates, executed."""
    path = Path(__file__).resolve().parents[1] / "solutions" / "21_lip_reading.ipynb"
    nb = nbformat.read(path, as_version=4)
    wanted = ("def edit_distance(", "def render_frames(")
    namespace = {"torch": torch, "np": np, "math": math}
    for cell in nb.cells:
        if cell.cell_type == "code" and any(w in cell.source for w in wanted):
            exec(cell.source, namespace)  # noqa: S102 - the chapter's own cell
    return namespace


def test_helpers_make_what_the_chapter_says(helpers):
    data = helpers["LipReadingData"](20, seed=3)
    again = helpers["LipReadingData"](20, seed=3)
    assert data.texts == again.texts and all(
        torch.equal(a, b) for a, b in zip(data.frames, again.frames, strict=True)
    )
    frames, targets, il, tl = data.batch(range(5))
    assert frames.shape[:2] == (5, int(il.max())) and frames.shape[2:] == (16, 16)
    assert targets.shape == (5, int(tl.max()))
    for i in range(5):
        assert helpers["decode"](targets[i, : tl[i]].tolist()) == data.texts[i]
        # every frame sequence is long enough for its target (repeated labels need a blank between)
        repeats = sum(a == b for a, b in zip(data.texts[i], data.texts[i][1:], strict=False))
        assert il[i] >= tl[i] + repeats
    assert helpers["error_rate"](["bat pot"], ["bat pit"], "word") == 0.5


def test_helpers_reject_bad_input_in_one_line(helpers):
    bad = [
        (
            lambda: helpers["encode"]("bad cat!"),
            r"characters \['!', 'c', 'd'\] are not in the alphabet",
        ),
        (lambda: helpers["error_rate"](["a"], ["a", "b"]), r"1 hypotheses for 2 references"),
        (lambda: helpers["error_rate"](["a"], [""], "word"), r"the references hold no words"),
        (lambda: helpers["error_rate"](["a"], ["a"], "letter"), r"unit must be 'char' or 'word'"),
        (lambda: helpers["render_frames"]([], seed=0), r"non-empty list of \(T, 3\) viseme tracks"),
        (
            lambda: helpers["render_frames"]([np.zeros((4, 2), np.float32)], seed=0),
            r"\(T, 3\) viseme tracks",
        ),
        (lambda: helpers["LipReadingData"](0, seed=0), r"at least one sentence, got n=0"),
    ]
    for call, pattern in bad:
        with pytest.raises(ValueError, match=pattern) as info:
            call()
        assert "\n" not in str(info.value)
        assert re.search(pattern, str(info.value))
