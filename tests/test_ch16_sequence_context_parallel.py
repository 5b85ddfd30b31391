"""Chapter 16 battery: ring attention in several correct styles passes, planted mistakes are named.

Styles: non-blocking isend/irecv (the reference), blocking send/recv ordered by rank parity, the
ring turning the other way, one packed key/value message, and merging per-chunk (output,
log-sum-exp) pairs. Mistakes: the online-softmax rescale, local causal positions, the wrong source
chunk, the 1/sqrt(d) scale, a gathered or concatenated sequence, a deadlock, an in-place change,
a per-chunk scaled_dot_product_attention, and an error on one rank only.
"""

from __future__ import annotations

import math
import re
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from launch import torchrun

import course_utils as cu
from course_utils.checks import ch16_sequence_context_parallel as ch16


# =====================================================================================
# Correct implementations in other styles
# =====================================================================================
def _merge(m, ell, acc, s, v):
    """One online-softmax step: fold scores s (..., n, n) with values v into (m, ell, acc)."""
    m_new = torch.maximum(m, s.amax(-1, keepdim=True))
    p, alpha = torch.exp(s - m_new), torch.exp(m - m_new)
    return m_new, alpha * ell + p.sum(-1, keepdim=True), alpha * acc + p @ v


def _start(q, dv):
    m = torch.full(q.shape[:-1] + (1,), -math.inf, dtype=q.dtype)
    return m, torch.zeros_like(m), torch.zeros(q.shape[:-1] + (dv,), dtype=q.dtype)


def _scores(q, k, r, src, n, causal):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        rows = r * n + torch.arange(n)[:, None]
        s = s.masked_fill(src * n + torch.arange(n)[None, :] > rows, -math.inf)
    return s


def ring_blocking(q, k, v, is_causal=False):
    """Blocking send/recv; even ranks send first, odd ranks receive first."""
    r, p, n = dist.get_rank(), dist.get_world_size(), q.shape[-2]
    m, ell, acc = _start(q, v.shape[-1])
    kc, vc = k.clone(), v.clone()
    for step in range(p):
        src = (r - step) % p
        if not (is_causal and src > r):
            m, ell, acc = _merge(m, ell, acc, _scores(q, kc, r, src, n, is_causal), vc)
        if step == p - 1:
            break
        kn, vn = torch.empty_like(kc), torch.empty_like(vc)
        if r % 2 == 0:
            dist.send(kc, (r + 1) % p)
            dist.send(vc, (r + 1) % p)
            dist.recv(kn, (r - 1) % p)
            dist.recv(vn, (r - 1) % p)
        else:
            dist.recv(kn, (r - 1) % p)
            dist.recv(vn, (r - 1) % p)
            dist.send(kc, (r + 1) % p)
            dist.send(vc, (r + 1) % p)
        kc, vc = kn, vn
    return acc / ell


def ring_other_way(q, k, v, is_causal=False):
    """Chunks travel from rank r+1 to rank r: at step s the chunk of rank (r + s) mod p is held."""
    r, p, n = dist.get_rank(), dist.get_world_size(), q.shape[-2]
    m, ell, acc = _start(q, v.shape[-1])
    kc, vc = k, v
    for step in range(p):
        src = (r + step) % p
        if step < p - 1:
            kn, vn = torch.empty_like(kc), torch.empty_like(vc)
            reqs = [
                dist.irecv(kn, (r + 1) % p),
                dist.irecv(vn, (r + 1) % p),
                dist.isend(kc.contiguous(), (r - 1) % p),
                dist.isend(vc.contiguous(), (r - 1) % p),
            ]
        if not (is_causal and src > r):
            m, ell, acc = _merge(m, ell, acc, _scores(q, kc, r, src, n, is_causal), vc)
        if step < p - 1:
            for req in reqs:
                req.wait()
            kc, vc = kn, vn
    return acc / ell


