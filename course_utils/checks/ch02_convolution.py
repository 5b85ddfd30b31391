"""Check batteries of chapter 02: output sizes, im2col and col2im, convolution forward and backward.

Every battery tries integer and pair hyper-parameters, strides that do and do not divide
the padded size, padding, 1x1 and full-size kernels, bias None, float64 and float32, and
small shapes on purpose: the whole convolution battery is about 7,000 multiply-adds, so
six nested Python loops over tensor scalars still pass within the 2 s budget.
Wrong output shapes are matched against the output-size formulas learners really get
wrong (ceil instead of floor, a missing +1, padding counted once, ...); wrong values
against mistake models (a flipped kernel, overwriting instead of accumulating where
windows overlap, dx cropped from the wrong side, dweight missing its sum over the batch,
...), so a failure names the likely mistake.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..checking import CheckFailure, Tester, exercise
from ..gradcheck import numerical_gradient

CHAPTER = "02_convolution"
#: PyTorch's convolutions, forbidden inside the exercises that rebuild them.
CONV_OPS = (
    "conv1d",
    "conv2d",
    "conv3d",
    "convolution",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
)
Tensor = torch.Tensor
Pair = int | tuple[int, int]


def _pair(v: Pair) -> tuple[int, int]:
    """An int s as (s, s); a pair as a tuple of two ints."""
    if isinstance(v, numbers.Integral):
        return int(v), int(v)
    h, w = v
    return int(h), int(w)


def _out_len(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


# ---- reference implementations ---------------------------------------------------------
def ref_conv_output_size(size: int, kernel_size: int, stride: int = 1, padding: int = 0) -> int:
    """Number of window positions along one axis: floor((size + 2p - k) / s) + 1."""
    return (size + 2 * padding - kernel_size) // stride + 1


def ref_im2col(x: Tensor, kernel_size: Pair, stride: Pair = 1, padding: Pair = 0) -> Tensor:
    """Patches of x (N, C, H, W) as columns (N, C*KH*KW, OH*OW), as ``F.unfold``."""
    return F.unfold(x, _pair(kernel_size), padding=_pair(padding), stride=_pair(stride))


def ref_col2im(
    cols: Tensor, output_size: Pair, kernel_size: Pair, stride: Pair = 1, padding: Pair = 0
) -> Tensor:
    """Sum columns (N, C*KH*KW, L) back into an image (N, C, H, W), as ``F.fold`` (im2col's adjoint)."""
    return F.fold(
        cols, _pair(output_size), _pair(kernel_size), padding=_pair(padding), stride=_pair(stride)
    )


def ref_conv2d_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: Pair = 1, padding: Pair = 0
) -> Tensor:
    """Cross-correlation of x (N, C, H, W) with weight (F, C, KH, KW), as ``F.conv2d``."""
    return F.conv2d(x, weight, bias, _pair(stride), _pair(padding))


def ref_conv2d_forward_loops(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: Pair = 1, padding: Pair = 0
) -> Tensor:
    """The same cross-correlation with a Python loop over output positions (slow on purpose)."""
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    n, _, h, w = x.shape
    f, _, kh, kw = weight.shape
    xp = F.pad(x, (pw, pw, ph, ph))  # (N, C, H + 2ph, W + 2pw)
    oh, ow = _out_len(h, kh, sh, ph), _out_len(w, kw, sw, pw)
    out = x.new_zeros(n, f, oh, ow)
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw]  # (N, C, KH, KW)
            out[:, :, i, j] = torch.einsum("nchw,fchw->nf", patch, weight)
    if bias is not None:
        out = out + bias.view(1, f, 1, 1)
    return out


def ref_conv2d_backward(
    dout: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Pair = 1,
    padding: Pair = 0,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dx, dweight, dbias) of the cross-correlation, derived by hand with unfold and fold."""
    n, _, h, w = x.shape
    f, _, kh, kw = weight.shape
    stride, padding = _pair(stride), _pair(padding)
    cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # (N, C*KH*KW, L)
    d = dout.reshape(n, f, -1)  # (N, F, L)
    dweight = torch.einsum("nfl,nkl->fk", d, cols).reshape(weight.shape)
    dcols = torch.einsum("fk,nfl->nkl", weight.reshape(f, -1), d)  # (N, C*KH*KW, L)
    dx = F.fold(dcols, (h, w), (kh, kw), padding=padding, stride=stride)
    dbias = None if bias is None else dout.sum((0, 2, 3))
    return dx, dweight, dbias


# ---- helpers shared by the batteries (chapter 03 uses them too) ---------------------------------
PAIR_ERRORS = (
    "cannot unpack non-iterable int",
    "'int' object is not subscriptable",
    "'int' object is not iterable",
    "object of type 'int' has no len()",
    "slice indices must be integers",
    "can't multiply sequence",
    "'tuple' and 'int'",
    "'int' and 'tuple'",
    "must be int, not tuple",
    "must be tuple of ints, but found element of type tuple",
    "'tuple' object cannot be interpreted as an integer",
)
_PAIR_HINT = (
    " `stride`, `padding` and `kernel_size` may each be an int or an (h, w) pair: turn an int s "
    "into (s, s) first and use the h part for rows, the w part for columns."
)


EMPTY_SLICE = "a slice [pad:-pad] is empty when pad = 0; use [pad:pad + H] (and [pad:pad + W])."


def _empty_slice_shape(x_shape: tuple[int, ...], padding: Pair) -> tuple[int, ...] | None:
    """The shape x_padded[:, :, ph:-ph, pw:-pw] has when a padding is 0 (the slice is empty), else None."""
    (ph, pw), (n, c, h, w) = _pair(padding), x_shape
    return (n, c, h if ph else 0, w if pw else 0) if 0 in (ph, pw) else None


def _call(t: Tester, case: str, *args: Any, padding: Pair | None = None) -> Any:
    """``t.call`` with a hint when the error looks like int-versus-pair handling, or (given the
    case's ``padding``) like writing the input into x_padded[:, :, p:-p, p:-p] with p = 0."""
    try:
        return t.call(case, *args)
    except CheckFailure as failure:
        text = str(failure)
        if any(e in text for e in PAIR_ERRORS):
            raise CheckFailure(text + _PAIR_HINT) from None
        if (
            padding is not None
            and 0 in _pair(padding)
            and "expanded size of the tensor (0)" in text
        ):
            raise CheckFailure(f"{text} It looks like {EMPTY_SLICE}") from None
        raise


def _fmt_pair(v: Pair) -> str:
    return str(v) if isinstance(v, int) else f"({v[0]}, {v[1]})"


@dataclass
class Output:
    """One returned tensor to judge.

    ``shapes`` maps a shape-mistake key to the shape that mistake gives in this case;
    ``mistakes`` (called lazily, on failure only) lists (sentence, tensor) value-mistake models.
    """

    case: str
    quantity: str
    got: Any
    expected: Tensor
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    mistakes: Callable[[], list] | None = None
    rtol: float | None = None
    atol: float | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.expected.shape)


