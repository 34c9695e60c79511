"""Orbax checkpoints: round trip (values, dtypes, structure, shardings), keep-N, and damage
(truncated, edited, deleted files; missing manifest) detected with fallback to a good step."""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrag_jax.checkpoint import MANIFEST, CheckpointManager
from fedrag_jax.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    WeightMismatchError,
)
from fedrag_jax.finetune.optimizer import OptimizerConfig, make_optimizer
from fedrag_jax.finetune.steps import QUERY_TOWER, TrainState, place_state
from fedrag_jax.sharding import MeshConfig, make_mesh
from tests.trainer_worker import towers

TX = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=10))


def host(leaf):
    """Comparable host copy of a leaf (typed PRNG keys as their key data)."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return np.asarray(leaf)


def assert_states_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(host(x), host(y))


def small_state(value: float):
    """A tiny TrainState-like pytree of mixed dtypes, with a typed key, marked by ``value``."""
    return {"step": jnp.asarray(int(value), jnp.int32),
            "w": jnp.full((3, 4), value, jnp.float32),
            "h": jnp.full((5,), value, jnp.bfloat16),
            "rng": jax.random.key(int(value))}


def test_round_trip_on_mesh_keeps_values_dtypes_structure_and_shardings(tmp_path):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    state = place_state(TrainState.create(towers(0), TX, trainable=QUERY_TOWER), mesh)
    state = state.replace(step=state.step + 7, rng=jax.random.fold_in(state.rng, 3))
    with CheckpointManager(tmp_path / "ck") as ckpt:
        ckpt.save(7, state, {"data_position": [1, 2], "config": {"lr": 1e-3}})
        ckpt.wait()
        assert ckpt.all_steps() == [7] and ckpt.latest_step() == 7
        # an abstract template (shapes, dtypes, shardings only), as from jax.eval_shape
        template = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored, meta = ckpt.restore(template)
    assert meta == {"data_position": [1, 2], "config": {"lr": 1e-3}}
    assert restored.graphdef == state.graphdef and restored.tx is state.tx
    assert_states_equal(restored, state)
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        assert y.sharding.is_equivalent_to(x.sharding, x.ndim), (x.sharding, y.sharding)
    tower = restored.params["query_tower"]
    P = jax.sharding.PartitionSpec
    assert tower["dense"]["kernel"][...].sharding.spec == P("fsdp", "tensor")
    assert tower["embed"]["embedding"][...].sharding.spec == P("tensor", "fsdp")
    mu = restored.opt_state[1][0].mu["query_tower"]["dense"]["kernel"][...]
    assert mu.sharding.spec == P("fsdp", "tensor")  # optimizer state sharded alike
    assert int(restored.step) == 7


def test_keep_n_and_sync_save(tmp_path):
    with CheckpointManager(tmp_path, keep=2, async_save=False) as ckpt:
        for step in range(1, 5):
            ckpt.save(step, small_state(step), {"step": step})
            assert ckpt.latest_step() == step  # sync: on disk when save returns
        assert ckpt.all_steps() == [3, 4]
        state, meta = ckpt.restore(small_state(0), step=3)
    assert meta == {"step": 3}
    assert_states_equal(state, small_state(3))


def test_template_mismatch_and_missing_checkpoint(tmp_path):
    with CheckpointManager(tmp_path / "empty") as ckpt:
        with pytest.raises(CheckpointNotFoundError):
            ckpt.restore(small_state(0))
    with CheckpointManager(tmp_path / "ck") as ckpt:
        ckpt.save(1, small_state(1), {})
        with pytest.raises(CheckpointNotFoundError, match="step 9"):
            ckpt.restore(small_state(0), step=9)
        wrong = {**small_state(0), "w": jnp.zeros((3, 5), jnp.float32)}
        with pytest.raises(WeightMismatchError, match="shape/dtype differ: w"):
            ckpt.restore(wrong)
        with pytest.raises(WeightMismatchError, match="not in the checkpoint: extra"):
            ckpt.restore({**small_state(0), "extra": jnp.zeros(2)})
        with pytest.raises(ConfigError, match="already exists"):  # never overwrite a good step
            ckpt.save(1, small_state(2), {})
        with pytest.raises(ConfigError, match="JSON"):
            ckpt.save(2, small_state(2), {"bad": object()})


def data_file(step_dir):
    """The largest array data file orbax wrote for the step."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in p.as_posix()]
    return max(files, key=lambda p: p.stat().st_size)


def truncate(step_dir):
    path = data_file(step_dir)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    return path


def edit_byte(step_dir):
    path = data_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def delete_file(step_dir):
    path = step_dir / "metadata" / "metadata"
    os.remove(path)
    return path


def delete_manifest(step_dir):
    path = step_dir / MANIFEST
    os.remove(path)
    return path


@pytest.mark.parametrize("damage", [truncate, edit_byte, delete_file, delete_manifest])
def test_damaged_newest_step_is_detected_and_previous_used(tmp_path, damage, caplog):
    with CheckpointManager(tmp_path / "ck", keep=3) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, small_state(step), {"step": step})
        ckpt.wait()
        damaged = damage(tmp_path / "ck" / "3")
        name = damaged.relative_to(tmp_path / "ck" / "3").as_posix()
        with pytest.raises(CorruptCheckpointError, match=f"step 3.*{name}"):
            ckpt.restore(small_state(0), step=3)  # an explicit step is never substituted
        with caplog.at_level(logging.WARNING, logger="fedrag_jax.checkpoint"):
            state, meta = ckpt.restore(small_state(0))
        assert meta == {"step": 2} and ckpt.last_restored_step == 2
        assert_states_equal(state, small_state(2))
        assert any("step 3" in r.message and name in r.message for r in caplog.records)
        # saving step 3 again moves the damaged one aside instead of failing
        ckpt.save(3, small_state(33), {"step": 33})
        ckpt.wait()
        state, meta = ckpt.restore(small_state(0))
    assert meta == {"step": 33}
    assert (tmp_path / "ck-corrupt" / "3").is_dir()


def test_all_steps_damaged_raises(tmp_path):
    with CheckpointManager(tmp_path / "ck") as ckpt:
        for step in (1, 2):
            ckpt.save(step, small_state(step), {})
        ckpt.wait()
        truncate(tmp_path / "ck" / "2")
        edit_byte(tmp_path / "ck" / "1")
        with pytest.raises(CorruptCheckpointError, match="every checkpoint") as info:
            ckpt.restore(small_state(0))
    assert "step 2" in str(info.value) and "step 1" in str(info.value)
