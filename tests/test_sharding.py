"""Mesh construction, the rules table, and sharded forwards on 8 simulated CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fedrag_jax.errors import MeshError
from fedrag_jax.models.bert import Encoder
from fedrag_jax.models.llama import CausalLM
from fedrag_jax.sharding import MeshConfig, logical_to_spec, make_mesh, shard_batch
from tests.helpers import random_batch, tiny_hf_bert, tiny_hf_causal_lm


def test_eight_devices_are_simulated():
    assert jax.device_count() == 8


def test_mesh_sizes_and_minus_one():
    mesh = make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh({"data": 1, "fsdp": -1}).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(make_mesh(None, jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("cfg", [dict(data=3), dict(data=2, fsdp=2, tensor=3),
                                 dict(data=-1, fsdp=-1), dict(data=4, fsdp=1, tensor=1),
                                 dict(pipeline=2)])
def test_bad_mesh_is_named(cfg):
    with pytest.raises(MeshError):
        make_mesh(cfg)


def test_rules_map_logical_axes():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert logical_to_spec(("embed", "mlp"), shape=(32, 64), mesh=mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("vocab", "embed"), shape=(96, 32), mesh=mesh) == P("tensor", "fsdp")
    assert logical_to_spec(("norm",), shape=(32,), mesh=mesh) == P()
    # a dimension the axis does not divide is replicated rather than failing
    assert logical_to_spec(("embed", "kv_heads"), shape=(32, 3), mesh=mesh) == P("fsdp")
    assert logical_to_spec(("batch", None)) == P(("data", "fsdp"))


def test_sharded_causal_lm_equals_single_device(tmp_path):
    src, ref = tiny_hf_causal_lm(tmp_path, "llama", num_key_value_heads=2)
    single = CausalLM.from_pretrained(src, mesh=make_mesh(None, jax.devices()[:1]))
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = CausalLM.from_pretrained(src, mesh=mesh)
    q = sharded.layers[0].attn.q_proj.kernel[...]
    assert q.sharding.spec == P("fsdp", "tensor")
    assert len({s.device for s in q.addressable_shards}) == 8
    assert q.addressable_shards[0].data.shape == (16, 32 // 2)  # really split, not replicated
    assert sharded.embed_tokens.embedding[...].sharding.spec == P("tensor", "fsdp")
    assert sharded.layers[1].mlp.down_proj.kernel[...].sharding.spec == P("tensor", "fsdp")
    assert sharded.layers[1].input_norm.weight[...].sharding.spec == P()

    ids, mask = random_batch(np.random.default_rng(0), 4, 16, ref.config.vocab_size)
    batch = shard_batch({"ids": ids, "mask": mask}, mesh)
    assert batch["ids"].sharding.spec == P(("data", "fsdp"))

    @jax.jit
    def forward(model, ids, mask):
        return model(ids, mask)

    a = np.asarray(forward(single, jnp.asarray(ids), jnp.asarray(mask)))
    b = np.asarray(forward(sharded, batch["ids"], batch["mask"]))
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_sharded_encoder_equals_single_device(tmp_path):
    src, _ = tiny_hf_bert(tmp_path)
    single = Encoder.from_pretrained(src)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = Encoder.from_pretrained(src, mesh=mesh)
    assert sharded.layers[0].intermediate.kernel[...].sharding.spec == P("fsdp", "tensor")
    ids, mask = random_batch(np.random.default_rng(1), 4, 8, 80, left_pad=False)
    batch = shard_batch({"ids": ids, "mask": mask}, mesh)
    a = np.asarray(jax.jit(lambda m, i, k: m(i, k))(single, jnp.asarray(ids), jnp.asarray(mask)))
    b = np.asarray(jax.jit(lambda m, i, k: m(i, k))(sharded, batch["ids"], batch["mask"]))
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_dual_encoder_pads_a_few_texts_to_a_small_batch(tmp_path):
    """A handful of queries is padded to the next power of two (a multiple of the mesh's
    data-parallel devices), not to ``batch_size``, and encodes as in a full batch."""
    from flax import nnx

    from fedrag_jax.models.bert import BertConfig
    from fedrag_jax.retriever import DualEncoder
    from tests.helpers import tiny_tokenizer

    bert = BertConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4,
                      intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    encoder = Encoder(bert, rngs=nnx.Rngs(0))
    single = DualEncoder(encoder, tiny_tokenizer(), max_length=64, batch_size=16)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = DualEncoder(nnx.clone(encoder), tiny_tokenizer(), max_length=64, batch_size=16,
                          mesh=mesh)
    assert [single._batch_rows(n) for n in (1, 3, 5, 16, 40)] == [1, 4, 8, 16, 16]
    assert [sharded._batch_rows(n) for n in (1, 3, 5, 16)] == [4, 4, 8, 16]
    rng = np.random.default_rng(2)
    texts = [" ".join(f"w{i}" for i in rng.integers(4, 96, size=int(rng.integers(3, 12))))
             for _ in range(21)]
    full = single.encode_query(texts)  # batches of 16 and 5 (padded to 8)
    alone = np.concatenate([single.encode_query([t]) for t in texts[:3]])
    np.testing.assert_allclose(full[:3], alone, atol=1e-5)
    np.testing.assert_allclose(sharded.encode_query(texts[:3]), alone, atol=1e-5)
    assert np.abs(full).max() > 0.05 and np.ptp(full[:, 0]) > 1e-3
