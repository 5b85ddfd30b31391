"""Check batteries of chapter 03: max and average pooling, forward and backward, and max-pool indices.

The cases cover non-overlapping, overlapping (stride < kernel) and gapped (stride > kernel)
windows, sizes the windows do not divide, stride left out, stride=None, int and pair
kernel/stride, global pooling, float32, and integer-valued inputs with many tied maxima,
so the rule "the gradient goes to the FIRST maximum of each window, in row-major order"
is really tested. Gradients are judged against PyTorch's autograd of F.max_pool2d /
F.avg_pool2d and against central differences on a tie-free case. Shapes are small so a
Python-loop implementation passes within the 2 s budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..checking import CheckFailure, Tester, exercise
from ..gradcheck import numerical_gradient
from .ch02_convolution import PAIR_ERRORS, Output, Pair, _pair, judge

CHAPTER = "03_pooling"
#: PyTorch's pooling operators, forbidden inside the exercises that rebuild them.
MAX_POOL_OPS = ("max_pool2d", "max_pool2d_with_indices", "adaptive_max_pool2d", "max_pool1d")
AVG_POOL_OPS = ("avg_pool2d", "adaptive_avg_pool2d", "avg_pool1d")
Tensor = torch.Tensor


def _geometry(
    x: Tensor, kernel_size: Pair, stride: Pair | None
) -> tuple[tuple[int, int], tuple[int, int], int, int]:
    """(kernel, stride, OH, OW) with stride defaulting to the kernel size."""
    k = _pair(kernel_size)
    s = k if stride is None else _pair(stride)
    h, w = x.shape[-2:]
    return k, s, (h - k[0]) // s[0] + 1, (w - k[1]) // s[1] + 1


# ---- reference implementations ---------------------------------------------------------
def ref_max_pool2d_forward(x: Tensor, kernel_size: Pair, stride: Pair | None = None) -> Tensor:
    """Max over each window of x (N, C, H, W), no padding, as ``F.max_pool2d``."""
    return F.max_pool2d(x, _pair(kernel_size), None if stride is None else _pair(stride))


def ref_max_pool2d_with_indices(
    x: Tensor, kernel_size: Pair, stride: Pair | None = None
) -> tuple[Tensor, Tensor]:
    """(out, indices): indices (int64) of the first maximum of each window, flat in the H*W plane."""
    return F.max_pool2d(
        x, _pair(kernel_size), None if stride is None else _pair(stride), return_indices=True
    )


def ref_max_pool2d_backward(
    dout: Tensor, x: Tensor, kernel_size: Pair, stride: Pair | None = None
) -> Tensor:
    """Route each dout to the first maximum of its window; overlapping windows add up."""
    n, c, h, w = x.shape
    _, idx = ref_max_pool2d_with_indices(x, kernel_size, stride)  # (N, C, OH, OW), flat in H*W
    dx = x.new_zeros(n, c, h * w)
    dx.scatter_add_(2, idx.reshape(n, c, -1), dout.reshape(n, c, -1))
    return dx.reshape(n, c, h, w)


def ref_avg_pool2d_forward(x: Tensor, kernel_size: Pair, stride: Pair | None = None) -> Tensor:
    """Mean over each window of x (N, C, H, W), no padding, as ``F.avg_pool2d``."""
    return F.avg_pool2d(x, _pair(kernel_size), None if stride is None else _pair(stride))


def ref_avg_pool2d_backward(
    dout: Tensor, x: Tensor, kernel_size: Pair, stride: Pair | None = None
) -> Tensor:
    """Spread each dout evenly, dout / (KH*KW), over its window; overlapping windows add up."""
    n, c, h, w = x.shape
    (kh, kw), s, oh, ow = _geometry(x, kernel_size, stride)
    cols = (dout / (kh * kw)).reshape(n * c, 1, oh * ow).expand(n * c, kh * kw, oh * ow)
    return F.fold(cols, (h, w), (kh, kw), stride=s).reshape(n, c, h, w)


# ---- the cases -------------------------------------------------------------------------------
_OMIT = object()  # stride left out of the call


@dataclass
class _PoolCase:
    name: str
    x: Tensor
    kernel: Pair
    stride: Any  # a Pair, None, or _OMIT
    ties: bool = False

    @property
    def s(self) -> Pair | None:
        return None if self.stride is _OMIT else self.stride

    def args(self) -> tuple[Any, ...]:
        return (self.x, self.kernel) if self.stride is _OMIT else (self.x, self.kernel, self.stride)


def _pool_cases(t: Tester) -> list[_PoolCase]:
    def ints(high: int, *shape: int) -> Tensor:
        return t.randint(high, *shape).to(torch.float64)

    def case(
        x: Tensor, kernel: Pair, stride: Any, note: str = "", ties: bool = False, what: str = "x"
    ) -> _PoolCase:
        hp = "stride left out" if stride is _OMIT else f"stride={stride}"
        label = f"{what} {tuple(x.shape)}{' ' + str(x.dtype)[6:] if x.dtype != torch.float64 else ''}, kernel_size={kernel}, {hp}"
        return _PoolCase(label + (f" ({note})" if note else ""), x, kernel, stride, ties)

    tie_demo = torch.tensor([[[[1.0, 3, 3], [3, 0, 3], [3, 3, 1]]]], dtype=torch.float64)
    return [
        case(t.randn(2, 3, 6, 6), 2, _OMIT, "stride defaults to kernel_size"),
        case(t.randn(1, 2, 7, 7), 3, 2, "overlapping windows"),
        case(t.randn(2, 2, 6, 7), (2, 3), (1, 2), "overlapping rows"),
        case(t.randn(1, 3, 7, 5), 2, None, "the windows do not cover the last row and column"),
        case(t.randn(2, 2, 5, 5), 3, 1, "heavy overlap"),
        case(t.randn(1, 2, 7, 8), 2, 3, "gaps between windows"),
        case(t.randn(2, 3, 4, 5), (4, 5), _OMIT, "global pooling"),
        case(-t.rand(2, 2, 4, 6) - 0.5, 2, _OMIT, "every value negative", what="all-negative x"),
        case(
            ints(3, 2, 2, 6, 6),
            2,
            _OMIT,
            "values in {0, 1, 2}: tied maxima",
            ties=True,
            what="integer-valued x",
        ),
        case(
            ints(2, 1, 2, 7, 7),
            3,
            2,
            "values in {0, 1}: ties and overlapping windows",
            ties=True,
            what="integer-valued x",
        ),
        case(
            ints(3, 1, 1, 5, 6),
            (2, 3),
            1,
            "values in {0, 1, 2}: ties and heavy overlap",
            ties=True,
            what="integer-valued x",
        ),
        case(
            torch.full((1, 2, 4, 4), 2.0, dtype=torch.float64),
            2,
            1,
            "every element tied",
            ties=True,
            what="constant x",
        ),
        case(
            tie_demo,
            2,
            1,
            "windows share a tied maximum",
            ties=True,
            what="x [[1,3,3],[3,0,3],[3,3,1]]",
        ),
        case(t.randn(2, 3, 6, 6, dtype=torch.float32), 3, 2, "overlapping windows"),
    ]


def _tie_free(t: Tester, *shape: int) -> Tensor:
    """Distinct values at least 0.1 apart: central differences with eps 1e-6 never cross a tie."""
    numel = math.prod(shape)
    return (torch.randperm(numel, generator=t.gen).to(torch.float64) * 0.1 - 0.05 * numel).reshape(
        shape
    )


# ---- helpers shared by the batteries --------------------------------------------------------
def _call(t: Tester, pc: _PoolCase, *args: Any, case: str | None = None) -> Any:
    """``t.call`` with a hint when the error looks like int/pair/None stride handling."""
    case = pc.name if case is None else case
    try:
        return t.call(case, *args)
    except CheckFailure as failure:
        text = str(failure)
        if any(e in text for e in PAIR_ERRORS):
            raise CheckFailure(
                text + " `kernel_size` and `stride` may each be an int or an (h, w) pair: turn "
                "an int k into (k, k) first."
            ) from None
        if "NoneType" in text and pc.s is None:
            raise CheckFailure(
                text + " stride=None (or left out) means stride = kernel_size."
            ) from None
        raise


def _pool_shapes(pc: _PoolCase, lead: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The (lead..., OH, OW) each output-size mistake gives, by key of _POOL_SHAPE_SENTENCES."""
    h, w = pc.x.shape[-2:]
    (kh, kw), (sh, sw), _, _ = _geometry(pc.x, pc.kernel, pc.s)

    def size(
        k: tuple[int, int],
        s: tuple[int, int],
        rounding: Callable[[float], int] = math.floor,
        plus: int = 1,
    ) -> tuple[int, ...]:
        return (*lead, rounding((h - k[0]) / s[0]) + plus, rounding((w - k[1]) / s[1]) + plus)

    shapes = {
        "ceil": size((kh, kw), (sh, sw), math.ceil),
        "no_plus_one": size((kh, kw), (sh, sw), plus=0),
        "swapped": size((kw, kh), (sw, sh)),
        "first_only": size((kh, kh), (sh, sh)),
        "stride_ignored": size((kh, kw), (kh, kw)),
    }
    if pc.s is None:
        shapes["stride_one"] = size((kh, kw), (1, 1))
    return shapes


