"""Federated benchmark: per-round overhead, bytes per round, SPMD simulator vs Flower (Ray).

What is measured:

1. Per-round overhead as a share of round time, on a real federated LSR round (query tower
   trainable) and a RALT round (LoRA adapters of the generator trainable). The pieces of a
   Flower round are timed one by one, in this process, with the functions the ServerApp and
   ClientApp call:
       server serialize    payload.to_arrayrecord(global params)
       client deserialize  payload.from_arrayrecord(global record)  (validates it)
       client training     FederatedTask.client_update (local_steps steps, compiled before;
                           every client trains once, the median is the round's time and
                           the server reads their distinct replies)
       client serialize    payload.to_arrayrecord(client params, base=received): a large
                           matrix's changed rows only (row-sparse, exact)
       wire encoding       Array.deflate of every array (what a deployed transport sends)
       server, per reply   server.receive_train: as each reply arrives, screen_train_replies
                           (read_arrayrecord: zero-copy views of the reply's bytes + checks of
                           keys, shapes, dtypes, row indices) and fold_replies (its NaN / inf
                           check, then RunningMean.add); timed reply by reply. On the critical
                           path is what is left when the last reply arrives: the replies are
                           worked through in arrival order, arriving at the clients' measured
                           round times, so the earlier ones are folded while others train
       finish mean         server.finish_mean (RunningMean.mean: the float64 sums divided
                           and rounded to float32; the row-sparse leaves' sent rows added to
                           the global ones)
       final deserialize   payload.unflatten_params(aggregate, cast=True, copy=False)
       reply wait          the delay between the last reply becoming available and the
                           server holding it: server.send_and_receive polling a grid whose
                           replies become ready at the clients' measured round times (real
                           clock). Flower's own Grid.send_and_receive loops, which pull at a
                           fixed interval (simulation 0.1 s, deployed 3 s), are timed on the
                           same grid for reference.
   Flower's own FedAvg path (whole uploads, every reply checked for NaN / inf, then
   FedAvg.aggregate_train, which decodes every reply again, and Flower's simulation
   polling) is timed in the same run for comparison, and the mean of all replies taken at
   once (aggregate_replies) for reference.
   The bench process raises glibc's malloc thresholds as the ServerApp and ClientApp do
   (federated/malloc.py: large freed buffers are reused, not unmapped and faulted in again
   each round); ``--malloc default`` leaves them, to compare.
   Overhead share = overhead / (overhead + client training), on the critical path of a round
   where clients train in parallel on their own hardware: one server serialize, one client's
   deserialize + serialize + wire encoding, the wait for the last reply, the server's work
   left then, finishing the mean and the final deserialize. The msgpack encoding
   (payload.encode / decode) and the SPMD simulator's jitted FedAvg are timed too, for
   reference.
   Models: the bundled MiniLM retriever and SmolLM2-135M generator (full run), or tiny random
   ones built like the tests' (``--quick`` or ``--models tiny``); the table says which.
2. Bytes per round: the serialized ArrayRecord of the full query tower (LSR) and of the
   generator's LoRA adapters (RALT, rank from RALTConfig), per client upload and per round
   (clients x 2 directions: the global params down, the client's params up); the full
   generator's parameters (what RALT without LoRA would send, computed from the shapes at
   the wire dtype) for comparison.
3. The SPMD simulator vs Flower's simulation engine (Ray actors) on the same work: 8 clients
   x ``--engine-local-steps`` steps x ``--engine-rounds`` rounds of LSR with tiny towers
   (``--engine-models bundled``: MiniLM towers, where compute weighs far more). The
   SPMD engine gets 8 host devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 is set
   before jax is imported). Reported: each engine's first run (compile and, for Flower, Ray
   start-up included), a second run when asked (SPMD reuses its compiled programs; Flower's
   actors load the train step from a persistent XLA cache, Ray starts again), and the
   steady-state round time (SPMD: the second run's rounds; Flower: rounds >= 2, after the
   actors compiled). The goal ratio is on steady-state rounds; the totals are printed too.
   The SPMD simulator dispatches a round's aggregation asynchronously, so its cost can show
   up in the next round's time; the medians over rounds and the blocked totals include it.

Run (on 2 CPU cores the full run took ~2 minutes, ~4 with --engine-models bundled;
--quick ~1):

    .venv/bin/python scripts/bench_federated.py [--quick]

Results: a table on stdout and bench_results/federated.json (bench_results/federated_quick.json
with --quick) with every raw timing and the settings.

Caveats: CPU timings on a small machine are noisy (other processes, 8 virtual devices on a
few cores, Ray actors competing with the driver); compare ratios, not absolute times. The
in-process piece timings leave out what Flower itself adds in simulation (message routing
through its in-memory state, Ray object transfer); the "Flower round minus client compute"
line estimates that from the steady-state Flower round and the in-process client time,
assuming as many clients train at once as Ray has CPUs. A tiny model's local step is so
cheap that its overhead share says little about real models: read the bundled-model rows.
The RALT client steps default to short work (1 query x 2 passages x 64 tokens, where
RALTConfig trains 2 queries x top_k passages x up to 384 tokens) to fit a CPU run, so the
RALT overhead share is an upper bound; LSR uses LSRConfig's batch (8 queries x 4 passages).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench_results"
SPMD_DEVICES = 8


def _force_host_devices(n: int) -> str:
    """Ask XLA:CPU for ``n`` devices (must run before jax is imported); the original flags
    come back (the Ray actors get those: one device is what a Flower client uses)."""
    original = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in original:
        os.environ["XLA_FLAGS"] = f"{original} --xla_force_host_platform_device_count={n}".strip()
    return original


ORIGINAL_XLA_FLAGS = _force_host_devices(SPMD_DEVICES)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(fn: Callable[[], Any], repeat: int = 3) -> tuple[Any, list[float]]:
    """``fn``'s last result and the wall time of each of ``repeat`` calls after one untimed
    warm-up call (results are blocked on, so device work is counted)."""
    import jax

    times, out = [], jax.block_until_ready(fn())
    for _ in range(repeat):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return out, times


def med(xs: list[float]) -> float:
    return float(statistics.median(xs))


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


# ============================================================================ models and data
TINY_BERT = dict(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                 max_position_embeddings=32)
TINY_LLAMA = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=512)


def query_encoder(models: str):
    """(encoder, vocab size, what it is) for the LSR towers."""
    from flax import nnx

    from fedrag_jax.models.bert import BertConfig, Encoder

    if models == "bundled":
        from fedrag_jax import assets

        try:
            encoder = Encoder.from_pretrained(assets.retriever_path())
            return encoder, encoder.config.vocab_size, "bundled all-MiniLM-L6-v2"
        except Exception as e:  # noqa: BLE001 - say so in the table, measure the tiny one
            log(f"the bundled retriever did not load ({e!r:.200}); using the tiny one")
            models = f"tiny (bundled failed: {type(e).__name__})"
    config = BertConfig(**TINY_BERT)
    what = "tiny BERT (1 layer, d=32)" + ("" if models == "tiny" else f", {models}")
    return Encoder(config, rngs=nnx.Rngs(0)), config.vocab_size, what


def generator_model(models: str):
    from flax import nnx

    from fedrag_jax.models.llama import CausalLM, LlamaConfig

    if models == "bundled":
        from fedrag_jax import assets

        try:
            path = assets.generator_path()
            return CausalLM.from_pretrained(path), f"bundled SmolLM2-135M ({path.name})"
        except Exception as e:  # noqa: BLE001 - say so in the table, measure the tiny one
            log(f"the bundled generator did not load ({e!r:.200}); using the tiny one")
            models = f"tiny (bundled failed: {type(e).__name__})"
    what = "tiny Llama (2 layers, d=32)" + ("" if models == "tiny" else f", {models}")
    return CausalLM(LlamaConfig(**TINY_LLAMA), rngs=nnx.Rngs(0)), what


def lsr_client_data(num_clients: int, *, examples: int, batch_size: int, vocab: int,
                    hidden: int, length: int = 16, k: int = 4) -> list:
    """Synthetic LSR data per client: random query tokens and passage embeddings, and LM
    scores that clearly prefer one passage per query (every client the same shapes)."""
    from fedrag_jax.finetune.batches import LSRDataset

    out = []
    for c in range(num_clients):
        rng = np.random.default_rng(1000 + c)
        ids = rng.integers(1, vocab, size=(examples, length)).astype(np.int32)
        mask = np.ones((examples, length), bool)
        mask[1::2, length // 2:] = False
        emb = rng.normal(size=(examples, k, hidden)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
        lm = np.full((examples, k), -30.0, np.float32)
        lm[np.arange(examples), rng.integers(0, k, size=examples)] = -2.0
        arrays = {"query_ids": ids, "query_mask": mask, "passage_emb": emb, "lm_logprobs": lm}
        out.append(LSRDataset(arrays, np.arange(examples * k).reshape(examples, k),
                              batch_size=batch_size, seed=c))
    return out


def ralt_client_data(num_clients: int, *, queries: int, batch_size: int, k: int, vocab: int,
                     prompt_length: int, target_length: int) -> list:
    """Synthetic RALT data per client: k (prompt, response) instances per query, one length
    bucket (so the shapes agree across clients)."""
    from fedrag_jax.finetune.batches import RALTDataset

    bucket = prompt_length + target_length
    out = []
    for c in range(num_clients):
        rng = np.random.default_rng(2000 + c)
        prompts = [[rng.integers(4, vocab, size=prompt_length).tolist() for _ in range(k)]
                   for _ in range(queries)]
        targets = [rng.integers(4, vocab, size=target_length).tolist() for _ in range(queries)]
        out.append(RALTDataset(prompts, targets, np.ones((queries, k), np.float32),
                               batch_size=batch_size, pad_id=0, buckets=(bucket,), seed=c))
    return out


def lsr_task(encoder, vocab: int, *, num_clients: int, local_steps: int, rounds: int,
             batch_size: int, length: int):
    from flax import nnx

    from fedrag_jax.config import FederatedConfig
    from fedrag_jax.federated import FederatedTask
    from fedrag_jax.finetune.optimizer import OptimizerConfig
    from fedrag_jax.finetune.steps import QUERY_TOWER, Towers

    towers = Towers(nnx.clone(encoder), encoder)  # the query tower is the trained copy
    hidden = encoder.config.hidden_size
    data = lsr_client_data(num_clients, examples=batch_size * local_steps, batch_size=batch_size,
                           vocab=vocab, hidden=hidden, length=length)
    config = FederatedConfig(num_clients=num_clients, rounds=rounds, local_steps=local_steps,
                             min_clients=2, strategy="fedavg")
    return FederatedTask.lsr(towers, QUERY_TOWER, OptimizerConfig(learning_rate=1e-4), data,
                             config, tau_retrieval=0.05, seed=0)


def ralt_task(model, vocab: int, *, num_clients: int, local_steps: int, rank: int,
              alpha: float, targets: list[str], batch_size: int, k: int, prompt_length: int,
              target_length: int):
    from flax import nnx

    from fedrag_jax.config import FederatedConfig
    from fedrag_jax.federated import FederatedTask
    from fedrag_jax.finetune.optimizer import OptimizerConfig
    from fedrag_jax.models.lora import apply_lora

    model = apply_lora(nnx.clone(model), rank=rank, alpha=alpha, target_modules=tuple(targets),
                       seed=0)
    data = ralt_client_data(num_clients, queries=batch_size * local_steps, batch_size=batch_size,
                            k=k, vocab=vocab, prompt_length=prompt_length,
                            target_length=target_length)
    config = FederatedConfig(num_clients=num_clients, rounds=2, local_steps=local_steps,
                             min_clients=2, strategy="fedavg")
    return FederatedTask.ralt(model, nnx.LoRAParam, OptimizerConfig(learning_rate=3e-4), data,
                              config, seed=0)


# ============================================================================ 1 + 2: one round
def reply_message(record: Any, node: int, num_examples: int, loss: float) -> Any:
    """A client's train reply as the server receives it."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.app.metadata import Metadata

    meta = Metadata(run_id=1, message_id=f"reply-{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id=f"train-{node}", group_id="2", created_at=time.time(),
                    ttl=3600.0, message_type="train")
    metrics = MetricRecord({"num-examples": num_examples, "train_loss": loss,
                            "examples_seen": num_examples, "local_steps": 1})
    return Message(RecordDict({"arrays": record, "metrics": metrics}), metadata=meta)


