"""Check battery of chapter 16: ring attention (context parallelism) on forked gloo worlds.

``ring_attention_forward`` runs on every rank of worlds of 1, 2, 3 and 4 ranks; each rank's rows
are judged against serial attention in float64. Mistake models are the whole ring simulated in
one process with one step done wrong, so a failure can say which step it looks like. A memory
case records, inside every rank, the shape of each tensor the learner's code computes and fails
when one spans the whole sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..checking import Tester, exercise
from .ch09_attention import SDPA_OPS, query_sizes

CHAPTER = "16_sequence_context_parallel"
Tensor = torch.Tensor

#: Every torch.distributed collective: ring attention moves key/value chunks point to point only.
COLLECTIVES = tuple(
    f"dist.{name}"
    for name in (
        "all_gather",
        "all_gather_into_tensor",
        "all_gather_single",
        "all_gather_object",
        "all_gather_coalesced",
        "all_reduce",
        "all_reduce_coalesced",
        "broadcast",
        "broadcast_object_list",
        "gather",
        "gather_object",
        "scatter",
        "scatter_object_list",
        "all_to_all",
        "all_to_all_single",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "reduce_scatter_single",
        "reduce",
    )
)


# ---- reference -----------------------------------------------------------------------------
def ref_ring_attention_forward(q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False) -> Tensor:
    """This rank's rows of softmax(Q K^T / sqrt(d)) V, key/value chunks passed around the ring.

    q (..., L_r, d), k (..., L_r, d), v (..., L_r, dv) -> (..., L_r, dv); rank r holds the r-th
    contiguous chunk of the sequence. At step s it holds the chunk of rank (r - s) mod p.
    """
    rank, p = dist.get_rank(), dist.get_world_size()
    n = q.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    rows = rank * n + torch.arange(n)[:, None]  # global positions of this rank's queries
    m = torch.full(q.shape[:-1] + (1,), float("-inf"), dtype=q.dtype)
    ell = torch.zeros_like(m)
    acc = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
    k_cur, v_cur = k.contiguous(), v.contiguous()
    for step in range(p):
        src = (rank - step) % p
        if step < p - 1:  # start passing the chunk on before computing with it
            k_next, v_next = torch.empty_like(k_cur), torch.empty_like(v_cur)
            reqs = [
                dist.isend(k_cur, (rank + 1) % p),
                dist.isend(v_cur, (rank + 1) % p),
                dist.irecv(k_next, (rank - 1) % p),
                dist.irecv(v_next, (rank - 1) % p),
            ]
        if not (is_causal and src > rank):  # a later rank's keys are all in the future
            s = (q @ k_cur.transpose(-2, -1)) * scale  # (..., L_r, L_r)
            if is_causal:
                cols = src * n + torch.arange(n)[None, :]
                s = s.masked_fill(cols > rows, float("-inf"))
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            p_blk = torch.exp(s - m_new)
            alpha = torch.exp(m - m_new)
            ell = alpha * ell + p_blk.sum(-1, keepdim=True)
            acc = alpha * acc + p_blk @ v_cur
            m = m_new
        if step < p - 1:
            for req in reqs:
                req.wait()
            k_cur, v_cur = k_next, v_next
    return acc / ell


# ---- mistake models: the whole ring in one process ------------------------------------------
def _ring_model(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    p: int,
    causal: bool,
    *,
    direction: int = -1,
    believed: int | None = None,
    mask: str = "global",
    rescale_acc: bool = True,
    rescale_sum: bool = True,
    scale: bool = True,
    per_chunk: bool = False,
) -> Tensor:
    """Every rank's output of a ring done with one mistake, concatenated: (..., L, dv).

    ``direction`` -1: at step s rank r holds chunk (r - s) mod p (received from rank r-1); +1:
    chunk (r + s) mod p. ``believed`` is the direction the causal decisions assume (default: the
    true one). ``mask``: "global" (right), "local" (every chunk masked as the diagonal, none
    skipped) or "local_skip" (later chunks skipped, earlier ones masked as the diagonal).
    """
    q, k, v = q.double(), k.double(), v.double()
    n = q.shape[-2] // p
    believed = direction if believed is None else believed
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale else 1.0
    local = torch.arange(n)[None, :] > torch.arange(n)[:, None]
    outs = []
    for r in range(p):
        qr = q[..., r * n : (r + 1) * n, :]
        m = torch.full(qr.shape[:-1] + (1,), float("-inf"), dtype=q.dtype)
        ell = torch.zeros_like(m)
        acc = torch.zeros(qr.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
        for step in range(p):
            held, src = (r + direction * step) % p, (r + believed * step) % p
            if causal and mask != "local" and src > r:
                continue
            s = qr @ k[..., held * n : (held + 1) * n, :].transpose(-2, -1) * sc
            vh = v[..., held * n : (held + 1) * n, :]
            if causal and mask == "global":
                s = s.masked_fill(
                    src * n + torch.arange(n)[None, :] > r * n + torch.arange(n)[:, None], -math.inf
                )
            elif causal:
                s = s.masked_fill(local, float("-inf"))
            if per_chunk:
                acc = acc + torch.softmax(s, -1) @ vh
                ell = torch.ones_like(ell)
                continue
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            pb, alpha = torch.exp(s - m_new), torch.exp(m - m_new)
            ell = (alpha * ell if rescale_sum else ell) + pb.sum(-1, keepdim=True)
            acc = (alpha * acc if rescale_acc else acc) + pb @ vh
            m = m_new
        outs.append(acc / ell)
    return torch.cat(outs, -2)


RESCALE = (
    "the running output was not rescaled when the running maximum changed: before adding a new "
    "chunk's exp(S - m_new) V, multiply the running output (and the running sum) by "
    "exp(m_old - m_new), the online softmax of chapter 09."
)
LOCAL_MASK = (
    "the causal mask used local positions: every key chunk was masked as if it were the diagonal "
    "chunk. Mask with global positions: query i of rank r sits at r*L_r + i, key j of the chunk "
    "that started on rank src at src*L_r + j; chunks from earlier ranks need no mask, chunks from "
    "later ranks are skipped."
)
WRONG_SOURCE = (
    "the causal decisions used the wrong source chunk: the chunk held at step s came from rank "
    "(r - s) mod p when chunks travel from rank r-1 to rank r (or (r + s) mod p the other way "
    "round), but the skip and the mask were computed for the other one. Derive the source index "
    "from the direction your messages actually travel."
)
NO_SCALE = "the scores were not scaled by 1/sqrt(d)."
PER_CHUNK = (
    "each key/value chunk was softmaxed on its own and the results were added; the chunks must "
    "share one softmax through the running maximum and sum (the online softmax)."
)
CAUSAL_IGNORED = "is_causal was ignored: every query attended to every key."


def _mistakes(
    q: Tensor, k: Tensor, v: Tensor, p: int, causal: bool
) -> list[tuple[str, Callable[[], Tensor]]]:
    """(sentence, lazy full-length output) for each mistake this case can show."""

    def model(**kw: Any) -> Callable[[], Tensor]:
        return lambda: _ring_model(q, k, v, p, causal, **kw)

    out = []
    for direction in (-1, 1):
        out += [
            (RESCALE, model(direction=direction, rescale_acc=False)),
            (RESCALE, model(direction=direction, rescale_acc=False, rescale_sum=False)),
        ]
    out += [(NO_SCALE, model(scale=False)), (PER_CHUNK, model(per_chunk=True))]
    if causal:
        for direction in (-1, 1):
            out += [
                (LOCAL_MASK, model(direction=direction, mask="local")),
                (LOCAL_MASK, model(direction=direction, mask="local_skip")),
                (WRONG_SOURCE, model(direction=direction, believed=-direction)),
            ]
        out.append((CAUSAL_IGNORED, lambda: _ring_model(q, k, v, p, False)))
    return out


# ---- the memory rule, recorded inside each rank ---------------------------------------------
class SequenceRecorder(TorchFunctionMode):
    """Records the shape of every tensor a torch function, method or operator returns inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: dict[tuple[str, tuple[int, ...]], None] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's hook
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        for x in out if isinstance(out, tuple | list) else (out,):
            if torch.is_tensor(x):
                self.shapes[(name, tuple(x.shape))] = None
        return out


