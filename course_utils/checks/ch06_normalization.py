"""Check batteries of chapter 06: BatchNorm forward and backward (staged and compact), LayerNorm,
RMSNorm, GroupNorm, and a small CNN from the learner's own layers."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..checking import CheckFailure, Tester, exercise
from ..gradcheck import numerical_gradient

CHAPTER = "06_normalization"
#: PyTorch's batch norms, forbidden inside the exercises that rebuild them.
BATCH_NORM_OPS = ("batch_norm", "native_batch_norm", "instance_norm", "group_norm")
Tensor = torch.Tensor


# ---- reference implementations ---------------------------------------------------------
def _stat_dims(x: Tensor) -> tuple[int, ...]:
    # every dim but the channel dim 1: (0,) for (N, C), (0, 2, 3) for (N, C, H, W)
    return tuple(d for d in range(x.dim()) if d != 1)


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    # (C,) -> (1, C, 1, ...) so it broadcasts against x
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


def ref_batchnorm_forward(
    x: Tensor,
    gamma: Tensor,
    beta: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    momentum: float = 0.1,
    eps: float = 1e-5,
    training: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm over every dim but 1; returns (out, new_running_mean, new_running_var)."""
    dims = _stat_dims(x)
    if training:
        m = x.numel() // x.shape[1]
        mean = x.mean(dims)  # (C,)
        var = x.var(dims, unbiased=False)  # (C,) biased: used to normalise
        new_mean = (1 - momentum) * running_mean + momentum * mean
        new_var = (1 - momentum) * running_var + momentum * var * m / (m - 1)
    else:
        mean, var = running_mean, running_var
        new_mean, new_var = running_mean.clone(), running_var.clone()
    xhat = (x - _per_channel(mean, x)) / torch.sqrt(_per_channel(var, x) + eps)
    return _per_channel(gamma, x) * xhat + _per_channel(beta, x), new_mean, new_var


