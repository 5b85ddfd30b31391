"""Chapter 15: the batteries pass correct tensor-parallel code in several styles and name the mistakes.

Also: every parallel layer of the chapter's notebook (f and g, ColumnParallelLinear with and without
gathering, RowParallelLinear, the MLP, self-attention, VocabParallelEmbedding, the GPT block at
tensor-parallel sizes 1, 2 and 4, DP x TP on a 2 x 2 grid) equals its serial twin built from the same
full weights, forward and backward; and the torchrun script trains the same model as serial.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from launch import torchrun
from torch import nn

import course_utils as cu
from course_utils.checks import ch15_tensor_parallel as ch15
from course_utils.distributed import WorldError, run_world

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)


def failure(exercise: str, fn, seed: int = 0) -> str:
    with pytest.raises(cu.CheckFailure) as err:
        cu.check(exercise, fn, seed=seed)
    return str(err.value)


# =====================================================================================
# vocab_parallel_cross_entropy: correct styles
# =====================================================================================
def vce_one_hot(logits_shard, target, vocab_start):
    """Three all-reduces (max, sum of exp, target logit), a one-hot mask instead of gather."""
    n, width = logits_shard.shape
    m = logits_shard.max(dim=1).values.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    e = torch.exp(logits_shard - m.unsqueeze(1))
    total = e.sum(1)
    dist.all_reduce(total)
    cols = torch.arange(vocab_start, vocab_start + width)
    hit = (cols[None, :] == target[:, None]).to(logits_shard.dtype)  # (N, V_r), all 0 off-shard
    picked = (logits_shard * hit).sum(1)
    dist.all_reduce(picked)
    return torch.log(total) + m - picked


def vce_rows(logits_shard, target, vocab_start):
    """A Python loop over the rows, numpy for the local arithmetic."""
    n, width = logits_shard.shape
    x = logits_shard.detach().numpy()
    maxima = torch.from_numpy(x.max(axis=1).copy())
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    sums = torch.zeros(2, n, dtype=logits_shard.dtype)
    for i in range(n):
        sums[0, i] = float(np.exp(x[i] - maxima[i].item()).sum())
        j = int(target[i]) - vocab_start
        if 0 <= j < width:
            sums[1, i] = float(x[i, j] - maxima[i].item())
    dist.all_reduce(sums)
    return torch.log(sums[0]) - sums[1]


def vce_upcast(logits_shard, target, vocab_start):
    """Works in float64 whatever comes in, one all-reduce for both sums; casts back."""
    x = logits_shard.double()
    m = x.amax(1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    local = target - vocab_start
    ok = (local >= 0) & (local < x.shape[1])
    picked = torch.zeros_like(m)
    picked[ok] = x[ok, local[ok]] - m[ok]
    both = torch.stack([(x - m[:, None]).exp().sum(1), picked])
    dist.all_reduce(both, op=dist.ReduceOp.SUM)
    return (both[0].log() - both[1]).to(logits_shard.dtype)


@pytest.mark.parametrize("seed", SEEDS)
def test_reference_passes(seed):
    assert cu.check(
        "vocab_parallel_cross_entropy", ch15.ref_vocab_parallel_cross_entropy, seed=seed
    ).passed
    assert cu.check("parallel_mlp", ch15.RefParallelMLP, seed=seed).passed


@pytest.mark.references_forbidden
@pytest.mark.parametrize("fn", [vce_one_hot, vce_rows, vce_upcast])
def test_other_correct_styles_pass(fn):
    assert cu.check("vocab_parallel_cross_entropy", fn, seed=3).passed


@pytest.mark.references_forbidden
def test_handing_in_the_reference_fails():
    msg = failure("vocab_parallel_cross_entropy", ch15.ref_vocab_parallel_cross_entropy)
    assert "reference" in msg


# =====================================================================================
# vocab_parallel_cross_entropy: planted mistakes
# =====================================================================================
def _picked(shifted, target, vocab_start):
    local = target - vocab_start
    here = (local >= 0) & (local < shifted.shape[1])
    return torch.where(here, shifted.gather(1, torch.where(here, local, 0)[:, None])[:, 0], 0.0)


def local_max_only(logits_shard, target, vocab_start):
    m = logits_shard.amax(1)  # never all-reduced
    shifted = logits_shard - m[:, None]
    sums = torch.stack([shifted.exp().sum(1), _picked(shifted, target, vocab_start)])
    dist.all_reduce(sums)
    return sums[0].log() - sums[1]


def local_max_added_back(logits_shard, target, vocab_start):
    m = logits_shard.amax(1)
    s = (logits_shard - m[:, None]).exp().sum(1)
    picked = _picked(logits_shard, target, vocab_start)
    both = torch.stack([s, picked])
    dist.all_reduce(both)
    return both[0].log() + m - both[1]


def no_shift(logits_shard, target, vocab_start):
    s = logits_shard.exp().sum(1)
    picked = _picked(logits_shard, target, vocab_start)
    both = torch.stack([s, picked])
    dist.all_reduce(both)
    return both[0].log() - both[1]


def global_index(logits_shard, target, vocab_start):
    m = logits_shard.amax(1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    shifted = logits_shard - m[:, None]
    here = (target >= vocab_start) & (target < vocab_start + shifted.shape[1])
    picked = torch.where(here, shifted.gather(1, torch.where(here, target, 0)[:, None])[:, 0], 0.0)
    both = torch.stack([shifted.exp().sum(1), picked])
    dist.all_reduce(both)
    return both[0].log() - both[1]


def unmasked_clamped(logits_shard, target, vocab_start):
    m = logits_shard.amax(1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    shifted = logits_shard - m[:, None]
    idx = (target - vocab_start).clamp(0, shifted.shape[1] - 1)
    both = torch.stack([shifted.exp().sum(1), shifted.gather(1, idx[:, None])[:, 0]])
    dist.all_reduce(both)
    return both[0].log() - both[1]


def unmasked_raw(logits_shard, target, vocab_start):
    m = logits_shard.amax(1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    shifted = logits_shard - m[:, None]
    both = torch.stack(
        [shifted.exp().sum(1), shifted.gather(1, (target - vocab_start)[:, None])[:, 0]]
    )
    dist.all_reduce(both)
    return both[0].log() - both[1]


def averaged(logits_shard, target, vocab_start):
    m = logits_shard.amax(1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    shifted = logits_shard - m[:, None]
    both = torch.stack([shifted.exp().sum(1), _picked(shifted, target, vocab_start)])
    dist.all_reduce(both)
    both = both / dist.get_world_size()
    return both[0].log() - both[1]


def target_not_reduced(logits_shard, target, vocab_start):
    m = logits_shard.amax(1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    shifted = logits_shard - m[:, None]
    s = shifted.exp().sum(1)
    dist.all_reduce(s)
    return s.log() - _picked(shifted, target, vocab_start)


def gathers(logits_shard, target, vocab_start):
    parts = [torch.empty(0)] * dist.get_world_size()
    dist.all_gather_object(parts, logits_shard)  # shard widths differ: objects, not tensors
    full = torch.cat(parts, 1)
    m = full.amax(1, keepdim=True)
    return (full - m).exp().sum(1).log() - (full.gather(1, target[:, None])[:, 0] - m[:, 0])


def uses_log_softmax(logits_shard, target, vocab_start):
    m = logits_shard.amax(1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    return -torch.log_softmax(logits_shard - m[:, None], 1)[:, 0]


def in_place(logits_shard, target, vocab_start):
    m = logits_shard.amax(1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    logits_shard -= m[:, None]
    both = torch.stack([logits_shard.exp().sum(1), _picked(logits_shard, target, vocab_start)])
    dist.all_reduce(both)
    return both[0].log() - both[1]


def raises_on_rank_1(logits_shard, target, vocab_start):
    if dist.get_rank() == 1:
        raise RuntimeError("rank one gave up")
    return vce_one_hot(logits_shard, target, vocab_start)


def _mean_over_rows(logits_shard, target, vocab_start):
    m = logits_shard.amax(1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    shifted = logits_shard - m[:, None]
    both = torch.stack([shifted.exp().sum(1), _picked(shifted, target, vocab_start)])
    dist.all_reduce(both)
    return (both[0].log() - both[1]).mean()


VCE_MISTAKES = [
    (local_max_only, "its own shard's maximum"),
    (local_max_added_back, "its own shard's maximum"),
    (no_shift, "NaN or inf"),
    (global_index, "vocab_start"),
    (unmasked_clamped, "not masked"),
    (unmasked_raw, "mask the targets"),
    (averaged, "averaged"),
    (target_not_reduced, "target logit was not all-reduced"),
    (_mean_over_rows, "mean over the rows"),
    (gathers, "all_gather_object"),
    (uses_log_softmax, "log_softmax"),
    (in_place, "in place"),
    (raises_on_rank_1, "rank 1"),
]


@pytest.mark.references_forbidden
@pytest.mark.parametrize("fn, phrase", VCE_MISTAKES, ids=[f.__name__ for f, _ in VCE_MISTAKES])
def test_vocab_mistakes_are_named(fn, phrase):
    msg = failure("vocab_parallel_cross_entropy", fn)
    assert phrase in msg, msg
    assert "\n" not in msg.strip(), msg
    if fn is raises_on_rank_1:
        assert "rank one gave up" in msg


@pytest.mark.references_forbidden
def test_not_implemented_is_pending():
    def stub(logits_shard, target, vocab_start):
        raise NotImplementedError("vocab_parallel_cross_entropy: write it")

    assert cu.check("vocab_parallel_cross_entropy", stub, strict=False).status == "pending"


# =====================================================================================
# parallel_mlp: correct styles and planted mistakes
# =====================================================================================
class _Copy(torch.autograd.Function):
    """f: identity forward, all-reduce backward (async handle waited on)."""

    @staticmethod
    def forward(ctx, x, group=None):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group, async_op=True).wait()
        return g, None


class _Reduce(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group=None):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ReduceBoth(_Reduce):
    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _Column(nn.Module):
    def __init__(self, w, b, group):
        super().__init__()
        r, p = dist.get_rank(group), dist.get_world_size(group)
        if w.shape[0] % p:
            raise ValueError(f"F={w.shape[0]} is not divisible by world size {p}")
        self.group = group
        self.weight = nn.Parameter(w.chunk(p)[r].clone())
        self.bias = nn.Parameter(b.chunk(p)[r].clone())

    def forward(self, x):
        return F.linear(_Copy.apply(x, self.group), self.weight, self.bias)


class _Row(nn.Module):
    def __init__(self, w, b, group):
        super().__init__()
        self.group = group
        r, p = dist.get_rank(group), dist.get_world_size(group)
        self.weight = nn.Parameter(w.chunk(p, dim=1)[r].clone())
        self.bias = nn.Parameter(b.clone())

    def forward(self, h):
        return _Reduce.apply(F.linear(h, self.weight), self.group) + self.bias


class MLPModules(nn.Module):
    """Column and row layers as submodules, F.linear, chunk()."""

    def __init__(self, weight1, bias1, weight2, bias2, group=None):
        super().__init__()
        self.fc1 = _Column(weight1, bias1, group)
        self.fc2 = _Row(weight2, bias2, group)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _mlp_class(
    copy=_Copy, reduce=_Reduce, bias_before=False, shard=None, check_divides=True, grouped=True
):
    class MLP(nn.Module):
        def __init__(self, weight1, bias1, weight2, bias2, group=None):
            super().__init__()
            self.group = group if grouped else None
            r, p = dist.get_rank(self.group), dist.get_world_size(self.group)
            if check_divides and weight1.shape[0] % p:
                raise ValueError(f"world size {p} does not divide F={weight1.shape[0]}")
            k = weight1.shape[0] // p
            r = r if shard is None else shard
            self.w1 = nn.Parameter(weight1[r * k : (r + 1) * k].clone())
            self.b1 = nn.Parameter(bias1[r * k : (r + 1) * k].clone())
            self.w2 = nn.Parameter(weight2[:, r * k : (r + 1) * k].clone())
            self.b2 = nn.Parameter(bias2.clone())

        def forward(self, x):
            h = F.gelu(copy.apply(x, self.group) @ self.w1.T + self.b1)
            if bias_before:
                return reduce.apply(h @ self.w2.T + self.b2, self.group)
            return reduce.apply(h @ self.w2.T, self.group) + self.b2

    return MLP


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group=None):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g, None


class MLPGather(nn.Module):
    """Gathers the hidden layer and runs fc2 serially: forbidden in this exercise."""

    def __init__(self, weight1, bias1, weight2, bias2, group=None):
        super().__init__()
        self.inner = _mlp_class()(weight1, bias1, weight2, bias2, group)
        self.full_w2 = weight2

    def forward(self, x):
        h = F.gelu(_Copy.apply(x) @ self.inner.w1.T + self.inner.b1)
        parts = [torch.empty_like(h) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, h.detach())
        return torch.cat(parts, -1) @ self.full_w2.T + self.inner.b2


@pytest.mark.references_forbidden
@pytest.mark.parametrize("cls", [MLPModules, _mlp_class()], ids=["modules", "flat"])
def test_mlp_correct_styles_pass(cls):
    assert cu.check("parallel_mlp", cls, seed=4).passed


MLP_MISTAKES = [
    (_mlp_class(copy=_Identity), "partial sum"),
    (_mlp_class(reduce=_Identity), "partial product"),
    (_mlp_class(bias_before=True), "bias2 was added on every rank"),
    (_mlp_class(reduce=_ReduceBoth), "times too large"),
    (_mlp_class(shard=0), "should hold rows"),
    (_mlp_class(check_divides=False), "built without complaint"),
    (MLPGather, "all_gather"),
    (_mlp_class(grouped=False), "instead of the tensor-parallel group"),
]


@pytest.mark.references_forbidden
@pytest.mark.parametrize(
    "cls, phrase",
    MLP_MISTAKES,
    ids=[
        "no_f",
        "no_g",
        "bias_before_reduce",
        "g_reduces_backward",
        "wrong_shard",
        "no_error",
        "gather",
        "group_ignored",
    ],
)
def test_mlp_mistakes_are_named(cls, phrase):
    msg = failure("parallel_mlp", cls)
    assert phrase in msg, msg


# =====================================================================================
# The notebook's parallel layers against their serial twins
# =====================================================================================
def _definitions(source: str) -> str:
    """The imports, functions, classes and UPPER_CASE constants of a cell: no demo runs."""
    tree = ast.parse(source.replace("%matplotlib inline", ""))
    keep = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)
    nodes = [
        node
        for node in tree.body
        if isinstance(node, keep)
        or (
            isinstance(node, ast.Assign)
            and all(isinstance(t, ast.Name | ast.Tuple) for t in node.targets)
            and all(
                n.id.isupper() for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)
            )
        )
    ]
    return ast.unparse(ast.Module(body=nodes, type_ignores=[]))


@pytest.fixture(scope="module")
def layers() -> dict:
    """The solution notebook's definitions, executed: its layers, as the learner reads them."""
    nb = nbformat.read(ROOT / "solutions" / "15_tensor_parallel.ipynb", as_version=4)
    namespace: dict = {}
    for cell in nb.cells:
        if cell.cell_type == "code":
            exec(_definitions(cell.source), namespace)  # noqa: S102 - the course's own notebook
    return namespace


