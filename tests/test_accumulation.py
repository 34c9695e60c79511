"""Gradient accumulation is the full batch's gradient: unequal answer lengths, a padded last
batch (an all-padding micro-batch among them), packed and unpacked RALT, LSR with padding.

The step runs on the default optimizer path (global-norm clipping + AdamW with warmup); the
gradient it used is read back from AdamW's first moment after one step
(mu = (1 - b1) * clipped gradient). The reference is the full batch's objective written out
here, per instance, and combined in float64:

    RALT  g = sum_i w_i grad(sum_t m_it ce_it) / sum_i w_i sum_t m_it
    LSR   g = sum_b m_b grad(KL_b) / sum_b m_b
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedrag_jax.finetune.batches import build_ralt_dataset
from fedrag_jax.finetune.losses import lsr_loss, token_logprobs
from fedrag_jax.finetune.optimizer import OptimizerConfig, make_optimizer
from fedrag_jax.finetune.steps import QUERY_TOWER, Towers, TrainState, lsr_step, ralt_step
from fedrag_jax.models.bert import BertConfig, Encoder
from fedrag_jax.models.lora import apply_lora
from tests.helpers import tiny_rag_parts

OPT = OptimizerConfig(learning_rate=1e-3, warmup_steps=4, total_steps=20)  # AdamW, clip 1.0
ATOL = 1e-6


def adam_mu(state: TrainState):
    """The first moment of the AdamW state, as a list of leaves."""
    (adam,) = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
               if hasattr(s, "mu")]
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(adam.mu)]


def clipped(grads: list[np.ndarray], max_norm: float) -> tuple[list[np.ndarray], float]:
    norm = float(np.sqrt(sum(np.sum(g * g) for g in grads)))
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return [g * scale for g in grads], norm


def used_gradient(state: TrainState) -> list[np.ndarray]:
    """The (clipped) gradient of the one step taken: mu / (1 - b1)."""
    return [m / (1.0 - OPT.b1) for m in adam_mu(state)]


# --- RALT -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ralt_parts(tmp_path_factory):
    retriever, store, generator, records = tiny_rag_parts(tmp_path_factory.mktemp("acc"))
    rng = np.random.default_rng(5)
    for i, r in enumerate(records[:5]):  # answers of 1, 3, 5, 7 and 9 words
        r["response"] = " ".join(f"w{j}" for j in rng.integers(4, 96, size=1 + 2 * i))
    # 5 queries in batches of 3: batch 1 of an epoch holds 2 queries and one padding query
    data = build_ralt_dataset(records[:5], retriever, store, generator, top_k=2, batch_size=3,
                              template="w4 {context} w5 {query} w6", max_length=128,
                              progress=False)
    data.shuffle = False
    model = apply_lora(nnx.clone(generator.model), rank=4, alpha=8.0,
                       target_modules=("q_proj", "v_proj"), seed=0)
    # LoRA B starts at zero, so its gradient vanishes at init on every path: move it first
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    lora = jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), lora)
    return nnx.merge(graphdef, lora, rest), data


def instance_sums(model, batch) -> jax.Array:
    """[N]: each instance's summed target-token cross-entropy, written out from the model."""
    if "segment_ids" in batch:
        hidden, _ = model.hidden_states(batch["input_ids"], segment_ids=batch["segment_ids"],
                                        prefix_ids=batch.get("prefix_ids"))
        picked = hidden[batch["instance_row"][:, None], batch["target_index"]]
    else:
        hidden, _ = model.hidden_states(batch["input_ids"], batch["attention_mask"])
        picked = jnp.take_along_axis(hidden, batch["target_index"][..., None], axis=1)
    ce = -token_logprobs(model.logits(picked), batch["target_ids"])
    return jnp.sum(ce * batch["target_mask"], axis=1)


