"""Check batteries of chapter 11: BERT's WordPiece tokenizer and its masked-LM corruption.

``wordpiece_tokenize`` is deterministic: it is compared with a reference on hand-made
vocabularies (where greedy longest-match differs from shortest-match and from a search
over every segmentation, unicode, single characters, the ``max_chars`` boundary, a custom
unknown token, empty vocabularies) and on random vocabularies over a small alphabet. A
wrong answer is matched against models of the usual mistakes so the message names it.

``mlm_mask`` is random, so it is judged by properties. Deterministic ones hold on every
call (special tokens never selected, unselected positions unchanged, labels equal to the
original ids where selected, ids inside the vocabulary). Statistical ones (selection rate,
the 80/10/10 split, uniform random ids, no selection shared between rows, a fresh draw on
every call) use the Chernoff bound P(n KL(q || p) > log(2/delta)) <= delta for a mean q of
n iid Bernoulli(p) indicators; each has false-alarm probability ``DELTA`` and one run does
at most ``MAX_STAT_TESTS`` of them, so a correct function fails less than once in 10^6
runs whatever random numbers it draws.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..checking import CheckFailure, Tester, exercise

CHAPTER = "11_bert"
Tensor = torch.Tensor

#: False-alarm probability of each statistical test.
DELTA = 4e-8
#: Upper bound on the statistical tests of one ``mlm_mask`` check (19 today); by the union
#: bound a correct implementation fails with probability at most 25 * 4e-8 = 1e-6.
MAX_STAT_TESTS = 25
FALSE_ALARM = MAX_STAT_TESTS * DELTA
IGNORE = -100


# =========================================================================================
# WordPiece
# =========================================================================================
def ref_wordpiece_tokenize(
    word: str, vocab: set[str], unk_token: str = "[UNK]", max_chars: int = 100
) -> list[str]:
    """Greedy longest-match-first WordPiece of one word; ``[unk_token]`` if it cannot be split."""
    if len(word) > max_chars:
        return [unk_token]
    pieces, start = [], 0
    while start < len(word):
        end = len(word)
        piece = None
        while end > start:  # the longest vocabulary entry that starts at `start`
            sub = word[start:end] if start == 0 else "##" + word[start:end]
            if sub in vocab:
                piece = sub
                break
            end -= 1
        if piece is None:
            return [unk_token]  # no piece fits here: the whole word is unknown
        pieces.append(piece)
        start = end
    return pieces


def _greedy(
    word: str, vocab: set[str], *, longest: bool, prefix_first: bool, prefix_rest: bool
) -> tuple[list[str], bool]:
    """Greedy segmentation with switchable conventions; returns (pieces, complete)."""
    pieces, start = [], 0
    while start < len(word):
        ends = range(len(word), start, -1) if longest else range(start + 1, len(word) + 1)
        piece = None
        for end in ends:
            pre = prefix_rest if start else prefix_first
            sub = ("##" if pre else "") + word[start:end]
            if sub in vocab:
                piece, stop = sub, end
                break
        if piece is None:
            return pieces, False
        pieces.append(piece)
        start = stop
    return pieces, True


def _mistake_models(
    word: str, vocab: set[str], unk: str, max_chars: int
) -> list[tuple[str, list[str]]]:
    """What the usual wrong tokenizers return on this input, each with the sentence naming it."""
    too_long = len(word) > max_chars

    def finish(pieces_complete: tuple[list[str], bool]) -> list[str]:
        pieces, complete = pieces_complete
        return pieces if complete and not too_long else [unk]

    out: list[tuple[str, list[str]]] = [
        (
            "the shortest vocabulary piece was taken at each step; WordPiece is greedy LONGEST-match-first: "
            "from the current position try the whole rest of the word, then drop one character at a time.",
            finish(_greedy(word, vocab, longest=False, prefix_first=False, prefix_rest=True)),
        ),
        (
            'continuation pieces were looked up without the "##" prefix; every piece after the first is '
            'looked up (and returned) as "##" + piece.',
            finish(_greedy(word, vocab, longest=True, prefix_first=False, prefix_rest=False)),
        ),
        (
            'the first piece was given the "##" prefix too; only pieces that continue a word carry "##", '
            "the first piece is looked up bare.",
            finish(_greedy(word, vocab, longest=True, prefix_first=True, prefix_rest=True)),
        ),
        (
            "a search over every segmentation (backtracking) was used; WordPiece commits to the longest "
            "piece at each step and returns [unk_token] when the rest cannot be split, even if another "
            "split of the word exists.",
            _any_segmentation(word, vocab, unk) if not too_long else [unk],
        ),
    ]
    pieces, complete = _greedy(word, vocab, longest=True, prefix_first=False, prefix_rest=True)
    if not complete and not too_long:
        out.append(
            (
                "the pieces found before the failure were returned; when some position has no matching "
                "piece the WHOLE word becomes [unk_token].",
                pieces,
            )
        )
        out.append(
            (
                "the pieces found before the failure were returned followed by [unk_token]; when some "
                "position has no matching piece the whole word is the single token [unk_token].",
                [*pieces, unk],
            )
        )
    if len(word) == max_chars and complete:
        out.append(
            (
                f"a word of exactly max_chars={max_chars} characters was treated as too long; only words "
                "LONGER than max_chars (len(word) > max_chars) become [unk_token].",
                [unk],
            )
        )
    if len(word) == max_chars + 1 and complete:
        out.append(
            (
                f"a word of max_chars + 1 = {max_chars + 1} characters was split; words longer than "
                "max_chars must become [unk_token] (use len(word) > max_chars).",
                pieces,
            )
        )
    if too_long and complete:
        out.append(
            (
                "the max_chars limit was not applied; a word longer than max_chars is [unk_token] "
                "without trying to split it.",
                pieces,
            )
        )
    if unk != "[UNK]":
        ref = ref_wordpiece_tokenize(word, vocab, unk, max_chars)
        out.append(
            (
                'the unknown token is hard-coded as "[UNK]"; return the unk_token argument.',
                ["[UNK]" if p == unk else p for p in ref],
            )
        )
    return out


def _any_segmentation(word: str, vocab: set[str], unk: str) -> list[str]:
    """Some segmentation into vocabulary pieces (longest first piece preferred), found by backtracking."""

    def search(start: int) -> list[str] | None:
        if start == len(word):
            return []
        for end in range(len(word), start, -1):
            sub = word[start:end] if start == 0 else "##" + word[start:end]
            if sub in vocab:
                rest = search(end)
                if rest is not None:
                    return [sub, *rest]
        return None

    found = search(0)
    return [unk] if found is None else found


# Hand-made vocabularies: each line is (what the case shows, vocab, words, unk_token, max_chars).
_TOY = {
    "un",
    "##aff",
    "##able",
    "una",
    "##ff",
    "##a",
    "aff",
    "able",
    "##ble",
    "##b",
    "u",
    "##n",
    "##l",
    "##e",
}
_CASES: list[tuple[str, set[str], list[str], str, int]] = [
    (
        "BERT-style pieces",
        _TOY,
        ["unaffable", "unable", "affable", "able", "un", "u", "unaf"],
        "[UNK]",
        100,
    ),
    (
        "greedy longest differs from shortest",
        {"a", "ab", "abc", "##b", "##c", "##bc", "##d", "##cd"},
        ["abcd", "abc", "ab", "abd", "acd"],
        "[UNK]",
        100,
    ),
    (
        "greedy fails where another split exists",
        {"abc", "a", "##bcd", "##x", "he", "hel", "##llo", "##lo"},
        ["abcd", "hello", "abcx", "ax"],
        "[UNK]",
        100,
    ),
    (
        'continuation needs "##"',
        {"ab", "cd", "##cd", "x", "##y"},
        ["abab", "abcd", "cdcd", "xy", "xx", "yx"],
        "[UNK]",
        100,
    ),
    ('only "##" pieces', {"##ab", "##cd", "##a"}, ["abcd", "ab", "a"], "[UNK]", 100),
    (
        "single characters",
        {"a", "b", "##a", "##b", "é", "中"},
        ["a", "b", "z", "é", "中", "ab", "ba", "aab"],
        "[UNK]",
        100,
    ),
    (
        "unicode (accents, CJK, emoji)",
        {
            "caf",
            "##é",
            "café",
            "na",
            "##ïve",
            "##ï",
            "##ve",
            "東京",
            "東",
            "##京",
            "##都",
            "🙂",
            "##🙂",
        },
        ["café", "cafe", "naïve", "東京都", "東都", "🙂🙂", "京"],
        "[UNK]",
        100,
    ),
    ("custom unk_token", {"ab", "##c"}, ["abc", "abd", "xyz", "ab"], "<unk>", 100),
    ("empty vocabulary", set(), ["a", "word"], "[UNK]", 100),
    (
        "max_chars boundary",
        {"ab", "##ab", "a", "##a"},
        ["ababa", "ababab", "abababa", "abab", "a"],
        "[UNK]",
        5,
    ),
    ("max_chars=1", {"a", "##a"}, ["a", "aa"], "<oov>", 1),
    (
        "default max_chars=100",
        {"ab", "##ab", "##abab", "x", "##y"},
        ["ab" * 50, "ab" * 50 + "a", "x" + "y" * 99, "x" + "y" * 100, "x" + "y" * 101],
        "[UNK]",
        100,
    ),
]


def _random_vocab_cases(
    t: Tester, n_vocabs: int = 30, n_words: int = 12
) -> list[tuple[str, set[str], list[str], str, int]]:
    """Random vocabularies and words over {a, b, c}: many chances for the conventions to disagree."""
    rng = random.Random(int(t.randint(2**31 - 1, 1)))
    cases = []
    for k in range(n_vocabs):
        vocab = set()
        for _ in range(rng.randint(2, 10)):
            piece = "".join(rng.choice("abc") for _ in range(rng.randint(1, 3)))
            vocab.add(piece if rng.random() < 0.4 else "##" + piece)
        words = [
            "".join(rng.choice("abc") for _ in range(rng.randint(1, 7))) for _ in range(n_words)
        ]
        max_chars = rng.choice([100, 4, 5, 6])
        cases.append((f"random vocabulary {k}", vocab, words, "[UNK]", max_chars))
    return cases


def _judge_word(
    t: Tester, label: str, word: str, vocab: set[str], unk: str, max_chars: int, how: str
) -> None:
    case = f"{label}: word {word if len(word) <= 12 else word[:10] + '...'!r} (len {len(word)}), vocab of {len(vocab)}"
    if unk != "[UNK]":
        case += f", unk_token={unk!r}"
    if max_chars != 100:
        case += f", max_chars={max_chars}"
    frozen = set(vocab)
    if how == "defaults":
        got = t.call(case, word, vocab)
    elif how == "keywords":
        got = t.call(case, word, vocab, unk_token=unk, max_chars=max_chars)
    else:
        got = t.call(case, word, vocab, unk, max_chars)
    if vocab != frozen:
        t.fail(case, "the function changed the vocab set it was given; it must only read it.")
    if not isinstance(got, list) or not all(isinstance(p, str) for p in got):
        t.fail(
            case,
            f"wordpiece_tokenize should return a list of strings, but it returned {got!r:.80}.",
        )
    want = ref_wordpiece_tokenize(word, vocab, unk, max_chars)
    if got == want:
        return
    t.fail(
        case,
        f"expected {want}, got {got}.{_diagnose_wordpiece(t, word, vocab, unk, max_chars, got, want)}",
    )


def _key(sentence: str) -> str:
    """A mistake's name that does not depend on the case (sentences quote max_chars after an "=")."""
    return sentence.split("=")[0][:60]


