"""LlamaIndex bridge: our retriever + store, generator and prompt as LlamaIndex components.

>>> from fedrag_jax.bridges.llamaindex import to_llamaindex
>>> engine = to_llamaindex(rag)                  # a llama_index RetrieverQueryEngine
>>> response = engine.query("Who wrote Dune?")
>>> response.response, [n.node.node_id for n in response.source_nodes]

``FedRAGRetriever`` returns ``NodeWithScore`` (our node id, text, metadata and retrieval score),
``FedRAGLLM`` is a ``CustomLLM`` over our :class:`~fedrag_jax.generator.Generator`, and
``FedRAGSynthesizer`` fills the RAG system's own prompt template, so the engine answers exactly
as ``rag.query`` does. Needs ``pip install 'fedrag-jax[llamaindex]'``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from . import context_text, missing, template_parts

try:
    from llama_index.core.base.llms.types import (
        CompletionResponse,
        CompletionResponseGen,
        LLMMetadata,
    )
    from llama_index.core.indices.prompt_helper import PromptHelper
    from llama_index.core.llms.callbacks import llm_completion_callback
    from llama_index.core.llms.custom import CustomLLM
    from llama_index.core.prompts import PromptTemplate
    from llama_index.core.query_engine import RetrieverQueryEngine
    from llama_index.core.response_synthesizers.base import BaseSynthesizer
    from llama_index.core.retrievers import BaseRetriever
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from pydantic import Field, PrivateAttr
except ImportError as e:
    raise missing("llamaindex", e) from e
try:  # llama-index-core >= 0.13
    from llama_index.core.indices.prompt_helper import ChatPromptHelper
except ImportError:
    ChatPromptHelper = None

if TYPE_CHECKING:
    from ..generator import Generator
    from ..rag import RAGSystem

__all__ = ["FedRAGLLM", "FedRAGRetriever", "FedRAGSynthesizer", "to_llamaindex"]

GENERATE_KWARGS = ("max_new_tokens", "temperature", "top_p", "seed")


class FedRAGRetriever(BaseRetriever):
    """Top-k passages of the RAG system's knowledge store as ``NodeWithScore`` objects.

    Node metadata is kept but hidden from the LLM and embed views, so the prompt holds the
    passage text only (as in ``RAGSystem.query``).
    """

    def __init__(self, rag: RAGSystem, top_k: int | None = None, **kwargs: Any) -> None:
        self._rag = rag
        self._top_k = top_k
        super().__init__(**kwargs)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        sources = self._rag.retrieve(query_bundle.query_str, top_k=self._top_k)
        out = []
        for s in sources:
            meta = dict(s.node.metadata)
            node = TextNode(id_=s.node_id, text=s.text, metadata=meta,
                            excluded_llm_metadata_keys=list(meta),
                            excluded_embed_metadata_keys=list(meta))
            out.append(NodeWithScore(node=node, score=float(s.score)))
        return out


class FedRAGLLM(CustomLLM):
    """A completion LLM over our JAX generator (greedy unless ``temperature`` > 0)."""

    max_new_tokens: int = Field(default=64, description="tokens generated per completion")
    temperature: float = Field(default=0.0, description="0 = greedy decoding")
    top_p: float = Field(default=1.0)
    context_window: int = Field(default=2048, description="the generator's positions")
    model_name: str = Field(default="fedrag-jax-generator")
    _generator: Any = PrivateAttr()

    def __init__(self, generator: Generator, **kwargs: Any) -> None:
        kwargs.setdefault("context_window", int(generator.model.config.max_position_embeddings))
        super().__init__(**kwargs)
        self._generator = generator

    @classmethod
    def class_name(cls) -> str:
        return "FedRAGLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.context_window, num_output=self.max_new_tokens,
                           model_name=self.model_name, is_chat_model=False)

    def _generate(self, prompt: str, kwargs: dict[str, Any]) -> str:
        settings = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                    "top_p": self.top_p}
        settings.update({k: v for k, v in kwargs.items() if k in GENERATE_KWARGS})
        return self._generator.generate([prompt], **settings)[0]

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text=self._generate(prompt, kwargs))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False,
                        **kwargs: Any) -> CompletionResponseGen:
        """The whole completion as one chunk (decoding runs as one compiled program)."""
        text = self._generate(prompt, kwargs)

        def gen() -> CompletionResponseGen:
            yield CompletionResponse(text=text, delta=text)

        return gen()


def llamaindex_template(rag: RAGSystem) -> PromptTemplate:
    """The RAG prompt template with LlamaIndex's ``{context_str}`` / ``{query_str}`` names."""
    names = {"context": "{context_str}", "query": "{query_str}", None: ""}
    parts = template_parts(rag.config.prompt_template)
    # LlamaIndex fills {name} for known names only and has no escape for braces: literal text
    # goes in as is, unless it holds one of the two names
    for literal, _ in parts:
        if "{context_str}" in literal or "{query_str}" in literal:
            raise ConfigError("the prompt template's literal text holds {context_str} or "
                              "{query_str}, which LlamaIndex would fill in; rephrase it")
    return PromptTemplate("".join(lit + names[field] for lit, field in parts))


