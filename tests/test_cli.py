"""The `fedrag-jax` command: convert, help, and named errors on bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from fedrag_jax import assets
from fedrag_jax.cli import main
from fedrag_jax.models.hf import load_tokenizer
from fedrag_jax.models.llama import CausalLM
from tests.helpers import tiny_hf_bert


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


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "fedrag_jax.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "convert" in out and "demo" in out


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
