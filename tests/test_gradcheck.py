"""Unit tests of course_utils.gradcheck: numerical gradients, relative error, comparisons."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import course_utils as cu
from course_utils.gradcheck import Comparison, compare, numerical_gradient, relative_error


def _autograd(f, *xs, dout=None):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    y = f(*xs)
    return torch.autograd.grad(y, xs, torch.ones_like(y) if dout is None else dout)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_numerical_gradient_matches_autograd_on_random_shapes(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    w = torch.randn(*shape, generator=g, dtype=torch.float64)

    def f(z):
        return (torch.tanh(z * w) * z).sum() + torch.logsumexp(z.reshape(-1), 0)

    (num,) = numerical_gradient(f, [x])
    (ana,) = _autograd(f, x)
    assert compare(num, ana, rtol=1e-6, atol=1e-9).ok


def test_numerical_gradient_of_several_inputs_with_dout():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 4, generator=g, dtype=torch.float64)
    b = torch.randn(4, 2, generator=g, dtype=torch.float64)
    dout = torch.randn(3, 2, generator=g, dtype=torch.float64)
    num = numerical_gradient(lambda x, y: torch.sin(x @ y), [a, b], dout)
    ana = _autograd(lambda x, y: torch.sin(x @ y), a, b, dout=dout)
    for n, e in zip(num, ana, strict=True):
        assert compare(n, e, rtol=1e-6, atol=1e-9).ok


def test_numerical_gradient_leaves_inputs_untouched_and_respects_wrt():
    x = torch.randn(5, dtype=torch.float32)
    y = torch.randn(5, dtype=torch.float32)
    before = (x.clone(), y.clone())
    grads = numerical_gradient(lambda a, b: (a * b).sum(), [x, y], wrt=[1])
    assert grads[0] is None and grads[1] is not None
    assert torch.equal(x, before[0]) and torch.equal(y, before[1])
    # float32 inputs are differentiated in float64, so the gradient is exact to float64 precision.
    assert compare(grads[1], x.double(), rtol=1e-8, atol=1e-9).ok


def test_central_difference_error_shrinks_like_h_squared():
    x = torch.tensor([0.7], dtype=torch.float64)
    errs = []
    for h in (1e-2, 1e-3):
        (g,) = numerical_gradient(lambda z: torch.sin(z).sum(), [x], eps=h)
        errs.append(abs(float(g) - math.cos(0.7)))
    assert 50 < errs[0] / errs[1] < 200  # ratio 100 for an O(h^2) error


def test_relative_error_is_meaningful_near_zero():
    expected = torch.tensor([1.0, 1e-12, 0.0], dtype=torch.float64)
    actual = torch.tensor([1.0, 3e-12, 1e-13], dtype=torch.float64)
    naive = (actual - expected).abs() / expected.abs()
    assert naive[1] > 1.0  # the naive measure calls a negligible difference a 200% error
    assert float(relative_error(actual, expected).max()) < 1e-8


def test_relative_error_flags_real_errors_and_nonfinite():
    expected = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    assert float(relative_error(expected * 1.01, expected).max()) == pytest.approx(
        0.01 / 1.01, rel=1e-6
    )
    assert math.isinf(float(relative_error(torch.tensor([1.0, float("nan"), 3.0]), expected).max()))
    assert float(relative_error(torch.zeros(3), torch.zeros(3)).max()) == 0.0
    assert float(relative_error(torch.tensor([0.0, 1e-3]), torch.zeros(2)).max()) == pytest.approx(
        1.0
    )


def test_compare_reports_the_worst_index_and_values():
    expected = torch.arange(12, dtype=torch.float64).reshape(3, 4) + 1
    actual = expected.clone()
    actual[2, 1] += 0.5
    c = compare(actual, expected, rtol=1e-7, atol=1e-10)
    assert not c.ok
    assert c.worst_index == (2, 1)
    assert c.actual_value == pytest.approx(10.5) and c.expected_value == pytest.approx(10.0)
    assert compare(expected, expected.clone(), rtol=1e-7, atol=0).ok


def test_compare_treats_matching_infinities_as_equal_and_nan_as_wrong():
    e = torch.tensor([float("-inf"), 1.0])
    assert compare(e.clone(), e, 1e-7, 1e-9).ok
    assert not compare(torch.tensor([float("nan"), 1.0]), e, 1e-7, 1e-9).ok


def _torch_relative_error(a, e):
    """The formula of ``relative_error`` written in torch operators: the oracle for numpy's."""
    diff = (a - e).abs()
    finite = torch.isfinite(a) & torch.isfinite(e)
    scale = max(
        float(a[finite].abs().max()) if finite.any() else 0.0,
        float(e[finite].abs().max()) if finite.any() else 0.0,
    )
    floor = torch.tensor(max(1e-3 * scale, 1e-300), dtype=torch.float64)
    rel = diff / torch.maximum(torch.maximum(a.abs(), e.abs()), floor)
    rel = torch.where((a == e) & ~finite, torch.zeros_like(rel), rel)
    return torch.where(torch.isnan(rel), torch.full_like(rel, math.inf), rel)