def check_shapes(
    t: Tester, current: Sequence[Output], sentences: dict[str, str], context: Sequence[Output] = ()
) -> None:
    """Type, shape and dtype of each output in ``current``. A wrong shape is blamed on a known
    mistake only when that mistake's shape model explains the quantity's shape in EVERY case
    seen (``context`` holds the others): one case alone is often ambiguous."""
    for o in current:
        if not torch.is_tensor(o.got):
            t.expect_tensor(o.case, o.quantity, o.got)
    for o in current:
        got_shape = tuple(o.got.shape)
        if got_shape != o.shape:
            same = [
                c
                for c in (*context, *current)
                if c.quantity == o.quantity and torch.is_tensor(c.got)
            ]
            explains = [
                key
                for key in sentences
                if o.shapes.get(key) == got_shape
                and all(tuple(c.got.shape) == c.shapes.get(key, c.shape) for c in same)
            ]
            if not explains:  # no model fits every case; one that fits this case is still a clue
                explains = [key for key in sentences if o.shapes.get(key) == got_shape][:1]
            if explains:
                t.fail(
                    o.case,
                    f"`{o.quantity}` should have shape {o.shape}, but it has shape {got_shape}. "
                    f"It looks like {sentences[explains[0]]}",
                )
        t.expect_tensor(o.case, o.quantity, o.got, shape=o.shape, dtype=o.expected.dtype)


def judge(
    t: Tester,
    items: Sequence[Any],
    produce: Callable[[Any], list[Output]],
    sentences: dict[str, str],
) -> None:
    """Judge the cases in order. ``produce(item)`` calls the learner and returns its Outputs.
    Only when a shape is wrong are the remaining cases run too, to tell shape mistakes apart."""
    seen: list[Output] = []
    for k, item in enumerate(items):
        outputs = produce(item)
        context = list(seen)
        if any(torch.is_tensor(o.got) and tuple(o.got.shape) != o.shape for o in outputs):
            for other in items[k + 1 :]:
                try:
                    context += produce(other)
                except CheckFailure:
                    continue  # a later case that crashes tells nothing about shapes
        check_shapes(t, outputs, sentences, context)
        for o in outputs:
            t.compare(
                o.case,
                o.quantity,
                o.got,
                o.expected,
                rtol=o.rtol,
                atol=o.atol,
                mistakes=o.mistakes() if o.mistakes is not None else (),
            )
        seen += outputs


def _size_variants(size: int, k: int, s: int, p: int) -> dict[str, int]:
    """What learners compute instead of floor((size + 2p - k) / s) + 1."""
    return {
        "ceil": math.ceil((size + 2 * p - k) / s) + 1,
        "no_plus_one": (size + 2 * p - k) // s,
        "plus_one_inside": (size + 2 * p - k + 1) // s,
        "pad_once": (size + p - k) // s + 1,
        "no_pad": (size - k) // s + 1,
        "no_stride": size + 2 * p - k + 1,
    }


_SIZE_SENTENCES = {
    "ceil": "the output size was rounded up; it is floor((H + 2p - K) / s) + 1, because a window must "
    "fit entirely inside the padded input (PyTorch's default, ceil_mode=False).",
    "no_plus_one": "the output size is missing its +1: floor((H + 2p - K) / s) + 1 counts the window "
    "at position 0 too.",
    "plus_one_inside": "the +1 went inside the division; the output size is floor((H + 2p - K) / s) + 1.",
    "pad_once": "the padding was counted once; p zeros go on BOTH sides, so the padded size is H + 2p.",
    "no_pad": "the padding was ignored: pad the input with p zeros on every side before sliding the window.",
    "no_stride": "the stride was ignored: windows start every s positions, so there are "
    "floor((H + 2p - K) / s) + 1 of them.",
}
SPATIAL_SENTENCES = {
    **_SIZE_SENTENCES,
    "swapped": "the (h, w) parts of stride and padding were swapped: the first number is for rows (H), "
    "the second for columns (W).",
    "first_only": "only the first number of the stride/padding pair was used, for both axes; use the "
    "second one for columns (W).",
}


