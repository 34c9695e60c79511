"""The Flower ServerApp (Message API): rounds of train -> screen -> aggregate -> evaluate.

    app = make_server_app(task, run)     # flwr.serverapp.ServerApp

The aggregation rule is a Flower strategy from ``flwr.serverapp.strategy`` chosen by name
(fedavg, fedprox, fedadam, fedyogi, fedmedian, fedtrimmedavg). The round loop is ours rather
than ``Strategy.start`` so that, between receiving the replies and aggregating them, every
reply is screened: a client that raised is *failed*, a reply whose payload does not match the
model (keys, shapes, dtypes) or holds NaN/inf is *rejected* with its reason; both are logged,
recorded in the round's history and left out. If fewer than ``min_clients`` valid updates
remain, the round keeps the global params. FedAvg and FedProx screen each reply as it
arrives and fold it into a running mean at once (running_mean.py), so little is left to do
when the last client answers; the other rules get all screened replies at the end. The
server polls for replies more often than Flower's grids do (:func:`send_and_receive`).
After every round the server checkpoints (global params, FedAdam/FedYogi moments, history),
and a run resumes after the last completed round with the real round numbers (which
FedAdam's bias correction and the clients' data positions depend on).

Partial participation (``fraction_train < 1``): the server draws the round's clients itself
(``aggregate.sample_clients``, seeded by the run's seed and the round, as the SPMD engine
does) and offers its strategy only their nodes, so both engines train the same clients.

Differential privacy (``dp_clipping_norm``): Flower's
``DifferentialPrivacyClientSideFixedClipping`` around FedAvg / FedProx. Its noise, of std
``z * C / m`` for m sampled clients, is calibrated for the *uniform* mean of m updates each
clipped to norm C (one client moves it by at most C / m). FedAvg weights by example count,
so one large client could move the mean by up to C (the noise would then hide nothing): with
DP the server averages the clipped updates with equal weights (``UNIFORM_WEIGHT``), and the
history still records each client's example count. Flower 1.42's wrappers leave the weighting
to the wrapped strategy (its privacy accountant even insists on equal weights).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies

from ..errors import ConfigError, PayloadError
from .aggregate import (
    StrategyOptions,
    check_dp_strategy,
    check_strategy,
    clients_per_round,
    sample_clients,
)
from .client import ARRAYS, CONFIG, IDENTIFY, METRICS
from .history import ClientResult, RoundRecord, open_run
from .malloc import reuse_large_buffers
from .payload import (
    RowUpdate,
    flatten_params,
    payload_spec,
    read_arrayrecord,
    to_arrayrecord,
    tree_from_flat,
    unflatten_params,
    wire_flat,
)
from .running_mean import RunningMean

log = logging.getLogger(__name__)
# the metric a DP run's strategy weights replies by: 1 for every client (set by the server)
UNIFORM_WEIGHT = "uniform-weight"


def make_strategy(name: str, options: StrategyOptions, *, min_clients: int,
                  fraction_train: float = 1.0, evaluate: bool = True,
                  dp_clipping_norm: float | None = None, dp_noise_multiplier: float = 0.0,
                  clients_per_round: int | None = None):
    """A ``flwr.serverapp.strategy`` strategy by name; with ``dp_clipping_norm``, wrapped in
    Flower's ``DifferentialPrivacyClientSideFixedClipping`` (clients clip, see
    ``client.dp_clipping_mod``; the server adds Gaussian noise of std
    ``dp_noise_multiplier * dp_clipping_norm / clients_per_round`` to the average), around
    FedAvg / FedProx weighting every reply equally (see the module docstring)."""
    check_dp_strategy(name, dp_clipping_norm)
    strategy = _base_strategy(name, options, min_clients=min_clients,
                              fraction_train=fraction_train, evaluate=evaluate,
                              uniform=dp_clipping_norm is not None)
    if dp_clipping_norm is None:
        return strategy
    if dp_clipping_norm <= 0 or dp_noise_multiplier < 0:
        raise ConfigError(f"dp_clipping_norm={dp_clipping_norm} must be > 0 and "
                          f"dp_noise_multiplier={dp_noise_multiplier} >= 0")
    return flwr_strategy.DifferentialPrivacyClientSideFixedClipping(
        strategy, noise_multiplier=dp_noise_multiplier, clipping_norm=dp_clipping_norm,
        num_sampled_clients=clients_per_round or min_clients)


def _base_strategy(name: str, options: StrategyOptions, *, min_clients: int,
                   fraction_train: float, evaluate: bool, uniform: bool = False):
    key = check_strategy(name)
    common = dict(fraction_train=fraction_train, fraction_evaluate=1.0 if evaluate else 0.0,
                  min_train_nodes=min_clients, min_evaluate_nodes=min_clients if evaluate else 0,
                  min_available_nodes=min_clients)
    if uniform:  # (FedAvg / FedProx only: check_dp_strategy)
        common["weighted_by_key"] = UNIFORM_WEIGHT
    if key == "fedavg":
        return flwr_strategy.FedAvg(**common)
    if key == "fedprox":
        return flwr_strategy.FedProx(**common, proximal_mu=options.proximal_mu)
    if key in ("fedadam", "fedyogi"):
        cls = flwr_strategy.FedAdam if key == "fedadam" else flwr_strategy.FedYogi
        return cls(**common, eta=options.server_learning_rate, beta_1=options.server_beta1,
                   beta_2=options.server_beta2, tau=options.server_tau)
    if key == "fedmedian":
        return flwr_strategy.FedMedian(**common)
    return flwr_strategy.FedTrimmedAvg(**common, beta=options.trim_beta)


@dataclass
class ServerTask:
    """What the server uses of a :class:`FederatedTask`: the trainable params' template and
    the settings, without client data (a deployed server has none)."""

    template: Any  # a TrainState: only its params are used
    config: Any  # FederatedConfig
    options: StrategyOptions
    has_eval: bool = False
    round_timeout: float = 3600.0
    seed: int = 0  # the clients' sampling seed (the run's seed, as the SPMD engine's)
    settings: dict[str, Any] | None = None  # compared on resume (manager.run_settings)

    @property
    def strategy(self) -> str:
        return check_strategy(self.config.strategy)

    def initial_params(self) -> Any:
        return self.template.params


@dataclass
class ServerRun:
    """Settings of one server run, and (filled in as it goes) its params and history."""

    checkpoint_dir: str | None = None
    resume: bool = True
    record_client_params: bool = False
    connect_timeout: float = 120.0  # seconds to wait for every client's node to appear
    # added to every train/evaluate message: config entries, and named ArrayRecords (e.g. a
    # both-run's phase and, for its RALT phase, the federated query tower)
    message_config: dict[str, Any] = field(default_factory=dict)
    message_arrays: dict[str, Any] = field(default_factory=dict)
    params: Any = None
    history: list[RoundRecord] = field(default_factory=list)
    node_to_client: dict[int, int] = field(default_factory=dict)


def _name(node: int, mapping: dict[int, int]) -> int | str:
    return mapping.get(node, f"node {node}")


# Polling for replies. Flower's Grid.send_and_receive sleeps a fixed interval between pulls
# (3 s on the deployed gRPC grid, 0.1 s in simulation), so a round waited on average half of
# it after its last reply had arrived. Here the interval grows with the time waited so far:
# the delay after the last reply stays within ~1/200 of the round's wait, and a long round
# still pulls rarely (about 460 pulls per tenfold of waiting, at most one a second).
PULL_MIN_S, PULL_MAX_S, PULL_FRACTION = 0.005, 1.0, 1 / 200


def send_and_receive(grid: Grid, messages: list[Message], timeout: float | None, *,
                     on_reply: Callable[[list[Message]], None] | None = None,
                     clock: Callable[[], float] = time.monotonic,
                     sleep: Callable[[float], None] = time.sleep) -> list[Message]:
    """Push ``messages`` and pull their replies until all arrived or ``timeout`` seconds
    passed (None: no limit), polling as above. Returns the replies, or, with ``on_reply``,
    hands each pull's replies to it as they arrive and keeps none (returns []).
    ``clock`` / ``sleep``: for tests."""
    pending = set(grid.push_messages(messages))
    start = clock()
    deadline = start + timeout if timeout is not None else float("inf")
    replies: list[Message] = []
    while pending:
        arrived = list(grid.pull_messages(pending))
        pending -= {m.metadata.reply_to_message_id for m in arrived}
        if on_reply is None:
            replies.extend(arrived)
        elif arrived:
            on_reply(arrived)
        now = clock()
        if not pending or now >= deadline:
            break
        sleep(min(max(PULL_MIN_S, (now - start) * PULL_FRACTION), PULL_MAX_S, deadline - now))
    return replies


def identify(grid: Grid, num_clients: int, timeout: float) -> dict[int, int]:
    """node id -> client id, asked of every connected node (waits for all to connect)."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < num_clients and time.monotonic() < deadline:
        time.sleep(0.5)
    if len(nodes) < num_clients:
        log.warning("only %d of %d client nodes connected after %.0fs", len(nodes),
                    num_clients, timeout)
    messages = [Message(RecordDict(), dst_node_id=n, message_type=f"query.{IDENTIFY}")
                for n in nodes]
    mapping = {}
    for reply in send_and_receive(grid, messages, timeout):
        if reply.has_error():
            log.warning("node %d did not identify itself: %s", reply.metadata.src_node_id,
                        reply.error.reason)
            continue
        mapping[reply.metadata.src_node_id] = int(reply.content[CONFIG]["client-id"])
    return mapping


