"""Check batteries of chapter 09: attention, its backward pass, multi-head attention, FlashAttention tiling."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..checking import CheckFailure, Tester, exercise
from ..gradcheck import numerical_gradient

CHAPTER = "09_attention"
#: PyTorch's attention operators, forbidden inside the exercises that rebuild them.
SDPA_OPS = (
    "scaled_dot_product_attention",
    "scaled_dot_product_attention_math",
    "scaled_dot_product_flash_attention",
    "scaled_dot_product_flash_attention_for_cpu",
    "scaled_dot_product_efficient_attention",
    "multi_head_attention_forward",
)
Tensor = torch.Tensor

UNSTABLE = (
    "the output has NaN or inf for scores of magnitude about 1e4, though the true output is finite: "
    "exp overflowed or a row's sum underflowed to 0. Subtract each row's maximum score (keepdim=True) "
    "before exponentiating; in a tiled softmax start the running maximum at -inf, not 0."
)


# ---- masks and references ------------------------------------------------------------------
def causal_mask(L: int, S: int, diagonal: int = 0) -> Tensor:
    """(L, S) bool, True where query i may attend key j: j <= i + diagonal (top-left aligned at 0)."""
    return torch.ones(L, S, dtype=torch.bool).tril(diagonal)


def _scores_bias(
    L: int, S: int, dtype: torch.dtype, attn_mask: Tensor | None, is_causal: bool
) -> Tensor | None:
    """The additive bias (…, L, S) equivalent to the mask arguments, or None."""
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(
                ~attn_mask, float("-inf")
            )
        else:
            bias = attn_mask.to(dtype)
    if is_causal:
        c = torch.zeros(L, S, dtype=dtype).masked_fill(~causal_mask(L, S), float("-inf"))
        bias = c if bias is None else bias + c.to(bias.device)
    return bias


def ref_scaled_dot_product_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v, as F.scaled_dot_product_attention."""
    bias = _scores_bias(q.shape[-2], k.shape[-2], q.dtype, attn_mask, is_causal)
    bias = None if bias is None else bias.to(q.device)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., L, S)
    if bias is not None:
        scores = scores + bias
    return torch.softmax(scores, -1) @ v


def ref_attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of softmax(q k^T / sqrt(d) + mask) v, through the softmax Jacobian."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    bias = _scores_bias(q.shape[-2], k.shape[-2], q.dtype, attn_mask, is_causal)
    scores = q @ k.transpose(-2, -1) * scale
    if bias is not None:
        scores = scores + bias
    p = torch.softmax(scores, -1)  # (..., L, S)
    dv = p.transpose(-2, -1) @ dout  # (..., S, dv)
    dp = dout @ v.transpose(-2, -1)  # (..., L, S)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    return ds @ k * scale, ds.transpose(-2, -1) @ q * scale, dv


def ref_multi_head_attention_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    num_heads: int,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """nn.MultiheadAttention(E, num_heads, batch_first=True) with the given weights, written out."""
    n, L, e = query.shape
    s, h = key.shape[1], num_heads
    wq, wk, wv = in_proj_weight.chunk(3)
    bq, bk, bv = in_proj_bias.chunk(3)
    q = (query @ wq.T + bq).view(n, L, h, e // h).transpose(1, 2)  # (N, h, L, d)
    k = (key @ wk.T + bk).view(n, s, h, e // h).transpose(1, 2)  # (N, h, S, d)
    v = (value @ wv.T + bv).view(n, s, h, e // h).transpose(1, 2)  # (N, h, S, d)
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # (N, 1, 1, S)
    o = ref_scaled_dot_product_attention(q, k, v, mask)  # (N, h, L, d)
    return o.transpose(1, 2).reshape(n, L, e) @ out_proj_weight.T + out_proj_bias


def ref_flash_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, block_size: int = 64, is_causal: bool = False
) -> Tensor:
    """Tiled attention: query blocks outside, key blocks inside, running max and sum per row."""
    L, S, b = q.shape[-2], k.shape[-2], block_size
    scale = 1.0 / math.sqrt(q.shape[-1])
    blocks = []
    for i0 in range(0, L, b):
        qi = q[..., i0 : i0 + b, :] * scale  # (..., bq, d)
        m = torch.full(qi.shape[:-1] + (1,), float("-inf"), dtype=q.dtype, device=q.device)
        ell = torch.zeros_like(m)  # running sum of exp(s - m)
        acc = torch.zeros(
            qi.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device
        )  # (..., bq, dv)
        for j0 in range(0, S, b):
            if is_causal and j0 > i0 + qi.shape[-2] - 1:
                break  # every key from here on lies in every query's future
            s = qi @ k[..., j0 : j0 + b, :].transpose(-2, -1)  # (..., bq, bk)
            if is_causal:
                rows = torch.arange(i0, i0 + s.shape[-2], device=q.device)[:, None]
                cols = torch.arange(j0, j0 + s.shape[-1], device=q.device)[None, :]
                s = s.masked_fill(cols > rows, float("-inf"))
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - safe)
            alpha = torch.exp(m - safe)  # rescales what was summed under the old maximum
            ell = alpha * ell + p.sum(-1, keepdim=True)
            acc = alpha * acc + p @ v[..., j0 : j0 + b, :]
            m = m_new
        blocks.append(acc / ell)
    return torch.cat(blocks, -2)


# ---- mistake models ------------------------------------------------------------------------
def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    allowed: Tensor | None = None,
    bias: Tensor | None = None,
    scale: float | None = None,
    dim: int = -1,
    zero_after: bool = False,
    fill: float = float("-inf"),
) -> Tensor:
    """Attention with the knobs learners get wrong: mask, bias, scale, softmax axis, fill value."""
    q, k, v = q.double(), k.double(), v.double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-2, -1) * scale
    if bias is not None:
        s = s + bias.double()
    if allowed is not None and not zero_after:
        s = s.masked_fill(~allowed, fill)
    p = torch.softmax(s, dim)
    if allowed is not None and zero_after:
        p = p * allowed
    return p @ v


def _where_rows_dead(model: Tensor, got: Any) -> Tensor:
    # A mistaken mask can leave a row with nothing to attend (NaN there, or whatever the learner's
    # code makes of it); judge the mistake on the other rows only.
    if not torch.is_tensor(got) or got.shape != model.shape:
        return model
    dead = torch.isnan(model).any(-1, keepdim=True)
    return torch.where(dead, got.detach().double(), model)


