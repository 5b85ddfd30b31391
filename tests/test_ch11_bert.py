"""Chapter 11 batteries: correct WordPiece tokenizers and MLM maskers of several styles pass,
planted mistakes are rejected with the sentence that names them.

mlm_mask is random: its correct styles draw their numbers five ways (torch.rand thresholds,
torch.bernoulli as Hugging Face does, numpy, Python's `random` in a loop, torch.multinomial)
and must pass on 20 seeds each; each planted mistake must be caught on several seeds.
"""

from __future__ import annotations

import math
import random
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import course_utils as cu
from course_utils.checks import ch11_bert as ch11

SEEDS = range(20)
MISTAKE_SEEDS = (0, 1, 7)


# =====================================================================================
# WordPiece: correct styles
# =====================================================================================
def wp_while(word, vocab, unk_token="[UNK]", max_chars=100):
    """The classic two-pointer loop."""
    if len(word) > max_chars:
        return [unk_token]
    out, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start:
            sub = ("##" if start else "") + word[start:end]
            if sub in vocab:
                break
            end -= 1
        else:
            return [unk_token]
        out.append(sub)
        start = end
    return out


def wp_recursive(word, vocab, unk_token="[UNK]", max_chars=100):
    """Recursive: longest prefix, then the rest as a continuation."""
    if len(word) > max_chars:
        return [unk_token]

    def rest(s, first):
        if not s:
            return []
        for end in range(len(s), 0, -1):
            piece = s[:end] if first else "##" + s[:end]
            if piece in vocab:
                tail = rest(s[end:], False)
                return None if tail is None else [piece, *tail]  # greedy: no backtracking
        return None

    pieces = rest(word, True)
    return [unk_token] if pieces is None else pieces


def wp_scan_up(word, vocab, unk_token="[UNK]", max_chars=100):
    """Scan ends upwards, remember the last match (the longest), bounded by the longest vocab entry."""
    if len(word) > max_chars:
        return [unk_token]
    longest = max((len(v.removeprefix("##")) for v in vocab), default=0)
    out, start = [], 0
    while start < len(word):
        best = None
        for end in range(start + 1, min(len(word), start + longest) + 1):
            sub = word[start:end] if start == 0 else f"##{word[start:end]}"
            if sub in vocab:
                best = (sub, end)
        if best is None:
            return [unk_token]
        out.append(best[0])
        start = best[1]
    return out


def wp_tuple_vocab_dict(word, vocab, unk_token="[UNK]", max_chars=100):
    """Converts the vocab to a dict first (as Hugging Face's vocab is) and works on a list of chars."""
    table = {v: i for i, v in enumerate(sorted(vocab))}
    chars = list(word)
    if len(chars) > max_chars:
        return [unk_token]
    pieces, i = [], 0
    while i < len(chars):
        for j in range(len(chars), i, -1):
            cand = "".join(chars[i:j])
            cand = cand if i == 0 else "##" + cand
            if cand in table:
                pieces.append(cand)
                i = j
                break
        else:
            return [unk_token]
    return pieces


WP_CORRECT = [wp_while, wp_recursive, wp_scan_up, wp_tuple_vocab_dict, ch11.ref_wordpiece_tokenize]


@pytest.mark.parametrize("fn", WP_CORRECT, ids=lambda f: f.__name__)
def test_wordpiece_correct_styles_pass(fn):
    for seed in SEEDS:
        assert cu.check("wordpiece_tokenize", fn, seed=seed, strict=True).passed


# =====================================================================================
# WordPiece: planted mistakes
# =====================================================================================
def wp_shortest(word, vocab, unk_token="[UNK]", max_chars=100):
    if len(word) > max_chars:
        return [unk_token]
    out, start = [], 0
    while start < len(word):
        for end in range(start + 1, len(word) + 1):
            sub = ("##" if start else "") + word[start:end]
            if sub in vocab:
                break
        else:
            return [unk_token]
        out.append(sub)
        start = end
    return out


def wp_no_hashes(word, vocab, unk_token="[UNK]", max_chars=100):
    if len(word) > max_chars:
        return [unk_token]
    out, start = [], 0
    while start < len(word):
        for end in range(len(word), start, -1):
            if word[start:end] in vocab:
                break
        else:
            return [unk_token]
        out.append(word[start:end])
        start = end
    return out


def wp_hash_first(word, vocab, unk_token="[UNK]", max_chars=100):
    if len(word) > max_chars:
        return [unk_token]
    out, start = [], 0
    while start < len(word):
        for end in range(len(word), start, -1):
            if "##" + word[start:end] in vocab:
                break
        else:
            return [unk_token]
        out.append("##" + word[start:end])
        start = end
    return out


def wp_partial(word, vocab, unk_token="[UNK]", max_chars=100):
    if len(word) > max_chars:
        return [unk_token]
    out, start = [], 0
    while start < len(word):
        for end in range(len(word), start, -1):
            sub = ("##" if start else "") + word[start:end]
            if sub in vocab:
                break
        else:
            return out or [unk_token]
        out.append(sub)
        start = end
    return out