_POOL_SHAPE_SENTENCES = {
    "stride_one": "stride=None was treated as stride 1; when stride is None (or left out) it defaults to "
    "kernel_size, so the windows do not overlap.",
    "stride_ignored": "the stride was ignored (the windows moved by kernel_size); they move by `stride` when it is given.",
    "ceil": "the output size was rounded up (ceil_mode=True); PyTorch's default rounds down, floor((H - K) / s) + 1: "
    "a last, partial window is dropped.",
    "no_plus_one": "the output size is missing its +1: floor((H - K) / s) + 1 counts the window at position 0 too.",
    "swapped": "the (h, w) parts of kernel_size/stride were swapped: the first number is for rows (H), the second "
    "for columns (W).",
    "first_only": "only the first number of the kernel_size/stride pair was used, for both axes.",
    "pairs": "the indices are (row, col) pairs; return_indices gives one flat index per window, row * W + col, "
    "in the H*W plane.",
    "tiled_only": "dx was built on the KH*OH x KW*OW grid of side-by-side windows (dout upsampled); it must have "
    "x's shape (N, C, H, W): overlapping windows add up, and rows or columns no window reaches get 0.",
    "dout_shape": "dx has dout's shape; it must have x's shape (N, C, H, W).",
}


# ---- mistake models: route dout back through explicit windows -------------------------------
def _route(
    x: Tensor,
    dout: Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    rule: Callable[[Tensor], Tensor],
    mode: str = "add",
) -> Tensor:
    """dx from per-window weights ``rule(patch (N, C, KH*KW)) -> (N, C, KH*KW)``.

    mode "add" accumulates (right); "set" lets each window overwrite the whole window; "set_where"
    overwrites only where the window's weight is non-zero (a max-pool scatter with `=`).
    """
    n, c, h, w = x.shape
    (kh, kw), (sh, sw) = kernel, stride
    oh, ow = dout.shape[-2:]
    dx = torch.zeros(n, c, h, w, dtype=torch.float64)
    for i in range(oh):
        for j in range(ow):
            # Slicing past the edge truncates silently, as it does in the mistaken code.
            window = (
                slice(None),
                slice(None),
                slice(i * sh, i * sh + kh),
                slice(j * sw, j * sw + kw),
            )
            patch = x[window].double()
            wts = rule(patch.reshape(n, c, -1))
            contrib = (dout[:, :, i, j, None].double() * wts).reshape(patch.shape)
            if mode == "add":
                dx[window] += contrib
            elif mode == "set":
                dx[window] = contrib
            else:
                dx[window] = torch.where(wts.reshape(patch.shape) != 0, contrib, dx[window])
    return dx


