"""Federated fine-tuning: Flower's Message API, or an SPMD simulator on one mesh.

    task = FederatedTask.lsr(towers, QUERY_TOWER, OptimizerConfig(...), client_data, config)
    task.run_flower()   # Flower simulation engine (Ray actors)
    task.run_spmd()     # clients on device slices of one program

Deployed: ``app`` (the ServerApp / ClientApp pyproject.toml names for ``flwr run``).
Privacy: Flower's client-side-clipping DP (``server.make_strategy``, ``client.dp_clipping_mod``)
and SecAgg+ on Flower's legacy workflow (``secagg``).

Clients retrieve from the shared knowledge store or, with ``fed.client_stores=partition``,
from their own shard of it (``shards``).

Only the trainable params travel (``payload``), validated on receipt; clients run the same
train steps as centralized training (``local``); the server rules are Flower's strategies,
mirrored in JAX for the SPMD engine (``aggregate``).
"""

from .aggregate import STRATEGIES, StrategyOptions, prox_objective
from .history import ClientResult, FederatedResult, RoundRecord
from .local import ClientStep, client_state, evaluate_loss, local_train
from .partition import partition, partition_from_config, split_dataset, subset
from .payload import decode, encode, flatten_params, from_arrayrecord, to_arrayrecord
from .task import FederatedTask

__all__ = [
    "STRATEGIES", "ClientResult", "ClientStep", "FederatedResult", "FederatedTask",
    "RoundRecord", "StrategyOptions", "client_state", "decode", "encode", "evaluate_loss",
    "flatten_params", "from_arrayrecord", "local_train", "partition", "partition_from_config",
    "prox_objective", "split_dataset", "subset", "to_arrayrecord",
]
