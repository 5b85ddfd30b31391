"""Chapter 06 batteries: correct implementations in several styles pass, planted mistakes are named.

Every exercise of chapter 06 gets (a) correct implementations written in different
styles (vectorised torch, numpy, explicit Python loops, E[x^2] - E[x]^2, einsum, the
step-by-step computation graph), each checked across 20 seeds, and (b) the mistakes
learners really make, each rejected with the sentence that names it.
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
from course_utils.checks import ch06_normalization as ch06

SEEDS = range(20)
#: Seeds on which every planted mistake must be caught (the catch must not depend on luck).
MISTAKE_SEEDS = (0, 1, 7)


def _dims(x):
    return tuple(d for d in range(x.dim()) if d != 1)


def _pc(v, x):
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


# =====================================================================================
# Correct implementations, one style each
# =====================================================================================


# ---- BatchNorm forward ---------------------------------------------------------------
def bn_forward_torch(
    x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5, training=True
):
    """Vectorised torch, keepdim means."""
    dims = _dims(x)
    if training:
        mean = x.mean(dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dims, keepdim=True)
        m = x.numel() // x.shape[1]
        new_rm = (1 - momentum) * running_mean + momentum * mean.flatten()
        new_rv = (1 - momentum) * running_var + momentum * var.flatten() * m / (m - 1)
    else:
        mean, var = _pc(running_mean, x), _pc(running_var, x)
        new_rm, new_rv = running_mean.clone(), running_var.clone()
    out = (x - mean) / torch.sqrt(var + eps) * _pc(gamma, x) + _pc(beta, x)
    return out, new_rm, new_rv


def bn_forward_numpy(
    x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5, training=True
):
    """Through numpy, channels moved last and flattened: (M, C)."""
    a = np.moveaxis(x.numpy(), 1, -1)
    shape = a.shape
    flat = a.reshape(-1, shape[-1])
    rm, rv = running_mean.numpy(), running_var.numpy()
    if training:
        mean, var = flat.mean(0), flat.var(0)
        new_rm = (1 - momentum) * rm + momentum * mean
        new_rv = (1 - momentum) * rv + momentum * flat.var(0, ddof=1)
    else:
        mean, var, new_rm, new_rv = rm, rv, rm.copy(), rv.copy()
    out = (flat - mean) / np.sqrt(var + eps) * gamma.numpy() + beta.numpy()
    out = np.moveaxis(out.reshape(shape), -1, 1)
    dt = x.dtype
    return (
        torch.from_numpy(np.ascontiguousarray(out)).to(dt),
        torch.from_numpy(np.asarray(new_rm)).to(dt),
        torch.from_numpy(np.asarray(new_rv)).to(dt),
    )


def bn_forward_loops(
    x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5, training=True
):
    """One channel at a time, in Python floats."""
    c = x.shape[1]
    out = torch.empty_like(x)
    new_rm, new_rv = running_mean.clone(), running_var.clone()
    for k in range(c):
        vals = x[:, k].reshape(-1).tolist()
        m = len(vals)
        if training:
            mu = sum(vals) / m
            ss = sum((v - mu) ** 2 for v in vals)
            var = ss / m
            new_rm[k] = (1 - momentum) * float(running_mean[k]) + momentum * mu
            new_rv[k] = (1 - momentum) * float(running_var[k]) + momentum * ss / (m - 1)
        else:
            mu, var = float(running_mean[k]), float(running_var[k])
        scale = float(gamma[k]) / math.sqrt(var + eps)
        normed = [(v - mu) * scale + float(beta[k]) for v in vals]
        out[:, k] = torch.tensor(normed, dtype=torch.float64).reshape(x[:, k].shape).to(x.dtype)
    return out, new_rm, new_rv


def bn_forward_moments(
    x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5, training=True
):
    """Sums and sums of squares (E[x^2] - E[x]^2), as SyncBatchNorm combines them; float64 inside."""
    xd = x.double()
    dims = _dims(x)
    if training:
        m = x.numel() // x.shape[1]
        s1, s2 = xd.sum(dims), (xd * xd).sum(dims)
        mean = s1 / m
        var = s2 / m - mean**2
        new_rm = (1 - momentum) * running_mean.double() + momentum * mean
        new_rv = (1 - momentum) * running_var.double() + momentum * (s2 - m * mean**2) / (m - 1)
    else:
        mean, var = running_mean.double(), running_var.double()
        new_rm, new_rv = mean, var
    inv = torch.rsqrt(var + eps)
    scale, shift = gamma.double() * inv, beta.double() - mean * gamma.double() * inv
    out = xd * _pc(scale, x) + _pc(shift, x)
    return out.to(x.dtype), new_rm.to(x.dtype), new_rv.to(x.dtype)


# ---- BatchNorm backward --------------------------------------------------------------
def bn_backward_compact(dout, x, gamma, eps=1e-5):
    """The compact formula."""
    dims = _dims(x)
    m = x.numel() // x.shape[1]
    mean = x.mean(dims, keepdim=True)
    rstd = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
    xhat = (x - mean) * rstd
    dbeta = dout.sum(dims)
    dgamma = (dout * xhat).sum(dims)
    dx = _pc(gamma, x) * rstd / m * (m * dout - _pc(dbeta, x) - xhat * _pc(dgamma, x))
    return dx, dgamma, dbeta


def bn_backward_graph(dout, x, gamma, eps=1e-5):
    """Node by node along the computation graph, as in the derivation's first pass."""
    dims = _dims(x)
    m = x.numel() // x.shape[1]
    mu = x.mean(dims, keepdim=True)
    xc = x - mu
    var = (xc**2).mean(dims, keepdim=True)
    std = torch.sqrt(var + eps)
    inv = 1 / std
    xhat = xc * inv
    dbeta = dout.sum(dims)
    dgamma = (dout * xhat).sum(dims)
    dxhat = dout * _pc(gamma, x)
    dinv = (dxhat * xc).sum(dims, keepdim=True)
    dxc = dxhat * inv
    dstd = -dinv / std**2
    dvar = dstd / (2 * std)
    dxc = dxc + 2 * xc * dvar / m
    dmu = -dxc.sum(dims, keepdim=True)
    dx = dxc + dmu / m
    return dx, dgamma, dbeta


def bn_backward_numpy(dout, x, gamma, eps=1e-5):
    """Through numpy, channels last: (M, C)."""
    d = np.moveaxis(dout.numpy(), 1, -1)
    a = np.moveaxis(x.numpy(), 1, -1)
    shape = a.shape
    d, a = d.reshape(-1, shape[-1]), a.reshape(-1, shape[-1])
    m = a.shape[0]
    xhat = (a - a.mean(0)) / np.sqrt(a.var(0) + eps)
    dbeta, dgamma = d.sum(0), (d * xhat).sum(0)
    dx = gamma.numpy() / np.sqrt(a.var(0) + eps) * (d - dbeta / m - xhat * dgamma / m)
    dx = np.ascontiguousarray(np.moveaxis(dx.reshape(shape), -1, 1))
    return tuple(torch.from_numpy(np.asarray(v)).to(x.dtype) for v in (dx, dgamma, dbeta))


def bn_backward_loops(dout, x, gamma, eps=1e-5):
    """One channel at a time, in Python floats."""
    c = x.shape[1]
    dx = torch.empty_like(x)
    dgamma, dbeta = torch.empty_like(gamma), torch.empty_like(gamma)
    for k in range(c):
        v = x[:, k].reshape(-1).tolist()
        g = dout[:, k].reshape(-1).tolist()
        m = len(v)
        mu = sum(v) / m
        rstd = 1 / math.sqrt(sum((a - mu) ** 2 for a in v) / m + eps)
        xh = [(a - mu) * rstd for a in v]
        sb = sum(g)
        sg = sum(gi * hi for gi, hi in zip(g, xh, strict=True))
        dbeta[k], dgamma[k] = sb, sg
        col = [
            float(gamma[k]) * rstd * (gi - sb / m - hi * sg / m)
            for gi, hi in zip(g, xh, strict=True)
        ]
        dx[:, k] = torch.tensor(col, dtype=torch.float64).reshape(x[:, k].shape).to(x.dtype)
    return dx, dgamma, dbeta


