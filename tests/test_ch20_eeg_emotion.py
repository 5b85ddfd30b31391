"""Chapter 20 batteries: correct implementations in several styles pass, planted mistakes are named.

Each exercise gets (a) correct implementations in other styles (numpy, scipy, a two-sided fft, an
explicit DFT matrix, Python loops, torch.distributions, scatter and one-hot placements), each
checked across 20 seeds, and (b) the mistakes learners make, each rejected with the sentence that
names it. The chapter's own helpers (the layout, the reference grid, the data generator) raise a
one-line ValueError on malformed input.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
import scipy.fft
import torch
from check_times import report_check_seconds
from hypothesis import given, settings
from hypothesis import strategies as st

import course_utils as cu
from course_utils.checks import ch20_eeg_emotion as ch20

SEEDS = range(20)
MISTAKE_SEEDS = (0, 1, 7)
TWO_PI_E = 2 * math.pi * math.e


# =====================================================================================
# Correct implementations, one style each
# =====================================================================================


# ---- band_filter -----------------------------------------------------------------------------
def band_numpy(x, fs, low, high):
    """numpy's rfft, mask from np.fft.rfftfreq."""
    a = x.numpy()
    f = np.fft.rfftfreq(a.shape[-1], d=1.0 / fs)
    y = np.fft.irfft(np.fft.rfft(a, axis=-1) * ((f >= low) & (f < high)), n=a.shape[-1], axis=-1)
    return torch.from_numpy(y.astype(a.dtype))


def band_two_sided(x, fs, low, high):
    """A two-sided fft, both signs of each frequency kept by masking |f|, real part of the ifft."""
    f = torch.fft.fftfreq(x.shape[-1], d=1.0 / fs).abs()
    return torch.fft.ifft(torch.fft.fft(x) * ((f >= low) & (f < high))).real


