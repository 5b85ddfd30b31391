"""Check batteries of chapter 00: numerical gradients, vector-Jacobian products, a custom Function."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..checking import CheckFailure, Tester, exercise
from ..gradcheck import gradcheck_function, numerical_gradient

CHAPTER = "00_gradient_checking"
Tensor = torch.Tensor


# ---- reference implementations ---------------------------------------------------------
def ref_numerical_gradient(f: Callable[[Tensor], Tensor], x: Tensor, h: float = 1e-6) -> Tensor:
    """Central differences of a scalar function ``f`` at ``x``; same shape and dtype as ``x``."""
    (g,) = numerical_gradient(f, [x], eps=h)
    return g.to(x.dtype)


def ref_numerical_vjp(f: Callable[[Tensor], Tensor], x: Tensor, dout: Tensor, h: float = 1e-6) -> Tensor:
    """Central differences of ``sum(f(x) * dout)`` at ``x``."""
    (g,) = numerical_gradient(f, [x], dout, eps=h)
    return g.to(x.dtype)


class RefSiLUFunction(torch.autograd.Function):
    """SiLU y = x * sigmoid(x) with a hand-written backward."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> Tensor:  # noqa: D102
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad_out * (s + x * s * (1 - s))


# ---- test functions with known gradients -------------------------------------------------
def _test_functions(t: Tester) -> list[tuple[str, Callable[[Tensor], Tensor], Tensor]]:
    w = t.randn(4, 3)
    return [
        ("f(x) = sum(sin(x) * x**2), x (5,)", lambda x: (torch.sin(x) * x**2).sum(), t.randn(5)),
        ("f(x) = logsumexp(x), x (3, 4)", lambda x: torch.logsumexp(x.reshape(-1), 0), t.randn(3, 4)),
        ("f(x) = sum((W @ x)**3), x (3, 2)", lambda x: ((w @ x) ** 3).sum(), t.randn(3, 2)),
    ]


def _autograd_grad(f: Callable[[Tensor], Tensor], x: Tensor, dout: Tensor | None = None) -> Tensor:
    xr = x.detach().clone().requires_grad_(True)
    y = f(xr)
    (g,) = torch.autograd.grad(y, xr, torch.ones_like(y) if dout is None else dout)
    return g


def _forward_difference(f: Callable[[Tensor], Tensor], x: Tensor, h: float, dout: Tensor | None = None) -> Tensor:
    x = x.detach().clone()
    base = float((f(x) * (1 if dout is None else dout)).sum())
    g = torch.zeros_like(x)
    for i in range(x.numel()):
        old = float(x.view(-1)[i])
        x.view(-1)[i] = old + h
        g.view(-1)[i] = (float((f(x) * (1 if dout is None else dout)).sum()) - base) / h
        x.view(-1)[i] = old
    return g


def _all_at_once(f: Callable[[Tensor], Tensor], x: Tensor, h: float) -> Tensor:
    d = (f(x + h) - f(x - h)).sum() / (2 * h)
    return torch.full_like(x, float(d))


def _no_restore(f: Callable[[Tensor], Tensor], x: Tensor, h: float) -> Tensor:
    x = x.detach().clone()
    g = torch.zeros_like(x)
    for i in range(x.numel()):
        x.view(-1)[i] += h
        plus = float(f(x))
        x.view(-1)[i] -= 2 * h
        g.view(-1)[i] = (plus - float(f(x))) / (2 * h)
    return g


@exercise(
    "numerical_gradient",
    chapter=CHAPTER,
    signature="(f, x, h=1e-6) -> Tensor",
    summary="central-difference gradient of a scalar function f at x, same shape and dtype as x",
    reference=ref_numerical_gradient,
)
def check_numerical_gradient(t: Tester) -> None:
    """Central differences agree with autograd; forward differences and a missing restore are caught."""
    for name, f, x in _test_functions(t):
        for h, rtol in ((1e-6, 1e-6), (1e-3, 2e-5)):
            case = f"{name}, h={h:g}"
            got = t.call(case, f, x, h)
            t.compare(
                case,
                "gradient",
                got,
                _autograd_grad(f, x),
                rtol=rtol,
                atol=rtol * 1e-2,
                mistakes=[
                    ("you used a forward difference (f(x+h) - f(x)) / h, whose error shrinks only "
                     "like h; the central difference (f(x+h) - f(x-h)) / (2h) shrinks like h**2.",
                     lambda f=f, x=x, h=h: _forward_difference(f, x, h)),
                    ("you divided by h instead of 2h.", lambda f=f, x=x, h=h: 2 * ref_numerical_gradient(f, x, h)),
                    ("you perturbed every entry at once; perturb one entry at a time.",
                     lambda f=f, x=x, h=h: _all_at_once(f, x, h)),
                    ("an entry was not put back to its old value before the next one was perturbed.",
                     lambda f=f, x=x, h=h: _no_restore(f, x, h)),
                ],
            )
    x32 = t.randn(6, dtype=torch.float32)
    f32 = lambda x: (x.double() ** 2).sum()  # noqa: E731 - a one-line test function
    got = t.call("float32 x, f(x) = sum(x**2), h=1e-3", f32, x32, 1e-3)
    t.compare("float32 x, f(x) = sum(x**2), h=1e-3", "gradient", got, 2 * x32, rtol=1e-3, atol=1e-4)


