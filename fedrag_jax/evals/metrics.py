"""Answer and retrieval metrics: SQuAD-style EM / token F1, answer contained, recall@k, MRR,
answer recall of retrieved passages, MC accuracy.

Pure functions on strings and id lists; nothing here knows about models or datasets.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence

from ..errors import ConfigError, DataError

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# --- answers -------------------------------------------------------------------------------
def normalize_answer(s: str) -> str:
    """SQuAD normalization: lowercase, drop punctuation and articles, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _gold_list(golds: str | Sequence[str]) -> list[str]:
    """Gold answers with the SQuAD v2 convention: none left means "unanswerable" -> [""].

    Like the official v2 script, golds that normalize to nothing are dropped first, so
    ``[]``, ``[""]`` and ``["the"]`` all mean the correct prediction is the empty string.
    """
    if isinstance(golds, str):
        golds = [golds]
    kept = [g for g in golds if normalize_answer(g)]
    return kept or [""]


def exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return max(float(pred == normalize_answer(g)) for g in _gold_list(golds))


def _f1_one(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    # An empty side (unanswerable gold or empty prediction) scores 1 only if both are empty.
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: str | Sequence[str]) -> float:
    """Bag-of-tokens F1 between the normalized prediction and the best-matching gold answer."""
    pred_tokens = normalize_answer(prediction).split()
    return max(_f1_one(pred_tokens, normalize_answer(g).split()) for g in _gold_list(golds))


# --- answer contained ------------------------------------------------------------------------
class _PunctuationTable(dict):
    """A ``str.translate`` table mapping every Unicode punctuation character (category P*,
    and ASCII's string.punctuation) to ``replacement``, filled in as characters are met."""

    def __init__(self, replacement: str | None):
        super().__init__()
        self.replacement = replacement

    def __missing__(self, code: int):
        ch = chr(code)
        value = self.replacement if (unicodedata.category(ch).startswith("P")
                                     or ch in _PUNCTUATION) else code
        self[code] = value
        return value


_DELETE_PUNCT, _SPACE_PUNCT = _PunctuationTable(None), _PunctuationTable(" ")


def _contain_views(s: str) -> tuple[str, str]:
    """Two SQuAD-style normalisations of ``s`` (lower case, no articles, single spaces), one
    deleting punctuation ("1,000" -> "1000") and one replacing it by a space ("1711–1776" ->
    "1711 1776", "Paris-based" -> "paris based"). Unlike :func:`normalize_answer` both treat
    every Unicode punctuation mark (dashes, curly quotes) as punctuation."""
    s = s.lower()
    return tuple(" ".join(_ARTICLES.sub(" ", s.translate(table)).split())
                 for table in (_DELETE_PUNCT, _SPACE_PUNCT))


def _usable_golds(golds: str | Sequence[str]) -> list[tuple[str, str]]:
    if isinstance(golds, str):
        golds = [golds]
    views = [_contain_views(g) for g in golds]
    kept = [v for v in views if v[0] or v[1]]
    if not kept:
        raise DataError(f"no gold answer left after normalisation in {list(golds)!r}; "
                        "answer_contained needs at least one non-empty gold answer")
    return kept


def _contains(haystack: tuple[str, str], gold: tuple[str, str]) -> bool:
    # on token boundaries: "1" is not found in "1990", "art" not in "party"
    return any(g and f" {g} " in f" {h} " for h, g in zip(haystack, gold, strict=True))


def answer_contained(text: str, golds: str | Sequence[str]) -> float:
    """1.0 if any normalised gold answer appears in the normalised ``text`` as a whole run of
    tokens, else 0.0: robust to answer format ("It was founded in 1850." contains "1850").

    Normalisation is SQuAD's (lower case, articles removed, whitespace collapsed) with
    punctuation handled both ways (deleted, and replaced by a space; a match in either
    counts), so "1,000" matches "1000" and "1711–1776" contains "1711". Golds that normalise
    to nothing are ignored; if none is left, :class:`DataError`.
    """
    views = _contain_views(text)
    return float(any(_contains(views, g) for g in _usable_golds(golds)))


def answer_in_passages(passages: Sequence[str], golds: str | Sequence[str],
                       k: int | None = None) -> float:
    """1.0 if any gold answer is contained (as in :func:`answer_contained`) in any of the
    top-``k`` passages (None: all), else 0.0: retrieval quality where several passages can
    hold the answer."""
    _check_k(k)
    gold_views = _usable_golds(golds)
    for passage in passages if k is None else passages[:k]:
        views = _contain_views(passage)
        if any(_contains(views, g) for g in gold_views):
            return 1.0
    return 0.0


def answer_recall_at_k(passages: Sequence[Sequence[str]], golds: Sequence[str | Sequence[str]],
                       k: int | None = None) -> float:
    """Mean over queries of :func:`answer_in_passages` of their top-``k`` passage texts."""
    _check_k(k)
    _check_pairs(passages, golds)
    return sum(answer_in_passages(p, g, k) for p, g in zip(passages, golds, strict=True)) \
        / len(passages)


# --- retrieval -----------------------------------------------------------------------------
def _gold_set(gold: str | Sequence[str], i: int) -> set[str]:
    gold_set = {gold} if isinstance(gold, str) else set(gold)
    if not gold_set:
        raise DataError(f"query {i} has no gold ids; every query needs at least one")
    return gold_set