@dataclass
class ValidReply:
    """A screened train reply: the message, its weight, its arrays (read-only views of the
    message's bytes at the wire dtypes, already checked against the model; a row-sparse
    leaf is a :class:`RowUpdate`) and its entry in the round's record."""

    message: Message
    num_examples: int
    arrays: dict[str, Any]
    result: ClientResult


def averages_itself(strategy: Any) -> bool:
    """Whether the server averages the replies itself (:class:`RunningMean`): FedAvg and
    FedProx, not wrapped (DP). Only then may clients send row-sparse updates."""
    return type(strategy) in (flwr_strategy.FedAvg, flwr_strategy.FedProx)


def screen_train_replies(replies: list[Message], template: Any, record: RoundRecord,
                         mapping: dict[int, int], keep_params: bool, *,
                         base: dict[str, np.ndarray] | None = None,
                         check_finite: bool = True) -> list[ValidReply]:
    """The replies fit to aggregate; the others go into ``record.failed`` / ``rejected``.

    ``base``: the round's global params at the wire dtypes (:func:`payload.wire_flat`);
    given, row-sparse replies are accepted. ``check_finite=False``: NaN / inf are left for
    :func:`fold_replies` to find (it checks each reply as it folds it in).
    """
    valid = []
    spec = payload_spec(template)
    for msg in replies:
        who = _name(msg.metadata.src_node_id, mapping)
        if msg.has_error():
            record.failed.append({"client_id": who, "reason": msg.error.reason})
            log.warning("round %d: client %s failed: %s", record.round, who, msg.error.reason)
            continue
        try:
            content = msg.content
            if len(content.array_records) != 1 or ARRAYS not in content.array_records:
                raise PayloadError(f"reply must hold one ArrayRecord named {ARRAYS!r}, got "
                                   f"{sorted(content.array_records)}")
            if METRICS not in content.metric_records:
                raise PayloadError(f"reply has no MetricRecord named {METRICS!r}")
            metrics = content.metric_records[METRICS]
            n, loss = metrics.get("num-examples"), metrics.get("train_loss")
            if not isinstance(n, int) or n <= 0:
                raise PayloadError(f"num-examples must be a positive integer, got {n!r}")
            if not isinstance(loss, (int, float)) or loss != loss or abs(loss) == float("inf"):
                raise PayloadError(f"train_loss must be a finite number, got {loss!r}")
            arrays = read_arrayrecord(content[ARRAYS], template, spec=spec,
                                      row_sparse=base is not None, check_finite=check_finite)
        except PayloadError as e:
            _reject(record, who, str(e))
            continue
        rates = metrics.get("learning_rates", [])
        result = ClientResult(client_id=who, num_examples=n, train_loss=float(loss),
                              examples_seen=int(metrics.get("examples_seen", 0)),
                              steps=int(metrics.get("local_steps", 0)),
                              learning_rates=[float(x) for x in rates]
                              if isinstance(rates, list) else [])
        valid.append(ValidReply(msg, n, arrays, result))
        record.clients.append(result)
        if keep_params:
            dense = {k: v.dense(base[k]) if isinstance(v, RowUpdate) else v
                     for k, v in arrays.items()}
            record.client_params = record.client_params or {}
            record.client_params[who] = flatten_params(tree_from_flat(dense, template))
    return valid