def param_bytes(tree: Any) -> dict[str, int]:
    """Parameter count and bytes (native dtype, and as Flower sends them: bf16 -> f32)."""
    import jax

    leaves = jax.tree.leaves(tree)
    count = sum(int(np.prod(x.shape)) for x in leaves)
    native = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
    # Flower's Array goes through np.save, so bfloat16 leaves travel as float32 (payload.py)
    wire = sum(int(np.prod(x.shape)) * (4 if np.dtype(x.dtype).name == "bfloat16"
                                        else np.dtype(x.dtype).itemsize) for x in leaves)
    return {"params": count, "native_bytes": native, "wire_bytes": wire}


class TimedGrid:
    """A Grid whose replies become pullable at given seconds after the push (real clock):
    stands for clients that finish their local training at those times."""

    def __init__(self, ready_after: list[float], pull_interval: float = 0.1):
        self.ready_after, self.pull_interval = ready_after, pull_interval  # (InMemoryGrid's)

    def push_messages(self, messages: list[Any]) -> list[str]:
        self.pushed = time.perf_counter()
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
        self.messages = list(messages)
        return [m.metadata.message_id for m in self.messages]

    def pull_messages(self, ids: Any) -> list[Any]:
        from flwr.app import Message, RecordDict

        now = time.perf_counter() - self.pushed
        ready = zip(self.messages, self.ready_after, strict=True)
        return [Message(RecordDict(), reply_to=m) for m, t in ready
                if m.metadata.message_id in ids and t <= now]


