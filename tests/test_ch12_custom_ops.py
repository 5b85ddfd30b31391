"""Chapter 12 batteries: correct LLTM implementations in several styles pass, planted mistakes are named;
the C++ extension's wrapper refuses bad input in one line, builds once per machine, and skips without
a compiler.

Styles: vectorised torch, numpy, explicit loops over rows, F.linear with torch.where for the ELU,
and autograd Functions that save inputs or intermediates, with and without needs_input_grad.
Mistakes: the ones the chapter lists (gate order, concatenation order, tanh for ELU, the grad_cell
path, tanh', transposed weights, ELU' for negative inputs, d_bias not summed, autograd in the
backward) and a few more, each rejected with the sentence that names it.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import course_utils as cu
from course_utils.checks import ch12_custom_ops as ch12

SEEDS = range(20)
#: Seeds on which every planted mistake must be caught (the catch must not depend on luck).
MISTAKE_SEEDS = (0, 1, 7)
ROOT = Path(__file__).resolve().parents[1]
NEEDS_COMPILER = pytest.mark.skipif(
    ch12.compiler_missing() != "", reason=f"cannot build C++ here: {ch12.compiler_missing()}"
)


# =====================================================================================
# Correct implementations, one style each
# =====================================================================================
def _cell(gates, old_cell, candidate=F.elu):
    """The pointwise tail from the (B, 3S) pre-activations: (new_h, new_cell)."""
    a_i, a_o, a_z = gates.chunk(3, 1)
    new_cell = old_cell + candidate(a_z) * torch.sigmoid(a_i)
    return torch.tanh(new_cell) * torch.sigmoid(a_o), new_cell


def forward_torch(input, weights, bias, old_h, old_cell):
    """Vectorised, as the derivation reads."""
    return _cell(torch.cat([old_h, input], 1) @ weights.T + bias, old_cell)


def forward_linear_where(input, weights, bias, old_h, old_cell):
    """F.linear on the split weights, ELU written with torch.where, sigmoid as 1/(1+exp(-a))."""
    s = old_h.shape[1]
    gates = F.linear(old_h, weights[:, :s]) + F.linear(input, weights[:, s:], bias)
    a_i, a_o, a_z = gates[:, :s], gates[:, s : 2 * s], gates[:, 2 * s :]
    cand = torch.where(a_z > 0, a_z, torch.expm1(a_z))
    new_cell = old_cell + cand / (1 + torch.exp(-a_i))
    return torch.tanh(new_cell) / (1 + torch.exp(-a_o)), new_cell


def forward_numpy(input, weights, bias, old_h, old_cell):
    """numpy throughout."""
    X = np.concatenate([old_h.numpy(), input.numpy()], 1)
    g = X @ weights.numpy().T + bias.numpy()
    s = old_h.shape[1]
    sig = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    z = g[:, 2 * s :]
    c = old_cell.numpy() + np.where(z > 0, z, np.expm1(z)) * sig(g[:, :s])
    h = np.tanh(c) * sig(g[:, s : 2 * s])
    return torch.from_numpy(h).to(input.dtype), torch.from_numpy(c).to(input.dtype)


def forward_loops(input, weights, bias, old_h, old_cell):
    """One row of the batch at a time."""
    hs, cs = [], []
    for b in range(input.shape[0]):
        x = torch.cat([old_h[b], input[b]])  # (S + I,)
        a_i, a_o, a_z = (weights @ x + bias).chunk(3)
        c = old_cell[b] + F.elu(a_z) * torch.sigmoid(a_i)
        hs.append(torch.tanh(c) * torch.sigmoid(a_o))
        cs.append(c)
    return torch.stack(hs), torch.stack(cs)


def _backward_parts(grad_h, grad_cell, input, weights, bias, old_h, old_cell):
    """X, d_gates (B, 3S) and d_old_cell, as the derivation reads."""
    X = torch.cat([old_h, input], 1)
    a_i, a_o, a_z = (X @ weights.T + bias).chunk(3, 1)
    i, o, z = torch.sigmoid(a_i), torch.sigmoid(a_o), F.elu(a_z)
    tc = torch.tanh(old_cell + z * i)
    d_cell = grad_h * o * (1 - tc**2) + grad_cell
    d_elu = torch.where(a_z > 0, torch.ones_like(a_z), z + 1)  # ELU'(a) = ELU(a) + 1 for a <= 0
    d_gates = torch.cat(
        [d_cell * z * i * (1 - i), grad_h * tc * o * (1 - o), d_cell * i * d_elu], 1
    )
    return X, d_gates, d_cell


def backward_torch(grad_h, grad_cell, input, weights, bias, old_h, old_cell):
    """Vectorised, as the derivation reads."""
    s = old_h.shape[1]
    X, d_gates, d_cell = _backward_parts(grad_h, grad_cell, input, weights, bias, old_h, old_cell)
    d_X = d_gates @ weights
    return d_X[:, s:], d_gates.T @ X, d_gates.sum(0), d_X[:, :s], d_cell


def backward_numpy(grad_h, grad_cell, input, weights, bias, old_h, old_cell):
    """numpy, with einsum for the products."""
    gh, gc, W = grad_h.numpy(), grad_cell.numpy(), weights.numpy()
    s = old_h.shape[1]
    X = np.concatenate([old_h.numpy(), input.numpy()], 1)
    g = np.einsum("bk,gk->bg", X, W) + bias.numpy()
    sig = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    i, o, a_z = sig(g[:, :s]), sig(g[:, s : 2 * s]), g[:, 2 * s :]
    z = np.where(a_z > 0, a_z, np.expm1(a_z))
    tc = np.tanh(old_cell.numpy() + z * i)
    d_cell = gh * o * (1 - tc * tc) + gc
    d_gates = np.concatenate(
        [
            d_cell * z * i * (1 - i),
            gh * tc * o * (1 - o),
            d_cell * i * np.where(a_z > 0, 1.0, np.exp(a_z)),
        ],
        1,
    )
    d_X = np.einsum("bg,gk->bk", d_gates, W)
    dt = input.dtype
    out = (d_X[:, s:], np.einsum("bg,bk->gk", d_gates, X), d_gates.sum(0), d_X[:, :s], d_cell)
    return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(dt) for a in out)


def backward_loops(grad_h, grad_cell, input, weights, bias, old_h, old_cell):
    """Row by row, accumulating d_weights and d_bias as outer products."""
    s = old_h.shape[1]
    d_w, d_b = torch.zeros_like(weights), torch.zeros_like(bias)
    d_in, d_h, d_c = [], [], []
    for b in range(input.shape[0]):
        x = torch.cat([old_h[b], input[b]])
        a = weights @ x + bias
        i, o = torch.sigmoid(a[:s]), torch.sigmoid(a[s : 2 * s])
        a_z = a[2 * s :]
        z = F.elu(a_z)
        tc = torch.tanh(old_cell[b] + z * i)
        dc = grad_h[b] * o * (1 - tc * tc) + grad_cell[b]
        dg = torch.cat(
            [
                dc * z * i * (1 - i),
                grad_h[b] * tc * o * (1 - o),
                dc * i * torch.where(a_z > 0, 1.0, a_z.exp()),
            ]
        )
        d_w = d_w + torch.outer(dg, x)
        d_b = d_b + dg
        dx = weights.T @ dg
        d_h.append(dx[:s])
        d_in.append(dx[s:])
        d_c.append(dc)
    return torch.stack(d_in), d_w, d_b, torch.stack(d_h), torch.stack(d_c)


class LLTMSavesInputs(torch.autograd.Function):
    """Saves the five inputs, skips what needs_input_grad does not ask for."""

    @staticmethod
    def forward(ctx, input, weights, bias, old_h, old_cell):
        ctx.save_for_backward(input, weights, bias, old_h, old_cell)
        return forward_torch(input, weights, bias, old_h, old_cell)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h, grad_cell):
        grads = backward_torch(grad_h, grad_cell, *ctx.saved_tensors)
        return tuple(g if n else None for g, n in zip(grads, ctx.needs_input_grad, strict=True))


class LLTMSavesIntermediates(torch.autograd.Function):
    """Saves X, the gate activations and tanh(new_cell) instead of recomputing; all five grads always."""

    @staticmethod
    def forward(ctx, input, weights, bias, old_h, old_cell):
        s = old_h.shape[1]
        X = torch.cat([old_h, input], 1)
        a_i, a_o, a_z = (X @ weights.T + bias).chunk(3, 1)
        i, o, z = torch.sigmoid(a_i), torch.sigmoid(a_o), F.elu(a_z)
        new_cell = old_cell + z * i
        tc = torch.tanh(new_cell)
        ctx.save_for_backward(X, weights, i, o, z, a_z, tc)
        ctx.s = s
        return tc * o, new_cell

    @staticmethod
    def backward(ctx, grad_h, grad_cell):
        X, weights, i, o, z, a_z, tc = ctx.saved_tensors
        d_cell = grad_h * o * (1 - tc * tc) + grad_cell
        d_elu = torch.where(a_z > 0, torch.ones_like(a_z), torch.exp(a_z))
        d_gates = torch.cat(
            [d_cell * z * i * (1 - i), grad_h * tc * o * (1 - o), d_cell * i * d_elu], 1
        )
        d_X = d_gates @ weights
        return d_X[:, ctx.s :], d_gates.T @ X, d_gates.sum(0), d_X[:, : ctx.s], d_cell


CORRECT = [
    ("lltm_forward", forward_torch),
    ("lltm_forward", forward_linear_where),
    ("lltm_forward", forward_numpy),
    ("lltm_forward", forward_loops),
    ("lltm_backward", backward_torch),
    ("lltm_backward", backward_numpy),
    ("lltm_backward", backward_loops),
    ("lltm_function", LLTMSavesInputs),
    ("lltm_function", LLTMSavesIntermediates),
]


@pytest.mark.parametrize(("exercise_id", "fn"), CORRECT, ids=[f.__name__ for _, f in CORRECT])
def test_correct_implementation_passes_on_every_seed(exercise_id, fn):
    for seed in SEEDS:
        assert cu.check(exercise_id, fn, seed=seed).passed


@pytest.mark.parametrize("exercise_id", ["lltm_forward", "lltm_backward", "lltm_function"])
def test_reference_passes_its_own_battery(exercise_id):
    for seed in SEEDS:
        assert cu.check(exercise_id, cu.reference(exercise_id), seed=seed).passed


def test_hand_backward_equals_autograd_of_the_forward():
    gen = torch.Generator().manual_seed(3)
    for b, i, s in ((4, 6, 3), (2, 3, 5), (1, 4, 4)):
        args = [
            torch.randn(*sh, generator=gen, dtype=torch.float64)
            for sh in ((b, i), (3 * s, i + s), (3 * s,), (b, s), (b, s))
        ]
        grads = [torch.randn(b, s, generator=gen, dtype=torch.float64) for _ in range(2)]
        xs = [a.clone().requires_grad_() for a in args]
        h, c = ch12.ref_lltm_forward(*xs)
        want = torch.autograd.grad((h * grads[0]).sum() + (c * grads[1]).sum(), xs)
        for got, exp in zip(ch12.ref_lltm_backward(*grads, *args), want, strict=True):
            torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)


# =====================================================================================
# Planted mistakes
# =====================================================================================
def _perm_forward(perm):
    def fn(input, weights, bias, old_h, old_cell):
        return ch12._lltm(input, weights, bias, old_h, old_cell, ch12.Variant(perm=perm))

    return fn


def fwd_concat_swapped(input, weights, bias, old_h, old_cell):
    return _cell(torch.cat([input, old_h], 1) @ weights.T + bias, old_cell)


def fwd_tanh_for_elu(input, weights, bias, old_h, old_cell):
    return _cell(torch.cat([old_h, input], 1) @ weights.T + bias, old_cell, torch.tanh)


def fwd_weights_transposed(input, weights, bias, old_h, old_cell):
    return _cell(torch.cat([old_h, input], 1) @ weights + bias, old_cell)


def fwd_outputs_swapped(input, weights, bias, old_h, old_cell):
    h, c = forward_torch(input, weights, bias, old_h, old_cell)
    return c, h


def fwd_no_output_gate(input, weights, bias, old_h, old_cell):
    _, c = forward_torch(input, weights, bias, old_h, old_cell)
    return torch.tanh(c), c


FORWARD_MISTAKES = [
    (fwd_concat_swapped, r"concatenated as \[input, old_h\]"),
    (
        _perm_forward((1, 0, 2)),
        r"gate chunks are in the wrong order.*\(output gate, input gate, candidate\)",
    ),
    (
        _perm_forward((2, 1, 0)),
        r"gate chunks are in the wrong order.*\(candidate, output gate, input gate\)",
    ),
    (_perm_forward((0, 2, 1)), r"gate chunks are in the wrong order"),
    (fwd_tanh_for_elu, r"tanh was used for the candidate"),
    (fwd_weights_transposed, r"weights were used transposed"),
    (fwd_outputs_swapped, r"returned in the wrong order"),
    (fwd_no_output_gate, r"output gate was left out"),
]


@pytest.mark.parametrize("seed", MISTAKE_SEEDS)
@pytest.mark.parametrize(("fn", "pattern"), FORWARD_MISTAKES, ids=[p for _, p in FORWARD_MISTAKES])
def test_forward_mistake_is_named(fn, pattern, seed):
    with pytest.raises(cu.CheckFailure, match=pattern):
        cu.check("lltm_forward", fn, seed=seed)


def _backward_with(**kw):
    def fn(grad_h, grad_cell, input, weights, bias, old_h, old_cell):
        return ch12._lltm_backward(
            grad_h, grad_cell, input, weights, bias, old_h, old_cell, ch12.Variant(**kw)
        )

    fn.__name__ = "lltm_backward"
    return fn


def bwd_bias_not_summed(grad_h, grad_cell, input, weights, bias, old_h, old_cell):
    s = old_h.shape[1]
    X, d_gates, d_cell = _backward_parts(grad_h, grad_cell, input, weights, bias, old_h, old_cell)
    d_X = d_gates @ weights
    return d_X[:, s:], d_gates.T @ X, d_gates, d_X[:, :s], d_cell


def bwd_autograd(grad_h, grad_cell, input, weights, bias, old_h, old_cell):
    xs = [t.detach().requires_grad_() for t in (input, weights, bias, old_h, old_cell)]
    with torch.enable_grad():
        h, c = forward_torch(*xs)
        return torch.autograd.grad((h * grad_h).sum() + (c * grad_cell).sum(), xs)


BACKWARD_MISTAKES = [
    (_backward_with(order="xh"), r"concatenated as \[input, old_h\]"),
    (_backward_with(perm=(1, 0, 2)), r"gate chunks are in the wrong order"),
    (_backward_with(perm=(2, 0, 1)), r"gate chunks are in the wrong order"),
    (_backward_with(act="tanh"), r"tanh was used for the candidate"),
    (_backward_with(cell_path=False), r"grad_cell path was forgotten"),
    (_backward_with(tanh_prime=False), r"tanh' was forgotten"),
    (_backward_with(transposed=True), r"weights were used transposed"),
    (
        _backward_with(elu_negative="zero"),
        r"ELU derivative is wrong for negative inputs \(taken as 0",
    ),
    (
        _backward_with(elu_negative="one"),
        r"ELU derivative is wrong for negative inputs \(taken as 1\)",
    ),
    (
        _backward_with(elu_negative="value"),
        r"ELU derivative is wrong for negative inputs \(taken as ELU",
    ),
    (_backward_with(bias_reduce="mean"), r"d_bias was averaged over the batch"),
    (bwd_bias_not_summed, r"`d_bias` has shape \(4, 9\): it was not summed over the batch"),
    (bwd_autograd, r"called autograd .*derive the gradient by hand"),
]


@pytest.mark.parametrize("seed", MISTAKE_SEEDS)
@pytest.mark.parametrize(
    ("fn", "pattern"), BACKWARD_MISTAKES, ids=[p for _, p in BACKWARD_MISTAKES]
)
def test_backward_mistake_is_named(fn, pattern, seed):
    with pytest.raises(cu.CheckFailure, match=pattern):
        cu.check("lltm_backward", fn, seed=seed)


def test_bias_summed_with_keepdim_is_named():
    def keepdim(*args):
        d_input, d_w, d_b, d_h, d_c = backward_torch(*args)
        return d_input, d_w, d_b.reshape(1, -1), d_h, d_c  # as d_gates.sum(0, keepdim=True)

    with pytest.raises(cu.CheckFailure, match=r"`d_bias` has shape \(1, 9\); .*without keepdim"):
        cu.check("lltm_backward", keepdim)


def test_transposed_weights_show_as_a_wrong_value_on_the_first_case():
    """The first case has I = 2S, so W is square and X @ W runs: the mistake is named, not a shape error."""
    b, i, s, _ = ch12.SETTINGS[0]
    assert i == 2 * s
    with pytest.raises(cu.CheckFailure, match=rf"in case B={b}, I={i}, S={s}.*transposed"):
        cu.check("lltm_backward", _backward_with(transposed=True))


class FnForgetsGradCell(LLTMSavesInputs):
    @staticmethod
    def backward(ctx, grad_h, grad_cell):
        return LLTMSavesInputs.backward(ctx, grad_h, torch.zeros_like(grad_cell))


class FnNoneForNeededGrad(LLTMSavesInputs):
    @staticmethod
    def backward(ctx, grad_h, grad_cell):
        d_input, d_w, d_b, d_h, d_c = backward_torch(grad_h, grad_cell, *ctx.saved_tensors)
        return d_input, None, d_b, d_h, d_c


class FnTanhForElu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weights, bias, old_h, old_cell):
        ctx.save_for_backward(input, weights, bias, old_h, old_cell)
        return ch12._lltm(input, weights, bias, old_h, old_cell, ch12.Variant(act="tanh"))

    @staticmethod
    def backward(ctx, grad_h, grad_cell):
        return ch12._lltm_backward(grad_h, grad_cell, *ctx.saved_tensors, ch12.Variant(act="tanh"))


FUNCTION_MISTAKES = [
    (FnForgetsGradCell, r"grad_cell path was forgotten"),
    (FnNoneForNeededGrad, r"returned None for d_weights, though that input requires grad"),
    (FnTanhForElu, r"tanh was used for the candidate"),
]


@pytest.mark.parametrize("seed", MISTAKE_SEEDS)
@pytest.mark.parametrize(
    ("cls", "pattern"), FUNCTION_MISTAKES, ids=[c.__name__ for c, _ in FUNCTION_MISTAKES]
)
def test_function_mistake_is_named(cls, pattern, seed):
    with pytest.raises(cu.CheckFailure, match=pattern):
        cu.check("lltm_function", cls, seed=seed)


def test_function_instance_or_plain_class_is_named():
    with (
        pytest.warns(DeprecationWarning),
        pytest.raises(cu.CheckFailure, match="drop the parentheses"),
    ):
        cu.check("lltm_function", LLTMSavesInputs())
    with pytest.raises(cu.CheckFailure, match="subclass of torch.autograd.Function"):
        cu.check("lltm_function", forward_torch)


@pytest.mark.references_forbidden
def test_handing_in_the_reference_is_refused():
    with pytest.raises(cu.CheckFailure, match="reference"):
        cu.check("lltm_backward", cu.reference("lltm_backward"))


def test_in_place_change_of_an_input_is_named():
    def fwd_in_place(input, weights, bias, old_h, old_cell):
        h, c = forward_torch(input, weights, bias, old_h, old_cell)
        old_cell.mul_(2)
        return h, c

    with pytest.raises(cu.CheckFailure, match="changed its input `old_cell` in place"):
        cu.check("lltm_forward", fwd_in_place)


# =====================================================================================
# Stubs, contract, determinism
# =====================================================================================
def _stub(*args, **kwargs):
    raise NotImplementedError("lltm_forward: replace this line")


@pytest.mark.parametrize("exercise_id", ["lltm_forward", "lltm_backward"])
def test_stub_is_pending_in_learn_mode_and_fails_in_strict_mode(exercise_id, monkeypatch, capsys):
    monkeypatch.delenv("COURSE_STRICT", raising=False)
    assert cu.check(exercise_id, _stub).status == "pending"
    assert "not implemented yet" in capsys.readouterr().out
    with pytest.raises(cu.CheckFailure, match="not implemented yet"):
        cu.check(exercise_id, _stub, strict=True)


def test_chapter_lists_its_exercises_with_the_contract_signatures():
    found = {e.id: e for e in cu.exercises("12")}
    assert set(found) == {"lltm_forward", "lltm_backward", "lltm_function"}
    contract = ROOT.parent / "shared" / "EXERCISES.md"
    if contract.exists():
        text = contract.read_text(encoding="utf-8")
        for name in ("lltm_forward", "lltm_backward"):
            row = re.search(rf"^\| `{name}` \| `([^`]*)`", text, re.M)
            assert row and row.group(1) == found[name].signature
    assert found["lltm_backward"].backward


@pytest.mark.parametrize(
    ("exercise_id", "fn"), [CORRECT[0], CORRECT[4], CORRECT[7]], ids=lambda x: str(x)[:20]
)
def test_checks_are_deterministic(exercise_id, fn):
    a = cu.check(exercise_id, fn, seed=3)
    b = cu.check(exercise_id, fn, seed=3)
    assert [(r.case, r.quantity, r.max_abs) for r in a.rows] == [
        (r.case, r.quantity, r.max_abs) for r in b.rows
    ]


# =====================================================================================
# The C++ extension: bad input, skipping, the cache
# =====================================================================================
class _NoModule:
    """Stands in for a built module: the wrapper must refuse bad input before calling it."""

    def forward(self, *args):
        raise AssertionError("the wrapper passed bad input on to C++")

    backward = forward


def _args(dtype=torch.float32, b=4, i=3, s=2):
    gen = torch.Generator().manual_seed(0)
    shapes = ((b, i), (3 * s, i + s), (3 * s,), (b, s), (b, s))
    return [torch.randn(*sh, generator=gen, dtype=dtype) for sh in shapes]


BAD_FORWARD = [
    (
        "a list for input",
        lambda a: [a[0].tolist(), *a[1:]],
        TypeError,
        r"`input` should be a tensor, not list",
    ),
    (
        "float16",
        lambda a: [x.half() for x in a],
        ValueError,
        r"`input` has dtype float16; .* float32 and float64 only",
    ),
    ("int64 bias", lambda a: [*a[:2], a[2].long(), *a[3:]], ValueError, r"`bias` has dtype int64"),
    (
        "mixed dtypes",
        lambda a: [a[0], a[1].double(), *a[2:]],
        ValueError,
        r"`weights` has dtype float64 but `input` has float32",
    ),
    (
        "non-contiguous old_cell",
        lambda a: [*a[:4], a[4].T.contiguous().T],
        ValueError,
        r"`old_cell` is not contiguous.*\.contiguous\(\)",
    ),
    (
        "weights too narrow",
        lambda a: [a[0], a[1][:, 1:], *a[2:]],
        ValueError,
        r"`weights` has shape \(6, 4\); .* should be \(6, 5\)",
    ),
    ("1-D input", lambda a: [a[0][0], *a[1:]], ValueError, r"should be 2-D"),
    (
        "old_h of another batch",
        lambda a: [*a[:3], a[3][:2], a[4]],
        ValueError,
        r"`old_h` has shape \(2, 2\)",
    ),
]


@pytest.mark.parametrize(
    ("label", "make", "error", "pattern"), BAD_FORWARD, ids=[b[0] for b in BAD_FORWARD]
)
def test_wrapper_refuses_bad_input_in_one_line(label, make, error, pattern):
    ext = ch12.LLTMExtension(_NoModule(), Path("."))
    with pytest.raises(error, match=pattern) as info:
        ext.forward(*make(_args()))
    assert "\n" not in str(info.value)


def test_wrapper_refuses_non_contiguous_grad_in_backward():
    ext = ch12.LLTMExtension(_NoModule(), Path("."))
    a = _args()
    grad_h = torch.randn(2, 4).T  # (4, 2), not contiguous
    with pytest.raises(ValueError, match=r"`grad_h` is not contiguous") as info:
        ext.backward(grad_h, torch.zeros(4, 2), *a)
    assert "\n" not in str(info.value)


def test_contiguous_input_and_weights_are_not_required():
    """Only the arrays the C++ loop reads by pointer must be contiguous; ATen handles the rest."""
    calls = []

    class Module:
        def forward(self, *args):
            calls.append(args)
            return (args[3], args[4])

    a = _args()
    ext = ch12.LLTMExtension(Module(), Path("."))
    ext.forward(a[0].T.contiguous().T, a[1].T.contiguous().T, *a[2:])
    assert calls


def test_build_skips_with_a_reason_without_a_compiler(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    assert "no C++ compiler" in ch12.compiler_missing()
    assert ch12.build_lltm_extension(ch12.LLTM_CPP_KERNELS) is None
    assert "C++ cell skipped: no C++ compiler (c++) on PATH" in capsys.readouterr().out


def test_build_skips_with_a_reason_without_ninja(tmp_path, monkeypatch, capsys):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler here to keep on PATH")
    (tmp_path / "c++").symlink_to(cxx)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    assert "ninja is not installed" in ch12.compiler_missing()
    assert ch12.build_lltm_extension(ch12.LLTM_CPP_KERNELS) is None
    assert "C++ cell skipped: ninja" in capsys.readouterr().out


def test_a_compile_error_comes_back_as_the_compilers_error_lines(tmp_path, monkeypatch):
    """No compiler is needed: load_inline is replaced by one that fails as a compile error does."""
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(ch12, "EXT_CACHE", tmp_path)
    monkeypatch.setattr(ch12, "compiler_missing", lambda: "")

    def fails(*args, **kwargs):
        raise RuntimeError(
            "Error building extension 'lltm_x': [1/2] c++ ...\n"
            "main.cpp:12:5: error: 'sigmoidd' was not declared in this scope\n"
            "main.cpp:12:5: error: 'sigmoidd' was not declared in this scope\n"
            "ninja: build stopped: subcommand failed."
        )

    monkeypatch.setattr(cpp, "load_inline", fails)
    with pytest.raises(
        RuntimeError, match=r"did not compile .*:\n.*'sigmoidd' was not declared"
    ) as info:
        ch12.build_lltm_extension("this is not C++")
    assert str(info.value).count("sigmoidd") == 1, "the line compiled for float and double twice"


def test_the_cache_folder_is_keyed_by_the_source():
    a = ch12.extension_dir(ch12.lltm_cpp_source(ch12.LLTM_CPP_KERNELS))
    b = ch12.extension_dir(ch12.lltm_cpp_source(ch12.LLTM_CPP_KERNELS + "\n// edited\n"))
    assert a != b and a.parent == b.parent == ch12.EXT_CACHE
    assert a == ch12.extension_dir(ch12.lltm_cpp_source(ch12.LLTM_CPP_KERNELS))


def test_the_solution_notebook_builds_the_same_source_as_the_tests():
    """So the notebook (solutions and course) and these tests share one build per machine."""
    nb = nbformat.read(ROOT / "solutions" / "12_custom_ops.ipynb", as_version=4)
    (cell,) = [c.source for c in nb.cells if c.source.startswith("def lltm_cpp_kernels(")]
    namespace: dict = {}
    exec(cell, namespace)  # noqa: S102 - the course's own notebook cell
    kernels = namespace["lltm_cpp_kernels"]()
    assert ch12.lltm_cpp_source(kernels) == ch12.lltm_cpp_source(ch12.LLTM_CPP_KERNELS)


@pytest.fixture(scope="module")
def built():
    """The extension, built at most once per machine (the notebook's build is reused)."""
    return ch12.build_lltm_extension(ch12.LLTM_CPP_KERNELS)


@NEEDS_COMPILER
def test_cpp_equals_the_reference(built):
    gen = torch.Generator().manual_seed(5)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        for b, i, s in ((4, 6, 3), (1, 5, 2), (7, 3, 9)):
            args = [
                torch.randn(*sh, generator=gen, dtype=torch.float64).to(dtype)
                for sh in ((b, i), (3 * s, i + s), (3 * s,), (b, s), (b, s))
            ]
            args[1] = args[1] * 0.5
            grads = [torch.randn(b, s, generator=gen, dtype=dtype) for _ in range(2)]
            for got, want in zip(built.forward(*args), ch12.ref_lltm_forward(*args), strict=True):
                torch.testing.assert_close(got, want, rtol=tol, atol=tol)
            for got, want in zip(
                built.backward(*grads, *args), ch12.ref_lltm_backward(*grads, *args), strict=True
            ):
                torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@NEEDS_COMPILER
def test_a_second_build_loads_the_cache_without_compiling(built):
    (library,) = built.folder.glob("*.so")
    stamp = library.stat().st_mtime_ns
    start = time.perf_counter()
    again = ch12.build_lltm_extension(ch12.LLTM_CPP_KERNELS)
    seconds = time.perf_counter() - start
    assert again is not None and again.folder == built.folder
    assert library.stat().st_mtime_ns == stamp, "the extension was compiled again"
    # A compile takes tens of seconds; loading from the cache, a fraction of one.
    assert seconds < 10, f"loading the cached build took {seconds:.1f} s"


@NEEDS_COMPILER
def test_cpp_checks_reach_cpp_only_with_good_input(built):
    a = _args()
    with pytest.raises(ValueError, match="not contiguous"):
        built.forward(*a[:4], a[4].T.contiguous().T)
    h, c = built.forward(*a)
    assert h.shape == c.shape == (4, 2)
