"""Check batteries of chapter 10: sinusoidal positional encodings, RoPE and ALiBi biases.

All three exercises are deterministic functions of their arguments, so every case is
judged by value against a float64 reference, and a failure names the mistake it looks
like (sin and cos swapped, i/d for 2i/d, rotate-half pairs, slopes off by one head, the
power-of-two slope formula for a head count that is not one, ...).

Precision. ``sinusoidal_positional_encoding`` and ``alibi_bias`` build a tensor from
sizes alone, so they may return float32 or float64 and are judged at the precision of
the dtype they return. A sine of a float32 angle near p carries an absolute error of
about eps * p (the angle itself is rounded to a relative eps), so the float32 absolute
tolerance grows with the largest position; float64 gets the same rule with its own eps,
which still demands that float64 angles are computed in float64.
"""

from __future__ import annotations

import torch

from ..checking import Tester, exercise
from ..gradcheck import compare

CHAPTER = "10_positional_encoding"
Tensor = torch.Tensor

BUILT_DTYPES = (torch.float32, torch.float64)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _angle_atol(dtype: torch.dtype, max_angle: float, scale: float = 1.0) -> float:
    """Absolute tolerance for sin/cos of angles up to ``max_angle``, times a value scale."""
    eps = torch.finfo(dtype).eps
    base = 2e-6 if dtype == torch.float32 else 1e-12
    return (base + 16 * eps * max(1.0, max_angle)) * max(1.0, scale)


# ---- reference implementations -------------------------------------------------------------
def _inv_freq(d: int, base: float = 10000.0) -> Tensor:
    """base^(-2i/d) for the pairs i = 0 .. ceil(d/2)-1, float64."""
    two_i = torch.arange(0, d, 2, dtype=torch.float64)  # (ceil(d/2),)
    return torch.pow(torch.tensor(float(base), dtype=torch.float64), -two_i / d)


