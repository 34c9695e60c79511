"""Run outputs on local disks and on gs:// (an in-process stand-in for Cloud Storage), and
only the first process writing metrics, plots and reports."""

from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np
import pytest
from etils import epath
from orbax.checkpoint._src.multihost import multihost as orbax_multihost

from fedrag_jax import outputs
from fedrag_jax.checkpoint import verify_manifest, write_manifest
from fedrag_jax.errors import CorruptCheckpointError
from fedrag_jax.evals import Benchmarker, BenchmarkExample
from fedrag_jax.finetune import trainer as trainer_module
from fedrag_jax.finetune.trainer import read_metrics
from fedrag_jax.rag import RAGSystem
from fedrag_jax.types import RAGConfig
from tests.helpers import tiny_rag_parts
from tests.trainer_worker import build

PNG = b"\x89PNG\r\n\x1a\n"


class FakeCheckpoints:
    """Stands in for orbax on gs://: its arrays go through tensorstore's own GCS driver,
    which needs the network. Records the directory it was given."""

    directories: list = []

    def __init__(self, directory, keep=None):
        self.directories.append(directory)

    def latest_step(self):
        return None

    def save(self, step, state, metadata=None):
        pass

    def wait(self):
        pass

    def close(self):
        pass


def test_gs_output_dir_is_an_epath_never_a_pathlib_path(fake_gcs):
    p = outputs.out_path("gs://bucket/run")
    assert isinstance(p, epath.Path) and not isinstance(p, pathlib.Path)
    assert str(p / "lsr" / "metrics.jsonl") == "gs://bucket/run/lsr/metrics.jsonl"
    assert outputs.is_remote("gs://bucket/run") and not outputs.is_remote("runs/gs:/x")
    assert str(outputs.out_path("runs/x")) == os.path.abspath("runs/x")


def test_trainer_writes_metrics_plots_and_tensorboard_to_gs(fake_gcs, monkeypatch):
    FakeCheckpoints.directories = []
    monkeypatch.setattr(trainer_module, "CheckpointManager", FakeCheckpoints)
    trainer = build("gs://bucket/run/lsr", total_steps=3, plot=True, checkpoint_every=2)
    trainer.train()
    (ckpt_dir,) = FakeCheckpoints.directories
    assert isinstance(ckpt_dir, epath.Path) and not isinstance(ckpt_dir, pathlib.Path)
    assert str(ckpt_dir) == "gs://bucket/run/lsr/checkpoints"
    run = fake_gcs / "bucket" / "run" / "lsr"
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
    assert read_metrics("gs://bucket/run/lsr/metrics.jsonl") == records
    assert (run / "loss.png").read_bytes().startswith(PNG)
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_manifest_on_gs(fake_gcs):
    step = fake_gcs / "bucket" / "ckpt" / "5"
    (step / "state").mkdir(parents=True)
    (step / "state" / "a.bin").write_bytes(b"1234")
    (step / "_CHECKPOINT_METADATA").write_text("{}")
    write_manifest("gs://bucket/ckpt/5", 5)
    manifest = json.loads((step / "integrity.json").read_text())
    assert manifest["files"]["state/a.bin"]["size"] == 4
    verify_manifest("gs://bucket/ckpt/5", 5)
    (step / "state" / "a.bin").write_bytes(b"1235")
    with pytest.raises(CorruptCheckpointError, match="state/a.bin fails its sha256"):
        verify_manifest("gs://bucket/ckpt/5", 5)


def test_rag_system_and_benchmark_outputs_on_gs(fake_gcs, tmp_path):
    retriever, store, generator, records = tiny_rag_parts(tmp_path)
    rag = RAGSystem(retriever, store, generator,
                    RAGConfig(top_k=2, prompt_template="w4 {context} w5 {query} w6"),
                    max_new_tokens=3)
    saved = rag.save_pretrained("gs://bucket/run/rag")
    assert isinstance(saved, epath.Path) and str(saved) == "gs://bucket/run/rag"
    folder = fake_gcs / "bucket" / "run" / "rag"
    (version,) = [p for p in folder.iterdir() if p.name != ".fedrag-jax-output.json"]
    assert (version / "rag_config.json").is_file() and (version / "store").is_dir()
    saved_again = rag.save_pretrained("gs://bucket/run/rag")  # a new version replaces it
    assert str(saved_again) == "gs://bucket/run/rag"
    (newer,) = [p for p in folder.iterdir() if p.name != ".fedrag-jax-output.json"]
    assert newer != version  # the old version is deleted once the new one is current
    loaded = RAGSystem.from_pretrained("gs://bucket/run/rag")
    queries = [r["query"] for r in records[:3]]
    assert [r.answer for r in loaded.batch_query(queries)] == \
        [r.answer for r in rag.batch_query(queries)]

    examples = [BenchmarkExample(str(i), r["query"], [r["response"]])
                for i, r in enumerate(records)]
    result = Benchmarker(rag, examples, out_dir="gs://bucket/run/eval/dev",
                         progress=False).run()
    out = fake_gcs / "bucket" / "run" / "eval" / "dev"
    assert json.loads((out / "aggregate.json").read_text())["metrics"] == result.metrics
    assert len((out / "examples.jsonl").read_text().splitlines()) == len(records)


def test_local_writes_stay_atomic(tmp_path):
    target = tmp_path / "sub" / "a.json"
    outputs.write_text(target, "old")
    with pytest.raises(RuntimeError), outputs.open_atomic(target) as f:
        f.write("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]  # no temp left


def test_only_process_zero_writes_metrics_and_plots(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda *a, **k: 1)
    # orbax, alone in this one-process test, must still act as the process that creates its
    # directories: it would wait for a process 0 that does not exist
    monkeypatch.setattr(orbax_multihost, "process_index", lambda: 0)
    trainer = build(tmp_path / "run", total_steps=2, plot=True, checkpoint_every=1)
    state = trainer.train()
    assert np.isfinite(np.asarray(jax.tree.leaves(state.params)[0])).all()
    run = tmp_path / "run"
    assert not (run / "metrics.jsonl").exists()
    assert not (run / "loss.png").exists() and not (run / "tensorboard").exists()
    # ...while every process takes part in checkpointing
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) \
        == [1, 2]
