"""HF checkpoints out and back in: transformers loads what we save; bad input is named."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from fedrag_jax.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsupportedModelError,
    WeightMismatchError,
)
from fedrag_jax.models.bert import Encoder
from fedrag_jax.models.llama import CausalLM
from fedrag_jax.models.safetensors_io import open_tensors
from tests.helpers import random_batch, tiny_hf_bert, tiny_hf_causal_lm


def read_all(folder):
    tensors = {}
    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
             if index.exists() else ["model.safetensors"])
    for f in files:
        tensors.update({k: np.array(v) for k, v in open_tensors(folder / f).items()})
    return tensors


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "llama3"])
def test_causal_lm_round_trip(tmp_path, family):
    src, ref = tiny_hf_causal_lm(tmp_path, family)
    model = CausalLM.from_pretrained(src)
    out = tmp_path / "export"
    model.save_pretrained(out)
    assert (out / "generation_config.json").is_file()
    original, exported = read_all(src), read_all(out)
    assert set(original) == set(exported)
    for name in original:  # fp32 round trip is lossless: byte-identical tensors
        assert original[name].dtype == exported[name].dtype
        assert original[name].tobytes() == exported[name].tobytes(), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded) is type(ref)
    ids, mask = random_batch(np.random.default_rng(0), 2, 8, ref.config.vocab_size)
    with torch.no_grad():
        a = ref(input_ids=torch.tensor(ids)).logits.numpy()
        b = reloaded(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_array_equal(a, b)


def test_sharded_export_has_index_and_loads(tmp_path):
    src, ref = tiny_hf_causal_lm(tmp_path, "llama")
    model = CausalLM.from_pretrained(src)
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (out / "model.safetensors").exists()
    again = CausalLM.from_pretrained(out)  # and we read our own sharded folders
    ids, mask = random_batch(np.random.default_rng(1), 2, 6, ref.config.vocab_size)
    np.testing.assert_array_equal(np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))),
                                  np.asarray(again(jnp.asarray(ids), jnp.asarray(mask))))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    for name, value in read_all(src).items():
        np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), value)


def test_encoder_round_trip_with_tokenizer(tmp_path):
    src, ref = tiny_hf_bert(tmp_path)
    encoder = Encoder.from_pretrained(src, pooling="cls", normalize=True)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                               + [f"w{i}" for i in range(75)]))
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab))
    out = tmp_path / "bert-export"
    encoder.save_pretrained(out, tokenizer=tokenizer)
    for name, value in read_all(src).items():
        assert read_all(out)[name].tobytes() == value.tobytes()
    reloaded = transformers.AutoModel.from_pretrained(out)
    assert transformers.AutoTokenizer.from_pretrained(out)("w3 w4")["input_ids"] == \
        tokenizer("w3 w4")["input_ids"]
    again = Encoder.from_pretrained(out)  # pooling settings travel in the ST files
    assert again.config.pooling == "cls" and again.config.normalize
    ids, mask = random_batch(np.random.default_rng(2), 2, 6, 80, left_pad=False)
    with torch.no_grad():
        h = reloaded(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    np.testing.assert_allclose(
        np.asarray(again.hidden_states(jnp.asarray(ids), jnp.asarray(mask)))[mask.astype(bool)],
        h.last_hidden_state.numpy()[mask.astype(bool)], atol=1e-5)


def test_save_is_atomic_and_keeps_old_folder_on_failure(tmp_path, monkeypatch):
    src, _ = tiny_hf_causal_lm(tmp_path, "llama")
    model = CausalLM.from_pretrained(src)
    out = tmp_path / "export"
    model.save_pretrained(out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("fedrag_jax.models.hf.save_file", boom)
    with pytest.raises(OSError):
        model.save_pretrained(out)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert before == after
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".export")) == []


# --- bad input ---------------------------------------------------------------------------
def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint"):
        CausalLM.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        CausalLM.from_pretrained(tmp_path / "empty")


def test_unsupported_model_type_lists_supported(tmp_path):
    src, _ = tiny_hf_causal_lm(tmp_path, "llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2, qwen3"):
        CausalLM.from_pretrained(src)
    with pytest.raises(UnsupportedModelError, match="bert"):
        Encoder.from_pretrained(src)


def test_shape_mismatch_is_named(tmp_path):
    src, _ = tiny_hf_causal_lm(tmp_path, "llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightMismatchError, match=r"mlp\..*shape"):
        CausalLM.from_pretrained(src)


def test_missing_tensor_is_named(tmp_path):
    src, _ = tiny_hf_causal_lm(tmp_path, "llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightMismatchError, match="lacks"):
        CausalLM.from_pretrained(src)


def test_truncated_safetensors_is_corrupt(tmp_path):
    src, _ = tiny_hf_causal_lm(tmp_path, "llama")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        CausalLM.from_pretrained(src)


def test_pickle_only_folder_is_refused(tmp_path):
    src, _ = tiny_hf_causal_lm(tmp_path, "llama")
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(CheckpointNotFoundError, match="never unpickles"):
        CausalLM.from_pretrained(src)
