"""Chapter 04 battery: correct dropouts of every style pass, planted mistakes are named.

Dropout is random, so the battery judges statistical properties. The correct
implementations below draw their random numbers six different ways (torch.rand,
torch.bernoulli, Tensor.bernoulli_, numpy, Python's `random` in an explicit loop, a
private torch.Generator) and must pass on 20 seeds each. The planted mistakes are
the ones learners make, each rejected with the sentence that names it, on several seeds.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import course_utils as cu
from course_utils.checks import ch04_dropout as ch04

SEEDS = range(20)
#: Seeds on which every planted mistake must be caught (the catch must not depend on luck).
MISTAKE_SEEDS = (0, 1, 7)


# =====================================================================================
# Correct implementations, one style each
# =====================================================================================
def dropout_rand(x, p, training=True):
    """torch.rand compared with p; p=1 special-cased."""
    if not training:
        return x
    if p == 1:
        return torch.zeros_like(x)
    keep = torch.rand(x.shape) >= p
    return x * keep.to(x.dtype) / (1 - p)


def dropout_bernoulli(x, p, training=True):
    """torch.bernoulli of a tensor full of the keep probability."""
    if not training or p == 0:
        return x.clone()
    if p == 1:
        return torch.zeros_like(x)
    mask = torch.bernoulli(torch.full_like(x, 1 - p))
    return x * mask / (1 - p)


def dropout_bernoulli_inplace_on_new(x, p, training=True):
    """Tensor.bernoulli_ on a fresh tensor (what ATen does); p=1 via a zero scale."""
    if not training:
        return x.clone()
    scale = 0.0 if p == 1 else 1.0 / (1.0 - p)
    noise = torch.empty_like(x).bernoulli_(1 - p)
    return x * noise * scale


_NP_RNG = np.random.default_rng(2024)


def dropout_numpy(x, p, training=True):
    """numpy's Generator, back to a tensor of x's dtype."""
    if not training:
        return x.clone()
    a = x.numpy()
    keep = _NP_RNG.random(a.shape) >= p
    scale = 0.0 if p == 1 else 1.0 / (1.0 - p)
    return torch.from_numpy((a * keep * scale).astype(a.dtype))


def dropout_loops(x, p, training=True):
    """An explicit Python loop over the entries, with Python's `random`."""
    if not training:
        return x
    out = []
    for v in x.reshape(-1).tolist():
        out.append(0.0 if random.random() < p else v / (1.0 - p))
    return torch.tensor(out, dtype=x.dtype).reshape(x.shape)


_GEN = torch.Generator().manual_seed(99)


def dropout_where_generator(x, p, training=True):
    """A private torch.Generator; torch.where picks 0 for dropped entries, so p=1 needs no special case."""
    if not training:
        return x.clone()
    keep = torch.rand(x.shape, generator=_GEN, dtype=torch.float64) > p
    return torch.where(keep, x / (1 - p), torch.zeros_like(x))


def dropout_elementwise(x, p, training=True):
    """The slowest honest style: one torch scalar draw and one indexed write per entry."""
    if not training:
        return x.clone()
    out = torch.empty_like(x)
    src, dst = x.reshape(-1), out.view(-1)
    for i in range(src.numel()):
        dst[i] = 0.0 if torch.rand(()).item() < p else src[i] / (1 - p)
    return out


def dropout_functional(x, p, training=True):
    """PyTorch's own F.dropout."""
    return F.dropout(x, p, training)


CORRECT = [
    dropout_rand,
    dropout_bernoulli,
    dropout_bernoulli_inplace_on_new,
    dropout_numpy,
    dropout_loops,
    dropout_where_generator,
    dropout_elementwise,
]


@pytest.mark.parametrize("fn", CORRECT, ids=[f.__name__ for f in CORRECT])
def test_correct_implementation_passes_on_every_seed(fn):
    for seed in SEEDS:
        report = cu.check("dropout", fn, seed=seed, strict=True)
        assert report.passed, (seed, report)
        assert report.rows


def test_returning_x_itself_in_eval_is_allowed_and_reported():
    notes = {r.verdict for r in cu.check("dropout", dropout_rand, strict=True).rows}
    assert "ok (x itself, allowed)" in notes
    notes = {r.verdict for r in cu.check("dropout", dropout_bernoulli, strict=True).rows}
    assert "ok (a new tensor)" in notes


