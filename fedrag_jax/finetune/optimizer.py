"""The optax chain: gradient clipping, AdamW, linear warmup then cosine decay."""

from __future__ import annotations

from dataclasses import dataclass

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


def learning_rate_schedule(c: OptimizerConfig) -> optax.Schedule:
    if c.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, c.learning_rate, max(c.warmup_steps, 1)),
             optax.constant_schedule(c.learning_rate)], [c.warmup_steps]
        ) if c.warmup_steps else optax.constant_schedule(c.learning_rate)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if c.warmup_steps else c.learning_rate, peak_value=c.learning_rate,
        warmup_steps=c.warmup_steps, decay_steps=max(c.total_steps, c.warmup_steps + 1),
        end_value=c.learning_rate * c.end_learning_rate_ratio)


def make_optimizer(c: OptimizerConfig) -> optax.GradientTransformation:
    parts = []
    if c.max_grad_norm:
        parts.append(optax.clip_by_global_norm(c.max_grad_norm))
    parts.append(optax.adamw(learning_rate_schedule(c), b1=c.b1, b2=c.b2, eps=c.eps,
                             weight_decay=c.weight_decay))
    return optax.chain(*parts)
