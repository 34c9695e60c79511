"""The SPMD simulator: every client's local steps in ONE program, on its own device slice.

A TPU host's chips belong to one process, so Flower's one-actor-per-client simulation cannot
give each client a chip there. Instead the mesh gets a leading ``clients`` axis:

    mesh axes (clients, data, fsdp, tensor), e.g. 8 devices = 4 clients x 2 devices

Each client's state (params, optimizer state, rng) and batches carry a leading clients
dimension sharded over ``clients``; inside a client's slice the usual logical-axis rules
shard them over (data, fsdp, tensor). The client step (the same ``train_step`` as
centralized training, see ``local.ClientStep``) is vmapped over that dimension, and the
server rule reduces over it (fedjax's ``for_each_client`` idea, laid out on a mesh).

With the same seeds and data it computes what the Flower engine computes: the same client
states (``local.client_state``), batches (the data position ``(round - 1) * local_steps``),
steps, and aggregation formulas.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..errors import MeshError
from ..finetune.optimizer import set_schedule_step
from ..finetune.steps import state_shardings
from ..sharding import (
    DEFAULT_RULES,
    MESH_AXES,
    SHARED_BATCH_KEYS,
    LogicalRules,
    MeshConfig,
    named_sharding,
)
from .aggregate import ServerOptimizer, aggregate, sample_clients
from .history import ClientResult, FederatedResult, RoundRecord, open_run
from .local import client_batches, dataset_size, real_examples, stack_batches, task_loss
from .payload import flatten_params

log = logging.getLogger(__name__)
WEIGHTED_MEAN = ("fedavg", "fedprox", "fedadam", "fedyogi")  # aggregate() -> fedavg

CLIENTS = "clients"


def client_mesh(num_clients: int, devices_per_client: int | None = None,
                devices: Sequence[jax.Device] | None = None,
                sub_mesh: MeshConfig | None = None) -> Mesh:
    """Mesh ``(clients, data, fsdp, tensor)``: a slice of ``devices_per_client`` devices per
    client group. With fewer device slices than clients, several clients share a slice (the
    clients axis then has the largest size that divides ``num_clients``)."""
    devices = list(devices) if devices is not None else jax.devices()
    n = len(devices)
    per = devices_per_client or max(1, n // num_clients)
    if per > n:
        raise MeshError(f"devices_per_client={per} but only {n} devices are available")
    groups = max(g for g in range(1, num_clients + 1) if num_clients % g == 0 and g * per <= n)
    sizes = (sub_mesh or MeshConfig()).axis_sizes(per)
    grid = np.asarray(devices[:groups * per], dtype=object).reshape(groups, *sizes)
    auto = (jax.sharding.AxisType.Auto,) * (1 + len(MESH_AXES))
    return Mesh(grid, (CLIENTS, *MESH_AXES), axis_types=auto)


class SpmdSimulator:
    """Runs a :class:`FederatedTask`'s rounds with the clients vmapped over the mesh."""

    def __init__(self, task: Any, *, devices: Sequence[jax.Device] | None = None,
                 devices_per_client: int | None = None, sub_mesh: MeshConfig | None = None,
                 rules: LogicalRules = DEFAULT_RULES):
        self.task, self.rules = task, rules
        self.num_clients = task.config.num_clients
        self.mesh = client_mesh(self.num_clients, devices_per_client, devices, sub_mesh)
        per_client = state_shardings(task.template, self.mesh, rules)
        # the global params and the frozen weights: replicated over clients, laid out by
        # the rules inside every client slice
        self.params_sharding = per_client.params
        self.frozen_sharding = per_client.frozen
        self.state_sharding = jax.tree.map(self._stacked, per_client.replace(frozen=None))
        self.frozen = jax.device_put(task.template.frozen, self.frozen_sharding)
        self._build()

    def _stacked(self, sharding: NamedSharding) -> NamedSharding:
        """A per-client sharding with the leading clients dimension over the clients axis."""
        return NamedSharding(self.mesh, PartitionSpec(CLIENTS, *sharding.spec))

    def batch_sharding(self, shape: Sequence[int]) -> NamedSharding:
        """[clients, batch, ...]: clients over ``clients``, examples over the data axes."""
        inner = named_sharding(self.mesh, ("batch",) + (None,) * (len(shape) - 2),
                               tuple(shape[1:]), self.rules)
        return NamedSharding(self.mesh, PartitionSpec(CLIENTS, *inner.spec))

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """[clients, ...] arrays on the clients' slices; a shared entry (a packed batch's
        ``prefix_ids``) is whole on each of its client's devices."""
        return {k: jax.device_put(v, NamedSharding(self.mesh, PartitionSpec(CLIENTS))
                                  if k in SHARED_BATCH_KEYS else self.batch_sharding(np.shape(v)))
                for k, v in batch.items()}

    # --- the compiled pieces -----------------------------------------------------------------
    def _build(self) -> None:
        task = self.task
        template = task.template.replace(frozen=None)
        graphdef = task.template.graphdef

        def init(params, ids, step0):
            def one(cid):  # == local.client_state, for every client at once
                return template.replace(
                    step=step0, params=params,
                    opt_state=set_schedule_step(template.tx.init(params), step0),
                    rng=jax.random.fold_in(template.rng, cid))
            return jax.vmap(one)(ids)

        self.init = jax.jit(init, out_shardings=self.state_sharding)
        eval_step = task.step(0.0)
        self.veval = jax.jit(jax.vmap(lambda p, f, b: eval_step.loss(graphdef, p, f, b),
                                      in_axes=(None, None, 0), spmd_axis_name=CLIENTS))

        def finite(params):
            per_leaf = [jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)
                        for x in jax.tree.leaves(params)
                        if jnp.issubdtype(x.dtype, jnp.inexact)]
            return jnp.all(jnp.stack(per_leaf), axis=0)

        self.finite = jax.jit(finite)
        self.distance = jax.jit(lambda a, b: jnp.sqrt(sum(
            jnp.sum(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))))
        self._vsteps: dict[float, Any] = {}
        self._aggregators: dict[Any, Any] = {}

    def vstep(self, mu: float):
        """The client step vmapped over the clients axis (state donated)."""
        if mu not in self._vsteps:
            step = self.task.step(mu)
            self._vsteps[mu] = jax.jit(
                jax.vmap(step.__call__, in_axes=(0, None, 0, None), spmd_axis_name=CLIENTS),
                out_shardings=(self.state_sharding, None), donate_argnums=0)
        return self._vsteps[mu]

    def aggregator(self, strategy: str, options: Any):
        """``(stacked params, per-client weights, chosen client ids) -> averaged params``.

        Weighted means (FedAvg and the strategies built on it) zero the weights of clients
        left out and reduce over the whole ``clients`` axis: one program for every round, and
        no gather of the chosen rows out of a sharded axis (which cost more than the clients'
        local steps with MiniLM, scripts/bench_federated.py). Median / trimmed mean need
        the chosen rows themselves.
        """
        key = (strategy, options)
        if key not in self._aggregators:
            out = self.params_sharding
            if strategy in WEIGHTED_MEAN:
                def masked_mean(stacked, w):
                    # a rejected client's rows may hold NaN, and 0 * NaN is NaN: zero them
                    def keep(x):
                        return jnp.where(w.reshape((-1,) + (1,) * (x.ndim - 1)) > 0, x, 0)

                    return aggregate(strategy, jax.tree.map(keep, stacked), w, options)

                mean = jax.jit(masked_mean, out_shardings=out)

                def agg(stacked, weights, idx):
                    w = np.zeros(self.num_clients, np.float32)
                    w[np.asarray(idx)] = np.asarray(weights)[np.asarray(idx)]
                    return mean(stacked, jnp.asarray(w))
            else:
                @jax.jit
                def chosen_rows(stacked, idx):
                    return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), stacked)

                robust = jax.jit(lambda chosen, w: aggregate(strategy, chosen, w, options),
                                 out_shardings=out)

                def agg(stacked, weights, idx):
                    idx = jnp.asarray(idx, jnp.int32)
                    return robust(chosen_rows(stacked, idx), jnp.asarray(weights)[idx])

            self._aggregators[key] = agg
        return self._aggregators[key]

    # --- rounds ------------------------------------------------------------------------------
    def sample(self, round_: int) -> list[int]:
        """The round's clients: all, or the seeded sample of ``task.sample_size()`` that the
        Flower server trains too (aggregate.sample_clients)."""
        return sample_clients(self.task.seed, round_, self.num_clients, self.task.sample_size())

    def run(self, *, checkpoint_dir: str | None = None, resume: bool = True,
            record_client_params: bool = False) -> FederatedResult:
        task, c = self.task, self.task.config
        ckpt, done, params, server, history = open_run(task, checkpoint_dir, resume)
        params = jax.device_put(params, self.params_sharding)
        if server is not None:
            server = {k: jax.device_put(v, self.params_sharding) for k, v in server.items()}
        weights = np.array([dataset_size(d) for d in task.client_data], np.float32)
        ids = jnp.arange(self.num_clients, dtype=jnp.int32)
        mu = task.client_mu()
        vstep = self.vstep(mu)
        average = self.aggregator(task.strategy, task.options)
        server_opt = (ServerOptimizer(task.strategy, task.options)
                      if task.strategy in ("fedadam", "fedyogi") else None)
        try:
            for r in range(done + 1, c.rounds + 1):
                start = time.perf_counter()
                first = (r - 1) * c.local_steps
                stacked = self.init(params, ids, jnp.asarray(first, jnp.int32))
                anchor = params if mu else None
                losses, rates = [], []
                seen = np.zeros(self.num_clients, np.int64)
                for t in range(c.local_steps):
                    batches = client_batches(task.client_data, first + t)
                    seen += [real_examples(b) for b in batches]
                    stacked, metrics = vstep(stacked, self.frozen,
                                             self.put_batch(stack_batches(batches)), anchor)
                    losses.append(task_loss(metrics))
                    if "learning_rate" in metrics:
                        rates.append(metrics["learning_rate"])
                mean_loss = np.mean(np.stack(jax.device_get(losses)), axis=0)
                rates = np.stack(jax.device_get(rates), axis=1) if rates else \
                    np.zeros((self.num_clients, 0))  # [clients, local steps]
                finite = np.asarray(self.finite(stacked.params))
                record = RoundRecord(round=r)
                good = []
                for cid in self.sample(r):
                    if not finite[cid]:
                        record.rejected.append({"client_id": cid, "reason": (
                            "update holds non-finite values (NaN or inf); the client diverged")})
                        log.warning("round %d: client %d rejected: non-finite update", r, cid)
                        continue
                    good.append(cid)
                    record.clients.append(ClientResult(
                        client_id=cid, num_examples=int(weights[cid]),
                        train_loss=float(mean_loss[cid]), examples_seen=int(seen[cid]),
                        steps=c.local_steps, learning_rates=[float(x) for x in rates[cid]]))
                if record_client_params:
                    record.client_params = {cid: flatten_params(jax.tree.map(
                        lambda x, cid=cid: x[cid], stacked.params)) for cid in good}
                if len(good) >= c.min_clients:
                    averaged = average(stacked.params, weights, good)
                    before = params
                    if server_opt is not None:
                        params, server = server_opt.apply(params, averaged, server, r)
                    else:
                        params = averaged
                    record.aggregated = True
                    record.update_norm = float(self.distance(params, before))
                else:
                    record.note = (f"only {len(good)} valid updates, fewer than min_clients="
                                   f"{c.min_clients}: the global params were kept")
                    log.warning("round %d: %s", r, record.note)
                del stacked
                if task.has_eval:
                    record.evaluation = self.evaluate(params)
                record.seconds = time.perf_counter() - start
                history.append(record)
                log.info("round %d/%d (spmd): train loss %s, eval loss %s", r, c.rounds,
                         record.train_loss, record.eval_loss)
                if ckpt is not None:
                    ckpt.save(r, params, server, history, task.strategy, "spmd")
        finally:
            if ckpt is not None:
                ckpt.close()
        return FederatedResult(params=params, history=history, engine="spmd",
                               strategy=task.strategy)

    def evaluate(self, params: Any) -> list[dict[str, Any]]:
        """Every client's mean eval loss of ``params`` (all clients evaluate at once)."""
        task = self.task
        data = task.eval_data
        limit = task.eval_batches
        counts = [0 if d is None else (len(d) if limit is None else min(len(d), limit))
                  for d in data]
        filler = next(d for d in data if d is not None).batch_at(0, 0)  # weight 0: shape only
        totals = np.zeros(self.num_clients)
        examples = np.zeros(self.num_clients, np.int64)
        for t in range(max(counts)):
            batches, n = [], []
            for cid, d in enumerate(data):
                if t < counts[cid]:
                    b = d.batch_at(0, t)
                    batches.append(b)
                    n.append(real_examples(b))
                else:
                    batches.append(filler)
                    n.append(0)
            losses = np.asarray(self.veval(params, self.frozen,
                                           self.put_batch(stack_batches(batches))))
            # float64 sums of float32 losses, as the Flower client does
            totals += np.array([float(x) for x in losses]) * np.array(n)
            examples += n
        return [{"client_id": cid, "eval_loss": totals[cid] / examples[cid],
                 "num_examples": int(examples[cid])}
                for cid in range(self.num_clients) if examples[cid] > 0]


def slice_devices(array: jax.Array, index: int) -> set[jax.Device]:
    """The devices holding ``array[index]`` (its slice along the leading clients axis)."""
    out = set()
    for shard in array.addressable_shards:
        lead = shard.index[0] if shard.index else slice(None)
        start, stop, _ = lead.indices(array.shape[0])
        if start <= index < stop:
            out.add(shard.device)
    return out


def devices_of_group(mesh: Mesh, group: int) -> set[jax.Device]:
    return set(np.asarray(mesh.devices)[group].reshape(-1).tolist())