def _diagnose_wordpiece(
    t: Tester, word: str, vocab: set[str], unk: str, max_chars: int, got: list[str], want: list[str]
) -> str:
    """Name the mistake model that explains this answer; prefer one that explains every hand-made case."""
    candidates = [
        s for s, alt in _mistake_models(word, vocab, unk, max_chars) if alt == got and alt != want
    ]
    if not candidates:
        return ""
    inputs = [(w, v, u, m) for _, v, ws, u, m in _CASES for w in ws]
    answers = []
    for w, v, u, m in inputs:
        try:
            answers.append(t.fn(w, set(v), u, m))
        except Exception:  # noqa: BLE001 - a crash elsewhere just leaves the first candidate
            return f" It looks like {candidates[0]}"
    for sentence in candidates:
        agrees = True
        for (w, v, u, m), answer in zip(inputs, answers, strict=True):
            models = {_key(s): alt for s, alt in _mistake_models(w, v, u, m)}
            model = models.get(_key(sentence), ref_wordpiece_tokenize(w, v, u, m))
            if model != answer:
                agrees = False
                break
        if agrees:
            return f" It looks like {sentence}"
    return f" It looks like {candidates[0]}"


@exercise(
    "wordpiece_tokenize",
    chapter=CHAPTER,
    signature='(word: str, vocab: set[str], unk_token="[UNK]", max_chars=100) -> list[str]',
    summary='greedy longest-match-first WordPiece; continuation pieces carry "##"; a word with no full '
    "segmentation, or longer than max_chars, is [unk_token]",
    reference=ref_wordpiece_tokenize,
)
def check_wordpiece_tokenize(t: Tester) -> None:
    """Hand-made vocabularies (every convention and edge case), then random ones, against the reference."""
    n = 0
    for i, (label, vocab, words, unk, max_chars) in enumerate(_CASES):
        for j, word in enumerate(words):
            defaults = unk == "[UNK]" and max_chars == 100
            how = (
                "defaults"
                if defaults and (i + j) % 2 == 0
                else ("keywords" if j % 2 else "positional")
            )
            _judge_word(t, label, word, vocab, unk, max_chars, how)
            n += 1
        t.ok(label, f"{len(words)} words", "ok (same pieces as the reference)")
    m = 0
    for label, vocab, words, unk, max_chars in _random_vocab_cases(t):
        for word in words:
            _judge_word(
                t,
                label,
                word,
                vocab,
                unk,
                max_chars,
                "keywords" if max_chars != 100 else "defaults",
            )
            m += 1
    t.ok("random vocabularies over {a, b, c}", f"{m} words", "ok (same pieces as the reference)")


