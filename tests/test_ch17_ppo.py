"""Chapter 17 batteries: correct GAE and PPO losses in several styles pass, planted mistakes are named.

Styles: the references, Python loops over numpy, a loop-free GAE built from a done-count prefix sum,
per-environment loops over flattened leading dims, a torch.where form of the clipped surrogate, and
F.mse_loss for the value loss. Mistakes: the ones the issue lists (done flags shifted or ignored,
Monte-Carlo returns, lam and gamma swapped or missing, max for min, log-probability ratios, clipped
advantages, flipped sign, a ratio-style value clip, min for max, missing 0.5, v clipped around R)
and the gradient mistakes (.item(), .detach(), a straight-through clip), each named.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from check_times import report_check_seconds

import course_utils as cu
from course_utils.checks import ch17_ppo as ch17

SEEDS = range(10)
MISTAKE_SEEDS = (0, 1, 5)


# =====================================================================================
# Correct implementations
# =====================================================================================
def gae_numpy(rewards, values, dones, last_value, gamma=0.99, lam=0.95):
    """A loop over numpy arrays, in float64, cast back."""
    r, v, d = rewards.numpy(), values.numpy(), dones.numpy()
    adv = np.zeros_like(r, dtype=np.float64)
    next_value, next_adv = last_value.numpy().astype(np.float64), 0.0
    for t in range(len(r) - 1, -1, -1):
        nonterminal = 1.0 - d[t]
        delta = r[t] + gamma * next_value * nonterminal - v[t]
        next_adv = delta + gamma * lam * nonterminal * next_adv
        adv[t] = next_adv
        next_value = v[t]
    adv = torch.from_numpy(adv).to(rewards.dtype)
    return adv, adv + values


def gae_prefix_sum(rewards, values, dones, last_value, gamma=0.99, lam=0.95):
    """No loop: A_t = sum_k (gamma lam)^(k-t) delta_k over the k >= t reached before a done."""
    steps = rewards.shape[0]
    next_values = torch.cat([values[1:], last_value[None]])  # (T, ...)
    deltas = rewards + gamma * next_values * (1 - dones) - values
    ends_before = torch.cat([torch.zeros_like(dones[:1]), dones.cumsum(0)[:-1]])  # dones in [0, k)
    k = torch.arange(steps)
    lag = (k[None, :] - k[:, None]).to(rewards.dtype)  # (T, T): k - t
    extra = (None,) * (rewards.dim() - 1)
    same_episode = ends_before[None] == ends_before[:, None]  # (T, T, ...): no done in [t, k)
    weights = torch.where(
        (lag >= 0)[(...,) + extra] & same_episode,
        (gamma * lam) ** lag.clamp(min=0)[(...,) + extra],
        torch.zeros((), dtype=rewards.dtype),
    )
    adv = (weights * deltas[None]).sum(1)
    return adv, adv + values


def gae_per_env(rewards, values, dones, last_value, gamma=0.99, lam=0.95):
    """Flatten the leading dims into environments and run plain Python floats per environment."""
    shape = rewards.shape
    r, v = rewards.reshape(shape[0], -1), values.reshape(shape[0], -1)
    d, lv = dones.reshape(shape[0], -1).bool(), last_value.reshape(-1)
    adv = torch.zeros_like(r)
    for env in range(r.shape[1]):
        running, next_v = 0.0, float(lv[env])
        for t in reversed(range(shape[0])):
            if d[t, env]:
                running = float(r[t, env]) - float(v[t, env])
            else:
                delta = float(r[t, env]) + gamma * next_v - float(v[t, env])
                running = delta + gamma * lam * running
            adv[t, env] = running
            next_v = float(v[t, env])
    adv = adv.reshape(shape)
    return adv, adv + values


def clip_loss_where(logp_new, logp_old, advantages, clip_eps=0.2):
    """The sign-split form: min(r, 1+eps) A for A >= 0, max(r, 1-eps) A for A < 0."""
    ratio = logp_new.sub(logp_old).exp()
    up = torch.minimum(ratio, torch.full_like(ratio, 1 + clip_eps)) * advantages
    down = torch.maximum(ratio, torch.full_like(ratio, 1 - clip_eps)) * advantages
    return -torch.where(advantages >= 0, up, down).sum() / advantages.numel()


def clip_loss_prob_ratio(logp_new, logp_old, advantages, clip_eps=0.2):
    """Ratio of probabilities, clip written as max(min(.)), numel-based mean."""
    ratio = torch.exp(logp_new) / torch.exp(logp_old)
    clipped = torch.max(
        torch.min(ratio, ratio.new_tensor(1 + clip_eps)), ratio.new_tensor(1 - clip_eps)
    )
    return -torch.min(ratio * advantages, clipped * advantages).mean()


def value_loss_mse(values, old_values, returns, clip_eps=0.2):
    """F.mse_loss(reduction='none') for both terms."""
    clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    a = F.mse_loss(values, returns, reduction="none")
    b = F.mse_loss(clipped, returns, reduction="none")
    return 0.5 * torch.max(a, b).mean()


def value_loss_where(values, old_values, returns, clip_eps=0.2):
    """torch.where picks the larger error; the clip by where as well."""
    diff = values - old_values
    clipped = torch.where(diff.abs() > clip_eps, old_values + clip_eps * diff.sign(), values)
    a, b = (values - returns).pow(2), (clipped - returns).pow(2)
    return torch.where(a > b, a, b).mean() / 2


CORRECT = {
    "compute_gae": [gae_numpy, gae_prefix_sum, gae_per_env],
    "ppo_clip_loss": [clip_loss_where, clip_loss_prob_ratio],
    "value_loss_clipped": [value_loss_mse, value_loss_where],
}
PAIRS = [(e, f) for e, fs in CORRECT.items() for f in fs]


@pytest.mark.parametrize(("exercise_id", "fn"), PAIRS, ids=[f.__name__ for _, f in PAIRS])
def test_correct_implementation_passes_on_every_seed(exercise_id, fn):
    for seed in SEEDS:
        cu.check(exercise_id, fn, strict=True, seed=seed)


@pytest.mark.parametrize("exercise_id", list(CORRECT))
def test_reference_passes_its_own_battery(exercise_id):
    for seed in SEEDS:
        cu.check(exercise_id, cu.reference(exercise_id), strict=True, seed=seed)


def test_references_agree_with_hand_computed_numbers():
    # Two steps, episode ends at step 0: A_1 = r_1 + g V_T - V_1, A_0 = r_0 - V_0 (no bootstrap).
    r = torch.tensor([1.0, 2.0], dtype=torch.float64)
    v = torch.tensor([0.5, 0.25], dtype=torch.float64)
    d = torch.tensor([1.0, 0.0], dtype=torch.float64)
    adv, ret = ch17.ref_compute_gae(r, v, d, torch.tensor(4.0, dtype=torch.float64), 0.5, 0.5)
    assert torch.allclose(adv, torch.tensor([0.5, 3.75], dtype=torch.float64))
    assert torch.allclose(ret, adv + v)
    loss = ch17.ref_ppo_clip_loss(
        torch.log(torch.tensor([1.5, 0.5])), torch.zeros(2), torch.tensor([1.0, -1.0])
    )
    assert torch.isclose(loss, -torch.tensor((1.2 - 0.8) / 2))
    vl = ch17.ref_value_loss_clipped(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([3.0]))
    assert torch.isclose(vl, torch.tensor(0.5 * 1.8**2))


# =====================================================================================
# Planted mistakes, each with the words its message must contain
# =====================================================================================
def _gae(shift_delta=0, shift_rec=0, gamma_swap=False, no_lam=False, returns="av"):
    """A GAE loop with one mistake; shifts index dones[t + shift] (0 outside), None ignores them."""

    def flag(dones, t, shift):
        if shift is None or not 0 <= t + shift < dones.shape[0]:
            return torch.zeros_like(dones[0])
        return dones[t + shift]

    def fn(rewards, values, dones, last_value, gamma=0.99, lam=0.95):
        if gamma_swap:
            gamma, lam = lam, gamma
        if no_lam:
            lam = 1.0
        adv = torch.zeros_like(rewards)
        next_value, next_adv = last_value, torch.zeros_like(last_value)
        for t in reversed(range(rewards.shape[0])):
            delta = rewards[t] + gamma * next_value * (1 - flag(dones, t, shift_delta)) - values[t]
            next_adv = delta + gamma * lam * (1 - flag(dones, t, shift_rec)) * next_adv
            adv[t] = next_adv
            next_value = values[t]
        if returns == "av":
            return adv, adv + values
        ret, running = torch.zeros_like(rewards), torch.zeros_like(last_value)
        for t in reversed(range(rewards.shape[0])):
            running = rewards[t] + gamma * (1 - dones[t]) * running
            ret[t] = running
        return adv, ret

    return fn


def gae_normalised(rewards, values, dones, last_value, gamma=0.99, lam=0.95):
    adv, _ = ch17.ref_compute_gae(rewards, values, dones, last_value, gamma, lam)
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    return adv, adv + values


def gae_mc_advantages(rewards, values, dones, last_value, gamma=0.99, lam=0.95):
    ret, running = torch.zeros_like(rewards), last_value
    for t in reversed(range(rewards.shape[0])):
        running = rewards[t] + gamma * (1 - dones[t]) * running
        ret[t] = running
    return ret - values, ret


def gae_returns_are_advantages(rewards, values, dones, last_value, gamma=0.99, lam=0.95):
    adv, _ = ch17.ref_compute_gae(rewards, values, dones, last_value, gamma, lam)
    return adv, adv


def gae_float64_out(rewards, values, dones, last_value, gamma=0.99, lam=0.95):
    adv, ret = ch17.ref_compute_gae(
        rewards.double(), values.double(), dones.double(), last_value.double(), gamma, lam
    )
    return adv, ret


def gae_one_output(rewards, values, dones, last_value, gamma=0.99, lam=0.95):
    return ch17.ref_compute_gae(rewards, values, dones, last_value, gamma, lam)[0]


GAE_MISTAKES = [
    (_gae(1, 1), r"`advantages` is wrong.*dones\[t\+1\].*CleanRL's convention"),
    (_gae(-1, -1), r"`advantages` is wrong.*PREVIOUS step, dones\[t-1\]"),
    (_gae(0, None), r"`advantages` is wrong.*ignored inside the recursion"),
    (_gae(None, 0), r"`advantages` is wrong.*used in the recursion but not in delta_t"),
    (_gae(None, None), r"`advantages` is wrong.*done flags were ignored"),
    (_gae(returns="mc"), r"`returns` is wrong.*discounted sums of rewards \(Monte-Carlo returns\)"),
    (_gae(gamma_swap=True), r"`advantages` is wrong.*lam and gamma were swapped"),
    (_gae(no_lam=True), r"`advantages` is wrong.*lam is missing"),
    (gae_normalised, r"`advantages` is wrong.*normalised inside compute_gae"),
    (gae_mc_advantages, r"`advantages` is wrong.*Monte-Carlo advantages"),
    (gae_returns_are_advantages, r"`returns` is wrong.*returns are the advantages themselves"),
    (gae_float64_out, r"float32.*`advantages` should have dtype float32.*float64"),
    (gae_one_output, r"expected a tuple \(advantages, returns\)"),
]


@pytest.mark.parametrize(("fn", "pattern"), GAE_MISTAKES, ids=[str(i) for i in range(13)])
def test_gae_mistake_is_named(fn, pattern):
    for seed in MISTAKE_SEEDS:
        with pytest.raises(cu.CheckFailure, match=pattern):
            cu.check("compute_gae", fn, strict=True, seed=seed)


def _clip(*, pick=torch.minimum, ratio="exp", clip="ratio", sign=-1.0, reduce="mean"):
    def fn(logp_new, logp_old, advantages, clip_eps=0.2):
        r = logp_new / logp_old if ratio == "log" else torch.exp(logp_new - logp_old)
        if clip == "ratio":
            clipped = torch.clamp(r, 1 - clip_eps, 1 + clip_eps) * advantages
        else:
            clipped = r * torch.clamp(advantages, 1 - clip_eps, 1 + clip_eps)
        terms = pick(r * advantages, clipped)
        return sign * (terms.mean() if reduce == "mean" else terms.sum())

    return fn


def clip_loss_item(logp_new, logp_old, advantages, clip_eps=0.2):
    return ch17.ref_ppo_clip_loss(logp_new, logp_old, advantages, clip_eps).item()


def clip_loss_detached(logp_new, logp_old, advantages, clip_eps=0.2):
    return ch17.ref_ppo_clip_loss(logp_new.detach(), logp_old, advantages, clip_eps)


def clip_loss_rewrapped(logp_new, logp_old, advantages, clip_eps=0.2):
    loss = ch17.ref_ppo_clip_loss(logp_new, logp_old, advantages, clip_eps)
    return torch.tensor(loss.detach().item(), dtype=logp_new.dtype)


def clip_loss_straight_through(logp_new, logp_old, advantages, clip_eps=0.2):
    """The clip written so that its gradient is the identity's: right value, leaking gradient."""
    r = torch.exp(logp_new - logp_old)
    rc = r + (torch.clamp(r, 1 - clip_eps, 1 + clip_eps) - r).detach()
    return -torch.minimum(r * advantages, rc * advantages).mean()