@pytest.mark.parametrize("world", [1, 2, 4])
def test_layers_equal_serial(layers, world):
    report = layers["layer_equality_report"]
    rows = report(world, seed=world)
    assert rows, "no layer was compared"
    for name, quantity, err, exact in rows:
        if exact:
            assert err == 0.0, (name, quantity, err)
        else:
            assert err < 1e-12, (name, quantity, err)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gpt_block_equals_serial(layers, tp):
    errs = layers["gpt_block_errors"](tp)
    assert max(errs.values()) < 1e-12, errs


def test_dp_by_tp_grid_equals_serial(layers):
    errs = layers["dp_tp_errors"]()
    assert max(errs.values()) < 1e-12, errs


def test_bytes_counted_match_the_derivation(layers):
    got = layers["comm_bytes_per_layer"](2)
    assert got["counted_all_reduces"] == 4
    assert got["counted_bytes"] == got["derived_bytes"]


def test_bad_sizes_give_one_line_errors(layers):
    builders = layers["bad_size_builders"]()
    assert len(builders) == 3  # heads, hidden size, vocabulary
    for build, what in zip(
        builders, ["number of heads", "output size", "vocabulary size"], strict=True
    ):
        with pytest.raises(WorldError) as err:
            run_world(build, 3)
        text = str(err.value)
        assert "ValueError" in text and what in text and "not divisible" in text, text
        assert "\n" not in text
    with pytest.raises(ValueError, match="not divisible"):
        ch15.even_shard(10, 3, "vocabulary")


def test_rng_tracker_differs_inside_and_agrees_outside(layers):
    inside, outside, untracked = layers["dropout_masks"](2)
    assert not torch.equal(inside[0], inside[1])
    assert torch.equal(outside[0], outside[1])
    assert torch.equal(untracked[0], untracked[1])  # the failure the tracker prevents


# =====================================================================================
# The torchrun script
# =====================================================================================
def test_torchrun_script_trains_like_serial():
    done = torchrun("course_utils.scripts.ch15_tensor_parallel", nproc=2, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "equals serial" in done.stdout, done.stdout
