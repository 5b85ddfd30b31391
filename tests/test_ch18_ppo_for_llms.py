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
from pathlib import Path
from types import SimpleNamespace

import nbformat
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


# =====================================================================================
# The notebook's rollout helpers: padding, positions, the last token
# =====================================================================================
NOTEBOOK_CELLS = ("SUBJECTS = ", "@dataclass\nclass GPTConfig", "def left_pad(", "def score(")


@pytest.fixture(scope="module")
def nb():
    """The solution notebook's corpus, model and rollout cells, run in one namespace."""
    path = Path(__file__).resolve().parents[1] / "solutions" / f"{CHAPTER}.ipynb"
    cells = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    chosen = [s for s in cells if s.startswith(NOTEBOOK_CELLS)]
    assert len(chosen) == len(NOTEBOOK_CELLS), "the notebook's helper cells moved or were renamed"
    space: dict = {}
    exec("import random\nfrom dataclasses import dataclass\nimport torch\n", space)
    exec("import torch.nn.functional as F\nfrom torch import nn\n", space)
    for source in chosen:
        exec(source, space)
    return SimpleNamespace(**space)


def _batch(nb, prompts, completions):
    """Left-padded prompts and right-padded completions -> tokens, attention mask, completion mask, P."""
    p_tok, p_mask = nb.left_pad([nb.encode(p) for p in prompts])
    T = max(map(len, completions)) + 2  # two columns of pure padding at the end
    c_tok = torch.full((len(completions), T), nb.PAD_ID)
    for b, c in enumerate(completions):
        c_tok[b, : len(c)] = torch.tensor(nb.encode(c))
    c_mask = c_tok != nb.PAD_ID
    return torch.cat([p_tok, c_tok], 1), torch.cat([p_mask, c_mask], 1), c_mask, p_tok.shape[1]


@pytest.mark.parametrize("seed", (0, 1))
def test_left_and_right_padding_change_no_logprob_and_no_value(nb, seed):
    torch.manual_seed(seed)
    model = nb.TinyGPT().eval()
    prompts = ["my dog", "this cake", "the cat", "our team"]  # 6, 9, 7, 8 characters
    completions = [" is fun.", " was very boring.", " seems", " looks so"]  # 8, 17, 6, 9
    tokens, attention, c_mask, P = _batch(nb, prompts, completions)
    assert (~attention[:, 0]).sum() == 3 and (~c_mask[:, -1]).all()  # both paddings present
    with torch.no_grad():
        logp, values = nb.completion_logprobs(model, tokens, attention, P)
        for b, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            alone = torch.tensor([nb.encode(p + c)])
            a_logp, a_values = nb.completion_logprobs(
                model, alone, torch.ones_like(alone, dtype=torch.bool), len(p)
            )
            n = len(c)
            torch.testing.assert_close(logp[b, :n], a_logp[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(values[b, :n], a_values[0], rtol=0, atol=1e-5)
        # Three more columns of left padding on every row change nothing either.
        pad = torch.full((len(prompts), 3), nb.PAD_ID)
        more = torch.cat([pad, tokens], 1)
        more_mask = torch.cat([pad != nb.PAD_ID, attention], 1)
        logp2, values2 = nb.completion_logprobs(model, more, more_mask, P + 3)
    torch.testing.assert_close(logp2[c_mask], logp[c_mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(values2[c_mask], values[c_mask], rtol=0, atol=1e-5)


def test_column_positions_would_be_caught(nb):
    """The padding test can fail: a model that numbers positions by column differs on left padding."""
    torch.manual_seed(0)
    model = nb.TinyGPT().eval()
    tokens, attention, c_mask, P = _batch(nb, ["my dog", "this cake"], [" is fun.", " was sad."])
    with torch.no_grad():
        right, _ = nb.completion_logprobs(model, tokens, attention, P)
        wrong, _ = nb.completion_logprobs(model, tokens, torch.ones_like(attention), P)
    assert (right[0][c_mask[0]] - wrong[0][c_mask[0]]).abs().max() > 1e-3


def test_generate_stops_each_row_at_its_end_token(nb):
    torch.manual_seed(0)
    model = nb.TinyGPT().eval()
    prompts, p_mask = nb.left_pad([nb.encode(s) for s in ["my dog", "this cake", "the cat"] * 4])
    tokens, mask = nb.generate(model, prompts, p_mask, 12, torch.Generator().manual_seed(0))
    assert tokens.shape == mask.shape == (12, 12)
    for b in range(12):
        ends = (tokens[b] == nb.EOS_ID).nonzero().flatten().tolist()
        n = ends[0] + 1 if ends else 12  # the end token is part of the completion
        assert mask[b, :n].all() and not mask[b, n:].any()
        assert (tokens[b, n:] == nb.PAD_ID).all()
    assert nb.last_valid_index(mask).tolist() == (mask.sum(-1) - 1).tolist()


def test_last_valid_index_on_left_padding_and_holes(nb):
    mask = torch.tensor([[0, 0, 1, 1], [1, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert nb.last_valid_index(mask).tolist() == [3, 2, 3]


def test_an_empty_completion_is_refused_naming_its_row(nb):
    mask = torch.tensor([[True, False], [True, True], [False, False]])
    with pytest.raises(
        ValueError, match=r"^row 2 of the completion mask has no valid token"
    ) as err:
        nb.last_valid_index(mask)
    assert "\n" not in str(err.value)


def test_score_counts_adjectives(nb):
    got = nb.score([" is so fun.", " was dull.", " seems big.", " funfunfun.", ""]).tolist()
    assert got == [1.0, -1.0, 0.0, 3.0, 0.0]
