"""Train steps: gradients reach the right parameters, sharded == single device, no
recompilation, gradient accumulation, LoRA-only updates and merged export."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from fedrag_jax.finetune.optimizer import OptimizerConfig, make_optimizer
from fedrag_jax.finetune.steps import (
    QUERY_TOWER,
    Towers,
    TrainState,
    compile_step,
    lsr_step,
    place_state,
    ralt_step,
)
from fedrag_jax.models.bert import BertConfig, Encoder
from fedrag_jax.models.llama import CausalLM
from fedrag_jax.models.lora import apply_lora, merge_lora
from fedrag_jax.sharding import MeshConfig, make_mesh, shard_batch
from tests.helpers import tiny_hf_causal_lm

BERT = BertConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                  intermediate_size=64, max_position_embeddings=32)


def towers(seed=0):
    query = Encoder(BERT, rngs=nnx.Rngs(seed))
    return Towers(query, nnx.clone(query))


def lsr_batch(rng, b=8, k=4, length=10, gold=None):
    ids = rng.integers(1, 64, size=(b, length)).astype(np.int32)
    mask = np.ones((b, length), bool)
    mask[1::2, length - 3:] = False
    emb = rng.normal(size=(b, k, BERT.hidden_size)).astype(np.float32)
    gold = rng.integers(0, k, size=b) if gold is None else gold
    lm = np.full((b, k), -30.0, np.float32)  # the generator clearly prefers one passage
    lm[np.arange(b), gold] = -2.0
    return {"query_ids": ids, "query_mask": mask, "passage_emb": emb, "lm_logprobs": lm,
            "example_mask": np.ones(b, bool)}, gold


def params_of(state, part):
    return jax.tree.map(np.asarray, nnx.state(state.model(), nnx.Param)[part])


def test_lsr_moves_query_tower_only():
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=10))
    state = TrainState.create(towers(), tx, trainable=QUERY_TOWER)
    assert "context_tower" not in state.params  # only the query tower is trainable
    before_q, before_c = params_of(state, "query_tower"), params_of(state, "context_tower")
    batch, _ = lsr_batch(np.random.default_rng(0))
    passage_emb = batch["passage_emb"].copy()
    state, metrics = jax.jit(lsr_step)(state, batch)
    assert float(metrics["grad_norm"]) > 0
    after_q, after_c = params_of(state, "query_tower"), params_of(state, "context_tower")
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before_q),
                                                        jax.tree.leaves(after_q), strict=True)]
    assert all(changed[:3]) and sum(changed) > 0.9 * len(changed)
    for a, b in zip(jax.tree.leaves(before_c), jax.tree.leaves(after_c), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(batch["passage_emb"], passage_emb)


def test_lsr_learns_the_generators_preference():
    rng = np.random.default_rng(1)
    batch, gold = lsr_batch(rng, b=16, k=4)
    tx = make_optimizer(OptimizerConfig(learning_rate=3e-3, total_steps=40, schedule="constant"))
    state = TrainState.create(towers(1), tx, trainable=QUERY_TOWER)
    step = jax.jit(lsr_step)

    def retrieval(state):
        q = state.model().query_tower(jnp.asarray(batch["query_ids"]),
                                      jnp.asarray(batch["query_mask"]))
        scores = np.einsum("bd,bkd->bk", np.asarray(q), batch["passage_emb"])
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return p[np.arange(len(gold)), gold].mean(), (scores.argmax(-1) == gold).mean()

    p0, r0 = retrieval(state)
    losses = []
    for _ in range(40):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    p1, r1 = retrieval(state)
    assert p1 > p0 + 0.3, (p0, p1)
    assert r1 > r0 and r1 >= 0.9, (r0, r1)
    assert losses[-1] < 0.5 * losses[0]


def test_gradient_accumulation_equals_full_batch():
    batch, _ = lsr_batch(np.random.default_rng(2))
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=10))
    full, m_full = jax.jit(lsr_step)(TrainState.create(towers(2), tx, QUERY_TOWER), batch)
    accum, m_acc = jax.jit(lambda s, b: lsr_step(s, b, micro_batches=2))(
        TrainState.create(towers(2), tx, QUERY_TOWER), batch)
    np.testing.assert_allclose(float(m_full["loss"]), float(m_acc["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(accum.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_sharded_step_equals_single_device_and_compiles_once():
    rng = np.random.default_rng(3)
    batches = [lsr_batch(rng)[0] for _ in range(3)]
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=10))
    results = {}
    for name, mesh in (("one", make_mesh(None, jax.devices()[:1])),
                       ("eight", make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))):
        traces = []

        def counted_step(state, batch, traces=traces, **hyper):
            traces.append(1)  # runs once per trace, i.e. per compilation
            return lsr_step(state, batch, **hyper)

        state = place_state(TrainState.create(towers(3), tx, QUERY_TOWER), mesh)
        step = compile_step(counted_step, state, batches[0], mesh, tau_retrieval=0.5)
        for b in batches:
            state, metrics = step(state, shard_batch(b, mesh))
        assert len(traces) == 1  # three steps of one bucket: one compilation
        results[name] = (state, metrics)
        if name == "eight":
            kernel = state.params["query_tower"]["layers"][0]["intermediate"]["kernel"][...]
            assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
            mu = state.opt_state[1][0].mu["query_tower"]["layers"][0]["intermediate"]["kernel"][...]
            assert mu.sharding.spec == kernel.sharding.spec  # optimizer state sharded alike
    one, eight = results["one"], results["eight"]
    np.testing.assert_allclose(float(one[1]["loss"]), float(eight[1]["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one[0].params), jax.tree.leaves(eight[0].params),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def ralt_batch(rng, n=4, length=12, t=3, vocab=96):
    ids = rng.integers(4, vocab, size=(n, length)).astype(np.int32)
    mask = np.ones((n, length), bool)
    mask[1, :3] = False  # left padding
    index = np.tile(np.arange(length - t - 1, length - 1), (n, 1)).astype(np.int32)
    targets = np.take_along_axis(ids, index + 1, axis=1)
    return {"input_ids": ids, "attention_mask": mask, "target_index": index,
            "target_ids": targets, "target_mask": np.ones((n, t), bool),
            "weights": np.ones(n, np.float32)}


def test_ralt_with_lora_trains_adapters_only_and_merged_export_matches(tmp_path):
    src, _ = tiny_hf_causal_lm(tmp_path, "llama")
    model = apply_lora(CausalLM.from_pretrained(src), rank=4, alpha=8.0,
                       target_modules=("q_proj", "v_proj", "down_proj"))
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-2, total_steps=10))
    state = TrainState.create(model, tx, trainable=nnx.LoRAParam)
    frozen_before = jax.tree.map(np.asarray, state.frozen)
    params_before = jax.tree.map(np.asarray, state.params)
    batch = ralt_batch(np.random.default_rng(4))
    step = jax.jit(ralt_step)
    losses = []
    for _ in range(5):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(state.frozen), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert all(not np.array_equal(a, np.asarray(b)) for a, b in zip(
        jax.tree.leaves(params_before), jax.tree.leaves(state.params), strict=True)
        if a.shape[0] == 4)  # every lora_b (zero-initialised) has moved
    adapted = state.model()
    out = tmp_path / "merged"
    adapted.save_pretrained(out)  # merges the adapters on the way out
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = batch["input_ids"][:2]
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    mine = np.asarray(adapted(jnp.asarray(ids)))
    np.testing.assert_allclose(mine, theirs, atol=1e-4)
    np.testing.assert_allclose(np.asarray(merge_lora(adapted)(jnp.asarray(ids))), mine,
                               atol=1e-5)