def spatial_variants(
    h: int, w: int, kernel: tuple[int, int], stride: Pair, padding: Pair
) -> dict[str, tuple[int, int]]:
    """(OH, OW) that each output-size mistake gives, by key of SPATIAL_SENTENCES."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, _pair(stride), _pair(padding)
    rows, cols = _size_variants(h, kh, sh, ph), _size_variants(w, kw, sw, pw)
    out = {key: (rows[key], cols[key]) for key in _SIZE_SENTENCES}
    out["swapped"] = (_out_len(h, kh, sw, pw), _out_len(w, kw, sh, ph))
    out["first_only"] = (_out_len(h, kh, sh, ph), _out_len(w, kw, sh, ph))
    return out


# ---- conv_output_size ---------------------------------------------------------------------
def _size_model(key: str) -> Callable[[int, int, int, int], int]:
    if key == "round":
        return lambda n, k, s, p: round((n + 2 * p - k) / s) + 1
    return lambda n, k, s, p: _size_variants(n, k, s, p)[key]


_SIZE_MODELS = {key: _size_model(key) for key in (*_SIZE_SENTENCES, "round")}
_SIZE_MODEL_SENTENCES = {
    **_SIZE_SENTENCES,
    "round": "the division was rounded to the nearest integer; it rounds down: floor((H + 2p - K) / s) + 1.",
}


@exercise(
    "conv_output_size",
    chapter=CHAPTER,
    signature="(size: int, kernel_size: int, stride: int = 1, padding: int = 0) -> int",
    summary="number of window positions along one axis: floor((size + 2*padding - kernel_size) / stride) + 1",
    reference=ref_conv_output_size,
)
def check_conv_output_size(t: Tester) -> None:
    """Every size 1-12, kernel 1-5, stride 1-4, padding 0-2 where a window fits; defaults too."""
    combos = [
        (n, k, s, p)
        for s in (1, 2, 3, 4)
        for p in (0, 1, 2)
        for k in range(1, 6)
        for n in range(1, 13)
        if n + 2 * p >= k
    ]
    results: dict[tuple[int, int, int, int], Any] = {}
    for n, k, s, p in combos:
        case = f"size={n}, kernel_size={k}, stride={s}, padding={p}"
        got = t.call(case, n, k, s, p)
        if isinstance(got, float) and got == int(got):
            t.fail(
                case,
                f"conv_output_size returned the float {got!r}; it should return an int. Use floor "
                "division `//` rather than `/` (and no int() around a true division).",
            )
        if isinstance(got, bool) or not isinstance(got, numbers.Integral):
            t.fail(
                case,
                f"conv_output_size should return a Python int, but it returned {type(got).__name__} "
                f"{got!r}.",
            )
        results[(n, k, s, p)] = int(got)
    wrong = [c for c in combos if results[c] != ref_conv_output_size(*c)]
    if wrong:
        n, k, s, p = wrong[0]
        case = f"size={n}, kernel_size={k}, stride={s}, padding={p}"
        message = f"conv_output_size returned {results[wrong[0]]}, expected {ref_conv_output_size(n, k, s, p)}."
        for key, model in _SIZE_MODELS.items():
            if all(results[c] == model(*c) for c in combos):
                message += f" It looks like {_SIZE_MODEL_SENTENCES[key]}"
                break
        t.fail(case, message)
    for s in (1, 2, 3, 4):
        count = sum(1 for c in combos if c[2] == s)
        t.ok(
            f"stride={s}: sizes 1-12, kernels 1-5, paddings 0-2",
            "output size",
            f"ok ({count} combinations)",
        )
    for args, name in (
        ((7, 3), "stride and padding left at their defaults"),
        ((5, 5), "kernel as large as the input"),
    ):
        case = f"size={args[0]}, kernel_size={args[1]}, {name}"
        got = t.call(case, *args)
        if got != ref_conv_output_size(*args):
            t.fail(
                case,
                f"conv_output_size returned {got!r}, expected {ref_conv_output_size(*args)} "
                "(the defaults are stride=1, padding=0).",
            )
        t.ok(case, "output size")


# ---- im2col and col2im ----------------------------------------------------------------------
@dataclass
class _PatchCase:
    name: str
    x: Tensor
    kernel: Pair
    stride: Pair
    padding: Pair
    defaults: bool = False  # leave stride and padding out of the call


def _patch_cases(t: Tester) -> list[_PatchCase]:
    f32 = torch.float32
    return [
        _PatchCase(
            "x (2, 3, 5, 5), kernel_size=3, stride and padding by default",
            t.randn(2, 3, 5, 5),
            3,
            1,
            0,
            True,
        ),
        _PatchCase(
            "x (1, 2, 6, 7), kernel_size=(2, 3), stride=(2, 1), padding=(1, 0)",
            t.randn(1, 2, 6, 7),
            (2, 3),
            (2, 1),
            (1, 0),
        ),
        _PatchCase(
            "x (2, 2, 7, 7), kernel_size=3, stride=2, padding=1 (overlapping windows)",
            t.randn(2, 2, 7, 7),
            3,
            2,
            1,
        ),
        _PatchCase(
            "x (1, 1, 4, 4), kernel_size=2, stride=2, padding=0 (windows tile the image)",
            t.randn(1, 1, 4, 4),
            2,
            2,
            0,
        ),
        _PatchCase(
            "x (2, 2, 5, 6), kernel_size=(3, 2), stride=3, padding=2 (stride does not divide)",
            t.randn(2, 2, 5, 6),
            (3, 2),
            3,
            2,
        ),
        _PatchCase("x (1, 3, 4, 5), kernel_size=1 (1x1 patches)", t.randn(1, 3, 4, 5), 1, 1, 0),
        _PatchCase(
            "x (2, 3, 6, 6) float32, kernel_size=3, stride=1, padding=1",
            t.randn(2, 3, 6, 6, dtype=f32),
            3,
            1,
            1,
        ),
    ]


def _patch_layout_mistakes(expected: Tensor, c: int, kh: int, kw: int, oh: int, ow: int) -> list:
    """Same-shape mistakes in the layout of (N, C*KH*KW, L) columns, given the right columns."""
    n = expected.shape[0]
    six = expected.double().reshape(n, c, kh, kw, oh, ow)
    return [
        (
            "each column was laid out as (KH, KW, C); F.unfold's order is (C, KH, KW): channel slowest, "
            "kernel column fastest.",
            lambda: six.permute(0, 2, 3, 1, 4, 5).reshape(expected.shape),
        ),
        (
            "the windows were enumerated column by column; L runs over output positions in row-major order "
            "(i * OW + j).",
            lambda: six.transpose(-1, -2).reshape(expected.shape),
        ),
        (
            "each patch was flipped; im2col copies the window as it is (no flip).",
            lambda: six.flip(2, 3).reshape(expected.shape),
        ),
    ]


def _im2col_mistakes(pc: _PatchCase, expected: Tensor) -> list:
    n, c, h, w = pc.x.shape
    (kh, kw), (sh, sw), (ph, pw) = _pair(pc.kernel), _pair(pc.stride), _pair(pc.padding)
    oh, ow = _out_len(h, kh, sh, ph), _out_len(w, kw, sw, pw)
    mistakes = _patch_layout_mistakes(expected, c, kh, kw, oh, ow)
    if ph or pw:
        one_side = F.pad(pc.x.double(), (2 * pw, 0, 2 * ph, 0))
        mistakes.append(
            (
                "all 2p zeros of the padding went on one side (top/left); p go on each side.",
                lambda: F.unfold(one_side, (kh, kw), stride=(sh, sw)),
            )
        )
    return mistakes


@exercise(
    "im2col",
    forbidden=("F.unfold", "im2col"),
    chapter=CHAPTER,
    signature="(x, kernel_size, stride=1, padding=0) -> cols (N, C*KH*KW, OH*OW)",
    summary="every window of the zero-padded input as one column, as F.unfold: rows in (C, KH, KW) order, windows row-major",
    reference=ref_im2col,
)
def check_im2col(t: Tester) -> None:
    """Int and pair kernel/stride/padding, overlapping and tiling windows, 1x1 patches, float32."""

    def produce(pc: _PatchCase) -> list[Output]:
        n, c, h, w = pc.x.shape
        (kh, kw), (sh, sw), (ph, pw) = _pair(pc.kernel), _pair(pc.stride), _pair(pc.padding)
        oh, ow = _out_len(h, kh, sh, ph), _out_len(w, kw, sw, pw)
        args = (pc.x, pc.kernel) if pc.defaults else (pc.x, pc.kernel, pc.stride, pc.padding)
        got = _call(t, pc.name, *args, padding=pc.padding)
        ref = ref_im2col(pc.x.double(), pc.kernel, pc.stride, pc.padding).to(pc.x.dtype)
        shapes = {
            key: (n, c * kh * kw, a * b)
            for key, (a, b) in spatial_variants(h, w, (kh, kw), pc.stride, pc.padding).items()
        }
        shapes.update(
            transposed=(n, oh * ow, c * kh * kw),
            unmerged=(n, c, kh * kw, oh * ow),
            unflattened=(n, c, kh, kw, oh, ow),
        )
        return [Output(pc.name, "cols", got, ref, shapes, lambda: _im2col_mistakes(pc, ref))]

    judge(t, _patch_cases(t), produce, _IM2COL_SHAPE_SENTENCES)


_IM2COL_SHAPE_SENTENCES = {
    **SPATIAL_SENTENCES,
    "transposed": "the columns came back transposed: im2col returns (N, C*KH*KW, L), one column per window, "
    "so that weight.reshape(F, -1) @ cols is the convolution.",
    "unmerged": "the channel and kernel axes were not merged: reshape to (N, C*KH*KW, L).",
    "unflattened": "the patches were not flattened: reshape to (N, C*KH*KW, L).",
}


def _col2im_overwrite(
    cols: Tensor,
    size: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> Tensor:
    """col2im where each window overwrites what earlier windows wrote (the last one wins)."""
    (h, w), (kh, kw), (sh, sw), (ph, pw) = size, kernel, stride, padding
    n = cols.shape[0]
    c = cols.shape[1] // (kh * kw)
    oh, ow = _out_len(h, kh, sh, ph), _out_len(w, kw, sw, pw)
    patches = cols.reshape(n, c, kh, kw, oh, ow)
    xp = cols.new_zeros(n, c, h + 2 * ph, w + 2 * pw)
    for i in range(oh):
        for j in range(ow):
            xp[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw] = patches[:, :, :, :, i, j]
    return xp[:, :, ph : ph + h, pw : pw + w]


def _col2im_mistakes(
    cols: Tensor,
    size: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> list:
    (h, w), (kh, kw), (ph, pw) = size, kernel, padding
    c64 = cols.double()
    n, c = c64.shape[0], c64.shape[1] // (kh * kw)
    mistakes = [
        (
            "each window overwrote what the windows before it wrote; where windows overlap their "
            "contributions must be ADDED (+=): col2im is the adjoint of copying one pixel into several columns.",
            lambda: _col2im_overwrite(c64, size, kernel, stride, padding),
        ),
        (
            "the overlapping contributions were averaged (divided by how many windows cover a pixel); "
            "col2im is the adjoint of im2col, which sums them, not its inverse.",
            lambda: (
                F.fold(c64, size, kernel, padding=padding, stride=stride)
                / F.fold(
                    torch.ones_like(c64), size, kernel, padding=padding, stride=stride
                ).clamp_min(1)
            ),
        ),
        (
            "each column was read as (KH, KW, C); F.fold's order is (C, KH, KW): channel slowest.",
            lambda: F.fold(
                c64.reshape(n, kh, kw, c, -1).permute(0, 3, 1, 2, 4).reshape(c64.shape),
                size,
                kernel,
                padding=padding,
                stride=stride,
            ),
        ),
    ]
    if ph or pw:
        mistakes.append(
            (
                "the padded canvas was cropped from the top-left corner; the padding sits on every side, so "
                "crop [p:p+H, p:p+W].",
                lambda: F.fold(c64, (h + 2 * ph, w + 2 * pw), kernel, stride=stride)[:, :, :h, :w],
            )
        )
    return mistakes


@exercise(
    "col2im",
    forbidden=("F.fold", "col2im"),
    chapter=CHAPTER,
    signature="(cols, output_size, kernel_size, stride=1, padding=0) -> x (N, C, H, W)",
    summary="the adjoint of im2col, as F.fold: add every column back into its window, summing where windows overlap, then crop the padding",
    reference=ref_col2im,
)
def check_col2im(t: Tester) -> None:
    """Same windows as im2col; overlapping windows must add up; padding is cropped off."""
    problems = []
    for pc in _patch_cases(t):
        n, c, h, w = pc.x.shape
        kernel, stride, padding = _pair(pc.kernel), _pair(pc.stride), _pair(pc.padding)
        oh, ow = (
            _out_len(h, kernel[0], stride[0], padding[0]),
            _out_len(w, kernel[1], stride[1], padding[1]),
        )
        cols = t.randn(n, c * kernel[0] * kernel[1], oh * ow, dtype=pc.x.dtype)
        problems.append((pc, cols))

    def produce(problem: tuple[_PatchCase, Tensor]) -> list[Output]:
        pc, cols = problem
        n, c, h, w = pc.x.shape
        kernel, stride, padding = _pair(pc.kernel), _pair(pc.stride), _pair(pc.padding)
        size: Pair = h if h == w and pc.defaults else (h, w)
        case = (
            pc.name.replace("x (", "image (", 1)
            + f", cols {tuple(cols.shape)}, output_size={_fmt_pair(size)}"
        )
        args = (
            (cols, size, pc.kernel)
            if pc.defaults
            else (cols, size, pc.kernel, pc.stride, pc.padding)
        )
        got = _call(t, case, *args, padding=pc.padding)
        ref = ref_col2im(cols.double(), (h, w), pc.kernel, pc.stride, pc.padding).to(cols.dtype)
        padded = (n, c, h + 2 * padding[0], w + 2 * padding[1])
        shapes = {"not_cropped": padded}
        empty = _empty_slice_shape((n, c, h, w), padding)
        if empty is not None:
            shapes["empty_slice"] = empty
        return [
            Output(
                case,
                "x",
                got,
                ref,
                shapes,
                lambda: _col2im_mistakes(cols, (h, w), kernel, stride, padding),
            )
        ]

    judge(t, problems, produce, _COL2IM_SHAPE_SENTENCES)


_COL2IM_SHAPE_SENTENCES = {
    "empty_slice": EMPTY_SLICE,
    "not_cropped": "the padding was not cropped off: the result has the padded image's size; return "
    "xp[:, :, p:p+H, p:p+W].",
}


# ---- convolution forward --------------------------------------------------------------------
@dataclass
class _ConvCase:
    name: str
    x: Tensor
    weight: Tensor
    bias: Tensor | None
    stride: Pair
    padding: Pair
    defaults: bool = False  # leave stride and padding out of the call

    def args(self) -> tuple[Any, ...]:
        base = (self.x, self.weight, self.bias)
        return base if self.defaults else (*base, self.stride, self.padding)


def _conv_cases(t: Tester) -> list[_ConvCase]:
    f32 = torch.float32

    def case(
        name: str,
        x: tuple[int, ...],
        w: tuple[int, ...],
        bias: bool,
        stride: Pair,
        padding: Pair,
        dtype: torch.dtype = torch.float64,
        defaults: bool = False,
    ) -> _ConvCase:
        hp = (
            "stride and padding by default"
            if defaults
            else f"stride={_fmt_pair(stride)}, padding={_fmt_pair(padding)}"
        )
        label = f"x {x}, weight {w}, bias {'(' + str(w[0]) + ',)' if bias else 'None'}, {hp}"
        label += f" {dtype}".replace("torch.", "") if dtype != torch.float64 else ""
        label += f" ({name})" if name else ""
        b = t.randn(w[0], dtype=dtype) if bias else None
        return _ConvCase(
            label,
            t.randn(*x, dtype=dtype),
            t.randn(*w, dtype=dtype, scale=0.5),
            b,
            stride,
            padding,
            defaults,
        )

    return [
        case("", (2, 2, 4, 4), (2, 2, 3, 3), True, 1, 0, defaults=True),
        case("overlapping windows", (2, 2, 7, 7), (3, 2, 3, 3), True, 2, 1),
        case("pairs, non-square kernel", (1, 2, 7, 6), (3, 2, 2, 3), False, (2, 1), (1, 0)),
        case("stride does not divide H + 2p - K", (2, 2, 7, 7), (2, 2, 3, 3), True, 3, 0),
        case("1x1 convolution", (1, 3, 5, 4), (5, 3, 1, 1), True, 1, 0),
        case("padding wider than half the kernel", (1, 2, 4, 5), (2, 2, 3, 3), False, 1, 2),
        case("kernel as large as the input", (2, 2, 5, 5), (3, 2, 5, 5), True, 1, 0),
        case("pairs", (1, 2, 6, 7), (2, 2, 3, 2), True, (1, 2), (2, 1)),
        case("", (2, 2, 6, 6), (3, 2, 3, 3), True, 2, 1, dtype=f32),
    ]


def _conv_shape_variants(cc: _ConvCase) -> dict[str, tuple[int, ...]]:
    n, c, h, w = cc.x.shape
    f, _, kh, kw = cc.weight.shape
    variants: dict[str, tuple[int, ...]] = {
        key: (n, f, *hw)
        for key, hw in spatial_variants(h, w, (kh, kw), cc.stride, cc.padding).items()
    }
    oh, ow = (
        _out_len(h, kh, _pair(cc.stride)[0], _pair(cc.padding)[0]),
        _out_len(w, kw, _pair(cc.stride)[1], _pair(cc.padding)[1]),
    )
    variants["input_channels"] = (n, c, oh, ow)
    variants["channels_not_summed"] = (n, f, c, oh, ow)
    return variants


_CONV_SHAPE_SENTENCES = {
    **SPATIAL_SENTENCES,
    "input_channels": "the output has the input's C channels; it has one channel per filter, F = weight.shape[0], "
    "each summing over all C input channels.",
    "channels_not_summed": "the products were not summed over the input channels C.",
}


def _conv_forward_mistakes(cc: _ConvCase) -> list:
    x, wt, b = cc.x.double(), cc.weight.double(), None if cc.bias is None else cc.bias.double()
    s, p = _pair(cc.stride), _pair(cc.padding)
    f = wt.shape[0]
    mistakes = [
        (
            "the kernel was flipped (a true convolution); deep learning's 'convolution' is a cross-correlation, "
            "out[n, f, i, j] = sum_{c,a,b} x[n, c, i*s + a, j*s + b] * w[f, c, a, b], with no flip.",
            lambda: F.conv2d(x, wt.flip(-1, -2), b, s, p),
        ),
        (
            "the kernel's rows and columns were swapped (w[a, b] used as w[b, a]).",
            lambda: (
                F.conv2d(x, wt.transpose(-1, -2), b, s, p) if wt.shape[-1] == wt.shape[-2] else None
            ),
        ),
        (
            "the weight was indexed as (C, F, KH, KW); its layout is (F, C, KH, KW): filter first.",
            lambda: (
                F.conv2d(x, wt.transpose(0, 1), b, s, p) if wt.shape[0] == wt.shape[1] else None
            ),
        ),
        (
            "all 2p zeros of the padding went on one side (top/left); p go on each side.",
            lambda: F.conv2d(F.pad(x, (2 * p[1], 0, 2 * p[0], 0)), wt, b, s) if any(p) else None,
        ),
    ]
    if b is not None:
        mistakes += [
            ("the bias was not added.", lambda: F.conv2d(x, wt, None, s, p)),
            (
                "the bias was added along the last axis (columns); it belongs to the channel axis: "
                "out + bias.view(1, F, 1, 1).",
                lambda: (
                    F.conv2d(x, wt, None, s, p) + b
                    if F.conv2d(x, wt, None, s, p).shape[-1] == f
                    else None
                ),
            ),
            (
                "the bias was added once per input channel (C times); add it once per output.",
                lambda: F.conv2d(x, wt, b * x.shape[1], s, p),
            ),
        ]
    return mistakes


def _check_conv_forward(t: Tester) -> None:
    def produce(cc: _ConvCase) -> list[Output]:
        got = _call(t, cc.name, *cc.args(), padding=cc.padding)
        b64 = None if cc.bias is None else cc.bias.double()
        ref = F.conv2d(
            cc.x.double(), cc.weight.double(), b64, _pair(cc.stride), _pair(cc.padding)
        ).to(cc.x.dtype)
        return [
            Output(
                cc.name,
                "out",
                got,
                ref,
                _conv_shape_variants(cc),
                lambda: _conv_forward_mistakes(cc),
            )
        ]

    judge(t, _conv_cases(t), produce, _CONV_SHAPE_SENTENCES)


_FORWARD_SIGNATURE = "(x, weight (F,C,KH,KW), bias (F,) or None, stride=1, padding=0) -> out"


@exercise(
    "conv2d_forward_loops",
    forbidden=(*CONV_OPS, "F.unfold", "im2col"),
    chapter=CHAPTER,
    signature=_FORWARD_SIGNATURE,
    summary="the cross-correlation of F.conv2d written with Python loops over output positions (the slow, obvious version)",
    reference=ref_conv2d_forward_loops,
)
def check_conv2d_forward_loops(t: Tester) -> None:
    """The same battery as conv2d_forward: kernels, strides, paddings, channels, bias None, float32."""
    _check_conv_forward(t)


@exercise(
    "conv2d_forward",
    forbidden=CONV_OPS,
    chapter=CHAPTER,
    signature=_FORWARD_SIGNATURE,
    summary="cross-correlation with zero padding, as F.conv2d; stride and padding are an int or an (h, w) pair",
    reference=ref_conv2d_forward,
)
def check_conv2d_forward(t: Tester) -> None:
    """Against F.conv2d: int and pair hyper-parameters, 1x1 and full-size kernels, bias None, float32."""
    _check_conv_forward(t)


# ---- convolution backward -------------------------------------------------------------------
def _bwd_stride_ignored(
    dout: Tensor, x: Tensor, wt: Tensor, s: tuple[int, int], p: tuple[int, int]
) -> tuple[Tensor, Tensor] | None:
    """Backward that puts window (i, j) at (i, j) instead of (i*s, j*s): the stride forgotten."""
    if s == (1, 1):
        return None
    n, _, h, w = x.shape
    f, _, kh, kw = wt.shape
    oh, ow = dout.shape[-2:]
    region = (oh + kh - 1, ow + kw - 1)
    xp = F.pad(x, (p[1], p[1], p[0], p[0]))[:, :, : region[0], : region[1]]
    d = dout.reshape(n, f, -1)
    cols = F.unfold(xp, (kh, kw))
    dweight = torch.einsum("nfl,nkl->fk", d, cols).reshape(wt.shape)
    dxp = torch.zeros(n, x.shape[1], h + 2 * p[0], w + 2 * p[1], dtype=x.dtype)
    dxp[:, :, : region[0], : region[1]] = F.fold(
        torch.einsum("fk,nfl->nkl", wt.reshape(f, -1), d), region, (kh, kw)
    )
    return dxp[:, :, p[0] : p[0] + h, p[1] : p[1] + w], dweight


def _dx_overwrite(
    dout: Tensor, x: Tensor, wt: Tensor, s: tuple[int, int], p: tuple[int, int], per_filter: bool
) -> Tensor:
    """dx where each window's contribution overwrites the earlier ones (loops i, j; or f, i, j)."""
    n, c, h, w = x.shape
    f, _, kh, kw = wt.shape
    oh, ow = dout.shape[-2:]
    dxp = torch.zeros(n, c, h + 2 * p[0], w + 2 * p[1], dtype=torch.float64)
    filters = range(f) if per_filter else [None]
    for k in filters:
        for i in range(oh):
            for j in range(ow):
                window = (
                    slice(None),
                    slice(None),
                    slice(i * s[0], i * s[0] + kh),
                    slice(j * s[1], j * s[1] + kw),
                )
                if k is None:
                    dxp[window] = torch.einsum("nf,fchw->nchw", dout[:, :, i, j], wt)
                else:
                    dxp[window] = dout[:, k, i, j, None, None, None] * wt[k]
    return dxp[:, :, p[0] : p[0] + h, p[1] : p[1] + w]


