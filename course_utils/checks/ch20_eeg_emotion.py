"""Check batteries of chapter 20: band-pass filtering by masking a spectrum, differential entropy,
and the map from electrodes to a 2-D grid of the 10-20 system.

All three exercises are deterministic functions of their arguments, judged by value against the
references below (float64; float32 inputs judged with float32 tolerances), and a failure names
the mistake it looks like: a closed band, frequencies in cycles per sample, the unbiased
variance, the log of sigma, a transposed map, a feature axis left last, ...

The chapter's layout data also lives here, so that the notebook and its checks use one copy:
DEAP's 32 electrodes in the order of its preprocessed files, and the 9 x 9 grid of the
3-D-cube papers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..checking import CheckFailure, Tester, exercise

CHAPTER = "20_eeg_emotion"
Tensor = torch.Tensor

#: DEAP's 32 EEG electrodes (10-20 system), in the channel order of its preprocessed files.
DEAP_ELECTRODES = (
    "Fp1", "AF3", "F3", "F7", "FC5", "FC1", "C3", "T7", "CP5", "CP1", "P3", "P7", "PO3", "O1", "Oz", "Pz",
    "Fp2", "AF4", "Fz", "F4", "F8", "FC6", "FC2", "Cz", "C4", "T8", "CP6", "CP2", "P4", "P8", "PO4", "O2",
)  # fmt: skip

#: The 9 x 9 map of the 3-D-cube papers: row 0 is the front of the head (nasion), column 0 the
#: left ear, "-" a cell with no electrode. Left and right hemispheres mirror across column 4.
DEAP_LAYOUT = (
    "-    -    -    Fp1  -    Fp2  -    -    -",
    "-    -    -    AF3  -    AF4  -    -    -",
    "F7   -    F3   -    Fz   -    F4   -    F8",
    "-    FC5  -    FC1  -    FC2  -    FC6  -",
    "T7   -    C3   -    Cz   -    C4   -    T8",
    "-    CP5  -    CP1  -    CP2  -    CP6  -",
    "P7   -    P3   -    Pz   -    P4   -    P8",
    "-    -    -    PO3  -    PO4  -    -    -",
    "-    -    -    O1   Oz   O2   -    -    -",
)


def electrode_coords(names: Sequence[str], layout: Sequence[str] = DEAP_LAYOUT) -> Tensor:
    """(E, 2) int64: the (row, col) of each named electrode on ``layout`` (rows of names, "-" empty).

    ValueError, in one sentence, for a ragged layout, a name placed twice on it, a name listed
    twice, or a name that is not on it.
    """
    rows = [row.split() for row in layout]
    if not rows or any(len(r) != len(rows[0]) for r in rows):
        raise ValueError(
            f"the layout's rows should all have the same number of cells, but they have {[len(r) for r in rows]}."
        )
    where: dict[str, tuple[int, int]] = {}
    for r, row in enumerate(rows):
        for c, name in enumerate(row):
            if name == "-":
                continue
            if name in where:
                raise ValueError(
                    f"electrode {name!r} is placed twice on the layout, at {where[name]} and {(r, c)}."
                )
            where[name] = (r, c)
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"electrode {name!r} is listed twice; each electrode has one cell.")
        seen.add(name)
        if name not in where:
            raise ValueError(
                f"electrode {name!r} is not on the layout (its names: {sorted(where)})."
            )
    return torch.tensor([where[n] for n in names], dtype=torch.int64).reshape(len(names), 2)


# ---- references ------------------------------------------------------------------------------
def ref_band_filter(x: Tensor, fs: float, low: float, high: float) -> Tensor:
    """x (..., T) -> (..., T): keep the rfft bins with low <= f < high (f = k fs / T Hz), zero the rest."""
    n = x.shape[-1]
    freqs = torch.fft.rfftfreq(n, d=1.0 / fs, dtype=torch.float64)  # (n//2 + 1,) in Hz
    keep = (freqs >= low) & (freqs < high)
    return torch.fft.irfft(torch.fft.rfft(x, dim=-1) * keep, n=n, dim=-1)


def ref_differential_entropy(x: Tensor) -> Tensor:
    """x (..., T) -> (...): 0.5 log(2 pi e var), var the biased (1/T) variance over the last dim."""
    var = ((x - x.mean(-1, keepdim=True)) ** 2).mean(-1)
    return 0.5 * torch.log(2 * math.pi * math.e * var)


def ref_electrode_grid(features: Tensor, coords: Tensor, height: int = 9, width: int = 9) -> Tensor:
    """features (N, E, F), coords (E, 2) (row, col) -> (N, F, height, width), zeros off the electrodes.

    ValueError, in one sentence, for malformed shapes, a cell outside the grid, or two
    electrodes on one cell.
    """
    if features.dim() != 3:
        raise ValueError(f"features should be (N, E, F), but has shape {tuple(features.shape)}.")
    n, e, f = features.shape
    if tuple(coords.shape) != (e, 2):
        raise ValueError(
            f"coords should be (E, 2) = ({e}, 2) for {e} electrodes, but has shape {tuple(coords.shape)}."
        )
    rows, cols = coords[:, 0].long(), coords[:, 1].long()
    outside = (rows < 0) | (rows >= height) | (cols < 0) | (cols >= width)
    if outside.any():
        i = int(outside.nonzero()[0])
        raise ValueError(
            f"electrode {i} sits at {tuple(coords[i].tolist())}, outside the {height} x {width} grid."
        )
    cell = rows * width + cols
    if len(cell.unique()) < e:
        dup = next(int(c) for c in cell.unique() if int((cell == c).sum()) > 1)
        who = (cell == dup).nonzero().flatten().tolist()
        raise ValueError(
            f"electrodes {who} share the cell {(dup // width, dup % width)}; each cell holds one electrode."
        )
    out = features.new_zeros(n, f, height, width)
    out[:, :, rows, cols] = features.transpose(1, 2)  # (N, F, E) written to the E cells
    return out


# ---- helpers for the batteries -----------------------------------------------------------------
def _expect_shape(
    t: Tester, case: str, quantity: str, got: Any, shape: tuple[int, ...], hints: list
) -> None:
    """Fail with a named mistake when ``got`` has one of the shapes in ``hints`` instead of ``shape``."""
    if not torch.is_tensor(got) or tuple(got.shape) == tuple(shape):
        return
    for wrong, sentence in hints:
        if wrong is not None and tuple(got.shape) == tuple(wrong):
            t.fail(
                case,
                f"`{quantity}` should have shape {tuple(shape)}, but it has shape {tuple(got.shape)}. "
                f"It looks like {sentence}",
            )


# ---- band_filter -------------------------------------------------------------------------------
def _masked(
    x: Tensor, fs: float, keep: Callable[[Tensor], Tensor], two_sided: bool = False
) -> Tensor:
    """x filtered by a mask built from the bin frequencies (float64); the mistake models use it."""
    x = x.double()
    n = x.shape[-1]
    if two_sided:
        freqs = torch.fft.fftfreq(n, d=1.0 / fs, dtype=torch.float64)
        return torch.fft.ifft(torch.fft.fft(x, dim=-1) * keep(freqs), dim=-1).real
    freqs = torch.fft.rfftfreq(n, d=1.0 / fs, dtype=torch.float64)
    return torch.fft.irfft(torch.fft.rfft(x, dim=-1) * keep(freqs), n=n, dim=-1)


def _band_filter_mistakes(x: Tensor, fs: float, low: float, high: float) -> list:
    n = x.shape[-1]
    k = n // 2 + 1

    def linspace_keep(_: Tensor) -> Tensor:
        f = torch.linspace(0, fs / 2, k, dtype=torch.float64)
        return (f >= low) & (f < high)

    def cycles_keep(_: Tensor) -> Tensor:
        f = torch.fft.rfftfreq(n, dtype=torch.float64)
        return (f >= low) & (f < high)

    out = [
        (
            "the band is closed, low <= f <= high: a bin exactly at `high` was kept. The bands are "
            "half-open, low <= f < high, so that adjacent bands (4-8, 8-14 Hz) share no bin.",
            lambda: _masked(x, fs, lambda f: (f >= low) & (f <= high)),
        ),
        (
            "the band is open at the bottom, low < f < high: a bin exactly at `low` was dropped. The bands "
            "are half-open, low <= f < high.",
            lambda: _masked(x, fs, lambda f: (f > low) & (f < high)),
        ),
        (
            "the band was removed instead of kept (a band-stop filter): keep the bins with low <= f < high "
            "and zero the others.",
            lambda: _masked(x, fs, lambda f: ~((f >= low) & (f < high))),
        ),
        (
            "the bin frequencies are in cycles per sample (torch.fft.rfftfreq(T) without d=1/fs); in Hz bin k "
            "is at k * fs / T, which is rfftfreq(T, d=1/fs).",
            lambda: _masked(x, fs, cycles_keep),
        ),
        (
            "the frequency axis was built as linspace(0, fs/2, T//2 + 1), which is right for an even T only; "
            "for an odd T the last bin is at (T-1)/2 * fs/T, below fs/2. Use torch.fft.rfftfreq(T, d=1/fs).",
            lambda: _masked(x, fs, linspace_keep) if n % 2 else None,
        ),
        (
            "only the positive frequencies of a two-sided fft were kept: the real part of the inverse is "
            "then half the band's signal. Mask by |f| (abs of torch.fft.fftfreq), or use rfft and irfft.",
            lambda: _masked(x, fs, lambda f: (f >= low) & (f < high), two_sided=True),
        ),
    ]
    if x.dim() >= 2:
        out.append(
            (
                "the spectrum was taken along dim 0 instead of the last dim (time).",
                lambda: ref_band_filter(x.double().movedim(0, -1), fs, low, high).movedim(-1, 0),
            )
        )
    return out


def _band_filter_cases(t: Tester) -> list[tuple[str, tuple]]:
    f32 = torch.float32
    return [
        # fs / T a power of two: bins land exactly on 8 and 14 Hz, so the edges are tested.
        ("x (40, 256) float64, fs=128, band [8, 14) with bins exactly at 8 and 14 Hz", (t.randn(40, 256), 128, 8.0, 14.0)),
        ("x (2, 3, 255) float64, odd T, fs=100, band [4.7, 21.2)", (t.randn(2, 3, 255), 100, 4.7, 21.2)),
        ("x (4, 128) float32, fs=64, band [4, 8) (edges on bins)", (t.randn(4, 128, dtype=f32), 64, 4.0, 8.0)),
        ("x (200,) float64, one signal, fs=100, band [0, 30) keeps the mean (f = 0)", (t.randn(200, scale=2.0) + 1.5, 100, 0.0, 30.0)),
        ("x (2, 100) float64, fs=100, band [30, 1000) up to and including the Nyquist bin 50 Hz", (t.randn(2, 100), 100, 30.0, 1000.0)),
        ("x (2, 5, 64) float32, fs=32, band [1.5, 16.0) (16 Hz is the Nyquist bin, excluded)", (t.randn(2, 5, 64, dtype=f32), 32, 1.5, 16.0)),
        ("x (3, 4, 333) float64, odd T, fs=128, band [13.1, 31.7)", (t.randn(3, 4, 333), 128, 13.1, 31.7)),
    ]  # fmt: skip


@exercise(
    "band_filter",
    chapter=CHAPTER,
    signature="(x (..., T), fs, low, high) -> (..., T)",
    summary="ideal band-pass along the last dim: zero every rfft bin outside low <= f < high (f = k fs / T Hz)",
    reference=ref_band_filter,
)
def check_band_filter(t: Tester) -> None:
    """Edges on bins (half-open band), odd T, 1-D and 3-D inputs, DC and Nyquist bins, float32."""
    for case, (x, fs, low, high) in _band_filter_cases(t):
        n, k = x.shape[-1], x.shape[-1] // 2 + 1
        got = t.call(case, x, fs, low, high)
        if torch.is_tensor(got) and got.is_complex():
            t.fail(
                case,
                f"the output should be a real tensor of dtype {str(x.dtype).replace('torch.', '')}, "
                f"but it is {str(got.dtype).replace('torch.', '')}: transform back with "
                "torch.fft.irfft(..., n=T) (or take .real of a two-sided ifft).",
            )
        _expect_shape(
            t,
            case,
            "output",
            got,
            tuple(x.shape),
            [
                (
                    x.shape[:-1] + (n - 1,) if n % 2 else None,
                    "irfft was called without n=T: for an odd T it returns 2 * (T//2) = T - 1 samples. "
                    "Pass n=x.shape[-1].",
                ),
                (
                    x.shape[:-1] + (k,),
                    "the (masked) spectrum was returned; transform it back with irfft(..., n=T).",
                ),
            ],
        )
        expected = ref_band_filter(x.double(), fs, low, high)
        t.compare(
            case,
            "output",
            got,
            expected.to(x.dtype),
            mistakes=_band_filter_mistakes(x, fs, low, high),
        )


# ---- differential_entropy ----------------------------------------------------------------------
def _de(
    var: Tensor, log: Callable[[Tensor], Tensor] = torch.log, const: float = 2 * math.pi * math.e
) -> Tensor:
    return 0.5 * log(const * var)


def _de_mistakes(x: Tensor) -> list:
    x = x.double()
    n = x.shape[-1]
    centred = x - x.mean(-1, keepdim=True)
    var = (centred**2).mean(-1)
    two_pi_e = 2 * math.pi * math.e
    return [
        (
            "you used the unbiased variance (divided by T - 1, torch.var's default); the chapter's "
            "differential entropy uses the biased variance, the mean of (x - mean)^2 over T samples "
            "(torch.var(..., correction=0)), the maximum-likelihood estimate of sigma^2.",
            lambda: _de(var * n / (n - 1)) if n > 1 else None,
        ),
        (
            "the mean was not subtracted: mean(x^2) is the variance only for a zero-mean signal. Use "
            "mean((x - mean(x))^2).",
            lambda: _de((x**2).mean(-1)),
        ),
        (
            "the standard deviation went into the log instead of the variance: 0.5 log(2 pi e sigma). The "
            "formula is 0.5 log(2 pi e sigma^2), which is log(sigma) + 0.5 log(2 pi e).",
            lambda: _de(var.sqrt()),
        ),
        (
            "the factor 1/2 is missing: h = 0.5 log(2 pi e sigma^2), not log(2 pi e sigma^2).",
            lambda: torch.log(two_pi_e * var),
        ),
        (
            "the 1/2 was applied to the constant only, 0.5 log(2 pi e) + log(sigma^2); it multiplies the "
            "whole log: 0.5 log(2 pi e) + 0.5 log(sigma^2).",
            lambda: 0.5 * math.log(two_pi_e) + torch.log(var),
        ),
        (
            "the entropy is in bits (log2); the chapter measures it in nats, with the natural log.",
            lambda: _de(var, torch.log2),
        ),
        (
            "the log is log10; the chapter measures entropy in nats, with the natural log.",
            lambda: _de(var, torch.log10),
        ),
        (
            "the constant 2 pi e is missing: 0.5 log(sigma^2) is the differential entropy minus "
            "0.5 log(2 pi e) = 1.4189.",
            lambda: _de(var, const=1.0),
        ),
        (
            "the e is missing, 0.5 log(2 pi sigma^2): the e comes from E[(x - mu)^2] / (2 sigma^2) = 1/2, "
            "the second term of -E[log p(x)].",
            lambda: _de(var, const=2 * math.pi),
        ),
        (
            "the e is in the wrong place, 0.5 log(2 pi sigma^2) + e; -E[log p(x)] = 0.5 log(2 pi sigma^2) + "
            "1/2 = 0.5 log(2 pi e sigma^2).",
            lambda: _de(var, const=2 * math.pi) + math.e,
        ),
    ]


def _signals(
    t: Tester, *shape: int, dtype: torch.dtype = torch.float64, log_scale: float = 2.0
) -> Tensor:
    """Signals with their own offset and scale: offsets in [-3, 3), scales exp(U[-log_scale, log_scale))."""
    lead = shape[:-1]
    offset = (t.rand(*lead, 1) * 6 - 3) if lead else t.rand(1) * 6 - 3
    scale = (
        torch.exp((t.rand(*lead, 1) * 2 - 1) * log_scale) if lead else torch.exp(t.rand(1) - 0.5)
    )
    return (offset + scale * t.randn(*shape)).to(dtype)


@exercise(
    "differential_entropy",
    chapter=CHAPTER,
    signature="(x (..., T)) -> (...)",
    summary="0.5 log(2 pi e var) of each signal over its last dim, var the biased (1/T) variance about its own mean",
    reference=ref_differential_entropy,
)
def check_differential_entropy(t: Tester) -> None:
    """Offsets and scales per signal, short signals (T = 8), one signal (0-d), float32, tiny variances."""
    cases = [
        ("x (4, 6, 200) float64, each signal with its own offset and scale", _signals(t, 4, 6, 200)),
        ("x (5, 8) float64, short signals (T = 8)", _signals(t, 5, 8)),
        ("x (300,) float64, one signal: the answer is 0-d", _signals(t, 300)),
        ("x (3, 2, 64) float32", _signals(t, 3, 2, 64, dtype=torch.float32)),
        ("x (2, 3, 50) float64, standard deviations about 1e-3 (negative entropies)", 1e-3 * _signals(t, 2, 3, 50, log_scale=0.5)),
        ("x (7, 3) float64, T = 3 samples", _signals(t, 7, 3)),
    ]  # fmt: skip
    for case, x in cases:
        got = t.call(case, x)
        lead = tuple(x.shape[:-1])
        _expect_shape(
            t,
            case,
            "output",
            got,
            lead,
            [
                (
                    lead + (1,),
                    "keepdim=True was left on: return one number per signal, shape x.shape[:-1].",
                ),
                (
                    tuple(x.shape[1:]) if x.dim() > 1 else None,
                    "the statistics were taken over dim 0; each signal runs along the last dim (time).",
                ),
                (
                    tuple(x.shape),
                    "nothing was reduced: the entropy is one number per signal, over its T samples.",
                ),
            ],
        )
        expected = ref_differential_entropy(x.double()).to(x.dtype)
        t.compare(case, "output", got, expected, mistakes=_de_mistakes(x))


# ---- electrode_grid ----------------------------------------------------------------------------
def _place(features: Tensor, rows: Tensor, cols: Tensor, height: int, width: int) -> Tensor | None:
    """features (N, E, F) written at (rows, cols) of a zero (N, F, height, width) grid, float64; None if off it."""
    if ((rows < -height) | (rows >= height) | (cols < -width) | (cols >= width)).any():
        return None
    n, _, f = features.shape
    out = torch.zeros(n, f, height, width, dtype=torch.float64)
    out[:, :, rows, cols] = features.double().transpose(1, 2)
    return out


def _grid_mistakes(features: Tensor, coords: Tensor, height: int, width: int) -> list:
    rows, cols = coords[:, 0], coords[:, 1]
    n, e, f = features.shape
    return [
        (
            "rows and columns are swapped (a transposed map): coords[e] is (row, col), and the row "
            "indexes the height axis, out[n, f, row, col].",
            lambda: _place(features, cols, rows, height, width),
        ),
        (
            "the coordinates were treated as 1-based (every electrode moved up and left by one cell); "
            "they are 0-based: row 0 is the top row of the grid.",
            lambda: _place(features, rows - 1, cols - 1, height, width),
        ),
        (
            "the features were reshaped from (N, E, F) to (N, F, E) with view/reshape, which keeps the "
            "memory order and mixes electrodes with features; swap the axes with transpose(1, 2) or permute.",
            lambda: (
                _place(features.reshape(n, f, e).transpose(1, 2), rows, cols, height, width)
                if e > 1 and f > 1
                else None
            ),
        ),
    ]


def _random_cells(t: Tester, e: int, height: int, width: int) -> Tensor:
    """e distinct cells of a height x width grid, in random order, as (e, 2) int64 (row, col)."""
    cells = torch.randperm(height * width, generator=t.gen)[:e]
    return torch.stack([cells // width, cells % width], 1)


def _grid_cases(t: Tester) -> list[tuple[str, tuple, dict, tuple[int, int]]]:
    deap = electrode_coords(DEAP_ELECTRODES)
    f32 = torch.float32
    return [
        ("DEAP's 32 electrodes on the 9 x 9 grid, features (3, 32, 4) float64, default height and width", (t.randn(3, 32, 4), deap), {}, (9, 9)),
        ("a 5 x 7 grid (height 5, width 7), 6 electrodes, features (2, 6, 3) float32", (t.randn(2, 6, 3, dtype=f32), _random_cells(t, 6, 5, 7)), {"height": 5, "width": 7}, (5, 7)),
        ("a 6 x 6 grid, 10 electrodes in random cells, features (4, 10, 2) float64", (t.randn(4, 10, 2), _random_cells(t, 10, 6, 6)), {"height": 6, "width": 6}, (6, 6)),
        ("one example, one feature: features (1, 32, 1) float64 on DEAP's 9 x 9 grid", (t.randn(1, 32, 1), deap), {"height": 9, "width": 9}, (9, 9)),
        ("a 4 x 3 grid, every cell an electrode, features (2, 12, 5) float64", (t.randn(2, 12, 5), _random_cells(t, 12, 4, 3)), {"height": 4, "width": 3}, (4, 3)),
    ]  # fmt: skip


def _fill_message(got: Tensor, features: Tensor, empty: Tensor) -> str:
    """What the cells without an electrode hold, in words (they should hold 0)."""
    vals = got.detach().double()[:, :, empty]  # (N, F, cells)
    if torch.isnan(vals).any():
        return "NaN"
    first = vals.reshape(-1)[vals.reshape(-1) != 0][0].item()
    means = features.double().mean(1)  # (N, F): the mean over electrodes
    if torch.allclose(vals, means[:, :, None].expand_as(vals), rtol=1e-4, atol=1e-6):
        return "each map's mean over the electrodes"
    return f"values such as {first:.4g}"


@exercise(
    "electrode_grid",
    chapter=CHAPTER,
    signature="(features (N,E,F), coords (E,2) int64, height=9, width=9) -> (N,F,height,width)",
    summary="out[n, f, row_e, col_e] = features[n, e, f] with (row_e, col_e) = coords[e]; 0 at cells without an electrode",
    reference=ref_electrode_grid,
)
def check_electrode_grid(t: Tester) -> None:
    """DEAP's map with the default size, non-square grids, random cell orders, a full grid, float32."""
    for case, (features, coords), kw, (height, width) in _grid_cases(t):
        n, e, f = features.shape
        got = t.call(case, features, coords, **kw)
        _expect_shape(
            t,
            case,
            "output",
            got,
            (n, f, height, width),
            [
                (
                    (n, height, width, f),
                    "the feature axis was left last, (N, H, W, F); the network wants it as the channel "
                    "axis, (N, F, H, W), like an image's colours.",
                ),
                (
                    (n, f, width, height) if height != width else None,
                    "height and width are swapped: the grid is (height, width) = (rows, columns).",
                ),
                ((f, height, width), "the batch axis N is missing; keep one map per example."),
            ],
        )
        expected = ref_electrode_grid(features.double(), coords, height, width).to(features.dtype)
        got = t.expect_tensor(case, "output", got, shape=expected.shape, dtype=features.dtype)
        empty = torch.ones(height, width, dtype=torch.bool)
        empty[coords[:, 0], coords[:, 1]] = False
        try:
            t.compare(
                case,
                "output",
                got,
                expected,
                mistakes=_grid_mistakes(features, coords, height, width),
            )
        except CheckFailure as failure:
            filled = torch.isnan(got[:, :, empty]).any() or (got[:, :, empty] != 0).any()
            if "It looks like" in str(failure) or not (empty.any() and filled):
                raise
            t.fail(
                case,
                "the cells without an electrode should hold 0, but they hold "
                f"{_fill_message(got, features, empty)}. Start from torch.zeros(N, F, height, width).",
            )
