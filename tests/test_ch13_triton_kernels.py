"""Chapter 13 batteries: correct implementations in several styles pass, planted mistakes are named.

The Triton kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set here before
Triton is imported), as they do in CI and in the notebook on a CPU. Tests that need Triton skip
when it is not installed; the plain-torch exercises are tested either way.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: CPU tensors, interpreted kernels

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import course_utils as cu  # noqa: E402
from course_utils.checks import ch13_triton_kernels as ch13  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels extra is optional
    triton = tl = None

needs_triton = pytest.mark.skipif(triton is None, reason="Triton is not installed")
SEEDS = range(5)
CHAPTER = "13_triton_kernels"


def _fails(exercise_id: str, fn, *phrases: str) -> str:
    with pytest.raises(cu.CheckFailure) as info:
        cu.check(exercise_id, fn)
    text = str(info.value)
    for phrase in phrases:
        assert phrase in text, text
    return text


# =====================================================================================
# References pass, over seeds
# =====================================================================================
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "exercise_id", ["rmsnorm_backward", "quantize_int8", "int8_gemv", "pack_int4", "unpack_int4"]
)
def test_contract_references_pass(exercise_id, seed):
    assert cu.check(exercise_id, cu.reference(exercise_id), seed=seed).passed


@needs_triton
@pytest.mark.parametrize("seed", (0, 3))
@pytest.mark.parametrize(
    "exercise_id",
    ["triton_softmax", "triton_rmsnorm", "triton_rmsnorm_backward", "triton_int8_gemv"],
)
def test_triton_references_pass(exercise_id, seed):
    assert cu.check(exercise_id, cu.reference(exercise_id), seed=seed).passed


def test_exercises_listed():
    ids = {e.id for e in cu.exercises("13")}
    assert {"rmsnorm_backward", "quantize_int8", "int8_gemv", "pack_int4", "unpack_int4"} <= ids
    assert {
        "triton_softmax",
        "triton_rmsnorm",
        "triton_rmsnorm_backward",
        "triton_int8_gemv",
    } <= ids


def test_checks_module_imports_without_triton_kernels():
    # Registering the batteries must not import the kernels (nor Triton through them).
    import subprocess
    import sys

    code = (
        "import sys, course_utils as cu; cu.exercises(); "
        "print('course_utils.checks._ch13_kernels' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@needs_triton
def test_launches_are_counted_when_the_kernels_load_during_the_check():
    # In a fresh process nothing has imported Triton's runtime before the check (torch._dynamo,
    # which pulls it in, is no longer imported with the batteries): the course's kernels load
    # inside the reference's call, and their launches must still be seen.
    import subprocess
    import sys

    code = (
        "import sys, course_utils as cu\n"
        "from course_utils import checking\n"
        "cu.exercises()\n"
        "print('triton.runtime.interpreter' in sys.modules)\n"
        "with checking.references_allowed():\n"
        "    print(cu.check('triton_softmax', cu.reference('triton_softmax')).passed)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.stdout.split() == ["False", "True"], out.stdout + out.stderr[-2000:]


# =====================================================================================
# RMSNorm backward
# =====================================================================================
def rms_bwd_numpy(dout, x, weight, eps=1e-6):
    """numpy, row by row."""
    d, a, w = dout.numpy(), x.numpy(), weight.numpy()
    rows, n = a.reshape(-1, a.shape[-1]), a.shape[-1]
    drows = d.reshape(-1, n)
    dx = np.empty_like(rows)
    dw = np.zeros(n, dtype=a.dtype)
    for i in range(rows.shape[0]):
        r = 1.0 / np.sqrt((rows[i] ** 2).mean() + eps)
        xhat, g = rows[i] * r, drows[i] * w
        dx[i] = r * (g - xhat * (g * xhat).mean())
        dw += drows[i] * xhat
    return torch.from_numpy(dx.reshape(a.shape)), torch.from_numpy(dw)


def rms_bwd_chain(dout, x, weight, eps=1e-6):
    """Through the chain rule step by step: ms, rstd, then the product."""
    n = x.shape[-1]
    ms = (x * x).sum(-1, keepdim=True) / n
    rstd = (ms + eps) ** -0.5
    g = dout * weight
    drstd = (g * x).sum(-1, keepdim=True)
    dms = drstd * -0.5 * rstd**3
    dx = g * rstd + dms * 2 * x / n
    lead = tuple(range(x.dim() - 1))
    dw = (dout * x * rstd).sum(lead) if lead else dout * x * rstd
    return dx, dw


@pytest.mark.parametrize("fn", [rms_bwd_numpy, rms_bwd_chain])
def test_rmsnorm_backward_styles_pass(fn):
    assert cu.check("rmsnorm_backward", fn).passed


def test_rmsnorm_backward_rstd_constant():
    def wrong(dout, x, weight, eps=1e-6):
        rstd = torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)
        return dout * weight * rstd, ch13.ref_rmsnorm_backward(dout, x, weight, eps)[1]

    _fails("rmsnorm_backward", wrong, "rstd was treated as a constant", "mean-of-squares term")


def test_rmsnorm_backward_dweight_not_summed():
    def wrong(dout, x, weight, eps=1e-6):
        dx, _ = ch13.ref_rmsnorm_backward(dout, x, weight, eps)
        return dx, dout * x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)

    _fails("rmsnorm_backward", wrong, "dweight was not summed over the leading dims")


def test_rmsnorm_backward_dweight_first_dim_only():
    def wrong(dout, x, weight, eps=1e-6):
        dx, _ = ch13.ref_rmsnorm_backward(dout, x, weight, eps)
        return dx, (dout * x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)).sum(0)

    _fails("rmsnorm_backward", wrong, "dweight was not summed over the leading dims")


def test_rmsnorm_backward_dweight_of_x():
    def wrong(dout, x, weight, eps=1e-6):
        dx, _ = ch13.ref_rmsnorm_backward(dout, x, weight, eps)
        return dx, (dout * x).reshape(-1, x.shape[-1]).sum(0)

    _fails("rmsnorm_backward", wrong, "dweight sums dout * x")


def test_rmsnorm_backward_sum_not_mean():
    def wrong(dout, x, weight, eps=1e-6):
        rstd = torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)
        xhat, g = x * rstd, dout * weight
        dx = rstd * (g - xhat * (g * xhat).sum(-1, keepdim=True))
        return dx, ch13.ref_rmsnorm_backward(dout, x, weight, eps)[1]

    _fails("rmsnorm_backward", wrong, "a sum over the row instead of a mean")


def test_rmsnorm_backward_refuses_autograd():
    def wrong(dout, x, weight, eps=1e-6):
        x_ = x.clone().requires_grad_()
        y = x_ * torch.rsqrt((x_ * x_).mean(-1, keepdim=True) + eps) * weight
        y.backward(dout)
        return x_.grad, weight

    _fails("rmsnorm_backward", wrong, "autograd")


# =====================================================================================
# int8 quantisation
# =====================================================================================
def quant_numpy(w):
    """numpy, with numpy's round (half to even too)."""
    a = w.numpy()
    amax = np.abs(a).max(-1)
    scale = np.where(amax > 0, amax / 127, 1.0).astype(a.dtype)
    q = np.clip(np.rint(a / scale[:, None]), -127, 127).astype(np.int8)
    return torch.from_numpy(q), torch.from_numpy(scale)


