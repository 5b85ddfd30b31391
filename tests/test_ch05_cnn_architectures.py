"""Chapter 05 batteries: correct implementations in several styles pass, planted mistakes are named.

Every exercise of chapter 05 gets (a) correct implementations written in different
styles (closed formulas, nn.Conv2d on the meta device, explicit loops, numpy, interval
arithmetic, autograd brute force; modules built from nn.Sequential, from functional
calls, torchvision-style with in-place ReLUs and shared sub-modules), each checked
across 20 seeds, and (b) the mistakes learners really make, each rejected with the
sentence that names it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import course_utils as cu
from course_utils.checks import ch05_cnn_architectures as ch05

SEEDS = range(20)
#: Seeds on which every planted mistake must be caught (the catch must not depend on luck).
MISTAKE_SEEDS = (0, 1, 7)


def _kernel(kernel_size):
    return (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)


# =====================================================================================
# Correct implementations, one style each
# =====================================================================================


# ---- conv_param_count -----------------------------------------------------------------
def conv_param_count_formula(in_channels, out_channels, kernel_size, bias=True, groups=1):
    """The closed formula."""
    kh, kw = _kernel(kernel_size)
    return out_channels * (in_channels // groups) * kh * kw + (out_channels if bias else 0)


def conv_param_count_meta(in_channels, out_channels, kernel_size, bias=True, groups=1):
    """Build the layer on the meta device (no memory) and count."""
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, bias=bias, groups=groups, device="meta"
    )
    return sum(p.numel() for p in conv.parameters())


def conv_param_count_loops(in_channels, out_channels, kernel_size, bias=True, groups=1):
    """Visit every weight of every filter of every group."""
    kh, kw = _kernel(kernel_size)
    count = 0
    for _group in range(groups):
        for _filter in range(out_channels // groups):
            for _channel in range(in_channels // groups):
                for _row in range(kh):
                    for _col in range(kw):
                        count += 1
            if bias:
                count += 1
    return count


def conv_param_count_numpy(in_channels, out_channels, kernel_size, bias=True, groups=1):
    """numpy products of the weight and bias shapes (returns a numpy integer)."""
    weight_shape = (out_channels, in_channels // groups, *_kernel(kernel_size))
    return np.prod(weight_shape) + (np.int64(out_channels) if bias else np.int64(0))


# ---- receptive_field -------------------------------------------------------------------
def receptive_field_jump(layers):
    """Forward recursion: size += (k - 1) * jump; jump *= s."""
    size, jump = 1, 1
    for kernel, stride in layers:
        size += (kernel - 1) * jump
        jump *= stride
    return size


def receptive_field_backward(layers):
    """From the output back to the input: r <- (r - 1) * s + k."""
    r = 1
    for kernel, stride in reversed(layers):
        r = (r - 1) * stride + kernel
    return r


def receptive_field_interval(layers):
    """Track the interval of input positions that output position 0 depends on."""
    lo, hi = 0, 0
    for kernel, stride in layers[::-1]:
        lo, hi = lo * stride, hi * stride + kernel - 1
    return hi - lo + 1


def receptive_field_numpy(layers):
    """Closed form with a cumulative product of strides (numpy integers)."""
    if not layers:
        return 1
    k = np.array([k for k, _ in layers], dtype=np.int64)
    s = np.array([s for _, s in layers], dtype=np.int64)
    jumps = np.concatenate([[1], np.cumprod(s)[:-1]])
    return int(1 + ((k - 1) * jumps).sum())


def receptive_field_autograd(layers):
    """Brute force: which input pixels does output pixel 0 of a 1-D conv stack depend on?"""
    length = 1 + sum(k for k, _ in layers) * math.prod(s for _, s in layers)
    x = torch.zeros(1, 1, length, dtype=torch.float64, requires_grad=True)
    h = x
    for kernel, stride in layers:
        h = F.conv1d(h, torch.ones(1, 1, kernel, dtype=torch.float64), stride=stride)
    (g,) = torch.autograd.grad(h[0, 0, 0], x)
    touched = torch.nonzero(g[0, 0]).flatten()
    return int(touched.max() - touched.min() + 1)


# ---- ResidualBlock -----------------------------------------------------------------------
class ResidualBlockPlain(nn.Module):
    """nn.ReLU modules and an explicit if for the shortcut."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False
        )
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.project = stride != 1 or in_channels != out_channels
        self.shortcut = (
            nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
            if self.project
            else nn.Identity()
        )

    def forward(self, x):
        branch = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(branch + self.shortcut(x))


