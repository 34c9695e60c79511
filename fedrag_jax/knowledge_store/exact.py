"""Exact (brute-force) knowledge store in JAX: the ScaNN fallback and the recall reference.

The embedding matrix lives on the mesh with its rows sharded over every mesh axis. One
jit-compiled ``shard_map`` scores ``queries @ E_local^T`` on each device, keeps a local top-k,
all-gathers the ``n_devices * k`` candidates and takes the global top-k: the [B, N] score
matrix is never gathered. Padding rows and deleted rows carry a ``-inf`` bias.

Shapes are bucketed so that search does not recompile per call: query batches pad to powers
of 4 (1, 4, 16, 64, 256), k to a power of two, and the row count to a value with three
significant bits (at most 12.5 % padding), so growing the store recompiles rarely.
"""

from __future__ import annotations

import functools
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..errors import KnowledgeStoreError
from ..sharding import make_mesh
from .base import KnowledgeStore, Metric


def _round_rows(x: int) -> int:
    """Smallest value >= x with at most 3 significant bits (>= 8): <= 12.5 % padding."""
    if x <= 8:
        return 8
    e = x.bit_length() - 4
    return -(-x >> e) << e


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _query_bucket(b: int, max_chunk: int) -> int:
    bucket = 1
    while bucket < b:
        bucket *= 4
    return min(bucket, max_chunk)


@functools.lru_cache(maxsize=16)
def _build_search_fn(mesh: Mesh) -> Any:
    """jit(shard_map) computing the global top-k over row-sharded embeddings.

    Cached per mesh so that stores on the same mesh share compiled executables.
    """
    axes = tuple(mesh.axis_names)

    def local_topk(q: jax.Array, emb: jax.Array, bias: jax.Array, *, k: int):
        rows = emb.shape[0]
        # HIGHEST: this store is the recall reference, keep full f32 even on TPU/GPU.
        # einsum, not q @ emb.T: XLA:CPU materializes emb.T (a full copy) for the latter
        scores = jnp.einsum("bd,nd->bn", q, emb, precision=jax.lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32) + bias[None, :]
        kk = min(k, rows)
        vals, idx = jax.lax.top_k(scores, kk)
        idx = idx + jax.lax.axis_index(axes) * rows
        vals = jax.lax.all_gather(vals, axes, axis=1, tiled=True)
        idx = jax.lax.all_gather(idx, axes, axis=1, tiled=True)
        top_vals, j = jax.lax.top_k(vals, k)
        return top_vals, jnp.take_along_axis(idx, j, axis=1)

    def search(q: jax.Array, emb: jax.Array, bias: jax.Array, k: int):
        fn = jax.shard_map(partial(local_topk, k=k), mesh=mesh,
                           in_specs=(P(), P(axes, None), P(axes)), out_specs=(P(), P()),
                           check_vma=False)  # the all-gathered outputs are replicated
        return fn(q, emb, bias)

    return jax.jit(search, static_argnames=("k",))


