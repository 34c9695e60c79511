"""Evals: metrics by hand, the eight loaders on fixture files in each hub schema, Benchmarker."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from fedrag_jax.errors import ConfigError, DataError
from fedrag_jax.evals import (
    BENCHMARKS,
    Benchmarker,
    BenchmarkExample,
    RunningMean,
    answer_to_choice,
    default_prompt,
    exact_match,
    load_benchmark,
    load_boolq,
    load_hellaswag,
    load_hotpotqa,
    load_mmlu,
    load_nq_open,
    load_pubmedqa,
    load_squad_v2,
    load_trivia_qa,
    mrr,
    multiple_choice_accuracy,
    normalize_answer,
    query_recall_at_k,
    recall_at_k,
    reciprocal_rank,
    token_f1,
)
from fedrag_jax.types import KnowledgeNode, RAGResponse, SourceNode


# --- metrics -------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    ("The  Quick, Brown-Fox!", "quick brownfox"),  # punctuation removed, not spaced
    ("An apple a day", "apple day"),
    ("theater anthem", "theater anthem"),  # articles only as whole words
    ("  \t\n ", ""),
    ("The", ""),
    ("U.S.A.", "usa"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_match():
    assert exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert exact_match("Eiffel", "Eiffel tower") == 0.0
    assert exact_match("city of light", ["Paris", "City of Light"]) == 1.0
    assert exact_match("Lyon", ["Paris", "City of Light"]) == 0.0


def test_token_f1():
    # pred {big, apple, city} vs gold {big, apple}: p = 2/3, r = 1 -> 0.8
    assert token_f1("big apple city", "the big apple") == pytest.approx(0.8)
    # max over golds: vs "york" 2/3, vs "new york city" 0.8
    assert token_f1("new york", ["york", "new york city"]) == pytest.approx(0.8)
    # repeated tokens count by multiplicity: common = 2, p = r = 2/3
    assert token_f1("x y y", "y y z") == pytest.approx(2 / 3)
    assert token_f1("red", "blue") == 0.0


def test_squad_v2_empty_answers():
    for golds in ([], [""], ["  the "]):  # all mean "unanswerable"
        assert exact_match("", golds) == 1.0
        assert token_f1("", golds) == 1.0
        assert exact_match("Paris", golds) == 0.0
        assert token_f1("Paris", golds) == 0.0
    # an empty gold beside a real one is dropped, as in the official v2 script
    assert exact_match("", ["", "Paris"]) == 0.0
    assert exact_match("paris", ["", "Paris"]) == 1.0
    assert token_f1("", "Paris") == 0.0


def test_recall_and_mrr():
    retrieved = [["d1", "d2", "d3"], ["d4", "d5", "d6"]]
    gold = ["d2", ["d6", "d7"]]
    assert recall_at_k(retrieved, gold, 2) == pytest.approx(0.5)  # 1, 0
    assert recall_at_k(retrieved, gold, 3) == pytest.approx(0.75)  # 1, 1/2
    assert recall_at_k(retrieved, gold, 1) == 0.0
    assert mrr(retrieved, gold) == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert mrr(retrieved, gold, k=2) == pytest.approx(0.25)
    assert query_recall_at_k(["a", "b"], "b", 1) == 0.0
    assert query_recall_at_k(["a", "b"], "b") == 1.0
    assert reciprocal_rank(["a", "b"], ["c", "b"]) == 0.5
    with pytest.raises(DataError, match="retrieved lists"):
        recall_at_k(retrieved, gold[:1], 2)
    with pytest.raises(DataError, match="no gold ids"):
        mrr([["a"]], [[]])
    with pytest.raises(ConfigError, match="k must be"):
        recall_at_k(retrieved, gold, 0)


def test_multiple_choice():
    assert multiple_choice_accuracy([0, 2, None, 1], [0, 1, 2, 1]) == 0.5
    with pytest.raises(DataError):
        multiple_choice_accuracy([0], [0, 1])
    choices = ["Rome", "Paris", "Berlin", "Madrid"]
    assert answer_to_choice("B", choices) == 1
    assert answer_to_choice(" b. ", choices) == 1
    assert answer_to_choice("(C)", choices) == 2
    assert answer_to_choice("D) Madrid", choices) == 3
    assert answer_to_choice("The answer is A", choices) == 0
    assert answer_to_choice("Paris, France", choices) == 1  # best token F1
    assert answer_to_choice("Lisbon", choices) is None
    assert answer_to_choice("E", choices) is None  # letter out of range, no text match
    # "A cat" starts with the article, not with choice letter A
    assert answer_to_choice("A cat", ["dog", "a cat"]) == 1
    assert answer_to_choice("red", ["red car", "red bus"]) == 0  # tie -> first


# --- loaders -------------------------------------------------------------------------------
def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _load(loader, tmp_path: Path, rows: list[dict], **kw):
    f = _write_jsonl(tmp_path / "data.jsonl", rows)
    return loader(data_files=str(f), cache_dir=str(tmp_path / "cache"), **kw)


MMLU_ROWS = [
    {"question": "What is 2 + 2?", "subject": "elementary_mathematics",
     "choices": ["3", "4", "5", "6"], "answer": 1},
    {"question": "The capital of France is", "subject": "geography",
     "choices": ["Paris", "Rome", "Berlin", "Madrid"], "answer": 0},
]


def test_load_mmlu(tmp_path):
    exs = _load(load_mmlu, tmp_path, MMLU_ROWS)
    assert len(exs) == 2
    e = exs[0]
    assert e.example_id == "mmlu-test-0"
    assert e.query == "What is 2 + 2?"
    assert e.choices == ["3", "4", "5", "6"] and e.gold_choice == 1 and e.answers == ["4"]
    assert e.metadata == {"subject": "elementary_mathematics"}
    assert e.is_multiple_choice and e.gold_passage is None
    assert exs[1].answers == ["Paris"] and exs[1].gold_choice == 0


def test_load_mmlu_parquet_split_dict_and_limit(tmp_path):
    import datasets

    path = tmp_path / "mmlu.parquet"
    datasets.Dataset.from_list(MMLU_ROWS).to_parquet(str(path))
    exs = load_mmlu(split="dev", data_files={"dev": str(path)}, limit=1,
                    cache_dir=str(tmp_path / "cache"))
    assert [e.example_id for e in exs] == ["mmlu-dev-0"] and exs[0].answers == ["4"]


def test_load_mmlu_csv_nested_cells(tmp_path):
    """CSV cannot hold lists: a JSON or Python-literal cell is parsed; a letter answer works."""
    path = tmp_path / "mmlu.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "subject", "choices", "answer"])
        w.writerow(["What is 2 + 2?", "math", json.dumps(["3", "4", "5", "6"]), "B"])
        w.writerow(["Capital of Italy?", "geo", repr(["Paris", "Rome"]), "1"])
    exs = load_mmlu(data_files=str(path), cache_dir=str(tmp_path / "cache"))
    assert [(e.choices, e.gold_choice, e.answers) for e in exs] == [
        (["3", "4", "5", "6"], 1, ["4"]), (["Paris", "Rome"], 1, ["Rome"])]


def test_load_nq_open(tmp_path):
    exs = _load(load_nq_open, tmp_path, [
        {"question": "who wrote hamlet", "answer": ["William Shakespeare", "Shakespeare"]},
        {"question": "when did apollo 11 land", "answer": ["1969", "July 20, 1969"]},
    ])
    assert [e.example_id for e in exs] == ["nq_open-validation-0", "nq_open-validation-1"]
    assert exs[0].query == "who wrote hamlet"
    assert exs[0].answers == ["William Shakespeare", "Shakespeare"]
    assert exs[1].answers == ["1969", "July 20, 1969"]
    assert exs[0].choices is None and exs[0].gold_passage is None and exs[0].metadata == {}


def _trivia_row(qid: str, question: str, value: str, aliases: list[str]) -> dict:
    return {
        "question": question, "question_id": qid, "question_source": "http://www.quiz.com/",
        "entity_pages": {"doc_source": [], "filename": [], "title": [], "wiki_context": []},
        "search_results": {"description": [], "filename": [], "rank": [], "title": [],
                           "url": [], "search_context": []},
        "answer": {"aliases": aliases, "normalized_aliases": [a.lower() for a in aliases],
                   "matched_wiki_entity_name": "", "normalized_matched_wiki_entity_name": "",
                   "normalized_value": value.lower(), "type": "WikipediaEntity",
                   "value": value},
    }


def test_load_trivia_qa(tmp_path):
    exs = _load(load_trivia_qa, tmp_path, [
        _trivia_row("tc_1", "Which planet is the Red Planet?", "Mars", ["Mars", "Planet Mars"]),
        _trivia_row("tc_2", "Who painted the Mona Lisa?", "Leonardo da Vinci",
                    ["Leonardo", "Da Vinci"]),
    ])
    assert [e.example_id for e in exs] == ["tc_1", "tc_2"]
    assert exs[0].query == "Which planet is the Red Planet?"
    assert exs[0].answers == ["Mars", "Planet Mars"]  # value first, duplicates dropped
    assert exs[1].answers == ["Leonardo da Vinci", "Leonardo", "Da Vinci"]
    assert exs[0].metadata == {"normalized_aliases": ["mars", "planet mars"],
                               "answer_type": "WikipediaEntity",
                               "question_source": "http://www.quiz.com/"}


def test_load_pubmedqa(tmp_path):
    ctx = {"contexts": ["Background text.", "Results text."], "labels": ["BACKGROUND", "RESULTS"],
           "meshes": ["Humans", "Aspirin"], "reasoning_required_pred": ["yes", "no"],
           "reasoning_free_pred": ["yes", "no"]}
    exs = _load(load_pubmedqa, tmp_path, [
        {"pubid": 21645374, "question": "Does aspirin help?", "context": ctx,
         "long_answer": "It helps.", "final_decision": "yes"},
        {"pubid": 16418930, "question": "Is X linked to Y?", "context": ctx,
         "long_answer": "Unclear.", "final_decision": "maybe"},
    ])
    e = exs[0]
    assert e.example_id == "21645374" and e.query == "Does aspirin help?"
    assert e.answers == ["yes"] and exs[1].answers == ["maybe"]
    assert e.gold_passage == "Background text.\nResults text."
    assert e.metadata == {"long_answer": "It helps.", "labels": ["BACKGROUND", "RESULTS"],
                          "meshes": ["Humans", "Aspirin"]}


BOOLQ_ROWS = [
    {"question": "is the sky blue", "answer": True, "passage": "The sky is blue by day."},
    {"question": "is fire cold", "answer": False, "passage": "Fire is hot."},
]


def test_load_boolq(tmp_path):
    exs = _load(load_boolq, tmp_path, BOOLQ_ROWS)
    assert [e.example_id for e in exs] == ["boolq-validation-0", "boolq-validation-1"]
    assert [e.answers for e in exs] == [["yes"], ["no"]]
    assert exs[0].query == "is the sky blue"
    assert exs[0].gold_passage == "The sky is blue by day."
    assert exs[1].gold_passage == "Fire is hot."


def test_load_boolq_csv(tmp_path):
    path = tmp_path / "boolq.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["question", "answer", "passage"])
        w.writeheader()
        w.writerows(BOOLQ_ROWS)
    exs = load_boolq(data_files=str(path), cache_dir=str(tmp_path / "cache"))
    assert [e.answers for e in exs] == [["yes"], ["no"]]


def _hotpot_row() -> dict:
    return {
        "id": "5a8b57f25542995d1e6f1371",
        "question": "Were Scott Derrickson and Ed Wood of the same nationality?",
        "answer": "yes", "type": "comparison", "level": "hard",
        "supporting_facts": {"title": ["Scott Derrickson", "Ed Wood", "Ed Wood"],
                             "sent_id": [0, 0, 1]},
        "context": {"title": ["Ed Wood", "Other", "Scott Derrickson"],
                    "sentences": [["Ed Wood was an American.", " He made films."],
                                  ["Unrelated."],
                                  ["Scott Derrickson is an American director."]]},
    }


def test_load_hotpotqa(tmp_path):
    row2 = {**_hotpot_row(), "id": "h2", "answer": "Ed Wood", "type": "bridge",
            "supporting_facts": {"title": ["Other"], "sent_id": [0]}}
    exs = _load(load_hotpotqa, tmp_path, [_hotpot_row(), row2])
    e = exs[0]
    assert e.example_id == "5a8b57f25542995d1e6f1371"
    assert e.query == "Were Scott Derrickson and Ed Wood of the same nationality?"
    assert e.answers == ["yes"]
    # supporting paragraphs in order of first mention, each once, sentences joined
    assert e.gold_passage == ("Scott Derrickson is an American director.\n"
                              "Ed Wood was an American. He made films.")
    assert e.metadata == {"type": "comparison", "level": "hard",
                          "supporting_titles": ["Scott Derrickson", "Ed Wood"]}
    assert exs[1].gold_passage == "Unrelated." and exs[1].answers == ["Ed Wood"]


SQUAD_ROWS = [
    {"id": "56ddde6b9a695914005b9628", "title": "Normans",
     "context": "The Normans were in Normandy, a region in France.",
     "question": "In what country is Normandy located?",
     "answers": {"text": ["France", "France", "France"], "answer_start": [43, 43, 43]}},
    {"id": "5ad39d53604f3c001a3fe8d1", "title": "Normans",
     "context": "The Normans were in Normandy, a region in France.",
     "question": "Who gave their name to Normandy in the 1000s?",
     "answers": {"text": [], "answer_start": []}},
]


def test_load_squad_v2(tmp_path):
    exs = _load(load_squad_v2, tmp_path, SQUAD_ROWS)
    a, b = exs
    assert a.example_id == "56ddde6b9a695914005b9628"
    assert a.query == "In what country is Normandy located?"
    assert a.answers == ["France"]
    assert a.gold_passage == "The Normans were in Normandy, a region in France."
    assert a.metadata == {"title": "Normans", "answer_start": [43, 43, 43],
                          "is_impossible": False}
    assert b.answers == [] and b.metadata["is_impossible"] is True


def test_load_hellaswag(tmp_path):
    exs = _load(load_hellaswag, tmp_path, [
        {"ind": 24, "activity_label": "Roof shingle removal",
         "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
         "ctx": "A man is sitting on a roof. he",
         "endings": ["is using wrap.", "is ripping shingles off.", "is holding a cake.",
                     "starts singing."],
         "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val", "split_type": "indomain",
         "label": "1"},
    ])
    (e,) = exs
    assert e.example_id == "hellaswag-validation-24"
    assert e.query == "Roof shingle removal: A man is sitting on a roof. he"
    assert e.choices[1] == "is ripping shingles off." and len(e.choices) == 4
    assert e.gold_choice == 1 and e.answers == ["is ripping shingles off."]
    assert e.metadata == {"activity_label": "Roof shingle removal",
                          "ctx": "A man is sitting on a roof. he",
                          "source_id": "activitynet~v_-JhWjGDPHMY", "split_type": "indomain"}


@pytest.mark.parametrize("loader, rows, field", [
    (load_mmlu, [MMLU_ROWS[0], {k: v for k, v in MMLU_ROWS[1].items() if k != "answer"}],
     "answer"),
    (load_mmlu, [{**MMLU_ROWS[0], "answer": 7}], "answer"),
    (load_nq_open, [{"question": "q", "answer": []}], "answer"),
    (load_trivia_qa, [_trivia_row("t", "q", "", [])], "answer.value"),
    (load_pubmedqa, [{"pubid": 1, "question": "q", "context": {"contexts": ["c"]},
                      "long_answer": "", "final_decision": "perhaps"}], "final_decision"),
    (load_boolq, [{"question": "q", "answer": True}], "passage"),
    (load_hotpotqa, [{**_hotpot_row(), "supporting_facts": {"title": ["Nope"], "sent_id": [0]}}],
     "supporting_facts.title"),
    (load_squad_v2, [{k: v for k, v in SQUAD_ROWS[0].items() if k != "question"}], "question"),
    (load_hellaswag, [{"ind": 1, "ctx": "c", "endings": ["a", "b"], "label": ""}], "label"),
])
def test_malformed_rows_raise_data_error(tmp_path, loader, rows, field):
    with pytest.raises(DataError) as err:
        _load(loader, tmp_path, rows)
    msg = str(err.value)
    assert f"'{field}'" in msg and "data.jsonl" in msg


def test_unreadable_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match="bad.jsonl"):
        load_boolq(data_files=str(bad), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="not found"):
        load_boolq(data_files=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="format"):
        load_boolq(data_files=str(tmp_path / "x.txt"))


def test_registry_and_config_errors(tmp_path, monkeypatch):
    assert set(BENCHMARKS) == {"mmlu", "nq_open", "trivia_qa", "pubmedqa", "boolq", "hotpotqa",
                               "squad_v2", "hellaswag"}
    f = _write_jsonl(tmp_path / "b.jsonl", BOOLQ_ROWS)
    assert len(load_benchmark("BoolQ", data_files=str(f), cache_dir=str(tmp_path / "c"))) == 2
    with pytest.raises(ConfigError, match="unknown benchmark 'nope'.*mmlu.*hellaswag"):
        load_benchmark("nope")
    with pytest.raises(ConfigError, match="source"):
        load_boolq(source="web")
    with pytest.raises(ConfigError, match="data_files"):
        load_boolq(source="files")
    # TFDS without TensorFlow (None in sys.modules makes the import fail, installed or not)
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ConfigError, match="TensorFlow.*data_files"):
        load_boolq(source="tfds")
    with pytest.raises(ConfigError, match="no TensorFlow Datasets builder"):
        load_mmlu(source="tfds")


def test_hub_source_uses_hub_names(monkeypatch):
    """source='hub' asks datasets for the right hub name, config and split (faked: no network)."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, *, split, cache_dir=None):
        calls.append((path, name, split))
        return MMLU_ROWS if path == "cais/mmlu" else SQUAD_ROWS

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_mmlu()[1].answers == ["Paris"]
    assert load_squad_v2(source="hub", limit=1)[0].answers == ["France"]
    assert load_mmlu(config="abstract_algebra", split="dev")
    assert calls == [("cais/mmlu", "all", "test"), ("rajpurkar/squad_v2", "squad_v2", "validation"),
                     ("cais/mmlu", "abstract_algebra", "dev")]


