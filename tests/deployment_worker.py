"""The in-process run that tests/test_deployment.py compares the deployed one with.

    python -m tests.deployment_worker RUN_CONFIG_JSON OUT_NPZ [serve|app]

runs the deployed app's own ServerApp loop (``serve`` on ``app.server_task``) against its
own ClientApp, each message handed straight to it with that node's partition-id, in one
process with the deployed processes' environment (one CPU device), and saves the final
params (and the rounds' history under ``__history__``) to OUT_NPZ. With ``app`` the whole
``app.server_app`` runs (so ``fed.secagg`` takes its SecAgg+ path) and the params are those
of the server's last checkpoint.
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
    run_config = json.loads(run_config_json)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # as a run sets
    task = app.server_task(run_config)
    grid = LocalGrid(app.client_app, task.config.num_clients, run_config)
    if how == "serve":
        result = serve(grid, task, ServerRun())
        params, history = result.params, result.history
    else:
        app.server_app(grid, Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                     run_config=run_config))
        config = app.config_from_run_config(run_config)
        ckpt, _, params, _, history = open_run(
            task, app.checkpoint_dir(config, app.method_of(config, run_config)), resume=True)
        ckpt.close()
    rounds = [{"round": r.round, "aggregated": r.aggregated, "note": r.note,
               "losses": {str(k): v for k, v in r.losses().items()},
               "num_examples": {str(c.client_id): c.num_examples for c in r.clients}}
              for r in history]
    np.savez(out, __history__=np.array(json.dumps(rounds)), **flatten_params(params))


if __name__ == "__main__":
    main(*sys.argv[1:])
