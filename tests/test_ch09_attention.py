"""Chapter 09 batteries: correct attention implementations in several styles pass, planted mistakes are named.

Styles: vectorised torch, einsum, numpy, explicit Python loops, per-head loops, nn.MultiheadAttention
itself, and three tilings of FlashAttention (query blocks outside, key blocks only, per-row loops).
Mistakes: the ones learners make with scales, masks, the softmax Jacobian, head splits, projections
and the online softmax, each rejected with the sentence that names it.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from check_times import report_check_seconds

import course_utils as cu
from course_utils.checks import ch09_attention as ch09

SEEDS = range(20)
MISTAKE_SEEDS = (0, 1, 7)


def _allowed(L, S, attn_mask, is_causal):
    """(…, L, S) bool of allowed pairs and (…, L, S) float bias (or None), from the arguments."""
    allowed, bias = None, None
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = attn_mask
    elif attn_mask is not None:
        bias = attn_mask
    if is_causal:
        c = torch.ones(L, S, dtype=torch.bool).tril()
        allowed = c if allowed is None else allowed & c
    return allowed, bias


# =====================================================================================
# Correct implementations
# =====================================================================================
def sdpa_einsum(q, k, v, attn_mask=None, is_causal=False):
    """einsum, -1e30 instead of -inf, max subtracted by hand."""
    allowed, bias = _allowed(q.shape[-2], k.shape[-2], attn_mask, is_causal)
    s = torch.einsum("...ld,...sd->...ls", q, k) / q.shape[-1] ** 0.5
    if bias is not None:
        s = s + bias
    if allowed is not None:
        s = torch.where(allowed, s, torch.full_like(s, -1e30))
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return torch.einsum("...ls,...sv->...lv", e / e.sum(-1, keepdim=True), v)


def sdpa_numpy(q, k, v, attn_mask=None, is_causal=False):
    """numpy throughout."""
    allowed, bias = _allowed(q.shape[-2], k.shape[-2], attn_mask, is_causal)
    a, b, c = q.numpy(), k.numpy(), v.numpy()
    s = a @ np.swapaxes(b, -1, -2) / np.sqrt(a.shape[-1])
    if bias is not None:
        s = s + bias.numpy()
    if allowed is not None:
        s = np.where(allowed.numpy(), s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return torch.from_numpy((p @ c).astype(a.dtype))


def sdpa_loops(q, k, v, attn_mask=None, is_causal=False):
    """A Python loop over every query row of every batch entry."""
    L, S = q.shape[-2], k.shape[-2]
    allowed, bias = _allowed(L, S, attn_mask, is_causal)
    batch = q.shape[:-2]
    allowed = torch.ones(L, S, dtype=torch.bool) if allowed is None else allowed
    bias = torch.zeros(L, S, dtype=q.dtype) if bias is None else bias
    allowed = allowed.expand(*batch, L, S).reshape(-1, L, S)
    bias = bias.expand(*batch, L, S).reshape(-1, L, S)
    qf, kf, vf = (
        q.reshape(-1, L, q.shape[-1]),
        k.reshape(-1, S, k.shape[-1]),
        v.reshape(-1, S, v.shape[-1]),
    )
    out = torch.empty(qf.shape[0], L, v.shape[-1], dtype=q.dtype)
    for n in range(qf.shape[0]):
        for i in range(L):
            s = (kf[n] @ qf[n, i]) / math.sqrt(q.shape[-1]) + bias[n, i]
            s = s.masked_fill(~allowed[n, i], float("-inf"))
            w = torch.exp(s - s.max())
            out[n, i] = (w / w.sum()) @ vf[n]
    return out.reshape(*batch, L, v.shape[-1])


def sdpa_builtin(q, k, v, attn_mask=None, is_causal=False):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def backward_flash_style(dout, q, k, v, attn_mask=None, is_causal=False):
    """FlashAttention-2's form: D = rowsum(dout * out) instead of rowsum(dP * P); einsum."""
    allowed, _ = _allowed(q.shape[-2], k.shape[-2], attn_mask, is_causal)
    scale = q.shape[-1] ** -0.5
    s = torch.einsum("...ld,...sd->...ls", q, k) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1)
    out = p @ v
    dp = torch.einsum("...lv,...sv->...ls", dout, v)
    ds = p * (dp - (dout * out).sum(-1, keepdim=True))
    return (
        torch.einsum("...ls,...sd->...ld", ds, k) * scale,
        torch.einsum("...ls,...ld->...sd", ds, q) * scale,
        torch.einsum("...ls,...lv->...sv", p, dout),
    )


