"""Questions of several kinds from corpus text: what each rule asks, the ambiguity filters,
and splits that share no article and no question text."""

from __future__ import annotations

import pytest

from fedrag_jax.errors import DataError
from fedrag_jax.qa_data import question_for
from fedrag_jax.questions import (
    KINDS,
    assert_disjoint,
    describe_kinds,
    generate_questions,
    kind_counts,
    make_question_splits,
    split_sentences,
)


def article(i, title, text, description="", topic=""):
    return {"id": f"a{i}", "title": title, "text": text,
            "metadata": {"topic": topic, "description": description}}


CORPUS = [
    article(0, "Iron", "Iron is a chemical element; it has symbol Fe and atomic number 26. "
            "It is a metal.", "Chemical element with atomic number 26 (Fe)", "Physical sciences"),
    article(1, "Casablanca (film)", "Casablanca is a 1942 American romantic drama film directed "
            "by Michael Curtiz and starring Humphrey Bogart.", "1942 film by Michael Curtiz",
            "Arts"),
    article(2, "Lake Onega", "Lake Onega is a lake in northwestern Russia, on the territory of "
            "the Republic of Karelia. It is fed by about 50 rivers.",
            "Freshwater lake in Russia, second largest in Europe", "Geography"),
    article(3, "Erasmus", "Desiderius Erasmus Roterodamus, commonly known as Erasmus, was a "
            "Dutch humanist and Catholic theologian. He was born in Rotterdam.",
            "Dutch humanist (c. 1466–1536)", "People"),
    article(4, "Bucharest", "Bucharest is the capital and largest city of Romania. Bucharest "
            "has a population of 1,716,961 residents within city limits.",
            "Capital and largest city of Romania", "Geography"),
    article(5, "Black pepper", "Black pepper is a flowering vine in the family Piperaceae, "
            "cultivated for its fruit. The fruit of black pepper is a drupe.",
            "Flowering vine of the family Piperaceae", "Biology"),
    article(6, "Coordinated Universal Time", "Coordinated Universal Time (UTC) is the primary "
            "time standard globally used to regulate clocks.", "Primary time standard used "
            "worldwide", "Technology"),
    article(7, "Moby-Dick", "Moby-Dick; or, The Whale is an 1851 epic novel by American writer "
            "Herman Melville.", "Novel by Herman Melville", "Arts"),
    article(8, "University of Tokyo", "The University of Tokyo is a public research university "
            "in Bunkyō, Tokyo, Japan. It was founded in 1877 as the first imperial university.",
            "Public research university in Tokyo, Japan", "Society"),
    article(9, "Louis XIV", "Louis XIV was King of France from 14 May 1643 until his death in "
            "1715. His reign is the longest of any monarch.", "King of France from 1643 to 1715",
            "People"),
    # the ambiguity traps
    article(10, "Mercury (planet)", "Mercury is the first planet from the Sun. It was known "
            "since antiquity.", "First planet from the Sun", "Physical sciences"),
    article(11, "Mercury (element)", "Mercury is a chemical element; it has symbol Hg and "
            "atomic number 80.", "Chemical element with atomic number 80 (Hg)",
            "Physical sciences"),
    article(12, "Alpha", "Alpha is a town in Ruritania.", "Town in the north of Ruritania"),
    article(13, "Beta", "Beta is a village in Ruritania.", "Town in the north of Ruritania"),
]


def by_kind(questions):
    out = {}
    for q in questions:
        out.setdefault(q["kind"], []).append(q)
    return out


def find(questions, query):
    hits = [q for q in questions if q["query"] == query]
    assert hits, f"no question {query!r} among {[q['query'] for q in questions]}"
    return hits[0]


