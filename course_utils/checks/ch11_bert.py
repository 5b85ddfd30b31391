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
from collections.abc import Callable

import torch

from ..checking import Tester, exercise

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