def probe_shapes(
    fn: Callable[..., Any], q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False
) -> dict:
    """Inside a rank: call ``fn`` under a SequenceRecorder; its output and every shape it computed."""
    recorder = SequenceRecorder()
    with recorder:
        out = fn(q, k, v, is_causal=is_causal)
    return {"out": out, "shapes": [[name, list(shape)] for name, shape in recorder.shapes]}


def spans_sequence(shape: tuple[int, ...], total: int, allowed: set[int], limit: int) -> bool:
    """The rule: an axis at least ``total`` long that no product of the other dims explains, or ``limit`` elements."""
    return any(n >= total and n not in allowed for n in shape) or math.prod(shape) >= limit


#: The memory case: L = 28 is no product of the other dims (2, 7, 5, 3), and a (2, 7, 7) chunk of
#: scores (98 elements) stays below the element limit, batch * L * min(d, dv) = 168.
MEMORY_CASE = {"p": 4, "batch": (2,), "n": 7, "d": 5, "dv": 3}


# ---- cases and judging ----------------------------------------------------------------------
def _cases(t: Tester) -> list[tuple[int, tuple[int, ...], int, int, int, bool, torch.dtype, float]]:
    """(p, batch dims, L_r, d, dv, causal, dtype, score scale): every length L = p*L_r distinct from the other dims."""
    f64, f32 = torch.float64, torch.float32
    return [
        (1, (2, 3), 7, 4, 3, False, f64, 1.0),
        (1, (), 7, 4, 5, True, f64, 1.0),
        (2, (2, 3), 5, 4, 6, False, f64, 1.0),
        (2, (), 6, 3, 2, True, f64, 1.0),
        (3, (2,), 5, 4, 3, True, f64, 1.0),
        (3, (1, 2, 2), 4, 5, 3, False, f64, 1.0),
        (4, (2, 2), 3, 4, 5, True, f64, 1.0),
        (4, (3,), 4, 6, 2, False, f32, 1.0),
        (3, (2, 2), 6, 8, 4, True, f32, 1.0),
        (3, (2,), 5, 4, 3, True, f64, 100.0),
    ]


