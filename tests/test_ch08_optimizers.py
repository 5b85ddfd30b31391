"""Chapter 08 batteries: correct optimizers in several styles pass, planted mistakes are named.

Every exercise of chapter 08 gets (a) correct implementations written in different styles
(the textbook m_hat / v_hat form, PyTorch's own arrangement, numpy, explicit Python loops,
a wrapper around torch.optim itself), each checked across 20 seeds, and (b) the mistakes
learners really make, each rejected with the sentence that names it, on several seeds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import course_utils as cu
from course_utils.checks import ch08_optimizers as ch08

SEEDS = range(20)
MISTAKE_SEEDS = (0, 1, 7)


# =====================================================================================
# Correct implementations, one style each
# =====================================================================================


# ---- SGD -----------------------------------------------------------------------------
def sgd_torch_style(
    param, grad, momentum_buffer, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0
):
    """PyTorch's own in-place arithmetic, on clones."""
    d_p = grad.clone()
    if weight_decay != 0:
        d_p.add_(param, alpha=weight_decay)
    buf = None
    if momentum != 0:
        if momentum_buffer is None:
            buf = d_p.clone().detach()
        else:
            buf = momentum_buffer.clone().mul_(momentum).add_(d_p, alpha=1 - dampening)
        d_p = d_p.add(buf, alpha=momentum) if nesterov else buf
    return param.clone().add_(d_p, alpha=-lr), buf


def sgd_numpy(
    param, grad, momentum_buffer, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0
):
    """Through numpy, back to the input's dtype."""
    p, g = param.numpy(), grad.numpy()
    g = g + weight_decay * p
    if momentum == 0:
        return torch.from_numpy(p - lr * g).to(param.dtype), None
    b = (
        g.copy()
        if momentum_buffer is None
        else momentum * momentum_buffer.numpy() + (1 - dampening) * g
    )
    step = g + momentum * b if nesterov else b
    return torch.from_numpy(p - lr * step).to(param.dtype), torch.from_numpy(b).to(param.dtype)


def sgd_loops(
    param, grad, momentum_buffer, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0
):
    """One element at a time, in Python floats."""
    ps, gs = param.reshape(-1).tolist(), grad.reshape(-1).tolist()
    bs = None if momentum_buffer is None else momentum_buffer.reshape(-1).tolist()
    new_p, new_b = [], []
    for i, (p, g) in enumerate(zip(ps, gs, strict=True)):
        g = g + weight_decay * p
        if momentum != 0:
            b = g if bs is None else momentum * bs[i] + (1 - dampening) * g
            new_b.append(b)
            g = g + momentum * b if nesterov else b
        new_p.append(p - lr * g)
    out = torch.tensor(new_p, dtype=param.dtype).reshape(param.shape)
    buf = torch.tensor(new_b, dtype=param.dtype).reshape(param.shape) if momentum != 0 else None
    return out, buf


def sgd_always_returns_a_buffer(
    param, grad, momentum_buffer, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0
):
    """Returns a (never used) tensor as the buffer when momentum is 0; the contract allows it."""
    g = grad + weight_decay * param
    if momentum == 0:
        return param - lr * g, g
    buf = g if momentum_buffer is None else momentum * momentum_buffer + (1 - dampening) * g
    return param - lr * (g + momentum * buf if nesterov else buf), buf


def sgd_wrapping_torch_optim(
    param, grad, momentum_buffer, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0
):
    """Delegates to torch.optim.SGD with the state filled in by hand."""
    p = param.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD(
        [p],
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=weight_decay,
        foreach=False,
    )
    if momentum_buffer is not None:
        opt.state[p]["momentum_buffer"] = momentum_buffer.clone()
    p.grad = grad.clone()
    opt.step()
    buf = opt.state[p].get("momentum_buffer")
    return p.detach(), buf


# ---- Adam ----------------------------------------------------------------------------
def adam_textbook(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    step,
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    decoupled=False,
):
    """Kingma & Ba's m_hat and v_hat, with torch's placement of eps."""
    b1, b2 = betas
    if decoupled:
        param = param - lr * weight_decay * param
    else:
        grad = grad + weight_decay * param
    m = b1 * exp_avg + (1 - b1) * grad
    v = b2 * exp_avg_sq + (1 - b2) * grad**2
    m_hat = m / (1 - b1**step)
    v_hat = v / (1 - b2**step)
    return param - lr * m_hat / (torch.sqrt(v_hat) + eps), m, v