def wp_partial_then_unk(word, vocab, unk_token="[UNK]", max_chars=100):
    if len(word) > max_chars:
        return [unk_token]
    out, start = [], 0
    while start < len(word):
        for end in range(len(word), start, -1):
            sub = ("##" if start else "") + word[start:end]
            if sub in vocab:
                break
        else:
            return [*out, unk_token]
        out.append(sub)
        start = end
    return out


def wp_backtracking(word, vocab, unk_token="[UNK]", max_chars=100):
    if len(word) > max_chars:
        return [unk_token]

    def search(start):
        if start == len(word):
            return []
        for end in range(len(word), start, -1):
            sub = ("##" if start else "") + word[start:end]
            if sub in vocab:
                rest = search(end)
                if rest is not None:
                    return [sub, *rest]
        return None

    found = search(0)
    return [unk_token] if found is None else found


def wp_max_chars_ge(word, vocab, unk_token="[UNK]", max_chars=100):
    if len(word) >= max_chars:
        return [unk_token]
    return wp_while(word, vocab, unk_token, 10**9)


def wp_max_chars_plus_one(word, vocab, unk_token="[UNK]", max_chars=100):
    if len(word) > max_chars + 1:
        return [unk_token]
    return wp_while(word, vocab, unk_token, 10**9)


def wp_no_max_chars(word, vocab, unk_token="[UNK]", max_chars=100):
    return wp_while(word, vocab, unk_token, 10**9)


def wp_hardcoded_unk(word, vocab, unk_token="[UNK]", max_chars=100):
    return wp_while(word, vocab, "[UNK]", max_chars)


def wp_returns_tuple(word, vocab, unk_token="[UNK]", max_chars=100):
    return tuple(wp_while(word, vocab, unk_token, max_chars))


def wp_unk_as_string(word, vocab, unk_token="[UNK]", max_chars=100):
    out = wp_while(word, vocab, unk_token, max_chars)
    return unk_token if out == [unk_token] else out


def wp_mutates_vocab(word, vocab, unk_token="[UNK]", max_chars=100):
    vocab.add(unk_token)
    return wp_while(word, vocab, unk_token, max_chars)


def wp_lowercases(word, vocab, unk_token="[UNK]", max_chars=100):
    return (
        wp_while(word.lower(), vocab, unk_token, max_chars)
        if word.isascii()
        else wp_while(word, vocab, unk_token, max_chars)
    )


WP_MISTAKES = [
    (wp_shortest, "shortest vocabulary piece"),
    (wp_no_hashes, 'without the "##" prefix'),
    (wp_hash_first, 'first piece was given the "##" prefix'),
    (wp_partial, "pieces found before the failure were returned;"),
    (wp_partial_then_unk, "followed by \\[unk_token\\]"),
    (wp_backtracking, "search over every segmentation"),
    (wp_max_chars_ge, "exactly max_chars=5 characters was treated as too long"),
    (wp_max_chars_plus_one, "max_chars \\+ 1 = 6 characters was split"),
    (wp_no_max_chars, "max_chars limit was not applied|max_chars \\+ 1"),
    (wp_hardcoded_unk, 'unknown token is hard-coded as "\\[UNK\\]"'),
    (wp_returns_tuple, "should return a list of strings"),
    (wp_unk_as_string, "should return a list of strings"),
    (wp_mutates_vocab, "changed the vocab set"),
]


@pytest.mark.parametrize("fn,pattern", WP_MISTAKES, ids=lambda x: getattr(x, "__name__", "p"))
def test_wordpiece_mistake_is_named(fn, pattern):
    for seed in MISTAKE_SEEDS:
        with pytest.raises(cu.CheckFailure, match=pattern):
            cu.check("wordpiece_tokenize", fn, seed=seed, strict=True)


def test_wordpiece_uppercase_input_is_not_lowered():
    # Lower-casing belongs to the basic tokenizer, before WordPiece: a planted extra lower() is not
    # in the hand-made cases (all lower case), so the battery need not catch it; this documents why.
    assert cu.check("wordpiece_tokenize", wp_lowercases, strict=True).passed


@pytest.mark.parametrize("fn,_", WP_MISTAKES[:10], ids=lambda x: getattr(x, "__name__", "p"))
def test_wordpiece_mistakes_really_differ_from_the_reference(fn, _):
    cases = ch11._CASES
    assert any(
        fn(w, v, u, m) != ch11.ref_wordpiece_tokenize(w, v, u, m)
        for _, v, ws, u, m in cases
        for w in ws
    )


def test_known_wordpiece_answers():
    ref = ch11.ref_wordpiece_tokenize
    assert ref("unaffable", {"un", "##aff", "##able"}) == ["un", "##aff", "##able"]
    assert ref("unaffable", {"un", "##aff", "##able", "una", "##ff"}) == ["una", "##ff", "##able"]
    assert ref("abcd", {"abc", "a", "##bcd"}) == ["[UNK]"]  # greedy takes "abc", then "d" fails
    assert ref("ab" * 50, {"ab", "##ab"}) == ["ab"] + ["##ab"] * 49
    assert ref("ab" * 50 + "a", {"ab", "##ab", "##a"}) == ["[UNK]"]
    assert ref("ababa", {"ab", "##ab", "##a"}, max_chars=5) == ["ab", "##ab", "##a"]


