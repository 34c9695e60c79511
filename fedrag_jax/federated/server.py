"""The Flower ServerApp (Message API): rounds of train -> screen -> aggregate -> evaluate.

    app = make_server_app(task, run)     # flwr.serverapp.ServerApp

The aggregation rule is a Flower strategy from ``flwr.serverapp.strategy`` chosen by name
(fedavg, fedprox, fedadam, fedyogi, fedmedian, fedtrimmedavg). The round loop is ours rather
than ``Strategy.start`` so that, between receiving the replies and aggregating them, every
reply is screened: a client that raised is *failed*, a reply whose payload does not match the
model (keys, shapes, dtypes) or holds NaN/inf is *rejected* with its reason; both are logged,
recorded in the round's history and left out. If fewer than ``min_clients`` valid updates
remain, the round keeps the global params. After every round the server checkpoints (global
params, FedAdam/FedYogi moments, history), and a run resumes after the last completed round
with the real round numbers (which FedAdam's bias correction and the clients' data
positions depend on).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies

from ..errors import ConfigError, PayloadError
from .aggregate import StrategyOptions, check_strategy
from .client import ARRAYS, CONFIG, IDENTIFY, METRICS
from .history import ClientResult, RoundRecord, open_run
from .malloc import reuse_large_buffers
from .payload import (
    RowUpdate,
    flatten_params,
    map_arrays,
    non_finite_key,
    payload_spec,
    read_arrayrecord,
    to_arrayrecord,
    tree_from_flat,
    unflatten_params,
    wire_flat,
)

log = logging.getLogger(__name__)


def make_strategy(name: str, options: StrategyOptions, *, min_clients: int,
                  fraction_train: float = 1.0, evaluate: bool = True,
                  dp_clipping_norm: float | None = None, dp_noise_multiplier: float = 0.0,
                  clients_per_round: int | None = None):
    """A ``flwr.serverapp.strategy`` strategy by name; with ``dp_clipping_norm``, wrapped in
    Flower's ``DifferentialPrivacyClientSideFixedClipping`` (clients clip, see
    ``client.dp_clipping_mod``; the server adds Gaussian noise of std
    ``dp_noise_multiplier * dp_clipping_norm / clients_per_round`` to the average)."""
    strategy = _base_strategy(name, options, min_clients=min_clients,
                              fraction_train=fraction_train, evaluate=evaluate)
    if dp_clipping_norm is None:
        return strategy
    if dp_clipping_norm <= 0 or dp_noise_multiplier < 0:
        raise ConfigError(f"dp_clipping_norm={dp_clipping_norm} must be > 0 and "
                          f"dp_noise_multiplier={dp_noise_multiplier} >= 0")
    return flwr_strategy.DifferentialPrivacyClientSideFixedClipping(
        strategy, noise_multiplier=dp_noise_multiplier, clipping_norm=dp_clipping_norm,
        num_sampled_clients=clients_per_round or min_clients)


def _base_strategy(name: str, options: StrategyOptions, *, min_clients: int,
                   fraction_train: float, evaluate: bool):
    key = check_strategy(name)
    common = dict(fraction_train=fraction_train, fraction_evaluate=1.0 if evaluate else 0.0,
                  min_train_nodes=min_clients, min_evaluate_nodes=min_clients if evaluate else 0,
                  min_available_nodes=min_clients)
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


def clients_per_round(config: Any) -> int:
    """Clients Flower samples per round: max(int(n * fraction_train), min_clients), <= n."""
    n = config.num_clients
    return min(n, max(int(n * config.fraction_train), config.min_clients))


@dataclass
class ServerTask:
    """What the server uses of a :class:`FederatedTask`: the trainable params' template and
    the settings, without client data (a deployed server has none)."""

    template: Any  # a TrainState: only its params are used
    config: Any  # FederatedConfig
    options: StrategyOptions
    has_eval: bool = False
    round_timeout: float = 3600.0

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
                     clock: Any = time.monotonic, sleep: Any = time.sleep) -> list[Message]:
    """Push ``messages`` and pull their replies until all arrived or ``timeout`` seconds
    passed (None: no limit); what ``Grid.send_and_receive`` returns, polled as above.
    ``clock`` / ``sleep``: for tests."""
    pending = set(grid.push_messages(messages))
    start = clock()
    deadline = start + timeout if timeout is not None else float("inf")
    replies: list[Message] = []
    while pending:
        arrived = list(grid.pull_messages(pending))
        replies.extend(arrived)
        pending -= {m.metadata.reply_to_message_id for m in arrived}
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
    """Whether the server averages the replies itself (:func:`finite_mean`): FedAvg and
    FedProx, not wrapped (DP). Only then may clients send row-sparse updates."""
    return type(strategy) in (flwr_strategy.FedAvg, flwr_strategy.FedProx)


def screen_train_replies(replies: list[Message], template: Any, record: RoundRecord,
                         mapping: dict[int, int], keep_params: bool, *,
                         base: dict[str, np.ndarray] | None = None,
                         check_finite: bool = True) -> list[ValidReply]:
    """The replies fit to aggregate; the others go into ``record.failed`` / ``rejected``.

    ``base``: the round's global params at the wire dtypes (:func:`payload.wire_flat`);
    given, row-sparse replies are accepted. ``check_finite=False``: NaN / inf are left for
    :func:`finite_mean` to find (it reads the average, not every reply).
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
        result = ClientResult(client_id=who, num_examples=n, train_loss=float(loss),
                              examples_seen=int(metrics.get("examples_seen", 0)),
                              steps=int(metrics.get("local_steps", 0)))
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