def reply_waits(ready_after: list[float], repeat: int) -> dict[str, list[float]]:
    """Seconds between the last reply becoming pullable and the server holding all replies,
    for our polling (server.send_and_receive) and Flower's Grid.send_and_receive loops (the
    simulation's InMemoryGrid: 0.1 s between pulls; the deployed HttpGrid: 3 s), with the
    replies ready at ``ready_after`` (the clients' measured round times)."""
    from flwr.app import Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.grid.http_grid import HttpGrid
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from fedrag_jax.federated.server import send_and_receive

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # Message()
    loops = {"ours": lambda g, m: send_and_receive(g, m, 3600.0),
             "flower_inmemory": lambda g, m: InMemoryGrid.send_and_receive(g, m, timeout=3600.0),
             "flower_deployed": lambda g, m: HttpGrid.send_and_receive(g, m, timeout=3600.0)}
    out: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(repeat):
        for name, loop in loops.items():
            grid = TimedGrid(ready_after)
            messages = [Message(RecordDict(), dst_node_id=n + 1, message_type="train")
                        for n in range(len(ready_after))]
            replies = loop(grid, messages)
            out[name].append(time.perf_counter() - grid.pushed - max(ready_after))
            if len(replies) != len(ready_after):
                raise RuntimeError(f"{name}: {len(replies)} of {len(ready_after)} replies")
    return out