def ref_batchnorm_backward(
    dout: Tensor, x: Tensor, gamma: Tensor, eps: float = 1e-5
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BatchNorm backward in the compact form; returns (dx, dgamma, dbeta)."""
    return _bn_backward(dout, x, gamma, eps)


def _bn_backward(
    dout: Tensor,
    x: Tensor,
    gamma: Tensor,
    eps: float,
    *,
    unbiased: bool = False,
    count: int | None = None,
    mean_term: bool = True,
    var_term: bool = True,
    per_pixel: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    # The keyword options build the mistaken versions the battery names; per_pixel takes the
    # statistics over N only (one per (c, h, w)) and returns dgamma, dbeta per (c, h, w) too.
    dims = (0,) if per_pixel else _stat_dims(x)
    m = x.numel() // x.shape[1] if count is None else count
    if per_pixel:
        m = x.shape[0]
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=unbiased, keepdim=True)
    rstd = 1 / torch.sqrt(var + eps)
    xhat = (x - mean) * rstd
    dbeta = dout.sum(dims)
    dgamma = (dout * xhat).sum(dims)
    g = _per_channel(gamma, x)
    dx = dout * 1.0
    if mean_term:
        dx = dx - dout.sum(dims, keepdim=True) / m
    if var_term:
        dx = dx - xhat * (dout * xhat).sum(dims, keepdim=True) / m
    return g * rstd * dx, dgamma, dbeta


def ref_layernorm_forward(x: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dim, as F.layer_norm(x, (D,), gamma, beta, eps)."""
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * gamma + beta


def ref_layernorm_backward(
    dout: Tensor, x: Tensor, gamma: Tensor, eps: float = 1e-5
) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm backward; dgamma and dbeta summed over all leading dims. Returns (dx, dgamma, dbeta)."""
    return _ln_backward(dout, x, gamma, eps)


def _ln_backward(
    dout: Tensor,
    x: Tensor,
    gamma: Tensor,
    eps: float,
    *,
    mean_term: bool = True,
    var_term: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    d = x.shape[-1]
    lead = tuple(range(x.dim() - 1))
    mean = x.mean(-1, keepdim=True)
    rstd = 1 / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    xhat = (x - mean) * rstd
    g = dout * gamma  # d loss / d xhat
    dx = g * 1.0
    if mean_term:
        dx = dx - g.sum(-1, keepdim=True) / d
    if var_term:
        dx = dx - xhat * (g * xhat).sum(-1, keepdim=True) / d
    if not lead:  # a single row: nothing to sum over (sum over () would sum everything)
        return rstd * dx, dout * xhat, dout * 1.0
    return rstd * dx, (dout * xhat).sum(lead), dout.sum(lead)


def ref_rmsnorm_forward(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dim: x / sqrt(mean(x**2) + eps) * weight."""
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * weight


# ---- BatchNorm forward -------------------------------------------------------------------
def _torch_batchnorm(
    x: Tensor,
    gamma: Tensor,
    beta: Tensor,
    rm: Tensor,
    rv: Tensor,
    momentum: float,
    eps: float,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of nn.BatchNorm1d/2d in float64 with these buffers: (out, running_mean, running_var)."""
    c = x.shape[1]
    module = (nn.BatchNorm1d if x.dim() == 2 else nn.BatchNorm2d)(
        c, eps=eps, momentum=momentum
    ).double()
    with torch.no_grad():
        module.weight.copy_(gamma)
        module.bias.copy_(beta)
        module.running_mean.copy_(rm)
        module.running_var.copy_(rv)
        module.train(training)
        out = module(x.double())
    dt = x.dtype
    return out.to(dt), module.running_mean.to(dt), module.running_var.to(dt)


def _bn_out_mistakes(
    x: Tensor, gamma: Tensor, beta: Tensor, rm: Tensor, rv: Tensor, eps: float, training: bool
):
    x = x.double()
    g, b = _per_channel(gamma.double(), x), _per_channel(beta.double(), x)
    dims = _stat_dims(x)

    def normalise(
        dims_: tuple[int, ...], *, unbiased: bool = False, outside: bool = False
    ) -> Tensor:
        mean = x.mean(dims_, keepdim=True)
        var = x.var(dims_, unbiased=unbiased, keepdim=True)
        den = torch.sqrt(var) + eps if outside else torch.sqrt(var + eps)
        return g * (x - mean) / den + b

    def with_running(outside: bool) -> Tensor:
        mean, var = _per_channel(rm.double(), x), _per_channel(rv.double(), x)
        den = torch.sqrt(var) + eps if outside else torch.sqrt(var + eps)
        return g * (x - mean) / den + b

    mistakes: list[tuple[str, Callable[[], Tensor | None]]] = []
    if training:
        mistakes += [
            (
                "the batch was normalised with the unbiased variance (divided by M - 1). Training "
                "normalises with the biased variance (divide by M = N*H*W); only the running "
                "variance uses the unbiased one.",
                lambda: normalise(dims, unbiased=True),
            ),
            (
                "eps was added outside the square root: the denominator is sqrt(var + eps), not sqrt(var) + eps.",
                lambda: normalise(dims, outside=True),
            ),
            (
                "the running statistics were used to normalise in training mode; training "
                "normalises with the statistics of the current batch.",
                lambda: with_running(False),
            ),
        ]
        if x.dim() == 4:
            mistakes += [
                (
                    "the statistics were taken over N only, one per (c, h, w); BatchNorm2d takes one "
                    "mean and variance per channel, over N, H and W together.",
                    lambda: normalise((0,)),
                ),
                (
                    "the statistics were taken over H and W only (one per image and channel, which is "
                    "InstanceNorm); BatchNorm2d also averages over the batch dim N.",
                    lambda: normalise((2, 3)),
                ),
            ]
        mistakes.append(
            (
                "the statistics were taken per sample, over the channels (dim 1 and after); BatchNorm "
                "takes them per channel, over every dim but 1.",
                lambda: normalise(tuple(range(1, x.dim()))),
            )
        )
    else:
        mistakes += [
            (
                "eval mode normalised with the batch statistics; in eval mode BatchNorm uses the "
                "running mean and running variance (this is the classic 'model left in train mode' bug).",
                lambda: normalise(dims),
            ),
            (
                "eps was added outside the square root: the denominator is sqrt(running_var + eps).",
                lambda: with_running(True),
            ),
            (
                "eval mode divided by the running variance instead of its square root.",
                lambda: (
                    g * (x - _per_channel(rm.double(), x)) / (_per_channel(rv.double(), x) + eps)
                    + b
                ),
            ),
        ]
    return mistakes


def _bn_running_mistakes(
    x: Tensor, rm: Tensor, rv: Tensor, momentum: float, training: bool, which: str
):
    x = x.double()
    dims = _stat_dims(x)
    old = (rm if which == "mean" else rv).double()
    if not training:
        if x.numel() == x.shape[1]:
            return []  # one value per channel: no batch variance to have used
        batch = x.mean(dims) if which == "mean" else x.var(dims, unbiased=True)
        return [
            (
                f"the running {which} was updated in eval mode; in eval mode the running statistics "
                "come back unchanged.",
                lambda: (1 - momentum) * old + momentum * batch,
            ),
            (
                f"the running {which} was updated in eval mode (with the Keras convention); in eval mode "
                "the running statistics come back unchanged.",
                lambda: momentum * old + (1 - momentum) * batch,
            ),
        ]
    mean, biased, unbiased = x.mean(dims), x.var(dims, unbiased=False), x.var(dims, unbiased=True)
    batch = mean if which == "mean" else unbiased
    out = [
        (
            "the momentum follows the Keras convention, new = momentum*old + (1-momentum)*batch. "
            "PyTorch's momentum weighs the NEW batch: new = (1-momentum)*old + momentum*batch.",
            lambda: momentum * old + (1 - momentum) * batch,
        ),
        (
            f"the running {which} is the batch statistic itself; it should be the moving average "
            "(1-momentum)*old + momentum*batch.",
            lambda: batch,
        ),
        (
            f"the running {which} was not updated in training mode; it should become "
            "(1-momentum)*old + momentum*batch.",
            lambda: old,
        ),
    ]
    if which == "var":
        out = [
            (
                "the running variance was updated with the biased batch variance (divided by M); "
                "nn.BatchNorm2d updates it with the unbiased one, var * M / (M - 1), M = N*H*W.",
                lambda: (1 - momentum) * old + momentum * biased,
            ),
            (
                "the running variance was updated with the batch standard deviation instead of the "
                "(unbiased) variance.",
                lambda: (1 - momentum) * old + momentum * unbiased.sqrt(),
            ),
            *out,
        ]
    return out


def _shape_hint(
    t: Tester, case: str, name: str, got: object, x: Tensor, want: tuple[int, ...]
) -> None:
    """Name the wrong-axes mistake when a per-channel quantity comes back with another shape."""
    if not torch.is_tensor(got) or tuple(got.shape) == want:
        return
    shape = tuple(got.shape)
    if x.dim() == 4 and shape in {tuple(x.shape[1:]), (1, *x.shape[1:])}:
        t.fail(
            case,
            f"`{name}` has shape {shape}, one value per (c, h, w): it was reduced over N only. "
            f"BatchNorm2d reduces over N, H and W together, so `{name}` has shape {want}.",
        )
    if shape != want and got.numel() == x.shape[1]:
        t.fail(
            case,
            f"`{name}` should have shape {want}, but it has shape {shape} (use shape (C,), no kept dims).",
        )


def _bn_forward_cases(t: Tester) -> list[tuple[str, tuple, dict]]:
    """(case, (x, gamma, beta, running_mean, running_var), keyword settings)."""

    def inputs(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[Tensor, ...]:
        c = shape[1]
        offset = (t.randn(c) * 2.0).reshape((1, c) + (1,) * (len(shape) - 2))
        spread = (0.5 + 1.5 * t.rand(c)).reshape((1, c) + (1,) * (len(shape) - 2))
        x = (t.randn(*shape) * spread + offset).to(dtype)
        gamma = (1.0 + 0.5 * t.randn(c)).to(dtype)
        beta = (0.5 * t.randn(c)).to(dtype)
        rm = t.randn(c).to(dtype)
        rv = (0.5 + t.rand(c) * 2.0).to(dtype)
        return x, gamma, beta, rm, rv

    f64, f32 = torch.float64, torch.float32
    settings = [
        # shape, dtype, momentum, eps, training, how the settings are passed
        ((4, 3), f64, 0.1, 1e-5, True, "defaults"),
        ((2, 3, 3, 4), f64, 0.1, 1e-5, True, "positional"),
        ((3, 2, 2, 2), f64, 0.3, 1e-3, True, "keywords"),
        ((1, 3, 2, 3), f64, 0.9, 0.5, True, "positional"),
        ((2, 4), f64, 1.0, 1e-5, True, "keywords"),
        ((5, 2, 3, 3), f64, 0.0, 1e-2, True, "positional"),
        ((2, 3, 1, 1), f64, 0.2, 1e-5, True, "positional"),
        ((6, 5), f64, 0.7, 1.0, True, "keywords"),
        ((3, 3, 3, 3), f64, 0.05, 1e-5, True, "positional"),
        ((8, 3), f32, 0.1, 1e-5, True, "positional"),
        ((4, 3, 5, 5), f32, 0.25, 1e-4, True, "keywords"),
        ((2, 3, 4, 4), f64, 0.1, 1e-5, False, "keywords"),
        ((1, 4), f64, 0.1, 1e-5, False, "positional"),
        ((1, 2, 3, 3), f64, 0.4, 0.3, False, "positional"),
        ((3, 2, 3, 3), f32, 0.1, 0.1, False, "keywords"),
        ((5, 3), f32, 0.5, 1e-5, False, "positional"),
    ]
    cases = []
    for shape, dtype, momentum, eps, training, style in settings:
        mode = "train" if training else "eval"
        case = f"x {shape} {str(dtype)[6:]}, {mode}, momentum={momentum}, eps={eps}"
        if style == "defaults":
            case += " (defaults)"
        cases.append(
            (
                case,
                inputs(shape, dtype),
                {"momentum": momentum, "eps": eps, "training": training, "style": style},
            )
        )
    return cases


#: The generic hint Tester adds to a broadcasting error; wrong here, so it is taken out.
_KEEPDIM_HINT = "A reduction (max, sum, mean) without keepdim=True often causes this."
PER_PIXEL = (
    "It looks like the statistics were taken over N only (x.mean(0)): on (N, C, H, W) input they "
    "come out (C, H, W), one per pixel, and do not broadcast against running_mean (C,). "
    "BatchNorm2d takes one mean and variance per channel, over dims (0, 2, 3)."
)


def _probe_per_pixel(t: Tester, failure: CheckFailure, c: int, dtype: torch.dtype) -> None:
    """After a broadcasting error on 4-D input: rerun on (2, C, 2, C), where statistics over N
    only, (C, 2, C), do broadcast against (C,); if they show, raise ``failure`` naming them."""
    gen = torch.Generator().manual_seed(t.seed)
    x = torch.randn(2, c, 2, c, generator=gen, dtype=torch.float64).to(dtype)
    gamma, beta = torch.ones(c, dtype=dtype), torch.zeros(c, dtype=dtype)
    rm, rv = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
    try:
        out = t.call(f"x {tuple(x.shape)}, a probe", x, gamma, beta, rm, rv, 0.1, 1e-5, True)
    except CheckFailure:
        return
    if not isinstance(out, tuple | list) or len(out) != 3:
        return
    y, new_rm = out[0], out[1]
    xd = x.double()
    pixel = (xd - xd.mean(0)) / torch.sqrt(xd.var(0, unbiased=False) + 1e-5)
    shows = torch.is_tensor(new_rm) and tuple(new_rm.shape) == tuple(x.shape[1:])
    if torch.is_tensor(y) and y.shape == x.shape:
        shows = shows or bool(torch.allclose(y.double(), pixel, rtol=1e-4, atol=1e-5))
    if shows:  # the keepdim hint of the broadcasting error does not apply here
        text = str(failure).replace(f" {_KEEPDIM_HINT}", "")
        raise CheckFailure(f"{text} {PER_PIXEL}") from None


@exercise(
    "batchnorm_forward",
    forbidden=BATCH_NORM_OPS,
    chapter=CHAPTER,
    signature="(x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5, training=True) "
    "-> (out, new_running_mean, new_running_var)",
    summary="BatchNorm over every dim but 1 with PyTorch's running statistics (unbiased running variance)",
    reference=ref_batchnorm_forward,
)
def check_batchnorm_forward(t: Tester) -> None:
    """Train and eval, (N,C) and (N,C,H,W), many (momentum, eps); against one nn.BatchNorm step."""
    for case, (x, gamma, beta, rm, rv), s in _bn_forward_cases(t):
        momentum, eps, training = s["momentum"], s["eps"], s["training"]
        try:
            if s["style"] == "defaults":
                out = t.call(case, x, gamma, beta, rm, rv)
            elif s["style"] == "keywords":
                out = t.call(
                    case, x, gamma, beta, rm, rv, momentum=momentum, eps=eps, training=training
                )
            else:
                out = t.call(case, x, gamma, beta, rm, rv, momentum, eps, training)
        except CheckFailure as failure:
            if x.dim() == 4 and training and "must match the size" in str(failure):
                _probe_per_pixel(t, failure, x.shape[1], x.dtype)
            raise
        y, new_rm, new_rv = t.unpack(case, out, ("out", "new_running_mean", "new_running_var"))
        want_out, want_rm, want_rv = _torch_batchnorm(
            x, gamma, beta, rm, rv, momentum, eps, training
        )
        c = (x.shape[1],)
        _shape_hint(t, case, "new_running_mean", new_rm, x, c)
        _shape_hint(t, case, "new_running_var", new_rv, x, c)
        t.compare(
            case,
            "out",
            y,
            want_out,
            mistakes=_bn_out_mistakes(x, gamma, beta, rm, rv, eps, training),
        )
        t.compare(
            case,
            "new_running_mean",
            new_rm,
            want_rm,
            mistakes=_bn_running_mistakes(x, rm, rv, momentum, training, "mean"),
        )
        t.compare(
            case,
            "new_running_var",
            new_rv,
            want_rv,
            mistakes=_bn_running_mistakes(x, rm, rv, momentum, training, "var"),
        )


def _torch_batchnorm_backward(dout: Tensor, x: Tensor, gamma: Tensor, eps: float) -> list[Tensor]:
    """PyTorch's own training-mode BatchNorm backward kernel, in float64: [dx, dgamma, dbeta]."""
    # The aten kernels that autograd calls for F.batch_norm; calling them directly spares the
    # autograd engine's start-up (seconds, the first time in a process).
    d, xd, g = dout.double(), x.double(), gamma.double()
    _, mean, invstd = torch.ops.aten.native_batch_norm(xd, g, None, None, None, True, 0.1, eps)[:3]
    grads = torch.ops.aten.native_batch_norm_backward(
        d, xd, g, None, None, mean, invstd, True, eps, [True] * 3
    )
    return [v.to(x.dtype) for v in grads]


def _torch_layernorm_backward(dout: Tensor, x: Tensor, gamma: Tensor, eps: float) -> list[Tensor]:
    """PyTorch's own LayerNorm backward kernel (the one F.layer_norm's autograd calls)."""
    d, xd, g = dout.double(), x.double(), gamma.double()
    shape = [x.shape[-1]]
    _, mean, rstd = torch.ops.aten.native_layer_norm(xd, shape, g, torch.zeros_like(g), eps)
    grads = torch.ops.aten.native_layer_norm_backward(
        d, xd, shape, mean, rstd, g, torch.zeros_like(g), [True] * 3
    )
    return [v.to(x.dtype) for v in grads]


# ---- BatchNorm backward ------------------------------------------------------------------
def _bn_backward_cases(t: Tester) -> list[tuple[str, Tensor, Tensor, Tensor, float | None]]:
    settings = [
        ((4, 3), torch.float64, None),
        ((2, 3, 3, 4), torch.float64, 1e-5),
        ((1, 2, 3, 3), torch.float64, 1e-5),
        ((3, 2), torch.float64, 1e-5),
        ((3, 2, 2, 2), torch.float64, 0.1),
        ((6, 4), torch.float64, 1.0),
        ((8, 4), torch.float32, 1e-5),
        ((2, 3, 4, 4), torch.float32, 1e-3),
    ]
    cases = []
    for shape, dtype, eps in settings:
        c = shape[1]
        offset = (t.randn(c) * 2.0).reshape((1, c) + (1,) * (len(shape) - 2))
        x = (t.randn(*shape) * 1.5 + offset).to(dtype)
        gamma = (1.0 + 0.5 * t.randn(c)).to(dtype)
        dout = t.randn(*shape).to(dtype)
        label = "eps=1e-05 (default)" if eps is None else f"eps={eps}"
        cases.append((f"x {shape} {str(dtype)[6:]}, {label}", dout, x, gamma, eps))
    return cases


def _bn_dx_mistakes(dout: Tensor, x: Tensor, gamma: Tensor, eps: float) -> list:
    d, x, g = dout.double(), x.double(), gamma.double()
    dims = _stat_dims(x)
    var = x.var(dims, unbiased=False, keepdim=True)
    mistakes = [
        (
            "dx = dout * gamma / sqrt(var + eps) only: the batch mean and variance depend on x too, "
            "which adds -mean(dout) and -xhat * mean(dout * xhat) (per channel) inside the bracket.",
            lambda: d * _per_channel(g, x) / torch.sqrt(var + eps),
        ),
        (
            "dx misses the term from the batch mean (-mean(dout) per channel, times gamma / sqrt(var + eps)).",
            lambda: _bn_backward(d, x, g, eps, mean_term=False)[0],
        ),
        (
            "dx misses the term from the batch variance (-xhat * mean(dout * xhat) per channel, "
            "times gamma / sqrt(var + eps)).",
            lambda: _bn_backward(d, x, g, eps, var_term=False)[0],
        ),
        (
            "the backward used the unbiased variance; training-mode BatchNorm normalises with the "
            "biased one (divide by M = N*H*W).",
            lambda: _bn_backward(d, x, g, eps, unbiased=True)[0],
        ),
        (
            "the means were taken with M = N; M counts every element of a channel, M = N*H*W.",
            lambda: _bn_backward(d, x, g, eps, count=x.shape[0])[0],
        ),
        (
            "dx was not multiplied by gamma.",
            lambda: _bn_backward(d, x, torch.ones_like(g), eps)[0],
        ),
    ]
    if x.dim() == 4:
        mistakes.append(
            (
                "the batch statistics were taken over N only (x.mean(0): one mean and variance per "
                "(c, h, w), with M = N). BatchNorm2d takes them per channel over N, H and W together: "
                "reduce over dims (0, 2, 3), with M = N*H*W, in the backward as in the forward.",
                lambda: _bn_backward(d, x, g, eps, per_pixel=True)[0],
            )
        )
    return mistakes


def _bn_param_mistakes(dout: Tensor, x: Tensor, gamma: Tensor, eps: float, which: str) -> list:
    d, x = dout.double(), x.double()
    dims = _stat_dims(x)
    m = x.numel() // x.shape[1]
    mean = x.mean(dims, keepdim=True)
    xhat = (x - mean) / torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
    if which == "dbeta":
        return [
            ("dbeta is the mean of dout; it is the sum over every dim but 1.", lambda: d.mean(dims))
        ]
    return [
        (
            "dgamma sums dout * x; gamma multiplies the NORMALISED input, so dgamma = sum(dout * xhat).",
            lambda: (d * x).sum(dims),
        ),
        (
            "dgamma is a mean; it is the sum of dout * xhat over every dim but 1.",
            lambda: (d * xhat).sum(dims) / m,
        ),
        (
            "dgamma was multiplied by gamma; it is sum(dout * xhat), with no gamma.",
            lambda: (d * xhat).sum(dims) * gamma.double(),
        ),
        (
            "xhat was normalised with statistics over N only (x.mean(0), one per (c, h, w)); "
            "BatchNorm2d's xhat uses one mean and variance per channel, over N, H and W (dims "
            "(0, 2, 3)).",
            lambda: (
                (d * (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + eps)).sum(dims)
                if x.dim() == 4
                else None
            ),
        ),
    ]


def _expect_param_grad(t: Tester, case: str, name: str, got: object, x: Tensor) -> None:
    c = x.shape[1]
    if torch.is_tensor(got) and tuple(got.shape) != (c,) and x.dim() == 4 and got.dim() >= 2:
        t.fail(
            case,
            f"`{name}` has shape {tuple(got.shape)}; it should have shape ({c},): gamma and beta are "
            "shared by every position of a channel, so their gradients are summed over N, H and W.",
        )
    _shape_hint(t, case, name, got, x, (c,))


@exercise(
    "batchnorm_backward",
    forbidden=BATCH_NORM_OPS,
    chapter=CHAPTER,
    signature="(dout, x, gamma, eps=1e-5) -> (dx, dgamma, dbeta)",
    summary="training-mode BatchNorm backward: dx through the batch statistics, dgamma and dbeta per channel",
    reference=ref_batchnorm_backward,
    backward=True,
)
def check_batchnorm_backward(t: Tester) -> None:
    """Against autograd through F.batch_norm and against central differences of the forward."""
    cases = _bn_backward_cases(t)
    for case, dout, x, gamma, eps in cases:
        out = t.call(case, dout, x, gamma) if eps is None else t.call(case, dout, x, gamma, eps)
        eps = 1e-5 if eps is None else eps
        dx, dgamma, dbeta = t.unpack(case, out, ("dx", "dgamma", "dbeta"))
        want = _torch_batchnorm_backward(dout, x, gamma, eps)
        _expect_param_grad(t, case, "dgamma", dgamma, x)
        _expect_param_grad(t, case, "dbeta", dbeta, x)
        t.compare(case, "dx", dx, want[0], mistakes=_bn_dx_mistakes(dout, x, gamma, eps))
        t.compare(
            case,
            "dgamma",
            dgamma,
            want[1],
            mistakes=_bn_param_mistakes(dout, x, gamma, eps, "dgamma"),
        )
        t.compare(
            case, "dbeta", dbeta, want[2], mistakes=_bn_param_mistakes(dout, x, gamma, eps, "dbeta")
        )
    # Central differences of the forward pass on a small float64 case.
    case = "x (2, 2, 2, 2) float64, eps=1e-5, against central differences of the forward"
    x = t.randn(2, 2, 2, 2) * 1.5 + 0.7
    gamma, beta, dout = 1.0 + 0.5 * t.randn(2), t.randn(2), t.randn(2, 2, 2, 2)
    zeros, ones = torch.zeros(2, dtype=x.dtype), torch.ones(2, dtype=x.dtype)

    def forward(x_: Tensor, g_: Tensor, b_: Tensor) -> Tensor:
        return ref_batchnorm_forward(x_, g_, b_, zeros, ones, 0.1, 1e-5, True)[0]

    numeric = numerical_gradient(forward, [x, gamma, beta], dout)
    dx, dgamma, dbeta = t.unpack(
        case, t.call(case, dout, x, gamma, 1e-5), ("dx", "dgamma", "dbeta")
    )
    for name, got, want in zip(
        ("dx", "dgamma", "dbeta"), (dx, dgamma, dbeta), numeric, strict=True
    ):
        t.compare(case, name, got, want, rtol=1e-5, atol=1e-8)


# ---- BatchNorm backward, staged through the computation graph ----------------------------
#: The nodes of §2.2's graph, in the order the backward pass reaches them (and the battery judges them).
STAGED_NODES = ("dxhat", "drstd", "dvar", "dxc", "dmean", "dx", "dgamma", "dbeta")
#: The nodes with one value per channel, shape (C,).
PER_CHANNEL_NODES = ("drstd", "dvar", "dmean", "dgamma", "dbeta")


def ref_batchnorm_backward_staged(
    dout: Tensor, x: Tensor, gamma: Tensor, eps: float = 1e-5
) -> dict[str, Tensor]:
    """Training-mode BatchNorm backward, node by node: the gradient of the loss at every node."""
    return _bn_staged(dout, x, gamma, eps)


def _bn_staged(dout: Tensor, x: Tensor, gamma: Tensor, eps: float, slip: str = "") -> dict:
    # ``slip`` names one mistaken step; the battery builds its named mistakes from it.
    dims = _stat_dims(x)
    m = x.numel() // x.shape[1]
    mean = x.mean(dims, keepdim=True)
    xc = x - mean
    var = (xc * xc).mean(dims, keepdim=True)
    rstd = (var + eps) ** -0.5
    xhat = xc * rstd
    g = _per_channel(gamma, x)
    dxhat = dout * 1.0 if slip == "dxhat_no_gamma" else dout * g
    drstd = (dxhat * (xhat if slip == "drstd_xhat" else xc)).sum(dims, keepdim=True)
    dvar = {
        "dvar_no_half": -(rstd**3) * drstd,
        "dvar_sign": 0.5 * rstd**3 * drstd,
        "dvar_exponent": -0.5 * rstd * drstd,
    }.get(slip, -0.5 * rstd**3 * drstd)
    var_path = {
        "dxc_no_factor": dvar,
        "dxc_no_m": dvar * 2 * xc,
        "dxc_no_var_path": 0.0 * xc,
    }.get(slip, dvar * 2 * xc / m)
    dxc = dxhat * rstd + var_path
    dmean = {
        "dmean_mean": -dxc.mean(dims, keepdim=True),
        "dmean_sign": dxc.sum(dims, keepdim=True),
    }.get(slip, -dxc.sum(dims, keepdim=True))
    dx = {"dx_no_mean": dxc, "dx_no_m": dxc + dmean}.get(slip, dxc + dmean / m)
    return {
        "dxhat": dxhat,
        "drstd": drstd.reshape(-1),
        "dvar": dvar.reshape(-1),
        "dxc": dxc,
        "dmean": dmean.reshape(-1),
        "dx": dx,
        "dgamma": (dout * xhat).sum(dims),
        "dbeta": dout.sum(dims),
    }


#: Per node: (the slip, the sentence naming it).
STAGED_MISTAKES = {
    "dxhat": [
        (
            "dxhat_no_gamma",
            "d xhat is dout itself; y = gamma * xhat + beta, so d xhat = dout * gamma.",
        )
    ],
    "drstd": [
        (
            "drstd_xhat",
            "d rstd sums d xhat * xhat; xhat = xc * rstd, so the local derivative of xhat with "
            "respect to rstd is xc, and d rstd = sum(d xhat * xc) over every dim but 1.",
        )
    ],
    "dvar": [
        (
            "dvar_no_half",
            "d var misses the factor -1/2 of d/dv (v + eps)^(-1/2) = -1/2 (v + eps)^(-3/2).",
        ),
        (
            "dvar_sign",
            "d var has the wrong sign: d/dv (v + eps)^(-1/2) = -1/2 (v + eps)^(-3/2) is negative.",
        ),
        (
            "dvar_exponent",
            "d var used -1/2 (v + eps)^(-1/2), i.e. rstd, where the derivative has (v + eps)^(-3/2) = rstd**3.",
        ),
    ],
    "dxc": [
        (
            "dxc_no_var_path",
            "d xc misses the path through var: xc is used by xhat AND by var = mean(xc**2), so d xc = "
            "d xhat * rstd + d var * (local derivative of var with respect to xc).",
        ),
        (
            "dxc_no_factor",
            "d xc took d var through var without its local derivative: the factor 2*xc/M was dropped.",
        ),
        (
            "dxc_no_m",
            "d xc has the path through var without the 1/M of the mean: its local derivative is 2*xc/M.",
        ),
    ],
    "dmean": [
        (
            "dmean_mean",
            "d mean averages d xc; mean is subtracted from every xc, so d mean = -SUM of d xc.",
        ),
        ("dmean_sign", "d mean has the wrong sign: xc = x - mean, so the local derivative is -1."),
    ],
    "dx": [
        (
            "dx_no_mean",
            "dx is d xc only: it misses the path through mean (x is used by xc AND by mean).",
        ),
        (
            "dx_no_m",
            "dx adds d mean without the 1/M: mean = sum(x)/M, so that path brings d mean / M.",
        ),
    ],
}


def _autograd_staged(dout: Tensor, x: Tensor, gamma: Tensor, eps: float) -> dict[str, Tensor]:
    """The gradient at every node of the graph, by autograd in float64 (the battery's ground truth)."""
    dims = _stat_dims(x)
    with torch.enable_grad():
        xd = x.double().requires_grad_(True)
        gd = gamma.double().requires_grad_(True)
        bd = torch.zeros_like(gd, requires_grad=True)
        mean = xd.mean(dims, keepdim=True)
        xc = xd - mean
        var = (xc * xc).mean(dims, keepdim=True)
        rstd = (var + eps) ** -0.5
        xhat = xc * rstd
        out = _per_channel(gd, x) * xhat + _per_channel(bd, x)
        nodes = [xhat, rstd, var, xc, mean, xd, gd, bd]
        grads = torch.autograd.grad(out, nodes, dout.double())
    return {
        k: (v.reshape(-1) if k in PER_CHANNEL_NODES else v).to(x.dtype)
        for k, v in zip(STAGED_NODES, grads, strict=True)
    }


@exercise(
    "batchnorm_backward_staged",
    forbidden=BATCH_NORM_OPS,
    chapter=CHAPTER,
    signature="(dout, x, gamma, eps=1e-5) -> dict of dxhat, drstd, dvar, dxc, dmean, dx, dgamma, dbeta",
    summary="training-mode BatchNorm backward node by node through mean, xc, var, rstd, xhat, out",
    reference=ref_batchnorm_backward_staged,
    backward=True,
)
def check_batchnorm_backward_staged(t: Tester) -> None:
    """Every node's gradient against autograd through the same graph, in backward order."""
    for case, dout, x, gamma, eps in _bn_backward_cases(t):
        out = t.call(case, dout, x, gamma) if eps is None else t.call(case, dout, x, gamma, eps)
        eps = 1e-5 if eps is None else eps
        if not isinstance(out, dict):
            t.fail(
                case,
                f"expected a dict with the keys {', '.join(STAGED_NODES)}, but the function returned "
                f"{type(out).__name__}.",
            )
        missing = [k for k in STAGED_NODES if k not in out]
        if missing:
            t.fail(
                case, f"the dict has no {', '.join(missing)}; it needs every key of {STAGED_NODES}."
            )
        want = _autograd_staged(dout, x, gamma, eps)
        per_channel_kept = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        for node in STAGED_NODES:
            got = out[node]
            if (
                node in PER_CHANNEL_NODES
                and torch.is_tensor(got)
                and tuple(got.shape) == per_channel_kept
            ):
                got = got.reshape(-1)  # the keepdim shape (1, C, 1, 1) is as good as (C,)
            if node in ("dgamma", "dbeta"):
                _expect_param_grad(t, case, node, got, x)
            mistakes = [
                (
                    sentence,
                    lambda slip=slip, node=node, args=(dout, x, gamma), eps=eps: _bn_staged(
                        *(a.double() for a in args), eps, slip
                    )[node],
                )
                for slip, sentence in STAGED_MISTAKES.get(node, [])
            ]
            if node == "dx":
                mistakes += _bn_dx_mistakes(dout, x, gamma, eps)
            elif node in ("dgamma", "dbeta"):
                mistakes += _bn_param_mistakes(dout, x, gamma, eps, node)
            t.compare(case, node, got, want[node], mistakes=mistakes)
    # dx against central differences of the forward pass.
    case = "x (2, 2, 2, 2) float64, eps=1e-5, dx against central differences of the forward"
    x = t.randn(2, 2, 2, 2) * 1.5 + 0.7
    gamma, beta, dout = 1.0 + 0.5 * t.randn(2), t.randn(2), t.randn(2, 2, 2, 2)
    zeros, ones = torch.zeros(2, dtype=x.dtype), torch.ones(2, dtype=x.dtype)
    numeric = numerical_gradient(
        lambda x_: ref_batchnorm_forward(x_, gamma, beta, zeros, ones, 0.1, 1e-5, True)[0],
        [x],
        dout,
    )[0]
    out = t.call(case, dout, x, gamma, 1e-5)
    t.compare(
        case, "dx", out.get("dx") if isinstance(out, dict) else out, numeric, rtol=1e-5, atol=1e-8
    )


# ---- LayerNorm ---------------------------------------------------------------------------
def _ln_cases(t: Tester) -> list[tuple[str, Tensor, Tensor, Tensor, float | None]]:
    settings = [
        ((4, 6), torch.float64, None),
        ((2, 3, 5), torch.float64, 1e-3),
        ((2, 2, 3, 4), torch.float64, 0.5),
        ((5,), torch.float64, 1e-5),
        ((3, 1), torch.float64, 1e-5),
        ((3, 4, 4), torch.float64, 1e-5),
        ((6, 2), torch.float64, 1.0),
        ((8, 16), torch.float32, 1e-5),
        ((2, 4, 8), torch.float32, 1e-4),
    ]
    cases = []
    for shape, dtype, eps in settings:
        d = shape[-1]
        x = (t.randn(*shape) * 1.5 + t.randn(*shape[:-1], 1) * 2.0).to(dtype)
        gamma = (1.0 + 0.5 * t.randn(d)).to(dtype)
        beta = (0.5 * t.randn(d)).to(dtype)
        label = "eps=1e-05 (default)" if eps is None else f"eps={eps}"
        cases.append((f"x {shape} {str(dtype)[6:]}, {label}", x, gamma, beta, eps))
    return cases


def _ln_mistakes(x: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> list:
    x, g, b = x.double(), gamma.double(), beta.double()

    def over(dims: tuple[int, ...], *, unbiased: bool = False, outside: bool = False) -> Tensor:
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=unbiased, keepdim=True)
        den = torch.sqrt(var) + eps if outside else torch.sqrt(var + eps)
        return (x - mean) / den * g + b

    mistakes = [
        (
            "the variance is the unbiased one (divided by D - 1); LayerNorm divides by D.",
            lambda: over((-1,), unbiased=True),
        ),
        (
            "eps was added outside the square root: the denominator is sqrt(var + eps).",
            lambda: over((-1,), outside=True),
        ),
        (
            "gamma and beta were swapped: out = xhat * gamma + beta.",
            lambda: over((-1,)).sub(b).div(g).mul(b).add(g),
        ),
        ("gamma and beta were not applied.", lambda: (over((-1,)) - b) / g),
    ]
    if x.dim() >= 3:
        mistakes.append(
            (
                "the statistics were taken over every dim after the first; this LayerNorm normalises "
                "over the last dim only (normalized_shape = (D,)).",
                lambda: over(tuple(range(1, x.dim()))),
            )
        )
    if x.dim() >= 2:
        mistakes.append(
            (
                "the statistics were taken over the batch (dim 0), as BatchNorm does; LayerNorm takes "
                "them over the last dim of each sample.",
                lambda: over((0,)),
            )
        )
    return mistakes


@exercise(
    "layernorm_forward",
    forbidden=("layer_norm", "native_layer_norm"),
    chapter=CHAPTER,
    signature="(x, gamma, beta, eps=1e-5) -> out",
    summary="LayerNorm over the last dim, as F.layer_norm",
    reference=ref_layernorm_forward,
)
def check_layernorm_forward(t: Tester) -> None:
    """Many shapes (1-D to 4-D, D=1), eps settings and dtypes against F.layer_norm."""
    for case, x, gamma, beta, eps in _ln_cases(t):
        out = t.call(case, x, gamma, beta) if eps is None else t.call(case, x, gamma, beta, eps)
        eps = 1e-5 if eps is None else eps
        want = F.layer_norm(x.double(), (x.shape[-1],), gamma.double(), beta.double(), eps).to(
            x.dtype
        )
        t.compare(case, "out", out, want, mistakes=_ln_mistakes(x, gamma, beta, eps))


def _ln_dx_mistakes(dout: Tensor, x: Tensor, gamma: Tensor, eps: float) -> list:
    d, x, g = dout.double(), x.double(), gamma.double()
    rstd = 1 / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    return [
        (
            "dx = dout * gamma / sqrt(var + eps) only: the mean and variance of each row depend on x too.",
            lambda: d * g * rstd,
        ),
        (
            "dx misses the term from the mean (-mean(dout * gamma) over the last dim, times 1/sqrt(var + eps)).",
            lambda: _ln_backward(d, x, g, eps, mean_term=False)[0],
        ),
        (
            "dx misses the term from the variance (-xhat * mean(dout * gamma * xhat) over the last dim, "
            "times 1/sqrt(var + eps)).",
            lambda: _ln_backward(d, x, g, eps, var_term=False)[0],
        ),
        ("dx was not multiplied by gamma.", lambda: _ln_backward(d, x, torch.ones_like(g), eps)[0]),
    ]


def _ln_param_mistakes(dout: Tensor, x: Tensor, eps: float, which: str) -> list:
    d, x = dout.double(), x.double()
    lead = tuple(range(x.dim() - 1))
    xhat = (x - x.mean(-1, keepdim=True)) / torch.sqrt(
        x.var(-1, unbiased=False, keepdim=True) + eps
    )
    if which == "dbeta":
        return [
            (
                "dbeta is a mean over the leading dims; it is their sum.",
                lambda: d.mean(lead) if lead else None,
            )
        ]
    return [
        (
            "dgamma sums dout * x; it is the sum of dout * xhat, the normalised input.",
            lambda: (d * x).sum(lead) if lead else d * x,
        ),
        (
            "dgamma is a mean over the leading dims; it is their sum.",
            lambda: (d * xhat).mean(lead) if lead else None,
        ),
    ]


@exercise(
    "layernorm_backward",
    forbidden=("layer_norm", "native_layer_norm"),
    chapter=CHAPTER,
    signature="(dout, x, gamma, eps=1e-5) -> (dx, dgamma, dbeta)",
    summary="LayerNorm backward over the last dim; dgamma, dbeta summed over all leading dims",
    reference=ref_layernorm_backward,
    backward=True,
)
def check_layernorm_backward(t: Tester) -> None:
    """Against autograd through F.layer_norm and central differences of the forward."""
    for case, x, gamma, _beta, eps in _ln_cases(t):
        dout = t.randn(*x.shape).to(x.dtype)
        out = t.call(case, dout, x, gamma) if eps is None else t.call(case, dout, x, gamma, eps)
        eps = 1e-5 if eps is None else eps
        dx, dgamma, dbeta = t.unpack(case, out, ("dx", "dgamma", "dbeta"))
        d = x.shape[-1]
        for name, got in (("dgamma", dgamma), ("dbeta", dbeta)):
            if (
                torch.is_tensor(got)
                and got.dim() >= 2
                and got.shape[-1] == d
                and tuple(got.shape) != (d,)
            ):
                t.fail(
                    case,
                    f"`{name}` has shape {tuple(got.shape)}; it should have shape ({d},): sum it over ALL "
                    "leading dims, since every position shares gamma and beta.",
                )
        want = _torch_layernorm_backward(dout, x, gamma, eps)
        t.compare(case, "dx", dx, want[0], mistakes=_ln_dx_mistakes(dout, x, gamma, eps))
        t.compare(
            case, "dgamma", dgamma, want[1], mistakes=_ln_param_mistakes(dout, x, eps, "dgamma")
        )
        t.compare(case, "dbeta", dbeta, want[2], mistakes=_ln_param_mistakes(dout, x, eps, "dbeta"))
    case = "x (2, 3, 4) float64, eps=1e-5, against central differences of the forward"
    x = t.randn(2, 3, 4) * 1.5 + 0.5
    gamma, beta, dout = 1.0 + 0.5 * t.randn(4), t.randn(4), t.randn(2, 3, 4)
    numeric = numerical_gradient(
        lambda a, g, b: ref_layernorm_forward(a, g, b, 1e-5), [x, gamma, beta], dout
    )
    dx, dgamma, dbeta = t.unpack(
        case, t.call(case, dout, x, gamma, 1e-5), ("dx", "dgamma", "dbeta")
    )
    for name, got, want in zip(
        ("dx", "dgamma", "dbeta"), (dx, dgamma, dbeta), numeric, strict=True
    ):
        t.compare(case, name, got, want, rtol=1e-5, atol=1e-8)


# ---- RMSNorm -----------------------------------------------------------------------------
def _rms_mistakes(x: Tensor, w: Tensor, eps: float) -> list:
    x, w = x.double(), w.double()
    ms = (x * x).mean(-1, keepdim=True)
    c = x - x.mean(-1, keepdim=True)
    return [
        (
            "the mean was subtracted first (that is LayerNorm); RMSNorm divides x itself by "
            "sqrt(mean(x**2) + eps), with no centring.",
            lambda: c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps) * w,
        ),
        (
            "eps was added outside the square root: the denominator is sqrt(mean(x**2) + eps).",
            lambda: x / (ms.sqrt() + eps) * w,
        ),
        (
            "the squares were summed, not averaged: RMSNorm uses mean(x**2) over the last dim.",
            lambda: x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps) * w,
        ),
        ("x was divided by mean(x**2) + eps without the square root.", lambda: x / (ms + eps) * w),
        ("the weight was not applied.", lambda: x * torch.rsqrt(ms + eps)),
        (
            "the default eps is not 1e-6 (it looks like 1e-5, LayerNorm's default).",
            lambda: x * torch.rsqrt(ms + 1e-5) * w,
        ),
        (
            "the mean of x**2 was taken over every dim but the first; RMSNorm takes it over the last dim only.",
            lambda: (
                x * torch.rsqrt((x * x).mean(tuple(range(1, x.dim())), keepdim=True) + eps) * w
                if x.dim() >= 3
                else None
            ),
        ),
    ]


