"""Per-kind evaluation of a RAG system, and the paired comparison of two systems by kind.

    rows = evaluate_by_kind(rag, test, answered_per_kind=32)   # one row per question
    table = summarize(rows)                                    # kind -> metric -> mean
    results = compare(untuned_rows, rows, ALL_METRICS, overall=True)   # evals/paired.py

Every question is retrieved for (cheap: one query encoding each); the first
``answered_per_kind`` of each kind are also answered (a decode each). Retrieval metrics:
recall@k and reciprocal rank of the gold passage, and whether a gold answer appears in the
retrieved passages (``answer_in_passages``, whole passages) or in what the prompt shows of
them (``answer_in_prompt``, passages cut to ``max_context_tokens``): what the generator could
state at best. Answer metrics: "answer contained" (robust to answer format), EM and token F1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..progress import progress_bar
from .metrics import (
    answer_contained,
    answer_in_passages,
    exact_match,
    query_recall_at_k,
    reciprocal_rank,
    token_f1,
)

RETRIEVAL_METRICS = ("recall_at_k", "mrr", "answer_in_passages", "answer_in_prompt")
ANSWER_METRICS = ("contained", "exact_match", "f1")
ALL_METRICS = ANSWER_METRICS + RETRIEVAL_METRICS
METRIC_NAMES = {"contained": "answer contained", "exact_match": "EM", "f1": "F1",
                "recall_at_k": "recall@k", "mrr": "MRR",
                "answer_in_passages": "answer in passages",
                "answer_in_prompt": "answer in prompt"}


def answered_ids(questions: Sequence[dict], per_kind: int) -> set[int]:
    """Positions of the first ``per_kind`` questions of each kind."""
    seen: dict[str, int] = {}
    out = set()
    for i, q in enumerate(questions):
        if seen.get(q["kind"], 0) < per_kind:
            seen[q["kind"]] = seen.get(q["kind"], 0) + 1
            out.add(i)
    return out


def evaluate_by_kind(rag, questions: Sequence[dict], *, answered_per_kind: int,
                     fusion: str | None = None, batch_size: int = 16, progress: bool = True,
                     desc: str = "answering", top_k: int | None = None,
                     max_new_tokens: int | None = None) -> list[dict[str, Any]]:
    """One row per question ``{id, kind, query, answers, gold_id, retrieved_ids, <metrics>,
    answer}``; answer metrics are None for questions not answered. ``fusion`` overrides the
    system's ``config.fusion`` (concat | ensemble) for this evaluation."""
    k = top_k or rag.config.top_k
    max_new_tokens = max_new_tokens or rag.max_new_tokens
    fusion = fusion or rag.config.fusion
    sources = rag.batch_retrieve([q["query"] for q in questions], k)
    rows = []
    for i, (q, src) in enumerate(zip(questions, sources, strict=True)):
        ids = [s.node_id for s in src]
        shown = [rag.passage_text(s.text) for s in src]
        rows.append({"id": q.get("id", i), "kind": q["kind"], "query": q["query"],
                     "answers": list(q["answers"]), "gold_id": q.get("gold_id"),
                     "retrieved_ids": ids,
                     "recall_at_k": query_recall_at_k(ids, q["gold_id"], k),
                     "mrr": reciprocal_rank(ids, q["gold_id"], k),
                     "answer_in_passages": answer_in_passages([s.text for s in src],
                                                              q["answers"], k),
                     "answer_in_prompt": answer_in_passages(shown, q["answers"], k),
                     "answer": None, "contained": None, "exact_match": None, "f1": None})
    todo = sorted(answered_ids(questions, answered_per_kind))
    gen = rag.generator
    with progress_bar(total=len(todo), desc=f"{desc} ({fusion})", unit="question",
                      disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            part = todo[start:start + batch_size]
            # the last batch padded by repetition: one compiled decode per prompt bucket
            padded = part + [part[-1]] * (batch_size - len(part))
            if fusion == "ensemble":
                prompts = [rag.passage_prompts(questions[i]["query"], sources[i]) for i in padded]
                weights = rag.fusion_log_weights([sources[i] for i in padded])
                answers = gen.generate_ensemble(prompts, weights,
                                                max_new_tokens=max_new_tokens)
            else:
                prompts = [rag.build_prompt(questions[i]["query"], sources[i]) for i in padded]
                answers = gen.generate(prompts, max_new_tokens=max_new_tokens)
            for i, answer in zip(part, answers, strict=False):
                golds = rows[i]["answers"]
                rows[i].update(answer=answer, contained=answer_contained(answer, golds),
                               exact_match=exact_match(answer, golds),
                               f1=token_f1(answer, golds))
            bar.update(len(part))
    return rows


def summarize(rows: Sequence[dict], kinds: Sequence[str] | None = None,
              ) -> dict[str, dict[str, float]]:
    """kind -> {metric: mean, n_<metric>: questions}; "all" over every kind."""
    kinds = list(dict.fromkeys(kinds or [r["kind"] for r in rows]))
    out = {}
    for kind in kinds + ["all"]:
        sel = [r for r in rows if kind == "all" or r["kind"] == kind]
        m: dict[str, float] = {"n": len(sel)}
        for metric in ALL_METRICS:
            vals = [r[metric] for r in sel if r.get(metric) is not None]
            if vals:
                m[metric] = float(np.mean(vals))
                m[f"n_{metric}"] = len(vals)
        out[kind] = m
    return out


def summary_table(summaries: dict[str, dict[str, dict[str, float]]], kinds: Sequence[str],
                  metrics: Sequence[str] = ("contained", "answer_in_prompt", "recall_at_k",
                                            "mrr", "exact_match", "f1"),
                  labels: dict[str, str] | None = None,
                  kind_labels: dict[str, str] | None = None) -> str:
    """Markdown: a row per (kind, system), a column per metric (means)."""
    labels, kind_labels = labels or {}, kind_labels or {}
    lines = ["| kind | system | " + " | ".join(METRIC_NAMES[m] for m in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for kind in list(kinds) + ["all"]:
        for name, summary in summaries.items():
            m = summary.get(kind, {})
            cells = [f"{m[x]:.3f}" if x in m else "–" for x in metrics]
            lines.append(f"| {kind_labels.get(kind, kind)} | {labels.get(name, name)} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def kinds_report(rows_by_system: dict[str, Sequence[dict]], reference: str,
                 names: Sequence[str], *, kinds: Sequence[str], train_kinds: Sequence[str],
                 seed: int = 0, num_resamples: int = 10_000,
                 labels: dict[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    """Markdown and JSON of each system in ``names`` against ``reference``, per kind and
    metric, paired (change, 95 % bootstrap interval, exact sign-test p). Kinds that got
    significantly worse are listed first, never averaged away."""
    from dataclasses import asdict

    from .paired import GAIN, HARM, compare, format_markdown

    labels = labels or {}
    trained = set(train_kinds)
    kind_label = {k: f"{k} ({'trained' if k in trained else 'held out'})" for k in kinds}
    comparisons = {}
    lines = []
    for name in names:
        results = compare(rows_by_system[reference], rows_by_system[name], ALL_METRICS,
                          num_resamples=num_resamples, seed=seed, overall=True)
        comparisons[name] = results
        harmed = [r for r in results if r.flag == HARM]
        gained = [r for r in results if r.flag == GAIN]
        label = labels.get(name, name)
        if harmed:
            lines.append(f"- **{label}: significantly WORSE than {labels.get(reference, reference)}"
                         "** on " + "; ".join(f"**{r.kind} / {METRIC_NAMES[r.metric]}** "
                                              f"{r.change:+.3f} (p = {r.p:.2g})"
                                              for r in harmed))
        else:
            lines.append(f"- {label}: no kind significantly worse on any metric")
        if gained:
            lines.append("  - significantly better: " + "; ".join(
                f"{r.kind} / {METRIC_NAMES[r.metric]} {r.change:+.3f} (p = {r.p:.2g})"
                for r in gained))
    summaries = {n: summarize(rows_by_system[n], kinds) for n in [reference, *names]}
    text = ["## Per question kind (test split)", "",
            "Trained kinds: " + ", ".join(train_kinds) + "; held out (never in training): "
            + (", ".join(k for k in kinds if k not in trained) or "none") + ".", "",
            *lines, "", "Means per kind:", "",
            summary_table(summaries, kinds, labels=labels, kind_labels=kind_label), ""]
    for name in names:
        text += [format_markdown(comparisons[name], title=f"{labels.get(name, name)} vs "
                                 f"{labels.get(reference, reference)}",
                                 untuned=reference, tuned=name), ""]
    data = {"reference": reference, "train_kinds": list(train_kinds), "kinds": list(kinds),
            "summaries": summaries,
            "comparisons": {n: [asdict(r) for r in rs] for n, rs in comparisons.items()}}
    return "\n".join(text), data