def measure_round(task: Any, name: str, *, clients: int, repeat: int) -> dict[str, Any]:
    """Time every piece of one Flower round of ``task`` (see the module docstring)."""
    import jax
    import jax.numpy as jnp

    from fedrag_jax.federated.aggregate import StrategyOptions, fedavg
    from fedrag_jax.federated.history import RoundRecord
    from fedrag_jax.federated.payload import (
        decode,
        encode,
        from_arrayrecord,
        read_arrayrecord,
        to_arrayrecord,
        unflatten_params,
        wire_flat,
    )
    from fedrag_jax.federated.running_mean import RunningMean
    from fedrag_jax.federated.server import (
        aggregate_replies,
        finish_mean,
        fold_replies,
        make_strategy,
        screen_train_replies,
    )

    template = task.template.params
    global_params = task.initial_params()
    steps = task.config.local_steps
    logging.getLogger("flwr").setLevel(logging.WARNING)  # aggregate_train logs every call
    log(f"{name}: compiling the client step (round 1 of client 0) ...")
    start = time.perf_counter()
    params, metrics = task.client_update(0, global_params, 1)
    jax.block_until_ready(params)
    first_round_s = time.perf_counter() - start
    log(f"{name}: first client round {first_round_s:.1f}s (compile included); the "
        f"{clients} clients' rounds of {steps} steps ...")
    # every client's own update (distinct replies: the server reads 8 buffers, not one 8x)
    client_s, updates = [], []
    for c in range(clients):
        start = time.perf_counter()
        params, metrics = task.client_update(c % task.config.num_clients, global_params, 2)
        jax.block_until_ready(params)
        client_s.append(time.perf_counter() - start)
        updates.append((params, metrics))
    log(f"{name}: client round {med(client_s):.3f}s (median of {len(client_s)})")
    params, metrics = updates[0]

    # what the ServerApp and ClientApp call in a FedAvg round (server.serve, client.handle_train)
    record_down, server_ser = timed(lambda: to_arrayrecord(global_params), repeat)
    _, client_deser = timed(lambda: from_arrayrecord(record_down, template), repeat)
    received = read_arrayrecord(record_down, template)
    record_up, client_ser = timed(lambda: to_arrayrecord(params, base=received), repeat)
    _, wire_encode = timed(lambda: [a.deflate() for a in record_up.values()], repeat)
    wire_bytes = sum(len(a.deflate()) for a in record_up.values())

    def replies_of(base: Any) -> list:
        return [reply_message(to_arrayrecord(p, base=base), node + 1, int(m["num_examples"]),
                              float(m["train_loss"])) for node, (p, m) in enumerate(updates)]

    replies = replies_of(received)
    strategy = make_strategy("fedavg", StrategyOptions(), min_clients=2, evaluate=False)

    base = wire_flat(global_params)  # serve builds it while the clients train

    def stream() -> tuple[Any, list[float], float]:
        """server.receive_train + finish_mean: each reply screened and folded into the
        running mean as it arrives (timed one by one), then the mean finished."""
        running, record, per_reply = RunningMean(base), RoundRecord(round=2), []
        for msg in replies:
            start = time.perf_counter()
            fold_replies(running, screen_train_replies([msg], template, record, {}, False,
                                                       base=base, check_finite=False), record)
            per_reply.append(time.perf_counter() - start)
        if running.count != clients:
            raise RuntimeError(f"{name}: the server rejected {clients - running.count} replies")
        start = time.perf_counter()
        out = finish_mean(running, record, 2)
        return out, per_reply, time.perf_counter() - start

    for _ in range(2):  # warm-up: a server's first rounds fill its allocator (malloc.py)
        stream()
    ready = sorted(client_s)  # the replies arrive when their clients finish training
    after_last, finalize, fold_all = [], [], []
    for _ in range(repeat):
        aggregated, per_reply, finish_s = stream()
        done = 0.0  # the server works through the replies in arrival order
        for t, work in zip(ready, per_reply, strict=True):
            done = max(done, t) + work
        after_last.append(done - ready[-1])
        finalize.append(finish_s)
        fold_all.append(sum(per_reply))
    if aggregated is None:
        raise RuntimeError(f"{name}: the average was not taken")
    valid = screen_train_replies(replies, template, RoundRecord(round=2), {}, False,
                                 base=base, check_finite=False)
    _, aggregate_all = timed(lambda: aggregate_replies(  # all replies at once, for reference
        strategy, 2, valid, RoundRecord(round=2), base=base, min_clients=2), repeat)
    _, final_deser = timed(lambda: unflatten_params(aggregated, template, cast=True,
                                                    copy=False), repeat)

    # Flower's own FedAvg path on whole uploads: every reply checked for NaN / inf, then
    # FedAvg.aggregate_train (which decodes every reply again), Flower's simulation polling
    record_dense, client_ser_dense = timed(lambda: to_arrayrecord(params), repeat)
    dense_replies = replies_of(None)
    valid_dense, screen_dense = timed(lambda: screen_train_replies(
        dense_replies, template, RoundRecord(round=2), {}, False), repeat)
    flower_mean, flower_aggregate = timed(
        lambda: strategy.aggregate_train(2, [v.message for v in valid_dense])[0], repeat)
    flower_mean = {k: flower_mean[k].numpy() for k in flower_mean.keys()}
    _, final_deser_dense = timed(lambda: unflatten_params(flower_mean, template,
                                                          cast=True), repeat)
    dense_diff = max(float(np.max(np.abs(aggregated[k].astype(np.float64)
                                         - flower_mean[k]))) for k in aggregated)

    blob, msgpack_enc = timed(lambda: encode(params), repeat)
    _, msgpack_dec = timed(lambda: decode(blob, template), repeat)
    stacked = jax.tree.map(lambda x: jnp.stack([x] * clients), params)
    weights = jnp.ones(clients, jnp.float32)
    jax_fedavg = jax.jit(fedavg)
    _, spmd_aggregate = timed(lambda: jax_fedavg(stacked, weights), repeat)

    log(f"{name}: polling for {clients} replies ready over one client round ...")
    waits = reply_waits(client_s, repeat)
    pieces = {"server_serialize_s": med(server_ser), "client_deserialize_s": med(client_deser),
              "client_serialize_s": med(client_ser), "wire_encode_s": med(wire_encode),
              "reply_wait_s": med(waits["ours"]),
              "server_after_last_reply_s": med(after_last), "finish_mean_s": med(finalize),
              "final_deserialize_s": med(final_deser)}
    overhead = sum(pieces.values())
    dense_pieces = {"server_serialize_s": med(server_ser),
                    "client_deserialize_s": med(client_deser),
                    "client_serialize_s": med(client_ser_dense),
                    "wire_encode_s": med(wire_encode),
                    "reply_wait_s": med(waits["flower_inmemory"]),
                    "server_screen_all_s": med(screen_dense),
                    "aggregate_s": med(flower_aggregate),
                    "final_deserialize_s": med(final_deser_dense)}
    dense_overhead = sum(dense_pieces.values())
    client = med(client_s)
    serial_overhead = (pieces["server_serialize_s"] + clients * (
        pieces["client_deserialize_s"] + pieces["client_serialize_s"] + pieces["wire_encode_s"])
        + med(fold_all) + pieces["finish_mean_s"] + pieces["final_deserialize_s"]
        + pieces["reply_wait_s"])
    upload = int(med([r.content["arrays"].count_bytes() for r in replies]))
    download = int(record_down.count_bytes())
    result = {
        "name": name, "clients": clients, "local_steps": steps,
        "first_client_round_s": first_round_s, "client_round_s": client_s,
        "client_round_median_s": client, "pieces_median_s": pieces,
        "raw_s": {"server_serialize": server_ser, "client_deserialize": client_deser,
                  "client_serialize": client_ser, "wire_encode": wire_encode,
                  "server_after_last_reply": after_last, "finish_mean": finalize,
                  "server_fold_all_replies": fold_all, "aggregate_all_at_once": aggregate_all,
                  "final_deserialize": final_deser, "msgpack_encode": msgpack_enc,
                  "msgpack_decode": msgpack_dec, "spmd_jax_fedavg": spmd_aggregate,
                  "flower_aggregate_train": flower_aggregate,
                  **{f"reply_wait_{k}": v for k, v in waits.items()}},
        "flower_aggregate_train_median_s": med(flower_aggregate),
        # Flower's own FedAvg path on whole uploads, same run
        "dense_pieces_median_s": dense_pieces, "dense_overhead_s": dense_overhead,
        "dense_overhead_share": dense_overhead / (dense_overhead + client),
        "dense_upload_bytes": int(record_dense.count_bytes()),
        "max_abs_diff_vs_dense_mean": dense_diff,
        # local steps per round at which this overhead is 5% of the round (same step time)
        "local_steps_for_5pct": int(np.ceil(overhead * 19 / (client / steps))),
        "overhead_s": overhead,
        "overhead_share": overhead / (overhead + client),
        # the same round if every reply arrived at the same instant (nothing folded early)
        "together_overhead_s": (together := overhead - pieces["server_after_last_reply_s"]
                                + med(fold_all)),
        "together_overhead_share": together / (together + client),
        "serial_overhead_s": serial_overhead,
        "serial_overhead_share": serial_overhead / (serial_overhead + clients * client),
        "upload_bytes": upload, "download_bytes": download, "wire_bytes": wire_bytes,
        "msgpack_bytes": len(blob),
        "round_bytes": clients * (upload + download),
        "trainable": param_bytes(template),
        "train_loss": float(metrics["train_loss"]),
    }
    log(f"{name}: overhead {overhead * 1e3:.1f} ms of a {client:.3f}s client round "
        f"({100 * result['overhead_share']:.2f}%); upload {mib(upload)}")
    return result


