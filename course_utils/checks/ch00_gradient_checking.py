"""Check batteries of chapter 00: numerical gradients, vector-Jacobian products, a custom Function."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..checking import CheckFailure, Tester, exercise
from ..gradcheck import compare, gradcheck_function, numerical_gradient

CHAPTER = "00_gradient_checking"
Tensor = torch.Tensor


# ---- reference implementations ---------------------------------------------------------
def ref_numerical_gradient(f: Callable[[Tensor], Tensor], x: Tensor, h: float = 1e-6) -> Tensor:
    """Central differences of a scalar function ``f`` at ``x``; same shape and dtype as ``x``."""
    (g,) = numerical_gradient(f, [x], eps=h)
    return g.to(x.dtype)


def ref_numerical_vjp(
    f: Callable[[Tensor], Tensor], x: Tensor, dout: Tensor, h: float = 1e-6
) -> Tensor:
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
        (
            "f(x) = logsumexp(x), x (3, 4)",
            lambda x: torch.logsumexp(x.reshape(-1), 0),
            t.randn(3, 4),
        ),
        ("f(x) = sum((W @ x)**3), x (3, 2)", lambda x: ((w @ x) ** 3).sum(), t.randn(3, 2)),
    ]


def _autograd_grad(f: Callable[[Tensor], Tensor], x: Tensor, dout: Tensor | None = None) -> Tensor:
    xr = x.detach().clone().requires_grad_(True)
    y = f(xr)
    # A scalar objective needs no grad_outputs: a tensor there makes torch import sympy
    # (1-3 s) the first time, most of a check's budget.
    (g,) = torch.autograd.grad((y * (1 if dout is None else dout)).sum(), xr)
    return g


def _forward_difference(
    f: Callable[[Tensor], Tensor], x: Tensor, h: float, dout: Tensor | None = None
) -> Tensor:
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


# Each step size is judged against the truth it can reach. At h=1e-6 a central difference must
# match autograd's exact gradient: its truncation error (~h**2) is negligible and its round-off
# (~eps * |F| / h) is covered by an atol that grows with |F|. At h=1e-3 its own truncation error
# (~h**2 * |F'''| / 6, up to ~1e-6) is as large as gradients near zero, so there it must match
# the course's central difference at the same h, which every correct way of computing it
# reproduces up to round-off (~eps * |F| / h ~ 1e-13 |F|), while a forward difference is off by
# ~h * |F''| / 2 and a missing restore by ~h * |F''|.
def _judge(
    t: Tester,
    case: str,
    quantity: str,
    got: object,
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    h: float,
    dout: Tensor | None,
    mistakes: list[tuple[str, Callable[[], Tensor | None]]],
) -> None:
    size = max(1.0, float((f(x) * (1 if dout is None else dout)).abs().sum()))
    if h < 1e-4:
        expected, rtol, atol = _autograd_grad(f, x, dout), 1e-6, 1e-8 * size
    else:
        expected, rtol, atol = numerical_gradient(f, [x], dout, eps=h)[0], 1e-8, 1e-10 * size
    t.compare(
        case,
        quantity,
        got,
        expected.to(x.dtype),
        rtol=rtol,
        atol=atol,
        mistakes=[
            (sentence, _unless_correct(model, expected, rtol, atol)) for sentence, model in mistakes
        ],
    )


def _unless_correct(
    model: Callable[[], Tensor | None], correct: Tensor, rtol: float, atol: float
) -> Callable[[], Tensor | None]:
    """A mistake model that drops out where the mistake happens to give the right answer.

    (Not restoring an entry is harmless for f(x) = sum(g(x_i)), for instance.) A mistake whose
    answer would pass the check cannot explain a failure, so it is never named.
    """

    def model_or_none() -> Tensor | None:
        alt = model()
        if alt is None or compare(alt, correct, rtol, atol).ok:
            return None
        return alt

    return model_or_none


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
        for h in (1e-6, 1e-3):
            case = f"{name}, h={h:g}"
            got = t.call(case, f, x, h)
            if torch.is_tensor(got) and got.numel() == 1 and x.numel() > 1:
                t.fail(
                    case,
                    f"`gradient` should have shape {tuple(x.shape)}, but it is a single number. It looks "
                    "like you perturbed every entry at once, which measures one directional derivative; "
                    "perturb one entry at a time to get one partial derivative per entry.",
                )
            _judge(
                t,
                case,
                "gradient",
                got,
                f,
                x,
                h,
                None,
                [
                    (
                        "you used a forward difference (f(x+h) - f(x)) / h, whose error shrinks only "
                        "like h; the central difference (f(x+h) - f(x-h)) / (2h) shrinks like h**2.",
                        lambda f=f, x=x, h=h: _forward_difference(f, x, h),
                    ),
                    (
                        "you divided by h instead of 2h.",
                        lambda f=f, x=x, h=h: 2 * ref_numerical_gradient(f, x, h),
                    ),
                    (
                        "you perturbed every entry at once; perturb one entry at a time.",
                        lambda f=f, x=x, h=h: _all_at_once(f, x, h),
                    ),
                    (
                        "an entry was not put back to its old value before the next one was perturbed.",
                        lambda f=f, x=x, h=h: _no_restore(f, x, h),
                    ),
                ],
            )
    x32 = t.randn(6, dtype=torch.float32)
    f32 = lambda x: (x.double() ** 2).sum()  # noqa: E731 - a one-line test function
    got = t.call("float32 x, f(x) = sum(x**2), h=1e-3", f32, x32, 1e-3)
    t.compare("float32 x, f(x) = sum(x**2), h=1e-3", "gradient", got, 2 * x32, rtol=1e-3, atol=1e-4)


def _softmax(x: Tensor) -> Tensor:
    """Softmax over the last dim, written out: torch.softmax wakes the thread pool on every call,
    which costs milliseconds per call on a busy 2-core machine and the vjp calls it ~50 times."""
    e = torch.exp(x - x.amax(-1, keepdim=True))  # (..., n)
    return e / e.sum(-1, keepdim=True)


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
    # cumsum comes first: it tells "dout ignored" from "elementwise product" (for softmax both are 0).
    funcs = [
        ("f(x) = cumsum(x**2), x (5,)", lambda x: torch.cumsum(x**2, 0), t.randn(5), (5,)),
        ("f(x) = softmax(x, dim=-1), x (2, 4)", _softmax, t.randn(2, 4), (2, 4)),
        ("f(x) = tanh(W @ x), x (4, 3)", lambda x: torch.tanh(w @ x), t.randn(4, 3), (3, 3)),
    ]
    for name, f, x, out_shape in funcs:
        dout = t.randn(*out_shape)
        for h in (1e-6, 1e-3):
            case = f"{name}, dout {out_shape}, h={h:g}"
            got = t.call(case, f, x, dout, h)
            _judge(
                t,
                case,
                "vjp",
                got,
                f,
                x,
                h,
                dout,
                [
                    (
                        "dout was ignored: the result is the gradient of sum(f(x)), not of sum(f(x) * dout).",
                        lambda f=f, x=x, h=h: ref_numerical_gradient(lambda z: f(z).sum(), x, h),
                    ),
                    (
                        "you multiplied dout by the gradient elementwise, which only holds for elementwise f; "
                        "differentiate sum(f(x) * dout) instead.",
                        lambda f=f, x=x, dout=dout, h=h: (
                            ref_numerical_gradient(lambda z: f(z).sum(), x, h) * dout
                            if dout.shape == x.shape
                            else None
                        ),
                    ),
                    (
                        "you used a forward difference, whose error shrinks only like h; the central "
                        "difference (F(x+h) - F(x-h)) / (2h) of F = sum(f(x) * dout) shrinks like h**2.",
                        lambda f=f, x=x, dout=dout, h=h: _forward_difference(f, x, h, dout),
                    ),
                    (
                        "you divided by h instead of 2h.",
                        lambda f=f, x=x, dout=dout, h=h: 2 * ref_numerical_vjp(f, x, dout, h),
                    ),
                ],
            )


def _shape(text: str) -> tuple[int, ...]:
    """PyTorch's "[3, 5]" shape text as the tuple (3, 5)."""
    return tuple(int(d) for d in text.split(",") if d.strip())