def _first_max(p: Tensor) -> Tensor:
    return F.one_hot(p.argmax(-1), p.shape[-1]).double()


def _last_max(p: Tensor) -> Tensor:
    k = p.shape[-1]
    return F.one_hot(k - 1 - p.flip(-1).argmax(-1), k).double()


def _all_max(p: Tensor) -> Tensor:
    return (p == p.amax(-1, keepdim=True)).double()


def _split_max(p: Tensor) -> Tensor:
    m = _all_max(p)
    return m / m.sum(-1, keepdim=True)


def _max_backward_mistakes(pc: _PoolCase, dout: Tensor) -> list:
    x = pc.x.double()
    (kh, kw), s, _, _ = _geometry(x, pc.kernel, pc.s)
    k = (kh, kw)
    ones = lambda p: torch.ones_like(p)  # noqa: E731
    return [
        (
            "every tied maximum of a window received the full gradient; PyTorch sends it to the FIRST "
            "maximum only (row-major order: torch.argmax over the flattened window).",
            lambda: _route(x, dout, k, s, _all_max) if pc.ties else None,
        ),
        (
            "the gradient was split evenly among the tied maxima of a window; PyTorch sends all of it to "
            "the FIRST maximum (row-major order).",
            lambda: _route(x, dout, k, s, _split_max) if pc.ties else None,
        ),
        (
            "the gradient went to the LAST maximum of each window; PyTorch picks the FIRST in row-major "
            "order (use a strict > when scanning, or torch.argmax).",
            lambda: _route(x, dout, k, s, _last_max) if pc.ties else None,
        ),
        (
            "the gradient was spread evenly over each window (mean routing, average pooling's rule); max "
            "pooling sends all of it to the window's maximum.",
            lambda: _route(x, dout, k, s, lambda p: ones(p) / (kh * kw)),
        ),
        (
            "dout was copied to every element of its window; only the maximum affected the output, so only "
            "it gets the gradient.",
            lambda: _route(x, dout, k, s, ones),
        ),
        (
            "where windows overlap, a window overwrote the gradient an earlier window had routed to the same "
            "maximum; contributions must be ACCUMULATED (+=, or scatter_add_).",
            lambda: _route(x, dout, k, s, _first_max, mode="set_where"),
        ),
        (
            "the whole window was overwritten with zeros and the new gradient; where windows overlap "
            "contributions must be ACCUMULATED (+=).",
            lambda: _route(x, dout, k, s, _first_max, mode="set"),
        ),
        (
            "the stride was ignored in the backward pass (windows moved by kernel_size); window (i, j) "
            "starts at (i*s, j*s).",
            lambda: _route(x, dout, k, k, _first_max) if s != k else None,
        ),
        (
            "the index of the maximum inside its window was used as an index into the whole H*W plane; "
            "add the window's offset: (i*s + a) * W + (j*s + b).",
            lambda: _local_index_scatter(x, dout, k, s),
        ),
    ]