# ---- LayerNorm -------------------------------------------------------------------------
def ln_forward_torch(x, gamma, beta, eps=1e-5):
    """Vectorised torch."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * gamma + beta


def ln_forward_numpy(x, gamma, beta, eps=1e-5):
    """Through numpy."""
    a = x.numpy()
    out = (a - a.mean(-1, keepdims=True)) / np.sqrt(
        a.var(-1, keepdims=True) + eps
    ) * gamma.numpy() + beta.numpy()
    return torch.from_numpy(np.asarray(out)).to(x.dtype)


def ln_forward_loops(x, gamma, beta, eps=1e-5):
    """Row by row, in Python floats."""
    d = x.shape[-1]
    g, b = gamma.tolist(), beta.tolist()
    rows = []
    for row in x.reshape(-1, d).tolist():
        mu = sum(row) / d
        rstd = 1 / math.sqrt(sum((v - mu) ** 2 for v in row) / d + eps)
        rows.append([(v - mu) * rstd * gi + bi for v, gi, bi in zip(row, g, b, strict=True)])
    return torch.tensor(rows, dtype=torch.float64).reshape(x.shape).to(x.dtype)


def ln_forward_welford(x, gamma, beta, eps=1e-5):
    """Welford's one-pass mean and variance, one feature at a time, all rows at once."""
    mean = torch.zeros_like(x[..., 0])
    m2 = torch.zeros_like(mean)
    for k in range(x.shape[-1]):
        delta = x[..., k] - mean
        mean = mean + delta / (k + 1)
        m2 = m2 + delta * (x[..., k] - mean)
    var = m2 / x.shape[-1]
    return (x - mean[..., None]) / torch.sqrt(var[..., None] + eps) * gamma + beta


def ln_backward_compact(dout, x, gamma, eps=1e-5):
    """The compact formula."""
    d = x.shape[-1]
    mean = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    xhat = (x - mean) * rstd
    g = dout * gamma
    dx = rstd / d * (d * g - g.sum(-1, keepdim=True) - xhat * (g * xhat).sum(-1, keepdim=True))
    flat_d, flat_h = dout.reshape(-1, d), xhat.reshape(-1, d)
    return dx, (flat_d * flat_h).sum(0), flat_d.sum(0)


def ln_backward_einsum(dout, x, gamma, eps=1e-5):
    """The full Jacobian of each row, applied with einsum."""
    d = x.shape[-1]
    xr, dr = x.reshape(-1, d), dout.reshape(-1, d)
    mean = xr.mean(-1, keepdim=True)
    rstd = torch.rsqrt(((xr - mean) ** 2).mean(-1, keepdim=True) + eps)
    xhat = (xr - mean) * rstd
    eye = torch.eye(d, dtype=x.dtype)
    # J[r, i, j] = d xhat_i / d x_j = rstd * (delta_ij - 1/d - xhat_i xhat_j / d)
    jac = rstd[:, :, None] * (eye - 1 / d - xhat[:, :, None] * xhat[:, None, :] / d)
    dx = torch.einsum("ri,rij->rj", dr * gamma, jac)
    return dx.reshape(x.shape), torch.einsum("ri,ri->i", dr, xhat), dr.sum(0)


def ln_backward_loops(dout, x, gamma, eps=1e-5):
    """Row by row, in Python floats."""
    d = x.shape[-1]
    g = gamma.tolist()
    dxs, dgamma, dbeta = [], [0.0] * d, [0.0] * d
    for row, drow in zip(x.reshape(-1, d).tolist(), dout.reshape(-1, d).tolist(), strict=True):
        mu = sum(row) / d
        rstd = 1 / math.sqrt(sum((v - mu) ** 2 for v in row) / d + eps)
        xh = [(v - mu) * rstd for v in row]
        gx = [a * b for a, b in zip(drow, g, strict=True)]
        s1, s2 = sum(gx), sum(a * b for a, b in zip(gx, xh, strict=True))
        dxs.append([rstd * (a - s1 / d - h * s2 / d) for a, h in zip(gx, xh, strict=True)])
        for i in range(d):
            dgamma[i] += drow[i] * xh[i]
            dbeta[i] += drow[i]
    to = {"dtype": x.dtype}
    return (
        torch.tensor(dxs, **to).reshape(x.shape),
        torch.tensor(dgamma, **to),
        torch.tensor(dbeta, **to),
    )


# ---- RMSNorm -----------------------------------------------------------------------------
def rms_torch(x, weight, eps=1e-6):
    """rsqrt of the mean square."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rms_numpy(x, weight, eps=1e-6):
    """Through numpy."""
    a = x.numpy()
    return torch.from_numpy(
        np.asarray(a / np.sqrt((a * a).mean(-1, keepdims=True) + eps) * weight.numpy())
    ).to(x.dtype)


def rms_loops(x, weight, eps=1e-6):
    """Row by row, in Python floats."""
    d = x.shape[-1]
    w = weight.tolist()
    rows = []
    for row in x.reshape(-1, d).tolist():
        r = math.sqrt(sum(v * v for v in row) / d + eps)
        rows.append([v / r * wi for v, wi in zip(row, w, strict=True)])
    return torch.tensor(rows, dtype=torch.float64).reshape(x.shape).to(x.dtype)


def rms_norm_builtin(x, weight, eps=1e-6):
    """The norm of each row, scaled by 1/sqrt(D)."""
    d = x.shape[-1]
    rms = torch.linalg.vector_norm(x, dim=-1, keepdim=True) / math.sqrt(d)
    return x / torch.sqrt(rms**2 + eps) * weight


# ---- BatchNorm backward, staged -------------------------------------------------------
def staged_keepdim(dout, x, gamma, eps=1e-5):
    """The graph walked with keepdim per-channel nodes, (1, C, 1, 1), returned as they are."""
    dims = _dims(x)
    m = x.numel() // x.shape[1]
    mu = x.mean(dims, keepdim=True)
    xc = x - mu
    var = (xc**2).sum(dims, keepdim=True) / m
    rstd = 1 / torch.sqrt(var + eps)
    dxhat = dout * _pc(gamma, x)
    drstd = (dxhat * xc).sum(dims, keepdim=True)
    dvar = -0.5 / (var + eps) ** 1.5 * drstd
    dxc = dxhat * rstd + 2 * xc * dvar / m
    dmean = -dxc.sum(dims, keepdim=True)
    dx = dxc + dmean / m
    out = {"dxhat": dxhat, "drstd": drstd, "dvar": dvar, "dxc": dxc, "dmean": dmean, "dx": dx}
    out["dgamma"], out["dbeta"] = (dout * xc * rstd).sum(dims), dout.sum(dims)
    return out


def staged_numpy(dout, x, gamma, eps=1e-5):
    """The same walk in numpy with channels last, (M, C); dmean without the (zero) variance path."""
    a = np.moveaxis(x.numpy(), 1, -1)
    shape = a.shape
    xf, df = a.reshape(-1, shape[-1]), np.moveaxis(dout.numpy(), 1, -1).reshape(-1, shape[-1])
    m = xf.shape[0]
    xc = xf - xf.mean(0)
    var = (xc**2).mean(0)
    rstd = (var + eps) ** -0.5
    dxhat = df * gamma.numpy()
    drstd = (dxhat * xc).sum(0)
    dvar = -0.5 * rstd**3 * drstd
    dxc = dxhat * rstd + dvar * 2 * xc / m
    dmean = -(dxhat * rstd).sum(0)
    dx = dxc + dmean / m

    def back(v):
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(v.reshape(shape), -1, 1))).to(
            x.dtype
        )

    per = lambda v: torch.from_numpy(np.asarray(v)).to(x.dtype)  # noqa: E731
    return {
        "dxhat": back(dxhat),
        "drstd": per(drstd),
        "dvar": per(dvar),
        "dxc": back(dxc),
        "dmean": per(dmean),
        "dx": back(dx),
        "dgamma": per((df * xc * rstd).sum(0)),
        "dbeta": per(df.sum(0)),
    }


# ---- small CNN ------------------------------------------------------------------------
def cnn_other_style(params, X, y, train=True, dropout_p=0.0, bn_state=None):
    """PyTorch's forward ops (no autograd), max-pool indices, the compact BN backward of this file."""
    w1, gamma, beta, w2, b2 = (params[k] for k in ("W1", "gamma", "beta", "W2", "b2"))
    n, f = X.shape[0], w1.shape[0]
    a = F.conv2d(X, w1, padding=1)
    if train:
        mean, var = a.mean((0, 2, 3)), a.var((0, 2, 3), unbiased=False)
        if bn_state is not None:
            cnt = a.numel() // f
            bn_state["running_mean"] = bn_state["running_mean"] * 0.9 + mean * 0.1
            bn_state["running_var"] = bn_state["running_var"] * 0.9 + var * cnt / (cnt - 1) * 0.1
    else:
        mean, var = bn_state["running_mean"], bn_state["running_var"]
    z = (a - _pc(mean, a)) / torch.sqrt(_pc(var, a) + 1e-5) * _pc(gamma, a) + _pc(beta, a)
    r = torch.relu(z)
    q, idx = F.max_pool2d(r, 2, return_indices=True)
    keep = (
        (torch.rand_like(q) > dropout_p).to(q.dtype) / (1 - dropout_p)
        if train and dropout_p
        else 1.0
    )
    hflat = (q * keep).reshape(n, -1)
    scores = hflat @ w2 + b2
    if y is None:
        return scores
    p = torch.softmax(scores, 1)
    loss = -torch.log(p[torch.arange(n), y]).mean()
    if not train:
        return loss, None
    ds = (p - F.one_hot(y, p.shape[1]).to(p.dtype)) / n
    dq = (ds @ w2.T).reshape(q.shape) * keep
    dr = (
        torch.zeros_like(r)
        .flatten(2)
        .scatter_add_(2, idx.flatten(2), dq.flatten(2))
        .reshape(r.shape)
    )
    dz = torch.where(z > 0, dr, torch.zeros_like(dr))
    da, dgamma, dbeta = bn_backward_compact(dz, a, gamma)
    cols = F.unfold(X, 3, padding=1)
    dw1 = torch.einsum("nfl,nkl->fk", da.flatten(2), cols).reshape(w1.shape)
    return loss, {"W1": dw1, "gamma": dgamma, "beta": dbeta, "W2": hflat.T @ ds, "b2": ds.sum(0)}