class ResidualBlockTorchvisionStyle(nn.Module):
    """In-place ReLU, `out += identity`, an empty nn.Sequential as the identity, named projection."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding="same", bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(
                        in_channels, out_channels, kernel_size=1, stride=stride, bias=False
                    ),
                    bn=nn.BatchNorm2d(out_channels),
                )
            )

    def forward(self, x):
        identity = self.shortcut(x)
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out += identity
        return self.relu(out)


class ResidualBlockFunctional(nn.Module):
    """Modules only hold the parameters; the forward pass is written with F.conv2d and F.batch_norm."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
            )

    def _norm(self, h, bn):
        return F.batch_norm(
            h,
            bn.running_mean,
            bn.running_var,
            bn.weight,
            bn.bias,
            self.training,
            bn.momentum,
            bn.eps,
        )

    def forward(self, x):
        h = F.relu(
            self._norm(F.conv2d(x, self.conv1.weight, stride=self.stride, padding=1), self.bn1)
        )
        h = self._norm(F.conv2d(h, self.conv2.weight, padding=1), self.bn2)
        if isinstance(self.shortcut, nn.Identity):
            sc = x
        else:
            conv, bn = self.shortcut
            sc = self._norm(F.conv2d(x, conv.weight, stride=self.stride), bn)
        return torch.clamp(h + sc, min=0)


