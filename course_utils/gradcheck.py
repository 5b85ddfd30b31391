"""Numerical gradients and error measures: the course's gradient checker.

Chapter 00 derives everything here; every check battery uses it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.autograd.gradcheck import GradcheckError

Tensor = torch.Tensor


def numerical_gradient(
    f: Callable[..., Tensor],
    inputs: Sequence[Tensor],
    dout: Tensor | None = None,
    *,
    eps: float = 1e-6,
    wrt: Sequence[int] | None = None,
) -> list[Tensor | None]:
    """Central-difference gradient of ``sum(f(*inputs) * dout)`` w.r.t. each input.

    ``dout`` defaults to ones (so a scalar ``f`` gets its plain gradient). Inputs
    are copied to float64 first; the caller's tensors are never modified. Returns
    one tensor per input (shape of that input), or None for inputs not in ``wrt``.
    """
    xs = [x.detach().to(torch.float64).clone() if torch.is_tensor(x) else x for x in inputs]
    wrt = range(len(xs)) if wrt is None else wrt
    with torch.no_grad():
        out0 = f(*xs)
        weights = torch.ones_like(out0) if dout is None else dout.detach().to(torch.float64)

        def objective() -> float:
            return float((f(*xs).to(torch.float64) * weights).sum())

        grads: list[Tensor | None] = [None] * len(xs)
        for k in wrt:
            x = xs[k]
            g = torch.zeros_like(x)
            flat_x, flat_g = x.view(-1), g.view(-1)
            for i in range(flat_x.numel()):
                old = float(flat_x[i])
                flat_x[i] = old + eps
                plus = objective()
                flat_x[i] = old - eps
                minus = objective()
                flat_x[i] = old  # restore before the next coordinate
                flat_g[i] = (plus - minus) / (2 * eps)
            grads[k] = g
    return grads


def _as_float64_array(t: Tensor) -> np.ndarray:
    """A float64 numpy view (or copy) of ``t``, detached and on the CPU."""
    return np.asarray(t.detach().to(device="cpu", dtype=torch.float64).resolve_neg().numpy())


def _relative_error_array(a: np.ndarray, e: np.ndarray, floor: float | None) -> np.ndarray:
    """:func:`relative_error` on float64 arrays (numpy: a check calls it thousands of times)."""
    with np.errstate(all="ignore"):
        diff = np.abs(a - e)
        finite = np.isfinite(a) & np.isfinite(e)
        any_finite = bool(finite.any())
        scale = max(
            float(np.abs(a[finite]).max()) if any_finite else 0.0,
            float(np.abs(e[finite]).max()) if any_finite else 0.0,
        )
        if floor is None:
            floor = 1e-3 * scale
        floor = max(floor, 1e-300)
        denom = np.maximum(np.maximum(np.abs(a), np.abs(e)), floor)
        rel = diff / denom
        # NaN/inf where the expected value is finite is as wrong as it gets.
        same_nonfinite = (a == e) & ~finite
        rel = np.where(same_nonfinite, 0.0, rel)
        return np.asarray(np.where(np.isnan(rel), np.inf, rel))


def relative_error(actual: Tensor, expected: Tensor, floor: float | None = None) -> Tensor:
    """Elementwise ``|a - e| / max(|a|, |e|, floor)``.

    A bare ``|a - e| / |e|`` explodes where the true value is near zero, so the
    denominator never drops below ``floor``, by default 1e-3 times the largest
    magnitude in either tensor: an entry 1e-12 off a true zero is then not an error,
    while an entry of the tensor's own size that is wrong still counts fully.
    """
    a, e = _as_float64_array(actual), _as_float64_array(expected)
    return torch.from_numpy(_relative_error_array(a, e, floor))


@dataclass
class Comparison:
    """How far ``actual`` is from ``expected``, and where it is worst."""

    ok: bool
    max_abs: float
    max_rel: float
    worst_index: tuple[int, ...]
    actual_value: float
    expected_value: float


def compare(actual: Tensor, expected: Tensor, rtol: float, atol: float) -> Comparison:
    """Judge ``actual`` against ``expected`` as ``|a - e| <= atol + rtol * |e|`` everywhere.

    Shapes must already agree. The worst index is where the tolerance is exceeded
    the most (ties go to the first in row-major order).
    """
    # numpy rather than torch: the same IEEE float64 operations, without torch's per-operator
    # overhead, which dominated checks that compare thousands of small tensors.
    a, e = _as_float64_array(actual), _as_float64_array(expected)
    if a.size == 0:
        return Comparison(True, 0.0, 0.0, (), 0.0, 0.0)
    with np.errstate(all="ignore"):
        diff = np.abs(a - e)
        both_same = (a == e) | (np.isnan(a) & np.isnan(e))
        diff = np.where(both_same, 0.0, diff)
        diff = np.where(np.isnan(diff), np.inf, diff)
        excess = diff / (atol + rtol * np.abs(e))
        excess = np.where(np.isnan(excess), np.inf, excess)
    flat = int(np.argmax(excess.reshape(-1)))
    idx = tuple(int(i) for i in np.unravel_index(flat, a.shape)) if a.ndim else ()
    rel = _relative_error_array(a, e, None)
    return Comparison(
        ok=bool((excess <= 1.0).all()),
        max_abs=float(diff.max()),
        max_rel=float(rel.max()),
        worst_index=idx,
        actual_value=float(a.reshape(-1)[flat]),
        expected_value=float(e.reshape(-1)[flat]),
    )


def check_gradients(
    f: Callable[..., Tensor],
    inputs: Sequence[Tensor],
    analytic: Sequence[Tensor],
    dout: Tensor | None = None,
    *,
    eps: float = 1e-6,
    rtol: float = 1e-5,
    atol: float = 1e-8,
) -> list[Comparison]:
    """Compare analytic gradients with central differences of ``f``; one Comparison per input."""
    numeric = numerical_gradient(f, inputs, dout, eps=eps)
    return [compare(a, n, rtol, atol) for a, n in zip(analytic, numeric, strict=True)]


def gradcheck_function(fn: Callable[..., Tensor], *inputs: Tensor, **kwargs) -> bool:
    """Run ``torch.autograd.gradcheck`` on float64 copies of ``inputs`` and say plainly why it fails.

    ``fn`` may be an ``autograd.Function`` subclass (its ``apply`` is used) or any callable.
    Returns True on success and raises ``AssertionError`` with a one-paragraph reason otherwise.
    """
    call = fn.apply if isinstance(fn, type) and issubclass(fn, torch.autograd.Function) else fn
    xs = tuple(
        x.detach().to(torch.float64).requires_grad_(x.is_floating_point())
        if torch.is_tensor(x)
        else x
        for x in inputs
    )
    try:
        return torch.autograd.gradcheck(call, xs, **kwargs)
    except GradcheckError as err:
        # PyTorch's message spreads the two Jacobians over many lines; keep it to one.
        detail = " ".join(str(err).split())
        detail = detail if len(detail) <= 400 else detail[:400] + " ..."
        raise AssertionError(
            f"The backward of {getattr(fn, '__name__', fn)} disagrees with finite differences: {detail}"
        ) from None