def test_each_rule_asks_for_a_span_of_its_passage():
    qs = generate_questions(CORPUS)
    expected = {
        "What is the chemical symbol of Iron?": ("code", ["Fe"], "a0"),
        "What is the atomic number of Iron?": ("number", ["26"], "a0"),
        "In what year was Casablanca released?": ("year", ["1942"], "a1"),
        "Who directed Casablanca?": ("person", ["Michael Curtiz"], "a1"),
        "In which country is Lake Onega?": ("place", ["Russia"], "a2"),
        "What nationality was Erasmus?": ("nationality", ["Dutch"], "a3"),
        "Where was Erasmus born?": ("place", ["Rotterdam"], "a3"),
        "Of which country is Bucharest the capital?": ("place", ["Romania"], "a4"),
        "What is the population of Bucharest?": ("number", ["1,716,961"], "a4"),
        "To which family does black pepper belong?": ("taxon", ["Piperaceae"], "a5"),
        "What is the abbreviation of Coordinated Universal Time?": ("code", ["UTC"], "a6"),
        "Who wrote Moby-Dick?": ("person", ["Herman Melville"], "a7"),
        "In what year was Moby-Dick published?": ("year", ["1851"], "a7"),
        "When was the University of Tokyo founded?": ("year", ["1877"], "a8"),
        "In which country is the University of Tokyo?": ("place", ["Japan"], "a8"),
        "In what year did Louis XIV become King of France?": ("year", ["1643", "14 May 1643"],
                                                              "a9"),
        "In what year did Louis XIV die?": ("year", ["1715"], "a9"),
        "In which country is Bucharest?": None,  # the same fact as "Of which country ..."
    }
    for query, want in expected.items():
        if want is None:
            assert query not in {q["query"] for q in qs}
            continue
        q = find(qs, query)
        kind, answers, gold = want
        assert (q["kind"], q["answers"], q["gold_id"]) == (kind, answers, gold), q
        assert q["response"] == answers[0]
        assert set(q) >= {"query", "response", "answers", "gold_id", "topic", "kind", "title",
                          "evidence"}
    title_q = find(qs, question_for("Dutch humanist (c. 1466–1536)", "People"))
    assert title_q["kind"] == "title" and title_q["response"] == "Erasmus"


def test_ambiguous_questions_are_dropped():
    qs = generate_questions(CORPUS)
    ids = {q["gold_id"] for q in qs if q["kind"] != "title"}
    # "Mercury" names two articles: no question of another kind may ask about "Mercury"
    assert not ids & {"a10", "a11"}
    # two articles with one description: the title question fits both, so neither is asked
    assert not [q for q in qs if "north of Ruritania" in q["query"]]
    for q in qs:
        norm_q = q["query"].lower()
        for ans in q["answers"]:
            assert ans.lower() not in norm_q  # the question never gives its answer away
        if q["kind"] != "title":
            assert q["response"].lower() != q["title"].lower()


def test_a_question_two_articles_produce_is_dropped_with_every_copy():
    twins = [article(0, "Foo", "Foo is a chemical element; it has symbol Fo and atomic "
                     "number 7."),
             article(1, "Foo (isotope)", "Foo is a chemical element; it has symbol Fx and "
                     "atomic number 8.")]
    assert generate_questions(twins) == []  # same subject "Foo", same question texts


def test_a_user_corpus_without_metadata_gets_every_kind_but_title():
    corpus = [{"id": r["id"], "title": r["title"], "text": r["text"]} for r in CORPUS]
    qs = generate_questions(corpus)
    assert qs and "title" not in kind_counts(qs)
    assert KINDS["title"].needs_metadata
    assert {"code", "number", "year", "place", "person", "nationality", "taxon"} <= \
        set(kind_counts(qs))
    assert [q["query"] for q in qs] == [q["query"] for q in generate_questions(CORPUS)
                                        if q["kind"] != "title"]


def test_describe_kinds_lists_every_kind_with_counts():
    rows = describe_kinds(CORPUS)
    assert [r["kind"] for r in rows] == list(KINDS)
    counts = kind_counts(generate_questions(CORPUS))
    for r in rows:
        assert r["questions"] == counts.get(r["kind"], 0) and r["description"]
    with pytest.raises(DataError, match="unknown question kind"):
        generate_questions(CORPUS, kinds=["title", "colour"])


def test_sentences_do_not_split_after_initials_or_abbreviations():
    text = ("The War of the Worlds is a novel by H. G. Wells. It was written c. 1895 in "
            "St. Albans, U.S. style.\nA new line starts here.")
    assert split_sentences(text) == [
        "The War of the Worlds is a novel by H. G. Wells.",
        "It was written c. 1895 in St. Albans, U.S. style.", "A new line starts here."]