def _causal_mistakes(
    q: Tensor, k: Tensor, v: Tensor, got: Any, extra: Tensor | None = None
) -> list:
    L, S = q.shape[-2], k.shape[-2]

    def with_mask(allowed: Tensor) -> Callable[[], Tensor]:
        full = allowed if extra is None else allowed & extra
        return lambda: _where_rows_dead(_attend(q, k, v, full), got)

    out = [
        (
            "the causal mask also hides the diagonal (each query must see its own key): use "
            "tril(ones(L, S)) with diagonal=0, or mask where j > i, not j >= i.",
            with_mask(causal_mask(L, S, -1)),
        ),
        (
            "the causal mask lets each query see one key into the future (j <= i + 1).",
            with_mask(causal_mask(L, S, 1)),
        ),
        (
            "the causal mask hides the past instead of the future (triu instead of tril).",
            with_mask(torch.ones(L, S, dtype=torch.bool).triu()),
        ),
        (
            "is_causal was ignored: no causal mask was applied.",
            with_mask(torch.ones(L, S, dtype=torch.bool)),
        ),
        (
            "the causal mask was inverted: -inf was filled where tril(ones(L, S)) is True (the keys a "
            "query MAY see); fill it where the tril mask is False, the future keys j > i.",
            with_mask(~causal_mask(L, S)),
        ),
        (
            "the future scores were set to 0 instead of -inf: a score of 0 still gets weight exp(0) "
            "in the softmax; fill -inf where j > i.",
            lambda: _attend(
                q, k, v, causal_mask(L, S) if extra is None else causal_mask(L, S) & extra, fill=0.0
            ),
        ),
    ]
    if L != S:
        out.insert(
            0,
            (
                f"the causal mask is aligned to the bottom-right corner (j <= i + S - L = i + {S - L}); "
                "PyTorch's is_causal aligns it to the top-left: query i sees keys j <= i, also when L != S.",
                with_mask(causal_mask(L, S, S - L)),
            ),
        )
    return out


def _sdpa_mistakes(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, got: Any
) -> list:
    d = q.shape[-1]
    L, S = q.shape[-2], k.shape[-2]
    allowed, bias = None, None
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = attn_mask
    elif attn_mask is not None:
        bias = attn_mask
    if is_causal:
        allowed = causal_mask(L, S)
    out = [
        (
            "the scores were divided by d instead of sqrt(d).",
            lambda: _attend(q, k, v, allowed, bias, 1.0 / d),
        ),
        (
            "the scores were not scaled: divide q k^T by sqrt(d).",
            lambda: _attend(q, k, v, allowed, bias, 1.0),
        ),
        (
            "the scores were multiplied by sqrt(d) instead of divided by it.",
            lambda: _attend(q, k, v, allowed, bias, math.sqrt(d)),
        ),
        (
            "the scores were scaled by 1/sqrt(dv), the value size; the scale is 1/sqrt(d), d = q.shape[-1].",
            lambda: (
                _attend(q, k, v, allowed, bias, 1.0 / math.sqrt(v.shape[-1]))
                if v.shape[-1] != d
                else None
            ),
        ),
        (
            "the softmax was taken over the queries (dim=-2); each query's weights over the keys "
            "must sum to 1, so take it over the last axis.",
            lambda: _attend(q, k, v, allowed, bias, dim=-2),
        ),
    ]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        out += [
            (
                "the bool mask was inverted: True means the key MAY be attended (PyTorch's convention), "
                "so fill -inf where the mask is False.",
                lambda: _where_rows_dead(
                    _attend(q, k, v, ~attn_mask.expand(q.shape[:-1] + (S,))), got
                ),
            ),
            ("the bool mask was ignored.", lambda: _attend(q, k, v)),
            (
                "the masked scores were set to 0 instead of -inf: a score of 0 still gets weight exp(0) "
                "in the softmax; use masked_fill(~attn_mask, float('-inf')).",
                lambda: _attend(q, k, v, attn_mask, fill=0.0),
            ),
            (
                "the bool mask was added to the scores as numbers (True = 1, False = 0); a bool mask "
                "selects: fill -inf where it is False.",
                lambda: _attend(q, k, v, bias=attn_mask.double()),
            ),
            (
                "the masked probabilities were zeroed after the softmax without renormalising; mask the "
                "scores with -inf before the softmax.",
                lambda: _attend(q, k, v, attn_mask, zero_after=True),
            ),
        ]
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        fm = attn_mask.double()
        out += [
            (
                "the float mask was treated as a bool mask (or ignored); a float attn_mask is ADDED to the scores.",
                lambda: _attend(q, k, v, fm != 0),
            ),
            (
                "the float mask was multiplied with the scores; a float attn_mask is added to them.",
                lambda: _mul_mask(q, k, v, fm),
            ),
            (
                "the float mask was added after the 1/sqrt(d) scaling was applied to it too; PyTorch adds "
                "the mask to the already scaled scores.",
                lambda: _attend(q, k, v, bias=fm / math.sqrt(d)),
            ),
            ("the float mask was ignored.", lambda: _attend(q, k, v)),
        ]
    if is_causal:
        out += _causal_mistakes(q, k, v, got)
    return out


def _mul_mask(q: Tensor, k: Tensor, v: Tensor, fm: Tensor) -> Tensor:
    s = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(q.shape[-1]) * fm
    return torch.softmax(s, -1) @ v.double()


# ---- scaled dot-product attention ----------------------------------------------------------
def _row_allowed(t: Tester, *shape: int) -> Tensor:
    """A random bool mask with at least one True and one False in every row (no fully masked row)."""
    m = t.rand(*shape) < 0.6
    S = shape[-1]
    first = t.randint(S, *shape[:-1])
    m.scatter_(-1, first[..., None], True)
    second = (first + 1 + t.randint(S - 1, *shape[:-1])) % S
    m.scatter_(-1, second[..., None], False)
    return m


def _float_mask(t: Tester, *shape: int) -> Tensor:
    bias = t.randn(*shape, scale=2.0)
    dead = ~_row_allowed(t, *shape) & (t.rand(*shape) < 0.5)
    return bias.masked_fill(dead, float("-inf"))


