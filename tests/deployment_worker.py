"""The in-process run that tests/test_deployment.py compares the deployed one with.

    python -m tests.deployment_worker RUN_CONFIG_JSON OUT_NPZ

runs the deployed app's own ServerApp loop (``serve`` on ``app.server_task``) against its
own ClientApp, each message handed straight to it with that node's partition-id, in one
process with the deployed processes' environment (one CPU device), and saves the final
params (and the rounds' client losses under ``__losses__``) to OUT_NPZ.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from flwr.supercore.task_identity import TaskIdentity

from fedrag_jax.federated import app, flatten_params
from fedrag_jax.federated.server import ServerRun, serve
from tests.helpers import LocalGrid


def main(run_config_json: str, out: str) -> None:
    run_config = json.loads(run_config_json)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # as a run sets
    task = app.server_task(run_config)
    grid = LocalGrid(app.client_app, task.config.num_clients, run_config)
    result = serve(grid, task, ServerRun())
    losses = json.dumps([r.losses() for r in result.history])
    np.savez(out, __losses__=np.array(losses), **flatten_params(result.params))


if __name__ == "__main__":
    main(*sys.argv[1:])
