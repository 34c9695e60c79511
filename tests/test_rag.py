"""RAGSystem on tiny parts: retrieval matches the store, answers carry sources, save/load."""

from __future__ import annotations

import numpy as np
import pytest

from fedrag_jax.errors import CheckpointNotFoundError
from fedrag_jax.rag import RAGSystem
from fedrag_jax.types import RAGConfig
from tests.helpers import tiny_rag_parts


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    retriever, store, generator, records = tiny_rag_parts(tmp_path_factory.mktemp("rag"))
    config = RAGConfig(top_k=3, prompt_template="w4 {context} w5 {query} w6")
    return RAGSystem(retriever, store, generator, config, max_new_tokens=5), records


def test_retrieve_matches_store_search(system):
    rag, records = system
    queries = [r["query"] for r in records[:3]]
    sources = rag.batch_retrieve(queries)
    scores, ids = rag.store.search(rag.retriever.encode_query(queries), 3)
    for row, srow, irow in zip(sources, scores, ids, strict=True):
        assert [s.node_id for s in row] == [str(i) for i in irow]
        np.testing.assert_allclose([s.score for s in row], srow, rtol=1e-6)
    assert rag.retrieve(queries[0])[0].node_id == sources[0][0].node_id


def test_batch_query_answers_with_sources(system):
    rag, records = system
    responses = rag.batch_query([r["query"] for r in records[:2]])
    assert len(responses) == 2
    for r in responses:
        assert isinstance(r.answer, str) and len(r.source_nodes) == 3
    single = rag.query(records[0]["query"])
    assert single.answer == responses[0].answer
    assert [s.node_id for s in single.source_nodes] == \
        [s.node_id for s in responses[0].source_nodes]


def test_save_and_load_gives_identical_results(system, tmp_path):
    rag, records = system
    vocab_ids = rag.generator.tokenizer("w7 w8")["input_ids"]
    rag.save_pretrained(tmp_path / "sys")
    again = RAGSystem.from_pretrained(tmp_path / "sys")
    assert again.generator.tokenizer("w7 w8")["input_ids"] == vocab_ids
    queries = [r["query"] for r in records]
    a, b = rag.batch_query(queries), again.batch_query(queries)
    assert [x.answer for x in a] == [x.answer for x in b]
    for x, y in zip(a, b, strict=True):
        assert [s.node_id for s in x.source_nodes] == [s.node_id for s in y.source_nodes]
        np.testing.assert_allclose([s.score for s in x.source_nodes],
                                   [s.score for s in y.source_nodes], rtol=1e-5)
    with pytest.raises(CheckpointNotFoundError):
        RAGSystem.from_pretrained(tmp_path)


def test_cli_export_writes_hf_folders(system, tmp_path):
    import transformers

    from fedrag_jax.cli import main

    rag, _ = system
    rag.save_pretrained(tmp_path / "sys")
    assert main(["export", "--system", str(tmp_path / "sys"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "retriever" / "modules.json").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "generator")
    assert model.config.num_hidden_layers == rag.generator.model.config.num_layers
