"""Pure train steps: ``step(state, batch) -> (state, metrics)``, jit-compiled with explicit
shardings over the mesh and the old state donated.

    lsr_step   retriever: KL(Q_LM || P_R) over each query's top-k passages
    ralt_step  generator: cross-entropy on response + EOS tokens

Only the *trainable* variables (a filter: the query tower, or the LoRA adapters) are
differentiated and carry optimizer state; the rest of the model rides along as ``frozen``.

An objective returns the *sum* of its batch's losses and, as ``aux["weight"]``, what that
sum is divided by (real examples for LSR, weighted target tokens for RALT): the step adds
up every micro-batch's sum, gradient and weight and divides once, so accumulation gives
the full batch's gradient whatever the micro-batches hold (unequal answer lengths, padding,
nothing at all).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from ..errors import ConfigError
from ..sharding import (
    DEFAULT_RULES,
    SHARED_BATCH_KEYS,
    LogicalRules,
    batch_sharding,
    replicated,
    variable_shardings,
)
from .losses import lsr_kl, ralt_loss_sum
from .optimizer import schedule_step, set_schedule_step

Batch = dict[str, jax.Array]


@struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # trainable variables
    frozen: nnx.State  # everything else in the model
    opt_state: optax.OptState
    rng: jax.Array
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @classmethod
    def create(cls, model: nnx.Module, tx: optax.GradientTransformation,
               trainable: Any = nnx.Param, seed: int = 0) -> TrainState:
        graphdef, params, frozen = nnx.split(model, trainable, ...)
        return cls(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                   opt_state=tx.init(params), rng=jax.random.key(seed), graphdef=graphdef,
                   tx=tx)

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params, self.frozen)


class Towers(nnx.Module):
    """The two retriever towers as one module, so a filter can pick the trainable one."""

    def __init__(self, query: nnx.Module, context: nnx.Module):
        self.query_tower = query
        self.context_tower = context


QUERY_TOWER = nnx.All(nnx.Param, nnx.PathContains("query_tower"))


# --- objectives: (model, batch) -> (loss sum, aux with its "weight") ---------------------
def lsr_objective(model: Towers, batch: Batch, *, tau_retrieval: float, tau_lm: float):
    """s(x, d) = <q(x), e_d>; e_d from the store, or re-encoded by the context tower.

    The sum of the real examples' KL(Q_LM || P_R), weight = their count."""
    q = model.query_tower(batch["query_ids"], batch["query_mask"])  # [B, D]
    if "passage_ids" in batch:  # train (or at least run) the context tower
        b, k, length = batch["passage_ids"].shape
        e = model.context_tower(batch["passage_ids"].reshape(b * k, length),
                          batch["passage_mask"].reshape(b * k, length)).reshape(b, k, -1)
    else:
        e = batch["passage_emb"]
    scores = jnp.einsum("bd,bkd->bk", q, e.astype(q.dtype))
    kl = lsr_kl(scores, batch["lm_logprobs"], tau_retrieval=tau_retrieval, tau_lm=tau_lm)
    m = batch["example_mask"].astype(jnp.float32)
    p_r = jax.nn.softmax(scores / tau_retrieval, axis=-1)
    best = jnp.argmax(batch["lm_logprobs"], axis=-1)
    p_best = jnp.take_along_axis(p_r, best[:, None], axis=-1)[:, 0]
    return jnp.sum(kl * m), {"weight": jnp.sum(m),
                             "p_retrieval_of_lm_best": (jnp.sum(p_best * m), jnp.sum(m))}


def ralt_objective(model: nnx.Module, batch: Batch):
    """Logits only at the positions that predict response + EOS tokens.

    A packed batch (``segment_ids``) holds several instances per row; instance i's targets
    are read from its row ``instance_row[i]`` (stored over the whole step: modulo the rows
    here, it is the row within this micro-batch), so the loss is the same per instance.
    The sum of the weighted token cross-entropies, weight = the weighted token count.
    """
    if "segment_ids" in batch:  # (and the instances' common prefix, run once, if any)
        hidden, _ = model.hidden_states(batch["input_ids"], segment_ids=batch["segment_ids"],
                                        prefix_ids=batch.get("prefix_ids"))
        rows = batch["instance_row"] % hidden.shape[0]
        picked = hidden[rows[:, None], batch["target_index"]]  # [N, T, D]
    else:
        hidden, _ = model.hidden_states(batch["input_ids"], batch["attention_mask"])
        picked = jnp.take_along_axis(hidden, batch["target_index"][..., None], axis=1)
    logits = model.logits(picked)
    total, weight = ralt_loss_sum(logits, batch["target_ids"], batch["target_mask"],
                                  batch.get("weights"))
    return total, {"weight": weight, "target_tokens": jnp.sum(batch["target_mask"])}


def objective_mean(objective: Callable, model: nnx.Module, batch: Batch) -> jax.Array:
    """The objective's mean loss on ``batch`` (its sum over its weight; 0 with no weight)."""
    total, aux = objective(model, batch)
    weight = aux.get("weight", 1.0) if isinstance(aux, dict) else 1.0
    return total / jnp.where(weight > 0, weight, 1.0)


# --- the generic step -----------------------------------------------------------------------
def _check_micro_batches(batch: Batch, micro_batches: int) -> None:
    if micro_batches < 1:
        raise ConfigError(f"micro_batches={micro_batches}: use 1 (no accumulation) or more")
    for key, value in batch.items():
        if key not in SHARED_BATCH_KEYS and jnp.ndim(value) and \
                jnp.shape(value)[0] % micro_batches:
            raise ConfigError(
                f"micro_batches={micro_batches} must divide the batch: {key!r} has "
                f"{jnp.shape(value)[0]} rows; choose a batch size (or pack_rows) that is a "
                "multiple of micro_batches")


