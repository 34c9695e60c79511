"""ralt.context: RALT trained on the layout the RAG system infers with. "single": one
instance per (query, passage), the ensemble's prompts; "concat": one instance per query with
its top-k passages in one prompt, token for token the RAG system's concat prompt."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fedrag_jax.config import load_config
from fedrag_jax.errors import ConfigError, DataError
from fedrag_jax.finetune.batches import assemble_concat, build_ralt_dataset
from fedrag_jax.finetune.manager import FinetuneManager
from fedrag_jax.finetune.trainer import read_metrics
from fedrag_jax.rag import RAGSystem
from fedrag_jax.sharding import make_mesh
from fedrag_jax.types import RAGConfig
from tests.helpers import tiny_rag_parts

TEMPLATE = "w4 {context} w5 {query} w6"
SEPARATOR = " <bos> "  # a token of its own (id 1) that no passage holds: it marks the joins


def split_at(ids: list[int], separator: int) -> list[list[int]]:
    pieces = [[]]
    for t in ids:
        if t == separator:
            pieces.append([])
        else:
            pieces[-1].append(t)
    return pieces


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return tiny_rag_parts(tmp_path_factory.mktemp("rag"))


def concat_dataset(parts, **kw):
    retriever, store, generator, records = parts
    args = dict(top_k=3, batch_size=2, template=TEMPLATE, progress=False, context="concat",
                context_separator=SEPARATOR, max_passage_tokens=6)
    return build_ralt_dataset(records, retriever, store, generator, **{**args, **kw})


def test_concat_instances_are_the_rag_systems_concat_prompts(parts):
    """One instance per query: the ids of RAGSystem.build_prompt(query, top-k) (passages cut
    to max_context_tokens, joined by the separator), then response + EOS; only response + EOS
    labelled."""
    retriever, store, generator, records = parts
    rag = RAGSystem(retriever, store, generator,
                    RAGConfig(top_k=3, context_separator=SEPARATOR, prompt_template=TEMPLATE),
                    max_context_tokens=6)
    data = concat_dataset(parts)
    queries = [r["query"] for r in records]
    sources = rag.batch_retrieve(queries)
    expected = generator.encode_prompts([rag.build_prompt(q, s)
                                         for q, s in zip(queries, sources, strict=True)])
    assert data.prompts == [[e] for e in expected]
    assert data.weights.shape == (len(records), 1)
    tok = generator.tokenizer
    for prompt, row, query in zip(data.prompts, sources, queries, strict=True):
        # every one of the k passages, cut to 6 tokens, between the template's parts
        query_part = [5, *tok(query)["input_ids"], 6]
        assert prompt[0][0] == 4 and prompt[0][-len(query_part):] == query_part
        assert split_at(prompt[0][1:-len(query_part)], 1) == \
            [tok(s.text)["input_ids"][:6] for s in row]
    batch = data.batch_at(0, 0)
    order = np.random.default_rng([0, 0]).permutation(len(records))[:2]
    assert batch["input_ids"].shape[0] == 2 and batch["weights"].tolist() == [1.0, 1.0]
    for i in range(2):
        m = batch["target_mask"][i]
        response = tok(" " + records[order[i]]["response"], add_special_tokens=False)
        assert batch["target_ids"][i][m].tolist() == response["input_ids"] + [2]
        sequence = batch["input_ids"][i][batch["attention_mask"][i]].tolist()
        assert sequence == data.prompts[order[i]][0] + response["input_ids"] + [2]
        # the labelled positions are exactly the last len(response)+1 tokens' predecessors
        length = batch["input_ids"].shape[1]
        assert batch["target_index"][i][m].tolist() == list(range(length - m.sum() - 1,
                                                                   length - 1))


def test_concat_cuts_the_passages_never_the_response():
    left, right, sep = [4], [5, 6], [90]
    passages = [list(range(10, 20)), [30, 31, 32], list(range(40, 48))]
    target = [7, 8, 2]
    # room for 12 passage tokens: a common cap of 4 (4 + 3 + 4 = 11), the best-ranked +1
    ids = assemble_concat(left, passages, sep, right, target, max_length=1 + 2 + 3 + 2 + 12)
    assert ids == [4, *range(10, 15), 90, 30, 31, 32, 90, *range(40, 44), 5, 6]
    assert len(ids) + len(target) == 20
    whole = assemble_concat(left, passages, sep, right, target, max_length=100)
    assert whole == [4, *passages[0], 90, *passages[1], 90, *passages[2], 5, 6]
    with pytest.raises(DataError, match="max_length"):
        assemble_concat(left, passages, sep, right, target, max_length=7)


def test_concat_truncation_in_the_dataset_keeps_every_passage(parts):
    retriever, store, generator, records = parts
    data = concat_dataset(parts, max_passage_tokens=None, max_length=24)
    _, ids = store.search(retriever.encode_query([r["query"] for r in records]), 3)
    texts = {n.node_id: n.text for n in store.get(store.node_ids())}
    tok = generator.tokenizer
    cut = 0
    for prompt, target, row, r in zip(data.prompts, data.targets, ids, records, strict=True):
        assert len(prompt[0]) + len(target) == 24
        query_part = [5, *tok(r["query"])["input_ids"], 6]
        assert prompt[0][0] == 4 and prompt[0][-len(query_part):] == query_part
        pieces = split_at(prompt[0][1:-len(query_part)], 1)
        passages = [tok(texts[str(i)])["input_ids"] for i in row]
        assert len(pieces) == 3 and all(pieces)  # every passage keeps a share
        for piece, passage in zip(pieces, passages, strict=True):
            assert piece == passage[:len(piece)]
            cut += len(passage) - len(piece)
    assert cut > 0  # the budget did cut passages


def test_concat_packs_like_it_pads(parts):
    padded = concat_dataset(parts, batch_size=4)
    packed = concat_dataset(parts, batch_size=4).pack(2, 2)
    for index in range(len(padded)):
        a, b = padded.batch_at(1, index), packed.batch_at(1, index)
        for key in ("target_ids", "target_mask", "weights"):
            np.testing.assert_array_equal(a[key], b[key])
        p = len(b["prefix_ids"])
        assert p == packed.prefix_length > 0
        for i in range(4):
            sequence = a["input_ids"][i][a["attention_mask"][i]].tolist()
            row, m = b["instance_row"][i], b["target_mask"][i]
            end = b["target_index"][i][m][-1] + 2
            assert b["prefix_ids"].tolist() == sequence[:p]
            assert b["input_ids"][row, end - len(sequence) + p:end].tolist() == sequence[p:]


def test_concat_errors(parts):
    with pytest.raises(ConfigError, match="weighting"):
        concat_dataset(parts, weighting="retrieval")
    with pytest.raises(DataError, match="context"):
        concat_dataset(parts, context="pairs")
    with pytest.raises(ConfigError, match="ralt.context"):
        load_config(None, ["ralt.context=pairs"])


def test_manager_trains_ralt_on_the_concat_layout(tmp_path):
    """ralt.context=concat through the manager (packed, the RAG system's separator): one
    instance per query, all its passages; training runs and lowers the loss."""
    retriever, store, generator, records = tiny_rag_parts(tmp_path)
    config = load_config(None, [
        "mode=generator", f"output_dir={tmp_path / 'run'}", "progress=false",
        "ralt.steps=4", "ralt.batch_size=2", "ralt.lora_rank=4", "ralt.max_length=128",
        "ralt.learning_rate=1e-2", "ralt.context=concat", "retrieval.top_k=2", "mesh.data=1",
        "eval_generate=false"])
    rag = RAGSystem(retriever, store, generator,
                    RAGConfig(top_k=2, context_separator=SEPARATOR, prompt_template=TEMPLATE),
                    max_new_tokens=4)
    manager = FinetuneManager(rag, records, records[:2], config,
                              mesh=make_mesh(None, jax.devices()[:1]))
    data = manager.ralt_train_data()
    assert all(len(p) == 1 for p in data.prompts)
    expected = generator.encode_prompts([rag.build_prompt(r["query"], s) for r, s in
                                         zip(records, rag.batch_retrieve(
                                             [r["query"] for r in records]), strict=True)])
    assert [p[0] for p in data.prompts] == expected
    batch = data.batch_at(0, 0)
    assert "segment_ids" in batch and batch["weights"].shape == (2,)
    manager.train_generator()
    train = [r for r in read_metrics(tmp_path / "run" / "ralt" / "metrics.jsonl")
             if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert np.isfinite([r["loss"] for r in train]).all()
    assert train[-1]["loss"] < train[0]["loss"]
