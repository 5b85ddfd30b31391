"""Check batteries of chapter 17: GAE, PPO's clipped surrogate and the clipped value loss.

The references below follow the contract (``../shared/EXERCISES.md``) line by line; chapter 18
reuses them for PPO over tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..checking import Tester, exercise

CHAPTER = "17_ppo"
Tensor = torch.Tensor


def ref_compute_gae(
    rewards: Tensor,
    values: Tensor,
    dones: Tensor,
    last_value: Tensor,
    gamma: float = 0.99,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and returns: (T, ...) each.

    ``dones[t] = 1`` ends the episode at step t, so step t does not bootstrap:
    delta_t = r_t + gamma V_{t+1} (1 - d_t) - V_t with V_T = last_value, and
    A_t = delta_t + gamma lam (1 - d_t) A_{t+1}; returns = A + V.
    """
    steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(last_value, dtype=rewards.dtype)
    next_value = last_value.to(rewards.dtype)
    for t in reversed(range(steps)):
        keep = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_value * keep - values[t]
        next_adv = delta + gamma * lam * keep * next_adv
        advantages[t] = next_adv
        next_value = values[t]
    return advantages, advantages + values


def ref_ppo_clip_loss(
    logp_new: Tensor, logp_old: Tensor, advantages: Tensor, clip_eps: float = 0.2
) -> Tensor:
    """-mean(min(r A, clip(r, 1-eps, 1+eps) A)) with r = exp(logp_new - logp_old): a 0-d tensor."""
    ratio = torch.exp(logp_new - logp_old)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    return -torch.minimum(unclipped, clipped).mean()


def ref_value_loss_clipped(
    values: Tensor, old_values: Tensor, returns: Tensor, clip_eps: float = 0.2
) -> Tensor:
    """0.5 mean(max((v - R)^2, (v_old + clip(v - v_old, -eps, eps) - R)^2)): a 0-d tensor."""
    clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2).mean()


# ---- mistake models ------------------------------------------------------------------------
def _shifted(dones: Tensor, shift: int | None) -> Tensor:
    """dones[t + shift] along the time axis (0 past either end); shift None: no dones at all."""
    if shift is None:
        return torch.zeros_like(dones)
    out = torch.zeros_like(dones)
    steps = dones.shape[0]
    for t in range(steps):
        if 0 <= t + shift < steps:
            out[t] = dones[t + shift]
    return out


def _gae_variant(
    rewards: Tensor,
    values: Tensor,
    dones: Tensor,
    last_value: Tensor,
    gamma: float,
    lam: float,
    *,
    done_in_delta: int | None = 0,
    done_in_recursion: int | None = 0,
    gamma_in_delta: bool = True,
    gamma_in_recursion: bool = True,
    use_last_value: bool = True,
) -> Tensor:
    """GAE advantages (float64) with one of the knobs learners get wrong turned."""
    r, v, d = rewards.double(), values.double(), dones.double()
    d_delta, d_rec = _shifted(d, done_in_delta), _shifted(d, done_in_recursion)
    g_delta = gamma if gamma_in_delta else 1.0
    g_rec = gamma if gamma_in_recursion else 1.0
    next_value = last_value.double() if use_last_value else torch.zeros_like(last_value).double()
    next_adv = torch.zeros_like(next_value)
    adv = torch.zeros_like(r)
    for t in reversed(range(r.shape[0])):
        delta = r[t] + g_delta * next_value * (1 - d_delta[t]) - v[t]
        next_adv = delta + g_rec * lam * (1 - d_rec[t]) * next_adv
        adv[t] = next_adv
        next_value = v[t]
    return adv


def _discounted_sums(rewards: Tensor, dones: Tensor, last: Tensor, gamma: float) -> Tensor:
    """R_t = r_t + gamma (1 - d_t) R_{t+1} with R_T = last: Monte-Carlo returns within the rollout."""
    r, d = rewards.double(), dones.double()
    out, running = torch.zeros_like(r), last.double()
    for t in reversed(range(r.shape[0])):
        running = r[t] + gamma * (1 - d[t]) * running
        out[t] = running
    return out


