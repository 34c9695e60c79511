"""The `fedrag-jax` command: convert, train/federate/evaluate end to end on tiny models,
help, and named errors on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml
from safetensors.numpy import load_file

from fedrag_jax import assets
from fedrag_jax.cli import main
from fedrag_jax.evals import Benchmarker, load_benchmark, load_qa_jsonl
from fedrag_jax.models.hf import load_tokenizer
from fedrag_jax.models.llama import CausalLM
from fedrag_jax.rag import RAGSystem
from tests.helpers import tiny_hf_bert, tiny_rag_parts

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_convert_bundled_gguf_to_hf_folder(tmp_path):
    out = tmp_path / "smollm2-hf"
    assert main(["convert", str(assets.generator_path()), str(out)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ours_tok = load_tokenizer(assets.generator_path())
    text = "Retrieval-augmented generation, in 2024: 3 ideas!"
    assert tokenizer(text)["input_ids"] == ours_tok(text)["input_ids"]
    assert tokenizer.chat_template == ours_tok.chat_template
    ours = CausalLM.from_pretrained(out)
    ids = np.asarray([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids)).logits.numpy()
    mine = np.asarray(ours(ids))
    assert np.abs(mine - theirs).max() / np.abs(theirs).max() <= 1e-3


def test_convert_encoder_folder(tmp_path):
    src, ref = tiny_hf_bert(tmp_path)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                               + [f"w{i}" for i in range(75)]))
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab))
    tokenizer.save_pretrained(src)
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--dtype", "bfloat16"]) == 0
    assert (out / "modules.json").is_file() and (out / "1_Pooling" / "config.json").is_file()
    reloaded = transformers.AutoModel.from_pretrained(out)
    assert reloaded.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    text = "w1 w2 w3"
    assert transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"] == \
        tokenizer(text)["input_ids"]


def test_convert_reports_named_error(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "CheckpointNotFoundError" in err and "no checkpoint" in err


def _cli(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "fedrag_jax.cli", *args], capture_output=True,
                          text=True, check=True, env=env, cwd=ROOT).stdout


def test_help_lists_subcommands():
    out = _cli("--help")
    for command in ("convert", "index", "ask", "train", "federate", "evaluate", "export",
                    "demo"):
        assert command in out
    federate = _cli("federate", "--help")
    assert "federated=true" in federate and "fed.engine" in federate
    evaluate = _cli("evaluate", "--help")
    for option in ("--rag", "--config", "--data", "--benchmark", "--data-files", "--limit",
                   "--batch-size", "--output"):
        assert option in evaluate


# --- train / federate / evaluate on tiny models ---------------------------------------------
PROMPT = "w4 {context} w5 {query} w6"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """HF folders of a tiny retriever and generator, a corpus, train/dev JSONL, a config,
    and a saved RAG system built from them (what `train` writes to output_dir/rag)."""
    tmp = tmp_path_factory.mktemp("tiny")
    retriever, store, generator, _ = tiny_rag_parts(tmp, num_passages=16)
    retriever.query_encoder.save_pretrained(tmp / "retriever", tokenizer=retriever.tokenizer)
    generator.model.save_pretrained(tmp / "generator", tokenizer=generator.tokenizer)
    nodes = store.get(store.node_ids())
    _jsonl(tmp / "corpus.jsonl", [{"id": n.node_id, "text": n.text} for n in nodes])
    rng = np.random.default_rng(1)
    records = [{"query": " ".join(n.text.split()[:3]),  # words of its gold passage
                "response": " ".join(f"w{i}" for i in rng.integers(4, 96, size=2)),
                "gold_id": n.node_id} for n in nodes]
    _jsonl(tmp / "train.jsonl", records)
    _jsonl(tmp / "dev.jsonl", records[:5])
    config = {
        "mode": "both", "progress": False, "output_dir": str(tmp / "run"),
        "model": {"retriever": str(tmp / "retriever"), "generator": str(tmp / "generator"),
                  "use_chat_template": False, "retriever_max_length": 64},
        "data": {"corpus": str(tmp / "corpus.jsonl"), "train": str(tmp / "train.jsonl"),
                 "eval": str(tmp / "dev.jsonl"), "num_train": 16, "num_eval": 5},
        "retrieval": {"top_k": 2, "backend": "exact", "prompt_template": PROMPT,
                      "max_context_tokens": 24, "max_new_tokens": 3},
        "lsr": {"steps": 2, "batch_size": 8, "max_length": 96, "learning_rate": 1e-2,
                "warmup_steps": 0},
        "ralt": {"steps": 2, "batch_size": 8, "max_length": 96, "lora_rank": 4,
                 "learning_rate": 1e-2, "warmup_steps": 0},
        "fed": {"num_clients": 2, "rounds": 2, "local_steps": 2, "partition": "iid",
                "min_clients": 2, "engine": "spmd"},
    }
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(config))
    RAGSystem(retriever, store, generator, _rag_config(), max_new_tokens=3,
              max_context_tokens=24).save_pretrained(tmp / "system" / "rag")
    return tmp


def _rag_config():
    from fedrag_jax.types import RAGConfig

    return RAGConfig(top_k=2, prompt_template=PROMPT)


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_federate_end_to_end(tiny, capsys):
    run = tiny / "fed-run"
    assert main(["federate", "--config", str(tiny / "tiny.yaml"), f"output_dir={run}",
                 "mode=retriever"]) == 0
    printed = capsys.readouterr().out
    assert f"tuned system in {run / 'rag'}" in printed
    results = json.loads((run / "results.json").read_text())
    assert {"before", "after_federated", "federated_history"} <= set(results)
    rounds = [json.loads(line) for line in
              (run / "federated_lsr" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["aggregated"] and r["clients"] == 2 and np.isfinite(r["train_loss"])
               for r in rounds)
    for line, h in zip(rounds, results["federated_history"]["lsr"]["rounds"], strict=True):
        n = sum(c["num_examples"] for c in h["clients"])  # example-weighted client mean
        assert line["train_loss"] == pytest.approx(
            sum(c["train_loss"] * c["num_examples"] for c in h["clients"]) / n)
    # the saved system loads, and federated LSR moved its query tower off the initial weights
    RAGSystem.from_pretrained(run / "rag")
    before, after = _tensors(tiny / "retriever"), _tensors(run / "rag" / "retriever")
    assert before.keys() == after.keys()
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    # the passage tower (the index's) is the untouched initial one
    context = _tensors(run / "rag" / "context_retriever")
    assert all(np.array_equal(before[k], context[k]) for k in before)


def test_train_end_to_end_generator(tiny, capsys):
    run = tiny / "train-run"
    assert main(["train", "--config", str(tiny / "tiny.yaml"), f"output_dir={run}",
                 "mode=generator"]) == 0
    assert f"tuned system in {run / 'rag'}" in capsys.readouterr().out
    assert (run / "ralt" / "metrics.jsonl").is_file() and (run / "results.json").is_file()
    before, after = _tensors(tiny / "generator"), _tensors(run / "rag" / "generator")
    assert before.keys() == after.keys()
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def test_evaluate_saved_system_on_jsonl(tiny, tmp_path, capsys):
    out = tmp_path / "eval"
    rows = [json.loads(line) for line in (tiny / "train.jsonl").read_text().splitlines()]
    # one line in the {query, answers, gold_passage_id} spelling, the rest as training records
    rows[0] = {"query": rows[0]["query"], "answers": [rows[0]["response"], "w7"],
               "gold_passage_id": rows[0]["gold_id"]}
    _jsonl(tmp_path / "qa.jsonl", rows)
    assert main(["evaluate", "--rag", str(tiny / "system" / "rag"), "--data",
                 str(tmp_path / "qa.jsonl"), "--limit", "7", "--batch-size", "3",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    aggregate = json.loads((out / "aggregate.json").read_text())
    lines = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert aggregate["num_examples"] == len(lines) == 7
    assert set(aggregate["metrics"]) == {"exact_match", "f1", "recall_at_k", "mrr"}
    # by hand, from the per-example lines
    hits = [float(r["gold_passage_id"] in r["retrieved_ids"][:2]) for r in lines]
    rr = [next((1 / i for i, x in enumerate(r["retrieved_ids"][:2], 1)
                if x == r["gold_passage_id"]), 0.0) for r in lines]
    assert aggregate["metrics"]["recall_at_k"] == pytest.approx(np.mean(hits))
    assert aggregate["metrics"]["mrr"] == pytest.approx(np.mean(rr))
    assert aggregate["recall_k"] == 2 and all(len(r["retrieved_ids"]) == 2 for r in lines)
    # and equal to the Benchmarker run directly on the same system and examples
    direct = Benchmarker(RAGSystem.from_pretrained(tiny / "system" / "rag"),
                         load_qa_jsonl(tmp_path / "qa.jsonl"), recall_k=2,
                         progress=False).run(limit=7)
    assert aggregate["metrics"] == pytest.approx(direct.metrics)
    assert [r["prediction"] for r in lines] == [r.prediction for r in direct.examples]
    assert f"| recall@2 | {aggregate['metrics']['recall_at_k']:.4f} | 7 |" in printed
    assert "| EM |" in printed and "| F1 |" in printed


def test_evaluate_config_on_named_benchmark_files(tiny, tmp_path, capsys):
    """Multiple choice from local MMLU-schema files, on the system a config builds."""
    mmlu = tmp_path / "mmlu.jsonl"
    _jsonl(mmlu, [{"question": f"w{10 + i} w{20 + i}", "subject": "test",
                   "choices": ["w30", "w31", "w32"], "answer": i % 3} for i in range(4)])
    assert main(["evaluate", "--config", str(tiny / "tiny.yaml"), "--benchmark", "mmlu",
                 "--data-files", str(mmlu), "--limit", "3", f"output_dir={tmp_path / 'run'}",
                 "retrieval.max_new_tokens=2"]) == 0
    out = tmp_path / "run" / "eval" / "mmlu"
    aggregate = json.loads((out / "aggregate.json").read_text())
    lines = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert len(lines) == aggregate["num_examples"] == 3
    assert [r["gold_choice"] for r in lines] == [0, 1, 2]
    assert aggregate["metrics"]["mc_accuracy"] == pytest.approx(
        np.mean([r["predicted_choice"] == r["gold_choice"] for r in lines]))
    assert aggregate["counts"]["mc_accuracy"] == 3 and "recall_at_k" not in aggregate["metrics"]
    assert "accuracy (multiple choice)" in capsys.readouterr().out
    assert len(load_benchmark("mmlu", data_files=[str(mmlu)], limit=3)) == 3


@pytest.mark.parametrize("args,message", [
    (["evaluate", "--data", "x.jsonl", "--benchmark", "mmlu"], "either --data"),
    (["evaluate", "--benchmark", "mmlu"], "--data-files"),
    (["evaluate", "--rag", "r", "--config", "c.yaml", "--data", "x.jsonl"], "--rag evaluates"),
    (["evaluate", "--rag", "nowhere", "--data", "nowhere.jsonl"], "DataError"),
    (["federate", "fed.engine=carrier-pigeon"], "fed.engine must be one of"),
])
def test_evaluate_and_federate_refuse_bad_input(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_distributed_initializes_before_jax_touches_a_device(tmp_path):
    """distributed=true: jax.distributed.initialize() is the first thing to touch JAX."""
    code = (
        "import sys, jax\n"
        "from jax._src import xla_bridge\n"
        "def initialize(*a, **k):\n"
        "    print('backends already up:', xla_bridge.backends_are_initialized())\n"
        "    sys.exit(7)\n"
        "jax.distributed.initialize = initialize\n"
        "from fedrag_jax.cli import main\n"
        "main(sys.argv[1:])\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for argv in (["train", "distributed=true"], ["federate", "distributed=true"],
                 ["evaluate", "--data", "x.jsonl", "distributed=true"]):
        proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                              text=True, env=env, cwd=tmp_path)
        assert proc.returncode == 7, proc.stderr
        assert proc.stdout.strip() == "backends already up: False"


@pytest.mark.slow
def test_index_build_then_ask(tmp_path, capsys):
    out = tmp_path / "index"
    assert main(["index", "build", "--corpus", "bundled", "--limit", "300", "--out", str(out),
                 "--max-length", "128"]) == 0
    assert (out / "store" / "manifest.json").is_file() and (out / "index.json").is_file()
    capsys.readouterr()
    assert main(["ask", "--index", str(out), "--top-k", "2", "--max-new-tokens", "16",
                 "What is the capital of France?"]) == 0
    printed = capsys.readouterr().out
    assert "sources:" in printed and "[1]" in printed and "[2]" in printed
    assert main(["ask", "--index", str(tmp_path), "question"]) == 2
