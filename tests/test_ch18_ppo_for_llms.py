"""Chapter 18: kl_penalized_rewards in several correct styles passes, planted mistakes are named,
and the notebook's own rollout helpers handle left and right padding exactly.

Styles: torch.where plus a flip/argmax for the last True, a cumsum one-hot of the last True,
a Python loop over rows (TRL's ``mask.nonzero()[-1]``), numpy, a float mask multiplied in.
Mistakes: where the score lands (first token, T-1, mask.sum()-1, every token, nowhere, replacing
the KL term), the KL term (unmasked, sign, kl_coef missing or applied to the score), in-place
changes, wrong dtype and a tuple returned.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import course_utils as cu
from course_utils.checks import ch18_ppo_for_llms as ch18

CHAPTER = "18_ppo_for_llms"
SEEDS = range(8)


# =====================================================================================
# Correct implementations
# =====================================================================================
def kl_rewards_cumsum(logprobs, ref_logprobs, scores, kl_coef, mask):
    """The last True as a one-hot: where the running count of Trues reaches the row's total."""
    kl = torch.where(mask, -kl_coef * (logprobs - ref_logprobs), torch.zeros_like(logprobs))
    count = mask.long().cumsum(-1)
    last = mask & (count == count[:, -1:])
    return kl + last.to(kl.dtype) * scores[:, None]


def kl_rewards_loop(logprobs, ref_logprobs, scores, kl_coef, mask):
    """TRL's style: one row at a time, the last valid index from mask.nonzero()."""
    out = torch.zeros_like(logprobs)
    for b in range(logprobs.shape[0]):
        valid = mask[b].nonzero()
        out[b] = -kl_coef * (logprobs[b] - ref_logprobs[b]) * mask[b]
        if len(valid):
            out[b, valid[-1]] += scores[b]
    return out


def kl_rewards_numpy(logprobs, ref_logprobs, scores, kl_coef, mask):
    """numpy, with the last True found from the reversed row."""
    lp, ref, s, m = (x.numpy() for x in (logprobs, ref_logprobs, scores, mask))
    out = np.where(m, -kl_coef * (lp - ref), 0.0).astype(lp.dtype)
    last = m.shape[1] - 1 - np.argmax(m[:, ::-1], axis=1)
    rows = np.flatnonzero(m.any(1))
    out[rows, last[rows]] += s[rows]
    return torch.from_numpy(out)


def kl_rewards_float_mask(logprobs, ref_logprobs, scores, kl_coef, mask):
    """The mask as 0/1 numbers multiplied in; the last index by max over masked positions."""
    m = mask.to(logprobs.dtype)
    out = -kl_coef * (logprobs - ref_logprobs) * m
    positions = torch.arange(mask.shape[1]).expand_as(mask)
    last = torch.where(mask, positions, -1).amax(-1)  # -1 on rows with no valid token
    onehot = (positions == last[:, None]) & (last[:, None] >= 0)
    return out + onehot.to(out.dtype) * scores[:, None]


CORRECT = [
    ch18.ref_kl_penalized_rewards,
    kl_rewards_cumsum,
    kl_rewards_loop,
    kl_rewards_numpy,
    kl_rewards_float_mask,
]


@pytest.mark.parametrize("seed", SEEDS)
def test_reference_passes(seed):
    report = cu.check("kl_penalized_rewards", ch18.ref_kl_penalized_rewards, seed=seed)
    assert report.passed and len(report.rows) == 14


@pytest.mark.parametrize("fn", CORRECT[1:], ids=lambda f: f.__name__)
@pytest.mark.parametrize("seed", (0, 3))
def test_correct_styles_pass(fn, seed):
    assert cu.check("kl_penalized_rewards", fn, seed=seed).passed


def test_check_is_fast():
    start = time.perf_counter()
    cu.check("kl_penalized_rewards", kl_rewards_loop)
    assert time.perf_counter() - start < 2.0


def test_check_is_deterministic():
    a = cu.check("kl_penalized_rewards", ch18.ref_kl_penalized_rewards, seed=5)
    b = cu.check("kl_penalized_rewards", ch18.ref_kl_penalized_rewards, seed=5)
    assert [r.case for r in a.rows] == [r.case for r in b.rows]


def test_rows_with_no_valid_token_are_not_judged():
    """Whatever comes back on an all-False row passes: here NaN."""

    def nan_on_empty_rows(logprobs, ref_logprobs, scores, kl_coef, mask):
        out = ch18.ref_kl_penalized_rewards(logprobs, ref_logprobs, scores, kl_coef, mask)
        return torch.where(mask.any(-1, keepdim=True), out, float("nan"))

    assert cu.check("kl_penalized_rewards", nan_on_empty_rows).passed


def test_last_true_index():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert ch18.last_true_index(mask).tolist() == [
        1,
        3,
        2,
        3,
    ]  # an all-False row gives T-1: callers skip it


# =====================================================================================
# Planted mistakes
# =====================================================================================
def _kl(logprobs, ref_logprobs, kl_coef, mask):
    return torch.where(mask, -kl_coef * (logprobs - ref_logprobs), torch.zeros_like(logprobs))


def _add_at(out, scores, index, mask):
    out = out.clone()
    rows = torch.nonzero(mask.any(-1)).squeeze(-1)
    out[rows, index[rows]] += scores[rows]
    return out


