"""Federated fine-tuning: payloads keyed by path and validated, partitions, the server rules
against Flower's strategies, the Flower simulation (Ray) against local_train + FedAvg, the
SPMD simulator's shardings and its equality with single-client runs and with Flower, faulty
clients, checkpoint resume."""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata
from orbax.checkpoint import msgpack_utils

from fedrag_jax.config import FederatedConfig
from fedrag_jax.errors import ConfigError, DataError, PayloadError
from fedrag_jax.federated import (
    ClientStep,
    FederatedTask,
    StrategyOptions,
    decode,
    encode,
    flatten_params,
    from_arrayrecord,
    local_train,
    partition,
    prox_objective,
    split_dataset,
    subset,
    to_arrayrecord,
)
from fedrag_jax.federated import payload as payload_module
from fedrag_jax.federated.aggregate import ServerOptimizer, aggregate
from fedrag_jax.federated.client import make_client_app
from fedrag_jax.federated.history import RoundRecord, open_run
from fedrag_jax.federated.local import client_batches, position
from fedrag_jax.federated.payload import RowUpdate, map_arrays, read_arrayrecord, wire_flat
from fedrag_jax.federated.running_mean import RunningMean
from fedrag_jax.federated.server import (
    ServerRun,
    aggregate_replies,
    finish_mean,
    fold_replies,
    make_strategy,
    screen_train_replies,
    send_and_receive,
    serve,
)
from fedrag_jax.federated.spmd import SpmdSimulator, devices_of_group, slice_devices
from fedrag_jax.finetune.batches import LSRDataset
from fedrag_jax.finetune.steps import QUERY_TOWER, Towers, TrainState
from fedrag_jax.models.bert import BertConfig, Encoder
from tests.helpers import LocalGrid

# one layer: XLA:CPU compiles this train step in ~8 s on two cores (two layers: ~13 s).
# 1536 words, of which the queries use 63: the word embeddings travel row-sparse (>= 1024 rows)
BERT = BertConfig(vocab_size=1536, hidden_size=32, num_layers=1, num_heads=4,
                  intermediate_size=64, max_position_embeddings=32)
# SGD keeps float-order differences (vmapped vs. single, 2 devices vs. 1) at float noise;
# Adam would magnify them where a gradient element is ~0 (its update is ~lr * sign(g))
TX = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5))
ATOL = 2e-5


# --- fixtures -------------------------------------------------------------------------------
def towers(seed: int = 0) -> Towers:
    query = Encoder(BERT, rngs=nnx.Rngs(seed))
    return Towers(query, nnx.clone(query))


def lsr_dataset(n: int, seed: int, batch_size: int = 4, k: int = 4) -> LSRDataset:
    """Synthetic LSR data: the generator clearly prefers one passage per query."""
    rng = np.random.default_rng(seed)
    length = 10
    ids = rng.integers(1, 64, size=(n, length)).astype(np.int32)
    mask = np.ones((n, length), bool)
    mask[1::2, length - 3:] = False
    emb = rng.normal(size=(n, k, BERT.hidden_size)).astype(np.float32)
    lm = np.full((n, k), -30.0, np.float32)
    lm[np.arange(n), rng.integers(0, k, size=n)] = -2.0
    arrays = {"query_ids": ids, "query_mask": mask, "passage_emb": emb, "lm_logprobs": lm}
    return LSRDataset(arrays, np.arange(n * k).reshape(n, k), batch_size=batch_size, seed=seed)


def topic_clients(num_clients: int, n: int = 30, seed: int = 0) -> list[LSRDataset]:
    """Uneven client datasets (topic partition), so FedAvg's weights matter."""
    topics = [f"t{i % (num_clients + 2)}" for i in range(n)]
    topics[: n // 4] = ["t0"] * (n // 4)
    parts = partition([{"topic": t} for t in topics], num_clients, "topic", seed=seed)
    full = lsr_dataset(n, seed)
    return [subset(full, p) for p in parts]


def make_task(num_clients: int, *, rounds: int = 2, local_steps: int = 3, min_clients: int = 2,
              strategy: str = "fedavg", eval_data: bool = True, seed: int = 0,
              **options) -> FederatedTask:
    clients = topic_clients(num_clients, seed=seed)
    evals = [lsr_dataset(6, 100 + c) for c in range(num_clients)] if eval_data else None
    config = FederatedConfig(num_clients=num_clients, rounds=rounds, local_steps=local_steps,
                             min_clients=min_clients, strategy=strategy, partition="topic")
    return FederatedTask.lsr(towers(seed), QUERY_TOWER, TX, clients, config, eval_data=evals,
                             options=StrategyOptions(**options), seed=seed)


def weighted_average(flats: list[dict[str, np.ndarray]], weights: list[float]):
    w = np.asarray(weights, np.float64) / np.sum(weights)
    return {k: sum(wi * f[k].astype(np.float64) for wi, f in zip(w, flats, strict=True))
            for k in flats[0]}


def assert_close(a: dict, b: dict, atol: float = ATOL) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k], np.float64), np.asarray(b[k], np.float64),
                                   atol=atol, err_msg=k)


def params_template():
    return TrainState.create(towers(), optax.sgd(0.1), QUERY_TOWER).params


# --- payload ----------------------------------------------------------------------------------
def test_payload_round_trip_is_keyed_by_path():
    params = params_template()
    flat = flatten_params(params)
    assert "query_tower/layers/0/query/kernel" in flat and "query_tower/pooler/bias" in flat
    assert not any(k.startswith("context_tower") for k in flat)  # only the trainable subset
    back = decode(encode(params), params)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert_close(flatten_params(back), flat, atol=0)
    # the arrays are matched by path, not by position: reversed key order, same result
    reordered = {"format": "fedrag-jax/params", "version": 1,
                 "arrays": dict(reversed(list(flat.items())))}
    assert_close(flatten_params(decode(msgpack_utils.msgpack_serialize(reordered), params)),
                 flat, atol=0)
    # and through a Flower ArrayRecord
    record = to_arrayrecord(params)
    assert list(record.keys()) == list(flat)
    assert_close(flatten_params(from_arrayrecord(record, params)), flat, atol=0)


def _tampered(flat: dict, how: str) -> dict:
    flat = dict(flat)
    key = "query_tower/layers/0/value/kernel"
    if how == "nan":
        flat[key] = flat[key].copy()
        flat[key][0, 0] = np.nan
    elif how == "shape":
        flat[key] = flat[key][:-1]
    elif how == "dtype":
        flat[key] = flat[key].astype(np.float16)
    elif how == "missing":
        del flat[key]
    elif how == "extra":
        flat["query_tower/backdoor/kernel"] = np.zeros((2, 2), np.float32)
    return flat


@pytest.mark.parametrize("how, reason", [
    ("nan", "non-finite"), ("shape", "has shape (31, 32), expected (32, 32)"),
    ("dtype", "has dtype float16, expected float32"),
    ("missing", "missing keys: query_tower/layers/0/value/kernel"),
    ("extra", "extra keys: query_tower/backdoor/kernel")])
def test_tampered_payload_is_rejected_with_its_reason(how, reason):
    params = params_template()
    flat = _tampered(flatten_params(params), how)
    blob = msgpack_utils.msgpack_serialize({"format": "fedrag-jax/params", "version": 1,
                                            "arrays": flat})
    with pytest.raises(PayloadError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        decode(blob, params)
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in flat.items()})
    with pytest.raises(PayloadError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        from_arrayrecord(record, params)


def test_damaged_or_foreign_bytes_are_payload_errors():
    params = params_template()
    blob = encode(params)
    for bad in (blob[: len(blob) // 2], b"\x00not msgpack", msgpack_utils.msgpack_serialize(
            {"format": "other", "arrays": {}}), msgpack_utils.msgpack_serialize([1, 2])):
        with pytest.raises(PayloadError):
            decode(bad, params)


def test_bfloat16_params_travel_as_float32_and_come_back():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params_template())
    record = to_arrayrecord(params)
    assert all(a.numpy().dtype == np.float32 for a in record.values())  # np.save-safe
    back = from_arrayrecord(record, params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(back))
    assert_close(flatten_params(back), flatten_params(params), atol=0)
    assert_close(flatten_params(decode(encode(params), params)), flatten_params(params), atol=0)