class ResidualBlockSharedBranch(nn.Module):
    """The named layers are also gathered in a `branch` Sequential (shared, so counted once)."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.branch = nn.Sequential(self.conv1, self.bn1, nn.ReLU(), self.conv2, self.bn2)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = nn.Sequential(
            *(
                [
                    nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                    nn.BatchNorm2d(out_channels),
                ]
                if needs_projection
                else []
            )
        )

    def forward(self, x):
        return (self.branch(x) + self.shortcut(x)).relu()


# ---- DenseBlock -------------------------------------------------------------------------
class DenseBlockModuleList(nn.Module):
    """A ModuleList of BN-ReLU-conv Sequentials and a growing list of features."""

    def __init__(self, in_channels, growth_rate, num_layers):
        super().__init__()
        self.layers = nn.ModuleList()
        for i in range(num_layers):
            c = in_channels + i * growth_rate
            self.layers.append(
                nn.Sequential(
                    nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, growth_rate, 3, 1, 1, bias=False)
                )
            )

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, dim=1)))
        return torch.cat(features, dim=1)


class _TorchvisionDenseLayer(nn.Module):
    def __init__(self, c, growth_rate):
        super().__init__()
        self.norm = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(c, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)

    def forward(self, inputs):
        return self.conv(self.relu(self.norm(torch.cat(inputs, 1))))


class DenseBlockTorchvisionStyle(nn.Module):
    """Layers added with add_module and given the list of earlier features, in-place ReLU."""

    def __init__(self, in_channels, growth_rate, num_layers):
        super().__init__()
        for i in range(num_layers):
            self.add_module(
                f"denselayer{i + 1}",
                _TorchvisionDenseLayer(in_channels + i * growth_rate, growth_rate),
            )

    def forward(self, x):
        features = [x]
        for _name, layer in self.named_children():
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseBlockRunningConcat(nn.Module):
    """One running tensor, concatenated after every layer; layers registered in reverse order."""

    def __init__(self, in_channels, growth_rate, num_layers):
        super().__init__()
        widths = [in_channels + i * growth_rate for i in range(num_layers)]
        self.norms = nn.ModuleList([nn.BatchNorm2d(c) for c in widths][::-1])
        self.convs = nn.ModuleList(
            [nn.Conv2d(c, growth_rate, 3, padding=1, bias=False) for c in widths][::-1]
        )

    def forward(self, x):
        out = x
        for norm, conv in zip(reversed(self.norms), reversed(self.convs), strict=True):
            out = torch.cat([out, conv(F.relu(norm(out)))], 1)
        return out


class DenseBlockFunctional(nn.Module):
    """F.batch_norm and F.conv2d on parameters kept in modules, features written into a list."""

    def __init__(self, in_channels, growth_rate, num_layers):
        super().__init__()
        self.bns = nn.ModuleList(
            nn.BatchNorm2d(in_channels + i * growth_rate) for i in range(num_layers)
        )
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels + i * growth_rate, growth_rate, 3, bias=False)
            for i in range(num_layers)
        )

    def forward(self, x):
        features = [x]
        for bn, conv in zip(self.bns, self.convs, strict=True):
            h = torch.cat(features, 1)
            h = F.batch_norm(
                h,
                bn.running_mean,
                bn.running_var,
                bn.weight,
                bn.bias,
                self.training,
                bn.momentum,
                bn.eps,
            )
            features.append(F.conv2d(h.clamp_min(0), conv.weight, padding=1))
        return torch.cat(features, 1)


CORRECT = {
    "conv_param_count": [
        conv_param_count_formula,
        conv_param_count_meta,
        conv_param_count_loops,
        conv_param_count_numpy,
    ],
    "receptive_field": [
        receptive_field_jump,
        receptive_field_backward,
        receptive_field_interval,
        receptive_field_numpy,
        receptive_field_autograd,
    ],
    "residual_block": [
        ResidualBlockPlain,
        ResidualBlockTorchvisionStyle,
        ResidualBlockFunctional,
        ResidualBlockSharedBranch,
    ],
    "dense_block": [
        DenseBlockModuleList,
        DenseBlockTorchvisionStyle,
        DenseBlockRunningConcat,
        DenseBlockFunctional,
    ],
}
CORRECT_CASES = [(ex, fn) for ex, fns in CORRECT.items() for fn in fns]


@pytest.mark.parametrize(
    ("exercise_id", "fn"), CORRECT_CASES, ids=[f.__name__ for _, f in CORRECT_CASES]
)
def test_correct_implementation_passes_on_every_seed(exercise_id, fn):
    for seed in SEEDS:
        report = cu.check(exercise_id, fn, seed=seed, strict=True)
        assert report.passed, (seed, report)
        assert report.rows, "a passing report lists what it judged"


@pytest.mark.parametrize("exercise_id", list(CORRECT))
def test_reference_passes_its_own_battery(exercise_id):
    for seed in SEEDS:
        assert cu.check(exercise_id, cu.reference(exercise_id), seed=seed, strict=True).passed


# =====================================================================================
# Planted mistakes
# =====================================================================================


# ---- conv_param_count --------------------------------------------------------------------------
def _weights(in_channels, out_channels, kernel_size, groups):
    kh, kw = _kernel(kernel_size)
    return out_channels * (in_channels // groups) * kh * kw


def conv_no_bias(in_channels, out_channels, kernel_size, bias=True, groups=1):
    return _weights(in_channels, out_channels, kernel_size, groups)


def conv_bias_always(in_channels, out_channels, kernel_size, bias=True, groups=1):
    return _weights(in_channels, out_channels, kernel_size, groups) + out_channels


def conv_forgets_in_channels(in_channels, out_channels, kernel_size, bias=True, groups=1):
    kh, kw = _kernel(kernel_size)
    return out_channels * kh * kw + (out_channels if bias else 0)


def conv_ignores_groups(in_channels, out_channels, kernel_size, bias=True, groups=1):
    return _weights(in_channels, out_channels, kernel_size, 1) + (out_channels if bias else 0)


def conv_one_group(in_channels, out_channels, kernel_size, bias=True, groups=1):
    kh, kw = _kernel(kernel_size)
    return (in_channels // groups) * (out_channels // groups) * kh * kw + (
        out_channels if bias else 0
    )


def conv_bias_per_input_channel(in_channels, out_channels, kernel_size, bias=True, groups=1):
    return _weights(in_channels, out_channels, kernel_size, groups) + (in_channels if bias else 0)


def conv_bias_per_pixel(in_channels, out_channels, kernel_size, bias=True, groups=1):
    kh, kw = _kernel(kernel_size)
    return _weights(in_channels, out_channels, kernel_size, groups) + (
        out_channels * kh * kw if bias else 0
    )


def conv_kernel_not_squared(in_channels, out_channels, kernel_size, bias=True, groups=1):
    kh, _ = _kernel(kernel_size)
    return out_channels * (in_channels // groups) * kh + (out_channels if bias else 0)


def conv_first_kernel_entry(in_channels, out_channels, kernel_size, bias=True, groups=1):
    kh, _ = _kernel(kernel_size)
    return out_channels * (in_channels // groups) * kh * kh + (out_channels if bias else 0)


def conv_true_division(in_channels, out_channels, kernel_size, bias=True, groups=1):
    kh, kw = _kernel(kernel_size)
    return out_channels * (in_channels / groups) * kh * kw + (out_channels if bias else 0)


def conv_returns_tensor(in_channels, out_channels, kernel_size, bias=True, groups=1):
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, bias=bias, groups=groups, device="meta"
    )
    return torch.tensor(sum(p.numel() for p in conv.parameters()))


def conv_int_kernel_only(in_channels, out_channels, kernel_size, bias=True, groups=1):
    return out_channels * (in_channels // groups) * kernel_size * kernel_size + (
        out_channels if bias else 0
    )


CONV_MISTAKES = [
    ("conv_param_count", conv_no_bias, "the bias was left out"),
    ("conv_param_count", conv_bias_always, "a bias was counted although bias=False"),
    ("conv_param_count", conv_forgets_in_channels, "in_channels is missing"),
    ("conv_param_count", conv_ignores_groups, "groups was ignored"),
    ("conv_param_count", conv_one_group, "only one group's filters were counted"),
    ("conv_param_count", conv_bias_per_input_channel, "the bias was counted per input channel"),
    ("conv_param_count", conv_bias_per_pixel, "the bias was multiplied by the kernel size"),
    ("conv_param_count", conv_kernel_not_squared, "the kernel size was not squared"),
    ("conv_param_count", conv_first_kernel_entry, r"only kernel_size\[0\] was used"),
    ("conv_param_count", conv_true_division, r"returned the float .*Use // for the divisions"),
    ("conv_param_count", conv_returns_tensor, "returned a tensor; return a Python int"),
    (
        "conv_param_count",
        conv_int_kernel_only,
        r"raised TypeError.*kernel_size may be an int or a pair",
    ),
]


# ---- receptive_field ---------------------------------------------------------------------------
def rf_ignores_strides(layers):
    return 1 + sum(k - 1 for k, _ in layers)


def rf_jump_updated_first(layers):
    size, jump = 1, 1
    for kernel, stride in layers:
        jump *= stride
        size += (kernel - 1) * jump
    return size


def rf_reversed(layers):
    r = 1
    for kernel, stride in layers:
        r = (r - 1) * stride + kernel
    return r


def rf_sum_of_kernels(layers):
    return sum(k for k, _ in layers)


def rf_product_of_kernels(layers):
    return math.prod(k for k, _ in layers)


def rf_missing_one(layers):
    return receptive_field_jump(layers) - 1


def rf_adds_k(layers):
    size, jump = 1, 1
    for kernel, stride in layers:
        size += kernel * jump
        jump *= stride
    return size


def rf_first_layer_twice(layers):
    if not layers:
        return 1
    size, jump = layers[0][0], 1
    for kernel, stride in layers:
        size += (kernel - 1) * jump
        jump *= stride
    return size


def rf_reverses_in_place(layers):
    layers.reverse()
    r = 1
    for kernel, stride in layers:
        r = (r - 1) * stride + kernel
    return r


def rf_true_division(layers):
    size, jump = 1.0, 1.0
    for kernel, stride in layers:
        size += (kernel - 1) * jump
        jump *= stride
    return size


RF_MISTAKES = [
    ("receptive_field", rf_ignores_strides, "the strides were ignored"),
    ("receptive_field", rf_jump_updated_first, "layer i's own stride was included"),
    ("receptive_field", rf_reversed, "the layers were taken in reverse order"),
    ("receptive_field", rf_sum_of_kernels, "the kernel sizes were added up"),
    ("receptive_field", rf_product_of_kernels, "the kernel sizes were multiplied"),
    ("receptive_field", rf_missing_one, "the starting 1 is missing"),
    ("receptive_field", rf_adds_k, r"each layer added k \* jump instead of \(k - 1\) \* jump"),
    ("receptive_field", rf_first_layer_twice, "the first layer was counted twice"),
    (
        "receptive_field",
        rf_reverses_in_place,
        r"changed its input list in place .*reversed\(layers\)",
    ),
    ("receptive_field", rf_true_division, "returned the float"),
]


# ---- ResidualBlock ----------------------------------------------------------------------------
class _ResidualBase(ResidualBlockPlain):
    """The correct layers; subclasses change one thing."""

    def branch(self, x):
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


class ResidualReluBeforeAdd(_ResidualBase):
    def forward(self, x):
        return F.relu(self.branch(x)) + self.shortcut(x)


class ResidualNoFinalRelu(_ResidualBase):
    def forward(self, x):
        return self.branch(x) + self.shortcut(x)


class ResidualShortcutTwice(_ResidualBase):
    def forward(self, x):
        out = self.branch(x) + self.shortcut(x)
        out += self.shortcut(x)
        return F.relu(out)


class ResidualNoShortcut(_ResidualBase):
    def forward(self, x):
        return F.relu(self.branch(x))


class ResidualNoMiddleRelu(_ResidualBase):
    def forward(self, x):
        return F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))) + self.shortcut(x))


class ResidualBn1Twice(_ResidualBase):
    def forward(self, x):
        return F.relu(self.bn1(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


class ResidualAddBeforeBn2(_ResidualBase):
    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))) + self.shortcut(x)))


class ResidualPreActivation(_ResidualBase):
    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)  # a learner who kept the names but moved the BNs

    def forward(self, x):
        h = self.conv1(F.relu(self.bn1(x)))
        return self.conv2(F.relu(self.bn2(h))) + self.shortcut(x)


class ResidualStrideOnConv2(_ResidualBase):
    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__(in_channels, out_channels, stride)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride, 1, bias=False)


class ResidualStrideIgnored(_ResidualBase):
    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__(in_channels, out_channels, stride)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False)


class ResidualProjectionWithoutBn(_ResidualBase):
    def forward(self, x):
        sc = self.shortcut[0](x) if isinstance(self.shortcut, nn.Sequential) else x
        return F.relu(self.branch(x) + sc)


class ResidualNeverProjects(_ResidualBase):
    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__(in_channels, out_channels, stride)
        self.shortcut = nn.Identity()


class ResidualAlwaysProjects(_ResidualBase):
    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__(in_channels, out_channels, stride)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
            nn.BatchNorm2d(out_channels),
        )


class ResidualProjection3x3(_ResidualBase):
    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__(in_channels, out_channels, stride)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
                nn.BatchNorm2d(out_channels),
            )


class ResidualConvBias(_ResidualBase):
    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__(in_channels, out_channels, stride)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1)


class ResidualOtherNames(nn.Module):
    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.downsample = nn.Identity()

    def forward(self, x):
        return F.relu(self.branch(x) + self.downsample(x))


class ResidualInPlaceOnInput(_ResidualBase):
    def forward(self, x):
        out = self.branch(x)
        if isinstance(self.shortcut, nn.Identity):
            x += out
            return F.relu(x)
        return F.relu(out + self.shortcut(x))


class ResidualExtraLayer(_ResidualBase):
    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__(in_channels, out_channels, stride)
        self.head = nn.Linear(out_channels, out_channels)


class ResidualNoSuperInit(nn.Module):
    def __init__(self, in_channels, out_channels, stride=1):
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)


class ResidualDetachedShortcut(_ResidualBase):
    """Same forward values, but the shortcut carries no gradient back to x."""

    def forward(self, x):
        identity = self.shortcut(x).detach()
        return F.relu(self.branch(x) + identity)


RESIDUAL_MISTAKES = [
    (
        "residual_block",
        ResidualReluBeforeAdd,
        "the ReLU was applied to the branch before the addition",
    ),
    ("residual_block", ResidualNoFinalRelu, "the ReLU after the addition is missing"),
    ("residual_block", ResidualShortcutTwice, "the shortcut was added twice"),
    ("residual_block", ResidualNoShortcut, "the shortcut was never added"),
    ("residual_block", ResidualNoMiddleRelu, "the ReLU between bn1 and conv2 is missing"),
    ("residual_block", ResidualBn1Twice, "bn1 was applied after conv2 too"),
    ("residual_block", ResidualAddBeforeBn2, "the shortcut was added before bn2"),
    ("residual_block", ResidualPreActivation, r"pre-activation order BN-ReLU-conv"),
    ("residual_block", ResidualStrideOnConv2, "the stride was put on conv2"),
    (
        "residual_block",
        ResidualStrideIgnored,
        r"conv1 has stride \(1, 1\), but with stride=\d it must downsample",
    ),
    (
        "residual_block",
        ResidualProjectionWithoutBn,
        "the projection shortcut skipped its BatchNorm",
    ),
    (
        "residual_block",
        ResidualNeverProjects,
        r"the shortcut has no projection, but with .* 1x1 convolution",
    ),
    ("residual_block", ResidualAlwaysProjects, r"the shortcut should be nn.Identity\(\)"),
    (
        "residual_block",
        ResidualProjection3x3,
        r"one 1x1 convolution without bias, weight shape .*\[\(\d, \d, 3, 3\)\]",
    ),
    ("residual_block", ResidualConvBias, r"`conv1` has a bias\. A BatchNorm follows it"),
    ("residual_block", ResidualOtherNames, r"the block has no sub-module `conv1`"),
    (
        "residual_block",
        ResidualInPlaceOnInput,
        r"changed its input `x` in place\. Build new tensors instead",
    ),
    (
        "residual_block",
        ResidualExtraLayer,
        r"parameters, expected .* outside conv1, bn1, conv2, bn2 and shortcut: \['head.weight', 'head.bias'\]",
    ),
    (
        "residual_block",
        ResidualNoSuperInit,
        r"raised AttributeError.*|must call super\(\).__init__\(\)",
    ),
    ("residual_block", ResidualDetachedShortcut, "no gradient reaches the input x"),
]


# ---- DenseBlock ------------------------------------------------------------------------------
class DenseNoInput(DenseBlockModuleList):
    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features[1:], 1)


class DenseLastOnly(DenseBlockModuleList):
    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat([x, features[-1]], 1)


class DenseReturnsLastLayer(DenseBlockModuleList):
    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return features[-1]


class DenseInputLast(DenseBlockModuleList):
    def forward(self, x):
        out = super().forward(x)
        c = x.shape[1]
        return torch.cat([out[:, c:], out[:, :c]], 1)


class DenseChain(nn.Module):
    """Each layer sees only the previous layer's output (a plain chain), outputs concatenated."""

    def __init__(self, in_channels, growth_rate, num_layers):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(
                nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, growth_rate, 3, padding=1, bias=False)
            )
            for c in [in_channels] + [growth_rate] * (num_layers - 1)
        )

    def forward(self, x):
        features, h = [x], x
        for layer in self.layers:
            h = layer(h)
            features.append(h)
        return torch.cat(features, 1)


