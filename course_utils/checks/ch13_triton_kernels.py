"""Check batteries of chapter 13: Triton kernels, RMSNorm backward, int8 and int4 weight quantisation.

Two kinds of reference live here. The plain-torch ones (``ref_rmsnorm_backward``,
``ref_quantize_int8``, ``ref_int8_gemv``, ``ref_pack_int4``, ``ref_unpack_int4``) are the
contract's. The ``ref_triton_*`` launchers run the course's Triton kernels (``_ch13_kernels``,
imported on first launch so that this module imports without Triton); ``kernel_bench`` times
them on a GPU, and on a CPU they run under Triton's interpreter (``TRITON_INTERPRET=1``, set
before the first launch).

The Triton exercises are called through ``_triton_probe``, which runs where the learner's
function lives: it counts the Triton launches (a "kernel" that never launches one is refused)
and, on a machine whose Triton compiles for a GPU, moves the inputs to CUDA and the result back.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
from collections.abc import Callable, Iterator
from types import ModuleType, SimpleNamespace
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ..checking import CheckFailure, Tester, exercise
from ..gradcheck import numerical_gradient

# Modules, not their ref_* names: a reference bound in two checks modules would be listed twice
# by the reference tripwire of invoke.py, which then restores it in the wrong order.
from . import ch06_normalization as ch06
from .ch10_positional_encoding import alibi_slopes

CHAPTER = "13_triton_kernels"
Tensor = torch.Tensor

RMS_NORM_OPS = ("rms_norm", "fused_rms_norm", "fused_rms_norm_backward")
MATMUL_OPS = ("matmul", "mm", "mv", "bmm", "addmm", "addmv", "linear", "einsum", "dot", "tensordot")


# ---- Triton, imported on first use -----------------------------------------------------------
def triton_skip_reason() -> str:
    """Why Triton cells cannot run here ('' when they can)."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"Triton is not installed ({err}); pip install triton, or the course's kernels extra"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device and TRITON_INTERPRET is not 1 (set it before the first kernel is defined)"
    return ""


def kernels() -> ModuleType:
    """The course's ``@triton.jit`` kernels (``course_utils.checks._ch13_kernels``), imported now.

    Without a CUDA device Triton can only interpret, so ``TRITON_INTERPRET=1`` is set first
    (Triton reads it when a kernel is decorated); with one, the environment is left alone.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from . import _ch13_kernels

    return _ch13_kernels


def missing_triton() -> tuple[SimpleNamespace, SimpleNamespace]:
    """Stand-ins for ``triton`` and ``triton.language`` so that kernel cells still define their functions.

    ``jit`` returns the function unchanged and ``tl.constexpr`` is a plain annotation: without
    Triton a chapter's cells run, and only the cells that launch a kernel skip.
    """

    def jit(fn: Callable[..., Any] | None = None, **_kw: Any) -> Any:
        return fn if fn is not None else (lambda f: f)

    triton = SimpleNamespace(
        jit=jit,
        cdiv=lambda a, b: -(-a // b),
        next_power_of_2=lambda n: 1 << max(int(n) - 1, 0).bit_length(),
    )
    return triton, SimpleNamespace(constexpr=int)


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- one-line errors of the launchers ---------------------------------------------------------
def require_contiguous(fn: str, **tensors: Tensor) -> None:
    """ValueError naming the first tensor that is not contiguous (the kernels index rows by n_cols)."""
    for name, x in tensors.items():
        if not x.is_contiguous():
            raise ValueError(
                f"{fn} needs a contiguous `{name}` (got strides {tuple(x.stride())} for shape "
                f"{tuple(x.shape)}); pass {name}.contiguous()."
            )


def require_dtype(fn: str, name: str, x: Tensor, dtype: torch.dtype) -> None:
    """TypeError naming the dtype ``x`` has when it must be ``dtype``."""
    if x.dtype != dtype:
        want, got = str(dtype).replace("torch.", ""), str(x.dtype).replace("torch.", "")
        raise TypeError(f"{fn} needs `{name}` of dtype {want}, got {got}.")


# ---- plain-torch references (the contract) ----------------------------------------------------
def ref_rmsnorm_backward(
    dout: Tensor, x: Tensor, weight: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """(dx, dweight) through y = x * rstd * weight, rstd = 1/sqrt(mean(x**2, last dim) + eps)."""
    rstd = torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)  # (..., 1)
    xhat = x * rstd
    g = dout * weight  # (..., d)
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    dweight = (dout * xhat).reshape(-1, x.shape[-1]).sum(0)  # (d,) summed over every leading dim
    return dx, dweight


def ref_quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: scale = max|w[n]| / 127 (1 for a zero row), q = round(w / scale)."""
    amax = w.abs().amax(-1)  # (N,)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def ref_int8_gemv(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """x @ (q * scale[:, None])^T, four blocks of rows of q at a time: no (N, K) float tensor exists."""
    require_dtype("int8_gemv", "q", q, torch.int8)
    n = q.shape[0]
    rows = max(1, _cdiv(n, 4))
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)  # (B, N)
    for n0 in range(0, n, rows):
        w = q[n0 : n0 + rows].to(x.dtype)  # (rows, K): a quarter of the weight
        out[:, n0 : n0 + rows] = (x @ w.T) * scale[n0 : n0 + rows].to(x.dtype)
    return out