# --- Benchmarker ---------------------------------------------------------------------------
class FakeRAG:
    """Answers by the first line of the prompt; returns the given node ids as sources."""

    def __init__(self, replies: dict[str, tuple[str, list[str]]]) -> None:
        self.replies = replies
        self.batches: list[list[str]] = []

    def batch_query(self, queries: list[str]) -> list[RAGResponse]:
        self.batches.append(list(queries))
        out = []
        for q in queries:
            answer, ids = self.replies[q.split("\n")[0]]
            nodes = [SourceNode(node=KnowledgeNode(node_id=i, text=f"text {i}"), score=1.0 - j)
                     for j, i in enumerate(ids)]
            out.append(RAGResponse(answer=answer, source_nodes=nodes))
        return out


EXAMPLES = [
    # first example scores 0.0 everywhere except retrieval
    BenchmarkExample("e1", "q1", ["Paris"], gold_passage_id="d1"),
    BenchmarkExample("e2", "q2", ["Rome"], gold_passage_id="d3"),
    BenchmarkExample("e3", "q3", ["blue"], choices=["red", "green", "blue"], gold_choice=2),
    BenchmarkExample("e4", "q4", ["the big apple"]),
    BenchmarkExample("e5", "q5", []),  # unanswerable
    BenchmarkExample("e6", "q6", ["cat"], choices=["cat", "dog"], gold_choice=0),
]
REPLIES = {"q1": ("London", ["d2", "d1"]), "q2": ("Rome", ["d3"]), "q3": ("C", []),
           "q4": ("big apple city", []), "q5": ("", []), "q6": ("dog", ["d9"])}