@exercise(
    "rmsnorm_forward",
    forbidden=("rms_norm",),
    chapter=CHAPTER,
    signature="(x, weight, eps=1e-6) -> out",
    summary="RMSNorm: x / sqrt(mean(x**2, last dim) + eps) * weight",
    reference=ref_rmsnorm_forward,
)
def check_rmsnorm_forward(t: Tester) -> None:
    """Many shapes, eps settings and dtypes against F.rms_norm (or the formula on older PyTorch)."""
    settings = [
        ((4, 6), torch.float64, None),
        ((2, 3, 5), torch.float64, 1e-3),
        ((2, 2, 3, 4), torch.float64, 0.5),
        ((7,), torch.float64, 1e-6),
        ((3, 1), torch.float64, 1e-2),
        ((5, 8), torch.float64, 1.0),
        ((8, 16), torch.float32, 1e-6),
        ((2, 4, 8), torch.float32, 1e-2),
    ]
    for shape, dtype, eps in settings:
        d = shape[-1]
        # small values in the default case, so that eps matters and its placement and size show
        scale = 0.02 if eps is None else 1.0
        x = ((t.randn(*shape) + t.randn(*shape[:-1], 1) * 1.5) * scale).to(dtype)
        w = (1.0 + 0.5 * t.randn(d)).to(dtype)
        label = "eps=1e-06 (default)" if eps is None else f"eps={eps}"
        case = f"x {shape} {str(dtype)[6:]}, {label}"
        out = t.call(case, x, w) if eps is None else t.call(case, x, w, eps)
        eps = 1e-6 if eps is None else eps
        if hasattr(F, "rms_norm"):
            want = F.rms_norm(x.double(), (d,), w.double(), eps).to(dtype)
        else:
            want = ref_rmsnorm_forward(x.double(), w.double(), eps).to(dtype)
        t.compare(case, "out", out, want, mistakes=_rms_mistakes(x, w, eps))