def _advantage_mistakes(
    rewards: Tensor, values: Tensor, dones: Tensor, last_value: Tensor, gamma: float, lam: float
) -> list[tuple[str, Callable[[], Tensor]]]:
    args = (rewards, values, dones, last_value, gamma, lam)

    def variant(**kw: Any) -> Callable[[], Tensor]:
        return lambda: _gae_variant(*args, **kw)

    def normalised() -> Tensor:
        a = _gae_variant(*args)
        return (a - a.mean()) / (a.std() + 1e-8)

    zero = torch.zeros_like(last_value)
    return [
        (
            "the done flag of the NEXT step, dones[t+1], stopped the bootstrap of step t (CleanRL's "
            "convention, where dones[t] says that obs[t] starts a new episode). Here dones[t] = 1 "
            "means step t itself ended its episode: use (1 - dones[t]) in delta_t and in the A_{t+1} term.",
            variant(done_in_delta=1, done_in_recursion=1),
        ),
        (
            "the done flag of the PREVIOUS step, dones[t-1], stopped the bootstrap of step t; "
            "step t's own flag dones[t] says whether step t bootstraps: use (1 - dones[t]).",
            variant(done_in_delta=-1, done_in_recursion=-1),
        ),
        (
            "the done flag was used in delta_t but ignored inside the recursion: the A_{t+1} term "
            "must be multiplied by (1 - dones[t]) too, or the next episode's advantage leaks into "
            "this one: A_t = delta_t + gamma * lam * (1 - dones[t]) * A_{t+1}.",
            variant(done_in_recursion=None),
        ),
        (
            "the done flag was used in the recursion but not in delta_t: a step that ends its "
            "episode must not bootstrap, delta_t = r_t + gamma * V_{t+1} * (1 - dones[t]) - V_t.",
            variant(done_in_delta=None),
        ),
        (
            "the done flags were ignored: every step bootstrapped from the next value and the next "
            "advantage, across episode ends. Multiply both by (1 - dones[t]).",
            variant(done_in_delta=None, done_in_recursion=None),
        ),
        (
            "lam and gamma were swapped: delta_t discounts V_{t+1} by gamma (not lam), and the "
            "recursion carries gamma * lam.",
            lambda: _gae_variant(rewards, values, dones, last_value, lam, gamma),
        ),
        (
            "lam is missing from the recursion, or the advantages are discounted sums of rewards "
            "minus the values (Monte-Carlo advantages), which is the same thing: both are GAE with "
            "lam = 1. It is A_t = delta_t + gamma * lam * (1 - d_t) * A_{t+1}.",
            lambda: _gae_variant(*args[:5], 1.0),
        ),
        (
            "gamma is missing from the recursion: A_t = delta_t + gamma * lam * (1 - d_t) * A_{t+1}, "
            "not lam * (1 - d_t) * A_{t+1}.",
            variant(gamma_in_recursion=False),
        ),
        (
            "gamma is missing from delta_t: delta_t = r_t + gamma * V_{t+1} * (1 - d_t) - V_t.",
            variant(gamma_in_delta=False),
        ),
        (
            "last_value was ignored (V_T taken as 0): the last step of the rollout bootstraps from "
            "last_value, V(s_T), unless it ended its episode.",
            variant(use_last_value=False),
        ),
        (
            "the advantages are discounted sums of rewards minus the values, with no bootstrap "
            "from last_value (Monte-Carlo advantages); GAE sums (gamma lam)^k delta_{t+k}.",
            lambda: _discounted_sums(rewards, dones, zero, gamma) - values.double(),
        ),
        (
            "the advantages were normalised inside compute_gae. Return the raw advantages "
            "(returns = A + V needs them); normalise per minibatch in the PPO update.",
            normalised,
        ),
    ]