@exercise(
    "silu_function",
    forbidden=("silu",),
    chapter=CHAPTER,
    signature="class SiLUFunction(torch.autograd.Function): forward(ctx, x), backward(ctx, grad_output)",
    summary="SiLU x * sigmoid(x) as a custom autograd Function with a hand-derived backward",
    reference=RefSiLUFunction,
)
def check_silu_function(t: Tester) -> None:
    """Forward equals F.silu, backward equals its derivative times grad_output, gradcheck passes."""
    cls = t.function_class('cu.check("silu_function", SiLUFunction)')

    # The contract's signature names no arguments, so in-place changes are reported here by name.
    def apply(x: Tensor, case: str) -> Tensor:
        x_in = x.clone()
        y = cls.apply(x_in)
        if not torch.equal(x_in, x):
            raise CheckFailure(
                f"in case {case}, {cls.__name__}.forward changed its input `x` in place; "
                "compute a new tensor (x * torch.sigmoid(x)) instead."
            )
        return y

    def backward_of(x: Tensor, dout: Tensor, case: str) -> Tensor:
        xr = x.detach().clone().requires_grad_(True)
        y = cls.apply(xr)
        if not torch.is_tensor(y) or y.grad_fn is None:
            raise CheckFailure(
                f"in case {case}, the output of {cls.__name__}.apply carries no gradient; "
                "return a tensor computed from x in forward."
            )
        dout_in = dout.clone()
        try:
            (g,) = torch.autograd.grad(y, xr, dout_in)
        except RuntimeError as err:
            shape = re.search(r"invalid gradient at index 0 - got \[([^\]]*)\]", str(err))
            if shape is None:
                raise
            raise CheckFailure(
                f"in case {case}, {cls.__name__}.backward returned a gradient of shape {_shape(shape.group(1))} "
                f"for an input x of shape {tuple(x.shape)}; backward returns one gradient per input of "
                "forward, of that input's shape: grad_output times the local derivative, elementwise."
            ) from None
        if not torch.equal(dout_in, dout):
            raise CheckFailure(
                f"in case {case}, {cls.__name__}.backward changed grad_output in place; "
                "autograd may reuse it, so compute a new tensor instead."
            )
        return g

    apply.__name__ = f"{cls.__name__}.apply"
    backward_of.__name__ = f"{cls.__name__}.backward"
    for dtype in (torch.float64, torch.float32):
        x = t.randn(3, 5, dtype=dtype, scale=3.0)
        name = f"x (3, 5) {str(dtype)[6:]}"
        y = t.call(name, x, name, fn=apply)
        t.compare(
            name,
            "forward",
            y,
            F.silu(x),
            mistakes=[
                ("the forward returns sigmoid(x); SiLU is x * sigmoid(x).", torch.sigmoid(x)),
                (
                    "the forward returns x * sigmoid(-x) = x / (1 + exp(x)); "
                    "sigmoid(x) is 1 / (1 + exp(-x)).",
                    x * torch.sigmoid(-x),
                ),
            ],
        )
        dout = t.randn(3, 5, dtype=dtype)
        g = t.call(name, x, dout, name, fn=backward_of)
        s = torch.sigmoid(x)
        t.compare(
            name,
            "grad x",
            g,
            dout * (s + x * s * (1 - s)),
            mistakes=[
                (
                    "the backward returns sigmoid(x) * grad_output: the product rule also gives x * s * (1 - s).",
                    dout * s,
                ),
                (
                    "the backward returns x * s * (1 - s) * grad_output: the product rule also gives sigmoid(x).",
                    dout * x * s * (1 - s),
                ),
                (
                    "the backward ignores grad_output: multiply the local derivative by it (chain rule).",
                    s + x * s * (1 - s),
                ),
            ],
        )
    x = t.randn(4, 3)
    try:
        gradcheck_function(cls, x)
    except AssertionError as err:
        raise CheckFailure(f"in case torch.autograd.gradcheck on x (4, 3), {err}") from None
    t.ok("torch.autograd.gradcheck, x (4, 3)", "grad x")