def _describe(
    p: int,
    batch: tuple[int, ...],
    n: int,
    d: int,
    dv: int,
    causal: bool,
    dtype: torch.dtype,
    big: float,
) -> str:
    lead = ",".join(map(str, batch))
    lead = f"{lead}," if lead else ""
    extreme = ", extreme scores of magnitude ~1e4" if big != 1.0 else ""
    return (
        f"world of {p}, L = {p * n} (L_r = {n}), q ({lead}{n},{d}), v ({lead}{n},{dv}) per rank, "
        f"{str(dtype).replace('torch.', '')}, is_causal={causal}{extreme}"
    )


def _split(x: Tensor, p: int) -> list[Tensor]:
    return [c.clone() for c in x.chunk(p, -2)]


def _judge(
    t: Tester, case: str, outs: list[Any], q: Tensor, k: Tensor, v: Tensor, p: int, causal: bool
) -> None:
    n = q.shape[-2] // p
    with torch.no_grad():
        expected = F.scaled_dot_product_attention(
            q.double(), k.double(), v.double(), is_causal=causal
        )
    models = _mistakes(q, k, v, p, causal)
    cache: dict[int, Tensor | None] = {}

    def rank_rows(i: int, r: int) -> Callable[[], Tensor | None]:
        def rows() -> Tensor | None:
            if i not in cache:
                try:
                    cache[i] = models[i][1]()
                except Exception:  # noqa: BLE001 - a model that cannot run does not match
                    cache[i] = None
            full = cache[i]
            return None if full is None else full[..., r * n : (r + 1) * n, :]

        return rows

    for r, got in enumerate(outs):
        want = expected[..., r * n : (r + 1) * n, :].to(q.dtype)
        got = t.expect_tensor(case, f"rank {r}'s output", got, shape=want.shape, dtype=q.dtype)
        mistakes = [(sentence, rank_rows(i, r)) for i, (sentence, _) in enumerate(models)]
        if not torch.isfinite(got).all():
            t.fail(
                case,
                f"rank {r}'s output has NaN or inf where the true values are finite: start the "
                "running maximum at -inf, subtract it before exponentiating, and skip (or fully "
                "mask) only key chunks that lie entirely in the future.",
            )
        t.compare(case, f"rank {r}'s output", got, want, mistakes=mistakes)