def _returns_mistakes(
    advantages: Tensor,
    rewards: Tensor,
    values: Tensor,
    dones: Tensor,
    last_value: Tensor,
    gamma: float,
) -> list[tuple[str, Callable[[], Tensor]]]:
    zero = torch.zeros_like(last_value)
    next_values = torch.cat([values[1:], last_value[None]]).double()
    return [
        (
            "the returns were computed as discounted sums of rewards (Monte-Carlo returns), "
            "without the value: the contract's returns are advantages + values (the lambda-return "
            "the value head is trained on).",
            lambda: _discounted_sums(rewards, dones, zero, gamma),
        ),
        (
            "the returns were computed as discounted sums of rewards bootstrapped only from "
            "last_value (Monte-Carlo returns), not as advantages + values.",
            lambda: _discounted_sums(rewards, dones, last_value, gamma),
        ),
        (
            "the returns are the advantages themselves: add the values, returns = advantages + values.",
            lambda: advantages.double(),
        ),
        (
            "the returns are the values minus the advantages; returns = advantages + values.",
            lambda: values.double() - advantages.double(),
        ),
        (
            "the returns are the one-step TD targets r_t + gamma V_{t+1} (1 - d_t), not "
            "advantages + values.",
            lambda: rewards.double() + gamma * next_values * (1 - dones.double()),
        ),
    ]


# ---- compute_gae ---------------------------------------------------------------------------
def _dones(t: Tester, shape: tuple[int, ...], p: float, dtype: torch.dtype) -> Tensor:
    return (t.rand(*shape) < p).to(dtype)


def _gae_cases(t: Tester) -> list[tuple[str, tuple, dict]]:
    f32, f64 = torch.float32, torch.float64
    cases = []
    # First case: episode ends only inside the rollout, so every way of shifting the done flag
    # (t+1, t-1, wrapping or padding at the ends) gives the same numbers and can be named.
    d = torch.zeros(9, 3, dtype=f64)
    d[3, 0] = d[5, 1] = d[2, 2] = d[6, 2] = 1.0
    cases.append(
        (
            "rewards (9, 3) float64, episodes ending at steps 3, 5, 2 and 6, gamma=0.9, lam=0.7",
            (t.randn(9, 3), t.randn(9, 3), d, t.randn(3)),
            {"gamma": 0.9, "lam": 0.7},
        )
    )
    d = _dones(t, (12,), 0.25, f64)
    d[0] = d[-1] = 1.0
    cases.append(
        (
            "rewards (12,) float64, a done at the first and last step, last_value 0-d, "
            "default gamma and lam",
            (t.rand(12), t.randn(12), d, t.randn(())),
            {},
        )
    )
    cases.append(
        (
            "rewards (6, 2, 3) float32, dones 0.0/1.0 float32, gamma=0.97, lam=0.9",
            (
                t.randn(6, 2, 3, dtype=f32),
                t.randn(6, 2, 3, dtype=f32),
                _dones(t, (6, 2, 3), 0.3, f32),
                t.randn(2, 3, dtype=f32),
            ),
            {"gamma": 0.97, "lam": 0.9},
        )
    )
    cases.append(
        (
            "rewards (5, 4) float64, lam=0 (one-step TD errors)",
            (t.randn(5, 4), t.randn(5, 4), _dones(t, (5, 4), 0.3, f64), t.randn(4)),
            {"gamma": 0.8, "lam": 0.0},
        )
    )
    cases.append(
        (
            "rewards (5, 4) float64, lam=1 (Monte-Carlo advantages bootstrapped from last_value)",
            (t.randn(5, 4), t.randn(5, 4), _dones(t, (5, 4), 0.3, f64), t.randn(4)),
            {"gamma": 0.95, "lam": 1.0},
        )
    )
    cases.append(
        (
            "rewards (1, 3) float64, a rollout of one step",
            (t.randn(1, 3), t.randn(1, 3), torch.tensor([[0.0, 1.0, 0.0]], dtype=f64), t.randn(3)),
            {"gamma": 0.9, "lam": 0.8},
        )
    )
    cases.append(
        (
            "rewards (128, 8) float32, CartPole-like: reward 1, dones 2%, gamma=0.99, lam=0.95",
            (
                torch.ones(128, 8, dtype=f32),
                t.randn(128, 8, dtype=f32, scale=5.0) + 50.0,
                _dones(t, (128, 8), 0.02, f32),
                t.randn(8, dtype=f32, scale=5.0) + 50.0,
            ),
            {"gamma": 0.99, "lam": 0.95},
        )
    )
    return cases


