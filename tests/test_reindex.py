"""LSR refreshes its candidates on a schedule: with a training context tower the store is
re-encoded and re-indexed first (REPLUG-style) and the following batches come from it; with
a frozen context tower the store stays and only the candidates are re-retrieved."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fedrag_jax.config import load_config
from fedrag_jax.errors import ConfigError
from fedrag_jax.finetune import manager as manager_mod
from fedrag_jax.finetune.manager import FinetuneManager
from fedrag_jax.finetune.trainer import read_metrics
from fedrag_jax.knowledge_store import ExactKnowledgeStore
from fedrag_jax.rag import RAGSystem
from fedrag_jax.sharding import make_mesh
from fedrag_jax.types import RAGConfig
from tests.helpers import tiny_rag_parts

REAL_BUILD = manager_mod.build_lsr_dataset  # before any spy wraps it


def embeddings(store) -> np.ndarray:
    return np.stack([n.embedding for n in store.get(store.node_ids())])


def setup(tmp_path, monkeypatch, *overrides):
    retriever, store, generator, records = tiny_rag_parts(tmp_path)
    for i, r in enumerate(records):
        r["gold_id"] = f"p{i}"
    config = load_config(None, [
        "mode=retriever", f"output_dir={tmp_path / 'run'}", "progress=false",
        "lsr.batch_size=2", "lsr.max_length=128", "lsr.learning_rate=1e-2",
        "lsr.warmup_steps=0", "retrieval.top_k=2", "retrieval.backend=exact", "mesh.data=1",
        *overrides])
    rag = RAGSystem(retriever, store, generator,
                    RAGConfig(top_k=2, prompt_template="w4 {context} w5 {query} w6"),
                    max_new_tokens=4)
    texts = [n.text for n in store.get(store.node_ids())]
    builds = []  # per LSR dataset build: the store it retrieved from, and what it saw
    real = REAL_BUILD

    def spy(records, retriever, store, generator, **kw):
        data = real(records, retriever, store, generator, **kw)
        entry = {"store": store, "store_emb": embeddings(store),
                 "tower_emb": retriever.encode_context(texts, progress=False),
                 "cached_scores": len(kw.get("lm_scores") or {})}
        if kw.get("lm_scores"):  # the reused LM scores equal a fresh scoring
            fresh = real(records, retriever, store, generator, **{**kw, "lm_scores": None})
            entry["fresh_logprobs"] = fresh.arrays["lm_logprobs"]
            entry["logprobs"] = data.arrays["lm_logprobs"]
        builds.append(entry)
        return data

    monkeypatch.setattr(manager_mod, "build_lsr_dataset", spy)
    manager = FinetuneManager(rag, records, records[:3], config,
                              mesh=make_mesh(None, jax.devices()[:1]))
    return manager, rag, store, texts, builds


def test_train_context_reindexes_every_n_steps_and_retrieves_from_the_new_store(
        tmp_path, monkeypatch):
    manager, rag, store, texts, builds = setup(
        tmp_path, monkeypatch, "lsr.steps=5", "lsr.train_context=true", "lsr.refresh_every=2")
    initial = embeddings(store)
    manager.train_retriever()

    records = read_metrics(tmp_path / "run" / "lsr" / "metrics.jsonl")
    refreshes = [r for r in records if r["split"] == "reindex"]
    assert [r["step"] for r in refreshes] == [2, 4, 5]  # every 2 steps, and after the last
    assert all(r["seconds"] > 0 for r in refreshes)
    events = next((tmp_path / "run" / "lsr" / "tensorboard").glob("events.out.tfevents.*"))
    assert b"reindex/seconds" in events.read_bytes()

    # the initial dataset, then one per refresh that still has steps after it (2 and 4)
    assert len(builds) == 3
    assert builds[0]["store"] is store
    for b in builds[1:]:
        assert b["store"] is not store and isinstance(b["store"], ExactKnowledgeStore)
        # retrieved from a store encoded by the very towers that re-retrieved
        np.testing.assert_allclose(b["store_emb"], b["tower_emb"], atol=1e-5)
        assert np.abs(b["store_emb"] - initial).max() > 1e-3
        # only new (query, passage) pairs were LM-scored; reused scores match fresh ones
        assert b["cached_scores"] > 0
        np.testing.assert_allclose(b["logprobs"], b["fresh_logprobs"], atol=1e-4)
    assert np.abs(builds[1]["store_emb"] - builds[2]["store_emb"]).max() > 1e-4

    # the installed store holds the final context tower's encodings of the same passages
    assert rag.store is not store and rag.store.node_ids() == store.node_ids()
    assert [n.text for n in rag.store.get(rag.store.node_ids())] == texts
    final = embeddings(rag.store)
    np.testing.assert_allclose(final, rag.retriever.encode_context(texts, progress=False),
                               atol=1e-5)
    assert np.abs(final - initial).max() > 1e-3


def test_frozen_context_tower_never_reindexes(tmp_path, monkeypatch):
    manager, rag, store, _, builds = setup(
        tmp_path, monkeypatch, "lsr.steps=3", "lsr.train_context=false")
    initial = embeddings(store)
    manager.train_retriever()
    records = read_metrics(tmp_path / "run" / "lsr" / "metrics.jsonl")
    assert not [r for r in records if r["split"] in ("reindex", "refresh")]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
    assert len(builds) == 1 and rag.store is store
    np.testing.assert_array_equal(embeddings(rag.store), initial)
    # LSR's evaluation: recall only; generation is off there by default (eval_generate=null)
    (last,) = [r for r in records if r["split"] == "eval"]
    assert "recall_at_k" in last and "exact_match" not in last


def test_frozen_context_tower_refreshes_candidates_with_the_current_query_tower(
        tmp_path, monkeypatch):
    """refresh_every without train_context: the store stays, the candidates are re-retrieved
    with the training query tower (not the initial one) after steps 1 and 2, not after 3."""
    manager, rag, store, _, builds = setup(
        tmp_path, monkeypatch, "lsr.steps=3", "lsr.train_context=false", "lsr.refresh_every=1")
    initial = embeddings(store)
    query_tower0 = rag.retriever.query_encoder
    queries = [r["query"] for r in manager.train_records]
    q0 = rag.retriever.encode_query(queries, progress=False)
    real_of = manager._retriever_of
    seen = []

    def spy_retriever_of(towers):
        retriever = real_of(towers)
        seen.append(retriever.encode_query(queries, progress=False))
        return retriever

    manager._retriever_of = spy_retriever_of
    manager.train_retriever()
    records = read_metrics(tmp_path / "run" / "lsr" / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "refresh"] == [1, 2]
    assert not [r for r in records if r["split"] == "reindex"]
    assert len(builds) == 3 and all(b["store"] is store for b in builds)
    assert rag.store is store
    np.testing.assert_array_equal(embeddings(rag.store), initial)
    # candidates came from the moving query tower, and only new pairs were LM-scored
    assert len(seen) >= 2 and all(np.abs(q - q0).max() > 1e-4 for q in seen[:2])
    for b in builds[1:]:
        assert b["cached_scores"] > 0
        np.testing.assert_allclose(b["logprobs"], b["fresh_logprobs"], rtol=1e-4, atol=1e-4)
    assert rag.retriever.query_encoder is not query_tower0


def test_negative_refresh_every_is_refused(tmp_path):
    retriever, store, generator, records = tiny_rag_parts(tmp_path, num_passages=4)
    config = load_config(None, ["lsr.refresh_every=-1", "mesh.data=1"])
    with pytest.raises(ConfigError, match="refresh_every"):
        FinetuneManager(RAGSystem(retriever, store, generator), records, [], config,
                        mesh=make_mesh(None, jax.devices()[:1]))


class Interrupt(Exception):
    pass


def test_resume_rebuilds_the_refreshed_store_and_ends_exact(tmp_path, monkeypatch):
    """Interrupted after the step-2 checkpoint (a refresh step), the resumed run re-indexes from
    the restored towers and ends with the same store and towers as an unbroken run."""
    from flax import nnx

    from fedrag_jax.finetune.reindex import IndexRefresher

    settings = ("lsr.steps=4", "lsr.train_context=true", "lsr.refresh_every=2",
                "checkpoint_every=2")
    full, full_rag, *_ = setup(tmp_path / "full", monkeypatch, *settings)
    full.train_retriever()

    real_call = IndexRefresher.__call__

    def interrupt_at_3(self, step, state, metrics):
        if step == 3:
            raise Interrupt
        return real_call(self, step, state, metrics)

    monkeypatch.setattr(IndexRefresher, "__call__", interrupt_at_3)
    broken, _, *_ = setup(tmp_path / "split", monkeypatch, *settings)
    with pytest.raises(Interrupt):
        broken.train_retriever()
    monkeypatch.setattr(IndexRefresher, "__call__", real_call)
    resumed, rag, store, _, builds = setup(tmp_path / "split", monkeypatch, *settings)
    resumed.train_retriever()
    # the initial dataset, and the one the resume rebuilt from the step-2 towers
    assert len(builds) == 2 and builds[1]["store"] is not store
    records = read_metrics(tmp_path / "split" / "run" / "lsr" / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "reindex"] == [2, 4]
    np.testing.assert_array_equal(embeddings(rag.store), embeddings(full_rag.store))
    for a, b in zip(jax.tree.leaves(nnx.state(rag.retriever.query_encoder, nnx.Param)),
                    jax.tree.leaves(nnx.state(full_rag.retriever.query_encoder, nnx.Param)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
