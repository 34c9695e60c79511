"""Differential privacy on the deployed app's path: a ``method=both`` run with client-side
clipping trains LoRA in its RALT phase, whose train messages carry a second ArrayRecord (the
federated query tower); every update that leaves a client is within the clipping norm, and
the server averages the clipped updates uniformly (the weighting the noise is calibrated
for)."""

from __future__ import annotations

import shlex

import numpy as np
import pytest

from fedrag_jax.federated import app, flatten_params, to_arrayrecord
from fedrag_jax.federated.server import ServerRun, serve
from tests.helpers import LocalGrid, tiny_rag_files

CLIP = 1e-3
# the clipped update is added to float32 params near 1, whose spacing is ~1e-7: a norm of
# 1e-3 over ~10^4 elements comes back within ~1 %
RTOL = 3e-2


def _norm(flat: dict, base: dict) -> float:
    return float(np.sqrt(sum(np.sum((flat[k].astype(np.float64) - base[k]) ** 2)
                             for k in flat)))


def test_dp_both_trains_lora_in_its_ralt_phase(tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    files = tiny_rag_files(tmp_path, num_records=9)  # iid: clients of 5 and 4 records
    overrides = [
        "mode=both", "federated=true", f"output_dir={tmp_path / 'out'}", "progress=false",
        f"model.retriever={files['retriever']}", f"model.generator={files['generator']}",
        f"data.corpus={files['corpus']}", f"data.train={files['train']}", "data.eval=null",
        "retrieval.backend=exact", "retrieval.top_k=2",
        "retrieval.prompt_template=w4 {context} w5 {query} w6",
        "lsr.batch_size=2", "lsr.max_length=64", "lsr.learning_rate=1e-3",
        "lsr.score_batch_size=4", "ralt.batch_size=2", "ralt.lora_rank=4",
        "ralt.max_length=128", "ralt.learning_rate=1e-2", "fed.num_clients=2",
        "fed.rounds=2", "fed.local_steps=2", "fed.partition=iid", "fed.min_clients=2",
        "fed.engine=flower", "mesh.data=-1", f"fed.dp_clipping_norm={CLIP}"]
    run_config = {"config-path": "", "method": "", "overrides": shlex.join(overrides)}
    config = app.config_from_run_config(run_config)
    monkeypatch.setattr(app, "_TASKS", {})
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    grid = LocalGrid(app.client_app, 2, run_config)
    phases = {}
    tuned = None
    try:  # the deployed ServerApp's loop (app._server_main), recording what clients sent
        for phase in app.phases_of(config, run_config):
            task = app.server_task(run_config, phase)
            run = ServerRun(record_client_params=True, message_config={app.PHASE: phase},
                            message_arrays={app.RETRIEVER: tuned} if tuned is not None else {})
            serve(grid, task, run)
            phases[phase] = (task, run)
            if phase == "lsr":
                tuned = to_arrayrecord(run.params)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    assert list(phases) == ["lsr", "ralt"]
    from fedrag_jax.finetune.optimizer import OptimizerConfig, learning_rate_at

    for phase, (task, run) in phases.items():
        # deployed clients continue the global schedule too (2 rounds x 2 local steps)
        section = getattr(config, phase)
        central = OptimizerConfig(learning_rate=section.learning_rate,
                                  warmup_steps=section.warmup_steps, total_steps=4)
        for record in run.history:
            expected = [learning_rate_at(central, (record.round - 1) * 2 + j) for j in (1, 2)]
            for client in record.clients:
                assert client.learning_rates == pytest.approx(expected, rel=1e-6), phase
        start = {k: v.astype(np.float64) for k, v in flatten_params(task.initial_params()).items()}
        previous = start
        for record in run.history:
            assert record.aggregated and not record.failed and not record.rejected, \
                (phase, record.round, record.failed, record.rejected, record.note)
            sent = record.client_params
            assert sorted(sent) == [0, 1]
            norms = [_norm(sent[c], previous) for c in (0, 1)]
            assert max(norms) <= CLIP * (1 + RTOL), (phase, norms)
            assert min(norms) >= CLIP * (1 - RTOL), (phase, norms)  # it bites
            sizes = {c.client_id: c.num_examples for c in record.clients}
            assert sizes[0] != sizes[1]
            # noise 0: the global params are the *uniform* mean of the clipped updates
            previous = {k: (sent[0][k].astype(np.float64) + sent[1][k]) / 2 for k in previous}
        final = flatten_params(run.params)
        for k in final:
            np.testing.assert_allclose(final[k], previous[k], atol=1e-6, err_msg=k)
        moved = max(float(np.abs(final[k] - start[k]).max()) for k in final)
        assert moved > 0, phase
        if phase == "ralt":
            assert all("lora" in k for k in final)  # LoRA adapters, and they moved