# --- splits ----------------------------------------------------------------------------------
def synthetic_corpus(n: int) -> list[dict]:
    """n element articles (code + number questions) and n town articles (place questions)."""
    rows = []
    for i in range(n):
        rows.append(article(2 * i, f"Elementium{i}", f"Elementium{i} is a chemical element; it "
                            f"has symbol E{chr(97 + i % 26)} and atomic number {100 + i}.",
                            f"Chemical element number {100 + i} of the table"))
        rows.append(article(2 * i + 1, f"Townsville{i}", f"Townsville{i} is a town in "
                            f"{['Peru', 'Chile', 'Kenya'][i % 3]}.",
                            f"Small town in the hills number {i}"))
    return rows


def test_splits_share_no_article_and_no_question_text():
    corpus = synthetic_corpus(60)
    splits = make_question_splits(corpus, kinds=["number", "place", "title"], num_train=None,
                                  num_dev=5, num_test=10, seed=1)
    assert_disjoint(splits.train, splits.dev, splits.test)
    counts = splits.counts()
    assert counts["test"] == {"title": 10, "place": 10, "number": 10}
    assert counts["dev"] == {"title": 5, "place": 5, "number": 5}
    assert sum(counts["train"].values()) > 0
    ids = [{r["gold_id"] for r in s} for s in (splits.train, splits.dev, splits.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert "| number |" in splits.table()


def test_the_test_split_does_not_depend_on_the_train_size():
    corpus = synthetic_corpus(60)
    a = make_question_splits(corpus, num_train=3, num_dev=4, num_test=8, seed=5,
                             kinds=["number", "place"])
    b = make_question_splits(corpus, num_train=None, num_dev=4, num_test=8, seed=5,
                             kinds=["number", "place"])
    assert a.test == b.test and a.dev == b.dev and len(a.train) < len(b.train)
    c = make_question_splits(corpus, num_train=3, num_dev=4, num_test=8, seed=6,
                             kinds=["number", "place"])
    assert c.test != a.test


def test_too_few_questions_is_a_named_error_unless_allowed():
    corpus = synthetic_corpus(10)
    with pytest.raises(DataError, match="not enough questions"):
        make_question_splits(corpus, kinds=["place"], num_train=None, num_dev=0, num_test=20)
    splits = make_question_splits(corpus, kinds=["place"], num_train=None, num_dev=0,
                                  num_test=20, allow_fewer=True)
    assert len(splits.test) == 10 and splits.shortfall() == {"test": {"place": 10}}
    per_kind = make_question_splits(corpus, kinds=["place", "code"], num_train=0,
                                    num_dev=0, num_test={"place": 4, "code": 6})
    assert per_kind.counts()["test"] == {"place": 4, "code": 6}


def test_assert_disjoint_catches_a_shared_article_or_question():
    q = {"query": "What is X?", "gold_id": "a1"}
    with pytest.raises(DataError, match="article"):
        assert_disjoint([q], [{"query": "What is Y?", "gold_id": "a1"}])
    with pytest.raises(DataError, match="is in splits"):
        assert_disjoint([q], [{"query": "what is x", "gold_id": "a2"}])
    with pytest.raises(DataError, match="twice"):
        assert_disjoint([q, dict(q)])
    assert_disjoint([q], [{"query": "What is Y?", "gold_id": "a2"}])


@pytest.mark.slow
def test_bundled_corpus_kinds_and_splits():
    from fedrag_jax.indexing import load_corpus

    corpus = load_corpus()
    questions = generate_questions(corpus)
    counts = kind_counts(questions)
    assert set(counts) == set(KINDS)
    assert counts["title"] > 3000 and counts["nationality"] > 1000
    assert all(n >= 150 for n in counts.values()), counts
    splits = make_question_splits(corpus, num_train=None, num_dev=32, num_test=96, seed=0,
                                  questions=questions)
    assert_disjoint(splits.train, splits.dev, splits.test)
    assert all(n == 96 for n in splits.counts()["test"].values())
    texts = {q["query"] for q in questions}
    assert len(texts) == len(questions)  # no question text twice anywhere