class DenseConvBnRelu(nn.Module):
    """The post-activation order conv-BN-ReLU."""

    def __init__(self, in_channels, growth_rate, num_layers):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_channels + i * growth_rate, growth_rate, 3, padding=1, bias=False),
                nn.BatchNorm2d(growth_rate),
                nn.ReLU(),
            )
            for i in range(num_layers)
        )

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class DenseNoRelu(DenseBlockModuleList):
    def forward(self, x):
        features = [x]
        for bn, _relu, conv in self.layers:
            features.append(conv(bn(torch.cat(features, 1))))
        return torch.cat(features, 1)


class DenseReluFirst(DenseBlockModuleList):
    def forward(self, x):
        features = [x]
        for bn, relu, conv in self.layers:
            features.append(conv(bn(relu(torch.cat(features, 1)))))
        return torch.cat(features, 1)


class DenseNewReversed(DenseBlockModuleList):
    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat([x, *features[:0:-1]], 1)


class DenseConvBias(DenseBlockModuleList):
    def __init__(self, in_channels, growth_rate, num_layers):
        super().__init__(in_channels, growth_rate, num_layers)
        for seq in self.layers:
            c = seq[2].in_channels
            seq[2] = nn.Conv2d(c, growth_rate, 3, padding=1)


class DenseBottleneck(nn.Module):
    """DenseNet-BC's layer (1x1 conv to 4k, then 3x3 conv); not what this exercise asks for."""

    def __init__(self, in_channels, growth_rate, num_layers):
        super().__init__()
        self.layers = nn.ModuleList()
        for i in range(num_layers):
            c = in_channels + i * growth_rate
            self.layers.append(
                nn.Sequential(
                    nn.BatchNorm2d(c),
                    nn.ReLU(),
                    nn.Conv2d(c, 4 * growth_rate, 1, bias=False),
                    nn.BatchNorm2d(4 * growth_rate),
                    nn.ReLU(),
                    nn.Conv2d(4 * growth_rate, growth_rate, 3, padding=1, bias=False),
                )
            )

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class DenseAddsInput(DenseBlockModuleList):
    def forward(self, x):
        out = super().forward(x)
        c = x.shape[1]
        return torch.cat([out[:, :c] + out[:, c : 2 * c].mean(1, keepdim=True), out[:, c:]], 1)


