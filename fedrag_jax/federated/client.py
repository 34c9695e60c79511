"""The Flower ClientApp (Message API): train and evaluate on the client's own partition.

    app = make_client_app(task)      # flwr.clientapp.ClientApp

A node learns which client it is from its node config's ``partition-id`` (set by the
simulation engine, or ``flower-supernode --node-config "partition-id=0"``). Messages:

    train            arrays (global params, keyed by path) + config {server-round,
                     proximal-mu?, row-sparse?, clipping_norm?} -> arrays (the client's
                     params; with row-sparse, a large matrix's changed rows only) + metrics
                     {num-examples, train_loss, examples_seen, local_steps,
                     learning_rates (one per local step)}
    evaluate         arrays -> metrics {num-examples, eval_loss}
    query.identify   -> config {client-id}: lets the server name nodes by client id

What the server sends is validated like what clients send (payload.from_arrayrecord).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from ..errors import ConfigError, PayloadError
from .malloc import reuse_large_buffers
from .payload import from_arrayrecord, read_arrayrecord, to_arrayrecord, tree_from_flat

log = logging.getLogger(__name__)
IDENTIFY = "identify"
ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"  # Flower strategies' record keys

# One task per process: a ClientApp's task is unpickled afresh for every message in a Ray
# actor; keeping the first copy keeps its compiled steps for the next rounds.
_TASKS: dict[str, Any] = {}


def _local(task: Any) -> Any:
    return _TASKS.setdefault(task.token, task)


def shipped_task(token: str, ref: Any) -> Any:
    """Unpickle a task sent as (token, Ray object reference): this process's copy if it has
    one, else fetched from Ray's object store once (simulation.RayShipping)."""
    task = _TASKS.get(token)
    if task is None:
        import ray

        from .task import FederatedTask

        task = FederatedTask.__new__(FederatedTask)
        task.__dict__.update(ray.get(ref))
        task = _TASKS.setdefault(token, task)
    return task


def client_id_of(context: Context, num_clients: int) -> int:
    return client_id_of_node(context.node_config, num_clients)


def client_id_of_node(config: Any, num_clients: int) -> int:
    """The client index a node config's ``partition-id`` names."""
    if "partition-id" not in config:
        raise ConfigError("this node has no 'partition-id' in its node config; start it with "
                          "flower-supernode --node-config \"partition-id=<client index>\"")
    cid = int(config["partition-id"])
    if not 0 <= cid < num_clients:
        raise ConfigError(f"partition-id={cid} is outside 0..{num_clients - 1}")
    return cid


def handle_train(task: Any, msg: Message, context: Context) -> Message:
    reuse_large_buffers()  # the payloads of every round are alike (malloc.py)
    cid = client_id_of(context, task.config.num_clients)
    template = task.template.params
    received = read_arrayrecord(msg.content[ARRAYS], template)  # views, validated
    params = tree_from_flat(received, template)
    config = msg.content[CONFIG]
    round_ = int(config["server-round"])
    mu = float(config["proximal-mu"]) if "proximal-mu" in config else 0.0
    new_params, m = task.client_update(cid, params, round_, mu)
    values = {"num-examples": int(m["num_examples"]), "train_loss": float(m["train_loss"]),
              "examples_seen": int(m["examples_seen"]), "local_steps": int(m["steps"])}
    if m.get("learning_rates"):
        values["learning_rates"] = [float(x) for x in m["learning_rates"]]
    metrics = MetricRecord(values)
    # a server that averages itself asks for row-sparse updates (payload.py)
    base = received if config.get("row-sparse", False) else None
    return Message(RecordDict({ARRAYS: to_arrayrecord(new_params, base=base),
                               METRICS: metrics}), reply_to=msg)


def handle_evaluate(task: Any, msg: Message, context: Context) -> Message:
    reuse_large_buffers()
    cid = client_id_of(context, task.config.num_clients)
    params = from_arrayrecord(msg.content[ARRAYS], task.template.params)
    result = task.client_evaluate(cid, params) or {"eval_loss": 0.0, "num_examples": 0}
    metrics = MetricRecord({"num-examples": int(result["num_examples"]),
                            "eval_loss": float(result["eval_loss"])})
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)


def handle_identify(num_clients: int, msg: Message, context: Context) -> Message:
    cid = client_id_of(context, num_clients)
    return Message(RecordDict({CONFIG: ConfigRecord({"client-id": cid})}), reply_to=msg)


def clip_update(trained: dict[str, np.ndarray], sent: dict[str, np.ndarray],
                norm: float) -> tuple[dict[str, np.ndarray], float]:
    """``sent + (trained - sent) * min(1, norm / ||trained - sent||_2)`` (the norm over every
    leaf, in float64; Flower's FlatClip) at the trained arrays' dtypes, and the update's
    norm before clipping."""
    update = {k: trained[k].astype(np.float64) - sent[k] for k in sent}
    size = float(np.sqrt(sum(np.sum(u * u) for u in update.values())))
    scale = min(1.0, norm / size) if size > 0 else 1.0
    return {k: (sent[k] + update[k] * scale).astype(trained[k].dtype) for k in sent}, size


def dp_clipping_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Client-side fixed clipping on the train messages that ask for it.

    A server with ``dp_clipping_norm`` set (``DifferentialPrivacyClientSideFixedClipping``)
    puts the norm into every train config; the client's update (params - global) is then
    scaled by min(1, norm / ||update||_2) over all trainable leaves before it is sent, as
    Flower's ``fixedclipping_mod`` does, but on the trained arrays (the ``arrays`` record)
    only: a both-run's RALT messages also carry the federated query tower (another
    ArrayRecord, read-only context), which Flower's mod refuses (it answers any message with
    two ArrayRecords with an error). Other messages, and train messages without the key,
    pass untouched, so one ClientApp serves runs with and without DP.
    """
    content = msg.content
    if not (msg.metadata.message_type == "train" and CONFIG in content.config_records
            and KEY_CLIPPING_NORM in content[CONFIG]):
        return call_next(msg, context)
    norm = float(content[CONFIG][KEY_CLIPPING_NORM])
    if ARRAYS not in content.array_records:
        raise PayloadError(f"a DP train message needs an ArrayRecord named {ARRAYS!r}")
    sent_record = content[ARRAYS]
    keys = list(sent_record.keys())
    sent = {k: sent_record[k].numpy().astype(np.float64) for k in keys}
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    trained_record = reply.content.array_records.get(ARRAYS)
    if trained_record is None or list(trained_record.keys()) != keys:
        raise PayloadError("the DP clipping mod needs the reply's arrays keyed as the "
                           "server's (a row-sparse or partial reply cannot be clipped)")
    clipped, size = clip_update({k: trained_record[k].numpy() for k in keys}, sent, norm)
    reply.content[ARRAYS] = ArrayRecord({k: Array(np.ascontiguousarray(v))
                                         for k, v in clipped.items()})
    log.info("dp_clipping_mod: update norm %.4g clipped to %.4g", size, min(size, norm))
    return reply


def make_client_app(task: Any, *, mods: list | None = None) -> ClientApp:
    """A ClientApp serving ``task`` (a :class:`FederatedTask`; pickled to Flower's actors).

    ``mods``: Flower client mods wrapped around every handler (e.g. for tests), inside
    :func:`dp_clipping_mod` (which clips what they return).
    """
    app = ClientApp(mods=[dp_clipping_mod, *(mods or [])])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(_local(task), msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(_local(task), msg, context)

    @app.query(IDENTIFY)
    def identify(msg: Message, context: Context) -> Message:
        return handle_identify(task.config.num_clients, msg, context)

    return app