def ring_packed_lse(q, k, v, is_causal=False):
    """K and V packed in one message; each chunk attended on its own, merged through log-sum-exp."""
    r, p, n, d = dist.get_rank(), dist.get_world_size(), q.shape[-2], q.shape[-1]
    kv = torch.cat([k, v], -1)  # (..., n, d + dv): one message per step
    out, lse = None, None
    for step in range(p):
        src = (r - step) % p
        if step < p - 1:
            nxt = torch.empty_like(kv)
            send = dist.isend(kv, (r + 1) % p)
            recv = dist.irecv(nxt, (r - 1) % p)
        if not (is_causal and src > r):
            s = _scores(q, kv[..., :d], r, src, n, is_causal)
            blk_lse = torch.logsumexp(s, -1, keepdim=True)
            blk_out = torch.exp(s - blk_lse) @ kv[..., d:]
            if out is None:
                out, lse = blk_out, blk_lse
            else:
                new = torch.logaddexp(lse, blk_lse)
                out = torch.exp(lse - new) * out + torch.exp(blk_lse - new) * blk_out
                lse = new
        if step < p - 1:
            send.wait()
            recv.wait()
            kv = nxt
    return out


def ring_batched(q, k, v, is_causal=False):
    """dist.batch_isend_irecv with P2POp, as picotron and ring-flash-attention write it."""
    r, p, n = dist.get_rank(), dist.get_world_size(), q.shape[-2]
    m, ell, acc = _start(q, v.shape[-1])
    kc, vc = k.contiguous(), v.contiguous()
    for step in range(p):
        src = (r - step) % p
        if step < p - 1:
            kn, vn = torch.empty_like(kc), torch.empty_like(vc)
            ops = [
                dist.P2POp(dist.isend, kc, (r + 1) % p),
                dist.P2POp(dist.isend, vc, (r + 1) % p),
                dist.P2POp(dist.irecv, kn, (r - 1) % p),
                dist.P2POp(dist.irecv, vn, (r - 1) % p),
            ]
            reqs = dist.batch_isend_irecv(ops)
        if not (is_causal and src > r):
            m, ell, acc = _merge(m, ell, acc, _scores(q, kc, r, src, n, is_causal), vc)
        if step < p - 1:
            for req in reqs:
                req.wait()
            kc, vc = kn, vn
    return acc / ell


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_passes_its_own_battery(seed):
    report = cu.check("ring_attention_forward", ch16.ref_ring_attention_forward, seed=seed)
    assert report.passed


@pytest.mark.parametrize("fn", [ring_blocking, ring_other_way, ring_packed_lse])
def test_correct_styles_pass(fn):
    assert cu.check("ring_attention_forward", fn, seed=3).passed


def test_batch_isend_irecv_passes():
    # P2POp compares its op with c10d's isend by identity; the world's tracing must not break it
    assert cu.check("ring_attention_forward", ring_batched, seed=4).passed


def test_mistake_models_are_right_when_nothing_is_wrong():
    g = torch.Generator().manual_seed(0)
    for p, causal in [(1, True), (3, False), (4, True)]:
        q, k = torch.randn(2, 4 * p, 3, generator=g), torch.randn(2, 4 * p, 3, generator=g)
        v = torch.randn(2, 4 * p, 2, generator=g)
        want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
        for direction in (-1, 1):
            got = ch16._ring_model(q, k, v, p, causal, direction=direction)
            assert torch.allclose(got, want, atol=1e-12)


# =====================================================================================
# Planted mistakes
# =====================================================================================
def _ring(q, k, v, is_causal=False, *, rescale=True, mask="global", believed=-1, scale=True):
    """The ring of the reference with one thing done wrong."""
    r, p, n = dist.get_rank(), dist.get_world_size(), q.shape[-2]
    sc = 1 / math.sqrt(q.shape[-1]) if scale else 1.0
    m, ell, acc = _start(q, v.shape[-1])
    kc, vc = k, v
    local = torch.arange(n)[None, :] > torch.arange(n)[:, None]
    for step in range(p):
        src = (r + believed * step) % p
        if step < p - 1:
            kn, vn = torch.empty_like(kc), torch.empty_like(vc)
            reqs = [
                dist.isend(kc.contiguous(), (r + 1) % p),
                dist.isend(vc.contiguous(), (r + 1) % p),
                dist.irecv(kn, (r - 1) % p),
                dist.irecv(vn, (r - 1) % p),
            ]
        skip = is_causal and mask != "local" and src > r
        if not skip:
            s = q @ kc.transpose(-2, -1) * sc
            if is_causal and mask == "global":
                s = s.masked_fill(
                    src * n + torch.arange(n)[None, :] > r * n + torch.arange(n)[:, None], -math.inf
                )
            elif is_causal:
                s = s.masked_fill(local, -math.inf)
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            pb, alpha = torch.exp(s - m_new), torch.exp(m - m_new)
            ell = alpha * ell + pb.sum(-1, keepdim=True)
            acc = (alpha * acc if rescale else acc) + pb @ vc
            m = m_new
        if step < p - 1:
            for req in reqs:
                req.wait()
            kc, vc = kn, vn
    return acc / ell


