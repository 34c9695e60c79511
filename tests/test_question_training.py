"""Training on questions of several kinds (data.train: questions): sentence targets, splits
that keep held-out kinds and test articles out of training, and the per-kind evaluation
that flags a kind made worse on purpose."""

from __future__ import annotations

import re

import pytest

from fedrag_jax.config import config_from_dict
from fedrag_jax.errors import DataError
from fedrag_jax.evals.kinds import answered_ids, evaluate_by_kind, kinds_report, summarize
from fedrag_jax.evals.metrics import answer_contained
from fedrag_jax.finetune.manager import load_question_splits, load_train_eval_records
from fedrag_jax.indexing import load_corpus
from fedrag_jax.questions import assert_disjoint
from fedrag_jax.questions.splits import _norm_text
from fedrag_jax.questions.targets import sentence_target, with_targets
from fedrag_jax.types import KnowledgeNode, RAGConfig, SourceNode


def test_sentence_target_states_the_answer_and_stays_short():
    short = {"response": "Swiss", "evidence": "Ferdinand de Saussure was a Swiss linguist."}
    assert sentence_target(short) == "Ferdinand de Saussure was a Swiss linguist."
    long = {"response": "Egyptian", "evidence":
            "Gamal Abdel Nasser Hussein was an Egyptian military officer and revolutionary, "
            "who served as the second president of Egypt from 1954 until his death in 1970, "
            "and who led the 1952 revolution against the monarchy of the country."}
    cut = sentence_target(long)
    assert cut == ("Gamal Abdel Nasser Hussein was an Egyptian military officer and "
                   "revolutionary.")
    # never cut before the answer; a word that only contains the answer does not count
    late = {"response": "Kr", "evidence": "Krypton is a chemical element, a noble gas, with "
            "a very long description of its many uses in lighting and photography, and it "
            "has symbol Kr, and atomic number 36 in the periodic table of the elements."}
    assert sentence_target(late).endswith("has symbol Kr.")
    missing = {"response": "Roman art", "evidence": "The art of Ancient Rome includes mosaics."}
    assert sentence_target(missing) == "Roman art."  # a target always states the answer
    assert sentence_target({"response": "1878", "evidence": ""}) == "1878."
    records = with_targets([short], "answer")
    assert records[0]["response"] == "Swiss" and records[0] is not short
    with pytest.raises(DataError, match="target"):
        with_targets([short], "title")


@pytest.fixture(scope="module")
def bundled():
    return load_corpus("bundled")


def question_config(**data):
    return config_from_dict({"data": {"train": "questions", "num_train": 60, "num_eval": 30,
                                      "num_test": 20, **data}})


def test_question_splits_keep_test_articles_and_held_out_kinds_out_of_training(bundled):
    config = question_config()
    splits = load_question_splits(config, bundled)
    train_kinds = set(config.data.train_kinds)
    assert {r["kind"] for r in splits.train} == train_kinds
    assert {r["kind"] for r in splits.dev} <= train_kinds
    assert {r["kind"] for r in splits.test} - train_kinds  # held-out kinds are tested
    assert len(splits.train) == 60 and len(splits.dev) == 30
    assert_disjoint(splits.train, splits.dev, splits.test)  # by article and by text
    test_articles = {r["gold_id"] for r in splits.test}
    test_texts = {_norm_text(r["query"]) for r in splits.test}
    for r in splits.train + splits.dev:
        assert r["gold_id"] not in test_articles and _norm_text(r["query"]) not in test_texts
        # the target is a sentence that states the answer, not the bare answer
        assert r["response"] != r["answers"][0]
        assert answer_contained(r["response"], r["answers"])
    assert all(r["response"] == r["answers"][0] for r in splits.test)
    assert [r["id"] for r in splits.test] == list(range(len(splits.test)))
    # the test split does not move with the train size
    bigger = load_question_splits(question_config(num_train=120), bundled)
    assert [r["query"] for r in bigger.test] == [r["query"] for r in splits.test]
    train, dev = load_train_eval_records(config, bundled)
    assert [r["query"] for r in train] == [r["query"] for r in splits.train]


class StandIn:
    """Retrieves the gold passage first and answers with its sentence; on ``broken_kind`` it
    names a wrong place (a generator broken on purpose)."""

    def __init__(self, questions, passages, broken_kind=None):
        self.gold = {q["query"]: q for q in questions}
        self.passages = passages
        self.broken_kind = broken_kind
        self.config = RAGConfig(top_k=2)
        self.max_new_tokens = 16
        self.generator = self

    def batch_retrieve(self, queries, k):
        out = []
        for q in queries:
            gold = self.gold[q]["gold_id"]
            other = next(p for p in self.passages if p != gold)
            out.append([SourceNode(KnowledgeNode(i, self.passages[i]), s)
                        for i, s in ((gold, 0.9), (other, 0.1))])
        return out

    def passage_text(self, text):
        return text

    def build_prompt(self, query, sources):
        return f"Q: {query}\nC: {sources[0].text}"

    def generate(self, prompts, max_new_tokens=16):
        out = []
        for p in prompts:
            q = self.gold[re.match(r"Q: (.*)\nC:", p).group(1)]
            out.append("It is in Atlantis." if q["kind"] == self.broken_kind
                       else f"It is {q['answers'][0]}.")
        return out


def test_per_kind_report_flags_a_kind_made_worse_on_purpose():
    questions, passages = [], {}
    for i in range(24):
        passages[f"p{i}"] = f"Town{i} is in Peru; it was founded in {1500 + i}."
        questions.append({"query": f"Where is Town{i}?", "answers": ["Peru"], "kind": "place",
                          "gold_id": f"p{i}"})
        passages[f"q{i}"] = f"Fort{i} was built in {1700 + i}."
        questions.append({"query": f"When was Fort{i} built?", "answers": [str(1700 + i)],
                          "kind": "year", "gold_id": f"q{i}"})
    assert len(answered_ids(questions, 20)) == 40
    base = evaluate_by_kind(StandIn(questions, passages), questions, answered_per_kind=20,
                            progress=False)
    broken = evaluate_by_kind(StandIn(questions, passages, broken_kind="year"), questions,
                              answered_per_kind=20, progress=False)
    assert sum(r["answer"] is not None for r in base) == 40
    s = summarize(base)
    assert s["place"]["contained"] == 1.0 and s["place"]["n_contained"] == 20
    assert s["year"]["recall_at_k"] == 1.0 and s["year"]["n"] == 24
    assert s["year"]["answer_in_prompt"] == 1.0
    assert summarize(broken)["year"]["contained"] == 0.0
    text, data = kinds_report({"untuned": base, "tuned": broken}, "untuned", ["tuned"],
                              kinds=["place", "year"], train_kinds=["place"], seed=0,
                              num_resamples=500)
    assert "significantly WORSE" in text and "**year / answer contained**" in text
    assert "year (held out)" in text and "place (trained)" in text
    flagged = {(r["kind"], r["metric"]) for r in data["comparisons"]["tuned"]
               if r["flag"] == "WORSE"}
    assert ("year", "contained") in flagged and not {k for k, _ in flagged} - {"year", "all"}
    same, _ = kinds_report({"untuned": base, "again": base}, "untuned", ["again"],
                           kinds=["place", "year"], train_kinds=["place"], num_resamples=200)
    assert "no kind significantly worse" in same