# =====================================================================================
# Planted mistakes
# =====================================================================================
def _keep(x, p):
    return (torch.rand(x.shape) >= p).to(x.dtype)


def non_inverted(x, p, training=True):
    """The original formulation's training rule, with the inverted eval rule."""
    return x * _keep(x, p) * (1 - p) if training else x


def original_formulation(x, p, training=True):
    """Srivastava et al.: no scaling in training, times (1-p) at test time."""
    return x * _keep(x, p) if training else x * (1 - p)


def eval_times_one_minus_p(x, p, training=True):
    """Inverted in training but also the original test-time scaling."""
    if not training:
        return x * (1 - p)
    return torch.zeros_like(x) if p == 1 else x * _keep(x, p) / (1 - p)


def no_scaling(x, p, training=True):
    return x * _keep(x, p) if training else x


def active_in_eval(x, p, training=True):
    if p == 1:
        return torch.zeros_like(x)
    return x * _keep(x, p) / (1 - p)


def scales_in_eval(x, p, training=True):
    if not training:
        return x / (1 - p)
    return torch.zeros_like(x) if p == 1 else x * _keep(x, p) / (1 - p)


def keep_probability_swapped(x, p, training=True):
    """Keeps with probability p instead of dropping with it; scale right."""
    if not training:
        return x
    keep = (torch.rand(x.shape) < p).to(x.dtype)
    return torch.zeros_like(x) if p == 1 else x * keep / (1 - p)


def bernoulli_of_p(x, p, training=True):
    """torch.bernoulli(p) as the keep mask: the same swap, another way."""
    if not training:
        return x
    keep = torch.bernoulli(torch.full_like(x, p))
    return torch.zeros_like(x) if p == 1 else x * keep / (1 - p)


def keep_prob_convention(x, p, training=True):
    """p treated as keep_prob (TensorFlow 1): keep where rand < p, scale 1/p."""
    if not training:
        return x
    keep = (torch.rand(x.shape) < p).to(x.dtype)
    return torch.zeros_like(x) if p == 0 else x * keep / p


def wrong_comparison_scale(x, p, training=True):
    """rand > p keeps with probability 1-p (right) but scales by 1/p (wrong)."""
    if not training:
        return x
    if p == 0:
        return x.clone()
    keep = (torch.rand(x.shape) > p).to(x.dtype)
    return x * keep / p


def same_mask_every_row(x, p, training=True):
    """One mask of the last dimension's size, broadcast over every row and sample."""
    if not training:
        return x
    if p == 1:
        return torch.zeros_like(x)
    return x * (torch.rand(x.shape[-1]) >= p).to(x.dtype) / (1 - p)


def mask_without_batch_dim(x, p, training=True):
    """A mask of shape x.shape[1:]: every sample dropped the same way."""
    if not training:
        return x
    if p == 1:
        return torch.zeros_like(x)
    return x * (torch.rand(x.shape[1:]) >= p).to(x.dtype) / (1 - p)


def per_channel_mask(x, p, training=True):
    """Dropout2d-style: one coin per (sample, channel) for inputs with spatial dims."""
    if not training:
        return x
    if p == 1:
        return torch.zeros_like(x)
    shape = x.shape if x.dim() < 3 else (*x.shape[:2], *([1] * (x.dim() - 2)))
    return x * (torch.rand(shape) >= p).to(x.dtype) / (1 - p)


def per_row_coin(x, p, training=True):
    """One coin per entry of dim 0, shared by everything else in that row."""
    if not training:
        return x
    if p == 1:
        return torch.zeros_like(x)
    shape = (x.shape[0], *([1] * (x.dim() - 1)))
    return x * (torch.rand(shape) >= p).to(x.dtype) / (1 - p)


def nan_at_p1(x, p, training=True):
    if not training:
        return x
    return x * _keep(x, p) / (1 - p)


def python_scale_at_p1(x, p, training=True):
    """scale = 1 / (1 - p) in Python floats: ZeroDivisionError at p=1."""
    if not training:
        return x
    scale = 1 / (1 - p)
    return x * _keep(x, p) * scale


def p1_returns_x(x, p, training=True):
    if not training or p in (0, 1):
        return x
    return x * _keep(x, p) / (1 - p)


def modifies_x_in_place(x, p, training=True):
    if not training:
        return x
    if p == 1:
        return x.zero_()
    return x.mul_(_keep(x, p)).div_(1 - p)