def _token_counter(rag: RAGSystem):
    tok = rag.generator.tokenizer
    return lambda text: tok(text, add_special_tokens=False)["input_ids"]


class FedRAGSynthesizer(BaseSynthesizer):
    """Fills the RAG system's template: passages joined by its separator, each cut to
    ``max_context_tokens``, exactly as :meth:`RAGSystem.build_prompt` does."""

    def __init__(self, rag: RAGSystem, llm: FedRAGLLM,
                 text_qa_template: PromptTemplate | None = None, **kwargs: Any) -> None:
        window = llm.metadata.context_window
        count = _token_counter(rag)
        kwargs.setdefault("prompt_helper", PromptHelper(
            context_window=window, num_output=llm.max_new_tokens, tokenizer=count))
        if ChatPromptHelper is not None:
            kwargs.setdefault("chat_prompt_helper", ChatPromptHelper(
                context_window=window, num_output=llm.max_new_tokens, tokenizer=count))
        super().__init__(llm=llm, **kwargs)
        self._rag = rag
        self._template = text_qa_template or llamaindex_template(rag)

    def _get_prompts(self) -> dict[str, Any]:
        return {"text_qa_template": self._template}

    def _update_prompts(self, prompts: dict[str, Any]) -> None:
        if "text_qa_template" in prompts:
            self._template = prompts["text_qa_template"]

    def _context(self, text_chunks: Sequence[str]) -> str:
        return self._rag.config.context_separator.join(
            context_text(self._rag, c) for c in text_chunks)

    def get_response(self, query_str: str, text_chunks: Sequence[str], **kwargs: Any):
        args = {"context_str": self._context(text_chunks), "query_str": query_str, **kwargs}
        if self._streaming:
            return self._llm.stream(self._template, **args)
        return self._llm.predict(self._template, **args)

    async def aget_response(self, query_str: str, text_chunks: Sequence[str], **kwargs: Any):
        return self.get_response(query_str, text_chunks, **kwargs)


def to_llamaindex(rag: RAGSystem, *, top_k: int | None = None,
                  max_new_tokens: int | None = None, streaming: bool = False,
                  **llm_kwargs: Any) -> RetrieverQueryEngine:
    """A ``RetrieverQueryEngine`` with our retriever, our LLM and the RAG prompt template."""
    llm = FedRAGLLM(rag.generator, max_new_tokens=max_new_tokens or rag.max_new_tokens,
                    **llm_kwargs)
    return RetrieverQueryEngine(retriever=FedRAGRetriever(rag, top_k=top_k),
                                response_synthesizer=FedRAGSynthesizer(rag, llm,
                                                                       streaming=streaming))