# ---- GroupNorm -------------------------------------------------------------------------
def _pc_gn(v, x):
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


def gn_forward_torch(x, num_groups, gamma, beta, eps=1e-5):
    """Vectorised torch on the five-dim view (N, G, C/G, *spatial)."""
    n, c = x.shape[:2]
    v = x.reshape(n, num_groups, c // num_groups, *x.shape[2:])
    dims = tuple(range(2, v.dim()))
    mean = v.mean(dims, keepdim=True)
    var = ((v - mean) ** 2).mean(dims, keepdim=True)
    xhat = ((v - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    return xhat * _pc_gn(gamma, x) + _pc_gn(beta, x)


def gn_forward_numpy(x, num_groups, gamma, beta, eps=1e-5):
    """Through numpy, one group per row."""
    a = x.numpy()
    rows = a.reshape(a.shape[0], num_groups, -1)
    xhat = (
        (rows - rows.mean(-1, keepdims=True)) / np.sqrt(rows.var(-1, keepdims=True) + eps)
    ).reshape(a.shape)
    shape = (1, -1) + (1,) * (a.ndim - 2)
    out = xhat * gamma.numpy().reshape(shape) + beta.numpy().reshape(shape)
    return torch.from_numpy(np.asarray(out)).to(x.dtype)


def gn_forward_loops(x, num_groups, gamma, beta, eps=1e-5):
    """One (example, group) at a time, in Python floats."""
    n, c = x.shape[:2]
    k = c // num_groups
    out = torch.empty_like(x)
    for i in range(n):
        for g in range(num_groups):
            block = x[i, g * k : (g + 1) * k]
            vals = block.reshape(-1).tolist()
            mu = sum(vals) / len(vals)
            rstd = 1 / math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals) + eps)
            for j in range(k):
                ch = g * k + j
                out[i, ch] = (x[i, ch].double() - mu) * rstd * float(gamma[ch]) + float(beta[ch])
    return out


def gn_forward_via_layernorm(x, num_groups, gamma, beta, eps=1e-5):
    """The learner's own LayerNorm on the rows (N, G, C/G * spatial), then the per-channel affine."""
    rows = x.reshape(x.shape[0], num_groups, -1)
    m = rows.shape[-1]
    ones, zeros = torch.ones(m, dtype=x.dtype), torch.zeros(m, dtype=x.dtype)
    xhat = ln_forward_welford(rows, ones, zeros, eps).reshape(x.shape)
    return xhat * _pc_gn(gamma, x) + _pc_gn(beta, x)


def gn_backward_compact(dout, x, num_groups, gamma, eps=1e-5):
    """LayerNorm's compact formula on each (example, group) row, with h = dout * gamma."""
    n = x.shape[0]
    rows = x.reshape(n, num_groups, -1)
    rstd = torch.rsqrt(rows.var(-1, unbiased=False, keepdim=True) + eps)
    xhat = (rows - rows.mean(-1, keepdim=True)) * rstd
    h = (dout * _pc_gn(gamma, x)).reshape(rows.shape)
    dx = rstd * (h - h.mean(-1, keepdim=True) - xhat * (h * xhat).mean(-1, keepdim=True))
    dims = _dims(x)
    return dx.reshape(x.shape), (dout * xhat.reshape(x.shape)).sum(dims), dout.sum(dims)


def gn_backward_via_layernorm(dout, x, num_groups, gamma, eps=1e-5):
    """The learner's own LayerNorm backward on the rows, fed the gradient reaching xhat."""
    rows = x.reshape(x.shape[0], num_groups, -1)
    h = (dout * _pc_gn(gamma, x)).reshape(rows.shape)
    dx, _, _ = ln_backward_compact(h, rows, torch.ones(rows.shape[-1], dtype=x.dtype), eps)
    xhat = gn_forward_torch(x, num_groups, torch.ones_like(gamma), torch.zeros_like(gamma), eps)
    dims = _dims(x)
    return dx.reshape(x.shape), (dout * xhat).sum(dims), dout.sum(dims)


def gn_backward_graph(dout, x, num_groups, gamma, eps=1e-5):
    """Node by node along the graph of §2.2, within each group."""
    rows = x.reshape(x.shape[0], num_groups, -1)
    m = rows.shape[-1]
    mu = rows.sum(-1, keepdim=True) / m
    xc = rows - mu
    var = (xc * xc).sum(-1, keepdim=True) / m
    s = (var + eps) ** -0.5
    xhat = xc * s
    dxhat = (dout * _pc_gn(gamma, x)).reshape(rows.shape)
    ds = (dxhat * xc).sum(-1, keepdim=True)
    dvar = -0.5 * s**3 * ds
    dxc = dxhat * s + dvar * 2 * xc / m
    dmu = -dxc.sum(-1, keepdim=True)
    dx = (dxc + dmu / m).reshape(x.shape)
    dims = _dims(x)
    return dx, (dout * xhat.reshape(x.shape)).sum(dims), dout.sum(dims)


def gn_backward_numpy(dout, x, num_groups, gamma, eps=1e-5):
    """Through numpy, channels moved last for the parameter sums."""
    a, d = x.numpy(), dout.numpy()
    rows = a.reshape(a.shape[0], num_groups, -1)
    rstd = 1 / np.sqrt(rows.var(-1, keepdims=True) + eps)
    xhat = (rows - rows.mean(-1, keepdims=True)) * rstd
    shape = (1, -1) + (1,) * (a.ndim - 2)
    h = (d * gamma.numpy().reshape(shape)).reshape(rows.shape)
    dx = rstd * (h - h.mean(-1, keepdims=True) - xhat * (h * xhat).mean(-1, keepdims=True))
    c = a.shape[1]
    d_last = np.moveaxis(d, 1, -1).reshape(-1, c)
    xhat_last = np.moveaxis(xhat.reshape(a.shape), 1, -1).reshape(-1, c)
    out = (dx.reshape(a.shape), (d_last * xhat_last).sum(0), d_last.sum(0))
    return tuple(torch.from_numpy(np.ascontiguousarray(v)).to(x.dtype) for v in out)


def gn_backward_loops(dout, x, num_groups, gamma, eps=1e-5):
    """One (example, group) at a time, in Python floats."""
    n, c = x.shape[:2]
    k = c // num_groups
    dx = torch.empty_like(x)
    dgamma = torch.zeros(c, dtype=torch.float64)
    dbeta = torch.zeros(c, dtype=torch.float64)
    for i in range(n):
        for g in range(num_groups):
            chans = range(g * k, (g + 1) * k)
            vals = [x[i, ch].reshape(-1).tolist() for ch in chans]
            grads = [dout[i, ch].reshape(-1).tolist() for ch in chans]
            flat = [v for row in vals for v in row]
            m = len(flat)
            mu = sum(flat) / m
            rstd = 1 / math.sqrt(sum((v - mu) ** 2 for v in flat) / m + eps)
            xh = [[(v - mu) * rstd for v in row] for row in vals]
            hs = [
                [gi * float(gamma[ch]) for gi in row] for row, ch in zip(grads, chans, strict=True)
            ]
            mean_h = sum(sum(r) for r in hs) / m
            mean_hx = (
                sum(
                    a * b
                    for rh, rx in zip(hs, xh, strict=True)
                    for a, b in zip(rh, rx, strict=True)
                )
                / m
            )
            for j, ch in enumerate(chans):
                col = [rstd * (a - mean_h - b * mean_hx) for a, b in zip(hs[j], xh[j], strict=True)]
                dx[i, ch] = torch.tensor(col, dtype=torch.float64).reshape(x[i, ch].shape)
                dgamma[ch] += sum(a * b for a, b in zip(grads[j], xh[j], strict=True))
                dbeta[ch] += sum(grads[j])
    return dx, dgamma.to(x.dtype), dbeta.to(x.dtype)


CORRECT = {
    "batchnorm_forward": [bn_forward_torch, bn_forward_numpy, bn_forward_loops, bn_forward_moments],
    "batchnorm_backward": [
        bn_backward_compact,
        bn_backward_graph,
        bn_backward_numpy,
        bn_backward_loops,
    ],
    "layernorm_forward": [
        ln_forward_torch,
        ln_forward_numpy,
        ln_forward_loops,
        ln_forward_welford,
    ],
    "layernorm_backward": [ln_backward_compact, ln_backward_einsum, ln_backward_loops],
    "rmsnorm_forward": [rms_torch, rms_numpy, rms_loops, rms_norm_builtin],
    "batchnorm_backward_staged": [staged_keepdim, staged_numpy],
    "small_cnn_loss": [cnn_other_style],
    "groupnorm_forward": [
        gn_forward_torch,
        gn_forward_numpy,
        gn_forward_loops,
        gn_forward_via_layernorm,
    ],
    "groupnorm_backward": [
        gn_backward_compact,
        gn_backward_via_layernorm,
        gn_backward_graph,
        gn_backward_numpy,
        gn_backward_loops,
    ],
}
CORRECT_CASES = [(ex, fn) for ex, fns in CORRECT.items() for fn in fns]
SLOWEST = {
    "batchnorm_forward": bn_forward_loops,
    "batchnorm_backward": bn_backward_loops,
    "layernorm_forward": ln_forward_loops,
    "layernorm_backward": ln_backward_loops,
    "rmsnorm_forward": rms_loops,
    "batchnorm_backward_staged": staged_numpy,
    "small_cnn_loss": cnn_other_style,
    "groupnorm_forward": gn_forward_loops,
    "groupnorm_backward": gn_backward_loops,
}


@pytest.mark.parametrize(
    ("exercise_id", "fn"), CORRECT_CASES, ids=[f.__name__ for _, f in CORRECT_CASES]
)
def test_correct_implementation_passes_on_every_seed(exercise_id, fn):
    for seed in SEEDS:
        report = cu.check(exercise_id, fn, seed=seed, strict=True)
        assert report.passed, (seed, report)
        assert report.rows, "a passing report lists what it judged"


def test_references_agree_with_autograd_through_pytorch():
    """The battery judges backward passes with aten kernels; they and our references match autograd."""
    torch.manual_seed(0)
    for shape in [(4, 3), (2, 3, 3, 2)]:
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        g = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
        d = torch.randn(*shape, dtype=torch.float64)
        auto = torch.autograd.grad(F.batch_norm(x, None, None, g, b, training=True), (x, g, b), d)
        for mine in (
            ch06.ref_batchnorm_backward(d, x.detach(), g.detach()),
            ch06._torch_batchnorm_backward(d, x.detach(), g.detach(), 1e-5),
        ):
            for a, w in zip(mine, auto, strict=True):
                torch.testing.assert_close(a, w)
        dl = shape[-1]
        gl, bl = (
            g.detach()[:1].expand(dl).clone().requires_grad_(True),
            torch.zeros(dl, dtype=torch.float64, requires_grad=True),
        )
        auto = torch.autograd.grad(F.layer_norm(x, (dl,), gl, bl), (x, gl, bl), d)
        for mine in (
            ch06.ref_layernorm_backward(d, x.detach(), gl.detach()),
            ch06._torch_layernorm_backward(d, x.detach(), gl.detach(), 1e-5),
        ):
            for a, w in zip(mine, auto, strict=True):
                torch.testing.assert_close(a, w)


# =====================================================================================
# Planted mistakes
# =====================================================================================


# ---- BatchNorm forward ------------------------------------------------------------------
def _bn_forward_variant(
    *,
    unbiased_norm=False,
    keras=False,
    eval_batch_stats=False,
    biased_running=False,
    dims_fn=_dims,
    eps_outside=False,
    in_place=False,
    no_update=False,
    update_in_eval=False,
    std_running=False,
):
    def fn(x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5, training=True):
        dims = dims_fn(x)
        batch_mean = x.mean(dims, keepdim=True)
        batch_var = x.var(dims, unbiased=unbiased_norm, keepdim=True)
        m = x.numel() // batch_mean.numel()
        use_batch = training or eval_batch_stats
        if use_batch:
            mean, var = batch_mean, batch_var
        else:
            mean, var = _pc(running_mean, x), _pc(running_var, x)
        den = torch.sqrt(var) + eps if eps_outside else torch.sqrt(var + eps)
        out = (x - mean) / den * _pc(gamma, x) + _pc(beta, x)
        if (training and not no_update) or update_in_eval:
            # the running statistics of the wrong-axes variants come from the right axes, so that
            # only the normalisation is wrong (and the failure is about `out`)
            m = x.numel() // x.shape[1]
            bm = x.mean(_dims(x))
            bv = x.var(_dims(x), unbiased=False) * m / (m - 1)
            if biased_running:
                bv = bv * (m - 1) / m
            if std_running:
                bv = bv.sqrt()
            a, b = (momentum, 1 - momentum) if keras else (1 - momentum, momentum)
            if in_place:
                running_mean.mul_(a).add_(b * bm)
                running_var.mul_(a).add_(b * bv)
                return out, running_mean, running_var
            return out, a * running_mean + b * bm, a * running_var + b * bv
        return out, running_mean.clone(), running_var.clone()

    return fn


def bn_forward_returns_tuple_of_two(
    x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5, training=True
):
    return bn_forward_torch(x, gamma, beta, running_mean, running_var, momentum, eps, training)[:2]


def bn_forward_returns_float64(
    x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5, training=True
):
    out = bn_forward_torch(
        x.double(),
        gamma.double(),
        beta.double(),
        running_mean.double(),
        running_var.double(),
        momentum,
        eps,
        training,
    )
    return out


def bn_forward_eval_variance_not_sqrt(
    x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5, training=True
):
    if training:
        return bn_forward_torch(x, gamma, beta, running_mean, running_var, momentum, eps, training)
    out = (x - _pc(running_mean, x)) / (_pc(running_var, x) + eps) * _pc(gamma, x) + _pc(beta, x)
    return out, running_mean.clone(), running_var.clone()


def bn_forward_running_in_training(
    x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5, training=True
):
    _, rm, rv = bn_forward_torch(x, gamma, beta, running_mean, running_var, momentum, eps, training)
    out = (x - _pc(running_mean, x)) / torch.sqrt(_pc(running_var, x) + eps) * _pc(gamma, x) + _pc(
        beta, x
    )
    return out, rm, rv


def bn_forward_running_is_batch(
    x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5, training=True
):
    out, _, _ = bn_forward_torch(x, gamma, beta, running_mean, running_var, momentum, eps, training)
    if not training:
        return out, running_mean.clone(), running_var.clone()
    dims = _dims(x)
    return out, x.mean(dims), x.var(dims, unbiased=True)


def bn_forward_keepdim_running(
    x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5, training=True
):
    out, rm, rv = bn_forward_torch(
        x, gamma, beta, running_mean, running_var, momentum, eps, training
    )
    return out, _pc(rm, x), _pc(rv, x)


def _per_sample_dims(x):
    return tuple(range(1, x.dim()))


def _n_only(x):
    return (0,)


def _instance_dims(x):
    return (2, 3) if x.dim() == 4 else (0,)


def bn_forward_per_pixel(
    x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5, training=True
):
    """Written for (N, C) and kept for (N, C, H, W): x.mean(0) is then one mean per pixel."""
    if training:
        mean, var, m = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        new_rm = (1 - momentum) * running_mean + momentum * mean
        new_rv = (1 - momentum) * running_var + momentum * var * m / (m - 1)
    else:
        mean, var = _pc(running_mean, x)[0], _pc(running_var, x)[0]
        new_rm, new_rv = running_mean.clone(), running_var.clone()
    return (x - mean) / torch.sqrt(var + eps) * _pc(gamma, x) + _pc(beta, x), new_rm, new_rv


BN_FORWARD_MISTAKES = [
    (
        bn_forward_per_pixel,
        r"x \(2, 3, 3, 4\) .*raised RuntimeError.*It looks like the statistics were taken over N only "
        r"\(x\.mean\(0\)\).*do not broadcast against running_mean",
    ),
    (_bn_forward_variant(unbiased_norm=True), "normalised with the unbiased variance"),
    (_bn_forward_variant(keras=True), "the momentum follows the Keras convention"),
    (_bn_forward_variant(eval_batch_stats=True), "eval mode normalised with the batch statistics"),
    (
        _bn_forward_variant(biased_running=True),
        "running variance was updated with the biased batch variance",
    ),
    (_bn_forward_variant(std_running=True), "batch standard deviation instead of the"),
    (
        _bn_forward_variant(dims_fn=_n_only),
        r"statistics were taken over N only, one per \(c, h, w\)",
    ),
    (
        _bn_forward_variant(dims_fn=_per_sample_dims),
        "statistics were taken per sample, over the channels",
    ),
    (_bn_forward_variant(dims_fn=_instance_dims), "which is InstanceNorm"),
    (_bn_forward_variant(eps_outside=True), "eps was added outside the square root"),
    (_bn_forward_variant(in_place=True), "changed its input `running_mean` in place"),
    (_bn_forward_variant(no_update=True), "was not updated in training mode"),
    (
        _bn_forward_variant(update_in_eval=True),
        "was updated in eval mode; in eval mode the running statistics",
    ),
    (bn_forward_running_is_batch, "is the batch statistic itself"),
    (
        bn_forward_eval_variance_not_sqrt,
        "divided by the running variance instead of its square root",
    ),
    (bn_forward_running_in_training, "running statistics were used to normalise in training mode"),
    (
        bn_forward_keepdim_running,
        r"`new_running_mean` should have shape \(3,\), but it has shape \(1, 3\)",
    ),
    (
        bn_forward_returns_tuple_of_two,
        r"expected a tuple \(out, new_running_mean, new_running_var\)",
    ),
    (bn_forward_returns_float64, r"should have dtype float32 \(the dtype of the inputs\)"),
]


# ---- BatchNorm backward ----------------------------------------------------------------
def _bn_backward_variant(
    *, mean_term=True, var_term=True, unbiased=False, count_n=False, no_gamma=False
):
    def fn(dout, x, gamma, eps=1e-5):
        count = x.shape[0] if count_n else None
        g = torch.ones_like(gamma) if no_gamma else gamma
        dx, _, _ = ch06._bn_backward(
            dout, x, g, eps, unbiased=unbiased, count=count, mean_term=mean_term, var_term=var_term
        )
        _, dgamma, dbeta = bn_backward_compact(dout, x, gamma, eps)
        return dx, dgamma, dbeta

    return fn


def bn_backward_ignores_statistics(dout, x, gamma, eps=1e-5):
    dims = _dims(x)
    _, dgamma, dbeta = bn_backward_compact(dout, x, gamma, eps)
    return (
        dout * _pc(gamma, x) / torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + eps),
        dgamma,
        dbeta,
    )


