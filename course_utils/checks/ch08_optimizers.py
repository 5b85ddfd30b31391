"""Check batteries of chapter 08: sgd_step, adam_step and warmup_cosine_lr against torch.optim.

Each optimizer battery runs whole trajectories. A parameter starts at the same point for
the learner and for ``torch.optim.SGD`` / ``Adam`` / ``AdamW``; at every step the gradient
is that of a noisy quadratic at the *current* parameter (``g_k = curvature * p_k + noise_k``),
so a mistake in one step changes every later gradient. The learner's own outputs (parameter,
buffers) are fed back into the next call, exactly as a training loop would, and every step is
compared with PyTorch's state. On the first step that disagrees, the message names the step,
the quantity, and which known mistake (run through the same trajectory) reproduces it.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checking import CheckFailure, Tester, exercise
from ..distributed import load_optimizer_machinery
from ..gradcheck import compare

CHAPTER = "08_optimizers"
Tensor = torch.Tensor


# ---- reference implementations ---------------------------------------------------------
def ref_sgd_step(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> tuple[Tensor, Tensor | None]:
    """One step of torch.optim.SGD; the buffer is None when momentum == 0 (torch keeps none)."""
    g = grad + weight_decay * param if weight_decay != 0 else grad
    buf = None
    if momentum != 0:
        if momentum_buffer is None:
            buf = g.clone()  # first step: the buffer starts at the gradient, undamped
        else:
            buf = momentum * momentum_buffer + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    return param - lr * g, buf


def ref_adam_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of torch.optim.Adam (decoupled=False) or AdamW (True); ``step`` counts from 1."""
    beta1, beta2 = betas
    if weight_decay != 0:
        if decoupled:
            param = param * (1 - lr * weight_decay)
        else:
            grad = grad + weight_decay * param
    m = beta1 * exp_avg + (1 - beta1) * grad
    v = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    bias1 = 1 - beta1**step
    bias2 = 1 - beta2**step
    denom = v.sqrt() / math.sqrt(bias2) + eps
    return param - (lr / bias1) * m / denom, m, v


