"""Sequence packing for RALT: a packed row computes each of its sequences as if it were alone
(same logits, no attention across segments, positions from 0), and the packed RALT step has
the same loss and gradients as the left-padded one, compiles once per packed shape and runs
sharded on 8 devices as on 1."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fedrag_jax.errors import DataError
from fedrag_jax.finetune.batches import (
    first_fit_decreasing,
    packed_target_arrays,
    target_arrays,
)
from fedrag_jax.finetune.steps import TrainState, compile_step, place_state, ralt_step
from fedrag_jax.models import llama as llama_module
from fedrag_jax.models.layers import causal_blockwise_attention, masked_softmax_attention
from fedrag_jax.models.llama import CausalLM, segment_positions
from fedrag_jax.models.lora import apply_lora
from fedrag_jax.sharding import MeshConfig, make_mesh, shard_batch
from tests.helpers import tiny_hf_causal_lm

BUCKETS = (16, 32, 48, 64, 96, 128)


def random_instances(rng, n: int, vocab: int = 96, prompt=(6, 30), target=(2, 6)):
    """Random prompt and target ids (never 0, the pad id) of random lengths."""
    prompts = [rng.integers(3, vocab, int(rng.integers(*prompt))).tolist() for _ in range(n)]
    targets = [rng.integers(3, vocab, int(rng.integers(*target))).tolist() for _ in range(n)]
    return prompts, targets


def spans(batch):
    """(row, start, end) of every segment of a packed batch, in row-major order."""
    out = []
    for row, seg in enumerate(batch["segment_ids"]):
        for s in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == s)
            out.append((row, int(where[0]), int(where[-1]) + 1))
    return out


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return tiny_hf_causal_lm(tmp_path_factory.mktemp("llama"), "llama")[0]


@pytest.fixture(scope="module")
def llama(llama_path):
    return CausalLM.from_pretrained(llama_path)


# --- the model ---------------------------------------------------------------------------------
def test_segment_positions_restart_at_each_segment():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(segment_positions(seg),
                                  [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))])


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])  # mistral: sliding window
def test_packed_logits_equal_unpacked_at_every_real_token(tmp_path, monkeypatch, family):
    monkeypatch.setattr(llama_module, "PACKED_ATTENTION_BLOCK", 16)  # several blocks a row
    path, _ = tiny_hf_causal_lm(tmp_path, family)
    model = CausalLM.from_pretrained(path)
    prompts, targets = random_instances(np.random.default_rng(1), 6)
    packed = packed_target_arrays(prompts, targets, 2, BUCKETS, 0)
    padded = target_arrays(prompts, targets, BUCKETS, 0)
    ours = np.asarray(model(jnp.asarray(packed["input_ids"]),
                            segment_ids=jnp.asarray(packed["segment_ids"])))
    alone = np.asarray(model(jnp.asarray(padded["input_ids"]),
                             jnp.asarray(padded["attention_mask"])))
    length = padded["input_ids"].shape[1]
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        row = packed["instance_row"][i]
        end = packed["target_index"][i, len(t) - 1] + 2  # one past the last target token
        n = len(p) + len(t)
        np.testing.assert_allclose(ours[row, end - n:end], alone[i, length - n:], atol=1e-5)
    assert np.abs(alone).max() > 0.1  # not a comparison of near-zeros


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_shared_prefix_rows_equal_whole_sequences_at_every_real_token(tmp_path, monkeypatch,
                                                                     family):
    """Sequences that begin alike, packed after their common prefix (run once, ``prefix_ids``):
    each segment computes what its whole sequence computes after the prefix (RoPE positions
    continue from it; mistral's sliding window counts positions, not slots)."""
    monkeypatch.setattr(llama_module, "PACKED_ATTENTION_BLOCK", 16)
    path, _ = tiny_hf_causal_lm(tmp_path, family)
    model = CausalLM.from_pretrained(path)
    rng = np.random.default_rng(5)
    prompts, targets = random_instances(rng, 7, prompt=(1, 20))
    prefix = rng.integers(3, 96, 11).tolist()
    prompts = [prefix + p for p in prompts]
    packed = packed_target_arrays(prompts, targets, 3, BUCKETS, 0, prefix_length=len(prefix))
    assert packed["prefix_ids"].tolist() == prefix
    padded = target_arrays(prompts, targets, BUCKETS, 0)
    ours = np.asarray(model(jnp.asarray(packed["input_ids"]),
                            segment_ids=jnp.asarray(packed["segment_ids"]),
                            prefix_ids=jnp.asarray(packed["prefix_ids"])))
    alone = np.asarray(model(jnp.asarray(padded["input_ids"]),
                             jnp.asarray(padded["attention_mask"])))
    length, p = padded["input_ids"].shape[1], len(prefix)
    for i, (x, t) in enumerate(zip(prompts, targets, strict=True)):
        row = packed["instance_row"][i]
        end = packed["target_index"][i, len(t) - 1] + 2
        n = len(x) + len(t) - p
        assert packed["input_ids"][row, end - n:end].tolist() == x[p:] + t
        np.testing.assert_allclose(ours[row, end - n:end], alone[i, length - n:], atol=1e-5)
    assert np.abs(alone).max() > 0.1


def test_shared_prefix_is_seen_by_every_segment(llama):
    rng = np.random.default_rng(6)
    prompts, targets = random_instances(rng, 5)
    prefix = rng.integers(3, 96, 4).tolist()
    prompts = [prefix + p for p in prompts]
    b = packed_target_arrays(prompts, targets, 2, BUCKETS, 0, prefix_length=4)
    ids, seg = jnp.asarray(b["input_ids"]), jnp.asarray(b["segment_ids"])
    before = np.asarray(llama(ids, segment_ids=seg, prefix_ids=jnp.asarray(prefix)))
    changed = list(prefix)
    changed[1] = 7 if prefix[1] != 7 else 8
    after = np.asarray(llama(ids, segment_ids=seg, prefix_ids=jnp.asarray(changed)))
    real = b["segment_ids"] > 0
    assert np.abs(after - before).max(axis=-1)[real].min() > 1e-4  # every real token moved
    with pytest.raises(DataError, match="same 5 tokens"):
        packed_target_arrays([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9, 6]], [[3], [4]], 1, BUCKETS,
                             0, prefix_length=5)
    with pytest.raises(DataError, match="go on"):  # a prompt that is all prefix
        packed_target_arrays([[1, 2, 3], [1, 2, 3, 4]], [[3], [4]], 1, BUCKETS, 0,
                             prefix_length=3)