def _sdpa_cases(t: Tester) -> list[tuple[str, tuple, dict]]:
    f32 = torch.float32
    cases = [
        (
            "q (2,3,4,5), k (2,3,6,5), v (2,3,6,7) float64",
            (t.randn(2, 3, 4, 5), t.randn(2, 3, 6, 5), t.randn(2, 3, 6, 7)),
            {},
        ),
        (
            "q (5,3), k (5,3), v (5,4) float64, no batch dims",
            (t.randn(5, 3), t.randn(5, 3), t.randn(5, 4)),
            {},
        ),
        (
            "q (2,4,3), k (2,6,3), v (2,6,2) float64, bool attn_mask (4,6) broadcast over the batch",
            (t.randn(2, 4, 3), t.randn(2, 6, 3), t.randn(2, 6, 2)),
            {"attn_mask": _row_allowed(t, 4, 6)},
        ),
        (
            "q (2,2,5,4), k (2,2,5,4), v (2,2,5,3) float64, bool attn_mask (2,2,5,5)",
            (t.randn(2, 2, 5, 4), t.randn(2, 2, 5, 4), t.randn(2, 2, 5, 3)),
            {"attn_mask": _row_allowed(t, 2, 2, 5, 5)},
        ),
        (
            "q (2,4,3), k (2,5,3), v (2,5,3) float64, float attn_mask (4,5) with some -inf",
            (t.randn(2, 4, 3), t.randn(2, 5, 3), t.randn(2, 5, 3)),
            {"attn_mask": _float_mask(t, 4, 5)},
        ),
        (
            "q (2,5,4), k (2,5,4), v (2,5,3) float64, is_causal=True (L = S)",
            (t.randn(2, 5, 4), t.randn(2, 5, 4), t.randn(2, 5, 3)),
            {"is_causal": True},
        ),
        (
            "q (2,3,4), k (2,6,4), v (2,6,2) float64, is_causal=True with L=3 < S=6",
            (t.randn(2, 3, 4), t.randn(2, 6, 4), t.randn(2, 6, 2)),
            {"is_causal": True},
        ),
        (
            "q (1,6,3), k (1,4,3), v (1,4,5) float64, is_causal=True with L=6 > S=4",
            (t.randn(1, 6, 3), t.randn(1, 4, 3), t.randn(1, 4, 5)),
            {"is_causal": True},
        ),
        (
            "q (2,4,16,8), k (2,4,12,8), v (2,4,12,8) float32",
            (
                t.randn(2, 4, 16, 8, dtype=f32),
                t.randn(2, 4, 12, 8, dtype=f32),
                t.randn(2, 4, 12, 8, dtype=f32),
            ),
            {},
        ),
        (
            "q (2,8,4), k (2,8,4), v (2,8,4) float32, is_causal=True",
            (t.randn(2, 8, 4, dtype=f32), t.randn(2, 8, 4, dtype=f32), t.randn(2, 8, 4, dtype=f32)),
            {"is_causal": True},
        ),
        (
            "q (2,4,3), k (2,6,3), v (2,6,3) float32, bool attn_mask (2,4,6)",
            (t.randn(2, 4, 3, dtype=f32), t.randn(2, 6, 3, dtype=f32), t.randn(2, 6, 3, dtype=f32)),
            {"attn_mask": _row_allowed(t, 2, 4, 6)},
        ),
        (
            "q (2,4,4), k (2,6,4), v (2,6,3) float64, extreme scores of magnitude ~1e4",
            (t.randn(2, 4, 4, scale=100.0), t.randn(2, 6, 4, scale=100.0), t.randn(2, 6, 3)),
            {},
        ),
        (
            "q (2,5,4), k (2,7,4), v (2,7,3) float64, every score near -5000",
            _all_negative(t, 5, 7),
            {},
        ),
        (
            "q (2,4,4), k (2,6,4), v (2,6,3) float32, extreme scores of magnitude ~1e4",
            (
                t.randn(2, 4, 4, dtype=f32, scale=100.0),
                t.randn(2, 6, 4, dtype=f32, scale=100.0),
                t.randn(2, 6, 3, dtype=f32),
            ),
            {},
        ),
    ]
    return cases


def _torch_sdpa(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool
) -> Tensor:
    with torch.no_grad():
        return F.scaled_dot_product_attention(
            q.double(),
            k.double(),
            v.double(),
            attn_mask=None
            if attn_mask is None
            else (attn_mask if attn_mask.dtype == torch.bool else attn_mask.double()),
            is_causal=is_causal,
        )


def _judge_output(
    t: Tester, case: str, got: Any, expected: Tensor, dtype: torch.dtype, mistakes: list
) -> None:
    got = t.expect_tensor(case, "output", got, shape=expected.shape, dtype=dtype)
    if not torch.isfinite(got).all() and torch.isfinite(expected).all():
        for (
            sentence,
            alt,
        ) in mistakes:  # a mask mistake can leave a row empty: name it if it matches
            try:
                alt_t = alt() if callable(alt) else alt
            except Exception:  # noqa: BLE001 - a model that cannot run does not match
                continue
            if torch.is_tensor(alt_t) and alt_t.shape == got.shape:
                finite = torch.isfinite(got)
                if not torch.isfinite(alt_t[~finite]).any() and torch.allclose(
                    got[finite].double(), alt_t[finite], rtol=1e-3, atol=1e-5
                ):
                    t.fail(case, f"the output has NaN or inf. It looks like {sentence}")
        t.fail(case, UNSTABLE)
    t.compare(case, "output", got, expected.to(dtype), mistakes=mistakes)


#: The generic hint Tester adds to a broadcasting error; wrong where the battery knows better.
_KEEPDIM_HINT = "A reduction (max, sum, mean) without keepdim=True often causes this."
SQUARE_CAUSAL = (
    "It looks like the causal mask was built square, (L, L) or (S, S); the scores are (L, S) = "
    "({L}, {S}) here, so build it as torch.ones(L, S, dtype=torch.bool).tril() (query i sees keys j <= i)."
)


@exercise(
    "scaled_dot_product_attention",
    forbidden=SDPA_OPS,
    chapter=CHAPTER,
    signature="(q (...,L,d), k (...,S,d), v (...,S,dv), attn_mask=None, is_causal=False) -> (...,L,dv)",
    summary="softmax(q k^T / sqrt(d) + mask) v, as F.scaled_dot_product_attention",
    reference=ref_scaled_dot_product_attention,
)
def check_scaled_dot_product_attention(t: Tester) -> None:
    """Batch dims, L != S, d != dv, bool/float masks, causal with L != S, float32, extreme scores."""
    for case, (q, k, v), kw in _sdpa_cases(t):
        L, S = q.shape[-2], k.shape[-2]
        try:
            got = t.call(case, q, k, v, **kw)
        except CheckFailure as failure:
            text = str(failure)
            if kw.get("is_causal") and "must match the size" in text:
                if f"({L})" in text and f"({S})" in text and L != S:
                    raise CheckFailure(
                        f"{text.replace(f' {_KEEPDIM_HINT}', '')} {SQUARE_CAUSAL.format(L=L, S=S)}"
                    ) from None
            raise
        expected = _torch_sdpa(q, k, v, kw.get("attn_mask"), kw.get("is_causal", False))
        mistakes = _sdpa_mistakes(q, k, v, kw.get("attn_mask"), kw.get("is_causal", False), got)
        _judge_output(t, case, got, expected, q.dtype, mistakes)