@exercise(
    "numerical_vjp",
    chapter=CHAPTER,
    signature="(f, x, dout, h=1e-6) -> Tensor",
    summary="central-difference gradient of sum(f(x) * dout) w.r.t. x: the vector-Jacobian product",
    reference=ref_numerical_vjp,
)
def check_numerical_vjp(t: Tester) -> None:
    """The vector-Jacobian product for non-elementwise functions, several output shapes."""
    w = t.randn(3, 4)
    funcs = [
        ("f(x) = softmax(x, dim=-1), x (2, 4)", lambda x: torch.softmax(x, -1), t.randn(2, 4), (2, 4)),
        ("f(x) = tanh(W @ x), x (4, 3)", lambda x: torch.tanh(w @ x), t.randn(4, 3), (3, 3)),
        ("f(x) = cumsum(x**2), x (5,)", lambda x: torch.cumsum(x**2, 0), t.randn(5), (5,)),
    ]
    for name, f, x, out_shape in funcs:
        dout = t.randn(*out_shape)
        got = t.call(name, f, x, dout)
        t.compare(
            name,
            "vjp",
            got,
            _autograd_grad(f, x, dout),
            rtol=1e-6,
            atol=1e-8,
            mistakes=[
                ("dout was ignored: the result is the gradient of sum(f(x)), not of sum(f(x) * dout).",
                 lambda f=f, x=x: ref_numerical_gradient(lambda z: f(z).sum(), x)),
                ("you multiplied dout by the gradient elementwise, which only holds for elementwise f; "
                 "differentiate sum(f(x) * dout) instead.",
                 lambda f=f, x=x, dout=dout: ref_numerical_gradient(lambda z: f(z).sum(), x) * dout
                 if dout.shape == x.shape else None),
            ],
        )


@exercise(
    "silu_function",
    chapter=CHAPTER,
    signature="class SiLUFunction(torch.autograd.Function): forward(ctx, x), backward(ctx, grad_output)",
    summary="SiLU x * sigmoid(x) as a custom autograd Function with a hand-derived backward",
    reference=RefSiLUFunction,
)
def check_silu_function(t: Tester) -> None:
    """Forward equals F.silu, backward equals its derivative times grad_output, gradcheck passes."""
    cls = t.fn
    if not (isinstance(cls, type) and issubclass(cls, torch.autograd.Function)):
        raise CheckFailure("pass the class itself (a subclass of torch.autograd.Function), not an instance or a function.")

    def apply(x: Tensor) -> Tensor:
        return cls.apply(x)

    def backward_of(x: Tensor, dout: Tensor) -> Tensor:
        xr = x.detach().clone().requires_grad_(True)
        y = cls.apply(xr)
        if not torch.is_tensor(y) or y.grad_fn is None:
            raise CheckFailure("the output of apply() carries no gradient; return a tensor computed from x in forward.")
        (g,) = torch.autograd.grad(y, xr, dout)
        return g

    for dtype in (torch.float64, torch.float32):
        x = t.randn(3, 5, dtype=dtype, scale=3.0)
        name = f"x (3, 5) {str(dtype)[6:]}"
        y = t.call(name, x, fn=apply)
        t.compare(name, "forward", y, F.silu(x))
        dout = t.randn(3, 5, dtype=dtype)
        g = t.call(name, x, dout, fn=backward_of)
        s = torch.sigmoid(x)
        t.compare(
            name,
            "grad x",
            g,
            dout * (s + x * s * (1 - s)),
            mistakes=[
                ("the backward returns sigmoid(x) * grad_output: the product rule also gives x * s * (1 - s).",
                 dout * s),
                ("the backward returns x * s * (1 - s) * grad_output: the product rule also gives sigmoid(x).",
                 dout * x * s * (1 - s)),
                ("the backward ignores grad_output: multiply the local derivative by it (chain rule).",
                 s + x * s * (1 - s)),
            ],
        )
    x = t.randn(4, 3)
    try:
        gradcheck_function(cls, x)
    except AssertionError as err:
        raise CheckFailure(f"in case torch.autograd.gradcheck on x (4, 3), {err}") from None
    t.ok("torch.autograd.gradcheck, x (4, 3)", "grad x")
