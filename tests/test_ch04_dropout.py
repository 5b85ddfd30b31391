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


# =====================================================================================
# dropout_function: forward saves the mask, backward reuses it
# =====================================================================================
class FunctionBoolMask(torch.autograd.Function):
    """A bool mask on ctx.save_for_backward and the scale as a ctx attribute."""

    @staticmethod
    def forward(ctx, x, p, training):
        if not training or p == 0:
            ctx.save_for_backward(torch.ones_like(x, dtype=torch.bool))
            ctx.scale = 1.0
            return x.clone()
        keep = torch.rand(x.shape) >= p
        ctx.save_for_backward(keep)
        ctx.scale = 0.0 if p == 1 else 1 / (1 - p)
        return x * keep * ctx.scale

    @staticmethod
    def backward(ctx, grad_output):
        (keep,) = ctx.saved_tensors
        return grad_output * keep * ctx.scale, None, None


class FunctionScaledMaskNumpy(torch.autograd.Function):
    """The scaled mask m/(1-p), drawn with numpy, kept as a ctx attribute."""

    @staticmethod
    def forward(ctx, x, p, training):
        if training and p > 0:
            scale = 0.0 if p == 1 else 1.0 / (1.0 - p)
            keep = _NP_RNG.random(tuple(x.shape)) >= p
            ctx.mask = torch.from_numpy(keep * scale).to(x.dtype)
        else:
            ctx.mask = torch.ones_like(x)
        return x * ctx.mask

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output * ctx.mask, None, None


class FunctionWhere(torch.autograd.Function):
    """torch.where on a saved keep mask; identity branches return grad_output itself."""

    @staticmethod
    def forward(ctx, x, p, training):
        ctx.active = training and p > 0
        if not ctx.active:
            return x.clone()
        keep = torch.rand(x.shape, dtype=torch.float64) > p
        ctx.save_for_backward(keep)
        ctx.p = p
        return torch.where(keep, x / (1 - p), torch.zeros_like(x))

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.active:
            return grad_output, None, None
        (keep,) = ctx.saved_tensors
        return (
            torch.where(keep, grad_output / (1 - ctx.p), torch.zeros_like(grad_output)),
            None,
            None,
        )


FUNCTION_CORRECT = [FunctionBoolMask, FunctionScaledMaskNumpy, FunctionWhere]


@pytest.mark.parametrize("cls", FUNCTION_CORRECT, ids=[c.__name__ for c in FUNCTION_CORRECT])
def test_correct_dropout_function_passes_on_every_seed(cls):
    for seed in range(8):
        report = cu.check("dropout_function", cls, seed=seed, strict=True)
        assert report.passed, (seed, report)


def _function(forward_rule, backward_rule):
    """An autograd Function from two plain rules, for the planted mistakes."""

    class Planted(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, p, training):
            return forward_rule(ctx, x, p, training)

        @staticmethod
        def backward(ctx, grad_output):
            return backward_rule(ctx, grad_output)

    return Planted


def _fwd_keep(ctx, x, p, training):
    ctx.p, ctx.training, ctx.shape = p, training and p > 0, x.shape
    if not ctx.training:
        return x.clone()
    ctx.keep = (torch.rand(x.shape) >= p).to(x.dtype)
    ctx.scale = 0.0 if p == 1 else 1 / (1 - p)
    return x * ctx.keep * ctx.scale


def _bwd_fresh_mask(ctx, g):
    if not ctx.training:
        return g, None, None
    return g * (torch.rand(ctx.shape) >= ctx.p).to(g.dtype) * ctx.scale, None, None


def _bwd_no_scale(ctx, g):
    return (g if not ctx.training else g * ctx.keep), None, None


def _bwd_pass_through(ctx, g):
    return g, None, None


def _bwd_only_dx(ctx, g):
    return g if not ctx.training else g * ctx.keep * ctx.scale


def _bwd_divides(ctx, g):
    """Recomputes the scale as 1/(1-p): 0 * inf = NaN at p=1."""
    return (g if not ctx.training else g * ctx.keep / (1 - ctx.p)), None, None


def _fwd_nan_at_p1(ctx, x, p, training):
    ctx.training = training
    if not training:
        return x.clone()
    ctx.keep = (torch.rand(x.shape) >= p).to(x.dtype)
    ctx.p = p
    return x * ctx.keep / (1 - p)


