"""The in-process run that tests/test_deployment.py compares the deployed one with.

    python -m tests.deployment_worker RUN_CONFIG_JSON OUT_NPZ [serve|app|manager]

runs the deployed app's own ServerApp loop (``serve`` on ``app.server_task``) against its
own ClientApp, each message handed straight to it with that node's partition-id, in one
process with the deployed processes' environment (one CPU device), and saves the final
params (and the rounds' history under ``__history__``) to OUT_NPZ. With ``app`` the whole
``app.server_app`` runs (every phase of a both-run; ``fed.secagg`` takes its SecAgg+ path),
with ``manager`` the simulation path (``train_federated``); both save each phase's last
server checkpoint.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedrag_jax.federated import app, flatten_params
from fedrag_jax.federated.history import open_run
from fedrag_jax.federated.server import ServerRun, serve
from tests.helpers import LocalGrid


def main(run_config_json: str, out: str, how: str = "serve") -> None:
    """how: serve (the app's round loop), app (the whole ServerApp: every phase of the run,
    SecAgg+ when configured) or manager (``FinetuneManager.train_federated``, the simulation
    path). app / manager save each phase's last checkpoint, keys ``<phase>::<path>``."""
    run_config = json.loads(run_config_json)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # as a run sets
    config = app.config_from_run_config(run_config)
    if how == "serve":
        task = app.server_task(run_config)
        grid = LocalGrid(app.client_app, task.config.num_clients, run_config)
        result = serve(grid, task, ServerRun())
        np.savez(out, __history__=np.array(json.dumps(_rounds(result.history))),
                 **flatten_params(result.params))
        return
    if how == "app":
        grid = LocalGrid(app.client_app, config.fed.num_clients, run_config)
        app.server_app(grid, Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                     run_config=run_config))
    else:
        from fedrag_jax.finetune.manager import FinetuneManager

        FinetuneManager.from_config(config).train_federated()
    arrays, rounds = {}, []
    for phase in app.phases_of(config, run_config):
        ckpt, _, params, _, history = open_run(app.server_task(run_config, phase),
                                               app.checkpoint_dir(config, phase), resume=True)
        ckpt.close()
        arrays.update({f"{phase}::{k}": v for k, v in flatten_params(params).items()})
        rounds += [{**r, "phase": phase} for r in _rounds(history)]
    np.savez(out, __history__=np.array(json.dumps(rounds)), **arrays)


def _rounds(history: list) -> list[dict]:
    return [{"round": r.round, "aggregated": r.aggregated, "note": r.note,
             "losses": {str(k): v for k, v in r.losses().items()},
             "num_examples": {str(c.client_id): c.num_examples for c in r.clients}}
            for r in history]


if __name__ == "__main__":
    main(*sys.argv[1:])
