"""The knowledge-store contract and the bookkeeping both stores share.

A store keeps its embeddings in ONE contiguous float32 matrix (row = node) and owns the
node-id <-> row mapping, so search backends only ever see row numbers (ScaNN would pickle
string docids). Deletion marks rows dead (tombstones); dead rows are never returned, and the
matrix is compacted lazily, at the next search, once the dead fraction passes
``compact_threshold``.

Search contract: ``search(queries [B, D], k) -> (scores [B, k] float32, ids [B, k] object)``,
best first. ``k`` larger than the number of nodes raises :class:`KnowledgeStoreError`
(never clamped: downstream batches have fixed shapes, a short result would break them).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from ..errors import (
    DimensionMismatchError,
    DuplicateNodeError,
    EmptyStoreError,
    InvalidEmbeddingError,
    KnowledgeStoreError,
    NodeNotFoundError,
)
from ..types import KnowledgeNode, SourceNode

Metric = Literal["dot", "cosine"]
METRICS: tuple[str, ...] = ("dot", "cosine")


def _preview(ids: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in list(ids)[:limit])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


class KnowledgeStore(abc.ABC):
    """Abstract knowledge store: add / delete / get / search / persist / load.

    Subclasses implement :meth:`_search_rows` (top-k over live rows) and may react to
    changes through :meth:`_on_change`; everything else (validation, id mapping,
    tombstones, persistence) lives here so both stores behave identically on bad input.
    """

    store_type: ClassVar[str] = "abstract"

    def __init__(self, dimension: int | None = None, metric: Metric = "dot", *,
                 compact_threshold: float = 0.25, embedding_model: str | None = None,
                 embedding_model_hash: str | None = None) -> None:
        if metric not in METRICS:
            raise KnowledgeStoreError(f"metric must be one of {METRICS}, got {metric!r}")
        if dimension is not None and (not isinstance(dimension, int | np.integer)
                                      or dimension < 1):
            raise KnowledgeStoreError(f"dimension must be a positive integer, got {dimension!r}")
        if not 0.0 < compact_threshold <= 1.0:
            raise KnowledgeStoreError(
                f"compact_threshold must be in (0, 1], got {compact_threshold!r}")
        self._metric: Metric = metric
        self._dim: int | None = int(dimension) if dimension is not None else None
        self.compact_threshold = float(compact_threshold)
        self.embedding_model = embedding_model
        self.embedding_model_hash = embedding_model_hash
        d = self._dim or 0
        self._emb = np.zeros((0, d), np.float32)  # capacity rows; the first _n_rows are used
        self._alive = np.zeros((0,), bool)
        self._row_ids = np.zeros((0,), object)  # row -> node id (None once deleted)
        self._texts: list[str | None] = []
        self._metadata: list[dict[str, Any] | None] = []
        self._row_of: dict[str, int] = {}
        self._n_rows = 0

    # ---------------------------------------------------------------- properties
    @property
    def count(self) -> int:
        """Number of live nodes."""
        return len(self._row_of)

    @property
    def dimension(self) -> int | None:
        """Embedding dimension; ``None`` until fixed by the constructor or the first add."""
        return self._dim

    @property
    def metric(self) -> Metric:
        """``"dot"`` (inner product) or ``"cosine"`` (vectors normalized on add and query)."""
        return self._metric

    @property
    def num_rows(self) -> int:
        """Rows in the embedding matrix, live and dead."""
        return self._n_rows

    @property
    def tombstone_fraction(self) -> float:
        return 0.0 if self._n_rows == 0 else 1.0 - self.count / self._n_rows

    def __len__(self) -> int:
        return self.count

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._row_of

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(count={self.count}, dimension={self._dim}, "
                f"metric={self._metric!r})")

    # ---------------------------------------------------------------- validation
    def _check_matrix(self, x: Any, what: str) -> np.ndarray:
        """float32 [N, D] with the store's dimension and finite values (normalized if cosine)."""
        try:
            arr = np.asarray(x, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise InvalidEmbeddingError(f"{what} is not a numeric array: {e}") from e
        if arr.ndim != 2:
            raise DimensionMismatchError(
                f"{what} must have shape [N, D], got shape {arr.shape}")
        if self._dim is not None and arr.shape[1] != self._dim:
            raise DimensionMismatchError(
                f"{what} has dimension {arr.shape[1]} but the store holds dimension "
                f"{self._dim}; encode with the same model the store was built with")
        if arr.shape[1] == 0:
            raise DimensionMismatchError(f"{what} has dimension 0")
        finite = np.isfinite(arr).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise InvalidEmbeddingError(
                f"{what} has NaN or infinite values in row(s) {bad[:10].tolist()}; "
                "check the encoder output (e.g. fp16 overflow) before adding or searching")
        if self._metric == "cosine":
            norms = np.linalg.norm(arr, axis=1, keepdims=True)
            if (norms == 0).any():
                bad = np.flatnonzero(norms[:, 0] == 0)
                raise InvalidEmbeddingError(
                    f"{what} has zero vectors in row(s) {bad[:10].tolist()}; cosine similarity "
                    "is undefined for them")
            arr = arr / norms
        return np.ascontiguousarray(arr, dtype=np.float32)

    def _check_k(self, k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise KnowledgeStoreError(f"k must be a positive integer, got {k!r}")
        if k > self.count:
            raise KnowledgeStoreError(
                f"k={k} exceeds the {self.count} nodes in the store; ask for at most "
                f"{self.count} neighbours or add more nodes")
        return int(k)

    # ---------------------------------------------------------------- mutation
    def add(self, nodes: Sequence[KnowledgeNode]) -> None:
        """Add nodes (each with an embedding). All-or-nothing: on any error nothing is added."""
        nodes = list(nodes)
        for node in nodes:
            if not isinstance(node, KnowledgeNode):
                raise KnowledgeStoreError(
                    f"add() takes KnowledgeNode objects, got {type(node).__name__}")
            if node.embedding is None:
                raise InvalidEmbeddingError(
                    f"node {node.node_id!r} has no embedding; encode it (Retriever."
                    "encode_context) before adding it to the store")
        if not nodes:
            return
        embs = []
        for node in nodes:
            e = np.asarray(node.embedding)
            if e.ndim != 1:
                raise DimensionMismatchError(
                    f"embedding of node {node.node_id!r} must be 1-D, got shape {e.shape}")
            embs.append(e)
        dims = {e.shape[0] for e in embs}
        if len(dims) > 1:
            raise DimensionMismatchError(f"nodes in one add() have different dimensions {dims}")
        self.add_arrays([n.node_id for n in nodes], np.stack(embs),
                        [n.text for n in nodes], [n.metadata for n in nodes])

    def add_arrays(self, node_ids: Sequence[str], embeddings: Any,
                   texts: Sequence[str] | None = None,
                   metadata: Sequence[dict[str, Any]] | None = None) -> None:
        """Bulk add without building KnowledgeNode objects (same checks as :meth:`add`)."""
        ids = list(node_ids)
        for i in ids:
            if not isinstance(i, str) or not i:
                raise KnowledgeStoreError(f"node ids must be non-empty strings, got {i!r}")
        emb = self._check_matrix(embeddings, "embeddings")
        n = len(ids)
        if emb.shape[0] != n:
            raise KnowledgeStoreError(f"{n} node ids but {emb.shape[0]} embeddings")
        texts = [""] * n if texts is None else list(texts)
        metadata = [{} for _ in range(n)] if metadata is None else list(metadata)
        for t in texts:
            if not isinstance(t, str):
                raise KnowledgeStoreError(f"node texts must be strings, got {type(t).__name__}")
        for m in metadata:
            if not isinstance(m, dict):
                raise KnowledgeStoreError(f"node metadata must be dicts, got {type(m).__name__}")
        metadata = [dict(m) for m in metadata]
        if len(texts) != n or len(metadata) != n:
            raise KnowledgeStoreError(
                f"{n} node ids but {len(texts)} texts and {len(metadata)} metadata entries")
        if len(set(ids)) != n:
            seen: set[str] = set()
            dups = [i for i in ids if i in seen or seen.add(i)]
            raise DuplicateNodeError(
                f"node ids repeated within one add(): {_preview(dups)}; give every node a "
                "unique id")
        existing = [i for i in ids if i in self._row_of]
        if existing:
            raise DuplicateNodeError(
                f"node ids already in the store: {_preview(existing)}; delete them first to "
                "replace them")
        if n == 0:
            return
        # validated: from here on nothing can fail except memory
        if self._dim is None:
            self._dim = emb.shape[1]
            self._emb = np.zeros((0, self._dim), np.float32)
        start = self._n_rows
        self._reserve(start + n)
        self._emb[start:start + n] = emb
        self._alive[start:start + n] = True
        self._row_ids[start:start + n] = ids
        self._texts.extend(texts)
        self._metadata.extend(metadata)
        self._row_of.update(zip(ids, range(start, start + n), strict=True))
        self._n_rows = start + n
        self._on_change()

    def _reserve(self, rows: int) -> None:
        """Grow capacity geometrically so that repeated small adds stay amortized O(1)."""
        cap = self._emb.shape[0]
        if rows <= cap:
            return
        new_cap = max(rows, int(cap * 1.5), 64)
        emb = np.zeros((new_cap, self._dim), np.float32)
        emb[:self._n_rows] = self._emb[:self._n_rows]
        alive = np.zeros((new_cap,), bool)
        alive[:self._n_rows] = self._alive[:self._n_rows]
        row_ids = np.empty((new_cap,), object)
        row_ids[:self._n_rows] = self._row_ids[:self._n_rows]
        self._emb, self._alive, self._row_ids = emb, alive, row_ids

    def delete(self, ids: Sequence[str]) -> None:
        """Delete nodes by id. All-or-nothing: an unknown id raises and nothing is deleted."""
        if isinstance(ids, str):
            ids = [ids]
        ids = list(dict.fromkeys(ids))
        missing = [i for i in ids if i not in self._row_of]
        if missing:
            raise NodeNotFoundError(
                f"cannot delete unknown node ids {_preview(missing)}; nothing was deleted")
        if not ids:
            return
        rows = np.fromiter((self._row_of.pop(i) for i in ids), np.int64, len(ids))
        self._alive[rows] = False
        self._row_ids[rows] = None
        for r in rows:
            self._texts[r] = None
            self._metadata[r] = None
        self._on_change()

    def compact(self) -> None:
        """Drop dead rows now (row numbers of live nodes change; their order is kept)."""
        if self.count == self._n_rows:
            return
        keep = np.flatnonzero(self._alive[:self._n_rows])
        self._emb = np.ascontiguousarray(self._emb[keep])
        self._alive = np.ones((len(keep),), bool)
        self._row_ids = self._row_ids[keep]
        self._texts = [self._texts[r] for r in keep]
        self._metadata = [self._metadata[r] for r in keep]
        self._row_of = {i: r for r, i in enumerate(self._row_ids)}
        self._n_rows = len(keep)
        self._on_compact()

    def _maybe_compact(self) -> bool:
        if self._n_rows and self.tombstone_fraction > self.compact_threshold:
            self.compact()
            return True
        return False

    # ---------------------------------------------------------------- reading
    def get(self, ids: Sequence[str]) -> list[KnowledgeNode]:
        """Nodes by id, with a copy of their stored (normalized if cosine) embedding."""
        if isinstance(ids, str):
            ids = [ids]
        ids = list(ids)
        missing = [i for i in ids if i not in self._row_of]
        if missing:
            raise NodeNotFoundError(f"unknown node ids {_preview(missing)}")
        return [self._node(self._row_of[i]) for i in ids]

    def _node(self, row: int) -> KnowledgeNode:
        return KnowledgeNode(node_id=self._row_ids[row], text=self._texts[row],
                             embedding=self._emb[row].copy(),
                             metadata=dict(self._metadata[row]))

    def node_metadata(self, ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Copies of the nodes' metadata (all live nodes in row order when ``ids`` is None),
        without copying their embeddings as :meth:`get` does."""
        ids = self.node_ids() if ids is None else list(ids)
        missing = [i for i in ids if i not in self._row_of]
        if missing:
            raise NodeNotFoundError(f"unknown node ids {_preview(missing)}")
        return [dict(self._metadata[self._row_of[i]]) for i in ids]

    def node_ids(self) -> list[str]:
        """Live node ids in row order."""
        return list(self._row_of)

    def search(self, query_embs: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k live nodes per query: ``(scores [B, k] float32, ids [B, k] object)``.

        A 1-D query is treated as a batch of one. Scores are inner products (of normalized
        vectors for ``metric="cosine"``), best first.
        """
        if self.count == 0:
            raise EmptyStoreError("search on an empty knowledge store; add nodes first")
        q = np.asarray(query_embs) if not isinstance(query_embs, np.ndarray) else query_embs
        if q.ndim == 1:
            q = q[None, :]
        q = self._check_matrix(q, "query embeddings")
        k = self._check_k(k)
        if q.shape[0] == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), object)
        scores, rows = self._search_rows(q, k)
        return scores, self._row_ids[rows]

    def retrieve(self, query_emb: Any, top_k: int) -> list[SourceNode]:
        """FedRAG-style single-query retrieval returning :class:`SourceNode` objects."""
        q = np.asarray(query_emb)
        if q.ndim == 2 and q.shape[0] == 1:
            q = q[0]
        if q.ndim != 1:
            raise DimensionMismatchError(
                f"retrieve() takes one query embedding [D], got shape {q.shape}; use search() "
                "for batches")
        scores, ids = self.search(q[None, :], top_k)
        nodes = self.get(list(ids[0]))
        return [SourceNode(node=n, score=float(s)) for n, s in zip(nodes, scores[0], strict=True)]

    def exact_search_rows(self, q: np.ndarray, k: int, start: int = 0,
                          stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k with numpy over rows ``[start, stop)`` (q already validated).

        Dead rows score -inf; when the range holds fewer than k rows the result is narrower.
        """
        stop = self._n_rows if stop is None else stop
        n = stop - start
        kk = min(k, n)
        out_s = np.empty((q.shape[0], kk), np.float32)
        out_r = np.empty((q.shape[0], kk), np.int64)
        dead = ~self._alive[start:stop]
        emb_t = self._emb[start:stop].T
        for c in range(0, q.shape[0], 64):  # bound the [chunk, n] score matrix
            s = q[c:c + 64] @ emb_t
            s[:, dead] = -np.inf
            if kk < n:
                part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
            else:
                part = np.broadcast_to(np.arange(n), s.shape)
            ps = np.take_along_axis(s, part, axis=1)
            order = np.argsort(-ps, axis=1, kind="stable")
            out_s[c:c + 64] = np.take_along_axis(ps, order, axis=1)
            out_r[c:c + 64] = np.take_along_axis(part, order, axis=1) + start
        return out_s, out_r

    def subset(self, ids: Sequence[str]) -> KnowledgeStore:
        """A new store of the same type and settings holding only the nodes ``ids`` (in that
        order), with its own index, built at its first search.

        The nodes' rows are copied once (no re-normalization: they are stored normalized),
        so the subsets of a partition of the ids hold one copy of the matrix between them.
        """
        ids = list(ids)
        missing = [i for i in ids if i not in self._row_of]
        if missing:
            raise NodeNotFoundError(f"cannot take a subset with unknown node ids "
                                    f"{_preview(missing)}")
        if len(set(ids)) != len(ids):
            raise DuplicateNodeError("a subset names some node ids twice")
        if not ids:
            raise EmptyStoreError("a subset needs at least one node id")
        rows = np.fromiter((self._row_of[i] for i in ids), np.int64, len(ids))
        kwargs = {**self._store_config(), **self._subset_options()}
        sub = type(self)(dimension=self._dim, metric=self._metric,
                         embedding_model=self.embedding_model,
                         embedding_model_hash=self.embedding_model_hash, **kwargs)
        sub._load_rows(ids, self._emb[rows], [self._texts[r] for r in rows],
                       [dict(self._metadata[r]) for r in rows])
        return sub

    def _subset_options(self) -> dict[str, Any]:
        """Constructor options a subset shares that the manifest does not record (e.g. the
        exact store's mesh)."""
        return {}

    # ---------------------------------------------------------------- backend hooks
    @abc.abstractmethod
    def _search_rows(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over live rows: (scores [B, k] float32, row numbers [B, k] int)."""

    def _on_change(self) -> None:  # noqa: B027 (optional hook)
        """Called after rows were added or marked dead."""

    def _on_compact(self) -> None:  # noqa: B027 (optional hook)
        """Called after dead rows were dropped and rows renumbered."""

    # ---------------------------------------------------------------- persistence
    def _export(self) -> dict[str, Any]:
        """Live nodes in row order, for persistence."""
        rows = np.flatnonzero(self._alive[:self._n_rows])
        return {
            "node_ids": [self._row_ids[r] for r in rows],
            "texts": [self._texts[r] for r in rows],
            "metadata": [self._metadata[r] for r in rows],
            "embeddings": self._emb[rows] if len(rows) != self._n_rows
            else self._emb[:self._n_rows],
        }

    def _store_config(self) -> dict[str, Any]:
        """Backend settings recorded in the manifest (JSON-serializable)."""
        return {"compact_threshold": self.compact_threshold}

    def _artifact_info(self) -> dict[str, Any]:
        """Manifest entry describing backend artifacts (empty: none)."""
        return {}

    def _write_artifacts(self, directory: Path) -> None:  # noqa: B027 (optional hook)
        """Write backend artifacts (e.g. a serialized index) into ``directory``."""

    def _restore_artifacts(self, directory: Path, manifest: dict[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Restore backend artifacts after the nodes were loaded."""

    def persist(self, path: str | Path) -> Path:
        """Write the store to directory ``path`` (local or gs://) atomically, replacing an
        older store there; a folder that holds anything else is refused (OutputExistsError)."""
        from .persistence import write_store

        return write_store(self, path)

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> KnowledgeStore:
        """Load a store written by :meth:`persist`; verifies checksums, shapes and version.

        Raises :class:`~fedrag_jax.errors.CorruptStoreError` naming the problem.
        ``kwargs`` go to the constructor (e.g. ``mesh=`` for the exact store).
        """
        from ..paths import local_copy
        from .persistence import read_store

        path = local_copy(path, "knowledge store")  # local, or gs:// fetched once
        data = read_store(path)
        m = data.manifest
        kwargs = {**m.get("store_config", {}), **kwargs}
        kwargs = {k: v for k, v in kwargs.items() if k in cls._config_keys()}
        store = cls(dimension=m["dimension"], metric=m["metric"],
                    embedding_model=m.get("embedding_model"),
                    embedding_model_hash=m.get("embedding_model_hash"), **kwargs)
        store._load_rows(data.node_ids, data.embeddings, data.texts, data.metadata)
        store._restore_artifacts(Path(path), m)
        return store

    @classmethod
    def _config_keys(cls) -> set[str]:
        import inspect

        return set(inspect.signature(cls.__init__).parameters) - {"self"}

    def _load_rows(self, ids: list[str], emb: np.ndarray, texts: list[str],
                   metadata: list[dict[str, Any]]) -> None:
        """Install verified rows directly (no re-normalization: they were stored normalized)."""
        n = len(ids)
        self._emb = np.ascontiguousarray(emb, dtype=np.float32)
        self._alive = np.ones((n,), bool)
        self._row_ids = np.empty((n,), object)
        self._row_ids[:] = ids
        self._texts = list(texts)
        self._metadata = list(metadata)
        self._row_of = {i: r for r, i in enumerate(ids)}
        self._n_rows = n
        self._on_change()