def adam_torch_style(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    step,
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    decoupled=False,
):
    """_single_tensor_adam's arrangement: lerp, addcmul, step_size and denom, on clones."""
    b1, b2 = betas
    param = param.clone()
    if weight_decay != 0:
        if decoupled:
            param.mul_(1 - lr * weight_decay)
        else:
            grad = grad.add(param, alpha=weight_decay)
    m = exp_avg.clone().lerp_(grad, 1 - b1)
    v = exp_avg_sq.clone().mul_(b2).addcmul_(grad, grad, value=1 - b2)
    step_size = lr / (1 - b1**step)
    denom = (v.sqrt() / (1 - b2**step) ** 0.5).add_(eps)
    return param.addcdiv_(m, denom, value=-step_size), m, v


def adam_numpy(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    step,
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    decoupled=False,
):
    """Through numpy in float64, back to the input's dtype."""
    p, g = param.double().numpy(), grad.double().numpy()
    m, v = exp_avg.double().numpy(), exp_avg_sq.double().numpy()
    b1, b2 = betas
    p = p * (1 - lr * weight_decay) if decoupled else p
    g = g if decoupled else g + weight_decay * param.double().numpy()
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * np.square(g)
    p = p - lr / (1 - b1**step) * m / (np.sqrt(v) / np.sqrt(1 - b2**step) + eps)
    return tuple(torch.from_numpy(a).to(param.dtype) for a in (p, m, v))


def adam_loops(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    step,
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    decoupled=False,
):
    """One element at a time, in Python floats."""
    b1, b2 = betas
    c1, c2 = 1 - b1**step, math.sqrt(1 - b2**step)
    out = ([], [], [])
    flat = (t.reshape(-1).tolist() for t in (param, grad, exp_avg, exp_avg_sq))
    for p, g, m, v in zip(*flat, strict=True):
        if decoupled:
            p *= 1 - lr * weight_decay
        else:
            g += weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p -= lr * (m / c1) / (math.sqrt(v) / c2 + eps)
        for lst, x in zip(out, (p, m, v), strict=True):
            lst.append(x)
    return tuple(torch.tensor(lst, dtype=param.dtype).reshape(param.shape) for lst in out)


def adam_wrapping_torch_optim(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    step,
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    decoupled=False,
):
    """Delegates to torch.optim.Adam / AdamW with the state filled in by hand."""
    p = param.detach().clone().requires_grad_(True)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls([p], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
    opt.state[p].update(
        step=torch.tensor(float(step - 1)), exp_avg=exp_avg.clone(), exp_avg_sq=exp_avg_sq.clone()
    )
    p.grad = grad.clone()
    opt.step()
    return p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]


# ---- schedule ------------------------------------------------------------------------
def schedule_closed_form(step, warmup_steps, total_steps, base_lr, min_lr=0.0):
    """Branches and math.cos."""
    if step < warmup_steps:
        return base_lr * (step + 1) / (warmup_steps + 1)
    x = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * x))


def schedule_cos_squared(step, warmup_steps, total_steps, base_lr, min_lr=0.0):
    """(1 + cos(pi x)) / 2 = cos(pi x / 2)**2, with numpy, as a numpy float."""
    warm = base_lr * np.minimum(step + 1, warmup_steps + 1) / (warmup_steps + 1)
    x = max(0, step - warmup_steps) / (total_steps - warmup_steps)
    decay = min_lr + (base_lr - min_lr) * np.cos(np.pi * x / 2) ** 2
    return warm if step < warmup_steps else decay


def schedule_from_torch(step, warmup_steps, total_steps, base_lr, min_lr=0.0):
    """Runs torch's scheduler composition up to `step` (a slow but correct style)."""
    return ch08.torch_warmup_cosine(warmup_steps, total_steps, base_lr, min_lr)[step]


CORRECT = {
    "sgd_step": [
        sgd_torch_style,
        sgd_numpy,
        sgd_loops,
        sgd_always_returns_a_buffer,
        sgd_wrapping_torch_optim,
    ],
    "adam_step": [
        adam_textbook,
        adam_torch_style,
        adam_numpy,
        adam_loops,
        adam_wrapping_torch_optim,
    ],
    "warmup_cosine_lr": [schedule_closed_form, schedule_cos_squared, schedule_from_torch],
}
CORRECT_CASES = [(ex, fn) for ex, fns in CORRECT.items() for fn in fns]