def bn_backward_dgamma_over_n_only(dout, x, gamma, eps=1e-5):
    dx, _, dbeta = bn_backward_compact(dout, x, gamma, eps)
    dims = _dims(x)
    xhat = (x - x.mean(dims, keepdim=True)) / torch.sqrt(
        x.var(dims, unbiased=False, keepdim=True) + eps
    )
    return dx, (dout * xhat).sum(0), dbeta


def bn_backward_dbeta_over_n_only(dout, x, gamma, eps=1e-5):
    dx, dgamma, _ = bn_backward_compact(dout, x, gamma, eps)
    return dx, dgamma, dout.sum(0)


def bn_backward_dgamma_with_x(dout, x, gamma, eps=1e-5):
    dx, _, dbeta = bn_backward_compact(dout, x, gamma, eps)
    return dx, (dout * x).sum(_dims(x)), dbeta


def bn_backward_dbeta_mean(dout, x, gamma, eps=1e-5):
    dx, dgamma, _ = bn_backward_compact(dout, x, gamma, eps)
    return dx, dgamma, dout.mean(_dims(x))


def bn_backward_autograd(dout, x, gamma, eps=1e-5):
    xs = x.detach().clone().requires_grad_(True)
    gs = gamma.detach().clone().requires_grad_(True)
    y = F.batch_norm(xs, None, None, gs, None, training=True, eps=eps)
    y.backward(dout)
    return xs.grad, gs.grad, dout.sum(_dims(x))


