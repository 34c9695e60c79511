"""Run a RAG system over benchmark examples and score it: EM, F1, MC accuracy, recall, MRR.

Averages are kept as exact sums and counts. (The PyTorch reference kept a running mean and
treated a mean of 0.0 as "unset", so a first score of 0.0 was replaced by the next score.)
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from ..errors import ConfigError, DataError
from ..outputs import open_atomic, out_path
from ..progress import progress_bar
from .benchmarks import BenchmarkExample
from .metrics import (
    answer_to_choice,
    choice_letter,
    exact_match,
    query_recall_at_k,
    reciprocal_rank,
    token_f1,
)

PromptBuilder = Callable[[BenchmarkExample], str]


class BatchQueryable(Protocol):
    """What the benchmarker needs of a RAG system: ``batch_query(list[str]) -> responses``."""

    def batch_query(self, queries: list[str]) -> Sequence[Any]: ...


def default_prompt(example: BenchmarkExample) -> str:
    """The query itself; for multiple choice, the query followed by lettered choices."""
    if not example.is_multiple_choice:
        return example.query
    lines = [example.query, ""]
    lines += [f"{choice_letter(j)}. {c}" for j, c in enumerate(example.choices)]
    lines += ["", "Answer with the letter of the correct choice."]
    return "\n".join(lines)


@dataclass
class RunningMean:
    """An exact mean: a sum and a count, so no score (0.0 included) is ever mistaken for unset."""

    total: float = 0.0
    count: int = 0

    def add(self, value: float) -> None:
        self.total += float(value)
        self.count += 1

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None


@dataclass
class ExampleResult:
    """One example's prediction and scores; fields that do not apply are None."""

    example_id: str
    prompt: str
    prediction: str
    answers: list[str]
    exact_match: float
    f1: float
    predicted_choice: int | None = None
    gold_choice: int | None = None
    mc_correct: float | None = None
    retrieved_ids: list[str] = field(default_factory=list)
    gold_passage_id: str | None = None
    recall: float | None = None
    reciprocal_rank: float | None = None


@dataclass
class BenchmarkResult:
    """Mean of each metric over the examples it applies to, how many those were, per-example."""

    metrics: dict[str, float]
    counts: dict[str, int]
    examples: list[ExampleResult]
    recall_k: int | None = None
    out_dir: os.PathLike | None = None  # an epath.Path: local or gs://

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    def aggregate(self) -> dict[str, Any]:
        """The JSON-ready summary written to ``aggregate.json``."""
        return {"num_examples": self.num_examples, "metrics": self.metrics,
                "counts": self.counts, "recall_k": self.recall_k}

    def table(self) -> str:
        """The aggregate as a Markdown table: metric, mean, examples it applies to."""
        k = "k" if self.recall_k is None else str(self.recall_k)
        labels = {"exact_match": "EM", "f1": "F1", "mc_accuracy": "accuracy (multiple choice)",
                  "recall_at_k": f"recall@{k}", "mrr": f"MRR@{k}"}
        rows = ["| metric | value | examples |", "|---|---|---|"]
        rows += [f"| {labels.get(name, name)} | {value:.4f} | {self.counts[name]} |"
                 for name, value in self.metrics.items()]
        return "\n".join(rows)