def test_benchmarker_aggregate(tmp_path, capsys):
    rag = FakeRAG(REPLIES)
    out = tmp_path / "run"
    result = Benchmarker(rag, EXAMPLES, batch_size=4, out_dir=out).run()
    # EM 0,1,1,0,1,0; F1 0,1,1,0.8,1,0; MC e3 right, e6 wrong; retrieval e1 (rank 2), e2 (rank 1)
    assert result.metrics == pytest.approx({"exact_match": 3 / 6, "f1": 3.8 / 6,
                                            "mc_accuracy": 0.5, "recall_at_k": 1.0,
                                            "mrr": 0.75})
    assert result.counts == {"exact_match": 6, "f1": 6, "mc_accuracy": 2, "recall_at_k": 2,
                             "mrr": 2}
    assert [len(b) for b in rag.batches] == [4, 2]
    # MC prompts carry lettered choices
    assert rag.batches[0][2] == "q3\n\nA. red\nB. green\nC. blue\n\n" \
                                "Answer with the letter of the correct choice."
    r3, r6 = result.examples[2], result.examples[5]
    assert (r3.predicted_choice, r3.mc_correct) == (2, 1.0)
    assert (r6.predicted_choice, r6.mc_correct) == (1, 0.0)
    assert result.examples[0].retrieved_ids == ["d2", "d1"]

    lines = (out / "examples.jsonl").read_text().splitlines()
    assert len(lines) == 6
    rows = [json.loads(line) for line in lines]
    assert [r["example_id"] for r in rows] == ["e1", "e2", "e3", "e4", "e5", "e6"]
    assert rows[3]["f1"] == pytest.approx(0.8) and rows[4]["exact_match"] == 1.0
    agg = json.loads((out / "aggregate.json").read_text())
    assert agg == json.loads(json.dumps(result.aggregate()))
    assert agg["num_examples"] == 6
    assert sorted(p.name for p in out.iterdir()) == ["aggregate.json", "examples.jsonl"]
    assert "6/6" in capsys.readouterr().err  # the progress bar ran to the end

    # recall@1 / MRR@1: e1's gold is at rank 2 -> 0, e2 -> 1
    cut = Benchmarker(FakeRAG(REPLIES), EXAMPLES, recall_k=1, progress=False).run()
    assert cut.metrics["recall_at_k"] == 0.5 and cut.metrics["mrr"] == 0.5