@exercise(
    "compute_gae",
    chapter=CHAPTER,
    signature="(rewards (T,...), values (T,...), dones (T,...), last_value (...), gamma=0.99, "
    "lam=0.95) -> (advantages, returns)",
    summary="generalised advantage estimates: dones[t]=1 stops step t's bootstrap; "
    "A_t = delta_t + gamma*lam*(1-done_t)*A_{t+1}; returns = advantages + values",
    reference=ref_compute_gae,
)
def check_compute_gae(t: Tester) -> None:
    """Advantages and returns on (T,), (T,N), (T,N,K), float32/64, lam 0 and 1, one-step rollouts."""
    for case, args, kwargs in _gae_cases(t):
        rewards, values, dones, last_value = args
        gamma, lam = kwargs.get("gamma", 0.99), kwargs.get("lam", 0.95)
        out = t.call(case, *args, **kwargs)
        got_adv, got_ret = t.unpack(case, out, ("advantages", "returns"))
        want_adv, want_ret = ref_compute_gae(
            rewards.double(), values.double(), dones.double(), last_value.double(), gamma, lam
        )
        dtype = rewards.dtype
        t.compare(
            case,
            "advantages",
            got_adv,
            want_adv.to(dtype),
            mistakes=_advantage_mistakes(rewards, values, dones, last_value, gamma, lam),
        )
        t.compare(
            case,
            "returns",
            got_ret,
            want_ret.to(dtype),
            mistakes=_returns_mistakes(
                want_adv, rewards, values, dones, last_value.to(values.dtype), gamma
            ),
        )


# ---- losses: values and gradients ----------------------------------------------------------
def loss_and_gradient_probe(
    fn: Callable[..., Any], first: Tensor, *rest: Any, **kwargs: Any
) -> dict[str, Any]:
    """Run where the learner's loss lives: the loss, and its gradient in the first argument."""
    x = first.clone().requires_grad_(True)
    out = fn(x, *rest, **kwargs)
    if not torch.is_tensor(out):
        try:
            number = float(out)
        except (TypeError, ValueError):
            number = None
        return {"type": type(out).__name__, "number": number}
    seen: dict[str, Any] = {"type": "Tensor", "loss": out.detach(), "grad": None}
    seen["requires_grad"] = bool(out.requires_grad)
    if out.requires_grad and out.numel() == 1:
        (grad,) = torch.autograd.grad(out.sum(), x, allow_unused=True)
        seen["grad"] = torch.zeros_like(first) if grad is None else grad.detach()
    return seen


def _reference_gradient(ref: Callable[..., Tensor], first: Tensor, *rest: Any) -> Tensor:
    x = first.detach().double().requires_grad_(True)
    args = [a.double() if torch.is_tensor(a) else a for a in rest]
    (grad,) = torch.autograd.grad(ref(x, *args), x)
    return grad


def _judge_loss(
    t: Tester,
    case: str,
    seen: dict[str, Any],
    expected: Tensor,
    argument: str,
    mistakes: list[tuple[str, Callable[[], Tensor]]],
) -> Tensor | None:
    """Value of the loss: a differentiable 0-d tensor; returns the learner's loss if it is one."""
    if seen["type"] != "Tensor":
        number = "" if seen.get("number") is None else f" ({seen['number']:.6g})"
        t.fail(
            case,
            f"the loss should be a 0-d tensor differentiable in {argument}, but the function "
            f"returned a {seen['type']}{number}: it looks like .item(), float() or numpy was "
            "used. Return the tensor so that the update can call backward() on it.",
        )
    t.compare(case, "loss", seen["loss"], expected, mistakes=mistakes)
    if not seen["requires_grad"]:
        t.fail(
            case,
            f"the loss has the right value but no gradient flows to {argument} (it does not "
            "require grad): it looks like the computation was detached (.detach(), .item(), "
            f"torch.tensor(...) or numpy). The loss must be differentiable in {argument}.",
        )
    return seen["loss"]


