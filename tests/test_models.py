"""Parity of our Flax models with transformers (PyTorch CPU) on the same weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fedrag_jax.models.bert import Encoder
from fedrag_jax.models.llama import CausalLM
from tests.helpers import random_batch, tiny_hf_bert, tiny_hf_causal_lm

FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3"]


def torch_logits(model, ids, mask):
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits.numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_lm_matches_transformers(tmp_path, family):
    path, ref = tiny_hf_causal_lm(tmp_path, family, seed=FAMILIES.index(family))
    model = CausalLM.from_pretrained(path)
    ids, mask = random_batch(np.random.default_rng(0), 3, 12, ref.config.vocab_size)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    theirs = torch_logits(ref, ids, mask)
    real = mask.astype(bool)  # padded positions are don't-care
    assert np.abs(ours[real] - theirs[real]).max() <= 1e-4
    assert np.abs(theirs[real]).max() > 0.1  # the comparison is not between near-zeros


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_kv_cache_decoding_equals_full_forward(tmp_path, family):
    path, ref = tiny_hf_causal_lm(tmp_path, family)
    model = CausalLM.from_pretrained(path)
    ids, mask = random_batch(np.random.default_rng(1), 2, 10, ref.config.vocab_size)
    full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    cache = model.init_cache(2, 16)
    prompt = 6
    logits, cache = model(jnp.asarray(ids[:, :prompt]), jnp.asarray(mask[:, :prompt]),
                          cache=cache)
    steps = [np.asarray(logits)]
    for t in range(prompt, 10):
        logits, cache = model(jnp.asarray(ids[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]),
                              cache=cache)
        steps.append(np.asarray(logits))
    stepped = np.concatenate(steps, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(stepped[real], full[real], atol=1e-5)
    assert int(cache.index) == 10


def test_bert_matches_transformers(tmp_path):
    path, ref = tiny_hf_bert(tmp_path)
    encoder = Encoder.from_pretrained(path)  # plain HF folder: mean pooling by default
    ids, mask = random_batch(np.random.default_rng(2), 3, 9, 80, left_pad=False)
    types = np.random.default_rng(3).integers(0, 2, size=ids.shape)
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  token_type_ids=torch.tensor(types))
    hidden = np.asarray(encoder.hidden_states(jnp.asarray(ids), jnp.asarray(mask),
                                              jnp.asarray(types)))
    real = mask.astype(bool)
    theirs = out.last_hidden_state.numpy()
    assert np.abs(hidden[real] - theirs[real]).max() <= 1e-4
    np.testing.assert_allclose(np.asarray(encoder.pooler_output(jnp.asarray(hidden))),
                               out.pooler_output.numpy(), atol=1e-4)
    m = mask[..., None]
    mean = (theirs * m).sum(1) / m.sum(1)
    pooled = np.asarray(encoder(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)))
    np.testing.assert_allclose(pooled, mean, atol=1e-4)


def test_bert_cls_pooling_and_normalisation(tmp_path):
    path, ref = tiny_hf_bert(tmp_path)
    encoder = Encoder.from_pretrained(path, pooling="cls", normalize=True)
    ids, mask = random_batch(np.random.default_rng(4), 2, 7, 80, left_pad=False)
    with torch.no_grad():
        cls = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    cls = cls.last_hidden_state[:, 0].numpy()
    cls /= np.linalg.norm(cls, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(encoder(jnp.asarray(ids), jnp.asarray(mask))), cls,
                               atol=1e-5)


def test_bf16_params_and_compute(tmp_path):
    path, ref = tiny_hf_causal_lm(tmp_path, "llama")
    model = CausalLM.from_pretrained(path, dtype="bfloat16")
    kernel = model.layers[0].attn.q_proj.kernel[...]
    assert kernel.dtype == jnp.bfloat16
    ids, mask = random_batch(np.random.default_rng(5), 2, 8, ref.config.vocab_size)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    theirs = torch_logits(ref, ids, mask)
    real = mask.astype(bool)
    assert ours.dtype == np.float32
    assert np.abs(ours[real] - theirs[real]).max() < 0.1  # bf16 is coarse but close
    mixed = CausalLM.from_pretrained(path, dtype="bfloat16", param_dtype="float32")
    assert mixed.layers[0].attn.q_proj.kernel[...].dtype == jnp.float32
    assert jax.numpy.isfinite(mixed(jnp.asarray(ids), jnp.asarray(mask))).all()