def _conv_backward_mistakes(dout: Tensor, cc: _ConvCase) -> tuple[list, list, list]:
    """Mistake models for dx, dweight and dbias (float64), evaluated lazily."""
    x, wt = cc.x.double(), cc.weight.double()
    b = None if cc.bias is None else cc.bias.double()
    d = dout.double()
    s, p = _pair(cc.stride), _pair(cc.padding)
    n, c, h, w = x.shape
    f, _, kh, kw = wt.shape

    ref = ref_conv2d_backward

    def crop_top_left() -> Tensor | None:
        if not any(p):
            return None
        cols = torch.einsum("fk,nfl->nkl", wt.reshape(f, -1), d.reshape(n, f, -1))
        return F.fold(cols, (h + 2 * p[0], w + 2 * p[1]), (kh, kw), stride=s)[:, :, :h, :w]

    overlap = kh > s[0] or kw > s[1]
    stride_ignored = _bwd_stride_ignored(d, x, wt, s, p)
    dx_mistakes = [
        (
            "dx used the kernel unflipped; dx is a FULL convolution of dout with the flipped kernel "
            "(equivalently, each window's dout[n, f, i, j] * w[f] added back at the window's position).",
            lambda: ref(d, x, wt.flip(-1, -2), b, s, p)[0],
        ),
        (
            "where windows overlap (stride < kernel) each window overwrote the gradient already there; "
            "contributions must be ACCUMULATED with +=.",
            lambda: _dx_overwrite(d, x, wt, s, p, per_filter=False) if overlap else None,
        ),
        (
            "where windows overlap (stride < kernel) each window overwrote the gradient already there; "
            "contributions must be ACCUMULATED with += (over filters and windows).",
            lambda: _dx_overwrite(d, x, wt, s, p, per_filter=True),
        ),
        (
            "dx was cropped from the top-left corner of the padded gradient; the padding sits on every "
            "side, so crop dx_padded[:, :, p:p+H, p:p+W].",
            crop_top_left,
        ),
        (
            "the stride was ignored in the backward pass: window (i, j) starts at (i*s, j*s) in the padded input.",
            lambda: None if stride_ignored is None else stride_ignored[0],
        ),
        (
            "the roles of the filter and channel axes were swapped in dx (w[c, f] used for w[f, c]); "
            "dx[n, c] sums over filters f of dout[n, f] and w[f, c].",
            lambda: ref(d, x, wt.transpose(0, 1), b, s, p)[0] if f == c else None,
        ),
    ]
    dw = lambda: ref(d, x, wt, b, s, p)[1]  # noqa: E731 - a lazy model, shared below
    dw_mistakes = [
        (
            "dweight is flipped; it is the correlation of the (padded) input with dout, "
            "dw[f, c, a, b] = sum_{n,i,j} dout[n, f, i, j] * x_pad[n, c, i*s + a, j*s + b], no flip.",
            lambda: dw().flip(-1, -2),
        ),
        (
            "dweight holds only the LAST image of the batch: it was assigned (=) inside the loop over n "
            "instead of accumulated; sum over the batch.",
            lambda: ref(d[-1:], x[-1:], wt, b, s, p)[1] if n > 1 else None,
        ),
        (
            "dweight holds only the first image of the batch; sum the contributions of all N images.",
            lambda: ref(d[:1], x[:1], wt, b, s, p)[1] if n > 1 else None,
        ),
        (
            "dweight was averaged over the batch; the loss's sum over the batch is already in dout, so "
            "dweight is a plain sum over n.",
            lambda: dw() / n if n > 1 else None,
        ),
        (
            "dweight has its filter and channel axes swapped; it has the layout of weight, (F, C, KH, KW).",
            lambda: dw().transpose(0, 1) if f == c else None,
        ),
        (
            "the stride was ignored in the backward pass: window (i, j) starts at (i*s, j*s) in the padded input.",
            lambda: None if stride_ignored is None else stride_ignored[1],
        ),
    ]
    db_mistakes = [
        (
            "dbias was averaged; the bias is added to every output pixel of every image, so its gradient "
            "is the SUM of dout over N, H and W.",
            lambda: d.mean((0, 2, 3)),
        ),
        (
            "dbias was summed over the first image only; sum dout over the batch too: dout.sum((0, 2, 3)).",
            lambda: d[0].sum((1, 2)) if n > 1 else None,
        ),
        (
            "dbias was summed over the spatial axes but averaged over the batch; sum over all three: dout.sum((0, 2, 3)).",
            lambda: d.sum((2, 3)).mean(0) if n > 1 else None,
        ),
    ]
    return dx_mistakes, dw_mistakes, db_mistakes