def backward_jacobian_loops(dout, q, k, v, attn_mask=None, is_causal=False):
    """Row by row with the explicit softmax Jacobian diag(p) - p p^T, in numpy."""
    L, S = q.shape[-2], k.shape[-2]
    allowed, _ = _allowed(L, S, attn_mask, is_causal)
    batch = q.shape[:-2]
    allowed = torch.ones(L, S, dtype=torch.bool) if allowed is None else allowed
    al = allowed.expand(*batch, L, S).reshape(-1, L, S).numpy()
    qf = q.reshape(-1, L, q.shape[-1]).numpy().astype(np.float64)
    kf = k.reshape(-1, S, k.shape[-1]).numpy().astype(np.float64)
    vf = v.reshape(-1, S, v.shape[-1]).numpy().astype(np.float64)
    gf = dout.reshape(-1, L, v.shape[-1]).numpy().astype(np.float64)
    dq, dk, dv = np.zeros_like(qf), np.zeros_like(kf), np.zeros_like(vf)
    c = 1 / np.sqrt(q.shape[-1])
    for n in range(qf.shape[0]):
        for i in range(L):
            s = np.where(al[n, i], kf[n] @ qf[n, i] * c, -np.inf)
            p = np.exp(s - s.max())
            p /= p.sum()
            dv[n] += np.outer(p, gf[n, i])
            dp = vf[n] @ gf[n, i]
            ds = (np.diag(p) - np.outer(p, p)) @ dp
            dq[n, i] = ds @ kf[n] * c
            dk[n] += np.outer(ds, qf[n, i]) * c
    return tuple(
        torch.from_numpy(a).to(x.dtype).reshape(x.shape) for a, x in ((dq, q), (dk, k), (dv, v))
    )


def mha_per_head_loop(
    query, key, value, num_heads, w_in, b_in, w_out, b_out, key_padding_mask=None
):
    """One head at a time, slicing each head's rows out of the projection weights."""
    n, L, e = query.shape
    d = e // num_heads
    outs = []
    for h in range(num_heads):
        rows = slice(h * d, (h + 1) * d)
        q = query @ w_in[:e][rows].T + b_in[:e][rows]
        k = key @ w_in[e : 2 * e][rows].T + b_in[e : 2 * e][rows]
        v = value @ w_in[2 * e :][rows].T + b_in[2 * e :][rows]
        s = q @ k.transpose(1, 2) / math.sqrt(d)
        if key_padding_mask is not None:
            s = s.masked_fill(key_padding_mask[:, None, :], float("-inf"))
        outs.append(torch.softmax(s, -1) @ v)
    return torch.cat(outs, -1) @ w_out.T + b_out


def mha_einsum(query, key, value, num_heads, w_in, b_in, w_out, b_out, key_padding_mask=None):
    """einsum with the projection weights reshaped to (3, h, d, E)."""
    n, L, e = query.shape
    h, d = num_heads, e // num_heads
    w = w_in.reshape(3, h, d, e)
    b = b_in.reshape(3, h, 1, d)
    q = torch.einsum("nle,hde->nhld", query, w[0]) + b[0]
    k = torch.einsum("nse,hde->nhsd", key, w[1]) + b[1]
    v = torch.einsum("nse,hde->nhsd", value, w[2]) + b[2]
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return torch.einsum("nhld,fhd->nlf", o, w_out.reshape(e, h, d)) + b_out


def mha_module(query, key, value, num_heads, w_in, b_in, w_out, b_out, key_padding_mask=None):
    """nn.MultiheadAttention itself, with the weights copied in."""
    e = query.shape[-1]
    m = torch.nn.MultiheadAttention(e, num_heads, batch_first=True, dtype=query.dtype)
    with torch.no_grad():
        m.in_proj_weight.copy_(w_in)
        m.in_proj_bias.copy_(b_in)
        m.out_proj.weight.copy_(w_out)
        m.out_proj.bias.copy_(b_out)
        return m(query, key, value, key_padding_mask=key_padding_mask, need_weights=False)[0]


def flash_key_blocks_only(q, k, v, block_size=64, is_causal=False):
    """FlashAttention-1's order: loop over key blocks only, every query at once, -1e30 for masked scores."""
    L, S = q.shape[-2], k.shape[-2]
    q = q / math.sqrt(q.shape[-1])
    m = torch.full(q.shape[:-1] + (1,), -1e30, dtype=q.dtype)
    ell = torch.zeros_like(m)
    acc = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
    rows = torch.arange(L)[:, None]
    for j0 in range(0, S, block_size):
        kb, vb = k[..., j0 : j0 + block_size, :], v[..., j0 : j0 + block_size, :]
        s = q @ kb.transpose(-2, -1)  # (..., L, b)
        if is_causal:
            s = s.masked_fill(torch.arange(j0, j0 + kb.shape[-2])[None, :] > rows, -1e30)
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        p = torch.exp(s - m_new)
        corr = torch.exp(m - m_new)
        ell = corr * ell + p.sum(-1, keepdim=True)
        acc = corr * acc + p @ vb
        m = m_new
    return acc / ell