def score_at_first(logprobs, ref_logprobs, scores, kl_coef, mask):
    return _add_at(_kl(logprobs, ref_logprobs, kl_coef, mask), scores, mask.int().argmax(-1), mask)


def score_at_end(logprobs, ref_logprobs, scores, kl_coef, mask):
    out = _kl(logprobs, ref_logprobs, kl_coef, mask)
    out[:, -1] += scores
    return out


def score_at_sum_minus_one(logprobs, ref_logprobs, scores, kl_coef, mask):
    out = _kl(logprobs, ref_logprobs, kl_coef, mask)
    last = mask.sum(-1) - 1
    for b in range(len(scores)):
        if last[b] >= 0:
            out[b, last[b]] += scores[b]
    return out


def kl_not_masked(logprobs, ref_logprobs, scores, kl_coef, mask):
    out = -kl_coef * (logprobs - ref_logprobs)
    return _add_at(out, scores, ch18.last_true_index(mask), mask)


def kl_sign_flipped(logprobs, ref_logprobs, scores, kl_coef, mask):
    out = _kl(ref_logprobs, logprobs, kl_coef, mask)
    return _add_at(out, scores, ch18.last_true_index(mask), mask)


def kl_coef_missing(logprobs, ref_logprobs, scores, kl_coef, mask):
    out = _kl(logprobs, ref_logprobs, 1.0, mask)
    return _add_at(out, scores, ch18.last_true_index(mask), mask)


def kl_coef_on_score(logprobs, ref_logprobs, scores, kl_coef, mask):
    out = _kl(logprobs, ref_logprobs, kl_coef, mask)
    return _add_at(out, kl_coef * scores, ch18.last_true_index(mask), mask)


def score_everywhere(logprobs, ref_logprobs, scores, kl_coef, mask):
    out = _kl(logprobs, ref_logprobs, kl_coef, mask)
    return out + mask.to(out.dtype) * scores[:, None]


def score_missing(logprobs, ref_logprobs, scores, kl_coef, mask):
    return _kl(logprobs, ref_logprobs, kl_coef, mask)


def score_replaces_kl(logprobs, ref_logprobs, scores, kl_coef, mask):
    out = _kl(logprobs, ref_logprobs, kl_coef, mask)
    last = ch18.last_true_index(mask)
    for b in range(len(scores)):
        if mask[b].any():
            out[b, last[b]] = scores[b]
    return out


def in_place(logprobs, ref_logprobs, scores, kl_coef, mask):
    logprobs -= ref_logprobs  # the difference, computed in the caller's tensor
    out = torch.where(mask, -kl_coef * logprobs, torch.zeros_like(logprobs))
    return _add_at(out, scores, ch18.last_true_index(mask), mask)


def float64_always(logprobs, ref_logprobs, scores, kl_coef, mask):
    return ch18.ref_kl_penalized_rewards(
        logprobs.double(), ref_logprobs.double(), scores.double(), kl_coef, mask
    )


def returns_tuple(logprobs, ref_logprobs, scores, kl_coef, mask):
    out = ch18.ref_kl_penalized_rewards(logprobs, ref_logprobs, scores, kl_coef, mask)
    return out, mask


MISTAKES = [
    (score_at_first, "the score was added at the FIRST valid token"),
    (score_at_end, "the score was added at position T-1 whatever the padding"),
    (score_at_sum_minus_one, "the score was added at index mask.sum(-1) - 1"),
    (kl_not_masked, "the KL term was not masked"),
    (kl_sign_flipped, "the KL penalty has the wrong sign"),
    (kl_coef_missing, "kl_coef is missing"),
    (kl_coef_on_score, "kl_coef multiplies the score too"),
    (score_everywhere, "the score was added at every valid token"),
    (score_missing, "the score is missing"),
    (score_replaces_kl, "the score REPLACED the KL term"),
    (in_place, "changed its input `logprobs` in place"),
    (float64_always, "should have dtype float32"),
    (returns_tuple, "returned a tuple; the contract returns one tensor"),
]


@pytest.mark.parametrize("fn, says", MISTAKES, ids=[m[0].__name__ for m in MISTAKES])
@pytest.mark.parametrize("seed", (0, 1, 7))
def test_mistake_is_named(fn, says, seed):
    with pytest.raises(cu.CheckFailure) as err:
        cu.check("kl_penalized_rewards", fn, seed=seed)
    assert says in str(err.value), str(err.value)


def test_score_at_sum_minus_one_passes_right_padding_and_fails_on_left_padding():
    """The classic bug is invisible on right-padded batches: the message must come from a case
    with left padding or holes."""
    with pytest.raises(cu.CheckFailure) as err:
        cu.check("kl_penalized_rewards", score_at_sum_minus_one)
    assert "left-padded" in str(err.value) or "holes" in str(err.value)


def test_stub_is_pending():
    def stub(logprobs, ref_logprobs, scores, kl_coef, mask):
        raise NotImplementedError("kl_penalized_rewards")

    assert cu.check("kl_penalized_rewards", stub, strict=False).status == "pending"
    with pytest.raises(cu.CheckFailure, match="not implemented yet"):
        cu.check("kl_penalized_rewards", stub, strict=True)


@pytest.mark.references_forbidden
def test_reference_handed_in_is_refused():
    with pytest.raises(cu.CheckFailure, match="course's own reference"):
        cu.check("kl_penalized_rewards", ch18.ref_kl_penalized_rewards)