def _grad_shape_variants(cc: _ConvCase, dout: Tensor) -> dict[str, dict[str, tuple[int, ...]]]:
    n, c, h, w = cc.x.shape
    f, _, kh, kw = cc.weight.shape
    ph, pw = _pair(cc.padding)
    oh, ow = dout.shape[-2:]
    dx = {"dx_not_cropped": (n, c, h + 2 * ph, w + 2 * pw)}
    empty = _empty_slice_shape(tuple(cc.x.shape), cc.padding)
    if empty is not None:
        dx["empty_slice"] = empty
    return {
        "dx": dx,
        "dweight": {"dw_per_image": (n, f, c, kh, kw), "dw_c_first": (c, f, kh, kw)},
        "dbias": {
            "db_batch": (n, f),
            "db_space": (f, oh, ow),
            "db_none": (n, f, oh, ow),
            "db_all": (),
            "db_keepdim": (1, f, 1, 1),
        },
    }


_GRAD_SHAPE_SENTENCES = {
    "empty_slice": EMPTY_SLICE,
    "dx_not_cropped": "dx still has the padded input's size: crop the padding off, dx = dx_padded[:, :, p:p+H, p:p+W] "
    "(the padding zeros are constants, not inputs).",
    "dw_per_image": "dweight was not summed over the batch: one weight serves every image, so add the N per-image gradients.",
    "dw_c_first": "dweight has its filter and channel axes swapped; it has the layout of weight, (F, C, KH, KW).",
    "db_batch": "dbias was not summed over the batch: dbias = dout.sum((0, 2, 3)).",
    "db_space": "dbias was not summed over the output positions: dbias = dout.sum((0, 2, 3)).",
    "db_none": "dbias must be summed over N, H and W: dbias = dout.sum((0, 2, 3)).",
    "db_all": "dbias should have shape (F,), one number per filter; it sums dout over N, H and W, not over F too.",
    "db_keepdim": "dbias should have the shape of bias, (F,): sum without keepdim, or reshape.",
}