class DenseExtraScale(DenseBlockModuleList):
    def __init__(self, in_channels, growth_rate, num_layers):
        super().__init__(in_channels, growth_rate, num_layers)
        self.scale = nn.Parameter(torch.ones(1))


DENSE_MISTAKES = [
    ("dense_block", DenseNoInput, r"the output has \d+ channels; the input is missing"),
    (
        "dense_block",
        DenseLastOnly,
        r"only the last layer's \d+ channels were concatenated to the input",
    ),
    ("dense_block", DenseReturnsLastLayer, "only the last layer's output was returned"),
    ("dense_block", DenseInputLast, "the input's channels came last; they come first"),
    ("dense_block", DenseChain, "each layer sees only the previous layer's output"),
    ("dense_block", DenseConvBnRelu, "It looks like the order is conv-BN-ReLU"),
    ("dense_block", DenseNoRelu, "the ReLU between BatchNorm and convolution is missing"),
    ("dense_block", DenseReluFirst, "the ReLU came before the BatchNorm"),
    ("dense_block", DenseNewReversed, "the new features are in reverse order"),
    ("dense_block", DenseConvBias, "the convolutions have biases"),
    (
        "dense_block",
        DenseBottleneck,
        r"has \d+ convolutions, but a dense block of \d+ layers \(no bottleneck\)",
    ),
    ("dense_block", DenseAddsInput, r"should be the input x itself, unchanged"),
    ("dense_block", DenseExtraScale, r"parameters, expected .* not part of any layer: \['scale'\]"),
]