def _reject(record: RoundRecord, who: Any, reason: str) -> None:
    record.rejected.append({"client_id": who, "reason": reason})
    log.warning("round %d: rejected the update of client %s: %s", record.round, who, reason)


def fold_replies(running: RunningMean, valid: list[ValidReply], record: RoundRecord) -> None:
    """Add screened replies to ``running``; one holding NaN / inf is rejected (and leaves
    ``record.clients`` and the recorded client params) instead."""
    for reply in valid:
        if (key := running.add(reply.arrays, reply.num_examples)) is None:
            continue
        who = reply.result.client_id
        _reject(record, who, f"payload key {key!r} holds non-finite values (NaN or inf); "
                             "the sender diverged")
        record.clients = [c for c in record.clients if c is not reply.result]
        if record.client_params:
            record.client_params.pop(who, None)


def finish_mean(running: RunningMean, record: RoundRecord, min_clients: int
                ) -> dict[str, np.ndarray] | None:
    """The round's FedAvg average, or None (noted in ``record``) if fewer than
    ``min_clients`` valid replies were added."""
    if running.count and running.count >= min_clients:
        return running.mean()
    record.note = (f"only {running.count} valid updates, fewer than min_clients={min_clients}"
                   ": the global params were kept")
    log.warning("round %d: %s", record.round, record.note)
    return None