# ---- attention backward ----------------------------------------------------------------------
def _torch_grads(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool
) -> tuple:
    qq, kk, vv = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    with torch.enable_grad():
        o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=causal)
        return torch.autograd.grad(o, (qq, kk, vv), dout.double())


def _backward_mistakes(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool
) -> dict:
    d = q.shape[-1]
    L, S = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(d)
    allowed = mask if mask is not None else (causal_mask(L, S) if causal else None)
    qd, kd, vd, dod = q.double(), k.double(), v.double(), dout.double()

    def parts(use_mask: bool = True) -> tuple[Tensor, Tensor]:
        s = qd @ kd.transpose(-2, -1) * scale
        if allowed is not None and use_mask:
            s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, -1)
        return p, dod @ vd.transpose(-2, -1)

    def ds(no_correction: bool = False, use_mask: bool = True, wrong_sum: str = "") -> Tensor:
        p, dp = parts(use_mask)
        if wrong_sum == "dP":
            return p * (dp - dp.sum(-1, keepdim=True))
        if wrong_sum == "queries":
            return p * (dp - (dp * p).sum(-2, keepdim=True))
        return p * dp if no_correction else p * (dp - (dp * p).sum(-1, keepdim=True))

    rowsum_dp = (
        "the softmax Jacobian's correction subtracts rowsum(dP); it subtracts rowsum(dP * P): "
        "dS = P * (dP - (dP * P).sum(-1, keepdim=True))."
    )
    over_queries = (
        "the softmax Jacobian's correction was summed over the queries (dim -2); it is a sum over "
        "each row's keys: dS = P * (dP - (dP * P).sum(-1, keepdim=True))."
    )

    jac = (
        "dS = P * dP is missing the softmax Jacobian's correction term: dS = P * (dP - rowsum(dP * P)).",
        "no_correction",
    )
    sentences = {
        "dq": [
            (jac[0], lambda: ds(True) @ kd * scale),
            (rowsum_dp, lambda: ds(wrong_sum="dP") @ kd * scale),
            (over_queries, lambda: ds(wrong_sum="queries") @ kd * scale),
            ("dq is missing the 1/sqrt(d) scale of the scores.", lambda: ds() @ kd),
            ("dq and dk are swapped.", lambda: ds().transpose(-2, -1) @ qd * scale),
            (
                "the backward recomputed P without the mask: masked scores get no gradient because their "
                "probabilities are 0.",
                lambda: ds(use_mask=False) @ kd * scale,
            ),
            (
                "dq is dS^T K: the transpose belongs to dk = dS^T Q.",
                lambda: ds().transpose(-2, -1) @ kd * scale,
            ),
        ],
        "dk": [
            (jac[0], lambda: ds(True).transpose(-2, -1) @ qd * scale),
            (rowsum_dp, lambda: ds(wrong_sum="dP").transpose(-2, -1) @ qd * scale),
            (over_queries, lambda: ds(wrong_sum="queries").transpose(-2, -1) @ qd * scale),
            (
                "dk is missing the 1/sqrt(d) scale of the scores.",
                lambda: ds().transpose(-2, -1) @ qd,
            ),
            ("dq and dk are swapped.", lambda: ds() @ kd * scale),
            (
                "dk is dS Q without the transpose; dk = dS^T Q (times 1/sqrt(d)).",
                lambda: ds() @ qd * scale,
            ),
            (
                "the backward recomputed P without the mask: masked scores get no gradient because their "
                "probabilities are 0.",
                lambda: ds(use_mask=False).transpose(-2, -1) @ qd * scale,
            ),
        ],
        "dv": [
            ("dv is P dout without the transpose; dv = P^T dout.", lambda: parts()[0] @ dod),
            (
                "dv used P computed without the mask.",
                lambda: parts(False)[0].transpose(-2, -1) @ dod,
            ),
            (
                "dv is dout summed over queries without the attention weights; dv = P^T dout.",
                lambda: dod.sum(-2, keepdim=True).expand(v.shape),
            ),
        ],
    }
    return sentences


def _backward_cases(t: Tester) -> list[tuple[str, tuple, dict]]:
    f32 = torch.float32
    return [
        (
            "q (2,4,5), k (2,6,5), v (2,6,3) float64",
            (t.randn(2, 4, 5), t.randn(2, 6, 5), t.randn(2, 6, 3)),
            {},
        ),
        (
            "q (2,2,5,4), k (2,2,5,4), v (2,2,5,4) float64 (L = S, d = dv)",
            (t.randn(2, 2, 5, 4), t.randn(2, 2, 5, 4), t.randn(2, 2, 5, 4)),
            {},
        ),
        (
            "q (2,4,3), k (2,6,3), v (2,6,2) float64, bool attn_mask (4,6)",
            (t.randn(2, 4, 3), t.randn(2, 6, 3), t.randn(2, 6, 2)),
            {"attn_mask": _row_allowed(t, 4, 6)},
        ),
        (
            "q (2,5,4), k (2,5,4), v (2,5,3) float64, bool attn_mask (2,5,5)",
            (t.randn(2, 5, 4), t.randn(2, 5, 4), t.randn(2, 5, 3)),
            {"attn_mask": _row_allowed(t, 2, 5, 5)},
        ),
        (
            "q (2,5,3), k (2,5,3), v (2,5,4) float64, is_causal=True",
            (t.randn(2, 5, 3), t.randn(2, 5, 3), t.randn(2, 5, 4)),
            {"is_causal": True},
        ),
        (
            "q (1,3,3), k (1,5,3), v (1,5,2) float64, is_causal=True with L=3 < S=5",
            (t.randn(1, 3, 3), t.randn(1, 5, 3), t.randn(1, 5, 2)),
            {"is_causal": True},
        ),
        (
            "q (2,3,8,8), k (2,3,10,8), v (2,3,10,6) float32",
            (
                t.randn(2, 3, 8, 8, dtype=f32),
                t.randn(2, 3, 10, 8, dtype=f32),
                t.randn(2, 3, 10, 6, dtype=f32),
            ),
            {},
        ),
        (
            "q (2,6,4), k (2,6,4), v (2,6,4) float32, is_causal=True",
            (t.randn(2, 6, 4, dtype=f32), t.randn(2, 6, 4, dtype=f32), t.randn(2, 6, 4, dtype=f32)),
            {"is_causal": True},
        ),
    ]


