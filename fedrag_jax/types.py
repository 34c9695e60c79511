"""Plain data types that travel along the RAG path: nodes, search hits, config, responses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .errors import ConfigError

DEFAULT_PROMPT_TEMPLATE = (
    "You are a helpful assistant. Answer the question using the context below.\n\n"
    "Context:\n{context}\n\n"
    "Question: {query}\n"
    "Answer:"
)


@dataclass
class KnowledgeNode:
    """One passage of the knowledge store: an id, its text, its embedding, free metadata.

    ``metadata`` must be JSON-serializable for the store to be persisted.
    """

    node_id: str
    text: str
    embedding: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not self.node_id:
            raise ConfigError(f"node_id must be a non-empty string, got {self.node_id!r}")
        if not isinstance(self.text, str):
            raise ConfigError(f"text of node {self.node_id!r} must be a string, "
                              f"got {type(self.text).__name__}")
        if not isinstance(self.metadata, dict):
            raise ConfigError(f"metadata of node {self.node_id!r} must be a dict, "
                              f"got {type(self.metadata).__name__}")


@dataclass
class SourceNode:
    """A retrieved node with its retrieval score (higher is more similar)."""

    node: KnowledgeNode
    score: float

    @property
    def node_id(self) -> str:
        return self.node.node_id

    @property
    def text(self) -> str:
        return self.node.text


FUSIONS = ("concat", "ensemble")


@dataclass
class RAGConfig:
    """How many passages to retrieve and how to put them into the generator's prompt.

    ``fusion``: "concat" puts the top-k passages into one prompt (joined by
    ``context_separator``); "ensemble" (REPLUG; RA-DIT's parallel retrieval augmentation)
    gives each passage its own prompt and mixes the k next-token distributions at every
    decoding step with P_R(d | x) = softmax_k(s(x, d) / fusion_temperature), s the store's
    similarity scores: the layout LSR and per-passage RALT train on.
    """

    top_k: int = 4
    context_separator: str = "\n"
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    fusion: Literal["concat", "ensemble"] = "concat"
    fusion_temperature: float = 0.05

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"RAGConfig.top_k must be an integer >= 1, got {self.top_k!r}")
        if self.fusion not in FUSIONS:
            raise ConfigError(f"RAGConfig.fusion must be one of {list(FUSIONS)}, "
                              f"got {self.fusion!r}")
        tau = self.fusion_temperature
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0 \
                or tau == float("inf"):
            raise ConfigError(f"RAGConfig.fusion_temperature must be a number > 0, got {tau!r}")
        for placeholder in ("{context}", "{query}"):
            if placeholder not in self.prompt_template:
                raise ConfigError(
                    f"RAGConfig.prompt_template must contain {placeholder}; "
                    f"got {self.prompt_template!r}"
                )

    def format_prompt(self, query: str, contexts: list[str]) -> str:
        """Fill the template with the query and the retrieved passages."""
        context = self.context_separator.join(contexts)
        return self.prompt_template.format(context=context, query=query)


@dataclass
class RAGResponse:
    """The generator's answer and the passages it was given."""

    answer: str
    source_nodes: list[SourceNode] = field(default_factory=list)

    def __str__(self) -> str:
        return self.answer