def _bwd_mask_always(ctx, g):
    return (g * ctx.keep / (1 - ctx.p) if ctx.training else g), None, None


def _fwd_scale_always(ctx, x, p, training):
    ctx.scale = 0.0 if p == 1 else 1 / (1 - p)
    if not training or p == 0:
        return x.clone()
    ctx.keep = (torch.rand(x.shape) >= p).to(x.dtype)
    return x * ctx.keep * ctx.scale


def _bwd_scale_always(ctx, g):
    """Eval forward is the identity, but backward still scales by 1/(1-p)."""
    keep = getattr(ctx, "keep", torch.ones_like(g))
    return g * keep * ctx.scale, None, None


FUNCTION_MISTAKES = [
    (
        "fresh_mask_in_backward",
        _function(_fwd_keep, _bwd_fresh_mask),
        r"backward drew a fresh mask",
    ),
    (
        "no_scale_in_backward",
        _function(_fwd_keep, _bwd_no_scale),
        r"backward forgot the 1/\(1-p\) scale",
    ),
    (
        "grad_passes_through",
        _function(_fwd_keep, _bwd_pass_through),
        r"passed grad_output through unchanged",
    ),
    (
        "returns_only_dx",
        _function(_fwd_keep, _bwd_only_dx),
        r"wrong number of gradients.*\(dx, None, None\)",
    ),
    (
        "nan_in_backward_at_p1",
        _function(_fwd_keep, _bwd_divides),
        r"p=1 the grad x has NaN or inf: backward divided",
    ),
    (
        "nan_in_forward_at_p1",
        _function(_fwd_nan_at_p1, _bwd_mask_always),
        r"p=1 the output has NaN or inf: forward divided",
    ),
    (
        "grad_scaled_in_eval",
        _function(_fwd_scale_always, _bwd_scale_always),
        r"backward scaled grad_output by 1/\(1-p\) although the forward was the identity",
    ),
]


@pytest.mark.parametrize(
    ("name", "cls", "pattern"), FUNCTION_MISTAKES, ids=[m[0] for m in FUNCTION_MISTAKES]
)
def test_dropout_function_mistake_is_named(name, cls, pattern):
    for seed in MISTAKE_SEEDS:
        with pytest.raises(cu.CheckFailure, match=pattern):
            cu.check("dropout_function", cls, seed=seed, strict=True)


def test_dropout_function_wants_the_class():
    with pytest.raises(cu.CheckFailure, match=r"pass the class itself.*drop the parentheses"):
        cu.check("dropout_function", FunctionBoolMask(), strict=True)
    with pytest.raises(cu.CheckFailure, match=r"pass the class itself"):
        cu.check("dropout_function", dropout_rand, strict=True)


# =====================================================================================
# dropout2d: whole channels
# =====================================================================================
def dropout2d_rand(x, p, training=True):
    if not training:
        return x
    if p == 1:
        return torch.zeros_like(x)
    coin = torch.rand(x.shape[0], x.shape[1], *([1] * (x.dim() - 2)))
    return x * (coin >= p).to(x.dtype) / (1 - p)


def dropout2d_loops(x, p, training=True):
    """One Python coin per (sample, channel), written into a copy."""
    out = x.clone()
    if not training:
        return out
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            out[n, c] = 0.0 if random.random() < p else x[n, c] / (1 - p)
    return out


def dropout2d_bernoulli_view(x, p, training=True):
    if not training or p == 0:
        return x.clone()
    scale = 0.0 if p == 1 else 1 / (1 - p)
    keep = torch.bernoulli(torch.full(x.shape[:2], 1 - p, dtype=x.dtype))  # (N, C)
    return x * keep.view(*x.shape[:2], *([1] * (x.dim() - 2))) * scale


DROPOUT2D_CORRECT = [dropout2d_rand, dropout2d_loops, dropout2d_bernoulli_view]


@pytest.mark.parametrize("fn", DROPOUT2D_CORRECT, ids=[f.__name__ for f in DROPOUT2D_CORRECT])
def test_correct_dropout2d_passes_on_every_seed(fn):
    for seed in SEEDS:
        report = cu.check("dropout2d", fn, seed=seed, strict=True)
        assert report.passed, (seed, report)


