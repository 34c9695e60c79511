"""One process of a 2-process "multi-host" LSR run on loopback (see tests/test_multihost.py).

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz

Each process owns 4 simulated CPU devices (the parent sets XLA_FLAGS and JAX_PLATFORMS);
``jax.distributed.initialize`` joins them into one 8-device runtime with gloo collectives. The
state is laid out on a global (data=2, fsdp=2, tensor=2) mesh, each process feeds only its own
half of every global batch (``jax.make_array_from_process_local_data``), and process 0 writes
the final trainable parameters and the losses to OUT.npz.

The functions above ``main`` are also imported by the test to build the single-process
reference from the very same state and batches.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

STEPS = 3
GLOBAL_BATCH = 8
TOP_K = 4
MESH = {"data": 2, "fsdp": 2, "tensor": 2}
HYPER = {"tau_retrieval": 0.5}


def make_state():
    from flax import nnx

    from fedrag_jax.finetune.optimizer import OptimizerConfig, make_optimizer
    from fedrag_jax.finetune.steps import QUERY_TOWER, Towers, TrainState
    from fedrag_jax.models.bert import BertConfig, Encoder

    config = BertConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    query = Encoder(config, rngs=nnx.Rngs(7))
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=10))
    return TrainState.create(Towers(query, nnx.clone(query)), tx, QUERY_TOWER)


def make_batches(steps: int = STEPS, b: int = GLOBAL_BATCH, k: int = TOP_K, length: int = 10,
                 dim: int = 32):
    """The global batches, identical in every process (the data a real job would shard)."""
    rng = np.random.default_rng(11)
    batches = []
    for _ in range(steps):
        mask = np.ones((b, length), bool)
        mask[1::2, length - 3:] = False
        gold = rng.integers(0, k, size=b)
        lm = np.full((b, k), -30.0, np.float32)
        lm[np.arange(b), gold] = -2.0
        batches.append({
            "query_ids": rng.integers(1, 64, size=(b, length)).astype(np.int32),
            "query_mask": mask,
            "passage_emb": rng.normal(size=(b, k, dim)).astype(np.float32),
            "lm_logprobs": lm,
            "example_mask": np.ones(b, bool),
        })
    return batches


def flat_params(params) -> dict[str, np.ndarray]:
    """``path/to/leaf -> array`` for an nnx.State of (fully addressable) arrays."""
    from flax import nnx

    return {"/".join(map(str, path)): np.asarray(var.get_value())
            for path, var in nnx.to_flat_state(params)}


def main(argv: list[str]) -> int:
    process_id, num_processes, port, out = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=120)
    from jax.experimental import multihost_utils

    from fedrag_jax.finetune.steps import compile_step, lsr_step, place_state
    from fedrag_jax.sharding import batch_sharding, make_mesh

    assert jax.process_index() == process_id and jax.process_count() == num_processes
    assert jax.device_count() == 4 * num_processes and jax.local_device_count() == 4

    mesh = make_mesh(MESH)  # over jax.devices(): every process's devices, in one global grid
    batches = make_batches()
    state = place_state(make_state(), mesh)

    def local_part(batch):
        """This process's rows of each global array, made into one global jax.Array."""
        out = {}
        for name, x in batch.items():
            sharding = batch_sharding(mesh, x.ndim)
            rows = sorted({idx[0].indices(x.shape[0])[:2]
                           for idx in sharding.addressable_devices_indices_map(x.shape).values()})
            start, stop = rows[0][0], rows[-1][1]
            assert all(a[1] == b[0] for a, b in zip(rows, rows[1:], strict=False))
            assert stop - start == x.shape[0] // num_processes  # each process: its own half
            out[name] = jax.make_array_from_process_local_data(sharding, x[start:stop],
                                                               x.shape)
        return out

    step = compile_step(lsr_step, state, batches[0], mesh, **HYPER)
    losses = []
    for batch in batches:
        state, metrics = step(state, local_part(batch))
        losses.append(float(metrics["loss"]))
    params = multihost_utils.process_allgather(state.params, tiled=True)
    # what saving the tuned system does: every process gathers, the first one writes
    from fedrag_jax.models.hf import hf_tensors
    from fedrag_jax.sharding import host_copy

    spans_hosts = any(not x.is_fully_addressable for x in jax.tree.leaves(state.params))
    tower = host_copy(state.model().query_tower)
    if process_id == 0:
        arrays = flat_params(params)
        arrays["__losses__"] = np.asarray(losses)
        arrays["__spans_hosts__"] = np.asarray(spans_hosts)
        arrays.update({f"hf/{name}": a for name, a in hf_tensors(tower).items()})
        tmp = Path(out).with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(out)
    multihost_utils.sync_global_devices("fedrag_jax multihost test done")
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main(sys.argv[1:]))
