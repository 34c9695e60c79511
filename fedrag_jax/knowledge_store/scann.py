"""Approximate knowledge store on ScaNN (maximum inner product search).

The index configuration follows ScaNN's guidance on corpus size (every knob can be
overridden through :class:`ScannConfig`):

* below ``brute_force_below`` (20k) rows: brute force;
* below ``tree_from`` (100k): asymmetric hashing (AH, 2 dims per block, anisotropic
  threshold 0.2) + exact reordering;
* above: a k-means tree (``sqrt(n)`` leaves, training sample capped) + AH + reordering, with
  ``num_leaves_to_search`` tuned at build time on held-out database rows until recall@10
  reaches ``target_recall + tune_margin``.

ScaNN only ever sees row numbers (it would pickle string docids). Changes never make the
index wrong, only stale:

* deleted rows are filtered from ScaNN's answers (the search over-fetches by the number of
  dead rows, up to a cap; a query still short of k live hits is answered exactly);
* rows added since the last build are scored exactly with numpy and merged;
* the index is rebuilt lazily, at the next search, when the dead fraction passes
  ``compact_threshold`` or the added rows pass ``rebuild_pending_fraction`` of the index.

``scann`` is imported lazily; where it has no wheel, :class:`ScannUnavailableError` says to
use :class:`~fedrag_jax.knowledge_store.ExactKnowledgeStore`.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptStoreError, EmptyStoreError, KnowledgeStoreError
from .base import KnowledgeStore, Metric

SCANN_DIR = "scann"
_MODES = ("auto", "brute_force", "ah", "tree")


class ScannUnavailableError(KnowledgeStoreError, ImportError):
    """The ``scann`` package cannot be imported on this platform."""


_scann_ops: Any = None


def import_scann() -> Any:
    """Import ``scann.scann_ops_pybind`` on first use (it is heavy and x86-64 Linux only)."""
    global _scann_ops
    if _scann_ops is None:
        try:
            from scann.scann_ops.py import scann_ops_pybind
        except ImportError as e:  # no wheel for this platform / Python, or no AVX2
            raise ScannUnavailableError(
                f"ScaNN cannot be imported ({e}). ScaNN wheels exist for x86-64 Linux, "
                "CPython 3.11-3.13 with AVX2 only: `pip install scann`, or use "
                "fedrag_jax.knowledge_store.ExactKnowledgeStore (or default_store(), which "
                "falls back to it)") from e
        _scann_ops = scann_ops_pybind
    return _scann_ops


def scann_available() -> bool:
    try:
        import_scann()
    except ScannUnavailableError:
        return False
    return True


@dataclass
class ScannConfig:
    """ScaNN index settings; ``None`` means "choose from the corpus size"."""

    mode: str = "auto"  # auto | brute_force | ah | tree
    brute_force_below: int = 20_000
    tree_from: int = 100_000
    num_leaves: int | None = None  # default: round(sqrt(n))
    num_leaves_to_search: int | None = None  # default: tuned to target_recall
    training_sample_size: int = 100_000  # cap on rows used to train the tree
    ah_training_sample_size: int = 25_000  # cap on rows used to train the AH codebooks
    spherical: bool | None = None  # spherical k-means; default: when rows are unit-norm
    dims_per_block: int = 2
    anisotropic_quantization_threshold: float = 0.2
    reorder_num_neighbors: int = 100
    target_recall: float = 0.95
    tune_margin: float = 0.03  # calibration queries are database rows: aim higher
    tune_queries: int = 256
    tune_k: int = 10
    rebuild_pending_fraction: float = 0.1
    training_threads: int = 0  # 0: ScaNN's default (all cores)
    search_threads: int = 0  # 0: ScaNN's default
    max_overfetch: int = 256  # extra neighbours fetched to make up for deleted rows

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise KnowledgeStoreError(f"ScannConfig.mode must be one of {_MODES}, "
                                      f"got {self.mode!r}")
        if not 0 < self.target_recall <= 1:
            raise KnowledgeStoreError("ScannConfig.target_recall must be in (0, 1]")
        if self.dims_per_block < 1 or self.reorder_num_neighbors < 1:
            raise KnowledgeStoreError("dims_per_block and reorder_num_neighbors must be >= 1")

    def choose_mode(self, n: int) -> str:
        if self.mode != "auto":
            return self.mode
        if n < self.brute_force_below:
            return "brute_force"
        return "ah" if n < self.tree_from else "tree"


class ScannKnowledgeStore(KnowledgeStore):
    """Knowledge store searched with ScaNN (see the module docstring for the policy)."""

    store_type = "scann"

    def __init__(self, dimension: int | None = None, metric: Metric = "dot", *,
                 scann_config: ScannConfig | dict[str, Any] | None = None,
                 compact_threshold: float = 0.25, embedding_model: str | None = None,
                 embedding_model_hash: str | None = None, show_progress: bool = False) -> None:
        import_scann()  # fail at construction, not at the first search
        super().__init__(dimension, metric, compact_threshold=compact_threshold,
                         embedding_model=embedding_model,
                         embedding_model_hash=embedding_model_hash)
        if isinstance(scann_config, dict):
            scann_config = ScannConfig(**scann_config)
        self.config = scann_config or ScannConfig()
        self.show_progress = show_progress
        self._searcher: Any = None
        self._n_indexed = 0  # rows [0, _n_indexed) are in the ScaNN index
        self._dead_indexed = 0
        self._stats_stale = False
        self.index_info: dict[str, Any] = {}

    def _store_config(self) -> dict[str, Any]:
        return {**super()._store_config(), "scann_config": asdict(self.config)}

    def _subset_options(self) -> dict[str, Any]:
        return {"show_progress": self.show_progress}

    # ------------------------------------------------------------ change tracking
    def _on_change(self) -> None:
        self._stats_stale = True

    def _on_compact(self) -> None:
        self._searcher = None  # row numbers changed: the index must be rebuilt
        self._n_indexed = 0
        self._stats_stale = True

    def _refresh_stats(self) -> None:
        if self._stats_stale:
            n = self._n_indexed
            self._dead_indexed = int(n - np.count_nonzero(self._alive[:n]))
            self._stats_stale = False

    def needs_rebuild(self) -> bool:
        if self._searcher is None or self.tombstone_fraction > self.compact_threshold:
            return True
        pending = self._n_rows - self._n_indexed
        return pending > self.config.rebuild_pending_fraction * self._n_indexed

    def _ensure_index(self, clean: bool = False) -> None:
        """Rebuild if the policy says so (``clean``: also for any dead or pending row)."""
        if self.count == 0:
            return
        if clean:
            self._refresh_stats()
            stale = self._dead_indexed or self._n_rows != self._n_indexed
            if self._searcher is not None and not stale:
                return
        elif not self.needs_rebuild():
            return
        self.rebuild()

    # ------------------------------------------------------------ building
    def rebuild(self) -> None:
        """Compact and (re)build the ScaNN index over every live row now."""
        self.compact()
        self._searcher = None
        n = self._n_rows
        if n == 0:
            return
        cfg = self.config
        sp = import_scann()
        db = self._emb[:n]
        mode = cfg.choose_mode(n)
        if mode in ("ah", "tree") and n < 2 * 16:  # AH needs >= 16 points per codebook
            mode = "brute_force"
        t0 = time.perf_counter()
        k0 = max(1, min(cfg.tune_k, n))
        builder = sp.builder(db, k0, "dot_product")
        builder.set_n_training_threads(cfg.training_threads)
        num_leaves = 0
        spherical = False
        if mode == "tree":
            num_leaves = cfg.num_leaves or max(2, round(math.sqrt(n)))
            num_leaves = min(num_leaves, max(2, n // 8))  # leaves need some points each
            spherical = cfg.spherical if cfg.spherical is not None else self._unit_norm()
            # plain k-means centroids of unit vectors have unequal norms, which biases
            # inner-product leaf selection; spherical centroids do not (recall 0.97 -> 0.999
            # at 5 % of leaves on clustered unit vectors)
            builder = builder.tree(num_leaves=num_leaves,
                                   num_leaves_to_search=max(1, num_leaves // 10),
                                   training_sample_size=min(n, cfg.training_sample_size),
                                   spherical=spherical)
        if mode == "brute_force":
            builder = builder.score_brute_force()
        else:
            builder = builder.score_ah(
                cfg.dims_per_block,
                anisotropic_quantization_threshold=cfg.anisotropic_quantization_threshold,
                training_sample_size=min(n, cfg.ah_training_sample_size),
            ).reorder(cfg.reorder_num_neighbors)
        searcher = self._build_with_progress(builder, mode, n)
        if cfg.search_threads:
            searcher.set_num_threads(cfg.search_threads)
        self._searcher = searcher
        self._n_indexed = n
        self._dead_indexed = 0
        self._stats_stale = False
        leaves = 0
        if mode == "tree":
            leaves = cfg.num_leaves_to_search or self._tune_leaves(num_leaves)
        self.index_info = {"mode": mode, "rows": n, "num_leaves": num_leaves,
                           "spherical": bool(spherical),
                           "leaves_to_search": int(leaves),
                           "build_seconds": round(time.perf_counter() - t0, 3)}

    def _unit_norm(self) -> bool:
        if self._metric == "cosine":
            return True
        rows = self._emb[:self._n_rows:max(1, self._n_rows // 10_000)]
        return bool(np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-3))

    def _build_with_progress(self, builder: Any, mode: str, n: int) -> Any:
        if not self.show_progress:
            return builder.build()
        from ..progress import progress_bar

        # ScaNN's build is one opaque C++ call: show that it runs and how long it took
        with progress_bar(total=1, desc=f"ScaNN {mode} build ({n:,} rows)", unit="index") as bar:
            searcher = builder.build()
            bar.update(1)
        return searcher

    def _tune_leaves(self, num_leaves: int) -> int:
        """Smallest leaves_to_search reaching target_recall + tune_margin on held-out rows.

        Calibration queries are database rows with themselves excluded from both answers.
        Real queries sit a little further from the data (MiniLM title queries on wiki
        passages: ~0.02-0.03 lower recall at the same setting), hence the margin; call
        :meth:`tune` with real queries to calibrate on them instead.
        """
        cfg = self.config
        n = self._n_indexed
        rng = np.random.default_rng(0)
        sel = np.sort(rng.choice(n, size=min(cfg.tune_queries, n), replace=False))
        goal = min(1.0, cfg.target_recall + cfg.tune_margin)
        return self._pick_leaves(self._emb[sel], max(1, min(cfg.tune_k, n - 1)), goal,
                                 num_leaves, exclude=sel)

    def tune(self, queries: Any, k: int | None = None,
             target_recall: float | None = None) -> int:
        """Re-choose ``leaves_to_search`` on sample queries against exact search.

        Only tree indexes have the knob; returns the chosen value (0 when not a tree).
        """
        if self.count == 0:
            raise EmptyStoreError("tune() needs a non-empty store; add nodes first")
        q = self._check_matrix(np.atleast_2d(np.asarray(queries)), "tuning queries")
        self._ensure_index(clean=True)
        if self.index_info.get("mode") != "tree":
            return 0
        k = min(k or self.config.tune_k, self.count)
        goal = self.config.target_recall if target_recall is None else target_recall
        leaves = self._pick_leaves(q, k, goal, self.index_info["num_leaves"])
        self.index_info["leaves_to_search"] = leaves
        return leaves

    def _pick_leaves(self, q: np.ndarray, k: int, goal: float, num_leaves: int,
                     exclude: np.ndarray | None = None) -> int:
        n = self._n_indexed
        extra = 0 if exclude is None else 1  # one more, then drop the query's own row
        _, exact = self.exact_search_rows(q, k + extra, 0, n)
        own = exclude if exclude is not None else np.full(len(q), -1)
        truth = [set(_drop_self(r, s, k)) for r, s in zip(exact, own, strict=True)]
        fractions = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7,
                     0.8, 1.0)
        candidates = sorted({max(1, min(num_leaves, round(num_leaves * f))) for f in fractions})
        for leaves in candidates:
            idx, _ = self._searcher.search_batched(
                q, k + extra, max(self.config.reorder_num_neighbors, k + extra), leaves)
            got = [_drop_self(r, s, k) for r, s in zip(idx.astype(np.int64), own, strict=True)]
            recall = np.mean([len(t.intersection(g)) / k for t, g in zip(truth, got,
                                                                        strict=True)])
            if recall >= goal:
                return leaves
        return num_leaves

    # ------------------------------------------------------------ search
    def _leaves_for(self, k: int) -> int:
        leaves = self.index_info.get("leaves_to_search", 0)
        if not leaves:
            return -1
        scale = math.sqrt(max(1.0, k / self.config.tune_k))  # more neighbours, more leaves
        return min(self.index_info["num_leaves"], math.ceil(leaves * scale))

    def _scann_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        pre = max(self.config.reorder_num_neighbors, k)
        leaves = self._leaves_for(k)
        if q.shape[0] == 1:
            idx, dist = self._searcher.search(q[0], k, pre, leaves)
            return dist[None, :], idx[None, :]
        idx, dist = self._searcher.search_batched_parallel(q, k, pre, leaves)
        return dist, idx

    def _search_rows(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self._ensure_index()
        self._refresh_stats()
        n_idx = self._n_indexed
        live_indexed = n_idx - self._dead_indexed
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        if live_indexed > 0:
            k_fetch = min(n_idx, k + min(self._dead_indexed, max(self.config.max_overfetch, k)))
            dist, idx = self._scann_search(q, k_fetch)
            idx = idx.astype(np.int64, copy=False)
            if self._dead_indexed == 0 and self._n_rows == n_idx and not np.isnan(
                    dist[:, :k]).any():
                return dist[:, :k].astype(np.float32, copy=False), idx[:, :k]  # fast path
            parts.append(self._filter_dead(q, dist, idx, min(k, live_indexed)))
        if self._n_rows > n_idx:  # rows added since the last build: score them exactly
            parts.append(self.exact_search_rows(q, k, n_idx, self._n_rows))
        scores = np.concatenate([p[0] for p in parts], axis=1)
        rows = np.concatenate([p[1] for p in parts], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return (np.take_along_axis(scores, order, axis=1).astype(np.float32),
                np.take_along_axis(rows, order, axis=1))

    def _filter_dead(self, q: np.ndarray, dist: np.ndarray, idx: np.ndarray,
                     k: int) -> tuple[np.ndarray, np.ndarray]:
        """First k live hits per query; queries short of k are answered exactly."""
        valid = ~np.isnan(dist) & self._alive[idx]
        order = np.argsort(~valid, axis=1, kind="stable")[:, :k]  # live hits first, in order
        scores = np.take_along_axis(dist, order, axis=1).astype(np.float32)
        rows = np.take_along_axis(idx, order, axis=1)
        short = np.flatnonzero(valid.sum(axis=1) < k)
        if short.size:
            s, r = self.exact_search_rows(q[short], k, 0, self._n_indexed)
            scores[short], rows[short] = s, r
        return scores, rows

    # ------------------------------------------------------------ persistence
    def persist(self, path: str | Path) -> Path:
        """Rebuild if anything changed since the last build, then write nodes + index."""
        self._ensure_index(clean=True)
        return super().persist(path)

    def _artifact_info(self) -> dict[str, Any]:
        if self._searcher is None:
            return {}
        return {"scann": {"dir": SCANN_DIR, **self.index_info}}

    def _write_artifacts(self, directory: Path) -> None:
        if self._searcher is None:
            return
        out = directory / SCANN_DIR
        out.mkdir()
        # relative paths: the directory is renamed into place after writing
        self._searcher.serialize(str(out), relative_path=True)

    def _restore_artifacts(self, directory: Path, manifest: dict[str, Any]) -> None:
        """Load ScaNN's serialized searcher; without one, rebuild lazily at the first search.

        ``scann.scann_ops_pybind.load_searcher`` is deliberately not used: it unpickles a
        ``scann_docids.pkl`` when one is present. We read the (checksummed) asset list and
        hand the directory to ScaNN's C++ loader, which reads protobufs and .npy files only.
        """
        info = manifest.get("artifacts", {}).get("scann")
        if not info or self.count == 0:
            return
        sdir = directory / SCANN_DIR
        assets = sdir / "scann_assets.pbtxt"
        if "scann/scann_assets.pbtxt" not in manifest["files"] or not assets.is_file():
            raise CorruptStoreError(f"knowledge store at {directory} lists a ScaNN index but "
                                    "its scann_assets.pbtxt is missing; rebuild the store")
        listed = {f for f in manifest["files"] if f.startswith(f"{SCANN_DIR}/")}
        asset_text = assets.read_text()
        for asset in re.findall(r'asset_path:\s*"([^"]*)"', asset_text):
            # ScaNN opens these itself: only checksummed files inside the store directory
            if f"{SCANN_DIR}/{asset}" not in listed or asset.startswith("/") or ".." in asset:
                raise CorruptStoreError(f"ScaNN index in {sdir} refers to {asset!r}, which is "
                                        "not a checksummed file of the store; rebuild the store")
        sp = import_scann()
        try:
            pybind = sp.scann_pybind.ScannNumpy(str(sdir), asset_text)
            searcher = sp.ScannSearcher(pybind)
        except Exception as e:  # ScaNN raises plain RuntimeError/ValueError on bad assets
            raise CorruptStoreError(f"ScaNN index in {sdir} cannot be loaded ({e}); rebuild "
                                    "the store") from e
        if searcher.size() != self._n_rows:
            raise CorruptStoreError(f"ScaNN index in {sdir} holds {searcher.size()} rows but "
                                    f"the store has {self._n_rows}; rebuild the store")
        if self.config.search_threads:
            searcher.set_num_threads(self.config.search_threads)
        self._searcher = searcher
        self._n_indexed = self._n_rows
        self._dead_indexed = 0
        self._stats_stale = False
        self.index_info = {k: v for k, v in info.items() if k != "dir"}


def _drop_self(row: np.ndarray, self_row: int, k: int) -> list[int]:
    return [int(r) for r in row if r != self_row][:k]
