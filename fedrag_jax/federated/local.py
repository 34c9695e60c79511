"""A client's local work: the same ``train_step`` as centralized training, on its own data.

Every round a client starts from the global params it received, with a fresh optimizer
state (clients are stateless: in Flower's simulation any actor may serve any client), and
trains ``local_steps`` steps from the data position ``(round - 1) * local_steps``. The fresh
state's moments are zero (as FedAvg usually has them), but its learning-rate schedule stands
at the global step ``(round - 1) * local_steps``: local step j of round r runs at the rate
of global step (r - 1) * local_steps + j, as a centralized run of rounds x local_steps steps
would. Both engines (Flower and SPMD) build the client state with :func:`client_state` and
step with :class:`ClientStep`, so they compute the same thing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..finetune.optimizer import set_schedule_step
from ..finetune.steps import TrainState, objective_mean, train_step
from .aggregate import prox_objective


class BatchSource(Protocol):
    def __len__(self) -> int: ...

    def batch_at(self, epoch: int, index: int) -> dict[str, np.ndarray]: ...


def position(data: BatchSource, pos: int) -> tuple[int, int]:
    """(epoch, index) of the ``pos``-th batch of an endless pass over ``data``."""
    return divmod(int(pos), len(data))


def client_batches(datasets: Sequence[BatchSource], pos: int) -> list[dict[str, np.ndarray]]:
    """Every client's batch at data position ``pos``, in one shape (the SPMD simulator stacks
    them): packed RALT batches all take the longest row length among the clients' (the
    extra slots are row-end padding, which changes no loss or gradient)."""
    at = [position(d, pos) for d in datasets]
    packed = [d.packed_length(*p) for d, p in zip(datasets, at, strict=True)
              if getattr(d, "pack_rows", None)]
    if not packed:
        return [d.batch_at(*p) for d, p in zip(datasets, at, strict=True)]
    return [d.batch_at(*p, length=max(packed)) for d, p in zip(datasets, at, strict=True)]


def real_examples(batch: dict[str, Any]) -> int:
    """Examples in a batch that are not padding."""
    if "example_mask" in batch:
        return int(np.asarray(batch["example_mask"]).sum())
    if "weights" in batch:  # RALT: padding instances weigh 0
        return int((np.asarray(batch["weights"]) > 0).sum())
    return int(np.shape(next(iter(batch.values())))[0])


def dataset_size(data: BatchSource) -> int:
    """Training examples a client holds: its FedAvg weight n_k (McMahan et al.)."""
    n = getattr(data, "n", None)
    if n is not None:
        return int(n)
    return sum(real_examples(data.batch_at(0, i)) for i in range(len(data)))


def client_state(template: TrainState, params: Any, round_: int, client_id: int,
                 local_steps: int) -> TrainState:
    """A client's state at the start of ``round_`` (1-based): the global params, a fresh
    optimizer state whose schedule continues from the global step, the step counter at the
    client's data position and its own rng.

    The params are copied: local training donates its state, never the caller's arrays.
    """
    params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
    first = (round_ - 1) * local_steps
    return template.replace(
        step=jnp.asarray(first, jnp.int32), params=params,
        opt_state=set_schedule_step(template.tx.init(params), first),
        rng=jax.random.fold_in(template.rng, client_id))


@dataclass(eq=False)
class ClientStep:
    """One local optimizer step ``(state, frozen, batch, anchor) -> (state, metrics)``.

    ``frozen`` travels apart from the (donated) state so that the shared frozen weights are
    never donated; ``anchor`` is the round's global params (FedProx's w_global; unused when
    ``mu == 0``, which is then exactly the centralized step).
    """

    objective: Callable
    trainable: Any = nnx.Param
    mu: float = 0.0
    micro_batches: int = 1
    _jitted: Any = field(default=None, init=False, repr=False)
    _eval: Any = field(default=None, init=False, repr=False)

    def __call__(self, state: TrainState, frozen: Any, batch: dict, anchor: Any):
        objective = self.objective
        if self.mu:
            objective = prox_objective(objective, anchor, self.mu, self.trainable)
        # skip_nonfinite=False: a diverged client's NaN reaches the server, which rejects
        # the update (a skipped step would send back the round's params as if trained)
        new, metrics = train_step(state.replace(frozen=frozen), batch, objective=objective,
                                  micro_batches=self.micro_batches, skip_nonfinite=False)
        return new.replace(frozen=None), metrics

    def jitted(self) -> Callable:
        if self._jitted is None:
            self._jitted = jax.jit(self.__call__, donate_argnums=0)
        return self._jitted

    def loss(self, graphdef: nnx.GraphDef, params: Any, frozen: Any, batch: dict) -> jax.Array:
        """The task loss of ``params`` on ``batch`` (its mean; no update)."""
        return objective_mean(self.objective, nnx.merge(graphdef, params, frozen), batch)

    def eval_jitted(self) -> Callable:
        if self._eval is None:
            self._eval = jax.jit(self.loss, static_argnums=0)
        return self._eval

    def __getstate__(self) -> dict:  # compiled functions stay in the process that made them
        return {**self.__dict__, "_jitted": None, "_eval": None}


def task_loss(metrics: dict[str, Any]) -> Any:
    """The objective's own loss (without a proximal term) from a step's metrics."""
    return metrics["task_loss"] if "task_loss" in metrics else metrics["loss"]


def local_train(state: TrainState, data: BatchSource, steps: int, start_position: int = 0, *,
                step: ClientStep) -> tuple[TrainState, dict[str, float]]:
    """``steps`` optimizer steps on ``data`` from batch position ``start_position``.

    The state passed in is consumed (donated). Metrics: ``train_loss`` (mean of the real
    step losses, proximal term excluded), ``num_examples`` (the client's dataset size, its
    aggregation weight), ``examples_seen`` (non-padding examples trained on), ``steps``,
    ``learning_rates`` (the rate of each step; empty when the optimizer names no schedule).
    """
    fn = step.jitted()
    frozen = state.frozen
    anchor = jax.tree.map(jnp.copy, state.params) if step.mu else None
    current = state.replace(frozen=None)
    losses, rates, seen = [], [], 0
    for t in range(steps):
        batch = data.batch_at(*position(data, start_position + t))
        seen += real_examples(batch)
        current, metrics = fn(current, frozen, batch, anchor)
        losses.append(task_loss(metrics))
        if "learning_rate" in metrics:
            rates.append(metrics["learning_rate"])
    losses = [float(x) for x in jax.device_get(losses)]
    return current.replace(frozen=frozen), {
        "train_loss": float(np.mean(losses)) if losses else float("nan"),
        "num_examples": dataset_size(data), "examples_seen": seen, "steps": steps,
        "learning_rates": [float(x) for x in jax.device_get(rates)]}


def evaluate_loss(template: TrainState, params: Any, data: BatchSource | None, *,
                  step: ClientStep, max_batches: int | None = None) -> dict[str, float] | None:
    """Mean task loss of ``params`` over (the first ``max_batches`` batches of) ``data``,
    weighted by real examples per batch; None without data."""
    if data is None or len(data) == 0:
        return None
    fn = step.eval_jitted()
    total, count = 0.0, 0
    for i in range(_eval_batches(data, max_batches)):
        batch = data.batch_at(0, i)
        n = real_examples(batch)
        total += float(fn(template.graphdef, params, template.frozen, batch)) * n
        count += n
    return {"eval_loss": total / max(count, 1), "num_examples": count}


def _eval_batches(data: BatchSource, max_batches: int | None) -> int:
    return len(data) if max_batches is None else min(len(data), max_batches)


def stack_batches(batches: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One batch per client -> arrays with a leading clients axis (shapes must agree)."""
    from ..errors import DataError

    keys = set(batches[0])
    for c, b in enumerate(batches):
        if set(b) != keys:
            raise DataError(f"client {c}'s batch has keys {sorted(b)}, client 0's {sorted(keys)}")
        for k in keys:
            if np.shape(b[k]) != np.shape(batches[0][k]):
                raise DataError(
                    f"client {c}'s batch {k!r} has shape {np.shape(b[k])} but client 0's has "
                    f"{np.shape(batches[0][k])}; the SPMD simulator steps all clients at once, "
                    "so their batches need one shape: build the clients' datasets with the same "
                    "batch size and a single length bucket (or use the flower engine)")
    return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in batches[0]}