def quant_half_away(w):
    """Rounding half away from zero: differs from torch.round only at exact ties, which are free."""
    amax = w.abs().amax(-1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    r = w / scale[:, None]
    q = torch.sign(r) * torch.floor(r.abs() + 0.5)
    return q.clamp(-127, 127).to(torch.int8), scale


def quant_loops(w):
    """A loop over rows, a float64 scale whatever w's dtype."""
    q = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(w.shape[0], dtype=torch.float64)
    for n in range(w.shape[0]):
        m = float(w[n].abs().max())
        scale[n] = m / 127 if m > 0 else 1.0
        q[n] = torch.round(w[n].double() / scale[n]).to(torch.int8)
    return q, scale


@pytest.mark.parametrize("fn", [quant_numpy, quant_half_away, quant_loops])
def test_quantize_styles_pass(fn):
    assert cu.check("quantize_int8", fn).passed


def test_quantize_scale_128():
    def wrong(w):
        amax = w.abs().amax(-1)
        scale = torch.where(amax > 0, amax / 128, torch.ones_like(amax))
        return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale

    _fails("quantize_int8", wrong, "max|w| / 128")


def test_quantize_one_scale_per_tensor():
    def wrong(w):
        scale = w.abs().max() / 127
        return torch.round(w / scale).to(torch.int8), scale

    _fails("quantize_int8", wrong, "one scale for the whole tensor")


def test_quantize_per_tensor_scale_repeated():
    def wrong(w):
        scale = (w.abs().max() / 127).expand(w.shape[0]).clone()
        return torch.round(w / scale[:, None]).to(torch.int8), scale

    _fails("quantize_int8", wrong, "one scale for the whole tensor")


def test_quantize_truncation():
    def wrong(w):
        q, scale = ch13.ref_quantize_int8(w)
        return (w / scale[:, None]).to(torch.int8), scale

    _fails("quantize_int8", wrong, "truncated toward zero", "torch.round")


def test_quantize_zero_row_nan():
    def wrong(w):
        scale = w.abs().amax(-1) / 127
        return torch.nan_to_num(torch.round(w / scale[:, None])).to(torch.int8), scale

    _fails("quantize_int8", wrong, "row of zeros must get scale 1")


def test_quantize_no_clamp_overflow_named():
    def wrong(w):
        _, scale = ch13.ref_quantize_int8(w)
        return torch.round(w / (scale[:, None] * 0.5)).to(torch.int8), scale

    _fails("quantize_int8", wrong, "not the nearest integer")


def test_quantize_tie_either_neighbour():
    """At exact ties both neighbours are accepted; off ties only the nearest."""
    up = quant_half_away(torch.tensor([[63.5, 1.25, -1.25, 0.75]], dtype=torch.float64))[0]
    even = ch13.ref_quantize_int8(torch.tensor([[63.5, 1.25, -1.25, 0.75]], dtype=torch.float64))[0]
    assert up.tolist() != even.tolist()  # the case really has ties that the two rules split


# =====================================================================================
# int8 GEMV
# =====================================================================================
def gemv_columns(x, q, scale):
    """Blocks of 4 columns of K, accumulated."""
    out = torch.zeros(x.shape[0], q.shape[0], dtype=torch.float64)
    for k0 in range(0, q.shape[1], 4):
        out += x[:, k0 : k0 + 4].double() @ q[:, k0 : k0 + 4].double().T
    return (out * scale.double()).to(x.dtype)


def gemv_rows(x, q, scale):
    """One output row of the weight at a time."""
    cols = [(x @ q[n].to(x.dtype)) * scale[n].to(x.dtype) for n in range(q.shape[0])]
    return torch.stack(cols, -1)


def gemv_half(x, q, scale):
    """The whole weight converted to bfloat16 (16-bit is allowed), accumulated in x's dtype."""
    w = q.to(torch.bfloat16)
    out = torch.stack([(x * w[n].to(x.dtype)).sum(-1) for n in range(q.shape[0])], -1)
    return out * scale.to(x.dtype)


@pytest.mark.parametrize("fn", [gemv_columns, gemv_rows, gemv_half])
def test_gemv_styles_pass(fn):
    assert cu.check("int8_gemv", fn).passed


def test_gemv_materialises_float_weight():
    def wrong(x, q, scale):
        w = q.to(x.dtype if x.dtype == torch.float64 else torch.float32) * scale[:, None].to(
            torch.float32
        )
        return (x.to(w.dtype) @ w.T).to(x.dtype)

    _fails("int8_gemv", wrong, "materialised the dequantised (N, K) weight")


def test_gemv_broadcast_product_is_wide_too():
    def wrong(x, q, scale):
        return ((x.double()[:, None, :] * q.double()[None]).sum(-1) * scale.double()).to(x.dtype)

    _fails("int8_gemv", wrong, "materialised the dequantised (N, K) weight")


def test_gemv_wrong_dtype():
    def wrong(x, q, scale):
        return (
            ch13.ref_int8_gemv(x, q, scale).float()
            if x.dtype == torch.bfloat16
            else ch13.ref_int8_gemv(x, q, scale)
        )

    _fails("int8_gemv", wrong, "the contract returns x's dtype")


def test_gemv_scale_missing():
    def wrong(x, q, scale):
        return gemv_columns(x, q, torch.ones_like(scale))

    _fails("int8_gemv", wrong, "the scale was not applied")


# =====================================================================================
# int4 packing
# =====================================================================================
def pack_loops(q):
    """Byte by byte in Python."""
    n, k = q.shape
    out = torch.empty(n, k // 2, dtype=torch.uint8)
    for i in range(n):
        for j in range(k // 2):
            lo, hi = int(q[i, 2 * j]) & 15, int(q[i, 2 * j + 1]) & 15
            out[i, j] = lo | (hi << 4)
    return out


def pack_numpy(q):
    a = q.numpy().astype(np.uint8) & 0x0F
    return torch.from_numpy((a[:, 0::2] | (a[:, 1::2] << 4)).astype(np.uint8))


def unpack_loops(packed):
    n, m = packed.shape
    out = torch.empty(n, 2 * m, dtype=torch.int8)
    for i in range(n):
        for j in range(m):
            b = int(packed[i, j])
            lo, hi = b & 15, b >> 4
            out[i, 2 * j] = lo - 16 if lo >= 8 else lo
            out[i, 2 * j + 1] = hi - 16 if hi >= 8 else hi
    return out


def unpack_shift(packed):
    """Sign extension by shifting into the top of an int8 and back (arithmetic shift)."""
    p = packed.view(torch.int8)
    lo = (p << 4) >> 4
    hi = p >> 4
    return torch.stack((lo, hi), -1).reshape(packed.shape[0], -1)


@pytest.mark.parametrize("fn", [pack_loops, pack_numpy])
def test_pack_styles_pass(fn):
    assert cu.check("pack_int4", fn).passed


@pytest.mark.parametrize("fn", [unpack_loops, unpack_shift])
def test_unpack_styles_pass(fn):
    assert cu.check("unpack_int4", fn).passed


def test_pack_nibbles_swapped():
    def wrong(q):
        nib = (q.to(torch.int16) & 0xF).to(torch.uint8)
        return nib[:, 1::2] | (nib[:, 0::2] << 4)

    _fails("pack_int4", wrong, "the nibbles are swapped")


def test_pack_offset_binary():
    def wrong(q):
        u = (q.to(torch.int16) + 8).to(torch.uint8)
        return u[:, 0::2] | (u[:, 1::2] << 4)

    _fails("pack_int4", wrong, "offset binary")


def test_pack_int8_result():
    def wrong(q):
        return ch13.ref_pack_int4(q).view(torch.int8)

    _fails("pack_int4", wrong, "dtype int8", "uint8")


def test_unpack_not_sign_extended():
    def wrong(packed):
        p = packed.to(torch.int16)
        return torch.stack((p & 15, p >> 4), -1).flatten(-2).to(torch.int8)

    _fails("unpack_int4", wrong, "not sign-extended", "8..15 should be -8..-1")


def test_unpack_returns_uint8():
    def wrong(packed):
        p = packed.to(torch.int16)
        b = torch.stack((p & 15, p >> 4), -1).flatten(-2)
        return (b - 16 * (b >= 8)).to(torch.uint8)

    _fails("unpack_int4", wrong, "has dtype uint8", "should be int8")


def test_unpack_nibbles_swapped():
    def wrong(packed):
        p = packed.to(torch.int16)
        b = torch.stack((p >> 4, p & 15), -1).flatten(-2)
        return (b - 16 * (b >= 8)).to(torch.int8)

    _fails("unpack_int4", wrong, "the nibbles are swapped")


def test_pack_odd_k_one_line_error():
    with pytest.raises(ValueError, match="even K"):
        ch13.ref_pack_int4(torch.zeros(2, 5, dtype=torch.int8))


def test_round_trip():
    q = torch.randint(-8, 8, (7, 22), dtype=torch.int8)
    assert torch.equal(ch13.ref_unpack_int4(ch13.ref_pack_int4(q)), q)


# =====================================================================================
# Triton kernels: correct ones in other styles, planted mistakes
# =====================================================================================
if triton is not None:

    @triton.jit
    def softmax_two_pass(x_ptr, y_ptr, n_cols, BLOCK: tl.constexpr):
        """A row in chunks of BLOCK: max, then sum, then write (online style, rows of any length)."""
        row = tl.program_id(0)
        m = -float("inf")
        for c0 in range(0, n_cols, BLOCK):
            offs = c0 + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * n_cols + offs, mask=offs < n_cols, other=-float("inf"))
            m = tl.maximum(m, tl.max(x.to(tl.float32), axis=0))
        s = 0.0
        for c0 in range(0, n_cols, BLOCK):
            offs = c0 + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * n_cols + offs, mask=offs < n_cols, other=-float("inf"))
            s += tl.sum(tl.exp(x.to(tl.float32) - m), axis=0)
        for c0 in range(0, n_cols, BLOCK):
            offs = c0 + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * n_cols + offs, mask=offs < n_cols, other=0.0)
            y = tl.exp(x.to(tl.float32) - m) / s
            tl.store(y_ptr + row * n_cols + offs, y.to(y_ptr.dtype.element_ty), mask=offs < n_cols)

    @triton.jit
    def softmax_variants(
        x_ptr,
        y_ptr,
        n_cols,
        BLOCK: tl.constexpr,
        MASK_LOAD: tl.constexpr,
        OTHER_ZERO: tl.constexpr,
        SUB_MAX: tl.constexpr,
    ):
        """One row per program, with the mistakes as switches."""
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < n_cols
        if MASK_LOAD:
            if OTHER_ZERO:
                x = tl.load(x_ptr + row * n_cols + offs, mask=mask, other=0.0)
            else:
                x = tl.load(x_ptr + row * n_cols + offs, mask=mask, other=-float("inf"))
        else:
            x = tl.load(x_ptr + row * n_cols + offs)
        x = x.to(tl.float32)
        if SUB_MAX:
            x = x - tl.max(x, axis=0)
        e = tl.exp(x)
        tl.store(
            y_ptr + row * n_cols + offs,
            (e / tl.sum(e, axis=0)).to(y_ptr.dtype.element_ty),
            mask=mask,
        )

    @triton.jit
    def rmsnorm_variant(
        x_ptr, w_ptr, y_ptr, n_cols, eps, BLOCK: tl.constexpr, DIV_BLOCK: tl.constexpr
    ):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < n_cols
        x = tl.load(x_ptr + row * n_cols + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if DIV_BLOCK:
            ms = tl.sum(x * x, axis=0) / BLOCK
        else:
            ms = tl.sum(x * x, axis=0) / n_cols
        y = x / tl.sqrt(ms + eps) * w
        tl.store(y_ptr + row * n_cols + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def gemv_variant(
        x_ptr,
        q_ptr,
        s_ptr,
        o_ptr,
        N,
        K,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        MASK_K: tl.constexpr,
    ):
        pid, b = tl.program_id(0), tl.program_id(1)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            if MASK_K:
                km = k < K
            else:
                km = k < k0 + BLOCK_K
            xv = tl.load(x_ptr + b * K + k, mask=km, other=0.0).to(tl.float32)
            w = tl.load(
                q_ptr + n[:, None] * K + k[None, :], mask=(n[:, None] < N) & km[None, :], other=0
            )
            acc += tl.sum(w.to(tl.float32) * xv[None, :], axis=1)
        s = tl.load(s_ptr + n, mask=n < N, other=0.0)
        tl.store(o_ptr + b * N + n, (acc * s).to(o_ptr.dtype.element_ty), mask=n < N)


def _softmax_launch(**switches):
    def triton_softmax(x):
        y = torch.empty_like(x)
        block = triton.next_power_of_2(x.shape[1])
        softmax_variants[(x.shape[0],)](x, y, x.shape[1], BLOCK=block, **switches)
        return y

    return triton_softmax


@needs_triton
def test_triton_softmax_other_styles_pass():
    def triton_softmax(x):
        y = torch.empty_like(x)
        softmax_two_pass[(x.shape[0],)](x, y, x.shape[1], BLOCK=8)
        return y

    assert cu.check("triton_softmax", triton_softmax).passed
    good = _softmax_launch(MASK_LOAD=True, OTHER_ZERO=False, SUB_MAX=True)
    assert cu.check("triton_softmax", good).passed


@needs_triton
def test_triton_softmax_no_max_subtraction():
    fn = _softmax_launch(MASK_LOAD=True, OTHER_ZERO=False, SUB_MAX=False)
    _fails("triton_softmax", fn, "magnitude ~1e4", "row maximum was not subtracted")


@needs_triton
def test_triton_softmax_load_without_mask():
    fn = _softmax_launch(MASK_LOAD=False, OTHER_ZERO=False, SUB_MAX=True)
    _fails("triton_softmax", fn, "N not a power of two", "last block is not masked")


@needs_triton
def test_triton_softmax_other_zero():
    fn = _softmax_launch(MASK_LOAD=True, OTHER_ZERO=True, SUB_MAX=True)
    _fails("triton_softmax", fn, "masked lanes were loaded as 0")


@needs_triton
@pytest.mark.forbidden_calls_allowed
def test_triton_softmax_without_a_kernel():
    def triton_softmax(x):
        return torch.softmax(x.float(), -1).to(x.dtype)

    _fails("triton_softmax", triton_softmax, "launched no Triton kernel")


@needs_triton
def test_triton_softmax_forbids_torch_softmax():
    def triton_softmax(x):
        ch13.ref_triton_softmax(x.contiguous())  # a launch, to get past the launch count
        return F.softmax(x, -1)

    _fails("triton_softmax", triton_softmax, "F.softmax")


@needs_triton
def test_triton_rmsnorm_mean_over_block():
    def triton_rmsnorm(x, weight, eps=1e-6):
        y = torch.empty_like(x)
        rmsnorm_variant[(x.shape[0],)](
            x, weight, y, x.shape[1], eps, BLOCK=triton.next_power_of_2(x.shape[1]), DIV_BLOCK=True
        )
        return y

    _fails("triton_rmsnorm", triton_rmsnorm, "divided by BLOCK")


@needs_triton
def test_triton_rmsnorm_variant_correct_passes():
    def triton_rmsnorm(x, weight, eps=1e-6):
        y = torch.empty_like(x)
        rmsnorm_variant[(x.shape[0],)](
            x, weight, y, x.shape[1], eps, BLOCK=triton.next_power_of_2(x.shape[1]), DIV_BLOCK=False
        )
        return y

    assert cu.check("triton_rmsnorm", triton_rmsnorm).passed


def _gemv_launch(mask_k):
    def triton_int8_gemv(x, q, scale):
        out = torch.empty(x.shape[0], q.shape[0], dtype=x.dtype)
        grid = (triton.cdiv(q.shape[0], 4), x.shape[0])
        gemv_variant[grid](
            x, q, scale, out, q.shape[0], q.shape[1], BLOCK_N=4, BLOCK_K=32, MASK_K=mask_k
        )
        return out

    return triton_int8_gemv


@needs_triton
def test_triton_gemv_other_blocks_pass():
    assert cu.check("triton_int8_gemv", _gemv_launch(True)).passed


@needs_triton
def test_triton_gemv_k_not_masked():
    _fails("triton_int8_gemv", _gemv_launch(False), "last block is not masked")


@needs_triton
def test_triton_rmsnorm_backward_rstd_constant_in_kernel():
    def triton_rmsnorm_backward(dout, x, weight, eps=1e-6):
        dx, dw = ch13.ref_triton_rmsnorm_backward(
            dout.contiguous(), x.contiguous(), weight.contiguous(), eps
        )
        rstd = torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)
        return dout * weight * rstd, dw

    _fails("triton_rmsnorm_backward", triton_rmsnorm_backward, "rstd was treated as a constant")


@needs_triton
def test_check_arms_guards_around_the_interpreter():
    """The check's torch-function modes (forbidden ops, autograd guard) stay on the stack through a launch."""
    from course_utils.invoke import invoke

    x = torch.randn(3, 10)
    out = invoke(ch13.ref_triton_softmax, (x,), {}, forbidden=("softmax",), references=[])
    assert out["kind"] == "ok", out
    assert torch.allclose(out["value"], torch.softmax(x, -1), atol=1e-6)
    out = invoke(
        ch13.ref_triton_rmsnorm_backward,
        (torch.randn(3, 10), x, torch.ones(10)),
        {},
        backward=True,
        forbidden=ch13.RMS_NORM_OPS,
        references=[],
    )
    assert out["kind"] == "ok", out
    out = invoke(
        ch13.ref_triton_int8_gemv,
        (torch.randn(2, 16), torch.ones(4, 16, dtype=torch.int8), torch.ones(4)),
        {},
        watch=ch13.WideTensorWatch,
        references=[],
    )
    assert out["kind"] == "ok" and out["watch"] is not None, out


@needs_triton
@pytest.mark.references_forbidden
def test_handing_in_the_reference_launcher_fails():
    _fails("triton_softmax", ch13.ref_triton_softmax, "course's own reference")


# =====================================================================================
# The course's other kernels, and their one-line errors
# =====================================================================================
@needs_triton
def test_rope_swiglu_int4_kernels_match_torch():
    from course_utils.checks.ch10_positional_encoding import ref_apply_rope

    torch.manual_seed(0)
    x, pos = torch.randn(2, 5, 6), torch.tensor([0, 3, 1, 7, 2])
    assert torch.allclose(ch13.ref_triton_rope(x, pos), ref_apply_rope(x, pos), atol=1e-5)
    g, u = torch.randn(3, 50), torch.randn(3, 50)
    assert torch.allclose(ch13.ref_triton_swiglu(g, u, block=64), F.silu(g) * u, atol=1e-6)
    w, xx = torch.randn(10, 40), torch.randn(2, 40)
    q4, s4 = ch13.quantize_int4(w)
    want = xx @ (q4.float() * s4[:, None]).T
    got = ch13.ref_triton_int4_gemv(xx, ch13.ref_pack_int4(q4), s4, block_k=16)
    assert torch.allclose(got, want, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("alibi", [False, True])
def test_flash_attention_kernel_matches_sdpa(causal, alibi):
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 37, 16) for _ in range(3))
    o = ch13.ref_triton_flash_attention(
        q, k, v, is_causal=causal, alibi=alibi, block_m=16, block_n=16
    )
    bias = ch13.attention_bias(2, 37, 37, alibi, causal)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=bias)
    assert torch.allclose(o.double(), want, atol=1e-5)