def masked_assignment_in_place(x, p, training=True):
    """x[dropped] = 0 writes into the caller's tensor."""
    if not training:
        return x
    dropped = torch.rand(x.shape) < p
    x[dropped] = 0.0
    return x if p == 1 else x / (1 - p)


_CACHE: dict[tuple, torch.Tensor] = {}


def mask_cached_by_shape(x, p, training=True):
    """A mask drawn once per shape and kept in a global: the same on every call."""
    if not training:
        return x
    if p == 1:
        return torch.zeros_like(x)
    key = (tuple(x.shape), p)
    if key not in _CACHE:
        _CACHE[key] = (torch.rand(x.shape) >= p).to(x.dtype)
    return x * _CACHE[key].to(x.dtype) / (1 - p)


def reseeds_inside(x, p, training=True):
    """torch.manual_seed inside the function: every call draws the same mask."""
    if not training:
        return x
    if p == 1:
        return torch.zeros_like(x)
    torch.manual_seed(0)
    return x * _keep(x, p) / (1 - p)


def returns_bool_mask(x, p, training=True):
    if not training:
        return x
    return torch.rand(x.shape) >= p


def returns_scaled_mask(x, p, training=True):
    if not training:
        return x
    if p == 1:
        return torch.zeros_like(x)
    return _keep(x, p) / (1 - p)


def returns_output_and_mask(x, p, training=True):
    if not training:
        return x
    keep = _keep(x, p)
    return (torch.zeros_like(x) if p == 1 else x * keep / (1 - p)), keep


def default_training_false(x, p, training=False):
    if not training:
        return x
    return torch.zeros_like(x) if p == 1 else x * _keep(x, p) / (1 - p)


def p_hard_coded(x, p, training=True):
    """Ignores p and uses 0.5."""
    if not training:
        return x
    return x * _keep(x, 0.5) / 0.5


def multiplies_by_uniform_noise(x, p, training=True):
    """Multiplies by the uniform numbers instead of a 0/1 mask."""
    if not training:
        return x
    if p == 1:
        return torch.zeros_like(x)
    return x * torch.rand(x.shape, dtype=x.dtype) / (1 - p)


def float64_mask_from_numpy(x, p, training=True):
    """A float64 numpy mask times a float32 x promotes the output to float64."""
    if not training:
        return x
    scale = 0.0 if p == 1 else 1.0 / (1.0 - p)
    mask = torch.from_numpy((np.random.default_rng().random(tuple(x.shape)) >= p) * scale)
    return x * mask


def eval_returns_none(x, p, training=True):
    if training:
        return torch.zeros_like(x) if p == 1 else x * _keep(x, p) / (1 - p)
    return None


def training_flag_renamed(x, p, train=True):
    """The third parameter is not called `training`, so the keyword call fails."""
    if not train:
        return x
    return torch.zeros_like(x) if p == 1 else x * _keep(x, p) / (1 - p)


MISTAKES = [
    (
        non_inverted,
        r"survivors were scaled by \(1-p\), as in the original \(non-inverted\) dropout",
    ),
    (original_formulation, r"survivors were not rescaled"),
    (
        eval_times_one_minus_p,
        r"in eval mode the output was multiplied by \(1-p\): that is the test-time rule",
    ),
    (no_scaling, r"survivors were not rescaled"),
    (active_in_eval, r"entries were zeroed with training=False"),
    (scales_in_eval, r"in eval mode the output was divided by \(1-p\)"),
    (
        keep_probability_swapped,
        r"with p=0 every entry was zeroed: p is the probability of DROPPING",
    ),
    (bernoulli_of_p, r"with p=0 every entry was zeroed: p is the probability of DROPPING"),
    (keep_prob_convention, r"survivors were scaled by 1/p; p is the probability of DROPPING"),
    (wrong_comparison_scale, r"survivors were scaled by 1/p; p is the probability of DROPPING"),
    (same_mask_every_row, r"along dim 0 .* the same mask for every sample"),
    (mask_without_batch_dim, r"along dim 0 .* the same mask for every sample"),
    (per_channel_mask, r"along dim 2 .* one coin flip per channel"),
    (per_row_coin, r"along dim 1 .* one coin flip shared along dim 1"),
    (nan_at_p1, r"with p=1 the output has NaN or inf"),
    (python_scale_at_p1, r"ZeroDivisionError.*With p=1 the factor 1/\(1-p\) is a division by zero"),
    (p1_returns_x, r"with p=1 the input came back unchanged"),
    (modifies_x_in_place, r"changed its input `x` in place"),
    (masked_assignment_in_place, r"changed its input `x` in place"),
    (mask_cached_by_shape, r"both calls zeroed exactly the same entries\. .*drawn once and reused"),
    (
        reseeds_inside,
        r"both calls zeroed exactly the same entries\. .*reseeded inside the function",
    ),
    (returns_bool_mask, r"returned a bool tensor: that looks like the mask itself"),
    (returns_scaled_mask, r"the output is the scaled mask m/\(1-p\) itself"),
    (
        returns_output_and_mask,
        r"returned a tuple of length 2; the contract returns only the output tensor",
    ),
    (default_training_false, r"the contract's default is training=True"),
    (p_hard_coded, r"p seems to be hard-coded to 0\.5"),
    (multiplies_by_uniform_noise, r"not x times one common factor: the mask must be 0 or 1"),
    (float64_mask_from_numpy, r"should have dtype float32 .* but it has dtype float64"),
    (eval_returns_none, r"`output` should be a tensor .* but it is None"),
    (training_flag_renamed, r"unexpected keyword argument 'training'"),
]


