"""Question/answer pairs made from corpus records: disjoint, and each split stable when the
other split's size changes (so runs of other sizes are compared on the same dev questions)."""

from __future__ import annotations

import pytest

from fedrag_jax.errors import DataError
from fedrag_jax.qa_data import answer_for, make_qa_pairs, question_for


def corpus(n: int = 60) -> list[dict]:
    topics = ("People", "Places", "Science")
    return [{"id": f"d{i}", "title": f"Title {i} (thing)", "text": f"Title {i} is thing {i}.",
             "metadata": {"topic": topics[i % 3], "description": f"described thing number {i}"}}
            for i in range(n)]


def test_splits_are_disjoint_and_each_depends_only_on_its_own_size():
    train, dev = make_qa_pairs(corpus(), 20, 10, seed=3)
    assert len(train) == 20 and len(dev) == 10
    assert not {r["gold_id"] for r in train} & {r["gold_id"] for r in dev}
    bigger_train, same_dev = make_qa_pairs(corpus(), 40, 10, seed=3)
    assert same_dev == dev
    assert bigger_train[:20] == train  # a bigger train set contains the smaller one
    same_train, bigger_dev = make_qa_pairs(corpus(), 20, 30, seed=3)
    assert same_train == train and bigger_dev[:10] == dev
    other_train, other_dev = make_qa_pairs(corpus(), 20, 10, seed=4)
    assert other_dev != dev


def test_records_ask_for_the_title_and_name_the_gold_passage():
    train, _ = make_qa_pairs(corpus(), 5, 5, seed=0)
    for r in train:
        i = int(r["gold_id"][1:])
        assert r["response"] == f"Title {i}"
        assert r["query"] == f"{'Who' if i % 3 == 0 else 'What'} is the described thing number {i}?"
    assert answer_for("Symphony No. 5 (Beethoven)") == "Symphony No. 5"
    assert question_for("Capital city of France", "Places") == "What is the capital city of France?"


def test_too_few_articles_is_a_named_error():
    with pytest.raises(DataError, match="usable corpus articles"):
        make_qa_pairs(corpus(10), 8, 5)