def _masked(x, p, shape):
    return x * (torch.rand(shape) >= p).to(x.dtype) / (1 - p)


def dropout2d_elementwise(x, p, training=True):
    if not training:
        return x
    return torch.zeros_like(x) if p == 1 else _masked(x, p, x.shape)


def dropout2d_shared_batch(x, p, training=True):
    if not training:
        return x
    return torch.zeros_like(x) if p == 1 else _masked(x, p, (1, x.shape[1], *([1] * (x.dim() - 2))))


def dropout2d_per_sample(x, p, training=True):
    if not training:
        return x
    return torch.zeros_like(x) if p == 1 else _masked(x, p, (x.shape[0], *([1] * (x.dim() - 1))))


def dropout2d_no_rescale(x, p, training=True):
    if not training:
        return x
    return _masked(x, p, (*x.shape[:2], *([1] * (x.dim() - 2)))) * (1 - p)


def dropout2d_nan_at_p1(x, p, training=True):
    if not training:
        return x
    return _masked(x, p, (*x.shape[:2], *([1] * (x.dim() - 2))))


def dropout2d_active_in_eval(x, p, training=True):
    return torch.zeros_like(x) if p == 1 else _masked(x, p, (*x.shape[:2], *([1] * (x.dim() - 2))))


DROPOUT2D_MISTAKES = [
    (dropout2d_elementwise, r"It looks like an elementwise mask"),
    (dropout2d_shared_batch, r"along dim 0 .* the same channel mask for every sample"),
    (dropout2d_per_sample, r"along dim 1 .* one coin per sample shared by all its channels"),
    (dropout2d_no_rescale, r"survivors were not rescaled"),
    (dropout2d_nan_at_p1, r"with p=1 the output has NaN or inf"),
    (dropout2d_active_in_eval, r"entries were zeroed with training=False, p=0\.5: in eval mode"),
]


@pytest.mark.parametrize(
    ("fn", "pattern"), DROPOUT2D_MISTAKES, ids=[f.__name__ for f, _ in DROPOUT2D_MISTAKES]
)
def test_dropout2d_mistake_is_named(fn, pattern):
    for seed in MISTAKE_SEEDS:
        with pytest.raises(cu.CheckFailure, match=pattern):
            cu.check("dropout2d", fn, seed=seed, strict=True)


# =====================================================================================
# mc_dropout_predict
# =====================================================================================
def _only_dropout_on(model):
    modes = [m.training for m in model.modules()]
    model.eval()
    for m in model.modules():
        if isinstance(
            m, torch.nn.Dropout | torch.nn.Dropout1d | torch.nn.Dropout2d | torch.nn.Dropout3d
        ):
            m.train()
    return modes


def _restore(model, modes):
    for m, mode in zip(model.modules(), modes, strict=True):
        m.training = mode


def mc_loop(model, x, n_samples):
    modes = _only_dropout_on(model)
    with torch.no_grad():
        ys = torch.stack([model(x) for _ in range(n_samples)])
    _restore(model, modes)
    return ys.mean(0), ys.std(0)


def mc_batched_population_std(model, x, n_samples):
    """All passes in one batch (BatchNorm in eval keeps rows apart); std divided by n."""
    modes = _only_dropout_on(model)
    with torch.no_grad():
        ys = model(x.repeat(n_samples, 1))  # (n_samples * N, D): row block t is pass t
    _restore(model, modes)
    ys = ys.reshape(n_samples, *x.shape[:1], -1)  # (n_samples, N, D)
    return ys.mean(0), ys.std(0, unbiased=False)


def mc_deepcopy(model, x, n_samples):
    """Samples a deep copy, so the caller's model is never touched."""
    import copy

    twin = copy.deepcopy(model)
    _only_dropout_on(twin)
    with torch.no_grad():
        ys = torch.stack([twin(x) for _ in range(n_samples)])
    return ys.mean(0), ys.std(0)


def mc_eval(model, x, n_samples):
    model.eval()
    ys = torch.stack([model(x).detach() for _ in range(n_samples)])
    return ys.mean(0), ys.std(0)


def mc_model_train(model, x, n_samples):
    modes = [m.training for m in model.modules()]
    model.train()
    ys = torch.stack([model(x).detach() for _ in range(n_samples)])
    _restore(model, modes)
    return ys.mean(0), ys.std(0)


