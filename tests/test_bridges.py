"""Bridges: a RAGSystem driven through LlamaIndex, LangChain and Haystack's own APIs answers
with our passages (ids, scores) and the very prompt RAGSystem.query builds."""

from __future__ import annotations

import importlib
import sys

import pytest

from fedrag_jax.rag import RAGSystem
from fedrag_jax.types import RAGConfig
from tests.helpers import tiny_rag_parts

QUERY = "w5 w6 w7 w8"


@pytest.fixture(scope="module")
def rag(tmp_path_factory):
    retriever, store, generator, _ = tiny_rag_parts(tmp_path_factory.mktemp("bridges"))
    template = "Use {{braces}} literally.\nContext:\n{context}\nQ: {query}\nA:"
    return RAGSystem(retriever, store, generator,
                     RAGConfig(top_k=3, context_separator=" | ", prompt_template=template),
                     max_new_tokens=4)


@pytest.fixture
def prompts(rag, monkeypatch):
    """Every prompt the generator is asked to complete."""
    seen: list[str] = []
    generate = type(rag.generator).generate

    def spy(prompts, **kwargs):
        seen.extend(prompts)
        return generate(rag.generator, prompts, **kwargs)

    monkeypatch.setattr(rag.generator, "generate", spy)
    return seen


def expected(rag, query=QUERY):
    sources = rag.retrieve(query)
    return rag.build_prompt(query, sources), sources


def test_llamaindex_query_engine(rag, prompts):
    importlib.import_module("llama_index.core")
    from llama_index.core.base.response.schema import Response
    from llama_index.core.schema import QueryBundle

    from fedrag_jax.bridges import to_llamaindex
    from fedrag_jax.bridges.llamaindex import FedRAGLLM

    prompt, sources = expected(rag)
    answer = rag.query(QUERY).answer
    prompts.clear()
    response = to_llamaindex(rag).query(QUERY)
    assert isinstance(response, Response)
    assert prompts == [prompt]  # our template, separator and passages, nothing else
    assert response.response == (answer or "Empty Response")
    assert [n.node.node_id for n in response.source_nodes] == [s.node_id for s in sources]
    assert [n.score for n in response.source_nodes] == pytest.approx(
        [s.score for s in sources])
    assert [n.node.get_content() for n in response.source_nodes] == [s.text for s in sources]

    llm = FedRAGLLM(rag.generator, max_new_tokens=4)
    assert llm.complete(prompt).text == answer
    assert "".join(c.delta for c in llm.stream_complete(prompt)) == answer
    assert llm.metadata.context_window == rag.generator.model.config.max_position_embeddings
    engine = to_llamaindex(rag, top_k=2)
    nodes = engine.retriever.retrieve(QueryBundle(QUERY))
    assert [n.node.node_id for n in nodes] == [s.node_id for s in sources[:2]]


