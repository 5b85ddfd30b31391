"""Check batteries of chapter 15: Megatron-style tensor parallelism.

``vocab_parallel_cross_entropy`` runs in forked gloo worlds of 1 to 4 ranks, each rank holding a
shard of the vocabulary (shards of different widths), and every rank's answer is compared with the
serial cross-entropy of the full logits. ``parallel_mlp`` receives a class: a probe builds it inside
each rank from the full serial weights, runs one forward and one backward pass, and sends back the
output, the input's gradient, every parameter shard with its gradient and the all-reduces counted;
the battery compares them with the serial MLP, shard by shard.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..checking import CheckFailure, Tester, exercise
from ..distributed import CommCounter
from ..gradcheck import compare

CHAPTER = "15_tensor_parallel"
Tensor = torch.Tensor

#: Calls that would hand a rank the whole vocabulary (or the whole hidden layer) at once.
GATHERS = (
    "dist.all_gather",
    "dist.all_gather_into_tensor",
    "dist.all_gather_object",
    "dist.gather",
    "dist.gather_object",
    "dist.all_to_all",
    "dist.all_to_all_single",
    "dist.send",
    "dist.recv",
    "dist.isend",
    "dist.irecv",
    "dist.broadcast",
    "dist.broadcast_object_list",
)
#: PyTorch's fused losses: the exercise builds the cross-entropy itself.
LOSS_OPS = ("cross_entropy", "log_softmax", "logsumexp", "softmax", "nll_loss")


def shard_bounds(size: int, widths: list[int]) -> list[tuple[int, int]]:
    """[(start, end)] of consecutive shards with the given widths; their sum must be ``size``."""
    if sum(widths) != size:
        raise ValueError(f"shard widths {widths} do not add up to {size}")
    starts = [sum(widths[:r]) for r in range(len(widths))]
    return [(s, s + w) for s, w in zip(starts, widths, strict=True)]


def even_shard(size: int, world_size: int, what: str = "size") -> int:
    """``size // world_size``; a one-line ``ValueError`` when the world size does not divide it."""
    if world_size < 1 or size % world_size:
        raise ValueError(
            f"the {what} {size} is not divisible by the tensor-parallel world size {world_size}: "
            f"every rank must hold an equal shard of {size}."
        )
    return size // world_size


# ---- references ----------------------------------------------------------------------------
def ref_vocab_parallel_cross_entropy(
    logits_shard: Tensor, target: Tensor, vocab_start: int
) -> Tensor:
    """Per-row cross-entropy of the full logits, from this rank's columns and two all-reduces.

    logits_shard (N, V_r) holds columns [vocab_start, vocab_start + V_r); target (N,) int64 -> (N,).
    """
    n, width = logits_shard.shape
    row_max = logits_shard.amax(dim=1)  # (N,)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX)  # the global maximum of every row
    shifted = logits_shard - row_max[:, None]  # (N, V_r), <= 0 everywhere
    local = target - vocab_start  # (N,) the target's column in this shard, if it is here
    here = (local >= 0) & (local < width)
    picked = shifted.gather(1, torch.where(here, local, 0)[:, None])[:, 0]  # (N,)
    sums = torch.stack([shifted.exp().sum(dim=1), torch.where(here, picked, 0.0)])  # (2, N)
    dist.all_reduce(sums)  # sum of exp over the whole vocabulary; the one target logit
    return torch.log(sums[0]) - sums[1]


