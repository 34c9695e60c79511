"""A tiny LSR training run shared by tests/test_trainer.py and the subprocess it kills.

    python -m tests.trainer_worker OUTPUT_DIR STALL_AT_STEP

runs the same config as :func:`build` with a checkpoint every step and stalls (sleeps) in a
hook at ``STALL_AT_STEP``, so that the test can SIGKILL it mid-run.
"""

from __future__ import annotations

import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedrag_jax.finetune.optimizer import OptimizerConfig, make_optimizer
from fedrag_jax.finetune.steps import QUERY_TOWER, Towers, TrainState, lsr_objective, lsr_step
from fedrag_jax.finetune.trainer import Trainer, TrainerConfig
from fedrag_jax.models.layers import embedding, linear

DIM = 32


class BagEncoder(nnx.Module):
    """A tiny query encoder (masked mean of token embeddings, then a dense layer): the LSR
    path of a BERT tower at a fraction of its compile time, which the subprocess pays again."""

    def __init__(self, seed: int, vocab: int = 64):
        rngs = nnx.Rngs(seed)
        f32 = dict(dtype=np.float32, param_dtype=np.float32, rngs=rngs)
        self.embed = embedding(vocab, DIM, ("vocab", "embed"), init_std=0.5, **f32)
        self.dense = linear(DIM, DIM, ("embed", "mlp"), use_bias=True, init_std=0.2, **f32)

    def __call__(self, ids, mask):
        m = mask[..., None].astype(jnp.float32)
        pooled = (self.embed(ids) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        return self.dense(pooled)


def towers(seed: int) -> Towers:
    query = BagEncoder(seed)
    return Towers(query, nnx.clone(query))


def lsr_batch(rng: np.random.Generator, b: int = 8, k: int = 4, length: int = 10):
    """Random queries; the generator clearly prefers one passage per query."""
    ids = rng.integers(1, 64, size=(b, length)).astype(np.int32)
    mask = np.ones((b, length), bool)
    mask[1::2, length - 3:] = False
    emb = rng.normal(size=(b, k, DIM)).astype(np.float32)
    lm = np.full((b, k), -30.0, np.float32)
    lm[np.arange(b), rng.integers(0, k, size=b)] = -2.0
    return {"query_ids": ids, "query_mask": mask, "passage_emb": emb, "lm_logprobs": lm,
            "example_mask": np.ones(b, bool)}


class SyntheticLSR:
    """``n`` fixed random LSR batches, visited in an order shuffled by epoch."""

    def __init__(self, n: int = 4, seed: int = 0, b: int = 8):
        rng = np.random.default_rng(seed)
        self.batches = [lsr_batch(rng, b=b) for _ in range(n)]
        self.seed = seed

    def __len__(self) -> int:
        return len(self.batches)

    def batch_at(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.batches))
        return self.batches[order[index]]


# jitted once per process: every Trainer of the tests reuses one compilation
STEP = jax.jit(functools.partial(lsr_step, tau_retrieval=1.0, tau_lm=1.0), donate_argnums=0)


@jax.jit
def _eval_loss(state: TrainState, batch):
    total, aux = lsr_objective(state.model(), batch, tau_retrieval=1.0, tau_lm=1.0)
    p_best, n = aux["p_retrieval_of_lm_best"]
    return total / aux["weight"], p_best / n


def make_eval_fn(data: SyntheticLSR):
    def eval_fn(state: TrainState) -> dict[str, float]:
        value, p_best = _eval_loss(state, data.batches[0])
        return {"eval_loss": float(value), "p_best": float(p_best)}

    return eval_fn


@functools.cache
def optimizer(lr: float, total_steps: int):
    """One optax object per setting: it is a static part of the state, so a new (unequal)
    object would make the jitted step compile again."""
    return make_optimizer(OptimizerConfig(learning_rate=lr, total_steps=total_steps))


def build(output_dir, *, total_steps: int = 6, hooks=(), lr: float = 3e-2, **config):
    config = {"checkpoint_every": 1, "eval_every": 3, "progress": False, "plot": False,
              **config}
    tx = optimizer(lr, total_steps)
    state = TrainState.create(towers(7), tx, trainable=QUERY_TOWER, seed=7)
    data = SyntheticLSR()
    return Trainer(state, STEP, data, TrainerConfig(total_steps=total_steps,
                                                    output_dir=str(output_dir), **config),
                   eval_fn=make_eval_fn(data), hooks=hooks)


def params_of(state: TrainState) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(state.model(), nnx.Param))]


def main(output_dir: str, stall_at: int) -> None:
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py

    def stall(step, state, metrics):
        if step == stall_at:
            time.sleep(600)  # the test kills us here

    build(output_dir, hooks=(stall,)).train()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
