"""The end-to-end demo on the bundled MiniLM retriever, SmolLM2 generator and Wikipedia corpus.

1. index the corpus (ScaNN where it imports);
2. make disjoint train / dev questions from it, each with its gold passage;
3. evaluate the untuned system (dev recall@k, exact match, F1);
4. centralized: LSR on the retriever, then RALT with LoRA on the generator; evaluate;
5. federated: the same from the untuned models, 3 clients, non-IID by topic; evaluate;
6. write a report folder: summary.md, plots, metrics JSONL, HF exports of the tuned models.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .config import Config, config_from_dict
from .finetune.manager import FinetuneManager, build_rag_system, load_train_eval_records
from .paths import require_local
from .sharding import make_mesh

# Settings of the two presets (any key of fedrag_jax/config.py can be overridden on top).
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {  # sized for about 15 minutes on a quiet 2-core CPU
        "mode": "both", "output_dir": "reports/demo/runs", "checkpoint_every": 0,
        "model": {"retriever_max_length": 64},
        # recall on 256 dev questions (cheap), EM / F1 on the first 48 (generation is not)
        "data": {"num_train": 192, "num_eval": 256}, "eval_generate_max": 48,
        "eval_generate": False,  # the demo evaluates each phase itself; no duplicate in-run pass
        # 48 passage tokens (the lead sentence or two) keep 94 % of prompt+answer pairs within
        # the 128-token bucket (64 would put 76 % in the 192 one): a third less LM compute
        "retrieval": {"top_k": 3, "max_context_tokens": 48, "max_new_tokens": 12},
        # LSR ranks 6 candidates so it can lift gold passages from ranks 4-6 into the top 3;
        # 2 epochs at 3e-5 with a peaked LM target (tau_lm 0.1): see docs/demo.md for the sweep
        "lsr": {"steps": 48, "batch_size": 8, "learning_rate": 3e-5, "warmup_steps": 4,
                "tau_lm": 0.1, "max_length": 192, "top_k": 6},
        "ralt": {"steps": 12, "batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 2,
                 "lora_rank": 8, "lora_alpha": 16.0, "max_length": 192},
        "fed": {"num_clients": 3, "rounds": 2, "local_steps": 4, "partition": "topic",
                "min_clients": 3, "engine": "spmd"},
    },
    "full": {  # a longer run: hours on a CPU, minutes on an accelerator
        "mode": "both", "output_dir": "reports/demo/runs", "checkpoint_every": 20,
        "data": {"num_train": 2048, "num_eval": 256},
        "retrieval": {"top_k": 4, "max_context_tokens": 160, "max_new_tokens": 24},
        "lsr": {"steps": 200, "batch_size": 16, "learning_rate": 2e-5},
        "ralt": {"steps": 200, "batch_size": 4, "learning_rate": 3e-4, "lora_rank": 16},
        "fed": {"num_clients": 3, "rounds": 5, "local_steps": 40, "partition": "topic"},
    },
}

TABLE_METRICS = (("recall_at_k", "recall@k"), ("mrr", "MRR"), ("exact_match", "EM"),
                 ("f1", "F1"))


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
    train, dev = load_train_eval_records(config, corpus)
    timings["index"] = time.perf_counter() - t0
    untuned = (rag.retriever.query_encoder, rag.retriever.context_encoder, rag.generator.model)

    t = time.perf_counter()
    central = FinetuneManager(rag, train, dev, config, mesh=mesh)
    central.evaluate("untuned")
    timings["evaluate_untuned"] = time.perf_counter() - t

    t = time.perf_counter()
    central.train_retriever()
    central.evaluate("centralized_lsr", generate=False)
    central.train_generator()
    timings["train_centralized"] = time.perf_counter() - t
    central.evaluate("centralized")
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
    federated = FinetuneManager(rag, train, dev, fed_config, mesh=mesh,
                                dataset_cache=central.dataset_cache)
    federated.train_federated()
    timings["train_federated"] = time.perf_counter() - t
    federated.evaluate("federated")
    timings["total"] = time.perf_counter() - t0

    results = {**central.results, "federated": federated.results["federated"],
               "federated_history": federated.results["federated_history"],
               "timings_s": {k: round(v, 1) for k, v in timings.items()},
               "settings": config.to_dict()}
    write_report(out, results, config, train, dev)
    return results


def _cell(metrics: dict[str, float] | None, key: str) -> str:
    return f"{metrics[key]:.3f}" if metrics and key in metrics else "–"


def write_report(out: Path, results: dict[str, Any], config: Config, train: list[dict],
                 dev: list[dict]) -> None:
    from .finetune.trainer import read_metrics

    out.mkdir(parents=True, exist_ok=True)
    rows = [("untuned", "untuned"), ("after LSR (centralized)", "centralized_lsr"),
            ("LSR + RALT (centralized)", "centralized"), ("LSR + RALT (federated, 3 clients)",
                                                          "federated")]
    k = config.retrieval.top_k
    lines = ["# fedrag-jax demo report", "",
             f"Bundled corpus (Wikipedia summaries), MiniLM-L6 retriever, SmolLM2-135M "
             f"generator; {len(train)} train and {len(dev)} dev questions (disjoint articles); "
             f"top-{k} retrieval.", "",
             "| system | " + " | ".join(name.replace("@k", f"@{k}") for _, name in TABLE_METRICS)
             + " |", "|---|" + "---|" * len(TABLE_METRICS)]
    for label, key in rows:
        m = results.get(key)
        lines.append(f"| {label} | " + " | ".join(_cell(m, metric) for metric, _ in TABLE_METRICS)
                     + " |")
    lines += ["", "Timings (s): " + ", ".join(f"{k}={v}" for k, v in
                                             results["timings_s"].items()), "",
              "Plots: `loss_curves.png`, `metrics.png`. Per-example answers: `eval/*/`. "
              "Exports: `export/retriever` (tuned query tower) and `export/context_retriever` "
              "(the passage tower the index was built with), both sentence-transformers "
              "folders; `export/generator` (HF causal LM, LoRA merged).", ""]
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
    _plot(out, results, runs)


def _plot(out: Path, results: dict[str, Any], runs: Path) -> None:
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

    fig = Figure(figsize=(9, 4))
    ax = fig.add_subplot(1, 1, 1)
    systems = [("untuned", "untuned"), ("centralized", "centralized"),
               ("federated", "federated")]
    width = 0.25
    for j, (label, key) in enumerate(systems):
        m = results.get(key) or {}
        values = [m.get(metric, 0.0) for metric, _ in TABLE_METRICS]
        ax.bar([i + (j - 1) * width for i in range(len(TABLE_METRICS))], values, width,
               label=label)
    ax.set_xticks(range(len(TABLE_METRICS)), [name for _, name in TABLE_METRICS])
    ax.set_ylim(0, 1)
    ax.set_title("dev metrics before and after fine-tuning")
    ax.legend()
    FigureCanvasAgg(fig).print_png(str(out / "metrics.png"))