MISTAKES = CONV_MISTAKES + RF_MISTAKES + RESIDUAL_MISTAKES + DENSE_MISTAKES


@pytest.mark.parametrize(
    ("exercise_id", "fn", "pattern"), MISTAKES, ids=[f.__name__ for _, f, _ in MISTAKES]
)
@pytest.mark.forbidden_calls_allowed
def test_planted_mistake_is_named(exercise_id, fn, pattern):
    for seed in MISTAKE_SEEDS:
        with pytest.raises(cu.CheckFailure, match=pattern) as info:
            cu.check(exercise_id, fn, seed=seed, strict=True)
        message = str(info.value)
        assert message.startswith(f"{exercise_id}: in case "), message
        assert "\n" not in message and "Traceback" not in message


def _randomised_state(block: nn.Module, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in block.state_dict().items():
        if value.is_floating_point():
            value = torch.rand(value.shape, generator=gen, dtype=torch.float64) + 0.5
        state[name] = value
    return state


def _module_differs(cls, ref, args) -> bool:
    """True if `cls` fails to build, has another structure, or computes something else than `ref`."""
    try:
        block = cls(*args)
    except Exception:  # noqa: BLE001 - a planted class that cannot be built is wrong
        return True
    ref_block = ref(*args)
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    if shapes != {k: tuple(v.shape) for k, v in ref_block.state_dict().items()}:
        return True  # another structure than the contract's (names or shapes)
    state = _randomised_state(ref_block, seed=5)
    block.load_state_dict(state)
    ref_block.load_state_dict(state)
    block.double()
    ref_block.double()
    for training in (True, False):
        block.train(training)
        ref_block.train(training)
        x = torch.randn(
            3, args[0], 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
        )
        x_ref = x.clone().requires_grad_(True)
        x_got = x.clone().requires_grad_(True)
        try:
            got = block(x_got)
        except RuntimeError:
            return True
        want = ref_block(x_ref)
        if got.shape != want.shape or not torch.allclose(got, want):
            return True
        (g_want,) = torch.autograd.grad(want.sum(), x_ref)
        (g_got,) = torch.autograd.grad(got.sum(), x_got, allow_unused=True)
        if g_got is None or not torch.allclose(g_got, g_want):
            return True
    return False


@pytest.mark.parametrize(
    ("exercise_id", "fn", "pattern"), MISTAKES, ids=[f.__name__ for _, f, _ in MISTAKES]
)
def test_planted_mistake_really_is_wrong(exercise_id, fn, pattern):
    """Guard against a mistake test that cannot fail: the planted code must differ from the reference."""
    del pattern
    ref = cu.reference(exercise_id)
    if exercise_id == "conv_param_count":
        configs = [
            (3, 16, 5, True, 1),
            (3, 16, 5, False, 1),
            (4, 6, (3, 5), True, 1),
            (8, 12, 3, True, 4),
        ]
        for config in configs:
            try:
                got = fn(*config)
            except TypeError:
                return
            if type(got) is not int or got != ref(*config):
                return
        pytest.fail(f"{fn.__name__} agrees with the reference")
    elif exercise_id == "receptive_field":
        stacks = [
            [],
            [(3, 1), (3, 1)],
            [(3, 2), (3, 1)],
            [(3, 1), (3, 2)],
            [(5, 2), (3, 2), (3, 3)],
        ]
        for layers in stacks:
            passed = list(layers)
            got = fn(passed)
            if type(got) is not int or got != ref(layers) or passed != layers:
                return
        pytest.fail(f"{fn.__name__} agrees with the reference")
    else:
        configs = (
            [(4, 4, 1), (3, 6, 2), (2, 5, 1)]
            if exercise_id == "residual_block"
            else [(3, 2, 3), (1, 4, 2)]
        )
        assert any(_module_differs(fn, ref, args) for args in configs), (
            f"{fn.__name__} agrees with the reference"
        )


# =====================================================================================
# Stubs, registration, threads, and the references against brute force
# =====================================================================================


def _stub(*args, **kwargs):
    raise NotImplementedError("write me")


class _StubInInit(nn.Module):
    def __init__(self, *args):
        super().__init__()
        raise NotImplementedError("ResidualBlock.__init__: write me")


class _StubInForward(ch05.RefResidualBlock):
    def forward(self, x):
        raise NotImplementedError("ResidualBlock.forward: write me")


class _DenseStubInForward(ch05.RefDenseBlock):
    def forward(self, x):
        raise NotImplementedError("DenseBlock.forward: write me")


STUBS = [
    ("conv_param_count", _stub),
    ("receptive_field", _stub),
    ("residual_block", _StubInInit),
    ("residual_block", _StubInForward),
    ("dense_block", _StubInInit),
    ("dense_block", _DenseStubInForward),
]


@pytest.mark.parametrize(
    ("exercise_id", "stub"), STUBS, ids=[f"{e}-{s.__name__}" for e, s in STUBS]
)
def test_stub_is_pending_in_learn_mode_and_fails_in_strict_mode(
    exercise_id, stub, monkeypatch, capsys
):
    monkeypatch.delenv("COURSE_STRICT", raising=False)
    report = cu.check(exercise_id, stub)
    assert report.status == "pending"
    assert "not implemented yet" in capsys.readouterr().out
    with pytest.raises(cu.CheckFailure, match="not implemented yet"):
        cu.check(exercise_id, stub, strict=True)
    monkeypatch.setenv("COURSE_STRICT", "1")
    with pytest.raises(cu.CheckFailure, match="strict mode"):
        cu.check(exercise_id, stub)


def test_exercises_of_chapter_05_are_registered():
    listed = {e.id: e.signature for e in cu.exercises("05")}
    assert listed == {
        "conv_param_count": "(in_channels, out_channels, kernel_size, bias=True, groups=1) -> int",
        "receptive_field": "(layers: list of (kernel_size, stride) pairs, input side first) -> int",
        "residual_block": "class ResidualBlock(nn.Module): __init__(in_channels, out_channels, stride=1), "
        "forward(x (N,C_in,H,W)) -> (N,C_out,(H-1)//stride+1,(W-1)//stride+1)",
        "dense_block": "class DenseBlock(nn.Module): __init__(in_channels, growth_rate, num_layers), "
        "forward(x (N,C,H,W)) -> (N,C+num_layers*growth_rate,H,W)",
    }
    assert all(e.chapter == ch05.CHAPTER == "05_cnn_architectures" for e in cu.exercises("05"))


@pytest.mark.parametrize("exercise_id", ["residual_block", "dense_block"])
def test_module_checks_leave_the_thread_count_and_global_rng_alone(exercise_id):
    threads = torch.get_num_threads()
    state = torch.random.get_rng_state()
    cu.check(exercise_id, cu.reference(exercise_id), strict=True)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), state)