def band_dft_matrix(x, fs, low, high):
    """An explicit real DFT with cos/sin matrices in float64, bin frequencies k * fs / T by hand."""
    n = x.shape[-1]
    t = torch.arange(n, dtype=torch.float64)
    kept = [k for k in range(n // 2 + 1) if low <= k * fs / n < high]
    y = torch.zeros(x.shape, dtype=torch.float64)
    xd = x.double()
    for k in kept:
        c, s = torch.cos(2 * math.pi * k * t / n), torch.sin(2 * math.pi * k * t / n)
        weight = 1.0 if k == 0 or 2 * k == n else 2.0  # no mirror image at 0 and at Nyquist
        y += weight / n * ((xd @ c)[..., None] * c + (xd @ s)[..., None] * s)
    return y.to(x.dtype)


def band_scipy_float32_freqs(x, fs, low, high):
    """scipy.fft, frequencies built as arange(K) * fs / T in float32."""
    n = x.shape[-1]
    f = torch.arange(n // 2 + 1, dtype=torch.float32) * fs / n
    keep = ((f >= low) & (f < high)).numpy()
    y = scipy.fft.irfft(scipy.fft.rfft(x.numpy(), axis=-1) * keep, n=n, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(y)).to(x.dtype)


# ---- differential_entropy --------------------------------------------------------------------
def de_var(x):
    """torch.var with correction=0."""
    return 0.5 * torch.log(TWO_PI_E * x.var(-1, correction=0))


def de_numpy_log_std(x):
    """numpy, log(sigma) + 0.5 log(2 pi e)."""
    a = x.numpy()
    return torch.from_numpy(np.asarray(np.log(a.std(-1)) + 0.5 * np.log(TWO_PI_E), dtype=a.dtype))


def de_loops(x):
    """Python floats, one signal at a time."""
    flat = x.reshape(-1, x.shape[-1]).tolist()
    out = []
    for sig in flat:
        m = sum(sig) / len(sig)
        var = sum((v - m) ** 2 for v in sig) / len(sig)
        out.append(0.5 * math.log(2 * math.pi * math.e * var))
    return torch.tensor(out, dtype=x.dtype).reshape(x.shape[:-1])


def de_distribution(x):
    """torch.distributions.Normal's entropy at the biased standard deviation."""
    std = x.std(-1, correction=0)
    return torch.distributions.Normal(torch.zeros_like(std), std).entropy()


# ---- electrode_grid --------------------------------------------------------------------------
def grid_loops(features, coords, height=9, width=9):
    """A loop over electrodes."""
    n, e, f = features.shape
    out = torch.zeros(n, f, height, width, dtype=features.dtype)
    for i in range(e):
        r, c = coords[i].tolist()
        out[:, :, r, c] = features[:, i, :]
    return out


def grid_numpy(features, coords, height=9, width=9):
    """numpy fancy indexing with the feature axis moved first."""
    a = features.numpy()
    out = np.zeros((a.shape[0], a.shape[2], height, width), dtype=a.dtype)
    rows, cols = coords[:, 0].numpy(), coords[:, 1].numpy()
    out[:, :, rows, cols] = np.moveaxis(a, 1, 2)
    return torch.from_numpy(out)


def grid_scatter(features, coords, height=9, width=9):
    """scatter_ into the flattened grid at row * width + col."""
    n, e, f = features.shape
    flat_index = (coords[:, 0] * width + coords[:, 1]).expand(n, f, e)
    flat = torch.zeros(n, f, height * width, dtype=features.dtype)
    flat.scatter_(2, flat_index, features.permute(0, 2, 1))
    return flat.view(n, f, height, width)


def grid_one_hot(features, coords, height=9, width=9):
    """A placement matrix (E, H*W) of one-hot rows, applied with einsum."""
    place = torch.nn.functional.one_hot(coords[:, 0] * width + coords[:, 1], height * width)
    out = torch.einsum("nef,ec->nfc", features, place.to(features.dtype))
    return out.reshape(features.shape[0], features.shape[2], height, width)


CORRECT = {
    "band_filter": [band_numpy, band_two_sided, band_dft_matrix, band_scipy_float32_freqs],
    "differential_entropy": [de_var, de_numpy_log_std, de_loops, de_distribution],
    "electrode_grid": [grid_loops, grid_numpy, grid_scatter, grid_one_hot],
}
CORRECT_CASES = [(ex, fn) for ex, fns in CORRECT.items() for fn in fns]
SLOWEST = {
    "band_filter": band_dft_matrix,
    "differential_entropy": de_loops,
    "electrode_grid": grid_loops,
}


@pytest.mark.parametrize(
    ("exercise_id", "fn"), CORRECT_CASES, ids=[f.__name__ for _, f in CORRECT_CASES]
)
def test_correct_implementation_passes_on_every_seed(exercise_id, fn):
    for seed in SEEDS:
        report = cu.check(exercise_id, fn, seed=seed, strict=True)
        assert report.passed, (seed, report)
        assert report.rows


@pytest.mark.parametrize("exercise_id", list(CORRECT))
def test_reference_passes_its_own_battery(exercise_id):
    for seed in SEEDS:
        assert cu.check(exercise_id, cu.reference(exercise_id), seed=seed, strict=True).passed


@pytest.mark.references_forbidden
@pytest.mark.parametrize("exercise_id", list(CORRECT))
def test_handing_in_the_reference_fails(exercise_id):
    with pytest.raises(cu.CheckFailure, match="this is the course's own reference"):
        cu.check(exercise_id, cu.reference(exercise_id), strict=True)


def test_contract_signatures():
    listed = {e.id: e for e in cu.exercises("20")}
    assert set(listed) == set(CORRECT)
    assert listed["band_filter"].signature == "(x (..., T), fs, low, high) -> (..., T)"
    assert listed["differential_entropy"].signature == "(x (..., T)) -> (...)"
    assert listed["electrode_grid"].signature == (
        "(features (N,E,F), coords (E,2) int64, height=9, width=9) -> (N,F,height,width)"
    )
    assert all(not e.forbidden and not e.backward for e in listed.values())


def test_report_check_seconds(capsys):
    """Times each check on the reference and the slowest correct style; reported, never asserted."""
    report_check_seconds(SLOWEST, capsys)


# =====================================================================================
# Planted mistakes, each named
# =====================================================================================
def _masked(x, fs, keep, n=None):
    f = torch.fft.rfftfreq(x.shape[-1], d=1.0 / fs)
    return torch.fft.irfft(torch.fft.rfft(x) * keep(f), n=n)


def band_closed(x, fs, low, high):
    return _masked(x, fs, lambda f: (f >= low) & (f <= high), n=x.shape[-1])


def band_open_low(x, fs, low, high):
    return _masked(x, fs, lambda f: (f > low) & (f < high), n=x.shape[-1])


def band_stop(x, fs, low, high):
    return _masked(x, fs, lambda f: (f < low) | (f >= high), n=x.shape[-1])


def band_no_fs(x, fs, low, high):
    f = torch.fft.rfftfreq(x.shape[-1])
    return torch.fft.irfft(torch.fft.rfft(x) * ((f >= low) & (f < high)), n=x.shape[-1])


def band_linspace(x, fs, low, high):
    n = x.shape[-1]
    f = torch.linspace(0, fs / 2, n // 2 + 1)
    return torch.fft.irfft(torch.fft.rfft(x) * ((f >= low) & (f < high)), n=n)


def band_positive_only(x, fs, low, high):
    f = torch.fft.fftfreq(x.shape[-1], d=1.0 / fs)
    return torch.fft.ifft(torch.fft.fft(x) * ((f >= low) & (f < high))).real


def band_dim0(x, fs, low, high):
    f = torch.fft.rfftfreq(x.shape[0], d=1.0 / fs)
    keep = ((f >= low) & (f < high)).reshape(-1, *([1] * (x.dim() - 1)))
    return torch.fft.irfft(torch.fft.rfft(x, dim=0) * keep, n=x.shape[0], dim=0)


def band_no_n(x, fs, low, high):
    return _masked(x, fs, lambda f: (f >= low) & (f < high))


def band_spectrum(x, fs, low, high):
    f = torch.fft.rfftfreq(x.shape[-1], d=1.0 / fs)
    return (torch.fft.rfft(x) * ((f >= low) & (f < high))).abs()


def band_complex(x, fs, low, high):
    f = torch.fft.fftfreq(x.shape[-1], d=1.0 / fs).abs()
    return torch.fft.ifft(torch.fft.fft(x) * ((f >= low) & (f < high)))


def band_always_float64(x, fs, low, high):
    return ch20.ref_band_filter(x.double(), fs, low, high)


def band_in_place(x, fs, low, high):
    x -= x.mean(-1, keepdim=True)  # changes the caller's tensor
    return ch20.ref_band_filter(x, fs, low, high)


BAND_MISTAKES = [
    (band_closed, r"the band is closed, low <= f <= high"),
    (band_open_low, r"open at the bottom, low < f < high"),
    (band_stop, r"removed instead of kept \(a band-stop filter\)"),
    (band_no_fs, r"cycles per sample \(torch.fft.rfftfreq\(T\) without d=1/fs\)"),
    (band_linspace, r"linspace\(0, fs/2, T//2 \+ 1\), which is right for an even T only"),
    (band_positive_only, r"only the positive frequencies of a two-sided fft"),
    (band_dim0, r"taken along dim 0 instead of the last dim"),
    (band_no_n, r"irfft was called without n=T: for an odd T it returns 2 \* \(T//2\) = T - 1"),
    (band_spectrum, r"the \(masked\) spectrum was returned"),
    (band_complex, r"should be a real tensor .* it is complex128.*irfft"),
    (band_always_float64, r"should have dtype float32 \(the dtype of the inputs\)"),
    (band_in_place, r"changed its input `x` in place"),
]


def de_unbiased(x):
    return 0.5 * torch.log(TWO_PI_E * x.var(-1))


def de_mean_square(x):
    return 0.5 * torch.log(TWO_PI_E * (x**2).mean(-1))


def de_log_sigma(x):
    return 0.5 * torch.log(TWO_PI_E * x.std(-1, correction=0))


def de_no_half(x):
    return torch.log(TWO_PI_E * x.var(-1, correction=0))


def de_half_on_constant(x):
    return 0.5 * math.log(TWO_PI_E) + torch.log(x.var(-1, correction=0))


def de_log2(x):
    return 0.5 * torch.log2(TWO_PI_E * x.var(-1, correction=0))


def de_log10(x):
    return 0.5 * torch.log10(TWO_PI_E * x.var(-1, correction=0))


def de_no_constant(x):
    return 0.5 * torch.log(x.var(-1, correction=0))


def de_no_e(x):
    return 0.5 * torch.log(2 * math.pi * x.var(-1, correction=0))


def de_e_outside(x):
    return 0.5 * torch.log(2 * math.pi * x.var(-1, correction=0)) + math.e


def de_keepdim(x):
    return 0.5 * torch.log(TWO_PI_E * x.var(-1, correction=0, keepdim=True))


def de_dim0(x):
    return 0.5 * torch.log(TWO_PI_E * x.var(0, correction=0))


def de_no_reduction(x):
    return 0.5 * torch.log(TWO_PI_E * (x - x.mean(-1, keepdim=True)) ** 2)


DE_MISTAKES = [
    (de_unbiased, r"you used the unbiased variance \(divided by T - 1, torch.var's default\)"),
    (de_mean_square, r"the mean was not subtracted: mean\(x\^2\)"),
    (de_log_sigma, r"the standard deviation went into the log instead of the variance"),
    (de_no_half, r"the factor 1/2 is missing"),
    (de_half_on_constant, r"the 1/2 was applied to the constant only"),
    (de_log2, r"the entropy is in bits \(log2\)"),
    (de_log10, r"the log is log10"),
    (de_no_constant, r"the constant 2 pi e is missing"),
    (de_no_e, r"the e is missing, 0.5 log\(2 pi sigma\^2\)"),
    (de_e_outside, r"the e is in the wrong place"),
    (de_keepdim, r"keepdim=True was left on"),
    (de_dim0, r"the statistics were taken over dim 0"),
    (de_no_reduction, r"nothing was reduced"),
]


def grid_transposed(features, coords, height=9, width=9):
    return grid_loops(features, coords.flip(1), max(height, width), max(height, width))[
        ..., :height, :width
    ]


def grid_one_based(features, coords, height=9, width=9):
    return grid_loops(features, coords - 1, height, width)


def grid_reshaped(features, coords, height=9, width=9):
    n, e, f = features.shape
    out = torch.zeros(n, f, height, width, dtype=features.dtype)
    out[:, :, coords[:, 0], coords[:, 1]] = features.reshape(n, f, e)
    return out


def grid_features_last(features, coords, height=9, width=9):
    return grid_loops(features, coords, height, width).permute(0, 2, 3, 1)


def grid_width_height(features, coords, height=9, width=9):
    """Cells by flat index row * width + col, then viewed as (width, height): right when square."""
    n, _, f = features.shape
    flat = torch.zeros(n, f, height * width, dtype=features.dtype)
    flat[:, :, coords[:, 0] * width + coords[:, 1]] = features.transpose(1, 2)
    return flat.view(n, f, width, height)


def grid_no_batch(features, coords, height=9, width=9):
    return grid_loops(features, coords, height, width)[0]


def grid_nan_fill(features, coords, height=9, width=9):
    out = torch.full(
        (features.shape[0], features.shape[2], height, width), float("nan"), dtype=features.dtype
    )
    out[:, :, coords[:, 0], coords[:, 1]] = features.transpose(1, 2)
    return out


def grid_mean_fill(features, coords, height=9, width=9):
    mean = features.mean(1)[:, :, None, None]  # (N, F, 1, 1)
    out = mean.expand(-1, -1, height, width).clone()
    out[:, :, coords[:, 0], coords[:, 1]] = features.transpose(1, 2)
    return out


def grid_minus_one_fill(features, coords, height=9, width=9):
    out = torch.full((features.shape[0], features.shape[2], height, width), -1.0).to(features)
    out[:, :, coords[:, 0], coords[:, 1]] = features.transpose(1, 2)
    return out


def grid_float64(features, coords, height=9, width=9):
    return grid_loops(features.double(), coords, height, width)


GRID_MISTAKES = [
    (grid_transposed, r"rows and columns are swapped \(a transposed map\)"),
    (grid_one_based, r"treated as 1-based"),
    (grid_reshaped, r"reshaped from \(N, E, F\) to \(N, F, E\) with view/reshape"),
    (grid_features_last, r"the feature axis was left last, \(N, H, W, F\)"),
    (grid_width_height, r"height and width are swapped"),
    (grid_no_batch, r"the batch axis N is missing"),
    (grid_nan_fill, r"cells without an electrode should hold 0, but they hold NaN"),
    (grid_mean_fill, r"hold each map's mean over the electrodes"),
    (grid_minus_one_fill, r"hold values such as -1\b"),
    (grid_float64, r"should have dtype float32"),
]


MISTAKES = [
    *(("band_filter", fn, pattern) for fn, pattern in BAND_MISTAKES),
    *(("differential_entropy", fn, pattern) for fn, pattern in DE_MISTAKES),
    *(("electrode_grid", fn, pattern) for fn, pattern in GRID_MISTAKES),
]


@pytest.mark.parametrize(
    ("exercise_id", "fn", "pattern"), MISTAKES, ids=[fn.__name__ for _, fn, _ in MISTAKES]
)
def test_mistake_is_named(exercise_id, fn, pattern):
    for seed in MISTAKE_SEEDS:
        with pytest.raises(cu.CheckFailure, match=pattern):
            cu.check(exercise_id, fn, seed=seed, strict=True)


def test_a_failure_names_the_case_and_the_error():
    with pytest.raises(cu.CheckFailure) as info:
        cu.check("differential_entropy", de_unbiased, strict=True)
    text = str(info.value)
    assert text.startswith("differential_entropy: in case x (4, 6, 200) float64")
    assert re.search(r"`output` is wrong: max relative error \S+ at index", text)


def test_a_function_that_raises_is_reported_in_one_sentence():
    def broken(features, coords, height=9, width=9):
        raise IndexError("index 9 is out of bounds")

    with pytest.raises(cu.CheckFailure, match=r"raised IndexError: index 9 is out of bounds"):
        cu.check("electrode_grid", broken, strict=True)


def test_pending_in_learn_mode_and_failing_in_strict_mode(capsys):
    def stub(x):
        raise NotImplementedError("differential_entropy: replace this line")

    assert cu.check("differential_entropy", stub, strict=False).status == "pending"
    with pytest.raises(cu.CheckFailure):
        cu.check("differential_entropy", stub, strict=True)


# =====================================================================================
# The batteries' own cases and references
# =====================================================================================
def test_band_edges_are_on_bins_exactly_or_far_from_them():
    """A bin near an edge would make the verdict depend on how the learner rounds k * fs / T."""
    t = ch20.Tester(cu.checking.get_exercise("band_filter"), None, 0)
    for case, (x, fs, low, high) in ch20._band_filter_cases(t):
        n = x.shape[-1]
        for edge in (low, high):
            exact = [k for k in range(n // 2 + 1) if k * fs == edge * n]
            gap = min(abs(k * fs / n - edge) for k in range(n // 2 + 1))
            assert exact or gap > 1e-3, (case, edge, gap)
            if exact:  # on a bin: every way of computing k * fs / T must give the edge exactly
                k = exact[0]
                assert float(torch.fft.rfftfreq(n, d=1.0 / fs)[k]) == edge
                assert float(np.float32(k) * np.float32(fs) / np.float32(n)) == edge


def test_each_edge_mistake_is_reachable_by_a_case():
    """The closed and the open-at-the-bottom bands differ from the half-open one on some case."""
    t = ch20.Tester(cu.checking.get_exercise("band_filter"), None, 0)
    cases = ch20._band_filter_cases(t)
    for fn in (band_closed, band_open_low, band_linspace):
        assert any(
            not torch.allclose(fn(x, fs, lo, hi), ch20.ref_band_filter(x, fs, lo, hi), atol=1e-5)
            for _, (x, fs, lo, hi) in cases
        ), fn.__name__


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(16, 300),
    fs=st.sampled_from([64, 100, 128, 250]),
    cuts=st.lists(st.floats(0.5, 120.0), min_size=1, max_size=4, unique=True),
)
def test_reference_bands_partition_the_spectrum(n, fs, cuts):
    """Half-open bands that cover [0, inf) add up to the signal: no bin is lost or counted twice."""
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    edges = [0.0, *sorted(cuts), math.inf]
    pieces = [ch20.ref_band_filter(x, fs, lo, hi) for lo, hi in zip(edges, edges[1:], strict=False)]
    assert torch.allclose(sum(pieces), x, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(gain=st.floats(1e-3, 1e3), offset=st.floats(-50, 50), n=st.integers(2, 400))
def test_reference_entropy_shifts_by_log_gain_and_ignores_the_mean(gain, offset, n):
    x = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    h = ch20.ref_differential_entropy(x)
    assert torch.allclose(ch20.ref_differential_entropy(gain * x + offset), h + math.log(gain))


def test_reference_entropy_of_gaussian_samples_matches_the_formula():
    gen = torch.Generator().manual_seed(0)
    x = 3.0 * torch.randn(4, 200_000, dtype=torch.float64, generator=gen)
    want = torch.full((4,), 0.5 * math.log(TWO_PI_E * 9), dtype=torch.float64)
    assert torch.allclose(ch20.ref_differential_entropy(x), want, atol=5e-3)


# =====================================================================================
# The chapter's layout and helpers: data, and one-line errors on malformed input
# =====================================================================================
def test_the_layout_holds_deaps_32_electrodes_mirrored_left_and_right():
    coords = ch20.electrode_coords(ch20.DEAP_ELECTRODES)
    assert coords.shape == (32, 2) and coords.dtype == torch.int64
    assert len({tuple(c) for c in coords.tolist()}) == 32
    where = dict(zip(ch20.DEAP_ELECTRODES, coords.tolist(), strict=True))
    for name, (r, c) in where.items():
        number = re.sub(r"\D", "", name)
        if not number:
            assert c == 4, f"{name} is a midline electrode"
            continue
        mirror = re.sub(r"\d+", str(int(number) + (1 if int(number) % 2 else -1)), name)
        assert where[mirror] == [r, 8 - c], (name, mirror)
        assert (c < 4) == (int(number) % 2 == 1), f"{name}: odd numbers are on the left"
    assert where["Fp1"][0] == 0 and where["Oz"][0] == 8  # front at the top


@pytest.mark.parametrize(
    ("names", "layout", "pattern"),
    [
        (["Fp1", "Fpz"], ch20.DEAP_LAYOUT, r"electrode 'Fpz' is not on the layout"),
        (["Fp1", "Fp1"], ch20.DEAP_LAYOUT, r"electrode 'Fp1' is listed twice"),
        (
            ["A"],
            ("A - -", "- A -"),
            r"electrode 'A' is placed twice on the layout, at \(0, 0\) and \(1, 1\)",
        ),
        (
            ["A"],
            ("A - -", "- -"),
            r"rows should all have the same number of cells, but they have \[3, 2\]",
        ),
    ],
)
def test_electrode_coords_rejects_bad_input_in_one_line(names, layout, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        ch20.electrode_coords(names, layout)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("features", "coords", "pattern"),
    [
        (torch.zeros(2, 3, 4), torch.tensor([[0, 0], [1, 9], [2, 2]]), r"electrode 1 sits at \(1, 9\), outside the 9 x 9 grid"),
        (torch.zeros(2, 3, 4), torch.tensor([[0, 0], [-1, 2], [2, 2]]), r"electrode 1 sits at \(-1, 2\), outside"),
        (torch.zeros(2, 3, 4), torch.tensor([[0, 0], [4, 4], [4, 4]]), r"electrodes \[1, 2\] share the cell \(4, 4\)"),
        (torch.zeros(2, 3, 4), torch.tensor([[0, 0], [4, 4]]), r"coords should be \(E, 2\) = \(3, 2\) for 3 electrodes"),
        (torch.zeros(3, 4), torch.tensor([[0, 0]] * 3), r"features should be \(N, E, F\), but has shape \(3, 4\)"),
    ],
)  # fmt: skip
def test_reference_grid_rejects_bad_input_in_one_line(features, coords, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        ch20.ref_electrode_grid(features, coords)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def generator():
    """The notebook's data generator (its cell), run in a namespace of its own."""
    path = Path(__file__).resolve().parents[1] / "solutions" / "20_eeg_emotion.ipynb"
    nb = nbformat.read(path, as_version=4)
    cells = [c.source for c in nb.cells if c.cell_type == "code" and "def make_eeg(" in c.source]
    assert len(cells) == 1
    namespace = {"math": math, "torch": torch, "ch20": ch20}
    exec(cells[0], namespace)  # noqa: S102 - the chapter's own cell
    return namespace


def test_the_generator_is_seeded_fast_and_shaped_like_deap(generator):
    start = time.perf_counter()
    data = generator["make_eeg"](seed=3)
    seconds = time.perf_counter() - start
    # About 0.4 s on one core; generous here, for a loaded CI machine.
    assert seconds < 3.0, f"make_eeg took {seconds:.2f} s"
    assert data["x"].shape == (640, 32, 512) and data["baseline"].shape == (640, 32, 256)
    assert data["x"].dtype == torch.float32
    assert sorted(data["label"].unique().tolist()) == [0, 1, 2, 3]
    assert torch.equal(torch.bincount(data["subject"]), torch.full((16,), 40))
    again = generator["make_eeg"](seed=3)
    assert all(torch.equal(data[k], again[k]) for k in data)
    assert not torch.equal(generator["make_eeg"](seed=4)["x"], data["x"])


def test_the_generator_puts_the_class_effect_where_it_says(generator):
    """High minus low valence: left frontal alpha DE down, right up, by about 2 * effect nats."""
    data = generator["make_eeg"](seed=0)
    bands, names = generator["BANDS"], ch20.DEAP_ELECTRODES
    alpha = ch20.ref_band_filter(data["x"].double(), 128, *bands["alpha"])
    base = ch20.ref_band_filter(data["baseline"].double(), 128, *bands["alpha"])
    de = ch20.ref_differential_entropy(alpha) - ch20.ref_differential_entropy(base)  # (N, 32)
    high = (data["label"] // 2).bool()
    diff = de[high].mean(0) - de[~high].mean(0)
    for name, sign in (("F3", -1), ("F7", -1), ("F4", +1), ("F8", +1)):
        assert 0.15 < sign * diff[names.index(name)] < 0.5, (name, diff[names.index(name)])
    assert diff[names.index("Cz")].abs() < 0.1
    # nothing outside 4-45 Hz, as DEAP's preprocessed release
    outside = ch20.ref_band_filter(data["x"][:20].double(), 128, 45, 1000)
    assert outside.abs().max() < 1e-5


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"seconds": 1.001}, r"should both be a positive whole number of samples, but they are"),
        ({"baseline_seconds": 0}, r"positive whole number of samples"),
        ({"n_subjects": 1}, r"need at least 2 subjects and 1 trial each, got 1 and 40"),
    ],
)
def test_the_generator_rejects_bad_arguments_in_one_line(generator, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        generator["make_eeg"](**kwargs)
    assert "\n" not in str(info.value)