def _local_index_scatter(x: Tensor, dout: Tensor, k: tuple[int, int], s: tuple[int, int]) -> Tensor:
    n, c, h, w = x.shape
    cols = F.unfold(x.reshape(n * c, 1, h, w), k, stride=s)  # (N*C, KH*KW, L)
    local = cols.argmax(1)  # (N*C, L), in [0, KH*KW)
    dx = torch.zeros(n * c, h * w, dtype=torch.float64)
    dx.scatter_add_(1, local, dout.reshape(n * c, -1).double())
    return dx.reshape(n, c, h, w)


def _avg_backward_mistakes(pc: _PoolCase, dout: Tensor) -> list:
    x = pc.x.double()
    (kh, kw), s, _, _ = _geometry(x, pc.kernel, pc.s)
    k = (kh, kw)
    ones = lambda p: torch.ones_like(p)  # noqa: E731
    mean = lambda p: torch.ones_like(p) / (kh * kw)  # noqa: E731

    def per_pixel_mean() -> Tensor | None:
        right = _route(x, dout, k, s, mean)
        cover = _route(x, torch.ones_like(dout), k, s, ones)
        return right / cover.clamp_min(1)

    mistakes = [
        (
            "dout was not divided by the window size: out = mean of KH*KW values, so each value's "
            "gradient is dout / (KH*KW).",
            lambda: _route(x, dout, k, s, ones),
        ),
        (
            "where windows overlap each window overwrote the gradient already there; contributions must "
            "be ACCUMULATED (+=).",
            lambda: _route(x, dout, k, s, mean, mode="set"),
        ),
        (
            "the gradients reaching a pixel from overlapping windows were averaged; they must be summed "
            "(each window's mean used that pixel once).",
            per_pixel_mean,
        ),
        (
            "the max-pool rule was used: all of dout went to the maximum; average pooling spreads it "
            "evenly, dout / (KH*KW) to every element of the window.",
            lambda: _route(x, dout, k, s, _first_max),
        ),
        (
            "the stride was ignored in the backward pass (windows moved by kernel_size); window (i, j) "
            "starts at (i*s, j*s).",
            lambda: _route(x, dout, k, k, mean) if s != k else None,
        ),
        (
            "dout was divided by the number of output positions, not by the window size KH*KW.",
            lambda: (
                _route(x, dout, k, s, lambda p: ones(p) / dout[0, 0].numel())
                if dout[0, 0].numel() != kh * kw
                else None
            ),
        ),
    ]
    if kh != kw:
        mistakes += [
            (
                f"dout was divided by KH*KH = {kh * kh}; the window has KH*KW = {kh * kw} elements.",
                lambda: _route(x, dout, k, s, lambda p: ones(p) / (kh * kh)),
            ),
            (
                f"dout was divided by KW*KW = {kw * kw}; the window has KH*KW = {kh * kw} elements.",
                lambda: _route(x, dout, k, s, lambda p: ones(p) / (kw * kw)),
            ),
        ]
    else:
        mistakes.append(
            (
                f"dout was divided by KH = {kh} only; the window has KH*KW = {kh * kw} elements.",
                lambda: _route(x, dout, k, s, lambda p: ones(p) / kh),
            )
        )
    return mistakes