@exercise(
    "ring_attention_forward",
    forbidden=SDPA_OPS + COLLECTIVES,
    chapter=CHAPTER,
    signature="(q (..., L_r, d), k (..., L_r, d), v (..., L_r, dv), is_causal=False) -> (..., L_r, dv)",
    summary=(
        "context parallelism: rank r holds the r-th contiguous sequence chunk; key/value chunks "
        "travel around the ring point to point and merge with an online softmax; no tensor spans "
        "the whole sequence"
    ),
    reference=ref_ring_attention_forward,
    budget=10.0,
)
def check_ring_attention_forward(t: Tester) -> None:
    """Worlds of 1-4 ranks, leading dims of several shapes (none too), dv != d, causal, float32; memory rule."""
    for p, batch, n, d, dv, causal, dtype, big in _cases(t):
        q = t.randn(*batch, p * n, d, dtype=dtype, scale=big)
        k = t.randn(*batch, p * n, d, dtype=dtype, scale=big)
        v = t.randn(*batch, p * n, dv, dtype=dtype)
        case = _describe(p, batch, n, d, dv, causal, dtype, big)
        args = list(zip(_split(q, p), _split(k, p), _split(v, p), strict=True))
        outs = t.world(case, p, args, [{"is_causal": causal}] * p)
        _judge(t, case, outs, q, k, v, p, causal)
    _check_memory(t)


def _check_memory(t: Tester) -> None:
    cfg = MEMORY_CASE
    p, batch, n, d, dv = cfg["p"], cfg["batch"], cfg["n"], cfg["d"], cfg["dv"]
    total = p * n
    q, k = t.randn(*batch, total, d), t.randn(*batch, total, d)
    v = t.randn(*batch, total, dv)
    case = f"memory: {_describe(p, batch, n, d, dv, True, torch.float64, 1.0)}"
    args = list(zip(_split(q, p), _split(k, p), _split(v, p), strict=True))
    reports = t.world(case, p, args, [{"is_causal": True}] * p, probe=probe_shapes)
    allowed = query_sizes(*batch, n, d, dv)
    limit = math.prod(batch) * total * min(d, dv)
    for r, rep in enumerate(reports):
        for name, shape in rep["shapes"]:
            if spans_sequence(tuple(shape), total, allowed, limit):
                t.fail(
                    case,
                    f"rank {r} built a tensor of shape {tuple(shape)} (by {name}) that spans the whole "
                    f"sequence of L = {total} positions (an axis of {total} or more, or {limit} or more "
                    f"elements, as many as all the keys): it looks like the key/value chunks were "
                    "concatenated (or stacked) into one tensor. Keep one chunk at a time: attend to "
                    "the chunk you hold, merge it into the running output, and pass it on.",
                )
    _judge(t, case, [rep["out"] for rep in reports], q, k, v, p, True)
    largest = max(math.prod(s) for rep in reports for _, s in rep["shapes"]) if reports else 0
    t.ok(case, "no tensor spans the sequence", f"ok (largest tensor {largest} elements)")