# --- partitions -------------------------------------------------------------------------------
def test_partitions_cover_every_record_once():
    topics = [f"t{i % 6}" for i in range(60)]
    records = [{"topic": t} for t in topics]
    for scheme in ("iid", "topic", "dirichlet"):
        parts = partition(records, 3, scheme, alpha=0.3, seed=1)
        joined = np.sort(np.concatenate(parts))
        np.testing.assert_array_equal(joined, np.arange(60), err_msg=scheme)
        assert all(len(p) > 0 for p in parts)
        again = partition(records, 3, scheme, alpha=0.3, seed=1)
        assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    iid = partition(records, 3, "iid")
    assert [len(p) for p in iid] == [20, 20, 20]
    by_topic = partition(records, 3, "topic")
    owners = [{topics[i] for i in p} for p in by_topic]
    assert sum(len(o) for o in owners) == 6 and not set.intersection(*owners)  # whole topics

    def skew(alpha):  # mean share of a topic's records on its biggest client
        parts = partition(records, 3, "dirichlet", alpha=alpha, seed=3)
        return np.mean([max(sum(topics[i] == t for i in p) for p in parts) / 10
                        for t in set(topics)])
    assert skew(0.05) > skew(100.0)


def test_split_dataset_gives_each_client_its_rows_in_one_shape():
    data = lsr_dataset(20, 0)
    records = [{"topic": f"t{i % 4}"} for i in range(20)]
    config = FederatedConfig(num_clients=2, partition="topic")
    clients = split_dataset(data, records, config)
    parts = partition(records, 2, "topic")
    for client, rows in zip(clients, parts, strict=True):
        assert client.n == len(rows)
        np.testing.assert_array_equal(client.arrays["query_ids"], data.arrays["query_ids"][rows])
        batch = client.batch_at(0, 0)
        assert {k: v.shape for k, v in batch.items()} == \
            {k: v.shape for k, v in data.batch_at(0, 0).items()}
    with pytest.raises(DataError, match="rows"):
        split_dataset(data, records[:10], config)


def test_partition_errors_say_what_to_do():
    with pytest.raises(ConfigError, match="at least one topic per client"):
        partition([{"topic": "a"}, {"topic": "b"}, {"topic": "a"}], 3, "topic")
    with pytest.raises(DataError, match="'topic' field"):
        partition([{"query": "q"}] * 4, 2, "dirichlet")
    with pytest.raises(ConfigError, match="unknown partition"):
        partition([{"topic": "a"}] * 4, 2, "random")


# --- knowledge-store shards (fed.client_stores=partition) ------------------------------------
def _shard_world(seed: int, n_passages: int = 200, n_records: int = 60, topics: int = 6):
    rng = np.random.default_rng(seed)
    passage_topics = [f"t{t}" for t in rng.integers(0, topics, n_passages)]
    passage_topics[::17] = [None] * len(passage_topics[::17])  # some passages have no topic
    gold = rng.choice(n_passages, n_records, replace=False)
    records = [{"topic": passage_topics[g] or f"t{g % topics}", "gold_id": f"d{g}"}
               for g in gold]
    records[3]["gold_id"] = None  # a record without a known gold passage
    return [f"d{i}" for i in range(n_passages)], passage_topics, records


@pytest.mark.parametrize("scheme", ["iid", "topic", "dirichlet"])
def test_shards_are_disjoint_cover_the_store_and_hold_their_clients_gold(scheme):
    from fedrag_jax.federated.shards import shard_passages

    ids, passage_topics, records = _shard_world(11)
    parts = partition(records, 3, scheme, alpha=0.3, seed=5)
    shards = shard_passages(ids, passage_topics, records, parts, scheme, seed=5)
    joined = np.sort(np.concatenate(shards))
    np.testing.assert_array_equal(joined, np.arange(len(ids)))  # disjoint and covering
    owner = {ids[i]: c for c, rows in enumerate(shards) for i in rows}
    for c, rows in enumerate(parts):
        for r in rows:
            if records[r]["gold_id"] is not None:
                assert owner[records[r]["gold_id"]] == c
    sizes = [len(s) for s in shards]
    if scheme == "iid":  # gold passages follow their records, the rest evens the sizes out
        assert max(sizes) - min(sizes) <= 1
    if scheme == "topic":  # a topic's passages live with the client holding its records
        for c, rows in enumerate(parts):
            mine = {records[r]["topic"] for r in rows}
            for i, t in enumerate(passage_topics):
                if t in mine:
                    assert owner[ids[i]] == c
    again = shard_passages(ids, passage_topics, records, parts, scheme, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))
    if scheme != "topic":  # (topic: whole topics to their owners, nothing left to chance)
        other = shard_passages(ids, passage_topics, records, parts, scheme, seed=6)
        assert any(not np.array_equal(a, b) for a, b in zip(shards, other, strict=True))


def test_dirichlet_shards_follow_the_topic_shares_of_the_records():
    from fedrag_jax.federated.shards import shard_passages

    ids, passage_topics, records = _shard_world(3, n_passages=600, n_records=40, topics=3)
    parts = partition(records, 3, "dirichlet", alpha=0.2, seed=2)
    shards = shard_passages(ids, passage_topics, records, parts, "dirichlet", seed=2)
    golds = {r["gold_id"] for r in records}
    for t in ("t0", "t1", "t2"):
        held = np.array([sum(records[r]["topic"] == t for r in p) for p in parts], float)
        got = np.array([sum(passage_topics[i] == t and ids[i] not in golds for i in s)
                        for s in shards], float)
        np.testing.assert_allclose(got / got.sum(), held / held.sum(), atol=0.02)


# --- aggregation: our JAX rules == Flower's strategies ----------------------------------------
def _reply(arrays: dict[str, np.ndarray], n: int, node: int) -> Message:
    meta = Metadata(run_id=0, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0,
                    message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": n,
                                                   "train_loss": 1.0 + 0.1 * node})})
    return Message(content, metadata=meta)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian",
                                  "fedtrimmedavg"])
def test_server_rules_match_flower_strategies(name):
    rng = np.random.default_rng(0)
    options = StrategyOptions(proximal_mu=0.1, server_learning_rate=0.05, trim_beta=0.2)
    strategy = make_strategy(name, options, min_clients=1)
    shapes = {"a/kernel": (3, 4), "a/bias": (4,)}
    current = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    ours = jax.tree.map(jnp.asarray, current)
    counts = [5, 3, 8, 2, 6]
    server_opt = ServerOptimizer(name, options) if name in ("fedadam", "fedyogi") else None
    opt_state = server_opt.init(ours) if server_opt else None
    for round_ in (1, 2):
        clients = [{k: v + rng.normal(size=v.shape).astype(np.float32) * 0.1
                    for k, v in current.items()} for _ in counts]
        if hasattr(strategy, "current_arrays"):  # what FedOpt's configure_train records
            strategy.current_arrays = {k: v.copy() for k, v in current.items()}
        replies = [_reply(c, n, i + 1) for i, (c, n) in enumerate(zip(clients, counts,
                                                                     strict=True))]
        theirs, _ = strategy.aggregate_train(round_, replies)
        stacked = {k: jnp.stack([c[k] for c in clients]) for k in shapes}
        averaged = aggregate(name, stacked, jnp.asarray(counts, jnp.float32), options)
        if server_opt:
            ours, opt_state = server_opt.apply(ours, averaged, opt_state, round_)
        else:
            ours = averaged
        expected = {k: theirs[k].numpy() for k in shapes}
        assert_close({k: np.asarray(v) for k, v in ours.items()}, expected, atol=1e-5)
        current = {k: v.astype(np.float32) for k, v in expected.items()}
        ours = jax.tree.map(jnp.asarray, current)


def running_mean(valid, base=None):
    running = RunningMean(base)
    for reply in valid:
        assert running.add(reply.arrays, reply.num_examples) is None
    return running.mean()