def _forward_mistakes(pc: _PoolCase, kind: str) -> list:
    x = pc.x.double()
    (kh, kw), s, _, _ = _geometry(x, pc.kernel, pc.s)
    if kind == "max":
        return [
            (
                "the maximum was started at 0 instead of -inf (or the first element): on an all-negative "
                "window it returns 0.",
                lambda: F.max_pool2d(x, (kh, kw), s).clamp_min(0),
            ),
            (
                "the windows were averaged; max pooling takes the largest value of each window.",
                lambda: F.avg_pool2d(x, (kh, kw), s),
            ),
            (
                "the (h, w) parts of kernel_size and stride were swapped.",
                lambda: F.max_pool2d(x, (kw, kh), s[::-1]) if (kh, kw) != (kw, kh) else None,
            ),
        ]
    return [
        (
            "the windows were summed, not averaged: divide by KH*KW.",
            lambda: F.avg_pool2d(x, (kh, kw), s) * kh * kw,
        ),
        (
            "the maximum was taken; average pooling takes the mean of each window.",
            lambda: F.max_pool2d(x, (kh, kw), s),
        ),
        (
            f"the window sums were divided by KH*KH = {kh * kh}, not KH*KW = {kh * kw}.",
            lambda: F.avg_pool2d(x, (kh, kw), s) * kw / kh if kh != kw else None,
        ),
        (
            "the (h, w) parts of kernel_size and stride were swapped.",
            lambda: F.avg_pool2d(x, (kw, kh), s[::-1]) if (kh, kw) != (kw, kh) else None,
        ),
    ]


# ---- forward batteries -------------------------------------------------------------------------
_SIG = "(x, kernel_size, stride=None) -> out"


def _check_forward(t: Tester, kind: str) -> None:
    ref = ref_max_pool2d_forward if kind == "max" else ref_avg_pool2d_forward

    def produce(pc: _PoolCase) -> list[Output]:
        got = _call(t, pc, *pc.args())
        expected = ref(pc.x.double(), pc.kernel, pc.s).to(pc.x.dtype)
        return [
            Output(
                pc.name,
                "out",
                got,
                expected,
                _pool_shapes(pc, tuple(pc.x.shape[:2])),
                lambda: _forward_mistakes(pc, kind),
            )
        ]

    judge(t, _pool_cases(t), produce, _POOL_SHAPE_SENTENCES)


@exercise(
    "max_pool2d_forward",
    forbidden=MAX_POOL_OPS,
    chapter=CHAPTER,
    signature=_SIG,
    summary="max over each KH x KW window, no padding, stride defaulting to kernel_size, as F.max_pool2d",
    reference=ref_max_pool2d_forward,
)
def check_max_pool2d_forward(t: Tester) -> None:
    """Overlapping, tiling and gapped windows, stride left out or None, ties, all-negative input, float32."""
    _check_forward(t, "max")


