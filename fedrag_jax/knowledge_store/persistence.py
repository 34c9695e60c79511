"""On-disk format shared by every knowledge store.

One directory::

    manifest.json     format_version, store_type, dimension, metric, count, embedding model
                      name/hash, store_config, and {relative path: {sha256, bytes}} per file
    nodes.parquet     node_id, text, metadata (JSON string), in row order
    embeddings.npy    float32 [count, dimension] (normalized for metric="cosine")
    <artifacts>/      backend files, e.g. scann/ (ScaNN's own serialized searcher)

Writes go to a hidden sibling directory first and are swapped in with renames, so a reader
never sees half a store and a failed write leaves the old store as it was
(``fedrag_jax.atomic``; on gs://, a new version and a marker switch). Only an earlier store
is replaced: a folder holding anything its manifest does not list is refused. Loading verifies
the version, every checksum, and the shapes and row counts, and raises
:class:`~fedrag_jax.errors.CorruptStoreError` naming the problem; it never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CorruptStoreError, KnowledgeStoreError

if TYPE_CHECKING:
    from .base import KnowledgeStore

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
NODES = "nodes.parquet"
EMBEDDINGS = "embeddings.npy"
KIND = "knowledge-store"  # the output marker's kind (fedrag_jax.atomic)


@dataclass
class StoreData:
    """A verified store directory, read into memory."""

    manifest: dict[str, Any]
    node_ids: list[str]
    texts: list[str]
    metadata: list[dict[str, Any]]
    embeddings: np.ndarray


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _write_nodes(path: Path, ids: list[str], texts: list[str],
                 metadata: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta_json = []
    for node_id, m in zip(ids, metadata, strict=True):
        try:
            meta_json.append(json.dumps(m, ensure_ascii=False, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise KnowledgeStoreError(
                f"metadata of node {node_id!r} is not JSON-serializable ({e}); store only "
                "strings, numbers, bools, lists and dicts in KnowledgeNode.metadata") from e
    table = pa.table({
        "node_id": pa.array(ids, pa.string()),
        "text": pa.array(texts, pa.string()),
        "metadata": pa.array(meta_json, pa.string()),
    })
    pq.write_table(table, path)


def _legacy_files(path: Path) -> set[str] | None:
    """The files of a store written before output markers existed: its manifest's list."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return {*manifest["files"], MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_store(store: KnowledgeStore, path: str | os.PathLike) -> str | Path:
    """Persist ``store`` to the folder ``path`` (local or gs://), atomically replacing an
    older store there (outputs.staged_directory). A folder that holds anything else is
    refused with OutputExistsError before anything is written."""
    from ..outputs import is_remote, staged_directory

    if store.dimension is None:
        raise KnowledgeStoreError("cannot persist a store that has never held an embedding "
                                  "(its dimension is unknown); add nodes first")
    remote = is_remote(path)
    path = os.fspath(path) if remote else Path(path).absolute()
    with staged_directory(path, kind=KIND, legacy_files=_legacy_files) as tmp:
        data = store._export()
        _write_nodes(tmp / NODES, data["node_ids"], data["texts"], data["metadata"])
        np.save(tmp / EMBEDDINGS, np.ascontiguousarray(data["embeddings"], np.float32),
                allow_pickle=False)
        store._write_artifacts(tmp)
        files = {}
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = file.relative_to(tmp).as_posix()
            files[rel] = {"sha256": sha256_file(file), "bytes": file.stat().st_size}
        manifest = {
            "format_version": FORMAT_VERSION,
            "store_type": store.store_type,
            "dimension": int(store.dimension),
            "metric": store.metric,
            "count": len(data["node_ids"]),
            "embedding_model": store.embedding_model,
            "embedding_model_hash": store.embedding_model_hash,
            "store_config": store._store_config(),
            "artifacts": store._artifact_info(),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return path


# ------------------------------------------------------------------------------- reading
def _corrupt(path: Path, problem: str) -> CorruptStoreError:
    return CorruptStoreError(
        f"knowledge store at {path} is damaged: {problem}; restore it from a backup or "
        "rebuild it from the corpus")


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse and sanity-check ``manifest.json`` (no checksums)."""
    if not path.is_dir():
        raise CorruptStoreError(f"no knowledge store at {path}: not a directory")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise _corrupt(path, f"{MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise _corrupt(path, f"{MANIFEST} is not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise _corrupt(path, f"{MANIFEST} is not a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise _corrupt(path, f"format_version is {version!r} but this fedrag-jax reads "
                             f"version {FORMAT_VERSION}")
    checks = {"store_type": str, "dimension": int, "metric": str, "count": int, "files": dict}
    for key, typ in checks.items():
        if not isinstance(manifest.get(key), typ) or isinstance(manifest.get(key), bool):
            raise _corrupt(path, f"manifest field {key!r} is missing or not a {typ.__name__}")
    if manifest["metric"] not in ("dot", "cosine"):
        raise _corrupt(path, f"unknown metric {manifest['metric']!r}")
    if manifest["dimension"] < 1 or manifest["count"] < 0:
        raise _corrupt(path, "dimension or count out of range")
    for key in ("store_config", "artifacts"):
        if not isinstance(manifest.get(key, {}), dict):
            raise _corrupt(path, f"{key} is not an object")
    for name in (NODES, EMBEDDINGS):
        if name not in manifest["files"]:
            raise _corrupt(path, f"manifest lists no {name}")
    return manifest


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists exists, inside the directory, with its size and sha256."""
    root = path.resolve()
    for rel, info in manifest["files"].items():
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
            raise _corrupt(path, f"manifest entry for {rel!r} has no sha256")
        file = (path / rel).resolve()
        if root not in file.parents:
            raise _corrupt(path, f"manifest lists {rel!r}, which lies outside the store")
        if not file.is_file():
            raise _corrupt(path, f"file {rel} is missing")
        size = file.stat().st_size
        if size != info.get("bytes"):
            raise _corrupt(path, f"file {rel} has {size} bytes, the manifest says "
                                 f"{info.get('bytes')} (truncated or edited)")
        if sha256_file(file) != info["sha256"]:
            raise _corrupt(path, f"file {rel} fails its sha256 checksum (edited or damaged)")


def read_store(path: Path) -> StoreData:
    """Read and verify a store directory. Raises CorruptStoreError naming the problem."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    count, dim = manifest["count"], manifest["dimension"]
    try:
        table = pq.read_table(path / NODES)
    except (OSError, pa.ArrowException) as e:
        raise _corrupt(path, f"{NODES} cannot be read ({e})") from e
    expected = {"node_id": pa.string(), "text": pa.string(), "metadata": pa.string()}
    actual = {f.name: f.type for f in table.schema}
    if actual != expected:
        raise _corrupt(path, f"{NODES} has columns {actual}, expected {expected}")
    if table.num_rows != count:
        raise _corrupt(path, f"{NODES} has {table.num_rows} rows, the manifest says {count}")
    ids = table.column("node_id").to_pylist()
    texts = table.column("text").to_pylist()
    raw_meta = table.column("metadata").to_pylist()
    if any(i is None or i == "" for i in ids) or len(set(ids)) != count:
        raise _corrupt(path, f"{NODES} has empty or repeated node ids")
    if any(t is None for t in texts) or any(m is None for m in raw_meta):
        raise _corrupt(path, f"{NODES} has null text or metadata")
    try:
        metadata = [json.loads(m) for m in raw_meta]
    except ValueError as e:
        raise _corrupt(path, f"{NODES} holds metadata that is not JSON ({e})") from e
    if not all(isinstance(m, dict) for m in metadata):
        raise _corrupt(path, f"{NODES} holds metadata that is not a JSON object")
    try:
        emb = np.load(path / EMBEDDINGS, allow_pickle=False, mmap_mode=None)
    except (OSError, ValueError) as e:
        raise _corrupt(path, f"{EMBEDDINGS} cannot be read ({e})") from e
    if emb.dtype != np.float32 or emb.shape != (count, dim):
        raise _corrupt(path, f"{EMBEDDINGS} holds {emb.dtype} {emb.shape}, expected float32 "
                             f"{(count, dim)}")
    if not np.isfinite(emb).all():
        raise _corrupt(path, f"{EMBEDDINGS} holds NaN or infinite values")
    return StoreData(manifest, ids, texts, metadata, emb)