# =====================================================================================
# mlm_mask: correct styles
# =====================================================================================
def mlm_rand(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    """One uniform for selection, one for the 80/10/10 split."""
    sel = (torch.rand(input_ids.shape) < mlm_prob) & ~special_mask
    labels = torch.where(sel, input_ids, torch.full_like(input_ids, -100))
    u = torch.rand(input_ids.shape)
    out = input_ids.clone()
    out[sel & (u < 0.8)] = mask_token_id
    rnd = sel & (u >= 0.8) & (u < 0.9)
    out[rnd] = torch.randint(vocab_size, (int(rnd.sum()),))
    return out, labels


def mlm_bernoulli_hf(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    """Hugging Face's DataCollatorForLanguageModeling recipe: bernoulli 0.8, then 0.5 of the rest."""
    labels = input_ids.clone()
    prob = torch.full(labels.shape, mlm_prob)
    prob.masked_fill_(special_mask, 0.0)
    sel = torch.bernoulli(prob).bool()
    labels[~sel] = -100
    inputs = input_ids.clone()
    replaced = torch.bernoulli(torch.full(labels.shape, 0.8)).bool() & sel
    inputs[replaced] = mask_token_id
    rnd = torch.bernoulli(torch.full(labels.shape, 0.5)).bool() & sel & ~replaced
    words = torch.randint(vocab_size, labels.shape, dtype=torch.long)
    inputs[rnd] = words[rnd]
    return inputs, labels


_NP = np.random.default_rng(11)


def mlm_numpy(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    """numpy throughout, back to int64 tensors."""
    ids = input_ids.numpy()
    sel = (_NP.random(ids.shape) < mlm_prob) & ~special_mask.numpy()
    choice = _NP.choice(3, size=ids.shape, p=[0.8, 0.1, 0.1])
    out = ids.copy()
    out[sel & (choice == 0)] = mask_token_id
    rnd = sel & (choice == 1)
    out[rnd] = _NP.integers(0, vocab_size, size=int(rnd.sum()))
    labels = np.where(sel, ids, -100)
    return torch.from_numpy(out.astype(np.int64)), torch.from_numpy(labels.astype(np.int64))


def mlm_loop(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    """An explicit Python loop with `random`."""
    ids = input_ids.tolist()
    special = special_mask.tolist()
    out, labels = [], []
    for row, srow in zip(ids, special, strict=True):
        o, lab = [], []
        for tok, sp in zip(row, srow, strict=True):
            if not sp and random.random() < mlm_prob:
                lab.append(tok)
                u = random.random()
                o.append(
                    mask_token_id if u < 0.8 else random.randrange(vocab_size) if u < 0.9 else tok
                )
            else:
                lab.append(-100)
                o.append(tok)
        out.append(o)
        labels.append(lab)
    return torch.tensor(out, dtype=torch.int64), torch.tensor(labels, dtype=torch.int64)


def mlm_multinomial(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    """torch.multinomial for the 4-way choice (unselected, [MASK], random, keep)."""
    n = input_ids.numel()
    probs = torch.tensor([1 - mlm_prob, 0.8 * mlm_prob, 0.1 * mlm_prob, 0.1 * mlm_prob]).clamp_min(
        0
    )
    kind = torch.multinomial(probs, n, replacement=True).view(input_ids.shape)
    kind = torch.where(special_mask, torch.zeros_like(kind), kind)
    random_ids = torch.randint(0, vocab_size, input_ids.shape)
    out = torch.where(kind == 1, mask_token_id, input_ids)
    out = torch.where(kind == 2, random_ids, out)
    labels = torch.where(kind > 0, input_ids, -100)
    return out, labels


def mlm_scalar_torch_loop(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    """The slowest honest style: a loop over positions with one torch draw per decision."""
    out = input_ids.clone()
    labels = torch.full_like(input_ids, -100)
    for i in range(input_ids.shape[0]):
        for j in range(input_ids.shape[1]):
            if special_mask[i, j] or torch.rand(()).item() >= mlm_prob:
                continue
            labels[i, j] = input_ids[i, j]
            u = torch.rand(()).item()
            if u < 0.8:
                out[i, j] = mask_token_id
            elif u < 0.9:
                out[i, j] = int(torch.randint(vocab_size, ()))
    return out, labels


MLM_CORRECT = [
    mlm_scalar_torch_loop,
    mlm_rand,
    mlm_bernoulli_hf,
    mlm_numpy,
    mlm_loop,
    mlm_multinomial,
    ch11.ref_mlm_mask,
]


@pytest.mark.parametrize("fn", MLM_CORRECT, ids=lambda f: f.__name__)
def test_mlm_correct_styles_pass(fn):
    for seed in SEEDS:
        assert cu.check("mlm_mask", fn, seed=seed, strict=True).passed


# =====================================================================================
# mlm_mask: planted mistakes
# =====================================================================================
def _split(input_ids, sel, vocab_size, mask_token_id, pm=0.8, pr=0.1, lo=0, hi=None):
    u = torch.rand(input_ids.shape)
    out = input_ids.clone()
    out[sel & (u < pm)] = mask_token_id
    rnd = sel & (u >= pm) & (u < pm + pr)
    out[rnd] = torch.randint(lo, vocab_size if hi is None else hi, (int(rnd.sum()),))
    return out


def _sel(input_ids, special_mask, p):
    return (torch.rand(input_ids.shape) < p) & ~special_mask


def mlm_special_masked(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    sel = torch.rand(input_ids.shape) < mlm_prob
    return _split(input_ids, sel, vocab_size, mask_token_id), torch.where(sel, input_ids, -100)


def mlm_labels_everywhere(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    sel = _sel(input_ids, special_mask, mlm_prob)
    return _split(input_ids, sel, vocab_size, mask_token_id), input_ids.clone()


def mlm_labels_masked_ids(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    sel = _sel(input_ids, special_mask, mlm_prob)
    out = _split(input_ids, sel, vocab_size, mask_token_id)
    return out, torch.where(sel, out, -100)


def mlm_split_on_all(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    sel = _sel(input_ids, special_mask, mlm_prob)
    out = _split(input_ids, ~special_mask, vocab_size, mask_token_id)
    return out, torch.where(sel, input_ids, -100)


def mlm_all_mask(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    sel = _sel(input_ids, special_mask, mlm_prob)
    return _split(input_ids, sel, vocab_size, mask_token_id, pm=1.0, pr=0.0), torch.where(
        sel, input_ids, -100
    )


def mlm_range_short(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    sel = _sel(input_ids, special_mask, mlm_prob)
    return _split(input_ids, sel, vocab_size, mask_token_id, hi=vocab_size - 1), torch.where(
        sel, input_ids, -100
    )


def mlm_range_from_one(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    sel = _sel(input_ids, special_mask, mlm_prob)
    return _split(input_ids, sel, vocab_size, mask_token_id, lo=1), torch.where(
        sel, input_ids, -100
    )


def mlm_range_long(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    sel = _sel(input_ids, special_mask, mlm_prob)
    return _split(input_ids, sel, vocab_size, mask_token_id, hi=vocab_size + 1), torch.where(
        sel, input_ids, -100
    )


def mlm_80_20_0(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    sel = _sel(input_ids, special_mask, mlm_prob)
    return _split(input_ids, sel, vocab_size, mask_token_id, pr=0.2), torch.where(
        sel, input_ids, -100
    )


def mlm_80_0_20(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    sel = _sel(input_ids, special_mask, mlm_prob)
    return _split(input_ids, sel, vocab_size, mask_token_id, pr=0.0), torch.where(
        sel, input_ids, -100
    )


def mlm_prob_ignored(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    sel = _sel(input_ids, special_mask, 0.15)
    return _split(input_ids, sel, vocab_size, mask_token_id), torch.where(sel, input_ids, -100)


def mlm_prob_inverted(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    sel = _sel(input_ids, special_mask, 1 - mlm_prob)
    return _split(input_ids, sel, vocab_size, mask_token_id), torch.where(sel, input_ids, -100)


def mlm_in_place(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    sel = _sel(input_ids, special_mask, mlm_prob)
    labels = torch.where(sel, input_ids, -100)
    input_ids[sel] = mask_token_id
    return input_ids, labels


def mlm_row_shared(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    sel = (torch.rand(input_ids.shape[1]) < mlm_prob) & ~special_mask
    return _split(input_ids, sel, vocab_size, mask_token_id), torch.where(sel, input_ids, -100)


def mlm_reseeded(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    g = torch.Generator().manual_seed(1234)
    sel = (torch.rand(input_ids.shape, generator=g) < mlm_prob) & ~special_mask
    return _split(input_ids, sel, vocab_size, mask_token_id), torch.where(sel, input_ids, -100)


def mlm_two_selections(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    sel = _sel(input_ids, special_mask, mlm_prob)
    other = _sel(input_ids, special_mask, mlm_prob)
    return _split(input_ids, other, vocab_size, mask_token_id), torch.where(sel, input_ids, -100)


def mlm_independent_thresholds(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    # [MASK] w.p. 0.8 and random w.p. 0.1 from two independent draws, random overwriting [MASK]
    sel = _sel(input_ids, special_mask, mlm_prob)
    out = input_ids.clone()
    out[sel & (torch.rand(out.shape) < 0.8)] = mask_token_id
    rnd = sel & (torch.rand(out.shape) < 0.1)
    out[rnd] = torch.randint(vocab_size, (int(rnd.sum()),))
    return out, torch.where(sel, input_ids, -100)


def mlm_labels_int32(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    out, labels = ch11.ref_mlm_mask(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob)
    return out, labels.int()


def mlm_labels_zero(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    sel = _sel(input_ids, special_mask, mlm_prob)
    return _split(input_ids, sel, vocab_size, mask_token_id), torch.where(sel, input_ids, 0)


def mlm_returns_only_ids(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    return ch11.ref_mlm_mask(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob)[0]


def mlm_special_replaced(input_ids, special_mask, vocab_size, mask_token_id, mlm_prob=0.15):
    sel = torch.rand(input_ids.shape) < mlm_prob
    return _split(input_ids, sel, vocab_size, mask_token_id), torch.where(
        sel & ~special_mask, input_ids, -100
    )


MLM_MISTAKES = [
    (mlm_special_masked, "special tokens .* have a label"),
    (mlm_labels_everywhere, "labels were set everywhere"),
    (mlm_labels_masked_ids, "labels hold the corrupted ids"),
    (mlm_split_on_all, "applied to every token rather than only to the selected"),
    (mlm_all_mask, "Every selected token became \\[MASK\\]"),
    (mlm_range_short, "No selected token was ever replaced by id 7"),
    (mlm_range_from_one, "No selected token was ever replaced by id 0"),
    (mlm_range_long, "outside the vocabulary"),
    (mlm_80_20_0, "80/20/0"),
    (mlm_80_0_20, "80/0/20"),
    (mlm_prob_ignored, "mlm_prob was ignored"),
    (mlm_prob_inverted, "probability of NOT selecting|mlm_prob=0 nothing is selected"),
    (mlm_in_place, "changed its input `input_ids` in place"),
    (mlm_row_shared, "shared by every row"),
    (mlm_reseeded, "both calls selected exactly the same positions"),
    (mlm_two_selections, "use the same selection mask"),
    (mlm_independent_thresholds, "fraction of selected tokens that are \\[MASK\\]"),
    (mlm_labels_int32, "`labels` should have dtype int64"),
    (mlm_labels_zero, "filled with 0 instead of -100"),
    (mlm_returns_only_ids, "expected a tuple \\(masked_ids, labels\\)"),
    (mlm_special_replaced, "special tokens were changed"),
]


@pytest.mark.parametrize("fn,pattern", MLM_MISTAKES, ids=lambda x: getattr(x, "__name__", "p"))
def test_mlm_mistake_is_named(fn, pattern):
    for seed in MISTAKE_SEEDS:
        with pytest.raises(cu.CheckFailure, match=pattern):
            cu.check("mlm_mask", fn, seed=seed, strict=True)


# =====================================================================================
# Learn/strict mode, determinism, bounds
# =====================================================================================
def test_false_alarm_budget_is_respected():
    rows = cu.check("mlm_mask", mlm_rand, strict=True).rows
    stat_rows = [r for r in rows if "expected" in r.verdict and "bound" in r.verdict]
    assert 0 < len(stat_rows) <= ch11.MAX_STAT_TESTS
    assert ch11.FALSE_ALARM <= 1e-6


@pytest.mark.parametrize("ex", ["wordpiece_tokenize", "mlm_mask"])
def test_check_is_deterministic_per_seed(ex):
    a = cu.check(ex, cu.reference(ex), seed=3, strict=True).rows
    b = cu.check(ex, cu.reference(ex), seed=3, strict=True).rows
    assert [(r.case, r.verdict) for r in a] == [(r.case, r.verdict) for r in b]


def test_exercises_are_listed_with_their_contract_signatures():
    listed = {e.id: e for e in cu.exercises("11")}
    assert listed["wordpiece_tokenize"].arg_names == ("word", "vocab", "unk_token", "max_chars")
    assert listed["mlm_mask"].arg_names == (
        "input_ids",
        "special_mask",
        "vocab_size",
        "mask_token_id",
        "mlm_prob",
    )


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 5000),
    p=st.floats(0.01, 0.99),
)
def test_chernoff_interval_contains_the_mean_and_matches_the_test(n, p):
    lo, hi = ch11._fast_interval(n, p)
    assert lo <= p <= hi
    k = round(n * p)
    assert ch11.chernoff_ok(k, n, p)
    if hi < 1 - 2 / n:
        assert not ch11.chernoff_ok(math.ceil(hi * n) + 1, n, p)


@settings(max_examples=40, deadline=None)
@given(
    word=st.text(alphabet="abc", min_size=1, max_size=8),
    pieces=st.sets(st.text(alphabet="abc#", min_size=1, max_size=4), max_size=8),
)
def test_reference_pieces_rebuild_the_word(word, pieces):
    out = ch11.ref_wordpiece_tokenize(word, pieces)
    if out != ["[UNK]"]:
        assert "".join(p.removeprefix("##") for p in out) == word
        assert all(p in pieces for p in out)
        assert not out[0].startswith("##") or word.startswith("##")


# =====================================================================================
# The encoder pieces: correct styles
# =====================================================================================
BERT_IDS = ["bert_embeddings", "bert_attention_mask", "bert_encoder_layer", "bert_mlm_head"]
PIECE_SEEDS = range(4)


def emb_functional(input_ids, token_type_ids, weights, eps=1e-12):
    """F.embedding and F.layer_norm."""
    length = input_ids.shape[1]
    x = (
        F.embedding(input_ids, weights["word_embeddings.weight"])
        + F.embedding(torch.arange(length), weights["position_embeddings.weight"])
        + F.embedding(token_type_ids, weights["token_type_embeddings.weight"])
    )
    d = x.shape[-1]
    return F.layer_norm(x, (d,), weights["LayerNorm.weight"], weights["LayerNorm.bias"], eps)


def emb_one_hot_loop(input_ids, token_type_ids, weights, eps=1e-12):
    """One-hot matmuls and a Python loop over positions, in numpy for the normalisation."""
    word = weights["word_embeddings.weight"]
    out = torch.empty(*input_ids.shape, word.shape[1], dtype=word.dtype)
    for j in range(input_ids.shape[1]):
        one = F.one_hot(input_ids[:, j], word.shape[0]).to(word.dtype)
        out[:, j] = one @ word + weights["position_embeddings.weight"][j]
        out[:, j] += weights["token_type_embeddings.weight"][token_type_ids[:, j]]
    a = out.numpy()
    mu, var = a.mean(-1, keepdims=True), a.var(-1, keepdims=True)
    y = (a - mu) / np.sqrt(var + eps)
    return torch.from_numpy(y) * weights["LayerNorm.weight"] + weights["LayerNorm.bias"]


def mask_where(attention_mask, dtype=torch.float32):
    return torch.where(attention_mask.bool(), 0.0, -1e9).to(dtype)[:, None, None, :]


def mask_old_hf(attention_mask, dtype=torch.float32):
    """transformers before 4.x's finfo: (1 - mask) * -10000.0."""
    return ((1.0 - attention_mask[:, None, None, :].to(dtype)) * -10000.0).to(dtype)


def layer_sdpa(hidden_states, attention_mask, weights, num_heads, eps=1e-12):
    """F.linear, F.scaled_dot_product_attention, F.gelu, F.layer_norm."""
    n, length, d = hidden_states.shape
    w = weights

    def lin(x, name):
        return F.linear(x, w[f"{name}.weight"], w[f"{name}.bias"])

    def heads(name):
        return (
            lin(hidden_states, f"attention.self.{name}")
            .view(n, length, num_heads, -1)
            .transpose(1, 2)
        )

    ctx = F.scaled_dot_product_attention(
        heads("query"), heads("key"), heads("value"), attn_mask=attention_mask
    )
    a = lin(ctx.transpose(1, 2).reshape(n, length, d), "attention.output.dense")
    ln1 = (w["attention.output.LayerNorm.weight"], w["attention.output.LayerNorm.bias"])
    h = F.layer_norm(hidden_states + a, (d,), *ln1, eps)
    f = lin(F.gelu(lin(h, "intermediate.dense")), "output.dense")
    return F.layer_norm(h + f, (d,), w["output.LayerNorm.weight"], w["output.LayerNorm.bias"], eps)


def layer_einsum(hidden_states, attention_mask, weights, num_heads, eps=1e-12):
    """einsum over explicit head axes, erf GELU written out, LayerNorm by hand."""
    w = weights
    n, length, d = hidden_states.shape
    dh = d // num_heads

    def proj(x, name):
        wt = w[f"{name}.weight"]
        return torch.einsum("nld,ed->nle", x, wt) + w[f"{name}.bias"]

    def norm(x, name):
        mu = x.mean(-1, keepdim=True)
        sd = (x.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
        return (x - mu) / sd * w[f"{name}.weight"] + w[f"{name}.bias"]

    q, k, v = (
        proj(hidden_states, f"attention.self.{p}").view(n, length, num_heads, dh)
        for p in ("query", "key", "value")
    )
    s = torch.einsum("nqhe,nkhe->nhqk", q, k) / dh**0.5
    if attention_mask is not None:
        s = s + attention_mask
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    ctx = torch.einsum("nhqk,nkhe->nqhe", p, v).reshape(n, length, d)
    h = norm(hidden_states + proj(ctx, "attention.output.dense"), "attention.output.LayerNorm")
    z = proj(h, "intermediate.dense")
    z = z * 0.5 * (1 + torch.erf(z / 2**0.5))
    return norm(h + proj(z, "output.dense"), "output.LayerNorm")


def mlm_functional(sequence_output, word_embeddings, weights, eps=1e-12):
    w = weights
    t = F.gelu(F.linear(sequence_output, w["transform.dense.weight"], w["transform.dense.bias"]))
    t = F.layer_norm(
        t, t.shape[-1:], w["transform.LayerNorm.weight"], w["transform.LayerNorm.bias"], eps
    )
    return F.linear(t, word_embeddings, w["bias"])


CORRECT_PIECES = [
    ("bert_embeddings", emb_functional),
    ("bert_embeddings", emb_one_hot_loop),
    ("bert_attention_mask", mask_where),
    ("bert_attention_mask", mask_old_hf),
    ("bert_encoder_layer", layer_sdpa),
    ("bert_encoder_layer", layer_einsum),
    ("bert_mlm_head", mlm_functional),
    *((ex, cu.reference(ex)) for ex in BERT_IDS),
]


@pytest.mark.parametrize("ex,fn", CORRECT_PIECES, ids=lambda x: getattr(x, "__name__", x))
def test_bert_pieces_correct_styles_pass(ex, fn):
    for seed in PIECE_SEEDS:
        assert cu.check(ex, fn, seed=seed, strict=True).passed


# =====================================================================================
# The encoder pieces: planted mistakes
# =====================================================================================
def _emb(ids, types, w, eps=1e-12, *, start=0, seg=True, norm="after"):
    length = ids.shape[1]
    g, b = w["LayerNorm.weight"], w["LayerNorm.bias"]
    word = w["word_embeddings.weight"][ids]
    if norm == "before":
        word = F.layer_norm(word, word.shape[-1:], g, b, eps)
    x = word + w["position_embeddings.weight"][start : start + length]
    if seg:
        x = x + w["token_type_embeddings.weight"][types]
    return F.layer_norm(x, x.shape[-1:], g, b, eps) if norm == "after" else x


def emb_positions_from_one(ids, types, w, eps=1e-12):
    return _emb(ids, types, w, eps, start=1)


def emb_no_segments(ids, types, w, eps=1e-12):
    return _emb(ids, types, w, eps, seg=False)


def emb_no_norm(ids, types, w, eps=1e-12):
    return _emb(ids, types, w, eps, norm="none")


def emb_norm_first(ids, types, w, eps=1e-12):
    return _emb(ids, types, w, eps, norm="before")


def emb_eps_ignored(ids, types, w, eps=1e-12):
    return _emb(ids, types, w, 1e-12)


def mask_inverted(attention_mask, dtype=torch.float32):
    return (attention_mask.to(dtype) * torch.finfo(dtype).min)[:, None, None, :]


def mask_zero_one(attention_mask, dtype=torch.float32):
    return attention_mask.to(dtype)[:, None, None, :]


def mask_minus_one(attention_mask, dtype=torch.float32):
    return (attention_mask.to(dtype) - 1)[:, None, None, :]


def mask_inf(attention_mask, dtype=torch.float32):
    return torch.where(attention_mask.bool(), 0.0, float("-inf")).to(dtype)[:, None, None, :]


def mask_queries(attention_mask, dtype=torch.float32):
    return ch11.ref_bert_attention_mask(attention_mask, dtype).transpose(-1, -2)


def mask_flat(attention_mask, dtype=torch.float32):
    return ch11.ref_bert_attention_mask(attention_mask, dtype)[:, 0, 0]


def mask_positive(attention_mask, dtype=torch.float32):
    return -ch11.ref_bert_attention_mask(attention_mask, dtype)


def _layer(**kw):
    def fn(hidden_states, attention_mask, weights, num_heads, eps=1e-12):
        return ch11._layer_variant(hidden_states, attention_mask, weights, num_heads, eps, **kw)

    return fn


def layer_one_head(hidden_states, attention_mask, weights, num_heads, eps=1e-12):
    return ch11._layer_variant(hidden_states, attention_mask, weights, 1, eps)


def layer_mask_ignored(hidden_states, attention_mask, weights, num_heads, eps=1e-12):
    return ch11._layer_variant(hidden_states, None, weights, num_heads, eps)


def _head(**kw):
    def fn(sequence_output, word_embeddings, weights, eps=1e-12):
        return ch11._mlm_variant(sequence_output, word_embeddings, weights, eps, **kw)

    return fn


def mlm_untied(sequence_output, word_embeddings, weights, eps=1e-12):
    """Looks for a decoder matrix of its own, as an untied head would."""
    decoder = weights["decoder.weight"]
    return _head(bias=False)(sequence_output, decoder, weights, eps) + weights["bias"]


def mlm_untied_fresh(sequence_output, word_embeddings, weights, eps=1e-12):
    torch.manual_seed(0)
    decoder = torch.nn.Linear(sequence_output.shape[-1], word_embeddings.shape[0]).to(
        sequence_output.dtype
    )
    eye = torch.eye(sequence_output.shape[-1], dtype=sequence_output.dtype)
    return decoder(_head(bias=False)(sequence_output, eye, weights, eps)).detach()


def mlm_no_transform(sequence_output, word_embeddings, weights, eps=1e-12):
    return sequence_output @ word_embeddings.T + weights["bias"]


PIECE_MISTAKES = [
    ("bert_embeddings", emb_positions_from_one, "position ids start at 1"),
    ("bert_embeddings", emb_no_segments, "segment \\(token_type\\) embeddings are missing"),
    ("bert_embeddings", emb_no_norm, "the LayerNorm is missing"),
    ("bert_embeddings", emb_norm_first, "LayerNorm was applied before the sum"),
    ("bert_embeddings", emb_eps_ignored, "eps argument was ignored"),
    ("bert_attention_mask", mask_inverted, "padding mask is inverted"),
    ("bert_attention_mask", mask_zero_one, "0/1 mask was added to the scores as it is"),
    ("bert_attention_mask", mask_minus_one, "0/1 mask was added to the scores as it is"),
    ("bert_attention_mask", mask_inf, "large but finite negative number"),
    ("bert_attention_mask", mask_queries, "laid out over queries"),
    ("bert_attention_mask", mask_flat, "kept the shape \\(N, L\\)"),
    ("bert_attention_mask", mask_positive, "sign looks flipped"),
    ("bert_encoder_layer", _layer(order="pre"), "pre-LN"),
    ("bert_encoder_layer", _layer(order="after"), "residual was added after the LayerNorm"),
    ("bert_encoder_layer", _layer(gelu=ch11._gelu_tanh), "tanh approximation of GELU"),
    ("bert_encoder_layer", _layer(scale=False), "not divided by sqrt\\(d_head\\)"),
    ("bert_encoder_layer", _layer(gelu=torch.relu), "ReLU was used"),
    ("bert_encoder_layer", layer_one_head, "heads were not split"),
    ("bert_encoder_layer", layer_mask_ignored, "attention_mask was not added"),
    ("bert_mlm_head", mlm_untied, "TIED to the input embeddings"),
    ("bert_mlm_head", _head(bias=False), "output bias is missing"),
    ("bert_mlm_head", _head(norm=False), "transform's LayerNorm is missing"),
    ("bert_mlm_head", _head(gelu=ch11._gelu_tanh), "tanh approximation of GELU"),
    ("bert_mlm_head", _head(gelu=lambda z: z), "GELU of the transform is missing"),
    ("bert_mlm_head", mlm_no_transform, "transform \\(dense, GELU, LayerNorm\\) was skipped"),
]


@pytest.mark.parametrize(
    "ex,fn,pattern", PIECE_MISTAKES, ids=lambda x: getattr(x, "__name__", None)
)
def test_bert_piece_mistake_is_named(ex, fn, pattern):
    for seed in MISTAKE_SEEDS:
        with pytest.raises(cu.CheckFailure, match=pattern):
            cu.check(ex, fn, seed=seed, strict=True)


def test_untied_head_with_a_fresh_decoder_is_rejected():
    with pytest.raises(cu.CheckFailure, match="`logits` is wrong"):
        cu.check("bert_mlm_head", mlm_untied_fresh, strict=True)


# =====================================================================================
# The encoder pieces: judged by transformers where installed, by the references where not
# =====================================================================================
def _judge(ex, fn=None):
    rows = cu.check(ex, fn or cu.reference(ex), strict=True).rows
    return next(r.verdict for r in rows if r.quantity == "judged against")


@pytest.mark.parametrize("ex", BERT_IDS)
def test_bert_pieces_judged_by_transformers_when_installed(ex):
    pytest.importorskip("transformers")
    assert "(transformers)" in _judge(ex)


@pytest.mark.parametrize("ex", BERT_IDS)
def test_bert_pieces_work_without_transformers(ex, monkeypatch):
    monkeypatch.setitem(
        sys.modules, "transformers", None
    )  # `import transformers` now raises ImportError
    assert ch11.hf_bert() is None
    assert "transformers not installed" in _judge(ex)
    mistakes = [(fn, pattern) for e, fn, pattern in PIECE_MISTAKES if e == ex]
    for fn, pattern in mistakes:
        with pytest.raises(cu.CheckFailure, match=pattern):
            cu.check(ex, fn, strict=True)
    for e, fn in CORRECT_PIECES:
        if e == ex:
            assert cu.check(ex, fn, strict=True).passed


@pytest.mark.parametrize("seed", range(3))
def test_references_equal_transformers(seed):
    pytest.importorskip("transformers")
    t = cu.checking.Tester(cu.checking.get_exercise("bert_embeddings"), None, seed)
    w = ch11.embedding_weights(t, 9, 8, 2, 8, torch.float64)
    ids, types = t.randint(9, 3, 6), t.randint(2, 3, 6)
    torch.testing.assert_close(
        ch11.ref_bert_embeddings(ids, types, w), ch11.hf_embeddings(ids, types, w)
    )
    x = t.randn(3, 6, 8)
    lw = ch11.layer_weights(t, 8, 16, torch.float64)
    mask = ch11.ref_bert_attention_mask(ch11.padding(t, 3, 6), torch.float64)
    torch.testing.assert_close(
        ch11.ref_bert_encoder_layer(x, mask, lw, 2), ch11.hf_encoder_layer(x, mask, lw, 2)
    )
    word = t.randn(9, 8)
    mw = ch11.mlm_weights(t, 9, 8, torch.float64)
    torch.testing.assert_close(ch11.ref_bert_mlm_head(x, word, mw), ch11.hf_mlm_head(x, word, mw))
    # the mistakes the batteries name are really different functions
    assert not torch.allclose(
        ch11._layer_variant(x, mask, lw, 2, gelu=ch11._gelu_tanh),
        ch11.hf_encoder_layer(x, mask, lw, 2),
    )


def test_hf_mlm_head_decoder_is_tied():
    pytest.importorskip("transformers")
    m = ch11._hf_module("mlm", torch.float64, vocab=5, hidden=4)
    assert m.cls.predictions.decoder.weight is m.bert.embeddings.word_embeddings.weight


def test_new_exercises_are_listed_with_their_contract_signatures():
    listed = {e.id: e for e in cu.exercises("11")}
    assert listed["bert_embeddings"].arg_names == ("input_ids", "token_type_ids", "weights", "eps")
    assert listed["bert_attention_mask"].arg_names == ("attention_mask", "dtype")
    assert listed["bert_encoder_layer"].arg_names == (
        "hidden_states",
        "attention_mask",
        "weights",
        "num_heads",
        "eps",
    )
    assert listed["bert_mlm_head"].arg_names == (
        "sequence_output",
        "word_embeddings",
        "weights",
        "eps",
    )