def flash_row_loops(q, k, v, block_size=64, is_causal=False):
    """Per query row, key blocks in a Python loop, running max and sum as Python floats."""
    L, S = q.shape[-2], k.shape[-2]
    batch = q.shape[:-2]
    qf, kf, vf = (
        q.reshape(-1, L, q.shape[-1]),
        k.reshape(-1, S, k.shape[-1]),
        v.reshape(-1, S, v.shape[-1]),
    )
    out = torch.empty(qf.shape[0], L, v.shape[-1], dtype=q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1])
    for n in range(qf.shape[0]):
        for i in range(L):
            m, ell = -math.inf, 0.0
            acc = torch.zeros(v.shape[-1], dtype=q.dtype)
            stop = min(S, i + 1) if is_causal else S
            for j0 in range(0, stop, block_size):
                j1 = min(j0 + block_size, stop)
                s = kf[n, j0:j1] @ qf[n, i] * scale
                m_new = max(m, float(s.max()))
                p = torch.exp(s - m_new)
                c = math.exp(m - m_new)
                ell = c * ell + float(p.sum())
                acc = c * acc + p @ vf[n, j0:j1]
                m = m_new
            out[n, i] = acc / ell
    return out.reshape(*batch, L, v.shape[-1])


def flash_preallocated(q, k, v, block_size=64, is_causal=False):
    """Both loops, statistics kept in preallocated (…, L) tensors written slice by slice."""
    L, S = q.shape[-2], k.shape[-2]
    b = block_size
    m = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype)
    ell = torch.zeros(q.shape[:-1], dtype=q.dtype)
    out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
    for j0 in range(0, S, b):
        for i0 in range(0, L, b):
            if is_causal and j0 > i0 + b - 1:
                continue
            s = torch.einsum(
                "...id,...jd->...ij", q[..., i0 : i0 + b, :], k[..., j0 : j0 + b, :]
            ) / math.sqrt(q.shape[-1])
            if is_causal:
                fut = (
                    torch.arange(j0, j0 + s.shape[-1])[None, :]
                    > torch.arange(i0, i0 + s.shape[-2])[:, None]
                )
                s = s.masked_fill(fut, float("-inf"))
            m_old = m[..., i0 : i0 + b]
            m_new = torch.maximum(m_old, s.amax(-1))
            p = torch.exp(s - m_new[..., None])
            c = torch.exp(m_old - m_new)
            ell[..., i0 : i0 + b] = c * ell[..., i0 : i0 + b] + p.sum(-1)
            out[..., i0 : i0 + b, :] = (
                c[..., None] * out[..., i0 : i0 + b, :] + p @ v[..., j0 : j0 + b, :]
            )
            m[..., i0 : i0 + b] = m_new
    return out / ell[..., None]


def flash_scalar_loops(q, k, v, block_size=64, is_causal=False):
    """Pure Python: every score a float, tensors only at the door (the memory rule sees no lists)."""
    L, S = q.shape[-2], k.shape[-2]
    batch = q.shape[:-2]
    qf = q.reshape(-1, L, q.shape[-1]).tolist()
    kf = k.reshape(-1, S, k.shape[-1]).tolist()
    vf = v.reshape(-1, S, v.shape[-1]).tolist()
    c = 1.0 / math.sqrt(q.shape[-1])
    out = []
    for qn, kn, vn in zip(qf, kf, vf, strict=True):
        rows = []
        for i, qi in enumerate(qn):
            m, ell, acc = -math.inf, 0.0, [0.0] * len(vn[0])
            for j0 in range(0, S, block_size):
                js = [j for j in range(j0, min(j0 + block_size, S)) if not (is_causal and j > i)]
                if not js:
                    continue
                s = [sum(a * b for a, b in zip(qi, kn[j], strict=True)) * c for j in js]
                m_new = max(m, max(s))
                r = math.exp(m - m_new)
                p = [math.exp(x - m_new) for x in s]
                ell = r * ell + sum(p)
                acc = [
                    r * a + sum(pj * vn[j][t] for pj, j in zip(p, js, strict=True))
                    for t, a in enumerate(acc)
                ]
                m = m_new
            rows.append([a / ell for a in acc])
        out.append(rows)
    return torch.tensor(out, dtype=q.dtype).reshape(*batch, L, v.shape[-1])


CORRECT = {
    "scaled_dot_product_attention": [sdpa_einsum, sdpa_numpy, sdpa_loops],
    "attention_backward": [backward_flash_style, backward_jacobian_loops],
    "multi_head_attention_forward": [mha_per_head_loop, mha_einsum],
    "flash_attention_forward": [
        flash_key_blocks_only,
        flash_row_loops,
        flash_preallocated,
        flash_scalar_loops,
    ],
}
CORRECT_CASES = [(ex, fn) for ex, fns in CORRECT.items() for fn in fns]
SLOWEST = {
    "scaled_dot_product_attention": sdpa_loops,
    "attention_backward": backward_jacobian_loops,
    "multi_head_attention_forward": mha_per_head_loop,
    "flash_attention_forward": flash_row_loops,
}


@pytest.mark.parametrize(
    ("exercise_id", "fn"), CORRECT_CASES, ids=[f.__name__ for _, f in CORRECT_CASES]
)
def test_correct_implementation_passes_on_every_seed(exercise_id, fn):
    for seed in SEEDS:
        report = cu.check(exercise_id, fn, seed=seed, strict=True)
        assert report.passed, (seed, report)
        assert report.rows