def ralt_reference(model, batch) -> list[np.ndarray]:
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)

    def one(p, i):
        return instance_sums(nnx.merge(graphdef, p, rest), batch)[i]

    grad_one = jax.jit(jax.grad(one))
    w = np.asarray(batch["weights"], np.float64)
    tokens = np.asarray(batch["target_mask"]).sum(axis=1)
    total = None
    for i in np.flatnonzero(w > 0):
        g = [np.asarray(x, np.float64) * w[i] for x in jax.tree.leaves(grad_one(params, i))]
        total = g if total is None else [a + b for a, b in zip(total, g, strict=True)]
    return [g / float(np.sum(w * tokens)) for g in total]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_ralt_accumulation_equals_the_full_batch_gradient(ralt_parts, packed):
    model, data = ralt_parts
    micro = 3  # one query's instances each; the third micro-batch is all padding
    if packed:
        data.pack(3, micro)  # a row per micro-batch, the shared prompt prefix run once
    try:
        batch = data.batch_at(0, 1)
    finally:
        data.pack_rows, data.pack_groups, data.prefix_length = None, 1, 0
    assert ("prefix_ids" in batch) is packed
    weights = batch["weights"].reshape(micro, -1)
    assert weights[:2].all() and not weights[2].any()  # two real queries, one padding
    tokens = batch["target_mask"].sum(axis=1)
    assert len(set(tokens[weights.reshape(-1) > 0].tolist())) > 1  # unequal answers
    reference, norm = clipped(ralt_reference(model, batch), OPT.max_grad_norm)
    tx = make_optimizer(OPT)
    for mb in (1, micro):
        state = TrainState.create(nnx.clone(model), tx, nnx.LoRAParam)
        state, metrics = jax.jit(lambda s, b, mb=mb: ralt_step(s, b, micro_batches=mb))(
            state, batch)
        assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-5), mb
        for got, want in zip(used_gradient(state), reference, strict=True):
            np.testing.assert_allclose(got, want, atol=ATOL, err_msg=f"micro_batches={mb}")


# --- LSR ------------------------------------------------------------------------------------
BERT = BertConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                  intermediate_size=64, max_position_embeddings=32)


def test_lsr_accumulation_with_a_padded_last_batch_equals_the_full_batch():
    rng = np.random.default_rng(2)
    b, k, length = 6, 4, 10
    batch = {"query_ids": rng.integers(1, 64, size=(b, length)).astype(np.int32),
             "query_mask": np.ones((b, length), bool),
             "passage_emb": rng.normal(size=(b, k, BERT.hidden_size)).astype(np.float32),
             "lm_logprobs": (-np.abs(rng.normal(size=(b, k))) * 5).astype(np.float32),
             # the last batch of an epoch: 4 real examples; micro-batches of 3 and 1 real
             "example_mask": np.array([1, 1, 1, 1, 0, 0], bool)}
    batch["query_mask"][1::2, length - 3:] = False
    query = Encoder(BERT, rngs=nnx.Rngs(0))
    towers = Towers(query, nnx.clone(query))
    graphdef, params, rest = nnx.split(towers, QUERY_TOWER, ...)

    def one(p, i):
        row = {k: jax.lax.dynamic_slice_in_dim(jnp.asarray(v), i, 1) for k, v in batch.items()}
        q = nnx.merge(graphdef, p, rest).query_tower(row["query_ids"], row["query_mask"])
        scores = jnp.einsum("bd,bkd->bk", q, row["passage_emb"])
        return lsr_loss(scores, row["lm_logprobs"], tau_retrieval=0.5, tau_lm=1.0)

    grad_one = jax.jit(jax.grad(one))
    real = np.flatnonzero(batch["example_mask"])
    total = [sum(np.asarray(g[j], np.float64) for g in
                 (jax.tree.leaves(grad_one(params, int(i))) for i in real))
             for j in range(len(jax.tree.leaves(params)))]
    reference, norm = clipped([g / len(real) for g in total], OPT.max_grad_norm)
    tx = make_optimizer(OPT)
    for mb in (1, 2, 3):  # 3: micro-batches of 2, 2 and 0 real examples
        state = TrainState.create(nnx.clone(towers), tx, QUERY_TOWER)
        state, metrics = jax.jit(lambda s, x, mb=mb: lsr_step(
            s, x, tau_retrieval=0.5, tau_lm=1.0, micro_batches=mb))(state, batch)
        assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-5), mb
        for got, want in zip(used_gradient(state), reference, strict=True):
            np.testing.assert_allclose(got, want, atol=ATOL, err_msg=f"micro_batches={mb}")


def test_micro_batches_must_divide_the_batch():
    from fedrag_jax.errors import ConfigError

    query = Encoder(BERT, rngs=nnx.Rngs(0))
    state = TrainState.create(Towers(query, nnx.clone(query)), make_optimizer(OPT), QUERY_TOWER)
    batch = {"query_ids": np.ones((6, 4), np.int32), "query_mask": np.ones((6, 4), bool),
             "passage_emb": np.ones((6, 2, 32), np.float32),
             "lm_logprobs": np.zeros((6, 2), np.float32), "example_mask": np.ones(6, bool)}
    with pytest.raises(ConfigError, match="micro_batches=4"):
        lsr_step(state, batch, micro_batches=4)
