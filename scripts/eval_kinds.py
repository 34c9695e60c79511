"""Evaluate RAG systems per question kind and compare tuned with untuned, paired.

Questions: the test split of ``fedrag_jax.questions.make_question_splits`` over the bundled
corpus (or --corpus), every kind (title, nationality, year, place, number, code, person,
taxon; docs/questions.md). Articles the demo's own train/dev questions use are left out
(--exclude-demo, on by default), so no system is tested on an article it was tuned on.

Systems, all over one knowledge store (--index, from `fedrag-jax index build`; re-encoded
only if a tuned context tower differs from the one that built it):

- ``untuned``: the bundled MiniLM + SmolLM2 (or --system, a saved RAGSystem folder);
- ``lsr``: the tuned query tower (and context tower) with the untuned generator;
- ``tuned``: the tuned towers and the tuned generator (--tuned-export: a folder with
  retriever/, context_retriever/ and generator/, as the demo's reports/demo/export/).

Per question: recall@k and reciprocal rank of the gold passage, answer recall of the top-k
passages (on every test question, retrieval is cheap), and, on the first --answer-per-kind
questions of each kind, the generated answer's "answer contained", EM and token F1. Each
variant is compared with ``untuned`` per kind and metric (fedrag_jax.evals.paired): change,
95 % paired-bootstrap interval, exact sign-test p; significant harm is flagged.

    python scripts/eval_kinds.py --index /work/baseline/index \
        --tuned-export /work/baseline/export --out reports/eval_kinds

Writes <out>/<system>.jsonl (per question), <out>/results.json and <out>/report.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedrag_jax.evals.kinds import ANSWER_METRICS, RETRIEVAL_METRICS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", default=None, help="index folder (fedrag-jax index build)")
    p.add_argument("--system", default=None,
                   help="a saved RAGSystem folder as the untuned system (default: the bundled "
                        "MiniLM + SmolLM2 over --index)")
    p.add_argument("--tuned-export", default=None,
                   help="folder with retriever/, context_retriever/ (optional), generator/")
    p.add_argument("--variants", nargs="+", default=["lsr", "tuned"],
                   choices=["lsr", "tuned"], help="systems compared with untuned")
    p.add_argument("--retrieval-only", nargs="*", default=[], choices=["lsr", "tuned"],
                   help="variants scored on retrieval only (no generated answers: cheaper)")
    p.add_argument("--corpus", default="bundled")
    p.add_argument("--kinds", nargs="+", default=None, help="question kinds (default: all)")
    p.add_argument("--num-test", type=int, default=256, help="test questions per kind")
    p.add_argument("--answer-per-kind", type=int, default=256,
                   help="generated-answer metrics on the first N test questions of each kind")
    p.add_argument("--seed", type=int, default=0, help="split and bootstrap seed")
    p.add_argument("--exclude-demo", default="quick", choices=["quick", "full", "none"],
                   help="leave out the articles of this demo preset's train/dev questions")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--max-context-tokens", type=int, default=48, help="tokens per passage")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--retriever-max-length", type=int, default=64,
                   help="retriever tokens (the demo's quick preset: 64)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    p.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap resamples")
    p.add_argument("--out", default="reports/eval_kinds")
    p.add_argument("--reuse", action="store_true",
                   help="reuse <out>/<system>.jsonl written by an earlier run of the same "
                        "settings instead of answering again")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- questions
def test_questions(args) -> tuple[list[dict], dict[str, Any]]:
    from fedrag_jax.indexing import load_corpus
    from fedrag_jax.qa_data import make_qa_pairs
    from fedrag_jax.questions import generate_questions, make_question_splits

    corpus = load_corpus(args.corpus)
    questions = generate_questions(corpus, args.kinds)
    excluded: set[str] = set()
    if args.exclude_demo != "none":
        from fedrag_jax.demo import PRESETS

        data = PRESETS[args.exclude_demo]["data"]
        train, dev = make_qa_pairs(corpus, data["num_train"], data["num_eval"], seed=0)
        excluded = {r["gold_id"] for r in train + dev}
        questions = [q for q in questions if q["gold_id"] not in excluded]
    splits = make_question_splits(corpus, kinds=args.kinds, num_train=0, num_dev=0,
                                  num_test=args.num_test, seed=args.seed, allow_fewer=True,
                                  questions=questions)
    test = splits.test
    for i, q in enumerate(test):
        q["id"] = i
    info = {"available": splits.available, "test": splits.counts()["test"],
            "shortfall": splits.shortfall().get("test", {}),
            "excluded_demo_articles": len(excluded)}
    return test, info


def answered_subset(test: list[dict], per_kind: int) -> set[int]:
    seen: Counter = Counter()
    out = set()
    for q in test:
        if seen[q["kind"]] < per_kind:
            seen[q["kind"]] += 1
            out.add(q["id"])
    return out


# ---------------------------------------------------------------------------- systems
def load_systems(args) -> dict[str, Any]:
    """name -> RAGSystem; the variants share the untuned parts they do not replace."""
    from fedrag_jax import assets
    from fedrag_jax.generator import Generator
    from fedrag_jax.indexing import model_fingerprint, reencode_store
    from fedrag_jax.knowledge_store import load_store
    from fedrag_jax.models.hf import load_tokenizer
    from fedrag_jax.models.llama import CausalLM
    from fedrag_jax.rag import RAGSystem
    from fedrag_jax.retriever import DualEncoder
    from fedrag_jax.types import RAGConfig

    settings = dict(max_new_tokens=args.max_new_tokens,
                    max_context_tokens=args.max_context_tokens)
    if args.system:
        base = RAGSystem.from_pretrained(args.system)
        base.max_new_tokens, base.max_context_tokens = args.max_new_tokens, \
            args.max_context_tokens
        base.config.top_k = args.top_k
        retriever, generator, store = base.retriever, base.generator, base.store
    else:
        retriever = DualEncoder.from_pretrained(assets.retriever_path(),
                                                max_length=args.retriever_max_length)
        gen_path = assets.generator_path()
        generator = Generator(CausalLM.from_pretrained(gen_path), load_tokenizer(gen_path))
        store = load_store(Path(args.index) / "store")
    config = RAGConfig(top_k=args.top_k)
    fp = model_fingerprint(retriever)
    if store.embedding_model_hash not in (None, fp):
        raise SystemExit(f"{args.index} was built with another retriever (hash "
                         f"{store.embedding_model_hash}, this one {fp}); rebuild the index")
    systems = {"untuned": RAGSystem(retriever, store, generator, config, **settings)}
    if not args.tuned_export:
        return systems
    export = Path(args.tuned_export)
    context = export / "context_retriever"
    tuned_retriever = DualEncoder.from_pretrained(
        export / "retriever", context if context.is_dir() else None,
        max_length=args.retriever_max_length)
    tuned_store = store
    if model_fingerprint(tuned_retriever) != store.embedding_model_hash:
        print("the tuned context tower differs from the index's: re-encoding the passages",
              flush=True)
        tuned_store = reencode_store(store, tuned_retriever, progress=True)
    if "lsr" in args.variants:
        systems["lsr"] = RAGSystem(tuned_retriever, tuned_store, generator, config, **settings)
    if "tuned" in args.variants:
        tuned_generator = Generator.from_pretrained(export / "generator")
        systems["tuned"] = RAGSystem(tuned_retriever, tuned_store, tuned_generator, config,
                                     **settings)
    return systems


# ---------------------------------------------------------------------------- evaluation
def evaluate(rag, test: list[dict], per_kind: int, args, name: str) -> list[dict]:
    """fedrag_jax.evals.kinds.evaluate_by_kind on ``test`` (the first ``per_kind`` of each
    kind answered), plus each answer's length in generated tokens."""
    from fedrag_jax.evals.kinds import evaluate_by_kind

    t0 = time.perf_counter()
    rows = evaluate_by_kind(rag, test, answered_per_kind=per_kind, batch_size=args.batch_size,
                            top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                            desc=f"answering ({name})")
    seconds = time.perf_counter() - t0
    tok = rag.generator.tokenizer
    answered = sum(r["answer"] is not None for r in rows)
    for r in rows:
        r["new_tokens"] = (None if r["answer"] is None else
                           len(tok(r["answer"], add_special_tokens=False)["input_ids"]))
        r["_timing"] = {"seconds": seconds, "answered": answered}
    return rows