def no_rescale(q, k, v, is_causal=False):
    return _ring(q, k, v, is_causal, rescale=False)


def local_positions(q, k, v, is_causal=False):
    return _ring(q, k, v, is_causal, mask="local")


def local_positions_skipping_future(q, k, v, is_causal=False):
    return _ring(q, k, v, is_causal, mask="local_skip")


def wrong_source_chunk(q, k, v, is_causal=False):
    return _ring(q, k, v, is_causal, believed=1)


def no_scale(q, k, v, is_causal=False):
    return _ring(q, k, v, is_causal, scale=False)


@pytest.mark.parametrize(
    "fn, pattern",
    [
        (no_rescale, "running output was not rescaled"),
        (local_positions, "causal mask used local positions"),
        (local_positions_skipping_future, "causal mask used local positions"),
        (wrong_source_chunk, "wrong source chunk"),
        (no_scale, r"not scaled by 1/sqrt\(d\)"),
    ],
)
def test_mistake_is_named(fn, pattern):
    with pytest.raises(cu.CheckFailure, match=pattern):
        cu.check("ring_attention_forward", fn)


def gather_everything(q, k, v, is_causal=False):
    p = dist.get_world_size()
    ks, vs = [torch.empty_like(k) for _ in range(p)], [torch.empty_like(v) for _ in range(p)]
    dist.all_gather(ks, k.contiguous())
    dist.all_gather(vs, v.contiguous())
    return ring_blocking(q, k, v, is_causal)


def test_gathering_the_keys_is_refused_by_name():
    with pytest.raises(cu.CheckFailure, match=r"all_gather") as info:
        cu.check("ring_attention_forward", gather_everything)
    assert "rank" in str(info.value)


def concatenate_everything(q, k, v, is_causal=False):
    """Passes every chunk around first, then concatenates and attends to the whole sequence."""
    r, p, n = dist.get_rank(), dist.get_world_size(), q.shape[-2]
    ks, vs, kc, vc = [None] * p, [None] * p, k.clone(), v.clone()
    for step in range(p):
        ks[(r - step) % p], vs[(r - step) % p] = kc, vc
        if step < p - 1:
            kn, vn = torch.empty_like(kc), torch.empty_like(vc)
            reqs = [dist.isend(kc, (r + 1) % p), dist.isend(vc, (r + 1) % p)]
            dist.recv(kn, (r - 1) % p)
            dist.recv(vn, (r - 1) % p)
            for req in reqs:
                req.wait()
            kc, vc = kn, vn
    k_all, v_all = torch.cat(ks, -2), torch.cat(vs, -2)  # (..., L, d): the whole sequence
    m, ell, acc = _start(q, v.shape[-1])
    m, ell, acc = _merge(
        m,
        ell,
        acc,
        _scores(q, k_all, r, 0, n, False)
        if not is_causal
        else _scores(q, k_all, r, 0, n, False).masked_fill(
            torch.arange(p * n)[None, :] > r * n + torch.arange(n)[:, None], -math.inf
        ),
        v_all,
    )
    return acc / ell


def test_concatenating_the_sequence_is_caught_by_the_memory_rule():
    with pytest.raises(cu.CheckFailure, match=r"spans the whole sequence of L = 28") as info:
        cu.check("ring_attention_forward", concatenate_everything)
    assert "concatenated" in str(info.value)


