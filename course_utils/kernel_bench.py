"""Chapter 13's GPU benchmark: the course's Triton kernels against eager PyTorch and torch.compile.

``python -m course_utils.kernel_bench`` measures the device's copy bandwidth, then each kernel's
bandwidth in GB/s and as a share of that copy bandwidth (attention: TFLOP/s against
``F.scaled_dot_product_attention``), and writes the dated table ``.ci/kernels.md`` and the
roofline plot ``.ci/kernels_roofline.png``. On a machine without CUDA it exits 1 with one line.

The kernels are the course's references (``course_utils.checks.ch13_triton_kernels``, the
``ref_triton_*`` launchers); nothing here re-implements them. Goals (from an H100 with a copy
bandwidth of 2.95 TB/s): softmax and RMSNorm at 90 % of copy bandwidth or more, int8 GEMV at
batch 1, K = 8192 at least 1.6x faster than fp16 ``torch.matmul``, attention at 60 % of SDPA's
TFLOP/s or more.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / ".ci" / "kernels.md"
PLOT = ROOT / ".ci" / "kernels_roofline.png"


@dataclass
class Row:
    """One timed variant of one kernel."""

    kernel: str
    shape: str
    variant: str
    ms: float
    bytes: float
    flops: float
    note: str = ""

    @property
    def gbps(self) -> float:
        """Bytes moved per second, in GB/s."""
        return self.bytes / self.ms / 1e6

    @property
    def tflops(self) -> float:
        """Floating-point operations per second, in TFLOP/s."""
        return self.flops / self.ms / 1e9


def timed(fn: Callable[[], Any]) -> float:
    """Median milliseconds of ``fn`` on the GPU (Triton's do_bench: warm-up, L2 flushed between runs)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth(n_bytes: int = 2**30) -> float:
    """The device's measured device-to-device copy bandwidth in GB/s (read plus write)."""
    import torch

    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    return 2 * n_bytes / timed(lambda: dst.copy_(src)) / 1e6


def peak_tflops(n: int = 8192) -> float:
    """Dense bf16 matmul throughput in TFLOP/s: the roof of the roofline."""
    import torch

    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    return 2 * n**3 / timed(lambda: a @ b) / 1e9


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    import torch

    return torch.compile(fn, dynamic=False)


def bench_rowwise(m: int, n: int) -> list[Row]:
    """Softmax, RMSNorm and SwiGLU on (m, n) bf16: eager, torch.compile and the course's Triton kernel."""
    import torch
    import torch.nn.functional as F

    from .checks import ch13_triton_kernels as ch13

    x = torch.randn(m, n, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    u = torch.randn_like(x)
    shape, nbytes = f"{m} x {n} bf16", x.numel() * x.element_size()

    def softmax(a: Any) -> Any:
        return torch.softmax(a, -1)

    def rms(a: Any, b: Any) -> Any:
        return F.rms_norm(a, (n,), b, 1e-6)

    def swiglu(a: Any, b: Any) -> Any:
        return F.silu(a) * b

    rows = []
    for kernel, io, flops, variants in (
        ("softmax", 2 * nbytes, 5 * x.numel(), {
            "eager": lambda: softmax(x),
            "torch.compile": (lambda f: lambda: f(x))(_compiled(softmax)),
            "triton (course)": lambda: ch13.ref_triton_softmax(x),
        }),
        ("rmsnorm", 2 * nbytes + n * 2, 4 * x.numel(), {
            "eager": lambda: rms(x, w),
            "torch.compile": (lambda f: lambda: f(x, w))(_compiled(rms)),
            "triton (course)": lambda: ch13.ref_triton_rmsnorm(x, w),
        }),
        ("swiglu", 3 * nbytes, 5 * x.numel(), {
            "eager": lambda: swiglu(x, u),
            "torch.compile": (lambda f: lambda: f(x, u))(_compiled(swiglu)),
            "triton (course)": lambda: ch13.ref_triton_swiglu(x, u),
        }),
    ):  # fmt: skip
        for variant, fn in variants.items():
            rows.append(Row(kernel, shape, variant, timed(fn), io, flops))
    return rows


def bench_rope(b: int, h: int, L: int, d: int) -> list[Row]:
    """RoPE on (b, h, L, d) bf16: torch.compile of chapter 10's formula against the Triton kernel."""
    import torch

    from .checks import ch13_triton_kernels as ch13
    from .checks.ch10_positional_encoding import ref_apply_rope

    x = torch.randn(b, h, L, d, dtype=torch.bfloat16, device="cuda")
    pos = torch.arange(L, device="cuda")
    io, shape = 2 * x.numel() * 2, f"{b}x{h}x{L}x{d} bf16"
    rope = _compiled(ref_apply_rope)
    return [
        Row("rope", shape, "torch.compile", timed(lambda: rope(x, pos)), io, 6 * x.numel()),
        Row(
            "rope",
            shape,
            "triton (course)",
            timed(lambda: ch13.ref_triton_rope(x, pos)),
            io,
            6 * x.numel(),
        ),
    ]


GEMV_CONFIGS = [(bn, bk, w) for bn in (8, 16, 32) for bk in (256, 512, 1024) for w in (2, 4, 8)]


def bench_gemv(
    batch: int, n: int, k: int, configs: list[tuple[int, int, int]] | None = None
) -> list[Row]:
    """Weight-only int8 and int4 GEMV against fp16 torch.matmul; the best of a few tile shapes."""
    import torch

    from .checks import ch13_triton_kernels as ch13

    w = torch.randn(n, k, dtype=torch.float16, device="cuda")
    x = torch.randn(batch, k, dtype=torch.float16, device="cuda")
    q8, s8 = ch13.ref_quantize_int8(w.float())
    q4, s4 = ch13.quantize_int4(w.float())
    packed = ch13.ref_pack_int4(q4)
    s8, s4 = s8.half(), s4.half()
    shape = f"B={batch}, N={n}, K={k}"
    rows = [
        Row(
            "gemv", shape, "fp16 torch.matmul", timed(lambda: x @ w.T), n * k * 2, 2 * batch * n * k
        )
    ]
    for name, weight, scale, launch, nbytes in (
        ("int8 triton (course)", q8, s8, ch13.ref_triton_int8_gemv, n * k),
        ("int4 triton (course)", packed, s4, ch13.ref_triton_int4_gemv, n * k // 2),
    ):
        best = None
        for bn, bk, warps in configs or GEMV_CONFIGS:
            call = functools.partial(
                launch, x, weight, scale, block_n=bn, block_k=bk, num_warps=warps
            )
            ms = timed(call)
            if best is None or ms < best[0]:
                best = (ms, f"BLOCK_N={bn}, BLOCK_K={bk}, num_warps={warps}")
        rows.append(Row("gemv", shape, name, best[0], nbytes, 2 * batch * n * k, best[1]))
    return rows


ATTENTION_CONFIGS = [
    (128, 64, 8, 3),
    (128, 128, 8, 3),
    (128, 64, 4, 4),
    (64, 64, 4, 3),
    (128, 32, 4, 3),
]


def bench_attention(b: int, h: int, L: int, d: int, configs: list | None = None) -> list[Row]:
    """Causal FlashAttention-2 forward (bf16) against F.scaled_dot_product_attention, in TFLOP/s."""
    import torch
    import torch.nn.functional as F

    from .checks import ch13_triton_kernels as ch13

    q, k, v = (torch.randn(b, h, L, d, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    flops = 4 * b * h * L * L * d / 2  # two matmuls, half the square under the causal mask
    io = 4 * q.numel() * 2
    shape = f"{b}x{h}x{L}x{d} bf16, causal"
    sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    rows = [Row("attention", shape, "F.scaled_dot_product_attention", sdpa, io, flops)]
    best = None
    for bm, bn, warps, stages in configs or ATTENTION_CONFIGS:
        try:
            call = functools.partial(
                ch13.ref_triton_flash_attention, q, k, v, is_causal=True,
                block_m=bm, block_n=bn, num_warps=warps, num_stages=stages,
            )  # fmt: skip
            ms = timed(call)
        except Exception as err:  # noqa: BLE001 - a tile that does not fit this device's shared memory
            print(
                f"attention config {bm}/{bn}/{warps}/{stages} skipped: {type(err).__name__}",
                file=sys.stderr,
            )
            continue
        if best is None or ms < best[0]:
            best = (ms, f"BLOCK_M={bm}, BLOCK_N={bn}, num_warps={warps}, num_stages={stages}")
    if best is not None:
        rows.append(Row("attention", shape, "triton FA2 (course)", best[0], io, flops, best[1]))
    return rows


def verify() -> None:
    """The kernels agree with PyTorch on the GPU before anything is timed (AssertionError if not)."""
    import torch
    import torch.nn.functional as F

    from .checks import ch13_triton_kernels as ch13

    x = torch.randn(64, 1000, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1000, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(ch13.ref_triton_softmax(x), torch.softmax(x.float(), -1).bfloat16())
    torch.testing.assert_close(
        ch13.ref_triton_rmsnorm(x, w), F.rms_norm(x.float(), (1000,), w.float(), 1e-6).bfloat16()
    )
    q, k, v = (torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    o = ch13.ref_triton_flash_attention(q, k, v, is_causal=True)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(o.float(), ref, atol=2e-2, rtol=2e-2)
    wq = torch.randn(96, 1024, device="cuda")
    q8, s8 = ch13.ref_quantize_int8(wq)
    xx = torch.randn(3, 1024, device="cuda")
    torch.testing.assert_close(
        ch13.ref_triton_int8_gemv(xx, q8, s8),
        xx @ (q8.float() * s8[:, None]).T,
        atol=1e-3,
        rtol=1e-3,
    )


def run(small: bool = False) -> tuple[list[Row], dict[str, float]]:
    """Every measurement; ``small`` shrinks the shapes (the notebook's GPU cell)."""
    verify()
    device = {
        "copy_gbps": copy_bandwidth(2**28 if small else 2**30),
        "peak_tflops": peak_tflops(4096 if small else 8192),
    }
    if small:
        rows = bench_rowwise(4096, 4096) + bench_gemv(1, 4096, 4096, [(16, 512, 4)])
        rows += bench_attention(1, 8, 1024, 64, [(128, 64, 4, 3)])
    else:
        rows = bench_rowwise(16384, 8192) + bench_rope(4, 32, 4096, 128)
        rows += bench_gemv(1, 8192, 8192) + bench_attention(4, 16, 4096, 128)
    return rows, device


def goals(rows: list[Row], device: dict[str, float]) -> list[tuple[str, float, float, bool]]:
    """(goal, measured, target, met) for each of the chapter's goals that was measured."""
    by = {(r.kernel, r.variant): r for r in rows}
    out = []
    for kernel in ("softmax", "rmsnorm"):
        r = by.get((kernel, "triton (course)"))
        if r is not None:
            share = r.gbps / device["copy_gbps"]
            out.append((f"{kernel}: share of copy bandwidth", share, 0.90, share >= 0.90))
    fp16, int8 = by.get(("gemv", "fp16 torch.matmul")), by.get(("gemv", "int8 triton (course)"))
    if fp16 and int8:
        speedup = fp16.ms / int8.ms
        out.append(("int8 GEMV: speed-up over fp16 torch.matmul", speedup, 1.6, speedup >= 1.6))
    sdpa, fa = (
        by.get(("attention", "F.scaled_dot_product_attention")),
        by.get(("attention", "triton FA2 (course)")),
    )
    if sdpa and fa:
        share = fa.tflops / sdpa.tflops
        out.append(("attention: share of SDPA's TFLOP/s", share, 0.60, share >= 0.60))
    return out


def write_table(rows: list[Row], device: dict[str, float], out: Path = TABLE) -> None:
    """The dated markdown table of every row and the goals."""
    import torch

    from .gpu import device_name

    copy = device["copy_gbps"]
    lines = [
        "# Chapter 13 kernels",
        "",
        f"Measured {datetime.date.today().isoformat()} on {device_name()} (torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}); copy bandwidth {copy:.0f} GB/s, bf16 matmul {device['peak_tflops']:.0f} TFLOP/s.",
        "Refresh with `python -m course_utils.kernel_bench` on a machine with a GPU.",
        "",
        "| kernel | shape | variant | ms | GB/s | % of copy | TFLOP/s | note |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.kernel} | {r.shape} | {r.variant} | {r.ms:.4f} | {r.gbps:.0f} | "
            f"{100 * r.gbps / copy:.0f} % | {r.tflops:.1f} | {r.note} |"
        )
    lines += ["", "| goal | measured | target | met |", "|---|---:|---:|---|"]
    for goal, value, target, met in goals(rows, device):
        lines.append(f"| {goal} | {value:.2f} | {target:.2f} | {'yes' if met else 'NO'} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot_roofline(rows: list[Row], device: dict[str, float], out: Path = PLOT) -> None:
    """Achieved TFLOP/s against arithmetic intensity (FLOP per byte), under the copy and matmul roofs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    copy_tb, peak = device["copy_gbps"] / 1e3, device["peak_tflops"]
    intensity = [r.flops / r.bytes for r in rows]
    xs = [min(intensity) / 2, peak / copy_tb, max(max(intensity) * 2, peak / copy_tb * 4)]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(
        xs,
        [min(peak, x * copy_tb) for x in xs],
        "k-",
        lw=1,
        label="roof: copy bandwidth, bf16 matmul",
    )
    markers = {"eager": "o", "torch.compile": "s"}
    for r, i in zip(rows, intensity, strict=True):
        mark = next((m for key, m in markers.items() if r.variant.startswith(key)), "*")
        ax.loglog(i, r.tflops, mark, ms=9 if mark == "*" else 6, label=f"{r.kernel}: {r.variant}")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(
        f"Chapter 13 kernels: copy {device['copy_gbps']:.0f} GB/s, matmul {peak:.0f} TFLOP/s"
    )
    ax.legend(fontsize=6, ncol=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Benchmark the course's Triton kernels on this machine's GPU; write the table and the roofline."""
    parser = argparse.ArgumentParser(
        prog="python -m course_utils.kernel_bench", description=main.__doc__
    )
    parser.add_argument("--out", type=Path, default=TABLE, help="default: .ci/kernels.md")
    parser.add_argument("--plot", type=Path, default=PLOT, help="default: .ci/kernels_roofline.png")
    parser.add_argument("--small", action="store_true", help="small shapes, a quick look")
    args = parser.parse_args(argv)
    from .gpu import skip_reason

    reason = skip_reason()
    if not reason:
        try:
            import triton  # noqa: F401
        except ImportError as err:
            reason = f"Triton is not installed ({err})"
    if reason:
        print(
            f"kernel_bench: {reason}; run it on a machine with a CUDA GPU and Triton.",
            file=sys.stderr,
        )
        return 1
    rows, device = run(small=args.small)
    write_table(rows, device, args.out)
    plot_roofline(rows, device, args.plot)
    print(args.out.read_text(encoding="utf-8"))
    met = goals(rows, device)
    return 0 if all(m for *_, m in met) else 2


if __name__ == "__main__":
    sys.exit(main())