class RefParallelMLP(nn.Module):
    """Megatron's MLP on the default group: column-parallel fc1, GELU, row-parallel fc2."""

    def __init__(
        self,
        weight1: Tensor,
        bias1: Tensor,
        weight2: Tensor,
        bias2: Tensor,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.group = group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        width = even_shard(weight1.shape[0], world, "MLP hidden size (weight1.shape[0])")
        rows = slice(rank * width, (rank + 1) * width)
        self.w1 = nn.Parameter(weight1[rows].clone())  # (F/p, H)
        self.b1 = nn.Parameter(bias1[rows].clone())  # (F/p,)
        self.w2 = nn.Parameter(weight2[:, rows].clone())  # (H, F/p)
        self.b2 = nn.Parameter(bias2.clone())  # (H,) whole on every rank

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(_RefCopy.apply(x, self.group) @ self.w1.T + self.b1)  # (..., F/p)
        return _RefReduce.apply(h @ self.w2.T, self.group) + self.b2  # (..., H)


class _RefCopy(torch.autograd.Function):
    """f: identity forward, all-reduce backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _RefReduce(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---- vocab_parallel_cross_entropy ------------------------------------------------------------
#: (N, shard widths, per-shard offsets of the logits, scale, dtype); offsets make the shards'
#: maxima differ by hundreds, so a shift by one shard's own maximum cannot pass.
VOCAB_CASES = [
    (5, [6], [0.0], 3.0, torch.float64),
    (6, [3, 4], [0.0, 0.0], 2.0, torch.float64),
    (6, [2, 5], [400.0, -300.0], 50.0, torch.float64),
    (7, [4, 3, 3], [-500.0, 700.0, 0.0], 100.0, torch.float64),
    (8, [1, 4, 2, 4], [300.0, -200.0, 900.0, 0.0], 20.0, torch.float64),
    (6, [3, 1, 4], [0.0, 200.0, -100.0], 1000.0, torch.float32),
    (8, [2, 3, 3, 3], [100.0, 0.0, -800.0, 500.0], 10.0, torch.float32),
]


def _vocab_inputs(
    t: Tester, n: int, widths: list[int], offsets: list[float], scale: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
    """Full logits (N, V) with per-shard offsets, and targets that land in every shard."""
    vocab = sum(widths)
    bounds = shard_bounds(vocab, widths)
    cols = [t.randn(n, w, scale=scale) + off for w, off in zip(widths, offsets, strict=True)]
    logits = torch.cat(cols, dim=1).to(dtype)  # (N, V)
    target = t.randint(vocab, n)
    for r, (start, end) in enumerate(bounds):  # row r % N gets a target in shard r
        target[r % n] = start + int(t.randint(end - start, 1))
    return logits, target, bounds


def _shard_mistakes(
    logits: Tensor, target: Tensor, bounds: list[tuple[int, int]], rank: int
) -> list[tuple[str, Any]]:
    """What rank ``rank`` returns under each mistake a learner makes (float64, full logits)."""
    x = logits.double()
    n, p = x.shape[0], len(bounds)
    rows = torch.arange(n)
    m = x.amax(1)
    true_t = x[rows, target]
    shards = [x[:, s:e] for s, e in bounds]
    local_max = [s.amax(1) for s in shards]
    owner = torch.tensor([[s <= int(tt) < e for s, e in bounds].index(True) for tt in target])
    owner_max = torch.stack(local_max, 1)[rows, owner]
    s_local = sum((sh - lm[:, None]).exp().sum(1) for sh, lm in zip(shards, local_max, strict=True))
    s_true = (x - m[:, None]).exp().sum(1)
    garbage = sum(
        (sh - m[:, None])[rows, (target - s).clamp(0, e - s - 1)]
        for sh, (s, e) in zip(shards, bounds, strict=True)
    )
    # the global id used as a column of every shard: a wrong column wherever it happens to fit
    no_offset = torch.zeros_like(m)
    for sh, (s, e) in zip(shards, bounds, strict=True):
        fits = (target >= s) & (target < e) & (target < e - s)
        no_offset = no_offset + torch.where(
            fits, (sh - m[:, None])[rows, target.clamp(0, e - s - 1)], 0.0
        )
    local_shift = "each rank shifted by its own shard's maximum; the shift must be the maximum over the whole vocabulary: all-reduce the local row maxima with op=dist.ReduceOp.MAX first."
    return [
        (local_shift, torch.log(s_local) - (true_t - owner_max)),
        (local_shift, torch.log(s_local) + local_max[rank] - true_t),
        (
            "the vocabulary offset was not subtracted: the global target id was used as a column "
            "index into this rank's shard; the target's column here is target - vocab_start.",
            torch.log(s_true) - no_offset,
        ),
        (
            "targets outside this rank's range were not masked: every rank added a (clamped) "
            "logit of its own, so the target logit was counted on every rank; zero it where "
            "target - vocab_start is outside [0, V_r) before the all-reduce.",
            torch.log(s_true) - garbage,
        ),
        (
            "the all-reduced sums were averaged (divided by the world size) instead of summed: "
            "the softmax denominator is the sum of exp over every rank's columns.",
            torch.log(s_true / p) - (true_t - m) / p,
        ),
        (
            "the sum of exp was averaged over the ranks instead of summed (the loss is off by "
            "log(world size)).",
            torch.log(s_true / p) - (true_t - m),
        ),
        (
            "the target logit was not all-reduced: only the rank whose shard holds the target "
            "knows it, the others subtracted 0; sum the masked target logits over the ranks "
            "(in the same all-reduce as the sums of exp, or another).",
            torch.log(s_true) - torch.where(owner == rank, true_t - m, 0.0),
        ),
        (
            "the row maximum was not added back consistently: with a global shift M the loss "
            "is log(sum exp(x - M)) - (x_target - M).",
            torch.log(s_true) - true_t,
        ),
    ]


def _check_vocab_case(
    t: Tester,
    n: int,
    widths: list[int],
    offsets: list[float],
    scale: float,
    dtype: torch.dtype,
) -> None:
    p = len(widths)
    logits, target, bounds = _vocab_inputs(t, n, widths, offsets, scale, dtype)
    case = (
        f"world of {p}, logits ({n}, {sum(widths)}) {_dtype_name(dtype)} split into columns "
        f"{[list(b) for b in bounds]}, shard maxima near {offsets} (scale {scale:g})"
    )
    args = [(logits[:, s:e].clone(), target.clone(), s) for s, e in bounds]
    try:
        outs = t.world(case, p, args)
    except CheckFailure as err:
        text = str(err)
        if "out of bounds" in text or "out of range" in text:
            raise CheckFailure(
                f"{text} It looks like the global target id was used as an index into this "
                "rank's shard: subtract vocab_start, and mask the targets that fall outside "
                "[0, V_r) (they belong to another rank)."
            ) from None
        raise
    expected = F.cross_entropy(logits.double(), target, reduction="none")
    for rank, got in enumerate(outs):
        where = f"{case}, rank {rank}"
        if torch.is_tensor(got) and got.dim() == 0:
            hint = (
                " It returned the mean over the rows; the contract returns every row's loss."
                if math.isclose(float(got), float(expected.mean()), rel_tol=1e-4)
                else ""
            )
            t.fail(
                where,
                f"the result should be every row's cross-entropy, a tensor of shape ({n},), but "
                f"it is a 0-d tensor.{hint}",
            )
        got = t.expect_tensor(where, "loss", got, shape=(n,), dtype=dtype)
        if not torch.isfinite(got).all():
            t.fail(
                where,
                "the loss has NaN or inf where the true loss is finite: exp overflowed or the "
                "sum underflowed. The shards' maxima differ by hundreds here: shift every logit "
                "by the row's maximum over the whole vocabulary (all-reduce the local maxima with "
                "op=dist.ReduceOp.MAX) before exponentiating, not by this shard's own maximum.",
            )
    # A mistake is named only when it explains every rank's answer: on one rank alone two
    # mistakes can coincide (on rank 0, whose vocab_start is 0, the offset does not matter).
    models = [_shard_mistakes(logits, target, bounds, rank) for rank in range(p)]
    rtol, atol = t.tolerances(dtype, float(expected.abs().max()))
    named = [
        i
        for i in range(len(models[0]))
        if all(
            compare(got.double(), models[r][i][1], max(rtol, 1e-6), atol * 10).ok
            for r, got in enumerate(outs)
        )
    ]
    for rank, got in enumerate(outs):
        t.compare(
            f"{case}, rank {rank}",
            "loss",
            got,
            expected.to(dtype),
            mistakes=[models[rank][i] for i in named[:1]],
            generic_hints=not named,
        )
    first = outs[0]
    for rank, got in enumerate(outs[1:], start=1):
        if not torch.equal(got, first):
            t.fail(
                case,
                f"rank {rank}'s result differs from rank 0's (max difference "
                f"{float((got - first).abs().max()):.2e}); every rank must return the same "
                "losses, computed from the same all-reduced numbers.",
            )
    t.ok(case, "equal on every rank", "ok (exact)")


@exercise(
    "vocab_parallel_cross_entropy",
    chapter=CHAPTER,
    signature="(logits_shard (N, V_r), target (N,) int64, vocab_start) -> (N,)",
    summary="distributed, Megatron-style: rank r holds vocabulary columns [vocab_start, "
    "vocab_start + V_r); returns every row's cross-entropy of the full logits, equal on all "
    "ranks, using all-reduces of the row maxima and of the sums, never gathering the logits",
    reference=ref_vocab_parallel_cross_entropy,
    budget=10.0,
    forbidden=GATHERS + LOSS_OPS,
)
def check_vocab_parallel_cross_entropy(t: Tester) -> None:
    """7 worlds of 1 to 4 ranks, uneven shards, shard maxima hundreds apart, float64 and float32."""
    for config in VOCAB_CASES:
        _check_vocab_case(t, *config)


# ---- ParallelMLP ---------------------------------------------------------------------------
#: (world size, batch shape, H, F, dtype): F/p never equals H, so a shard's shape names it.
MLP_CASES = [
    (1, (2, 3), 5, 12, torch.float64),
    (2, (2, 3), 5, 12, torch.float64),
    (3, (3,), 5, 12, torch.float64),
    (4, (2, 2), 5, 12, torch.float64),
    (2, (2, 3), 4, 6, torch.float32),
]


def probe_parallel_mlp(
    cls: type, weight1: Tensor, bias1: Tensor, weight2: Tensor, bias2: Tensor, x: Tensor, dy: Tensor
) -> dict[str, Any]:
    """Inside one rank: build the learner's module, one forward and backward; plain data back."""
    module = cls(weight1, bias1, weight2, bias2)
    if not isinstance(module, nn.Module):
        return {"not_module": type(module).__name__}
    xin = x.clone().requires_grad_(True)
    with CommCounter() as counter:
        with counter.label("forward"):
            y = module(xin)
        if not torch.is_tensor(y) or not y.requires_grad:
            return {"y": y.detach() if torch.is_tensor(y) else repr(y), "no_graph": True}
        with counter.label("backward"):
            (y * dy).sum().backward()
    params = [
        (
            name,
            p.detach().clone(),
            None if p.grad is None else p.grad.detach().clone(),
        )
        for name, p in module.named_parameters()
    ]
    out: dict[str, Any] = {
        "y": y.detach(),
        "dx": None if xin.grad is None else xin.grad.detach(),
        "params": params,
    }
    out["ops"] = [(r["op"], r["label"]) for r in counter.records]
    return out


def probe_parallel_mlp_grid(
    cls: type, weight1: Tensor, bias1: Tensor, weight2: Tensor, bias2: Tensor, x: Tensor, dy: Tensor
) -> dict[str, Any]:
    """Inside one rank of 4: tensor-parallel groups {0, 1} and {2, 3}; the MLP on this rank's pair."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = pairs[dist.get_rank() // 2]
    module = cls(weight1, bias1, weight2, bias2, group=group)
    xin = x.clone().requires_grad_(True)
    y = module(xin)
    (y * dy).sum().backward()
    return {
        "y": y.detach(),
        "dx": None if xin.grad is None else xin.grad.detach(),
        "params": [
            (n, p.detach().clone(), None if p.grad is None else p.grad.detach().clone())
            for n, p in module.named_parameters()
        ],
    }


def probe_parallel_mlp_uneven(
    cls: type, weight1: Tensor, bias1: Tensor, weight2: Tensor, bias2: Tensor
) -> str:
    """Inside one rank: build the learner's module where the world size does not divide F."""
    try:
        cls(weight1, bias1, weight2, bias2)
    except Exception as err:  # noqa: BLE001 - what it raised is the answer
        return f"{type(err).__name__}: {err}"
    return ""


def _mlp_serial(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, x: Tensor, dy: Tensor) -> dict:
    """Serial MLP in float64: output and the gradients of sum(y * dy)."""
    leaves = [v.double().clone().requires_grad_(True) for v in (w1, b1, w2, b2, x)]
    a, b, c, d, xx = leaves
    y = F.gelu(xx @ a.T + b) @ c.T + d
    grads = torch.autograd.grad((y * dy.double()).sum(), leaves)
    return {
        "y": y.detach(),
        "dw1": grads[0],
        "db1": grads[1],
        "dw2": grads[2],
        "db2": grads[3],
        "dx": grads[4],
    }


def _find(
    t: Tester, case: str, params: list, shape: tuple[int, ...], what: str
) -> tuple[str, Tensor, Any]:
    found = [p for p in params if tuple(p[1].shape) == shape]
    if len(found) != 1:
        shapes = [(name, tuple(v.shape)) for name, v, _ in params]
        t.fail(
            case,
            f"expected exactly one parameter of shape {shape} ({what}); the module's parameters "
            f"are {shapes}. Each rank keeps its shard as nn.Parameters: rows of weight1 and "
            "bias1, the same columns of weight2, and all of bias2.",
        )
    return found[0]


def _expected_shards(
    w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, ref: dict, rows: slice
) -> dict[str, tuple[tuple[int, ...], Tensor, Tensor, str]]:
    """Per parameter: (shard shape, shard values, shard of the serial gradient, description)."""
    span = f"{rows.start}:{rows.stop}"
    return {
        "weight1": (tuple(w1[rows].shape), w1[rows], ref["dw1"][rows], f"rows {span} of weight1"),
        "bias1": (tuple(b1[rows].shape), b1[rows], ref["db1"][rows], f"entries {span} of bias1"),
        "weight2": (
            tuple(w2[:, rows].shape),
            w2[:, rows],
            ref["dw2"][:, rows],
            f"columns {span} of weight2",
        ),
        "bias2": (tuple(b2.shape), b2, ref["db2"], "all of bias2"),
    }


def _check_mlp_case(
    t: Tester, p: int, batch: tuple[int, ...], h: int, f: int, dtype: torch.dtype
) -> None:
    case = f"world of {p}, H={h}, F={f}, x {(*batch, h)} {_dtype_name(dtype)}"
    w1, b1 = t.randn(f, h, dtype=dtype, scale=0.5), t.randn(f, dtype=dtype)
    w2, b2 = t.randn(h, f, dtype=dtype, scale=0.5), t.randn(h, dtype=dtype)
    x, dy = t.randn(*batch, h, dtype=dtype), t.randn(*batch, h, dtype=dtype)
    args = [(w1.clone(), b1.clone(), w2.clone(), b2.clone(), x.clone(), dy.clone())] * p
    outs = t.world(case, p, args, probe=probe_parallel_mlp)
    ref = _mlp_serial(w1, b1, w2, b2, x, dy)
    width = f // p
    if width == h:  # the shapes alone would not tell bias1's shard from bias2
        raise ValueError(f"MLP case with F/p == H ({width}) cannot name the shards")
    shape = (*batch, h)
    for rank, out in enumerate(outs):
        where = f"{case}, rank {rank}"
        if "not_module" in out:
            t.fail(
                where, f"ParallelMLP(...) should be an nn.Module, but it is a {out['not_module']}."
            )
        if out.get("no_graph"):
            t.fail(
                where,
                "the output does not require grad: it must be computed from the module's "
                "parameters with autograd on (no torch.no_grad, no .detach()).",
            )
        rows = slice(rank * width, (rank + 1) * width)
        expect = _expected_shards(w1, b1, w2, b2, ref, rows)
        for shape_p, value, _, desc in expect.values():
            name, got_value, _ = _find(t, where, out["params"], shape_p, desc)
            if not torch.equal(got_value, value):
                t.fail(
                    where,
                    f"parameter `{name}` should hold {desc} (rank {rank} of {p} keeps shard "
                    f"{rank}, counting from 0, of {p} equal shards), but its values differ.",
                )
        t.ok(where, "parameter shards", "ok (exact)")
    for rank, out in enumerate(outs):  # shards first on every rank, then the numbers
        where = f"{case}, rank {rank}"
        rows = slice(rank * width, (rank + 1) * width)
        expect = _expected_shards(w1, b1, w2, b2, ref, rows)
        # this rank's partial product, before the forward all-reduce
        z1 = x.double() @ w1[rows].double().T + b1[rows].double()
        partial = F.gelu(z1) @ w2[:, rows].double().T
        t.compare(
            where,
            "output",
            out["y"],
            ref["y"].to(dtype),
            mistakes=[
                (
                    "the output is this rank's partial product: the row-parallel layer's "
                    "results must be summed over the ranks with one all-reduce in the forward "
                    "pass (the g operator) before bias2 is added.",
                    partial + b2.double(),
                ),
                (
                    f"bias2 was added on every rank before the all-reduce, so it counts {p} "
                    "times; add it once, after the all-reduce.",
                    ref["y"] + (p - 1) * b2.double(),
                ),
            ],
        )
        ops = out.get("ops")
        if ops is not None:
            fwd = [op for op, label in ops if label == "forward"]
            bwd = [op for op, label in ops if label == "backward"]
            if p > 1 and fwd != ["all_reduce"]:
                t.fail(
                    where,
                    f"the forward pass made these torch.distributed calls: {fwd or 'none'}; "
                    "Megatron's MLP makes exactly one, an all-reduce after the row-parallel "
                    "layer (g). f is the identity in the forward pass.",
                )
        if out["dx"] is None:
            t.fail(
                where,
                "the input x received no gradient: the output must depend on x through autograd.",
            )
        z1g = z1.clone().requires_grad_(True)
        (gelu_grad,) = torch.autograd.grad(F.gelu(z1g).sum(), z1g)
        partial_dx = ((dy.double() @ w2[:, rows].double()) * gelu_grad) @ w1[rows].double()
        t.compare(
            where,
            "dx (gradient of the input)",
            out["dx"],
            ref["dx"].to(dtype),
            mistakes=[
                (
                    "the input's gradient on this rank is only its own partial sum: the "
                    "column-parallel layer's input must pass through f (identity forward, "
                    "all-reduce backward), so that the backward pass sums the ranks' "
                    "contributions.",
                    partial_dx,
                ),
                (
                    f"the gradients are {p} times too large: g's backward must be the identity "
                    "(the backward all-reduce belongs to f, at the MLP's input).",
                    ref["dx"] * p,
                ),
            ],
        )
        if ops is not None and p > 1 and bwd != ["all_reduce"]:
            t.fail(
                where,
                f"the backward pass made these torch.distributed calls: {bwd or 'none'}; "
                "Megatron's MLP makes exactly one, an all-reduce of the input's gradient (f's "
                "backward); g's backward is the identity.",
            )
        for what, (shape_p, _, grad, desc) in expect.items():
            name, _, got_grad = _find(t, where, out["params"], shape_p, desc)
            if got_grad is None:
                t.fail(where, f"parameter `{name}` ({what}'s shard) received no gradient.")
            t.compare(
                where,
                f"grad of {what} shard `{name}`",
                got_grad,
                grad.to(dtype),
                mistakes=[
                    (
                        f"the gradients are {p} times too large: g's backward must be the "
                        "identity (the backward all-reduce belongs to f, at the MLP's input).",
                        grad * p,
                    )
                ],
            )
        t.expect_tensor(where, "output", out["y"], shape=shape, dtype=dtype)


def _check_mlp_grid(t: Tester) -> None:
    """World of 4 as two tensor-parallel pairs {0, 1} and {2, 3}, each on its own input."""
    h, f = 5, 12
    case = (
        f"world of 4 split into tensor-parallel groups [0, 1] and [2, 3] (group=...), H={h}, F={f}"
    )
    w1, b1, w2, b2 = t.randn(f, h, scale=0.5), t.randn(f), t.randn(h, f, scale=0.5), t.randn(h)
    xs = [t.randn(3, h) for _ in range(2)]
    dys = [t.randn(3, h) for _ in range(2)]
    args = [(w1, b1, w2, b2, xs[r // 2], dys[r // 2]) for r in range(4)]
    try:
        outs = t.world(case, 4, args, probe=probe_parallel_mlp_grid)
    except CheckFailure as err:
        if "group" in str(err) and "argument" in str(err):
            raise CheckFailure(
                f"{err} ParallelMLP takes an optional `group` (the tensor-parallel process "
                "group; None means the default group) and passes it to every collective and to "
                "dist.get_rank(group) / dist.get_world_size(group)."
            ) from None
        raise
    for rank, out in enumerate(outs):
        ref = _mlp_serial(w1, b1, w2, b2, xs[rank // 2], dys[rank // 2])
        where = f"{case}, rank {rank} (rank {rank % 2} of its group)"
        rows = slice((rank % 2) * (f // 2), (rank % 2 + 1) * (f // 2))
        if any(tuple(v.shape) == (f // 4, h) for _, v, _ in out["params"]):
            t.fail(
                where,
                f"weight1's shard has {f // 4} rows, a quarter of F={f}: the shards were cut for "
                "the whole world of 4 instead of the tensor-parallel group of 2. Use "
                "dist.get_rank(group) and dist.get_world_size(group), and pass group=... to every "
                "collective, so that it runs over the tensor-parallel group instead of the "
                "whole world.",
            )
        for shape_p, value, grad, desc in _expected_shards(w1, b1, w2, b2, ref, rows).values():
            name, got_value, got_grad = _find(t, where, out["params"], shape_p, desc)
            if not torch.equal(got_value, value):
                t.fail(
                    where,
                    f"parameter `{name}` should hold {desc}: the rank within the group "
                    "(dist.get_rank(group)) picks the shard, not the global rank.",
                )
            if got_grad is None:
                t.fail(where, f"parameter `{name}` received no gradient.")
            t.compare(where, f"grad of `{name}`", got_grad, grad)
        t.compare(
            where,
            "output",
            out["y"],
            ref["y"],
            mistakes=[
                (
                    "the all-reduces ran over the whole world instead of the tensor-parallel "
                    "group: pass group=... to every collective.",
                    _mlp_serial(w1, b1, w2, b2, xs[0], dys[0])["y"]
                    + _mlp_serial(w1, b1, w2, b2, xs[1], dys[1])["y"]
                    - b2,
                )
            ],
        )
        t.compare(where, "dx (gradient of the input)", out["dx"], ref["dx"])


@exercise(
    "parallel_mlp",
    chapter=CHAPTER,
    signature="class ParallelMLP(nn.Module): __init__(weight1 (F,H), bias1 (F,), weight2 (H,F), "
    "bias2 (H,), group=None), forward(x (..., H)) -> (..., H)",
    summary="class ParallelMLP: Megatron's MLP gelu(x W1^T + b1) W2^T + b2 on the process group "
    "`group` (None: the default group); "
    "rank r keeps rows [rF/p, (r+1)F/p) of weight1 and bias1 and those columns of weight2 as "
    "parameters, bias2 whole; one all-reduce forward (g), one backward (f); ValueError when the "
    "world size does not divide F",
    reference=RefParallelMLP,
    budget=10.0,
    forbidden=GATHERS,
)
def check_parallel_mlp(t: Tester) -> None:
    """Worlds of 1 to 4 ranks: output, input gradient, every shard and its gradient; an uneven F."""
    for config in MLP_CASES:
        _check_mlp_case(t, *config)
    _check_mlp_grid(t)
    f, h = 8, 5
    case = f"world of 3, H={h}, F={f} (3 does not divide F)"
    w1, b1, w2, b2 = t.randn(f, h), t.randn(f), t.randn(h, f), t.randn(h)
    said = t.world(case, 3, [(w1, b1, w2, b2)] * 3, probe=probe_parallel_mlp_uneven)
    if not all(said):
        t.fail(
            case,
            "ParallelMLP was built without complaint, though 3 ranks cannot hold equal "
            f"shards of F={f}; raise a ValueError that names F and the world size.",
        )
    if "\n" in said[0].strip():
        t.fail(case, f"the error should be one line, but it is: {said[0]!r}.")
    t.ok(case, "error when the world size does not divide F", said[0][:80])
