"""The training loop: learning, logs (JSONL, TensorBoard, PNG, progress bar), and exact resume
after a SIGKILL, also when the newest checkpoint is damaged.

One run is killed in a subprocess (tests/trainer_worker.py) while the uninterrupted reference
run trains here; both use the same tiny LSR setup and seed.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fedrag_jax.checkpoint import CheckpointManager
from fedrag_jax.errors import ConfigError
from fedrag_jax.finetune.steps import TrainState, train_step
from fedrag_jax.finetune.trainer import Trainer, TrainerConfig, read_metrics
from fedrag_jax.models.layers import linear
from fedrag_jax.sharding import MeshConfig, make_mesh
from tests.trainer_worker import build, make_eval_fn, params_of

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6
KILL_AFTER = 3  # the killed run stalls in step 4, once step 3's checkpoint is on disk


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and a run SIGKILLed after step 3's checkpoint (plus a copy of it)."""
    base = tmp_path_factory.mktemp("trainer")
    killed = base / "killed"
    log_path = base / "killed.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.trainer_worker", str(killed), str(KILL_AFTER + 1)],
            cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        # the reference trains meanwhile (two cores: both compile at once)
        reference = build(base / "full", progress=True, plot=True).train()
        done = killed / "checkpoints" / str(KILL_AFTER) / "integrity.json"
        deadline = time.monotonic() + 180
        while not done.exists():
            if proc.poll() is not None:
                pytest.fail(f"the worker exited early:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint {KILL_AFTER} in time:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    shutil.copytree(killed, base / "killed-copy")
    return base, params_of(reference)


def steps_of(records, split):
    return [r["step"] for r in records if r["split"] == split]


def assert_bitwise_equal(params, reference):
    assert len(params) == len(reference)
    for a, b in zip(params, reference, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_uninterrupted_run_logs_evaluates_plots_and_checkpoints(runs):
    base, _ = runs
    out = base / "full"
    records = read_metrics(out / "metrics.jsonl")
    assert steps_of(records, "train") == list(range(1, STEPS + 1))
    assert steps_of(records, "eval") == [3, 6]
    for r in records:
        numbers = [v for k, v in r.items() if k != "split"]
        assert all(isinstance(v, int | float) and math.isfinite(v) for v in numbers), r
    train = [r for r in records if r["split"] == "train"]
    assert {"loss", "grad_norm", "epoch", "steps_per_s", "examples_per_s", "wall_time_s"} <= \
        set(train[0])
    assert [r["epoch"] for r in train] == [0, 0, 0, 0, 1, 1]  # 4 batches per epoch
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and b"train/loss" in events[0].read_bytes()
    assert b"eval/eval_loss" in events[0].read_bytes()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with CheckpointManager(out / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [4, 5, 6]  # keep_checkpoints=3


def test_resume_after_sigkill_is_bitwise_exact(runs):
    base, reference = runs
    out = base / "killed"
    before = read_metrics(out / "metrics.jsonl")
    assert steps_of(before, "train") == [1, 2, 3]  # logged before checkpoint 3, nothing after
    with CheckpointManager(out / "checkpoints") as ckpt:
        assert ckpt.latest_step() == KILL_AFTER
    state = build(out).train()
    assert_bitwise_equal(params_of(state), reference)
    records = read_metrics(out / "metrics.jsonl")
    assert steps_of(records, "train") == list(range(1, STEPS + 1))  # continued from step 4
    assert steps_of(records, "eval") == [3, 6]
    # a finished run resumed again has nothing left to do and returns the same state
    again = build(out).train()
    assert_bitwise_equal(params_of(again), reference)
    assert read_metrics(out / "metrics.jsonl") == records


def test_damaged_newest_checkpoint_falls_back_and_still_ends_exact(runs, caplog):
    base, reference = runs
    out = base / "killed-copy"
    data = [p for p in (out / "checkpoints" / "3" / "state").rglob("*")
            if p.is_file() and "/d/" in p.as_posix()]
    victim = max(data, key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        state = build(out).train()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("step 3" in m and victim.name in m for m in warnings), warnings
    assert_bitwise_equal(params_of(state), reference)
    records = read_metrics(out / "metrics.jsonl")
    assert steps_of(records, "train") == list(range(1, STEPS + 1))  # step 3 redone, once
    assert steps_of(records, "eval") == [3, 6]
    assert (out / "checkpoints-corrupt" / "3").is_dir()  # set aside, not deleted


def test_loss_goes_down_with_hooks_and_sparse_logging(tmp_path, runs):
    calls = []

    def hook(step, state, metrics):
        calls.append(step)
        return state.replace()  # a hook may hand back a (new) state

    trainer = build(tmp_path, log_every=2, eval_every=2, checkpoint_every=0, progress=True,
                    plot=True, hooks=(hook,))
    eval_fn = make_eval_fn(trainer.data)
    initial = eval_fn(trainer.state)["eval_loss"]
    trainer.train()
    assert calls == list(range(1, STEPS + 1))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert steps_of(records, "train") == [2, 4, 6]
    evals = [r["eval_loss"] for r in records if r["split"] == "eval"]
    assert steps_of(records, "eval") == [2, 4, 6]
    assert evals[-1] < 0.5 * initial, (initial, evals)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    with CheckpointManager(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [STEPS]  # only the final checkpoint
    with pytest.raises(ConfigError, match="resume=False"):
        build(tmp_path, resume=False).train()


class Probe(nnx.Module):
    """A one-layer regression model whose kernel is sharded (embed -> fsdp, mlp -> tensor)."""

    def __init__(self, seed: int):
        self.dense = linear(8, 16, ("embed", "mlp"), use_bias=True, dtype=jnp.float32,
                            param_dtype=jnp.float32, rngs=nnx.Rngs(seed), init_std=0.3)

    def __call__(self, x):
        return self.dense(x).sum(-1)


def regression(model, batch):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2), {}


class Regression:
    def __init__(self, n: int = 3):
        rng = np.random.default_rng(5)
        self.batches = [{"x": rng.normal(size=(8, 8)).astype(np.float32),
                         "y": rng.normal(size=(8,)).astype(np.float32)} for _ in range(n)]

    def __len__(self):
        return len(self.batches)

    def batch_at(self, epoch, index):
        return self.batches[(index + epoch) % len(self.batches)]


def test_sharded_training_on_a_mesh_resumes_exactly(tmp_path):
    """Plain step fn + mesh: the trainer places the state and compiles the step; batches are
    sharded; a resumed run restores onto the mesh and ends equal to an unbroken one."""
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    tx = optax.adam(1e-2)
    step = functools.partial(train_step, objective=regression)

    def run(out, total, **kw):
        state = TrainState.create(Probe(3), tx, seed=1)
        config = TrainerConfig(total_steps=total, output_dir=str(out), progress=False,
                               plot=False, **kw)
        return Trainer(state, step, Regression(), config, mesh=mesh).train()

    full = run(tmp_path / "full", 5)
    run(tmp_path / "split", 3, checkpoint_every=2)
    resumed = run(tmp_path / "split", 5, checkpoint_every=2)
    kernel = resumed.params["dense"]["kernel"][...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert int(resumed.step) == 5
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    records = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert steps_of(records, "train") == [1, 2, 3, 4, 5]
    assert records[-1]["loss"] < records[0]["loss"]


def test_resume_refuses_checkpoints_of_other_settings(tmp_path):
    """A run that finds checkpoints written under other settings (another lr, model, data)
    refuses them by name instead of continuing them; same settings and more steps resume."""
    tx = optax.sgd(1e-2)
    step = functools.partial(train_step, objective=regression)

    def run(total, settings):
        state = TrainState.create(Probe(3), tx, seed=1)
        config = TrainerConfig(total_steps=total, output_dir=str(tmp_path), progress=False,
                               plot=False, checkpoint_every=1, settings=settings)
        return Trainer(state, step, Regression(), config).train()

    first = {"seed": 0, "lsr": {"learning_rate": 3e-5, "buckets": (64, 128)},
             "model": {"retriever": "/models/a"}}
    run(2, first)
    other = {"seed": 0, "lsr": {"learning_rate": 1e-4, "buckets": (64, 128)},
             "model": {"retriever": "/models/b"}}
    with pytest.raises(ConfigError, match=r"lsr\.learning_rate: 3e-05 -> 0\.0001; "
                                          r"model\.retriever: '/models/a' -> '/models/b'"):
        run(4, other)
    with CheckpointManager(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps()[-1] == 2  # nothing was overwritten
    resumed = run(4, first)  # tuples come back from the JSON metadata as lists: still equal
    assert int(resumed.step) == 4
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert steps_of(records, "train") == [1, 2, 3, 4]


def test_config_is_validated():
    with pytest.raises(ConfigError):
        TrainerConfig(total_steps=0, output_dir="x")
    with pytest.raises(ConfigError):
        TrainerConfig(total_steps=1, output_dir="x", log_every=0)
    with pytest.raises(ConfigError):
        TrainerConfig(total_steps=1, output_dir="x", keep_checkpoints=0)