def ref_warmup_cosine_lr(
    step: int, warmup_steps: int, total_steps: int, base_lr: float, min_lr: float = 0.0
) -> float:
    """Linear warm-up base_lr*(step+1)/(warmup_steps+1), then a cosine half-wave down to min_lr."""
    if step < warmup_steps:
        return base_lr * (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


# ---- trajectories on a noisy quadratic ---------------------------------------------------
@dataclass
class _Case:
    """One trajectory: start point, per-step learning rates, gradient model and hyper-parameters."""

    name: str
    p0: Tensor
    curvature: Tensor  # same shape as p0: g = curvature * p + noise[k]
    noise: Tensor  # (steps, *p0.shape)
    lrs: list[float]
    hyper: dict[str, Any] = field(default_factory=dict)
    pass_lr_by_default: bool = False  # Adam's "defaults" case leaves lr out of the call

    def grad(self, p: Tensor, k: int) -> Tensor:
        return self.curvature * p.detach() + self.noise[k]

    @property
    def steps(self) -> int:
        return len(self.lrs)


def _make_case(
    t: Tester,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    lrs: list[float],
    hyper: dict[str, Any],
    *,
    grad_scale: float = 1.0,
    frozen: Tensor | None = None,
    pass_lr_by_default: bool = False,
) -> _Case:
    steps = len(lrs)
    curvature = (0.5 + 1.5 * t.rand(*shape)) * grad_scale  # eigenvalues of the Hessian in [0.5, 2]
    noise = t.randn(steps, *shape, scale=grad_scale)
    if frozen is not None:  # coordinates whose gradient is exactly 0 at every step
        curvature = curvature.masked_fill(frozen, 0.0)
        noise = noise.masked_fill(frozen, 0.0)
    return _Case(
        name,
        t.randn(*shape).to(dtype),
        curvature.to(dtype),
        noise.to(dtype),
        lrs,
        hyper,
        pass_lr_by_default,
    )


def _schedule(steps: int, peak: float) -> list[float]:
    """A learning rate that warms up for 5 steps and then decays (tests lr changing per call)."""
    return [peak * min(1.0, (k + 1) / 5) * (0.9 ** max(0, k - 5)) for k in range(steps)]


def _describe_hyper(hyper: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in hyper.items())


def _torch_trajectory(
    case: _Case, make_opt: Callable[[list[Tensor], float], Any], names: tuple[str, ...]
) -> list[dict]:
    p = case.p0.clone().requires_grad_(True)
    opt = make_opt([p], case.lrs[0])
    out = []
    for k, lr in enumerate(case.lrs):
        opt.param_groups[0]["lr"] = lr
        p.grad = case.grad(p, k)
        opt.step()
        state = opt.state[p]
        row = {"param": p.detach().clone()}
        for name in names:
            value = state.get(name)
            row[name] = None if value is None else value.detach().clone()
        out.append(row)
    return out


def _judge_trajectory(
    t: Tester,
    case: _Case,
    learner_steps: Callable[[], Any],
    expected: list[dict],
    quantities: tuple[str, ...],
    mistakes: list[tuple[str, Callable[[], list[dict]]]],
) -> None:
    """Run the learner's trajectory; fail at the first step that disagrees with torch.

    After the first disagreement the learner's trajectory is run to the end, and a known
    mistake is named only if its own trajectory reproduces the learner's on every step and
    every quantity (one step alone often cannot tell two mistakes apart).
    """
    dtype = case.p0.dtype
    tol = {}
    for q in quantities:
        values = [row[q] for row in expected if row[q] is not None]
        scale = max(float(v.abs().max()) for v in values) if values else 1.0
        tol[q] = t.tolerances(dtype, scale)
    seen: list[dict] = []
    first_bad: tuple[int, str] | None = None
    steps = learner_steps()
    while True:
        try:
            got = next(steps)
        except StopIteration:
            break
        except CheckFailure:
            if first_bad is None:
                raise
            break  # the learner's trajectory broke down after it had already gone wrong
        seen.append(got)
        if first_bad is None:
            k = len(seen) - 1
            for q in quantities:
                exp = expected[k][q]
                if exp is not None and not compare(got[q], exp, *tol[q]).ok:
                    first_bad = (k, q)
                    break
    if first_bad is not None:
        k, q = first_bad
        step_case = f"{case.name}, step {k + 1} of {case.steps}"
        _explain_nonfinite(t, step_case, q, seen[k][q], expected[k][q], case, k)
        culprit = _matching_mistake(seen, expected, quantities, tol, mistakes)
        rtol, atol = tol[q]
        t.compare(
            step_case,
            q,
            seen[k][q],
            expected[k][q],
            rtol=rtol,
            atol=atol,
            mistakes=[] if culprit is None else [(culprit[0], culprit[1][k][q])],
        )
    for q in quantities:
        rows = [
            (row[q], exp[q]) for row, exp in zip(seen, expected, strict=True) if exp[q] is not None
        ]
        if rows:
            got_q = torch.stack([g for g, _ in rows])
            exp_q = torch.stack([e for _, e in rows])
            t.compare(
                f"{case.name}, all {case.steps} steps",
                q,
                got_q,
                exp_q,
                rtol=tol[q][0],
                atol=tol[q][1],
            )


def _matching_mistake(
    seen: list[dict],
    expected: list[dict],
    quantities: tuple[str, ...],
    tol: dict[str, tuple[float, float]],
    mistakes: list[tuple[str, Callable[[], list[dict]]]],
) -> tuple[str, list[dict]] | None:
    """The first mistake whose trajectory agrees with the learner's wherever torch's is judged."""
    for sentence, run in mistakes:
        try:
            traj = run()
        except Exception:  # noqa: BLE001 - a mistake model that cannot run matches nothing
            continue
        # A model that agrees with torch on this case says nothing about the learner's error.
        if all(
            expected[j][q] is None
            or (torch.is_tensor(traj[j][q]) and compare(traj[j][q], expected[j][q], *tol[q]).ok)
            for j in range(len(seen))
            for q in quantities
        ):
            continue
        agrees = True
        for j, row in enumerate(seen):
            for q in quantities:
                alt = traj[j][q]
                if expected[j][q] is None:
                    continue
                if not torch.is_tensor(alt) or alt.shape != row[q].shape:
                    agrees = False
                elif not compare(row[q], alt.to(row[q].dtype), tol[q][0] * 2, tol[q][1] * 10).ok:
                    agrees = False
                if not agrees:
                    break
            if not agrees:
                break
        if agrees:
            return sentence, traj
    return None


def _explain_nonfinite(
    t: Tester, case: str, q: str, got: Tensor, exp: Tensor, traj: _Case, k: int
) -> None:
    g = got.detach()
    if torch.isfinite(g).all() or not torch.isfinite(exp).all():
        return
    if q == "param":
        frozen = (traj.curvature == 0) & (traj.noise[: k + 1] == 0).all(0)
        bad = ~torch.isfinite(g)
        if frozen.any() and bool((bad <= frozen).all()):
            t.fail(
                case,
                "`param` has NaN exactly at the coordinates whose gradient has always been 0, where "
                "exp_avg and exp_avg_sq are 0: 0 / 0. Add eps to the denominator, sqrt(v_hat) + eps.",
            )
        if k == 0:
            t.fail(
                case,
                "`param` has NaN or inf after the first step: a bias correction 1 - beta**step is 0 "
                "there if the step is counted from 0. `step` is 1 on the first update; use beta**step.",
            )


# ---- SGD -----------------------------------------------------------------------------
SGD_MISTAKES = {
    "sign": "the step went uphill: param + lr * direction. Gradient descent subtracts lr times the direction.",
    "damp_first": (
        "dampening was applied on the first step. torch.optim.SGD sets the buffer to the gradient itself "
        "on the first step (momentum_buffer is None) and uses dampening only from the second step on."
    ),
    "damp_swapped": "the gradient was scaled by dampening instead of (1 - dampening) in the buffer update.",
    "ema": (
        "the buffer is an exponential moving average, momentum*buf + (1 - momentum)*g, started from 0. "
        "torch.optim.SGD accumulates momentum*buf + (1 - dampening)*g and starts from buf = g."
    ),
    "damp_without_momentum": (
        "the buffer update (with dampening) ran although momentum=0. With momentum 0 torch.optim.SGD "
        "keeps no buffer and ignores dampening: the step is just param - lr * g."
    ),
    "wd_outside": (
        "weight decay was kept out of the momentum buffer (applied to the param directly, after momentum, "
        "as decoupled decay). torch.optim.SGD adds weight_decay * param to the gradient first, and the "
        "buffer accumulates that sum."
    ),
    "wd_sign": "weight decay has the wrong sign: the gradient gets + weight_decay * param.",
    "wd_ignored": "weight_decay was ignored: the gradient gets + weight_decay * param before anything else.",
    "nesterov_ignored": (
        "nesterov=True stepped along the buffer (the same as g + momentum * the buffer from before "
        "this step's update). Nesterov's direction in torch is g + momentum * buf, with buf already updated."
    ),
    "lr_in_buf": (
        "the buffer holds the learning rate too (buf = momentum*buf + lr*g, param - buf: Sutskever's "
        "form). torch.optim.SGD keeps lr out of the buffer and multiplies at the end; the two agree "
        "only while lr never changes."
    ),
    "buf_restarted": (
        "the buffer was restarted from the gradient on every step. Only the first step (momentum_buffer "
        "is None) sets buf = g; later steps use momentum * buf + (1 - dampening) * g."
    ),
}


def _sgd_flawed(flaw: str) -> Callable[..., tuple[Tensor, Tensor | None]]:
    def step(param, grad, buf, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
        sign = -1.0 if flaw == "wd_sign" else 1.0
        g = grad if flaw in ("wd_outside", "wd_ignored") else grad + sign * weight_decay * param
        new = None
        if momentum != 0 or flaw == "damp_without_momentum":
            scale = lr if flaw == "lr_in_buf" else 1.0
            keep = dampening if flaw == "damp_swapped" else 1 - dampening
            if flaw == "ema":
                new = momentum * (torch.zeros_like(g) if buf is None else buf) + (1 - momentum) * g
            elif buf is None or flaw == "buf_restarted":
                new = (keep if flaw == "damp_first" else 1.0) * scale * g
            else:
                new = momentum * buf + keep * scale * g
            if nesterov and flaw != "nesterov_ignored":
                d = g + momentum * new
            else:
                d = new
        else:
            d = g
        if flaw == "wd_outside":
            d = d + weight_decay * param
        if flaw == "lr_in_buf":
            return param - d, new
        return (param + lr * d if flaw == "sign" else param - lr * d), new

    return step


def _sgd_cases(t: Tester) -> list[_Case]:
    n = 30
    f64, f32 = torch.float64, torch.float32
    lr = [0.1] * n
    grid = [
        ({"momentum": 0.0, "dampening": 0.5}, (3, 4), f64, lr),
        ({"momentum": 0.0, "weight_decay": 0.1}, (3, 4), f64, lr),
        ({"momentum": 0.9}, (3, 4), f64, lr),
        ({"momentum": 0.9, "dampening": 0.5}, (3, 4), f64, lr),
        ({"momentum": 0.9, "nesterov": True}, (3, 4), f64, lr),
        ({"momentum": 0.9, "weight_decay": 0.1}, (3, 4), f64, lr),
        ({"momentum": 0.9, "dampening": 0.5, "weight_decay": 0.1}, (7,), f64, lr),
        ({"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}, (2, 3, 2), f64, lr),
        ({"momentum": 0.0, "dampening": 0.5, "weight_decay": 0.1}, (5,), f64, [0.05] * n),
        ({"momentum": 0.5}, (3, 4), f64, _schedule(n, 0.3)),
        ({"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}, (4, 5), f32, [0.05] * n),
        ({"momentum": 0.9, "dampening": 0.5}, (4, 5), f32, _schedule(n, 0.2)),
    ]
    cases = [
        _make_case(
            t,
            f"param (3, 4) float64, lr=0.1, defaults (no momentum), {n} steps",
            (3, 4),
            f64,
            lr,
            {},
        )
    ]
    for hyper, shape, dtype, lrs in grid:
        full = {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0, **hyper}
        lr_text = f"lr={lrs[0]}" if len(set(lrs)) == 1 else "lr changing every step"
        name = f"param {shape} {str(dtype)[6:]}, {lr_text}, {_describe_hyper(full)}, {n} steps"
        cases.append(_make_case(t, name, shape, dtype, lrs, full))
    return cases


def _run_sgd(fn: Callable, case: _Case, call: Callable | None = None) -> list[dict]:
    """The trajectory of ``fn`` with its own outputs fed back (no judging)."""
    p, buf, out = case.p0.clone(), None, []
    for k, lr in enumerate(case.lrs):
        p, buf = fn(p, case.grad(p, k), buf, lr, **case.hyper)
        out.append({"param": p, "momentum_buffer": buf})
    return out


@exercise(
    "sgd_step",
    chapter=CHAPTER,
    signature=(
        "(param, grad, momentum_buffer or None, lr, momentum=0.0, dampening=0.0, nesterov=False, "
        "weight_decay=0.0) -> (param, momentum_buffer)"
    ),
    summary="one step of torch.optim.SGD (momentum, dampening, Nesterov, L2 weight decay, first-step rule)",
    reference=ref_sgd_step,
)
def check_sgd_step(t: Tester) -> None:
    """30-step trajectories on a noisy quadratic against torch.optim.SGD over a hyper-parameter grid."""
    load_optimizer_machinery()
    for case in _sgd_cases(t):
        h = case.hyper
        momentum = h.get("momentum", 0.0)

        def make_opt(params, lr, h=h):
            return torch.optim.SGD(params, lr=lr, foreach=False, **h)

        expected = _torch_trajectory(case, make_opt, ("momentum_buffer",))

        def learner_steps(case=case, momentum=momentum):
            p, buf = case.p0.clone(), None
            shape, dtype = tuple(case.p0.shape), case.p0.dtype
            for k, lr in enumerate(case.lrs):
                step_case = f"{case.name}, step {k + 1} of {case.steps}"
                out = t.call(step_case, p, case.grad(p, k), buf, lr, **case.hyper)
                new_p, new_buf = t.unpack(step_case, out, ("param", "momentum_buffer"))
                new_p = t.expect_tensor(step_case, "param", new_p, shape=shape, dtype=dtype)
                if momentum != 0:
                    if new_buf is None:
                        t.fail(
                            step_case,
                            f"`momentum_buffer` came back None although momentum={momentum}. Return the "
                            "updated buffer (on the first step, the gradient itself) so the next step can use it.",
                        )
                    new_buf = t.expect_tensor(
                        step_case, "momentum_buffer", new_buf, shape=shape, dtype=dtype
                    )
                elif new_buf is not None and not torch.is_tensor(new_buf):
                    t.fail(
                        step_case,
                        f"`momentum_buffer` should be None (momentum is 0, so torch keeps no buffer) or a "
                        f"tensor, but it is a {type(new_buf).__name__}.",
                    )
                p, buf = new_p, new_buf
                yield {"param": p, "momentum_buffer": buf}

        mistakes = [
            (sentence, lambda flaw=flaw, case=case: _run_sgd(_sgd_flawed(flaw), case))
            for flaw, sentence in SGD_MISTAKES.items()
        ]
        quantities = ("param", "momentum_buffer") if momentum != 0 else ("param",)
        # The buffer is judged before the param: a wrong buffer explains a wrong step.
        _judge_trajectory(t, case, learner_steps, expected, quantities[::-1], mistakes)


# ---- Adam and AdamW -----------------------------------------------------------------
ADAM_MISTAKES = {
    "l2_in_adamw": (
        "decoupled=True added weight_decay * param to the gradient (L2, Adam's rule). AdamW decays the "
        "parameter itself, param * (1 - lr * weight_decay), and leaves the gradient alone."
    ),
    "decoupled_in_adam": (
        "decoupled=False decayed the parameter directly (AdamW's rule). torch.optim.Adam adds "
        "weight_decay * param to the gradient before the moments are updated."
    ),
    "no_bias": "there is no bias correction: the step should use m / (1 - beta1**step) and v / (1 - beta2**step).",
    "no_bias_m": "exp_avg was not bias-corrected: divide the step by 1 - beta1**step.",
    "no_bias_v": "exp_avg_sq was not bias-corrected: divide sqrt(exp_avg_sq) by sqrt(1 - beta2**step).",
    "bias_v_no_sqrt": (
        "sqrt(exp_avg_sq) was divided by 1 - beta2**step; the bias correction of v sits inside the "
        "square root, so sqrt(v) is divided by sqrt(1 - beta2**step)."
    ),
    "step_plus_one": (
        "the bias correction used step + 1. `step` already counts from 1 on the first update: "
        "use 1 - beta**step."
    ),
    "eps_inside": "eps was added inside the square root; torch uses sqrt(v_hat) + eps.",
    "eps_hat": (
        "eps was added to sqrt(exp_avg_sq) before the bias correction (Kingma & Ba's 'efficient' form, "
        "as TensorFlow does, which amounts to eps / sqrt(1 - beta2**step)). torch adds eps after it: "
        "sqrt(exp_avg_sq) / sqrt(1 - beta2**step) + eps."
    ),
    "no_eps": "eps is missing from the denominator: torch divides by sqrt(v_hat) + eps.",
    "betas_swapped": "beta1 and beta2 are swapped: beta1 belongs to exp_avg (the mean), beta2 to exp_avg_sq.",
    "v_abs": "exp_avg_sq averages |grad|, not the squared gradient grad * grad.",
    "no_one_minus": "the new gradient was not scaled by (1 - beta) in the moment updates: m = beta1*m + (1 - beta1)*g.",
    "stale": (
        "the step used exp_avg and exp_avg_sq from before this step's update; update the moments with "
        "this gradient first, then step."
    ),
    "sign": "the step went uphill: param + step. Adam subtracts lr * m_hat / (sqrt(v_hat) + eps).",
    "adamw_no_lr": "AdamW's decay ignored the learning rate: torch multiplies param by 1 - lr * weight_decay.",
    "adamw_after": (
        "AdamW's decay was applied to the already updated parameter. torch decays the old parameter: "
        "param * (1 - lr * weight_decay) - lr * m_hat / (sqrt(v_hat) + eps)."
    ),
    "wd_ignored": (
        "weight_decay was ignored. Adam adds weight_decay * param to the gradient; AdamW (decoupled=True) "
        "multiplies param by 1 - lr * weight_decay."
    ),
    "l2_m_only": "the L2 term entered exp_avg but not exp_avg_sq: Adam adds it to the gradient, which feeds both moments.",
}


def _adam_flawed(flaw: str) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    def step(
        param,
        grad,
        m,
        v,
        step,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        decoupled=False,
    ):
        b1, b2 = betas[::-1] if flaw == "betas_swapped" else betas
        if flaw == "l2_in_adamw" and decoupled or flaw == "decoupled_in_adam" and not decoupled:
            decoupled = not decoupled
        weight_decay = 0.0 if flaw == "wd_ignored" else weight_decay
        g_v = grad
        if weight_decay != 0 and not decoupled:
            grad = grad + weight_decay * param
            g_v = g_v if flaw == "l2_m_only" else grad
        if weight_decay != 0 and decoupled and flaw != "adamw_after":
            param = param * (1 - (1.0 if flaw == "adamw_no_lr" else lr) * weight_decay)
        a1, a2 = (1.0, 1.0) if flaw == "no_one_minus" else (1 - b1, 1 - b2)
        sq = g_v.abs() if flaw == "v_abs" else g_v * g_v
        m_new, v_new = b1 * m + a1 * grad, b2 * v + a2 * sq
        mm, vv = (m, v) if flaw == "stale" else (m_new, v_new)
        s = step + 1 if flaw == "step_plus_one" else step
        bc1 = 1.0 if flaw in ("no_bias", "no_bias_m") else 1 - b1**s
        bc2 = 1.0 if flaw in ("no_bias", "no_bias_v") else 1 - b2**s
        if flaw == "eps_inside":
            denom = (vv / bc2 + eps).sqrt()
        elif flaw == "eps_hat":
            denom = (vv.sqrt() + eps) / math.sqrt(bc2)
        elif flaw == "bias_v_no_sqrt":
            denom = vv.sqrt() / bc2 + eps
        elif flaw == "no_eps":
            denom = vv.sqrt() / math.sqrt(bc2)
        else:
            denom = vv.sqrt() / math.sqrt(bc2) + eps
        update = lr / bc1 * mm / denom
        new = param + update if flaw == "sign" else param - update
        if flaw == "adamw_after" and weight_decay != 0 and decoupled:
            new = new * (1 - lr * weight_decay)
        return new, m_new, v_new

    return step


def _adam_cases(t: Tester) -> list[_Case]:
    n = 30
    f64, f32 = torch.float64, torch.float32
    frozen = torch.zeros(3, 4, dtype=torch.bool)
    frozen[0, 1] = frozen[2, 3] = True
    cases = [
        _make_case(
            t,
            f"param (3, 4) float64, defaults (lr=1e-3, betas=(0.9, 0.999), eps=1e-8), {n} steps",
            (3, 4),
            f64,
            [1e-3] * n,
            {},
            pass_lr_by_default=True,
        ),
    ]
    grid = [
        ({"betas": (0.9, 0.999)}, (3, 4), f64, [0.05] * n, {}),
        ({"betas": (0.8, 0.99), "weight_decay": 0.1}, (3, 4), f64, [0.05] * n, {}),
        (
            {"betas": (0.8, 0.99), "weight_decay": 0.1, "decoupled": True},
            (3, 4),
            f64,
            [0.05] * n,
            {},
        ),
        ({"betas": (0.9, 0.99), "eps": 0.1}, (3, 4), f64, [0.05] * n, {}),
        ({"betas": (0.9, 0.999)}, (3, 4), f64, [0.02] * n, {"grad_scale": 1e-6}),
        ({"betas": (0.9, 0.999)}, (3, 4), f64, [0.05] * n, {"frozen": frozen}),
        ({"betas": (0.0, 0.9), "weight_decay": 0.1}, (7,), f64, _schedule(n, 0.05), {}),
        (
            {"betas": (0.9, 0.999), "weight_decay": 0.5, "decoupled": True},
            (2, 3, 2),
            f64,
            _schedule(n, 0.1),
            {},
        ),
        (
            {"betas": (0.9, 0.999), "weight_decay": 0.1, "decoupled": True},
            (4, 5),
            f32,
            [0.01] * n,
            {},
        ),
        ({"betas": (0.8, 0.99), "weight_decay": 0.1}, (4, 5), f32, _schedule(n, 0.02), {}),
    ]
    for hyper, shape, dtype, lrs, extra in grid:
        full = {
            "betas": (0.9, 0.999),
            "eps": 1e-8,
            "weight_decay": 0.0,
            "decoupled": False,
            **hyper,
        }
        lr_text = f"lr={lrs[0]}" if len(set(lrs)) == 1 else "lr changing every step"
        notes = ""
        if "grad_scale" in extra:
            notes = ", gradients of size 1e-6 (eps matters)"
        if "frozen" in extra:
            notes = ", two coordinates with gradient always 0"
        name = (
            f"param {shape} {str(dtype)[6:]}, {lr_text}, {_describe_hyper(full)}{notes}, {n} steps"
        )
        cases.append(_make_case(t, name, shape, dtype, lrs, full, **extra))
    return cases


def _adam_call_args(case: _Case, lr: float) -> dict[str, Any]:
    return {} if case.pass_lr_by_default else {"lr": lr, **case.hyper}


def _run_adam(fn: Callable, case: _Case) -> list[dict]:
    p = case.p0.clone()
    m, v, out = torch.zeros_like(p), torch.zeros_like(p), []
    for k, lr in enumerate(case.lrs):
        p, m, v = fn(p, case.grad(p, k), m, v, k + 1, **_adam_call_args(case, lr))
        out.append({"param": p, "exp_avg": m, "exp_avg_sq": v})
    return out


@exercise(
    "adam_step",
    chapter=CHAPTER,
    signature=(
        "(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, "
        "weight_decay=0.0, decoupled=False) -> (param, exp_avg, exp_avg_sq)"
    ),
    summary="one step of torch.optim.Adam (decoupled=False, L2) or AdamW (decoupled=True); step counts from 1",
    reference=ref_adam_step,
)
def check_adam_step(t: Tester) -> None:
    """30-step trajectories against torch.optim.Adam / AdamW over betas, eps, weight decay, lr."""
    load_optimizer_machinery()
    for case in _adam_cases(t):
        h = dict(case.hyper)
        decoupled = h.pop("decoupled", False)

        def make_opt(params, lr, h=h, decoupled=decoupled):
            cls = torch.optim.AdamW if decoupled else torch.optim.Adam
            return cls(params, lr=lr, foreach=False, **{"weight_decay": 0.0, **h})

        expected = _torch_trajectory(case, make_opt, ("exp_avg", "exp_avg_sq"))

        def learner_steps(case=case):
            p = case.p0.clone()
            m, v = torch.zeros_like(p), torch.zeros_like(p)
            shape, dtype = tuple(p.shape), p.dtype
            for k, lr in enumerate(case.lrs):
                step_case = f"{case.name}, step {k + 1} of {case.steps}"
                out = t.call(
                    step_case, p, case.grad(p, k), m, v, k + 1, **_adam_call_args(case, lr)
                )
                p, m, v = (
                    t.expect_tensor(step_case, name, x, shape=shape, dtype=dtype)
                    for name, x in zip(
                        ("param", "exp_avg", "exp_avg_sq"),
                        t.unpack(step_case, out, ("param", "exp_avg", "exp_avg_sq")),
                        strict=True,
                    )
                )
                if bool((v < 0).any()):
                    t.fail(
                        step_case,
                        "`exp_avg_sq` has negative entries, but it is an average of squared gradients: "
                        "update it with grad * grad, which is never negative.",
                    )
                yield {"param": p, "exp_avg": m, "exp_avg_sq": v}

        mistakes = [
            (sentence, lambda flaw=flaw, case=case: _run_adam(_adam_flawed(flaw), case))
            for flaw, sentence in ADAM_MISTAKES.items()
        ]
        _judge_trajectory(
            t, case, learner_steps, expected, ("exp_avg", "exp_avg_sq", "param"), mistakes
        )


# ---- learning-rate schedule ---------------------------------------------------------------
def torch_warmup_cosine(
    warmup_steps: int, total_steps: int, base_lr: float, min_lr: float = 0.0
) -> list[float]:
    """The lr used at steps 0..total_steps by LinearLR then CosineAnnealingLR under SequentialLR."""
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=base_lr)
    lr_sched = torch.optim.lr_scheduler
    cosine = lr_sched.CosineAnnealingLR(opt, T_max=total_steps - warmup_steps, eta_min=min_lr)
    if warmup_steps > 0:
        linear = lr_sched.LinearLR(
            opt, start_factor=1 / (warmup_steps + 1), end_factor=1.0, total_iters=warmup_steps
        )
        sched = lr_sched.SequentialLR(opt, [linear, cosine], milestones=[warmup_steps])
    else:
        sched = cosine
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimizer.step() before lr_scheduler.step()" and friends
        for _ in range(total_steps + 1):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    return out


def _schedule_variant(flaw: str, s: int, w: int, total: int, base: float, lo: float) -> float:
    if s < w:
        if flaw == "warmup_from_zero":
            return base * s / w
        if flaw == "warmup_early":
            return base * (s + 1) / w
        return base * (s + 1) / (w + 1)
    progress = (s - w) / (total if flaw == "progress_total" else total - w)
    if flaw == "progress_unshifted":
        progress = s / total
    if flaw == "linear":
        return lo + (base - lo) * (1 - progress)
    cosine = 0.5 * (1 + math.cos((2 if flaw == "full_period" else 1) * math.pi * progress))
    if flaw == "min_ignored":
        return base * cosine
    if flaw == "min_added":
        return lo + base * cosine
    return lo + (base - lo) * cosine


SCHEDULE_MISTAKES = {
    "warmup_from_zero": (
        "the warm-up starts at 0 (base_lr * step / warmup_steps), so step 0 does not move. Here it is "
        "base_lr * (step + 1) / (warmup_steps + 1), LinearLR with start_factor 1 / (warmup_steps + 1)."
    ),
    "warmup_early": (
        "the warm-up reaches base_lr one step early (base_lr * (step + 1) / warmup_steps); it reaches it "
        "at step = warmup_steps: base_lr * (step + 1) / (warmup_steps + 1)."
    ),
    "progress_total": "the cosine's progress was divided by total_steps instead of total_steps - warmup_steps.",
    "progress_unshifted": "the cosine's progress did not subtract the warm-up: it is (step - warmup_steps) / (total_steps - warmup_steps).",
    "linear": "the decay is linear; it should be the cosine half-wave (1 + cos(pi * progress)) / 2.",
    "full_period": "the cosine runs a full period cos(2 pi progress) and climbs back up; it is a half-wave, cos(pi * progress).",
    "min_ignored": "min_lr was ignored: the schedule decays to min_lr, min_lr + (base_lr - min_lr) * (1 + cos) / 2.",
    "min_added": "min_lr was added on top of base_lr * (1 + cos) / 2; it should be min_lr + (base_lr - min_lr) * (1 + cos) / 2.",
}


@exercise(
    "warmup_cosine_lr",
    chapter=CHAPTER,
    signature="(step, warmup_steps, total_steps, base_lr, min_lr=0.0) -> float",
    summary=(
        "lr at step (0-based): base_lr*(step+1)/(warmup_steps+1) while step < warmup_steps, then a cosine "
        "half-wave to min_lr at total_steps (LinearLR + CosineAnnealingLR via SequentialLR)"
    ),
    reference=ref_warmup_cosine_lr,
)
def check_warmup_cosine_lr(t: Tester) -> None:
    """Every step 0..total_steps of several schedules against torch's scheduler composition."""
    load_optimizer_machinery()
    grid = [
        (5, 30, 0.1, 0.0),
        (10, 50, 3e-4, 1e-5),
        (0, 20, 1.0, 0.1),
        (1, 10, 2.0, 0.5),
        (3, 4, 1.0, 0.0),
        (4, 40, 0.5, 0.05),
    ]
    for w, total, base, lo in grid:
        case = f"warmup_steps={w}, total_steps={total}, base_lr={base}, min_lr={lo}"
        got = []
        for s in range(total + 1):
            args = (s, w, total, base) if lo == 0.0 and w == 5 else (s, w, total, base, lo)
            value = t.call(f"{case}, step={s}", *args)
            if torch.is_tensor(value) and value.numel() == 1:
                value = float(value)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                t.fail(
                    f"{case}, step={s}",
                    f"the learning rate should be a float, but it is a {type(value).__name__}.",
                )
            got.append(float(value))
        expected = torch.tensor(torch_warmup_cosine(w, total, base, lo), dtype=torch.float64)
        mistakes = [
            (
                sentence,
                torch.tensor(
                    [_schedule_variant(flaw, s, w, total, base, lo) for s in range(total + 1)],
                    dtype=torch.float64,
                ),
            )
            for flaw, sentence in SCHEDULE_MISTAKES.items()
        ]
        t.compare(
            f"{case}, steps 0..{total}",
            "lr",
            torch.tensor(got, dtype=torch.float64),
            expected,
            mistakes=mistakes,
        )