def weighted_mean(replies: list[ValidReply], base: dict[str, np.ndarray] | None = None
                  ) -> dict[str, np.ndarray]:
    """FedAvg's average, sum_k (n_k / sum n) w_k, over screened replies.

    The same arithmetic as Flower's ``aggregate_arrayrecords`` (float64 weights, products
    and sums at the arrays' dtype, in reply order: the results are bitwise equal), but on
    the arrays screening already read, in place, without decoding every reply again.
    A leaf that some reply sent row-sparse is averaged as base + sum_k f_k (w_k - base),
    which reads only the rows sent (the rows nobody changed stay exactly ``base``).
    """
    total = float(sum(r.num_examples for r in replies))
    factors = [r.num_examples / total for r in replies]
    keys = list(replies[0].arrays)

    def mean(key: str) -> np.ndarray:
        entries = [r.arrays[key] for r in replies]
        if any(isinstance(e, RowUpdate) for e in entries):
            if base is None:
                raise PayloadError(f"{key!r} was sent row-sparse but no base params were given")
            return _row_sparse_mean(entries, factors, base[key])
        if not np.issubdtype(entries[0].dtype, np.inexact):  # as Flower: promoted to float64
            return sum(e * f for e, f in zip(entries, factors, strict=True))
        acc = np.multiply(entries[0], entries[0].dtype.type(factors[0]))
        scratch = np.empty_like(acc)
        for entry, factor in zip(entries[1:], factors[1:], strict=True):
            acc += np.multiply(entry, acc.dtype.type(factor), out=scratch)
        return acc

    # memory-bound numpy: leaves in parallel (each leaf's arithmetic is unchanged)
    first = [e.values if isinstance(e, RowUpdate) else e for e in replies[0].arrays.values()]
    sizes = [len(replies) * x.nbytes for x in first]
    return dict(zip(keys, map_arrays(mean, keys, sizes), strict=True))


def _row_sparse_mean(entries: list[Any], factors: list[float], base: np.ndarray) -> np.ndarray:
    acc = np.array(base)
    for entry, factor in zip(entries, factors, strict=True):
        f = acc.dtype.type(factor)
        if isinstance(entry, RowUpdate):
            acc[entry.rows] += (entry.values - base[entry.rows]) * f
        else:
            acc += (entry - base) * f
    return acc


