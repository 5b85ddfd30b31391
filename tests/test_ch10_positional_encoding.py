"""Chapter 10 batteries: correct implementations in several styles pass, planted mistakes are named.

Each exercise gets (a) correct implementations in different styles (numpy, Python loops,
complex numbers, rotation matrices, float32 and float64 outputs, -inf / 0 / symmetric
values above the ALiBi diagonal), each checked across 20 seeds, and (b) the mistakes
learners really make, each rejected with the sentence that names it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import course_utils as cu
from course_utils.checks import ch10_positional_encoding as ch10

SEEDS = range(20)
MISTAKE_SEEDS = (0, 1, 7)


# =====================================================================================
# Correct implementations, one style each
# =====================================================================================


# ---- sinusoidal encodings -------------------------------------------------------------
def pe_numpy(max_len: int, d_model: int) -> torch.Tensor:
    """numpy float64, angles p / 10000^(2i/d) for every column's pair index."""
    p = np.arange(max_len)[:, None]
    k = np.arange(d_model)[None, :]
    angles = p / 10000.0 ** (2 * (k // 2) / d_model)
    return torch.from_numpy(np.where(k % 2 == 0, np.sin(angles), np.cos(angles)))


def pe_loops(max_len: int, d_model: int) -> torch.Tensor:
    """Python floats, one entry at a time."""
    rows = []
    for p in range(max_len):
        row = []
        for k in range(d_model):
            angle = p / 10000 ** (2 * (k // 2) / d_model)
            row.append(math.sin(angle) if k % 2 == 0 else math.cos(angle))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def pe_exp_log_float32(max_len: int, d_model: int) -> torch.Tensor:
    """float32 throughout, frequencies as exp(-2i ln(10000)/d) (the common tutorial form)."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]  # (L, 1)
    div = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model)
    )
    pe = torch.zeros(max_len, d_model)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div[: d_model // 2])
    return pe


def pe_stack_truncate(max_len: int, d_model: int) -> torch.Tensor:
    """Build d+1 columns as stacked (sin, cos) pairs, keep the first d_model."""
    half = (d_model + 1) // 2
    w = 10000.0 ** (-torch.arange(half, dtype=torch.float64) * 2 / d_model)
    a = torch.arange(max_len, dtype=torch.float64)[:, None] * w  # (L, half)
    return torch.stack([a.sin(), a.cos()], dim=-1).reshape(max_len, 2 * half)[:, :d_model]


def pe_numpy_float32(max_len: int, d_model: int) -> torch.Tensor:
    """numpy float32: p / power(10000, 2i/d) all in float32."""
    p = np.arange(max_len, dtype=np.float32)[:, None]
    i2 = np.arange(0, d_model, 2, dtype=np.float32)
    a = p / np.power(np.float32(10000.0), i2 / np.float32(d_model))
    out = np.empty((max_len, d_model), dtype=np.float32)
    out[:, 0::2] = np.sin(a)
    out[:, 1::2] = np.cos(a[:, : d_model // 2])
    return torch.from_numpy(out)


# ---- RoPE --------------------------------------------------------------------------------
def _freqs(d: int, base: float, dtype: torch.dtype) -> torch.Tensor:
    return base ** (-torch.arange(0, d, 2, dtype=dtype) / d)


def rope_complex(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Pairs as complex numbers, multiplied by exp(i * angle)."""
    d = x.shape[-1]
    angles = positions.double()[:, None] * _freqs(d, base, torch.float64)  # (L, d/2)
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    out = torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles))
    return out.reshape(x.shape).to(x.dtype)


def rope_loops(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Python loops over every row and pair, in Python floats."""
    d = x.shape[-1]
    flat = x.reshape(-1, x.shape[-2], d).tolist()
    pos = positions.tolist()
    for mat in flat:
        for r, row in enumerate(mat):
            for i in range(d // 2):
                a = pos[r] / base ** (2 * i / d)
                c, s = math.cos(a), math.sin(a)
                u, v = row[2 * i], row[2 * i + 1]
                row[2 * i], row[2 * i + 1] = u * c - v * s, u * s + v * c
    return torch.tensor(flat, dtype=x.dtype).reshape(x.shape)


def rope_matrix(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """A block-diagonal (d, d) rotation matrix per position, applied with einsum."""
    d = x.shape[-1]
    angles = positions.to(x.dtype)[:, None] * _freqs(d, base, x.dtype)  # (L, d/2)
    c, s = angles.cos(), angles.sin()
    R = torch.zeros(len(positions), d, d, dtype=x.dtype)  # (L, d, d)
    R[:, 0::2, 0::2] = torch.diag_embed(c)
    R[:, 0::2, 1::2] = torch.diag_embed(-s)
    R[:, 1::2, 0::2] = torch.diag_embed(s)
    R[:, 1::2, 1::2] = torch.diag_embed(c)
    return torch.einsum("lij,...lj->...li", R, x)


def rope_numpy(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """numpy, with repeat_interleave'd cos/sin tables and the (-x1, x0) companion vector."""
    a = x.numpy().astype(np.float64)
    d = a.shape[-1]
    ang = positions.numpy()[:, None] * base ** (-np.arange(0, d, 2) / d)  # (L, d/2)
    cos, sin = np.repeat(np.cos(ang), 2, -1), np.repeat(np.sin(ang), 2, -1)  # (L, d)
    rot = np.stack([-a[..., 1::2], a[..., 0::2]], -1).reshape(a.shape)
    return torch.from_numpy(a * cos + rot * sin).to(x.dtype)


def rope_native_dtype(
    x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0
) -> torch.Tensor:
    """Everything in x's dtype (float32 stays float32), via strided assignment."""
    d = x.shape[-1]
    angles = positions.to(x.dtype)[:, None] * _freqs(d, base, x.dtype)
    c, s = angles.cos(), angles.sin()
    out = torch.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
    return out


# ---- ALiBi -------------------------------------------------------------------------------
def alibi_loops(num_heads: int, seq_len: int) -> torch.Tensor:
    """Python loops and the slope rule spelled out; 0 above the diagonal."""
    k = 1
    while 2 * k <= num_heads:
        k *= 2
    slopes = [2 ** (-8 * (h + 1) / k) for h in range(k)]
    for j in range(num_heads - k):
        slopes.append(2 ** (-8 * (2 * j + 1) / (2 * k)))
    out = []
    for m in slopes:
        out.append(
            [[-m * (i - j) if j <= i else 0.0 for j in range(seq_len)] for i in range(seq_len)]
        )
    return torch.tensor(out, dtype=torch.float64)


def _get_slopes(n: int) -> list[float]:
    """``get_slopes`` as written in the ALiBi paper's repository (ofirpress/attention_with_linear_biases)."""

    def get_slopes_power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        ratio = start
        return [start * ratio**i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return (
        get_slopes_power_of_2(closest_power_of_2)
        + _get_slopes(2 * closest_power_of_2)[0::2][: n - closest_power_of_2]
    )


def alibi_paper_port(num_heads: int, seq_len: int) -> torch.Tensor:
    """The paper repository's slopes; -inf above the diagonal, float32 (its causal mask folded in)."""
    m = torch.tensor(_get_slopes(num_heads))  # (H,) float32
    i = torch.arange(seq_len)
    dist = (i[:, None] - i[None, :]).float()  # (L, L)
    return (-m[:, None, None] * dist).masked_fill(dist < 0, float("-inf"))


def alibi_bloom(num_heads: int, seq_len: int) -> torch.Tensor:
    """The slopes as Hugging Face's BLOOM ``build_alibi_tensor`` builds them; float64."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float64)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.float64))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float64)
        remaining = min(closest, num_heads - closest)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.float64))
        slopes = torch.cat([slopes, extra])
    i = torch.arange(seq_len, dtype=torch.float64)
    return -slopes[:, None, None] * (i[:, None] - i[None, :]).clamp(min=0)


def alibi_symmetric(num_heads: int, seq_len: int) -> torch.Tensor:
    """-m |i - j| everywhere (a bidirectional variant; above the diagonal is not judged)."""
    k = 2 ** (num_heads.bit_length() - 1)
    m = [(2.0 ** (-8.0 / k)) ** (h + 1) for h in range(k)]
    m += [(2.0 ** (-8.0 / (2 * k))) ** (h + 1) for h in range(0, 2 * (num_heads - k), 2)]
    m = torch.tensor(m, dtype=torch.float64)
    i = torch.arange(seq_len, dtype=torch.float64)
    return -m[:, None, None] * (i[:, None] - i[None, :]).abs()


def alibi_numpy_float32(num_heads: int, seq_len: int) -> torch.Tensor:
    """numpy float32, tril-masked; the slopes from exponents listed with numpy."""
    k = 2 ** int(np.floor(np.log2(num_heads)))
    exponents = np.concatenate(
        [8 * np.arange(1, k + 1) / k, (8 * np.arange(1, 2 * k + 1, 2) / (2 * k))[: num_heads - k]]
    )
    m = np.power(np.float32(2), -exponents.astype(np.float32))
    i = np.arange(seq_len, dtype=np.float32)
    b = -m[:, None, None] * np.tril(i[:, None] - i[None, :])
    return torch.from_numpy(b.astype(np.float32))


def test_alibi_styles_agree_with_the_paper_slopes():
    """The correct styles give the paper's slopes, e.g. 6 heads: 2^-2, 2^-4, 2^-6, 2^-8, 2^-1, 2^-3."""
    expected = {6: [2, 4, 6, 8, 1, 3], 12: [1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5]}
    for n, exps in expected.items():
        torch.testing.assert_close(ch10.alibi_slopes(n), 2.0 ** -torch.tensor(exps).double())
        torch.testing.assert_close(torch.tensor(_get_slopes(n)).double(), ch10.alibi_slopes(n))
        for fn in (
            alibi_loops,
            alibi_paper_port,
            alibi_bloom,
            alibi_symmetric,
            alibi_numpy_float32,
        ):
            slopes = -fn(n, 2)[:, 1, 0].double()  # bias[h, 1, 0] = -m_h
            torch.testing.assert_close(slopes, ch10.alibi_slopes(n), rtol=1e-6, atol=0)


CORRECT = {
    "sinusoidal_positional_encoding": [
        pe_numpy,
        pe_loops,
        pe_exp_log_float32,
        pe_stack_truncate,
        pe_numpy_float32,
    ],
    "apply_rope": [
        rope_complex,
        rope_loops,
        rope_matrix,
        rope_numpy,
        rope_native_dtype,
        ch10.ref_apply_rope,
    ],
    "alibi_bias": [
        alibi_loops,
        alibi_paper_port,
        alibi_bloom,
        alibi_symmetric,
        alibi_numpy_float32,
        ch10.ref_alibi_bias,
    ],
}
CORRECT_CASES = [(ex, fn) for ex, fns in CORRECT.items() for fn in fns]


@pytest.mark.parametrize(
    "exercise,fn", CORRECT_CASES, ids=[f"{e}-{f.__name__}" for e, f in CORRECT_CASES]
)
def test_correct_styles_pass_across_seeds(exercise, fn):
    for seed in SEEDS:
        report = cu.check(exercise, fn, strict=True, seed=seed)
        assert report.passed


def test_references_pass():
    for ex in CORRECT:
        assert cu.check(ex, cu.reference(ex), strict=True).passed


# =====================================================================================
# Planted mistakes
# =====================================================================================


# ---- sinusoidal ------------------------------------------------------------------------
def _pe(max_len, d, exponent, swap=False, start=0):
    """exponent(k, d): the exponent of column k; even columns sin, odd cos (or swapped)."""
    rows = torch.arange(start, start + max_len, dtype=torch.float64)[:, None]
    k = torch.arange(d, dtype=torch.float64)
    a = rows * 10000.0 ** (-exponent(k, d))
    even = (torch.arange(d) % 2 == 0)[None, :]
    if swap:
        even = ~even
    return torch.where(even, a.sin(), a.cos())


def pe_swapped(L, d):
    return _pe(L, d, lambda k, d: 2 * (k // 2) / d, swap=True)


def pe_i_over_d(L, d):
    return _pe(L, d, lambda k, d: (k // 2) / d)


def pe_column_k_over_d(L, d):
    return _pe(L, d, lambda k, d: k / d)


def pe_column_2k_over_d(L, d):
    return _pe(L, d, lambda k, d: 2 * k / d)


def pe_sign_flipped(L, d):
    return _pe(L, d, lambda k, d: -2 * (k // 2) / d)


def pe_concat(L, d):
    pe = ch10.ref_sinusoidal_positional_encoding(L, d)
    return torch.cat([pe[:, 0::2], pe[:, 1::2]], 1)


def pe_from_one(L, d):
    return _pe(L, d, lambda k, d: 2 * (k // 2) / d, start=1)


def pe_odd_crash(L, d):
    pos = torch.arange(L, dtype=torch.float64)[:, None]
    div = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    pe = torch.zeros(L, d, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)  # fails for odd d: ceil(d/2) frequencies, floor(d/2) columns
    return pe


def pe_odd_last_cos(L, d):
    pe = ch10.ref_sinusoidal_positional_encoding(L, d)
    if d % 2:
        w = 10000.0 ** (-(d - 1) / d)
        pe[:, -1] = torch.cos(torch.arange(L, dtype=torch.float64) * w)
    return pe


def pe_float32_loose(L, d):
    """float32 via float16 frequencies: too imprecise even for float32."""
    w = (10000.0 ** (-torch.arange(0, d, 2) / d)).half().float()
    a = torch.arange(L, dtype=torch.float32)[:, None] * w
    pe = torch.zeros(L, d)
    pe[:, 0::2] = a.sin()
    pe[:, 1::2] = a[:, : d // 2].cos()
    return pe


def pe_integer_division(L, d):
    return _pe(L, d, lambda k, d: torch.div(2 * (k // 2), d, rounding_mode="floor"))


def pe_float32_cast_up(L, d):
    """Computed in float32, returned as float64: float64 dtype promises float64 precision."""
    return pe_exp_log_float32(L, d).double()


def pe_half(L, d):
    return ch10.ref_sinusoidal_positional_encoding(L, d).half()


def pe_transposed(L, d):
    return ch10.ref_sinusoidal_positional_encoding(L, d).T.contiguous()


PE_MISTAKES = [
    (pe_swapped, "sin and cos are swapped"),
    (pe_i_over_d, r"the exponent is i/d instead of 2i/d"),
    (pe_column_k_over_d, r"each column k used its own exponent k/d"),
    (pe_column_2k_over_d, r"the exponent is 2k/d with k the column index"),
    (pe_sign_flipped, r"10000\^\(\+2i/d\): the exponent's sign is flipped"),
    (pe_concat, "the concatenated layout"),
    (pe_from_one, "positions start at 1 instead of 0"),
    (pe_odd_crash, r"d_model=\d+ \(odd d_model.*raised RuntimeError"),
    (
        pe_odd_last_cos,
        r"max_len=9, d_model=7 \(odd d_model: the last column is a sine\).*`PE` is wrong",
    ),
    (pe_float32_loose, r"`PE` is wrong: max relative error"),
    (pe_integer_division, r"exponent 2i/d was computed with integer division"),
    (pe_float32_cast_up, r"max_len=6, d_model=4 \(small\), `PE` is only float32-accurate"),
    (pe_half, "should be float32 or float64, but it has dtype float16"),
    (pe_transposed, r"should have shape \(6, 4\)"),
]


# ---- RoPE -----------------------------------------------------------------------------
def _rope(x, positions, base=10000.0, **kw):
    return ch10._rope_general(x, positions, base, **kw).to(x.dtype)


def rope_arange(x, positions, base=10000.0):
    return _rope(x, torch.arange(x.shape[-2]), base)


def rope_rotate_half(x, positions, base=10000.0):
    return _rope(x, positions, base, layout="half")


def rope_backwards(x, positions, base=10000.0):
    return _rope(x, positions, base, direction=-1.0)


def rope_repeat_tables(x, positions, base=10000.0):
    d = x.shape[-1]
    f = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.double()[:, None] * f
    cos, sin = ang.cos().repeat(1, 2), ang.sin().repeat(1, 2)  # should be repeat_interleave(2, -1)
    rot = torch.stack([-x[..., 1::2], x[..., 0::2]], -1).flatten(-2)
    return (x * cos + rot * sin).to(x.dtype)


def rope_i_over_d(x, positions, base=10000.0):
    d = x.shape[-1]
    return _rope(
        x, positions, base, inv_freq=base ** (-torch.arange(d // 2, dtype=torch.float64) / d)
    )


def rope_plus_exponent(x, positions, base=10000.0):
    d = x.shape[-1]
    return _rope(
        x, positions, base, inv_freq=base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    )


def rope_over_half_d(x, positions, base=10000.0):
    d = x.shape[-1]
    i2 = torch.arange(0, d, 2, dtype=torch.float64)
    return _rope(x, positions, base, inv_freq=base ** (-i2 / (d // 2)))


def rope_ignores_base(x, positions, base=10000.0):
    return _rope(x, positions, 10000.0)


def rope_cos_sin_swapped(x, positions, base=10000.0):
    return _rope(x, positions, base, swap=True)


def rope_integer_division(x, positions, base=10000.0):
    d = x.shape[-1]
    exps = torch.div(torch.arange(0, d, 2), d, rounding_mode="floor").double()  # all 0
    return _rope(x, positions, base, inv_freq=base**-exps)


def rope_d_from_dim1(x, positions, base=10000.0):
    """d read as x.shape[1]: right for 2-D x only."""
    d = x.shape[1]
    f = base ** (-torch.arange(0, x.shape[-1], 2, dtype=torch.float64) * 2 / (2 * d))
    return _rope(x, positions, base, inv_freq=f)


def rope_float64_out(x, positions, base=10000.0):
    return ch10._rope_general(x, positions, base)  # always float64


def rope_inplace(x, positions, base=10000.0):
    out = ch10.ref_apply_rope(x, positions, base)
    x.copy_(out)
    return x


def rope_float32_angles(x, positions, base=10000.0):
    d = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2).float() / d)  # float32, as in many codebases
    ang = positions.float()[:, None] * inv  # (L, d/2) float32
    c, s = ang.cos(), ang.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2).to(x.dtype)


def rope_scales_by_norm(x, positions, base=10000.0):
    """Right angles, but each pair also scaled: values and norms both wrong."""
    return ch10.ref_apply_rope(x, positions, base) * 1.01


ROPE_MISTAKES = [
    (rope_arange, "the positions argument was ignored"),
    (rope_rotate_half, "the rotate-half layout"),
    (rope_backwards, r"rotated the wrong way \(by -angle\)"),
    (rope_repeat_tables, r"built with \.repeat\(2\)"),
    (rope_i_over_d, r"the exponent is i/d instead of 2i/d"),
    (rope_plus_exponent, r"base\^\(\+2i/d\): the exponent's sign is flipped"),
    (rope_over_half_d, r"base\^\(-2i/\(d/2\)\)"),
    (rope_ignores_base, "the base argument was ignored"),
    (rope_cos_sin_swapped, "cos and sin are swapped in the rotation"),
    (
        rope_float64_out,
        r"should have dtype float32 \(the dtype of the inputs\), but it has dtype float64",
    ),
    (rope_integer_division, r"exponent 2i/d was computed with integer division"),
    (rope_d_from_dim1, r"x \(2, 5, 6\) float64.*`output` is wrong"),
    (rope_inplace, "changed its input `x` in place"),
    (rope_float32_angles, "only float32-accurate.*ran in float32 for a float64 input"),
    (rope_scales_by_norm, r"off by a constant factor of 1\.01"),
]


# ---- ALiBi ------------------------------------------------------------------------------
def _alibi(num_heads, seq_len, slopes, sign=-1.0):
    i = torch.arange(seq_len, dtype=torch.float64)
    return sign * slopes[:, None, None] * (i[:, None] - i[None, :])


def _h(n):
    return torch.arange(n, dtype=torch.float64)


def alibi_off_by_one(n, L):
    return _alibi(n, L, 2.0 ** (-8 * _h(n) / n))


def alibi_sign(n, L):
    return _alibi(n, L, 2.0 ** (-8 * (_h(n) + 1) / n), sign=1.0)


def alibi_j_minus_i(n, L):
    i = torch.arange(L, dtype=torch.float64)
    m = 2.0 ** (-8 * (_h(n) + 1) / n)
    return -m[:, None, None] * (i[None, :] - i[:, None])


def alibi_reversed(n, L):
    return _alibi(n, L, 2.0 ** (-8 * (n - _h(n)) / n))


def alibi_half_powers(n, L):
    return _alibi(n, L, 2.0 ** -(_h(n) + 1))


def alibi_exp(n, L):
    return _alibi(n, L, torch.exp(-8 * (_h(n) + 1) / n))


def alibi_no_minus_exponent(n, L):
    return _alibi(n, L, 2.0 ** (8 * (_h(n) + 1) / n))


def _k(n):
    return 2 ** (n.bit_length() - 1)  # the largest power of two <= n


def _plain(k):
    return 2.0 ** (-8 * (_h(k) + 1) / k)


def alibi_plain_formula(n, L):
    return _alibi(n, L, 2.0 ** (-8 * (_h(n) + 1) / n))


def alibi_odd_indices(n, L):
    k = _k(n)
    return _alibi(n, L, torch.cat([_plain(k), _plain(2 * k)[1::2][: n - k]]))


def alibi_all_of_2k(n, L):
    k = _k(n)
    return _alibi(n, L, torch.cat([_plain(k), _plain(2 * k)[: n - k]]))


def alibi_next_power_truncated(n, L):
    return _alibi(n, L, _plain(2 * _k(n))[:n] if _k(n) != n else _plain(n))


def alibi_extra_first(n, L):
    k = _k(n)
    return _alibi(n, L, torch.cat([_plain(2 * k)[0::2][: n - k], _plain(k)]))


def alibi_sorted(n, L):
    return _alibi(n, L, ch10.alibi_slopes(n).sort(descending=True).values)


def alibi_integer_division(n, L):
    """The paper's rule, with 8 * (h + 1) // k in the power-of-two formula."""
    k = _k(n)

    def plain(kk):
        return 2.0 ** -torch.div(8 * (_h(kk) + 1), kk, rounding_mode="floor")

    return _alibi(n, L, torch.cat([plain(k), plain(2 * k)[0::2][: n - k]]))


def alibi_fairseq_rows(n, L):
    m = 2.0 ** (-8 * (_h(n) + 1) / n)
    return (m[:, None, None] * torch.arange(L, dtype=torch.float64)).expand(n, L, L).tril()


def alibi_int(n, L):
    return ch10.ref_alibi_bias(n, L).nan_to_num(neginf=0).round().long()


def alibi_no_head_dim(n, L):
    return ch10.ref_alibi_bias(n, L)[0]


def alibi_nan_diagonal(n, L):
    b = ch10.ref_alibi_bias(n, L)
    b[:, 0, 0] = float("nan")
    return b


ALIBI_MISTAKES = [
    (alibi_off_by_one, r"off by one head: m_h = 2\^\(-8h/n\)"),
    (alibi_sign, "the bias is positive below the diagonal"),
    (alibi_j_minus_i, r"the distance is \(j - i\) instead of \(i - j\)"),
    (alibi_reversed, "the heads are in reverse order"),
    (alibi_half_powers, r"right only for 8 heads"),
    (alibi_exp, "the slopes use e instead of 2"),
    (alibi_no_minus_exponent, "the exponent's minus sign is missing"),
    (alibi_plain_formula, r"the slopes are 2\^\(-8\(h\+1\)/n\) for all 6 heads.*6 is not one"),
    (alibi_odd_indices, r"taken at odd indices of the 8-head slopes \(\[1::2\]"),
    (alibi_all_of_2k, r"the extra slopes are the first 2 slopes of 8 heads, one after the other"),
    (alibi_next_power_truncated, r"the slopes are the first 6 of the slopes of 8 heads"),
    (alibi_extra_first, r"the 2 extra slopes \(from 8 heads\) come first"),
    (alibi_sorted, "the slopes are sorted from steepest to flattest"),
    (alibi_integer_division, r"8 \* \(h \+ 1\) // n"),
    (alibi_fairseq_rows, r"bias\[h, i, j\] = m_h \* j: the row-shifted form"),
    (alibi_int, "should be float32 or float64, but it has dtype int64"),
    (alibi_no_head_dim, r"should have shape \(8, 6, 6\)"),
    (alibi_nan_diagonal, r"`bias \(j <= i\)` is wrong"),
]

MISTAKES = (
    [("sinusoidal_positional_encoding", f, m) for f, m in PE_MISTAKES]
    + [("apply_rope", f, m) for f, m in ROPE_MISTAKES]
    + [("alibi_bias", f, m) for f, m in ALIBI_MISTAKES]
)


@pytest.mark.parametrize(
    "exercise,fn,match", MISTAKES, ids=[f"{e}-{f.__name__}" for e, f, _ in MISTAKES]
)
def test_planted_mistakes_are_named(exercise, fn, match):
    for seed in MISTAKE_SEEDS:
        with pytest.raises(cu.CheckFailure, match=match):
            cu.check(exercise, fn, strict=True, seed=seed)


# =====================================================================================
# Stubs, messages, budget
# =====================================================================================
@pytest.mark.parametrize("exercise", list(CORRECT))
def test_stub_is_pending_then_strict_failure(exercise, capsys):
    def stub(*args, **kwargs):
        raise NotImplementedError("write me")

    report = cu.check(exercise, stub, strict=False)
    assert report.status == "pending"
    assert "not implemented yet" in capsys.readouterr().out
    with pytest.raises(cu.CheckFailure, match="not implemented yet"):
        cu.check(exercise, stub, strict=True)


def test_exercises_are_registered_for_the_chapter():
    ids = [e.id for e in cu.exercises("10")]
    assert ids == ["sinusoidal_positional_encoding", "apply_rope", "alibi_bias"]


def test_checks_are_deterministic_per_seed():
    for ex in CORRECT:
        a = cu.check(ex, cu.reference(ex), seed=3)
        b = cu.check(ex, cu.reference(ex), seed=3)
        assert [(r.case, r.max_abs) for r in a.rows] == [(r.case, r.max_abs) for r in b.rows]


def test_reference_rope_has_the_taught_properties():
    """Norms are preserved and q.k depends only on the offset (what the notebook shows)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 8, 16, generator=g, dtype=torch.float64)
    pos = torch.arange(8)
    qr, kr = ch10.ref_apply_rope(q, pos), ch10.ref_apply_rope(k, pos)
    torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1))
    qs, ks = ch10.ref_apply_rope(q, pos + 100), ch10.ref_apply_rope(k, pos + 100)
    torch.testing.assert_close(qs @ ks.T, qr @ kr.T)


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), max_size=2),
    L=st.integers(1, 6),
    pairs=st.integers(1, 5),
    base=st.sampled_from([10.0, 10000.0, 1e6]),
    data=st.data(),
)
def test_reference_rope_agrees_with_other_styles_on_random_shapes(lead, L, pairs, base, data):
    """The battery's reference against the complex and rotation-matrix styles, on shapes hypothesis picks."""
    positions = torch.tensor(data.draw(st.lists(st.integers(0, 5000), min_size=L, max_size=L)))
    x = torch.randn(*lead, L, 2 * pairs, dtype=torch.float64)
    ref = ch10.ref_apply_rope(x, positions, base)
    torch.testing.assert_close(rope_complex(x, positions, base), ref, rtol=0, atol=1e-11)
    torch.testing.assert_close(rope_matrix(x, positions, base), ref, rtol=0, atol=1e-11)


@settings(max_examples=30, deadline=None)
@given(max_len=st.integers(1, 40), d=st.integers(1, 20))
def test_reference_pe_agrees_with_loops_on_random_sizes(max_len, d):
    torch.testing.assert_close(
        ch10.ref_sinusoidal_positional_encoding(max_len, d), pe_loops(max_len, d)
    )


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 20), L=st.integers(1, 12))
def test_reference_alibi_agrees_with_loops_on_random_sizes(n, L):
    ref = ch10.ref_alibi_bias(n, L)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    torch.testing.assert_close(ref[:, causal], alibi_loops(n, L)[:, causal])
