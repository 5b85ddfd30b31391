"""Check batteries of chapter 12: the LLTM cell forward and backward, as Python and as a Function;
and the chapter's C++ extension (its source, a cached just-in-time build, a checked wrapper)."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..checking import CheckFailure, Tester, exercise
from ..gradcheck import gradcheck_function, numerical_gradient

CHAPTER = "12_custom_ops"
Tensor = torch.Tensor
GATES = ("input gate", "output gate", "candidate")
OUTPUTS = ("new_h", "new_cell")
GRADS = ("d_input", "d_weights", "d_bias", "d_old_h", "d_old_cell")


# ---- reference implementations ---------------------------------------------------------
def ref_lltm_forward(
    input: Tensor, weights: Tensor, bias: Tensor, old_h: Tensor, old_cell: Tensor
) -> tuple[Tensor, Tensor]:
    """The LLTM cell: (input (B,I), weights (3S,I+S), bias (3S,), old_h (B,S), old_cell (B,S)) -> (new_h, new_cell)."""
    return _lltm(input, weights, bias, old_h, old_cell)


def ref_lltm_backward(
    grad_h: Tensor,
    grad_cell: Tensor,
    input: Tensor,
    weights: Tensor,
    bias: Tensor,
    old_h: Tensor,
    old_cell: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients through the LLTM cell: (d_input, d_weights, d_bias, d_old_h, d_old_cell)."""
    return _lltm_backward(grad_h, grad_cell, input, weights, bias, old_h, old_cell)