def test_langchain_chain_retriever_and_vector_store(rag, prompts):
    importlib.import_module("langchain_core")
    from fedrag_jax.bridges import to_langchain
    from fedrag_jax.bridges.langchain import (
        FedRAGEmbeddings,
        FedRAGLLM,
        FedRAGRetriever,
        FedRAGVectorStore,
    )

    prompt, sources = expected(rag)
    answer = rag.query(QUERY).answer
    ids = [s.node_id for s in sources]
    prompts.clear()
    out = to_langchain(rag).invoke(QUERY)
    assert prompts == [prompt]
    assert out["answer"] == answer
    assert [d.id for d in out["source_documents"]] == ids
    assert [d.metadata["score"] for d in out["source_documents"]] == pytest.approx(
        [s.score for s in sources])

    docs = FedRAGRetriever(rag=rag, top_k=2).invoke(QUERY)
    assert [d.metadata["node_id"] for d in docs] == ids[:2]
    assert FedRAGLLM(generator=rag.generator, max_new_tokens=4).invoke(prompt) == answer

    vs = FedRAGVectorStore.from_rag(rag)
    assert [d.id for d in vs.similarity_search(QUERY, k=3)] == ids
    scored = vs.similarity_search_with_score(QUERY, k=3)
    assert [s for _, s in scored] == pytest.approx([s.score for s in sources])
    by_vector = vs.similarity_search_by_vector(rag.retriever.encode_query([QUERY])[0], k=3)
    assert [d.id for d in by_vector] == ids

    # a new cosine store through LangChain's constructor; texts go through the context tower
    texts = ["w10 w11 w12", "w40 w41 w42 w43", "w90 w91"]
    own = FedRAGVectorStore.from_texts(texts, FedRAGEmbeddings(rag.retriever),
                                       metadatas=[{"n": i} for i in range(3)],
                                       ids=["a", "b", "c"], metric="cosine", backend="exact")
    assert own.add_texts(["w60 w61 w62 w63 w64"], ids=["d"]) == ["d"]
    assert own.store.count == 4
    hit, score = own.similarity_search_with_score("w40 w41 w42 w43", k=10)[0]
    assert (hit.id, hit.metadata["n"]) == ("b", 1) and score == pytest.approx(1.0, abs=1e-5)
    assert own.similarity_search("w60 w61 w62 w63 w64", k=1)[0].id == "d"
    assert [d.page_content for d in own.get_by_ids(["c", "zz"])] == ["w90 w91"]
    own.delete(["d"])
    assert own.store.count == 3


def test_haystack_pipeline(rag, prompts):
    importlib.import_module("haystack")
    from fedrag_jax.bridges import to_haystack

    prompt, sources = expected(rag)
    answer = rag.query(QUERY).answer
    prompts.clear()
    out = to_haystack(rag).run({"query": QUERY})
    assert prompts == [prompt]
    generated = out["answer_builder"]["answers"][0]
    assert generated.data == answer and generated.query == QUERY
    assert [d.id for d in generated.documents] == [s.node_id for s in sources]
    assert [d.score for d in generated.documents] == pytest.approx([s.score for s in sources])
    assert [d.content for d in generated.documents] == [s.text for s in sources]


def test_bridges_cut_passages_like_rag_query(rag, prompts, monkeypatch):
    """max_context_tokens: each bridge puts the same shortened passages in the prompt."""
    importlib.import_module("llama_index.core")
    importlib.import_module("langchain_core")
    importlib.import_module("haystack")
    from fedrag_jax.bridges import to_haystack, to_langchain, to_llamaindex

    monkeypatch.setattr(rag, "max_context_tokens", 2)
    prompt, _ = expected(rag)
    assert prompt.count(" | ") == 2 and len(prompt) < len(
        rag.config.format_prompt(QUERY, [s.text for s in rag.retrieve(QUERY)]))
    prompts.clear()
    to_llamaindex(rag).query(QUERY)
    to_langchain(rag).invoke(QUERY)
    out = to_haystack(rag).run({"query": QUERY})
    assert prompts == [prompt] * 3
    # the answer keeps the whole passages
    assert [d.content for d in out["answer_builder"]["answers"][0].documents] == [
        s.text for s in rag.retrieve(QUERY)]


@pytest.mark.parametrize("extra,module,package", [
    ("llamaindex", "llama_index.core", "llama_index"),
    ("langchain", "langchain_core", "langchain_core"),
    ("haystack", "haystack", "haystack"),
])
def test_missing_framework_names_the_extra(monkeypatch, extra, module, package):
    import importlib

    from fedrag_jax import bridges
    from fedrag_jax.bridges import BridgeNotInstalledError

    for name in list(sys.modules):  # make the framework unimportable
        if name == package or name.startswith(package + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.delitem(sys.modules, f"fedrag_jax.bridges.{extra}", raising=False)
    with pytest.raises(BridgeNotInstalledError, match=rf"pip install 'fedrag-jax\[{extra}\]'"):
        importlib.import_module(f"fedrag_jax.bridges.{extra}")
    with pytest.raises(ImportError, match=extra):
        getattr(bridges, f"to_{extra}")(None)
    monkeypatch.delitem(sys.modules, f"fedrag_jax.bridges.{extra}", raising=False)