def test_blockwise_attention_after_prefix_keys_equals_full_attention():
    rng = np.random.default_rng(8)
    q = jnp.asarray(rng.normal(size=(2, 19, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 5 + 19, 2, 8)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(np.repeat([[1, 2, 0], [1, 1, 2]], [7, 9, 3], axis=1))
    slots = jnp.arange(19)
    own = (slots[None, :] <= slots[:, None])[None] & (seg[:, :, None] == seg[:, None, :])
    mask = jnp.concatenate([jnp.ones((2, 19, 5), bool), own], axis=-1)
    full = masked_softmax_attention(q, k, v, mask, 0.3)
    for block in (1, 4, 19, 64):
        np.testing.assert_allclose(
            np.asarray(causal_blockwise_attention(q, k, v, mask, 0.3, block, key_offset=5)),
            np.asarray(full), atol=1e-6)


def test_no_attention_across_segments(llama):
    prompts, targets = random_instances(np.random.default_rng(2), 3)
    packed = packed_target_arrays(prompts, targets, 1, BUCKETS, 0)
    (row, a0, a1), (_, b0, b1), (_, c0, c1) = spans(packed)
    ids, seg = packed["input_ids"], jnp.asarray(packed["segment_ids"])
    changed = ids.copy()
    changed[row, b0:b1] = np.random.default_rng(3).integers(3, 96, b1 - b0)  # segment 2 only
    changed[row, c1:] = 7  # and the padding after the last segment
    before = np.asarray(llama(jnp.asarray(ids), segment_ids=seg))
    after = np.asarray(llama(jnp.asarray(changed), segment_ids=seg))
    np.testing.assert_array_equal(after[row, a0:a1], before[row, a0:a1])  # before it
    np.testing.assert_array_equal(after[row, c0:c1], before[row, c0:c1])  # after it
    assert np.abs(after[row, b0:b1] - before[row, b0:b1]).max() > 1e-3  # it did change


def test_blockwise_attention_equals_full_attention():
    rng = np.random.default_rng(7)
    q = jnp.asarray(rng.normal(size=(2, 23, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 23, 2, 8)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(np.repeat([[1, 2, 3, 0], [1, 1, 2, 2]], [6, 9, 5, 3], axis=1))
    slots = jnp.arange(23)
    mask = (slots[None, :] <= slots[:, None])[None] & (seg[:, :, None] == seg[:, None, :])
    full = masked_softmax_attention(q, k, v, mask, 0.3)
    real = np.asarray(seg) > 0  # rows with no key at all (padding) are don't-care
    for block in (1, 5, 8, 23, 64):
        np.testing.assert_allclose(np.asarray(causal_blockwise_attention(q, k, v, mask, 0.3,
                                                                         block))[real],
                                   np.asarray(full)[real], atol=1e-6)


def test_segment_ids_exclude_attention_mask_and_cache(llama):
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="segment_ids"):
        llama(ids, jnp.ones((1, 4), bool), segment_ids=jnp.ones((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids"):
        llama(ids, cache=llama.init_cache(1, 8), segment_ids=jnp.ones((1, 4), jnp.int32))


# --- the packed batch ---------------------------------------------------------------------------
def test_packed_batch_layout():
    prompts, targets = random_instances(np.random.default_rng(4), 8)
    b = packed_target_arrays(prompts, targets, 4, BUCKETS, 0, target_length=7, groups=2)
    rows, length = b["input_ids"].shape
    lengths = [len(p) + len(t) for p, t in zip(prompts, targets, strict=True)]
    assert rows == 4 and length in BUCKETS and b["target_ids"].shape == (8, 7)
    # the smallest bucket at which first-fit decreasing fits each micro-batch into its 2 rows
    smaller = [x for x in BUCKETS if x < length]
    if smaller:
        assert any(first_fit_decreasing(lengths[g * 4:(g + 1) * 4], 2, smaller[-1]) is None
                   for g in range(2))
    seen = set()
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        row = int(b["instance_row"][i])
        assert row // 2 == i // 4  # micro-batch g's instances sit in micro-batch g's rows
        m = b["target_mask"][i]
        idx = b["target_index"][i][m]
        assert b["target_ids"][i][m].tolist() == t  # labels: exactly response + EOS
        assert m.sum() == len(t)
        end = int(idx[-1]) + 2
        start = end - len(p) - len(t)
        assert b["input_ids"][row, start:end].tolist() == p + t  # contiguous, in order
        seg = b["segment_ids"][row, start:end]
        assert (seg == seg[0]).all() and seg[0] > 0  # one segment, all of it
        assert (row, int(seg[0])) not in seen
        seen.add((row, int(seg[0])))
        assert b["input_ids"][row, idx + 1].tolist() == t  # position t predicts token t + 1
    for row in range(rows):  # segments 1..m from the row's start, then padding (0) only
        seg = b["segment_ids"][row]
        used = int((seg > 0).sum())
        assert (seg[used:] == 0).all() and (b["input_ids"][row, used:] == 0).all()
        assert (np.diff(seg[:used]) >= 0).all() and (np.diff(seg[:used]) <= 1).all()
    assert len(seen) == 8 and int((b["segment_ids"] > 0).sum()) == sum(lengths)


def test_first_fit_decreasing():
    assert first_fit_decreasing([5, 7, 3, 4], 2, 10) == [1, 0, 0, 1]  # 7+3 | 5+4
    assert first_fit_decreasing([6, 6, 6], 2, 10) is None
    with pytest.raises(DataError, match="micro-batches"):
        packed_target_arrays([[3]] * 3, [[4]] * 3, 2, BUCKETS, 0, groups=2)


# --- the packed step ---------------------------------------------------------------------------
def batches_of(prompts, targets, rows, groups, rng, prefix: int = 0):
    """The same instances, left-padded and packed, with random instance weights; with
    ``prefix``, every prompt begins with the same ``prefix`` tokens, run once when packed."""
    if prefix:
        start = rng.integers(3, 96, prefix).tolist()
        prompts = [start + p for p in prompts]
    weights = rng.uniform(0.2, 2.0, len(prompts)).astype(np.float32)
    padded = target_arrays(prompts, targets, BUCKETS, 0, 7)
    packed = packed_target_arrays(prompts, targets, rows, BUCKETS, 0, 7, groups, prefix)
    return {**padded, "weights": weights}, {**packed, "weights": weights}


def sgd_grads(model, trainable, batch, micro_batches):
    """Loss and gradients of one ralt_step: SGD with rate 1 moves the params by -grad."""
    state = TrainState.create(model, optax.sgd(1.0), trainable)
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = jax.jit(ralt_step, static_argnames="micro_batches")(
        state, batch, micro_batches=micro_batches)
    after = jax.tree.map(np.asarray, state.params)
    return float(metrics["loss"]), jax.tree.map(np.subtract, before, after)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("prefix", [0, 9], ids=["whole", "shared-prefix"])
def test_packed_step_has_the_same_loss_and_gradients(llama, lora, micro_batches, prefix):
    rng = np.random.default_rng(5)
    model = nnx.clone(llama)
    if lora:  # random B as well, so that every adapter has a gradient
        model = apply_lora(model, rank=4, alpha=8.0, target_modules=("q_proj", "v_proj",
                                                                     "down_proj"))
        for path, var in nnx.iter_graph(model):
            if isinstance(var, nnx.LoRAParam) and path[-1] == "lora_b":
                var.set_value(jnp.asarray(rng.normal(0, 0.1, var.shape), jnp.float32))
    trainable = nnx.LoRAParam if lora else nnx.Param
    prompts, targets = random_instances(rng, 8)
    padded, packed = batches_of(prompts, targets, 4, micro_batches, rng, prefix)
    assert packed["input_ids"].size < padded["input_ids"].size
    assert len(packed["prefix_ids"]) == prefix
    loss_p, grads_p = sgd_grads(nnx.clone(model), trainable, packed, micro_batches)
    loss_u, grads_u = sgd_grads(nnx.clone(model), trainable, padded, micro_batches)
    np.testing.assert_allclose(loss_p, loss_u, rtol=1e-5, atol=1e-5)
    leaves_p, leaves_u = jax.tree.leaves(grads_p), jax.tree.leaves(grads_u)
    assert len(leaves_p) == len(leaves_u) > 0
    for a, b in zip(leaves_p, leaves_u, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert max(np.abs(g).max() for g in leaves_u) > 1e-3  # gradients are not all ~0


@pytest.mark.parametrize("prefix", [0, 5], ids=["whole", "shared-prefix"])
def test_packed_step_sharded_equals_single_device_and_compiles_once_per_shape(llama_path,
                                                                              prefix):
    rng = np.random.default_rng(6)
    lengths = dict(prompt=(20, 21), target=(4, 5))  # every step packs to one shape ...
    steps = [batches_of(*random_instances(rng, 16, **lengths), 8, 2, rng, prefix)[1]
             for _ in range(3)]
    steps.append(batches_of(*random_instances(rng, 16, prompt=(40, 41), target=(4, 5)),
                            8, 2, rng, prefix)[1])  # ... and one to a longer bucket
    assert len({b["input_ids"].shape for b in steps}) == 2
    results = {}
    for name, mesh in (("one", make_mesh(None, jax.devices()[:1])),
                       ("eight", make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))):
        traces = []

        def counted_step(state, batch, traces=traces, **hyper):
            traces.append(1)  # runs once per trace, i.e. per compilation
            return ralt_step(state, batch, **hyper)

        model = apply_lora(CausalLM.from_pretrained(llama_path, mesh=mesh), rank=4, alpha=8.0)
        state = place_state(TrainState.create(model, optax.adam(1e-2), nnx.LoRAParam), mesh)
        step = compile_step(counted_step, state, steps[0], mesh, micro_batches=2)
        losses = []
        for b in steps:
            state, metrics = step(state, shard_batch(b, mesh))
            losses.append(float(metrics["loss"]))
        assert len(traces) == 2  # one compilation per packed shape
        results[name] = (state, losses)
    (one, l1), (eight, l8) = results["one"], results["eight"]
    np.testing.assert_allclose(l1, l8, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
