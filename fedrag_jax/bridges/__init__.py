"""Bridges: use a :class:`~fedrag_jax.rag.RAGSystem` from LlamaIndex, LangChain or Haystack.

Each bridge wraps the same three parts (retriever + knowledge store, generator, prompt) in the
other framework's own types, so its query engines, chains and pipelines run our JAX models:

>>> engine = to_llamaindex(rag)     # llama_index RetrieverQueryEngine
>>> chain = to_langchain(rag)       # LangChain runnable: question -> {answer, source_documents}
>>> pipe = to_haystack(rag)         # Haystack 2.x Pipeline: retriever -> prompt -> generator

The frameworks are optional: each is imported only when its bridge is used, and a missing one
raises :class:`BridgeNotInstalledError` naming the extra to install.
"""

from __future__ import annotations

import importlib
import string
from typing import TYPE_CHECKING, Any

from ..errors import FedRAGJaxError

if TYPE_CHECKING:
    from ..rag import RAGSystem

__all__ = ["BridgeNotInstalledError", "to_haystack", "to_langchain", "to_llamaindex"]

EXTRAS = {"llamaindex": "llama_index.core", "langchain": "langchain_core",
          "haystack": "haystack"}


class BridgeNotInstalledError(FedRAGJaxError, ImportError):
    """The framework a bridge talks to is not installed."""


def missing(extra: str, error: ImportError) -> BridgeNotInstalledError:
    """The error to raise when the framework behind ``extra`` does not import."""
    return BridgeNotInstalledError(
        f"the {extra} bridge needs `{EXTRAS[extra]}`, which does not import ({error}); install "
        f"it with `pip install 'fedrag-jax[{extra}]'` (or 'fedrag-jax[bridges]' for all three)")


def require(extra: str) -> None:
    """Import the framework behind ``extra`` or raise a message saying what to install."""
    try:
        importlib.import_module(EXTRAS[extra])
    except ImportError as e:
        raise missing(extra, e) from e


def context_text(rag: RAGSystem, text: str) -> str:
    """A passage as RAGSystem puts it in a prompt (cut to ``max_context_tokens`` if set)."""
    if rag.max_context_tokens is None:
        return text
    tok = rag.generator.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"][: rag.max_context_tokens]
    return tok.decode(ids)


def template_parts(template: str) -> list[tuple[str, str | None]]:
    """``(literal, field)`` pairs of a ``str.format`` template; literals come unescaped."""
    parts = []
    for literal, field, _spec, _conv in string.Formatter().parse(template):
        if field not in (None, "context", "query"):
            raise ValueError(f"prompt template field {{{field}}} is not one of "
                             "{context}, {query}")
        parts.append((literal, field))
    return parts


def to_llamaindex(rag: RAGSystem, **kwargs: Any):
    """A LlamaIndex ``RetrieverQueryEngine`` over ``rag`` (see ``bridges.llamaindex``)."""
    from .llamaindex import to_llamaindex as build

    return build(rag, **kwargs)


def to_langchain(rag: RAGSystem, **kwargs: Any):
    """A LangChain runnable ``question -> {"answer", "source_documents"}``."""
    from .langchain import to_langchain as build

    return build(rag, **kwargs)


def to_haystack(rag: RAGSystem, **kwargs: Any):
    """A Haystack ``Pipeline``: retriever -> prompt_builder -> generator -> answer_builder."""
    from .haystack import to_haystack as build

    return build(rag, **kwargs)
