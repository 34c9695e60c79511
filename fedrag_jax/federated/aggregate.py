"""Aggregation math in JAX, over client updates stacked along a leading ``clients`` axis.

These are the SPMD simulator's server rules; the Flower path uses Flower's strategies
(``flwr.serverapp.strategy``), and every rule here follows the formula of the Flower
strategy of the same name so that both engines agree:

    fedavg         sum_k n_k w_k / sum_k n_k                       (McMahan et al., 2017)
    fedprox        fedavg; the proximal term is a *client loss* term (prox_objective)
    fedadam/yogi   fedavg, then a server Adam / Yogi step on delta = avg - w  (Reddi et al.)
    fedmedian      coordinate-wise median
    fedtrimmedavg  coordinate-wise mean after cutting a fraction beta at each end
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..errors import ConfigError

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg")


@dataclass(frozen=True)
class StrategyOptions:
    """Knobs of the server strategies (names and defaults as in Flower)."""

    proximal_mu: float = 0.0  # fedprox: mu of the proximal term mu/2 ||w - w_global||^2
    server_learning_rate: float = 0.1  # fedadam/fedyogi: eta
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3  # fedadam/fedyogi: adaptivity (epsilon)
    trim_beta: float = 0.2  # fedtrimmedavg: fraction cut at each end

    def __post_init__(self) -> None:
        if self.proximal_mu < 0:
            raise ConfigError(f"proximal_mu={self.proximal_mu} must be >= 0")
        if not 0.0 <= self.trim_beta < 0.5:
            raise ConfigError(f"trim_beta={self.trim_beta} must be in [0, 0.5)")
        if self.server_tau <= 0:
            raise ConfigError(f"server_tau={self.server_tau} must be > 0")

    @classmethod
    def from_config(cls, config: Any) -> StrategyOptions:
        """Read the fields of this class that a FederatedConfig has (the rest: defaults)."""
        names = cls.__dataclass_fields__
        return cls(**{k: getattr(config, k) for k in names if hasattr(config, k)})


def clients_per_round(config: Any) -> int:
    """Clients sampled per round, as Flower counts them: max(int(n * fraction_train),
    min_clients), at most n."""
    n = config.num_clients
    return min(n, max(int(n * config.fraction_train), config.min_clients))


def sample_clients(seed: int, round_: int, num_clients: int, k: int) -> list[int]:
    """The clients that train in round ``round_``: all of them, or a draw of ``k`` seeded by
    (seed, round). Both engines use it (the Flower server offers its strategy only the
    chosen nodes), so partial participation trains the same clients on either."""
    if k >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, round_])
    return sorted(int(c) for c in rng.choice(num_clients, k, replace=False))


def check_dp_strategy(name: str, dp_clipping_norm: float | None) -> None:
    """Central DP (Flower's fixed-clipping wrappers) adds noise of std z * C / m to a
    *uniform* mean of m clipped updates: its guarantee holds for FedAvg / FedProx averaged
    with equal weights, not for a server optimizer (FedAdam, FedYogi: the noise would be
    added after their step) nor a median / trimmed mean (other sensitivity)."""
    if dp_clipping_norm is not None and check_strategy(name) not in ("fedavg", "fedprox"):
        raise ConfigError(f"differential privacy (dp_clipping_norm) calibrates its noise for a "
                          f"uniform mean of clipped updates: use strategy fedavg or fedprox, "
                          f"not {name!r}")


def check_strategy(name: str) -> str:
    key = name.lower().replace("_", "").replace("-", "")
    if key not in STRATEGIES:
        raise ConfigError(f"unknown federated strategy {name!r}; choose one of {STRATEGIES}")
    return key


# --- client-side: FedProx ------------------------------------------------------------------
def proximal_term(params: Any, global_params: Any) -> jax.Array:
    """||w - w_global||^2 over the trainable leaves (keyed by position: same structure)."""
    a, b = jax.tree.leaves(params), jax.tree.leaves(global_params)
    if len(a) != len(b):
        raise ConfigError(f"proximal term: {len(a)} trainable leaves but {len(b)} global ones")
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32) - jax.lax.stop_gradient(
        y).astype(jnp.float32))) for x, y in zip(a, b, strict=True))


def prox_objective(objective: Callable, global_params: Any, mu: float,
                   trainable: Any = nnx.Param) -> Callable:
    """``objective`` plus mu/2 ||w - w_global||^2 on the trainable params (FedProx).

    A loss term, so ``train_step`` differentiates it like any other; the task loss is kept in
    the aux metrics as ``task_loss`` (what a client reports) and the term as ``prox_term``.
    The objective returns a loss *sum* and its weight (``finetune.steps``): the term is
    added ``weight`` times, so that the step's mean is the task mean + mu/2 ||w - w_g||^2
    however the batch is split into micro-batches.
    """

    def wrapped(model: nnx.Module, batch: Any):
        total, aux = objective(model, batch)
        aux = dict(aux)
        weight = jnp.asarray(aux.get("weight", 1.0), jnp.float32)
        aux["weight"] = weight
        term = proximal_term(nnx.state(model, trainable), global_params)
        return total + weight * 0.5 * mu * term, {
            **aux, "task_loss": (total, weight), "prox_term": (term * weight, weight)}

    return wrapped


# --- server-side rules on stacked updates ---------------------------------------------------
def fedavg(stacked: Any, weights: jax.Array) -> Any:
    """Weighted mean over the leading axis; ``weights`` (e.g. example counts) need not sum
    to 1, and a zero weight leaves that client out."""
    w = jnp.asarray(weights, jnp.float32)
    w = w / jnp.sum(w)

    def mean(x):
        return jnp.tensordot(w, x.astype(jnp.float32), axes=1).astype(x.dtype)

    return jax.tree.map(mean, stacked)


def fedmedian(stacked: Any) -> Any:
    return jax.tree.map(lambda x: jnp.median(x, axis=0).astype(x.dtype), stacked)


def trimmed_mean(stacked: Any, beta: float) -> Any:
    """Coordinate-wise mean of the values left after cutting ``int(beta * n)`` at each end."""

    def cut(x):
        n = x.shape[0]
        low = int(beta * n)
        return jnp.mean(jnp.sort(x, axis=0)[low:n - low], axis=0).astype(x.dtype)

    return jax.tree.map(cut, stacked)


class ServerOptimizer:
    """FedAdam / FedYogi server step, as Flower's FedOpt strategies compute it.

    delta = avg - w;  m = b1 m + (1 - b1) delta
    adam: v = b2 v + (1 - b2) delta^2
          w += eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) m / (sqrt v + tau)
    yogi: v = v - (1 - b2) delta^2 sign(v - delta^2)
          w += eta m / (sqrt v + tau)
    (t = the server round, counted from 1, as in Flower.)
    """

    def __init__(self, kind: str, options: StrategyOptions):
        if kind not in ("fedadam", "fedyogi"):
            raise ConfigError(f"no server optimizer for strategy {kind!r}")
        self.kind, self.o = kind, options

    def init(self, params: Any) -> dict[str, Any]:
        zeros = jax.tree.map(jnp.zeros_like, params)
        return {"m": zeros, "v": jax.tree.map(jnp.zeros_like, params)}

    def apply(self, params: Any, averaged: Any, state: dict[str, Any], server_round: int):
        o = self.o
        delta = jax.tree.map(lambda a, w: a - w, averaged, params)
        m = jax.tree.map(lambda m, d: o.server_beta1 * m + (1 - o.server_beta1) * d,
                         state["m"], delta)
        if self.kind == "fedadam":
            v = jax.tree.map(lambda v, d: o.server_beta2 * v + (1 - o.server_beta2) * d * d,
                             state["v"], delta)
            eta = (o.server_learning_rate * (1 - o.server_beta2 ** (server_round + 1.0)) ** 0.5
                   / (1 - o.server_beta1 ** (server_round + 1.0)))
        else:
            v = jax.tree.map(lambda v, d: v - (1 - o.server_beta2) * d * d * jnp.sign(v - d * d),
                             state["v"], delta)
            eta = o.server_learning_rate
        new = jax.tree.map(lambda w, m, v: (w + eta * m / (jnp.sqrt(v) + o.server_tau)
                                            ).astype(w.dtype), params, m, v)
        return new, {"m": m, "v": v}


def aggregate(strategy: str, stacked: Any, weights: jax.Array, options: StrategyOptions) -> Any:
    """The averaging part of ``strategy`` (the server-optimizer step comes after)."""
    if strategy in ("fedavg", "fedprox", "fedadam", "fedyogi"):
        return fedavg(stacked, weights)
    if strategy == "fedmedian":
        return fedmedian(stacked)
    if strategy == "fedtrimmedavg":
        return trimmed_mean(stacked, options.trim_beta)
    raise ConfigError(f"unknown federated strategy {strategy!r}; choose one of {STRATEGIES}")