@exercise(
    "attention_backward",
    forbidden=SDPA_OPS,
    chapter=CHAPTER,
    signature="(dout, q, k, v, attn_mask=None, is_causal=False) -> (dq, dk, dv)",
    summary="gradients of softmax(q k^T / sqrt(d) + mask) v by hand (bool masks, no fully masked row)",
    reference=ref_attention_backward,
    backward=True,
)
def check_attention_backward(t: Tester) -> None:
    """Against autograd through F.scaled_dot_product_attention, and central differences on a small case."""
    for case, (q, k, v), kw in _backward_cases(t):
        dout = t.randn(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
        out = t.call(case, dout, q, k, v, **kw)
        dq, dk, dv = t.unpack(case, out, ("dq", "dk", "dv"))
        mask, causal = kw.get("attn_mask"), kw.get("is_causal", False)
        want = _torch_grads(dout, q, k, v, mask, causal)
        mist = _backward_mistakes(dout, q, k, v, mask, causal)
        for name, got, w, x in zip(("dq", "dk", "dv"), (dq, dk, dv), want, (q, k, v), strict=True):
            got = t.expect_tensor(case, name, got, shape=x.shape, dtype=x.dtype)
            t.compare(case, name, got, w.to(x.dtype), mistakes=mist[name])
    # Central differences of the reference forward, on a small masked case.
    case = "q (1,3,2), k (1,4,2), v (1,4,3) float64, bool attn_mask, against central differences"
    q, k, v = t.randn(1, 3, 2), t.randn(1, 4, 2), t.randn(1, 4, 3)
    mask = _row_allowed(t, 3, 4)
    dout = t.randn(1, 3, 3)
    numeric = numerical_gradient(
        lambda a, b, c: ref_scaled_dot_product_attention(a, b, c, mask), [q, k, v], dout
    )
    got = t.unpack(case, t.call(case, dout, q, k, v, attn_mask=mask), ("dq", "dk", "dv"))
    mist = _backward_mistakes(dout, q, k, v, mask, False)
    for name, g, n in zip(("dq", "dk", "dv"), got, numeric, strict=True):
        t.compare(case, name, g, n, rtol=1e-6, atol=1e-8, mistakes=mist[name])


# ---- multi-head attention --------------------------------------------------------------------
def _torch_mha(query, key, value, h, w_in, b_in, w_out, b_out, kpm) -> Tensor:
    with torch.no_grad():
        out, _ = F.multi_head_attention_forward(
            query.double().transpose(0, 1),
            key.double().transpose(0, 1),
            value.double().transpose(0, 1),
            query.shape[-1],
            h,
            w_in.double(),
            b_in.double(),
            None,
            None,
            False,
            0.0,
            w_out.double(),
            b_out.double(),
            training=False,
            key_padding_mask=kpm,
            need_weights=False,
        )
    return out.transpose(0, 1)


def _mha_variant(
    query,
    key,
    value,
    h,
    w_in,
    b_in,
    w_out,
    b_out,
    kpm,
    *,
    order=(0, 1, 2),
    split="ok",
    merge="ok",
    untransposed=False,
    no_in_bias=False,
    out_proj=True,
    out_bias=True,
    kpm_mode="ok",
    scale_e=False,
) -> Tensor:
    """nn.MultiheadAttention with one thing done the way learners get it wrong."""
    query, key, value = query.double(), key.double(), value.double()
    w_in, b_in, w_out, b_out = w_in.double(), b_in.double(), w_out.double(), b_out.double()
    n, L, e = query.shape
    s, d = key.shape[1], e // h
    ws, bs = w_in.chunk(3), b_in.chunk(3)
    ws = [ws[i] for i in order]
    bs = [bs[i] for i in order]

    def proj(x, w, b):
        y = x @ (w if untransposed else w.T)
        return y if no_in_bias else y + b

    def heads(x, length):
        if split == "no_transpose":  # (N, L, h, d): attention then runs across the heads
            return x.reshape(n, length, h, d)
        if split == "view":
            return x.reshape(n, h, length, d)
        if split == "contiguous_last":
            return x.reshape(n, length, d, h).permute(0, 3, 1, 2)
        return x.reshape(n, length, h, d).transpose(1, 2)

    q, k, v = (
        heads(proj(x, w, b), ln)
        for x, w, b, ln in zip((query, key, value), ws, bs, (L, s, s), strict=True)
    )
    allowed = None
    if kpm is not None and kpm_mode != "ignored":
        allowed = (kpm if kpm_mode == "inverted" else ~kpm)[:, None, None, :].expand(n, h, L, s)
    o = _attend(q, k, v, allowed, scale=1.0 / math.sqrt(e) if scale_e else None)
    o = o.reshape(n, L, e) if merge == "view" else o.transpose(1, 2).reshape(n, L, e)
    if not out_proj:
        return o
    return o @ w_out.T + (b_out if out_bias else 0)


NO_HEAD_TRANSPOSE = (
    "the heads were split as (N, L, h, d) without transpose(1, 2), so attention ran across the h "
    "heads of each position instead of across the positions; transpose to (N, h, L, d) before "
    "q @ k^T, and back before merging."
)


def _mha_mistakes(args: tuple, got: Any) -> list:
    kpm = args[-1]
    out: list = [
        (
            NO_HEAD_TRANSPOSE,
            lambda: (
                _mha_variant(*args, split="no_transpose", merge="view")
                if kpm is None and args[0].shape[1] == args[1].shape[1]
                else None
            ),
        ),
        (
            "the heads were split with a plain view (N, L, E) -> (N, h, L, d); view as (N, L, h, d) first, "
            "then transpose(1, 2).",
            lambda: _mha_variant(*args, split="view", merge="view"),
        ),
        (
            "the heads were split with a plain view (N, L, E) -> (N, h, L, d) (the merge was right); view "
            "as (N, L, h, d), then transpose(1, 2).",
            lambda: _mha_variant(*args, split="view"),
        ),
        (
            "the heads were merged with a plain reshape (N, h, L, d) -> (N, L, E); transpose(1, 2) back to "
            "(N, L, h, d) first.",
            lambda: _mha_variant(*args, merge="view"),
        ),
        (
            "each head took every h-th feature ((N, L, d, h) split); head i owns the contiguous features "
            "i*d ... (i+1)*d - 1.",
            lambda: _mha_variant(*args, split="contiguous_last"),
        ),
        (
            "in_proj_weight was used untransposed (x @ W); nn.Linear computes x @ W.T + b.",
            lambda: _mha_variant(*args, untransposed=True),
        ),
        ("the in-projection bias was left out.", lambda: _mha_variant(*args, no_in_bias=True)),
        (
            "the output projection (out_proj_weight, out_proj_bias) was left out.",
            lambda: _mha_variant(*args, out_proj=False),
        ),
        ("the output projection's bias was left out.", lambda: _mha_variant(*args, out_bias=False)),
        (
            "the scores were scaled by 1/sqrt(E); each head scales by 1/sqrt(d) with d = E / num_heads.",
            lambda: _mha_variant(*args, scale_e=True),
        ),
    ]
    for order in ((1, 0, 2), (0, 2, 1), (2, 1, 0), (1, 2, 0), (2, 0, 1)):
        names = "".join("qkv"[i] for i in order)
        out.append(
            (
                f"the rows of in_proj_weight were taken in the order {names}; they are stacked q, k, v "
                "(rows 0:E, E:2E, 2E:3E).",
                (lambda o: lambda: _mha_variant(*args, order=o))(order),
            )
        )
    if kpm is not None:
        out += [
            ("key_padding_mask was not applied.", lambda: _mha_variant(*args, kpm_mode="ignored")),
            (
                "key_padding_mask was inverted: it is True at PADDING, so those keys are the ones to hide.",
                lambda: _where_rows_dead(_mha_variant(*args, kpm_mode="inverted"), got),
            ),
        ]
    return out


def _padding(t: Tester, n: int, s: int) -> Tensor:
    return ~_row_allowed(t, n, s)  # at least one padded and one real key per sequence


def _mha_cases(t: Tester) -> list[tuple[str, tuple]]:
    def weights(e: int, dtype=torch.float64, scale: float = 0.5):
        return (
            t.randn(3 * e, e, dtype=dtype, scale=scale),
            t.randn(3 * e, dtype=dtype, scale=scale),
            t.randn(e, e, dtype=dtype, scale=scale),
            t.randn(e, dtype=dtype, scale=scale),
        )

    x = t.randn(2, 5, 6)
    cases = [
        (
            "N=2, L=4, S=6, E=6, num_heads=2 float64",
            (t.randn(2, 4, 6), t.randn(2, 6, 6), t.randn(2, 6, 6), 2, *weights(6), None),
        ),
        (
            "N=2, L=5, E=6, num_heads=2 float64, self-attention (query = key = value)",
            (x, x, x, 2, *weights(6), None),
        ),
        (
            "N=1, L=3, S=5, E=8, num_heads=4 float64",
            (t.randn(1, 3, 8), t.randn(1, 5, 8), t.randn(1, 5, 8), 4, *weights(8), None),
        ),
        (
            "N=2, L=3, S=4, E=4, num_heads=1 float64",
            (t.randn(2, 3, 4), t.randn(2, 4, 4), t.randn(2, 4, 4), 1, *weights(4), None),
        ),
        (
            "N=2, L=4, S=6, E=6, num_heads=3 float64, key_padding_mask",
            (
                t.randn(2, 4, 6),
                t.randn(2, 6, 6),
                t.randn(2, 6, 6),
                3,
                *weights(6),
                _padding(t, 2, 6),
            ),
        ),
        (
            "N=3, L=5, S=5, E=8, num_heads=2 float32, key_padding_mask",
            (
                t.randn(3, 5, 8, dtype=torch.float32),
                t.randn(3, 5, 8, dtype=torch.float32),
                t.randn(3, 5, 8, dtype=torch.float32),
                2,
                *weights(8, torch.float32),
                _padding(t, 3, 5),
            ),
        ),
    ]
    return cases


def _probe_head_transpose(t: Tester, failure: CheckFailure, cases: list) -> None:
    """After a broadcasting error: rerun on the self-attention case (L = S), where heads left
    untransposed do run; if the output shows it, raise ``failure`` naming the mistake."""
    case, args = next((c, a) for c, a in cases if a[0].shape[1] == a[1].shape[1] and a[-1] is None)
    try:
        got = t.call(f"{case}, a probe", *args)
    except CheckFailure:
        return
    model = _mha_variant(*args, split="no_transpose", merge="view")
    if torch.is_tensor(got) and got.shape == model.shape:
        if torch.allclose(got.double(), model, rtol=1e-5, atol=1e-7):
            text = str(failure).replace(f" {_KEEPDIM_HINT}", "")
            raise CheckFailure(f"{text} It looks like {NO_HEAD_TRANSPOSE}") from None


@exercise(
    "multi_head_attention_forward",
    forbidden=("multi_head_attention_forward",),
    chapter=CHAPTER,
    signature=(
        "(query (N,L,E), key (N,S,E), value (N,S,E), num_heads, in_proj_weight (3E,E), in_proj_bias (3E,), "
        "out_proj_weight (E,E), out_proj_bias (E,), key_padding_mask=None) -> (N,L,E)"
    ),
    summary="nn.MultiheadAttention(E, num_heads, batch_first=True) forward with the given weights",
    reference=ref_multi_head_attention_forward,
)
def check_multi_head_attention_forward(t: Tester) -> None:
    """Against F.multi_head_attention_forward: heads 1 to 4, L != S, self-attention, padding, float32."""
    cases = _mha_cases(t)
    for case, args in cases:
        try:
            got = t.call(case, *args)
        except CheckFailure as failure:
            if "must match the size" in str(failure):
                _probe_head_transpose(t, failure, cases)
            raise
        expected = _torch_mha(*args)
        _judge_output(t, case, got, expected, args[0].dtype, _mha_mistakes(args, got))


# ---- FlashAttention forward ------------------------------------------------------------------
class ShapeRecorder(TorchFunctionMode):
    """Records the shape of every tensor a torch function, method or operator returns inside the mode.

    A TorchFunctionMode rather than a TorchDispatchMode: entering the latter imports torch._dynamo,
    seconds that a check cannot afford. A call of F.scaled_dot_product_attention is recorded with
    the shape of the score matrix it builds inside, (..., L, S).
    """

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's hook
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        if func is F.scaled_dot_product_attention and len(args) >= 2:
            self.shapes.append((name, tuple(args[0].shape[:-1]) + (args[1].shape[-2],)))
        for x in out if isinstance(out, tuple | list) else (out,):
            if torch.is_tensor(x):
                self.shapes.append((name, tuple(x.shape)))
        return out

    def report(self) -> list[tuple[str, tuple[int, ...]]]:
        """What the check judges: each distinct (operation, shape) seen, in order."""
        return list(dict.fromkeys(self.shapes))


#: Operations that only re-lay out or copy an existing tensor: k.transpose(-2, -1) spans every
#: key but computes nothing over them, so it does not count as a tile of scores.
LAYOUT_OPS = frozenset(
    "transpose permute view reshape contiguous clone to double float half detach getitem "
    "unsqueeze squeeze flatten expand expand_as movedim swapaxes select narrow split chunk "
    "unbind t mT type type_as cpu".split()
)


def query_sizes(*dims: int) -> set[int]:
    """Axis lengths that can only come from the batch, the queries or the head dims: products of ``dims``."""
    sizes = {1}
    for n in dims:
        sizes |= {s * n for s in sizes}
    return sizes


def spans_keys(op: str, shape: tuple[int, ...], block_size: int, allowed: set[int]) -> bool:
    """The key rule: a computed tensor of two or more axes, one over more than block_size keys."""
    if op.strip("_") in LAYOUT_OPS or len(shape) < 2:
        return False
    return any(n > block_size and n not in allowed for n in shape)


def too_big(shape: tuple[int, ...], batch: int, L: int, S: int, block_size: int) -> bool:
    """The memory rule: two axes longer than block_size, or at least batch*L*S/2 elements."""
    long_axes = sum(1 for n in shape if n > block_size)
    return long_axes >= 2 or math.prod(shape) * 2 >= batch * L * S


def _flash_mistakes(q: Tensor, k: Tensor, v: Tensor, b: int, causal: bool, got: Any) -> list:
    def tiled(**kw: Any) -> Tensor:
        return _flash_variant(q.double(), k.double(), v.double(), b, causal, **kw)

    out = [
        (
            "the accumulator was not rescaled when the running maximum changed: multiply the running "
            "output by exp(m_old - m_new) before adding the new block's P V.",
            lambda: tiled(rescale_acc=False),
        ),
        (
            "neither the running sum nor the accumulator was rescaled when the running maximum changed "
            "(both need the factor exp(m_old - m_new)).",
            lambda: tiled(rescale_acc=False, rescale_sum=False),
        ),
        (
            "the running sum was not rescaled when the running maximum changed: ell = exp(m_old - m_new) "
            "* ell + rowsum(P).",
            lambda: tiled(rescale_sum=False),
        ),
        (
            "the final normalisation is missing: divide the accumulated output by the running sum at the end.",
            lambda: tiled(normalise=False),
        ),
        (
            "each key block was softmaxed on its own and the results were added; blocks must share one "
            "softmax through the running maximum and sum.",
            lambda: tiled(per_block=True),
        ),
        (
            "the scores were not scaled by 1/sqrt(d).",
            lambda: _attend(
                q, k, v, causal_mask(q.shape[-2], k.shape[-2]) if causal else None, scale=1.0
            ),
        ),
    ]
    if causal:
        out.append(
            (
                "the causal mask was applied per block only: whole blocks in the future were skipped, but "
                "inside the diagonal blocks future keys were not masked.",
                lambda: tiled(block_causal=True),
            )
        )
        out += _causal_mistakes(q, k, v, got)
    return out


def _flash_variant(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    b: int,
    causal: bool,
    *,
    rescale_acc: bool = True,
    rescale_sum: bool = True,
    normalise: bool = True,
    per_block: bool = False,
    block_causal: bool = False,
) -> Tensor:
    """ref_flash_attention_forward with one step done wrong (key blocks in order, query blocks of b)."""
    L, S = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = []
    for i0 in range(0, L, b):
        qi = q[..., i0 : i0 + b, :] * scale
        m = torch.full(qi.shape[:-1] + (1,), float("-inf"), dtype=q.dtype)
        ell = torch.zeros_like(m)
        acc = torch.zeros(qi.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
        for j0 in range(0, S, b):
            s = qi @ k[..., j0 : j0 + b, :].transpose(-2, -1)
            if causal:
                rows = torch.arange(i0, i0 + s.shape[-2])[:, None]
                cols = torch.arange(j0, j0 + s.shape[-1])[None, :]
                future = (cols // b > rows // b) if block_causal else cols > rows
                s = s.masked_fill(future, float("-inf"))
            if per_block:
                p = torch.nan_to_num(torch.softmax(s, -1))
                acc = acc + p @ v[..., j0 : j0 + b, :]
                ell = torch.ones_like(ell)
                continue
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - safe)
            alpha = torch.exp(m - safe)
            ell = (alpha * ell if rescale_sum else ell) + p.sum(-1, keepdim=True)
            acc = (alpha * acc if rescale_acc else acc) + p @ v[..., j0 : j0 + b, :]
            m = m_new
        out.append(acc / ell if normalise else acc)
    return torch.cat(out, -2)


def _all_negative(t: Tester, L: int, S: int) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v whose scores all lie far below zero (about -5000): a max started at 0 underflows."""
    u = torch.ones(4, dtype=torch.float64)
    q = 50.0 * u + t.randn(2, L, 4, scale=3.0)
    k = -50.0 * u + t.randn(2, S, 4, scale=3.0)
    return q, k, t.randn(2, S, 3)


def _flash_cases(t: Tester) -> list[tuple[str, tuple, dict]]:
    f32 = torch.float32
    return [
        (
            "q (2,3,10,4), k (2,3,13,4), v (2,3,13,5) float64, block_size=4",
            (t.randn(2, 3, 10, 4), t.randn(2, 3, 13, 4), t.randn(2, 3, 13, 5)),
            {"block_size": 4},
        ),
        (
            "q (9,3), k (7,3), v (7,2) float64, no batch dims, block_size=3",
            (t.randn(9, 3), t.randn(7, 3), t.randn(7, 2)),
            {"block_size": 3},
        ),
        (
            "q (2,11,4), k (2,11,4), v (2,11,3) float64, block_size=4, is_causal=True",
            (t.randn(2, 11, 4), t.randn(2, 11, 4), t.randn(2, 11, 3)),
            {"block_size": 4, "is_causal": True},
        ),
        (
            "q (2,6,3), k (2,13,3), v (2,13,3) float64, block_size=4, is_causal=True with L=6 < S=13",
            (t.randn(2, 6, 3), t.randn(2, 13, 3), t.randn(2, 13, 3)),
            {"block_size": 4, "is_causal": True},
        ),
        (
            "q (1,13,3), k (1,7,3), v (1,7,2) float64, block_size=3, is_causal=True with L=13 > S=7",
            (t.randn(1, 13, 3), t.randn(1, 7, 3), t.randn(1, 7, 2)),
            {"block_size": 3, "is_causal": True},
        ),
        (
            "q (1,5,3), k (1,6,3), v (1,6,2) float64, block_size=1",
            (t.randn(1, 5, 3), t.randn(1, 6, 3), t.randn(1, 6, 2)),
            {"block_size": 1},
        ),
        (
            "q (2,5,4), k (2,7,4), v (2,7,4) float64, default block_size (one block)",
            (t.randn(2, 5, 4), t.randn(2, 7, 4), t.randn(2, 7, 4)),
            {},
        ),
        (
            "q (2,2,20,8), k (2,2,24,8), v (2,2,24,8) float32, block_size=8",
            (
                t.randn(2, 2, 20, 8, dtype=f32),
                t.randn(2, 2, 24, 8, dtype=f32),
                t.randn(2, 2, 24, 8, dtype=f32),
            ),
            {"block_size": 8},
        ),
        (
            "q (2,9,4), k (2,12,4), v (2,12,3) float32, block_size=5, is_causal=True",
            (
                t.randn(2, 9, 4, dtype=f32),
                t.randn(2, 12, 4, dtype=f32),
                t.randn(2, 12, 3, dtype=f32),
            ),
            {"block_size": 5, "is_causal": True},
        ),
        (
            "q (2,8,4), k (2,10,4), v (2,10,3) float64, block_size=3, extreme scores of magnitude ~1e4",
            (t.randn(2, 8, 4, scale=100.0), t.randn(2, 10, 4, scale=100.0), t.randn(2, 10, 3)),
            {"block_size": 3},
        ),
        (
            "q (2,6,4), k (2,9,4), v (2,9,3) float64, block_size=4, every score near -5000",
            _all_negative(t, 6, 9),
            {"block_size": 4},
        ),
        (
            "q (2,8,4), k (2,10,4), v (2,10,3) float32, block_size=4, extreme scores of magnitude ~1e4",
            (
                t.randn(2, 8, 4, dtype=f32, scale=100.0),
                t.randn(2, 10, 4, dtype=f32, scale=100.0),
                t.randn(2, 10, 3, dtype=f32),
            ),
            {"block_size": 4},
        ),
    ]


#: The memory case: long enough that any full L x S tensor breaks the rule, short enough for loops.
MEMORY_SHAPE = {"batch": (1, 2), "L": 40, "S": 48, "d": 4, "dv": 3, "block_size": 8}


def _check_flash_memory(t: Tester, causal: bool) -> None:
    cfg = MEMORY_SHAPE
    L, S, b = cfg["L"], cfg["S"], cfg["block_size"]
    batch = math.prod(cfg["batch"])
    q = t.randn(*cfg["batch"], L, cfg["d"])
    k = t.randn(*cfg["batch"], S, cfg["d"])
    v = t.randn(*cfg["batch"], S, cfg["dv"])
    case = f"memory: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} float64, block_size={b}, is_causal={causal}"
    got = t.call(case, q, k, v, block_size=b, is_causal=causal, watch=ShapeRecorder)
    shapes = [(str(op), tuple(shape)) for op, shape in t.last_watch or []]
    bad = [(op, shape) for op, shape in shapes if too_big(shape, batch, L, S, b)]
    if bad:
        op, shape = bad[0]
        t.fail(
            case,
            f"the function built a tensor of shape {shape} (by {op}), as large as the full L x S = {L} x {S} "
            f"score matrix: it looks like naive full-matrix attention. FlashAttention never holds more than "
            f"a block of scores: no tensor may span more than block_size={b} keys, have two axes longer "
            f"than block_size, or hold {batch * L * S // 2} or more elements (half of batch x L x S). Loop "
            "over key blocks (and query blocks) and keep a running maximum, sum and output per query.",
        )
    allowed = query_sizes(*cfg["batch"], L, cfg["d"], cfg["dv"])
    wide = [(op, shape) for op, shape in shapes if spans_keys(op, shape, b, allowed)]
    if wide:
        op, shape = wide[0]
        t.fail(
            case,
            f"the function built a tensor of shape {shape} (by {op}) that spans more than "
            f"block_size={b} of the S = {S} keys: it looks like each query block was attended against "
            "every key at once (an ordinary softmax, or scaled_dot_product_attention, per query "
            f"block). FlashAttention takes the keys {b} at a time and merges the blocks with the "
            "online softmax (a running maximum, sum and output per query).",
        )
    expected = _torch_sdpa(q, k, v, None, causal)
    _judge_output(t, case, got, expected, q.dtype, _flash_mistakes(q, k, v, b, causal, got))
    t.ok(
        case,
        "no L x S tensor",
        f"ok (largest tensor {max((math.prod(s) for _, s in shapes), default=0)} elements)",
    )


@exercise(
    "flash_attention_forward",
    forbidden=SDPA_OPS,
    chapter=CHAPTER,
    signature="(q, k, v, block_size=64, is_causal=False) -> out",
    summary="tiled attention with an online softmax, never holding a full L x S score matrix",
    reference=ref_flash_attention_forward,
)
def check_flash_attention_forward(t: Tester) -> None:
    """Against SDPA over block sizes that do not divide L or S, causal with L != S, extreme scores; memory rule."""
    for case, (q, k, v), kw in _flash_cases(t):
        got = t.call(case, q, k, v, **kw)
        causal = kw.get("is_causal", False)
        expected = _torch_sdpa(q, k, v, None, causal)
        b = kw.get("block_size", 64)
        _judge_output(t, case, got, expected, q.dtype, _flash_mistakes(q, k, v, b, causal, got))
    _check_flash_memory(t, causal=False)
    _check_flash_memory(t, causal=True)
