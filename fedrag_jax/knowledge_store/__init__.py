"""Knowledge stores: ScaNN (approximate) and exact JAX (reference / fallback), one contract.

>>> store = default_store(metric="cosine")          # ScaNN where it imports, else exact
>>> store.add(nodes)                                # KnowledgeNode objects with embeddings
>>> scores, ids = store.search(query_embs, k=4)     # [B, k] float32, [B, k] ids
>>> store.persist("my_store"); store = load_store("my_store")
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..paths import local_copy
from .base import METRICS, KnowledgeStore, Metric
from .exact import ExactKnowledgeStore
from .persistence import FORMAT_VERSION, read_manifest
from .scann import (
    ScannConfig,
    ScannKnowledgeStore,
    ScannUnavailableError,
    import_scann,
    scann_available,
)

__all__ = [
    "FORMAT_VERSION",
    "METRICS",
    "ExactKnowledgeStore",
    "KnowledgeStore",
    "Metric",
    "ScannConfig",
    "ScannKnowledgeStore",
    "ScannUnavailableError",
    "default_store",
    "import_scann",
    "load_store",
    "scann_available",
]

STORE_TYPES: dict[str, type[KnowledgeStore]] = {
    "exact": ExactKnowledgeStore,
    "scann": ScannKnowledgeStore,
}


def _fallback_warning(reason: str) -> None:
    warnings.warn(f"ScaNN is unavailable ({reason}); using the exact JAX store, which is "
                  "correct but slower on large corpora", RuntimeWarning, stacklevel=3)


def default_store(dimension: int | None = None, metric: Metric = "dot", *,
                  backend: str = "auto", **kwargs: Any) -> KnowledgeStore:
    """A new store: ScaNN when ``backend`` is "auto" and scann imports, else the exact store.

    ``kwargs`` go to the chosen store's constructor; options of the other backend (e.g.
    ``scann_config=`` or ``mesh=``) are ignored so that one call works with either.
    """
    if backend not in ("auto", "scann", "exact"):
        raise ConfigError(f"backend must be 'auto', 'scann' or 'exact', got {backend!r}")
    known = ScannKnowledgeStore._config_keys() | ExactKnowledgeStore._config_keys()
    unknown = set(kwargs) - known
    if unknown:
        raise ConfigError(f"unknown knowledge-store options {sorted(unknown)}")

    def own(cls: type[KnowledgeStore]) -> dict[str, Any]:
        return {k: v for k, v in kwargs.items() if k in cls._config_keys()}

    if backend in ("auto", "scann"):
        try:
            return ScannKnowledgeStore(dimension, metric, **own(ScannKnowledgeStore))
        except ScannUnavailableError as e:
            if backend == "scann":
                raise
            _fallback_warning(str(e).split(";")[0])
    return ExactKnowledgeStore(dimension, metric, **own(ExactKnowledgeStore))


def load_store(path: str | Path, *, backend: str | None = None, **kwargs: Any) -> KnowledgeStore:
    """Load a persisted store with the class named in its manifest (or ``backend``).

    A ScaNN store loads as an exact store where scann cannot be imported.
    """
    path = local_copy(path, "knowledge store")  # local, or gs:// fetched once
    manifest = read_manifest(path)
    name = backend or manifest["store_type"]
    cls = STORE_TYPES.get(name)
    if cls is None:
        raise ConfigError(f"unknown store type {name!r}; known: {sorted(STORE_TYPES)}")
    if cls is ScannKnowledgeStore and not scann_available():
        _fallback_warning("scann does not import")
        cls = ExactKnowledgeStore
    return cls.load(path, **kwargs)