def _torch_compare(actual, expected, rtol, atol):
    """The formula of ``compare`` written in torch operators: the oracle for numpy's."""
    a, e = actual.detach().double(), expected.detach().double()
    if a.numel() == 0:
        return Comparison(True, 0.0, 0.0, (), 0.0, 0.0)
    diff = (a - e).abs()
    diff = torch.where((a == e) | (a.isnan() & e.isnan()), torch.zeros_like(diff), diff)
    diff = torch.where(diff.isnan(), torch.full_like(diff, math.inf), diff)
    excess = diff / (atol + rtol * e.abs())
    excess = torch.where(excess.isnan(), torch.full_like(excess, math.inf), excess)
    flat = int(excess.reshape(-1).argmax())
    idx, rest = [], flat
    for size in reversed(a.shape):
        idx.append(rest % size)
        rest //= size
    return Comparison(
        ok=bool((excess <= 1).all()),
        max_abs=float(diff.max()),
        max_rel=float(_torch_relative_error(a, e).max()),
        worst_index=tuple(reversed(idx)),
        actual_value=float(a.reshape(-1)[flat]),
        expected_value=float(e.reshape(-1)[flat]),
    )


# Values that make the edge cases: signed zeros, infinities, NaN, ties, tiny and huge numbers.
_SPECIAL = [0.0, -0.0, 1.0, -1.0, 1e-300, 1e300, 3.5, math.inf, -math.inf, math.nan]


@settings(max_examples=300, deadline=None)
@given(
    shape=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    data=st.data(),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
    rtol=st.sampled_from([0.0, 1e-7, 1e-5, 1e-2]),
    atol=st.sampled_from([0.0, 1e-12, 1e-8, 1e-3]),
)
def test_compare_and_relative_error_agree_with_their_torch_formulas(shape, data, dtype, rtol, atol):
    n = math.prod(shape)
    value = st.one_of(st.sampled_from(_SPECIAL), st.floats(-6e4, 6e4, width=16))
    e = torch.tensor(data.draw(st.lists(value, min_size=n, max_size=n)), dtype=torch.float64)
    # actual: often the expected value itself, nudged, or unrelated, so that ties and NaN pairs occur
    pick = data.draw(st.lists(st.sampled_from(["same", "nudge", "other"]), min_size=n, max_size=n))
    other = data.draw(st.lists(value, min_size=n, max_size=n))
    a = torch.tensor(
        [
            x if how == "same" else x * (1 + 1e-6) + 1e-9 if how == "nudge" else y
            for x, y, how in zip(e.tolist(), other, pick, strict=True)
        ],
        dtype=torch.float64,
    )
    a, e = a.reshape(shape).to(dtype), e.reshape(shape).to(dtype)
    got, want = compare(a, e, rtol, atol), _torch_compare(a, e, rtol, atol)
    # repr compares floats bit for bit in spirit: nan equals nan, and -0.0 differs from 0.0
    assert repr(got) == repr(want)
    rel, want_rel = relative_error(a, e), _torch_relative_error(a.double(), e.double())
    assert rel.dtype == torch.float64 and rel.shape == a.shape
    assert torch.equal(rel.isnan(), want_rel.isnan())
    assert torch.equal(rel.nan_to_num(0.0), want_rel.nan_to_num(0.0))


def test_compare_accepts_tensors_that_require_grad_or_are_negated_views():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    assert compare(x * 1, x.detach().clone(), 0.0, 1e-12).ok
    negated = torch.tensor([1.0, 2.0]).neg().conj()  # a view with the negative bit set
    assert compare(negated, torch.tensor([-1.0, -2.0]), 0.0, 1e-12).ok
    assert relative_error(negated, torch.tensor([-1.0, -2.0])).tolist() == [0.0, 0.0]


class _GoodCube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


class _BadCube(_GoodCube):
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x**2 * g


def test_gradcheck_function_accepts_a_correct_function_and_explains_a_wrong_one():
    x = torch.randn(4, 3)  # float32 on purpose: the helper moves it to float64
    assert cu.gradcheck_function(_GoodCube, x)
    with pytest.raises(AssertionError, match="disagrees with finite differences"):
        cu.gradcheck_function(_BadCube, x)


def test_check_gradients_returns_one_comparison_per_input():
    a = torch.randn(3, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    results = cu.check_gradients(lambda x, y: (x * y).sum(), [a, b], [b, a])
    assert [r.ok for r in results] == [True, True]
    results = cu.check_gradients(lambda x, y: (x * y).sum(), [a, b], [a, b])
    assert not all(r.ok for r in results)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 10**6), delta=st.floats(1e-12, 0.5))
def test_hoeffding_radius_solves_its_tail_equation(n, delta):
    from course_utils.stats import hoeffding_radius

    t = hoeffding_radius(n, delta)
    assert 2 * math.exp(-2 * n * t * t) == pytest.approx(delta, rel=1e-9)