def test_known_receptive_fields():
    assert ch05.ref_receptive_field([]) == 1
    assert ch05.ref_receptive_field([(3, 1)] * 3) == 7  # three 3x3 convs see what one 7x7 sees
    assert ch05.ref_receptive_field(ch05.ALEXNET_LAYERS) == 195
    assert ch05.ref_receptive_field(ch05.VGG16_LAYERS) == 212
    assert ch05.ref_receptive_field(ch05.RESNET_STEM) == 11


def test_known_parameter_counts():
    alexnet = [
        (3, 96, 11, True, 1),
        (96, 256, 5, True, 2),
        (256, 384, 3, True, 1),
        (384, 384, 3, True, 2),
        (384, 256, 3, True, 2),
    ]
    conv = sum(ch05.ref_conv_param_count(*c) for c in alexnet)
    fc = (9216 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 1000 + 1000)
    assert conv + fc == 60_965_224  # the "60 million parameters" of the AlexNet paper
    # Two 3x3 layers against one 5x5, three against one 7x7, at C channels in and out, no bias.
    assert ch05.ref_conv_param_count(64, 64, 3, False) * 2 == 18 * 64 * 64
    assert ch05.ref_conv_param_count(64, 64, 7, False) == 49 * 64 * 64


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 7), st.integers(1, 3)), max_size=6))
def test_reference_receptive_field_equals_brute_force(layers):
    assert ch05.ref_receptive_field(layers) == receptive_field_autograd(layers)
    assert ch05.ref_receptive_field(layers) == receptive_field_interval(layers)


@settings(max_examples=60, deadline=None)
@given(
    groups=st.integers(1, 4),
    cin=st.integers(1, 5),
    cout=st.integers(1, 5),
    kh=st.integers(1, 7),
    kw=st.integers(1, 7),
    bias=st.booleans(),
    square=st.booleans(),
)
def test_reference_conv_param_count_equals_nn_conv2d(groups, cin, cout, kh, kw, bias, square):
    kernel = kh if square else (kh, kw)
    args = (groups * cin, groups * cout, kernel, bias, groups)
    assert ch05.ref_conv_param_count(*args) == conv_param_count_meta(*args)


@pytest.mark.parametrize(
    ("exercise_id", "fn"), CORRECT_CASES, ids=[f.__name__ for _, f in CORRECT_CASES]
)
def test_report_check_seconds(exercise_id, fn, capsys):
    """Not a timing assertion: prints how long each check takes, for the chapter's report."""
    start = time.perf_counter()
    cu.check(exercise_id, fn, strict=True)
    with capsys.disabled():
        print(f"\n{exercise_id} with {fn.__name__}: {time.perf_counter() - start:.3f} s", end="")