@pytest.mark.parametrize(
    ("exercise_id", "fn"), CORRECT_CASES, ids=[f.__name__ for _, f in CORRECT_CASES]
)
def test_correct_implementation_passes_on_every_seed(exercise_id, fn):
    for seed in SEEDS:
        report = cu.check(exercise_id, fn, seed=seed, strict=True)
        assert report.passed


# =====================================================================================
# Planted mistakes
# =====================================================================================


def _sgd_learner(flaw: str):
    """A learner's SGD with one mistake in it, written as a learner would."""

    def sgd(
        param,
        grad,
        momentum_buffer,
        lr,
        momentum=0.0,
        dampening=0.0,
        nesterov=False,
        weight_decay=0.0,
    ):
        g = grad
        if flaw == "wd_sign":
            g = g - weight_decay * param
        elif flaw not in ("wd_after_momentum", "wd_ignored"):
            g = g + weight_decay * param
        if flaw == "uniform_buffer":  # no `if momentum != 0` branch
            buf = g if momentum_buffer is None else momentum * momentum_buffer + (1 - dampening) * g
            return param - lr * buf, buf
        if momentum == 0:
            if flaw == "wd_after_momentum":
                g = g + weight_decay * param
            return (param + lr * g if flaw == "sign" else param - lr * g), None
        if flaw == "inplace_buffer" and momentum_buffer is not None:
            buf = momentum_buffer.mul_(momentum).add_(g, alpha=1 - dampening)
        elif flaw == "zero_init":
            prev = torch.zeros_like(g) if momentum_buffer is None else momentum_buffer
            buf = momentum * prev + (1 - dampening) * g
        elif flaw == "dampening_swapped":
            buf = g if momentum_buffer is None else momentum * momentum_buffer + dampening * g
        elif flaw == "ema":
            prev = torch.zeros_like(g) if momentum_buffer is None else momentum_buffer
            buf = momentum * prev + (1 - momentum) * g
        elif flaw == "restart":
            buf = g
        elif flaw == "lr_in_buffer":
            buf = (
                lr * g
                if momentum_buffer is None
                else momentum * momentum_buffer + lr * (1 - dampening) * g
            )
            return param - buf, buf
        else:
            buf = g if momentum_buffer is None else momentum * momentum_buffer + (1 - dampening) * g
        if nesterov and flaw == "nesterov_old":
            d = g + momentum * (
                momentum_buffer if momentum_buffer is not None else torch.zeros_like(g)
            )
        elif nesterov and flaw != "nesterov_buffer":
            d = g + momentum * buf
        else:
            d = buf
        if flaw == "wd_after_momentum":
            d = d + weight_decay * param
        if flaw == "sign":
            return param + lr * d, buf
        if flaw == "buffer_not_returned":
            return param - lr * d, momentum_buffer
        if flaw == "inplace_param":
            return param.sub_(lr * d), buf
        return param - lr * d, buf

    sgd.__name__ = f"sgd_{flaw}"
    return sgd


def _sgd_float64_only(
    param, grad, momentum_buffer, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0
):
    """Correct numbers, but always float64 (numpy without casting back)."""
    p, b = ch08.ref_sgd_step(
        param.double(),
        grad.double(),
        None if momentum_buffer is None else momentum_buffer.double(),
        lr,
        momentum,
        dampening,
        nesterov,
        weight_decay,
    )
    return p, b


SGD_MISTAKES = [
    (_sgd_learner("sign"), "the step went uphill"),
    (_sgd_learner("zero_init"), "dampening was applied on the first step"),
    (_sgd_learner("dampening_swapped"), r"scaled by dampening instead of \(1 - dampening\)"),
    (_sgd_learner("ema"), "exponential moving average"),
    (
        _sgd_learner("uniform_buffer"),
        "the buffer update \\(with dampening\\) ran although momentum=0",
    ),
    (_sgd_learner("wd_after_momentum"), "weight decay was kept out of the momentum buffer"),
    (_sgd_learner("wd_sign"), "weight decay has the wrong sign"),
    (_sgd_learner("wd_ignored"), "weight_decay was ignored"),
    (_sgd_learner("nesterov_buffer"), "nesterov=True stepped along the buffer"),
    (_sgd_learner("nesterov_old"), "nesterov=True stepped along the buffer"),
    (_sgd_learner("lr_in_buffer"), "the buffer holds the learning rate too"),
    (_sgd_learner("restart"), "restarted from the gradient on every step"),
    (_sgd_learner("buffer_not_returned"), "`momentum_buffer` came back None although momentum=0.9"),
    (_sgd_learner("inplace_buffer"), "changed its input `momentum_buffer` in place"),
    (_sgd_learner("inplace_param"), "changed its input `param` in place"),
    (_sgd_float64_only, "`param` should have dtype float32"),
]