def _describe(x: Any) -> str:
    if torch.is_tensor(x):
        return f"a tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def _grad_outputs(
    t: Tester, cc: _ConvCase, dout: Tensor, expected: tuple, exact: bool = False
) -> list[Output]:
    """Call the learner's backward on one case; its (dx, dweight, dbias) as Outputs."""
    case = cc.name
    out = _call(t, case, dout, *cc.args(), padding=cc.padding)
    dx, dweight, dbias = t.unpack(case, out, ("dx", "dweight", "dbias"))
    if cc.bias is None and dbias is not None:
        t.fail(
            case,
            f"bias is None, so dbias should be None (there is no bias to update), but it is {_describe(dbias)}.",
        )
    if cc.bias is not None and dbias is None:
        t.fail(case, "bias is given, so dbias should be a tensor of shape (F,), but it is None.")
    shapes = _grad_shape_variants(cc, dout)
    models: dict[str, list] = {}

    def mistakes(name: str) -> Callable[[], list]:
        def lazy() -> list:
            if not models:
                models.update(
                    zip(("dx", "dweight", "dbias"), _conv_backward_mistakes(dout, cc), strict=True)
                )
            return models[name]

        return lazy

    # Central differences of a linear map are exact up to rounding, about 1e-10 here.
    tol = {"rtol": 1e-6, "atol": 1e-6} if exact else {}
    outputs = [
        Output(case, "dx", dx, expected[0], shapes["dx"], mistakes("dx"), **tol),
        Output(
            case, "dweight", dweight, expected[1], shapes["dweight"], mistakes("dweight"), **tol
        ),
    ]
    if cc.bias is not None:
        outputs.append(
            Output(case, "dbias", dbias, expected[2], shapes["dbias"], mistakes("dbias"), **tol)
        )
    return outputs