@pytest.mark.parametrize("threads", [False, True])
def test_server_fedavg_is_the_weighted_mean_flower_computes(threads, monkeypatch):
    """FedAvg / FedProx fold the screened arrays into a running mean; the result is what
    Flower's aggregate_train computes from the same messages up to float32 rounding, in any
    reply order, bitwise (on one thread or, as for large trainable sets, several)."""
    if threads:
        monkeypatch.setattr(payload_module, "_PARALLEL_MIN_BYTES", 0)
        monkeypatch.setattr(payload_module, "_PARALLEL_MIN_ITEM", 0)
    rng = np.random.default_rng(3)
    params = params_template()
    template = flatten_params(params)
    counts = [7, 2, 11, 5]
    clients = [{k: (v + rng.normal(size=v.shape)).astype(v.dtype) for k, v in template.items()}
               for _ in counts]
    replies = [_reply(c, n, i + 1) for i, (c, n) in enumerate(zip(clients, counts, strict=True))]
    exact = weighted_average(clients, counts)  # float64
    for name in ("fedavg", "fedprox"):
        strategy = make_strategy(name, StrategyOptions(proximal_mu=0.1), min_clients=1)
        record = RoundRecord(round=1)
        valid = screen_train_replies(replies, params, record, {}, False)
        assert [v.num_examples for v in valid] == counts
        ours = aggregate_replies(strategy, 1, valid, record)
        theirs, _ = strategy.aggregate_train(1, replies)
        assert sorted(ours) == sorted(theirs.keys())
        for key in ours:
            assert ours[key].dtype == theirs[key].numpy().dtype
            np.testing.assert_allclose(ours[key], theirs[key].numpy(), rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(ours[key], exact[key], rtol=1e-6, atol=1e-6)
        shuffled = running_mean([valid[i] for i in (2, 0, 3, 1)])  # replies' arrival order
        for key in ours:
            np.testing.assert_array_equal(shuffled[key], ours[key], err_msg=key)
    # the arrays screening keeps are views of the messages' bytes: averaging wrote none
    for client, reply in zip(clients, replies, strict=True):
        for key, value in client.items():
            np.testing.assert_array_equal(reply.content["arrays"][key].numpy(), value)
    # one reply only: the mean is that reply exactly, in a fresh writable array
    alone = running_mean(valid[:1])
    for key, value in clients[0].items():
        np.testing.assert_array_equal(alone[key], value)
    assert all(a.flags.writeable for a in alone.values())


def test_map_arrays_on_threads_keeps_order_and_errors(monkeypatch):
    monkeypatch.setattr(payload_module, "_PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(payload_module, "_PARALLEL_MIN_ITEM", 0)
    items = list(range(37))
    sizes = [(7 * i) % 11 + 1 for i in items]
    assert map_arrays(lambda x: x * x, items, sizes) == [x * x for x in items]

    def fail(x):
        if x == 23:
            raise PayloadError("item 23 is bad")
        return x

    with pytest.raises(PayloadError, match="item 23"):
        map_arrays(fail, items, sizes)


class ScheduledGrid:
    """A Grid whose replies become pullable at given times of a fake clock."""

    def __init__(self, ready_at: list[float]):
        self.now, self.ready_at, self.pulls = 0.0, ready_at, 0

    def push_messages(self, messages):
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
        self.sent = list(messages)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids):
        self.pulls += 1
        ready = zip(self.sent, self.ready_at, strict=True)
        return [Message(RecordDict(), reply_to=m) for m, t in ready
                if m.metadata.message_id in ids and t <= self.now]

    def sleep(self, seconds):
        assert seconds > 0
        self.now += seconds


def test_replies_are_pulled_soon_after_they_arrive(task_identity):
    def send(ready_at, timeout):
        grid = ScheduledGrid(ready_at)
        messages = [Message(RecordDict(), dst_node_id=n + 1, message_type="train")
                    for n in range(len(ready_at))]
        replies = send_and_receive(grid, messages, timeout, clock=lambda: grid.now,
                                   sleep=grid.sleep)
        return grid, sorted(int(r.metadata.reply_to_message_id[1:]) for r in replies)

    # the last reply is ready at 2.5 s: pulled within 1/200 of the wait after it (Flower's
    # deployed grid sleeps 3 s between pulls, its in-memory grid 0.1 s)
    rng = np.random.default_rng(3)
    ready = [float(t) for t in rng.uniform(0.05, 2.5, 7)] + [2.5]
    grid, got = send(ready, 3600.0)
    assert got == list(range(8))
    assert 2.5 <= grid.now <= 2.5 * (1 + 1 / 200) + 1e-9
    assert grid.pulls < 600
    # an hour's wait pulls at most once a second in the end, a few thousand times in all
    grid, got = send([3000.0], 3600.0)
    assert got == [0] and 3000.0 <= grid.now <= 3001.0 and grid.pulls < 6000
    # the timeout returns what arrived, at the deadline, not a sleep later
    grid, got = send([0.2, 0.4, 50.0], 10.0)
    assert got == [0, 1] and grid.now == pytest.approx(10.0)
    grid, got = send([], 10.0)
    assert got == [] and grid.pulls == 0
    # on_reply: each pull's replies handed over as they arrive, none kept
    grid, batches = ScheduledGrid([0.5, 0.5, 2.0]), []
    messages = [Message(RecordDict(), dst_node_id=n + 1, message_type="train") for n in range(3)]
    kept = send_and_receive(grid, messages, 10.0, on_reply=batches.append,
                            clock=lambda: grid.now, sleep=grid.sleep)
    assert kept == [] and [len(b) for b in batches] == [2, 1]


_SECOND_PAYLOAD_FAULTS = """
import resource, sys
import numpy as np
from fedrag_jax.federated.malloc import reuse_large_buffers
tuned = reuse_large_buffers() if sys.argv[1] == "tuned" else False
x = np.random.default_rng(0).standard_normal(6 << 20)  # 48 MiB, a payload's bytes
for _ in range(2):  # the second round's payload is what a long run pays each round
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blob = b"".join((b"npy header", x.data))
    del blob
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_large_payload_buffers_are_reused_from_round_to_round():
    import os
    import subprocess

    def faults(mode: str, **env: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _SECOND_PAYLOAD_FAULTS, mode], check=True,
                             capture_output=True, text=True, env={**os.environ, **env})
        tuned, count = out.stdout.split()
        return tuned, int(count)

    pages = (48 << 20) // 4096
    tuned, untouched = faults("default")
    assert tuned == "False" and untouched > pages // 2  # a fresh mmap: a fault a page
    tuned, reused = faults("tuned")
    assert tuned == "True" and reused < pages // 20  # the freed block came back
    tuned, opted_out = faults("tuned", FEDRAG_JAX_MALLOC="default")
    assert tuned == "False" and opted_out > pages // 2


def test_read_arrayrecord_views_match_numpy_and_refuse_damage():
    params = params_template()
    flat = flatten_params(params)
    record = to_arrayrecord(params)
    views = read_arrayrecord(record, params)
    for key, value in flat.items():
        assert not views[key].flags.writeable  # a view into the message, never copied
        np.testing.assert_array_equal(views[key], record[key].numpy())
        np.testing.assert_array_equal(views[key], value)
    # what to_arrayrecord writes is byte for byte what Flower's Array(ndarray) (np.save) does
    for key, value in flat.items():
        assert record[key].data == Array(value).data, key
    # a Fortran-ordered array (np.save keeps the order) reads back with its values
    key = "query_tower/layers/0/value/kernel"
    fortran = dict(flat)
    fortran[key] = np.asfortranarray(flat[key])
    rec = ArrayRecord({k: Array(v) for k, v in fortran.items()})
    np.testing.assert_array_equal(read_arrayrecord(rec, params)[key], flat[key])
    # truncated .npy bytes are a named error, not a crash or a short array
    rec = to_arrayrecord(params)
    damaged = rec[key]
    rec[key] = Array(dtype=damaged.dtype, shape=damaged.shape, stype=damaged.stype,
                     data=damaged.data[:len(damaged.data) // 2])
    with pytest.raises(PayloadError, match="cannot be read as an array"):
        read_arrayrecord(rec, params)
    with pytest.raises(PayloadError, match="cannot be read as an array"):
        from_arrayrecord(rec, params)



# --- row-sparse updates -----------------------------------------------------------------------
WORDS = "query_tower/word_embeddings/embedding"


def _client_params(params, rng, rows: list[int], scale: float = 0.1):
    """``params`` with every small leaf moved and only ``rows`` of the word embeddings."""
    flat = flatten_params(params)
    out = {k: v + scale * rng.normal(size=v.shape).astype(v.dtype) for k, v in flat.items()}
    words = flat[WORDS].copy()
    words[rows] += scale * rng.normal(size=(len(rows), words.shape[1])).astype(words.dtype)
    out[WORDS] = words
    return out


def _record_reply(record: ArrayRecord, n: int, node: int) -> Message:
    meta = Metadata(run_id=0, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0,
                    message_type="train")
    return Message(RecordDict({"arrays": record, "metrics": MetricRecord(
        {"num-examples": n, "train_loss": 1.0})}), metadata=meta)


def test_row_sparse_upload_is_exact_and_checked():
    rng = np.random.default_rng(11)
    params = params_template()
    base = wire_flat(params)
    rows = [3, 17, 900, 1535]
    mine = _client_params(params, rng, rows)
    record = to_arrayrecord(mine, base=base)
    assert record[WORDS].shape == (4, 32)  # only the changed rows travel, with their indices
    np.testing.assert_array_equal(record[WORDS + "#rows"].numpy(), rows)
    assert record.count_bytes() < to_arrayrecord(mine).count_bytes() / 2
    got = read_arrayrecord(record, params, row_sparse=True)
    assert isinstance(got[WORDS], RowUpdate)
    np.testing.assert_array_equal(got[WORDS].dense(base[WORDS]), mine[WORDS])  # bitwise
    for key, value in mine.items():
        if key != WORDS:
            np.testing.assert_array_equal(got[key], value)
    # a receiver that did not ask for row-sparse updates refuses them
    with pytest.raises(PayloadError, match="extra keys"):
        read_arrayrecord(record, params)
    # damaged indices or values are named errors
    for bad, match in [(np.array([3, 3, 900, 1535], np.int32), "increasing"),
                       (np.array([3, 17, 900, 1536], np.int32), "within"),
                       (np.array([3, 17, 900, 1535], np.int64), "int32"),
                       (np.array([3, 17, 900], np.int32), "has shape")]:
        damaged = ArrayRecord({k: record[k] for k in record.keys()})
        damaged[WORDS + "#rows"] = Array(bad)
        with pytest.raises(PayloadError, match=match):
            read_arrayrecord(damaged, params, row_sparse=True)
    # NaN in a sent row: found (NaN != base, so the row is sent, and checked)
    nan = dict(mine)
    nan[WORDS] = mine[WORDS].copy()
    nan[WORDS][900, 5] = np.nan
    with pytest.raises(PayloadError, match="non-finite"):
        read_arrayrecord(to_arrayrecord(nan, base=base), params, row_sparse=True)
    # more than half the rows changed: the leaf travels whole
    dense = _client_params(params, rng, list(range(0, 1536, 2)) + [1])
    assert WORDS + "#rows" not in to_arrayrecord(dense, base=base).keys()


def test_row_sparse_mean_equals_the_dense_weighted_mean():
    rng = np.random.default_rng(12)
    params = params_template()
    base = wire_flat(params)
    counts = [7, 2, 11]
    clients = [_client_params(params, rng, [3, 17, 900]),
               _client_params(params, rng, [17, 18, 1200]),
               _client_params(params, rng, list(range(0, 1536, 2)) + [1])]  # sent whole
    records = [to_arrayrecord(c, base=base) for c in clients]
    assert [WORDS + "#rows" in r.keys() for r in records] == [True, True, False]
    replies = [_record_reply(r, n, i + 1)
               for i, (r, n) in enumerate(zip(records, counts, strict=True))]
    record = RoundRecord(round=1)
    valid = screen_train_replies(replies, params, record, {1: 0, 2: 1, 3: 2}, True, base=base)
    ours = running_mean(valid, base)
    assert_close(ours, weighted_average(clients, counts), atol=1e-6)
    for c in range(3):  # the clients' params the server records are whole and exact
        for key, value in clients[c].items():
            np.testing.assert_array_equal(record.client_params[c][key], value)
    # two sparse replies only: the rows neither changed are exactly the global ones
    ours = running_mean(valid[:2], base)
    untouched = np.setdiff1d(np.arange(1536), [3, 17, 18, 900, 1200])
    np.testing.assert_array_equal(ours[WORDS][untouched], base[WORDS][untouched])
    assert_close(ours, weighted_average(clients[:2], counts[:2]), atol=1e-6)


def test_running_mean_rejects_non_finite_replies_it_did_not_screen():
    rng = np.random.default_rng(13)
    params = params_template()
    base = wire_flat(params)
    counts = [5, 3, 4]
    clients = [_client_params(params, rng, [3, 17]) for _ in counts]
    clients[1][WORDS] = clients[1][WORDS].copy()
    clients[1][WORDS][17, 0] = np.inf  # in a row-sparse leaf
    replies = [_record_reply(to_arrayrecord(c, base=base), n, i + 1)
               for i, (c, n) in enumerate(zip(clients, counts, strict=True))]
    record = RoundRecord(round=1)
    valid = screen_train_replies(replies, params, record, {1: 0, 2: 1, 3: 2}, True,
                                 base=base, check_finite=False)
    assert len(valid) == 3 and not record.rejected  # not read for NaN / inf yet
    running = RunningMean(base)
    fold_replies(running, valid, record)
    out = finish_mean(running, record, min_clients=2)
    assert [r["client_id"] for r in record.rejected] == [1]
    assert WORDS in record.rejected[0]["reason"] and "non-finite" in record.rejected[0]["reason"]
    assert [c.client_id for c in record.clients] == [0, 2]
    assert sorted(record.client_params) == [0, 2]
    assert_close(out, weighted_average([clients[0], clients[2]], [5, 4]), atol=1e-6)
    # too few finite replies left: no average, and the record says why
    record = RoundRecord(round=2)
    valid = screen_train_replies(replies[:2], params, record, {}, False, base=base,
                                 check_finite=False)
    running = RunningMean(base)
    fold_replies(running, valid, record)
    assert finish_mean(running, record, min_clients=2) is None
    assert "fewer than min_clients=2" in record.note and len(record.rejected) == 1
    # values near float32's limit average without overflow (float64 sums)
    huge = {k: np.full_like(v, 3e38) for k, v in wire_flat(params).items()}
    running = RunningMean()
    assert running.add(huge, 1) is None and running.add(huge, 3) is None
    for key, value in running.mean().items():
        np.testing.assert_array_equal(value, huge[key])

# --- local training and FedProx on a toy model (compiles in a blink) --------------------------
class Toy(nnx.Module):
    def __init__(self):
        self.linear = nnx.Linear(3, 1, rngs=nnx.Rngs(0))


def toy_objective(model: Toy, batch):
    pred = model.linear(batch["x"])[:, 0]
    err = jnp.square(pred - batch["y"]) * batch["example_mask"]
    return jnp.sum(err) / jnp.maximum(jnp.sum(batch["example_mask"]), 1.0), {}


class ToyData:
    def __init__(self, n: int, seed: int, batch_size: int = 4):
        rng = np.random.default_rng(seed)
        self.x = rng.normal(size=(n, 3)).astype(np.float32)
        self.y = (self.x @ np.array([1.0, -2.0, 0.5], np.float32)).astype(np.float32)
        self.n, self.batch_size = n, batch_size

    def __len__(self):
        return -(-self.n // self.batch_size)

    def batch_at(self, epoch, index):
        rows = np.arange(index * self.batch_size, (index + 1) * self.batch_size)
        valid = rows < self.n
        rows = np.where(valid, rows, 0)
        return {"x": self.x[rows], "y": self.y[rows], "example_mask": valid}


def test_local_train_reports_real_losses_and_counts():
    data = ToyData(10, 0)  # 3 batches, the last one half padding
    state = TrainState.create(Toy(), optax.sgd(0.05), nnx.Param)
    step = ClientStep(toy_objective)
    by_hand = []
    ref = state
    for pos in range(2, 7):  # from data position 2: batches 2, 0, 1, 2, 0 (epochs roll over)
        ref_loss, _ = toy_objective(ref.model(), data.batch_at(*divmod(pos, 3)))
        by_hand.append(float(ref_loss))
        grads = nnx.grad(lambda m, pos=pos: toy_objective(m, data.batch_at(*divmod(pos, 3)))[0])(
            ref.model())
        updated = jax.tree.map(lambda p, g: p - 0.05 * g, ref.params, nnx.state(grads, nnx.Param))
        ref = ref.replace(params=updated)
    trained, metrics = local_train(state, data, 5, 2, step=step)
    assert metrics["train_loss"] == pytest.approx(np.mean(by_hand), rel=1e-5)
    assert metrics["num_examples"] == 10
    assert metrics["examples_seen"] == 2 + 4 + 4 + 2 + 4
    assert_close(flatten_params(trained.params), flatten_params(ref.params), atol=1e-6)
    assert trained.frozen is not None


def test_prox_objective_pulls_towards_the_global_params():
    state = TrainState.create(Toy(), optax.sgd(0.05), nnx.Param)
    anchor = jax.tree.map(lambda x: x + 1.0, state.params)
    mu = 0.3

    def zero(model, batch):
        return 0.0 * jnp.sum(model.linear.kernel[...]), {}

    def loss_of(params):
        return prox_objective(zero, anchor, mu)(nnx.merge(state.graphdef, params, state.frozen),
                                                None)[0]

    grads = jax.grad(loss_of)(state.params)
    for g, w, a in zip(jax.tree.leaves(grads), jax.tree.leaves(state.params),
                       jax.tree.leaves(anchor), strict=True):
        np.testing.assert_allclose(g, mu * (w - a), rtol=1e-6)  # d/dw mu/2 ||w - a||^2
    data = ToyData(12, 1)
    far = {}
    for m in (0.0, 5.0):
        start = TrainState.create(Toy(), optax.sgd(0.05), nnx.Param)
        init = flatten_params(start.params)
        out, metrics = local_train(start, data, 6, 0, step=ClientStep(toy_objective, mu=m))
        far[m] = sum(float(np.sum((v - init[k]) ** 2))
                     for k, v in flatten_params(out.params).items())
        assert np.isfinite(metrics["train_loss"])
    assert far[5.0] < far[0.0]


def test_task_validates_its_config():
    with pytest.raises(ConfigError, match="min_clients=4 exceeds num_clients=3"):
        make_task(3, min_clients=4)
    with pytest.raises(ConfigError, match="unknown federated strategy"):
        make_task(3, strategy="fedsgd")


# --- the Flower simulation (Ray) --------------------------------------------------------------
@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent XLA cache for the Ray actors: the second simulation's clients load the
    train step instead of compiling it again."""
    return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla-cache"))}


@pytest.fixture(scope="module")
def flower_fedavg(tmp_path_factory, compile_cache):
    task = make_task(3)
    checkpoints = tmp_path_factory.mktemp("flower-ckpt")
    start = time.perf_counter()
    result = task.run_flower(record_client_params=True, actor_env=compile_cache,
                             checkpoint_dir=str(checkpoints))
    print(f"flower simulation: {time.perf_counter() - start:.1f}s")
    return task, result, checkpoints


def test_flower_fedavg_is_the_weighted_average_of_real_client_updates(flower_fedavg):
    task, result, _ = flower_fedavg
    assert [r.round for r in result.history] == [1, 2]
    initial = flatten_params(task.initial_params())
    final = flatten_params(result.params)
    assert any(not np.allclose(final[k], initial[k]) for k in final)
    sizes = [d.n for d in task.client_data]
    global_params = task.initial_params()
    for record in result.history:
        assert record.aggregated and not record.rejected and not record.failed
        assert sorted(c.client_id for c in record.clients) == [0, 1, 2]
        by_client = {c.client_id: c for c in record.clients}
        for cid in range(3):
            # what this client computes locally from the global params == what it sent
            params, metrics = task.client_update(cid, global_params, record.round)
            assert_close(flatten_params(params), record.client_params[cid])
            assert by_client[cid].train_loss == pytest.approx(metrics["train_loss"], rel=1e-5)
            assert by_client[cid].num_examples == sizes[cid] == metrics["num_examples"]
        averaged = weighted_average([record.client_params[c] for c in range(3)], sizes)
        global_params = jax.tree.unflatten(jax.tree.structure(task.initial_params()),
                                           [averaged[k] for k in initial])
        global_params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), global_params)
        # the clients evaluated the new global params on their own eval data
        assert [e["client_id"] for e in record.evaluation] == [0, 1, 2]
        for e in record.evaluation:
            mine = task.client_evaluate(e["client_id"], global_params)
            assert e["eval_loss"] == pytest.approx(mine["eval_loss"], rel=1e-5)
    assert_close(final, flatten_params(global_params))
    losses = [r.train_loss for r in result.history]
    assert losses[1] < losses[0]  # it learns


