"""Check battery of chapter 18: the per-token, KL-penalised rewards of RLHF with PPO.

``kl_penalized_rewards`` turns one sampled batch into the rewards PPO sees: a KL penalty
-kl_coef * (logprobs - ref_logprobs) on every valid token and the reward model's score added
at the last valid token of each row. Most of what goes wrong is *where* that last token is, so
the battery pads on the right, on the left, and with holes in the mask, and puts junk (large,
finite log-probabilities) on the padding, so that an unmasked KL term shows. Rows with no valid
token may be present; their output is not judged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..checking import Tester, exercise

CHAPTER = "18_ppo_for_llms"
Tensor = torch.Tensor


# ---- reference ------------------------------------------------------------------------------
def last_true_index(mask: Tensor) -> Tensor:
    """(B,) int64: the index of the last True of each row of ``mask`` (B, T); T-1 for an all-False row."""
    T = mask.shape[-1]
    return T - 1 - mask.flip(-1).long().argmax(-1)  # argmax finds the first maximum


def ref_kl_penalized_rewards(
    logprobs: Tensor, ref_logprobs: Tensor, scores: Tensor, kl_coef: float, mask: Tensor
) -> Tensor:
    """(B, T) rewards: -kl_coef * (logprobs - ref_logprobs) where mask, 0 elsewhere, plus scores[b]
    at the last True of row b (rows without a True get no score)."""
    rewards = torch.where(
        mask, -kl_coef * (logprobs - ref_logprobs), torch.zeros((), dtype=logprobs.dtype)
    )
    rows = torch.nonzero(mask.any(-1)).squeeze(-1)  # (B',) rows with a valid token
    rewards[rows, last_true_index(mask)[rows]] += scores[rows].to(rewards.dtype)
    return rewards


# ---- mistake models -------------------------------------------------------------------------
def _place(kl: Tensor, scores: Tensor, mask: Tensor, index: Tensor) -> Tensor:
    """kl with scores[b] added at (b, index[b]) for the rows that have a valid token."""
    out = kl.clone()
    rows = torch.nonzero(mask.any(-1)).squeeze(-1)
    out[rows, index[rows].clamp(0, mask.shape[-1] - 1)] += scores[rows]
    return out


def _mistakes(
    lp: Tensor, ref: Tensor, scores: Tensor, kl_coef: float, mask: Tensor
) -> list[tuple[str, Callable[[], Tensor]]]:
    """What the usual mistakes return on these inputs, in float64, all rows."""
    lp, ref, scores = lp.double(), ref.double(), scores.double()
    diff = lp - ref
    zero = torch.zeros((), dtype=torch.float64)
    kl = torch.where(mask, -kl_coef * diff, zero)
    last = last_true_index(mask)
    T = mask.shape[-1]
    first = mask.long().argmax(-1)
    return [
        (
            "the score was added at the FIRST valid token of each row; it belongs on the LAST one, "
            "the token after which the whole completion exists and can be judged.",
            lambda: _place(kl, scores, mask, first),
        ),
        (
            "the score was added at position T-1 whatever the padding: on a right-padded row that is "
            "a padding position. Put it at the last True of the row's mask.",
            lambda: _place(kl, scores, mask, torch.full_like(last, T - 1)),
        ),
        (
            "the score was added at index mask.sum(-1) - 1, the last token only when the valid tokens "
            "start at 0: with left padding or holes in the mask the last valid token is elsewhere. "
            "Find the last True of each row (e.g. T - 1 - mask.flip(-1).int().argmax(-1)).",
            lambda: _place(kl, scores, mask, mask.long().sum(-1) - 1),
        ),
        (
            "the KL term was not masked: padding positions got -kl_coef * (logprobs - ref_logprobs) "
            "too (and their log-probabilities are junk). Keep it on valid tokens only and put 0 "
            "elsewhere (torch.where(mask, ..., 0)).",
            lambda: _place(-kl_coef * diff, scores, mask, last),
        ),
        (
            "the KL penalty has the wrong sign: it rewards the tokens the policy likes more than the "
            "reference. The reward is -kl_coef * (logprobs - ref_logprobs), a penalty for drifting away.",
            lambda: _place(-kl, scores, mask, last),
        ),
        (
            "kl_coef is missing: the KL term was -(logprobs - ref_logprobs) instead of "
            "-kl_coef * (logprobs - ref_logprobs).",
            lambda: _place(torch.where(mask, -diff, zero), scores, mask, last),
        ),
        (
            "kl_coef multiplies the score too (kl_coef * (score - KL)); only the KL term is scaled, "
            "the score is added as it is.",
            lambda: _place(kl, kl_coef * scores, mask, last),
        ),
        (
            "the score was added at every valid token; it is added once, at the last valid token.",
            lambda: kl + torch.where(mask, scores[:, None], zero),
        ),
        (
            "the score is missing: only the KL terms came back. Add scores[b] at the last valid "
            "token of row b.",
            lambda: kl,
        ),
        (
            "the score REPLACED the KL term at the last valid token (rewards[b, last] = score); the "
            "last token keeps its own KL penalty too: add the score to it.",
            lambda: _place(
                kl.scatter(-1, last[:, None], torch.zeros_like(last[:, None], dtype=kl.dtype)),
                scores,
                mask,
                last,
            ),
        ),
    ]


# ---- inputs ---------------------------------------------------------------------------------
def _right(lengths: list[int], T: int) -> Tensor:
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def _left(lengths: list[int], T: int) -> Tensor:
    return torch.arange(T)[None, :] >= T - torch.tensor(lengths)[:, None]


def _holes(t: Tester, B: int, T: int) -> Tensor:
    """Random (B, T) masks, T >= 3, each row with two Trues at i < j and a False at i + 1 < j."""
    m = t.rand(B, T) < 0.55
    for b in range(B):
        i = int(t.randint(T - 2))
        j = i + 2 + int(t.randint(T - i - 2))
        m[b, i], m[b, i + 1], m[b, j] = True, False, True
    return m


def _inputs(
    t: Tester, mask: Tensor, dtype: torch.dtype, junk: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """logprobs and ref_logprobs (B, T) (negative; junk on padding) and scores (B,)."""
    B, T = mask.shape
    lp = -(t.rand(B, T) * 3 + 0.05)
    ref = -(t.rand(B, T) * 3 + 0.05)
    if junk:
        # Padding holds whatever the model computed there: make it loud, so an unmasked KL shows.
        lp = torch.where(mask, lp, -40.0 - 20 * t.rand(B, T))
        ref = torch.where(mask, ref, -1.0 - t.rand(B, T))
    scores = t.randn(B, scale=2.0)
    return lp.to(dtype), ref.to(dtype), scores.to(dtype)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---- judging --------------------------------------------------------------------------------
def _judge(
    t: Tester, case: str, mask: Tensor, dtype: torch.dtype, kl_coef: float, junk: bool = True
) -> None:
    lp, ref, scores = _inputs(t, mask, dtype, junk)
    got = t.call(case, lp, ref, scores, kl_coef, mask)
    if isinstance(got, tuple | list):
        t.fail(
            case,
            f"kl_penalized_rewards returned a {type(got).__name__}; the contract returns one "
            "tensor of rewards, shape (B, T).",
        )
    got = t.expect_tensor(case, "rewards", got, shape=mask.shape, dtype=dtype)
    want = ref_kl_penalized_rewards(lp, ref, scores, kl_coef, mask)
    # Rows with no valid token are not judged: whatever came back there counts as right.
    judged = mask.any(-1, keepdim=True)  # (B, 1)
    got = torch.where(judged, got.detach(), want)
    mistakes = [
        (sentence, (lambda m=model: torch.where(judged, m(), want.double())))
        for sentence, model in _mistakes(lp, ref, scores, kl_coef, mask)
    ]
    quantity = "rewards" if bool(judged.all()) else "rewards (rows with a valid token)"
    t.compare(case, quantity, got, want, mistakes=mistakes)


def _cases() -> list[tuple[str, Callable[[Tester], Tensor], torch.dtype, float]]:
    f64, f32 = torch.float64, torch.float32
    return [
        (
            "right-padded, lengths [5, 2, 7, 1], T=7",
            lambda t: _right([5, 2, 7, 1], 7),
            f64,
            0.1,
        ),
        (
            "left-padded, lengths [3, 6, 1, 4], T=6",
            lambda t: _left([3, 6, 1, 4], 6),
            f64,
            0.2,
        ),
        (
            "left-padded prompt and right-padded completion (valid tokens in the middle), T=9",
            lambda t: _right([7, 9, 5], 9) & _left([5, 8, 6], 9),
            f64,
            0.05,
        ),
        (
            "masks with holes (the last valid token is the last True, wherever it is), B=6, T=8",
            lambda t: _holes(t, 6, 8),
            f64,
            0.3,
        ),
        (
            "a row with no valid token among right-padded rows (that row is not judged), T=5",
            lambda t: _right([3, 0, 5, 2], 5),
            f64,
            0.1,
        ),
        (
            "rows with no valid token among masks with holes (not judged), B=5, T=6",
            lambda t: _holes(t, 5, 6) & torch.tensor([True, False, True, True, False])[:, None],
            f64,
            0.2,
        ),
        ("B=1, right-padded, length 3 of T=6", lambda t: _right([3], 6), f64, 0.1),
        ("B=1, T=1", lambda t: torch.ones(1, 1, dtype=torch.bool), f64, 0.5),
        ("B=3, T=1", lambda t: torch.ones(3, 1, dtype=torch.bool), f64, 0.5),
        (
            "right-padded, B=8, T=12",
            lambda t: _right([12, 3, 7, 1, 9, 12, 5, 2], 12),
            f32,
            0.1,
        ),
        ("masks with holes, B=4, T=10", lambda t: _holes(t, 4, 10), f32, 0.1),
        (
            "left-padded, lengths [2, 5, 4], T=5 (kl_coef 0: the score alone)",
            lambda t: _left([2, 5, 4], 5),
            f64,
            0.0,
        ),
        (
            "right-padded, lengths [4, 6, 2], T=6 (a large kl_coef)",
            lambda t: _right([4, 6, 2], 6),
            f64,
            50.0,
        ),
    ]


def _judge_all(t: Tester) -> None:
    for case, make_mask, dtype, kl_coef in _cases():
        mask = make_mask(t)
        _judge(t, f"{case}, {_dt(dtype)}, kl_coef={kl_coef:g}", mask, dtype, kl_coef)
    # A long batch, as a rollout makes: 64 completions of up to 24 tokens.
    lengths = (t.randint(24, 64) + 1).tolist()
    _judge(
        t,
        "a rollout: 64 rows, right-padded to T=24, float32",
        _right(lengths, 24),
        torch.float32,
        0.05,
    )


@exercise(
    "kl_penalized_rewards",
    chapter=CHAPTER,
    signature="(logprobs (B,T), ref_logprobs (B,T), scores (B,), kl_coef, mask (B,T) bool) -> (B,T)",
    summary="RLHF rewards: -kl_coef*(logprobs-ref_logprobs) on valid tokens, 0 elsewhere, and "
    "scores[b] added at the last valid token of row b",
    reference=ref_kl_penalized_rewards,
)
def check_kl_penalized_rewards(t: Tester) -> None:
    """Right and left padding, holes, empty rows, B=1, T=1, float32/64, kl_coef 0 and large."""
    _judge_all(t)