@pytest.mark.parametrize("exercise_id", list(CORRECT))
def test_reference_passes_its_own_battery(exercise_id):
    for seed in (0, 3):
        assert cu.check(exercise_id, cu.reference(exercise_id), seed=seed, strict=True).passed


def test_references_agree_with_pytorch():
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(2, 5, 3, dtype=torch.float64),
        torch.randn(2, 7, 3, dtype=torch.float64),
        torch.randn(2, 7, 4, dtype=torch.float64),
    )
    for causal in (False, True):
        want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(
            ch09.ref_scaled_dot_product_attention(q, k, v, is_causal=causal), want
        )
        torch.testing.assert_close(ch09.ref_flash_attention_forward(q, k, v, 2, causal), want)
        qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
        dout = torch.randn_like(want)
        auto = torch.autograd.grad(
            F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal), (qq, kk, vv), dout
        )
        for a, b in zip(
            ch09.ref_attention_backward(dout, q, k, v, is_causal=causal), auto, strict=True
        ):
            torch.testing.assert_close(a, b)
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    y = torch.randn(2, 5, 6, dtype=torch.float64)
    m = torch.nn.MultiheadAttention(6, 3, batch_first=True, dtype=torch.float64)
    pad = torch.tensor([[False, False, True, False, True], [False] * 5])
    want = m(x, y, y, key_padding_mask=pad, need_weights=False)[0]
    got = ch09.ref_multi_head_attention_forward(
        x, y, y, 3, m.in_proj_weight, m.in_proj_bias, m.out_proj.weight, m.out_proj.bias, pad
    )
    torch.testing.assert_close(got, want)


# =====================================================================================
# Planted mistakes
# =====================================================================================
def _sdpa_variant(
    *,
    scale=None,
    dim=-1,
    invert=False,
    float_as_bool=False,
    float_mul=False,
    causal_diag=0,
    bottom_right=False,
    ignore_causal=False,
    triu=False,
    zero_after=False,
    ignore_mask=False,
    no_max=False,
    float_scaled=False,
):
    def fn(q, k, v, attn_mask=None, is_causal=False):
        L, S, d = q.shape[-2], k.shape[-2], q.shape[-1]
        c = 1 / math.sqrt(d) if scale is None else scale(d)
        s = q @ k.transpose(-2, -1) * c
        allowed = None
        if attn_mask is not None and not ignore_mask:
            if attn_mask.dtype == torch.bool:
                allowed = ~attn_mask if invert else attn_mask
            elif float_as_bool:
                allowed = attn_mask.bool()
            elif float_mul:
                s = s * attn_mask
            elif float_scaled:
                s = s + attn_mask * c
            else:
                s = s + attn_mask
        if is_causal and not ignore_causal:
            ones = torch.ones(L, S, dtype=torch.bool)
            cm = ones.triu() if triu else ones.tril(S - L if bottom_right else causal_diag)
            allowed = cm if allowed is None else allowed & cm
        if allowed is not None and not zero_after:
            s = s.masked_fill(~allowed, float("-inf"))
        if no_max:
            e = torch.exp(s)
            p = e / e.sum(dim, keepdim=True)
        else:
            p = torch.softmax(s, dim)
        if allowed is not None and zero_after:
            p = p * allowed
        return p @ v

    return fn


SDPA_MISTAKES = [
    (dict(scale=lambda d: 1 / d), "divided by d instead of sqrt"),
    (dict(scale=lambda d: 1.0), "were not scaled"),
    (dict(scale=lambda d: math.sqrt(d)), "multiplied by sqrt"),
    (dict(dim=-2), r"softmax was taken over the queries \(dim=-2\)"),
    (dict(invert=True), "bool mask was inverted"),
    (dict(ignore_mask=True), "mask was ignored"),
    (dict(zero_after=True), "zeroed after the softmax without renormalising"),
    (dict(float_as_bool=True), "float mask was treated as a bool mask"),
    (dict(float_mul=True), "float mask was multiplied"),
    (dict(float_scaled=True), "1/sqrt\\(d\\) scaling was applied to it too"),
    (dict(causal_diag=-1), "also hides the diagonal"),
    (dict(causal_diag=1), "one key into the future"),
    (dict(bottom_right=True), "aligned to the bottom-right corner"),
    (dict(ignore_causal=True), "is_causal was ignored"),
    (dict(triu=True), "hides the past instead of the future"),
    (dict(no_max=True), "exp overflowed"),
]


@pytest.mark.parametrize(("kw", "pattern"), SDPA_MISTAKES, ids=[p for _, p in SDPA_MISTAKES])
def test_sdpa_mistake_is_named(kw, pattern):
    for seed in MISTAKE_SEEDS:
        with pytest.raises(cu.CheckFailure, match=pattern):
            cu.check("scaled_dot_product_attention", _sdpa_variant(**kw), seed=seed, strict=True)


