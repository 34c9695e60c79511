"""Federated LSR on the bundled models and a small slice of the bundled data, on Flower's
simulation engine (Ray actors): 3 clients, 2 rounds. The aggregate moves off the initial
params, equals the example-weighted mean of what the clients sent, and the losses in the
history are the ones the clients really computed."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fedrag_jax.config import load_config
from fedrag_jax.federated import flatten_params
from fedrag_jax.finetune.manager import (
    FinetuneManager,
    build_rag_system,
    load_train_eval_records,
)
from fedrag_jax.sharding import make_mesh

pytestmark = pytest.mark.slow


def test_flower_lsr_on_the_bundled_models(tmp_path):
    config = load_config(None, [
        "mode=retriever", "federated=true", f"output_dir={tmp_path / 'run'}",
        "progress=false", "data.corpus_limit=300", "data.num_train=24", "data.num_eval=4",
        "retrieval.top_k=2", "retrieval.backend=exact", "retrieval.max_context_tokens=32",
        "lsr.batch_size=4", "lsr.max_length=128", "lsr.learning_rate=1e-4",
        "lsr.warmup_steps=0", "fed.num_clients=3", "fed.rounds=2", "fed.local_steps=2",
        "fed.partition=iid", "fed.min_clients=3", "fed.engine=flower", "seed=3"])
    mesh = make_mesh(None, jax.devices()[:1])  # what a Ray actor has: one device
    rag, corpus = build_rag_system(config, mesh)
    train, dev = load_train_eval_records(config, corpus)
    manager = FinetuneManager(rag, train, dev, config, mesh=mesh)
    task = manager.get_federated_task("lsr")
    assert [d.n for d in task.client_data] == [8, 8, 8]
    result = task.run_flower(record_client_params=True,
                             actor_env={"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla")},
                             checkpoint_dir=str(tmp_path / "ckpt"))

    initial = flatten_params(task.initial_params())
    assert len(initial) > 50 and sum(v.size for v in initial.values()) > 20_000_000  # MiniLM
    final = flatten_params(result.params)
    assert any(not np.allclose(final[k], initial[k], atol=1e-7) for k in final)
    global_params = task.initial_params()
    for record in result.history:
        assert record.aggregated and not record.rejected and not record.failed
        sent = record.client_params
        assert sorted(sent) == [0, 1, 2]
        by_client = {c.client_id: c for c in record.clients}
        for cid in range(3):
            # the client's real work, recomputed here: the same params and loss it reported
            params, metrics = task.client_update(cid, global_params, record.round)
            mine = flatten_params(params)
            for k in mine:
                np.testing.assert_allclose(mine[k], sent[cid][k], atol=2e-5, err_msg=k)
            assert by_client[cid].train_loss == pytest.approx(float(metrics["train_loss"]),
                                                              rel=1e-4)
            assert by_client[cid].num_examples == int(metrics["num_examples"]) > 0
        # the aggregate is the example-weighted mean of what the clients sent: the next
        # round's clients start from it (checked by recomputing them), the last one is final
        sizes = np.array([by_client[c].num_examples for c in range(3)], np.float64)
        expected = {k: sum(w * sent[c][k].astype(np.float64)
                           for c, w in enumerate(sizes / sizes.sum())) for k in initial}
        global_params = jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(global_params),
            [expected[k].astype(initial[k].dtype) for k in initial])
    for k in final:
        np.testing.assert_allclose(final[k], expected[k], atol=1e-6, err_msg=k)