def ref_pack_int4(q: Tensor) -> Tensor:
    """(N, K) int8 in [-8, 7] -> (N, K/2) uint8; byte j holds q[2j] (low nibble) and q[2j+1] (high)."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even K (two values per byte), got K = {q.shape[-1]}.")
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8)  # two's-complement nibbles 0..15
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def ref_unpack_int4(packed: Tensor) -> Tensor:
    """(N, K/2) uint8 -> (N, K) int8, sign-extending each nibble (8..15 are -8..-1)."""
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, p >> 4
    both = torch.stack((lo, hi), -1).flatten(-2)  # (N, K): q[2j], q[2j+1]
    return (both - 16 * (both >= 8)).to(torch.int8)


def quantize_int4(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int4: scale = max|w[n]| / 7 (1 for a zero row), q = round(w / scale) in [-8, 7]."""
    amax = w.abs().amax(-1)
    scale = torch.where(amax > 0, amax / 7, torch.ones_like(amax))
    return torch.round(w / scale[:, None]).clamp(-8, 7).to(torch.int8), scale


# ---- the course's Triton launchers ----------------------------------------------------------
def _rows(x: Tensor) -> Tensor:
    """x (..., n) as a (rows, n) view."""
    return x.reshape(-1, x.shape[-1])


def ref_triton_softmax(x: Tensor) -> Tensor:
    """Softmax over the last dim of a contiguous x (..., N), one program per row."""
    require_contiguous("triton_softmax", x=x)
    x2 = _rows(x)
    y = torch.empty_like(x2)
    block = _next_pow2(x2.shape[1])
    warps = 4 if block < 2048 else 8 if block < 8192 else 16
    kernels().softmax_kernel[(x2.shape[0],)](
        x2, y, x2.shape[1], x2.stride(0), y.stride(0), BLOCK=block, num_warps=warps
    )
    return y.view(x.shape)


def ref_triton_rmsnorm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dim of a contiguous x (..., N), one program per row."""
    require_contiguous("triton_rmsnorm", x=x, weight=weight)
    x2 = _rows(x)
    y = torch.empty_like(x2)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    block = _next_pow2(x2.shape[1])
    warps = 4 if block < 2048 else 8 if block < 8192 else 16
    kernels().rmsnorm_forward_kernel[(x2.shape[0],)](
        x2,
        weight,
        y,
        rstd,
        x2.shape[1],
        x2.stride(0),
        y.stride(0),
        eps,
        BLOCK=block,
        num_warps=warps,
    )
    return y.view(x.shape)


def ref_triton_rmsnorm_backward(
    dout: Tensor, x: Tensor, weight: Tensor, eps: float = 1e-6, rows_per_program: int = 4
) -> tuple[Tensor, Tensor]:
    """Fused RMSNorm backward: (dx, dweight), each program summing dweight over its rows in registers."""
    require_contiguous("triton_rmsnorm_backward", dout=dout, x=x, weight=weight)
    x2, dy = _rows(x), _rows(dout)
    m, n = x2.shape
    dx = torch.empty_like(x2)
    programs = _cdiv(m, rows_per_program)
    partial = torch.empty(programs, n, dtype=torch.float32, device=x.device)  # (programs, N)
    block = _next_pow2(n)
    kernels().rmsnorm_backward_kernel[(programs,)](
        dy, x2, weight, dx, partial, m, n, eps, ROWS_PER_PROGRAM=rows_per_program, BLOCK=block
    )
    return dx.view(x.shape), partial.sum(0).to(weight.dtype)


def ref_triton_rope(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """apply_rope (chapter 10, interleaved pairs) on a contiguous x (..., L, d), one program per row."""
    require_contiguous("triton_rope", x=x)
    if x.shape[-1] % 2:
        raise ValueError(f"triton_rope needs an even head dim (pairs), got d = {x.shape[-1]}.")
    y = torch.empty_like(x)
    L, d = x.shape[-2], x.shape[-1]
    kernels().rope_kernel[(x.numel() // d,)](
        x, positions.to(x.device), y, L, d, math.log2(base), HALF=_next_pow2(d // 2)
    )
    return y


def ref_triton_swiglu(gate: Tensor, up: Tensor, block: int = 1024) -> Tensor:
    """silu(gate) * up, elementwise, on contiguous tensors of one shape."""
    require_contiguous("triton_swiglu", gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(
            f"triton_swiglu needs gate and up of one shape, got {tuple(gate.shape)} and {tuple(up.shape)}."
        )
    y = torch.empty_like(gate)
    n = gate.numel()
    kernels().swiglu_kernel[(_cdiv(n, block),)](gate, up, y, n, BLOCK=block)
    return y


def ref_triton_int8_gemv(
    x: Tensor, q: Tensor, scale: Tensor, block_n: int = 16, block_k: int = 512, num_warps: int = 4
) -> Tensor:
    """x (B, K) @ (q (N, K) int8 * scale[:, None])^T in x's dtype, dequantising tiles in registers."""
    require_dtype("triton_int8_gemv", "q", q, torch.int8)
    require_contiguous("triton_int8_gemv", x=x, q=q, scale=scale)
    (b, k), n = x.shape, q.shape[0]
    out = torch.empty(b, n, dtype=x.dtype, device=x.device)
    block_k = min(block_k, _next_pow2(k))
    kernels().int8_gemv_kernel[(_cdiv(n, block_n), b)](
        x, q, scale, out, n, k, x.stride(0), out.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )  # fmt: skip
    return out


def ref_triton_int4_gemv(
    x: Tensor,
    packed: Tensor,
    scale: Tensor,
    block_n: int = 16,
    block_k: int = 512,
    num_warps: int = 4,
) -> Tensor:
    """x (B, K) @ (unpack_int4(packed (N, K/2) uint8) * scale[:, None])^T in x's dtype."""
    require_dtype("triton_int4_gemv", "packed", packed, torch.uint8)
    require_contiguous("triton_int4_gemv", x=x, packed=packed, scale=scale)
    (b, k), n = x.shape, packed.shape[0]
    if k % 2 or packed.shape[1] * 2 != k:
        raise ValueError(
            f"triton_int4_gemv needs packed of shape (N, K/2) for an even K = {k}, got {tuple(packed.shape)}."
        )
    out = torch.empty(b, n, dtype=x.dtype, device=x.device)
    block_k = max(2, min(block_k, _next_pow2(k)))
    kernels().int4_gemv_kernel[(_cdiv(n, block_n), b)](
        x, packed, scale, out, n, k, x.stride(0), out.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )  # fmt: skip
    return out