def test_sdpa_scale_by_dv_is_named():
    def fn(q, k, v, attn_mask=None, is_causal=False):
        return ch09.ref_scaled_dot_product_attention(
            q * math.sqrt(q.shape[-1] / v.shape[-1]), k, v, attn_mask, is_causal
        )

    with pytest.raises(cu.CheckFailure, match="1/sqrt\\(dv\\)"):
        cu.check("scaled_dot_product_attention", fn, strict=True)


def test_sdpa_in_place_and_wrong_dtype():
    def in_place(q, k, v, attn_mask=None, is_causal=False):
        q /= math.sqrt(q.shape[-1])
        return ch09.ref_scaled_dot_product_attention(
            q * math.sqrt(q.shape[-1]), k, v, attn_mask, is_causal
        )

    with pytest.raises(cu.CheckFailure, match="changed its input `q` in place"):
        cu.check("scaled_dot_product_attention", in_place, strict=True)

    def float64_always(q, k, v, attn_mask=None, is_causal=False):
        return sdpa_einsum(q.double(), k.double(), v.double(), attn_mask, is_causal)

    with pytest.raises(cu.CheckFailure, match="dtype float32"):
        cu.check("scaled_dot_product_attention", float64_always, strict=True)


def _backward_variant(
    *,
    no_correction=False,
    no_scale=None,
    swap=False,
    unmasked=False,
    dv_no_t=False,
    dk_no_t=False,
    dq_t=False,
):
    def fn(dout, q, k, v, attn_mask=None, is_causal=False):
        allowed, _ = _allowed(q.shape[-2], k.shape[-2], attn_mask, is_causal)
        c = q.shape[-1] ** -0.5
        s = q @ k.transpose(-2, -1) * c
        if allowed is not None and not unmasked:
            s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, -1)
        dp = dout @ v.transpose(-2, -1)
        ds = p * dp if no_correction else p * (dp - (p * dp).sum(-1, keepdim=True))
        dq = (ds.transpose(-2, -1) @ k if dq_t else ds @ k) * (1 if no_scale == "dq" else c)
        dk = (ds @ q if dk_no_t else ds.transpose(-2, -1) @ q) * (1 if no_scale == "dk" else c)
        dv = p @ dout if dv_no_t else p.transpose(-2, -1) @ dout
        return (dk, dq, dv) if swap else (dq, dk, dv)

    return fn


BACKWARD_MISTAKES = [
    (dict(no_correction=True), "missing the softmax Jacobian's correction term"),
    (dict(no_scale="dq"), "dq is missing the 1/sqrt\\(d\\) scale"),
    (dict(no_scale="dk"), "dk is missing the 1/sqrt\\(d\\) scale"),
    (dict(swap=True), "dq and dk are swapped|should have shape"),
    (dict(unmasked=True), "recomputed P without the mask"),
]


@pytest.mark.parametrize(
    ("kw", "pattern"), BACKWARD_MISTAKES, ids=[p for _, p in BACKWARD_MISTAKES]
)
def test_backward_mistake_is_named(kw, pattern):
    for seed in MISTAKE_SEEDS:
        with pytest.raises(cu.CheckFailure, match=pattern):
            cu.check("attention_backward", _backward_variant(**kw), seed=seed, strict=True)


def test_backward_mistakes_on_square_shapes_are_named_exactly():
    """On the L = S, d = dv case the transposition mistakes cannot hide behind a shape error."""
    for kw, sentence in [
        (dict(swap=True), "dq and dk are swapped"),
        (dict(dv_no_t=True), "dv is P dout without the transpose"),
        (dict(dk_no_t=True), "dk is dS Q without the transpose"),
        (dict(dq_t=True), "dq is dS\\^T K"),
    ]:
        fn = _backward_variant(**kw)

        def square_first(dout, q, k, v, attn_mask=None, is_causal=False, fn=fn):
            if q.shape != k.shape or k.shape != v.shape:
                return ch09.ref_attention_backward(dout, q, k, v, attn_mask, is_causal)
            return fn(dout, q, k, v, attn_mask, is_causal)

        with pytest.raises(cu.CheckFailure, match=sentence):
            cu.check("attention_backward", square_first, strict=True)


@pytest.mark.forbidden_calls_allowed
def test_backward_using_autograd_is_refused():
    def via_autograd(dout, q, k, v, attn_mask=None, is_causal=False):
        qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
        with torch.enable_grad():
            out = F.scaled_dot_product_attention(
                qq, kk, vv, attn_mask=attn_mask, is_causal=is_causal
            )
            return torch.autograd.grad(out, (qq, kk, vv), dout)

    with pytest.raises(cu.CheckFailure, match="derive the gradient by hand"):
        cu.check("attention_backward", via_autograd, strict=True)