@exercise(
    "conv2d_backward",
    forbidden=CONV_OPS,
    chapter=CHAPTER,
    signature="(dout, x, weight, bias, stride=1, padding=0) -> (dx, dweight, dbias)",
    summary="gradients of the cross-correlation: dx a full convolution with the flipped kernel, dweight a correlation of x and dout, dbias a sum; dbias None when bias is None",
    reference=ref_conv2d_backward,
    backward=True,
)
def check_conv2d_backward(t: Tester) -> None:
    """Against PyTorch's autograd of F.conv2d on every forward case, and central differences on a small one."""
    problems = []
    for cc in _conv_cases(t):
        n, _, h, w = cc.x.shape
        f, _, kh, kw = cc.weight.shape
        (sh, sw), (ph, pw) = _pair(cc.stride), _pair(cc.padding)
        problems.append(
            (cc, t.randn(n, f, _out_len(h, kh, sh, ph), _out_len(w, kw, sw, pw), dtype=cc.x.dtype))
        )
    # Central differences of the forward itself, so the check does not rest on PyTorch's backward alone.
    x, wt, b = t.randn(1, 2, 5, 4), t.randn(2, 2, 3, 2, scale=0.5), t.randn(2)
    small = _ConvCase(
        "x (1, 2, 5, 4), weight (2, 2, 3, 2), bias (2,), stride=(2, 1), padding=1, against central "
        "differences of the forward",
        x,
        wt,
        b,
        (2, 1),
        1,
    )
    problems.append((small, t.randn(1, 2, 3, 5)))

    def produce(problem: tuple[_ConvCase, Tensor]) -> list[Output]:
        cc, dout = problem
        if cc is small:
            numeric = numerical_gradient(
                lambda a, k, c: F.conv2d(a, k, c, (2, 1), 1), [x, wt, b], dout
            )
            return _grad_outputs(t, cc, dout, tuple(numeric), exact=True)
        return _grad_outputs(t, cc, dout, _autograd_conv_grads(dout, cc))

    judge(t, problems, produce, _GRAD_SHAPE_SENTENCES)


def _autograd_conv_grads(dout: Tensor, cc: _ConvCase) -> tuple[Tensor, Tensor, Tensor | None]:
    """PyTorch's own gradients of F.conv2d, computed in float64, cast to the case's dtype."""
    with torch.enable_grad():
        x = cc.x.detach().double().requires_grad_(True)
        wt = cc.weight.detach().double().requires_grad_(True)
        b = None if cc.bias is None else cc.bias.detach().double().requires_grad_(True)
        out = F.conv2d(x, wt, b, _pair(cc.stride), _pair(cc.padding))
        inputs = [x, wt] + ([] if b is None else [b])
        grads = torch.autograd.grad(out, inputs, dout.double())
    dt = cc.x.dtype
    return grads[0].to(dt), grads[1].to(dt), None if b is None else grads[2].to(dt)