def test_flower_simulation_ships_the_task_to_actors_once():
    """Ray pickles the ClientApp into every message; inside a simulation the task in it
    pickles as (token, object ref), its state put into Ray's object store once."""
    import pickle

    import ray
    from ray import cloudpickle  # what Ray pickles task arguments with

    from fedrag_jax.federated.client import _TASKS
    from fedrag_jax.federated.simulation import _shipped_through_ray

    task = make_task(2, eval_data=False)
    whole = len(cloudpickle.dumps(make_client_app(task)))
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        with _shipped_through_ray(task):
            blobs = [cloudpickle.dumps(make_client_app(task)) for _ in range(3)]
            assert max(len(b) for b in blobs) < whole / 20
            received = pickle.loads(blobs[0]).__class__  # a ClientApp
            app = pickle.loads(blobs[1])
            assert received is type(app)
            copy = _TASKS[task.token]  # fetched once from the object store, then kept
            assert copy is not task and copy.token == task.token
            pickle.loads(blobs[2])
            assert _TASKS[task.token] is copy
            assert_close(flatten_params(copy.initial_params()),
                         flatten_params(task.initial_params()), atol=0)
        assert len(cloudpickle.dumps(task)) > whole / 2  # outside a simulation: the state
    finally:
        ray.shutdown()
        _TASKS.pop(task.token, None)


