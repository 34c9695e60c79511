"""Questions of several kinds from a corpus, filtered for ambiguity, split by article.

    questions = generate_questions(corpus)                     # every kind that applies
    splits = make_question_splits(corpus, num_train=None, num_dev=256, num_test=256, seed=0)
    assert_disjoint(splits.train, splits.test)

A record is ``{query, response, answers, gold_id, topic, kind, title, rule, evidence}``:
``response`` is the canonical answer (``answers[0]``), ``answers`` every acceptable one,
``evidence`` the passage sentence that states it.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError
from ..evals.metrics import answer_contained
from .rules import KINDS, Article, Candidate

log = logging.getLogger(__name__)


def _norm_text(s: str) -> str:
    """The form two questions are compared in: lower case, words only."""
    return " ".join("".join(ch if ch.isalnum() else " " for ch in s.lower()).split())


def _ordered_kinds(kinds: Iterable[str] | None) -> list[str]:
    names = list(KINDS) if kinds is None else list(dict.fromkeys(kinds))
    unknown = [k for k in names if k not in KINDS]
    if unknown:
        raise DataError(f"unknown question kind(s) {unknown}; known: {sorted(KINDS)}")
    return names


def _articles(corpus: Sequence[dict]) -> list[Article]:
    out = []
    for i, r in enumerate(corpus):
        if not isinstance(r, Mapping) or not isinstance(r.get("text"), str) or "id" not in r:
            raise DataError(f"corpus record {i} needs an 'id' and a string 'text' (and "
                            "ideally a 'title'); load corpora with fedrag_jax.indexing."
                            "load_corpus")
        out.append(Article.from_record(r))
    return out


def _valid(c: Candidate, a: Article) -> tuple[str, ...]:
    """The candidate's answers that pass the checks (empty: drop the question)."""
    q = _norm_text(c.query)
    kept = []
    for ans in c.answers:
        n = _norm_text(ans)
        if not n or f" {n} " in f" {q} ":
            continue  # the answer would be given away by the question
        if c.kind != "title":
            subj = _norm_text(a.subject)
            if n in (subj, _norm_text(a.title)) or (subj and f" {subj} " in f" {n} "):
                continue  # other kinds never answer with the article's own title
        kept.append(ans)
    # the canonical (first) answer must survive and be a span of the passage; the others
    # are its variants (a unit, an alias: "U.S." -> "United States") and need not be
    if not kept or kept[0] != c.answers[0] or not answer_contained(a.text, kept[0]):
        return ()
    return tuple(kept)


def generate_questions(corpus: Sequence[dict], kinds: Iterable[str] | None = None,
                       ) -> list[dict]:
    """Every unambiguous question the rules of ``kinds`` (default: all) make from
    ``corpus`` records {id, title, text, metadata?}, in corpus order.

    Dropped: questions whose normalised text more than one article produces (with all of
    their copies); questions of non-title kinds about a subject that names several articles
    ("Mercury (planet)", "Mercury (element)"); answers that the question contains, that are
    the article's title, or that are not spans of the passage. Kinds that need metadata
    ("title": the description) yield nothing for records without it.
    """
    names = _ordered_kinds(kinds)
    articles = _articles(corpus)
    subjects = Counter(_norm_text(a.subject) for a in articles if a.subject)
    made: list[tuple[Article, Candidate, tuple[str, ...]]] = []
    for a in articles:
        if not a.text.strip():
            continue
        seen: set[str] = set()  # question texts, and (kind, canonical answer), of this article
        for name in names:
            kind = KINDS[name]
            if kind.needs_metadata and not a.description:
                continue
            if name != "title" and (not a.subject or subjects[_norm_text(a.subject)] > 1):
                continue
            for rule in kind.rules:
                for c in rule(a):
                    key = _norm_text(c.query)
                    answers = _valid(c, a)
                    same_fact = f"{c.kind}\t{_norm_text(answers[0])}" if answers else ""
                    # one question per fact: "In which country is Athens?" and "Of which
                    # country is Athens the capital?" would be one question twice
                    if answers and key not in seen and same_fact not in seen:
                        seen.update((key, same_fact))
                        made.append((a, c, answers))
    # a question text that two articles produce fits both: ambiguous, drop every copy
    owners: dict[str, set[str]] = defaultdict(set)
    for a, c, _ in made:
        owners[_norm_text(c.query)].add(a.id)
    out = []
    for a, c, answers in made:
        if len(owners[_norm_text(c.query)]) > 1:
            continue
        out.append({"query": c.query, "response": answers[0], "answers": list(answers),
                    "gold_id": a.id, "topic": a.topic, "kind": c.kind, "title": a.title,
                    "rule": c.rule, "evidence": c.evidence})
    return out