def test_running_mean_zero_then_one():
    """The reference replaced a running mean of 0.0 by the next score (0.0, 1.0 -> 1.0)."""
    m = RunningMean()
    assert m.mean is None
    m.add(0.0)
    assert m.mean == 0.0
    m.add(1.0)
    assert m.mean == 0.5
    exs = [BenchmarkExample("a", "qa", ["no"], choices=["yes", "no"], gold_choice=1,
                            gold_passage_id="d1"),
           BenchmarkExample("b", "qb", ["yes"], choices=["yes", "no"], gold_choice=0,
                            gold_passage_id="d1")]
    rag = FakeRAG({"qa": ("A", ["d0"]), "qb": ("A", ["d1"])})  # first wrong, second right
    result = Benchmarker(rag, exs, batch_size=1, progress=False).run()
    assert result.metrics == {"exact_match": 0.5, "f1": 0.5, "mc_accuracy": 0.5,
                              "recall_at_k": 0.5, "mrr": 0.5}
    assert len(rag.batches) == 2


def test_benchmarker_on_loaded_fixture(tmp_path):
    exs = _load(load_squad_v2, tmp_path, SQUAD_ROWS) + load_mmlu(
        data_files=str(_write_jsonl(tmp_path / "mmlu.jsonl", MMLU_ROWS)),
        cache_dir=str(tmp_path / "cache"))
    replies = {"In what country is Normandy located?": ("France.", []),
               "Who gave their name to Normandy in the 1000s?": ("the Normans", []),
               "What is 2 + 2?": ("4", []), "The capital of France is": ("B", [])}
    result = Benchmarker(FakeRAG(replies), exs, out_dir=tmp_path / "o", progress=False).run(
        limit=3)
    # France. -> EM 1; unanswerable answered -> 0; "4" = choice B -> EM 1, MC right
    assert result.num_examples == 3
    assert result.metrics == pytest.approx({"exact_match": 2 / 3, "f1": 2 / 3,
                                            "mc_accuracy": 1.0})
    assert len((tmp_path / "o" / "examples.jsonl").read_text().splitlines()) == 3