def test_flower_checkpoints_every_round(flower_fedavg):
    task, result, checkpoints = flower_fedavg
    ckpt, done, params, server, history = open_run(task, checkpoints, resume=True)
    ckpt.close()
    assert done == 2 and server is None
    assert [r.round for r in history] == [1, 2]
    assert history[1].losses() == pytest.approx(result.history[1].losses())
    assert_close(flatten_params(params), flatten_params(result.params), atol=0)


def test_spmd_equals_flower_for_fedavg(flower_fedavg):
    task, result, _ = flower_fedavg
    spmd = task.run_spmd(devices=jax.devices()[:6])  # 3 clients x 2 devices
    assert_close(flatten_params(spmd.params), flatten_params(result.params))
    for a, b in zip(spmd.history, result.history, strict=True):
        assert a.losses() == pytest.approx(b.losses(), rel=1e-4)
        assert [c.num_examples for c in sorted(a.clients, key=lambda c: c.client_id)] == \
            [c.num_examples for c in sorted(b.clients, key=lambda c: c.client_id)]
        assert a.eval_loss == pytest.approx(b.eval_loss, rel=1e-4)


@pytest.fixture
def task_identity():
    """Server-made Messages read the process's Flower task identity (a run sets it)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.mark.parametrize("strategy", ["fedadam", "fedprox"])
def test_flower_server_equals_spmd_and_resumes(flower_fedavg, tmp_path, task_identity,
                                               strategy):
    """The ServerApp's loop and the ClientApp's handlers (in process) against the SPMD
    simulator: FedAdam's server moments, FedProx's mu (sent as the config's proximal-mu)."""
    task, fedavg, _ = flower_fedavg
    original, options = task.config, task.options
    grid = LocalGrid(make_client_app(task), 3)
    try:
        task.config = dataclasses.replace(original, strategy=strategy)
        task.options = StrategyOptions(proximal_mu=2.0)
        straight = serve(grid, task, ServerRun())
        spmd = task.run_spmd(devices=jax.devices()[:6])
        assert_close(flatten_params(spmd.params), flatten_params(straight.params))
        for a, b in zip(spmd.history, straight.history, strict=True):
            assert a.losses() == pytest.approx(b.losses(), rel=1e-4)
        if strategy == "fedadam":  # stop after round 1, resume: needs the restored moments
            task.config = dataclasses.replace(original, strategy=strategy, rounds=1)
            serve(grid, task, ServerRun(checkpoint_dir=str(tmp_path)))
            task.config = dataclasses.replace(original, strategy=strategy)
            resumed = serve(grid, task, ServerRun(checkpoint_dir=str(tmp_path)))
            assert [r.round for r in resumed.history] == [1, 2]
            # (not bit for bit: Flower samples the nodes, and so orders the sum, at random)
            assert_close(flatten_params(resumed.params), flatten_params(straight.params))
    finally:
        task.config, task.options = original, options
    mine, avg = flatten_params(straight.params), flatten_params(fedavg.params)
    assert max(float(np.abs(mine[k] - avg[k]).max()) for k in mine) > 1e-3  # not FedAvg


def faulty_mod(msg, context, call_next):
    """Client 1 always raises; client 3 raises in round 2; client 2 sends NaN in round 1 and
    a wrongly shaped array in round 2 (a Flower mod, run inside the Ray actors)."""
    if msg.metadata.message_type != "train":
        return call_next(msg, context)
    cid = int(context.node_config["partition-id"])
    round_ = int(msg.content["config"]["server-round"])
    if cid == 1 or (cid == 3 and round_ == 2):
        raise RuntimeError(f"client {cid} lost its disk")
    reply = call_next(msg, context)
    if cid == 2:
        arrays = reply.content["arrays"]
        key = "query_tower/pooler/kernel"
        value = arrays[key].numpy()
        arrays[key] = Array(np.full_like(value, np.nan) if round_ == 1 else value[:-1])
    return reply


def test_faulty_clients_are_left_out_and_reported(compile_cache):
    task = make_task(4, eval_data=False)
    result = task.run_flower(record_client_params=True, actor_env=compile_cache,
                             mods=[faulty_mod])
    first, second = result.history
    # round 1: client 1 raised, client 2 sent NaN; 0 and 3 (>= min_clients=2) aggregated
    assert first.aggregated
    assert sorted(c.client_id for c in first.clients) == [0, 3]
    assert [f["client_id"] for f in first.failed] == [1]
    assert "client 1 lost its disk" in first.failed[0]["reason"]
    assert [r["client_id"] for r in first.rejected] == [2]
    assert "non-finite" in first.rejected[0]["reason"]
    sizes = {c.client_id: c.num_examples for c in first.clients}
    averaged = weighted_average([first.client_params[0], first.client_params[3]],
                                [sizes[0], sizes[3]])
    # round 2: only client 0 is valid (< min_clients): the global params are kept
    assert not second.aggregated and "fewer than min_clients=2" in second.note
    assert sorted(f["client_id"] for f in second.failed) == [1, 3]
    assert [r["client_id"] for r in second.rejected] == [2]
    assert "has shape" in second.rejected[0]["reason"]
    assert [c.client_id for c in second.clients] == [0]
    assert_close(flatten_params(result.params), averaged)


# --- the SPMD simulator -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def spmd4():
    task = make_task(4, eval_data=False)
    sim = SpmdSimulator(task, devices_per_client=2)
    task._simulators[(None, 2, None)] = sim  # run_spmd(devices_per_client=2) reuses it
    return task, sim


def test_spmd_lays_each_client_on_its_own_two_devices(spmd4):
    task, sim = spmd4
    assert dict(sim.mesh.shape) == {"clients": 4, "data": 2, "fsdp": 1, "tensor": 1}
    params = jax.device_put(task.initial_params(), sim.params_sharding)
    stacked = sim.init(params, jnp.arange(4, dtype=jnp.int32), jnp.asarray(0, jnp.int32))
    batch = sim.put_batch({k: np.stack([d.batch_at(0, 0)[k] for d in task.client_data])
                           for k in task.client_data[0].batch_at(0, 0)})
    leaves = jax.tree.leaves(stacked.params) + jax.tree.leaves(stacked.opt_state) \
        + list(batch.values())
    for leaf in leaves:
        assert leaf.shape[0] == 4
        for c in range(4):
            assert slice_devices(leaf, c) == devices_of_group(sim.mesh, c)
            assert len(devices_of_group(sim.mesh, c)) == 2
    # inside a client's slice, its batch is split over its 2 devices (data parallel)
    ids = batch["query_ids"]
    assert ids.sharding.spec == jax.sharding.PartitionSpec("clients", "data")
    assert {s.data.shape for s in ids.addressable_shards} == {(1, 2, ids.shape[2])}


def test_spmd_equals_single_client_runs_then_fedavg(spmd4):
    task, _ = spmd4
    result = task.run_spmd(devices_per_client=2, record_client_params=True)
    sizes = [d.n for d in task.client_data]
    global_params = task.initial_params()
    structure = jax.tree.structure(global_params)
    keys = list(flatten_params(global_params))
    for record in result.history:
        flats = []
        for cid in range(4):
            params, metrics = task.client_update(cid, global_params, record.round)
            flats.append(flatten_params(params))
            assert_close(flats[-1], record.client_params[cid])
            assert record.losses()[cid] == pytest.approx(metrics["train_loss"], rel=1e-4)
        averaged = weighted_average(flats, sizes)
        global_params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), jax.tree.unflatten(
            structure, [averaged[k] for k in keys]))
    assert_close(flatten_params(result.params), flatten_params(global_params))
    merged = task.model_with(result.params)  # the model a caller gets back
    assert_close(flatten_params(nnx.state(merged, QUERY_TOWER)), flatten_params(result.params),
                 atol=0)