# =========================================================================================
# Masked-LM corruption
# =========================================================================================
def ref_mlm_mask(
    input_ids: Tensor,
    special_mask: Tensor,
    vocab_size: int,
    mask_token_id: int,
    mlm_prob: float = 0.15,
) -> tuple[Tensor, Tensor]:
    """BERT's corruption: select non-special tokens w.p. mlm_prob; 80% [MASK], 10% random, 10% kept."""
    selected = (torch.rand(input_ids.shape) < mlm_prob) & ~special_mask  # (N, L) bool
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE))
    u = torch.rand(input_ids.shape)  # one more uniform decides what a selected token becomes
    random_ids = torch.randint(0, vocab_size, input_ids.shape, dtype=input_ids.dtype)
    out = torch.where(selected & (u < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    out = torch.where(selected & (u >= 0.8) & (u < 0.9), random_ids, out)
    return out, labels


def _kl(q: float, p: float) -> float:
    """KL divergence between Bernoulli(q) and Bernoulli(p)."""

    def term(a: float, b: float) -> float:
        if a == 0:
            return 0.0
        return math.inf if b == 0 else a * math.log(a / b)

    return term(q, p) + term(1 - q, 1 - p)


def chernoff_ok(k: int, n: int, p: float, delta: float = DELTA) -> bool:
    """False when k successes in n Bernoulli(p) trials are too far from n p: an event of probability <= delta."""
    if n == 0:
        return True
    return n * _kl(k / n, p) <= math.log(2 / delta)


def _fast_interval(n: int, p: float, delta: float = DELTA) -> tuple[float, float]:
    """chernoff_interval by bisection (n can be large)."""
    c = math.log(2 / delta)

    def edge(a: float, b: float) -> float:  # a is inside the interval, b outside
        for _ in range(60):
            mid = (a + b) / 2
            if n * _kl(mid, p) <= c:
                a = mid
            else:
                b = mid
        return a

    return edge(p, 0.0), edge(p, 1.0)


def _inputs(
    t: Tester, n: int, length: int, vocab_size: int, mask_id: int, special_ids: tuple[int, ...]
) -> tuple[Tensor, Tensor]:
    """Sequences "[CLS] ... [SEP] ... [SEP] [PAD]*" with ids that avoid mask_id; and their special mask."""
    ids = t.randint(vocab_size - 1, n, length)
    ids = ids + (ids >= mask_id).long()  # uniform over the vocabulary without the mask id
    special = torch.zeros(n, length, dtype=torch.bool)
    cls, sep, pad = special_ids
    for i in range(n):
        used = length - int(t.randint(max(length // 5, 1), 1))
        mid = max(1, min(used - 2, 1 + int(t.randint(max(used - 2, 1), 1))))
        for pos, tok in ((0, cls), (mid, sep), (used - 1, sep)):
            ids[i, pos] = tok
            special[i, pos] = True
        ids[i, used:] = pad
        special[i, used:] = True
    return ids, special


def _call_mlm(
    t: Tester,
    case: str,
    ids: Tensor,
    special: Tensor,
    vocab: int,
    mask_id: int,
    prob: float | None,
    how: str,
) -> tuple[Tensor, Tensor]:
    if prob is None:
        got = t.call(case, ids, special, vocab, mask_id)
    elif how == "keyword":
        got = t.call(case, ids, special, vocab, mask_id, mlm_prob=prob)
    else:
        got = t.call(case, ids, special, vocab, mask_id, prob)
    out, labels = t.unpack(case, got, ("masked_ids", "labels"))
    out = t.expect_tensor(case, "masked_ids", out, shape=ids.shape, dtype=torch.int64).detach()
    labels = t.expect_tensor(case, "labels", labels, shape=ids.shape, dtype=torch.int64).detach()
    return out, labels


def _judge_structure(
    t: Tester, case: str, ids: Tensor, special: Tensor, out: Tensor, labels: Tensor, vocab: int
) -> Tensor:
    """The properties every single call must have; returns the selected mask (labels != -100)."""
    selected = labels != IGNORE
    if bool(selected.all()):
        differ = labels[labels != ids]
        if differ.numel() == 0:
            hint = " It looks like the labels were set everywhere (labels = input_ids)."
        else:
            fill = int(differ.mode().values)
            hint = f" It looks like unselected positions were filled with {fill} instead of -100."
        t.fail(
            case,
            "no label is -100: labels must be -100 at every position that was not selected (and at "
            f"special tokens), so that the loss ignores them.{hint}",
        )
    wrong = selected & (labels != ids)
    if bool(wrong.any()):
        idx = tuple(int(v) for v in wrong.nonzero()[0])
        hint = ""
        if bool((labels[wrong] == out[wrong]).all()):
            hint = (
                " It looks like the labels hold the corrupted ids (the [MASK] or random id); they must "
                "hold the ORIGINAL id, which is what the model has to predict."
            )
        t.fail(
            case,
            f"`labels` at {idx} is {int(labels[idx])} but the original id there is {int(ids[idx])}: where a "
            f"token is selected (label != -100) its label is the original id.{hint}",
        )
    if bool((selected & special).any()):
        frac_special = float((selected & special).sum()) / max(int(special.sum()), 1)
        frac_plain = float((selected & ~special).sum()) / max(int((~special).sum()), 1)
        t.fail(
            case,
            f"{int((selected & special).sum())} special tokens ([CLS], [SEP], [PAD]) have a label; special "
            "tokens are never selected (use ~special_mask when choosing positions)."
            + f" ({frac_special:.0%} of special and {frac_plain:.0%} of ordinary tokens were selected.)",
        )
    changed = ~selected & (out != ids)
    if bool(changed.any()):
        n_sp = int((changed & special).sum())
        if n_sp == int(changed.sum()):
            t.fail(
                case,
                f"{n_sp} special tokens were changed in masked_ids; special tokens must stay exactly as they are.",
            )
        ordinary = ~selected & ~special
        frac = float((changed & ordinary).sum()) / max(int(ordinary.sum()), 1)
        hint = ""
        if frac > 0.75:
            hint = (
                f" {frac:.0%} of the unselected positions changed: it looks like the 80/10/10 replacement was "
                "applied to every token rather than only to the selected ones."
            )
        else:
            hint = (
                " The positions that are replaced must be exactly those with a label (use the same selection "
                "mask for labels and for the replacement)."
            )
        idx = tuple(int(v) for v in changed.nonzero()[0])
        t.fail(
            case,
            f"`masked_ids` at {idx} changed from {int(ids[idx])} to {int(out[idx])} although its label is -100 "
            f"(not selected); unselected positions keep their id.{hint}",
        )
    bad = (out < 0) | (out >= vocab)
    if bool(bad.any()):
        idx = tuple(int(v) for v in bad.nonzero()[0])
        t.fail(
            case,
            f"`masked_ids` at {idx} is {int(out[idx])}, outside the vocabulary [0, {vocab}); random "
            f"replacements are drawn uniformly from 0 .. vocab_size - 1 (torch.randint(0, vocab_size, ...)).",
        )
    t.ok(case, "special untouched, labels = original ids, unselected unchanged, ids in range")
    return selected


def _stat(
    t: Tester,
    case: str,
    quantity: str,
    k: int,
    n: int,
    p: float,
    hint: Callable[[float], str] = lambda q: "",
) -> None:
    q = k / max(n, 1)
    lo, hi = _fast_interval(n, p)
    if not chernoff_ok(k, n, p):
        t.fail(
            case,
            f"{quantity} is {q:.4f} over {n} positions; a correct mlm_mask gives {p:.4f}, within "
            f"[{lo:.4f}, {hi:.4f}] except once in {1 / DELTA:.0e} runs.{hint(q)}",
        )
    t.ok(case, quantity, f"ok ({q:.4f}, expected {p:.4f}, bound [{lo:.4f}, {hi:.4f}])")


def _judge_rate(t: Tester, case: str, selected: Tensor, special: Tensor, prob: float) -> None:
    plain = ~special
    k, n = int((selected & plain).sum()), int(plain.sum())

    def hint(q: float) -> str:
        if abs(q - 0.15) < 0.02 and abs(prob - 0.15) > 0.05:
            return " It looks like mlm_prob was ignored (0.15 hard-coded)."
        if abs(q - (1 - prob)) < 0.03:
            return " It looks like mlm_prob was used as the probability of NOT selecting a token."
        return ""

    _stat(t, case, "fraction of ordinary tokens selected", k, n, prob, hint)


def _judge_split(
    t: Tester, case: str, ids: Tensor, out: Tensor, selected: Tensor, vocab: int, mask_id: int
) -> None:
    """Among selected tokens: [MASK] 0.8 + 0.1/V, kept 0.1 + 0.1/V, another id 0.1 (1 - 2/V)."""
    n = int(selected.sum())
    o, x = out[selected], ids[selected]
    k_mask = int((o == mask_id).sum())
    k_kept = int((o == x).sum())
    k_other = n - k_mask - k_kept
    q_mask, q_kept = k_mask / max(n, 1), k_kept / max(n, 1)
    q_other = k_other / max(n, 1)

    def split_hint(_: float) -> str:
        if q_mask > 0.97:
            return " Every selected token became [MASK]: 10% must get a random id and 10% stay unchanged."
        if q_kept < 0.05 and q_other > 0.12:
            return " It looks like 80/20/0: 20% random ids and none left unchanged; BERT keeps 10% as they are."
        if q_other < 0.03 and q_kept > 0.15:
            return " It looks like 80/0/20: no random ids; 10% of the selected tokens get a uniformly random id."
        if abs(q_mask - 0.8) > 0.1 and abs(q_mask - 0.8 * 0.15) < 0.05:
            return " It looks like 80/10/10 was applied with mlm_prob-scaled thresholds; apply it to the selected tokens."
        return (
            " Draw one more uniform number u per selected token: u < 0.8 -> [MASK], 0.8 <= u < 0.9 -> a random id, "
            "u >= 0.9 -> unchanged (or, as Hugging Face does, [MASK] w.p. 0.8, then random w.p. 0.5 of the rest)."
        )

    _stat(
        t,
        case,
        "fraction of selected tokens that are [MASK]",
        k_mask,
        n,
        0.8 + 0.1 / vocab,
        split_hint,
    )
    _stat(
        t,
        case,
        "fraction of selected tokens left unchanged",
        k_kept,
        n,
        0.1 + 0.1 / vocab,
        split_hint,
    )
    _stat(
        t,
        case,
        "fraction of selected tokens given another id",
        k_other,
        n,
        0.1 * (1 - 2 / vocab),
        split_hint,
    )


def _judge_uniform(
    t: Tester, case: str, ids: Tensor, out: Tensor, selected: Tensor, vocab: int, mask_id: int
) -> None:
    """For each id v other than [MASK]: P(selected token with original != v becomes v) = 0.1 / V."""
    o, x = out[selected], ids[selected]
    for v in range(vocab):
        if v == mask_id:
            continue
        eligible = x != v
        n, k = int(eligible.sum()), int((o[eligible] == v).sum())

        def hint(q: float, v: int = v) -> str:
            if q == 0:
                return (
                    f" No selected token was ever replaced by id {v}: random ids must cover the whole range "
                    f"0 .. vocab_size - 1 = {vocab - 1} (torch.randint's upper bound is exclusive: use vocab_size)."
                )
            return " Random replacement ids must be uniform over the whole vocabulary."

        _stat(t, case, f"P(selected token becomes id {v})", k, n, 0.1 / vocab, hint)


def _judge_rows_independent(
    t: Tester, case: str, selected: Tensor, special: Tensor, prob: float, *, only_high: bool = False
) -> None:
    """Rows 2k and 2k+1: where both are ordinary tokens, P(both selected) = prob^2.

    With ``only_high`` it fails only on too MANY joint selections (a shared mask); the same
    statistic is judged in full later, after the selection rate, so it is one test, not two.
    """
    a, b = selected[0::2], selected[1::2]
    both_plain = ~special[0::2] & ~special[1::2]
    n = int(both_plain.sum())
    k = int((a & b & both_plain).sum())

    def hint(q: float) -> str:
        if q > prob * 0.9:
            return " It looks like one selection is shared by every row (a mask of shape (L,) broadcast); draw one per token."
        return ""

    if only_high:
        if k / max(n, 1) > prob * prob and not chernoff_ok(k, n, prob * prob):
            _stat(t, case, "P(same column selected in two rows)", k, n, prob * prob, hint)
        return
    _stat(t, case, "P(same column selected in two rows)", k, n, prob * prob, hint)


def _check_deterministic(t: Tester) -> None:
    # mlm_prob = 0 selects nothing; mlm_prob = 1 selects every ordinary token. Small shapes, N=1 and L=1 included.
    for n, length, vocab, mask_id in ((1, 1, 5, 4), (2, 7, 11, 0), (3, 12, 30, 29)):
        ids = t.randint(vocab - 1, n, length)
        ids = ids + (ids >= mask_id).long()
        special = t.rand(n, length) < 0.3
        special[:, 0] = length > 1  # a [CLS] in front, except in the one-token case
        for prob in (0.0, 1.0):
            case = f"input_ids ({n}, {length}), vocab_size={vocab}, mask_token_id={mask_id}, mlm_prob={prob}"
            out, labels = _call_mlm(t, case, ids, special, vocab, mask_id, prob, "keyword")
            if length > 1:
                _judge_structure(t, case, ids, special, out, labels, vocab)
            if prob == 0.0:
                if bool((labels != IGNORE).any()) or not torch.equal(out, ids):
                    frac = float((labels != IGNORE).sum()) / max(int((~special).sum()), 1)
                    hint = ""
                    if 0 < frac < 0.5:
                        hint = " It looks like mlm_prob was ignored."
                    elif frac >= 0.5:
                        hint = " It looks like mlm_prob was used as the probability of NOT selecting a token."
                    t.fail(
                        case,
                        "with mlm_prob=0 nothing is selected: labels are all -100 and masked_ids equals "
                        f"input_ids, but {frac:.0%} of the ordinary tokens had a label.{hint}",
                    )
                t.ok(case, "nothing selected")
                continue
            want = torch.where(special, torch.full_like(ids, IGNORE), ids)
            if not torch.equal(labels, want):
                frac = float((labels != IGNORE).sum()) / max(int((~special).sum()), 1)
                hint = " It looks like mlm_prob was ignored." if frac < 0.5 else ""
                t.fail(
                    case,
                    f"with mlm_prob=1 every ordinary token is selected, so labels equal input_ids except -100 at "
                    f"special tokens; {frac:.0%} of the ordinary tokens had their label.{hint}",
                )
            if bool((out[special] != ids[special]).any()):
                t.fail(
                    case, "special tokens were changed in masked_ids; they must stay as they are."
                )
            t.ok(case, "every ordinary token selected, specials untouched")


def _check_statistics(t: Tester) -> None:
    # Case 1: small vocabulary, high mlm_prob: the 80/10/10 split, uniform random ids, rows independent.
    vocab, mask_id, prob = 8, 3, 0.6
    ids, special = _inputs(t, 50, 200, vocab, mask_id, (1, 2, 0))
    case = f"input_ids (50, 200), vocab_size={vocab}, mask_token_id={mask_id}, mlm_prob={prob}"
    out, labels = _call_mlm(t, case, ids, special, vocab, mask_id, prob, "positional")
    selected = _judge_structure(t, case, ids, special, out, labels, vocab)
    _judge_rows_independent(t, case, selected, special, prob, only_high=True)
    _judge_rate(t, case, selected, special, prob)
    _judge_rows_independent(t, case, selected, special, prob)
    _judge_split(t, case, ids, out, selected, vocab, mask_id)
    _judge_uniform(t, case, ids, out, selected, vocab, mask_id)

    # Case 2: the default mlm_prob (0.15), a BERT-like mask id in a larger vocabulary.
    vocab, mask_id = 1000, 103
    ids, special = _inputs(t, 40, 128, vocab, mask_id, (101, 102, 0))
    case = f"input_ids (40, 128), vocab_size={vocab}, mask_token_id={mask_id}, mlm_prob left at its default"
    out, labels = _call_mlm(t, case, ids, special, vocab, mask_id, None, "")
    selected = _judge_structure(t, case, ids, special, out, labels, vocab)
    _judge_rate(t, case, selected, special, 0.15)

    # Case 3: mlm_prob=0.35 as a keyword.
    vocab, mask_id, prob = 50, 0, 0.35
    ids, special = _inputs(t, 32, 160, vocab, mask_id, (1, 2, 3))
    case = f"input_ids (32, 160), vocab_size={vocab}, mask_token_id={mask_id}, mlm_prob={prob} (keyword)"
    out, labels = _call_mlm(t, case, ids, special, vocab, mask_id, prob, "keyword")
    selected = _judge_structure(t, case, ids, special, out, labels, vocab)
    _judge_rate(t, case, selected, special, prob)
    _judge_split(t, case, ids, out, selected, vocab, mask_id)

    # Case 4: a small mlm_prob.
    vocab, mask_id, prob = 20, 19, 0.05
    ids, special = _inputs(t, 20, 150, vocab, mask_id, (0, 1, 2))
    case = f"input_ids (20, 150), vocab_size={vocab}, mask_token_id={mask_id}, mlm_prob={prob}"
    out, labels = _call_mlm(t, case, ids, special, vocab, mask_id, prob, "positional")
    selected = _judge_structure(t, case, ids, special, out, labels, vocab)
    _judge_rate(t, case, selected, special, prob)

    # Two calls on the same input must draw afresh: selections agree at rate p^2, not p.
    vocab, mask_id, prob = 30, 5, 0.5
    ids, special = _inputs(t, 16, 100, vocab, mask_id, (1, 2, 0))
    case = f"input_ids (16, 100), vocab_size={vocab}, mlm_prob={prob}, two calls on the same input"
    _, lab1 = _call_mlm(t, case + " (first)", ids, special, vocab, mask_id, prob, "positional")
    _, lab2 = _call_mlm(t, case + " (second)", ids, special, vocab, mask_id, prob, "positional")
    plain = ~special
    s1, s2 = (lab1 != IGNORE) & plain, (lab2 != IGNORE) & plain
    if torch.equal(s1, s2):
        t.fail(
            case,
            "both calls selected exactly the same positions: draw new random numbers on every call (no cached "
            "mask, no torch.manual_seed inside the function).",
        )
    _stat(
        t,
        case,
        "P(position selected by both calls)",
        int((s1 & s2).sum()),
        int(plain.sum()),
        prob * prob,
    )


@exercise(
    "mlm_mask",
    chapter=CHAPTER,
    signature="(input_ids (N,L) int64, special_mask (N,L) bool, vocab_size, mask_token_id, mlm_prob=0.15) "
    "-> (masked_ids, labels)",
    summary="BERT's masked-LM corruption: select non-special tokens w.p. mlm_prob; of those 80% [MASK], "
    "10% random id, 10% unchanged; labels = original id where selected, -100 elsewhere",
    reference=ref_mlm_mask,
)
def check_mlm_mask(t: Tester) -> None:
    """The statistical battery on four cases and two repeated calls, then mlm_prob 0 and 1 exactly."""
    _check_statistics(t)
    _check_deterministic(t)


# =========================================================================================
# The encoder, piece by piece: embeddings, padding mask, post-LN layer, tied MLM head
# =========================================================================================
# Each function takes its weights as a dict whose keys are the state_dict names of the
# Hugging Face module it rebuilds, so `hf_module.state_dict()` can be passed as it is. The
# batteries draw random weights (biases and LayerNorm parameters far from their initial
# 0 and 1, so that a forgotten bias shows) and judge against transformers' own modules in
# float64 and eval mode when transformers is installed, and against the references below
# otherwise; the reference and transformers are held equal by the chapter's tests.

EMBEDDING_KEYS = (
    "word_embeddings.weight",
    "position_embeddings.weight",
    "token_type_embeddings.weight",
    "LayerNorm.weight",
    "LayerNorm.bias",
)
LAYER_KEYS = tuple(
    f"{module}.{p}"
    for module in (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "attention.output.LayerNorm",
        "intermediate.dense",
        "output.dense",
        "output.LayerNorm",
    )
    for p in ("weight", "bias")
)
MLM_KEYS = (
    "transform.dense.weight",
    "transform.dense.bias",
    "transform.LayerNorm.weight",
    "transform.LayerNorm.bias",
    "bias",
)
#: What ref_bert_attention_mask puts at padding, and the most an answer may put there.
PAD_LIMIT = -1e4


def _gelu(x: Tensor) -> Tensor:
    """The exact GELU, x Phi(x), which is BERT's "gelu" (hidden_act="gelu" in transformers)."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _gelu_tanh(x: Tensor) -> Tensor:
    """The tanh approximation of GELU (GPT-2's "gelu_new"); not what BERT's contract asks for."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _ln(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last dim with the biased variance."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _linear(x: Tensor, w: dict[str, Tensor], name: str) -> Tensor:
    """nn.Linear's layout: weight (out, in), y = x W^T + b."""
    return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]


def ref_bert_embeddings(
    input_ids: Tensor, token_type_ids: Tensor, weights: dict[str, Tensor], eps: float = 1e-12
) -> Tensor:
    """LN(word[ids] + position[0..L-1] + token_type[segments]) in eval mode (no dropout): (N, L, d)."""
    length = input_ids.shape[1]
    x = (
        weights["word_embeddings.weight"][input_ids]  # (N, L, d)
        + weights["position_embeddings.weight"][:length]  # (L, d), broadcast over N
        + weights["token_type_embeddings.weight"][token_type_ids]  # (N, L, d)
    )
    return _ln(x, weights["LayerNorm.weight"], weights["LayerNorm.bias"], eps)


def ref_bert_attention_mask(attention_mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(N, L) of 1 (real) / 0 (padding) -> additive (N, 1, 1, L): 0 at real keys, finfo(dtype).min at padding."""
    keep = attention_mask.to(dtype)  # bool, int or float all become 1.0 / 0.0
    return ((1.0 - keep) * torch.finfo(dtype).min)[:, None, None, :]


def _attention(
    x: Tensor, mask: Tensor | None, w: dict[str, Tensor], heads: int, *, scale: bool = True
) -> Tensor:
    n, length, d = x.shape
    dh = d // heads

    def split(name: str) -> Tensor:
        return _linear(x, w, f"attention.self.{name}").view(n, length, heads, dh).transpose(1, 2)

    q, k, v = split("query"), split("key"), split("value")  # (N, h, L, dh)
    scores = q @ k.transpose(-2, -1)  # (N, h, L, L)
    if scale:
        scores = scores / math.sqrt(dh)
    if mask is not None:
        scores = scores + mask  # (N, 1, 1, L): one row of key penalties per sequence
    context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, length, d)  # (N, L, d)
    return _linear(context, w, "attention.output.dense")


def _layer_variant(
    x: Tensor,
    mask: Tensor | None,
    w: dict[str, Tensor],
    heads: int,
    eps: float = 1e-12,
    *,
    order: str = "post",
    gelu: Callable[[Tensor], Tensor] = _gelu,
    scale: bool = True,
) -> Tensor:
    """The post-LN layer and the usual ways of getting it wrong (order: post, pre, after)."""

    def ln(y: Tensor, name: str) -> Tensor:
        return _ln(y, w[f"{name}.weight"], w[f"{name}.bias"], eps)

    def ffn(y: Tensor) -> Tensor:
        return _linear(gelu(_linear(y, w, "intermediate.dense")), w, "output.dense")

    attn_ln, out_ln = "attention.output.LayerNorm", "output.LayerNorm"
    if order == "pre":  # GPT-2's order: normalise the sublayer's input, add the raw residual
        h = x + _attention(ln(x, attn_ln), mask, w, heads, scale=scale)
        return h + ffn(ln(h, out_ln))
    if order == "after":  # normalise the sublayer's output, then add the residual
        h = ln(_attention(x, mask, w, heads, scale=scale), attn_ln) + x
        return ln(ffn(h), out_ln) + h
    h = ln(x + _attention(x, mask, w, heads, scale=scale), attn_ln)  # (N, L, d)
    return ln(h + ffn(h), out_ln)


def ref_bert_encoder_layer(
    hidden_states: Tensor,
    attention_mask: Tensor | None,
    weights: dict[str, Tensor],
    num_heads: int,
    eps: float = 1e-12,
) -> Tensor:
    """One post-LN BERT layer in eval mode: H = LN(X + Attn(X)), Y = LN(H + FFN(H)), exact GELU."""
    return _layer_variant(hidden_states, attention_mask, weights, num_heads, eps)


def _mlm_variant(
    seq: Tensor,
    word: Tensor,
    w: dict[str, Tensor],
    eps: float = 1e-12,
    *,
    norm: bool = True,
    bias: bool = True,
    gelu: Callable[[Tensor], Tensor] = _gelu,
) -> Tensor:
    t = gelu(_linear(seq, w, "transform.dense"))  # (N, L, d)
    if norm:
        t = _ln(t, w["transform.LayerNorm.weight"], w["transform.LayerNorm.bias"], eps)
    logits = t @ word.T  # (N, L, V): the decoder IS the token embedding table
    return logits + w["bias"] if bias else logits


def ref_bert_mlm_head(
    sequence_output: Tensor, word_embeddings: Tensor, weights: dict[str, Tensor], eps: float = 1e-12
) -> Tensor:
    """MLM logits: LN(GELU(x W_t^T + b_t)) @ word_embeddings^T + bias, shape (N, L, V)."""
    return _mlm_variant(sequence_output, word_embeddings, weights, eps)


# ---- transformers, where it is installed ----------------------------------------------------
_HF_MODULES: dict[tuple, Any] = {}


def hf_bert() -> Any:
    """transformers' modeling_bert module, or None where transformers is not installed."""
    try:
        import transformers  # noqa: F401 - only to learn whether it is there
        from transformers.models.bert import modeling_bert
    except ImportError:
        return None
    return modeling_bert


def _hf_module(kind: str, dtype: torch.dtype, eps: float = 1e-12, **sizes: int) -> Any:
    """A tiny transformers BERT module (built once per size, in eval mode, eager attention), or None."""
    mb = hf_bert()
    if mb is None:
        return None
    key = (kind, dtype, eps, tuple(sorted(sizes.items())))
    if key not in _HF_MODULES:
        config = mb.BertConfig(
            vocab_size=sizes.get("vocab", 8),
            hidden_size=sizes["hidden"],
            num_hidden_layers=1,
            num_attention_heads=sizes.get("heads", 1),
            intermediate_size=sizes.get("ffn", 4),
            max_position_embeddings=sizes.get("positions", 8),
            type_vocab_size=sizes.get("types", 2),
            hidden_act="gelu",
            layer_norm_eps=eps,
        )
        config._attn_implementation = "eager"  # scores + additive mask, as the contract states
        build = {
            "embeddings": mb.BertEmbeddings,
            "layer": mb.BertLayer,
            "mlm": mb.BertForMaskedLM,
        }[kind]
        _HF_MODULES[key] = build(config).to(dtype).eval()
    return _HF_MODULES[key]


def _load(module: Any, weights: dict[str, Tensor]) -> Any:
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(weights[name])
    return module


def hf_embeddings(
    input_ids: Tensor, token_type_ids: Tensor, weights: dict[str, Tensor], eps: float = 1e-12
) -> Tensor | None:
    """transformers.BertEmbeddings with these weights (eval mode), or None without transformers."""
    (v, d), p, s = (
        weights["word_embeddings.weight"].shape,
        *(
            weights[k].shape[0]
            for k in ("position_embeddings.weight", "token_type_embeddings.weight")
        ),
    )
    dtype = weights["LayerNorm.weight"].dtype
    m = _hf_module("embeddings", dtype, eps, vocab=v, hidden=d, positions=p, types=s)
    if m is None:
        return None
    with torch.no_grad():
        return _load(m, weights)(input_ids=input_ids, token_type_ids=token_type_ids)


def hf_encoder_layer(
    hidden: Tensor, mask: Tensor | None, weights: dict[str, Tensor], heads: int, eps: float = 1e-12
) -> Tensor | None:
    """transformers.BertLayer with these weights and this additive mask, or None without transformers."""
    ffn, d = weights["intermediate.dense.weight"].shape
    m = _hf_module("layer", hidden.dtype, eps, hidden=d, heads=heads, ffn=ffn)
    if m is None:
        return None
    with torch.no_grad():
        out = _load(m, weights)(hidden, attention_mask=mask)
    return out[0] if isinstance(out, tuple) else out


def hf_mlm_head(
    seq: Tensor, word: Tensor, weights: dict[str, Tensor], eps: float = 1e-12
) -> Tensor | None:
    """transformers.BertForMaskedLM's head (decoder tied to the word embeddings), or None."""
    v, d = word.shape
    m = _hf_module("mlm", seq.dtype, eps, vocab=v, hidden=d)
    if m is None:
        return None
    pred = m.cls.predictions
    with torch.no_grad():
        m.bert.embeddings.word_embeddings.weight.copy_(word)
        _load(
            pred,
            {k: weights[k] for k in MLM_KEYS}
            | {"decoder.weight": word, "decoder.bias": weights["bias"]},
        )
        return m.cls(seq)


def _judge_name() -> str:
    return (
        "transformers"
        if hf_bert() is not None
        else "the course's reference (transformers not installed)"
    )


# ---- inputs ------------------------------------------------------------------------------
def _lin(t: Tester, out: int, inp: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return t.randn(out, inp, dtype=dtype, scale=inp**-0.5), t.randn(out, dtype=dtype, scale=0.3)


def _norm(t: Tester, d: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return 1.0 + t.randn(d, dtype=dtype, scale=0.3), t.randn(d, dtype=dtype, scale=0.3)


def embedding_weights(
    t: Tester, v: int, p: int, s: int, d: int, dtype: torch.dtype
) -> dict[str, Tensor]:
    """Random BertEmbeddings weights, keyed as its state_dict."""
    g, b = _norm(t, d, dtype)
    return dict(
        zip(
            EMBEDDING_KEYS,
            (
                t.randn(v, d, dtype=dtype),
                t.randn(p, d, dtype=dtype),
                t.randn(s, d, dtype=dtype),
                g,
                b,
            ),
            strict=True,
        )
    )


def layer_weights(t: Tester, d: int, ffn: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """Random BertLayer weights, keyed as its state_dict."""
    shapes = [(d, d)] * 4 + [None, (ffn, d), (d, ffn), None]
    values: list[Tensor] = []
    for shape in shapes:
        values += _norm(t, d, dtype) if shape is None else _lin(t, *shape, dtype)
    return dict(zip(LAYER_KEYS, values, strict=True))


def mlm_weights(t: Tester, v: int, d: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """Random BertLMPredictionHead weights without the (tied) decoder, keyed as its state_dict."""
    return dict(
        zip(
            MLM_KEYS,
            (*_lin(t, d, d, dtype), *_norm(t, d, dtype), t.randn(v, dtype=dtype)),
            strict=True,
        )
    )


def padding(t: Tester, n: int, length: int, how: str = "long") -> Tensor:
    """An attention_mask (N, L): row 0 full, the others padded from a random length >= 1 on."""
    lengths = [length] + [1 + int(t.randint(length, 1)) for _ in range(n - 1)]
    if n > 2:
        lengths[2] = 1  # a sequence of one real token
    real = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]  # (N, L) bool
    return {"bool": real, "long": real.long(), "float": real.double(), "int32": real.int()}[how]


def _call_w(t: Tester, case: str, args: tuple, **kwargs: Any) -> Any:
    """Call with fresh copies of every weights dict in ``args``; fail if the function changed one."""
    given = tuple(_copy(a) if isinstance(a, dict) else a for a in args)
    got = t.call(case, *given, **kwargs)
    for before, after in zip(args, given, strict=True):
        if isinstance(before, dict) and (
            set(before) != set(after) or any(not torch.equal(before[k], after[k]) for k in before)
        ):
            t.fail(
                case, "the function changed the weights dict it was given; it must only read it."
            )
    return got


def _copy(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in weights.items()}


def _judge_row(t: Tester, what: str) -> None:
    t.ok("all cases", "judged against", f"{what} ({_judge_name()})")


def _hint_on_error(failure: CheckFailure, hints: Sequence[tuple[str, str]]) -> CheckFailure:
    """The same failure with a sentence naming the mistake when its text contains a telltale."""
    text = str(failure)
    for telltale, sentence in hints:
        if telltale in text:
            return CheckFailure(f"{text} It looks like {sentence}")
    return failure


# ---- bert_embeddings ----------------------------------------------------------------------
POSITIONS_FROM_ONE = (
    "position ids start at 1; BERT's position ids are 0, 1, ..., L-1 (the first row of the position "
    "table belongs to [CLS])."
)
NO_SEGMENTS = (
    "the segment (token_type) embeddings are missing; BERT sums three tables: word, position and "
    "token_type_embeddings.weight[token_type_ids]."
)
NO_EMB_NORM = "the LayerNorm is missing; the sum of the three embeddings is normalised with LayerNorm.weight/bias."
EMB_NORM_FIRST = (
    "the LayerNorm was applied before the sum (to the word embeddings, or to each table); BERT sums the "
    "three embeddings first and normalises the sum."
)
EPS_IGNORED = (
    "the eps argument was ignored (hard-coded); use the eps you are given in the LayerNorm."
)


def _embedding_mistakes(ids: Tensor, types: Tensor, w: dict[str, Tensor], eps: float) -> list:
    word, pos, seg = (w[k] for k in EMBEDDING_KEYS[:3])
    g, b = w["LayerNorm.weight"], w["LayerNorm.bias"]
    length = ids.shape[1]

    def ln(x: Tensor) -> Tensor:
        return _ln(x, g, b, eps)

    return [
        (POSITIONS_FROM_ONE, lambda: ln(word[ids] + pos[1 : length + 1] + seg[types])),
        (NO_SEGMENTS, lambda: ln(word[ids] + pos[:length])),
        (NO_EMB_NORM, lambda: word[ids] + pos[:length] + seg[types]),
        (EMB_NORM_FIRST, lambda: ln(word[ids]) + pos[:length] + seg[types]),
        (EMB_NORM_FIRST, lambda: ln(word[ids]) + ln(pos[:length]) + ln(seg[types])),
        (EPS_IGNORED, lambda: ref_bert_embeddings(ids, types, w, 1e-12)),
        (EPS_IGNORED, lambda: ref_bert_embeddings(ids, types, w, 1e-5)),
    ]


@exercise(
    "bert_embeddings",
    chapter=CHAPTER,
    signature="(input_ids (N,L) int64, token_type_ids (N,L) int64, weights: dict, eps=1e-12) -> (N,L,d)",
    summary="BertEmbeddings in eval mode: LayerNorm(word[ids] + position[0..L-1] + token_type[types]); "
    "weights keyed as transformers' BertEmbeddings.state_dict()",
    reference=ref_bert_embeddings,
)
def check_bert_embeddings(t: Tester) -> None:
    """Against transformers.BertEmbeddings (or the reference): padding ids, 2 or 3 segments, L = max, float32."""
    # (N, L, vocab, positions, types, d, dtype, eps or None for the default)
    shapes = [
        (2, 5, 11, 9, 2, 8, torch.float64, None),
        (3, 7, 6, 10, 3, 6, torch.float64, None),
        (2, 4, 5, 4, 2, 8, torch.float64, None),  # L = max_position_embeddings
        (1, 1, 4, 3, 2, 4, torch.float64, None),
        (2, 6, 9, 8, 2, 8, torch.float64, 0.5),
        (3, 5, 10, 8, 2, 16, torch.float32, None),
    ]
    for n, length, v, p, s, d, dtype, eps in shapes:
        case = f"N={n}, L={length}, vocab={v}, max positions={p}, {s} segment types, d={d} {str(dtype)[6:]}"
        w = embedding_weights(t, v, p, s, d, dtype)
        ids = t.randint(v, n, length)
        types = t.randint(s, n, length)
        types[0] = (
            torch.arange(length) >= length // 2
        ).long()  # [CLS] A [SEP] B [SEP]: 0...0 1...1
        kwargs = {} if eps is None else {"eps": eps}
        if eps is not None:
            case += f", eps={eps}"
        try:
            got = _call_w(t, case, (ids, types, w), **kwargs)
        except CheckFailure as failure:
            raise _hint_on_error(failure, [("out of", POSITIONS_FROM_ONE)]) from None
        e = 1e-12 if eps is None else eps
        want = hf_embeddings(ids, types, w, e)
        if want is None:
            want = ref_bert_embeddings(ids, types, w, e)
        t.compare(case, "embeddings", got, want, mistakes=_embedding_mistakes(ids, types, w, e))
    _judge_row(t, "BertEmbeddings in eval mode")


# ---- bert_attention_mask ------------------------------------------------------------------
MASK_INVERTED = (
    "the padding mask is inverted: the large negative number sits at the real tokens, so every query "
    "attends to padding only. attention_mask is 1 at real tokens (keep: add 0) and 0 at padding (add a "
    "large negative number)."
)
MASK_ZERO_ONE = (
    "the 0/1 mask was added to the scores as it is; adding 1 only multiplies a weight by e, padding still "
    "gets attention. Padding needs a large negative number (transformers uses torch.finfo(dtype).min) so "
    "that its softmax weight is exactly 0."
)
MASK_INF = (
    "padding got -inf; the contract asks for a large but finite negative number (such as "
    "torch.finfo(dtype).min), since a row whose keys are all -inf turns into NaN in the softmax."
)
MASK_QUERIES = (
    "the mask was laid out over queries (N, 1, L, 1); padding is removed from the KEYS, so the mask "
    "varies along the last axis: (N, 1, 1, L)."
)
MASK_FLAT = (
    "the mask kept the shape (N, L); scores are (N, heads, L_query, L_key), so the mask must broadcast "
    "over heads and queries: (N, 1, 1, L)."
)


def _judge_mask_values(t: Tester, case: str, got: Tensor, real: Tensor) -> None:
    real4 = real[:, None, None, :]
    at_real, at_pad = got[real4], got[~real4]
    values = set(torch.unique(got).tolist())
    if at_pad.numel() and bool((at_real <= PAD_LIMIT).all()) and bool((at_pad == 0).all()):
        t.fail(
            case,
            f"`mask` is 0 at padding and {float(at_real.min()):.3g} at real tokens. It looks like {MASK_INVERTED}",
        )
    if at_pad.numel() and (values <= {0.0, 1.0} or values <= {0.0, -1.0}):
        t.fail(
            case, f"`mask` holds only the values {sorted(values)}. It looks like {MASK_ZERO_ONE}"
        )
    if bool((at_real != 0).any()):
        idx = tuple(int(i) for i in ((got != 0) & real4).nonzero()[0])
        t.fail(
            case,
            f"`mask` is {float(got[idx]):.3g} at {idx}, a real token; it must be exactly 0 at every real token.",
        )
    if at_pad.numel() and bool(torch.isinf(at_pad).any()):
        t.fail(case, f"`mask` is -inf at padding. It looks like {MASK_INF}")
    if at_pad.numel() and bool((at_pad > PAD_LIMIT).any()):
        worst = float(at_pad.max())
        hint = " The sign looks flipped: padding must get a NEGATIVE number." if worst > 0 else ""
        t.fail(
            case,
            f"`mask` is {worst:.3g} at a padded key; padding needs a large negative number (at most "
            f"{PAD_LIMIT:.0e}; transformers uses torch.finfo(dtype).min) so that softmax gives it weight 0.{hint}",
        )
    t.ok(case, "mask", "ok (0 at real keys, a large finite negative number at padded keys)")


def _judge_mask_in_layer(t: Tester, case: str, mask: Tensor, real: Tensor) -> None:
    """A layer run with this mask equals the same layer run on each sequence without its padding."""
    n, length = real.shape
    d, heads = 8, 2
    x = t.randn(n, length, d)
    w = layer_weights(t, d, 16, torch.float64)

    def layer(h: Tensor, m: Tensor | None) -> Tensor:
        out = hf_encoder_layer(h, m, w, heads)
        return ref_bert_encoder_layer(h, m, w, heads) if out is None else out

    got = layer(x, mask.to(torch.float64))
    for i in range(n):
        k = int(real[i].sum())
        alone = layer(x[i : i + 1, :k], None)[0]  # (k, d): the sequence without any padding
        t.compare(
            f"{case}, sequence {i} ({k} real tokens)",
            "layer output at real tokens",
            got[i, :k],
            alone,
        )


@exercise(
    "bert_attention_mask",
    chapter=CHAPTER,
    signature="(attention_mask (N,L) of 1 real / 0 padding, dtype=torch.float32) -> (N,1,1,L)",
    summary="the additive padding mask BERT adds to its scores: 0 at real tokens, a large finite negative "
    "number (<= -1e4; transformers uses finfo(dtype).min) at padding, shaped to broadcast over heads and queries",
    reference=ref_bert_attention_mask,
)
def check_bert_attention_mask(t: Tester) -> None:
    """Values and shape on int64, bool, float and int32 masks; then its effect in a transformers BertLayer."""
    cases = [
        (3, 6, "long", None),
        (4, 5, "bool", torch.float64),
        (2, 7, "float", torch.float64),
        (3, 4, "int32", torch.float32),
        (1, 3, "long", torch.float32),  # no padding at all
    ]
    for n, length, how, dtype in cases:
        real = padding(t, n, length, "bool")
        given = real.to(
            {"bool": torch.bool, "long": torch.int64, "float": torch.float64, "int32": torch.int32}[
                how
            ]
        )
        out_dtype = torch.float32 if dtype is None else dtype
        case = f"attention_mask ({n}, {length}) {str(given.dtype)[6:]}" + (
            "" if dtype is None else f", dtype={str(dtype)[6:]}"
        )
        got = t.call(case, given) if dtype is None else t.call(case, given, dtype=dtype)
        if (
            torch.is_tensor(got)
            and tuple(got.shape) in ((n, 1, length, 1), (n, length, 1))
            and length > 1
        ):
            t.fail(case, f"`mask` has shape {tuple(got.shape)}. It looks like {MASK_QUERIES}")
        if torch.is_tensor(got) and tuple(got.shape) == (n, length) and n > 1:
            t.fail(case, f"`mask` has shape {tuple(got.shape)}. It looks like {MASK_FLAT}")
        got = t.expect_tensor(case, "mask", got, shape=(n, 1, 1, length), dtype=out_dtype)
        _judge_mask_values(t, case, got.detach(), real)
        if how == "long":
            _judge_mask_in_layer(t, case, got.detach(), real)
    _judge_row(t, "BertLayer run on each sequence without its padding")


# ---- bert_encoder_layer -------------------------------------------------------------------
PRE_LN = (
    "the layer is pre-LN (LayerNorm before each sublayer, x + Attn(LN(x))); BERT is post-LN: "
    "H = LN(X + Attn(X)), then LN(H + FFN(H))."
)
RESIDUAL_AFTER_LN = (
    "the residual was added after the LayerNorm (LN(Attn(X)) + X); in BERT the residual sum comes first "
    "and the LayerNorm normalises it: LN(X + Attn(X))."
)
GELU_TANH = (
    'the tanh approximation of GELU was used; BERT\'s hidden_act "gelu" is the exact form '
    "x * Phi(x) = x/2 * (1 + erf(x / sqrt 2))."
)
NO_SCALE = "the scores were not divided by sqrt(d_head) (d_head = d / num_heads)."
MASK_IGNORED = "the attention_mask was not added to the scores, so queries attend to padding."
ONE_HEAD = (
    "the heads were not split: attention was computed once over all d features; reshape Q, K, V to "
    "(N, num_heads, L, d / num_heads) and attend per head."
)
RELU = 'ReLU was used in the feed-forward network; BERT\'s activation is the exact GELU (hidden_act "gelu").'


def _layer_mistakes(
    x: Tensor, mask: Tensor | None, w: dict[str, Tensor], heads: int, eps: float
) -> list:
    def v(**kw: Any) -> Callable[[], Tensor]:
        return lambda: _layer_variant(x, kw.pop("mask", mask), w, kw.pop("heads", heads), eps, **kw)

    mistakes = [
        (PRE_LN, v(order="pre")),
        (RESIDUAL_AFTER_LN, v(order="after")),
        (GELU_TANH, v(gelu=_gelu_tanh)),
        (NO_SCALE, v(scale=False)),
        (RELU, v(gelu=torch.relu)),
    ]
    if heads > 1:
        mistakes.append((ONE_HEAD, v(heads=1)))
    if mask is not None:
        mistakes.append((MASK_IGNORED, v(mask=None)))
    if eps != 1e-12:
        mistakes.append((EPS_IGNORED, lambda: _layer_variant(x, mask, w, heads, 1e-12)))
    return mistakes


@exercise(
    "bert_encoder_layer",
    chapter=CHAPTER,
    signature="(hidden_states (N,L,d), attention_mask (N,1,1,L) additive or None, weights: dict, num_heads, "
    "eps=1e-12) -> (N,L,d)",
    summary="one post-LN BertLayer in eval mode: H = LN(X + Attn(X)), Y = LN(H + FFN(H)) with exact GELU; "
    "weights keyed as transformers' BertLayer.state_dict(), Linear weights (out, in)",
    reference=ref_bert_encoder_layer,
)
def check_bert_encoder_layer(t: Tester) -> None:
    """Against transformers.BertLayer (eager attention; or the reference): 1 to 4 heads, padding, float32."""
    # (N, L, d, heads, ffn, mask?, dtype, eps or None)
    shapes = [
        (3, 5, 8, 2, 16, True, torch.float64, None),
        (2, 6, 12, 3, 20, True, torch.float64, None),
        (2, 4, 8, 1, 8, False, torch.float64, None),
        (2, 5, 8, 2, 12, True, torch.float64, 0.3),
        (3, 5, 16, 4, 24, True, torch.float32, None),
    ]
    for n, length, d, heads, ffn, masked, dtype, eps in shapes:
        case = f"N={n}, L={length}, d={d}, num_heads={heads}, d_ff={ffn}, {'padded' if masked else 'attention_mask=None'}"
        case += f" {str(dtype)[6:]}" + ("" if eps is None else f", eps={eps}")
        x = t.randn(n, length, d, dtype=dtype)
        w = layer_weights(t, d, ffn, dtype)
        mask = ref_bert_attention_mask(padding(t, n, length), dtype) if masked else None
        kwargs = {} if eps is None else {"eps": eps}
        if heads % 2:
            got = _call_w(t, case, (x, mask, w, heads), **kwargs)
        else:
            got = _call_w(t, case, (x, mask, w), num_heads=heads, **kwargs)
        e = 1e-12 if eps is None else eps
        want = hf_encoder_layer(x, mask, w, heads, e)
        if want is None:
            want = ref_bert_encoder_layer(x, mask, w, heads, e)
        t.compare(case, "layer output", got, want, mistakes=_layer_mistakes(x, mask, w, heads, e))
    _judge_row(t, "BertLayer in eval mode, eager attention")


# ---- bert_mlm_head ------------------------------------------------------------------------
UNTIED = (
    "the head looked for a decoder matrix of its own; BERT's MLM decoder is TIED to the input embeddings: "
    "logits = T @ word_embeddings.T + bias, with the word_embeddings argument as the decoder weight."
)
NO_OUT_BIAS = (
    "the output bias is missing; the logits get weights['bias'] (V,), one per vocabulary entry."
)
NO_HEAD_NORM = (
    "the transform's LayerNorm is missing; the transform is dense, then GELU, then LayerNorm "
    "(transform.LayerNorm), before the tied decoder."
)
NO_TRANSFORM = (
    "the transform (dense, GELU, LayerNorm) was skipped; BERT's head transforms the hidden states "
    "before the tied decoder."
)
NO_HEAD_GELU = (
    "the GELU of the transform is missing; the transform is dense, then exact GELU, then LayerNorm."
)


def _mlm_mistakes(seq: Tensor, word: Tensor, w: dict[str, Tensor], eps: float) -> list:
    def v(**kw: Any) -> Callable[[], Tensor]:
        return lambda: _mlm_variant(seq, word, w, eps, **kw)

    return [
        (NO_OUT_BIAS, v(bias=False)),
        (NO_HEAD_NORM, v(norm=False)),
        (GELU_TANH, v(gelu=_gelu_tanh)),
        (NO_HEAD_GELU, v(gelu=lambda z: z)),
        (NO_TRANSFORM, lambda: seq @ word.T + w["bias"]),
        (EPS_IGNORED, lambda: _mlm_variant(seq, word, w, 1e-12)),
    ]


@exercise(
    "bert_mlm_head",
    chapter=CHAPTER,
    signature="(sequence_output (N,L,d), word_embeddings (V,d), weights: dict, eps=1e-12) -> (N,L,V)",
    summary="BERT's MLM head: T = LN(GELU(dense(x))), logits = T @ word_embeddings^T + bias (decoder tied to "
    "the input embeddings); weights keyed as BertLMPredictionHead.state_dict() without decoder.*",
    reference=ref_bert_mlm_head,
)
def check_bert_mlm_head(t: Tester) -> None:
    """Against transformers.BertForMaskedLM's head with its decoder tied (or the reference)."""
    shapes = [
        (2, 5, 8, 13, torch.float64, None),
        (1, 3, 6, 5, torch.float64, None),
        (2, 4, 8, 9, torch.float64, 0.2),
        (2, 4, 8, 10, torch.float32, None),
    ]
    for n, length, d, v, dtype, eps in shapes:
        case = f"N={n}, L={length}, d={d}, vocab={v} {str(dtype)[6:]}" + (
            "" if eps is None else f", eps={eps}"
        )
        seq = t.randn(n, length, d, dtype=dtype)
        word = t.randn(v, d, dtype=dtype)
        w = mlm_weights(t, v, d, dtype)
        kwargs = {} if eps is None else {"eps": eps}
        try:
            got = _call_w(t, case, (seq, word, w), **kwargs)
        except CheckFailure as failure:
            raise _hint_on_error(
                failure,
                [("KeyError: 'decoder", UNTIED), ("KeyError: 'cls.predictions.decoder", UNTIED)],
            ) from None
        e = 1e-12 if eps is None else eps
        want = hf_mlm_head(seq, word, w, e)
        if want is None:
            want = ref_bert_mlm_head(seq, word, w, e)
        t.compare(case, "logits", got, want, mistakes=_mlm_mistakes(seq, word, w, e))
    _judge_row(t, "BertForMaskedLM's head, decoder tied to the word embeddings")
