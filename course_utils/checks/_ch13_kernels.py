"""Chapter 13's reference Triton kernels (``@triton.jit``); their launchers are the ``ref_*`` of ch13.

Imported on first use by ``ch13_triton_kernels``, never when the batteries are registered, so
the checks import without Triton, and ``TRITON_INTERPRET=1`` (read when a kernel is decorated)
still takes effect if it is set before the first launch. Every kernel computes in float32
registers whatever the dtype in memory, and masks the last, partial block.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def softmax_kernel(x_ptr, y_ptr, n_cols, x_row_stride, y_row_stride, BLOCK: tl.constexpr):
    """One program per row: y[row] = softmax(x[row]), the row held in registers."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=-float("inf")).to(tl.float32)
    z = x - tl.max(x, axis=0)  # the largest exponent is 0: no overflow
    e = tl.exp(z)
    y = e / tl.sum(e, axis=0)
    tl.store(y_ptr + row * y_row_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rmsnorm_forward_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, x_row_stride, y_row_stride, eps, BLOCK: tl.constexpr
):
    """One program per row: y = x * rstd * w with rstd = 1/sqrt(mean(x**2) + eps); rstd is kept."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)  # divide by n_cols, not BLOCK
    tl.store(rstd_ptr + row, rstd)
    tl.store(
        y_ptr + row * y_row_stride + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask
    )


@triton.jit
def rmsnorm_backward_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    dx_ptr,
    dw_partial_ptr,
    n_rows,
    n_cols,
    eps,
    ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Each program takes ROWS_PER_PROGRAM rows: dx row by row, and its share of dweight summed in registers.

    All tensors are contiguous (n_rows, n_cols); dw_partial is (programs, n_cols) float32.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(ROWS_PER_PROGRAM):
        row = (pid * ROWS_PER_PROGRAM + i).to(tl.int64)
        mask = col_mask & (row < n_rows)
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        xhat = x * rstd
        g = dy * w
        # rstd depends on x: the second term is the mean-of-squares path of the derivation
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
        tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(dw_partial_ptr + pid * n_cols + cols, dw, mask=col_mask)


@triton.jit
def rope_kernel(x_ptr, pos_ptr, y_ptr, seq_len, head_dim, log2_base, HALF: tl.constexpr):
    """One program per row of x (..., L, d): rotate the pairs (x[2i], x[2i+1]) by pos * base^(-2i/d)."""
    row = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + row % seq_len).to(tl.float32)
    i = tl.arange(0, HALF)
    mask = i < head_dim // 2
    base = row * head_dim
    x_even = tl.load(x_ptr + base + 2 * i, mask=mask, other=0.0).to(tl.float32)
    x_odd = tl.load(x_ptr + base + 2 * i + 1, mask=mask, other=0.0).to(tl.float32)
    angle = pos * tl.exp2(-(2.0 * i / head_dim) * log2_base)
    c, s = tl.cos(angle), tl.sin(angle)
    out_ty = y_ptr.dtype.element_ty
    tl.store(y_ptr + base + 2 * i, (x_even * c - x_odd * s).to(out_ty), mask=mask)
    tl.store(y_ptr + base + 2 * i + 1, (x_even * s + x_odd * c).to(out_ty), mask=mask)


@triton.jit
def swiglu_kernel(gate_ptr, up_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """Elementwise over flat contiguous tensors: y = silu(gate) * up = gate * sigmoid(gate) * up."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def int8_gemv_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    out_ptr,
    N,
    K,
    x_row_stride,
    out_row_stride,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (n block, batch row b): out[b, n] = scale[n] * sum_k x[b, k] * q[n, k].

    q is contiguous (N, K) int8; each (BLOCK_N, BLOCK_K) tile is converted to float32 in
    registers, so the dequantised weight never exists in memory.
    """
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + b * x_row_stride + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        tile = offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
        w = tl.load(q_ptr + tile, mask=n_mask[:, None] & k_mask[None, :], other=0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    out = (acc * scale).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + b * out_row_stride + offs_n, out, mask=n_mask)


@triton.jit
def int4_gemv_kernel(
    x_ptr,
    packed_ptr,
    scale_ptr,
    out_ptr,
    N,
    K,
    x_row_stride,
    out_row_stride,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """As int8_gemv_kernel on packed (N, K/2) uint8: byte j holds q[2j] (low nibble) and q[2j+1] (high).

    Each tile of BLOCK_K/2 bytes is unpacked and sign-extended in registers; the even and odd
    columns of x meet the low and high nibbles.
    """
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    HALF_K: tl.constexpr = BLOCK_K // 2
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    K2 = K // 2
    for j0 in range(0, K2, HALF_K):
        offs_j = j0 + tl.arange(0, HALF_K)
        j_mask = offs_j < K2
        x_row = x_ptr + b * x_row_stride
        x_even = tl.load(x_row + 2 * offs_j, mask=j_mask, other=0.0).to(tl.float32)
        x_odd = tl.load(x_row + 2 * offs_j + 1, mask=j_mask, other=0.0).to(tl.float32)
        tile = offs_n[:, None].to(tl.int64) * K2 + offs_j[None, :]
        p = tl.load(packed_ptr + tile, mask=n_mask[:, None] & j_mask[None, :], other=0).to(tl.int32)
        lo = p & 15
        hi = (p >> 4) & 15
        lo = lo - ((lo >> 3) << 4)  # nibbles 8..15 are -8..-1 in two's complement
        hi = hi - ((hi >> 3) << 4)
        acc += tl.sum(
            lo.to(tl.float32) * x_even[None, :] + hi.to(tl.float32) * x_odd[None, :], axis=1
        )
    scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    out = (acc * scale).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + b * out_row_stride + offs_n, out, mask=n_mask)


@triton.jit
def flash_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    slopes_ptr,
    n_heads,
    L,
    S,
    qk_scale,
    CAUSAL: tl.constexpr,
    ALIBI: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """FlashAttention-2 forward. Program (query block, batch*head); q, o (BH, L, D), k, v (BH, S, D) contiguous.

    Scores in base 2: qk_scale = log2(e)/sqrt(D), so exp2 replaces exp. The running maximum m,
    sum l and unnormalised output acc are rescaled when m grows; one division at the end.
    ALiBi adds slope_h * (j - i) to the natural-log scores; CAUSAL hides keys j > i.
    """
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < L
    q = tl.load(
        q_ptr + bh * L * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
        mask=m_mask[:, None],
        other=0.0,
    )
    m_i = tl.full((BLOCK_M,), -float("inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    slope = 0.0
    if ALIBI:  # a constexpr branch: compiled only when ALIBI is set
        slope = tl.load(slopes_ptr + bh % n_heads).to(tl.float32) * 1.4426950408889634
    end = S
    if CAUSAL:
        end = tl.minimum(S, (start_m + 1) * BLOCK_M)  # later key blocks lie in every query's future
    for start_n in range(0, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < S
        kv_off = bh * S * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(k_ptr + kv_off, mask=n_mask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if ALIBI:
            s += slope * (offs_n[None, :] - offs_m[:, None]).to(tl.float32)
        keep = n_mask[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(keep, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old maximum
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kv_off, mask=n_mask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    o_off = bh * L * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None])
