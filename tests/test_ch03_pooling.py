"""Chapter 03 batteries: correct implementations in several styles pass, planted mistakes are named.

Correct styles: explicit Python loops (tensor slices, and pure Python floats scanning with a
strict >), numpy (sliding_window_view, np.add.at), F.unfold/F.fold, Tensor.unfold, a "first
maximum" mask built with cumsum, scatter_add_, a depthwise convolution with a constant
kernel, and an integral image (cumulative sums) for average pooling. Each passes on 20 seeds.
Each planted mistake is one a learner really makes (mean routing in max-pool backward,
overwriting where windows overlap, every tied maximum or the last one getting the gradient,
a wrong divisor in average pooling, stride=None taken as 1, ...) and is rejected with the
sentence that names it. Ties are tested with integer-valued inputs.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from check_times import report_check_seconds
from hypothesis import given, settings
from hypothesis import strategies as st

import course_utils as cu

SEEDS = range(20)
#: Seeds on which every planted mistake must be caught (the catch must not depend on luck).
MISTAKE_SEEDS = (0, 1, 7)


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def geometry(x, kernel_size, stride):
    k = pair(kernel_size)
    s = k if stride is None else pair(stride)
    h, w = x.shape[-2:]
    return k, s, (h - k[0]) // s[0] + 1, (w - k[1]) // s[1] + 1


def windows(x, kernel_size, stride):
    """(N, C, OH, OW, KH*KW) windows, row-major inside each window."""
    (kh, kw), (sh, sw), _, _ = geometry(x, kernel_size, stride)
    win = x.unfold(2, kh, sh).unfold(3, kw, sw)  # (N, C, OH, OW, KH, KW)
    return win.reshape(*win.shape[:4], kh * kw)


# =====================================================================================
# Correct implementations, one style each
# =====================================================================================


# ---- max pooling forward ----------------------------------------------------------------
def max_loops(x, kernel_size, stride=None):
    (kh, kw), (sh, sw), oh, ow = geometry(x, kernel_size, stride)
    out = x.new_empty(*x.shape[:2], oh, ow)
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = x[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw].amax((-2, -1))
    return out


def max_numpy(x, kernel_size, stride=None):
    (kh, kw), (sh, sw), _, _ = geometry(x, kernel_size, stride)
    win = np.lib.stride_tricks.sliding_window_view(x.numpy(), (kh, kw), axis=(2, 3))[
        :, :, ::sh, ::sw
    ]
    return torch.from_numpy(np.ascontiguousarray(win.max(axis=(-2, -1))))


def max_unfold(x, kernel_size, stride=None):
    (kh, kw), s, oh, ow = geometry(x, kernel_size, stride)
    n, c, h, w = x.shape
    cols = F.unfold(x.reshape(n * c, 1, h, w), (kh, kw), stride=s)  # (N*C, KH*KW, L)
    return cols.amax(1).reshape(n, c, oh, ow)


def max_tensor_unfold(x, kernel_size, stride=None):
    return windows(x, kernel_size, stride).max(-1).values


def max_python(x, kernel_size, stride=None):
    """Pure Python, scanning each window with a strict >."""
    (kh, kw), (sh, sw), oh, ow = geometry(x, kernel_size, stride)
    data = x.tolist()
    out = [
        [
            [
                [
                    max(plane[i * sh + a][j * sw + b] for a in range(kh) for b in range(kw))
                    for j in range(ow)
                ]
                for i in range(oh)
            ]
            for plane in image
        ]
        for image in data
    ]
    return torch.tensor(out, dtype=x.dtype).reshape(*x.shape[:2], oh, ow)


# ---- max pooling with indices -------------------------------------------------------------
def idx_loops(x, kernel_size, stride=None):
    """Loop over windows; argmax of the flattened window, then the window's offset."""
    (kh, kw), (sh, sw), oh, ow = geometry(x, kernel_size, stride)
    w = x.shape[-1]
    out = x.new_empty(*x.shape[:2], oh, ow)
    idx = torch.empty(*x.shape[:2], oh, ow, dtype=torch.int64)
    for i in range(oh):
        for j in range(ow):
            patch = x[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw].reshape(*x.shape[:2], -1)
            out[:, :, i, j], local = patch.max(-1)
            idx[:, :, i, j] = (i * sh + local // kw) * w + (j * sw + local % kw)
    return out, idx


def idx_python(x, kernel_size, stride=None):
    """Pure Python, strict > so the first maximum wins."""
    (kh, kw), (sh, sw), oh, ow = geometry(x, kernel_size, stride)
    w = x.shape[-1]
    outs, idxs = [], []
    for image in x.tolist():
        for plane in image:
            for i in range(oh):
                for j in range(ow):
                    best, where = None, None
                    for a in range(kh):
                        for b in range(kw):
                            v = plane[i * sh + a][j * sw + b]
                            if best is None or v > best:
                                best, where = v, (i * sh + a) * w + (j * sw + b)
                    outs.append(best)
                    idxs.append(where)
    shape = (*x.shape[:2], oh, ow)
    return torch.tensor(outs, dtype=x.dtype).reshape(shape), torch.tensor(
        idxs, dtype=torch.int64
    ).reshape(shape)


def idx_numpy(x, kernel_size, stride=None):
    (kh, kw), (sh, sw), oh, ow = geometry(x, kernel_size, stride)
    w = x.shape[-1]
    win = np.lib.stride_tricks.sliding_window_view(x.numpy(), (kh, kw), axis=(2, 3))[
        :, :, ::sh, ::sw
    ]
    flat = win.reshape(*win.shape[:4], kh * kw)
    local = flat.argmax(-1)  # numpy returns the first occurrence too
    i, j = np.arange(oh)[:, None], np.arange(ow)[None, :]
    idx = (i * sh + local // kw) * w + (j * sw + local % kw)
    return torch.from_numpy(np.ascontiguousarray(flat.max(-1))), torch.from_numpy(
        idx.astype(np.int64)
    )


def idx_unfold_gather(x, kernel_size, stride=None):
    """Flat indices of every window element via F.unfold of an index image, then gather at the argmax."""
    (kh, kw), s, oh, ow = geometry(x, kernel_size, stride)
    n, c, h, w = x.shape
    cols = F.unfold(x.reshape(n * c, 1, h, w), (kh, kw), stride=s)  # (N*C, KH*KW, L)
    where = F.unfold(
        torch.arange(h * w, dtype=torch.float64).reshape(1, 1, h, w), (kh, kw), stride=s
    ).long()
    local = cols.argmax(1, keepdim=True)  # (N*C, 1, L)
    idx = where.expand(n * c, -1, -1).gather(1, local)
    return cols.gather(1, local).reshape(n, c, oh, ow), idx.reshape(n, c, oh, ow)


# ---- max pooling backward ----------------------------------------------------------------
def max_bwd_loops(dout, x, kernel_size, stride=None):
    """Loop over windows; += at the first maximum (torch.argmax picks the first)."""
    (kh, kw), (sh, sw), oh, ow = geometry(x, kernel_size, stride)
    n, c = x.shape[:2]
    dx = torch.zeros_like(x)
    for i in range(oh):
        for j in range(ow):
            patch = x[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw].reshape(n, c, -1)
            mask = F.one_hot(patch.argmax(-1), kh * kw).to(x.dtype).reshape(n, c, kh, kw)
            dx[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw] += (
                mask * dout[:, :, i, j, None, None]
            )
    return dx


def max_bwd_python(dout, x, kernel_size, stride=None):
    """Pure Python floats, strict > scan."""
    _, flat = idx_python(x, kernel_size, stride)
    n, c, h, w = x.shape
    dx = [0.0] * (n * c * h * w)
    per_plane = flat.shape[2] * flat.shape[3]
    for k, (where, g) in enumerate(
        zip(flat.reshape(-1).tolist(), dout.reshape(-1).tolist(), strict=True)
    ):
        plane = k // per_plane
        dx[plane * h * w + where] += g
    return torch.tensor(dx, dtype=x.dtype).reshape(x.shape)


def max_bwd_scalar_loops(dout, x, kernel_size, stride=None):
    """Loops down to single tensor elements: scan each window with a strict >, then += at the winner."""
    (kh, kw), (sh, sw), oh, ow = geometry(x, kernel_size, stride)
    n, c = x.shape[:2]
    dx = torch.zeros_like(x)
    for b in range(n):
        for ch in range(c):
            for i in range(oh):
                for j in range(ow):
                    best, where = None, None
                    for a in range(kh):
                        for e in range(kw):
                            v = x[b, ch, i * sh + a, j * sw + e]
                            if best is None or v > best:
                                best, where = v, (i * sh + a, j * sw + e)
                    dx[b, ch, where[0], where[1]] += dout[b, ch, i, j]
    return dx


def max_bwd_unfold_fold(dout, x, kernel_size, stride=None):
    """One-hot of the argmax in column form, weighted by dout, folded back (fold adds overlaps)."""
    (kh, kw), s, oh, ow = geometry(x, kernel_size, stride)
    n, c, h, w = x.shape
    cols = F.unfold(x.reshape(n * c, 1, h, w), (kh, kw), stride=s)  # (N*C, KH*KW, L)
    onehot = F.one_hot(cols.argmax(1), kh * kw).transpose(1, 2).to(x.dtype)  # (N*C, KH*KW, L)
    dcols = onehot * dout.reshape(n * c, 1, -1)
    return F.fold(dcols, (h, w), (kh, kw), stride=s).reshape(n, c, h, w)


def max_bwd_cumsum_mask(dout, x, kernel_size, stride=None):
    """All maxima of a window, then keep the first with a cumulative sum; scatter_add_ into dx."""
    (kh, kw), (sh, sw), oh, ow = geometry(x, kernel_size, stride)
    n, c, h, w = x.shape
    win = windows(x, kernel_size, stride)  # (N, C, OH, OW, KK)
    is_max = win == win.amax(-1, keepdim=True)
    first = is_max & (is_max.long().cumsum(-1) == 1)
    local = first.long().argmax(-1)  # the only True
    i = torch.arange(oh).view(oh, 1)
    j = torch.arange(ow).view(1, ow)
    flat = (i * sh + local // kw) * w + (j * sw + local % kw)
    dx = torch.zeros(n, c, h * w, dtype=x.dtype)
    dx.scatter_add_(2, flat.reshape(n, c, -1), dout.reshape(n, c, -1))
    return dx.reshape(n, c, h, w)


def max_bwd_numpy(dout, x, kernel_size, stride=None):
    """np.add.at at the numpy argmax (first occurrence)."""
    _, idx = idx_numpy(x, kernel_size, stride)
    n, c, h, w = x.shape
    dx = np.zeros((n * c, h * w), dtype=x.numpy().dtype)
    rows = np.repeat(np.arange(n * c), idx[0, 0].numel())
    np.add.at(dx, (rows, idx.numpy().reshape(-1)), dout.numpy().reshape(-1))
    return torch.from_numpy(dx.reshape(n, c, h, w))


# ---- average pooling ---------------------------------------------------------------------------
def avg_loops(x, kernel_size, stride=None):
    (kh, kw), (sh, sw), oh, ow = geometry(x, kernel_size, stride)
    out = x.new_empty(*x.shape[:2], oh, ow)
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = x[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw].mean((-2, -1))
    return out


def avg_unfold(x, kernel_size, stride=None):
    (kh, kw), s, oh, ow = geometry(x, kernel_size, stride)
    n, c, h, w = x.shape
    return F.unfold(x.reshape(n * c, 1, h, w), (kh, kw), stride=s).mean(1).reshape(n, c, oh, ow)


def avg_depthwise_conv(x, kernel_size, stride=None):
    """A depthwise convolution (groups=C) with the constant kernel 1/(KH*KW)."""
    (kh, kw), s, _, _ = geometry(x, kernel_size, stride)
    c = x.shape[1]
    weight = torch.full((c, 1, kh, kw), 1.0 / (kh * kw), dtype=x.dtype)
    return F.conv2d(x, weight, stride=s, groups=c)


def avg_integral_image(x, kernel_size, stride=None):
    """Summed-area table: a window sum is four lookups."""
    (kh, kw), (sh, sw), oh, ow = geometry(x, kernel_size, stride)
    sat = F.pad(x.cumsum(-2).cumsum(-1), (1, 0, 1, 0))  # (N, C, H+1, W+1)
    r = torch.arange(oh) * sh
    q = torch.arange(ow) * sw
    top, bottom = r[:, None], (r + kh)[:, None]
    left, right = q[None, :], (q + kw)[None, :]
    total = (
        sat[:, :, bottom, right]
        - sat[:, :, top, right]
        - sat[:, :, bottom, left]
        + sat[:, :, top, left]
    )
    return total / (kh * kw)


def avg_bwd_loops(dout, x, kernel_size, stride=None):
    (kh, kw), (sh, sw), oh, ow = geometry(x, kernel_size, stride)
    dx = torch.zeros_like(x)
    for i in range(oh):
        for j in range(ow):
            dx[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw] += dout[:, :, i, j, None, None] / (
                kh * kw
            )
    return dx


def avg_bwd_scalar_loops(dout, x, kernel_size, stride=None):
    """Loops down to single tensor elements."""
    (kh, kw), (sh, sw), oh, ow = geometry(x, kernel_size, stride)
    n, c = x.shape[:2]
    dx = torch.zeros_like(x)
    for b in range(n):
        for ch in range(c):
            for i in range(oh):
                for j in range(ow):
                    share = dout[b, ch, i, j] / (kh * kw)
                    for a in range(kh):
                        for e in range(kw):
                            dx[b, ch, i * sh + a, j * sw + e] += share
    return dx


def avg_bwd_fold(dout, x, kernel_size, stride=None):
    (kh, kw), s, oh, ow = geometry(x, kernel_size, stride)
    n, c, h, w = x.shape
    cols = (dout / (kh * kw)).reshape(n * c, 1, -1).expand(-1, kh * kw, -1)
    return F.fold(cols, (h, w), (kh, kw), stride=s).reshape(n, c, h, w)


def avg_bwd_conv_transpose(dout, x, kernel_size, stride=None):
    """The adjoint of the depthwise constant-kernel convolution: a transposed convolution."""
    (kh, kw), s, oh, ow = geometry(x, kernel_size, stride)
    n, c, h, w = x.shape
    weight = torch.full((c, 1, kh, kw), 1.0 / (kh * kw), dtype=x.dtype)
    full = F.conv_transpose2d(dout, weight, stride=s, groups=c)  # covers (OH-1)*s+KH rows
    dx = torch.zeros_like(x)
    dx[:, :, : full.shape[2], : full.shape[3]] = full
    return dx


def avg_bwd_numpy(dout, x, kernel_size, stride=None):
    (kh, kw), (sh, sw), oh, ow = geometry(x, kernel_size, stride)
    dx = np.zeros(tuple(x.shape), dtype=x.numpy().dtype)
    d = dout.numpy() / (kh * kw)
    for a in range(kh):
        for b in range(kw):
            dx[:, :, a : a + sh * (oh - 1) + 1 : sh, b : b + sw * (ow - 1) + 1 : sw] += d
    return torch.from_numpy(dx)


CORRECT = {
    "max_pool2d_forward": [max_loops, max_numpy, max_unfold, max_tensor_unfold, max_python],
    "max_pool2d_with_indices": [idx_loops, idx_python, idx_numpy, idx_unfold_gather],
    "max_pool2d_backward": [
        max_bwd_loops,
        max_bwd_scalar_loops,
        max_bwd_python,
        max_bwd_unfold_fold,
        max_bwd_cumsum_mask,
        max_bwd_numpy,
    ],
    "avg_pool2d_forward": [avg_loops, avg_unfold, avg_depthwise_conv, avg_integral_image],
    "avg_pool2d_backward": [
        avg_bwd_loops,
        avg_bwd_scalar_loops,
        avg_bwd_fold,
        avg_bwd_conv_transpose,
        avg_bwd_numpy,
    ],
}
CORRECT_CASES = [(ex, fn) for ex, fns in CORRECT.items() for fn in fns]
SLOWEST = {
    "max_pool2d_forward": max_python,
    "max_pool2d_with_indices": idx_unfold_gather,
    "max_pool2d_backward": max_bwd_scalar_loops,
    "avg_pool2d_forward": avg_loops,
    "avg_pool2d_backward": avg_bwd_scalar_loops,
}


@pytest.mark.parametrize(
    ("exercise_id", "fn"), CORRECT_CASES, ids=[f"{e}-{f.__name__}" for e, f in CORRECT_CASES]
)
def test_correct_implementation_passes_on_every_seed(exercise_id, fn):
    for seed in SEEDS:
        report = cu.check(exercise_id, fn, seed=seed, strict=True)
        assert report.passed, (seed, report)
        assert report.rows, "a passing report lists what it judged"


# =====================================================================================
# Planted mistakes
# =====================================================================================


# ---- forward -----------------------------------------------------------------------------------
def max_init_zero(x, kernel_size, stride=None):
    """The running maximum starts at 0."""
    return max_tensor_unfold(x, kernel_size, stride).clamp_min(0)


def max_is_mean(x, kernel_size, stride=None):
    return windows(x, kernel_size, stride).mean(-1)


def max_stride_none_is_one(x, kernel_size, stride=None):
    return max_tensor_unfold(x, kernel_size, 1 if stride is None else stride)


def max_ignores_stride(x, kernel_size, stride=None):
    return max_tensor_unfold(x, kernel_size, None)


def max_ceil_mode(x, kernel_size, stride=None):
    k = pair(kernel_size)
    return F.max_pool2d(x, k, None if stride is None else pair(stride), ceil_mode=True)


def max_kernel_int_only(x, kernel_size, stride=None):
    stride = kernel_size if stride is None else stride
    return x.unfold(2, kernel_size, stride).unfold(3, kernel_size, stride).amax((-2, -1))


def max_stride_pair_only(x, kernel_size, stride=None):
    kh, kw = pair(kernel_size)
    sh, sw = (kh, kw) if stride is None else stride
    return x.unfold(2, kh, sh).unfold(3, kw, sw).amax((-2, -1))


def max_no_plus_one(x, kernel_size, stride=None):
    out = max_tensor_unfold(x, kernel_size, stride)
    return out[:, :, :-1, :-1]


def avg_is_sum(x, kernel_size, stride=None):
    return windows(x, kernel_size, stride).sum(-1)


def avg_divides_by_kh_squared(x, kernel_size, stride=None):
    kh, _ = pair(kernel_size)
    return windows(x, kernel_size, stride).sum(-1) / (kh * kh)


def avg_stride_none_is_one(x, kernel_size, stride=None):
    return avg_unfold(x, kernel_size, 1 if stride is None else stride)


def avg_is_max(x, kernel_size, stride=None):
    return max_tensor_unfold(x, kernel_size, stride)


FORWARD_MISTAKES = [
    ("max_pool2d_forward", max_init_zero, "the maximum was started at 0"),
    ("max_pool2d_forward", max_is_mean, "the windows were averaged"),
    ("max_pool2d_forward", max_stride_none_is_one, "stride=None was treated as stride 1"),
    ("max_pool2d_forward", max_ignores_stride, "the stride was ignored"),
    ("max_pool2d_forward", max_ceil_mode, r"rounded up \(ceil_mode=True\)"),
    ("max_pool2d_forward", max_kernel_int_only, r"may each be an int or an \(h, w\) pair"),
    ("max_pool2d_forward", max_stride_pair_only, r"may each be an int or an \(h, w\) pair"),
    ("max_pool2d_forward", max_no_plus_one, r"missing its \+1"),
    ("avg_pool2d_forward", avg_is_sum, "the windows were summed, not averaged"),
    ("avg_pool2d_forward", avg_divides_by_kh_squared, r"divided by KH\*KH"),
    ("avg_pool2d_forward", avg_stride_none_is_one, "stride=None was treated as stride 1"),
    ("avg_pool2d_forward", avg_is_max, "the maximum was taken"),
]


# ---- indices -----------------------------------------------------------------------------------------
def idx_last_max(x, kernel_size, stride=None):
    """Scans with >= so a later tie replaces the earlier one."""
    out, _ = idx_loops(x, kernel_size, stride)
    (kh, kw), (sh, sw), oh, ow = geometry(x, kernel_size, stride)
    win = windows(x, kernel_size, stride)
    local = kh * kw - 1 - win.flip(-1).argmax(-1)
    i, j = torch.arange(oh).view(oh, 1), torch.arange(ow).view(1, ow)
    return out, (i * sh + local // kw) * x.shape[-1] + (j * sw + local % kw)


def idx_local(x, kernel_size, stride=None):
    win = windows(x, kernel_size, stride)
    return win.amax(-1), win.argmax(-1)


def idx_over_channels(x, kernel_size, stride=None):
    out, idx = idx_loops(x, kernel_size, stride)
    h, w = x.shape[-2:]
    return out, idx + torch.arange(x.shape[1]).view(1, -1, 1, 1) * h * w


def idx_int32(x, kernel_size, stride=None):
    out, idx = idx_loops(x, kernel_size, stride)
    return out, idx.int()


def idx_row_col_pairs(x, kernel_size, stride=None):
    out, idx = idx_loops(x, kernel_size, stride)
    w = x.shape[-1]
    return out, torch.stack([idx // w, idx % w], -1)


INDEX_MISTAKES = [
    ("max_pool2d_with_indices", idx_last_max, "the indices point at the LAST maximum"),
    ("max_pool2d_with_indices", idx_local, "the indices are positions inside the window"),
    ("max_pool2d_with_indices", idx_over_channels, r"count over the whole \(C, H, W\) block"),
    ("max_pool2d_with_indices", idx_int32, "`indices` should have dtype int64"),
    ("max_pool2d_with_indices", idx_row_col_pairs, r"the indices are \(row, col\) pairs"),
]


# ---- max pooling backward -------------------------------------------------------------------------
def _route(dout, x, kernel_size, stride, weights, assign=None):
    """dx from per-window weights (N, C, KK) -> (N, C, KK); assign 'all' or 'where' overwrites."""
    (kh, kw), (sh, sw), oh, ow = geometry(x, kernel_size, stride)
    n, c = x.shape[:2]
    dx = torch.zeros_like(x)
    for i in range(oh):
        for j in range(ow):
            sl = (slice(None), slice(None), slice(i * sh, i * sh + kh), slice(j * sw, j * sw + kw))
            wts = weights(x[sl].reshape(n, c, -1))
            contrib = (wts * dout[:, :, i, j, None]).reshape(n, c, kh, kw)
            if assign == "all":
                dx[sl] = contrib
            elif assign == "where":
                dx[sl] = torch.where(wts.reshape(n, c, kh, kw) != 0, contrib, dx[sl])
            else:
                dx[sl] += contrib
    return dx


def _first(p):
    return F.one_hot(p.argmax(-1), p.shape[-1]).to(p.dtype)


def max_bwd_mean_routing(dout, x, kernel_size, stride=None):
    return _route(dout, x, kernel_size, stride, lambda p: torch.full_like(p, 1.0 / p.shape[-1]))


def max_bwd_all_ties(dout, x, kernel_size, stride=None):
    return _route(
        dout, x, kernel_size, stride, lambda p: (p == p.amax(-1, keepdim=True)).to(p.dtype)
    )


def max_bwd_split_ties(dout, x, kernel_size, stride=None):
    def split(p):
        m = (p == p.amax(-1, keepdim=True)).to(p.dtype)
        return m / m.sum(-1, keepdim=True)

    return _route(dout, x, kernel_size, stride, split)


def max_bwd_last_max(dout, x, kernel_size, stride=None):
    return _route(
        dout,
        x,
        kernel_size,
        stride,
        lambda p: F.one_hot(p.shape[-1] - 1 - p.flip(-1).argmax(-1), p.shape[-1]).to(p.dtype),
    )


def max_bwd_overwrite(dout, x, kernel_size, stride=None):
    """dx[argmax] = dout instead of +=."""
    return _route(dout, x, kernel_size, stride, _first, assign="where")


def max_bwd_overwrite_window(dout, x, kernel_size, stride=None):
    """dx[window] = mask * dout: the zeros of the mask wipe out earlier windows' gradients."""
    return _route(dout, x, kernel_size, stride, _first, assign="all")


def max_bwd_stride_ignored(dout, x, kernel_size, stride=None):
    """Windows placed at i*KH, j*KW (the default stride) whatever the stride."""
    (kh, kw), (sh, sw), oh, ow = geometry(x, kernel_size, stride)
    n, c = x.shape[:2]
    dx = torch.zeros_like(x)
    for i in range(oh):
        for j in range(ow):
            sl = (slice(None), slice(None), slice(i * kh, i * kh + kh), slice(j * kw, j * kw + kw))
            patch = x[sl].reshape(n, c, -1)
            dx[sl] += (_first(patch) * dout[:, :, i, j, None]).reshape(dx[sl].shape)
    return dx


def max_bwd_copy_to_window(dout, x, kernel_size, stride=None):
    return _route(dout, x, kernel_size, stride, torch.ones_like)


def max_bwd_local_index(dout, x, kernel_size, stride=None):
    """Scatters at the window-local argmax as if it were a plane index."""
    win = windows(x, kernel_size, stride)
    n, c, h, w = x.shape
    dx = torch.zeros(n, c, h * w, dtype=x.dtype)
    dx.scatter_add_(2, win.argmax(-1).reshape(n, c, -1), dout.reshape(n, c, -1))
    return dx.reshape(x.shape)


def max_bwd_tiled_mask(dout, x, kernel_size, stride=None):
    """The "upsample and compare" trick, mask = (x == upsampled max) * upsampled dout: it assumes the
    windows tile the image, so dx comes out on the OH*KH x OW*KW grid instead of x's shape."""
    kh, kw = pair(kernel_size)
    oh, ow = dout.shape[-2:]
    grow = (0, max(0, ow * kw - x.shape[3]), 0, max(0, oh * kh - x.shape[2]))
    xt = F.pad(x, grow)[:, :, : oh * kh, : ow * kw]
    m = F.max_pool2d(xt, (kh, kw)).repeat_interleave(kh, 2).repeat_interleave(kw, 3)
    return (xt == m) * dout.repeat_interleave(kh, 2).repeat_interleave(kw, 3)


def max_bwd_autograd(dout, x, kernel_size, stride=None):
    xr = x.clone().requires_grad_()
    F.max_pool2d(xr, pair(kernel_size), None if stride is None else pair(stride)).backward(dout)
    return xr.grad


MAX_BACKWARD_MISTAKES = [
    ("max_pool2d_backward", max_bwd_mean_routing, r"spread evenly over each window \(mean routing"),
    (
        "max_pool2d_backward",
        max_bwd_all_ties,
        "every tied maximum of a window received the full gradient",
    ),
    ("max_pool2d_backward", max_bwd_split_ties, "split evenly among the tied maxima"),
    ("max_pool2d_backward", max_bwd_last_max, "the gradient went to the LAST maximum"),
    (
        "max_pool2d_backward",
        max_bwd_overwrite,
        "a window overwrote the gradient an earlier window had routed",
    ),
    ("max_pool2d_backward", max_bwd_overwrite_window, "the whole window was overwritten"),
    ("max_pool2d_backward", max_bwd_stride_ignored, "the stride was ignored in the backward pass"),
    (
        "max_pool2d_backward",
        max_bwd_copy_to_window,
        "dout was copied to every element of its window",
    ),
    (
        "max_pool2d_backward",
        max_bwd_local_index,
        "index of the maximum inside its window was used as an index",
    ),
    ("max_pool2d_backward", max_bwd_tiled_mask, "dx was built on the KH\\*OH x KW\\*OW grid"),
    ("max_pool2d_backward", max_bwd_autograd, "called autograd .* derive the gradient by hand"),
]


# ---- average pooling backward -------------------------------------------------------------------------
def avg_bwd_no_divide(dout, x, kernel_size, stride=None):
    return _route(dout, x, kernel_size, stride, torch.ones_like)


def avg_bwd_overwrite(dout, x, kernel_size, stride=None):
    return _route(
        dout, x, kernel_size, stride, lambda p: torch.full_like(p, 1.0 / p.shape[-1]), assign="all"
    )


def avg_bwd_average_overlaps(dout, x, kernel_size, stride=None):
    total = avg_bwd_loops(dout, x, kernel_size, stride)
    count = _route(torch.ones_like(dout), x, kernel_size, stride, torch.ones_like)
    return total / count.clamp_min(1)


def avg_bwd_max_rule(dout, x, kernel_size, stride=None):
    return max_bwd_unfold_fold(dout, x, kernel_size, stride)


def avg_bwd_stride_ignored(dout, x, kernel_size, stride=None):
    (kh, kw), _, oh, ow = geometry(x, kernel_size, stride)
    dx = torch.zeros_like(x)
    for i in range(oh):
        for j in range(ow):
            dx[:, :, i * kh : i * kh + kh, j * kw : j * kw + kw] += dout[:, :, i, j, None, None] / (
                kh * kw
            )
    return dx


def avg_bwd_kh_squared(dout, x, kernel_size, stride=None):
    kh, kw = pair(kernel_size)
    return avg_bwd_loops(dout, x, kernel_size, stride) * (kh * kw) / (kh * kh)


def avg_bwd_kh_only(dout, x, kernel_size, stride=None):
    kh, kw = pair(kernel_size)
    return avg_bwd_loops(dout, x, kernel_size, stride) * (kh * kw) / kh


def avg_bwd_dout_shape(dout, x, kernel_size, stride=None):
    kh, kw = pair(kernel_size)
    return dout / (kh * kw)


AVG_BACKWARD_MISTAKES = [
    ("avg_pool2d_backward", avg_bwd_no_divide, "dout was not divided by the window size"),
    ("avg_pool2d_backward", avg_bwd_overwrite, "each window overwrote the gradient already there"),
    (
        "avg_pool2d_backward",
        avg_bwd_average_overlaps,
        "the gradients reaching a pixel from overlapping windows were averaged",
    ),
    ("avg_pool2d_backward", avg_bwd_max_rule, "the max-pool rule was used"),
    ("avg_pool2d_backward", avg_bwd_stride_ignored, "the stride was ignored in the backward pass"),
    ("avg_pool2d_backward", avg_bwd_kh_squared, r"dout was divided by KH\*KH"),
    ("avg_pool2d_backward", avg_bwd_kh_only, "dout was divided by KH = 2 only"),
    ("avg_pool2d_backward", avg_bwd_dout_shape, "dx has dout's shape"),
]

MISTAKES = FORWARD_MISTAKES + INDEX_MISTAKES + MAX_BACKWARD_MISTAKES + AVG_BACKWARD_MISTAKES


@pytest.mark.parametrize(
    ("exercise_id", "fn", "pattern"), MISTAKES, ids=[f"{e}-{f.__name__}" for e, f, _ in MISTAKES]
)
@pytest.mark.forbidden_calls_allowed
def test_planted_mistake_is_named(exercise_id, fn, pattern):
    for seed in MISTAKE_SEEDS:
        with pytest.raises(cu.CheckFailure, match=pattern) as info:
            cu.check(exercise_id, fn, seed=seed, strict=True)
        message = str(info.value)
        assert message.startswith(f"{exercise_id}: in case "), message
        assert "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize(
    ("exercise_id", "fn", "pattern"), MISTAKES, ids=[f"{e}-{f.__name__}" for e, f, _ in MISTAKES]
)
def test_planted_mistake_really_is_wrong(exercise_id, fn, pattern):
    """Guard against a mistake test that cannot fail: the planted function differs from the reference."""
    del pattern
    if fn is max_bwd_autograd:  # wrong by the rules (autograd is forbidden), not by value
        assert ".backward(" in inspect.getsource(fn)
        return
    ref = cu.reference(exercise_id)
    gen = torch.Generator().manual_seed(3)
    ties = torch.randint(0, 2, (2, 2, 7, 7), generator=gen).double()
    noisy = -torch.rand(2, 2, 7, 7, generator=gen, dtype=torch.float64)
    for x, k, s in ((ties, 3, 2), (noisy, (2, 3), (1, 2)), (noisy, 2, None), (ties, 2, 1)):
        try:
            if exercise_id.endswith("backward"):
                dout = torch.randn_like(F.max_pool2d(x, pair(k), None if s is None else pair(s)))
                got, want = fn(dout, x, k, s), ref(dout, x, k, s)
            else:
                got, want = fn(x, k, s), ref(x, k, s)
        except (TypeError, ValueError, RuntimeError):
            return
        got, want = (
            (got if isinstance(got, tuple) else (got,)),
            (want if isinstance(want, tuple) else (want,)),
        )
        for g, e in zip(got, want, strict=True):
            if (
                g.shape != e.shape
                or g.dtype != e.dtype
                or not torch.equal(g, e)
                and not torch.allclose(g.double(), e.double())
            ):
                return
    pytest.fail(f"{fn.__name__} agrees with the reference")


# =====================================================================================
# Ties, stubs, timing, registration
# =====================================================================================


def test_tie_cases_really_have_ties_that_separate_first_last_and_all():
    """The tie cases must make first-max, last-max and all-max routing give different answers."""
    for seed in MISTAKE_SEEDS:
        for rule in (max_bwd_last_max, max_bwd_all_ties, max_bwd_split_ties):
            with pytest.raises(
                cu.CheckFailure, match="tied|integer-valued|constant x|x \\[\\[1,3,3\\]"
            ):
                cu.check("max_pool2d_backward", rule, seed=seed, strict=True)


def test_first_maximum_is_pytorchs_rule_on_the_demo_tie():
    x = torch.tensor(
        [[[[1.0, 3, 3], [3, 0, 3], [3, 3, 1]]]], dtype=torch.float64, requires_grad=True
    )
    F.max_pool2d(x, 2, 1).sum().backward()
    expected = torch.tensor([[[[0.0, 2, 0], [1, 0, 1], [0, 0, 0]]]], dtype=torch.float64)
    assert torch.equal(x.grad, expected)
    ref = cu.reference("max_pool2d_backward")
    assert torch.equal(ref(torch.ones(1, 1, 2, 2, dtype=torch.float64), x.detach(), 2, 1), expected)


def test_report_check_seconds(capsys):
    """Times each check on the reference and the slowest correct style; reported, never asserted."""
    report_check_seconds(SLOWEST, capsys)


def test_exercises_of_chapter_03_are_registered_with_their_contract():
    listed = {e.id: e for e in cu.exercises("03")}
    assert set(listed) == {
        "max_pool2d_forward",
        "max_pool2d_with_indices",
        "max_pool2d_backward",
        "avg_pool2d_forward",
        "avg_pool2d_backward",
    }
    # The contract's signatures (EXERCISES.md), verbatim.
    assert listed["max_pool2d_forward"].signature == "(x, kernel_size, stride=None) -> out"
    assert listed["max_pool2d_backward"].signature == "(dout, x, kernel_size, stride=None) -> dx"
    assert listed["avg_pool2d_backward"].signature == "(dout, x, kernel_size, stride=None) -> dx"
    for exercise_id in ("max_pool2d_backward", "avg_pool2d_backward"):
        assert listed[exercise_id].backward
        assert listed[exercise_id].arg_names == ("dout", "x", "kernel_size", "stride")
    for exercise_id in ("max_pool2d_forward", "max_pool2d_with_indices", "avg_pool2d_forward"):
        assert not listed[exercise_id].backward
        assert listed[exercise_id].arg_names == ("x", "kernel_size", "stride")


# =====================================================================================
# The correct styles themselves, on shapes the battery never tries
# =====================================================================================


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 2),
    c=st.integers(1, 3),
    h=st.integers(3, 9),
    w=st.integers(3, 9),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    stride=st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))),
    ties=st.booleans(),
)
def test_correct_styles_agree_with_torch_on_random_shapes(n, c, h, w, kh, kw, stride, ties):
    gen = torch.Generator().manual_seed(h * 100 + w)
    x = (
        torch.randint(0, 3, (n, c, h, w), generator=gen).double()
        if ties
        else torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    )
    k = (kh, kw)
    with torch.enable_grad():
        xr = x.clone().requires_grad_()
        out, idx = F.max_pool2d(xr, k, stride, return_indices=True)
        dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        (dmax,) = torch.autograd.grad(out, [xr], dout)
        xa = x.clone().requires_grad_()
        avg = F.avg_pool2d(xa, k, stride)
        (davg,) = torch.autograd.grad(avg, [xa], dout)
    for fn in CORRECT["max_pool2d_forward"]:
        torch.testing.assert_close(fn(x, k, stride), out.detach())
    for fn in CORRECT["max_pool2d_with_indices"]:
        got_out, got_idx = fn(x, k, stride)
        torch.testing.assert_close(got_out, out.detach())
        assert torch.equal(got_idx, idx)
    for fn in CORRECT["max_pool2d_backward"]:
        torch.testing.assert_close(fn(dout, x, k, stride), dmax)
    for fn in CORRECT["avg_pool2d_forward"]:
        torch.testing.assert_close(fn(x, k, stride), avg.detach())
    for fn in CORRECT["avg_pool2d_backward"]:
        torch.testing.assert_close(fn(dout, x, k, stride), davg)
