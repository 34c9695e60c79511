"""Haystack (2.x component API) bridge: our retriever and generator as pipeline components.

>>> from fedrag_jax.bridges.haystack import to_haystack
>>> pipe = to_haystack(rag)
>>> out = pipe.run({"query": "Who wrote Dune?"})          # fed to every ``query`` input
>>> answer = out["answer_builder"]["answers"][0]
>>> answer.data, [d.id for d in answer.documents]

The pipeline is ``retriever -> context -> prompt_builder -> llm -> answer_builder``:
``FedRAGRetriever`` (query -> documents with our ids, scores and metadata), a trimmer that
cuts passages to the RAG system's ``max_context_tokens``, Haystack's ``PromptBuilder`` with the
RAG system's template turned into Jinja, ``FedRAGGenerator`` (prompt -> replies) and
Haystack's ``AnswerBuilder``, which keeps the retrieved documents with the answer.
Needs ``pip install 'fedrag-jax[haystack]'``.
"""

# no `from __future__ import annotations`: Haystack < 2.9 reads the socket types of run()
# from its annotations, which must then be real types, not strings
import dataclasses
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from . import context_text, missing, template_parts

try:
    from haystack import Document, Pipeline, component
    from haystack.components.builders import AnswerBuilder, PromptBuilder
except ImportError as e:
    raise missing("haystack", e) from e

if TYPE_CHECKING:
    from ..generator import Generator
    from ..rag import RAGSystem

__all__ = ["FedRAGContextTrimmer", "FedRAGGenerator", "FedRAGRetriever", "haystack_template",
           "to_haystack"]

GENERATE_KWARGS = ("max_new_tokens", "temperature", "top_p", "seed")


@component
class FedRAGRetriever:
    """query -> the RAG system's top-k passages as Haystack ``Document`` objects, best first.

    ``Document.id`` is our node id (also in ``meta["node_id"]``), ``Document.score`` the
    retrieval score; the node's metadata is in ``meta``.
    """

    def __init__(self, rag: "RAGSystem", top_k: int | None = None) -> None:
        self.rag = rag
        self.top_k = top_k

    @component.output_types(documents=list[Document])
    def run(self, query: str, top_k: int | None = None) -> dict[str, list[Document]]:
        sources = self.rag.retrieve(query, top_k=top_k or self.top_k)
        return {"documents": [
            Document(id=s.node_id, content=s.text, score=float(s.score),
                     meta={**s.node.metadata, "node_id": s.node_id}) for s in sources]}


@component
class FedRAGContextTrimmer:
    """documents -> the same documents with their text cut to ``max_context_tokens`` of the
    generator's tokenizer (a pass-through when the RAG system sets no limit)."""

    def __init__(self, rag: "RAGSystem") -> None:
        self.rag = rag

    @component.output_types(documents=list[Document])
    def run(self, documents: list[Document]) -> dict[str, list[Document]]:
        return {"documents": [dataclasses.replace(d, content=context_text(self.rag, d.content))
                              for d in documents]}


@component
class FedRAGGenerator:
    """prompt -> replies, from our JAX generator (greedy unless ``temperature`` > 0)."""

    def __init__(self, generator: "Generator", max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0) -> None:
        self.generator = generator
        self.generation_kwargs = {"max_new_tokens": max_new_tokens, "temperature": temperature,
                                  "top_p": top_p}

    @component.output_types(replies=list[str], meta=list[dict[str, Any]])
    def run(self, prompt: str, generation_kwargs: dict[str, Any] | None = None,
            ) -> dict[str, list[Any]]:
        unknown = set(generation_kwargs or {}) - set(GENERATE_KWARGS)
        if unknown:
            raise ConfigError(f"unknown generation_kwargs {sorted(unknown)}; "
                              f"known: {list(GENERATE_KWARGS)}")
        settings = {**self.generation_kwargs, **(generation_kwargs or {})}
        reply = self.generator.generate([prompt], **settings)[0]
        return {"replies": [reply], "meta": [{"model": "fedrag-jax", **settings}]}


def _raw(text: str) -> str:
    if not text:
        return ""
    if "endraw" in text:
        raise ConfigError("the prompt template contains 'endraw', which cannot be quoted in the "
                          "Jinja template of Haystack's PromptBuilder")
    return "{% raw %}" + text + "{% endraw %}"


def haystack_template(rag: "RAGSystem") -> str:
    """The RAG prompt template as Jinja over ``documents`` and ``query`` (literal text kept
    verbatim, passages joined with the RAG system's separator)."""
    sep = _raw(rag.config.context_separator)
    context = ("{% for doc in documents %}{{ doc.content }}"
               + (f"{{% if not loop.last %}}{sep}{{% endif %}}" if sep else "")
               + "{% endfor %}")
    fields = {"context": context, "query": "{{ query }}", None: ""}
    return "".join(_raw(lit) + fields[field]
                   for lit, field in template_parts(rag.config.prompt_template))


def to_haystack(rag: "RAGSystem", *, top_k: int | None = None,
                max_new_tokens: int | None = None, **generation_kwargs: Any) -> Pipeline:
    """retriever -> context -> prompt_builder -> llm -> answer_builder, as one Pipeline.

    Run it with ``pipe.run({"query": q})`` (Haystack passes ``q`` to the retriever, the prompt
    builder and the answer builder); the answer is ``out["answer_builder"]["answers"][0]``,
    a ``GeneratedAnswer`` whose ``documents`` are the retrieved passages.
    """
    pipe = Pipeline()
    pipe.add_component("retriever", FedRAGRetriever(rag, top_k=top_k))
    pipe.add_component("context", FedRAGContextTrimmer(rag))
    pipe.add_component("prompt_builder", PromptBuilder(template=haystack_template(rag),
                                                       required_variables=["documents",
                                                                           "query"]))
    pipe.add_component("llm", FedRAGGenerator(
        rag.generator, max_new_tokens=max_new_tokens or rag.max_new_tokens,
        **generation_kwargs))
    pipe.add_component("answer_builder", AnswerBuilder())
    pipe.connect("retriever.documents", "context.documents")
    pipe.connect("context.documents", "prompt_builder.documents")
    pipe.connect("prompt_builder.prompt", "llm.prompt")
    pipe.connect("llm.replies", "answer_builder.replies")
    pipe.connect("llm.meta", "answer_builder.meta")
    pipe.connect("retriever.documents", "answer_builder.documents")
    return pipe