def clip_loss_shape_1(logp_new, logp_old, advantages, clip_eps=0.2):
    return ch17.ref_ppo_clip_loss(logp_new, logp_old, advantages, clip_eps).reshape(1)


CLIP_MISTAKES = [
    (_clip(pick=torch.maximum), r"`loss` is wrong.*max was taken instead of min"),
    (_clip(ratio="log"), r"`loss` is wrong.*logp_new / logp_old, a ratio of LOG-probabilities"),
    (_clip(clip="advantage"), r"`loss` is wrong.*advantage was clipped instead of the ratio"),
    (_clip(sign=1.0), r"`loss` is wrong.*sign is flipped"),
    (_clip(reduce="sum"), r"`loss` is wrong.*summed instead of averaged"),
    (clip_loss_item, r"returned a float .*\.item\(\), float\(\) or numpy"),
    (clip_loss_detached, r"no gradient flows to logp_new.*detached"),
    (clip_loss_rewrapped, r"no gradient flows to logp_new.*detached"),
    (
        clip_loss_straight_through,
        r"`d loss / d logp_new` is not zero where the clipped term is the one chosen",
    ),
    (clip_loss_shape_1, r"`loss` should have shape \(\), but it has shape \(1,\)"),
]


@pytest.mark.parametrize(("fn", "pattern"), CLIP_MISTAKES, ids=[str(i) for i in range(10)])
def test_clip_loss_mistake_is_named(fn, pattern):
    for seed in MISTAKE_SEEDS:
        with pytest.raises(cu.CheckFailure, match=pattern):
            cu.check("ppo_clip_loss", fn, strict=True, seed=seed)


