"""Question/answer pairs made from the bundled corpus, each with its gold passage.

Every Wikipedia summary carries a short description ("Capital city of France"); the question
asks for the article that fits it and the answer is the article's title, which its passage
states. Train and dev sets come from disjoint articles.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from .errors import DataError


def question_for(description: str, topic: str = "") -> str:
    d = description.strip().rstrip(".")
    if len(d) > 1 and d[1].islower():  # "Capital city" -> "capital city"; keep "SI unit"
        d = d[0].lower() + d[1:]
    wh = "Who" if topic == "People" or re.search(r"\(\d{3,4}\s*[–-]", d) else "What"
    return f"{wh} is the {d}?"


def answer_for(title: str) -> str:
    """The title without its disambiguation: "Symphony No. 5 (Beethoven)" -> "Symphony No. 5"."""
    return re.sub(r"\s*\([^)]*\)$", "", title).strip()


def make_qa_pairs(corpus: Sequence[dict], num_train: int, num_eval: int, *, seed: int = 0,
                  topics: Sequence[str] | None = None) -> tuple[list[dict], list[dict]]:
    """Disjoint (train, dev) records {query, response, gold_id, topic} from corpus records
    {id, title, text, metadata{topic, description}} (see ``indexing.load_corpus``)."""
    usable = []
    for r in corpus:
        meta = r.get("metadata") or {}
        desc, title = meta.get("description", ""), r.get("title") or ""
        if not desc or not title or len(desc.split()) < 3:
            continue  # a one-word description ("Country") names too many articles
        if topics and meta.get("topic") not in topics:
            continue
        if title.lower() in desc.lower():
            continue  # the answer would be in the question
        usable.append({"query": question_for(desc, meta.get("topic", "")),
                       "response": answer_for(title), "gold_id": r["id"],
                       "topic": meta.get("topic", "")})
    if len(usable) < num_train + num_eval:
        raise DataError(f"only {len(usable)} usable corpus articles for {num_train} train + "
                        f"{num_eval} dev questions; lower the counts or widen the topics")
    # dev from the front of one shuffled order, train from its back: the dev set depends on
    # (seed, num_eval) only and the train set on (seed, num_train) only, so runs of other
    # sizes are measured on the same questions (and bigger train sets contain smaller ones)
    order = np.random.default_rng(seed).permutation(len(usable))
    dev = [usable[i] for i in order[:num_eval]]
    train = [usable[i] for i in order[::-1][:num_train]]
    return train, dev
