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
from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedrag_jax.federated import app, flatten_params
from fedrag_jax.federated.server import ServerRun, serve


class InProcessGrid:
    """A Grid whose nodes are ``client_app`` called in this process; a raised exception
    becomes an error reply, as in a deployment."""

    def __init__(self, client_app, run_config: dict, num_clients: int):
        self.app, self.run_config = client_app, run_config
        self.nodes = {100 + c: c for c in range(num_clients)}

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            context = Context(run_id=0, node_id=node, state=RecordDict(),
                              run_config=self.run_config,
                              node_config={"partition-id": self.nodes[node]})
            try:
                replies.append(self.app(msg, context))
            except Exception as e:  # noqa: BLE001 (reported like a deployed client's error)
                replies.append(Message(Error(code=0, reason=repr(e)), reply_to=msg))
        return replies


def main(run_config_json: str, out: str) -> None:
    run_config = json.loads(run_config_json)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # as a run sets
    task = app.server_task(run_config)
    grid = InProcessGrid(app.client_app, run_config, task.config.num_clients)
    result = serve(grid, task, ServerRun())
    losses = json.dumps([r.losses() for r in result.history])
    np.savez(out, __losses__=np.array(losses), **flatten_params(result.params))


if __name__ == "__main__":
    main(*sys.argv[1:])