def test_spmd_resumes_after_the_last_completed_round(spmd4, tmp_path):
    task, _ = spmd4
    straight = task.run_spmd(devices_per_client=2)
    full = task.config
    try:
        task.config = dataclasses.replace(full, rounds=1)
        first = task.run_spmd(devices_per_client=2, checkpoint_dir=str(tmp_path))
        assert [r.round for r in first.history] == [1]
        task.config = full
        resumed = task.run_spmd(devices_per_client=2, checkpoint_dir=str(tmp_path))
    finally:
        task.config = full
    assert [r.round for r in resumed.history] == [1, 2]
    assert resumed.history[0].losses() == pytest.approx(first.history[0].losses())
    assert_close(flatten_params(resumed.params), flatten_params(straight.params), atol=1e-6)


def test_spmd_rejects_a_diverged_client(spmd4):
    task, sim = spmd4
    poisoned = lsr_dataset(task.client_data[2].n, 7)
    poisoned.arrays["passage_emb"] = np.full_like(poisoned.arrays["passage_emb"], np.nan)
    original = task.client_data[2]
    task.client_data[2] = poisoned
    try:
        result = task.run_spmd(devices_per_client=2)
    finally:
        task.client_data[2] = original
    for record in result.history:
        assert [r["client_id"] for r in record.rejected] == [2]
        assert "non-finite" in record.rejected[0]["reason"]
        assert sorted(c.client_id for c in record.clients) == [0, 1, 3]
    assert all(np.isfinite(v).all() for v in flatten_params(result.params).values())