@exercise(
    "avg_pool2d_forward",
    forbidden=AVG_POOL_OPS,
    chapter=CHAPTER,
    signature=_SIG,
    summary="mean over each KH x KW window, no padding, stride defaulting to kernel_size, as F.avg_pool2d",
    reference=ref_avg_pool2d_forward,
)
def check_avg_pool2d_forward(t: Tester) -> None:
    """The same cases as max pooling, against F.avg_pool2d."""
    _check_forward(t, "avg")


def _index_mistakes(pc: _PoolCase) -> list:
    x = pc.x.double()
    n, c, h, w = x.shape
    (kh, kw), s, oh, ow = _geometry(x, pc.kernel, pc.s)

    def from_window(choose: Callable[[Tensor], Tensor]) -> Tensor:
        cols = F.unfold(x.reshape(n * c, 1, h, w), (kh, kw), stride=s)  # (N*C, KH*KW, L)
        local = choose(cols.transpose(1, 2))  # (N*C, L) in [0, KH*KW)
        i, j = (
            torch.div(torch.arange(oh * ow), ow, rounding_mode="floor"),
            torch.arange(oh * ow) % ow,
        )
        a, b = torch.div(local, kw, rounding_mode="floor"), local % kw
        return ((i * s[0] + a) * w + (j * s[1] + b)).reshape(n, c, oh, ow)

    def first(p: Tensor) -> Tensor:
        return p.argmax(-1)

    def last(p: Tensor) -> Tensor:
        return p.shape[-1] - 1 - p.flip(-1).argmax(-1)

    return [
        (
            "the indices point at the LAST maximum of each window; PyTorch returns the FIRST in row-major order.",
            lambda: from_window(last) if pc.ties else None,
        ),
        (
            "the indices are positions inside the window (0 .. KH*KW-1); return_indices gives the flat "
            "position in the H*W plane, (i*s + a) * W + (j*s + b).",
            lambda: (
                F.unfold(x.reshape(n * c, 1, h, w), (kh, kw), stride=s)
                .argmax(1)
                .reshape(n, c, oh, ow)
            ),
        ),
        (
            "the indices count over the whole (C, H, W) block of an image; they are flat positions within "
            "each channel's H*W plane.",
            lambda: from_window(first) + torch.arange(c).view(1, c, 1, 1) * h * w,
        ),
        (
            "the indices count over the whole (N, C, H, W) tensor; they are flat positions within each "
            "channel's H*W plane.",
            lambda: from_window(first) + torch.arange(n * c).view(n, c, 1, 1) * h * w,
        ),
    ]


@exercise(
    "max_pool2d_with_indices",
    forbidden=MAX_POOL_OPS,
    chapter=CHAPTER,
    signature="(x, kernel_size, stride=None) -> (out, indices int64)",
    summary="max pooling that also returns where each maximum was: the flat index h*W + w of the first maximum in its H*W plane, as F.max_pool2d(..., return_indices=True)",
    reference=ref_max_pool2d_with_indices,
)
def check_max_pool2d_with_indices(t: Tester) -> None:
    """Outputs against F.max_pool2d, indices exactly equal to return_indices=True (first maximum on ties)."""

    def produce(pc: _PoolCase) -> list[Output]:
        out = _call(t, pc, *pc.args())
        got_out, got_idx = t.unpack(pc.name, out, ("out", "indices"))
        ref_out, ref_idx = ref_max_pool2d_with_indices(pc.x.double(), pc.kernel, pc.s)
        shapes = _pool_shapes(pc, tuple(pc.x.shape[:2]))
        if (
            torch.is_tensor(got_idx)
            and tuple(got_idx.shape) == tuple(ref_idx.shape)
            and got_idx.dtype != torch.int64
        ):
            t.fail(
                pc.name,
                f"`indices` should have dtype int64 (what F.max_pool2d and max_unpool2d use), but it "
                f"has dtype {str(got_idx.dtype)[6:]}.",
            )
        return [
            Output(
                pc.name,
                "out",
                got_out,
                ref_out.to(pc.x.dtype),
                shapes,
                lambda: _forward_mistakes(pc, "max"),
            ),
            # Indices are exact integers: any difference is a wrong index.
            Output(
                pc.name,
                "indices",
                got_idx,
                ref_idx,
                {**shapes, "pairs": (*ref_idx.shape, 2)},
                lambda: _index_mistakes(pc),
                rtol=0.0,
                atol=0.5,
            ),
        ]

    judge(t, _pool_cases(t), produce, _POOL_SHAPE_SENTENCES)


