"""Chapter 02 batteries: correct implementations in several styles pass, planted mistakes are named.

Correct styles: explicit Python loops (over output positions, and over every scalar in
Python floats), numpy (sliding_window_view, np.add.at), unfold/fold (im2col), Tensor.unfold
with einsum, shift-and-add over kernel offsets, and the textbook "full convolution with the
flipped kernel" for dx. Each passes on 20 seeds. Each planted mistake, one a learner really
makes, is rejected with the sentence that names it, on several seeds.
"""

from __future__ import annotations

import inspect
import math
import re

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


def out_len(size, k, s, p):
    return (size + 2 * p - k) // s + 1


# =====================================================================================
# Correct implementations, one style each
# =====================================================================================


# ---- conv_output_size --------------------------------------------------------------------
def size_floor_div(size, kernel_size, stride=1, padding=0):
    return (size + 2 * padding - kernel_size) // stride + 1


def size_math_floor(size, kernel_size, stride=1, padding=0):
    return math.floor((size + 2 * padding - kernel_size) / stride) + 1


def size_count_positions(size, kernel_size, stride=1, padding=0):
    count, start = 0, 0
    while start + kernel_size <= size + 2 * padding:
        count += 1
        start += stride
    return count


def size_range_len(size, kernel_size, stride=1, padding=0):
    return len(range(0, size + 2 * padding - kernel_size + 1, stride))


# ---- im2col ------------------------------------------------------------------------------------
def im2col_loops(x, kernel_size, stride=1, padding=0):
    """A loop over windows, each flattened into one column."""
    (kh, kw), (sh, sw), (ph, pw) = pair(kernel_size), pair(stride), pair(padding)
    n, c, h, w = x.shape
    xp = F.pad(x, (pw, pw, ph, ph))
    oh, ow = out_len(h, kh, sh, ph), out_len(w, kw, sw, pw)
    cols = x.new_empty(n, c * kh * kw, oh * ow)
    for i in range(oh):
        for j in range(ow):
            cols[:, :, i * ow + j] = xp[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw].reshape(
                n, -1
            )
    return cols


def im2col_numpy(x, kernel_size, stride=1, padding=0):
    """numpy's sliding_window_view, then stride by slicing."""
    (kh, kw), (sh, sw), (ph, pw) = pair(kernel_size), pair(stride), pair(padding)
    a = np.pad(x.numpy(), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    win = np.lib.stride_tricks.sliding_window_view(a, (kh, kw), axis=(2, 3))[
        :, :, ::sh, ::sw
    ]  # (N,C,OH,OW,KH,KW)
    n, c, oh, ow = win.shape[:4]
    cols = win.transpose(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, oh * ow)
    return torch.from_numpy(cols.copy())


def im2col_tensor_unfold(x, kernel_size, stride=1, padding=0):
    """Tensor.unfold twice (a strided view), then permute."""
    (kh, kw), (sh, sw), (ph, pw) = pair(kernel_size), pair(stride), pair(padding)
    xp = F.pad(x, (pw, pw, ph, ph))
    win = xp.unfold(2, kh, sh).unfold(3, kw, sw)  # (N, C, OH, OW, KH, KW)
    n, c, oh, ow = win.shape[:4]
    return win.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, oh * ow)


def im2col_python(x, kernel_size, stride=1, padding=0):
    """Pure Python lists: every scalar on its own."""
    (kh, kw), (sh, sw), (ph, pw) = pair(kernel_size), pair(stride), pair(padding)
    n, c, h, w = x.shape
    data = x.tolist()
    oh, ow = out_len(h, kh, sh, ph), out_len(w, kw, sw, pw)

    def at(b, ch, r, q):
        r, q = r - ph, q - pw
        return data[b][ch][r][q] if 0 <= r < h and 0 <= q < w else 0.0

    out = [
        [
            [at(b, ch, i * sh + a, j * sw + e) for i in range(oh) for j in range(ow)]
            for ch in range(c)
            for a in range(kh)
            for e in range(kw)
        ]
        for b in range(n)
    ]
    return torch.tensor(out, dtype=x.dtype).reshape(n, c * kh * kw, oh * ow)


# ---- col2im --------------------------------------------------------------------------------------
def col2im_loops(cols, output_size, kernel_size, stride=1, padding=0):
    """A loop over windows adding each column into a padded canvas, then crop."""
    (h, w), (kh, kw), (sh, sw), (ph, pw) = (
        pair(output_size),
        pair(kernel_size),
        pair(stride),
        pair(padding),
    )
    n = cols.shape[0]
    c = cols.shape[1] // (kh * kw)
    oh, ow = out_len(h, kh, sh, ph), out_len(w, kw, sw, pw)
    xp = cols.new_zeros(n, c, h + 2 * ph, w + 2 * pw)
    for i in range(oh):
        for j in range(ow):
            xp[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw] += cols[:, :, i * ow + j].reshape(
                n, c, kh, kw
            )
    return xp[:, :, ph : ph + h, pw : pw + w]


def col2im_numpy(cols, output_size, kernel_size, stride=1, padding=0):
    """np.add.at with the index of every column entry (unbuffered, so repeats add up)."""
    (h, w), (kh, kw), (sh, sw), (ph, pw) = (
        pair(output_size),
        pair(kernel_size),
        pair(stride),
        pair(padding),
    )
    a = cols.numpy()
    n = a.shape[0]
    c = a.shape[1] // (kh * kw)
    oh, ow = out_len(h, kh, sh, ph), out_len(w, kw, sw, pw)
    ch, ka, kb, i, j = np.meshgrid(
        np.arange(c), np.arange(kh), np.arange(kw), np.arange(oh), np.arange(ow), indexing="ij"
    )
    rows, colsx = (i * sh + ka).reshape(-1), (j * sw + kb).reshape(-1)
    canvas = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=a.dtype)
    for b in range(n):
        np.add.at(canvas[b], (ch.reshape(-1), rows, colsx), a[b].reshape(-1))
    return torch.from_numpy(canvas[:, :, ph : ph + h, pw : pw + w].copy())


def col2im_index_add(cols, output_size, kernel_size, stride=1, padding=0):
    """index_add_ into a flattened padded canvas, then crop."""
    (h, w), (kh, kw), (sh, sw), (ph, pw) = (
        pair(output_size),
        pair(kernel_size),
        pair(stride),
        pair(padding),
    )
    n = cols.shape[0]
    c = cols.shape[1] // (kh * kw)
    oh, ow = out_len(h, kh, sh, ph), out_len(w, kw, sw, pw)
    hp, wp = h + 2 * ph, w + 2 * pw
    ka = torch.arange(kh).view(kh, 1, 1, 1)
    kb = torch.arange(kw).view(1, kw, 1, 1)
    i = torch.arange(oh).view(1, 1, oh, 1)
    j = torch.arange(ow).view(1, 1, 1, ow)
    flat = ((i * sh + ka) * wp + (j * sw + kb)).reshape(-1)  # (KH*KW*L,)
    canvas = cols.new_zeros(n, c, hp * wp)
    canvas.index_add_(2, flat, cols.reshape(n, c, -1))
    return canvas.reshape(n, c, hp, wp)[:, :, ph : ph + h, pw : pw + w]