def test_partial_participation_samples_the_same_clients_on_both_engines(spmd4, task_identity):
    """fraction_train < 1: the Flower server trains the clients the SPMD engine samples
    (one seeded draw per round), so both engines still give the same parameters."""
    task, _ = spmd4
    original = task.config
    try:
        task.config = dataclasses.replace(original, fraction_train=0.5, rounds=3)
        spmd = task.run_spmd(devices_per_client=2)
        flower = serve(LocalGrid(make_client_app(task), 4), task, ServerRun())
    finally:
        task.config = original
    chosen = [sorted(c.client_id for c in r.clients) for r in spmd.history]
    assert all(len(c) == 2 for c in chosen) and len({tuple(c) for c in chosen}) > 1
    assert [sorted(c.client_id for c in r.clients) for r in flower.history] == chosen
    assert_close(flatten_params(spmd.params), flatten_params(flower.params))


# --- differential privacy (Flower's client-side fixed clipping) -------------------------------
def _norm(flat: dict, base: dict) -> float:
    return float(np.sqrt(sum(np.sum((flat[k].astype(np.float64) - base[k]) ** 2) for k in flat)))


def test_dp_clips_every_client_update_and_noises_the_average(task_identity):
    task = make_task(3, rounds=1, eval_data=False)
    start = task.initial_params()
    base = {k: v.astype(np.float64) for k, v in flatten_params(start).items()}
    raw = {cid: flatten_params(task.client_update(cid, start, 1)[0]) for cid in range(3)}
    norms = {cid: _norm(raw[cid], base) for cid in range(3)}
    clip = 0.5 * min(norms.values())  # bites on every client
    sizes = [d.n for d in task.client_data]
    original = task.config
    try:
        task.config = dataclasses.replace(original, dp_clipping_norm=clip)
        grid = LocalGrid(make_client_app(task), 3)
        clipped = serve(grid, task, ServerRun(record_client_params=True))
        task.config = dataclasses.replace(original, dp_clipping_norm=clip,
                                          dp_noise_multiplier=2.0)
        noisy = serve(grid, task, ServerRun())
    finally:
        task.config = original
    (record,) = clipped.history
    sent = record.client_params
    for cid in range(3):
        # what left the client: the update scaled onto the clipping norm, same direction
        assert _norm(sent[cid], base) <= clip * (1 + 1e-5)
        assert _norm(sent[cid], base) == pytest.approx(clip, rel=1e-4)
        scale = clip / norms[cid]
        assert_close(sent[cid], {k: base[k] + scale * (raw[cid][k] - base[k]) for k in base},
                     atol=1e-6)
    # noise 0: the aggregate is the *uniform* average of the clipped updates: the noise
    # (std z * clip / clients) is calibrated for it, not for example-count weights
    assert len(set(sizes)) > 1
    assert_close(flatten_params(clipped.params), weighted_average(
        [sent[c] for c in range(3)], [1, 1, 1]))
    # noise multiplier z: the aggregate moves by N(0, (z * clip / clients)^2) per coordinate
    a, b = flatten_params(noisy.params), flatten_params(clipped.params)
    diff = np.concatenate([(a[k].astype(np.float64) - b[k]).ravel() for k in a])
    std = 2.0 * clip / 3
    assert diff.size > 5000
    assert diff.std() == pytest.approx(std, rel=0.05)
    assert abs(diff.mean()) < 5 * std / np.sqrt(diff.size)


def test_dp_settings_are_checked():
    with pytest.raises(ConfigError, match="needs dp_clipping_norm"):
        task = make_task(2, eval_data=False)
        task.config = dataclasses.replace(task.config, dp_noise_multiplier=1.0)
        task._validate()
    task = make_task(2, eval_data=False)
    task.config = dataclasses.replace(task.config, dp_clipping_norm=1.0)
    with pytest.raises(ConfigError, match="Flower paths"):
        task.run_spmd()
    # the noise is calibrated for a uniform mean: rules that are not one are refused
    for strategy in ("fedadam", "fedmedian"):
        task.config = dataclasses.replace(task.config, strategy=strategy)
        with pytest.raises(ConfigError, match="fedavg or fedprox"):
            task._validate()
        with pytest.raises(ConfigError, match="fedavg or fedprox"):
            make_strategy(strategy, StrategyOptions(), min_clients=2, dp_clipping_norm=1.0)


# --- secure aggregation (SecAgg+ on Flower's legacy workflow) ---------------------------------
def test_secagg_equals_fedavg_within_its_quantisation(compile_cache, tmp_path):
    from fedrag_jax.federated.secagg import tolerance

    task = make_task(3, rounds=1, eval_data=False)
    task.config = dataclasses.replace(task.config, secagg=True, secagg_num_shares=3,
                                      secagg_reconstruction_threshold=2,
                                      secagg_clipping_range=4.0,
                                      secagg_quantization_range=2 ** 20, secagg_max_weight=16.0)
    start = task.initial_params()
    sizes = [d.n for d in task.client_data]
    exact = weighted_average([flatten_params(task.client_update(c, start, 1)[0])
                              for c in range(3)], sizes)
    assert max(float(np.abs(v).max()) for v in exact.values()) < 4.0  # inside the clip range
    result = task.run_flower(actor_env=compile_cache, checkpoint_dir=str(tmp_path))
    (record,) = result.history
    assert record.aggregated and "secure aggregation" in record.note
    got = flatten_params(result.params)
    tol = tolerance(task.config, sizes)
    assert tol < 1e-4
    err = max(float(np.abs(got[k] - exact[k]).max()) for k in exact)
    assert err <= tol + 1e-6, (err, tol)
    assert err > 0  # it went through quantisation, not a plain average
    ckpt, done, params, _, _ = open_run(task, tmp_path, resume=True)
    ckpt.close()
    assert done == 1
    assert_close(flatten_params(params), got, atol=0)


def test_secagg_settings_are_checked():
    with pytest.raises(ConfigError, match="FedAvg only"):
        task = make_task(2, eval_data=False)
        task.config = dataclasses.replace(task.config, secagg=True, strategy="fedadam")
        task._validate()
    with pytest.raises(ConfigError, match="must be > 2"):
        task = make_task(2, eval_data=False)
        task.config = dataclasses.replace(task.config, secagg=True, secagg_num_shares=2)
        task._validate()


# --- per-client knowledge stores through the manager (fed.client_stores) ----------------------
def shard_manager(tmp_path, client_stores: str, engine: str = "spmd", *extra: str):
    """A manager on tiny models: 24 passages in 4 topics, 12 records naming a gold passage."""
    from fedrag_jax.config import load_config
    from fedrag_jax.finetune.manager import FinetuneManager
    from fedrag_jax.knowledge_store import ExactKnowledgeStore
    from fedrag_jax.rag import RAGSystem
    from fedrag_jax.sharding import make_mesh
    from fedrag_jax.types import RAGConfig
    from tests.helpers import tiny_rag_parts

    retriever, plain, generator, _ = tiny_rag_parts(tmp_path, num_passages=24, seed=3)
    ids = plain.node_ids()
    nodes = plain.get(ids)
    store = ExactKnowledgeStore(mesh=plain.mesh)
    topic = {i: f"t{n % 4}" for n, i in enumerate(ids)}
    store.add_arrays(ids, np.stack([n.embedding for n in nodes]), [n.text for n in nodes],
                     [{"topic": topic[i]} for i in ids])
    rng = np.random.default_rng(5)
    golds = rng.choice(24, 12, replace=False)
    records = [{"query": " ".join(f"w{i}" for i in rng.integers(4, 96, 4)),
                "response": " ".join(f"w{i}" for i in rng.integers(4, 96, 3)),
                "gold_id": ids[g], "topic": topic[ids[g]]} for g in golds]
    config = load_config(None, [
        "mode=retriever", "federated=true", f"output_dir={tmp_path / 'run'}", "progress=false",
        "lsr.batch_size=2", "lsr.max_length=128", "lsr.learning_rate=1e-2", "ralt.batch_size=2",
        "ralt.lora_rank=2", "ralt.max_length=128", "retrieval.top_k=3",
        "retrieval.max_context_tokens=64", "fed.num_clients=2", "fed.rounds=2",
        "fed.local_steps=2", "fed.partition=topic", "fed.min_clients=2",
        f"fed.client_stores={client_stores}", f"fed.engine={engine}", *extra])
    rag = RAGSystem(retriever, store, generator,
                    RAGConfig(top_k=3, prompt_template="w4 {context} w5 {query} w6"))
    return FinetuneManager(rag, records, [], config, mesh=make_mesh(None, jax.devices()[:1]))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    manager = shard_manager(tmp_path_factory.mktemp("shards"), "partition")
    from fedrag_jax.federated.partition import partition_from_config

    parts = partition_from_config(manager.train_records, manager.config.fed, seed=0)
    return manager, parts, manager.client_stores(parts), manager.get_federated_task("lsr")