def bn_backward_per_pixel(dout, x, gamma, eps=1e-5):
    """Statistics over N only (right for (N, C), one per pixel on (N, C, H, W)); dgamma, dbeta per channel."""
    m = x.shape[0]
    rstd = 1 / torch.sqrt(x.var(0, unbiased=False) + eps)
    xhat = (x - x.mean(0)) * rstd
    dims = _dims(x)
    dxhat = dout * _pc(gamma, x)
    dx = rstd / m * (m * dxhat - dxhat.sum(0) - xhat * (dxhat * xhat).sum(0))
    return dx, (dout * xhat).sum(dims), dout.sum(dims)


def bn_backward_dgamma_per_pixel_xhat(dout, x, gamma, eps=1e-5):
    dx, _, dbeta = bn_backward_compact(dout, x, gamma, eps)
    xhat = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + eps)
    return dx, (dout * xhat).sum(_dims(x)), dbeta


BN_BACKWARD_MISTAKES = [
    (
        bn_backward_per_pixel,
        r"x \(2, 3, 3, 4\) .*`dx` is wrong.*the batch statistics were taken over N only \(x\.mean\(0\)",
    ),
    (
        bn_backward_dgamma_per_pixel_xhat,
        r"`dgamma` is wrong.*xhat was normalised with statistics over N only",
    ),
    (bn_backward_ignores_statistics, r"dx = dout \* gamma / sqrt\(var \+ eps\) only"),
    (_bn_backward_variant(mean_term=False), "dx misses the term from the batch mean"),
    (_bn_backward_variant(var_term=False), "dx misses the term from the batch variance"),
    (_bn_backward_variant(unbiased=True), "the backward used the unbiased variance"),
    (_bn_backward_variant(count_n=True), "the means were taken with M = N"),
    (_bn_backward_variant(no_gamma=True), "dx was not multiplied by gamma"),
    (bn_backward_dgamma_over_n_only, r"`dgamma` has shape \(3, 3, 4\).*summed over N, H and W"),
    (bn_backward_dbeta_over_n_only, r"`dbeta` has shape \(3, 3, 4\).*summed over N, H and W"),
    (bn_backward_dgamma_with_x, "dgamma sums dout \\* x"),
    (bn_backward_dbeta_mean, "dbeta is the mean of dout"),
    (bn_backward_autograd, "called autograd"),
]


# ---- LayerNorm -------------------------------------------------------------------------
def ln_forward_all_dims(x, gamma, beta, eps=1e-5):
    dims = tuple(range(1, x.dim())) if x.dim() > 1 else (0,)
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * gamma + beta


def ln_forward_unbiased(x, gamma, beta, eps=1e-5):
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + eps) * gamma + beta


def ln_forward_eps_outside(x, gamma, beta, eps=1e-5):
    return (x - x.mean(-1, keepdim=True)) / (
        x.std(-1, unbiased=False, keepdim=True) + eps
    ) * gamma + beta


def ln_forward_over_batch(x, gamma, beta, eps=1e-5):
    mean = x.mean(0, keepdim=True)
    return (x - mean) / torch.sqrt(x.var(0, unbiased=False, keepdim=True) + eps) * gamma + beta


def ln_forward_swapped(x, gamma, beta, eps=1e-5):
    return ln_forward_torch(x, beta, gamma, eps)