@pytest.mark.parametrize(("fn", "pattern"), MISTAKES, ids=[f.__name__ for f, _ in MISTAKES])
@pytest.mark.forbidden_calls_allowed
def test_planted_mistake_is_named(fn, pattern):
    for seed in MISTAKE_SEEDS:
        _CACHE.clear()
        with pytest.raises(cu.CheckFailure, match=pattern) as info:
            cu.check("dropout", fn, seed=seed, strict=True)
        message = str(info.value)
        assert message.startswith("dropout: in case "), message
        assert "\n" not in message and "Traceback" not in message


def _breaks_contract(fn) -> bool:
    """An independent, blunt reading of the contract on big samples: does ``fn`` break it?"""
    gen = torch.Generator().manual_seed(11)
    for dtype in (torch.float64, torch.float32):
        x = (torch.rand(40, 30, 20, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
        for p, training in (
            (0.3, True),
            (0.5, True),
            (0.0, True),
            (1.0, True),
            (0.3, False),
            (1.0, False),
        ):
            before = x.clone()
            try:
                y = fn(x, p, training=training)
                y2 = fn(x, p)
            except Exception:  # noqa: BLE001 - raising on a valid call breaks the contract
                return True
            if not torch.equal(x, before):
                return True
            if not torch.is_tensor(y) or y.dtype != x.dtype or y.shape != x.shape:
                return True
            if not torch.isfinite(y).all():
                return True
            if not training or p == 0:
                if not torch.equal(y, x):
                    return True
                continue
            if (
                not torch.is_tensor(y2)
                or y2.shape != x.shape
                or bool((y2 == 0).any()) != bool((y == 0).any())
            ):
                return True  # the default must be training=True
            kept = y != 0
            if not torch.allclose(y[kept].double(), x[kept].double() / (1 - p), rtol=1e-5):
                return True
            if p == 1:
                continue
            dropped = ~kept
            if abs(float(dropped.double().mean()) - p) > 0.01:
                return True
            for dim in range(3):
                a, b = ch04._pairs(dropped, dim)
                if abs(float((a & b).double().mean()) - p * p) > 0.02:
                    return True
            if abs(float((dropped & (y2 == 0)).double().mean()) - p * p) > 0.02:
                return True
    return False


@pytest.mark.parametrize(("fn", "pattern"), MISTAKES, ids=[f.__name__ for f, _ in MISTAKES])
def test_planted_mistake_really_breaks_the_contract(fn, pattern):
    """Guard against a mistake test that cannot fail: each planted function is really wrong."""
    del pattern
    _CACHE.clear()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        assert _breaks_contract(fn)


@pytest.mark.parametrize("fn", CORRECT, ids=[f.__name__ for f in CORRECT])
def test_correct_styles_keep_the_contract(fn):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        assert not _breaks_contract(fn)


# =====================================================================================
# Statistical tests that only a subtly wrong sampler fails
# =====================================================================================
def drops_at_half_the_rate(x, p, training=True):
    """Survivors scaled right, but entries dropped with probability p/2 (a 'halved p' bug)."""
    if not training:
        return x
    if p == 1:
        return torch.zeros_like(x)
    return x * (torch.rand(x.shape) >= p / 2).to(x.dtype) / (1 - p)


def test_a_wrong_drop_rate_with_right_scaling_fails_the_fraction_test():
    """Every survivor is exactly x/(1-p), so only the count of zeros can tell."""
    for seed in MISTAKE_SEEDS:
        with pytest.raises(
            cu.CheckFailure,
            match=r"2\d\.\d\d% of the entries were zeroed with p=0\.5; a correct dropout zeroes 50%",
        ):
            cu.check("dropout", drops_at_half_the_rate, seed=seed, strict=True)


def half_shared_across_calls(x, p, training=True):
    """Every other call reuses the previous mask for half of the entries: partially stale masks."""
    if not training:
        return x
    if p == 1:
        return torch.zeros_like(x)
    keep = _keep(x, p)
    prev = half_shared_across_calls.last
    if prev is not None and prev.shape == keep.shape:
        flat, old = keep.reshape(-1), prev.reshape(-1)
        flat[: flat.numel() // 2] = old[: flat.numel() // 2]
    half_shared_across_calls.last = keep
    return x * keep / (1 - p)


half_shared_across_calls.last = None


def test_partially_reused_mask_fails_the_across_calls_test():
    half_shared_across_calls.last = None
    with pytest.raises(
        cu.CheckFailure, match=r"zeroed by both calls .* must be independent|drawn once"
    ):
        cu.check("dropout", half_shared_across_calls, strict=True)


# =====================================================================================
# The contract around the battery
# =====================================================================================
def stub(x, p, training=True):
    raise NotImplementedError("dropout: replace this line with your implementation")


def test_stub_is_pending_in_learn_mode(capsys):
    report = cu.check("dropout", stub, strict=False)
    assert report.status == "pending"
    assert "not implemented yet" in capsys.readouterr().out


def test_stub_fails_in_strict_mode(monkeypatch):
    with pytest.raises(cu.CheckFailure, match="not implemented yet"):
        cu.check("dropout", stub, strict=True)
    monkeypatch.setenv("COURSE_STRICT", "1")
    with pytest.raises(cu.CheckFailure, match="not implemented yet"):
        cu.check("dropout", stub)


def test_false_alarm_budget_is_respected():
    """Every statistical row names its bound; their number times DELTA stays under 1e-6."""
    rows = cu.check("dropout", cu.reference("dropout"), strict=True).rows
    stat_rows = [r for r in rows if "bound" in r.verdict]
    assert 10 <= len(stat_rows) <= ch04.MAX_STAT_TESTS
    assert len(stat_rows) * ch04.DELTA <= ch04.FALSE_ALARM <= 1e-6


def test_check_is_deterministic_per_seed():
    a = cu.check("dropout", cu.reference("dropout"), seed=5, strict=True).rows
    b = cu.check("dropout", cu.reference("dropout"), seed=5, strict=True).rows
    assert [(r.case, r.verdict) for r in a] == [(r.case, r.verdict) for r in b]


def test_check_leaves_the_callers_generator_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    cu.check("dropout", dropout_rand, strict=True)
    assert torch.equal(torch.rand(3), expected)


def test_dropout_is_listed_with_its_contract_signature():
    (ex,) = [e for e in cu.exercises("04") if e.id == "dropout"]
    assert ex.signature == "(x, p, training=True) -> Tensor"
    assert ex.chapter == "04_dropout"


@settings(max_examples=50, deadline=None)
@given(n=st.integers(100, 100_000), delta=st.floats(1e-12, 0.5))
def test_hoeffding_bound_solves_its_tail_equation(n, delta):
    t = ch04._hoeffding(n, delta)
    assert math.isclose(2 * math.exp(-2 * n * t * t), delta, rel_tol=1e-9)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    p=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
    training=st.booleans(),
)
def test_reference_output_is_zero_or_scaled_input_on_any_shape(shape, p, training):
    x = torch.randn(*shape, dtype=torch.float64) + 3.0  # positive, so 0 means dropped
    y = ch04.ref_dropout(x, p, training)
    assert y.dtype == x.dtype and y.shape == x.shape and torch.isfinite(y).all()
    if not training or p == 0:
        assert torch.equal(y, x)
    elif p == 1:
        assert (y == 0).all()
    else:
        kept = y != 0
        torch.testing.assert_close(y[kept], x[kept] / (1 - p))


def test_dropout_through_torch_is_refused_naming_the_call():
    with pytest.raises(cu.CheckFailure, match=r"called F\.dropout.*build yourself"):
        cu.check("dropout", dropout_functional, strict=True)
