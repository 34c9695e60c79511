"""Factoid questions of several kinds made offline from a corpus by rules over its text.

The demo's original template ("What is the <description>?" -> the title; ``qa_data.py``)
is one kind, "title"; the others ask for a span of the passage (a year, a place, a number,
a person, a code, a nationality, a taxon). See docs/questions.md for the kinds, their
counts on the bundled corpus and their measured precision.
"""

from .rules import KINDS, Article, Candidate, QuestionKind, split_sentences
from .splits import (
    QuestionSplits,
    assert_disjoint,
    describe_kinds,
    generate_questions,
    kind_counts,
    make_question_splits,
)

__all__ = [
    "KINDS",
    "Article",
    "Candidate",
    "QuestionKind",
    "QuestionSplits",
    "assert_disjoint",
    "describe_kinds",
    "generate_questions",
    "kind_counts",
    "make_question_splits",
    "split_sentences",
]