class Benchmarker:
    """Query ``rag_system`` with each example in batches and score the answers.

    ``prompt_builder(example) -> str`` makes the query sent (default: :func:`default_prompt`).
    ``recall_k`` cuts recall@k / MRR at k retrieved nodes (None: all the system returned).
    With ``out_dir``, ``examples.jsonl`` (one line per example) and ``aggregate.json`` are
    written there, each atomically.
    """

    def __init__(self, rag_system: BatchQueryable, benchmark_examples: Sequence[BenchmarkExample],
                 *, batch_size: int = 16, prompt_builder: PromptBuilder | None = None,
                 out_dir: str | os.PathLike | None = None, recall_k: int | None = None,
                 progress: bool = True) -> None:
        if not callable(getattr(rag_system, "batch_query", None)):
            raise ConfigError(f"rag_system ({type(rag_system).__name__}) has no batch_query "
                              "method; pass a RAGSystem or an object with batch_query(queries)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if recall_k is not None and (isinstance(recall_k, bool) or not isinstance(recall_k, int)
                                     or recall_k < 1):
            raise ConfigError(f"recall_k must be an integer >= 1 or None, got {recall_k!r}")
        bad = [type(e).__name__ for e in benchmark_examples if not isinstance(e, BenchmarkExample)]
        if bad:
            raise DataError(f"benchmark_examples must be BenchmarkExample objects, got {bad[0]}; "
                            "load them with fedrag_jax.evals.load_benchmark")
        self.rag_system = rag_system
        self.examples = list(benchmark_examples)
        self.batch_size = batch_size
        self.prompt_builder = prompt_builder or default_prompt
        self.out_dir = out_path(out_dir) if out_dir is not None else None  # local or gs://
        self.recall_k = recall_k
        self.progress = progress

    def _score(self, example: BenchmarkExample, prompt: str, response: Any) -> ExampleResult:
        answer = getattr(response, "answer", None)
        if not isinstance(answer, str):
            raise DataError(f"rag_system.batch_query returned {type(response).__name__} for "
                            f"example {example.example_id!r}; expected a RAGResponse")
        em, f1 = exact_match(answer, example.answers), token_f1(answer, example.answers)
        predicted = None
        if example.is_multiple_choice:
            predicted = answer_to_choice(answer, example.choices)
            # A bare gold letter ("B", "(B)", "b.") is an exact answer too. It is compared
            # here, not as a gold string: normalization would erase "A" as an article.
            letter = choice_letter(example.gold_choice)
            if answer.strip().strip("().:").strip().upper() == letter:
                em = f1 = 1.0
        result = ExampleResult(
            example_id=example.example_id, prompt=prompt, prediction=answer,
            answers=list(example.answers), exact_match=em, f1=f1,
            retrieved_ids=[sn.node.node_id for sn in getattr(response, "source_nodes", [])],
            gold_passage_id=example.gold_passage_id)
        if example.is_multiple_choice:
            result.predicted_choice = predicted
            result.gold_choice = example.gold_choice
            result.mc_correct = float(predicted == example.gold_choice)
        if example.gold_passage_id is not None:
            result.recall = query_recall_at_k(result.retrieved_ids, example.gold_passage_id,
                                              self.recall_k)
            result.reciprocal_rank = reciprocal_rank(result.retrieved_ids,
                                                     example.gold_passage_id, self.recall_k)
        return result

    def run(self, limit: int | None = None) -> BenchmarkResult:
        """Score the first ``limit`` examples (all when None) and write the outputs."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 1):
            raise ConfigError(f"limit must be an integer >= 1 or None, got {limit!r}")
        examples = self.examples[:limit]
        if not examples:
            raise DataError("no benchmark examples to run; load some with load_benchmark")
        means = {name: RunningMean() for name in
                 ("exact_match", "f1", "mc_accuracy", "recall_at_k", "mrr")}
        results: list[ExampleResult] = []

        with contextlib.ExitStack() as stack:
            jsonl = None
            if self.out_dir is not None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                # Lines stream into the temporary file as batches finish; it becomes
                # examples.jsonl only once the whole run succeeded.
                jsonl = stack.enter_context(open_atomic(self.out_dir / "examples.jsonl"))
            bar = stack.enter_context(progress_bar(total=len(examples), desc="benchmark", unit="ex",
                                           disable=not self.progress))
            for start in range(0, len(examples), self.batch_size):
                batch = examples[start:start + self.batch_size]
                prompts = [self.prompt_builder(ex) for ex in batch]
                bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
                if bad:
                    raise DataError(f"prompt_builder must return str, got {bad[0]}")
                responses = list(self.rag_system.batch_query(prompts))
                if len(responses) != len(batch):
                    raise DataError(f"rag_system.batch_query returned {len(responses)} responses "
                                    f"for {len(batch)} queries; it must return one per query")
                for ex, prompt, response in zip(batch, prompts, responses, strict=True):
                    r = self._score(ex, prompt, response)
                    results.append(r)
                    for name, value in (("exact_match", r.exact_match), ("f1", r.f1),
                                        ("mc_accuracy", r.mc_correct),
                                        ("recall_at_k", r.recall), ("mrr", r.reciprocal_rank)):
                        if value is not None:
                            means[name].add(value)
                    if jsonl is not None:
                        jsonl.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
                bar.update(len(batch))
                bar.set_postfix(em=f"{means['exact_match'].mean:.3f}",
                                f1=f"{means['f1'].mean:.3f}")

        result = BenchmarkResult(
            metrics={k: m.mean for k, m in means.items() if m.count},
            counts={k: m.count for k, m in means.items() if m.count},
            examples=results, recall_k=self.recall_k, out_dir=self.out_dir)
        if self.out_dir is not None:
            with open_atomic(self.out_dir / "aggregate.json") as f:
                json.dump(result.aggregate(), f, indent=2)
        return result