def screen_eval_replies(replies: list[Message], record: RoundRecord,
                        mapping: dict[int, int]) -> None:
    for msg in replies:
        who = _name(msg.metadata.src_node_id, mapping)
        if msg.has_error():
            log.warning("round %d: client %s failed to evaluate: %s", record.round, who,
                        msg.error.reason)
            continue
        metrics = msg.content.metric_records.get(METRICS, {})
        n, loss = metrics.get("num-examples", 0), metrics.get("eval_loss")
        if isinstance(n, int) and n > 0 and isinstance(loss, float) and loss == loss:
            record.evaluation.append({"client_id": who, "eval_loss": loss, "num_examples": n})
    record.evaluation.sort(key=lambda e: str(e["client_id"]))


def aggregate_replies(strategy: Any, server_round: int, valid: list[ValidReply],
                      record: RoundRecord, *, base: dict[str, np.ndarray] | None = None,
                      min_clients: int = 1) -> dict[str, np.ndarray] | None:
    """The round's aggregate as ``{path: array}``, or None (noted in ``record``) when the
    strategy cannot aggregate. FedAvg and FedProx average the screened arrays themselves
    (:class:`RunningMean`; :func:`serve` folds each reply in as it arrives instead); the
    other strategies and the DP wrapper run Flower's ``aggregate_train`` on the messages."""
    if averages_itself(strategy):
        running = RunningMean(base)
        fold_replies(running, valid, record)
        return finish_mean(running, record, min_clients)
    inner = getattr(strategy, "strategy", strategy)
    if getattr(inner, "weighted_by_key", None) == UNIFORM_WEIGHT:  # DP: equal weights
        for v in valid:
            v.message.content[METRICS][UNIFORM_WEIGHT] = 1
    try:
        aggregated, _ = strategy.aggregate_train(server_round, [v.message for v in valid])
    except (AggregationError, InconsistentMessageReplies) as e:
        record.note = f"the strategy could not aggregate ({e}): the global params were kept"
        log.error("round %d: %s", server_round, record.note)
        return None
    if aggregated is None:
        return None
    return {key: aggregated[key].numpy() for key in aggregated.keys()}


def receive_train(grid: Grid, messages: list[Message], task: Any, run: ServerRun,
                  record: RoundRecord, base: dict[str, np.ndarray] | None, sparse: bool
                  ) -> tuple[RunningMean | None, list[ValidReply]]:
    """Send a round's train messages; screen the replies as they arrive and, where the
    server averages itself (``sparse``), fold each into a :class:`RunningMean` at once
    (nothing of a reply is kept). Otherwise the screened replies
    are returned for the strategy's ``aggregate_train``."""
    running = RunningMean(base) if sparse else None
    valid: list[ValidReply] = []

    def arrived(replies: list[Message]) -> None:
        screened = screen_train_replies(replies, task.template.params, record,
                                        run.node_to_client, run.record_client_params,
                                        base=base, check_finite=not sparse)
        if running is not None:
            fold_replies(running, screened, record)
        else:
            valid.extend(screened)

    send_and_receive(grid, messages, task.round_timeout, on_reply=arrived)
    return running, valid


class SampledGrid:
    """A view of ``grid`` that lists only ``nodes``: what a strategy samples from when the
    server has already drawn the round's clients (every other call goes to ``grid``)."""

    def __init__(self, grid: Grid, nodes: list[int]):
        self._grid, self._nodes = grid, list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def round_nodes(grid: Grid, task: Any, run: ServerRun, round_: int) -> Grid:
    """The grid the round's train messages are configured on: with partial participation,
    only the nodes of the clients :func:`aggregate.sample_clients` draws. (If some client
    did not identify itself, the draw is over the connected nodes instead, with a warning:
    the SPMD engine would train other clients.)"""
    c = task.config
    k = clients_per_round(c)
    if k >= c.num_clients:
        return grid
    seed = getattr(task, "seed", 0)
    by_client = {cid: node for node, cid in run.node_to_client.items()}
    if sorted(by_client) == list(range(c.num_clients)):
        return SampledGrid(grid, [by_client[cid] for cid in
                                  sample_clients(seed, round_, c.num_clients, k)])
    nodes = sorted(grid.get_node_ids())
    log.warning("round %d: not every client identified itself; %d of the %d connected nodes "
                "are drawn (not the clients the SPMD engine would draw)", round_, k,
                len(nodes))
    return SampledGrid(grid, [nodes[i] for i in sample_clients(seed, round_, len(nodes), k)])