def _vloss(*, clipped="right", pick=torch.maximum, half=0.5):
    def fn(values, old_values, returns, clip_eps=0.2):
        if clipped == "ratio":
            vc = torch.clamp(values / old_values, 1 - clip_eps, 1 + clip_eps) * old_values
        elif clipped == "around_return":
            vc = torch.clamp(values, returns - clip_eps, returns + clip_eps)
        else:
            vc = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        return half * pick((values - returns) ** 2, (vc - returns) ** 2).mean()

    return fn


def value_loss_item(values, old_values, returns, clip_eps=0.2):
    return float(ch17.ref_value_loss_clipped(values, old_values, returns, clip_eps))


def value_loss_detached(values, old_values, returns, clip_eps=0.2):
    with torch.no_grad():
        return ch17.ref_value_loss_clipped(values, old_values, returns, clip_eps)


def value_loss_straight_through(values, old_values, returns, clip_eps=0.2):
    step = values - old_values
    step = step + (torch.clamp(step, -clip_eps, clip_eps) - step).detach()
    return 0.5 * torch.maximum((values - returns) ** 2, (old_values + step - returns) ** 2).mean()


VALUE_MISTAKES = [
    (_vloss(clipped="ratio"), r"`loss` is wrong.*value clip was applied like the policy ratio"),
    (_vloss(pick=torch.minimum), r"`loss` is wrong.*min was taken instead of max"),
    (_vloss(half=1.0), r"`loss` is wrong.*factor 0\.5 is missing"),
    (_vloss(clipped="around_return"), r"`loss` is wrong.*v itself was clipped to \[R - eps"),
    (value_loss_item, r"returned a float .*\.item\(\), float\(\) or numpy"),
    (value_loss_detached, r"no gradient flows to values.*detached"),
    (
        value_loss_straight_through,
        r"`d loss / d values` is not zero where the clipped term is the one chosen",
    ),
]