def ln_forward_no_affine(x, gamma, beta, eps=1e-5):
    return ln_forward_torch(x, torch.ones_like(gamma), torch.zeros_like(beta), eps)


LN_FORWARD_MISTAKES = [
    (ln_forward_all_dims, "statistics were taken over every dim after the first"),
    (ln_forward_unbiased, "the variance is the unbiased one"),
    (ln_forward_eps_outside, "eps was added outside the square root"),
    (ln_forward_over_batch, r"taken over the batch \(dim 0\), as BatchNorm does"),
    (ln_forward_swapped, "gamma and beta were swapped"),
    (ln_forward_no_affine, "gamma and beta were not applied"),
]


def _ln_backward_variant(*, mean_term=True, var_term=True, no_gamma=False):
    def fn(dout, x, gamma, eps=1e-5):
        g = torch.ones_like(gamma) if no_gamma else gamma
        dx = ch06._ln_backward(dout, x, g, eps, mean_term=mean_term, var_term=var_term)[0]
        _, dgamma, dbeta = ln_backward_compact(dout, x, gamma, eps)
        return dx, dgamma, dbeta

    return fn


def ln_backward_ignores_statistics(dout, x, gamma, eps=1e-5):
    _, dgamma, dbeta = ln_backward_compact(dout, x, gamma, eps)
    return dout * gamma / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps), dgamma, dbeta


def ln_backward_sum_dim0_only(dout, x, gamma, eps=1e-5):
    dx, _, _ = ln_backward_compact(dout, x, gamma, eps)
    xhat = (x - x.mean(-1, keepdim=True)) / torch.sqrt(
        x.var(-1, unbiased=False, keepdim=True) + eps
    )
    return dx, (dout * xhat).sum(0), dout.sum(0)


def ln_backward_dgamma_with_x(dout, x, gamma, eps=1e-5):
    dx, _, dbeta = ln_backward_compact(dout, x, gamma, eps)
    return dx, (dout * x).reshape(-1, x.shape[-1]).sum(0), dbeta


def ln_backward_dbeta_mean(dout, x, gamma, eps=1e-5):
    dx, dgamma, _ = ln_backward_compact(dout, x, gamma, eps)
    return dx, dgamma, dout.reshape(-1, x.shape[-1]).mean(0)


LN_BACKWARD_MISTAKES = [
    (ln_backward_ignores_statistics, r"dx = dout \* gamma / sqrt\(var \+ eps\) only"),
    (_ln_backward_variant(mean_term=False), "dx misses the term from the mean"),
    (_ln_backward_variant(var_term=False), "dx misses the term from the variance"),
    (_ln_backward_variant(no_gamma=True), "dx was not multiplied by gamma"),
    (ln_backward_sum_dim0_only, r"`dgamma` has shape \(3, 5\).*sum it over ALL leading dims"),
    (ln_backward_dgamma_with_x, r"dgamma sums dout \* x"),
    (ln_backward_dbeta_mean, "dbeta is a mean over the leading dims"),
]


# ---- RMSNorm -----------------------------------------------------------------------------
def rms_subtracts_mean(x, weight, eps=1e-6):
    c = x - x.mean(-1, keepdim=True)
    return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps) * weight


def rms_eps_outside(x, weight, eps=1e-6):
    return x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps) * weight


def rms_sum(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps) * weight