def finite_mean(valid: list[ValidReply], record: RoundRecord, base: dict[str, np.ndarray],
                min_clients: int) -> dict[str, np.ndarray] | None:
    """:func:`weighted_mean` of replies screened without the NaN / inf check.

    A non-finite value in any reply makes the average non-finite (every weight is > 0), so
    the replies are read one by one only then: those holding NaN / inf are rejected (and
    leave ``record.clients``) and the rest averaged again. The common case reads each reply
    once instead of twice. None (noted in ``record``) if fewer than ``min_clients`` remain
    or the average itself overflows.
    """
    out = weighted_mean(valid, base)
    if non_finite_key(out) is None:
        return out
    good = []
    for reply in valid:
        if (key := non_finite_key(reply.arrays)) is None:
            good.append(reply)
            continue
        who = reply.result.client_id
        _reject(record, who, f"payload key {key!r} holds non-finite values (NaN or inf); "
                             "the sender diverged")
        record.clients = [c for c in record.clients if c is not reply.result]
        if record.client_params:
            record.client_params.pop(who, None)
    out = weighted_mean(good, base) if len(good) >= min_clients and good else None
    if out is None or non_finite_key(out) is not None:
        record.note = ((f"only {len(good)} valid updates, fewer than min_clients={min_clients}"
                        if out is None else "the average of finite updates overflowed")
                       + ": the global params were kept")
        log.warning("round %d: %s", record.round, record.note)
        return None
    return out



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
    strategy cannot aggregate. FedAvg and FedProx average the screened arrays directly
    (:func:`finite_mean`; dense replies: bitwise what Flower computes); the other
    strategies and the DP wrapper run Flower's ``aggregate_train`` on the messages."""
    if averages_itself(strategy):
        return finite_mean(valid, record, base, min_clients)
    try:
        aggregated, _ = strategy.aggregate_train(server_round, [v.message for v in valid])
    except (AggregationError, InconsistentMessageReplies) as e:
        record.note = f"the strategy could not aggregate ({e}): the global params were kept"
        log.error("round %d: %s", server_round, record.note)
        return None
    if aggregated is None:
        return None
    return {key: aggregated[key].numpy() for key in aggregated.keys()}


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
    strategy = make_strategy(task.strategy, task.options, min_clients=c.min_clients,
                             fraction_train=c.fraction_train, evaluate=task.has_eval,
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
            sparse = averages_itself(strategy)  # row-sparse replies, NaN check on the mean
            train_config = {"local-steps": c.local_steps, "row-sparse": sparse,
                            **run.message_config}
            down = down if down is not None else to_arrayrecord(params)
            messages = with_extras(strategy.configure_train(
                r, down, ConfigRecord(train_config), grid), run)
            replies = send_and_receive(grid, messages, task.round_timeout)
            base = wire_flat(params) if sparse else None
            valid = screen_train_replies(replies, template, record, run.node_to_client,
                                         run.record_client_params, base=base,
                                         check_finite=not sparse)
            aggregated = None
            if len(valid) >= c.min_clients:
                aggregated = aggregate_replies(strategy, r, valid, record, base=base,
                                               min_clients=c.min_clients)
            else:
                record.note = (f"only {len(valid)} valid updates, fewer than min_clients="
                               f"{c.min_clients}: the global params were kept")
                log.warning("round %d: %s", r, record.note)
            if aggregated is not None:
                # Flower's adaptive strategies compute in float64: back to the model's dtypes
                params = unflatten_params(aggregated, template, cast=True, copy=False)
                record.aggregated, down = True, None
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


def make_server_app(task: Any, run: ServerRun | None = None) -> ServerApp:
    """A ServerApp running ``task``'s rounds; ``run`` receives the params and history."""
    run = run if run is not None else ServerRun()
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Any) -> None:
        serve(grid, task, run)

    return app