def mc_wrong_axis(model, x, n_samples):
    modes = _only_dropout_on(model)
    ys = torch.stack([model(x).detach() for _ in range(n_samples)])
    _restore(model, modes)
    return ys.mean(0), ys.std(1)


def mc_not_restored(model, x, n_samples):
    _only_dropout_on(model)
    ys = torch.stack([model(x).detach() for _ in range(n_samples)])
    return ys.mean(0), ys.std(0)


@pytest.mark.parametrize("fn", [mc_loop, mc_batched_population_std, mc_deepcopy])
def test_correct_mc_dropout_predict_passes_on_every_seed(fn):
    for seed in SEEDS:
        report = cu.check("mc_dropout_predict", fn, seed=seed, strict=True)
        assert report.passed, (seed, report)


MC_MISTAKES = [
    (mc_eval, r"It looks like model\.eval\(\) was called and left so"),
    (mc_model_train, r"BatchNorm ran in training mode .* whole model was in training mode"),
    (mc_wrong_axis, r"`std` has shape .* over the wrong axis"),
    (mc_not_restored, r"mode was not restored afterwards"),
]


@pytest.mark.parametrize(("fn", "pattern"), MC_MISTAKES, ids=[f.__name__ for f, _ in MC_MISTAKES])
def test_mc_dropout_predict_mistake_is_named(fn, pattern):
    for seed in MISTAKE_SEEDS:
        with pytest.raises(cu.CheckFailure, match=pattern):
            cu.check("mc_dropout_predict", fn, seed=seed, strict=True)


def test_mc_std_test_catches_a_wrong_spread():
    """Right modes, right mean, but the std doubled: only the Maurer-Pontil bound can tell."""

    def doubled(model, x, n_samples):
        mean, std = mc_loop(model, x, n_samples)
        return mean, 2 * std

    with pytest.raises(cu.CheckFailure, match=r"`std` is .* expected .* ±"):
        cu.check("mc_dropout_predict", doubled, strict=True)


# =====================================================================================
# grid_search_cv
# =====================================================================================
def _candidates(param_grid):
    import itertools

    names = list(param_grid)
    return [dict(zip(names, v, strict=True)) for v in itertools.product(*param_grid.values())]


def _cv(
    make_model,
    param_grid,
    X,
    y,
    n_splits,
    fit,
    score,
    folds,
    pick=np.argmax,
    train_on=None,
    agg=np.mean,
):
    means = []
    everything = np.arange(len(X))
    for params in _candidates(param_grid):
        scores = []
        for val in folds:
            train = np.setdiff1d(everything, val) if train_on is None else train_on(everything, val)
            model = make_model(**params)
            fit(model, X[torch.as_tensor(train)], y[torch.as_tensor(train)])
            scored = val if train_on is None or len(np.intersect1d(train, val)) == 0 else train
            scores.append(score(model, X[torch.as_tensor(scored)], y[torch.as_tensor(scored)]))
        means.append(float(agg(scores)))
    return _candidates(param_grid)[int(pick(means))], means


def grid_shuffled_array_split(make_model, param_grid, X, y, n_splits, fit, score):
    """Shuffled folds from np.array_split; mean_scores as a list."""
    order = np.random.default_rng(0).permutation(len(X))
    return _cv(make_model, param_grid, X, y, n_splits, fit, score, np.array_split(order, n_splits))


def grid_contiguous(make_model, param_grid, X, y, n_splits, fit, score):
    return _cv(
        make_model,
        param_grid,
        X,
        y,
        n_splits,
        fit,
        score,
        np.array_split(np.arange(len(X)), n_splits),
    )


def test_correct_grid_search_cv_passes():
    for fn in (grid_shuffled_array_split, grid_contiguous):
        for seed in range(5):
            report = cu.check("grid_search_cv", fn, seed=seed, strict=True)
            assert report.passed, (fn.__name__, seed, report)


def grid_scores_on_train(make_model, param_grid, X, y, n_splits, fit, score):
    folds = np.array_split(np.arange(len(X)), n_splits)
    return _cv(
        make_model, param_grid, X, y, n_splits, fit, score, folds, train_on=lambda every, val: every
    )


