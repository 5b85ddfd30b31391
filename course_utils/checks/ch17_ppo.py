"""Check batteries of chapter 17: GAE, PPO's clipped surrogate and the clipped value loss.

The references below follow the contract (``../shared/EXERCISES.md``) line by line; chapter 18
reuses them for PPO over tokens.
"""

from __future__ import annotations

import torch

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
