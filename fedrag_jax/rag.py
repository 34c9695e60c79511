"""RAGSystem: retrieve the top-k passages for a query, then generate an answer from them.

A saved system is one folder::

    rag_config.json      top_k, prompt template, separator, fusion, retriever settings
    retriever/           HF folder of the query tower (sentence-transformers files included)
    context_retriever/   the context tower, only when the towers have separate weights
    generator/           HF folder of the generator (LoRA adapters merged), tokenizer included
    store/               the persisted knowledge store (manifest, nodes, embeddings, index)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import CheckpointNotFoundError, DataError
from .generator import Generator, fusion_log_weights
from .knowledge_store import KnowledgeStore, load_store
from .outputs import is_remote, out_path, staged_directory
from .paths import local_copy
from .retriever import DualEncoder
from .types import RAGConfig, RAGResponse, SourceNode


class RAGSystem:
    def __init__(self, retriever: DualEncoder, store: KnowledgeStore, generator: Generator,
                 config: RAGConfig | None = None, *, max_new_tokens: int = 64,
                 max_context_tokens: int | None = None):
        self.retriever = retriever
        self.store = store
        self.generator = generator
        self.config = config or RAGConfig()
        self.max_new_tokens = max_new_tokens
        self.max_context_tokens = max_context_tokens  # per passage, None = whole passage

    # --- retrieval ---------------------------------------------------------------------------
    def batch_retrieve(self, queries: Sequence[str], top_k: int | None = None,
                       ) -> list[list[SourceNode]]:
        k = top_k or self.config.top_k
        scores, ids = self.store.search(self.retriever.encode_query(list(queries)), k)
        nodes = {n.node_id: n for n in self.store.get(sorted({str(i) for i in ids.ravel()}))}
        return [[SourceNode(nodes[str(i)], float(s)) for s, i in zip(srow, irow, strict=True)]
                for srow, irow in zip(scores, ids, strict=True)]

    def retrieve(self, query: str, top_k: int | None = None) -> list[SourceNode]:
        return self.batch_retrieve([query], top_k)[0]

    # --- generation --------------------------------------------------------------------------
    def passage_text(self, text: str) -> str:
        """What a prompt shows of a passage: its first ``max_context_tokens`` tokens."""
        if self.max_context_tokens is None:
            return text
        tok = self.generator.tokenizer
        ids = tok(text, add_special_tokens=False)["input_ids"][: self.max_context_tokens]
        return tok.decode(ids)

    def build_prompt(self, query: str, sources: Sequence[SourceNode]) -> str:
        """The concat prompt: every passage in one context."""
        return self.config.format_prompt(query, [self.passage_text(s.text) for s in sources])

    def passage_prompts(self, query: str, sources: Sequence[SourceNode]) -> list[str]:
        """The ensemble's prompts: one per passage, each as :meth:`build_prompt` with it alone."""
        return [self.config.format_prompt(query, [self.passage_text(s.text)]) for s in sources]

    def fusion_log_weights(self, sources: Sequence[Sequence[SourceNode]]) -> np.ndarray:
        """log P_R(d | x) = log softmax_k(s(x, d) / tau) [B, k] of the retrieved passages."""
        return fusion_log_weights([[s.score for s in row] for row in sources],
                                  self.config.fusion_temperature)

    def batch_query(self, queries: Sequence[str], **generate_kwargs) -> list[RAGResponse]:
        """Answers from the top-k passages, fused as ``config.fusion`` says."""
        sources = self.batch_retrieve(queries)
        generate_kwargs.setdefault("max_new_tokens", self.max_new_tokens)
        if self.config.fusion == "ensemble":
            prompts = [self.passage_prompts(q, s) for q, s in zip(queries, sources, strict=True)]
            answers = self.generator.generate_ensemble(prompts, self.fusion_log_weights(sources),
                                                       **generate_kwargs)
        else:
            prompts = [self.build_prompt(q, s) for q, s in zip(queries, sources, strict=True)]
            answers = self.generator.generate(prompts, **generate_kwargs)
        return [RAGResponse(a, s) for a, s in zip(answers, sources, strict=True)]

    def score(self, queries: Sequence[str], responses: Sequence[str],
              reduction: Literal["sum", "mean"] = "sum") -> np.ndarray:
        """log p(response | query) under this system, float64 [B]: over the concat prompt, or
        (ensemble) log sum_d P_R(d | x) p(response | prompt(x, d)). Responses are tokenized
        as :meth:`Generator.score` does (on their own, no special tokens)."""
        if len(queries) != len(responses):
            raise DataError(f"{len(queries)} queries but {len(responses)} responses")
        sources = self.batch_retrieve(queries)
        if self.config.fusion == "ensemble":
            prompts = [self.passage_prompts(q, s) for q, s in zip(queries, sources, strict=True)]
            return self.generator.score_ensemble(prompts, responses,
                                                 self.fusion_log_weights(sources), reduction)
        prompts = [self.build_prompt(q, s) for q, s in zip(queries, sources, strict=True)]
        return self.generator.score(prompts, responses, reduction)

    def query(self, query: str, **generate_kwargs) -> RAGResponse:
        return self.batch_query([query], **generate_kwargs)[0]

    # --- the application frameworks ---------------------------------------------------------
    def to_llamaindex(self, **kwargs):
        """A LlamaIndex query engine over this system (extra ``llamaindex``)."""
        from .bridges import to_llamaindex

        return to_llamaindex(self, **kwargs)

    def to_langchain(self, **kwargs):
        """A LangChain runnable: {"answer", "source_documents"} (extra ``langchain``)."""
        from .bridges import to_langchain

        return to_langchain(self, **kwargs)

    def to_haystack(self, **kwargs):
        """A Haystack pipeline: retriever -> prompt -> generator (extra ``haystack``)."""
        from .bridges import to_haystack

        return to_haystack(self, **kwargs)

    # --- persistence -------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Write the whole system atomically (a local folder, or objects under gs://...);
        the store is persisted as it is. Returns the folder (an epath.Path for gs://)."""
        r = self.retriever
        with staged_directory(out_dir, kind="rag-system") as tmp:
            r.query_encoder.save_pretrained(tmp / "retriever", tokenizer=r.tokenizer)
            if r.context_encoder is not None:
                r.context_encoder.save_pretrained(tmp / "context_retriever",
                                                  tokenizer=r.tokenizer)
            self.generator.model.save_pretrained(tmp / "generator",
                                                 tokenizer=self.generator.tokenizer)
            self.store.persist(tmp / "store")
            settings = {"rag": asdict(self.config), "max_new_tokens": self.max_new_tokens,
                        "max_context_tokens": self.max_context_tokens,
                        "retriever": {"max_length": r.max_length, "query_prefix": r.query_prefix,
                                      "context_prefix": r.context_prefix},
                        "use_chat_template": self.generator.use_chat_template}
            (tmp / "rag_config.json").write_text(json.dumps(settings, indent=2))
        return out_path(out_dir) if is_remote(out_dir) else Path(out_dir)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: str | None = None,
                        mesh=None, allow_foreign_store: bool = False) -> RAGSystem:
        """Load a saved system (local, or gs:// fetched once); its store must have been
        built by its retriever (:class:`~fedrag_jax.errors.StoreFingerprintError` otherwise,
        unless ``allow_foreign_store``)."""
        path = local_copy(path, "saved RAG system")
        cfg_file = path / "rag_config.json"
        if not cfg_file.is_file():
            raise CheckpointNotFoundError(f"{path} is not a saved RAGSystem (no rag_config.json)")
        settings = json.loads(cfg_file.read_text())
        context = path / "context_retriever"
        retriever = DualEncoder.from_pretrained(
            path / "retriever", context if context.is_dir() else None, dtype=dtype, mesh=mesh,
            **settings["retriever"])
        generator = Generator.from_pretrained(path / "generator", dtype=dtype, mesh=mesh,
                                              use_chat_template=settings["use_chat_template"])
        store = _matching_store(path / "store", retriever, allow_foreign_store)
        return cls(retriever, store, generator,
                   RAGConfig(**settings["rag"]), max_new_tokens=settings["max_new_tokens"],
                   max_context_tokens=settings["max_context_tokens"])

    @classmethod
    def from_parts(cls, *, retriever: str | os.PathLike, generator: str | os.PathLike,
                   store: str | os.PathLike, config: RAGConfig | None = None,
                   context_retriever: str | os.PathLike | None = None, dtype: str | None = None,
                   mesh=None, allow_foreign_store: bool = False, **kwargs) -> RAGSystem:
        """Build from a retriever folder, a generator folder or GGUF, and a saved store (which
        that retriever must have built, unless ``allow_foreign_store``); local or gs://."""
        retriever, generator = local_copy(retriever, "retriever"), local_copy(generator,
                                                                           "generator")
        if context_retriever is not None:
            context_retriever = local_copy(context_retriever, "context retriever")
        encoder = DualEncoder.from_pretrained(retriever, context_retriever, dtype=dtype,
                                              mesh=mesh)
        return cls(encoder, _matching_store(store, encoder, allow_foreign_store),
                   Generator.from_pretrained(generator, dtype=dtype, mesh=mesh),
                   config, **kwargs)


def _matching_store(path: str | os.PathLike, retriever: DualEncoder,
                    allow_foreign: bool) -> KnowledgeStore:
    """The store at ``path``, checked to be ``retriever``'s (indexing.check_store_fingerprint)."""
    from .indexing import check_store_fingerprint

    store = load_store(path)
    check_store_fingerprint(store, retriever, allow_foreign=allow_foreign, where=path)
    return store