def test_benchmarker_errors(tmp_path):
    class Short(FakeRAG):
        def batch_query(self, queries):
            return super().batch_query(queries)[:-1]

    out = tmp_path / "o"
    with pytest.raises(DataError, match="returned 3 responses for 4"):
        Benchmarker(Short(REPLIES), EXAMPLES, batch_size=4, out_dir=out, progress=False).run()
    assert list(out.iterdir()) == []  # no half-written outputs, no temporary files left
    with pytest.raises(ConfigError, match="batch_query"):
        Benchmarker(object(), EXAMPLES)
    with pytest.raises(ConfigError, match="batch_size"):
        Benchmarker(FakeRAG(REPLIES), EXAMPLES, batch_size=0)
    with pytest.raises(DataError, match="no benchmark examples"):
        Benchmarker(FakeRAG(REPLIES), [], progress=False).run()
    assert default_prompt(EXAMPLES[0]) == "q1"
    with pytest.raises(DataError, match="gold_choice"):
        BenchmarkExample("x", "q", ["a"], choices=["a"], gold_choice=3)


def test_load_qa_jsonl_spellings_and_errors(tmp_path):
    from fedrag_jax.evals import load_qa_jsonl

    f = tmp_path / "qa.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"query": "q1", "answer": "a1", "gold_id": 3},
        {"question": "q2", "answers": ["a2", "b2", "a2"], "id": "x"},
        {"query": "q3", "response": "r3", "gold_passage_id": "p7", "gold_passage": "text"},
        {"query": "q4", "choices": ["c0", "c1"], "gold_choice": "B"},
    ]) + "\n\n")
    a, b, c, d = load_qa_jsonl(f)
    assert (a.query, a.answers, a.gold_passage_id, a.example_id) == ("q1", ["a1"], "3", "1")
    assert (b.answers, b.example_id, b.gold_passage_id) == (["a2", "b2"], "x", None)
    assert (c.answers, c.gold_passage_id, c.gold_passage) == (["r3"], "p7", "text")
    assert d.is_multiple_choice and d.gold_choice == 1 and d.answers == ["c1"]
    assert len(load_qa_jsonl(f, limit=2)) == 2
    f.write_text('{"query": "q1", "answer": "a"}\n{"answer": "a"}\n')
    with pytest.raises(DataError, match=r"qa\.jsonl:2: no 'query'"):
        load_qa_jsonl(f)
    f.write_text('{"query": "q1"\n')
    with pytest.raises(DataError, match=r"qa\.jsonl:1: not valid JSON"):
        load_qa_jsonl(f)
    with pytest.raises(DataError, match="no such JSONL file"):
        load_qa_jsonl(tmp_path / "missing.jsonl")