def ref_sinusoidal_positional_encoding(max_len: int, d_model: int) -> Tensor:
    """PE (max_len, d_model) float64: PE[p, 2i] = sin(p w_i), PE[p, 2i+1] = cos(p w_i), w_i = 10000^(-2i/d)."""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]  # (L, 1)
    angles = pos * _inv_freq(d_model)[None, :]  # (L, ceil(d/2))
    pe = torch.empty(max_len, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angles)
    pe[:, 1::2] = torch.cos(angles[:, : d_model // 2])  # odd d: the last column is a sine
    return pe


def ref_apply_rope(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotate each interleaved pair (x[..., 2i], x[..., 2i+1]) by positions * base^(-2i/d); keep x's dtype."""
    d = x.shape[-1]
    angles = positions.to(torch.float64)[:, None] * _inv_freq(d, base)[None, :]  # (L, d/2)
    cos, sin = torch.cos(angles), torch.sin(angles)
    x64 = x.to(torch.float64)
    x1, x2 = x64[..., 0::2], x64[..., 1::2]  # (..., L, d/2) each
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (..., L, d/2, 2)
    return out.flatten(-2).to(x.dtype)


def _power_of_two_slopes(k: int, exponent=None) -> Tensor:
    """The slopes of k heads, k a power of two: 2^(-8(h+1)/k), h = 0 .. k-1, float64.

    ``exponent`` (a function of h and k) replaces -8(h+1)/k; the mistake models use it.
    """
    h = torch.arange(k, dtype=torch.float64)
    if exponent is None:
        return torch.pow(2.0, -8.0 * (h + 1) / k)
    return exponent(h, k)


def alibi_slopes(num_heads: int, power_of_two=_power_of_two_slopes) -> Tensor:
    """The ALiBi paper's slopes (num_heads,) float64.

    For n = num_heads a power of two, m_h = 2^(-8(h+1)/n). Otherwise, with k the largest power
    of two below n: the k slopes of k heads, then the first n - k of the slopes of 2k heads
    taken at even indices, 2^(-8(2j+1)/(2k)) for j = 0, 1, ... (``get_slopes`` in the paper's
    repository, ``build_alibi_tensor`` in Hugging Face's BLOOM).
    """
    k = 1 << (num_heads.bit_length() - 1)  # the largest power of two <= num_heads
    if k == num_heads:
        return power_of_two(num_heads)
    return torch.cat([power_of_two(k), power_of_two(2 * k)[0::2][: num_heads - k]])


def ref_alibi_bias(num_heads: int, seq_len: int) -> Tensor:
    """bias (H, L, L) float64 with bias[h, i, j] = -m_h (i - j) on and below the diagonal, -inf above."""
    i = torch.arange(seq_len, dtype=torch.float64)
    dist = i[:, None] - i[None, :]  # (L, L): i - j
    bias = -alibi_slopes(num_heads)[:, None, None] * dist  # (H, L, L)
    return bias.masked_fill(dist < 0, float("-inf"))


# ---- mistake models ------------------------------------------------------------------------
def _pe_from_freqs(
    max_len: int, d: int, freqs_even: Tensor, freqs_odd: Tensor, swap: bool = False
) -> Tensor:
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]
    even, odd = torch.sin(pos * freqs_even), torch.cos(pos * freqs_odd)
    if swap:
        even, odd = torch.cos(pos * freqs_even), torch.sin(pos * freqs_odd)
    pe = torch.empty(max_len, d, dtype=torch.float64)
    pe[:, 0::2] = even
    pe[:, 1::2] = odd
    return pe


def _pe_mistakes(max_len: int, d: int) -> list:
    w = _inv_freq(d)  # (ceil(d/2),)
    h = d // 2
    i = torch.arange(len(w), dtype=torch.float64)
    col = torch.arange(d, dtype=torch.float64)
    pe = ref_sinusoidal_positional_encoding
    return [
        (
            "sin and cos are swapped: even columns 2i hold the sine, odd columns 2i+1 the cosine.",
            lambda: _pe_from_freqs(max_len, d, w, w[:h], swap=True),
        ),
        (
            "the exponent is i/d instead of 2i/d (i counts pairs, so the column 2i has exponent 2i/d).",
            lambda: _pe_from_freqs(max_len, d, 10000.0 ** (-i / d), 10000.0 ** (-i[:h] / d)),
        ),
        (
            "each column k used its own exponent k/d; both columns of pair i share the frequency 10000^(-2i/d).",
            lambda: _pe_from_freqs(
                max_len, d, 10000.0 ** (-col[0::2] / d), 10000.0 ** (-col[1::2] / d)
            ),
        ),
        (
            "the exponent is 2k/d with k the column index; it is 2i/d with i the pair index (column 2i).",
            lambda: _pe_from_freqs(
                max_len, d, 10000.0 ** (-2 * col[0::2] / d), 10000.0 ** (-2 * col[1::2] / d)
            ),
        ),
        (
            "the angle is p * 10000^(+2i/d): the exponent's sign is flipped, so the frequencies grow "
            "instead of decaying (p / 10000^(2i/d) = p * 10000^(-2i/d)).",
            lambda: _pe_from_freqs(max_len, d, 1 / w, 1 / w[:h]),
        ),
        (
            "the sines fill the first half of the columns and the cosines the second half "
            "(the concatenated layout); the contract interleaves them: sine in column 2i, cosine in 2i+1.",
            lambda: _concat_layout(max_len, d),
        ),
        (
            "positions start at 1 instead of 0 (row p is position p, so row 0 is sin 0 = 0, cos 0 = 1).",
            lambda: pe(max_len + 1, d)[1:],
        ),
        (
            "every pair has frequency 1: the exponent 2i/d was computed with integer division "
            "(2 * i // d is 0 for every column), so all angles are just p.",
            lambda: _pe_from_freqs(
                max_len,
                d,
                torch.ones(len(w), dtype=torch.float64),
                torch.ones(h, dtype=torch.float64),
            ),
        ),
    ]


def _concat_layout(max_len: int, d: int) -> Tensor | None:
    if d % 2:
        return None
    pe = ref_sinusoidal_positional_encoding(max_len, d)
    return torch.cat([pe[:, 0::2], pe[:, 1::2]], dim=1)


def _rope_general(
    x: Tensor,
    positions: Tensor,
    base: float,
    *,
    inv_freq: Tensor | None = None,
    direction: float = 1.0,
    layout: str = "interleaved",
    swap: bool = False,
) -> Tensor:
    """A RoPE variant in float64: the mistake models are built from this one function."""
    d = x.shape[-1]
    w = _inv_freq(d, base) if inv_freq is None else inv_freq
    angles = direction * positions.to(torch.float64)[:, None] * w[None, :]  # (L, d/2)
    cos, sin = torch.cos(angles), torch.sin(angles)
    if swap:
        cos, sin = sin, cos
    x64 = x.to(torch.float64)
    if layout == "interleaved":
        x1, x2 = x64[..., 0::2], x64[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)
    if layout == "half":
        x1, x2 = x64[..., : d // 2], x64[..., d // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)
    # "repeat": interleaved rotate, but the (L, d) cos/sin tables built with .repeat(2)
    # (the rotate-half tables) instead of .repeat_interleave(2).
    cos_t, sin_t = cos.repeat(1, 2), sin.repeat(1, 2)  # (L, d)
    rot = torch.stack([-x64[..., 1::2], x64[..., 0::2]], -1).flatten(-2)  # (-x1, x0, -x3, x2, ...)
    return x64 * cos_t + rot * sin_t


def _rope_mistakes(x: Tensor, positions: Tensor, base: float) -> list:
    d = x.shape[-1]
    L = x.shape[-2]
    i = torch.arange(d // 2, dtype=torch.float64)
    b = float(base)
    return [
        (
            "the positions argument was ignored: every row was rotated by its row index (torch.arange(L)), "
            "but row r must be rotated by positions[r] * base^(-2i/d).",
            lambda: _rope_general(x, torch.arange(L), base),
        ),
        (
            "the pairs are (x[..., i], x[..., i + d/2]) (the rotate-half layout of GPT-NeoX and Llama); "
            "the contract pairs neighbours (x[..., 2i], x[..., 2i+1]) as RoFormer does.",
            lambda: _rope_general(x, positions, base, layout="half"),
        ),
        (
            "every pair was rotated the wrong way (by -angle): the new first entry is "
            "x[2i] cos - x[2i+1] sin and the second x[2i] sin + x[2i+1] cos; check the signs of the sine terms.",
            lambda: _rope_general(x, positions, base, direction=-1.0),
        ),
        (
            "the cos and sin tables were built with .repeat(2) (the rotate-half tables [w_0..w_{d/2-1}, w_0..]) "
            "instead of .repeat_interleave(2) ([w_0, w_0, w_1, w_1, ...]), so pairs get the wrong frequencies.",
            lambda: _rope_general(x, positions, base, layout="repeat"),
        ),
        (
            "the exponent is i/d instead of 2i/d (i counts pairs): the frequencies are base^(-i/d).",
            lambda: _rope_general(x, positions, base, inv_freq=b ** (-i / d)),
        ),
        (
            "the frequency of pair i is base^(+2i/d): the exponent's sign is flipped.",
            lambda: _rope_general(x, positions, base, inv_freq=b ** (2 * i / d)),
        ),
        (
            "the frequency of pair i is base^(-2i/(d/2)) = base^(-4i/d): i was divided by d/2 after doubling it.",
            lambda: _rope_general(x, positions, base, inv_freq=b ** (-4 * i / d)),
        ),
        (
            "the base argument was ignored: the frequencies use 10000 whatever base is passed.",
            lambda: _rope_general(x, positions, 10000.0) if b != 10000.0 else None,
        ),
        (
            "cos and sin are swapped in the rotation.",
            lambda: _rope_general(x, positions, base, swap=True),
        ),
        (
            "every pair was rotated by positions * 1: the exponent 2i/d was computed with integer "
            "division (2 * i // d is 0), so all frequencies are base^0 = 1.",
            lambda: _rope_general(
                x, positions, base, inv_freq=torch.ones(d // 2, dtype=torch.float64)
            ),
        ),
    ]


def _alibi_mistakes(num_heads: int, seq_len: int, ref: Tensor, upper: Tensor) -> list:
    """Mistaken biases, with the unjudged entries (``upper``: j > i) set to 0 as in ``ref``."""
    n = num_heads
    h = torch.arange(n, dtype=torch.float64)
    i = torch.arange(seq_len, dtype=torch.float64)
    dist = (i[:, None] - i[None, :])[None]  # (1, L, L)
    k = 1 << (n.bit_length() - 1)  # the largest power of two <= n
    plain = _power_of_two_slopes

    def with_slopes(m: Tensor) -> Tensor:
        return (-m[:, None, None] * dist).masked_fill(upper, 0.0)

    def rule(exponent) -> Tensor:
        """The paper's rule with a mistaken formula for a power-of-two head count."""
        return alibi_slopes(n, lambda kk: _power_of_two_slopes(kk, exponent))

    return [
        (
            "the bias is positive below the diagonal: either its minus sign is missing or the distance is "
            "(j - i) instead of (i - j). Keys in the past (j < i) must get a negative bias -m_h (i - j).",
            lambda: -ref,
        ),
        (
            "the slopes are off by one head: m_h = 2^(-8h/n) gives head 0 slope 1; the contract counts "
            "from h = 0 with m_h = 2^(-8(h+1)/n) (for n a power of two).",
            lambda: with_slopes(rule(lambda hh, kk: torch.pow(2.0, -8.0 * hh / kk))),
        ),
        (
            "the heads are in reverse order: head 0 has the steepest slope, the last head the smallest.",
            lambda: ref.flip(0),
        ),
        (
            "the slopes use e instead of 2: m_h = exp(-8(h+1)/n) instead of 2^(-8(h+1)/n).",
            lambda: with_slopes(rule(lambda hh, kk: torch.exp(-8.0 * (hh + 1) / kk))),
        ),
        (
            "the exponent's minus sign is missing: slopes 2^(+8(h+1)/n) are larger than 1.",
            lambda: with_slopes(rule(lambda hh, kk: torch.pow(2.0, 8.0 * (hh + 1) / kk))),
        ),
        (
            f"the slopes are 2^(-8(h+1)/n) for all {n} heads, the formula for a power-of-two head "
            f"count; {n} is not one. The ALiBi paper's rule, with k = {k} the largest power of two "
            f"below n: the {k} slopes of {k} heads, then the first {n - k} of the slopes of {2 * k} "
            f"heads taken at even indices, 2^(-8(2j+1)/{2 * k}) for j = 0, 1, ...",
            lambda: with_slopes(torch.pow(2.0, -8.0 * (h + 1) / n)),
        ),
        (
            f"the extra slopes were taken at odd indices of the {2 * k}-head slopes ([1::2], "
            f"2^(-8(2j+2)/{2 * k}) = 2^(-8(j+1)/{k})), which repeats the first {k} heads' slopes; "
            f"the paper takes the even indices [0::2], 2^(-8(2j+1)/{2 * k}).",
            lambda: with_slopes(torch.cat([plain(k), plain(2 * k)[1::2][: n - k]])),
        ),
        (
            f"the extra slopes are the first {n - k} slopes of {2 * k} heads, one after the other; "
            f"the paper takes every other one, at even indices [0::2]: "
            f"2^(-8(2j+1)/{2 * k}).",
            lambda: with_slopes(torch.cat([plain(k), plain(2 * k)[: n - k]])),
        ),
        (
            f"the slopes are the first {n} of the slopes of {2 * k} heads (the next power of two); "
            f"the paper keeps the {k} slopes of {k} heads and adds only the first "
            f"{n - k} even-index slopes of {2 * k} heads after them.",
            lambda: with_slopes(plain(2 * k)[:n]),
        ),
        (
            "the slopes are 2^-(h+1) whatever the number of heads (right only for 8 heads); "
            "they are m_h = 2^(-8(h+1)/n) for n a power of two.",
            lambda: with_slopes(torch.pow(2.0, -(h + 1))),
        ),
        (
            f"the {n - k} extra slopes (from {2 * k} heads) come first; the paper puts the {k} "
            f"slopes of {k} heads first and appends the extra ones.",
            lambda: with_slopes(torch.cat([plain(2 * k)[0::2][: n - k], plain(k)])),
        ),
        (
            "the slopes are sorted from steepest to flattest; the paper keeps its order: the "
            f"{k} slopes of {k} heads first, then the extra ones from {2 * k} heads.",
            lambda: with_slopes(alibi_slopes(n).sort(descending=True).values),
        ),
        (
            "the exponent 8(h+1)/n was computed with integer division (8 * (h + 1) // n), which rounds "
            "it down when n does not divide 8(h+1).",
            lambda: with_slopes(
                rule(
                    lambda hh, kk: torch.pow(
                        2.0, -torch.div(8 * (hh + 1), kk, rounding_mode="floor")
                    )
                )
            ),
        ),
        (
            "bias[h, i, j] = m_h * j: the row-shifted form of the original fairseq code. Inside a softmax "
            "it gives the same weights (it differs from -m_h (i - j) by m_h * i, a constant per row), but "
            "the contract asks for -m_h (i - j), which is 0 on the diagonal and negative below it.",
            lambda: (
                (alibi_slopes(num_heads)[:, None, None] * i[None, None, :])
                .expand(-1, seq_len, -1)
                .masked_fill(upper, 0.0)
            ),
        ),
    ]


_ROPE_F32 = (
    "it looks like part of the computation ran in float32 for a float64 input (often the angles: "
    "torch.arange(...).float() and torch.tensor(1.0) default to float32). Build the frequencies "
    "and angles in x's dtype."
)
_PE_F32 = (
    "the values are only float32-accurate, though the tensor is float64: it looks like the angles "
    "were computed in float32 (torch.arange defaults to it for float arguments) and cast afterwards. "
    "Compute in float64, or return the float32 tensor."
)


def _float32_accurate(
    t: Tester,
    case: str,
    quantity: str,
    got: Tensor,
    expected: Tensor,
    max_angle: float,
    scale: float,
    hint: str,
) -> None:
    """Fail with ``hint`` when a float64 result is wrong at float64 precision but right at float32's."""
    if got.dtype != torch.float64:
        return
    if compare(got, expected, 0.0, _angle_atol(torch.float64, max_angle, scale)).ok:
        return
    if compare(got, expected, 0.0, _angle_atol(torch.float32, max_angle, scale)).ok:
        err = float((got - expected).abs().max())
        t.fail(case, f"`{quantity}` is only float32-accurate (max abs error {err:.1e}): {hint}")


def _distinct(mistakes: list, expected: Tensor) -> list:
    """Drop (lazily) the mistake models that coincide with the right answer in this case."""

    def lazy(alt):
        def make():
            a = alt() if callable(alt) else alt
            if a is None or (
                a.shape == expected.shape
                and torch.allclose(a, expected.double(), rtol=1e-9, atol=1e-9)
            ):
                return None
            return a

        return make

    return [(sentence, lazy(alt)) for sentence, alt in mistakes]


# ---- sinusoidal encodings ----------------------------------------------------------------
def _built_tensor(
    t: Tester, case: str, quantity: str, got: object, shape: tuple[int, ...]
) -> Tensor:
    got = t.expect_tensor(case, quantity, got, shape=shape)
    if got.dtype not in BUILT_DTYPES:
        t.fail(
            case, f"`{quantity}` should be float32 or float64, but it has dtype {_dt(got.dtype)}."
        )
    return got


@exercise(
    "sinusoidal_positional_encoding",
    chapter=CHAPTER,
    signature="(max_len, d_model) -> (max_len, d_model)",
    summary="PE[p,2i]=sin(p/10000^(2i/d)), PE[p,2i+1]=cos(p/10000^(2i/d)); float32 or float64",
    reference=ref_sinusoidal_positional_encoding,
)
def check_sinusoidal_positional_encoding(t: Tester) -> None:
    """Even and odd widths (d=1, 2, 3, ...), one position, long sequences, square tables."""
    sizes = [
        (6, 4, "small"),
        (8, 2, "d_model=2: one pair"),
        (12, 6, ""),
        (16, 16, "square"),
        (9, 7, "odd d_model: the last column is a sine"),
        (5, 1, "d_model=1: a single sine column"),
        (4, 3, "odd d_model"),
        (1, 10, "one position"),
        (64, 32, ""),
        (20, 65, "odd d_model"),
        (2048, 8, "long: positions up to 2047"),
    ]
    for max_len, d, note in sizes:
        case = f"max_len={max_len}, d_model={d}" + (f" ({note})" if note else "")
        got = _built_tensor(t, case, "PE", t.call(case, max_len, d), (max_len, d))
        expected = ref_sinusoidal_positional_encoding(max_len, d)
        _float32_accurate(t, case, "PE", got, expected, max_len - 1, 1.0, _PE_F32)
        t.compare(
            case,
            "PE",
            got,
            expected.to(got.dtype),
            rtol=0.0,
            atol=_angle_atol(got.dtype, max_len - 1),
            mistakes=_distinct(_pe_mistakes(max_len, d), expected),
        )


# ---- RoPE ----------------------------------------------------------------------------------
def _pair_norms(x: Tensor) -> Tensor:
    x = x.to(torch.float64)
    return torch.sqrt(x[..., 0::2] ** 2 + x[..., 1::2] ** 2)


@exercise(
    "apply_rope",
    chapter=CHAPTER,
    signature="(x (...,L,d), positions (L,) int, base=10000.0) -> Tensor",
    summary="rotate each interleaved pair (x[...,2i], x[...,2i+1]) by positions*base^(-2i/d), keeping x's dtype",
    reference=ref_apply_rope,
)
def check_apply_rope(t: Tester) -> None:
    """Batch dims, d=2, positions shifted, unsorted and repeated, several bases, float32/64; norms and offsets."""
    f32 = torch.float32
    cases: list[tuple[str, Tensor, Tensor, float | None]] = [
        ("x (5, 4) float64, positions 0..4", t.randn(5, 4), torch.arange(5), None),
        ("x (3, 2) float64 (d=2: one pair), positions 0..2", t.randn(3, 2), torch.arange(3), None),
        ("x (6, 8) float64, positions 10..15", t.randn(6, 8), torch.arange(10, 16), None),
        (
            "x (2, 5, 6) float64, positions [7, 2, 9, 0, 4] (unsorted)",
            t.randn(2, 5, 6),
            torch.tensor([7, 2, 9, 0, 4]),
            None,
        ),
        (
            "x (4, 6) float64, positions [3, 3, 1, 1] (repeated)",
            t.randn(4, 6),
            torch.tensor([3, 3, 1, 1]),
            None,
        ),
        (
            "x (2, 3, 4, 8) float64 (batch and heads), positions 0..3, base=500",
            t.randn(2, 3, 4, 8),
            torch.arange(4),
            500.0,
        ),
        (
            "x (3, 10) float64, positions 5..7, base=500000",
            t.randn(3, 10),
            torch.arange(5, 8),
            500000.0,
        ),
        ("x (1, 4) float64, one position 42", t.randn(1, 4), torch.tensor([42]), None),
        (
            "x (4, 16) float64, positions [1000, 2047, 5, 1500]",
            t.randn(4, 16),
            torch.tensor([1000, 2047, 5, 1500]),
            None,
        ),
        (
            "x (3, 8) float64, positions int32 [4, 0, 9]",
            t.randn(3, 8),
            torch.tensor([4, 0, 9], dtype=torch.int32),
            None,
        ),
        (
            "x (2, 4, 6) float32, positions 3..6",
            t.randn(2, 4, 6, dtype=f32),
            torch.arange(3, 7),
            None,
        ),
        (
            "x (5, 12) float32, positions [900, 3, 3, 17, 250], base=1000",
            t.randn(5, 12, dtype=f32),
            torch.tensor([900, 3, 3, 17, 250]),
            1000.0,
        ),
        (
            "x (2, 2, 3, 2) float32 (d=2), positions [2, 0, 1]",
            t.randn(2, 2, 3, 2, dtype=f32),
            torch.tensor([2, 0, 1]),
            None,
        ),
    ]
    for case, x, positions, base in cases:
        args = (x, positions) if base is None else (x, positions, base)
        got = t.call(case, *args)
        b = 10000.0 if base is None else base
        expected = ref_apply_rope(x, positions, b)
        got = t.expect_tensor(case, "output", got, shape=x.shape, dtype=x.dtype)
        scale = float(x.abs().max())
        max_angle = float(positions.abs().max())
        atol = _angle_atol(x.dtype, max_angle, scale)
        _float32_accurate(t, case, "output", got, expected, max_angle, scale, _ROPE_F32)
        t.compare(
            case,
            "output",
            got,
            expected,
            rtol=0.0,
            atol=atol,
            mistakes=_distinct(_rope_mistakes(x, positions, b), expected),
        )

    # Properties: a rotation keeps the length of every pair ...
    case = "x (3, 5, 8) float64, positions [4, 9, 0, 2, 30]: norm of each pair"
    x = t.randn(3, 5, 8)
    got = t.expect_tensor(
        case,
        "output",
        t.call(case, x, torch.tensor([4, 9, 0, 2, 30])),
        shape=x.shape,
        dtype=x.dtype,
    )
    t.compare(case, "norm of each rotated pair", _pair_norms(got), _pair_norms(x))

    # ... and q . k after rotation depends only on the offset between the two positions.
    case = "q, k (6, 8) float64: scores after shifting every position by 37"
    q, k = t.randn(6, 8), t.randn(6, 8)
    pos = torch.tensor([0, 5, 2, 11, 7, 3])
    qr, kr = (
        t.expect_tensor(case, "output", t.call(case, v, pos), shape=v.shape, dtype=v.dtype)
        for v in (q, k)
    )
    qs, ks = (
        t.expect_tensor(case, "output", t.call(case, v, pos + 37), shape=v.shape, dtype=v.dtype)
        for v in (q, k)
    )
    t.compare(case, "q.k scores (shifted vs unshifted)", qs @ ks.T, qr @ kr.T, rtol=1e-9, atol=1e-9)


# ---- ALiBi ---------------------------------------------------------------------------------
@exercise(
    "alibi_bias",
    chapter=CHAPTER,
    signature="(num_heads, seq_len) -> (num_heads, L, L)",
    summary=(
        "bias[h,i,j] = -m_h*(i-j) for j<=i with the ALiBi paper's slopes (2^(-8(h+1)/n) for n a "
        "power of two, else k of k heads then the even-index slopes of 2k); entries j>i not judged"
    ),
    reference=ref_alibi_bias,
)
def check_alibi_bias(t: Tester) -> None:
    """Head counts powers of two and not (the paper's rule), seq_len 1; only j <= i is judged."""
    # 6 heads before 3: at n = 3 two mistakes (extra slopes first, slopes sorted) coincide.
    sizes = [(8, 6), (1, 4), (2, 5), (4, 1), (6, 5), (3, 7), (12, 9), (16, 12), (5, 33), (24, 4)]
    for num_heads, seq_len in sizes:
        case = f"num_heads={num_heads}, seq_len={seq_len}"
        got = _built_tensor(
            t, case, "bias", t.call(case, num_heads, seq_len), (num_heads, seq_len, seq_len)
        )
        ref = ref_alibi_bias(num_heads, seq_len)
        upper = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)  # j > i: not judged
        judged = got.masked_fill(upper, 0.0)
        expected = ref.masked_fill(upper, 0.0).to(got.dtype)
        mistakes = _distinct(
            _alibi_mistakes(num_heads, seq_len, expected.double(), upper), expected
        )
        rtol, atol = t.tolerances(got.dtype, float(expected.abs().max()))
        t.compare(case, "bias (j <= i)", judged, expected, rtol=rtol, atol=atol, mistakes=mistakes)
