"""The optax chain: gradient clipping, AdamW, linear warmup then cosine decay.

Step ``s`` (1-based: the s-th optimizer update) runs at

    warmup  s <= W:  lr * s / W          (the first step already moves: lr / W, not 0)
    decay   s >= W:  end + (lr - end) * (1 + cos(pi * (s - W) / (T - W))) / 2

so the peak is reached at step W and the end value (``end_learning_rate_ratio`` x lr) at
the last step T = ``total_steps``. optax keeps the update count inside the optimizer state
(``ScaleByScheduleState.count``); :func:`set_schedule_step` moves it, so that a fresh
optimizer state (a federated client's, every round) continues a schedule instead of
restarting it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


@dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    total_steps: int = 1000
    end_learning_rate_ratio: float = 0.1  # cosine decays to this fraction of the peak
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    schedule: str = "cosine"  # "cosine" | "constant"


class Optimizer(NamedTuple):
    """An optax transformation (``init``, ``update``) and the learning-rate schedule it
    applies: ``schedule(count)`` is the rate of the update made after ``count`` updates."""

    init: Callable
    update: Callable
    schedule: optax.Schedule


def learning_rate_schedule(c: OptimizerConfig) -> optax.Schedule:
    """``count -> rate`` (optax's convention: ``count`` updates done before this one)."""
    peak, end = c.learning_rate, c.learning_rate * c.end_learning_rate_ratio
    warmup, total = c.warmup_steps, c.total_steps
    start = max(warmup, 1)  # the step the decay starts from (at the peak)

    def rate(count: Any) -> jax.Array:
        step = jnp.asarray(count, jnp.float32) + 1.0
        warm = peak * step / warmup if warmup else jnp.asarray(peak, jnp.float32)
        if c.schedule == "constant":
            return jnp.where(step < warmup, warm, peak)
        frac = jnp.clip((step - start) / max(total - start, 1), 0.0, 1.0)
        decayed = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return jnp.where(step < warmup, warm, decayed)

    if c.schedule not in ("cosine", "constant"):
        from ..errors import ConfigError

        raise ConfigError(f"schedule={c.schedule!r}; choose cosine or constant")
    return rate


def learning_rate_at(c: OptimizerConfig, step: int) -> float:
    """The learning rate of optimizer step ``step`` (1-based) under ``c``."""
    return float(learning_rate_schedule(c)(step - 1))


def make_optimizer(c: OptimizerConfig) -> Optimizer:
    schedule = learning_rate_schedule(c)
    parts = []
    if c.max_grad_norm:
        parts.append(optax.clip_by_global_norm(c.max_grad_norm))
    parts.append(optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps,
                             weight_decay=c.weight_decay))
    tx = optax.chain(*parts)
    return Optimizer(tx.init, tx.update, schedule)


# --- the schedule's step inside an optimizer state ------------------------------------------
# optax's states that index a learning-rate (or hyper-parameter) schedule. Adam's own count
# (ScaleByAdamState) is not one: it drives the bias correction of its moments, and stays
# with them (a fresh state's moments are zero, so its count must be zero too).
SCHEDULE_STATES = (optax.ScaleByScheduleState, optax.InjectHyperparamsState,
                   optax.InjectStatefulHyperparamsState)


def _is_schedule_state(x: Any) -> bool:
    return isinstance(x, SCHEDULE_STATES)


def schedule_step(opt_state: Any) -> jax.Array | None:
    """The update count the state's schedule is at (None: the state has no schedule)."""
    found = [s.count for s in jax.tree.leaves(opt_state, is_leaf=_is_schedule_state)
             if _is_schedule_state(s)]
    return found[0] if found else None


def set_schedule_step(opt_state: Any, count: Any) -> Any:
    """``opt_state`` with every schedule's count set to ``count`` (e.g. the global step a
    federated client's fresh state starts from); nothing else changes. Works for any optax
    optimizer whose schedules live in :data:`SCHEDULE_STATES` (every built-in one)."""

    def move(s: Any) -> Any:
        if not _is_schedule_state(s):
            return s
        return s._replace(count=jnp.asarray(count, s.count.dtype).reshape(s.count.shape))

    return jax.tree.map(move, opt_state, is_leaf=_is_schedule_state)
