"""Secure aggregation (SecAgg+) through Flower's legacy workflow path.

    server = make_secagg_server_app(task, run)   # DefaultWorkflow(fit_workflow=SecAggPlus...)
    client = make_secagg_client_app(task)        # a NumPyClient behind secaggplus_mod

The deployed app (``app.py``) takes this path too when ``fed.secagg`` is set: its server
runs :func:`serve_secagg` and its ClientApp hands train messages to the legacy client.

In Flower 1.42 ``SecAggPlusWorkflow`` only runs inside a ``LegacyContext`` (the legacy
``DefaultWorkflow`` with a ``flwr.server.strategy`` strategy) and talks to clients through
``secaggplus_mod`` around a legacy ``fit``; the Message-API strategies of ``server.py`` have
no secure-aggregation counterpart. So the ``secagg: true`` path is this one: FedAvg only,
and the server never sees an individual update, only the masked sum, which means no
per-client screening or losses (a round's record says so). Each client sends
``[n_k, n_k * w_k]`` quantized: its params are clipped to ``[-clipping_range,
clipping_range]`` and mapped to integers in ``[0, quantization_range)``, masked, and summed
modulo 2**32; the result is FedAvg up to that quantisation (see :func:`tolerance`).

Legacy ``fit`` exchanges an ordered list of arrays; the order here is the template's path
order on both sides, and what arrives is validated against the template like any payload.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import Context
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from ..errors import ConfigError
from .client import client_id_of
from .history import RoundRecord, open_run
from .payload import flatten_params, param_paths, unflatten_params

log = logging.getLogger(__name__)


def check_secagg(config: Any) -> None:
    """SecAgg+ settings that Flower would reject, as a ConfigError that says which."""
    if config.strategy.lower() != "fedavg":
        raise ConfigError(f"secagg runs FedAvg only (Flower's SecAgg+ workflow sums the "
                          f"weighted updates), got strategy={config.strategy!r}")
    if getattr(config, "dp_clipping_norm", None) is not None:
        raise ConfigError("secagg and dp_clipping_norm do not compose in Flower 1.42 (the DP "
                          "wrappers are Message-API strategies); choose one")
    n, t = config.secagg_num_shares, config.secagg_reconstruction_threshold
    if n != 1 and not 2 < n:
        raise ConfigError(f"secagg_num_shares={n} must be > 2 (or 1: every sampled client)")
    if not 1 <= t or (n != 1 and t >= n):
        raise ConfigError(f"secagg_reconstruction_threshold={t} must be >= 1 and < "
                          f"secagg_num_shares={n}")
    if config.secagg_clipping_range <= 0 or config.secagg_quantization_range < 2:
        raise ConfigError("secagg_clipping_range must be > 0 and secagg_quantization_range "
                          ">= 2")


def tolerance(config: Any, num_examples: list[int]) -> float:
    """Largest error per coordinate of the SecAgg+ average against exact FedAvg (for params
    inside the clipping range): each client's stochastic rounding is off by less than one
    step 2 * clipping_range / quantization_range of its weighted params, and the sum of
    those errors is divided by the sum of the weights n_k / max_weight."""
    step = 2 * config.secagg_clipping_range / config.secagg_quantization_range
    ratios = sum(n / config.secagg_max_weight for n in num_examples)
    return len(num_examples) * step / ratios


class _Client(NumPyClient):
    def __init__(self, task: Any, client_id: int):
        self.task, self.client_id = task, client_id
        self.paths = param_paths(task.template.params)

    def fit(self, parameters, config):
        params = unflatten_params(dict(zip(self.paths, parameters, strict=True)),
                                  self.task.template.params)
        new, m = self.task.client_update(self.client_id, params, int(config["server-round"]))
        flat = flatten_params(new)
        return [flat[k] for k in self.paths], int(m["num_examples"]), {
            "train_loss": float(m["train_loss"])}


def make_secagg_client_app(task: Any) -> ClientApp:
    """A legacy ClientApp for ``task`` behind Flower's ``secaggplus_mod``."""
    from .client import _local

    def client_fn(context: Context):
        local = _local(task)
        return _Client(local, client_id_of(context, local.config.num_clients)).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


class _RecordingFedAvg(FedAvg):
    """FedAvg that hands every round's aggregate to ``on_round``."""

    def __init__(self, on_round, **kw: Any):
        super().__init__(**kw)
        self.on_round = on_round

    def aggregate_fit(self, server_round, results, failures):
        aggregated, metrics = super().aggregate_fit(server_round, results, failures)
        self.on_round(server_round, aggregated, failures)
        return aggregated, metrics


def make_secagg_server_app(task: Any, run: Any) -> ServerApp:
    """A ServerApp running ``task``'s rounds with SecAgg+; ``run`` (a ``ServerRun``)
    receives the params and history and names the checkpoint directory."""
    check_secagg(task.config)
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve_secagg(grid, context, task, run)

    return app


def serve_secagg(grid: Grid, context: Context, task: Any, run: Any) -> Any:
    """The SecAgg+ rounds of ``task`` (a FederatedTask or a deployed server's ServerTask:
    its ``config``, ``template``, ``strategy`` and ``round_timeout``), resuming after the
    last round checkpointed in ``run.checkpoint_dir``; ``run`` receives params and history."""
    c = task.config
    check_secagg(c)
    template = task.template.params
    paths = param_paths(template)
    ckpt, done, params, _, history = open_run(task, run.checkpoint_dir, run.resume)
    run.params, run.history = params, history
    started = [time.perf_counter()]

    def on_round(r: int, aggregated, failures) -> None:
        round_ = done + r  # Flower counts the rounds of this run from 1
        record = RoundRecord(round=round_, seconds=time.perf_counter() - started[0])
        record.note = "secure aggregation: individual updates and losses are hidden"
        record.failed = [{"client_id": "?", "reason": repr(f)} for f in failures]
        if aggregated is not None:
            flat = dict(zip(paths, parameters_to_ndarrays(aggregated), strict=True))
            run.params = unflatten_params(flat, template, cast=True)
            record.aggregated = True
        history.append(record)
        if ckpt is not None:
            ckpt.save(round_, run.params, None, history, task.strategy, "flower-secagg")
        started[0] = time.perf_counter()

    flat = flatten_params(params)
    strategy = _RecordingFedAvg(
        on_round, fraction_fit=c.fraction_train, fraction_evaluate=0.0,
        min_fit_clients=c.min_clients, min_evaluate_clients=0,
        min_available_clients=c.num_clients,
        on_fit_config_fn=lambda r: {"server-round": done + r},
        initial_parameters=ndarrays_to_parameters([flat[k] for k in paths]))
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=c.rounds - done),
                           strategy=strategy)
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=c.secagg_num_shares,
        reconstruction_threshold=c.secagg_reconstruction_threshold,
        clipping_range=c.secagg_clipping_range,
        quantization_range=c.secagg_quantization_range,
        max_weight=c.secagg_max_weight, timeout=task.round_timeout))
    try:
        if done < c.rounds:
            workflow(grid, legacy)
    finally:
        if ckpt is not None:
            ckpt.close()
    return run