def grid_overlapping(make_model, param_grid, X, y, n_splits, fit, score):
    n = len(X)
    size = -(-n // n_splits)
    step = n // n_splits
    folds = [np.arange(k * step, min(k * step + size, n)) for k in range(n_splits)]
    return _cv(make_model, param_grid, X, y, n_splits, fit, score, folds)


def grid_drops_remainder(make_model, param_grid, X, y, n_splits, fit, score):
    size = len(X) // n_splits
    folds = [np.arange(k * size, (k + 1) * size) for k in range(n_splits)]
    return _cv(make_model, param_grid, X, y, n_splits, fit, score, folds)


def grid_picks_min(make_model, param_grid, X, y, n_splits, fit, score):
    folds = np.array_split(np.arange(len(X)), n_splits)
    return _cv(make_model, param_grid, X, y, n_splits, fit, score, folds, pick=np.argmin)


def grid_sums(make_model, param_grid, X, y, n_splits, fit, score):
    folds = np.array_split(np.arange(len(X)), n_splits)
    return _cv(make_model, param_grid, X, y, n_splits, fit, score, folds, agg=np.sum)


def grid_one_model_per_candidate(make_model, param_grid, X, y, n_splits, fit, score):
    folds = np.array_split(np.arange(len(X)), n_splits)
    everything = np.arange(len(X))
    means = []
    for params in _candidates(param_grid):
        model = make_model(**params)
        scores = []
        for val in folds:
            train = torch.as_tensor(np.setdiff1d(everything, val))
            fit(model, X[train], y[train])
            scores.append(score(model, X[torch.as_tensor(val)], y[torch.as_tensor(val)]))
        means.append(float(np.mean(scores)))
    return _candidates(param_grid)[int(np.argmax(means))], means


GRID_MISTAKES = [
    (grid_scores_on_train, r"It looks like it was scored on the training fold"),
    (grid_overlapping, r"held-out folds overlap"),
    (grid_drops_remainder, r"must cover every sample"),
    (grid_picks_min, r"It looks like the minimum was picked"),
    (grid_sums, r"fold scores were summed, not averaged"),
    (grid_one_model_per_candidate, r"fitted 4 times .* build a fresh model with make_model"),
]


@pytest.mark.parametrize(
    ("fn", "pattern"), GRID_MISTAKES, ids=[f.__name__ for f, _ in GRID_MISTAKES]
)
def test_grid_search_cv_mistake_is_named(fn, pattern):
    with pytest.raises(cu.CheckFailure, match=pattern):
        cu.check("grid_search_cv", fn, strict=True)


def test_new_exercises_are_listed_with_their_signatures():
    listed = {e.id: e for e in cu.exercises("04")}
    assert listed["dropout_function"].signature.startswith(
        "class DropoutFunction(torch.autograd.Function)"
    )
    assert listed["dropout2d"].signature == "(x (N,C,H,W) or (N,C,L), p, training=True) -> Tensor"
    assert listed["mc_dropout_predict"].signature == "(model, x, n_samples) -> (mean, std)"
    assert listed["grid_search_cv"].signature.startswith(
        "(make_model, param_grid, X, y, n_splits, fit, score)"
    )


@pytest.mark.parametrize(
    "ex", ["dropout_function", "dropout2d", "mc_dropout_predict", "grid_search_cv"]
)
def test_new_references_pass_on_several_seeds(ex):
    for seed in range(5):
        assert cu.check(ex, cu.reference(ex), seed=seed, strict=True).passed


@pytest.mark.parametrize("ex", ["dropout_function", "dropout2d", "mc_dropout_predict"])
def test_new_statistical_batteries_keep_the_false_alarm_budget(ex):
    rows = cu.check(ex, cu.reference(ex), strict=True).rows
    stat_rows = [r for r in rows if "bound" in r.verdict]
    assert 2 <= len(stat_rows) <= ch04.MAX_STAT_TESTS
    assert len(stat_rows) * ch04.DELTA <= 1e-6


@pytest.mark.parametrize(
    "ex", ["dropout_function", "dropout2d", "mc_dropout_predict", "grid_search_cv"]
)
def test_new_checks_are_deterministic_per_seed(ex):
    a = cu.check(ex, cu.reference(ex), seed=3, strict=True).rows
    b = cu.check(ex, cu.reference(ex), seed=3, strict=True).rows
    assert [(r.case, r.verdict) for r in a] == [(r.case, r.verdict) for r in b]