def test_partition_stores_shard_the_store_once(sharded):
    manager, parts, stores, _ = sharded
    store = manager.rag.store
    ids = [s.node_ids() for s in stores]
    assert sorted(sum(ids, [])) == sorted(store.node_ids())  # covering
    assert not set(ids[0]) & set(ids[1])  # disjoint
    assert min(len(i) for i in ids) >= 3  # each can answer a top-3 search
    # the shards hold one copy of the matrix between them, each its own exact index
    assert sum(s._emb.shape[0] for s in stores) == store.count
    for c, s in enumerate(stores):
        assert s is not store and s.mesh is store.mesh
        topics = {manager.train_records[r]["topic"] for r in parts[c]}
        for r in parts[c]:
            assert manager.train_records[r]["gold_id"] in ids[c]
        assert {m["topic"] for m in s.node_metadata()} == topics  # topic partition: its own


def test_partition_stores_lsr_batches_come_from_the_clients_shard(sharded):
    manager, parts, stores, task = sharded
    for c, (data, store) in enumerate(zip(task.client_data, stores, strict=True)):
        mine = set(store.node_ids())
        assert data.n == len(parts[c])
        assert {str(i) for i in data.passage_ids.ravel()} <= mine
        shard_emb = store._emb[:store.count]
        other = stores[1 - c]._emb[:stores[1 - c].count]
        for index in range(len(data)):
            emb = data.batch_at(0, index)["passage_emb"].reshape(-1, shard_emb.shape[1])
            for e in emb:  # every candidate's embedding is a row of this client's shard only
                assert np.abs(shard_emb - e).max(axis=1).min() == 0
                assert np.abs(other - e).max(axis=1).min() > 1e-3
    # the clients' batches share one shape: the SPMD engine stacks them
    shapes = [{k: v.shape for k, v in d.batch_at(0, 0).items()} for d in task.client_data]
    assert shapes[0] == shapes[1]


def test_partition_stores_ralt_prompts_hold_the_clients_passages(sharded):
    from fedrag_jax.federated.local import stack_batches

    manager, parts, stores, _ = sharded
    task = manager.get_federated_task("ralt")
    tok = manager.rag.generator.tokenizer
    for c, data in enumerate(task.client_data):
        passages = [tok(n.text, add_special_tokens=False)["input_ids"]
                    for n in stores[c].get(stores[c].node_ids())]
        seen = 0
        assert data.pack_rows  # ralt.pack: federated clients pack too
        for index in range(len(data)):
            batch = data.batch_at(0, index)
            for i, w in enumerate(batch["weights"]):
                if w == 0:
                    continue
                ids = " ".join(map(str, packed_instance(batch, i)))
                assert any(" ".join(map(str, p)) in ids for p in passages)
                seen += 1
        assert seen == 3 * data.n  # top-3 instances per record
    stack_batches(client_batches(task.client_data, 0))  # SPMD: one shape


def packed_instance(batch: dict, i: int) -> np.ndarray:
    """Instance ``i`` of a packed RALT batch: the shared prefix, then its segment's tokens."""
    row = batch["instance_row"][i]
    segment = batch["segment_ids"][row, batch["target_index"][i, 0]]
    own = batch["input_ids"][row][batch["segment_ids"][row] == segment]
    return np.concatenate([batch.get("prefix_ids", np.zeros(0, np.int32)), own])


@pytest.fixture(scope="module")
def ralt_tasks(tmp_path_factory):
    """Federated RALT on per-client shards, packed (the default) and not."""
    packed = shard_manager(tmp_path_factory.mktemp("ralt-packed"), "partition")
    plain = shard_manager(tmp_path_factory.mktemp("ralt-plain"), "partition", "spmd",
                          "ralt.pack=false")
    return packed.get_federated_task("ralt"), plain.get_federated_task("ralt")


def test_packed_federated_ralt_lines_up_the_clients_batches(ralt_tasks):
    packed, _ = ralt_tasks
    data = packed.client_data
    assert data[0].prefix_length == data[1].prefix_length > 0  # one shared prefix
    lengths = set()
    for pos in range(4):
        alone = [d.batch_at(*position(d, pos))["input_ids"].shape[1] for d in data]
        batches = client_batches(data, pos)
        assert {b["input_ids"].shape for b in batches} == {batches[0]["input_ids"].shape}
        assert batches[0]["input_ids"].shape[1] == max(alone)
        lengths.update(alone)
        for d, b in zip(data, batches, strict=True):  # the same instances, padded rows
            own = d.batch_at(*position(d, pos))
            for i in range(len(b["weights"])):
                np.testing.assert_array_equal(packed_instance(b, i), packed_instance(own, i))
    assert len(lengths) > 1  # the clients' own lengths differ somewhere: the longest wins


def assert_engines_agree(task, *others) -> None:
    """``task`` trains on the SPMD simulator (2 clients x 1 device), and the Flower ServerApp
    loop with the ClientApp's handlers (in process) and ``others`` (results of other runs)
    end at the same params and losses."""
    spmd = task.run_spmd(devices=jax.devices()[:2])
    flower = serve(LocalGrid(make_client_app(task), 2), task, ServerRun())
    initial = flatten_params(task.initial_params())
    final = flatten_params(spmd.params)
    assert max(float(np.abs(final[k] - initial[k]).max()) for k in final) > 1e-4  # it trained
    for other in (flower, *others):
        assert_close(final, flatten_params(other.params))
        for a, b in zip(spmd.history, other.history, strict=True):
            assert a.losses() == pytest.approx(b.losses(), rel=1e-4)


def test_packed_federated_ralt_equals_unpacked_on_both_engines(ralt_tasks, task_identity):
    packed, plain = ralt_tasks
    assert_engines_agree(packed, plain.run_spmd(devices=jax.devices()[:2]))


def test_partition_stores_spmd_equals_flower(sharded, task_identity):
    """FedAvg on per-client shards: the SPMD simulator == the Flower ServerApp loop with the
    ClientApp's handlers (in process)."""
    assert_engines_agree(sharded[3])


def test_shared_stores_are_the_split_of_one_dataset(tmp_path):
    """client_stores=shared (the default) is the old path: one dataset over the shared store,
    cut by the partition, bit for bit."""
    from fedrag_jax.config import FederatedConfig as F
    from fedrag_jax.federated.partition import partition_from_config
    from fedrag_jax.federated.shards import client_stores

    assert F().client_stores == "shared"
    manager = shard_manager(tmp_path, "shared")
    assert manager.client_stores([np.arange(6), np.arange(6, 12)]) is None
    task = manager.get_federated_task("lsr")
    full = manager.lsr_dataset(manager.train_records)
    parts = partition_from_config(manager.train_records, manager.config.fed, seed=0)
    for data, p in zip(task.client_data, parts, strict=True):
        for k, v in full.arrays.items():
            np.testing.assert_array_equal(data.arrays[k], v[p])
        np.testing.assert_array_equal(data.passage_ids, full.passage_ids[p])
    # retrieval over the whole store: some client ranks a passage outside its own shard
    stores = client_stores(manager.rag.store, manager.train_records, parts,
                           manager.config.fed)  # the shards partition mode would cut
    assert any(not {str(i) for i in d.passage_ids.ravel()} <= set(s.node_ids())
               for d, s in zip(task.client_data, stores, strict=True))