@needs_triton
def test_launchers_one_line_errors():
    with pytest.raises(TypeError, match="dtype int8, got float32"):
        ch13.ref_triton_int8_gemv(torch.randn(1, 8), torch.randn(4, 8), torch.ones(4))
    with pytest.raises(TypeError, match="dtype uint8, got int8"):
        ch13.ref_triton_int4_gemv(
            torch.randn(1, 8), torch.zeros(4, 4, dtype=torch.int8), torch.ones(4)
        )
    with pytest.raises(ValueError, match="contiguous `x`"):
        ch13.ref_triton_softmax(torch.randn(6, 4).T)
    with pytest.raises(ValueError, match="contiguous `x`"):
        ch13.ref_triton_rmsnorm(torch.randn(6, 4).T, torch.ones(6))
    with pytest.raises(ValueError, match="even K"):
        ch13.ref_triton_int4_gemv(
            torch.randn(1, 7), torch.zeros(4, 3, dtype=torch.uint8), torch.ones(4)
        )
    with pytest.raises(TypeError, match="dtype int8"):
        ch13.ref_int8_gemv(torch.randn(1, 8), torch.randn(4, 8), torch.ones(4))


def test_missing_triton_stand_in():
    triton_, tl_ = ch13.missing_triton()

    @triton_.jit
    def kernel(x, BLOCK: tl_.constexpr):
        return x

    assert kernel(3, 4) == 3 and triton_.cdiv(7, 2) == 4 and triton_.next_power_of_2(5) == 8


# =====================================================================================
# The solution notebook's own launchers
# =====================================================================================
@needs_triton
def test_notebook_launchers_raise_one_line_errors(solution_cells):
    names = ["triton_softmax", "triton_int8_gemv"]
    ns: dict = {}
    setup = "import torch\nimport triton\nimport triton.language as tl\n"
    exec(setup, ns)  # noqa: S102 - the course's own notebook
    for src in solution_cells(CHAPTER, names):
        exec(compile(src, "<solution cell>", "exec"), ns)  # noqa: S102
    assert set(names) <= set(ns)
    with pytest.raises(ValueError, match="contiguous"):
        ns["triton_softmax"](torch.randn(6, 4).T)
    with pytest.raises(TypeError, match="int8"):
        ns["triton_int8_gemv"](torch.randn(1, 8), torch.randn(4, 8), torch.ones(4))