MHA_MISTAKES = [
    (
        dict(split="view", merge="view"),
        "split with a plain view \\(N, L, E\\) -> \\(N, h, L, d\\); view",
    ),
    (dict(split="view"), "the merge was right"),
    (dict(merge="view"), "merged with a plain reshape"),
    (dict(split="contiguous_last"), "every h-th feature"),
    (dict(untransposed=True), "in_proj_weight was used untransposed"),
    (dict(no_in_bias=True), "in-projection bias was left out"),
    (dict(out_proj=False), "output projection \\(out_proj_weight, out_proj_bias\\) was left out"),
    (dict(out_bias=False), "output projection's bias was left out"),
    (dict(scale_e=True), "scaled by 1/sqrt\\(E\\)"),
    (dict(order=(1, 0, 2)), "in the order kqv"),
    (dict(order=(0, 2, 1)), "in the order qvk"),
    (dict(order=(2, 1, 0)), "in the order vkq"),
    (dict(kpm_mode="ignored"), "key_padding_mask was not applied"),
    (dict(kpm_mode="inverted"), "key_padding_mask was inverted"),
]


@pytest.mark.parametrize(("kw", "pattern"), MHA_MISTAKES, ids=[p for _, p in MHA_MISTAKES])
def test_mha_mistake_is_named(kw, pattern):
    def fn(*args):
        return ch09._mha_variant(*args, **kw).to(args[0].dtype)

    for seed in MISTAKE_SEEDS:
        with pytest.raises(cu.CheckFailure, match=pattern):
            cu.check("multi_head_attention_forward", fn, seed=seed, strict=True)


def _flash_variant(**kw):
    def fn(q, k, v, block_size=64, is_causal=False):
        return ch09._flash_variant(q, k, v, block_size, is_causal, **kw)

    return fn


FLASH_MISTAKES = [
    (dict(rescale_acc=False), "accumulator was not rescaled"),
    (dict(rescale_acc=False, rescale_sum=False), "neither the running sum nor the accumulator"),
    (dict(rescale_sum=False), "running sum was not rescaled"),
    (dict(normalise=False), "final normalisation is missing"),
    (dict(per_block=True), "softmaxed on its own"),
    (dict(block_causal=True), "causal mask was applied per block only"),
]


@pytest.mark.parametrize(("kw", "pattern"), FLASH_MISTAKES, ids=[p for _, p in FLASH_MISTAKES])
def test_flash_mistake_is_named(kw, pattern):
    for seed in MISTAKE_SEEDS:
        with pytest.raises(cu.CheckFailure, match=pattern):
            cu.check("flash_attention_forward", _flash_variant(**kw), seed=seed, strict=True)


# ---- mistakes real learners made, each named by its signature ------------------------------
def _sdpa_masked(*, fill=float("-inf"), bool_added=False, causal=None):
    """Attention whose masking goes wrong one way: a fill value, a bool mask added as numbers,
    or a causal mask made by ``causal(L, S)`` (allowed where True)."""

    def fn(q, k, v, attn_mask=None, is_causal=False):
        L, S = q.shape[-2], k.shape[-2]
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        allowed = None
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            if bool_added:
                s = s + attn_mask
            else:
                allowed = attn_mask
        elif attn_mask is not None:
            s = s + attn_mask
        if is_causal:
            cm = torch.ones(L, S, dtype=torch.bool).tril() if causal is None else causal(L, S)
            allowed = cm if allowed is None else allowed & cm
        if allowed is not None:
            s = s.masked_fill(~allowed, fill)
        return torch.softmax(s, -1) @ v

    return fn


def sdpa_causal_mask_square(q, k, v, attn_mask=None, is_causal=False):
    """The causal mask built (L, L), as if the keys were the queries."""
    L = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    allowed, bias = _allowed(L, k.shape[-2], attn_mask, False)
    if bias is not None:
        s = s + bias
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    if is_causal:
        s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, -1) @ v


def _backward_correction(which):
    def fn(dout, q, k, v, attn_mask=None, is_causal=False):
        allowed, _ = _allowed(q.shape[-2], k.shape[-2], attn_mask, is_causal)
        c = q.shape[-1] ** -0.5
        s = q @ k.transpose(-2, -1) * c
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, -1)
        dp = dout @ v.transpose(-2, -1)
        if which == "rowsum_dp":
            ds = p * (dp - dp.sum(-1, keepdim=True))
        else:
            ds = p * (dp - (p * dp).sum(-2, keepdim=True))
        return ds @ k * c, ds.transpose(-2, -1) @ q * c, p.transpose(-2, -1) @ dout

    return fn


def mha_heads_not_transposed(query, key, value, h, w_in, b_in, w_out, b_out, kpm=None):
    """Heads viewed as (N, L, h, d) and never transposed: attention runs across the heads."""
    n, L, e = query.shape
    d = e // h
    wq, wk, wv = w_in.chunk(3)
    bq, bk, bv = b_in.chunk(3)
    q = (query @ wq.T + bq).view(n, L, h, d)
    k = (key @ wk.T + bk).view(n, key.shape[1], h, d)
    v = (value @ wv.T + bv).view(n, key.shape[1], h, d)
    o = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), -1) @ v  # (N, L, h, d)
    return o.reshape(n, L, e) @ w_out.T + b_out