def _adam_learner(flaw: str):
    """A learner's Adam / AdamW with one mistake in it."""

    def adam(
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        step,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        decoupled=False,
    ):
        b1, b2 = betas
        if flaw == "betas_swapped":
            b1, b2 = b2, b1
        l2 = {"adamw_as_l2": True, "adam_decoupled": False}.get(flaw, not decoupled)
        g_m = g_v = grad
        if flaw == "wd_ignored":
            pass
        elif l2:
            g_m = grad + weight_decay * param
            g_v = grad if flaw == "l2_m_only" else g_m
        elif flaw == "adamw_no_lr":
            param = param * (1 - weight_decay)
        elif flaw != "adamw_after":
            param = param * (1 - lr * weight_decay)
        if flaw == "no_one_minus":
            m, v = b1 * exp_avg + g_m, b2 * exp_avg_sq + g_v * g_v
        elif flaw == "v_of_grad":
            m, v = b1 * exp_avg + (1 - b1) * g_m, b2 * exp_avg_sq + (1 - b2) * g_v
        elif flaw == "v_of_abs":
            m, v = b1 * exp_avg + (1 - b1) * g_m, b2 * exp_avg_sq + (1 - b2) * g_v.abs()
        else:
            m, v = b1 * exp_avg + (1 - b1) * g_m, b2 * exp_avg_sq + (1 - b2) * g_v * g_v
        mm, vv = (exp_avg, exp_avg_sq) if flaw == "stale" else (m, v)
        t = {"step_from_zero": step - 1, "step_plus_one": step + 1}.get(flaw, step)
        m_hat = mm if flaw in ("no_bias", "no_bias_m") else mm / (1 - b1**t)
        v_hat = vv if flaw in ("no_bias", "no_bias_v") else vv / (1 - b2**t)
        if flaw == "bias_v_no_sqrt":
            denom = vv.sqrt() / (1 - b2**t) + eps
        elif flaw == "eps_inside":
            denom = torch.sqrt(v_hat + eps)
        elif flaw == "eps_hat":  # Kingma & Ba's "efficient" version
            new = param - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * mm / (vv.sqrt() + eps)
            return new, m, v
        elif flaw == "no_eps":
            denom = v_hat.sqrt()
        else:
            denom = v_hat.sqrt() + eps
        new = param + lr * m_hat / denom if flaw == "sign" else param - lr * m_hat / denom
        if flaw == "adamw_after" and decoupled:
            new = new * (1 - lr * weight_decay)
        if flaw == "moments_not_returned":
            return new, exp_avg, exp_avg_sq
        if flaw == "inplace_moments":
            exp_avg.copy_(m)
            return new, exp_avg, v
        return new, m, v

    adam.__name__ = f"adam_{flaw}"
    return adam


