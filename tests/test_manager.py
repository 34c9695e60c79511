"""The manager end to end on tiny parts: LSR then RALT, results and runs on disk."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from fedrag_jax.config import load_config
from fedrag_jax.errors import ConfigError
from fedrag_jax.finetune.manager import FinetuneManager
from fedrag_jax.finetune.trainer import read_metrics
from fedrag_jax.rag import RAGSystem
from fedrag_jax.sharding import make_mesh
from fedrag_jax.types import RAGConfig
from tests.helpers import tiny_rag_parts


def test_manager_both_modes_train_and_report(tmp_path):
    retriever, store, generator, records = tiny_rag_parts(tmp_path)
    for i, r in enumerate(records):  # make the gold passage known for recall
        r["gold_id"] = f"p{i}"
    overrides = [
        "mode=both", f"output_dir={tmp_path / 'run'}", "progress=false",
        "lsr.steps=3", "lsr.batch_size=2", "lsr.max_length=128", "lsr.learning_rate=1e-3",
        "ralt.steps=2", "ralt.batch_size=2", "ralt.lora_rank=4", "ralt.max_length=128",
        "retrieval.top_k=2", "checkpoint_every=2", "mesh.data=1"]
    config = load_config(None, overrides)
    rag = RAGSystem(retriever, store, generator,
                    RAGConfig(top_k=2, prompt_template="w4 {context} w5 {query} w6"),
                    max_new_tokens=4)
    shared_query = retriever.query_encoder
    store_before = np.stack([n.embedding for n in store.get(store.node_ids())])
    gen_before = jax.tree.map(np.asarray, nnx.state(generator.model, nnx.Param))
    manager = FinetuneManager(rag, records, records[:3], config,
                              mesh=make_mesh(None, jax.devices()[:1]))
    results = manager.train()
    assert set(results) == {"before", "after_lsr", "after_ralt"}
    assert 0.0 <= results["before"]["recall_at_k"] <= 1.0
    assert "exact_match" in results["after_ralt"] and "f1" in results["after_ralt"]
    # LSR moved an untied copy of the query tower; the store and context tower did not move
    assert rag.retriever.query_encoder is not shared_query
    q_new = jax.tree.leaves(nnx.state(rag.retriever.query_encoder, nnx.Param))
    q_old = jax.tree.leaves(nnx.state(rag.retriever.context_encoder, nnx.Param))
    assert any(not np.array_equal(a, b) for a, b in zip(q_new, q_old, strict=True))
    np.testing.assert_array_equal(
        store_before, np.stack([n.embedding for n in store.get(store.node_ids())]))
    # RALT merged LoRA adapters into the generator: same parameter names, new values
    gen_after = jax.tree.map(np.asarray, nnx.state(rag.generator.model, nnx.Param))
    assert jax.tree.structure(gen_before) == jax.tree.structure(gen_after)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(gen_before),
                                                        jax.tree.leaves(gen_after), strict=True))
    run = tmp_path / "run"
    assert (run / "results.json").is_file()
    for phase in ("lsr", "ralt"):
        assert (run / phase / "metrics.jsonl").is_file()
        assert (run / phase / "loss.png").is_file()
    # the same output_dir with another learning rate: its checkpoints are refused, by name
    changed = load_config(None, [*overrides, "lsr.learning_rate=5e-4"])
    other = FinetuneManager(rag, records, records[:3], changed,
                            mesh=make_mesh(None, jax.devices()[:1]))
    with pytest.raises(ConfigError, match=r"lsr\.learning_rate: 0\.001 -> 0\.0005"):
        other.train_retriever()


def test_manager_packed_ralt_trains_as_unpacked(tmp_path):
    """ralt.pack=true end to end: the trainer runs packed batches, and every step's loss is
    the left-padded run's (same instances, micro-batches and updates)."""
    losses = {}
    for pack in (True, False):  # fresh parts each: training installs the new generator
        retriever, store, generator, records = tiny_rag_parts(tmp_path / str(pack))
        config = load_config(None, [
            "mode=generator", f"output_dir={tmp_path / str(pack) / 'run'}", "progress=false",
            "ralt.steps=4", "ralt.batch_size=2", "ralt.lora_rank=4", "ralt.max_length=128",
            "ralt.micro_batches=2", "ralt.learning_rate=1e-2", f"ralt.pack={str(pack).lower()}",
            "ralt.weighting=retrieval", "retrieval.top_k=2", "mesh.data=1",
            "eval_generate=false"])
        rag = RAGSystem(retriever, store, generator,
                        RAGConfig(top_k=2, prompt_template="w4 {context} w5 {query} w6"),
                        max_new_tokens=4)
        manager = FinetuneManager(rag, records, records[:2], config,
                                  mesh=make_mesh(None, jax.devices()[:1]))
        batch = manager.ralt_train_data().batch_at(0, 0)
        assert ("segment_ids" in batch) is pack
        if pack:  # 2 queries x 2 passages: two rows, one per micro-batch
            assert batch["input_ids"].shape[0] == manager.pack_rows(4) == 2
        manager.train_generator()
        train = [r for r in read_metrics(tmp_path / str(pack) / "run" / "ralt" / "metrics.jsonl")
                 if r["split"] == "train"]
        assert [r["step"] for r in train] == [1, 2, 3, 4]
        losses[pack] = [r["loss"] for r in train]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5, atol=1e-5)
    assert losses[True][-1] < losses[True][0]


def test_manager_federated_is_one_setting(tmp_path):
    """federated=true: the same manager, LSR then RALT on 2 clients of the SPMD engine."""
    retriever, store, generator, records = tiny_rag_parts(tmp_path)
    for i, r in enumerate(records):
        r["gold_id"] = f"p{i}"
    config = load_config(None, [
        "mode=both", "federated=true", f"output_dir={tmp_path / 'run'}", "progress=false",
        "lsr.batch_size=2", "lsr.max_length=128", "lsr.learning_rate=1e-3",
        "ralt.batch_size=1", "ralt.lora_rank=4", "ralt.max_length=128", "retrieval.top_k=2",
        "fed.num_clients=2", "fed.rounds=1", "fed.local_steps=2", "fed.partition=iid",
        "fed.min_clients=2", "fed.engine=spmd"])
    rag = RAGSystem(retriever, store, generator,
                    RAGConfig(top_k=2, prompt_template="w4 {context} w5 {query} w6"),
                    max_new_tokens=4)
    q_before = jax.tree.map(np.asarray, nnx.state(retriever.query_encoder, nnx.Param))
    manager = FinetuneManager(rag, records, records[:3], config,
                              mesh=make_mesh(None, jax.devices()[:1]))
    results = manager.train()
    assert {"before", "after_federated", "federated_history"} <= set(results)
    for method in ("lsr", "ralt"):
        (round1,) = results["federated_history"][method]["rounds"]
        assert len(round1["clients"]) == 2
        assert all(np.isfinite(c["train_loss"]) for c in round1["clients"])
    q_after = jax.tree.map(np.asarray, nnx.state(rag.retriever.query_encoder, nnx.Param))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(q_before),
                                                        jax.tree.leaves(q_after), strict=True))
