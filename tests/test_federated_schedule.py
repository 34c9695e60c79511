"""Federated training does what its settings say, through the manager (the path users take):
clients continue the global learning-rate schedule on both engines (default AdamW with
warmup, one local step a round), micro_batches reach the clients, and a federated rerun under
other settings is refused like a centralized one."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from fedrag_jax.checkpoint import CheckpointManager
from fedrag_jax.config import load_config
from fedrag_jax.errors import ConfigError
from fedrag_jax.federated import flatten_params
from fedrag_jax.finetune.manager import FinetuneManager
from fedrag_jax.finetune.trainer import read_metrics
from fedrag_jax.rag import RAGSystem
from fedrag_jax.sharding import make_mesh
from fedrag_jax.types import RAGConfig
from tests.helpers import tiny_rag_parts

ROUNDS, LOCAL_STEPS = 3, 1


def manager_for(tmp_path, *overrides: str, parts=None) -> FinetuneManager:
    retriever, store, generator, records = parts or tiny_rag_parts(tmp_path)
    config = load_config(None, [
        "mode=both", "federated=true", f"output_dir={tmp_path / 'run'}", "progress=false",
        "lsr.batch_size=2", "lsr.max_length=128", "lsr.learning_rate=1e-3",
        "ralt.batch_size=1", "ralt.lora_rank=4", "ralt.max_length=128", "retrieval.top_k=2",
        "fed.num_clients=2", f"fed.rounds={ROUNDS}", f"fed.local_steps={LOCAL_STEPS}",
        "fed.partition=iid", "fed.min_clients=2", "eval_generate=false", *overrides])
    rag = RAGSystem(retriever, store, generator,
                    RAGConfig(top_k=2, prompt_template="w4 {context} w5 {query} w6"),
                    max_new_tokens=4)
    return FinetuneManager(rag, records, [], config, mesh=make_mesh(None, jax.devices()[:1]))


def trainable_params(model_and_filter) -> nnx.State:
    model, trainable, _ = model_and_filter
    return nnx.split(model, trainable, ...)[1]


@pytest.mark.parametrize("engine", ["spmd", "flower"])
def test_clients_continue_the_global_schedule_and_move_every_round(tmp_path, engine):
    """Defaults (AdamW, warmup_steps=4 for both methods), local_steps=1: round r's one local
    step is global step r, so it runs at the centralized schedule's rate of step r (over
    rounds x local_steps steps) and the global params move in every round."""
    manager = manager_for(tmp_path, f"fed.engine={engine}")
    assert manager.config.lsr.warmup_steps > 0 and manager.config.ralt.warmup_steps > 0
    initial = {"lsr": trainable_params(manager.lsr_model()),
               "ralt": trainable_params(manager.ralt_model())}
    optimizers = {"lsr": manager.lsr_model()[2], "ralt": manager.ralt_model()[2]}
    histories = manager.train_federated()
    for method in ("lsr", "ralt"):
        previous = flatten_params(initial[method])
        with CheckpointManager(tmp_path / "run" / f"federated_{method}" / "checkpoints",
                               keep=None) as ckpt:
            assert ckpt.all_steps() == list(range(1, ROUNDS + 1))
            for r in range(1, ROUNDS + 1):
                state, _ = ckpt.restore({"params": initial[method], "server": {}}, step=r)
                now = flatten_params(state["params"])
                moved = max(float(np.abs(now[k] - previous[k]).max()) for k in now)
                assert moved > 0, f"{method} round {r}: the global params did not move"
                previous = now
    from fedrag_jax.finetune.optimizer import learning_rate_at

    for method in ("lsr", "ralt"):
        # the centralized schedule of a run of rounds x local_steps steps
        central = dataclasses.replace(optimizers[method], total_steps=ROUNDS * LOCAL_STEPS)
        rounds = histories[method]["rounds"]
        assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
        logged = read_metrics(tmp_path / "run" / f"federated_{method}" / "metrics.jsonl")
        for record, line in zip(rounds, logged, strict=True):
            first = (record["round"] - 1) * LOCAL_STEPS
            expected = [learning_rate_at(central, first + j) for j in range(1, LOCAL_STEPS + 1)]
            assert min(expected) > 0
            assert len(record["clients"]) == 2
            for client in record["clients"]:
                assert client["learning_rates"] == pytest.approx(expected, rel=1e-6), method
            assert all(v == pytest.approx(expected, rel=1e-6)
                       for v in line["learning_rates"].values())


def test_federated_rerun_with_another_learning_rate_is_refused(tmp_path):
    parts = tiny_rag_parts(tmp_path)
    first = manager_for(tmp_path, "mode=retriever", "fed.engine=spmd", "fed.rounds=1",
                        parts=parts)
    first.train_federated()
    again = manager_for(tmp_path, "mode=retriever", "fed.engine=spmd", "fed.rounds=1",
                        parts=parts)
    again.train_federated()  # the same settings: resumed (nothing left to do), not refused
    other = manager_for(tmp_path, "mode=retriever", "fed.engine=spmd", "fed.rounds=1",
                        "lsr.learning_rate=5e-4", parts=parts)
    with pytest.raises(ConfigError, match=r"lsr\.learning_rate: 0\.001 -> 0\.0005") as err:
        other.train_federated()
    assert "federated_lsr" in str(err.value) and "output_dir" in str(err.value)
    from fedrag_jax.errors import ResumeMismatchError

    assert isinstance(err.value, ResumeMismatchError)


def test_micro_batches_reach_the_federated_clients(tmp_path):
    manager = manager_for(tmp_path, "lsr.micro_batches=2", "ralt.micro_batches=2",
                          "ralt.batch_size=2", "fed.engine=spmd")
    lsr = manager.get_federated_task("lsr")
    assert lsr.micro_batches == 2 and lsr.step().micro_batches == 2
    ralt = manager.get_federated_task("ralt")
    assert ralt.micro_batches == 2
    for data in ralt.client_data:  # packed: each micro-batch's instances in rows of its own
        assert data.pack_groups == 2 and data.pack_rows % 2 == 0
    result = ralt.run_spmd()
    assert all(np.isfinite(c.train_loss) for r in result.history for c in r.clients)