SIGNATURE_MISTAKES = [
    (
        "scaled_dot_product_attention",
        _sdpa_masked(fill=0.0),
        r"bool attn_mask .*It looks like the masked scores were set to 0 instead of -inf",
    ),
    (
        "scaled_dot_product_attention",
        _sdpa_masked(bool_added=True),
        r"It looks like the bool mask was added to the scores as numbers",
    ),
    (
        "scaled_dot_product_attention",
        _sdpa_masked(causal=lambda L, S: torch.ones(L, S, dtype=torch.bool).triu(1)),
        r"is_causal=True .*NaN or inf\. It looks like the causal mask was inverted",
    ),
    (
        "scaled_dot_product_attention",
        sdpa_causal_mask_square,
        r"L=3 < S=6, .*raised RuntimeError.*It looks like the causal mask was built square.*"
        r"\(L, S\) = \(3, 6\)",
    ),
    (
        "attention_backward",
        _backward_correction("rowsum_dp"),
        r"`dq` is wrong.*correction subtracts rowsum\(dP\); it subtracts rowsum\(dP \* P\)",
    ),
    (
        "attention_backward",
        _backward_correction("over_queries"),
        r"`dq` is wrong.*correction was summed over the queries \(dim -2\)",
    ),
    (
        "multi_head_attention_forward",
        mha_heads_not_transposed,
        r"raised RuntimeError.*It looks like the heads were split as \(N, L, h, d\) without "
        r"transpose\(1, 2\)",
    ),
]


@pytest.mark.parametrize(
    ("exercise_id", "fn", "pattern"),
    SIGNATURE_MISTAKES,
    ids=[
        f"{e}-{getattr(f, '__name__', 'variant')}-{i}"
        for i, (e, f, _) in enumerate(SIGNATURE_MISTAKES)
    ],
)
def test_recognisable_mistake_is_named(exercise_id, fn, pattern):
    for seed in MISTAKE_SEEDS:
        with pytest.raises(cu.CheckFailure, match=pattern) as info:
            cu.check(exercise_id, fn, seed=seed, strict=True)
        assert "without keepdim=True often causes" not in str(info.value)


@pytest.mark.forbidden_calls_allowed
def test_flash_naive_full_matrix_is_rejected_by_the_memory_rule():
    def naive(q, k, v, block_size=64, is_causal=False):
        return ch09.ref_scaled_dot_product_attention(q, k, v, is_causal=is_causal)

    with pytest.raises(cu.CheckFailure, match="naive full-matrix attention"):
        cu.check("flash_attention_forward", naive, strict=True)

    def builtin(q, k, v, block_size=64, is_causal=False):
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)

    with pytest.raises(cu.CheckFailure, match="naive full-matrix attention"):
        cu.check("flash_attention_forward", builtin, strict=True)

    def all_tiles_at_once(q, k, v, block_size=64, is_causal=False):
        # every (query block, key block) tile stacked into one tensor: the full matrix in disguise
        L, S = q.shape[-2], k.shape[-2]
        b = block_size
        pq, pk = (-L) % b, (-S) % b
        qp = F.pad(q, (0, 0, 0, pq)).unflatten(-2, (-1, b))  # (..., nq, b, d)
        kp = F.pad(k, (0, 0, 0, pk)).unflatten(-2, (-1, b))  # (..., nk, b, d)
        tiles = torch.einsum("...ibd,...jcd->...ijbc", qp, kp)  # (..., nq, nk, b, b)
        del tiles
        return ch09.ref_flash_attention_forward(q, k, v, block_size, is_causal)

    with pytest.raises(cu.CheckFailure, match="naive full-matrix attention"):
        cu.check("flash_attention_forward", all_tiles_at_once, strict=True)


def test_flash_ignoring_block_size_is_rejected():
    def fixed_block(q, k, v, block_size=64, is_causal=False):
        return ch09.ref_flash_attention_forward(q, k, v, 64, is_causal)

    with pytest.raises(cu.CheckFailure, match="naive full-matrix attention"):
        cu.check("flash_attention_forward", fixed_block, strict=True)