# ---- GroupNorm ---------------------------------------------------------------------------
#: What GroupNorm rebuilds, and every operator a learner could reshape x for and call instead:
#: layer_norm over (N, G, M), instance_norm or batch_norm over (1, N*G, M), rms_norm of x - mean.
GROUP_NORM_OPS = (
    "group_norm",
    "native_group_norm",
    "batch_norm",
    "native_batch_norm",
    "instance_norm",
    "layer_norm",
    "native_layer_norm",
    "rms_norm",
)


def ref_groupnorm_forward(
    x: Tensor, num_groups: int, gamma: Tensor, beta: Tensor, eps: float = 1e-5
) -> Tensor:
    """GroupNorm as F.group_norm: x (N, C, *), statistics per (example, group of C/G channels)."""
    rows = x.reshape(x.shape[0], num_groups, -1)  # (N, G, C/G * spatial): a group is a row
    mean = rows.mean(-1, keepdim=True)
    var = rows.var(-1, unbiased=False, keepdim=True)
    xhat = ((rows - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    return xhat * _per_channel(gamma, x) + _per_channel(beta, x)


def ref_groupnorm_backward(
    dout: Tensor, x: Tensor, num_groups: int, gamma: Tensor, eps: float = 1e-5
) -> tuple[Tensor, Tensor, Tensor]:
    """GroupNorm backward: LayerNorm's backward within each (example, group). Returns (dx, dgamma, dbeta)."""
    return _gn_backward(dout, x, num_groups, gamma, eps)


#: The sets that share one mean and variance, GroupNorm's and the mistaken ones the batteries name.
GN_SETS = ("group", "instance", "layer", "batch", "group_and_batch", "interleaved")


def _gn_rows(x: Tensor, groups: int, sets: str) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """x (N, C, *) as rows that each share one mean and variance, and the map back to x's shape."""
    n, c = x.shape[:2]
    s = x.numel() // (n * c)  # spatial positions per channel (1 for (N, C) input)
    if sets == "group":
        return x.reshape(n * groups, -1), lambda r: r.reshape(x.shape)
    if sets == "instance":
        return x.reshape(n * c, s), lambda r: r.reshape(x.shape)
    if sets == "layer":
        return x.reshape(n, -1), lambda r: r.reshape(x.shape)
    if sets == "interleaved":  # view(N, C/G, G, S): channel c lands in group c mod G
        k = c // groups

        def back(r: Tensor) -> Tensor:
            return r.reshape(n, groups, k, s).transpose(1, 2).reshape(x.shape)

        return x.reshape(n, k, groups, s).transpose(1, 2).reshape(n * groups, -1), back
    per = c if sets == "batch" else groups  # over the batch: per channel, or per group

    def back_batch(r: Tensor) -> Tensor:
        return r.reshape(per, n, -1).transpose(0, 1).reshape(x.shape)

    return x.reshape(n, per, -1).transpose(0, 1).reshape(per, -1), back_batch


def _gn_normalise(
    x: Tensor,
    groups: int,
    eps: float,
    sets: str = "group",
    *,
    unbiased: bool = False,
    outside: bool = False,
) -> Tensor:
    rows, back = _gn_rows(x, groups, sets)
    mean = rows.mean(-1, keepdim=True)
    var = rows.var(-1, unbiased=unbiased, keepdim=True)
    den = torch.sqrt(var) + eps if outside else torch.sqrt(var + eps)
    return back((rows - mean) / den)


def _gn_backward(
    dout: Tensor,
    x: Tensor,
    groups: int,
    gamma: Tensor,
    eps: float,
    *,
    sets: str = "group",
    unbiased: bool = False,
    mean_term: bool = True,
    var_term: bool = True,
    gamma_outside: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    # The keyword options build the mistaken versions the battery names; gamma_outside takes gamma
    # out of the group sums, as BatchNorm may (there gamma is constant over the set; here it is not).
    g = _per_channel(gamma, x)
    rows, back = _gn_rows(x, groups, sets)
    h = _gn_rows(dout if gamma_outside else dout * g, groups, sets)[0]  # gradient reaching xhat
    mean = rows.mean(-1, keepdim=True)
    rstd = 1 / torch.sqrt(rows.var(-1, unbiased=unbiased, keepdim=True) + eps)
    xhat = (rows - mean) * rstd
    dx = h * 1.0
    if mean_term:
        dx = dx - h.mean(-1, keepdim=True)
    if var_term:
        dx = dx - xhat * (h * xhat).mean(-1, keepdim=True)
    dx = back(rstd * dx)
    if gamma_outside:
        dx = dx * g
    dims = _stat_dims(x)
    return dx, (dout * back(xhat)).sum(dims), dout.sum(dims)


def _gn_inputs(
    t: Tester, shape: tuple[int, ...], dtype: torch.dtype, offset: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """x whose channels and examples differ in mean and spread (so every wrong set shows), gamma, beta."""
    c = shape[1]
    per_c = (1, c) + (1,) * (len(shape) - 2)
    per_n = (shape[0],) + (1,) * (len(shape) - 1)
    spread = (0.5 + 1.5 * t.rand(c)).reshape(per_c)
    x = t.randn(*shape) * spread + 2.0 * t.randn(c).reshape(per_c) + t.randn(*per_n) + offset
    gamma = (1.0 + 0.5 * t.randn(c)).to(dtype)
    beta = (0.5 * t.randn(c)).to(dtype)
    return x.to(dtype), gamma, beta


#: (shape, num_groups, dtype, eps or None for the default, how the settings are passed)
_GN_SETTINGS = [
    ((4, 8), 2, torch.float64, None, "defaults"),
    ((2, 6, 5), 2, torch.float64, 1e-3, "positional"),
    ((2, 6, 3, 4), 3, torch.float64, 1e-5, "keywords"),
    ((3, 4, 2, 3), 1, torch.float64, 0.5, "positional"),
    ((2, 4, 3, 3), 4, torch.float64, 1e-5, "positional"),
    ((1, 8, 2, 2), 4, torch.float64, 1e-2, "keywords"),
    ((3, 6, 1, 1), 2, torch.float64, 1e-5, "positional"),
    ((4, 8, 4, 4), 2, torch.float32, 1e-5, "positional"),
    ((3, 6, 7), 3, torch.float32, 1e-4, "keywords"),
]
#: Large common offsets, on shapes judged above without one: (shape, num_groups, dtype, offset).
_GN_OFFSET_SETTINGS = [
    ((2, 6, 3, 4), 3, torch.float64, 1e5),
    ((4, 8, 4, 4), 2, torch.float32, 1e3),
]
#: float32 with a large offset: the input itself is only known to ~offset * 6e-8.
_GN_OFFSET_TOL32 = (2e-3, 2e-4)
GN_OFFSET_HINT = (
    "This case repeats an earlier shape with a large common offset added to x, and the earlier one "
    "passed: the variance lost its precision. E[x**2] - E[x]**2 subtracts two huge, nearly equal "
    "numbers; take the variance as the mean of (x - mean)**2 instead."
)


def _gn_label(shape: tuple[int, ...], groups: int, dtype: torch.dtype, eps: float | None) -> str:
    label = "eps=1e-05 (default)" if eps is None else f"eps={eps}"
    return f"x {shape} {str(dtype)[6:]}, num_groups={groups}, {label}"


GN_PER_GROUP_AFFINE = (
    "It looks like gamma or beta met the grouped view of x: they hold one value per CHANNEL, "
    "shape (C,), so they line up with neither the G groups nor a group's C/G*spatial values. "
    "Reshape the normalised values back to x's shape (N, C, ...) first, then apply gamma and "
    "beta as (1, C, 1, ...)."
)
_SIZES = re.compile(r"size of tensor a \((\d+)\) must match the size of tensor b \((\d+)\)")


def _gn_call(
    t: Tester, case: str, style: str, args: tuple, x: Tensor, groups: int, eps: float
) -> object:
    """Call the learner's function on ``args`` with eps left out, positional or as a keyword; a
    broadcasting error between C and a grouped size is named as gamma or beta applied per group."""
    try:
        if style == "defaults":
            return t.call(case, *args)
        if style == "keywords":
            return t.call(case, *args, eps=eps)
        return t.call(case, *args, eps)
    except CheckFailure as failure:
        text, sizes = str(failure), _SIZES.search(str(failure))
        n, c = x.shape[:2]
        grouped = {groups, c // groups, x.numel() // (n * groups)}
        if sizes:
            a, b = int(sizes.group(1)), int(sizes.group(2))
            if (a == c and b in grouped) or (b == c and a in grouped):
                text = text.replace(f" {_KEEPDIM_HINT}", "")
                raise CheckFailure(f"{text} {GN_PER_GROUP_AFFINE}") from None
        raise


_GN_SET_SENTENCES = {
    "instance": (
        "the statistics were taken per channel (over one channel's positions only, which is "
        "InstanceNorm, GroupNorm with num_groups = C); GroupNorm takes them over the C/num_groups "
        "channels of a group together, with all their positions"
    ),
    "layer": (
        "the statistics were taken over all channels of an example (LayerNorm over (C, ...), "
        "GroupNorm with num_groups = 1); GroupNorm takes one mean and variance per group of "
        "C/num_groups channels"
    ),
    "batch": (
        "the statistics were taken per channel over the batch (that is BatchNorm); GroupNorm never "
        "mixes examples: one mean and variance per (example, group)"
    ),
    "group_and_batch": (
        "each group's statistics were taken over the whole batch as well; GroupNorm takes them per "
        "example: one mean and variance per (example, group), over C/num_groups channels and their "
        "positions"
    ),
    "interleaved": (
        "the channels were grouped by interleaving: a view (N, C/G, G, ...) puts channel c in group "
        "c mod G. GroupNorm's groups are contiguous blocks: group g holds channels g*C/G to "
        "(g+1)*C/G - 1, which is the view (N, G, C/G, ...) or (N, G, -1)"
    ),
}


def _gn_wrong_sets(x: Tensor, groups: int) -> list[str]:
    """The mistaken sets that differ from GroupNorm's on this input."""
    n, c = x.shape[:2]
    out = []
    if groups != c:
        out.append("instance")
    if groups != 1:
        out.append("layer")
    if n > 1:
        out += ["batch", "group_and_batch"]
    if 1 < groups < c:
        out.append("interleaved")
    return out


def _gn_out_mistakes(x: Tensor, groups: int, gamma: Tensor, beta: Tensor, eps: float) -> list:
    xd, g, b = x.double(), _per_channel(gamma.double(), x), _per_channel(beta.double(), x)

    def out(sets: str = "group", **kw: bool) -> Tensor:
        return g * _gn_normalise(xd, groups, eps, sets, **kw) + b

    def moments() -> Tensor:  # in x's own dtype, where the cancellation happens
        rows = x.reshape(x.shape[0] * groups, -1)
        mean = rows.mean(-1, keepdim=True)
        var = (rows * rows).mean(-1, keepdim=True) - mean * mean
        xhat = ((rows - mean) / torch.sqrt(var + eps)).reshape(x.shape)
        return (xhat.double() * g + b).to(x.dtype)

    mistakes = [(f"{_GN_SET_SENTENCES[s]}.", lambda s=s: out(s)) for s in _gn_wrong_sets(x, groups)]
    mistakes += [
        (
            "the variance is the unbiased one (divided by M - 1); GroupNorm divides by M, the "
            "number of values in the group (C/num_groups times the spatial size).",
            lambda: out(unbiased=True),
        ),
        (
            "eps was added outside the square root: the denominator is sqrt(var + eps).",
            lambda: out(outside=True),
        ),
        ("gamma and beta were not applied.", lambda: _gn_normalise(xd, groups, eps)),
        (
            "gamma and beta were swapped: out = xhat * gamma + beta.",
            lambda: _gn_normalise(xd, groups, eps) * b + g,
        ),
        (
            "the variance was computed as E[x**2] - E[x]**2, which loses its precision when the "
            "mean is large compared with the spread; take the mean of (x - mean)**2.",
            moments,
        ),
    ]
    return mistakes


@exercise(
    "groupnorm_forward",
    forbidden=GROUP_NORM_OPS,
    chapter=CHAPTER,
    signature="(x (N,C,*), num_groups, gamma (C,), beta (C,), eps=1e-5) -> out",
    summary="GroupNorm: statistics per (example, group of C/num_groups channels), gamma and beta per channel",
    reference=ref_groupnorm_forward,
)
def check_groupnorm_forward(t: Tester) -> None:
    """(N,C), (N,C,L), (N,C,H,W); num_groups 1, C and between; float32/64; large offsets; against F.group_norm."""
    seen = set()
    settings = [(*s, 0.0) for s in _GN_SETTINGS] + [
        (shape, groups, dtype, 1e-5, "positional", offset)
        for shape, groups, dtype, offset in _GN_OFFSET_SETTINGS
    ]
    for shape, groups, dtype, eps, style, offset in settings:
        x, gamma, beta = _gn_inputs(t, shape, dtype, offset)
        case = _gn_label(shape, groups, dtype, eps) + (f", offset {offset:g}" if offset else "")
        eps_ = 1e-5 if eps is None else eps
        out = _gn_call(t, case, style, (x, groups, gamma, beta), x, groups, eps_)
        want = F.group_norm(x.double(), groups, gamma.double(), beta.double(), eps_).to(dtype)
        rtol, atol = _GN_OFFSET_TOL32 if offset and dtype == torch.float32 else (None, None)
        mistakes = _gn_out_mistakes(x, groups, gamma, beta, eps_)
        try:
            t.compare(case, "out", out, want, rtol=rtol, atol=atol, mistakes=mistakes)
        except CheckFailure as failure:
            if offset and (shape, dtype) in seen and "It looks like" not in str(failure):
                raise CheckFailure(f"{failure} {GN_OFFSET_HINT}") from None
            raise
        seen.add((shape, dtype))


def _torch_groupnorm_backward(
    dout: Tensor, x: Tensor, groups: int, gamma: Tensor, eps: float
) -> list[Tensor]:
    """PyTorch's own GroupNorm backward kernel (the one F.group_norm's autograd calls), float64."""
    d, xd, g = dout.double(), x.double(), gamma.double()
    n, c = x.shape[:2]
    hw = x.numel() // (n * c)
    _, mean, rstd = torch.ops.aten.native_group_norm(xd, g, None, n, c, hw, groups, eps)
    grads = torch.ops.aten.native_group_norm_backward(
        d, xd, mean, rstd, g, n, c, hw, groups, [True] * 3
    )
    return [v.to(x.dtype) for v in grads]


def _gn_dx_mistakes(dout: Tensor, x: Tensor, groups: int, gamma: Tensor, eps: float) -> list:
    d, xd, g = dout.double(), x.double(), gamma.double()

    def dx(**kw: object) -> Tensor:
        return _gn_backward(d, xd, groups, g, eps, **kw)[0]

    mistakes = [
        (
            "dx = dout * gamma / sqrt(var + eps) only: each group's mean and variance depend on x too.",
            lambda: dx(mean_term=False, var_term=False),
        ),
        (
            "dx misses the term from the group mean (-mean of dout * gamma over the group, times "
            "1/sqrt(var + eps)).",
            lambda: dx(mean_term=False),
        ),
        (
            "dx misses the term from the group variance (-xhat * mean of dout * gamma * xhat over "
            "the group, times 1/sqrt(var + eps)).",
            lambda: dx(var_term=False),
        ),
        (
            "gamma was taken out of the group's sums, as BatchNorm's backward may do; within a group "
            "gamma changes from channel to channel, so the means run over dout * gamma (the gradient "
            "reaching xhat), as in LayerNorm's backward.",
            lambda: dx(gamma_outside=True),
        ),
        ("dx was not multiplied by gamma.", lambda: dx(gamma_outside=True) / _per_channel(g, xd)),
        (
            "the backward used the unbiased variance; GroupNorm normalises with the biased one "
            "(divide by M, the number of values in a group).",
            lambda: dx(unbiased=True),
        ),
    ]
    mistakes += [
        (f"{_GN_SET_SENTENCES[s]} (in the backward pass).", lambda s=s: dx(sets=s))
        for s in _gn_wrong_sets(x, groups)
    ]
    return mistakes


def _gn_param_mistakes(dout: Tensor, x: Tensor, groups: int, eps: float, which: str) -> list:
    d, xd = dout.double(), x.double()
    dims = _stat_dims(x)
    count = x.numel() // x.shape[1]
    if which == "dbeta":
        return [
            ("dbeta is a mean over N and the spatial dims; it is their sum.", lambda: d.mean(dims))
        ]
    xhat = _gn_normalise(xd, groups, eps)
    mistakes = [
        (
            "dgamma sums dout * x; gamma multiplies the NORMALISED input, so dgamma = sum(dout * xhat).",
            lambda: (d * xd).sum(dims),
        ),
        (
            "dgamma is a mean over N and the spatial dims; it is their sum.",
            lambda: (d * xhat).sum(dims) / count,
        ),
    ]
    mistakes += [
        (
            f"the xhat in dgamma is wrong: {_GN_SET_SENTENCES[s]}.",
            lambda s=s: (d * _gn_normalise(xd, groups, eps, s)).sum(dims),
        )
        for s in _gn_wrong_sets(x, groups)
    ]
    return mistakes


def _gn_param_shape(t: Tester, case: str, name: str, got: object, x: Tensor, groups: int) -> None:
    """Name the sums left out when `dgamma` or `dbeta` comes back with another shape than (C,)."""
    n, c = x.shape[:2]
    if not torch.is_tensor(got) or tuple(got.shape) == (c,):
        return
    shape = tuple(got.shape)
    squeezed = tuple(s for s in shape if s != 1)
    why = ""
    if squeezed in {(n, c), (n, c, *x.shape[2:])} and n > 1:
        why = "it was not summed over the batch dim N"
    elif x.dim() > 2 and squeezed == tuple(s for s in x.shape[1:] if s != 1):
        why = "it was summed over N but not over the spatial dims"
    elif squeezed in {(groups,), (n, groups)} and groups != c:
        why = "it has one value per group, but gamma and beta are per channel"
    elif got.numel() == c:
        why = "it holds the right values in the wrong shape (no kept dims)"
    if why:
        t.fail(
            case,
            f"`{name}` has shape {shape}; {why}. gamma and beta are shared by every example and "
            f"position of a channel, so `{name}` is summed over N and the spatial dims: shape ({c},).",
        )


@exercise(
    "groupnorm_backward",
    forbidden=GROUP_NORM_OPS,
    chapter=CHAPTER,
    signature="(dout, x (N,C,*), num_groups, gamma (C,), eps=1e-5) -> (dx, dgamma, dbeta)",
    summary="GroupNorm backward: LayerNorm's backward within each (example, group); dgamma, dbeta per channel",
    reference=ref_groupnorm_backward,
    backward=True,
)
def check_groupnorm_backward(t: Tester) -> None:
    """Against autograd's kernel for F.group_norm and against central differences of the forward."""
    for shape, groups, dtype, eps, style in _GN_SETTINGS:
        x, gamma, _ = _gn_inputs(t, shape, dtype)
        dout = t.randn(*shape).to(dtype)
        case = _gn_label(shape, groups, dtype, eps)
        eps_ = 1e-5 if eps is None else eps
        out = _gn_call(t, case, style, (dout, x, groups, gamma), x, groups, eps_)
        dx, dgamma, dbeta = t.unpack(case, out, ("dx", "dgamma", "dbeta"))
        want = _torch_groupnorm_backward(dout, x, groups, gamma, eps_)
        _gn_param_shape(t, case, "dgamma", dgamma, x, groups)
        _gn_param_shape(t, case, "dbeta", dbeta, x, groups)
        t.compare(case, "dx", dx, want[0], mistakes=_gn_dx_mistakes(dout, x, groups, gamma, eps_))
        for k, name in ((1, "dgamma"), (2, "dbeta")):
            mistakes = _gn_param_mistakes(dout, x, groups, eps_, name)
            t.compare(case, name, (dgamma, dbeta)[k - 1], want[k], mistakes=mistakes)
    # Central differences of the forward pass, on a small float64 case.
    case = "x (2, 4, 3) float64, num_groups=2, eps=1e-5, against central differences of the forward"
    x, gamma, beta = _gn_inputs(t, (2, 4, 3), torch.float64)
    dout = t.randn(2, 4, 3)
    numeric = numerical_gradient(
        lambda a, g, b: ref_groupnorm_forward(a, 2, g, b, 1e-5), [x, gamma, beta], dout
    )
    dx, dgamma, dbeta = t.unpack(
        case, t.call(case, dout, x, 2, gamma, 1e-5), ("dx", "dgamma", "dbeta")
    )
    for name, got, want in zip(
        ("dx", "dgamma", "dbeta"), (dx, dgamma, dbeta), numeric, strict=True
    ):
        t.compare(case, name, got, want, rtol=1e-5, atol=1e-8)


# ---- A small CNN from the learner's own layers -------------------------------------------
#: The parameters of small_cnn_loss, in the order the backward pass reaches them (and the battery judges them).
CNN_PARAMS = ("b2", "W2", "beta", "gamma", "W1")


def ref_small_cnn_loss(
    params: dict[str, Tensor],
    X: Tensor,
    y: Tensor | None,
    train: bool = True,
    dropout_p: float = 0.0,
    bn_state: dict[str, Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]] | Tensor:
    """conv3x3(pad 1, no bias) - BatchNorm - ReLU - maxpool 2x2 - dropout - affine - softmax CE, by hand."""
    return _small_cnn(params, X, y, train, dropout_p, bn_state)


def _small_cnn(
    params: dict[str, Tensor],
    X: Tensor,
    y: Tensor | None,
    train: bool,
    dropout_p: float,
    bn_state: dict[str, Tensor] | None,
    slip: str = "",
) -> tuple[Tensor, dict[str, Tensor]] | Tensor:
    # ``slip`` names one mistaken step; the battery builds its named mistakes from it.
    w1, gamma, beta, w2, b2 = (params[k] for k in ("W1", "gamma", "beta", "W2", "b2"))
    n, _, h, w = X.shape
    f = w1.shape[0]
    cols = F.unfold(X, 3, padding=1)  # (N, C*9, H*W)
    a = (w1.reshape(f, -1) @ cols).reshape(n, f, h, w)  # conv output
    dims = (0, 2, 3)
    if train and not (slip == "bn_running_in_train" and bn_state is not None):
        mean, var = a.mean(dims), a.var(dims, unbiased=False)
        if bn_state is not None:
            m = n * h * w
            unbiased = var if slip == "bn_state_biased" else var * m / (m - 1)
            bn_state["running_mean"] = 0.9 * bn_state["running_mean"] + 0.1 * mean
            bn_state["running_var"] = 0.9 * bn_state["running_var"] + 0.1 * unbiased
    else:
        mean, var = bn_state["running_mean"], bn_state["running_var"]
    rstd = (var + 1e-5) ** -0.5
    xhat = (a - _per_channel(mean, a)) * _per_channel(rstd, a)
    z = _per_channel(gamma, a) * xhat + _per_channel(beta, a)  # BatchNorm output
    r = z.clamp(min=0)  # ReLU
    windows = (
        r.reshape(n, f, h // 2, 2, w // 2, 2)
        .permute(0, 1, 2, 4, 3, 5)
        .reshape(n, f, h // 2, w // 2, 4)
    )
    pooled, arg = windows.max(-1)  # (N, F, H/2, W/2): the first maximum of each window
    keep = torch.ones_like(pooled)
    if train and dropout_p > 0:
        keep = (torch.rand_like(pooled) >= dropout_p) / (1 - dropout_p)
    hidden = (pooled * keep).reshape(n, -1)  # (N, D)
    scores = hidden @ w2 + b2  # (N, K)
    if y is None:
        return scores
    logp = torch.log_softmax(scores, 1)
    loss = -logp[torch.arange(n), y].mean()
    if not train:
        return loss, None
    # ---- backward ----
    dscores = logp.exp()
    dscores[torch.arange(n), y] -= 1
    if slip != "ce_not_mean":
        dscores = dscores / n
    grads = {"b2": dscores.sum(0), "W2": hidden.T @ dscores}
    dpooled = (dscores @ w2.T).reshape(pooled.shape) * keep
    if slip == "pool_spread":
        dwindows = dpooled.unsqueeze(-1).expand(*pooled.shape, 4) / 4
    else:
        dwindows = torch.zeros_like(windows).scatter_(-1, arg.unsqueeze(-1), dpooled.unsqueeze(-1))
    dr = dwindows.reshape(n, f, h // 2, w // 2, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, f, h, w)
    if slip == "relu_pass_all":
        dz = dr
    elif slip == "relu_mask_from_conv":
        dz = dr * (a > 0)
    else:
        dz = dr * (z > 0)
    grads["beta"], grads["gamma"] = dz.sum(dims), (dz * xhat).sum(dims)
    if slip == "bn_constant_stats":
        da = dz * _per_channel(gamma * rstd, a)
    else:
        da = _bn_backward(dz, a, gamma, 1e-5)[0]
    grads["W1"] = torch.einsum("nfl,nkl->fk", da.reshape(n, f, -1), cols).reshape(w1.shape)
    return loss, grads


CNN_MISTAKES = {
    "relu_pass_all": "the ReLU passed the gradient everywhere; it passes it only where its input is > 0.",
    "relu_mask_from_conv": (
        "the ReLU mask came from the wrong cache, the convolution's output; the ReLU's input is the "
        "BatchNorm output, so the mask is (BatchNorm output > 0)."
    ),
    "ce_not_mean": (
        "the softmax cross-entropy gradient was not divided by N: the loss is a MEAN over the batch, "
        "so d scores = (softmax - onehot) / N."
    ),
    "pool_spread": (
        "the max-pool gradient was spread evenly over each window (that is average pooling); max "
        "pooling sends it all to the window's first maximum."
    ),
    "bn_constant_stats": (
        "the BatchNorm backward treated the batch mean and variance as constants (dx = dout * gamma * "
        "rstd); they depend on the conv output too: use your batchnorm_backward."
    ),
}


def _cnn_problem(
    t: Tester, n: int, h: int, f: int, k: int, dtype: torch.dtype
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    params = {
        "W1": t.randn(f, 1, 3, 3, scale=0.5).to(dtype),
        "gamma": (1.0 + 0.3 * t.randn(f)).to(dtype),
        "beta": (0.3 * t.randn(f)).to(dtype),
        "W2": t.randn(f * (h // 2) ** 2, k, scale=0.5).to(dtype),
        "b2": (0.1 * t.randn(k)).to(dtype),
    }
    X = t.rand(n, 1, h, h).to(dtype)
    y = t.randint(k, n)
    return params, X, y


def _torch_small_cnn(
    params: dict[str, Tensor], X: Tensor, y: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """The same network from PyTorch's layers in float64, its gradients by autograd (train mode)."""
    with torch.enable_grad():
        p = {k: v.double().requires_grad_(True) for k, v in params.items()}
        a = F.conv2d(X.double(), p["W1"], padding=1)
        z = F.batch_norm(a, None, None, p["gamma"], p["beta"], training=True, eps=1e-5)
        hidden = F.max_pool2d(F.relu(z), 2).flatten(1)
        loss = F.cross_entropy(hidden @ p["W2"] + p["b2"], y)
        grads = torch.autograd.grad(loss, [p[k] for k in CNN_PARAMS])
    dt = X.dtype
    return loss.detach().to(dt), {k: g.to(dt) for k, g in zip(CNN_PARAMS, grads, strict=True)}


def _cnn_numeric_probe(
    fn: Callable, params: dict[str, Tensor], X: Tensor, y: Tensor
) -> dict[str, Tensor]:
    """Central differences of the learner's own loss, train mode, dropout off (runs where fn lives)."""
    names = list(params)

    def loss(*values: Tensor) -> Tensor:
        return fn(dict(zip(names, values, strict=True)), X, y, True, 0.0, None)[0]

    grads = numerical_gradient(loss, [params[k] for k in names])
    return dict(zip(names, grads, strict=True))


def _judge_grads(
    t: Tester, case: str, grads: object, want: dict, params: dict, X: Tensor, y: Tensor
) -> None:
    if not isinstance(grads, dict):
        t.fail(
            case,
            f"the grads should be a dict with the keys of params, but they are {type(grads).__name__}.",
        )
    missing = [k for k in CNN_PARAMS if k not in grads]
    if missing:
        t.fail(
            case,
            f"the grads dict has no {', '.join(missing)}; it needs one entry per key of params.",
        )
    for name in CNN_PARAMS:
        mistakes = [
            (
                sentence,
                lambda slip=slip, name=name: _small_cnn(
                    {k: v.double() for k, v in params.items()}, X.double(), y, True, 0.0, None, slip
                )[1][name],
            )
            for slip, sentence in CNN_MISTAKES.items()
        ]
        t.compare(case, f"grads['{name}']", grads[name], want[name], mistakes=mistakes)


@exercise(
    "small_cnn_loss",
    chapter=CHAPTER,
    signature="(params, X, y, train=True, dropout_p=0.0, bn_state=None) -> (loss, grads)",
    summary="conv-BN-ReLU-maxpool-dropout-affine-softmax CE from your own layers, backward by hand",
    reference=ref_small_cnn_loss,
    backward=True,
)
def check_small_cnn_loss(t: Tester) -> None:
    """Loss and every gradient against autograd through PyTorch's layers and against central
    differences of the learner's own loss; running statistics; eval mode; scores."""
    settings = [
        (4, 4, 3, 3, torch.float64),
        (3, 6, 2, 4, torch.float64),
        (8, 8, 4, 10, torch.float32),
    ]
    for n, h, f, k, dtype in settings:
        case = (
            f"X ({n}, 1, {h}, {h}) {str(dtype)[6:]}, {f} channels, {k} classes, train, dropout off"
        )
        params, X, y = _cnn_problem(t, n, h, f, k, dtype)
        out = t.call(case, params, X, y)
        loss, grads = t.unpack(case, out, ("loss", "grads"))
        want_loss, want = _torch_small_cnn(params, X, y)
        t.compare(
            case,
            "loss",
            loss,
            want_loss,
            mistakes=[
                ("the loss is the SUM over the batch; it is the mean.", want_loss * n),
            ],
        )
        _judge_grads(t, case, grads, want, params, X, y)
    # central differences of the learner's own loss, on a tiny float64 network
    case = "X (3, 1, 4, 4) float64, 2 channels, 3 classes: grads against central differences of your loss"
    params, X, y = _cnn_problem(t, 3, 4, 2, 3, torch.float64)
    numeric = t.probe(case, _cnn_numeric_probe, params, X, y)
    _, grads = t.unpack(case, t.call(case, params, X, y), ("loss", "grads"))
    for name in CNN_PARAMS:
        got = grads.get(name) if isinstance(grads, dict) else None
        t.compare(case, f"grads['{name}']", got, numeric[name], rtol=1e-5, atol=1e-7)
    # running statistics in train mode, then eval mode with them
    n, h, f, k = 4, 4, 3, 3
    params, X, y = _cnn_problem(t, n, h, f, k, torch.float64)
    rm, rv = 0.3 * t.randn(f), 0.5 + t.rand(f)
    case = f"X ({n}, 1, {h}, {h}) float64, train with bn_state"
    state = {"running_mean": rm.clone(), "running_var": rv.clone()}
    want_loss, _ = _torch_small_cnn(params, X, y)
    loss, _ = t.unpack(case, t.call(case, params, X, y, True, 0.0, state), ("loss", "grads"))
    state = t.last_args[5]  # bn_state as the call left it (in the learner's kernel when graded)
    running_loss = _small_cnn(params, X, y, False, 0.0, {"running_mean": rm, "running_var": rv})[0]
    t.compare(
        case,
        "loss",
        loss,
        want_loss,
        mistakes=[
            (
                "BatchNorm normalised with the running statistics in train mode; training uses the batch's.",
                running_loss,
            ),
        ],
    )
    a = F.conv2d(X, params["W1"], padding=1)
    m = n * h * h
    want_rm = 0.9 * rm + 0.1 * a.mean((0, 2, 3))
    biased = a.var((0, 2, 3), unbiased=False)
    want_rv = 0.9 * rv + 0.1 * biased * m / (m - 1)
    for key, want_v, mistakes in (
        ("running_mean", want_rm, [("bn_state was not updated in train mode.", rm)]),
        (
            "running_var",
            want_rv,
            [
                ("bn_state was not updated in train mode.", rv),
                (
                    "the running variance was updated with the biased batch variance; use var * M / (M - 1).",
                    0.9 * rv + 0.1 * biased,
                ),
            ],
        ),
    ):
        t.compare(case, f"bn_state['{key}']", state.get(key), want_v, mistakes=mistakes)
    case = f"X ({n}, 1, {h}, {h}) float64, eval (train=False, dropout_p=0.5) with bn_state"
    state = {"running_mean": rm.clone(), "running_var": rv.clone()}
    out = t.call(case, params, X, y, False, 0.5, state)
    state = t.last_args[5]
    loss = out[0] if isinstance(out, tuple | list) and out else out
    want_eval = _small_cnn(params, X, y, False, 0.0, {"running_mean": rm, "running_var": rv})[0]
    t.compare(
        case,
        "loss",
        loss,
        want_eval,
        mistakes=[
            (
                "eval mode normalised with the batch statistics; eval mode uses bn_state's running statistics.",
                want_loss,
            ),
        ],
    )
    for key, old in (("running_mean", rm), ("running_var", rv)):
        t.compare(
            case,
            f"bn_state['{key}'] after eval",
            state.get(key),
            old,
            mistakes=[
                (
                    "bn_state was updated in eval mode; eval leaves the running statistics unchanged.",
                    want_rm if key == "running_mean" else want_rv,
                ),
            ],
        )
    case = f"X ({n}, 1, {h}, {h}) float64, y=None, eval with bn_state: the scores"
    scores = t.call(
        case, params, X, None, False, 0.0, {"running_mean": rm.clone(), "running_var": rv.clone()}
    )
    want_scores = _small_cnn(params, X, None, False, 0.0, {"running_mean": rm, "running_var": rv})
    t.compare(case, "scores", scores, want_scores)
