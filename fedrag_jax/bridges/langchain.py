"""LangChain bridge: our retriever, knowledge store and generator as LangChain components.

>>> from fedrag_jax.bridges.langchain import to_langchain
>>> chain = to_langchain(rag)
>>> out = chain.invoke("Who wrote Dune?")
>>> out["answer"], [d.metadata["node_id"] for d in out["source_documents"]]

- ``FedRAGRetriever``: a ``BaseRetriever`` returning ``Document`` objects whose ``id`` and
  ``metadata["node_id"]`` are our node ids and ``metadata["score"]`` the retrieval score.
- ``FedRAGVectorStore``: a ``VectorStore`` over our knowledge store; queries go through the
  query tower, ``add_texts`` through the context tower (``FedRAGEmbeddings``).
- ``FedRAGLLM``: an ``LLM`` over our generator.
- ``to_langchain``: retriever | prompt | llm as one runnable that keeps its sources.

Needs ``pip install 'fedrag-jax[langchain]'``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from . import context_text, missing

try:
    from langchain_core.callbacks import CallbackManagerForLLMRun, CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.embeddings import Embeddings
    from langchain_core.language_models.llms import LLM
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import PromptTemplate
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables import (
        Runnable,
        RunnableLambda,
        RunnableParallel,
        RunnablePassthrough,
    )
    from langchain_core.vectorstores import VectorStore
    from pydantic import ConfigDict
except ImportError as e:
    raise missing("langchain", e) from e

if TYPE_CHECKING:
    from ..knowledge_store import KnowledgeStore
    from ..rag import RAGSystem
    from ..retriever import DualEncoder
    from ..types import SourceNode

__all__ = ["FedRAGEmbeddings", "FedRAGLLM", "FedRAGRetriever", "FedRAGVectorStore",
           "to_langchain"]

GENERATE_KWARGS = ("max_new_tokens", "temperature", "top_p", "seed")


def _document(node_id: str, text: str, metadata: dict[str, Any], score: float) -> Document:
    return Document(id=node_id, page_content=text,
                    metadata={**metadata, "node_id": node_id, "score": float(score)})


def source_to_document(source: SourceNode) -> Document:
    return _document(source.node_id, source.text, source.node.metadata, source.score)


class FedRAGRetriever(BaseRetriever):
    """The RAG system's top-k passages as LangChain ``Document`` objects, best first."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    rag: Any
    top_k: int | None = None

    def _get_relevant_documents(self, query: str, *,
                                run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return [source_to_document(s) for s in self.rag.retrieve(query, top_k=self.top_k)]


class FedRAGEmbeddings(Embeddings):
    """Documents through the context tower, queries through the query tower."""

    def __init__(self, retriever: DualEncoder) -> None:
        self.retriever = retriever

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.retriever.encode_context(list(texts), progress=False).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.retriever.encode_query([text])[0].tolist()


class FedRAGVectorStore(VectorStore):
    """A LangChain ``VectorStore`` over a fedrag-jax knowledge store (shared, not copied).

    Scores are the store's similarities (inner product, or cosine for ``metric="cosine"``),
    higher is better. ``k`` is capped at the number of nodes in the store.
    """

    def __init__(self, store: KnowledgeStore, retriever: DualEncoder) -> None:
        self.store = store
        self.retriever = retriever
        self._embeddings = FedRAGEmbeddings(retriever)

    @classmethod
    def from_rag(cls, rag: RAGSystem) -> FedRAGVectorStore:
        return cls(rag.store, rag.retriever)

    @property
    def embeddings(self) -> Embeddings:
        return self._embeddings

    # --- writing -------------------------------------------------------------------------------
    def add_texts(self, texts: Iterable[str], metadatas: list[dict[str, Any]] | None = None, *,
                  ids: list[str] | None = None, **kwargs: Any) -> list[str]:
        texts = list(texts)
        ids = [uuid.uuid4().hex for _ in texts] if ids is None else [str(i) for i in ids]
        if not texts:
            return []
        embeddings = self.retriever.encode_context(texts, progress=False)
        self.store.add_arrays(ids, embeddings, texts, metadatas)
        return ids

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        if ids is None:
            raise ConfigError("FedRAGVectorStore.delete needs the ids to delete")
        self.store.delete(ids)
        return True

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        present = [i for i in ids if i in self.store]
        return [_document(n.node_id, n.text, n.metadata, float("nan"))
                for n in self.store.get(present)]

    @classmethod
    def from_texts(cls, texts: list[str], embedding: Embeddings | DualEncoder,
                   metadatas: list[dict[str, Any]] | None = None, *, ids: list[str] | None = None,
                   metric: str = "dot", backend: str = "auto",
                   **kwargs: Any) -> FedRAGVectorStore:
        """A new knowledge store holding ``texts``; ``embedding`` is a :class:`FedRAGEmbeddings`
        or a :class:`~fedrag_jax.retriever.DualEncoder` (other embeddings cannot feed our
        query tower). ``kwargs`` go to :func:`~fedrag_jax.knowledge_store.default_store`."""
        from ..knowledge_store import default_store

        retriever = getattr(embedding, "retriever", embedding)
        if not hasattr(retriever, "encode_context"):
            raise ConfigError(
                f"FedRAGVectorStore.from_texts needs FedRAGEmbeddings or a DualEncoder, got "
                f"{type(embedding).__name__}; wrap the retriever: FedRAGEmbeddings(retriever)")
        store = default_store(retriever.dimension, metric, backend=backend, **kwargs)
        vs = cls(store, retriever)
        vs.add_texts(texts, metadatas, ids=ids)
        return vs

    # --- searching -----------------------------------------------------------------------------
    def similarity_search_with_score_by_vector(self, embedding: Sequence[float], k: int = 4,
                                               **kwargs: Any) -> list[tuple[Document, float]]:
        if kwargs.get("filter") is not None:
            raise ConfigError("FedRAGVectorStore does not support metadata filters")
        k = min(int(k), self.store.count)
        if k < 1:
            return []
        scores, ids = self.store.search([list(embedding)], k)
        nodes = self.store.get(list(ids[0]))
        return [(_document(n.node_id, n.text, n.metadata, s), float(s))
                for n, s in zip(nodes, scores[0], strict=True)]

    def similarity_search_with_score(self, query: str, k: int = 4,
                                     **kwargs: Any) -> list[tuple[Document, float]]:
        return self.similarity_search_with_score_by_vector(
            self._embeddings.embed_query(query), k, **kwargs)

    def similarity_search_by_vector(self, embedding: list[float], k: int = 4,
                                    **kwargs: Any) -> list[Document]:
        return [d for d, _ in self.similarity_search_with_score_by_vector(embedding, k,
                                                                           **kwargs)]

    def similarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        return [d for d, _ in self.similarity_search_with_score(query, k, **kwargs)]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        if self.store.metric == "cosine":
            return lambda s: (s + 1.0) / 2.0
        raise NotImplementedError(
            "relevance scores in [0, 1] need a cosine store; this one uses inner products "
            "(use similarity_search_with_score for the raw scores)")


class FedRAGLLM(LLM):
    """A completion ``LLM`` over our JAX generator (greedy unless ``temperature`` > 0)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    generator: Any
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0

    @property
    def _llm_type(self) -> str:
        return "fedrag-jax"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_p": self.top_p}

    def _call(self, prompt: str, stop: list[str] | None = None,
              run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        settings = {**self._identifying_params,
                    **{k: v for k, v in kwargs.items() if k in GENERATE_KWARGS}}
        text = self.generator.generate([prompt], **settings)[0]
        for s in stop or []:  # the decoder stops at EOS only: cut at stop strings here
            text = text.split(s, 1)[0]
        return text


def to_langchain(rag: RAGSystem, *, top_k: int | None = None,
                 max_new_tokens: int | None = None,
                 prompt: PromptTemplate | None = None, **llm_kwargs: Any) -> Runnable:
    """``question -> {"query", "source_documents", "answer"}``: retriever | prompt | llm.

    The default prompt is the RAG system's template (variables ``context`` and ``query``);
    passages are joined with its separator and cut to ``max_context_tokens`` as in
    ``RAGSystem.query``.
    """
    retriever = FedRAGRetriever(rag=rag, top_k=top_k)
    llm = FedRAGLLM(generator=rag.generator,
                    max_new_tokens=max_new_tokens or rag.max_new_tokens, **llm_kwargs)
    prompt = prompt or PromptTemplate.from_template(rag.config.prompt_template)

    def prompt_inputs(x: dict[str, Any]) -> dict[str, str]:
        context = rag.config.context_separator.join(
            context_text(rag, d.page_content) for d in x["source_documents"])
        return {"context": context, "query": x["query"]}

    answer = RunnableLambda(prompt_inputs) | prompt | llm | StrOutputParser()
    retrieve = RunnableParallel(source_documents=retriever, query=RunnablePassthrough())
    return (retrieve | RunnablePassthrough.assign(answer=answer)).with_config(
        run_name="fedrag_jax_rag")