def kind_counts(records: Iterable[dict]) -> dict[str, int]:
    """Questions per kind, in the registry's order."""
    counts = Counter(r["kind"] for r in records)
    return {k: counts[k] for k in KINDS if counts[k]} | \
        {k: v for k, v in counts.items() if k not in KINDS}


def describe_kinds(corpus: Sequence[dict] | None = None,
                   questions: Sequence[dict] | None = None) -> list[dict]:
    """The kinds (name, description, needs_metadata) and, given a corpus or its generated
    questions, how many questions and articles each has: what a report lists."""
    if questions is None and corpus is not None:
        questions = generate_questions(corpus)
    per_kind_articles: dict[str, set[str]] = defaultdict(set)
    counts: Counter = Counter()
    for r in questions or []:
        counts[r["kind"]] += 1
        per_kind_articles[r["kind"]].add(r["gold_id"])
    rows = []
    for k in KINDS.values():
        row = {"kind": k.name, "description": k.description,
               "needs_metadata": k.needs_metadata}
        if questions is not None:
            row |= {"questions": counts[k.name], "articles": len(per_kind_articles[k.name])}
        rows.append(row)
    return rows


@dataclass
class QuestionSplits:
    """Train / dev / test questions from disjoint articles, and what each split lacked."""

    train: list[dict]
    dev: list[dict]
    test: list[dict]
    requested: dict[str, dict[str, int | None]] = field(default_factory=dict)
    available: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        return {name: kind_counts(getattr(self, name)) for name in ("train", "dev", "test")}

    def shortfall(self) -> dict[str, dict[str, int]]:
        """Per split, the kinds that got fewer questions than requested: {kind: missing}."""
        out: dict[str, dict[str, int]] = {}
        for name, wanted in self.requested.items():
            have = kind_counts(getattr(self, name))
            missing = {k: n - have.get(k, 0) for k, n in wanted.items()
                       if n is not None and have.get(k, 0) < n}
            if missing:
                out[name] = missing
        return out

    def table(self) -> str:
        """Markdown: questions per kind and split."""
        counts = self.counts()
        rows = ["| kind | available | train | dev | test |", "|---|---|---|---|---|"]
        for k in self.available:
            rows.append(f"| {k} | {self.available[k]} | " + " | ".join(
                str(counts[s].get(k, 0)) for s in ("train", "dev", "test")) + " |")
        rows.append("| all | " + str(sum(self.available.values())) + " | " + " | ".join(
            str(sum(counts[s].values())) for s in ("train", "dev", "test")) + " |")
        return "\n".join(rows)


def _per_kind(value: int | Mapping[str, int | None] | None, kinds: list[str], what: str,
              ) -> dict[str, int | None]:
    if isinstance(value, Mapping):
        unknown = set(value) - set(kinds)
        if unknown:
            raise DataError(f"{what} names kinds {sorted(unknown)} that are not in kinds={kinds}")
        out = {k: value.get(k, 0) for k in kinds}
    else:
        out = {k: value for k in kinds}
    for k, n in out.items():
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise DataError(f"{what}[{k!r}] must be an integer >= 0 or None (all that is "
                            f"left), got {n!r}")
    return out