ADAM_MISTAKES = [
    (_adam_learner("adamw_as_l2"), r"decoupled=True added weight_decay \* param to the gradient"),
    (_adam_learner("adam_decoupled"), "decoupled=False decayed the parameter directly"),
    (_adam_learner("no_bias"), "there is no bias correction"),
    (_adam_learner("no_bias_m"), "exp_avg was not bias-corrected"),
    (_adam_learner("no_bias_v"), "exp_avg_sq was not bias-corrected"),
    (_adam_learner("bias_v_no_sqrt"), "the bias correction of v sits inside the square root"),
    (_adam_learner("step_from_zero"), "if the step is counted from 0"),
    (_adam_learner("step_plus_one"), r"the bias correction used step \+ 1"),
    (_adam_learner("eps_inside"), "eps was added inside the square root"),
    (_adam_learner("eps_hat"), "before the bias correction \\(Kingma & Ba's 'efficient' form"),
    (_adam_learner("no_eps"), "eps is missing from the denominator"),
    (_adam_learner("betas_swapped"), "beta1 and beta2 are swapped"),
    (_adam_learner("v_of_grad"), "`exp_avg_sq` has negative entries"),
    (_adam_learner("v_of_abs"), r"exp_avg_sq averages \|grad\|"),
    (_adam_learner("no_one_minus"), r"was not scaled by \(1 - beta\)"),
    (_adam_learner("stale"), "from before this step's update"),
    (_adam_learner("sign"), "the step went uphill"),
    (_adam_learner("adamw_no_lr"), "AdamW's decay ignored the learning rate"),
    (_adam_learner("adamw_after"), "applied to the already updated parameter"),
    (_adam_learner("wd_ignored"), "weight_decay was ignored"),
    (_adam_learner("l2_m_only"), "the L2 term entered exp_avg but not exp_avg_sq"),
    (_adam_learner("moments_not_returned"), "`exp_avg` is wrong"),
    (_adam_learner("inplace_moments"), "changed its input `exp_avg` in place"),
]


def _schedule_learner(flaw: str):
    def lr_at(step, warmup_steps, total_steps, base_lr, min_lr=0.0):
        w, n = warmup_steps, total_steps
        if step < w:
            if flaw == "from_zero":
                return base_lr * step / w
            if flaw == "early":
                return base_lr * (step + 1) / w
            return base_lr * (step + 1) / (w + 1)
        x = (step - w) / (n - w)
        if flaw == "over_total":
            x = (step - w) / n
        if flaw == "unshifted":
            x = step / n
        if flaw == "linear":
            return min_lr + (base_lr - min_lr) * (1 - x)
        c = 0.5 * (1 + math.cos((2 * math.pi if flaw == "full_period" else math.pi) * x))
        if flaw == "no_min":
            return base_lr * c
        if flaw == "min_on_top":
            return min_lr + base_lr * c
        if flaw == "tensor":
            return torch.tensor([min_lr + (base_lr - min_lr) * c, 0.0])
        return min_lr + (base_lr - min_lr) * c

    lr_at.__name__ = f"schedule_{flaw}"
    return lr_at


SCHEDULE_MISTAKES = [
    (_schedule_learner("from_zero"), "the warm-up starts at 0"),
    (_schedule_learner("early"), "reaches base_lr one step early"),
    (
        _schedule_learner("over_total"),
        "divided by total_steps instead of total_steps - warmup_steps",
    ),
    (_schedule_learner("unshifted"), "did not subtract the warm-up"),
    (_schedule_learner("linear"), "the decay is linear"),
    (_schedule_learner("full_period"), "runs a full period"),
    (_schedule_learner("no_min"), "min_lr was ignored"),
    (_schedule_learner("min_on_top"), "min_lr was added on top"),
    (_schedule_learner("tensor"), "should be a float, but it is a Tensor"),
]

MISTAKES = (
    [("sgd_step", f, p) for f, p in SGD_MISTAKES]
    + [("adam_step", f, p) for f, p in ADAM_MISTAKES]
    + [("warmup_cosine_lr", f, p) for f, p in SCHEDULE_MISTAKES]
)


