"""scripts/eval_kinds.py end to end on stand-in systems: a generator that answers from its
passages and one deliberately broken on one kind; the report must flag that kind."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from fedrag_jax.types import KnowledgeNode, RAGConfig, SourceNode

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("eval_kinds", ROOT / "scripts" / "eval_kinds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def corpus(n: int = 30) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append({"id": f"e{i}", "title": f"Elementium{i}",
                     "text": f"Elementium{i} is a chemical element; it has symbol "
                             f"Q{chr(97 + i % 26)} and atomic number {100 + i}."})
        rows.append({"id": f"t{i}", "title": f"Townsville{i}",
                     "text": f"Townsville{i} is a town in {['Peru', 'Chile', 'Kenya'][i % 3]}."})
    return rows


class WordTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}


class StandIn:
    """Retrieves the gold passage first; answers with the passage sentence that holds the
    answer (a base model "stating the fact"), or, where ``broken_kind`` asks, a wrong name."""

    def __init__(self, records, passages, questions, broken_kind=None):
        self.passages = passages
        self.gold = {q["query"]: q for q in questions}
        self.broken_kind = broken_kind
        self.generator = self
        self.tokenizer = WordTokenizer()
        self.config = RAGConfig(top_k=3)
        self.max_new_tokens = 32

    def passage_text(self, text):
        return text

    def batch_retrieve(self, queries, k):
        out = []
        for q in queries:
            gold = self.gold[q]["gold_id"]
            ids = [gold] + [p for p in sorted(self.passages) if p != gold][:k - 1]
            out.append([SourceNode(KnowledgeNode(i, self.passages[i]), 1.0) for i in ids])
        return out

    def build_prompt(self, query, sources):
        return f"Q: {query}\nC: {sources[0].text}"

    def generate(self, prompts, max_new_tokens=32):
        answers = []
        for p in prompts:
            query = re.match(r"Q: (.*)\nC:", p).group(1)
            q = self.gold[query]
            if q["kind"] == self.broken_kind:
                answers.append("Atlantis.")
            else:
                answers.append(f"The answer is {q['response']}.")
        return answers


def test_the_report_flags_a_kind_made_worse_on_purpose(tmp_path):
    script = load_script()
    rows = corpus()
    corpus_file = tmp_path / "corpus.jsonl"
    corpus_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = script.parse_args(["--corpus", str(corpus_file), "--exclude-demo", "none",
                              "--num-test", "20", "--answer-per-kind", "15", "--out", str(out),
                              "--bootstrap", "500", "--kinds", "number", "code", "place"])
    test, info = script.test_questions(args)
    assert info["test"] == {"number": 20, "code": 20, "place": 20}
    passages = {r["id"]: f"{r['title']}: {r['text']}" for r in rows}
    systems = {"untuned": StandIn(rows, passages, test),
               "tuned": StandIn(rows, passages, test, broken_kind="place")}
    results = script.run(args, test, info, systems)
    report = (out / "report.md").read_text()
    assert "WARNING: significantly worse" in report and "**place / contained**" in report
    flagged = {(r["kind"], r["metric"]) for r in results["comparisons"]["tuned"]
               if r["flag"] == "WORSE"}
    assert ("place", "contained") in flagged and ("place", "f1") in flagged
    assert not {k for k, _ in flagged} - {"place", "all"}
    place = next(r for r in results["comparisons"]["tuned"]
                 if (r["kind"], r["metric"]) == ("place", "contained"))
    assert (place["n"], place["better"], place["worse"]) == (15, 0, 15)
    s = results["summaries"]["untuned"]
    assert s["number"]["contained"] == 1.0 and s["number"]["n_contained"] == 15
    assert s["number"]["recall_at_k"] == 1.0 and s["number"]["n"] == 20
    assert len((out / "tuned.jsonl").read_text().splitlines()) == 60