def _judge_gradient(
    t: Tester,
    case: str,
    seen: dict[str, Any],
    expected: Tensor,
    argument: str,
    clipped: Tensor,
    dtype: torch.dtype,
) -> None:
    """d loss / d argument against the reference's; names a gradient that passes through a clip."""
    got = seen["grad"]
    if torch.is_tensor(got) and got.shape == expected.shape:
        leaked = bool((got.detach().double()[clipped].abs() > 1e-12).any())
        wrong = not torch.allclose(
            got.detach().double(), expected, rtol=t.tolerances(dtype)[0] * 10, atol=1e-9
        )
        if leaked and wrong:
            t.fail(
                case,
                f"`d loss / d {argument}` is not zero where the clipped term is the one chosen "
                f"({int(clipped.sum())} entries here): the clip must stop the gradient there, as "
                "torch.clamp does. It looks like the clipped branch lets the gradient through "
                "(a straight-through clip, or the two terms combined without min/max).",
            )
    t.compare(case, f"d loss / d {argument}", got, expected.to(dtype), dtype=dtype)


# ---- ppo_clip_loss --------------------------------------------------------------------------
def _policy_mistakes(
    logp_new: Tensor, logp_old: Tensor, adv: Tensor, eps: float
) -> list[tuple[str, Callable[[], Tensor]]]:
    new, old, a = logp_new.double(), logp_old.double(), adv.double()
    r = torch.exp(new - old)

    def surrogate(ratio: Tensor, clipped: Tensor, pick: Callable = torch.minimum) -> Tensor:
        return -pick(ratio * a, clipped).mean()

    rc = torch.clamp(r, 1 - eps, 1 + eps)
    return [
        (
            "max was taken instead of min: the clipped surrogate is the pessimistic (smaller) of "
            "r A and clip(r, 1-eps, 1+eps) A.",
            lambda: surrogate(r, rc * a, torch.maximum),
        ),
        (
            "the ratio was computed as logp_new / logp_old, a ratio of LOG-probabilities; the "
            "probability ratio is r = exp(logp_new - logp_old).",
            lambda: surrogate(new / old, torch.clamp(new / old, 1 - eps, 1 + eps) * a),
        ),
        (
            "the ratio was inverted, exp(logp_old - logp_new); it is r = exp(logp_new - logp_old).",
            lambda: surrogate(1 / r, torch.clamp(1 / r, 1 - eps, 1 + eps) * a),
        ),
        (
            "the advantage was clipped instead of the ratio: the clipped term is "
            "clip(r, 1-eps, 1+eps) * A, not r * clip(A, 1-eps, 1+eps).",
            lambda: surrogate(r, r * torch.clamp(a, 1 - eps, 1 + eps)),
        ),
        (
            "the advantage was clipped instead of the ratio: the clipped term is "
            "clip(r, 1-eps, 1+eps) * A, not r * clip(A, -eps, eps).",
            lambda: surrogate(r, r * torch.clamp(a, -eps, eps)),
        ),
        (
            "the advantage was clipped instead of the ratio: the clipped term is "
            "clip(r, 1-eps, 1+eps) * A, not clip(A, 1-eps, 1+eps).",
            lambda: surrogate(r, torch.clamp(a, 1 - eps, 1 + eps)),
        ),
        (
            "the sign is flipped: the loss is MINUS the clipped surrogate (we minimise the loss "
            "to maximise the surrogate).",
            lambda: -surrogate(r, rc * a),
        ),
        (
            "the ratio was clipped to (-eps, eps) instead of (1-eps, 1+eps).",
            lambda: surrogate(r, torch.clamp(r, -eps, eps) * a),
        ),
        (
            "the clipping was left out: this is -mean(r A), the unclipped surrogate.",
            lambda: -(r * a).mean(),
        ),
        (
            "only the clipped term was kept: the loss is -mean(min(r A, clip(r, 1-eps, 1+eps) A)).",
            lambda: -(rc * a).mean(),
        ),
        (
            "the terms were summed instead of averaged: the loss is a mean over all entries.",
            lambda: surrogate(r, rc * a) * a.numel(),
        ),
    ]