@pytest.mark.parametrize(
    ("exercise_id", "fn", "pattern"), MISTAKES, ids=[f.__name__ for _, f, _ in MISTAKES]
)
@pytest.mark.forbidden_calls_allowed
def test_planted_mistake_is_named(exercise_id, fn, pattern):
    for seed in MISTAKE_SEEDS:
        with pytest.raises(cu.CheckFailure, match=pattern) as info:
            cu.check(exercise_id, fn, seed=seed, strict=True)
        message = str(info.value)
        assert message.startswith(f"{exercise_id}: in case "), message
        assert "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize(
    ("exercise_id", "fn", "pattern"), MISTAKES, ids=[f.__name__ for _, f, _ in MISTAKES]
)
def test_planted_mistake_really_is_wrong(exercise_id, fn, pattern):
    """Guard against a test that cannot fail: each mistake disagrees with torch somewhere."""
    del pattern
    ref = cu.reference(exercise_id)
    gen = torch.Generator().manual_seed(5)
    if exercise_id == "warmup_cosine_lr":
        calls = [(s, 3, 12, 1.0, 0.1) for s in range(13)]
        assert any(not isinstance(fn(*a), float) or abs(fn(*a) - ref(*a)) > 1e-9 for a in calls)
        return
    dtype = torch.float32 if fn is _sgd_float64_only else torch.float64
    p = torch.randn(4, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(4, generator=gen, dtype=torch.float64).to(dtype)
    if exercise_id == "sgd_step":
        grid = [
            dict(momentum=m, dampening=d, nesterov=n, weight_decay=w)
            for m in (0.0, 0.9)
            for d in (0.0, 0.5)
            for n in (False, True)
            for w in (0.0, 0.1)
            if not (n and (m == 0 or d != 0))
        ]
        two_steps = []
        for kw in grid:
            for f in (fn, ref):
                p1, b1 = f(p.clone(), g.clone(), None, 0.1, **kw)
                p2, b2 = f(
                    p1.clone(), g.clone() * 0.5, None if b1 is None else b1.clone(), 0.2, **kw
                )
                two_steps.append((p1, b1, p2, b2))
        pairs = zip(two_steps[0::2], two_steps[1::2], strict=True)
    else:
        z = torch.zeros(4, dtype=torch.float64)
        two_steps = []
        for kw in (
            dict(lr=0.1, betas=(0.9, 0.99), eps=0.1, weight_decay=0.1, decoupled=d)
            for d in (False, True)
        ):
            for f in (fn, ref):
                p1, m1, v1 = f(p.clone(), g.clone(), z.clone(), z.clone(), 1, **kw)
                p2, m2, v2 = f(p1.clone(), -g.clone(), m1.clone(), v1.clone(), 2, **kw)
                two_steps.append((p1, m1, v1, p2, m2, v2))
        pairs = zip(two_steps[0::2], two_steps[1::2], strict=True)
    differs = False
    for got, want in pairs:
        for a, b in zip(got, want, strict=True):
            if (a is None) != (b is None):
                differs = True
            elif a is not None and (
                a.dtype != b.dtype or not torch.allclose(a, b, rtol=1e-6, atol=1e-9)
            ):
                differs = True
    in_place = fn.__name__.startswith(("sgd_inplace", "adam_inplace"))
    assert differs or in_place, (
        f"{fn.__name__} agrees with the reference: its test could never fail"
    )


def test_in_place_mistakes_really_change_their_input():
    p, g = torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    buf = torch.ones(3, dtype=torch.float64)
    _sgd_learner("inplace_buffer")(p.clone(), g, buf, 0.1, momentum=0.9)
    assert not torch.equal(buf, torch.ones(3, dtype=torch.float64))
    _sgd_learner("inplace_param")(p, g, None, 0.1, momentum=0.9)
    assert not torch.equal(p, torch.ones(3, dtype=torch.float64))
    m = torch.zeros(3, dtype=torch.float64)
    _adam_learner("inplace_moments")(torch.ones(3, dtype=torch.float64), g, m, m.clone(), 1)
    assert not torch.equal(m, torch.zeros(3, dtype=torch.float64))


# =====================================================================================
# The references and the schedule composition agree with torch itself
# =====================================================================================


@pytest.mark.parametrize(
    ("w", "total", "base", "lo"), [(5, 30, 0.1, 0.0), (0, 12, 1.0, 0.2), (7, 9, 3.0, 1.0)]
)
def test_reference_schedule_is_the_torch_composition(w, total, base, lo):
    want = ch08.torch_warmup_cosine(w, total, base, lo)
    got = [ch08.ref_warmup_cosine_lr(s, w, total, base, lo) for s in range(total + 1)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_exercises_of_chapter_08_are_registered_with_their_contract():
    listed = {e.id: e.signature for e in cu.exercises("08")}
    assert listed == {
        "sgd_step": (
            "(param, grad, momentum_buffer or None, lr, momentum=0.0, dampening=0.0, nesterov=False, "
            "weight_decay=0.0) -> (param, momentum_buffer)"
        ),
        "adam_step": (
            "(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, "
            "weight_decay=0.0, decoupled=False) -> (param, exp_avg, exp_avg_sq)"
        ),
        "warmup_cosine_lr": "(step, warmup_steps, total_steps, base_lr, min_lr=0.0) -> float",
    }


# =====================================================================================
# Stubs
# =====================================================================================