def make_question_splits(corpus: Sequence[dict], *, kinds: Iterable[str] | None = None,
                         num_train: int | Mapping[str, int | None] | None = None,
                         num_dev: int | Mapping[str, int | None] | None = 256,
                         num_test: int | Mapping[str, int | None] | None = 256, seed: int = 0,
                         allow_fewer: bool = False,
                         questions: Sequence[dict] | None = None) -> QuestionSplits:
    """Train / dev / test questions of ``kinds`` whose articles are disjoint.

    Counts are per kind: an int (the same for every kind), a {kind: n} mapping, or None
    (every question left). Articles are visited in one seeded order and an article goes,
    with all its questions, to the first split (test, then dev, then train) that still
    needs a question of one of its kinds; questions beyond a split's count are left out.
    So the test split depends only on (corpus, kinds, seed, num_test) and the dev split
    also on num_test: changing the train size never changes what a run is measured on.
    Each split is shuffled (seeded). A split that cannot get its count raises
    :class:`DataError` listing what exists, unless ``allow_fewer`` (then see
    :meth:`QuestionSplits.shortfall`). ``questions``: precomputed
    :func:`generate_questions` output (skips generating again).
    """
    names = _ordered_kinds(kinds)
    requested = {"test": _per_kind(num_test, names, "num_test"),
                 "dev": _per_kind(num_dev, names, "num_dev"),
                 "train": _per_kind(num_train, names, "num_train")}
    pool = [r for r in (questions if questions is not None else
                        generate_questions(corpus, names)) if r["kind"] in names]
    by_article: dict[str, list[dict]] = defaultdict(list)
    for r in pool:
        by_article[r["gold_id"]].append(r)
    article_ids = sorted(by_article)
    rng = np.random.default_rng(seed)
    order = [article_ids[i] for i in rng.permutation(len(article_ids))]

    taken = {s: Counter() for s in requested}
    out: dict[str, list[dict]] = {s: [] for s in requested}

    def needs(split: str, kind: str) -> bool:
        n = requested[split][kind]
        return n is None or taken[split][kind] < n

    for aid in order:
        records = by_article[aid]
        for split in ("test", "dev", "train"):
            if any(needs(split, r["kind"]) for r in records):
                for r in records:
                    if needs(split, r["kind"]):
                        taken[split][r["kind"]] += 1
                        out[split].append(r)
                break
    for split in out:
        out[split] = [out[split][i] for i in rng.permutation(len(out[split]))]
    result = QuestionSplits(out["train"], out["dev"], out["test"], requested,
                            {k: v for k, v in kind_counts(pool).items()})
    for k in names:
        result.available.setdefault(k, 0)
    short = result.shortfall()
    if short:
        msg = (f"not enough questions: {short} missing (kind: questions short) of "
               f"{requested}; available per kind: {result.available}. Lower the counts, "
               "drop the kind, or pass allow_fewer=True")
        if not allow_fewer:
            raise DataError(msg)
        log.warning(msg)
    assert_disjoint(result.train, result.dev, result.test)
    return result


def assert_disjoint(*splits: Sequence[dict]) -> None:
    """Raise :class:`DataError` if two of ``splits`` share an article (``gold_id``) or a
    question text (normalised), or if one split repeats a question text."""
    seen_article: dict[str, int] = {}
    seen_text: dict[str, int] = {}
    for i, split in enumerate(splits):
        texts_here: set[str] = set()
        for r in split:
            text = _norm_text(r["query"])
            if text in texts_here:
                raise DataError(f"split {i} holds the question {r['query']!r} twice")
            texts_here.add(text)
            j = seen_text.get(text)
            if j is not None and j != i:
                raise DataError(f"question {r['query']!r} is in splits {j} and {i}")
            seen_text[text] = i
            gid = r.get("gold_id")
            if gid is not None:
                j = seen_article.get(gid)
                if j is not None and j != i:
                    raise DataError(f"article {gid!r} has questions in splits {j} and {i}")
                seen_article[gid] = i