def col2im_conv_transpose(cols, output_size, kernel_size, stride=1, padding=0):
    """A transposed convolution with a one-hot kernel: channel (c, a, b) lands on pixel offset (a, b) of channel c."""
    (h, w), (kh, kw), (sh, sw), (ph, pw) = (
        pair(output_size),
        pair(kernel_size),
        pair(stride),
        pair(padding),
    )
    n = cols.shape[0]
    c = cols.shape[1] // (kh * kw)
    oh, ow = out_len(h, kh, sh, ph), out_len(w, kw, sw, pw)
    eye = torch.eye(c * kh * kw, dtype=cols.dtype).reshape(c * kh * kw, c, kh, kw)
    full = F.conv_transpose2d(
        cols.reshape(n, -1, oh, ow), eye, stride=(sh, sw)
    )  # (N, C, (OH-1)*s+KH, ...)
    canvas = cols.new_zeros(n, c, h + 2 * ph, w + 2 * pw)
    canvas[:, :, : full.shape[2], : full.shape[3]] = full
    return canvas[:, :, ph : ph + h, pw : pw + w]


# ---- convolution forward -----------------------------------------------------------------------
def conv_loops(x, weight, bias, stride=1, padding=0):
    """Loops over images, filters and output positions; each output is one masked sum."""
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    n, _, h, w = x.shape
    f, _, kh, kw = weight.shape
    xp = F.pad(x, (pw, pw, ph, ph))
    oh, ow = out_len(h, kh, sh, ph), out_len(w, kw, sw, pw)
    out = torch.zeros(n, f, oh, ow, dtype=x.dtype)
    for b in range(n):
        for k in range(f):
            for i in range(oh):
                for j in range(ow):
                    out[b, k, i, j] = (
                        xp[b, :, i * sh : i * sh + kh, j * sw : j * sw + kw] * weight[k]
                    ).sum()
            if bias is not None:
                out[b, k] += bias[k]
    return out


def conv_python(x, weight, bias, stride=1, padding=0):
    """Every multiply-add in Python floats: the slowest correct style."""
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    n, c, h, w = x.shape
    f, _, kh, kw = weight.shape
    xs, ws = x.tolist(), weight.tolist()
    bs = [0.0] * f if bias is None else bias.tolist()
    oh, ow = out_len(h, kh, sh, ph), out_len(w, kw, sw, pw)
    out = []
    for b in range(n):
        planes = []
        for k in range(f):
            plane = []
            for i in range(oh):
                row = []
                for j in range(ow):
                    acc = bs[k]
                    for ch in range(c):
                        for a in range(kh):
                            r = i * sh + a - ph
                            if not 0 <= r < h:
                                continue
                            for e in range(kw):
                                q = j * sw + e - pw
                                if 0 <= q < w:
                                    acc += xs[b][ch][r][q] * ws[k][ch][a][e]
                    row.append(acc)
                plane.append(row)
            planes.append(plane)
        out.append(planes)
    return torch.tensor(out, dtype=x.dtype).reshape(n, f, oh, ow)


def conv_six_loops(x, weight, bias, stride=1, padding=0):
    """Six nested loops over tensor scalars, padding by bounds checks: the most literal style."""
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    n, c, h, w = x.shape
    f, _, kh, kw = weight.shape
    oh, ow = out_len(h, kh, sh, ph), out_len(w, kw, sw, pw)
    out = torch.zeros(n, f, oh, ow, dtype=x.dtype)
    for b in range(n):
        for k in range(f):
            for i in range(oh):
                for j in range(ow):
                    acc = bias[k] if bias is not None else torch.zeros((), dtype=x.dtype)
                    for ch in range(c):
                        for a in range(kh):
                            for e in range(kw):
                                r, q = i * sh + a - ph, j * sw + e - pw
                                if 0 <= r < h and 0 <= q < w:
                                    acc = acc + x[b, ch, r, q] * weight[k, ch, a, e]
                    out[b, k, i, j] = acc
    return out