def ref_triton_flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    is_causal: bool = False,
    alibi: bool = False,
    block_m: int = 64,
    block_n: int = 32,
    num_warps: int = 4,
    num_stages: int = 2,
) -> Tensor:
    """FlashAttention-2 forward on q (B, H, L, D), k and v (B, H, S, D), D a power of two >= 16.

    ``is_causal`` hides keys j > i; ``alibi`` adds slope_h * (j - i) with the ALiBi paper's slopes.
    """
    require_contiguous("triton_flash_attention", q=q, k=k, v=v)
    (bsz, h, L, d), S = q.shape, k.shape[2]
    if d < 16 or d & (d - 1):
        raise ValueError(
            f"triton_flash_attention needs a head dim that is a power of two >= 16, got {d}."
        )
    o = torch.empty_like(q)
    slopes = alibi_slopes(h).to(torch.float32).to(q.device)
    kernels().flash_attention_kernel[(_cdiv(L, block_m), bsz * h)](
        q, k, v, o, slopes, h, L, S, 1.4426950408889634 / math.sqrt(d),
        CAUSAL=is_causal, ALIBI=alibi, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return o


def attention_bias(h: int, L: int, S: int, alibi: bool, causal: bool) -> Tensor | None:
    """The float mask (H, L, S) that F.scaled_dot_product_attention needs to match the kernel, or None."""
    if not alibi and not causal:
        return None
    i, j = torch.arange(L)[:, None], torch.arange(S)[None, :]
    bias = torch.zeros(h, L, S, dtype=torch.float64)
    if alibi:
        bias = bias + alibi_slopes(h)[:, None, None] * (j - i)
    if causal:
        bias = bias.masked_fill(j > i, float("-inf"))
    return bias


# ---- how a Triton exercise is called ---------------------------------------------------------
def _launch_classes() -> list[type]:
    """Triton's launchable kernel classes (compiled and interpreted), imported if need be."""
    found = []
    for module_name, name in (
        ("triton.runtime.jit", "JITFunction"),
        ("triton.runtime.interpreter", "InterpretedFunction"),
    ):
        # Imported now if need be: a kernel module the call imports later (the course's own,
        # loaded on first use) must find the classes already counting.
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        cls = getattr(module, name, None)
        if isinstance(cls, type) and "run" in vars(cls):
            found.append(cls)
    return found


def _to_cpu(x: Any) -> Any:
    if torch.is_tensor(x):
        return x.cpu()
    if isinstance(x, tuple | list):
        return type(x)(_to_cpu(v) for v in x)
    return x


def _triton_probe(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Runs where the learner's function lives: call it, counting Triton launches; on CUDA when Triton compiles."""
    on_gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
    launches = [0]
    saved = []

    def counting(run: Callable[..., Any]) -> Callable[..., Any]:
        def run_counted(self: Any, *a: Any, **k: Any) -> Any:
            if not k.get("warmup", False):
                launches[0] += 1
            return run(self, *a, **k)

        return run_counted

    for cls in _launch_classes():
        saved.append((cls, vars(cls)["run"]))
        cls.run = counting(vars(cls)["run"])
    try:
        if on_gpu:
            args = tuple(a.cuda() if torch.is_tensor(a) else a for a in args)
        value = fn(*args, **kwargs)
        if on_gpu:
            torch.cuda.synchronize()
    finally:
        for cls, run in saved:
            cls.run = run
    return {"value": _to_cpu(value), "launches": launches[0]}


def _run_kernel(t: Tester, case: str, *args: Any, **kwargs: Any) -> Any:
    """The learner's launcher on ``args``; fails the case if it launched no Triton kernel."""
    out = t.probe(case, _triton_probe, *args, **kwargs)
    if not isinstance(out, dict) or "launches" not in out:
        t.fail(case, "the call did not come back in a form the check can read.")
    if out["launches"] == 0:
        name = getattr(t.fn, "__name__", t.exercise.id)
        t.fail(
            case,
            f"{name} launched no Triton kernel: this exercise asks for a @triton.jit kernel, "
            "launched as kernel[grid](...), that computes the result.",
        )
    return out["value"]


def padded(x: Tensor, fill: float, extra: int | None = None) -> Tensor:
    """A contiguous copy of ``x`` whose storage runs on past its end, filled with ``fill``.

    A kernel that loads its last block without a mask reads the ``fill`` values (inside the
    storage, so nothing crashes) and gets a visibly wrong answer.
    """
    extra = x.shape[-1] * 2 + 64 if extra is None else extra
    buf = torch.full((x.numel() + extra,), fill, dtype=x.dtype)
    buf[: x.numel()] = x.reshape(-1)
    return buf[: x.numel()].view(x.shape)


class _Ragged:
    """Adds the missing-mask hint to a failure on a ragged size once the power-of-two sizes passed."""

    def __init__(self) -> None:
        self.even_ok = True

    @contextlib.contextmanager
    def case(self, even: bool) -> Iterator[None]:
        """Judge one case; ``even`` says its sizes are powers of two (no partial block)."""
        try:
            yield
        except CheckFailure as failure:
            if even:
                self.even_ok = False
                raise
            text = str(failure)
            if self.even_ok and "It looks like" not in text:
                text += (
                    " The cases whose sizes are powers of two passed and this one is not: it looks "
                    "like the last block is not masked (load with mask=offs < n and a neutral "
                    "`other`, store with the same mask)."
                )
            raise CheckFailure(text) from None


# ---- RMSNorm backward ------------------------------------------------------------------------
def _rms_grad(dout: Tensor, x: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(dx, dweight) by autograd through RMSNorm's forward in float64."""
    x_ = x.detach().double().requires_grad_()
    w_ = w.detach().double().requires_grad_()
    with torch.enable_grad():
        y = ch06.ref_rmsnorm_forward(x_, w_, eps)
        dx, dw = torch.autograd.grad(y, (x_, w_), dout.double())
    return dx.to(x.dtype), dw.to(w.dtype)


def _rms_dx_mistakes(dout: Tensor, x: Tensor, w: Tensor, eps: float) -> list:
    d, x, w = dout.double(), x.double(), w.double()
    n = x.shape[-1]
    rstd = torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)
    xhat, g = x * rstd, d * w
    return [
        (
            "rstd was treated as a constant: dx = dout * weight * rstd misses the mean-of-squares term "
            "(rstd depends on every x of the row: subtract xhat * mean(dout * weight * xhat), times rstd).",
            lambda: g * rstd,
        ),
        (
            "the mean-of-squares term used a sum over the row instead of a mean (a factor of d too large).",
            lambda: rstd * (g - xhat * (g * xhat).sum(-1, keepdim=True)),
        ),
        (
            "the mean-of-squares term lost its rstd: it is xhat * mean(dout * weight * xhat), with xhat = x * rstd.",
            lambda: rstd * (g - x * (g * x).mean(-1, keepdim=True)),
        ),
        (
            "dx was not multiplied by the weight.",
            lambda: rstd * (d - xhat * (d * xhat).mean(-1, keepdim=True)),
        ),
        (
            "the mean of x**2 was taken with LayerNorm's centring (x - mean(x)); RMSNorm does not centre.",
            lambda: _centred_dx(d, x, w, eps, n),
        ),
    ]


def _centred_dx(d: Tensor, x: Tensor, w: Tensor, eps: float, n: int) -> Tensor:
    c = x - x.mean(-1, keepdim=True)
    rstd = torch.rsqrt((c * c).mean(-1, keepdim=True) + eps)
    return rstd * (d * w - x * rstd * rstd * (d * w * x).mean(-1, keepdim=True))


def _rms_dw_mistakes(dout: Tensor, x: Tensor, eps: float) -> list:
    d, x = dout.double(), x.double()
    xhat = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)
    lead = tuple(range(x.dim() - 1))
    if not lead:
        return [("dweight = dout * x; it is dout * xhat, the normalised input.", lambda: d * x)]
    return [
        (
            "dweight sums dout * x; it is the sum of dout * xhat, the normalised input.",
            lambda: (d * x).sum(lead),
        ),
        (
            "dweight is a mean over the leading dims; it is their sum.",
            lambda: (d * xhat).mean(lead),
        ),
    ]


def _expect_dweight_shape(t: Tester, case: str, got: Any, x: Tensor) -> None:
    d = x.shape[-1]
    if torch.is_tensor(got) and got.dim() >= 2 and got.shape[-1] == d:
        t.fail(
            case,
            f"`dweight` has shape {tuple(got.shape)}; it should have shape ({d},): dweight was not summed "
            "over the leading dims. Every position shares the weight, so sum dout * xhat over ALL "
            "leading dims.",
        )


def _rms_backward_cases(t: Tester) -> list[tuple[str, Tensor, Tensor, Tensor, float | None]]:
    settings = [
        ((4, 6), torch.float64, None),
        ((2, 3, 5), torch.float64, 1e-3),
        ((2, 2, 3, 4), torch.float64, 0.5),
        ((7,), torch.float64, 1e-6),
        ((3, 1), torch.float64, 1e-2),
        ((8, 16), torch.float32, 1e-6),
        ((2, 4, 8), torch.float32, 1e-2),
    ]
    cases = []
    for shape, dtype, eps in settings:
        x = (t.randn(*shape) + t.randn(*shape[:-1], 1)).to(dtype)
        w = (1.0 + 0.5 * t.randn(shape[-1])).to(dtype)
        dout = t.randn(*shape).to(dtype)
        label = "eps=1e-06 (default)" if eps is None else f"eps={eps}"
        cases.append((f"x {shape} {str(dtype)[6:]}, {label}", dout, x, w, eps))
    return cases


def _judge_rms_backward(
    t: Tester, case: str, out: Any, dout: Tensor, x: Tensor, w: Tensor, eps: float
) -> None:
    dx, dweight = t.unpack(case, out, ("dx", "dweight"))
    _expect_dweight_shape(t, case, dweight, x)
    want_dx, want_dw = _rms_grad(dout, x, w, eps)
    t.compare(case, "dx", dx, want_dx, mistakes=_rms_dx_mistakes(dout, x, w, eps))
    t.compare(case, "dweight", dweight, want_dw, mistakes=_rms_dw_mistakes(dout, x, eps))


@exercise(
    "rmsnorm_backward",
    forbidden=RMS_NORM_OPS,
    chapter=CHAPTER,
    signature="(dout, x, weight, eps=1e-6) -> (dx, dweight)",
    summary="RMSNorm backward over the last dim; dweight summed over all leading dims",
    reference=ref_rmsnorm_backward,
    backward=True,
)
def check_rmsnorm_backward(t: Tester) -> None:
    """Against autograd through RMSNorm's forward and against central differences of the forward."""
    for case, dout, x, w, eps in _rms_backward_cases(t):
        out = t.call(case, dout, x, w) if eps is None else t.call(case, dout, x, w, eps)
        _judge_rms_backward(t, case, out, dout, x, w, 1e-6 if eps is None else eps)
    case = "x (3, 5) float64, eps=1e-3, against central differences of the forward"
    x, w, dout = t.randn(3, 5) + 0.3, 1.0 + 0.5 * t.randn(5), t.randn(3, 5)
    numeric = numerical_gradient(lambda a, b: ch06.ref_rmsnorm_forward(a, b, 1e-3), [x, w], dout)
    dx, dweight = t.unpack(case, t.call(case, dout, x, w, 1e-3), ("dx", "dweight"))
    t.compare(case, "dx", dx, numeric[0], rtol=1e-5, atol=1e-8)
    t.compare(case, "dweight", dweight, numeric[1], rtol=1e-5, atol=1e-8)


# ---- int8 quantisation -----------------------------------------------------------------------
def _first_difference(got: Tensor, want: Tensor) -> str:
    idx = tuple(int(i) for i in (got != want).nonzero()[0])
    return f"at index {idx} (got {int(got[idx])}, expected {int(want[idx])})"


def _quant_cases(t: Tester) -> list[tuple[str, Tensor]]:
    f32 = torch.float32
    rows = t.randn(5, 12) * torch.tensor([[0.01], [1.0], [30.0], [0.2], [5.0]], dtype=torch.float64)
    zero = t.randn(4, 8)
    zero[2] = 0.0
    # Exact ties: scale 0.5 exactly (max 63.5 = 127 * 0.5), entries k + 0.5 times 0.5.
    ties = torch.tensor([[63.5, 1.25, -1.25, 0.75, 2.2, -0.3, 3.7, -63.5]], dtype=torch.float64)
    return [
        ("w (4, 8) float32", t.randn(4, 8, dtype=f32)),
        ("w (3, 16) float64", t.randn(3, 16)),
        ("w (5, 12) float64, rows of magnitude 0.01 to 30", rows),
        ("w (4, 8) float64, row 2 all zeros", zero),
        ("w (1, 8) float64, entries at exact ties of w / scale", ties),
        ("w (6, 33) float32, heavy tails", (t.randn(6, 33) ** 3).to(f32)),
    ]


def _check_scale(t: Tester, case: str, scale: Any, w: Tensor) -> Tensor:
    n = w.shape[0]
    if torch.is_tensor(scale) and scale.numel() == 1 and n > 1:
        t.fail(
            case,
            f"`scale` has shape {tuple(scale.shape)}: one scale for the whole tensor. The contract wants "
            f"one scale per output row, shape ({n},): scale[n] = max_k |w[n, k]| / 127.",
        )
    if not torch.is_tensor(scale) or not scale.is_floating_point():
        t.fail(
            case,
            f"`scale` should be a floating-point tensor of shape ({n},), but it is {_what(scale)}.",
        )
    amax = w.double().abs().amax(-1)
    want = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    mistakes = [
        (
            "scale = max|w| / 128; symmetric int8 uses 127 (so that -max maps to -127 and the grid is "
            "symmetric).",
            torch.where(amax > 0, amax / 128, torch.ones_like(amax)),
        ),
        (
            "one scale for the whole tensor (max over every row); the contract wants one per output row.",
            torch.full_like(amax, float(amax.max()) / 127),
        ),
        (
            "a row of zeros got scale 0, and w / 0 gives NaN: give such a row scale 1.",
            amax / 127,
        ),
    ]
    if not torch.isfinite(scale.double()).all() or bool((scale == 0).any()):
        t.fail(
            case,
            "`scale` has 0, NaN or inf in it: a row of zeros must get scale 1 (its max is 0, and "
            "w / 0 gives NaN).",
        )
    got = t.expect_tensor(case, "scale", scale, shape=(n,), dtype=None)
    t.compare(
        case,
        "scale",
        got.double(),
        want,
        rtol=2e-7 if w.dtype == torch.float64 else 2e-6,
        atol=0.0,
        mistakes=mistakes,
    )
    return want


def _what(x: Any) -> str:
    if torch.is_tensor(x):
        return f"a {str(x.dtype).replace('torch.', '')} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def _check_q(t: Tester, case: str, q: Any, w: Tensor, scale: Tensor) -> None:
    q = t.expect_tensor(case, "q", q, shape=tuple(w.shape), dtype=torch.int8)
    r = w.double() / scale[:, None]  # the exact quotient
    slack = 1e-9 if w.dtype == torch.float64 else 1e-5 * (1 + r.abs())
    off = (q.double() - r).abs()
    bad = off > 0.5 + slack  # a nearest integer is within 0.5: at an exact tie either neighbour
    if not bad.any():
        t.ok(case, "q", "ok (nearest integer to w / scale everywhere)")
        return
    idx = tuple(int(i) for i in bad.nonzero()[0])
    line = (
        f"`q` is not the nearest integer to w / scale at index {idx}: got {int(q[idx])}, and "
        f"w / scale there is {float(r[idx]):.4f}."
    )

    # float32 quotients may land a hair on the other side of an integer: most entries decide
    def mostly(model: Tensor) -> bool:
        return bool((q.double() == model).double().mean() >= 0.9) and float(q[idx]) == float(
            model[idx]
        )

    if mostly(r.trunc()):
        line += (
            " It looks like w / scale was truncated toward zero (.to(torch.int8) or .int() on the "
            "quotient): round it first with torch.round (half to even)."
        )
    elif mostly(r.floor()):
        line += " It looks like w / scale was floored; round it with torch.round."
    elif bool((q.double() - r.round()).abs().max() >= 100):
        line += " It looks like it overflowed int8: clamp to [-127, 127] before converting."
    t.fail(case, line)


@exercise(
    "quantize_int8",
    chapter=CHAPTER,
    signature="(w (N,K) float) -> (q (N,K) int8, scale (N,) float)",
    summary="symmetric per-row int8 quantisation: scale = max|w[n]|/127 (1 for a zero row), q = round(w/scale)",
    reference=ref_quantize_int8,
)
def check_quantize_int8(t: Tester) -> None:
    """Scales per row, a zero row, exact ties (either neighbour), rounding against truncation, float32 and float64."""
    for case, w in _quant_cases(t):
        q, scale = t.unpack(case, t.call(case, w), ("q", "scale"))
        want_scale = _check_scale(t, case, scale, w)
        _check_q(t, case, q, w, want_scale)


# ---- int8 GEMV -------------------------------------------------------------------------------
class WideTensorWatch(TorchFunctionMode):
    """Records (operation, shape, dtype) of every float32 or float64 tensor a torch call returns inside the mode.

    A TorchFunctionMode, like chapter 09's ShapeRecorder: it sees every torch function, method
    and operator of the learner's call (plain data goes back to the check).
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, tuple[int, ...], str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's hook
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        for x in out if isinstance(out, tuple | list) else (out,):
            if torch.is_tensor(x) and x.dtype in (torch.float32, torch.float64):
                self.seen.append((name, tuple(x.shape), str(x.dtype).replace("torch.", "")))
        return out

    def report(self) -> list[tuple[str, tuple[int, ...], str]]:
        """Each distinct (operation, shape, dtype) seen, in order."""
        return list(dict.fromkeys(self.seen))


def _gemv_cases(t: Tester) -> list[tuple[str, Tensor, Tensor, Tensor]]:
    out = []
    for b, n, k, dtype in (
        (1, 6, 16, torch.float64),
        (3, 5, 12, torch.float64),
        (2, 9, 33, torch.float32),
        (1, 16, 64, torch.float32),
        (2, 7, 24, torch.bfloat16),
    ):
        q = (t.randint(255, n, k) - 127).to(torch.int8)
        scale = (t.rand(n) * 0.05 + 0.001).to(dtype if dtype != torch.bfloat16 else torch.float32)
        x = t.randn(b, k).to(dtype)
        out.append(
            (
                f"x ({b}, {k}) {str(dtype)[6:]}, q ({n}, {k}) int8, scale {str(scale.dtype)[6:]}",
                x,
                q,
                scale,
            )
        )
    return out


def _gemv_want(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    return ((x.double() @ q.double().T) * scale.double()).to(x.dtype)


def _gemv_mistakes(x: Tensor, q: Tensor, scale: Tensor) -> list:
    xd, qd, s = x.double(), q.double(), scale.double()
    return [
        (
            "the scale was not applied: multiply each output column n by scale[n].",
            lambda: xd @ qd.T,
        ),
        (
            "the output was divided by the scale; dequantising multiplies: w = q * scale.",
            lambda: (xd @ qd.T) / s,
        ),
    ]


def _judge_gemv(t: Tester, case: str, got: Any, x: Tensor, q: Tensor, scale: Tensor) -> None:
    if torch.is_tensor(got) and got.is_floating_point() and got.dtype != x.dtype:
        t.fail(
            case,
            f"the output has dtype {str(got.dtype)[6:]} but x is {str(x.dtype)[6:]}: the contract returns "
            "x's dtype (multiplying by a float32 scale promotes a 16-bit result; cast it back).",
        )
    want = _gemv_want(x, q, scale)
    rtol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(x.dtype, 2e-2)
    atol = float(want.double().abs().max()) * rtol
    t.compare(case, "out", got, want, rtol=rtol, atol=atol, mistakes=_gemv_mistakes(x, q, scale))


def _check_no_wide_weight(t: Tester, case: str, n: int, k: int) -> None:
    wide = [(op, shape, dt) for op, shape, dt in t.last_watch or [] if math.prod(shape) >= n * k]
    if wide:
        op, shape, dt = wide[0]
        t.fail(
            case,
            f"the function built a {dt} tensor of shape {shape} (by {op}), with at least N*K = {n}*{k} "
            "elements: it materialised the dequantised (N, K) weight in float32 or wider. Work through "
            "q a block of rows (or columns) at a time, or convert q to a 16-bit dtype, so that the whole "
            "float weight never exists.",
        )


@exercise(
    "int8_gemv",
    forbidden=("_weight_int8pack_mm",),
    chapter=CHAPTER,
    signature="(x (B,K) float, q (N,K) int8, scale (N,)) -> (B,N)",
    summary="x @ (q * scale[:, None])^T in x's dtype, without materialising the float (N,K) weight",
    reference=ref_int8_gemv,
)
def check_int8_gemv(t: Tester) -> None:
    """Float64, float32 and bfloat16 x; output dtype is x's; a watch refuses any float32/64 tensor of N*K elements."""
    for case, x, q, scale in _gemv_cases(t):
        got = t.call(case, x, q, scale, watch=WideTensorWatch)
        _check_no_wide_weight(t, case, q.shape[0], q.shape[1])
        _judge_gemv(t, case, got, x, q, scale)
    t.ok("every case", "no float (N, K) weight", "ok")


# ---- int4 packing ----------------------------------------------------------------------------
def _int4_cases(t: Tester) -> list[tuple[str, Tensor]]:
    every = torch.arange(-8, 8, dtype=torch.int8).repeat(2, 1)  # every value, in both nibbles
    return [
        ("q (2, 16) int8, every value -8..7", every),
        ("q (3, 8) int8", (t.randint(16, 3, 8) - 8).to(torch.int8)),
        ("q (1, 2) int8", torch.tensor([[-8, 7]], dtype=torch.int8)),
        ("q (5, 34) int8", (t.randint(16, 5, 34) - 8).to(torch.int8)),
    ]


def _exact(t: Tester, case: str, quantity: str, got: Any, want: Tensor, mistakes: list) -> None:
    got = t.expect_tensor(case, quantity, got, shape=tuple(want.shape), dtype=want.dtype)
    if torch.equal(got, want):
        t.ok(case, quantity, "ok (exact)")
        return
    line = f"`{quantity}` is wrong {_first_difference(got, want)}."
    for sentence, alt in mistakes:
        alt_t = alt() if callable(alt) else alt
        if (
            alt_t is not None
            and alt_t.shape == got.shape
            and torch.equal(got.to(torch.int16), alt_t.to(torch.int16))
        ):
            line += f" It looks like {sentence}"
            break
    t.fail(case, line)


def _swap(packed: Tensor) -> Tensor:
    return (packed >> 4) | ((packed & 0xF) << 4)


@exercise(
    "pack_int4",
    chapter=CHAPTER,
    signature="(q (N,K) int8 with values in [-8, 7], K even) -> (N, K/2) uint8",
    summary="two 4-bit two's-complement values per byte: q[2j] in the low nibble, q[2j+1] in the high",
    reference=ref_pack_int4,
)
def check_pack_int4(t: Tester) -> None:
    """Every value in both nibbles, exact; names swapped nibbles and offset (q + 8) encoding."""
    for case, q in _int4_cases(t):
        got = t.call(case, q)
        if (
            torch.is_tensor(got)
            and got.dtype == torch.int8
            and tuple(got.shape) == (q.shape[0], q.shape[1] // 2)
        ):
            t.fail(case, "`packed` has dtype int8; the contract packs into uint8 (bytes 0..255).")
        want = ref_pack_int4(q)
        offset = (q.to(torch.int16) + 8).to(torch.uint8)
        mistakes = [
            (
                "the nibbles are swapped: q[2j] belongs in the LOW four bits, q[2j+1] in the high four.",
                _swap(want),
            ),
            (
                "the values were stored as q + 8 (offset binary); the contract stores each as a 4-bit "
                "two's-complement nibble (q & 0xF: -1 is 0b1111).",
                offset[:, 0::2] | (offset[:, 1::2] << 4),
            ),
        ]
        _exact(t, case, "packed", got, want, mistakes)


@exercise(
    "unpack_int4",
    chapter=CHAPTER,
    signature="(packed (N, K/2) uint8) -> (N,K) int8",
    summary="the inverse of pack_int4, sign-extending each nibble",
    reference=ref_unpack_int4,
)
def check_unpack_int4(t: Tester) -> None:
    """Every byte value, exact; names a missing sign extension, swapped nibbles and a uint8 result."""
    all_bytes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(4, 64)
    cases = [("packed (4, 64) uint8, every byte 0..255", all_bytes)]
    cases += [(f"packed of {c[2:]}", ref_pack_int4(q)) for c, q in _int4_cases(t)[1:]]
    for case, packed in cases:
        got = t.call(case, packed)
        want = ref_unpack_int4(packed)
        if torch.is_tensor(got) and got.dtype == torch.uint8:
            t.fail(
                case,
                "the result has dtype uint8; it should be int8: the values -8..-1 need a signed type "
                "(sign-extend each nibble, then return int8).",
            )
        raw = torch.stack((packed & 0xF, packed >> 4), -1).flatten(-2).to(torch.int16)
        mistakes = [
            (
                "the nibbles were not sign-extended: values 8..15 should be -8..-1 (subtract 16 from "
                "nibbles of 8 or more).",
                raw,
            ),
            (
                "the nibbles are swapped: the low four bits hold q[2j], the high four q[2j+1].",
                ref_unpack_int4(_swap(packed)),
            ),
        ]
        _exact(t, case, "q", got, want, mistakes)


# ---- Triton exercises (run under the interpreter on a CPU) ------------------------------------
def _softmax_want(x: Tensor) -> Tensor:
    return torch.softmax(x.double(), -1).to(x.dtype)


def _softmax_mistakes(x: Tensor) -> list:
    n, block = x.shape[-1], _next_pow2(x.shape[-1])
    xd = x.double()
    zeros = torch.zeros(*x.shape[:-1], block - n, dtype=torch.float64)

    def padded_zero() -> Tensor:
        z = torch.cat([xd, zeros], -1)
        return torch.softmax(z, -1)[..., :n]

    return [
        (
            "the masked lanes were loaded as 0 (other=0.0, the default): they add exp(0 - max) to the sum. "
            "Load them as -inf so that they contribute exp(-inf) = 0.",
            padded_zero if block > n else None,
        )
    ]


def _softmax_cases(t: Tester) -> list[tuple[str, Tensor, bool]]:
    f32, f16 = torch.float32, torch.float16
    return [
        ("x (4, 16) float32", t.randn(4, 16, dtype=f32), True),
        ("x (2, 64) float32", t.randn(2, 64, dtype=f32, scale=3.0), True),
        ("x (3, 10) float32, N not a power of two", t.randn(3, 10, dtype=f32), False),
        ("x (5, 37) float32, N not a power of two", t.randn(5, 37, dtype=f32, scale=2.0), False),
        ("x (1, 1) float32", t.randn(1, 1, dtype=f32), False),
        ("x (3, 20) float16", t.randn(3, 20, dtype=f16), False),
        (
            "x (3, 24) float32, values of magnitude ~1e4",
            t.randn(3, 24, dtype=f32, scale=1e4),
            False,
        ),
    ]


@exercise(
    "triton_softmax",
    forbidden=("softmax", "log_softmax", "safe_softmax"),
    chapter=CHAPTER,
    signature="(x (M,N) float, contiguous) -> (M,N)",
    summary="row softmax as a Triton kernel, one program per row (checked under TRITON_INTERPRET=1 on a CPU)",
    reference=ref_triton_softmax,
)
def check_triton_softmax(t: Tester) -> None:
    """N a power of two and not, float16, magnitude 1e4; inputs padded so an unmasked load shows."""
    ragged = _Ragged()
    for case, x, even in _softmax_cases(t):
        got = _run_kernel(t, case, padded(x, 1e4))
        if torch.is_tensor(got) and "1e4" in case and not torch.isfinite(got.double()).all():
            t.fail(
                case,
                "the output has NaN or inf: exp overflowed. It looks like the row maximum was not "
                "subtracted before tl.exp (softmax(x) = softmax(x - max x), and then the largest "
                "exponent is 0).",
            )
        with ragged.case(even):
            t.compare(case, "y", got, _softmax_want(x), mistakes=_softmax_mistakes(x))


def _rmsnorm_kernel_mistakes(x: Tensor, w: Tensor, eps: float) -> list:
    n, block = x.shape[-1], _next_pow2(x.shape[-1])
    xd, wd = x.double(), w.double()
    out = [
        (
            "the sum of squares was divided by BLOCK, the padded width, not by n_cols: the mean runs over "
            "the row's real entries only.",
            (lambda: xd * torch.rsqrt((xd * xd).sum(-1, keepdim=True) / block + eps) * wd)
            if block > n
            else None,
        )
    ]
    return out + ch06._rms_mistakes(x, w, eps)


def _rmsnorm_kernel_cases(t: Tester) -> list[tuple[str, Tensor, Tensor, float | None, bool]]:
    f32, f16 = torch.float32, torch.float16
    cases = []
    for shape, dtype, eps, even in (
        ((4, 16), f32, None, True),
        ((2, 32), f32, 1e-2, True),
        ((3, 10), f32, None, False),
        ((5, 37), f32, 0.5, False),
        ((3, 20), f16, 1e-3, False),
    ):
        scale = 0.02 if eps is None else 1.0  # small values in the default case, so eps shows
        x = (t.randn(*shape) * scale).to(dtype)
        w = (1.0 + 0.5 * t.randn(shape[-1])).to(dtype)
        label = "eps=1e-06 (default)" if eps is None else f"eps={eps}"
        cases.append((f"x {shape} {str(dtype)[6:]}, {label}", x, w, eps, even))
    return cases


@exercise(
    "triton_rmsnorm",
    forbidden=RMS_NORM_OPS,
    chapter=CHAPTER,
    signature="(x (M,N) float, weight (N,), eps=1e-6) -> (M,N)",
    summary="RMSNorm forward as a Triton kernel, one program per row, in float32 registers",
    reference=ref_triton_rmsnorm,
)
def check_triton_rmsnorm(t: Tester) -> None:
    """N a power of two and not, eps placement, float16; inputs padded so an unmasked load shows."""
    ragged = _Ragged()
    for case, x, w, eps, even in _rmsnorm_kernel_cases(t):
        args = (padded(x, 30.0), padded(w, 30.0))
        got = _run_kernel(t, case, *args) if eps is None else _run_kernel(t, case, *args, eps)
        eps = 1e-6 if eps is None else eps
        want = ch06.ref_rmsnorm_forward(x.double(), w.double(), eps).to(x.dtype)
        with ragged.case(even):
            t.compare(case, "y", got, want, mistakes=_rmsnorm_kernel_mistakes(x, w, eps))


@exercise(
    "triton_rmsnorm_backward",
    forbidden=RMS_NORM_OPS,
    chapter=CHAPTER,
    signature="(dout (M,N), x (M,N), weight (N,), eps=1e-6) -> (dx, dweight)",
    summary="fused RMSNorm backward as a Triton kernel: dx per row, dweight summed over rows",
    reference=ref_triton_rmsnorm_backward,
    backward=True,
)
def check_triton_rmsnorm_backward(t: Tester) -> None:
    """Against autograd through the forward: N a power of two and not, rows not a multiple of a group."""
    ragged = _Ragged()
    f32 = torch.float32
    for shape, eps, even in (
        ((4, 16), None, True),
        ((3, 10), 1e-2, False),
        ((9, 37), 1e-6, False),
        ((1, 5), 0.5, False),
    ):
        x = (t.randn(*shape) + t.randn(shape[0], 1)).to(f32)
        w = (1.0 + 0.5 * t.randn(shape[-1])).to(f32)
        dout = t.randn(*shape).to(f32)
        label = "eps=1e-06 (default)" if eps is None else f"eps={eps}"
        case = f"x {shape} float32, {label}"
        args = (padded(dout, 30.0), padded(x, 30.0), padded(w, 30.0))
        got = _run_kernel(t, case, *args) if eps is None else _run_kernel(t, case, *args, eps)
        with ragged.case(even):
            _judge_rms_backward(t, case, got, dout, x, w, 1e-6 if eps is None else eps)


@exercise(
    "triton_int8_gemv",
    forbidden=MATMUL_OPS,
    chapter=CHAPTER,
    signature="(x (B,K) float, q (N,K) int8, scale (N,)) -> (B,N)",
    summary="weight-only int8 GEMV as a Triton kernel, dequantising each tile in registers",
    reference=ref_triton_int8_gemv,
)
def check_triton_int8_gemv(t: Tester) -> None:
    """B = 1 and more, N and K powers of two and not, float32 and float16 x; inputs padded."""
    ragged = _Ragged()
    for b, n, k, dtype, even in (
        (1, 16, 64, torch.float32, True),
        (2, 8, 128, torch.float32, True),
        (1, 10, 40, torch.float32, False),
        (3, 7, 100, torch.float32, False),
        (2, 9, 48, torch.float16, False),
    ):
        q = (t.randint(255, n, k) - 127).to(torch.int8)
        scale = (t.rand(n) * 0.05 + 0.001).to(torch.float32)
        x = t.randn(b, k).to(dtype)
        case = f"x ({b}, {k}) {str(dtype)[6:]}, q ({n}, {k}) int8, scale float32"
        got = _run_kernel(t, case, padded(x, 50.0), padded(q, 100), padded(scale, 50.0))
        with ragged.case(even):
            _judge_gemv(t, case, got, x, q, scale)