def rms_no_sqrt(x, weight, eps=1e-6):
    return x / (x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rms_no_weight(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rms_default_eps(x, weight, eps=1e-5):
    return rms_torch(x, weight, eps)


def rms_all_dims(x, weight, eps=1e-6):
    dims = tuple(range(1, x.dim())) if x.dim() > 1 else (0,)
    return x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps) * weight


RMS_MISTAKES = [
    (rms_subtracts_mean, r"the mean was subtracted first \(that is LayerNorm\)"),
    (rms_eps_outside, "eps was added outside the square root"),
    (rms_sum, "the squares were summed, not averaged"),
    (rms_no_sqrt, "without the square root"),
    (rms_no_weight, "the weight was not applied"),
    (rms_default_eps, "the default eps is not 1e-6"),
    (rms_all_dims, "taken over every dim but the first"),
]


# ---- BatchNorm backward, staged, and the small CNN -------------------------------------------
def _staged_slip(slip):
    def fn(dout, x, gamma, eps=1e-5):
        return ch06._bn_staged(dout, x, gamma, eps, slip)

    fn.__name__ = f"staged_{slip}"
    return fn


def staged_as_tuple(dout, x, gamma, eps=1e-5):
    return tuple(staged_keepdim(dout, x, gamma, eps).values())


def staged_autograd(dout, x, gamma, eps=1e-5):
    out = staged_keepdim(dout, x, gamma, eps)
    xr = x.clone().requires_grad_(True)
    out["dx"] = torch.autograd.grad(
        F.batch_norm(xr, None, None, gamma, None, training=True, eps=eps), xr, dout
    )[0]
    return out


STAGED_MISTAKES = [
    (
        _staged_slip(slip),
        f"`{node}` is wrong.*{re.escape(sentence[:40])}",
    )
    for node, pairs in ch06.STAGED_MISTAKES.items()
    for slip, sentence in pairs
] + [
    (staged_as_tuple, "expected a dict with the keys dxhat"),
    (staged_autograd, "autograd"),
]


def _cnn_slip(slip):
    def fn(params, X, y, train=True, dropout_p=0.0, bn_state=None):
        return ch06._small_cnn(params, X, y, train, dropout_p, bn_state, slip)

    fn.__name__ = f"cnn_{slip}"
    return fn


def cnn_updates_state_in_eval(params, X, y, train=True, dropout_p=0.0, bn_state=None):
    out = cnn_other_style(params, X, y, train, dropout_p, bn_state)
    if not train and bn_state is not None:  # normalised with the old statistics, then updated them
        cnn_other_style(params, X, y, True, 0.0, bn_state)
    return out


def cnn_sum_loss(params, X, y, train=True, dropout_p=0.0, bn_state=None):
    out = cnn_other_style(params, X, y, train, dropout_p, bn_state)
    return out if y is None else (out[0] * X.shape[0], out[1])


CNN_MISTAKES = [
    (_cnn_slip("relu_pass_all"), r"grads\['beta'\]` is wrong.*ReLU passed the gradient everywhere"),
    (_cnn_slip("relu_mask_from_conv"), "the ReLU mask came from the wrong cache"),
    (_cnn_slip("ce_not_mean"), r"grads\['b2'\]` is wrong.*not divided by N"),
    (_cnn_slip("pool_spread"), "spread evenly over each window"),
    (
        _cnn_slip("bn_constant_stats"),
        r"grads\['W1'\]` is wrong.*treated the batch mean and variance as constants",
    ),
    (_cnn_slip("bn_running_in_train"), "normalised with the running statistics in train mode"),
    (_cnn_slip("bn_state_biased"), "updated with the biased batch variance"),
    (cnn_updates_state_in_eval, "bn_state was updated in eval mode"),
    (cnn_sum_loss, "the loss is the SUM over the batch"),
]


# ---- GroupNorm -------------------------------------------------------------------------
def _gn_forward_variant(*, sets="group", unbiased=False, eps_outside=False):
    def fn(x, num_groups, gamma, beta, eps=1e-5):
        xhat = ch06._gn_normalise(x, num_groups, eps, sets, unbiased=unbiased, outside=eps_outside)
        return xhat * _pc_gn(gamma, x) + _pc_gn(beta, x)

    return fn


def gn_forward_affine_on_groups(x, num_groups, gamma, beta, eps=1e-5):
    """gamma and beta broadcast over the grouped rows (N, G, M), as if they were per group."""
    rows = x.reshape(x.shape[0], num_groups, -1)
    xhat = (rows - rows.mean(-1, keepdim=True)) / torch.sqrt(
        rows.var(-1, unbiased=False, keepdim=True) + eps
    )
    return (xhat * gamma.reshape(1, -1, 1) + beta.reshape(1, -1, 1)).reshape(x.shape)


def gn_forward_affine_on_last_dim(x, num_groups, gamma, beta, eps=1e-5):
    """gamma and beta applied to the grouped rows as LayerNorm applies them, along the last dim."""
    rows = x.reshape(x.shape[0], num_groups, -1)
    xhat = (rows - rows.mean(-1, keepdim=True)) / torch.sqrt(
        rows.var(-1, unbiased=False, keepdim=True) + eps
    )
    return (xhat * gamma + beta).reshape(x.shape)


def gn_forward_no_affine(x, num_groups, gamma, beta, eps=1e-5):
    return ch06._gn_normalise(x, num_groups, eps)


def gn_forward_swapped(x, num_groups, gamma, beta, eps=1e-5):
    return gn_forward_torch(x, num_groups, beta, gamma, eps)


def gn_forward_moments(x, num_groups, gamma, beta, eps=1e-5):
    """Variance as E[x^2] - E[x]^2, summed and divided, in the input's dtype."""
    rows = x.reshape(x.shape[0], num_groups, -1)
    m = rows.shape[-1]
    mean = rows.sum(-1, keepdim=True) / m
    var = (rows**2).sum(-1, keepdim=True) / m - mean**2
    xhat = ((rows - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    return xhat * _pc_gn(gamma, x) + _pc_gn(beta, x)


def gn_forward_float64(x, num_groups, gamma, beta, eps=1e-5):
    return gn_forward_torch(x.double(), num_groups, gamma.double(), beta.double(), eps)


def gn_forward_in_place(x, num_groups, gamma, beta, eps=1e-5):
    out = gn_forward_torch(x, num_groups, gamma, beta, eps)
    x.zero_()
    return out


GN_FORWARD_MISTAKES = [
    (_gn_forward_variant(sets="instance"), "which is InstanceNorm"),
    (_gn_forward_variant(sets="layer"), r"over all channels of an example \(LayerNorm"),
    (_gn_forward_variant(sets="batch"), r"per channel over the batch \(that is BatchNorm\)"),
    (_gn_forward_variant(sets="group_and_batch"), "over the whole batch as well"),
    (_gn_forward_variant(sets="interleaved"), "grouped by interleaving"),
    (_gn_forward_variant(unbiased=True), r"the variance is the unbiased one"),
    (_gn_forward_variant(eps_outside=True), "eps was added outside the square root"),
    (gn_forward_affine_on_groups, r"raised RuntimeError.*gamma or beta met the grouped view"),
    (gn_forward_affine_on_last_dim, r"raised RuntimeError.*gamma or beta met the grouped view"),
    (gn_forward_no_affine, "gamma and beta were not applied"),
    (gn_forward_swapped, "gamma and beta were swapped"),
    (gn_forward_moments, r"offset 100000.*E\[x\*\*2\] - E\[x\]\*\*2"),
    (gn_forward_float64, r"should have dtype float32 \(the dtype of the inputs\)"),
    (gn_forward_in_place, "changed its input `x` in place"),
]


def _gn_backward_variant(**kw):
    def fn(dout, x, num_groups, gamma, eps=1e-5):
        return ch06._gn_backward(dout, x, num_groups, gamma, eps, **kw)

    return fn


def gn_backward_no_gamma(dout, x, num_groups, gamma, eps=1e-5):
    dx, _, _ = gn_backward_compact(dout, x, num_groups, torch.ones_like(gamma), eps)
    return (dx, *gn_backward_compact(dout, x, num_groups, gamma, eps)[1:])


def _gn_params(dout, x, num_groups, gamma, eps):
    xhat = gn_forward_torch(x, num_groups, torch.ones_like(gamma), torch.zeros_like(gamma), eps)
    return gn_backward_compact(dout, x, num_groups, gamma, eps)[0], xhat


def gn_backward_params_per_example(dout, x, num_groups, gamma, eps=1e-5):
    """dgamma, dbeta summed over the spatial dims only: one per (example, channel)."""
    dx, xhat = _gn_params(dout, x, num_groups, gamma, eps)
    dims = tuple(range(2, x.dim()))
    if not dims:
        return dx, dout * xhat, dout * 1.0
    return dx, (dout * xhat).sum(dims), dout.sum(dims)


def gn_backward_params_over_n_only(dout, x, num_groups, gamma, eps=1e-5):
    dx, xhat = _gn_params(dout, x, num_groups, gamma, eps)
    return dx, (dout * xhat).sum(0), dout.sum(0)


def gn_backward_params_per_group(dout, x, num_groups, gamma, eps=1e-5):
    """dgamma, dbeta reduced per group, as if gamma and beta had one value per group."""
    dx, xhat = _gn_params(dout, x, num_groups, gamma, eps)
    rows_d = dout.reshape(x.shape[0], num_groups, -1)
    rows_x = xhat.reshape(rows_d.shape)
    return dx, (rows_d * rows_x).sum((0, 2)), rows_d.sum((0, 2))


def gn_backward_dgamma_with_x(dout, x, num_groups, gamma, eps=1e-5):
    dx, _, dbeta = gn_backward_compact(dout, x, num_groups, gamma, eps)
    return dx, (dout * x).sum(_dims(x)), dbeta


def gn_backward_means(dout, x, num_groups, gamma, eps=1e-5):
    dx, dgamma, dbeta = gn_backward_compact(dout, x, num_groups, gamma, eps)
    count = x.numel() // x.shape[1]
    return dx, dgamma / count, dbeta / count


def gn_backward_dbeta_mean(dout, x, num_groups, gamma, eps=1e-5):
    dx, dgamma, dbeta = gn_backward_compact(dout, x, num_groups, gamma, eps)
    return dx, dgamma, dbeta / (x.numel() // x.shape[1])


def gn_backward_affine_on_groups(dout, x, num_groups, gamma, eps=1e-5):
    """gamma broadcast over the grouped rows (N, G, M): a (C,) vector against G groups."""
    rows = x.reshape(x.shape[0], num_groups, -1)
    h = dout.reshape(rows.shape) * gamma.reshape(1, -1, 1)
    return (h.reshape(x.shape), *gn_backward_compact(dout, x, num_groups, gamma, eps)[1:])


def gn_backward_autograd(dout, x, num_groups, gamma, eps=1e-5):
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        out = gn_forward_torch(xr, num_groups, gamma, torch.zeros_like(gamma), eps)
        (dx,) = torch.autograd.grad(out, xr, dout)
    return (dx, *gn_backward_compact(dout, x, num_groups, gamma, eps)[1:])


GN_BACKWARD_MISTAKES = [
    (
        _gn_backward_variant(mean_term=False, var_term=False),
        "each group's mean and variance depend on x too",
    ),
    (_gn_backward_variant(mean_term=False), "dx misses the term from the group mean"),
    (_gn_backward_variant(var_term=False), "dx misses the term from the group variance"),
    (_gn_backward_variant(gamma_outside=True), "gamma was taken out of the group's sums"),
    (gn_backward_no_gamma, "dx was not multiplied by gamma"),
    (_gn_backward_variant(unbiased=True), "the backward used the unbiased variance"),
    (_gn_backward_variant(sets="instance"), r"which is InstanceNorm.*\(in the backward pass\)"),
    (_gn_backward_variant(sets="layer"), r"LayerNorm over \(C, \.\.\.\).*\(in the backward pass\)"),
    (_gn_backward_variant(sets="batch"), r"that is BatchNorm.*\(in the backward pass\)"),
    (
        _gn_backward_variant(sets="interleaved"),
        r"grouped by interleaving.*\(in the backward pass\)",
    ),
    (
        gn_backward_params_per_example,
        r"`dgamma` has shape \(4, 8\); it was not summed over the batch dim N",
    ),
    (
        gn_backward_params_over_n_only,
        r"`dgamma` has shape \(6, 5\); it was summed over N but not over the spatial",
    ),
    (gn_backward_params_per_group, r"`dgamma` has shape \(2,\); it has one value per group"),
    (gn_backward_dgamma_with_x, r"dgamma sums dout \* x"),
    (gn_backward_means, "dgamma is a mean over N and the spatial dims"),
    (gn_backward_dbeta_mean, "dbeta is a mean over N and the spatial dims"),
    (gn_backward_affine_on_groups, r"raised RuntimeError.*gamma or beta met the grouped view"),
    (gn_backward_autograd, "derive the gradient by hand"),
]


MISTAKES = (
    [("batchnorm_forward", f, m) for f, m in BN_FORWARD_MISTAKES]
    + [("batchnorm_backward", f, m) for f, m in BN_BACKWARD_MISTAKES]
    + [("layernorm_forward", f, m) for f, m in LN_FORWARD_MISTAKES]
    + [("layernorm_backward", f, m) for f, m in LN_BACKWARD_MISTAKES]
    + [("rmsnorm_forward", f, m) for f, m in RMS_MISTAKES]
    + [("batchnorm_backward_staged", f, m) for f, m in STAGED_MISTAKES]
    + [("small_cnn_loss", f, m) for f, m in CNN_MISTAKES]
    + [("groupnorm_forward", f, m) for f, m in GN_FORWARD_MISTAKES]
    + [("groupnorm_backward", f, m) for f, m in GN_BACKWARD_MISTAKES]
)


@pytest.mark.parametrize(
    ("exercise_id", "fn", "message"),
    MISTAKES,
    ids=[f"{ex}-{i}-{getattr(f, '__name__', 'variant')}" for i, (ex, f, _) in enumerate(MISTAKES)],
)
@pytest.mark.forbidden_calls_allowed
def test_planted_mistake_is_named(exercise_id, fn, message):
    for seed in MISTAKE_SEEDS:
        with pytest.raises(cu.CheckFailure, match=message):
            cu.check(exercise_id, fn, seed=seed, strict=True)


def test_per_pixel_statistics_are_not_blamed_on_keepdim():
    # The broadcasting error they cause used to come with "a reduction without keepdim=True".
    with pytest.raises(cu.CheckFailure) as info:
        cu.check("batchnorm_forward", bn_forward_per_pixel, strict=True)
    assert "keepdim" not in str(info.value)


def gn_forward_layer_norm_on_rows(x, num_groups, gamma, beta, eps=1e-5):
    rows = x.reshape(x.shape[0], num_groups, -1)
    xhat = F.layer_norm(rows, rows.shape[-1:], eps=eps).reshape(x.shape)
    return xhat * _pc_gn(gamma, x) + _pc_gn(beta, x)


def gn_forward_instance_norm_on_groups(x, num_groups, gamma, beta, eps=1e-5):
    rows = x.reshape(x.shape[0], num_groups, -1)
    xhat = F.instance_norm(rows, eps=eps).reshape(x.shape)
    return xhat * _pc_gn(gamma, x) + _pc_gn(beta, x)


def gn_forward_batch_norm_on_groups(x, num_groups, gamma, beta, eps=1e-5):
    rows = x.reshape(1, x.shape[0] * num_groups, -1)
    xhat = F.batch_norm(rows, None, None, training=True, eps=eps).reshape(x.shape)
    return xhat * _pc_gn(gamma, x) + _pc_gn(beta, x)


def gn_forward_rms_norm_of_centred(x, num_groups, gamma, beta, eps=1e-5):
    rows = x.reshape(x.shape[0], num_groups, -1)
    centred = rows - rows.mean(-1, keepdim=True)
    xhat = F.rms_norm(centred, rows.shape[-1:], eps=eps).reshape(x.shape)
    return xhat * _pc_gn(gamma, x) + _pc_gn(beta, x)


def gn_backward_aten_kernel(dout, x, num_groups, gamma, eps=1e-5):
    n, c = x.shape[:2]
    hw = x.numel() // (n * c)
    _, mean, rstd = torch.ops.aten.native_group_norm(x, gamma, None, n, c, hw, num_groups, eps)
    return torch.ops.aten.native_group_norm_backward(
        dout, x, mean, rstd, gamma, n, c, hw, num_groups, [True] * 3
    )


@pytest.mark.parametrize(
    ("exercise_id", "fn", "call"),
    [
        (
            "groupnorm_forward",
            lambda x, g, w, b, eps=1e-5: F.group_norm(x, g, w, b, eps),
            "F.group_norm",
        ),
        ("groupnorm_forward", gn_forward_layer_norm_on_rows, "F.layer_norm"),
        ("groupnorm_forward", gn_forward_instance_norm_on_groups, "F.instance_norm"),
        ("groupnorm_forward", gn_forward_batch_norm_on_groups, "F.batch_norm"),
        ("groupnorm_forward", gn_forward_rms_norm_of_centred, "F.rms_norm"),
        ("groupnorm_backward", gn_backward_aten_kernel, "torch.ops.aten.native_group_norm"),
    ],
    ids=["group_norm", "layer_norm", "instance_norm", "batch_norm", "rms_norm", "aten"],
)
def test_groupnorm_may_not_call_a_norm_of_pytorch(exercise_id, fn, call):
    with pytest.raises(cu.CheckFailure, match=re.escape(f"called {call},")):
        cu.check(exercise_id, fn, strict=True)


def test_groupnorm_references_agree_with_autograd_through_f_group_norm():
    torch.manual_seed(0)
    for shape, groups in [((4, 6), 3), ((2, 6, 5), 2), ((2, 4, 3, 3), 1), ((3, 4, 2, 2), 4)]:
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        w = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
        d = torch.randn(*shape, dtype=torch.float64)
        out = F.group_norm(x, groups, w, b)
        torch.testing.assert_close(
            ch06.ref_groupnorm_forward(x.detach(), groups, w.detach(), b.detach()), out.detach()
        )
        auto = torch.autograd.grad(out, (x, w, b), d)
        for mine in (
            ch06.ref_groupnorm_backward(d, x.detach(), groups, w.detach()),
            ch06._torch_groupnorm_backward(d, x.detach(), groups, w.detach(), 1e-5),
        ):
            for a, want in zip(mine, auto, strict=True):
                torch.testing.assert_close(a, want)


def test_groupnorm_planted_mistakes_differ_from_the_answer_where_they_are_offered():
    """A mistake the battery offers for a case must differ there from the right answer (else it names nothing)."""
    t = cu.checking.Tester(cu.checking.get_exercise("groupnorm_forward"), None, 0)
    for shape, groups, _dtype, eps, _ in ch06._GN_SETTINGS:
        x, gamma, beta = ch06._gn_inputs(t, shape, torch.float64)
        eps = 1e-5 if eps is None else eps
        want = F.group_norm(x, groups, gamma, beta, eps)
        for sentence, alt in ch06._gn_out_mistakes(x, groups, gamma, beta, eps)[:-1]:
            assert not torch.allclose(alt(), want, rtol=1e-6, atol=1e-8), (shape, groups, sentence)


# =====================================================================================
# Pending stubs, registration, timing, SyncBatchNorm demo
# =====================================================================================
def test_exercises_of_chapter_06_are_registered_with_their_contract():
    listed = {e.id: e for e in cu.exercises("06")}
    assert set(listed) == set(CORRECT)
    assert listed["batchnorm_forward"].signature == (
        "(x, gamma, beta, running_mean, running_var, momentum=0.1, eps=1e-5, training=True) "
        "-> (out, new_running_mean, new_running_var)"
    )
    assert (
        listed["batchnorm_backward"].signature
        == "(dout, x, gamma, eps=1e-5) -> (dx, dgamma, dbeta)"
    )
    assert listed["layernorm_forward"].signature == "(x, gamma, beta, eps=1e-5) -> out"
    assert (
        listed["layernorm_backward"].signature
        == "(dout, x, gamma, eps=1e-5) -> (dx, dgamma, dbeta)"
    )
    assert listed["rmsnorm_forward"].signature == "(x, weight, eps=1e-6) -> out"
    assert listed["batchnorm_backward_staged"].signature == (
        "(dout, x, gamma, eps=1e-5) -> dict of dxhat, drstd, dvar, dxc, dmean, dx, dgamma, dbeta"
    )
    assert listed["small_cnn_loss"].signature == (
        "(params, X, y, train=True, dropout_p=0.0, bn_state=None) -> (loss, grads)"
    )
    assert listed["groupnorm_forward"].signature == (
        "(x (N,C,*), num_groups, gamma (C,), beta (C,), eps=1e-5) -> out"
    )
    assert listed["groupnorm_backward"].signature == (
        "(dout, x (N,C,*), num_groups, gamma (C,), eps=1e-5) -> (dx, dgamma, dbeta)"
    )
    assert listed["groupnorm_backward"].backward and not listed["groupnorm_forward"].backward
    for ex in ("groupnorm_forward", "groupnorm_backward"):
        assert {"group_norm", "layer_norm", "instance_norm", "batch_norm"} <= set(
            listed[ex].forbidden
        )
    assert listed["batchnorm_backward_staged"].backward and listed["small_cnn_loss"].backward
    assert listed["batchnorm_backward"].backward and listed["layernorm_backward"].backward
    assert not listed["batchnorm_forward"].backward


def test_report_check_seconds(capsys):
    """Times each check on the reference and the slowest correct style; reported, never asserted."""
    report_check_seconds(SLOWEST, capsys)