def _policy_cases(t: Tester) -> list[tuple[str, tuple, dict]]:
    f32 = torch.float32

    def logps(*shape: int, spread: float = 0.3, dtype: torch.dtype = torch.float64) -> tuple:
        old = -(t.rand(*shape) * 3 + 0.05)  # log-probabilities in (-3.05, -0.05)
        new = old + t.randn(*shape, scale=spread)
        return new.to(dtype), old.to(dtype)

    cases = []
    new, old = logps(64)
    cases.append(
        (
            "logp (64,) float64, ratios both sides of the clip, default clip_eps",
            (new, old, t.randn(64)),
            {},
        )
    )
    new, old = logps(16, 4, dtype=f32)
    cases.append(
        (
            "logp (16, 4) float32, clip_eps=0.1",
            (new, old, t.randn(16, 4, dtype=f32)),
            {"clip_eps": 0.1},
        )
    )
    new, old = logps(4, 3, 5, spread=0.6)
    cases.append(
        (
            "logp (4, 3, 5) float64, clip_eps=0.3",
            (new, old, t.randn(4, 3, 5, scale=2.0)),
            {"clip_eps": 0.3},
        )
    )
    new, old = logps(32, spread=0.0)
    cases.append(
        (
            "logp_new == logp_old (32,) float64: the first minibatch of an update, ratio 1",
            (new, old, t.randn(32)),
            {},
        )
    )
    return cases


@exercise(
    "ppo_clip_loss",
    chapter=CHAPTER,
    signature="(logp_new, logp_old, advantages, clip_eps=0.2) -> 0-d Tensor",
    summary="PPO's clipped surrogate loss -mean(min(r*A, clip(r, 1-eps, 1+eps)*A)), "
    "r = exp(logp_new - logp_old); differentiable in logp_new",
    reference=ref_ppo_clip_loss,
)
def check_ppo_clip_loss(t: Tester) -> None:
    """Loss value and d loss / d logp_new (zero where the clip binds) on 1-3 leading dims."""
    for case, (new, old, adv), kwargs in _policy_cases(t):
        eps = kwargs.get("clip_eps", 0.2)
        seen = t.probe(case, loss_and_gradient_probe, new, old, adv, **kwargs)
        expected = ref_ppo_clip_loss(new.double(), old.double(), adv.double(), eps).to(new.dtype)
        _judge_loss(t, case, seen, expected, "logp_new", _policy_mistakes(new, old, adv, eps))
        r = torch.exp(new.double() - old.double())
        a = adv.double()
        clipped = ((r > 1 + eps) & (a > 0)) | ((r < 1 - eps) & (a < 0))
        grad = _reference_gradient(ref_ppo_clip_loss, new, old, adv, eps)
        _judge_gradient(t, case, seen, grad, "logp_new", clipped, new.dtype)