# ============================================================================ 3: engines
def run_engines(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from fedrag_jax.federated.payload import flatten_params

    n = len(jax.devices())
    if n < SPMD_DEVICES:
        log(f"warning: {n} devices, not {SPMD_DEVICES}: XLA_FLAGS was set before this script "
            "imported jax? the SPMD clients share devices")
    encoder, vocab, what = query_encoder(args.engine_models)
    bundled = what.startswith("bundled")
    task = lsr_task(encoder, vocab, num_clients=SPMD_DEVICES, local_steps=args.engine_local_steps,
                    rounds=args.engine_rounds, batch_size=args.lsr_batch if bundled else 4,
                    length=32 if bundled else 16)
    # the SPMD engine's devices: all 8 (one client per device) or, with --spmd-devices, fewer
    # slices with several clients vmapped on each (on a CPU: as many devices as cores)
    spmd_devices = jax.devices()[:args.spmd_devices or n]
    out: dict[str, Any] = {"model": what, "clients": SPMD_DEVICES,
                           "local_steps": args.engine_local_steps, "rounds": args.engine_rounds,
                           "devices": n, "spmd_devices": len(spmd_devices)}

    # in-process client compute of this task (for the Flower transport estimate)
    params, _ = task.client_update(0, task.initial_params(), 1)
    jax.block_until_ready(params)
    client_s = []
    for c in range(4):
        start = time.perf_counter()
        jax.block_until_ready(task.client_update(c, task.initial_params(), 2)[0])
        client_s.append(time.perf_counter() - start)
    out["client_round_s"] = client_s

    spmd_runs = []
    for i in range(2):
        log(f"SPMD run {i + 1}/2 ({'compile included' if i == 0 else 'compiled'}) ...")
        start = time.perf_counter()
        result = task.run_spmd(devices=spmd_devices)
        jax.block_until_ready(result.params)  # the last aggregation is dispatched async
        total = time.perf_counter() - start
        spmd_runs.append({"total_s": total, "round_s": [r.seconds for r in result.history]})
        log(f"SPMD run {i + 1}: {total:.2f}s, rounds {spmd_runs[-1]['round_s']}")
    out["spmd"] = spmd_runs
    spmd_params = flatten_params(result.params)

    if args.skip_flower:
        out["flower"] = None
        return out
    flower_runs = []
    with tempfile.TemporaryDirectory(prefix="bench-fed-xla-") as cache:
        env = {"XLA_FLAGS": ORIGINAL_XLA_FLAGS, "JAX_COMPILATION_CACHE_DIR": cache,
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
        for i in range(args.flower_runs):
            log(f"Flower run {i + 1}/{args.flower_runs} (Ray start-up"
                f"{', actors compile' if i == 0 else ', actors load the XLA cache'}) ...")
            start = time.perf_counter()
            # address "local": a Ray instance of our own, never one found on the machine
            result = task.run_flower(actor_env=env,
                                     backend_config={"init_args": {"address": "local"}})
            total = time.perf_counter() - start
            flower_runs.append({"total_s": total, "round_s": [r.seconds for r in result.history]})
            log(f"Flower run {i + 1}: {total:.2f}s, rounds {flower_runs[-1]['round_s']}")
    out["flower"] = flower_runs
    flower_params = flatten_params(result.params)
    out["max_param_diff_spmd_vs_flower"] = max(
        float(np.max(np.abs(spmd_params[k].astype(np.float64) - flower_params[k])))
        for k in spmd_params)
    return out


def engine_summary(e: dict[str, Any]) -> dict[str, Any]:
    spmd_steady = e["spmd"][-1]["round_s"]
    out = {"spmd_first_total_s": e["spmd"][0]["total_s"],
           "spmd_warm_total_s": e["spmd"][-1]["total_s"],
           "spmd_steady_round_s": med(spmd_steady)}
    if not e.get("flower"):
        return out
    steady = [s for run in e["flower"] for s in run["round_s"][1:]]  # round 1: actors compile
    if not steady:
        steady = [s for run in e["flower"][1:] for s in run["round_s"]]
    flower_round = med(steady) if steady else float("nan")
    ray_cpus = min(os.cpu_count() or 1, e["clients"])
    compute = e["clients"] * med(e["client_round_s"]) / ray_cpus
    out.update({"flower_first_total_s": e["flower"][0]["total_s"],
                "flower_warm_total_s": e["flower"][-1]["total_s"],
                "flower_steady_round_s": flower_round,
                "steady_round_speedup": flower_round / out["spmd_steady_round_s"],
                "first_total_speedup": e["flower"][0]["total_s"] / out["spmd_first_total_s"],
                "warm_total_speedup": (e["flower"][-1]["total_s"] / out["spmd_warm_total_s"]
                                       if len(e["flower"]) > 1 else None),
                "flower_round_minus_compute_s": flower_round - compute,
                "estimated_client_compute_per_round_s": compute, "ray_parallel_clients": ray_cpus})
    return out


# ============================================================================ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny models everywhere, 2 local steps, one Flower run (~1 min)")
    p.add_argument("--models", choices=("bundled", "tiny"), default=None,
                   help="models of the overhead/bytes part (default: bundled; tiny with --quick)")
    p.add_argument("--clients", type=int, default=8, help="clients of the overhead round")
    p.add_argument("--local-steps", type=int, default=None,
                   help="LSR local steps per round (default 10 = FederatedConfig's; quick 2)")
    p.add_argument("--lsr-batch", type=int, default=8, help="LSR queries per step")
    p.add_argument("--ralt-local-steps", type=int, default=None,
                   help="RALT local steps per round (default 4; quick 2)")
    p.add_argument("--ralt-batch", type=int, default=1, help="RALT queries per step")
    p.add_argument("--ralt-k", type=int, default=2, help="RALT passages (instances) per query")
    p.add_argument("--ralt-prompt", type=int, default=56, help="RALT prompt tokens")
    p.add_argument("--ralt-target", type=int, default=8, help="RALT response tokens")
    p.add_argument("--repeat", type=int, default=None, help="timings per piece (5; quick 2)")
    p.add_argument("--engine-local-steps", type=int, default=2)
    p.add_argument("--engine-models", choices=("tiny", "bundled"), default="tiny",
                   help="towers of the SPMD-vs-Flower part (bundled: MiniLM, minutes more)")
    p.add_argument("--engine-rounds", type=int, default=None, help="rounds (3; quick 2)")
    p.add_argument("--flower-runs", type=int, default=None, help="Flower runs (2; quick 1)")
    p.add_argument("--spmd-devices", type=int, default=None,
                   help="devices the SPMD engine uses (default all 8: a client each; fewer: "
                        "several clients vmapped per device slice)")
    p.add_argument("--malloc", choices=("reuse", "default"), default="reuse",
                   help="reuse: raise glibc's malloc thresholds as the ServerApp and ClientApp "
                        "do (fedrag_jax/federated/malloc.py); default: leave them")
    p.add_argument("--skip-ralt", action="store_true")
    p.add_argument("--skip-engines", action="store_true")
    p.add_argument("--skip-flower", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    q = args.quick
    args.models = args.models or ("tiny" if q else "bundled")
    args.local_steps = args.local_steps or (2 if q else 10)
    args.ralt_local_steps = args.ralt_local_steps or (2 if q else 4)
    args.repeat = args.repeat or (2 if q else 5)
    args.engine_rounds = args.engine_rounds or (2 if q else 3)
    args.flower_runs = args.flower_runs or (1 if q else 2)
    args.out = args.out or RESULTS / ("federated_quick.json" if q else "federated.json")
    wall = time.perf_counter()

    import jax
    from flax import nnx

    from fedrag_jax.config import RALTConfig
    from fedrag_jax.federated.malloc import reuse_large_buffers

    malloc_tuned = args.malloc == "reuse" and reuse_large_buffers()

    log(f"jax {jax.__version__}, {len(jax.devices())} {jax.devices()[0].platform} devices, "
        f"{os.cpu_count()} CPUs; models: {args.models}")
    meta = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "jax": jax.__version__, "platform": platform.platform(),
            "cpus": os.cpu_count(), "devices": len(jax.devices()),
            "device_kind": jax.devices()[0].device_kind, "malloc_tuned": malloc_tuned,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    results: dict[str, Any] = {"meta": meta}

    # --- 1 + 2: LSR round ------------------------------------------------------------------
    log(f"loading the {args.models} models ...")
    encoder, vocab, lsr_what = query_encoder(args.models)
    task = lsr_task(encoder, vocab, num_clients=args.clients, local_steps=args.local_steps,
                    rounds=2, batch_size=args.lsr_batch,
                    length=32 if lsr_what.startswith("bundled") else 16)
    results["lsr"] = measure_round(task, "LSR", clients=args.clients, repeat=args.repeat)
    results["lsr"]["model"] = lsr_what
    del task, encoder

    # --- 1 + 2: RALT (LoRA) round ------------------------------------------------------------
    ralt_cfg = RALTConfig()
    generator, gen_what = generator_model(args.models)
    full = param_bytes(nnx.state(generator, nnx.Param))
    results["generator_full"] = {"model": gen_what, **full,
                                 "round_bytes": args.clients * 2 * full["wire_bytes"]}
    if not args.skip_ralt:
        task = ralt_task(generator, generator.config.vocab_size, num_clients=args.clients,
                         local_steps=args.ralt_local_steps, rank=ralt_cfg.lora_rank,
                         alpha=ralt_cfg.lora_alpha, targets=list(ralt_cfg.lora_targets),
                         batch_size=args.ralt_batch, k=args.ralt_k,
                         prompt_length=args.ralt_prompt, target_length=args.ralt_target)
        results["ralt"] = measure_round(task, "RALT", clients=args.clients, repeat=args.repeat)
        results["ralt"].update(model=gen_what, lora_rank=ralt_cfg.lora_rank,
                               lora_targets=list(ralt_cfg.lora_targets))
        del task
    del generator

    # --- 3: engines ----------------------------------------------------------------------------
    if not args.skip_engines:
        results["engines"] = run_engines(args)
        results["engines"]["summary"] = engine_summary(results["engines"])
    meta["wall_s"] = time.perf_counter() - wall

    rows = table(results, args)
    results["table"] = [dict(zip(("metric", "value", "goal", "met"), r, strict=True))
                        for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=float))
    print_table(rows)
    log(f"wall {meta['wall_s']:.0f}s; results in {args.out}")


def table(results: dict[str, Any], args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []

    def yes(ok: bool | None) -> str:
        return "-" if ok is None else ("yes" if ok else "NO")

    rows.append(("malloc: large freed buffers reused (federated/malloc.py)",
                 yes(results["meta"]["malloc_tuned"]), "", ""))
    for key in ("lsr", "ralt"):
        r = results.get(key)
        if r is None:
            continue
        label = "LSR (query tower)" if key == "lsr" else f"RALT (LoRA r={r['lora_rank']})"
        pc = r["pieces_median_s"]
        rows += [
            (f"{label}: model", r["model"], "", ""),
            (f"{label}: client training, {r['local_steps']} steps",
             f"{r['client_round_median_s']:.3f} s", "", ""),
            (f"{label}: overhead / round (critical path, {r['clients']} clients)",
             f"{r['overhead_s'] * 1e3:.1f} ms = {100 * r['overhead_share']:.2f}%", "<= 5%",
             yes(r["overhead_share"] <= 0.05)),
            (f"{label}:   serialize (server + client)",
             f"{(pc['server_serialize_s'] + pc['client_serialize_s']) * 1e3:.1f} ms", "", ""),
            (f"{label}:   wire encode (Array.deflate)", f"{pc['wire_encode_s'] * 1e3:.1f} ms", "",
             ""),
            (f"{label}:   deserialize+validate (client + final)",
             f"{(pc['client_deserialize_s'] + pc['final_deserialize_s']) * 1e3:.1f} ms", "", ""),
            (f"{label}:   wait for the last reply (polling)",
             f"{pc['reply_wait_s'] * 1e3:.1f} ms (Flower's loop: simulation "
             f"{1e3 * med(r['raw_s']['reply_wait_flower_inmemory']):.0f} ms, deployed "
             f"{1e3 * med(r['raw_s']['reply_wait_flower_deployed']):.0f} ms)", "", ""),
            (f"{label}:   server work left when the last reply arrives",
             f"{pc['server_after_last_reply_s'] * 1e3:.1f} ms (screen + fold of all "
             f"{r['clients']}: {1e3 * med(r['raw_s']['server_fold_all_replies']):.1f} ms, "
             "done as they arrive)", "", ""),
            (f"{label}:   finish the running mean", f"{pc['finish_mean_s'] * 1e3:.1f} ms", "",
             ""),
            (f"{label}:   (all replies averaged at once: aggregate_replies)",
             f"{1e3 * med(r['raw_s']['aggregate_all_at_once']):.1f} ms", "", ""),
            (f"{label}:   (Flower FedAvg.aggregate_train, whole uploads)",
             f"{r['flower_aggregate_train_median_s'] * 1e3:.1f} ms", "", ""),
            (f"{label}: Flower's own FedAvg path (whole uploads, NaN check per reply, "
             "aggregate_train, its polling)",
             f"{r['dense_overhead_s'] * 1e3:.1f} ms = {100 * r['dense_overhead_share']:.2f}%",
             "", ""),
            (f"{label}: max |mean - Flower's FedAvg of whole uploads|",
             f"{r['max_abs_diff_vs_dense_mean']:.1e}", "", ""),
            (f"{label}: local steps / round for overhead <= 5%",
             f"{r['local_steps_for_5pct']} (a step: "
             f"{1e3 * r['client_round_median_s'] / r['local_steps']:.0f} ms)",
             "", ""),
            (f"{label}: overhead if all replies arrived at once",
             f"{r['together_overhead_s'] * 1e3:.1f} ms = "
             f"{100 * r['together_overhead_share']:.2f}%", "", ""),
            (f"{label}: overhead if one host runs all clients",
             f"{100 * r['serial_overhead_share']:.2f}%", "", ""),
            (f"{label}: upload / client", f"{mib(r['upload_bytes'])} "
             f"(whole: {mib(r['dense_upload_bytes'])}, {r['trainable']['params']:,} params)",
             "", ""),
            (f"{label}: bytes / round ({r['clients']} clients x 2)", mib(r["round_bytes"]), "",
             ""),
            (f"{label}: msgpack blob", mib(r["msgpack_bytes"]), "", ""),
        ]
    g = results["generator_full"]
    rows.append(("full generator payload (no LoRA) / client",
                 f"{mib(g['wire_bytes'])} ({g['params']:,} params, {g['model']})", "", ""))
    rows.append((f"full generator bytes / round ({args.clients} x 2)", mib(g["round_bytes"]), "",
                 ""))
    if "ralt" in results:
        rows.append(("LoRA upload / full generator upload",
                     f"{results['ralt']['upload_bytes'] / g['wire_bytes']:.4f}", "", ""))
    e = results.get("engines")
    if e:
        s = e["summary"]
        what = f"{e['clients']} clients x {e['local_steps']} steps x {e['rounds']} rounds"
        rows += [
            ("engines: work", f"LSR, {e['model']}, {what}", "", ""),
            ("SPMD devices (client slices)", f"{e.get('spmd_devices', e['devices'])} of "
             f"{e['devices']}", "", ""),
            ("SPMD total, first run (compile incl.)", f"{s['spmd_first_total_s']:.2f} s", "", ""),
            ("SPMD total, second run (compiled)", f"{s['spmd_warm_total_s']:.2f} s", "", ""),
            ("SPMD steady round", f"{s['spmd_steady_round_s']:.3f} s", "", ""),
        ]
        if "flower_steady_round_s" in s:
            rows += [
                ("Flower total, first run (Ray + compile incl.)",
                 f"{s['flower_first_total_s']:.2f} s", "", ""),
                ("Flower total, second run (XLA cache; Ray start incl.)",
                 "-" if len(e["flower"]) < 2 else f"{s['flower_warm_total_s']:.2f} s", "", ""),
                ("Flower steady round", f"{s['flower_steady_round_s']:.3f} s", "", ""),
                ("speedup SPMD vs Flower, steady round", f"{s['steady_round_speedup']:.1f}x",
                 ">= 4x", yes(s["steady_round_speedup"] >= 4)),
                ("speedup SPMD vs Flower, first-run totals", f"{s['first_total_speedup']:.1f}x",
                 "", ""),
                ("speedup SPMD vs Flower, second-run totals",
                 "-" if s["warm_total_speedup"] is None else f"{s['warm_total_speedup']:.1f}x",
                 "", ""),
                ("Flower round minus client compute (est.)",
                 f"{s['flower_round_minus_compute_s']:.3f} s", "", ""),
                ("max |params SPMD - Flower|", f"{e['max_param_diff_spmd_vs_flower']:.2e}", "",
                 ""),
            ]
    return rows


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    widths = [max(len(r[i]) for r in rows + [("metric", "value", "goal", "met?")])
              for i in range(4)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print()
    print(line.format("metric", "value", "goal", "met?"))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line.format(*r))
    print()


if __name__ == "__main__":
    main()