def conv_numpy(x, weight, bias, stride=1, padding=0):
    """numpy sliding windows and tensordot."""
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    kh, kw = weight.shape[-2:]
    a = np.pad(x.numpy(), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    win = np.lib.stride_tricks.sliding_window_view(a, (kh, kw), axis=(2, 3))[
        :, :, ::sh, ::sw
    ]  # (N,C,OH,OW,KH,KW)
    out = np.tensordot(win, weight.numpy(), axes=([1, 4, 5], [1, 2, 3]))  # (N, OH, OW, F)
    if bias is not None:
        out = out + bias.numpy()
    return torch.from_numpy(np.ascontiguousarray(out.transpose(0, 3, 1, 2)))


def conv_unfold_matmul(x, weight, bias, stride=1, padding=0):
    """im2col with F.unfold, one matrix product, reshape."""
    n, _, h, w = x.shape
    f, _, kh, kw = weight.shape
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    cols = F.unfold(x, (kh, kw), padding=(ph, pw), stride=(sh, sw))  # (N, C*KH*KW, L)
    out = weight.reshape(f, -1) @ cols  # (N, F, L)
    if bias is not None:
        out = out + bias[:, None]
    return out.reshape(n, f, out_len(h, kh, sh, ph), out_len(w, kw, sw, pw))


def conv_tensor_unfold_einsum(x, weight, bias, stride=1, padding=0):
    """Tensor.unfold windows and one einsum."""
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    kh, kw = weight.shape[-2:]
    win = F.pad(x, (pw, pw, ph, ph)).unfold(2, kh, sh).unfold(3, kw, sw)  # (N, C, OH, OW, KH, KW)
    out = torch.einsum("ncijab,fcab->nfij", win, weight)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def conv_shift_and_add(x, weight, bias, stride=1, padding=0):
    """One strided slice of the padded input per kernel offset (a, b), weighted and summed."""
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    n, _, h, w = x.shape
    f, _, kh, kw = weight.shape
    oh, ow = out_len(h, kh, sh, ph), out_len(w, kw, sw, pw)
    xp = F.pad(x, (pw, pw, ph, ph))
    out = torch.zeros(n, f, oh, ow, dtype=x.dtype)
    for a in range(kh):
        for b in range(kw):
            shifted = xp[
                :, :, a : a + sh * (oh - 1) + 1 : sh, b : b + sw * (ow - 1) + 1 : sw
            ]  # (N, C, OH, OW)
            out += torch.einsum("ncij,fc->nfij", shifted, weight[:, :, a, b])
    return out if bias is None else out + bias.view(1, -1, 1, 1)


# ---- convolution backward -----------------------------------------------------------------------
def bwd_loops(dout, x, weight, bias, stride=1, padding=0):
    """The naive backward: loop over images, filters and positions, accumulate with +=."""
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    n, _, h, w = x.shape
    f, _, kh, kw = weight.shape
    xp = F.pad(x, (pw, pw, ph, ph))
    dxp = torch.zeros_like(xp)
    dweight = torch.zeros_like(weight)
    oh, ow = dout.shape[-2:]
    for b in range(n):
        for k in range(f):
            for i in range(oh):
                for j in range(ow):
                    window = (
                        b,
                        slice(None),
                        slice(i * sh, i * sh + kh),
                        slice(j * sw, j * sw + kw),
                    )
                    dxp[window] += dout[b, k, i, j] * weight[k]
                    dweight[k] += dout[b, k, i, j] * xp[window]
    dx = dxp[:, :, ph : ph + h, pw : pw + w]
    return dx, dweight, None if bias is None else dout.sum((0, 2, 3))


def bwd_python(dout, x, weight, bias, stride=1, padding=0):
    """Every multiply-add in Python floats: the slowest correct style."""
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    n, c, h, w = x.shape
    f, _, kh, kw = weight.shape
    oh, ow = dout.shape[-2:]
    xs, ws, ds = x.tolist(), weight.tolist(), dout.tolist()
    dx = [[[[0.0] * w for _ in range(h)] for _ in range(c)] for _ in range(n)]
    dw = [[[[0.0] * kw for _ in range(kh)] for _ in range(c)] for _ in range(f)]
    db = [0.0] * f
    for b in range(n):
        for k in range(f):
            for i in range(oh):
                for j in range(ow):
                    g = ds[b][k][i][j]
                    db[k] += g
                    for ch in range(c):
                        for a in range(kh):
                            r = i * sh + a - ph
                            if not 0 <= r < h:
                                continue
                            for e in range(kw):
                                q = j * sw + e - pw
                                if 0 <= q < w:
                                    dx[b][ch][r][q] += g * ws[k][ch][a][e]
                                    dw[k][ch][a][e] += g * xs[b][ch][r][q]
    as_t = lambda v: torch.tensor(v, dtype=x.dtype)  # noqa: E731
    return as_t(dx), as_t(dw), None if bias is None else as_t(db)


def bwd_six_loops(dout, x, weight, bias, stride=1, padding=0):
    """Six nested loops over tensor scalars, accumulating into dx and dweight element by element."""
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    n, c, h, w = x.shape
    f, _, kh, kw = weight.shape
    dx, dweight = torch.zeros_like(x), torch.zeros_like(weight)
    for b in range(n):
        for k in range(f):
            for i in range(dout.shape[2]):
                for j in range(dout.shape[3]):
                    g = dout[b, k, i, j]
                    for ch in range(c):
                        for a in range(kh):
                            for e in range(kw):
                                r, q = i * sh + a - ph, j * sw + e - pw
                                if 0 <= r < h and 0 <= q < w:
                                    dx[b, ch, r, q] += g * weight[k, ch, a, e]
                                    dweight[k, ch, a, e] += g * x[b, ch, r, q]
    return dx, dweight, None if bias is None else dout.sum((0, 2, 3))


def bwd_unfold_fold(dout, x, weight, bias, stride=1, padding=0):
    """im2col / col2im: dweight = dout @ cols^T summed over N, dx = col2im(W^T @ dout)."""
    n, _, h, w = x.shape
    f, _, kh, kw = weight.shape
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    cols = F.unfold(x, (kh, kw), padding=(ph, pw), stride=(sh, sw))  # (N, C*KH*KW, L)
    d = dout.reshape(n, f, -1)  # (N, F, L)
    dweight = (d @ cols.transpose(1, 2)).sum(0).reshape(weight.shape)
    dcols = weight.reshape(f, -1).T @ d  # (N, C*KH*KW, L)
    dx = F.fold(dcols, (h, w), (kh, kw), padding=(ph, pw), stride=(sh, sw))
    return dx, dweight, None if bias is None else dout.sum((0, 2, 3))


def _dilate(dout, s):
    """Insert s-1 zeros between the entries of dout along H and W."""
    (sh, sw) = s
    n, f, oh, ow = dout.shape
    z = dout.new_zeros(n, f, (oh - 1) * sh + 1, (ow - 1) * sw + 1)
    z[:, :, ::sh, ::sw] = dout
    return z


def bwd_full_convolution(dout, x, weight, bias, stride=1, padding=0):
    """The textbook formulas with F.conv2d only: dx is a full correlation of the dilated dout with the
    flipped, channel-transposed kernel; dweight a correlation of the padded input with the dilated dout."""
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    n, c, h, w = x.shape
    f, _, kh, kw = weight.shape
    dd = _dilate(dout, (sh, sw))  # (N, F, (OH-1)*s+1, (OW-1)*s+1)
    full = F.conv2d(
        dd, weight.flip(-1, -2).transpose(0, 1), padding=(kh - 1, kw - 1)
    )  # (N, C, covered rows, cols)
    dxp = x.new_zeros(n, c, h + 2 * ph, w + 2 * pw)  # rows the last window never reaches get 0
    dxp[:, :, : full.shape[2], : full.shape[3]] = full
    dx = dxp[:, :, ph : ph + h, pw : pw + w]
    xp = F.pad(x, (pw, pw, ph, ph))[:, :, : dd.shape[2] + kh - 1, : dd.shape[3] + kw - 1]
    # Batch becomes the contraction axis: (C, N, H', W') correlated with (F, N, OH', OW').
    dweight = F.conv2d(xp.transpose(0, 1), dd.transpose(0, 1)).transpose(0, 1)  # (F, C, KH, KW)
    return dx, dweight, None if bias is None else dout.sum((0, 2, 3))


def bwd_shift_and_add(dout, x, weight, bias, stride=1, padding=0):
    """numpy, one kernel offset (a, b) at a time: its strided slice of the input and of dx."""
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    n, c, h, w = x.shape
    f, _, kh, kw = weight.shape
    oh, ow = dout.shape[-2:]
    xp = np.pad(x.numpy(), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    d, wt = dout.numpy(), weight.numpy()
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(wt)
    for a in range(kh):
        for b in range(kw):
            rows = slice(a, a + sh * (oh - 1) + 1, sh)
            cols = slice(b, b + sw * (ow - 1) + 1, sw)
            dxp[:, :, rows, cols] += np.einsum("nfij,fc->ncij", d, wt[:, :, a, b])
            dw[:, :, a, b] = np.einsum("nfij,ncij->fc", d, xp[:, :, rows, cols])
    dx = torch.from_numpy(dxp[:, :, ph : ph + h, pw : pw + w].copy())
    return dx, torch.from_numpy(dw), None if bias is None else dout.sum((0, 2, 3))


CORRECT = {
    "conv_output_size": [size_floor_div, size_math_floor, size_count_positions, size_range_len],
    "im2col": [im2col_loops, im2col_numpy, im2col_tensor_unfold, im2col_python],
    "col2im": [col2im_loops, col2im_numpy, col2im_index_add, col2im_conv_transpose],
    "conv2d_forward_loops": [conv_loops, conv_six_loops, conv_python, conv_shift_and_add],
    "conv2d_forward": [
        conv_loops,
        conv_six_loops,
        conv_numpy,
        conv_unfold_matmul,
        conv_tensor_unfold_einsum,
        conv_shift_and_add,
        conv_python,
    ],
    "conv2d_backward": [
        bwd_loops,
        bwd_six_loops,
        bwd_python,
        bwd_unfold_fold,
        bwd_shift_and_add,
    ],
}
CORRECT_CASES = [(ex, fn) for ex, fns in CORRECT.items() for fn in fns]
#: The slowest correct style of each exercise, timed by test_report_check_seconds.
SLOWEST = {
    "conv_output_size": size_count_positions,
    "im2col": im2col_numpy,
    "col2im": col2im_loops,
    "conv2d_forward_loops": conv_six_loops,
    "conv2d_forward": conv_six_loops,
    "conv2d_backward": bwd_six_loops,
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


# ---- conv_output_size ----------------------------------------------------------------------------
def size_ceil(size, kernel_size, stride=1, padding=0):
    return math.ceil((size + 2 * padding - kernel_size) / stride) + 1


def size_no_plus_one(size, kernel_size, stride=1, padding=0):
    return (size + 2 * padding - kernel_size) // stride


def size_plus_one_inside(size, kernel_size, stride=1, padding=0):
    return (size + 2 * padding - kernel_size + 1) // stride


def size_pad_once(size, kernel_size, stride=1, padding=0):
    return (size + padding - kernel_size) // stride + 1


def size_no_pad(size, kernel_size, stride=1, padding=0):
    return (size - kernel_size) // stride + 1


def size_no_stride(size, kernel_size, stride=1, padding=0):
    return size + 2 * padding - kernel_size + 1


def size_true_division(size, kernel_size, stride=1, padding=0):
    return (size + 2 * padding - kernel_size) / stride + 1


def size_round(size, kernel_size, stride=1, padding=0):
    return round((size + 2 * padding - kernel_size) / stride) + 1


def size_wrong_default_stride(size, kernel_size, stride=None, padding=0):
    stride = kernel_size if stride is None else stride  # pooling's default, not convolution's
    return (size + 2 * padding - kernel_size) // stride + 1


def size_tensor(size, kernel_size, stride=1, padding=0):
    return torch.tensor((size + 2 * padding - kernel_size) // stride + 1)


SIZE_MISTAKES = [
    ("conv_output_size", size_ceil, "rounded up"),
    ("conv_output_size", size_no_plus_one, "missing its \\+1"),
    ("conv_output_size", size_plus_one_inside, "the \\+1 went inside the division"),
    ("conv_output_size", size_pad_once, "the padding was counted once"),
    ("conv_output_size", size_no_pad, "the padding was ignored"),
    ("conv_output_size", size_no_stride, "the stride was ignored"),
    ("conv_output_size", size_true_division, "returned the float .* Use floor division"),
    ("conv_output_size", size_round, "rounded to the nearest integer"),
    ("conv_output_size", size_wrong_default_stride, "the defaults are stride=1, padding=0"),
    ("conv_output_size", size_tensor, "should return a Python int, but it returned Tensor"),
]


# ---- im2col ------------------------------------------------------------------------------------------
def im2col_kernel_major(x, kernel_size, stride=1, padding=0):
    """Columns laid out (KH, KW, C) instead of (C, KH, KW)."""
    (kh, kw), (sh, sw), (ph, pw) = pair(kernel_size), pair(stride), pair(padding)
    win = F.pad(x, (pw, pw, ph, ph)).unfold(2, kh, sh).unfold(3, kw, sw)  # (N, C, OH, OW, KH, KW)
    n, c, oh, ow = win.shape[:4]
    return win.permute(0, 4, 5, 1, 2, 3).reshape(n, c * kh * kw, oh * ow)


def im2col_column_major_windows(x, kernel_size, stride=1, padding=0):
    """Windows enumerated column by column (j outer... i inner)."""
    (kh, kw), (sh, sw), (ph, pw) = pair(kernel_size), pair(stride), pair(padding)
    win = F.pad(x, (pw, pw, ph, ph)).unfold(2, kh, sh).unfold(3, kw, sw)
    n, c, oh, ow = win.shape[:4]
    return win.permute(0, 1, 4, 5, 3, 2).reshape(n, c * kh * kw, oh * ow)


def im2col_transposed(x, kernel_size, stride=1, padding=0):
    return im2col_tensor_unfold(x, kernel_size, stride, padding).transpose(1, 2)


def im2col_no_padding(x, kernel_size, stride=1, padding=0):
    return im2col_tensor_unfold(x, kernel_size, stride, 0)


def im2col_no_stride(x, kernel_size, stride=1, padding=0):
    return im2col_tensor_unfold(x, kernel_size, 1, padding)


def im2col_pad_one_side(x, kernel_size, stride=1, padding=0):
    (ph, pw) = pair(padding)
    return im2col_tensor_unfold(F.pad(x, (2 * pw, 0, 2 * ph, 0)), kernel_size, stride, 0)


def im2col_int_only(x, kernel_size, stride=1, padding=0):
    """Assumes square kernels given as an int: `kernel_size * kernel_size` fails on a pair."""
    k = kernel_size
    n, c = x.shape[:2]
    win = F.pad(x, (padding, padding, padding, padding)).unfold(2, k, stride).unfold(3, k, stride)
    return win.permute(0, 1, 4, 5, 2, 3).reshape(n, c * k * k, -1)


def im2col_flipped_patch(x, kernel_size, stride=1, padding=0):
    (kh, kw), (sh, sw), (ph, pw) = pair(kernel_size), pair(stride), pair(padding)
    win = F.pad(x, (pw, pw, ph, ph)).unfold(2, kh, sh).unfold(3, kw, sw).flip(-1, -2)
    n, c, oh, ow = win.shape[:4]
    return win.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, oh * ow)


def _pad_by_negative_slice(x, ph, pw):
    """Zero padding written into x_padded[:, :, p:-p, p:-p], as learners write it: that slice is
    empty when p = 0, so the assignment fails there."""
    n, c, h, w = x.shape
    xp = x.new_zeros(n, c, h + 2 * ph, w + 2 * pw)
    xp[:, :, ph:-ph, pw:-pw] = x
    return xp


def im2col_negative_slice(x, kernel_size, stride=1, padding=0):
    ph, pw = pair(padding)
    return im2col_loops(_pad_by_negative_slice(x, ph, pw), kernel_size, stride, 0)


IM2COL_MISTAKES = [
    ("im2col", im2col_negative_slice, r"It looks like a slice \[pad:-pad\] is empty when pad = 0"),
    ("im2col", im2col_kernel_major, r"laid out as \(KH, KW, C\)"),
    ("im2col", im2col_column_major_windows, "enumerated column by column"),
    ("im2col", im2col_transposed, "the columns came back transposed"),
    ("im2col", im2col_no_padding, "the padding was ignored"),
    ("im2col", im2col_no_stride, "the stride was ignored"),
    ("im2col", im2col_pad_one_side, "all 2p zeros of the padding went on one side"),
    ("im2col", im2col_int_only, r"may each be an int or an \(h, w\) pair"),
    ("im2col", im2col_flipped_patch, "each patch was flipped"),
]


# ---- col2im ------------------------------------------------------------------------------------------
def col2im_overwrite(cols, output_size, kernel_size, stride=1, padding=0):
    (h, w), (kh, kw), (sh, sw), (ph, pw) = (
        pair(output_size),
        pair(kernel_size),
        pair(stride),
        pair(padding),
    )
    n = cols.shape[0]
    c = cols.shape[1] // (kh * kw)
    oh, ow = out_len(h, kh, sh, ph), out_len(w, kw, sw, pw)
    xp = cols.new_zeros(n, c, h + 2 * ph, w + 2 * pw)
    for i in range(oh):
        for j in range(ow):
            xp[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw] = cols[:, :, i * ow + j].reshape(
                n, c, kh, kw
            )
    return xp[:, :, ph : ph + h, pw : pw + w]


def col2im_average(cols, output_size, kernel_size, stride=1, padding=0):
    total = col2im_loops(cols, output_size, kernel_size, stride, padding)
    count = col2im_loops(torch.ones_like(cols), output_size, kernel_size, stride, padding)
    return total / count.clamp_min(1)


def col2im_not_cropped(cols, output_size, kernel_size, stride=1, padding=0):
    (h, w), (ph, pw) = pair(output_size), pair(padding)
    return col2im_loops(cols, (h + 2 * ph, w + 2 * pw), kernel_size, stride, 0)


def col2im_crop_top_left(cols, output_size, kernel_size, stride=1, padding=0):
    (h, w), (ph, pw) = pair(output_size), pair(padding)
    return col2im_loops(cols, (h + 2 * ph, w + 2 * pw), kernel_size, stride, 0)[:, :, :h, :w]


def col2im_kernel_major(cols, output_size, kernel_size, stride=1, padding=0):
    (kh, kw) = pair(kernel_size)
    n, ckk, L = cols.shape
    c = ckk // (kh * kw)
    reordered = cols.reshape(n, kh, kw, c, L).permute(0, 3, 1, 2, 4).reshape(n, ckk, L)
    return col2im_loops(reordered, output_size, kernel_size, stride, padding)


def col2im_negative_slice(cols, output_size, kernel_size, stride=1, padding=0):
    """Add into the padded canvas, then crop with [p:-p]: empty when p = 0."""
    (h, w), (ph, pw) = pair(output_size), pair(padding)
    xp = col2im_loops(cols, (h + 2 * ph, w + 2 * pw), kernel_size, stride, 0)
    return xp[:, :, ph:-ph, pw:-pw]


COL2IM_MISTAKES = [
    (
        "col2im",
        col2im_negative_slice,
        r"`x` should have shape \(2, 3, 5, 5\), but it has shape \(2, 3, 0, 0\)\. It looks like a "
        r"slice \[pad:-pad\] is empty when pad = 0; use \[pad:pad \+ H\]",
    ),
    ("col2im", col2im_overwrite, "contributions must be ADDED"),
    ("col2im", col2im_average, "the overlapping contributions were averaged"),
    ("col2im", col2im_not_cropped, "the padding was not cropped off"),
    ("col2im", col2im_crop_top_left, "cropped from the top-left corner"),
    ("col2im", col2im_kernel_major, r"read as \(KH, KW, C\)"),
]


# ---- convolution forward -----------------------------------------------------------------------------
def conv_flipped_kernel(x, weight, bias, stride=1, padding=0):
    """A true convolution: the kernel flipped in both spatial axes."""
    return conv_unfold_matmul(x, weight.flip(-1, -2), bias, stride, padding)


def conv_no_bias(x, weight, bias, stride=1, padding=0):
    return conv_unfold_matmul(x, weight, None, stride, padding)


def conv_bias_last_axis(x, weight, bias, stride=1, padding=0):
    out = conv_unfold_matmul(x, weight, None, stride, padding)
    return out if bias is None else out + bias


def conv_bias_per_channel(x, weight, bias, stride=1, padding=0):
    """Loops over input channels and adds the bias inside that loop."""
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    out = 0
    for ch in range(x.shape[1]):
        part = F.conv2d(x[:, ch : ch + 1], weight[:, ch : ch + 1], None, (sh, sw), (ph, pw))
        out = out + (part if bias is None else part + bias.view(1, -1, 1, 1))
    return out


def conv_padding_ignored(x, weight, bias, stride=1, padding=0):
    return conv_unfold_matmul(x, weight, bias, stride, 0)


def conv_pad_once(x, weight, bias, stride=1, padding=0):
    (ph, pw) = pair(padding)
    return conv_unfold_matmul(F.pad(x, (pw, 0, ph, 0)), weight, bias, stride, 0)


def conv_pad_one_side(x, weight, bias, stride=1, padding=0):
    (ph, pw) = pair(padding)
    return conv_unfold_matmul(F.pad(x, (2 * pw, 0, 2 * ph, 0)), weight, bias, stride, 0)


def conv_no_plus_one(x, weight, bias, stride=1, padding=0):
    """The loop bound misses the last window."""
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    kh, kw = weight.shape[-2:]
    h, w = x.shape[-2:]
    out = conv_unfold_matmul(x, weight, bias, stride, padding)
    return out[:, :, : (h + 2 * ph - kh) // sh, : (w + 2 * pw - kw) // sw]


def conv_ceil(x, weight, bias, stride=1, padding=0):
    """ceil_mode-like: extra zero padding at the bottom/right so a partial last window counts."""
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    kh, kw = weight.shape[-2:]
    h, w = x.shape[-2:]
    extra_h = (-(h + 2 * ph - kh)) % sh
    extra_w = (-(w + 2 * pw - kw)) % sw
    xp = F.pad(x, (pw, pw + extra_w, ph, ph + extra_h))
    return conv_unfold_matmul(xp, weight, bias, stride, 0)


def conv_stride_ignored(x, weight, bias, stride=1, padding=0):
    return conv_unfold_matmul(x, weight, bias, 1, padding)


def conv_pairs_swapped(x, weight, bias, stride=1, padding=0):
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    return conv_unfold_matmul(x, weight, bias, (sw, sh), (pw, ph))


def conv_first_of_pair(x, weight, bias, stride=1, padding=0):
    (sh, _), (ph, _) = pair(stride), pair(padding)
    return conv_unfold_matmul(x, weight, bias, sh, ph)


def conv_int_only(x, weight, bias, stride=1, padding=0):
    """`F.pad(x, (padding,) * 4)` only works for an int padding."""
    xp = F.pad(x, (padding,) * 4)
    return conv_unfold_matmul(xp, weight, bias, stride, 0)


def conv_pair_only(x, weight, bias, stride=1, padding=0):
    sh, sw = stride
    ph, pw = padding
    return conv_unfold_matmul(x, weight, bias, (sh, sw), (ph, pw))


def conv_weight_c_first(x, weight, bias, stride=1, padding=0):
    """Indexes the weight as (C, F, KH, KW)."""
    return conv_unfold_matmul(x, weight.transpose(0, 1), bias, stride, padding)


def conv_kernel_transposed(x, weight, bias, stride=1, padding=0):
    return conv_unfold_matmul(x, weight.transpose(-1, -2), bias, stride, padding)


def conv_float32_buffer(x, weight, bias, stride=1, padding=0):
    """The output buffer is made with torch.zeros(...) and so is float32 whatever the input."""
    out = conv_unfold_matmul(x, weight, bias, stride, padding)
    buf = torch.zeros(out.shape)
    buf[:] = out
    return buf


def conv_channels_not_summed(x, weight, bias, stride=1, padding=0):
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    kh, kw = weight.shape[-2:]
    win = F.pad(x, (pw, pw, ph, ph)).unfold(2, kh, sh).unfold(3, kw, sw)  # (N, C, OH, OW, KH, KW)
    return torch.einsum("ncijab,fcab->nfcij", win, weight)


def conv_negative_slice(x, weight, bias, stride=1, padding=0):
    ph, pw = pair(padding)
    return conv_loops(_pad_by_negative_slice(x, ph, pw), weight, bias, stride, 0)


CONV_FORWARD_MISTAKES = [
    (
        "conv2d_forward",
        conv_negative_slice,
        r"raised RuntimeError.*It looks like a slice \[pad:-pad\] is empty when pad = 0",
    ),
    ("conv2d_forward", conv_flipped_kernel, r"the kernel was flipped \(a true convolution\)"),
    ("conv2d_forward", conv_no_bias, "the bias was not added"),
    ("conv2d_forward", conv_bias_last_axis, "the bias was added along the last axis"),
    ("conv2d_forward", conv_bias_per_channel, r"added once per input channel \(C times\)"),
    ("conv2d_forward", conv_padding_ignored, "the padding was ignored"),
    ("conv2d_forward", conv_pad_once, "the padding was counted once"),
    ("conv2d_forward", conv_pad_one_side, "all 2p zeros of the padding went on one side"),
    ("conv2d_forward", conv_no_plus_one, r"missing its \+1"),
    ("conv2d_forward", conv_ceil, "the output size was rounded up"),
    ("conv2d_forward", conv_stride_ignored, "the stride was ignored"),
    (
        "conv2d_forward",
        conv_pairs_swapped,
        r"the \(h, w\) parts of stride and padding were swapped",
    ),
    (
        "conv2d_forward",
        conv_first_of_pair,
        "only the first number of the stride/padding pair was used",
    ),
    ("conv2d_forward", conv_int_only, r"may each be an int or an \(h, w\) pair"),
    (
        "conv2d_forward",
        conv_pair_only,
        r"raised TypeError: cannot unpack non-iterable int object .* an int or an \(h, w\) pair",
    ),
    ("conv2d_forward", conv_weight_c_first, r"indexed as \(C, F, KH, KW\)"),
    ("conv2d_forward", conv_kernel_transposed, "the kernel's rows and columns were swapped"),
    ("conv2d_forward", conv_float32_buffer, "`out` should have dtype float64"),
    ("conv2d_forward", conv_channels_not_summed, "not summed over the input channels"),
    ("conv2d_forward_loops", conv_flipped_kernel, r"the kernel was flipped \(a true convolution\)"),
    ("conv2d_forward_loops", conv_no_plus_one, r"missing its \+1"),
]


# ---- convolution backward ------------------------------------------------------------------------------
def _grads(dout, x, weight, bias, stride, padding):
    return bwd_unfold_fold(dout, x, weight, bias, stride, padding)


def bwd_unflipped_dx(dout, x, weight, bias, stride=1, padding=0):
    """dx as a full correlation with the kernel NOT flipped."""
    dx, _, _ = bwd_full_convolution(dout, x, weight.flip(-1, -2), bias, stride, padding)
    _, dw, db = _grads(dout, x, weight, bias, stride, padding)
    return dx, dw, db


def bwd_overwrite(dout, x, weight, bias, stride=1, padding=0):
    """The naive loop with `=` instead of `+=` for dx."""
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    n, _, h, w = x.shape
    f, _, kh, kw = weight.shape
    dxp = F.pad(torch.zeros_like(x), (pw, pw, ph, ph))
    for b in range(n):
        for k in range(f):
            for i in range(dout.shape[2]):
                for j in range(dout.shape[3]):
                    dxp[b, :, i * sh : i * sh + kh, j * sw : j * sw + kw] = (
                        dout[b, k, i, j] * weight[k]
                    )
    _, dw, db = _grads(dout, x, weight, bias, stride, padding)
    return dxp[:, :, ph : ph + h, pw : pw + w], dw, db


def bwd_not_cropped(dout, x, weight, bias, stride=1, padding=0):
    (ph, pw) = pair(padding)
    xp = F.pad(x, (pw, pw, ph, ph))
    dxp, _, _ = _grads(dout, xp, weight, bias, stride, 0)
    _, dw, db = _grads(dout, x, weight, bias, stride, padding)
    return dxp, dw, db


def bwd_crop_top_left(dout, x, weight, bias, stride=1, padding=0):
    (ph, pw) = pair(padding)
    h, w = x.shape[-2:]
    xp = F.pad(x, (pw, pw, ph, ph))
    dxp, _, _ = _grads(dout, xp, weight, bias, stride, 0)
    _, dw, db = _grads(dout, x, weight, bias, stride, padding)
    return dxp[:, :, :h, :w], dw, db


def bwd_stride_ignored(dout, x, weight, bias, stride=1, padding=0):
    """The naive loop with windows at (i, j) instead of (i*s, j*s)."""
    (ph, pw) = pair(padding)
    n, _, h, w = x.shape
    f, _, kh, kw = weight.shape
    xp = F.pad(x, (pw, pw, ph, ph))
    dxp, dweight = torch.zeros_like(xp), torch.zeros_like(weight)
    for b in range(n):
        for k in range(f):
            for i in range(dout.shape[2]):
                for j in range(dout.shape[3]):
                    dxp[b, :, i : i + kh, j : j + kw] += dout[b, k, i, j] * weight[k]
                    dweight[k] += dout[b, k, i, j] * xp[b, :, i : i + kh, j : j + kw]
    return (
        dxp[:, :, ph : ph + h, pw : pw + w],
        dweight,
        None if bias is None else dout.sum((0, 2, 3)),
    )


def bwd_dbias_not_summed_over_batch(dout, x, weight, bias, stride=1, padding=0):
    dx, dw, db = _grads(dout, x, weight, bias, stride, padding)
    return dx, dw, None if bias is None else dout.sum((2, 3))


def bwd_dbias_not_summed_spatially(dout, x, weight, bias, stride=1, padding=0):
    dx, dw, db = _grads(dout, x, weight, bias, stride, padding)
    return dx, dw, None if bias is None else dout.sum(0)


def bwd_dbias_mean(dout, x, weight, bias, stride=1, padding=0):
    dx, dw, db = _grads(dout, x, weight, bias, stride, padding)
    return dx, dw, None if bias is None else dout.mean((0, 2, 3))


def bwd_dbias_first_image(dout, x, weight, bias, stride=1, padding=0):
    dx, dw, db = _grads(dout, x, weight, bias, stride, padding)
    return dx, dw, None if bias is None else dout[0].sum((1, 2))


def bwd_dbias_keepdim(dout, x, weight, bias, stride=1, padding=0):
    dx, dw, db = _grads(dout, x, weight, bias, stride, padding)
    return dx, dw, None if bias is None else dout.sum((0, 2, 3), keepdim=True)


def bwd_dweight_last_image(dout, x, weight, bias, stride=1, padding=0):
    """dweight assigned (=) inside the loop over images."""
    dx, _, db = _grads(dout, x, weight, bias, stride, padding)
    for b in range(x.shape[0]):
        _, dw, _ = _grads(dout[b : b + 1], x[b : b + 1], weight, bias, stride, padding)
    return dx, dw, db


def bwd_dweight_batch_mean(dout, x, weight, bias, stride=1, padding=0):
    dx, dw, db = _grads(dout, x, weight, bias, stride, padding)
    return dx, dw / x.shape[0], db


def bwd_dweight_per_image(dout, x, weight, bias, stride=1, padding=0):
    """dweight kept per image: (N, F, C, KH, KW)."""
    dx, _, db = _grads(dout, x, weight, bias, stride, padding)
    dw = torch.stack(
        [
            _grads(dout[b : b + 1], x[b : b + 1], weight, bias, stride, padding)[1]
            for b in range(x.shape[0])
        ]
    )
    return dx, dw, db


def bwd_dweight_flipped(dout, x, weight, bias, stride=1, padding=0):
    dx, dw, db = _grads(dout, x, weight, bias, stride, padding)
    return dx, dw.flip(-1, -2), db


def bwd_dweight_c_first(dout, x, weight, bias, stride=1, padding=0):
    """einsum output written as (C, F, KH, KW)."""
    dx, dw, db = _grads(dout, x, weight, bias, stride, padding)
    return dx, dw.transpose(0, 1).contiguous(), db


def bwd_dbias_zeros_without_bias(dout, x, weight, bias, stride=1, padding=0):
    dx, dw, _ = _grads(dout, x, weight, bias, stride, padding)
    return (
        dx,
        dw,
        dout.sum((0, 2, 3)) if bias is not None else torch.zeros(weight.shape[0], dtype=x.dtype),
    )


def bwd_never_dbias(dout, x, weight, bias, stride=1, padding=0):
    dx, dw, _ = _grads(dout, x, weight, bias, stride, padding)
    return dx, dw, None


def bwd_autograd(dout, x, weight, bias, stride=1, padding=0):
    xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
    out = F.conv2d(xr, wr, bias, pair(stride), pair(padding))
    out.backward(dout)
    return xr.grad, wr.grad, None if bias is None else dout.sum((0, 2, 3))


def bwd_channels_swapped_in_dx(dout, x, weight, bias, stride=1, padding=0):
    """dx[n, c] built from w[c, f] instead of w[f, c]; only runs where C = F."""
    if weight.shape[0] != weight.shape[1]:
        return _grads(dout, x, weight, bias, stride, padding)
    dx, _, _ = _grads(dout, x, weight.transpose(0, 1), bias, stride, padding)
    _, dw, db = _grads(dout, x, weight, bias, stride, padding)
    return dx, dw, db


def bwd_returns_two(dout, x, weight, bias, stride=1, padding=0):
    dx, dw, _ = _grads(dout, x, weight, bias, stride, padding)
    return dx, dw


def bwd_negative_slice(dout, x, weight, bias, stride=1, padding=0):
    """The gradient of the padded input, cropped with [p:-p]: empty when p = 0."""
    ph, pw = pair(padding)
    dxp, dweight, dbias = bwd_loops(dout, F.pad(x, (pw, pw, ph, ph)), weight, bias, stride, 0)
    return dxp[:, :, ph:-ph, pw:-pw], dweight, dbias


CONV_BACKWARD_MISTAKES = [
    (
        "conv2d_backward",
        bwd_negative_slice,
        r"`dx` should have shape \(2, 2, 4, 4\), but it has shape \(2, 2, 0, 0\)\. It looks like a "
        r"slice \[pad:-pad\] is empty when pad = 0; use \[pad:pad \+ H\]",
    ),
    ("conv2d_backward", bwd_unflipped_dx, "dx used the kernel unflipped"),
    ("conv2d_backward", bwd_overwrite, "contributions must be ACCUMULATED"),
    ("conv2d_backward", bwd_not_cropped, "dx still has the padded input's size"),
    ("conv2d_backward", bwd_crop_top_left, "dx was cropped from the top-left corner"),
    ("conv2d_backward", bwd_stride_ignored, "the stride was ignored in the backward pass"),
    ("conv2d_backward", bwd_dbias_not_summed_over_batch, "dbias was not summed over the batch"),
    (
        "conv2d_backward",
        bwd_dbias_not_summed_spatially,
        "dbias was not summed over the output positions",
    ),
    ("conv2d_backward", bwd_dbias_mean, "dbias was averaged"),
    ("conv2d_backward", bwd_dbias_first_image, "dbias was summed over the first image only"),
    ("conv2d_backward", bwd_dbias_keepdim, r"dbias should have the shape of bias, \(F,\)"),
    ("conv2d_backward", bwd_dweight_last_image, "dweight holds only the LAST image of the batch"),
    ("conv2d_backward", bwd_dweight_batch_mean, "dweight was averaged over the batch"),
    ("conv2d_backward", bwd_dweight_per_image, "dweight was not summed over the batch"),
    ("conv2d_backward", bwd_dweight_flipped, "dweight is flipped"),
    ("conv2d_backward", bwd_dweight_c_first, "dweight has its filter and channel axes swapped"),
    ("conv2d_backward", bwd_dbias_zeros_without_bias, "bias is None, so dbias should be None"),
    ("conv2d_backward", bwd_never_dbias, "bias is given, so dbias should be a tensor"),
    ("conv2d_backward", bwd_autograd, "called autograd .* derive the gradient by hand"),
    (
        "conv2d_backward",
        bwd_channels_swapped_in_dx,
        "roles of the filter and channel axes were swapped in dx",
    ),
    ("conv2d_backward", bwd_returns_two, r"expected a tuple \(dx, dweight, dbias\)"),
]

MISTAKES = (
    SIZE_MISTAKES
    + IM2COL_MISTAKES
    + COL2IM_MISTAKES
    + CONV_FORWARD_MISTAKES
    + CONV_BACKWARD_MISTAKES
)


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


def _conv_problem(seed, c=3, f=3, stride=2, padding=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c, 7, 7, generator=gen, dtype=torch.float64)
    w = torch.randn(f, c, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(f, generator=gen, dtype=torch.float64)
    return x, w, b, stride, padding


@pytest.mark.parametrize(
    ("exercise_id", "fn", "pattern"), MISTAKES, ids=[f"{e}-{f.__name__}" for e, f, _ in MISTAKES]
)
def test_planted_mistake_really_is_wrong(exercise_id, fn, pattern):
    """Guard against a mistake test that cannot fail: the planted function differs from the reference."""
    del pattern
    ref = cu.reference(exercise_id)
    if fn is bwd_autograd:  # wrong by the rules (autograd is forbidden), not by value
        assert ".backward(" in inspect.getsource(fn)
        return
    if exercise_id == "conv_output_size":
        cases = [
            (n, k, s, p)
            for n in range(1, 10)
            for k in range(1, 4)
            for s in (1, 2, 3)
            for p in (0, 1)
            if n + 2 * p >= k
        ]
        assert any(type(fn(*c)) is not int or fn(*c) != ref(*c) for c in cases) or fn(7, 3) != ref(
            7, 3
        )
        return
    x, w, b, s, p = _conv_problem(3)
    if exercise_id in ("im2col", "col2im"):
        probes = [((2, 3), (2, 1), (1, 0)), (3, 2, 1)]
        for k, s2, p2 in probes:
            if exercise_id == "im2col":
                args = (x, k, s2, p2)
            else:
                cols = F.unfold(x, pair(k), padding=pair(p2), stride=pair(s2))
                args = (cols, (7, 7), k, s2, p2)
            try:
                got = fn(*args)
            except (TypeError, ValueError, RuntimeError):
                return
            want = ref(*args)
            if got.shape != want.shape or not torch.allclose(got, want):
                return
        pytest.fail(f"{fn.__name__} agrees with the reference")
    probes = [
        (x, w, b, s, p),
        (x, w, b, (2, 1), (1, 0)),
        (x, w, None, 1, 0),
        (x[:, :, :6], w, b, 3, 0),
    ]
    for xx, ww, bb, ss, pp in probes:
        try:
            if exercise_id == "conv2d_backward":
                dout = torch.randn_like(F.conv2d(xx, ww, bb, pair(ss), pair(pp)))
                got, want = fn(dout, xx, ww, bb, ss, pp), ref(dout, xx, ww, bb, ss, pp)
            else:
                got, want = (fn(xx, ww, bb, ss, pp),), (ref(xx, ww, bb, ss, pp),)
        except (TypeError, ValueError, RuntimeError):
            return
        if len(got) != len(want):
            return
        for g, e in zip(got, want, strict=True):
            if (g is None) != (e is None):
                return
            if g is not None and (
                g.shape != e.shape or g.dtype != e.dtype or not torch.allclose(g, e)
            ):
                return
    pytest.fail(f"{fn.__name__} agrees with the reference")


# =====================================================================================
# Messages, stubs, timing
# =====================================================================================


def test_shape_message_names_both_shapes():
    with pytest.raises(
        cu.CheckFailure,
        match=r"`out` should have shape \(2, 2, 2, 2\), but it has shape \(2, 2, 1, 1\)",
    ):
        cu.check("conv2d_forward", conv_no_plus_one, strict=True)


def conv_adds_bias_in_place(x, weight, bias, stride=1, padding=0):
    out = conv_unfold_matmul(x, weight, None, stride, padding)
    if bias is not None:
        bias += 0.0 * bias + 1.0  # "shifts" the bias in place, then uses it
        out = out + bias.view(1, -1, 1, 1) - 1.0
    return out


def test_in_place_change_of_an_input_is_named_by_its_argument():
    with pytest.raises(cu.CheckFailure, match="changed its input `bias` in place"):
        cu.check("conv2d_forward", conv_adds_bias_in_place, strict=True)


def test_report_check_seconds(capsys):
    """Times each check on the reference and the slowest correct style; reported, never asserted."""
    report_check_seconds(SLOWEST, capsys)


def test_exercises_of_chapter_02_are_registered_with_their_contract():
    listed = {e.id: e for e in cu.exercises("02")}
    assert set(listed) == {
        "conv_output_size",
        "im2col",
        "col2im",
        "conv2d_forward_loops",
        "conv2d_forward",
        "conv2d_backward",
    }
    assert listed["conv2d_backward"].backward
    assert not listed["conv2d_forward"].backward
    # The contract's signatures (EXERCISES.md), verbatim.
    assert (
        listed["conv2d_forward"].signature
        == "(x, weight (F,C,KH,KW), bias (F,) or None, stride=1, padding=0) -> out"
    )
    assert (
        listed["conv2d_backward"].signature
        == "(dout, x, weight, bias, stride=1, padding=0) -> (dx, dweight, dbias)"
    )
    for exercise_id, names in (
        ("conv2d_forward", ("x", "weight", "bias", "stride", "padding")),
        ("conv2d_forward_loops", ("x", "weight", "bias", "stride", "padding")),
        ("conv2d_backward", ("dout", "x", "weight", "bias", "stride", "padding")),
        ("im2col", ("x", "kernel_size", "stride", "padding")),
        ("col2im", ("cols", "output_size", "kernel_size", "stride", "padding")),
        ("conv_output_size", ("size", "kernel_size", "stride", "padding")),
    ):
        assert listed[exercise_id].arg_names == names, exercise_id


# =====================================================================================
# The correct styles themselves, on shapes the battery never tries
# =====================================================================================


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 2),
    c=st.integers(1, 3),
    f=st.integers(1, 3),
    h=st.integers(3, 8),
    w=st.integers(3, 8),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    sh=st.integers(1, 3),
    sw=st.integers(1, 3),
    ph=st.integers(0, 2),
    pw=st.integers(0, 2),
    bias=st.booleans(),
)
def test_correct_styles_agree_with_torch_on_random_shapes(
    n, c, f, h, w, kh, kw, sh, sw, ph, pw, bias
):
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    weight = torch.randn(f, c, kh, kw, dtype=torch.float64)
    b = torch.randn(f, dtype=torch.float64) if bias else None
    stride, padding = (sh, sw), (ph, pw)
    with torch.enable_grad():
        xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
        out = F.conv2d(xr, wr, b, stride, padding)
        dout = torch.randn_like(out)
        dx, dw = torch.autograd.grad(out, [xr, wr], dout)
    for fn in {*CORRECT["conv2d_forward"], *CORRECT["conv2d_forward_loops"]}:
        torch.testing.assert_close(fn(x, weight, b, stride, padding), out.detach())
    for fn in CORRECT["conv2d_backward"]:
        gx, gw, gb = fn(dout, x, weight, b, stride, padding)
        torch.testing.assert_close(gx, dx)
        torch.testing.assert_close(gw, dw)
        assert (gb is None) == (b is None)
    cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)
    for fn in CORRECT["im2col"]:
        torch.testing.assert_close(fn(x, (kh, kw), stride, padding), cols)
    for fn in CORRECT["col2im"]:
        torch.testing.assert_close(
            fn(cols, (h, w), (kh, kw), stride, padding),
            F.fold(cols, (h, w), (kh, kw), padding=padding, stride=stride),
        )


def im2col_functional(x, kernel_size, stride=1, padding=0):
    # Refused at the call, before its layout matters.
    return F.unfold(x, kernel_size, padding=padding, stride=stride)


def col2im_functional(cols, output_size, kernel_size, stride=1, padding=0):
    return F.fold(cols, output_size, kernel_size, padding=padding, stride=stride)


def conv_functional(x, weight, bias=None, stride=1, padding=0):
    return F.conv2d(x, weight, bias, stride=stride, padding=padding)


# Right answers through the operator the exercise rebuilds: refused, naming the call.
SHORTCUTS = [
    ("im2col", im2col_functional, "F.unfold"),
    ("col2im", col2im_functional, "F.fold"),
    ("conv2d_forward", conv_functional, "conv2d"),
    ("conv2d_forward_loops", conv_functional, "conv2d"),
    ("conv2d_backward", bwd_full_convolution, "conv"),
]


# ---- shortcuts through the operator an exercise rebuilds ---------------------------------------
@pytest.mark.parametrize(
    "exercise_id, fn, call", SHORTCUTS, ids=[f.__name__ for _, f, _ in SHORTCUTS]
)
def test_a_shortcut_through_the_rebuilt_operator_is_refused(exercise_id, fn, call):
    with pytest.raises(cu.CheckFailure, match=rf"called \S*{re.escape(call)}.*build yourself"):
        cu.check(exercise_id, fn, strict=True)