# ---- value_loss_clipped ---------------------------------------------------------------------
def _value_mistakes(
    values: Tensor, old: Tensor, returns: Tensor, eps: float
) -> list[tuple[str, Callable[[], Tensor]]]:
    v, vo, R = values.double(), old.double(), returns.double()
    right = vo + torch.clamp(v - vo, -eps, eps)

    def loss(clipped: Tensor, pick: Callable = torch.maximum, half: float = 0.5) -> Tensor:
        return half * pick((v - R) ** 2, (clipped - R) ** 2).mean()

    return [
        (
            "the value clip was applied like the policy ratio, clip(v / v_old, 1-eps, 1+eps) * v_old; "
            "the value is clipped by a distance: v_old + clip(v - v_old, -eps, eps).",
            lambda: loss(torch.clamp(v / vo, 1 - eps, 1 + eps) * vo),
        ),
        (
            "min was taken instead of max: the clipped value loss is the pessimistic (larger) of "
            "the two squared errors.",
            lambda: loss(right, torch.minimum),
        ),
        (
            "the factor 0.5 is missing: the loss is 0.5 * mean(max(...)).",
            lambda: loss(right, half=1.0),
        ),
        (
            "v itself was clipped to [R - eps, R + eps] (around the return); the clip keeps the new "
            "value within eps of the OLD value: v_old + clip(v - v_old, -eps, eps).",
            lambda: loss(torch.clamp(v, R - eps, R + eps)),
        ),
        (
            "the clip was centred on the new value (v + clip(v_old - v, -eps, eps)); it is centred "
            "on the old one: v_old + clip(v - v_old, -eps, eps).",
            lambda: loss(v + torch.clamp(vo - v, -eps, eps)),
        ),
        (
            "the clipping was left out: this is the plain 0.5 * mean((v - R)^2).",
            lambda: 0.5 * ((v - R) ** 2).mean(),
        ),
        (
            "only the clipped term was kept: the loss is the max of the clipped and unclipped errors.",
            lambda: 0.5 * ((right - R) ** 2).mean(),
        ),
        (
            "the squared errors were summed instead of averaged: the loss is a mean over all entries.",
            lambda: loss(right) * v.numel(),
        ),
    ]


def _value_cases(t: Tester) -> list[tuple[str, tuple, dict]]:
    f32 = torch.float32

    def values(*shape: int, dtype: torch.dtype = torch.float64, scale: float = 0.4) -> tuple:
        old = t.randn(*shape, scale=2.0) + 3.0
        new = old + t.randn(*shape, scale=scale)
        ret = old + t.randn(*shape)
        return new.to(dtype), old.to(dtype), ret.to(dtype)

    return [
        ("values (64,) float64, default clip_eps", values(64), {}),
        ("values (16, 4) float32, clip_eps=0.1", values(16, 4, dtype=f32), {"clip_eps": 0.1}),
        ("values (4, 3, 5) float64, clip_eps=0.5", values(4, 3, 5, scale=1.0), {"clip_eps": 0.5}),
    ]


@exercise(
    "value_loss_clipped",
    chapter=CHAPTER,
    signature="(values, old_values, returns, clip_eps=0.2) -> 0-d Tensor",
    summary="PPO's clipped value loss 0.5*mean(max((v-R)^2, (v_old + clip(v-v_old, -eps, eps) "
    "- R)^2)); differentiable in values",
    reference=ref_value_loss_clipped,
)
def check_value_loss_clipped(t: Tester) -> None:
    """Loss value and d loss / d values (zero where the clipped error is chosen and binds)."""
    for case, (v, vo, ret), kwargs in _value_cases(t):
        eps = kwargs.get("clip_eps", 0.2)
        seen = t.probe(case, loss_and_gradient_probe, v, vo, ret, **kwargs)
        expected = ref_value_loss_clipped(v.double(), vo.double(), ret.double(), eps).to(v.dtype)
        _judge_loss(t, case, seen, expected, "values", _value_mistakes(v, vo, ret, eps))
        vd, vod, rd = v.double(), vo.double(), ret.double()
        clipped_v = vod + torch.clamp(vd - vod, -eps, eps)
        chosen = (clipped_v - rd) ** 2 > (vd - rd) ** 2
        clipped = chosen & ((vd - vod).abs() > eps)
        grad = _reference_gradient(ref_value_loss_clipped, v, vo, ret, eps)
        _judge_gradient(t, case, seen, grad, "values", clipped, v.dtype)