def _finite_mean(pairs: Any) -> Any:
    """A (sum, count) metric as sum / count; other metrics as they are."""
    if isinstance(pairs, tuple):
        total, count = pairs
        return total / jnp.maximum(count, 1)
    return pairs


def train_step(state: TrainState, batch: Batch, *, objective: Callable,
               micro_batches: int = 1, skip_nonfinite: bool = True
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on the batch's mean gradient, accumulated over ``micro_batches``
    slices (the sum of the slices' loss sums and gradients over the sum of their weights).

    ``objective(model, batch) -> (loss_sum, aux)``: ``aux["weight"]`` is what the sum is
    divided by (an objective without it is a mean: weight 1 per micro-batch). The other
    aux entries are added over micro-batches; a ``(sum, count)`` pair is logged as
    sum / count. ``skip_nonfinite``: a NaN / inf loss or gradient leaves the params and the
    optimizer's moments as they were (its schedule still advances, as the step counter does)
    and sets the ``nonfinite`` metric to 1. Metrics: loss, grad_norm, learning_rate (when
    the optimizer names its schedule, :class:`~fedrag_jax.finetune.optimizer.Optimizer`),
    nonfinite, and the objective's own.
    """
    _check_micro_batches(batch, micro_batches)

    def loss_and_grads(mb: Batch):
        def loss_of(params):
            total, aux = objective(nnx.merge(state.graphdef, params, state.frozen), mb)
            aux = dict(aux)
            weight = jnp.asarray(aux.pop("weight", 1.0), jnp.float32)
            return total, (weight, aux)

        return jax.value_and_grad(loss_of, has_aux=True)(state.params)

    if micro_batches == 1:
        (total, (weight, aux)), grads = loss_and_grads(batch)
    else:
        shared = {k: v for k, v in batch.items() if k in SHARED_BATCH_KEYS}
        split = jax.tree.map(lambda x: x.reshape(micro_batches, -1, *x.shape[1:]),
                             {k: v for k, v in batch.items() if k not in SHARED_BATCH_KEYS})

        def accumulate(carry, mb):
            return jax.tree.map(jnp.add, carry, loss_and_grads({**mb, **shared})), None

        zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: loss_and_grads(
            {**jax.tree.map(lambda x: x[0], split), **shared})))
        ((total, (weight, aux)), grads), _ = jax.lax.scan(accumulate, zero, split)
    scale = 1.0 / jnp.where(weight > 0, weight, 1.0)  # no weight at all: zero gradient
    loss = total * scale
    grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": grad_norm,
               **{k: _finite_mean(v) for k, v in aux.items()}}
    schedule, count = getattr(state.tx, "schedule", None), schedule_step(state.opt_state)
    if schedule is not None and count is not None:
        metrics["learning_rate"] = schedule(count)  # the rate this update used
    if skip_nonfinite:
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        kept = state.opt_state
        if count is not None:
            kept = set_schedule_step(kept, schedule_step(opt_state))
        params = jax.tree.map(lambda new, old: jnp.where(ok, new, old), params, state.params)
        opt_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), opt_state, kept)
        metrics["nonfinite"] = jnp.logical_not(ok).astype(jnp.int32)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              rng=jax.random.fold_in(state.rng, state.step))
    return new_state, metrics


def lsr_step(state: TrainState, batch: Batch, *, tau_retrieval: float = 1.0,
             tau_lm: float = 1.0, micro_batches: int = 1):
    objective = functools.partial(lsr_objective, tau_retrieval=tau_retrieval, tau_lm=tau_lm)
    return train_step(state, batch, objective=objective, micro_batches=micro_batches)


def ralt_step(state: TrainState, batch: Batch, *, micro_batches: int = 1):
    return train_step(state, batch, objective=ralt_objective, micro_batches=micro_batches)


# --- placement and compilation --------------------------------------------------------------
def state_shardings(state: TrainState, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
    params = variable_shardings(state.params, mesh, rules)
    frozen = variable_shardings(state.frozen, mesh, rules)
    rep = replicated(mesh)
    opt = optax.tree_map_params(state.tx, lambda _, s: s, state.opt_state, params,
                                transform_non_params=lambda _: rep)
    return state.replace(step=rep, params=params, frozen=frozen, opt_state=opt, rng=rep)


def place_state(state: TrainState, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
    """Lay the state out on the mesh as the rules say, every leaf in a buffer of its own.

    (Small constants such as the zero step counters may share one buffer; a donated state
    must not, so each leaf is copied inside the jit that places it.)
    """
    copy = jax.jit(lambda s: jax.tree.map(jnp.copy, s),
                   out_shardings=state_shardings(state, mesh, rules))
    return copy(state)


def compile_step(step_fn: Callable, state: TrainState, batch: Batch, mesh: Mesh,
                 rules: LogicalRules = DEFAULT_RULES, **hyper: Any) -> Callable:
    """``jax.jit(step)`` with in/out shardings from the mesh and the state donated.

    Every batch array is sharded along its leading (example) dimension, but for the
    ``SHARED_BATCH_KEYS`` (replicated).
    """
    state_sh = state_shardings(state, mesh, rules)
    batch_sh = {k: replicated(mesh) if k in SHARED_BATCH_KEYS
                else batch_sharding(mesh, jnp.ndim(v), rules) for k, v in batch.items()}
    fn = functools.partial(step_fn, **hyper)
    return jax.jit(fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                   donate_argnums=0)