class RefLLTMFunction(torch.autograd.Function):
    """The LLTM cell as an autograd Function: forward saves its inputs, backward recomputes."""

    @staticmethod
    def forward(
        ctx: Any, input: Tensor, weights: Tensor, bias: Tensor, old_h: Tensor, old_cell: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(new_h, new_cell); saves the five inputs."""
        ctx.save_for_backward(input, weights, bias, old_h, old_cell)
        return _lltm(input, weights, bias, old_h, old_cell)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_h: Tensor, grad_cell: Tensor) -> tuple[Tensor | None, ...]:
        """One gradient per input, None where ctx.needs_input_grad says none is wanted."""
        grads = _lltm_backward(grad_h, grad_cell, *ctx.saved_tensors)
        return tuple(
            g if need else None for g, need in zip(grads, ctx.needs_input_grad, strict=True)
        )


@dataclass(frozen=True)
class Variant:
    """How a (possibly mistaken) LLTM computes; the defaults are the contract's cell.

    The other values build the mistakes the batteries name.
    """

    order: str = "hx"
    """"hx": X = [old_h, input], the contract's; "xh": the swapped concatenation."""
    perm: tuple[int, ...] = (0, 1, 2)
    """perm[r] is the chunk used for role r (input gate, output gate, candidate)."""
    act: str = "elu"
    """The candidate's activation: "elu", "tanh" or "sigmoid"."""
    transposed: bool = False
    """gates = X @ W + b (runs only when W is square)."""
    cell_path: bool = True
    """Backward: grad_cell is added into d_new_cell."""
    tanh_prime: bool = True
    """Backward: grad_h reaches new_cell through (1 - tanh^2)."""
    elu_negative: str = "exp"
    """Backward: ELU'(z) for z <= 0: "exp" (right), "zero", "one" or "value" (ELU(z) itself)."""
    bias_reduce: str = "sum"
    """Backward: d_bias as the "sum" (right) or the "mean" over the batch."""


CELL = Variant()


def _gates(
    input: Tensor, weights: Tensor, bias: Tensor, old_h: Tensor, v: Variant
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """X (B, S+I) and the pre-activations (a_i, a_o, a_z), each (B, S), of variant ``v``."""
    X = torch.cat([old_h, input] if v.order == "hx" else [input, old_h], 1)  # (B, S + I)
    gates = (X @ weights if v.transposed else X @ weights.T) + bias  # (B, 3S)
    chunks = gates.chunk(3, 1)
    return X, chunks[v.perm[0]], chunks[v.perm[1]], chunks[v.perm[2]]


def _lltm(
    input: Tensor, weights: Tensor, bias: Tensor, old_h: Tensor, old_cell: Tensor, v: Variant = CELL
) -> tuple[Tensor, Tensor]:
    _, a_i, a_o, z = _gates(input, weights, bias, old_h, v)
    cand = {"elu": F.elu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[v.act](z)
    new_cell = old_cell + cand * torch.sigmoid(a_i)
    return torch.tanh(new_cell) * torch.sigmoid(a_o), new_cell


def _lltm_backward(
    grad_h: Tensor,
    grad_cell: Tensor,
    input: Tensor,
    weights: Tensor,
    bias: Tensor,
    old_h: Tensor,
    old_cell: Tensor,
    v: Variant = CELL,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    X, a_i, a_o, z = _gates(input, weights, bias, old_h, v)
    i, o = torch.sigmoid(a_i), torch.sigmoid(a_o)
    cand = F.elu(z) if v.act == "elu" else torch.tanh(z)
    tc = torch.tanh(old_cell + cand * i)  # tanh(new_cell)
    d_o = grad_h * tc
    d_cell = grad_h * o * ((1 - tc * tc) if v.tanh_prime else 1)  # (B, S)
    if v.cell_path:
        d_cell = d_cell + grad_cell
    if v.act == "elu":
        negative = {
            "exp": torch.exp(z),
            "zero": torch.zeros_like(z),
            "one": torch.ones_like(z),
            "value": torch.expm1(z),
        }[v.elu_negative]
        dz = torch.where(z > 0, torch.ones_like(z), negative)
    else:
        dz = 1 - cand * cand
    by_role = (d_cell * cand * i * (1 - i), d_o * o * (1 - o), d_cell * i * dz)
    pieces = [by_role[v.perm.index(k)] for k in range(3)]
    d_gates = torch.cat(pieces, 1)  # (B, 3S)
    if v.transposed:
        d_weights, d_X = X.T @ d_gates, d_gates @ weights.T
    else:
        d_weights, d_X = d_gates.T @ X, d_gates @ weights  # (3S, S + I), (B, S + I)
    d_bias = d_gates.sum(0) if v.bias_reduce == "sum" else d_gates.mean(0)
    first = old_h.shape[1] if v.order == "hx" else input.shape[1]
    head, tail = d_X[:, :first], d_X[:, first:]
    d_input, d_old_h = (tail, head) if v.order == "hx" else (head, tail)
    return d_input, d_weights, d_bias, d_old_h, d_cell


def _roles(perm: tuple[int, ...]) -> str:
    by_chunk = [GATES[perm.index(k)] for k in range(3)]
    return ", ".join(by_chunk)


def _mistakes(forward: bool, square: bool) -> list[tuple[str, dict[str, Any]]]:
    """(sentence, keyword options of _lltm/_lltm_backward) for every mistake the chapter names."""
    out: list[tuple[str, dict[str, Any]]] = [
        (
            "X was concatenated as [input, old_h]; the LLTM's X is [old_h, input], in that order "
            "(weights[:, :S] multiplies old_h).",
            {"order": "xh"},
        ),
        (
            "tanh was used for the candidate; the candidate is ELU (alpha = 1) of the third chunk.",
            {"act": "tanh"},
        ),
    ]
    if forward:
        out.append(
            (
                "sigmoid was used for the candidate; the candidate is ELU (alpha = 1) of the third chunk.",
                {"act": "sigmoid"},
            )
        )
    for perm in permutations(range(3)):
        if perm != (0, 1, 2):
            out.append(
                (
                    f"the gate chunks are in the wrong order: yours read the three chunks of the "
                    f"gates as ({_roles(perm)}); they are (input gate, output gate, candidate), "
                    "split along dim 1.",
                    {"perm": perm},
                )
            )
    if square:
        out.append(
            (
                "the weights were used transposed: gates = X @ W + b; the contract's W is (3S, I+S), "
                "so gates = X @ W^T + b.",
                {"transposed": True},
            )
        )
    if not forward:
        out += [
            (
                "the grad_cell path was forgotten: d_new_cell = grad_h * o * (1 - tanh(new_cell)^2) "
                "+ grad_cell, and d_old_cell = d_new_cell.",
                {"cell_path": False},
            ),
            (
                "tanh' was forgotten: the gradient from grad_h into new_cell is "
                "grad_h * o * (1 - tanh(new_cell)^2), not grad_h * o.",
                {"tanh_prime": False},
            ),
            (
                "the ELU derivative is wrong for negative inputs (taken as 0, as ReLU's); for z <= 0 "
                "ELU'(z) = exp(z).",
                {"elu_negative": "zero"},
            ),
            (
                "the ELU derivative is wrong for negative inputs (taken as 1); for z <= 0 ELU'(z) = exp(z).",
                {"elu_negative": "one"},
            ),
            (
                "the ELU derivative is wrong for negative inputs (taken as ELU(z) = exp(z) - 1); for "
                "z <= 0 ELU'(z) = exp(z) = ELU(z) + 1.",
                {"elu_negative": "value"},
            ),
            (
                "d_bias was averaged over the batch; the bias is added to every row, so d_bias is "
                "d_gates summed over the batch.",
                {"bias_reduce": "mean"},
            ),
        ]
    return out


def _models(
    args: tuple[Tensor, ...], k: int, forward: bool, square: bool
) -> list[tuple[str, Callable[[], Tensor]]]:
    """The mistakes as lazily computed values of output ``k`` (float64)."""
    xs = tuple(a.double() for a in args)
    fn = _lltm if forward else _lltm_backward
    return [
        (sentence, lambda kw=kw: fn(*xs, Variant(**kw))[k])
        for sentence, kw in _mistakes(forward, square)
    ]


# ---- inputs --------------------------------------------------------------------------------
def _inputs(t: Tester, b: int, i: int, s: int, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """(input, weights, bias, old_h, old_cell): gates of order one, so every branch is exercised."""
    scale = 1.5 / (i + s) ** 0.5
    return (
        t.randn(b, i, dtype=dtype),
        t.randn(3 * s, i + s, dtype=dtype, scale=scale),
        t.randn(3 * s, dtype=dtype, scale=0.5),
        t.randn(b, s, dtype=dtype),
        t.randn(b, s, dtype=dtype),
    )


#: (B, I, S, dtype). The first has I = 2S, so W is square and X @ W runs: a transposed W is
#: then a wrong value that can be named, not a shape error.
SETTINGS = (
    (4, 6, 3, torch.float64),
    (3, 5, 4, torch.float64),
    (1, 2, 3, torch.float64),
    (6, 3, 2, torch.float32),
    (2, 4, 2, torch.float32),
)


def _case(b: int, i: int, s: int, dtype: torch.dtype) -> str:
    return f"B={b}, I={i}, S={s}, {str(dtype)[6:]}"


def _expected_forward(args: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        h, c = _lltm(*(a.double() for a in args))
    return h.to(args[0].dtype), c.to(args[0].dtype)


def _autograd_backward(
    grads: tuple[Tensor, Tensor], args: tuple[Tensor, ...]
) -> tuple[Tensor, ...]:
    """Autograd of the reference forward, in float64, cast to the inputs' dtype."""
    xs = [a.detach().double().requires_grad_(True) for a in args]
    with torch.enable_grad():
        h, c = _lltm(*xs)
        out = torch.autograd.grad((h * grads[0].double()).sum() + (c * grads[1].double()).sum(), xs)
    return tuple(g.to(args[0].dtype) for g in out)


# ---- the forward pass ----------------------------------------------------------------------
@exercise(
    "lltm_forward",
    chapter=CHAPTER,
    signature="(input (B,I), weights (3S, I+S), bias (3S,), old_h (B,S), old_cell (B,S)) -> (new_h, new_cell)",
    summary="the LLTM cell: X = [old_h, input], gates = X W^T + b split into input gate, output "
    "gate (sigmoid) and candidate (ELU); new_cell = old_cell + candidate*input_gate, "
    "new_h = tanh(new_cell)*output_gate",
    reference=ref_lltm_forward,
)
def check_lltm_forward(t: Tester) -> None:
    """Several (B, I, S) in float64 and float32 against the formula; named mistakes."""
    for b, i, s, dtype in SETTINGS:
        case = _case(b, i, s, dtype)
        args = _inputs(t, b, i, s, dtype)
        got = t.unpack(case, t.call(case, *args), OUTPUTS)
        want = _expected_forward(args)
        for k, name in enumerate(OUTPUTS):
            t.compare(case, name, got[k], want[k], mistakes=_forward_mistakes(args, k, i == 2 * s))


def _forward_mistakes(
    args: tuple[Tensor, ...], k: int, square: bool
) -> list[tuple[str, Callable[[], Tensor]]]:
    swapped = (
        "new_h and new_cell were returned in the wrong order; return (new_h, new_cell).",
        lambda: _lltm(*(a.double() for a in args))[1 - k],
    )
    extra = []
    if k == 0:
        extra.append(
            (
                "the output gate was left out: new_h = tanh(new_cell) * output_gate.",
                lambda: torch.tanh(_lltm(*(a.double() for a in args))[1]),
            )
        )
    return [swapped, *_models(args, k, True, square), *extra]


# ---- the backward pass ---------------------------------------------------------------------
@exercise(
    "lltm_backward",
    chapter=CHAPTER,
    signature="(grad_h, grad_cell, input, weights, bias, old_h, old_cell) -> (d_input, d_weights, d_bias, d_old_h, d_old_cell)",
    summary="gradients through lltm_forward given the upstream grad_h and grad_cell, derived by hand "
    "(autograd disabled)",
    reference=ref_lltm_backward,
    backward=True,
)
def check_lltm_backward(t: Tester) -> None:
    """Against autograd of the reference and central differences of the forward; named mistakes."""
    for b, i, s, dtype in SETTINGS:
        case = _case(b, i, s, dtype)
        args = _inputs(t, b, i, s, dtype)
        grads = (t.randn(b, s, dtype=dtype), t.randn(b, s, dtype=dtype))
        got = t.unpack(case, t.call(case, *grads, *args), GRADS)
        want = _autograd_backward(grads, args)
        _judge_backward(t, case, got, want, grads, args, i == 2 * s)
    # Central differences of the forward on a small float64 case.
    case = "B=2, I=3, S=2, float64, against central differences of the forward"
    args = _inputs(t, 2, 3, 2, torch.float64)
    grads = (t.randn(2, 2), t.randn(2, 2))
    numeric = numerical_gradient(
        lambda *a: torch.cat(_lltm(*a), 1), list(args), torch.cat(grads, 1)
    )
    got = t.unpack(case, t.call(case, *grads, *args), GRADS)
    numeric_by_name = dict(
        zip(("d_input", "d_weights", "d_bias", "d_old_h", "d_old_cell"), numeric, strict=True)
    )
    for name, value in zip(GRADS, got, strict=True):
        t.compare(case, name, value, numeric_by_name[name], rtol=1e-5, atol=1e-8)


def _judge_backward(
    t: Tester,
    case: str,
    got: tuple[Any, ...],
    want: tuple[Tensor, ...],
    grads: tuple[Tensor, Tensor],
    args: tuple[Tensor, ...],
    square: bool,
) -> None:
    b, s3 = args[0].shape[0], args[2].shape[0]
    d_bias = got[2]
    shape = tuple(d_bias.shape) if torch.is_tensor(d_bias) else None
    if shape == (b, s3) and b > 1:
        t.fail(
            case,
            f"`d_bias` has shape {shape}: it was not summed over the batch. The bias is added to "
            f"every row, so d_bias = d_gates.sum(0), of shape ({s3},).",
        )
    if shape == (1, s3):
        t.fail(
            case,
            f"`d_bias` has shape (1, {s3}); it should have shape ({s3},): sum d_gates over the "
            "batch dim (dim 0) without keepdim.",
        )
    # d_old_cell first: the grad_cell path shows there most plainly.
    for k in (4, 0, 3, 1, 2):
        t.compare(
            case, GRADS[k], got[k], want[k], mistakes=_models((*grads, *args), k, False, square)
        )


# ---- the autograd Function -----------------------------------------------------------------
@exercise(
    "lltm_function",
    chapter=CHAPTER,
    signature="class LLTMFunction(torch.autograd.Function): forward(ctx, input, weights, bias, old_h, old_cell) -> (new_h, new_cell), backward(ctx, grad_h, grad_cell)",
    summary="the LLTM cell as a custom autograd Function (save_for_backward, needs_input_grad, "
    "once_differentiable), passing torch.autograd.gradcheck",
    reference=RefLLTMFunction,
)
def check_lltm_function(t: Tester) -> None:
    """Forward and gradients against the reference, gradcheck on the class's own forward."""
    cls = t.function_class('cu.check("lltm_function", LLTMFunction)')

    def run(
        args: tuple[Tensor, ...], grads: tuple[Tensor, Tensor], need: tuple[bool, ...], case: str
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor | None, ...]]:
        """The class's outputs and input gradients (None where no grad was asked for)."""
        xs = [a.detach().clone().requires_grad_(n) for a, n in zip(args, need, strict=True)]
        out = cls.apply(*xs)
        if not isinstance(out, tuple | list) or len(out) != 2:
            raise CheckFailure(
                f"in case {case}, {cls.__name__}.apply should return (new_h, new_cell), a tuple of two tensors."
            )
        if any(not torch.is_tensor(y) or y.grad_fn is None for y in out):
            raise CheckFailure(
                f"in case {case}, an output of {cls.__name__}.apply carries no gradient; "
                "return tensors computed in forward."
            )
        wrt = [x for x in xs if x.requires_grad]
        gs = torch.autograd.grad(out, wrt, grads, allow_unused=True)
        full, it = [], iter(gs)
        for n in need:
            full.append(next(it) if n else None)
        return tuple(y.detach() for y in out), tuple(full)

    run.__name__ = f"{cls.__name__}"
    everything = (True,) * 5
    for b, i, s, dtype in SETTINGS[:1] + SETTINGS[3:4]:
        case = _case(b, i, s, dtype)
        args = _inputs(t, b, i, s, dtype)
        grads = (t.randn(b, s, dtype=dtype), t.randn(b, s, dtype=dtype))
        out, got = t.call(case, args, grads, everything, case, fn=run)
        want_out = _expected_forward(args)
        for k, name in enumerate(OUTPUTS):
            t.compare(case, name, out[k], want_out[k], mistakes=_models(args, k, True, i == 2 * s))
        want = _autograd_backward(grads, args)
        for k in (4, 0, 3, 1, 2):
            if got[k] is None:
                raise CheckFailure(
                    f"in case {case}, {cls.__name__}.backward returned None for {GRADS[k]}, though that "
                    "input requires grad; return None only where ctx.needs_input_grad is False."
                )
            t.compare(
                case,
                f"grad {('input', 'weights', 'bias', 'old_h', 'old_cell')[k]}",
                got[k],
                want[k],
                mistakes=_models((*grads, *args), k, False, i == 2 * s),
            )
    case = "B=3, I=2, S=2, float64, only input and old_h require grad"
    args = _inputs(t, 3, 2, 2, torch.float64)
    grads = (t.randn(3, 2), t.randn(3, 2))
    need = (True, False, False, True, False)
    _, got = t.call(case, args, grads, need, case, fn=run)
    want = _autograd_backward(grads, args)
    t.compare(case, "grad input", got[0], want[0])
    t.compare(case, "grad old_h", got[3], want[3])
    case = "torch.autograd.gradcheck, B=2, I=3, S=2"
    args = _inputs(t, 2, 3, 2, torch.float64)
    try:
        gradcheck_function(cls, *args)
    except AssertionError as err:
        raise CheckFailure(f"in case {case}, {err}") from None
    t.ok(case, "every input")


# ---- the C++ extension ---------------------------------------------------------------------
#: Where built extensions are kept between runs, one folder per source (its hash in the name).
EXT_CACHE = Path(os.environ.get("COURSE_EXT_CACHE", "~/.cache/course_ext")).expanduser()
#: -ffast-math lets GCC call glibc's vector math (exp, tanh for 4 or 8 numbers at once), so the
#: loops vectorise; -march=native allows the widest vectors of this CPU (hence the CPU in the key).
CXX_FLAGS = ("-O3", "-ffast-math") + (
    ("-march=native",) if platform.machine().lower() in {"x86_64", "amd64"} else ()
)

#: The two pointwise loops of the cell, in C++: the reference for ``lltm_cpp_kernels``.
LLTM_CPP_KERNELS = r"""
template <typename scalar_t>
scalar_t sigmoid(scalar_t a) { return 1 / (1 + std::exp(-a)); }

// gates (B, 3S) row-major, chunks [input | output | candidate]; old_cell, new_h, new_cell (B, S).
// __restrict__ promises the arrays do not overlap, so the compiler may vectorise the loop.
template <typename scalar_t>
void lltm_forward_kernel(const scalar_t* __restrict__ gates, const scalar_t* __restrict__ old_cell,
                         scalar_t* __restrict__ new_h, scalar_t* __restrict__ new_cell, int64_t B,
                         int64_t S) {
  for (int64_t b = 0; b < B; ++b) {
    const scalar_t* g = gates + b * 3 * S;
    for (int64_t s = 0; s < S; ++s) {
      const scalar_t i = sigmoid(g[s]), o = sigmoid(g[S + s]), z = g[2 * S + s];
      const scalar_t cand = z > 0 ? z : std::expm1(z);  // ELU, alpha = 1
      const int64_t k = b * S + s;
      const scalar_t c = old_cell[k] + cand * i;
      new_cell[k] = c;
      new_h[k] = std::tanh(c) * o;
    }
  }
}

// Writes d_gates (B, 3S), the gradient of the pre-activations, and d_old_cell (B, S).
template <typename scalar_t>
void lltm_backward_kernel(const scalar_t* __restrict__ gates,
                          const scalar_t* __restrict__ old_cell,
                          const scalar_t* __restrict__ grad_h,
                          const scalar_t* __restrict__ grad_cell, scalar_t* __restrict__ d_gates,
                          scalar_t* __restrict__ d_old_cell, int64_t B, int64_t S) {
  for (int64_t b = 0; b < B; ++b) {
    const scalar_t* g = gates + b * 3 * S;
    scalar_t* dg = d_gates + b * 3 * S;
    for (int64_t s = 0; s < S; ++s) {
      const scalar_t i = sigmoid(g[s]), o = sigmoid(g[S + s]), z = g[2 * S + s];
      const scalar_t cand = z > 0 ? z : std::expm1(z);
      const int64_t k = b * S + s;
      const scalar_t tc = std::tanh(old_cell[k] + cand * i);
      const scalar_t d_cell = grad_h[k] * o * (1 - tc * tc) + grad_cell[k];
      d_old_cell[k] = d_cell;
      dg[s] = d_cell * cand * i * (1 - i);
      dg[S + s] = grad_h[k] * tc * o * (1 - o);
      dg[2 * S + s] = d_cell * i * (z > 0 ? scalar_t(1) : std::exp(z));
    }
  }
}
"""

#: Everything around the kernels: the matrix products (ATen's), dtype dispatch and the Python binding.
LLTM_CPP_GLUE = r"""
#include <torch/extension.h>
#include <cmath>
#include <vector>

{kernels}

std::vector<torch::Tensor> lltm_forward(torch::Tensor input, torch::Tensor weights,
                                        torch::Tensor bias, torch::Tensor old_h,
                                        torch::Tensor old_cell) {
  TORCH_CHECK(old_cell.is_contiguous(), "old_cell must be contiguous");
  auto X = torch::cat({old_h, input}, 1);           // (B, S + I)
  auto gates = torch::addmm(bias, X, weights.t());  // (B, 3S), a fresh contiguous tensor
  const int64_t B = old_cell.size(0), S = old_cell.size(1);
  auto new_h = torch::empty_like(old_cell), new_cell = torch::empty_like(old_cell);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lltm_forward", [&] {
    lltm_forward_kernel<scalar_t>(gates.data_ptr<scalar_t>(), old_cell.data_ptr<scalar_t>(),
                                  new_h.data_ptr<scalar_t>(), new_cell.data_ptr<scalar_t>(), B, S);
  });
  return {new_h, new_cell};
}

std::vector<torch::Tensor> lltm_backward(torch::Tensor grad_h, torch::Tensor grad_cell,
                                         torch::Tensor input, torch::Tensor weights,
                                         torch::Tensor bias, torch::Tensor old_h,
                                         torch::Tensor old_cell) {
  TORCH_CHECK(old_cell.is_contiguous() && grad_h.is_contiguous() && grad_cell.is_contiguous(),
              "old_cell, grad_h and grad_cell must be contiguous");
  auto X = torch::cat({old_h, input}, 1);
  auto gates = torch::addmm(bias, X, weights.t());
  const int64_t B = old_cell.size(0), S = old_cell.size(1);
  auto d_gates = torch::empty_like(gates), d_old_cell = torch::empty_like(old_cell);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lltm_backward", [&] {
    lltm_backward_kernel<scalar_t>(gates.data_ptr<scalar_t>(), old_cell.data_ptr<scalar_t>(),
                                   grad_h.data_ptr<scalar_t>(), grad_cell.data_ptr<scalar_t>(),
                                   d_gates.data_ptr<scalar_t>(), d_old_cell.data_ptr<scalar_t>(),
                                   B, S);
  });
  auto d_X = d_gates.mm(weights);  // (B, S + I)
  return {d_X.slice(1, S).contiguous(), d_gates.t().mm(X), d_gates.sum(0),
          d_X.slice(1, 0, S).contiguous(), d_old_cell};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &lltm_forward, "LLTM forward: (new_h, new_cell)");
  m.def("backward", &lltm_backward, "LLTM backward: (d_input, d_weights, d_bias, d_old_h, d_old_cell)");
}
"""


def lltm_cpp_source(kernels: str) -> str:
    """The whole C++ file: the glue around ``kernels`` (the two templates of LLTM_CPP_KERNELS)."""
    return LLTM_CPP_GLUE.replace("{kernels}", kernels.strip("\n"))


def compiler_missing() -> str:
    """Why a C++ extension cannot be built here ('' when it can): no compiler, or no ninja."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx}) on PATH"
    if shutil.which("ninja") is None:
        return (
            "ninja is not installed (torch.utils.cpp_extension builds with it: pip install ninja)"
        )
    return ""


def extension_dir(source: str) -> Path:
    """The cache folder of ``source``: keyed by the source, the flags, the torch version and the CPU."""
    parts = [source, *CXX_FLAGS, torch.__version__, platform.machine(), _cpu_model()]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return EXT_CACHE / f"lltm_{key[:16]}"


def _cpu_model() -> str:
    """The CPU's model name where Linux says it (a build for one CPU may not run on another)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor()
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return found.group(1).strip() if found else platform.processor()


def build_lltm_extension(kernels: str, *, verbose: bool = False) -> LLTMExtension | None:
    """Build (or load from the cache) the C++ LLTM around ``kernels``; None, saying why, if it cannot."""
    reason = compiler_missing()
    if reason:
        print(f"C++ cell skipped: {reason}.")
        return None
    from torch.utils.cpp_extension import load_inline

    source = lltm_cpp_source(kernels)
    folder = extension_dir(source)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        module = load_inline(
            folder.name,
            cpp_sources=[source],
            build_directory=str(folder),
            extra_cflags=list(CXX_FLAGS),
            verbose=verbose,
        )
    except RuntimeError as err:
        # Each template is compiled for float and double, so an error can come twice.
        lines = [line for line in str(err).splitlines() if re.search(r"\berror\b", line)]
        errors = list(dict.fromkeys(lines))[:5] or [str(err)]
        raise RuntimeError(
            "The C++ extension did not compile (line numbers are those of "
            "ch12.lltm_cpp_source(kernels), your kernels inside the glue):\n" + "\n".join(errors)
        ) from None
    return LLTMExtension(module, folder)


def _describe_dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class LLTMExtension:
    """The built C++ LLTM, with the argument checks its raw pointers need, as one-line errors."""

    def __init__(self, module: Any, folder: Path) -> None:
        self.module, self.folder = module, folder

    def forward(
        self, input: Tensor, weights: Tensor, bias: Tensor, old_h: Tensor, old_cell: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(new_h, new_cell), from C++."""
        named = {
            "input": input,
            "weights": weights,
            "bias": bias,
            "old_h": old_h,
            "old_cell": old_cell,
        }
        _validate("forward", named, ("old_cell",))
        return tuple(self.module.forward(input, weights, bias, old_h, old_cell))

    def backward(
        self,
        grad_h: Tensor,
        grad_cell: Tensor,
        input: Tensor,
        weights: Tensor,
        bias: Tensor,
        old_h: Tensor,
        old_cell: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(d_input, d_weights, d_bias, d_old_h, d_old_cell), from C++."""
        named = {
            "grad_h": grad_h,
            "grad_cell": grad_cell,
            "input": input,
            "weights": weights,
            "bias": bias,
            "old_h": old_h,
            "old_cell": old_cell,
        }
        _validate("backward", named, ("old_cell", "grad_h", "grad_cell"))
        return tuple(self.module.backward(grad_h, grad_cell, input, weights, bias, old_h, old_cell))


def _validate(which: str, named: dict[str, Any], pointers: tuple[str, ...]) -> None:
    """One-line TypeError/ValueError for anything the C++ code cannot take."""
    where = f"lltm C++ {which}"
    for name, x in named.items():
        if not torch.is_tensor(x):
            raise TypeError(f"{where}: `{name}` should be a tensor, not {type(x).__name__}.")
    dtype = named["input"].dtype
    for name, x in named.items():
        if x.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"{where}: `{name}` has dtype {_describe_dtype(x.dtype)}; the C++ kernels are "
                "compiled for float32 and float64 only."
            )
        if x.dtype != dtype:
            raise ValueError(
                f"{where}: `{name}` has dtype {_describe_dtype(x.dtype)} but `input` has "
                f"{_describe_dtype(dtype)}; pass every tensor in one dtype."
            )
        if x.device.type != "cpu":
            raise ValueError(
                f"{where}: `{name}` is on {x.device}; this extension runs on the CPU only."
            )
    b, i = named["input"].shape if named["input"].dim() == 2 else (-1, -1)
    s = named["old_cell"].shape[1] if named["old_cell"].dim() == 2 else -1
    want = {
        "input": (b, i),
        "weights": (3 * s, i + s),
        "bias": (3 * s,),
        "old_h": (b, s),
        "old_cell": (b, s),
        "grad_h": (b, s),
        "grad_cell": (b, s),
    }
    if min(b, i, s) < 0:
        raise ValueError(f"{where}: `input` and `old_cell` should be 2-D, (B, I) and (B, S).")
    for name, x in named.items():
        if tuple(x.shape) != want[name]:
            raise ValueError(
                f"{where}: `{name}` has shape {tuple(x.shape)}; with input (B, I) = {(b, i)} and "
                f"old_cell (B, S) = {(b, s)} it should be {want[name]}."
            )
    for name in pointers:
        if not named[name].is_contiguous():
            raise ValueError(
                f"{where}: `{name}` is not contiguous; the C++ loop reads it as one flat row-major "
                "block, so pass `.contiguous()`."
            )
