"""Multi-host readiness on one machine: two processes on loopback, 4 simulated CPU devices
each, joined by ``jax.distributed.initialize`` into one 8-device mesh, each feeding its own
half of every global batch, train LSR to the same parameters as one 8-device process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from fedrag_jax.finetune.steps import compile_step, lsr_step, place_state
from fedrag_jax.sharding import make_mesh, shard_batch
from tests import multihost_worker as worker

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference() -> tuple[dict[str, np.ndarray], list[float]]:
    """The same steps in this (single) process over its 8 simulated devices."""
    mesh = make_mesh(worker.MESH, jax.devices()[:8])
    batches = worker.make_batches()
    state = place_state(worker.make_state(), mesh)
    step = compile_step(lsr_step, state, batches[0], mesh, **worker.HYPER)
    losses = []
    for batch in batches:
        state, metrics = step(state, shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    from fedrag_jax.models.hf import hf_tensors

    hf = {f"hf/{n}": a for n, a in hf_tensors(state.model().query_tower).items()}
    return {**worker.flat_params(jax.device_get(state.params)), **hf}, losses


def run_workers(out: Path, num_processes: int = 2) -> list[str]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("JAX_NUM_PROCESSES", None)
    port = free_port()
    logs = [out.parent / f"worker{i}.log" for i in range(num_processes)]
    procs: list[subprocess.Popen] = []
    try:
        for i in range(num_processes):
            with open(logs[i], "wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, str(ROOT / "tests" / "multihost_worker.py"), str(i),
                     str(num_processes), str(port), str(out)],
                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + TIMEOUT_S
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:  # always clean up: a worker left waiting on its peer would hang
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    texts = [log.read_text(errors="replace") for log in logs]
    codes = [p.returncode for p in procs]
    if codes != [0] * num_processes:
        tails = "\n".join(f"--- worker {i} (exit {c}) ---\n{t[-3000:]}"
                          for i, (c, t) in enumerate(zip(codes, texts, strict=True)))
        pytest.fail(f"multi-host workers failed or timed out after {TIMEOUT_S}s:\n{tails}")
    return texts


@pytest.mark.timeout(TIMEOUT_S + 120)
def test_two_processes_equal_one_process(tmp_path):
    assert len(jax.devices()) == 8, "tests/conftest.py sets 8 simulated devices"
    out = tmp_path / "params.npz"
    run_workers(out)
    got = dict(np.load(out))
    losses = got.pop("__losses__")
    # the parameters really were split across the two processes, and the tuned tower read
    # for saving (host_copy on every process, hf_tensors on the first) equals the reference
    assert bool(got.pop("__spans_hosts__"))
    want, want_losses = reference()
    assert sorted(got) == sorted(want) and len(want) > 10
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, atol=1e-5, err_msg=name)
    assert sum(n.startswith("hf/") for n in want) > 10
    before = worker.flat_params(worker.make_state().params)
    assert any(not np.allclose(before[n], want[n]) for n in before)  # training moved something