class ExactKnowledgeStore(KnowledgeStore):
    """Brute-force inner-product search on a device mesh.

    Args:
        dimension: embedding size (inferred from the first add when ``None``).
        metric: ``"dot"`` or ``"cosine"``.
        mesh: mesh to shard rows over (all axes); default: every device, 1-D layout.
        query_chunk: largest query batch scored at once.
        score_budget: bound on the per-device [queries, rows] score block (elements); the
            query chunk shrinks so that ``chunk * rows_per_device <= score_budget``.
    """

    store_type = "exact"

    def __init__(self, dimension: int | None = None, metric: Metric = "dot", *,
                 mesh: Mesh | None = None, query_chunk: int = 256, score_budget: int = 1 << 26,
                 compact_threshold: float = 0.25, embedding_model: str | None = None,
                 embedding_model_hash: str | None = None) -> None:
        super().__init__(dimension, metric, compact_threshold=compact_threshold,
                         embedding_model=embedding_model,
                         embedding_model_hash=embedding_model_hash)
        if query_chunk < 1 or score_budget < 1:
            raise KnowledgeStoreError("query_chunk and score_budget must be positive")
        self.mesh = mesh if mesh is not None else make_mesh(None)
        self.query_chunk = int(query_chunk)
        self.score_budget = int(score_budget)
        axes = tuple(self.mesh.axis_names)
        self._n_shards = int(self.mesh.size)
        self._row_sharding = NamedSharding(self.mesh, P(axes, None))
        self._bias_sharding = NamedSharding(self.mesh, P(axes))
        self._replicated = NamedSharding(self.mesh, P())
        self._search_fn = _build_search_fn(self.mesh)
        self._dev_emb: jax.Array | None = None
        self._dev_bias: jax.Array | None = None
        self._dev_rows = 0  # padded rows on the devices
        self._dev_n_rows = -1  # host rows that the device copy reflects
        self._matrix_stale = True
        self._mask_stale = True

    def _store_config(self) -> dict[str, Any]:
        return {**super()._store_config(), "query_chunk": self.query_chunk,
                "score_budget": self.score_budget}

    def _subset_options(self) -> dict[str, Any]:
        return {"mesh": self.mesh}

    # ------------------------------------------------------------ device copy
    def _on_change(self) -> None:
        if self._n_rows != self._dev_n_rows:
            self._matrix_stale = True
        self._mask_stale = True

    def _on_compact(self) -> None:
        self._matrix_stale = True
        self._mask_stale = True

    def _padded_rows(self) -> int:
        per_device = -(-self._n_rows // self._n_shards)
        return _round_rows(per_device) * self._n_shards

    def _sync(self) -> None:
        """Bring the device copy up to date (compacting first if many rows are dead)."""
        self._maybe_compact()
        if self._matrix_stale:
            rows = self._padded_rows()
            host = np.zeros((rows, self._dim), np.float32)
            host[:self._n_rows] = self._emb[:self._n_rows]
            self._dev_emb = None  # free the old copy before placing the new one
            self._dev_emb = jax.device_put(host, self._row_sharding)
            self._dev_rows = rows
            self._dev_n_rows = self._n_rows
            self._matrix_stale = False
            self._mask_stale = True
        if self._mask_stale:
            bias = np.full((self._dev_rows,), -np.inf, np.float32)
            bias[:self._n_rows][self._alive[:self._n_rows]] = 0.0
            self._dev_bias = jax.device_put(bias, self._bias_sharding)
            self._mask_stale = False

    # ------------------------------------------------------------ search
    def _max_chunk(self) -> int:
        per_device = self._dev_rows // self._n_shards
        chunk = max(1, min(self.query_chunk, self.score_budget // max(per_device, 1)))
        return 1 << (chunk.bit_length() - 1)  # power of two, so buckets stay few

    def _search_rows(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self._sync()
        k_pad = min(max(_next_pow2(k), 8), self._dev_rows)
        max_chunk = self._max_chunk()
        pending = []
        for c in range(0, q.shape[0], max_chunk):
            qc = q[c:c + max_chunk]
            b = qc.shape[0]
            bucket = _query_bucket(b, max_chunk)
            if bucket != b:
                qc = np.concatenate([qc, np.zeros((bucket - b, qc.shape[1]), np.float32)])
            qd = jax.device_put(qc, self._replicated)
            pending.append((b, self._search_fn(qd, self._dev_emb, self._dev_bias, k=k_pad)))
        # dispatch is async: every chunk is queued before the first result is awaited
        scores = np.concatenate([np.asarray(v)[:b, :k] for b, (v, _) in pending])
        rows = np.concatenate([np.asarray(i)[:b, :k] for b, (_, i) in pending])
        return scores.astype(np.float32, copy=False), rows.astype(np.int64, copy=False)

    def compiled_shapes(self) -> int:
        """Number of compiled search variants (for no-recompile checks)."""
        return self._search_fn._cache_size()