# ---- backward batteries -------------------------------------------------------------------------
def _autograd_pool_grad(pc: _PoolCase, dout: Tensor, kind: str) -> Tensor:
    """PyTorch's own gradient of F.max_pool2d / F.avg_pool2d, in float64, cast to the case's dtype."""
    with torch.enable_grad():
        x = pc.x.detach().double().requires_grad_(True)
        k = _pair(pc.kernel)
        s = None if pc.s is None else _pair(pc.s)
        out = F.max_pool2d(x, k, s) if kind == "max" else F.avg_pool2d(x, k, s)
        (dx,) = torch.autograd.grad(out, [x], dout.double())
    return dx.to(pc.x.dtype)


def _check_backward(t: Tester, kind: str) -> None:
    mistakes_of = _max_backward_mistakes if kind == "max" else _avg_backward_mistakes
    problems = []
    for pc in _pool_cases(t):
        _, _, oh, ow = _geometry(pc.x, pc.kernel, pc.s)
        problems.append((pc, t.randn(*pc.x.shape[:2], oh, ow, dtype=pc.x.dtype)))
    # Central differences of the forward, on distinct values (away from any tie).
    x = _tie_free(t, 1, 2, 5, 5)
    small = _PoolCase(
        "x (1, 2, 5, 5) with distinct values, kernel_size=3, stride=2, against central differences "
        "of the forward",
        x,
        3,
        2,
    )
    problems.append((small, t.randn(1, 2, 2, 2)))
    pool = F.max_pool2d if kind == "max" else F.avg_pool2d

    def produce(problem: tuple[_PoolCase, Tensor]) -> list[Output]:
        pc, dout = problem
        n, c, h, w = pc.x.shape
        got = _call(t, pc, dout, *pc.args())
        (kh, kw), _, oh, ow = _geometry(pc.x, pc.kernel, pc.s)
        shapes = {"tiled_only": (n, c, oh * kh, ow * kw), "dout_shape": (n, c, oh, ow)}
        if pc is small:
            (numeric,) = numerical_gradient(lambda a: pool(a, 3, 2), [x], dout)
            # The forward is piecewise linear: central differences are exact up to rounding (about 1e-10).
            return [
                Output(
                    pc.name,
                    "dx",
                    got,
                    numeric,
                    shapes,
                    lambda: mistakes_of(pc, dout),
                    rtol=1e-6,
                    atol=1e-6,
                )
            ]
        return [
            Output(
                pc.name,
                "dx",
                got,
                _autograd_pool_grad(pc, dout, kind),
                shapes,
                lambda: mistakes_of(pc, dout),
            )
        ]

    judge(t, problems, produce, _POOL_SHAPE_SENTENCES)


_BWD_SIG = "(dout, x, kernel_size, stride=None) -> dx"


@exercise(
    "max_pool2d_backward",
    forbidden=(*MAX_POOL_OPS, "max_unpool2d"),
    chapter=CHAPTER,
    signature=_BWD_SIG,
    summary="gradient of max pooling: each dout goes to the FIRST maximum of its window (row-major, PyTorch's rule); overlapping windows accumulate",
    reference=ref_max_pool2d_backward,
    backward=True,
)
def check_max_pool2d_backward(t: Tester) -> None:
    """Against autograd of F.max_pool2d, with ties, overlaps, gaps and float32; central differences off ties."""
    _check_backward(t, "max")


@exercise(
    "avg_pool2d_backward",
    forbidden=AVG_POOL_OPS,
    chapter=CHAPTER,
    signature=_BWD_SIG,
    summary="gradient of average pooling (as F.avg_pool2d without padding): dout / (KH*KW) to every element of its window; overlapping windows accumulate",
    reference=ref_avg_pool2d_backward,
    backward=True,
)
def check_avg_pool2d_backward(t: Tester) -> None:
    """Against autograd of F.avg_pool2d on the same cases, and central differences."""
    _check_backward(t, "avg")