def _check_k(k: int | None) -> None:
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ConfigError(f"k must be an integer >= 1 (or None for all retrieved), got {k!r}")


def _check_pairs(retrieved_ids: Sequence, gold_ids: Sequence) -> None:
    if len(retrieved_ids) != len(gold_ids):
        raise DataError(f"got {len(retrieved_ids)} retrieved lists but {len(gold_ids)} gold "
                        "entries; pass one of each per query")
    if not retrieved_ids:
        raise DataError("no queries to score; pass at least one")


def _recall(retrieved: Sequence[str], gold_set: set[str], k: int | None) -> float:
    top = set(retrieved if k is None else retrieved[:k])
    return len(top & gold_set) / len(gold_set)


def _rr(retrieved: Sequence[str], gold_set: set[str], k: int | None) -> float:
    for rank, node_id in enumerate(retrieved if k is None else retrieved[:k], start=1):
        if node_id in gold_set:
            return 1.0 / rank
    return 0.0


def query_recall_at_k(retrieved: Sequence[str], gold: str | Sequence[str],
                      k: int | None = None) -> float:
    """Fraction of one query's gold ids found in its top-``k`` retrieved ids (None: all).

    With a single gold id this is the hit rate ("top-k accuracy" of DPR).
    """
    _check_k(k)
    return _recall(retrieved, _gold_set(gold, 0), k)


def reciprocal_rank(retrieved: Sequence[str], gold: str | Sequence[str],
                    k: int | None = None) -> float:
    """1 / rank of the first gold id among one query's top-``k`` retrieved ids, 0 if absent."""
    _check_k(k)
    return _rr(retrieved, _gold_set(gold, 0), k)


def recall_at_k(retrieved_ids: Sequence[Sequence[str]], gold_ids: Sequence[str | Sequence[str]],
                k: int) -> float:
    """Mean over queries of the fraction of gold ids in the top-``k`` retrieved ids."""
    _check_k(k)
    _check_pairs(retrieved_ids, gold_ids)
    scores = [_recall(r, _gold_set(g, i), k)
              for i, (r, g) in enumerate(zip(retrieved_ids, gold_ids, strict=True))]
    return sum(scores) / len(scores)


def mrr(retrieved_ids: Sequence[Sequence[str]], gold_ids: Sequence[str | Sequence[str]],
        k: int | None = None) -> float:
    """Mean reciprocal rank of the first gold id (cut at ``k`` when given)."""
    _check_k(k)
    _check_pairs(retrieved_ids, gold_ids)
    scores = [_rr(r, _gold_set(g, i), k)
              for i, (r, g) in enumerate(zip(retrieved_ids, gold_ids, strict=True))]
    return sum(scores) / len(scores)


# --- multiple choice -----------------------------------------------------------------------
def choice_letter(index: int) -> str:
    """0 -> "A", 1 -> "B", ...; at most 26 choices."""
    if not 0 <= index < 26:
        raise DataError(f"choice index {index} has no letter; at most 26 choices are supported")
    return string.ascii_uppercase[index]


# "The answer is B", "Answer: (C)": a prefix generators like to emit before the letter.
_ANSWER_PREFIX = re.compile(r"^\s*(?:the\s+)?(?:correct\s+)?answer\s*(?:is|:)?\s*", re.I)
# A lone letter, optionally wrapped or followed by punctuation: "B", "b.", "(C)", "D)".
_LONE_LETTER = re.compile(r"\(?([A-Za-z])\s*[.):]?\)?")
# A capital letter then a delimiter then text: "B. Paris", "(C) Rome". The delimiter is
# required so that the article in "A cat" is not read as choice A.
_LETTER_PREFIX = re.compile(r"\(?([A-Z])\s*[.):]\)?\s+\S")


def answer_to_choice(answer: str, choices: Sequence[str]) -> int | None:
    """Map a generated answer to a choice index, or None if it matches none.

    A letter ("B", "(b)", "B. Paris", "Answer: B") within range wins; otherwise the choice
    whose text has the highest token F1 with the answer (first one on ties; None if all 0).
    """
    if not choices:
        raise DataError("answer_to_choice needs at least one choice")
    text = _ANSWER_PREFIX.sub("", answer.strip(), count=1).strip()
    m = _LONE_LETTER.fullmatch(text) or _LETTER_PREFIX.match(text)
    if m:
        index = ord(m.group(1).upper()) - ord("A")
        if index < len(choices):
            return index
    scores = [token_f1(answer, c) if normalize_answer(c) else 0.0 for c in choices]
    best = max(range(len(choices)), key=lambda i: (scores[i], -i))
    return best if scores[best] > 0.0 else None


def multiple_choice_accuracy(predicted_indices: Sequence[int | None],
                             gold_indices: Sequence[int]) -> float:
    """Fraction of predictions equal to the gold index (an unparsed None counts as wrong)."""
    if len(predicted_indices) != len(gold_indices):
        raise DataError(f"got {len(predicted_indices)} predictions but {len(gold_indices)} gold "
                        "indices; pass one of each per question")
    if not gold_indices:
        raise DataError("no questions to score; pass at least one")
    correct = sum(p is not None and p == g for p, g in zip(predicted_indices, gold_indices,
                                                           strict=True))
    return correct / len(gold_indices)