@pytest.mark.parametrize(("fn", "pattern"), VALUE_MISTAKES, ids=[str(i) for i in range(7)])
def test_value_loss_mistake_is_named(fn, pattern):
    for seed in MISTAKE_SEEDS:
        with pytest.raises(cu.CheckFailure, match=pattern):
            cu.check("value_loss_clipped", fn, strict=True, seed=seed)


def test_in_place_gae_is_refused():
    def in_place(rewards, values, dones, last_value, gamma=0.99, lam=0.95):
        adv, ret = ch17.ref_compute_gae(rewards, values, dones, last_value, gamma, lam)
        rewards.zero_()
        return adv, ret

    with pytest.raises(cu.CheckFailure, match=r"changed its input `rewards` in place"):
        cu.check("compute_gae", in_place, strict=True)


def test_the_battery_feeds_float_dones_in_the_rewards_dtype():
    seen = []

    def spy(rewards, values, dones, last_value, gamma=0.99, lam=0.95):
        seen.append((rewards.dtype, dones.dtype, tuple(rewards.shape), tuple(last_value.shape)))
        return ch17.ref_compute_gae(rewards, values, dones, last_value, gamma, lam)

    cu.check("compute_gae", spy, strict=True)
    assert all(r == d for r, d, _, _ in seen)
    assert all(lv == shape[1:] for _, _, shape, lv in seen)
    assert {len(s) for _, _, s, _ in seen} == {1, 2, 3}


