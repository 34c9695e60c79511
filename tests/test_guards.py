"""Guards around training and serving: a non-finite update never reaches a checkpoint (both
settings), a store built by another retriever is refused (unless overridden), and the
smaller items: resuming with a new ``steps``, RALT's retrieval weighting temperature, the
final evaluation's gold answers, targets longer than ``target_length``."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from fedrag_jax.checkpoint import CheckpointManager
from fedrag_jax.config import load_config
from fedrag_jax.errors import ConfigError, DataError, FedRAGJaxError
from fedrag_jax.finetune.manager import FinetuneManager
from fedrag_jax.finetune.steps import QUERY_TOWER, TrainState
from fedrag_jax.finetune.trainer import Trainer, TrainerConfig, read_metrics
from fedrag_jax.rag import RAGSystem
from fedrag_jax.sharding import make_mesh
from fedrag_jax.types import RAGConfig
from tests.helpers import tiny_rag_files, tiny_rag_parts
from tests.trainer_worker import STEP, SyntheticLSR, optimizer, towers

PROMPT = "w4 {context} w5 {query} w6"


# --- non-finite updates -----------------------------------------------------------------------
class Poisoned:
    """SyntheticLSR whose batch at step 3 (epoch 0, index 2) has NaN passage embeddings: its
    loss and gradient are NaN."""

    def __init__(self):
        self.data = SyntheticLSR()

    def __len__(self):
        return len(self.data)

    def batch_at(self, epoch, index):
        batch = dict(self.data.batch_at(epoch, index))
        if (epoch, index) == (0, 2):
            batch["passage_emb"] = np.full_like(batch["passage_emb"], np.nan)
        return batch


def _finite(tree) -> bool:
    return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(tree)
               if np.issubdtype(np.asarray(x).dtype, np.inexact))


@pytest.mark.parametrize("setting", [None, "skip", "stop"], ids=["default", "skip", "stop"])
def test_an_injected_nan_gradient_never_reaches_a_checkpoint(tmp_path, setting):
    """Default optimizer path (clipping + AdamW with warmup), a checkpoint every step."""
    kw = {} if setting is None else {"nonfinite": setting}
    state = TrainState.create(towers(7), optimizer(3e-2, 6), trainable=QUERY_TOWER, seed=7)
    trainer = Trainer(state, STEP, Poisoned(), TrainerConfig(
        total_steps=6, output_dir=str(tmp_path), checkpoint_every=1, keep_checkpoints=10,
        progress=False, plot=False, **kw))
    error = None
    try:
        trainer.train()
    except FedRAGJaxError as e:
        error = e
    template = TrainState.create(towers(7), optimizer(3e-2, 6), trainable=QUERY_TOWER, seed=7)
    with CheckpointManager(tmp_path / "checkpoints") as ckpt:
        steps = ckpt.all_steps()
        saved = {s: ckpt.restore(template, step=s)[0] for s in steps}
    for s, st in saved.items():
        assert _finite(st.params) and _finite(st.opt_state), \
            f"checkpoint step {s} holds non-finite values"
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    if setting == "skip":
        assert error is None and steps == [1, 2, 3, 4, 5, 6]
        by_step = {r["step"]: r for r in records}
        assert [by_step[s]["nonfinite"] for s in range(1, 7)] == [0, 0, 1, 0, 0, 0]
        assert [by_step[s]["nonfinite_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
        assert math.isnan(by_step[3]["loss"])
        # the skipped step left the params and Adam's moments as step 2 had them
        for a, b in zip(jax.tree.leaves(saved[2].params), jax.tree.leaves(saved[3].params),
                        strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
            jax.tree.leaves(saved[3].params), jax.tree.leaves(saved[4].params), strict=True))
    else:  # stop (the default): a named error at the step, and the good checkpoints kept
        assert type(error).__name__ == "NonFiniteError", error
        assert "step 3" in str(error) and "nonfinite" in str(error)
        assert steps == [1, 2]
        assert [r["step"] for r in records] == [1, 2, 3]  # the bad step's record is kept
        assert records[-1]["nonfinite"] == 1 and math.isnan(records[-1]["loss"])


def test_checkpoint_refuses_a_non_finite_state(tmp_path):
    state = {"w": jax.numpy.array([1.0, np.nan]), "b": jax.numpy.zeros(2)}
    with CheckpointManager(tmp_path / "ckpt") as ckpt:
        with pytest.raises(FedRAGJaxError) as err:
            ckpt.save(1, state)
        assert type(err.value).__name__ == "NonFiniteError"
        assert "'w'" in str(err.value)
        assert ckpt.all_steps() == []


# --- the store's retriever fingerprint --------------------------------------------------------
@pytest.fixture(scope="module")
def two_retrievers(tmp_path_factory):
    """An index built by retriever A; a foreign retriever B of the same dimension."""
    from fedrag_jax.indexing import build_index, load_corpus
    from fedrag_jax.retriever import DualEncoder

    tmp = tmp_path_factory.mktemp("fingerprint")
    a = tiny_rag_files(tmp / "a", seed=0)
    b = tiny_rag_files(tmp / "b", seed=1)
    build_index(load_corpus(a["corpus"]), DualEncoder.from_pretrained(str(a["retriever"])),
                tmp / "index", retriever_path=str(a["retriever"]),
                generator_path=str(a["generator"]), backend="exact", progress=False)
    return a, b, tmp / "index"


def test_a_foreign_retriever_on_a_saved_store_is_refused(two_retrievers, tmp_path, capsys):
    from fedrag_jax.cli import main

    a, b, index = two_retrievers
    own = RAGSystem.from_parts(retriever=a["retriever"], generator=a["generator"],
                               store=index / "store", config=RAGConfig(top_k=2))
    assert own.store.count > 0
    with pytest.raises(FedRAGJaxError) as err:  # from_parts: the ask path
        RAGSystem.from_parts(retriever=b["retriever"], generator=a["generator"],
                             store=index / "store", config=RAGConfig(top_k=2))
    assert type(err.value).__name__ == "StoreFingerprintError"
    assert "allow_foreign_store" in str(err.value)
    RAGSystem.from_parts(retriever=b["retriever"], generator=a["generator"],
                         store=index / "store", config=RAGConfig(top_k=2),
                         allow_foreign_store=True)
    # the CLI: refused by name, and the explicit flag answers
    assert main(["ask", "--index", str(index), "--retriever", str(b["retriever"]),
                 "--max-new-tokens", "2", "w5 w6"]) == 2
    assert "StoreFingerprintError" in capsys.readouterr().err
    assert main(["ask", "--index", str(index), "--retriever", str(b["retriever"]),
                 "--max-new-tokens", "2", "--allow-foreign-store", "w5 w6"]) == 0
    # a saved system whose store another retriever built
    own.save_pretrained(tmp_path / "sys")
    RAGSystem.from_pretrained(tmp_path / "sys")  # its own store: fine
    foreign = RAGSystem.from_parts(retriever=b["retriever"], generator=a["generator"],
                                   store=index / "store", allow_foreign_store=True)
    foreign.save_pretrained(tmp_path / "foreign")
    with pytest.raises(FedRAGJaxError, match="StoreFingerprint|another retriever"):
        RAGSystem.from_pretrained(tmp_path / "foreign")
    # the training configs' data.index
    from fedrag_jax.finetune.manager import build_rag_system

    overrides = [f"model.retriever={b['retriever']}", f"model.generator={a['generator']}",
                 f"data.corpus={a['corpus']}", f"data.index={index}", "mesh.data=1",
                 "progress=false"]
    with pytest.raises(FedRAGJaxError, match="another retriever"):
        build_rag_system(load_config(None, overrides))
    build_rag_system(load_config(None, [*overrides, "allow_foreign_store=true"]))


# --- the smaller items ------------------------------------------------------------------------
def _manager(tmp_path, *overrides, parts=None, eval_records=None):
    retriever, store, generator, records = parts or tiny_rag_parts(tmp_path)
    config = load_config(None, [
        f"output_dir={tmp_path / 'run'}", "progress=false", "lsr.batch_size=2",
        "lsr.max_length=128", "ralt.batch_size=2", "ralt.lora_rank=4", "ralt.max_length=128",
        "retrieval.top_k=2", "mesh.data=1", "eval_generate=false", *overrides])
    rag = RAGSystem(retriever, store, generator, RAGConfig(top_k=2, prompt_template=PROMPT),
                    max_new_tokens=4)
    return FinetuneManager(rag, records, eval_records or [], config,
                           mesh=make_mesh(None, jax.devices()[:1])), records


def test_resuming_with_another_steps_is_refused(tmp_path):
    """The cosine schedule spans ``steps``: a resume with another value would re-stretch it
    mid-run, so it is refused like any other changed setting."""
    parts = tiny_rag_parts(tmp_path)
    first, _ = _manager(tmp_path, "mode=retriever", "lsr.steps=2", parts=parts)
    first.train_retriever()
    longer, _ = _manager(tmp_path, "mode=retriever", "lsr.steps=4", parts=parts)
    with pytest.raises(ConfigError, match=r"lsr\.steps: 2 -> 4"):
        longer.train_retriever()


def test_retrieval_weighting_uses_the_retrieval_temperature(tmp_path):
    manager, records = _manager(tmp_path, "mode=generator", "ralt.weighting=retrieval",
                                "lsr.tau_retrieval=0.05")
    data = manager.ralt_dataset(records)
    rag = manager.rag
    scores, _ = rag.store.search(rag.retriever.encode_query([r["query"] for r in records]), 2)
    z = scores.astype(np.float64) / 0.05
    p = np.exp(z - z.max(-1, keepdims=True))
    expected = p / p.sum(-1, keepdims=True) * 2  # P_R(d | x) x k: mean weight 1
    np.testing.assert_allclose(data.weights, expected, rtol=1e-4, atol=1e-6)


def test_final_evaluation_scores_against_every_gold_answer(tmp_path, monkeypatch):
    """A record with an ``answers`` list: the final evaluation (``evaluate``) and the
    periodic one (``generation_metrics``) both accept any of them."""
    parts = tiny_rag_parts(tmp_path)
    records = [{"query": r["query"], "response": "w10 w11", "answers": ["w10 w11", "w12"]}
               for r in parts[3][:2]]
    manager, _ = _manager(tmp_path, "mode=generator", "eval_generate_max=2", parts=parts,
                          eval_records=records)
    monkeypatch.setattr(manager.rag.generator, "generate",
                        lambda prompts, **kw: ["w12"] * len(prompts))
    final = manager.evaluate("after", records)
    periodic = manager.generation_metrics(manager.rag.retriever, manager.rag.generator, records)
    assert periodic["exact_match"] == 1.0
    assert final["exact_match"] == 1.0


def test_a_target_longer_than_target_length_is_refused():
    from fedrag_jax.finetune.batches import packed_target_arrays, target_arrays

    prompts, targets = [[5, 6, 7], [5, 8]], [[9, 10, 11, 2], [12, 2]]
    with pytest.raises(DataError, match="target_length=3"):
        target_arrays(prompts, targets, (16,), 0, target_length=3)
    with pytest.raises(DataError, match="target_length=3"):
        packed_target_arrays(prompts, targets, 2, (16,), 0, target_length=3)
    ok = target_arrays(prompts, targets, (16,), 0, target_length=4)
    # each labelled position predicts its target token
    for i, t in enumerate(targets):
        row = ok["input_ids"][i]
        got = [row[j + 1] for j, m in zip(ok["target_index"][i], ok["target_mask"][i],
                                          strict=True) if m]
        assert got == t


def test_config_keys_for_the_guards():
    config = load_config(None, ["nonfinite=skip", "allow_foreign_store=true"])
    assert config.nonfinite == "skip" and config.allow_foreign_store
    assert load_config(None).nonfinite == "stop"
    with pytest.raises(ConfigError):
        load_config(None, ["nonfinite=ignore"])
    assert json.dumps(config.to_dict())


def test_federated_checkpoints_without_recorded_settings_are_refused(tmp_path):
    """A federated checkpoint that recorded no settings (an older fedrag-jax wrote it) is not
    resumed silently by a run that knows its settings."""
    from fedrag_jax.errors import ResumeMismatchError
    from fedrag_jax.federated.history import RoundCheckpoints

    params = {"w": np.ones(3, np.float32)}
    old = RoundCheckpoints(tmp_path)
    old.save(1, params, None, [], "fedavg", "spmd")
    old.close()
    new = RoundCheckpoints(tmp_path, settings={"lsr": {"learning_rate": 1e-3}})
    try:
        with pytest.raises(ResumeMismatchError, match="recorded no run settings"):
            new.restore(params, None, "fedavg")
    finally:
        new.close()
    same = RoundCheckpoints(tmp_path / "b", settings={"lsr": {"learning_rate": 1e-3}})
    same.save(1, params, None, [], "fedavg", "spmd")
    assert same.restore(params, None, "fedavg")[0] == 1
    same.close()