def summary(rows: list[dict], kinds: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for kind in kinds + ["all", "all but title"]:
        sel = [r for r in rows if kind == "all" or r["kind"] == kind
               or (kind == "all but title" and r["kind"] != "title")]
        m: dict[str, float] = {"n": len(sel)}
        for metric in RETRIEVAL_METRICS + ANSWER_METRICS:
            vals = [r[metric] for r in sel if r[metric] is not None]
            if vals:
                m[metric] = float(np.mean(vals))
                m[f"n_{metric}"] = len(vals)
        toks = [r["new_tokens"] for r in sel if r["new_tokens"] is not None]
        if toks:
            m["mean_new_tokens"] = float(np.mean(toks))
        out[kind] = m
    return out


def length_report(rows: list[dict], cap: int) -> dict[str, float]:
    toks = np.array([r["new_tokens"] for r in rows if r["new_tokens"] is not None])
    if toks.size == 0:
        return {}
    # a decoded answer re-tokenizes to about the tokens generated; >= cap - 1: cut off
    return {"answered": int(toks.size), "mean": float(toks.mean()),
            "p50": float(np.percentile(toks, 50)), "p90": float(np.percentile(toks, 90)),
            "p99": float(np.percentile(toks, 99)), "max": int(toks.max()),
            "at_cap": float(np.mean(toks >= cap - 1))}


def issue_table(summaries: dict[str, dict], k: int) -> str:
    lines = [f"| system | answer contained | gold passage in top {k} | answer in the top-{k} "
             "passages | EM | F1 |", "|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        m = s["all but title"]
        cells = [m.get(key, float("nan")) for key in ("contained", "recall_at_k",
                                                      "answer_in_passages", "exact_match", "f1")]
        lines.append(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not args.index and not args.system:
        raise SystemExit("pass --index (the bundled system's knowledge store) or --system")
    t0 = time.perf_counter()
    test, info = test_questions(args)
    return run(args, test, info, load_systems(args), t0)


def run(args, test: list[dict], info: dict, systems: dict[str, Any],
        t0: float | None = None) -> dict[str, Any]:
    """Evaluate ``systems`` (name -> an object with batch_retrieve, build_prompt, generator;
    "untuned" is the reference) on ``test`` and write the report."""
    from fedrag_jax.evals.paired import compare, format_markdown
    from fedrag_jax.questions import KINDS

    t0 = time.perf_counter() if t0 is None else t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    present = {q["kind"] for q in test}
    kinds = [k for k in (args.kinds or KINDS) if k in present]
    answered = answered_subset(test, args.answer_per_kind)
    print(f"test split: {info['test']} ({len(test)} questions; generated answers on "
          f"{len(answered)}); shortfall vs {args.num_test}/kind: {info['shortfall']}; "
          f"{info['excluded_demo_articles']} demo articles left out", flush=True)
    settings = {k: getattr(args, k) for k in ("index", "system", "tuned_export", "corpus",
                                              "kinds", "num_test", "answer_per_kind", "seed",
                                              "exclude_demo", "top_k", "max_context_tokens",
                                              "max_new_tokens", "retriever_max_length")}
    per_system: dict[str, list[dict]] = {}
    for name, rag in systems.items():
        cached = out / f"{name}.jsonl"
        meta = out / f"{name}.settings.json"
        answers_here = name not in getattr(args, "retrieval_only", [])
        mine = {**settings, "answered": answers_here}
        if args.reuse and cached.is_file() and meta.is_file() and \
                json.loads(meta.read_text()) == mine:
            per_system[name] = [json.loads(line) for line in cached.read_text().splitlines()]
            print(f"{name}: reused {cached}", flush=True)
            continue
        rows = evaluate(rag, test, args.answer_per_kind if answers_here else 0, args, name)
        tmp = cached.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        os.replace(tmp, cached)
        meta.write_text(json.dumps(mine, indent=2))
        per_system[name] = rows
        t = rows[0]["_timing"]
        print(f"{name}: {t['seconds']:.1f} s for {len(rows)} questions retrieved, "
              f"{t['answered']} answered", flush=True)

    summaries = {name: summary(rows, kinds) for name, rows in per_system.items()}
    lengths = {name: length_report(rows, args.max_new_tokens)
               for name, rows in per_system.items()}
    metrics = list(ANSWER_METRICS + RETRIEVAL_METRICS)
    comparisons = {}
    report = [f"# Per-kind evaluation, top-{args.top_k}, max_context_tokens "
              f"{args.max_context_tokens}, max_new_tokens {args.max_new_tokens}", "",
              f"Test split: {len(test)} questions ({info['test']}); generated-answer metrics on "
              f"the first {args.answer_per_kind} of each kind ({len(answered)}). "
              f"{info['excluded_demo_articles']} articles of the demo's own questions left "
              "out.", "", "Other kinds (all but title), as in issue 17:", "",
              issue_table(summaries, args.top_k), ""]
    for name in per_system:
        if name == "untuned":
            continue
        results = compare(per_system["untuned"], per_system[name], metrics,
                          num_resamples=args.bootstrap, seed=args.seed, overall=True)
        comparisons[name] = [r.__dict__ for r in results]
        table = format_markdown(results, title=f"{name} vs untuned", tuned=name)
        report += [table, ""]
        print("\n" + table, flush=True)
    report += ["Answer lengths (generated tokens): " + json.dumps(lengths), ""]
    text = "\n".join(report)
    (out / "report.md").write_text(text)
    results = {"settings": settings, "questions": info, "summaries": summaries,
               "answer_lengths": lengths, "comparisons": comparisons,
               "wall_s": round(time.perf_counter() - t0, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n" + issue_table(summaries, args.top_k))
    print(f"\nanswer lengths: {json.dumps(lengths)}\nwrote {out}/report.md, results.json")
    return results


if __name__ == "__main__":
    main()