def test_contract_signatures():
    listed = {e.id: e for e in cu.exercises("17")}
    assert set(listed) == set(CORRECT)
    assert listed["compute_gae"].signature.endswith("-> (advantages, returns)")
    assert listed["ppo_clip_loss"].signature == (
        "(logp_new, logp_old, advantages, clip_eps=0.2) -> 0-d Tensor"
    )


def test_report_check_seconds(capsys):
    """Times each check on the reference and the slowest correct style; reported, never asserted."""
    report_check_seconds(CORRECT, capsys)


# =====================================================================================
# The chapter's own rollout code: bad input gets one line
# =====================================================================================
@pytest.fixture(scope="module")
def rollout_helpers(solution_cells):
    namespace = {"torch": torch}
    for source in solution_cells("17_ppo", ["check_rollout"]):
        exec(source, namespace)  # noqa: S102 - the chapter's own cell
    return namespace


def test_rollout_shapes_are_checked_in_one_line(rollout_helpers):
    check_rollout = rollout_helpers["check_rollout"]
    r, v, d, lv = torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(2)
    check_rollout(r, v, d, lv)
    bad = [
        ((r, torch.zeros(4, 3), d, lv), r"rewards \(4, 2\), values \(4, 3\) and dones \(4, 2\)"),
        ((r, v, torch.zeros(3, 2), lv), r"rewards \(4, 2\), values \(4, 2\) and dones \(3, 2\)"),
        ((r, v, d, torch.zeros(3)), r"last_value has shape \(3,\).*\(2,\)"),
        ((r, v, d.bool(), lv), r"dones should be 0\.0/1\.0 in the rewards' dtype"),
    ]
    for args, pattern in bad:
        with pytest.raises(ValueError, match=pattern) as info:
            check_rollout(*args)
        assert "\n" not in str(info.value)
        assert re.search(pattern, str(info.value))
