"""Check batteries of chapter 05: parameter counts, receptive fields, residual and dense blocks.

``conv_param_count`` and ``receptive_field`` return integers and are judged exactly.
``residual_block`` and ``dense_block`` receive a class: the battery builds instances
itself, checks their layers and parameter counts, overwrites every parameter and
BatchNorm statistic with numbers of its own, and compares the forward pass (train and
eval mode, float64 and float32) with a functional re-computation from the contract.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checking import CheckFailure, Tester, exercise

CHAPTER = "05_cnn_architectures"
Tensor = torch.Tensor


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # Every case is tiny: several threads only add synchronisation, and on a busy machine
    # (other processes holding the cores) their spin-waits make a 0.3 s check take 5 s.
    # The learner's code runs inside this too, so a brute-force answer stays fast.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _pair(k: int | Sequence[int]) -> tuple[int, int]:
    return (k, k) if isinstance(k, numbers.Integral) else (int(k[0]), int(k[1]))


# ---- reference implementations ---------------------------------------------------------
def ref_conv_param_count(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    bias: bool = True,
    groups: int = 1,
) -> int:
    """Parameters of nn.Conv2d: out * (in // groups) * kh * kw weights, plus out biases."""
    kh, kw = _pair(kernel_size)
    return out_channels * (in_channels // groups) * kh * kw + (out_channels if bias else 0)


def ref_receptive_field(layers: Sequence[tuple[int, int]]) -> int:
    """Side of the input region one output unit sees; ``layers`` are (kernel, stride), input first."""
    size, jump = 1, 1  # jump: input pixels between neighbouring units of the current layer
    for kernel, stride in layers:
        size += (kernel - 1) * jump
        jump *= stride
    return size


class RefResidualBlock(nn.Module):
    """ResNet basic block: ReLU(BN(conv3x3(ReLU(BN(conv3x3(x))))) + shortcut(x)).

    Shapes: (N, in_channels, H, W) -> (N, out_channels, H', W') with
    H' = (H - 1) // stride + 1. The shortcut is the identity when stride == 1 and
    in_channels == out_channels, else a 1x1 convolution of that stride and a BatchNorm.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        """(N, in, H, W) -> (N, out, H', W')."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class RefDenseBlock(nn.Module):
    """DenseNet block: layer l maps all in + l*k channels so far to k new ones with BN-ReLU-conv3x3.

    Shapes: (N, in_channels, H, W) -> (N, in_channels + num_layers * growth_rate, H, W),
    the input's channels first, then each layer's new channels in order.
    """

    def __init__(self, in_channels: int, growth_rate: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(
                nn.BatchNorm2d(in_channels + i * growth_rate),
                nn.ReLU(),
                nn.Conv2d(in_channels + i * growth_rate, growth_rate, 3, padding=1, bias=False),
            )
            for i in range(num_layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        """(N, in, H, W) -> (N, in + L*k, H, W)."""
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


# ---- judging integers --------------------------------------------------------------------
def _expect_int(t: Tester, case: str, name: str, got: Any) -> int:
    if isinstance(got, bool) or not isinstance(got, numbers.Integral):
        if isinstance(got, float):
            t.fail(
                case,
                f"{name} returned the float {got!r}; a count is an int. Use // for the "
                "divisions (a / b is always a float in Python) or wrap the result in int().",
            )
        if torch.is_tensor(got):
            t.fail(
                case, f"{name} returned a tensor; return a Python int (for example with .item())."
            )
        kind = type(got).__name__
        t.fail(case, f"{name} should return an int, but it returned a {kind} ({got!r:.60}).")
    return int(got)


def _judge_ints(
    t: Tester,
    quantity: str,
    results: list[tuple[str, int, int, list[tuple[str, Callable[[], int | None]]]]],
) -> None:
    """Judge (case, got, expected, mistakes) for every case; name the mistake that explains them all.

    A mistake model returns what the mistaken formula gives in that case, or None where it
    coincides with the truth. One wrong number can fit several mistakes, so the diagnosis
    prefers the first model that reproduces the learner's answers in every case.
    """
    failing = [r for r in results if r[1] != r[2]]
    if not failing:
        for case, _, expected, _ in results:
            t.ok(case, quantity, f"ok ({expected:,})")
        return
    case, got, expected, mistakes = failing[0]

    def predicted(r: tuple, i: int) -> int:
        value = r[3][i][1]()
        return r[2] if value is None else value

    matching = [i for i, (_, alt) in enumerate(mistakes) if alt() is not None and alt() == got]
    consistent = [i for i in matching if all(r[1] == predicted(r, i) for r in results)]
    chosen = (consistent or matching or [None])[0]
    diagnosis = "" if chosen is None else f" It looks like {mistakes[chosen][0]}"
    t.fail(case, f"`{quantity}` is {got:,}, expected {expected:,}.{diagnosis}")


# ---- conv_param_count -------------------------------------------------------------------
def _conv_cases(t: Tester) -> list[tuple[str, tuple[int, int, Any, bool, int]]]:
    fixed: list[tuple[int, int, Any, bool, int]] = [
        (3, 16, 5, True, 1),  # a plain conv with bias
        (3, 16, 5, False, 1),  # bias=False, as before a BatchNorm
        (4, 6, (3, 5), True, 1),  # a rectangular kernel
        (8, 12, 3, True, 4),  # grouped
        (6, 6, 3, False, 6),  # depthwise
        (6, 12, (5, 3), True, 3),  # grouped, rectangular
        (16, 32, 1, True, 1),  # pointwise
        (3, 96, 11, True, 1),  # AlexNet conv1
        (96, 256, 5, True, 2),  # AlexNet conv2, split over two GPUs
        (64, 64, 7, False, 1),  # one 7x7 layer, to set against three 3x3 layers
        (1, 1, 1, False, 1),
        (2, 4, (1, 7), False, 2),
    ]
    cases = []
    for cin, cout, k, bias, groups in fixed:
        cases.append(
            (
                f"Conv2d({cin}, {cout}, kernel_size={k}, bias={bias}, groups={groups})",
                (cin, cout, k, bias, groups),
            )
        )
    for _ in range(24):
        groups = [1, 1, 2, 3, 4][int(t.randint(5))]
        cin = groups * (1 + int(t.randint(8)))
        cout = groups * (1 + int(t.randint(8)))
        kernel: Any = 1 + int(t.randint(7))
        if int(t.randint(2)):
            kernel = (1 + int(t.randint(7)), 1 + int(t.randint(7)))
        bias = bool(t.randint(2))
        cases.append(
            (
                f"Conv2d({cin}, {cout}, kernel_size={kernel}, bias={bias}, groups={groups})",
                (cin, cout, kernel, bias, groups),
            )
        )
    return cases


def _conv_truth(cin: int, cout: int, kernel: Any, bias: bool, groups: int) -> int:
    conv = nn.Conv2d(cin, cout, kernel, bias=bias, groups=groups, device="meta")
    return sum(p.numel() for p in conv.parameters())


def _conv_mistakes(cin: int, cout: int, kernel: Any, bias: bool, g: int) -> list:
    kh, kw = _pair(kernel)
    b = cout if bias else 0
    per_in = cin // g
    return [
        (
            "the bias was left out: with bias=True each of the out_channels filters has one bias, "
            "so add out_channels.",
            lambda: cout * per_in * kh * kw if bias else None,
        ),
        (
            "a bias was counted although bias=False.",
            lambda: None if bias else cout * per_in * kh * kw + cout,
        ),
        (
            "in_channels is missing: each filter spans in_channels // groups input channels, so the "
            "weight has out_channels * (in_channels // groups) * kh * kw entries.",
            lambda: cout * kh * kw + b,
        ),
        (
            "groups was ignored: with groups=g each filter sees only in_channels // g input channels, "
            "so the weight count is divided by g.",
            lambda: cout * cin * kh * kw + b,
        ),
        (
            "only one group's filters were counted: (in_channels // groups) * (out_channels // groups) "
            "* kh * kw is one group; there are groups of them, giving out_channels * (in_channels // groups) "
            "* kh * kw.",
            lambda: (cout // g) * per_in * kh * kw + b,
        ),
        (
            "the bias was counted per input channel; there is one bias per output channel (per filter).",
            lambda: cout * per_in * kh * kw + cin if bias else None,
        ),
        (
            "the bias was multiplied by the kernel size, as if it were a weight per pixel; it is one "
            "number per filter.",
            lambda: cout * per_in * kh * kw + cout * kh * kw if bias else None,
        ),
        (
            "the kernel size was not squared: a k x k kernel has k * k weights per input channel.",
            lambda: cout * per_in * kh + b if kh == kw else None,
        ),
        (
            "only kernel_size[0] was used: a (kh, kw) kernel has kh * kw weights per input channel.",
            lambda: cout * per_in * kh * kh + b,
        ),
        (
            "only kernel_size[1] was used: a (kh, kw) kernel has kh * kw weights per input channel.",
            lambda: cout * per_in * kw * kw + b,
        ),
    ]


@exercise(
    "conv_param_count",
    chapter=CHAPTER,
    signature="(in_channels, out_channels, kernel_size, bias=True, groups=1) -> int",
    summary="number of parameters of nn.Conv2d(in_channels, out_channels, kernel_size, bias=bias, groups=groups)",
    reference=ref_conv_param_count,
)
def check_conv_param_count(t: Tester) -> None:
    """36 configurations (grouped, depthwise, rectangular, AlexNet's) against nn.Conv2d's own count."""
    name = getattr(t.fn, "__name__", "conv_param_count")
    results = []
    for case, (cin, cout, kernel, bias, groups) in _conv_cases(t):
        try:
            with _one_thread():
                got = t.call(case, cin, cout, kernel, bias, groups)
        except CheckFailure as err:
            if not isinstance(kernel, int) and "TypeError" in str(err):
                raise CheckFailure(
                    f"{err} kernel_size may be an int or a pair (kh, kw): turn an int k "
                    "into (k, k) first."
                ) from None
            raise
        got = _expect_int(t, case, name, got)
        results.append(
            (
                case,
                got,
                _conv_truth(cin, cout, kernel, bias, groups),
                _conv_mistakes(cin, cout, kernel, bias, groups),
            )
        )
    _judge_ints(t, "parameters", results)


# ---- receptive_field ---------------------------------------------------------------------
ALEXNET_LAYERS = [(11, 4), (3, 2), (5, 1), (3, 2), (3, 1), (3, 1), (3, 1), (3, 2)]
VGG16_LAYERS = ([(3, 1)] * 2 + [(2, 2)]) * 2 + ([(3, 1)] * 3 + [(2, 2)]) * 3
RESNET_STEM = [(7, 2), (3, 2)]


def _rf_cases(t: Tester) -> list[tuple[str, list[tuple[int, int]]]]:
    cases = [
        ("no layers (the input pixel itself)", []),
        ("one 3x3 conv", [(3, 1)]),
        ("two 3x3 convs", [(3, 1), (3, 1)]),
        ("three 3x3 convs", [(3, 1)] * 3),
        ("one 5x5 conv", [(5, 1)]),
        ("3x3 conv stride 2, then 3x3 conv", [(3, 2), (3, 1)]),
        ("3x3 conv, then 3x3 conv stride 2", [(3, 1), (3, 2)]),
        ("2x2 pool stride 2, then 3x3 conv stride 3", [(2, 2), (3, 3)]),
        ("ResNet stem: 7x7 conv stride 2, 3x3 max-pool stride 2", list(RESNET_STEM)),
        ("AlexNet's 5 convs and 3 max-pools", list(ALEXNET_LAYERS)),
        ("VGG-16's 13 convs and 5 max-pools", list(VGG16_LAYERS)),
        ("1x1 convs with stride 2 (gaps between windows)", [(1, 2), (1, 2), (3, 1)]),
    ]
    for i in range(12):
        n = 1 + int(t.randint(6))
        layers = [(1 + int(t.randint(7)), 1 + int(t.randint(3))) for _ in range(n)]
        cases.append((f"random stack {i + 1}: {layers}", layers))
    return cases


def _rf_mistakes(layers: list[tuple[int, int]]) -> list:
    ks = [k for k, _ in layers]
    ss = [s for _, s in layers]

    def weighted(factor: Callable[[int], int], plus: int = 1, minus: int = 1) -> int:
        return plus + sum((k - minus) * factor(i) for i, k in enumerate(ks))

    before = lambda i: math.prod(ss[:i])  # noqa: E731 - strides of the layers below layer i
    return [
        (
            "the strides were ignored: each layer adds (k - 1) times the product of the strides of "
            "the layers below it, not just (k - 1).",
            lambda: weighted(lambda i: 1),
        ),
        (
            "layer i's own stride was included in its factor: layer i adds (k_i - 1) times the product "
            "of the strides of the layers BELOW it (update the jump after adding).",
            lambda: weighted(lambda i: math.prod(ss[: i + 1])),
        ),
        (
            "the layers were taken in reverse order: the list starts at the input, and a layer's "
            "factor is the product of the strides of the layers before it in the list.",
            lambda: weighted(lambda i: math.prod(ss[i + 1 :])),
        ),
        (
            "the kernel sizes were added up: stacked windows overlap, so each layer adds k - 1, "
            "not k (and strides multiply).",
            lambda: sum(ks),
        ),
        (
            "the kernel sizes were multiplied: receptive fields grow by addition, each layer adding "
            "(k - 1) times the product of the strides below it.",
            lambda: math.prod(ks),
        ),
        (
            "the starting 1 is missing: one output unit with no layers sees 1 pixel, and each layer "
            "adds (k - 1) * jump to it.",
            lambda: weighted(before, plus=0),
        ),
        ("each layer added k * jump instead of (k - 1) * jump.", lambda: weighted(before, minus=0)),
        (
            "the first layer was counted twice (starting from its kernel size and then looping over "
            "all layers): start from 1, or from k_0 and loop over the remaining layers.",
            lambda: weighted(before, plus=ks[0]) if ks else None,
        ),
    ]


@exercise(
    "receptive_field",
    chapter=CHAPTER,
    signature="(layers: list of (kernel_size, stride) pairs, input side first) -> int",
    summary="side length, in input pixels, of the receptive field of one unit after a stack of conv/pool layers",
    reference=ref_receptive_field,
)
def check_receptive_field(t: Tester) -> None:
    """24 stacks: empty, 3x3 stacks, strided, AlexNet, VGG-16, ResNet stem, random."""
    name = getattr(t.fn, "__name__", "receptive_field")
    results = []
    for case, layers in _rf_cases(t):
        passed = list(layers)
        with _one_thread():
            got = t.call(case, passed)
        if passed != layers:
            t.fail(
                case,
                f"{name} changed its input list in place (for example with .reverse() or "
                ".pop()); iterate over it, or over reversed(layers), instead.",
            )
        got = _expect_int(t, case, name, got)
        results.append((case, got, ref_receptive_field(layers), _rf_mistakes(layers)))
    _judge_ints(t, "receptive field", results)


# ---- shared machinery for the two module exercises -----------------------------------------
def _build(t: Tester, case: str, args: tuple[int, ...], cls_name: str) -> nn.Module:
    block = t.call(case, *args)
    if not isinstance(block, nn.Module):
        t.fail(
            case,
            f"{cls_name}{args} should be an nn.Module (subclass nn.Module and call "
            f"super().__init__() first), but it is a {type(block).__name__}.",
        )
    if not hasattr(block, "_parameters") or not hasattr(block, "_modules"):
        t.fail(case, f"{cls_name}.__init__ must call super().__init__() before assigning layers.")
    return block


def _call_forward(t: Tester, case: str, x: Tensor, forward: Callable[..., Tensor]) -> Any:
    try:
        return t.call(case, x=x, fn=forward)
    except CheckFailure as err:
        if "changed its input `x` in place" in str(err):
            raise CheckFailure(
                f"{err} Build new tensors instead (for example `out = out + identity` "
                "rather than `x += out`, and no in-place ReLU on x)."
            ) from None
        raise


def _forward_fn(block: nn.Module, cls_name: str) -> Callable[[Tensor], Tensor]:
    def forward(x: Tensor) -> Tensor:
        return block(x)

    forward.__name__ = f"{cls_name}.forward"
    return forward


def _bn_state(bn: nn.BatchNorm2d) -> dict[str, Any]:
    return {
        "weight": bn.weight.detach().clone(),
        "bias": bn.bias.detach().clone(),
        "mean": bn.running_mean.detach().clone(),
        "var": bn.running_var.detach().clone(),
        "eps": bn.eps,
        "momentum": 0.1 if bn.momentum is None else bn.momentum,
    }


def _bn(x: Tensor, s: dict[str, Any], training: bool) -> Tensor:
    # Copies of the running statistics: the reference must not touch the learner's buffers.
    return F.batch_norm(
        x,
        s["mean"].clone(),
        s["var"].clone(),
        s["weight"],
        s["bias"],
        training,
        s["momentum"],
        s["eps"],
    )


def _randomise_bn(t: Tester, bn: nn.BatchNorm2d, dtype: torch.dtype) -> None:
    c = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(1.0 + 0.4 * t.randn(c, dtype=dtype))
        bn.bias.copy_(0.4 * t.randn(c, dtype=dtype))
        bn.running_mean.copy_(0.3 * t.randn(c, dtype=dtype))
        bn.running_var.copy_(0.5 + t.rand(c, dtype=dtype))


def _randomise_conv(t: Tester, conv: nn.Conv2d, dtype: torch.dtype) -> None:
    w = conv.weight
    fan_in = w.shape[1] * w.shape[2] * w.shape[3]
    with torch.no_grad():
        w.copy_(t.randn(*w.shape, dtype=dtype) * math.sqrt(2.0 / fan_in))


def _count(block: nn.Module) -> int:
    return sum(p.numel() for p in block.parameters())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _to_dtype(t: Tester, case: str, block: nn.Module, dtype: torch.dtype, cls_name: str) -> None:
    block.to(dtype)
    for name, p in list(block.named_parameters()) + list(block.named_buffers()):
        if p.is_floating_point() and p.dtype != dtype:
            t.fail(
                case,
                f"after {cls_name}.to({_dtype_name(dtype)}) the tensor `{name}` is still "
                f"{_dtype_name(p.dtype)}: register it as an nn.Parameter or a buffer.",
            )


# ---- ResidualBlock ----------------------------------------------------------------------
RESIDUAL_CONFIGS = [
    # (in_channels, out_channels, stride, N, H, W, dtype)
    (3, 3, 1, 2, 5, 5, torch.float64),
    (2, 5, 1, 2, 5, 6, torch.float64),
    (4, 4, 2, 2, 7, 7, torch.float64),
    (3, 6, 2, 2, 6, 5, torch.float64),
    (1, 2, 3, 2, 7, 8, torch.float64),
    (4, 4, 1, 3, 4, 4, torch.float32),
    (3, 8, 2, 3, 8, 8, torch.float32),
]


def _residual_structure(
    t: Tester, case: str, block: nn.Module, cin: int, cout: int, stride: int
) -> None:
    for name in ("conv1", "bn1", "conv2", "bn2", "shortcut"):
        if not isinstance(getattr(block, name, None), nn.Module):
            t.fail(
                case,
                f"the block has no sub-module `{name}`. The contract names the layers conv1, "
                "bn1, conv2, bn2 and shortcut (nn.Identity() when the shapes match).",
            )
    for name, want_in in (("conv1", cin), ("conv2", cout)):
        conv = getattr(block, name)
        if not isinstance(conv, nn.Conv2d):
            t.fail(case, f"`{name}` should be an nn.Conv2d, but it is a {type(conv).__name__}.")
        want = (cout, want_in, 3, 3)
        if tuple(conv.weight.shape) != want:
            t.fail(
                case,
                f"`{name}.weight` should have shape {want} (a 3x3 convolution from {want_in} "
                f"to {cout} channels), but it has shape {tuple(conv.weight.shape)}.",
            )
        if conv.bias is not None:
            t.fail(
                case,
                f"`{name}` has a bias. A BatchNorm follows it and subtracts the mean, which "
                "removes any constant the bias adds: build it with bias=False.",
            )
    for name in ("bn1", "bn2"):
        bn = getattr(block, name)
        if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != cout or bn.weight is None:
            t.fail(case, f"`{name}` should be nn.BatchNorm2d({cout}), but it is {bn!r:.80}.")
    shortcut = block.shortcut
    convs = [m for m in shortcut.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in shortcut.modules() if isinstance(m, nn.BatchNorm2d)]
    if stride == 1 and cin == cout:
        if convs or bns or any(True for _ in shortcut.parameters()):
            t.fail(
                case,
                "with stride=1 and in_channels == out_channels the shortcut should be "
                "nn.Identity(): x already has the output's shape, and a bare identity path is what "
                "carries the gradient through unchanged.",
            )
        return
    why = f"stride={stride}" if stride != 1 else f"{cin} -> {cout} channels"
    if not convs:
        t.fail(
            case,
            f"the shortcut has no projection, but with {why} x no longer has the output's "
            f"shape and cannot be added to it: make the shortcut a 1x1 convolution with stride={stride} "
            f"(bias=False) followed by nn.BatchNorm2d({cout}).",
        )
    want = (cout, cin, 1, 1)
    if len(convs) != 1 or tuple(convs[0].weight.shape) != want or convs[0].bias is not None:
        shapes = [tuple(c.weight.shape) for c in convs]
        t.fail(
            case,
            f"the projection shortcut should be one 1x1 convolution without bias, weight shape "
            f"{want}, followed by a BatchNorm; it has convolution(s) with weight shape(s) {shapes}"
            f"{' and a bias' if convs and convs[0].bias is not None else ''}.",
        )
    if len(bns) != 1 or bns[0].num_features != cout:
        t.fail(
            case,
            f"the projection shortcut should end in nn.BatchNorm2d({cout}) (one BatchNorm), "
            f"but it has {len(bns)} BatchNorm layer(s).",
        )


def _residual_expected_count(cin: int, cout: int, stride: int) -> int:
    n = 9 * cin * cout + 9 * cout * cout + 4 * cout
    return n if stride == 1 and cin == cout else n + cin * cout + 2 * cout


def _residual_params(block: nn.Module) -> dict[str, Any]:
    p: dict[str, Any] = {
        "w1": block.conv1.weight.detach().clone(),
        "bn1": _bn_state(block.bn1),
        "w2": block.conv2.weight.detach().clone(),
        "bn2": _bn_state(block.bn2),
        "wsc": None,
        "bnsc": None,
    }
    convs = [m for m in block.shortcut.modules() if isinstance(m, nn.Conv2d)]
    if convs:
        p["wsc"] = convs[0].weight.detach().clone()
        p["bnsc"] = _bn_state(
            next(m for m in block.shortcut.modules() if isinstance(m, nn.BatchNorm2d))
        )
    return p


def _residual_forward(
    x: Tensor, p: dict[str, Any], stride: int, training: bool, variant: str = ""
) -> Tensor:
    """The contract's block computed from the parameters ``p``; ``variant`` models a mistake."""
    s1, s2 = (1, stride) if variant == "stride_on_conv2" else (stride, 1)
    if variant == "pre_activation":
        h = F.conv2d(F.relu(_bn(x, p["bn1"], training)), p["w1"], stride=stride, padding=1)
        h = F.conv2d(F.relu(_bn(h, p["bn2"], training)), p["w2"], padding=1)
        return h + (
            x
            if p["wsc"] is None
            else _bn(F.conv2d(x, p["wsc"], stride=stride), p["bnsc"], training)
        )
    h = _bn(F.conv2d(x, p["w1"], stride=s1, padding=1), p["bn1"], training)
    if variant != "no_middle_relu":
        h = F.relu(h)
    h = F.conv2d(h, p["w2"], stride=s2, padding=1)
    if p["wsc"] is None:
        sc = x
    else:
        sc = F.conv2d(x, p["wsc"], stride=stride)
        if variant != "projection_without_bn":
            sc = _bn(sc, p["bnsc"], training)
    if variant == "add_before_bn2":
        return F.relu(_bn(h + sc, p["bn2"], training))
    h = _bn(h, p["bn1" if variant == "bn1_twice" else "bn2"], training)
    if variant == "relu_before_add":
        return F.relu(h) + sc
    if variant == "relu_before_and_after_add":
        return F.relu(F.relu(h) + sc)
    if variant == "no_final_relu":
        return h + sc
    if variant == "shortcut_twice":
        return F.relu(h + 2 * sc)
    if variant == "no_shortcut":
        return F.relu(h)
    return F.relu(h + sc)


RESIDUAL_MISTAKES = [
    (
        "relu_before_add",
        "the ReLU was applied to the branch before the addition; the basic block adds "
        "first, ReLU(bn2(conv2(.)) + shortcut(x)), so the sum can still be negative before the ReLU.",
    ),
    (
        "relu_before_and_after_add",
        "a ReLU was applied to the branch before the addition as well as after "
        "it; only the sum goes through a ReLU.",
    ),
    ("no_final_relu", "the ReLU after the addition is missing: out = ReLU(branch + shortcut(x))."),
    (
        "shortcut_twice",
        "the shortcut was added twice (for example `out += identity` on a tensor that "
        "already contained it).",
    ),
    ("no_shortcut", "the shortcut was never added: this is a plain block, out = ReLU(branch)."),
    ("no_middle_relu", "the ReLU between bn1 and conv2 is missing."),
    (
        "stride_on_conv2",
        "the stride was put on conv2; in the contract conv1 carries the stride and "
        "conv2 always has stride 1.",
    ),
    ("bn1_twice", "bn1 was applied after conv2 too; the second BatchNorm is bn2."),
    (
        "projection_without_bn",
        "the projection shortcut skipped its BatchNorm: shortcut(x) = BN(conv1x1(x)).",
    ),
    (
        "add_before_bn2",
        "the shortcut was added before bn2; bn2 normalises the branch alone, then the "
        "shortcut is added.",
    ),
    (
        "pre_activation",
        "the layers are in the pre-activation order BN-ReLU-conv (ResNet v2); this "
        "exercise asks for the original conv-BN-ReLU block.",
    ),
]


def _residual_mistakes(x: Tensor, p: dict[str, Any], stride: int, training: bool) -> list:
    return [
        (sentence, lambda v=v: _residual_forward(x, p, stride, training, v))
        for v, sentence in RESIDUAL_MISTAKES
    ]


def _randomise_residual(t: Tester, block: nn.Module, dtype: torch.dtype) -> None:
    for m in block.modules():
        if isinstance(m, nn.Conv2d):
            _randomise_conv(t, m, dtype)
        elif isinstance(m, nn.BatchNorm2d):
            _randomise_bn(t, m, dtype)


def _restore_running_stats(block: nn.Module, saved: dict[str, Tensor]) -> None:
    buffers = dict(block.named_buffers())
    with torch.no_grad():
        for name, value in saved.items():
            buffers[name].copy_(value)


def _check_residual_case(
    t: Tester, cin: int, cout: int, stride: int, n: int, h: int, w: int, dtype: torch.dtype
) -> None:
    args = (cin, cout, stride)
    base = f"ResidualBlock({cin}, {cout}, stride={stride}), x ({n}, {cin}, {h}, {w}) {_dtype_name(dtype)}"
    block = _build(t, base, args, "ResidualBlock")
    _residual_structure(t, base, block, cin, cout, stride)
    got_count, want_count = _count(block), _residual_expected_count(cin, cout, stride)
    if got_count != want_count:
        known = ("conv1.", "bn1.", "conv2.", "bn2.", "shortcut.")
        extra = [name for name, _ in block.named_parameters() if not name.startswith(known)]
        t.fail(
            base,
            f"the block has {got_count:,} parameters, expected {want_count:,}"
            + (
                f"; these are outside conv1, bn1, conv2, bn2 and shortcut: {extra}."
                if extra
                else "."
            ),
        )
    t.ok(base, "layers and parameter count", f"ok ({want_count:,})")

    _to_dtype(t, base, block, dtype, "ResidualBlock")
    _randomise_residual(t, block, dtype)
    saved = {k: v.detach().clone() for k, v in block.named_buffers()}
    p = _residual_params(block)
    x = t.randn(n, cin, h, w, dtype=dtype)
    forward = _forward_fn(block, "ResidualBlock")
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    for training in (True, False):
        block.train(training)
        _restore_running_stats(block, saved)
        case = f"{base}, {'train' if training else 'eval'} mode"
        out = _call_residual(t, case, block, x, forward, stride)
        if torch.is_tensor(out) and out.shape[-2:] == x.shape[-2:] and stride != 1:
            t.fail(
                case,
                f"the output keeps the input's {h}x{w} size, but with stride={stride} it should be "
                f"{ho}x{wo}: conv1 and the projection shortcut both carry the stride.",
            )
        expected = _residual_forward(x, p, stride, training)
        t.compare(
            case, "output", out, expected, mistakes=_residual_mistakes(x, p, stride, training)
        )

    # The branch switched off: the block must reduce to ReLU(shortcut(x)), and gradients still reach x.
    block.train(True)
    _restore_running_stats(block, saved)
    with torch.no_grad():
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
    p_off = _residual_params(block)
    case = f"{base}, residual branch switched off (bn2 weight and bias set to 0)"
    dout = t.randn(n, cout, ho, wo, dtype=dtype)

    # A scalar objective, not grad_outputs=dout: passing a tensor of output gradients makes
    # torch.autograd import sympy (about 2 s) on first use, which would blow the time budget.
    def grad_through_block(x: Tensor) -> Tensor:
        xr = x.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad((block(xr) * dout).sum(), xr)
        return g

    grad_through_block.__name__ = "ResidualBlock.forward"
    xr = x.detach().clone().requires_grad_(True)
    (expected_dx,) = torch.autograd.grad(
        (_residual_forward(xr, p_off, stride, True) * dout).sum(), xr
    )
    dx = t.call(case, x=x, fn=grad_through_block)
    if torch.is_tensor(dx) and dx.shape == x.shape and float(dx.abs().max()) == 0.0:
        t.fail(
            case,
            "no gradient reaches the input x: with the branch switched off, the only path "
            "left is the shortcut, so ReLU(shortcut(x)) must still pass the gradient back to x.",
        )
    t.compare(
        case,
        "d(output . dout)/dx",
        dx,
        expected_dx.detach(),
        mistakes=[(s, lambda v=v: _vjp(x, p_off, stride, v, dout)) for v, s in RESIDUAL_MISTAKES],
    )


def _call_residual(
    t: Tester, case: str, block: nn.Module, x: Tensor, forward: Callable[..., Tensor], stride: int
) -> Any:
    try:
        return _call_forward(t, case, x, forward)
    except CheckFailure as err:
        text = str(err)
        if "must match the size" in text:
            text = text.replace(
                " A reduction (max, sum, mean) without keepdim=True often causes this.", ""
            )
            conv_stride = tuple(block.conv1.stride)
            if stride != 1 and conv_stride != (stride, stride):
                text += (
                    f" The branch and the shortcut disagree in size: conv1 has stride {conv_stride}, "
                    f"but with stride={stride} it must downsample like the shortcut does."
                )
            else:
                text += (
                    " The branch and the shortcut disagree in shape: both must give "
                    "(N, out_channels, (H - 1) // stride + 1, (W - 1) // stride + 1)."
                )
        raise CheckFailure(text) from None


def _vjp(x: Tensor, p: dict[str, Any], stride: int, variant: str, dout: Tensor) -> Tensor:
    xr = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad((_residual_forward(xr, p, stride, True, variant) * dout).sum(), xr)
    return g


@exercise(
    "residual_block",
    chapter=CHAPTER,
    signature="class ResidualBlock(nn.Module): __init__(in_channels, out_channels, stride=1), "
    "forward(x (N,C_in,H,W)) -> (N,C_out,(H-1)//stride+1,(W-1)//stride+1)",
    summary="class ResidualBlock: ReLU(bn2(conv2(ReLU(bn1(conv1(x))))) + shortcut(x)), 1x1 projection "
    "shortcut when the shape changes",
    reference=RefResidualBlock,
)
def check_residual_block(t: Tester) -> None:
    """7 configurations: layers, parameter count, train and eval outputs, the switched-off branch."""
    with _one_thread():
        for config in RESIDUAL_CONFIGS:
            _check_residual_case(t, *config)


# ---- DenseBlock ----------------------------------------------------------------------------
DENSE_CONFIGS = [
    # (in_channels, growth_rate, num_layers, N, H, W, dtype)
    (3, 2, 3, 2, 5, 5, torch.float64),
    (1, 4, 2, 2, 6, 7, torch.float64),
    (4, 3, 1, 2, 5, 6, torch.float64),
    (2, 2, 4, 2, 4, 4, torch.float64),
    (5, 3, 3, 3, 6, 6, torch.float32),
]


def _dense_layers(
    t: Tester, case: str, block: nn.Module, cin: int, k: int, n_layers: int
) -> list[tuple[nn.BatchNorm2d, nn.Conv2d]]:
    """Find layer l's BatchNorm and conv by their channel count cin + l*k (unique per layer)."""
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
    widths = [cin + i * k for i in range(n_layers)]
    conv_in = [c.weight.shape[1] for c in convs]
    if len(convs) != n_layers:
        t.fail(
            case,
            f"the block has {len(convs)} convolutions, but a dense block of {n_layers} layers "
            f"(no bottleneck) has {n_layers}, one 3x3 convolution per layer.",
        )
    if conv_in == [cin] + [k] * (n_layers - 1) and n_layers > 1 and k != cin:
        t.fail(
            case,
            f"each layer sees only the previous layer's output (convolution inputs {conv_in}); in a "
            f"dense block layer l sees the input and every earlier output concatenated, {cin} + l*{k} "
            f"channels, so the convolutions take {widths} channels.",
        )
    pairs = []
    for i, width in enumerate(widths):
        conv = [c for c in convs if tuple(c.weight.shape) == (k, width, 3, 3)]
        if not conv:
            shapes = [tuple(c.weight.shape) for c in convs]
            t.fail(
                case,
                f"layer {i} needs a 3x3 convolution from {width} = {cin} + {i}*{k} channels (all "
                f"features so far) to growth_rate={k} new ones, weight shape {(k, width, 3, 3)}; the "
                f"convolutions found have weight shapes {shapes}.",
            )
        if conv[0].bias is not None:
            t.fail(
                case,
                "the convolutions have biases; the contract builds them with bias=False, as "
                "DenseNet does: every new feature map meets a BatchNorm before any later convolution "
                "uses it, and that BatchNorm's shift plays the bias's role.",
            )
        bn = [b for b in bns if b.num_features == width and b.weight is not None]
        if not bn:
            found = [b.num_features for b in bns]
            hint = (
                " It looks like the order is conv-BN-ReLU; a dense layer is BN-ReLU-conv, normalising "
                "its input channels."
                if found and all(f == k for f in found)
                else ""
            )
            t.fail(
                case,
                f"layer {i} needs nn.BatchNorm2d({width}) over its {width} input channels; the "
                f"BatchNorm layers found have {found} features.{hint}",
            )
        pairs.append((bn[0], conv[0]))
    if len(bns) != n_layers:
        t.fail(
            case,
            f"the block has {len(bns)} BatchNorm layers; a dense block of {n_layers} layers has "
            f"{n_layers}, one per layer before its convolution.",
        )
    return pairs


def _dense_forward(
    x: Tensor, states: list[tuple[dict[str, Any], Tensor]], training: bool, variant: str = ""
) -> Tensor:
    """The contract's dense block from per-layer (BN state, conv weight); ``variant`` models a mistake."""
    features = [x]
    for bn, w in states:
        h = torch.cat(features, 1)
        if variant == "relu_bn_conv":
            h = _bn(F.relu(h), bn, training)
        else:
            h = _bn(h, bn, training)
            if variant != "no_relu":
                h = F.relu(h)
        features.append(F.conv2d(h, w, padding=1))
    if variant == "new_reversed":
        features = [features[0], *features[:0:-1]]
    return torch.cat(features, 1)


DENSE_MISTAKES = [
    (
        "no_relu",
        "the ReLU between BatchNorm and convolution is missing: each layer is BN-ReLU-conv.",
    ),
    ("relu_bn_conv", "the ReLU came before the BatchNorm; each layer is BN, then ReLU, then conv."),
    (
        "new_reversed",
        "the new features are in reverse order: the output is [x, layer 0's, layer 1's, ...].",
    ),
]


def _check_dense_case(
    t: Tester, cin: int, k: int, n_layers: int, n: int, h: int, w: int, dtype: torch.dtype
) -> None:
    args = (cin, k, n_layers)
    base = (
        f"DenseBlock(in_channels={cin}, growth_rate={k}, num_layers={n_layers}), "
        f"x ({n}, {cin}, {h}, {w}) {_dtype_name(dtype)}"
    )
    block = _build(t, base, args, "DenseBlock")
    pairs = _dense_layers(t, base, block, cin, k, n_layers)
    want_count = sum(9 * (cin + i * k) * k + 2 * (cin + i * k) for i in range(n_layers))
    got_count = _count(block)
    if got_count != want_count:
        known = {id(p) for bn, conv in pairs for p in (bn.weight, bn.bias, conv.weight)}
        extra = [name for name, p in block.named_parameters() if id(p) not in known]
        t.fail(
            base,
            f"the block has {got_count:,} parameters, expected {want_count:,} = sum over layers of "
            f"9*c_l*{k} (conv) + 2*c_l (BatchNorm), c_l = {cin} + l*{k}"
            + (f"; these are not part of any layer: {extra}." if extra else "."),
        )
    t.ok(base, "layers and parameter count", f"ok ({want_count:,})")

    _to_dtype(t, base, block, dtype, "DenseBlock")
    for bn, conv in pairs:
        _randomise_bn(t, bn, dtype)
        _randomise_conv(t, conv, dtype)
    saved = {name: v.detach().clone() for name, v in block.named_buffers()}
    states = [(_bn_state(bn), conv.weight.detach().clone()) for bn, conv in pairs]
    x = t.randn(n, cin, h, w, dtype=dtype)
    forward = _forward_fn(block, "DenseBlock")
    total = cin + n_layers * k
    for training in (True, False):
        block.train(training)
        _restore_running_stats(block, saved)
        case = f"{base}, {'train' if training else 'eval'} mode"
        out = _call_forward(t, case, x, forward)
        if torch.is_tensor(out) and out.dim() == 4 and out.shape[1] != total:
            c = out.shape[1]
            if c == n_layers * k:
                why = (
                    f"the input is missing: a dense block returns the input's {cin} channels followed "
                    f"by every layer's {k} new ones, {cin} + {n_layers}*{k} = {total}."
                )
            elif c == cin + k:
                why = (
                    f"only the last layer's {k} channels were concatenated to the input; every "
                    f"layer's output is kept, {cin} + {n_layers}*{k} = {total} channels."
                )
            elif c == k:
                why = "only the last layer's output was returned; return the concatenation of x and every layer's output."
            else:
                why = f"expected {cin} + {n_layers}*{k} = {total} channels."
            t.fail(case, f"the output has {c} channels; {why}")
        out = t.expect_tensor(case, "output", out, shape=(n, total, h, w), dtype=dtype)
        if not torch.equal(out[:, :cin].detach(), x):
            if torch.equal(out[:, -cin:].detach(), x):
                t.fail(
                    case,
                    "the input's channels came last; they come first: cat([x, new features], dim=1).",
                )
            t.fail(
                case,
                f"the first {cin} output channels should be the input x itself, unchanged: a "
                "dense block concatenates its input with the new features (it does not add them, "
                "or transform x).",
            )
        t.ok(case, "first in_channels output channels = x", "ok (exact)")
        expected = _dense_forward(x, states, training)
        t.compare(
            case,
            "output",
            out,
            expected,
            mistakes=[
                (s, lambda v=v, tr=training: _dense_forward(x, states, tr, v))
                for v, s in DENSE_MISTAKES
            ],
        )


@exercise(
    "dense_block",
    chapter=CHAPTER,
    signature="class DenseBlock(nn.Module): __init__(in_channels, growth_rate, num_layers), "
    "forward(x (N,C,H,W)) -> (N,C+num_layers*growth_rate,H,W)",
    summary="class DenseBlock: layer l is BN-ReLU-conv3x3 from in + l*k to k channels; output is the "
    "concatenation [x, all new features], in + L*k channels",
    reference=RefDenseBlock,
)
def check_dense_block(t: Tester) -> None:
    """5 configurations: layers, parameter count, pass-through of x, train and eval outputs."""
    with _one_thread():
        for config in DENSE_CONFIGS:
            _check_dense_case(t, *config)