def test_flash_unstable_and_bad_causal_are_named():
    def no_running_max(q, k, v, block_size=64, is_causal=False):
        # tiles summed as plain exp(s): exact in exact arithmetic, overflows at large scores
        L, S = q.shape[-2], k.shape[-2]
        qs = q / math.sqrt(q.shape[-1])
        ell = torch.zeros(q.shape[:-1] + (1,), dtype=q.dtype)
        acc = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
        for j0 in range(0, S, block_size):
            s = qs @ k[..., j0 : j0 + block_size, :].transpose(-2, -1)
            if is_causal:
                s = s.masked_fill(
                    torch.arange(j0, j0 + s.shape[-1])[None, :] > torch.arange(L)[:, None],
                    float("-inf"),
                )
            p = torch.exp(s)
            ell, acc = ell + p.sum(-1, keepdim=True), acc + p @ v[..., j0 : j0 + block_size, :]
        return acc / ell

    with pytest.raises(cu.CheckFailure, match="exp overflowed"):
        cu.check("flash_attention_forward", no_running_max, strict=True)

    def start_at_zero(q, k, v, block_size=64, is_causal=False):
        # running max initialised at 0: rows whose scores are all very negative underflow to 0/0
        L, S = q.shape[-2], k.shape[-2]
        qs = q / math.sqrt(q.shape[-1])
        m = torch.zeros(q.shape[:-1] + (1,), dtype=q.dtype)
        ell = torch.zeros_like(m)
        acc = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
        for j0 in range(0, S, block_size):
            s = qs @ k[..., j0 : j0 + block_size, :].transpose(-2, -1)
            if is_causal:
                s = s.masked_fill(
                    torch.arange(j0, j0 + s.shape[-1])[None, :] > torch.arange(L)[:, None],
                    float("-inf"),
                )
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            p, c = torch.exp(s - m_new), torch.exp(m - m_new)
            ell, acc, m = (
                c * ell + p.sum(-1, keepdim=True),
                c * acc + p @ v[..., j0 : j0 + block_size, :],
                m_new,
            )
        return acc / ell

    with pytest.raises(cu.CheckFailure, match="start the running maximum at -inf"):
        cu.check("flash_attention_forward", start_at_zero, strict=True)

    def bottom_right(q, k, v, block_size=64, is_causal=False):
        if not is_causal:
            return ch09.ref_flash_attention_forward(q, k, v, block_size)
        L, S = q.shape[-2], k.shape[-2]
        mask = torch.ones(L, S, dtype=torch.bool).tril(S - L)
        s = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf"))
        return torch.nan_to_num(torch.softmax(s, -1)) @ v

    with pytest.raises(cu.CheckFailure, match="bottom-right"):
        cu.check("flash_attention_forward", bottom_right, strict=True)


def test_memory_rule_is_what_the_docstring_says():
    b, L, S, batch = 8, 40, 48, 2
    assert ch09.too_big((2, 40, 48), batch, L, S, b)
    assert ch09.too_big((2, 5, 6, 8, 8), batch, L, S, b)  # all tiles at once: as many elements
    assert not ch09.too_big((2, 8, 48), batch, L, S, b)  # one query block against every key
    assert not ch09.too_big((2, 40, 8), batch, L, S, b)  # every query against one key block
    assert not ch09.too_big((2, 40, 3), batch, L, S, b)


def test_contract_signatures():
    listed = {e.id: e for e in cu.exercises("09")}
    assert set(listed) == set(CORRECT)
    assert listed["attention_backward"].backward
    assert (
        listed["flash_attention_forward"].signature
        == "(q, k, v, block_size=64, is_causal=False) -> out"
    )
    assert re.search(
        r"key_padding_mask=None\) -> \(N,L,E\)$", listed["multi_head_attention_forward"].signature
    )


def test_report_check_seconds(capsys):
    """Times each check on the reference and the slowest correct style; reported, never asserted."""
    report_check_seconds(SLOWEST, capsys)


@pytest.mark.parametrize(
    "exercise_id, fn, call",
    [
        ("scaled_dot_product_attention", sdpa_builtin, "scaled_dot_product_attention"),
        ("multi_head_attention_forward", mha_module, "multi_head_attention_forward"),
    ],
    ids=["sdpa_builtin", "mha_module"],
)
def test_a_shortcut_through_the_rebuilt_operator_is_refused(exercise_id, fn, call):
    with pytest.raises(cu.CheckFailure, match=rf"called \S*{call}.*build yourself"):
        cu.check(exercise_id, fn, strict=True)


def test_a_query_block_against_every_key_is_rejected():
    """Tiling only the queries (an ordinary softmax per query block) is not FlashAttention."""

    def query_blocks_only(q, k, v, block_size=64, is_causal=False):
        L, S = q.shape[-2], k.shape[-2]
        outs = []
        for i in range(0, L, block_size):
            s = q[..., i : i + block_size, :] @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if is_causal:
                rows = torch.arange(i, min(i + block_size, L))[:, None]
                s = s.masked_fill(torch.arange(S)[None, :] > rows, float("-inf"))
            p = (s - s.amax(-1, keepdim=True)).exp()
            outs.append(p / p.sum(-1, keepdim=True) @ v)  # (..., b, S) scores: every key at once
        return torch.cat(outs, -2)

    with pytest.raises(cu.CheckFailure, match="spans more than block_size=8 of the S = 48 keys"):
        cu.check("flash_attention_forward", query_blocks_only, strict=True)


def test_the_key_rule_exempts_layout_and_query_sized_axes():
    allowed = ch09.query_sizes(1, 2, 40, 4, 3)
    assert ch09.spans_keys("matmul", (1, 2, 8, 48), 8, allowed)
    assert ch09.spans_keys("scaled_dot_product_attention", (1, 2, 8, 48), 8, allowed)
    assert ch09.spans_keys("mul", (1, 2, 8, 16), 8, allowed)  # two key blocks at once
    assert not ch09.spans_keys(
        "transpose", (1, 2, 4, 48), 8, allowed
    )  # k laid out, nothing computed
    assert not ch09.spans_keys("mul", (1, 2, 40, 3), 8, allowed)  # every query's accumulator
    assert not ch09.spans_keys("arange", (48,), 8, allowed)  # key positions, one axis