def with_extras(messages: Any, run: ServerRun) -> list[Message]:
    """``messages`` with ``run.message_arrays`` added to their content."""
    messages = list(messages)
    for msg in messages:
        for name, record in run.message_arrays.items():
            msg.content[name] = record
    return messages


def serve(grid: Grid, task: Any, run: ServerRun) -> ServerRun:
    """The server's rounds (the body of the ServerApp's main)."""
    reuse_large_buffers()  # the payloads of every round are alike (malloc.py)
    c = task.config
    template = task.template.params
    ckpt, done, params, server, history = open_run(task, run.checkpoint_dir, run.resume)
    # the server draws partial participation itself (round_nodes): the strategy trains all it
    # is offered
    strategy = make_strategy(task.strategy, task.options, min_clients=c.min_clients,
                             fraction_train=1.0, evaluate=task.has_eval,
                             dp_clipping_norm=getattr(c, "dp_clipping_norm", None),
                             dp_noise_multiplier=getattr(c, "dp_noise_multiplier", 0.0),
                             clients_per_round=clients_per_round(c))
    inner = getattr(strategy, "strategy", strategy)  # the rule inside a DP wrapper
    if server is not None:  # FedAdam / FedYogi moments, keyed by path as Flower keeps them
        inner.m_t, inner.v_t = flatten_params(server["m"]), flatten_params(server["v"])
    run.params, run.history = params, history
    try:
        if done < c.rounds:
            run.node_to_client = identify(grid, c.num_clients, run.connect_timeout)
        down = None  # the global params as sent: serialized once for evaluate and next train
        for r in range(done + 1, c.rounds + 1):
            start = time.perf_counter()
            record = RoundRecord(round=r)
            sparse = averages_itself(strategy)  # row-sparse replies, folded in as they come
            train_config = {"local-steps": c.local_steps, "row-sparse": sparse,
                            **run.message_config}
            down = down if down is not None else to_arrayrecord(params)
            messages = with_extras(strategy.configure_train(
                r, down, ConfigRecord(train_config), round_nodes(grid, task, run, r)), run)
            base = wire_flat(params) if sparse else None
            running, valid = receive_train(grid, messages, task, run, record, base, sparse)
            aggregated = None
            if running is not None:
                aggregated = finish_mean(running, record, c.min_clients)
            elif len(valid) >= c.min_clients:
                aggregated = aggregate_replies(strategy, r, valid, record)
            else:
                record.note = (f"only {len(valid)} valid updates, fewer than min_clients="
                               f"{c.min_clients}: the global params were kept")
                log.warning("round %d: %s", r, record.note)
            if aggregated is not None:
                # Flower's adaptive strategies compute in float64: back to the model's dtypes
                before = params
                params = unflatten_params(aggregated, template, cast=True, copy=False)
                record.aggregated, down = True, None
                record.update_norm = params_distance(params, before)
            if server is not None and inner.m_t is not None:
                server = {"m": unflatten_params(inner.m_t, template, cast=True),
                          "v": unflatten_params(inner.v_t, template, cast=True)}
            if task.has_eval:
                down = down if down is not None else to_arrayrecord(params)
                messages = with_extras(strategy.configure_evaluate(
                    r, down, ConfigRecord(dict(run.message_config)), grid), run)
                screen_eval_replies(send_and_receive(grid, messages, task.round_timeout),
                                    record, run.node_to_client)
            record.seconds = time.perf_counter() - start
            history.append(record)
            run.params = params
            log.info("round %d/%d (flower): %d aggregated, %d rejected, %d failed; train loss "
                     "%s, eval loss %s", r, c.rounds, len(record.clients), len(record.rejected),
                     len(record.failed), record.train_loss, record.eval_loss)
            if ckpt is not None:
                ckpt.save(r, params, server, history, task.strategy, "flower")
    finally:
        if ckpt is not None:
            ckpt.close()
    return run


def params_distance(a: Any, b: Any) -> float:
    """||a - b||_2 over every leaf of two params trees (float64 sums)."""
    import jax

    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64) - np.asarray(y)))
                             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                             strict=True))))


def make_server_app(task: Any, run: ServerRun | None = None) -> ServerApp:
    """A ServerApp running ``task``'s rounds; ``run`` receives the params and history."""
    run = run if run is not None else ServerRun()
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Any) -> None:
        serve(grid, task, run)

    return app

