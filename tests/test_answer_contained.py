""""Answer contained" and answer recall of retrieved passages on tricky strings."""

from __future__ import annotations

import pytest

from fedrag_jax.errors import DataError
from fedrag_jax.evals.metrics import (
    answer_contained,
    answer_in_passages,
    answer_recall_at_k,
    exact_match,
)


@pytest.mark.parametrize("text, golds, expected", [
    ("It was founded in 1850 by monks.", "1850", 1.0),  # a sentence answer states the fact
    ("It was founded in 1990.", "1", 0.0),  # token boundaries: "1" is not in "1990"
    ("The 1990s", "1990", 0.0),
    ("a party of three", "art", 0.0),
    ("PARIS!", "paris", 1.0),  # case and punctuation
    ("The capital is the Hague.", "The Hague", 1.0),  # articles are dropped on both sides
    ("about 1,000 people", "1000", 1.0),  # thousands separators, either way round
    ("about 1000 people", "1,000", 1.0),
    ("David Hume (1711–1776) was", "1711", 1.0),  # a Unicode dash separates tokens
    ("a Paris-based firm", "Paris", 1.0),
    ("It was born on 12 May 1950.", ["12 May 1950", "1950"], 1.0),  # any of several golds
    ("It happened in May.", ["12 May 1950", "1950"], 0.0),
    ("The city is Reykjavík.", "Reykjavík", 1.0),  # non-ASCII letters are kept
    ("The city is Reykjavik.", "Reykjavík", 0.0),
    ("It's symbol is Fe.", "Fe", 1.0),
    ("He was “American” by birth", "American", 1.0),  # curly quotes are punctuation
    ("the U.S. state of Texas", "US", 1.0),
    ("", "1850", 0.0),
])
def test_answer_contained(text, golds, expected):
    assert answer_contained(text, golds) == expected


def test_answer_contained_is_robust_to_format_where_exact_match_is_not():
    answer = "The Eiffel Tower was completed in 1889."
    assert answer_contained(answer, "1889") == 1.0
    assert exact_match(answer, "1889") == 0.0


def test_a_gold_that_normalises_to_nothing_is_a_named_error():
    assert answer_contained("an apple", ["", "apple"]) == 1.0  # the empty gold is ignored
    with pytest.raises(DataError, match="non-empty gold"):
        answer_contained("anything", ["", "the", "..."])


def test_answer_in_passages_respects_the_cut_at_k():
    passages = ["Paris is the capital of France.", "Lyon is a city.",
                "Mount Blanc is 4,806 m high."]
    assert answer_in_passages(passages, "4806 m") == 1.0
    assert answer_in_passages(passages, "4806 m", k=2) == 0.0
    assert answer_in_passages(passages, ["Berlin", "Lyon"], k=2) == 1.0
    assert answer_in_passages([], "Paris") == 0.0
    assert answer_recall_at_k([passages, passages[:1]], ["Lyon", "Lyon"], k=3) == 0.5
    with pytest.raises(DataError):
        answer_recall_at_k([passages], ["a", "b"], k=1)