def deadlock(q, k, v, is_causal=False):
    """Every rank receives first: nobody ever sends."""
    r, p = dist.get_rank(), dist.get_world_size()
    if p > 1:
        kn = torch.empty_like(k)
        dist.recv(kn, (r - 1) % p)
    return ring_blocking(q, k, v, is_causal)


def test_deadlock_names_rank_and_operation():
    start = time.perf_counter()
    with pytest.raises(cu.CheckFailure) as info:
        cu.check("ring_attention_forward", deadlock)
    text = str(info.value)
    assert "deadlock" in text and re.search(r"rank \d is waiting in dist\.recv\(src=\d\)", text), (
        text
    )
    # stopped by the world's timeout, not left to hang (generous: a slow machine must not fail)
    assert time.perf_counter() - start < 60


def in_place(q, k, v, is_causal=False):
    q.mul_(1.0)
    k.div_(math.sqrt(k.shape[-1]))
    return ring_blocking(q, k * math.sqrt(k.shape[-1]), v, is_causal)


def test_in_place_change_is_named():
    with pytest.raises(cu.CheckFailure, match=r"changed its input `k` in place"):
        cu.check("ring_attention_forward", in_place)


def sdpa_per_chunk(q, k, v, is_causal=False):
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def test_sdpa_is_refused_by_name():
    with pytest.raises(cu.CheckFailure, match="scaled_dot_product_attention"):
        cu.check("ring_attention_forward", sdpa_per_chunk)


def fails_on_last_rank(q, k, v, is_causal=False):
    if dist.get_world_size() > 1 and dist.get_rank() == dist.get_world_size() - 1:
        raise ValueError("lost my chunk")
    return ring_blocking(q, k, v, is_causal)


def test_error_on_one_rank_names_the_rank():
    with pytest.raises(cu.CheckFailure, match=r"rank 1.*lost my chunk"):
        cu.check("ring_attention_forward", fails_on_last_rank)


def test_not_implemented_is_pending():
    def stub(q, k, v, is_causal=False):
        raise NotImplementedError("ring_attention_forward: write it")

    assert cu.check("ring_attention_forward", stub, strict=False).status == "pending"


# =====================================================================================
# Contract, budget, memory rule
# =====================================================================================
def test_contract_and_forbidden_calls():
    ex = cu.checking.get_exercise("ring_attention_forward")
    assert ex.arg_names == ("q", "k", "v", "is_causal")
    assert ex.chapter == "16_sequence_context_parallel"
    for name in (
        "dist.all_gather",
        "dist.all_reduce",
        "dist.broadcast",
        "dist.reduce_scatter_tensor",
        "dist.all_to_all_single",
        "dist.reduce",
        "scaled_dot_product_attention",
    ):
        assert name in ex.forbidden
    assert not any(
        n in ex.forbidden for n in ("dist.send", "dist.recv", "dist.isend", "dist.irecv")
    )


def test_memory_rule_separates_chunks_from_the_sequence():
    cfg = ch16.MEMORY_CASE
    total, n = cfg["p"] * cfg["n"], cfg["n"]
    allowed = ch16.query_sizes(*cfg["batch"], n, cfg["d"], cfg["dv"])
    limit = math.prod(cfg["batch"]) * total * min(cfg["d"], cfg["dv"])
    assert total not in allowed
    assert not ch16.spans_sequence((2, n, n), total, allowed, limit)  # a chunk of scores
    assert not ch16.spans_sequence((2, n, cfg["d"]), total, allowed, limit)
    assert ch16.spans_sequence((2, total, cfg["d"]), total, allowed, limit)  # concatenated keys
    assert ch16.spans_sequence((cfg["p"], 2, n, cfg["dv"]), total, allowed, limit)  # stacked values
    assert ch16.spans_sequence((2, n, total), total, allowed, limit)  # scores against every key


# =====================================================================================
# The torchrun script
# =====================================================================================
def test_torchrun_script_runs_on_two_cpu_ranks():
    done = torchrun("course_utils.scripts.ch16_ring_attention", nproc=2, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ring attention matches serial attention" in done.stdout, done.stdout
