"""The end-to-end demo on the bundled MiniLM retriever, SmolLM2 generator and Wikipedia corpus.

1. index the corpus (ScaNN where it imports);
2. make factoid questions of eight kinds from it (fedrag_jax/questions): train / dev of three
   kinds, a test split of every kind from other articles, so the report also shows five kinds
   training never saw;
3. evaluate the untuned system on the test split, per kind (concat and REPLUG ensemble);
4. centralized: LSR on the retriever, then RALT with LoRA on the generator, trained to state
   the answer in a sentence from its context; evaluate;
5. federated: the same from the untuned models, 3 clients, non-IID by topic; evaluate;
6. write a report folder: summary.md (paired comparisons per kind, harm flagged), plots,
   metrics JSONL, HF exports of the tuned models.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .config import Config, config_from_dict
from .evals.kinds import ANSWER_METRICS, METRIC_NAMES, kinds_report
from .finetune.manager import FinetuneManager, build_rag_system, load_question_splits
from .paths import require_local
from .sharding import make_mesh

# Settings of the two presets (any key of fedrag_jax/config.py can be overridden on top).
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {  # sized for a 2-core CPU (docs/demo.md: the measured run)
        "mode": "both", "output_dir": "reports/demo/runs", "checkpoint_every": 0,
        "model": {"retriever_max_length": 64},
        # questions of 3 kinds to train on; the test split has 128 of each of the 8 kinds
        # (retrieval metrics on all), the first 32 of each answered (answer metrics on 256)
        "data": {"train": "questions", "train_kinds": ["title", "nationality", "place"],
                 "num_train": 192, "num_eval": 96, "num_test": 128, "num_test_answered": 32,
                 "target": "sentence"},
        "eval_generate_max": 24,
        "eval_generate": False,  # the demo evaluates each phase on the test split itself
        # 48 passage tokens (the lead sentence or two) keep prompts in the 256-token bucket
        "retrieval": {"top_k": 3, "max_context_tokens": 48, "max_new_tokens": 20},
        # LSR ranks 6 candidates so it can lift gold passages from ranks 4-6 into the top 3
        "lsr": {"steps": 48, "batch_size": 8, "learning_rate": 3e-5, "warmup_steps": 4,
                "tau_lm": 0.1, "max_length": 192, "top_k": 6},
        # RALT on the prompt the system answers from (its top-3 concatenated), targets the
        # passage sentence that states the answer; a low rate and under one epoch keep the
        # base model's reading of its context
        "ralt": {"steps": 16, "batch_size": 4, "learning_rate": 3e-4, "warmup_steps": 2,
                 "lora_rank": 8, "lora_alpha": 16.0, "max_length": 256, "context": "concat"},
        "fed": {"num_clients": 3, "rounds": 2, "local_steps": 4, "partition": "topic",
                "min_clients": 3, "engine": "spmd"},
    },
    "full": {  # a longer run: hours on a CPU, minutes on an accelerator
        "mode": "both", "output_dir": "reports/demo/runs", "checkpoint_every": 20,
        "data": {"train": "questions", "num_train": 2048, "num_eval": 256, "num_test": 256,
                 "num_test_answered": 64},
        "retrieval": {"top_k": 4, "max_context_tokens": 160, "max_new_tokens": 32},
        "lsr": {"steps": 200, "batch_size": 16, "learning_rate": 2e-5},
        "ralt": {"steps": 200, "batch_size": 4, "learning_rate": 1e-4, "lora_rank": 16,
                 "context": "concat"},
        "fed": {"num_clients": 3, "rounds": 5, "local_steps": 40, "partition": "topic"},
    },
}

TABLE_METRICS = (("contained", "answer contained"), ("answer_in_prompt", "answer in prompt"),
                 ("recall_at_k", "recall@k"), ("mrr", "MRR"), ("exact_match", "EM"),
                 ("f1", "F1"))
ENSEMBLE_PER_KIND = 8  # answered per kind with fusion=ensemble (k prompts per question)
SYSTEMS = {"untuned": "untuned", "centralized_lsr": "after LSR (centralized)",
           "centralized": "LSR + RALT (centralized)", "federated": "LSR + RALT (federated)",
           "untuned_ensemble": "untuned, ensemble", "centralized_ensemble":
           "LSR + RALT (centralized), ensemble"}


def demo_config(preset: str = "quick", overrides: list[str] | None = None,
                out_dir: str | None = None) -> Config:
    data = dict(PRESETS[preset])
    if out_dir:
        data["output_dir"] = str(Path(out_dir) / "runs")
    return config_from_dict(data, overrides)


def run_demo(preset: str = "quick", out_dir: str | Path = "reports/demo",
             overrides: list[str] | None = None) -> dict[str, Any]:
    out = require_local(out_dir, "the demo's report folder")  # its report reads local files
    config = demo_config(preset, overrides, str(out))
    require_local(config.output_dir, "the demo's output_dir")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    mesh = make_mesh(vars(config.mesh))
    rag, corpus = build_rag_system(config, mesh)
    splits = load_question_splits(config, corpus)
    timings["index_and_questions"] = time.perf_counter() - t0
    untuned = (rag.retriever.query_encoder, rag.retriever.context_encoder, rag.generator.model)

    t = time.perf_counter()
    central = FinetuneManager(rag, splits.train, splits.dev, config, mesh=mesh,
                              test_records=splits.test)
    central.evaluate("untuned", generate=False)  # dev recall (settings are chosen on dev)
    central.evaluate_kinds("untuned")
    central.evaluate_kinds("untuned_ensemble", fusion="ensemble",
                           answered_per_kind=ENSEMBLE_PER_KIND)
    timings["evaluate_untuned"] = time.perf_counter() - t

    t = time.perf_counter()
    central.train_retriever()
    central.evaluate("centralized_lsr", generate=False)
    central.evaluate_kinds("centralized_lsr", answered_per_kind=0)  # retrieval only
    central.train_generator()
    timings["train_centralized"] = time.perf_counter() - t
    t = time.perf_counter()
    central.evaluate("centralized", generate=False)
    central.evaluate_kinds("centralized")
    central.evaluate_kinds("centralized_ensemble", fusion="ensemble",
                           answered_per_kind=ENSEMBLE_PER_KIND)
    timings["evaluate_centralized"] = time.perf_counter() - t
    export = out / "export"
    rag.retriever.query_encoder.save_pretrained(export / "retriever",
                                                tokenizer=rag.retriever.tokenizer)
    if rag.retriever.context_encoder is not None:  # LSR untied the towers
        rag.retriever.context_encoder.save_pretrained(export / "context_retriever",
                                                      tokenizer=rag.retriever.tokenizer)
    rag.generator.model.save_pretrained(export / "generator", tokenizer=rag.generator.tokenizer)

    # federated: start again from the untuned models
    rag.retriever.query_encoder, rag.retriever.context_encoder = untuned[0], untuned[1]
    rag.generator.model = untuned[2]
    t = time.perf_counter()
    fed_config = demo_config(preset, list(overrides or []) + ["federated=true"], str(out))
    # same untuned models and records: the LM-scored LSR dataset is reused, not rebuilt
    federated = FinetuneManager(rag, splits.train, splits.dev, fed_config, mesh=mesh,
                                dataset_cache=central.dataset_cache, test_records=splits.test)
    federated.train_federated()
    timings["train_federated"] = time.perf_counter() - t
    t = time.perf_counter()
    federated.evaluate("federated", generate=False)
    federated.evaluate_kinds("federated")
    timings["evaluate_federated"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    rows = {**central.kind_rows, "federated": federated.kind_rows["federated"]}
    results = {**central.results, "federated": federated.results["federated"],
               "kinds": {**central.results["kinds"],
                         "federated": federated.results["kinds"]["federated"]},
               "federated_history": federated.results["federated_history"],
               "questions": {"counts": splits.counts(), "available": splits.available,
                             "shortfall": splits.shortfall()},
               "timings_s": {k: round(v, 1) for k, v in timings.items()},
               "settings": config.to_dict()}
    write_report(out, results, config, rows, splits)
    return results


def group_means(rows: list[dict], kinds: list[str]) -> dict[str, float]:
    """Means over the questions of ``kinds`` (each metric over the questions it applies to)."""
    sel = [r for r in rows if r["kind"] in kinds]
    out = {}
    for metric, _ in TABLE_METRICS:
        vals = [r[metric] for r in sel if r.get(metric) is not None]
        if vals:
            out[metric] = sum(vals) / len(vals)
    return out


def gap_closed(rows: dict[str, list[dict]], name: str, kinds: list[str]) -> dict[str, float]:
    """On the answered questions of ``kinds``: the untuned system's gap between "its prompt
    shows a gold answer" and "its answer states one", and the fraction of that gap ``name``
    closed (negative: it widened)."""
    def answered(system):
        return [r for r in rows[system] if r["kind"] in kinds and r["contained"] is not None]

    base, tuned = answered("untuned"), answered(name)
    if not base or len(base) != len(tuned):
        return {}
    shown = sum(r["answer_in_prompt"] for r in base) / len(base)
    before = sum(r["contained"] for r in base) / len(base)
    after = sum(r["contained"] for r in tuned) / len(tuned)
    gap = shown - before
    return {"n": len(base), "answer_in_prompt": shown, "contained_untuned": before,
            "contained_tuned": after, "gap": gap,
            "closed": (after - before) / gap if gap > 0 else float("nan")}


def _cell(metrics: dict[str, float] | None, key: str) -> str:
    return f"{metrics[key]:.3f}" if metrics and key in metrics else "–"


def write_report(out: Path, results: dict[str, Any], config: Config,
                 rows: dict[str, list[dict]], splits) -> None:
    from .evals.paired import compare, format_markdown
    from .finetune.trainer import read_metrics

    out.mkdir(parents=True, exist_ok=True)
    k = config.retrieval.top_k
    train_kinds = list(config.data.train_kinds)
    kinds = [q for q in dict.fromkeys(r["kind"] for r in rows["untuned"])]
    from .questions import KINDS

    kinds = [q for q in KINDS if q in kinds] + [q for q in kinds if q not in KINDS]
    held_out = [q for q in kinds if q not in train_kinds]
    names = [n for n in ("centralized", "federated", "centralized_lsr") if n in rows]
    report, comparison = kinds_report(rows, "untuned", names, kinds=kinds,
                                      train_kinds=train_kinds, seed=config.seed,
                                      labels=SYSTEMS)
    results["kinds_comparison"] = comparison
    header = " | ".join(name.replace("@k", f"@{k}") for _, name in TABLE_METRICS)
    lines = ["# fedrag-jax demo report", "",
             f"Bundled corpus (Wikipedia summaries), MiniLM-L6 retriever, SmolLM2-135M "
             f"generator, top-{k} retrieval, passages cut to "
             f"{config.retrieval.max_context_tokens} tokens in prompts. Questions made from "
             "the corpus by rules (docs/questions.md); train / dev / test from disjoint "
             f"articles. Training uses {', '.join(train_kinds)} questions "
             f"({len(splits.train)} train, {len(splits.dev)} dev), with the passage sentence "
             f"that states the answer as target (data.target: {config.data.target}); "
             f"{', '.join(held_out)} are held out: no question of theirs is ever trained on. "
             "Retrieval metrics on every test question, answer metrics on the first "
             f"{config.data.num_test_answered} of each kind.", "",
             splits.table(), "",
             "## Held-out kinds (never trained on)", "",
             "| system | " + header + " |", "|---|" + "---|" * len(TABLE_METRICS)]
    for key in ("untuned", "centralized_lsr", "centralized", "federated"):
        if key in rows:
            m = group_means(rows[key], held_out)
            lines.append(f"| {SYSTEMS[key]} | " + " | ".join(_cell(m, x) for x, _ in
                                                            TABLE_METRICS) + " |")
    lines += ["", "## Trained kinds (their test questions)", "",
              "| system | " + header + " |", "|---|" + "---|" * len(TABLE_METRICS)]
    for key in ("untuned", "centralized_lsr", "centralized", "federated"):
        if key in rows:
            m = group_means(rows[key], train_kinds)
            lines.append(f"| {SYSTEMS[key]} | " + " | ".join(_cell(m, x) for x, _ in
                                                            TABLE_METRICS) + " |")
    lines.append("")
    gaps = {n: gap_closed(rows, n, held_out) for n in ("centralized", "federated") if n in rows}
    for n, g in gaps.items():
        if g:
            lines.append(f"- {SYSTEMS[n]}, held-out kinds: the untuned prompt shows a gold "
                         f"answer for {g['answer_in_prompt']:.3f} of the answered questions, "
                         f"its answer states one for {g['contained_untuned']:.3f}; tuned: "
                         f"{g['contained_tuned']:.3f}, **{100 * g['closed']:.0f} % of that gap "
                         "closed** (target: 50 %).")
    results["gap_closed"] = gaps
    central = group_means(rows["untuned"], train_kinds).get("contained")
    tuned = group_means(rows.get("centralized", []), train_kinds).get("contained")
    fed = group_means(rows.get("federated", []), train_kinds).get("contained")
    if None not in (central, tuned, fed) and tuned != central:
        share = (fed - central) / (tuned - central)
        results["federated_share_of_gain"] = share
        lines.append(f"- Federated keeps {100 * share:.0f} % of the centralized gain in answer "
                     "contained on the trained kinds (target: >= 80 %).")
    lines += ["", report, "", "## Fusion: concat vs REPLUG ensemble", "",
              f"The first {ENSEMBLE_PER_KIND} answered questions of each kind, answered again "
              "with each passage in its own prompt and the next-token distributions mixed "
              "with P_R(d | x) (retrieval.fusion: ensemble).", ""]
    fusion = {}
    for base in ("untuned", "centralized"):
        ens = f"{base}_ensemble"
        if ens in rows:
            res = [r for r in compare(rows[base], rows[ens], ANSWER_METRICS, seed=config.seed,
                                      overall=True) if r.kind == "all"]
            fusion[base] = [r.__dict__ for r in res]
            lines += [format_markdown(res, title=f"{SYSTEMS[base]}: concat vs ensemble",
                                      untuned="concat", tuned="ensemble"), ""]
    results["fusion_comparison"] = fusion
    lines += ["Timings (s): " + ", ".join(f"{k}={v}" for k, v in
                                          results["timings_s"].items()), "",
              "Plots: `loss_curves.png`, `kinds.png`. Per-question rows: "
              "`runs/eval/<system>/kinds.jsonl`. Exports: `export/retriever` (tuned query "
              "tower) and `export/context_retriever` (the passage tower the index was built "
              "with), both sentence-transformers folders; `export/generator` (HF causal LM, "
              "LoRA merged).", ""]
    (out / "summary.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    runs = Path(config.output_dir)
    with open(out / "metrics.jsonl", "w") as f:
        for phase in ("lsr", "ralt"):
            for record in read_metrics(runs / phase / "metrics.jsonl"):
                f.write(json.dumps({"phase": f"centralized_{phase}", **record}) + "\n")
        for method, history in results.get("federated_history", {}).items():
            for r in history["rounds"]:
                f.write(json.dumps({"phase": f"federated_{method}", "round": r["round"],
                                    "clients": r["clients"]}) + "\n")
    _plot(out, results, runs, kinds, train_kinds)


def _plot(out: Path, results: dict[str, Any], runs: Path, kinds: list[str],
          train_kinds: list[str]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .finetune.trainer import read_metrics

    fig = Figure(figsize=(11, 4))
    for i, method in enumerate(("lsr", "ralt")):
        ax = fig.add_subplot(1, 2, i + 1)
        records = [r for r in read_metrics(runs / method / "metrics.jsonl")
                   if r.get("split") == "train" and "loss" in r]
        ax.plot([r["step"] for r in records], [r["loss"] for r in records],
                label="centralized (per step)")
        history = results.get("federated_history", {}).get(method)
        if history:
            steps_per_round = max(1, max(c["steps"] for r in history["rounds"]
                                         for c in r["clients"]))
            xs, ys = [], []
            for r in history["rounds"]:
                n = sum(c["num_examples"] for c in r["clients"])
                xs.append(r["round"] * steps_per_round)
                ys.append(sum(c["train_loss"] * c["num_examples"] for c in r["clients"]) / n)
            ax.plot(xs, ys, "o-", label="federated (per round, client mean)")
        ax.set_title(f"{method.upper()} training loss")
        ax.set_xlabel("step")
        ax.legend()
    FigureCanvasAgg(fig).print_png(str(out / "loss_curves.png"))

    fig = Figure(figsize=(12, 4))
    ax = fig.add_subplot(1, 1, 1)
    systems = [n for n in ("untuned", "centralized", "federated") if n in results["kinds"]]
    width = 0.8 / max(1, len(systems))
    for j, name in enumerate(systems):
        values = [results["kinds"][name].get(kind, {}).get("contained", 0.0) for kind in kinds]
        ax.bar([i + (j - (len(systems) - 1) / 2) * width for i in range(len(kinds))], values,
               width, label=SYSTEMS[name])
    ax.set_xticks(range(len(kinds)), [f"{q}\n({'trained' if q in train_kinds else 'held out'})"
                                      for q in kinds])
    ax.set_ylim(0, 1)
    ax.set_ylabel(METRIC_NAMES["contained"])
    ax.set_title("test split, per question kind: does the answer state a gold answer?")
    ax.legend()
    FigureCanvasAgg(fig).print_png(str(out / "kinds.png"))
