"""Build a knowledge store from a corpus: encode every passage, add, persist.

A corpus is ``"bundled"`` (the Wikipedia summaries), a JSONL file of
``{"id"?, "title"?, "text"}`` records, or a list of such dicts. The index folder holds the
persisted store and ``index.json`` naming the retriever and generator it was built for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from . import assets
from .errors import DataError, StoreFingerprintError
from .jsonl import read_jsonl
from .knowledge_store import KnowledgeStore, default_store
from .outputs import staged_directory
from .paths import local_copy
from .retriever import DualEncoder
from .types import KnowledgeNode

log = logging.getLogger(__name__)


def passage_text(entry: dict) -> str:
    title = entry.get("title")
    return f"{title}: {entry['text']}" if title else entry["text"]


def _metadata(value: Any, where: str) -> dict:
    """A record's metadata: a JSON object (dict), or nothing."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DataError(f"{where}: 'metadata' must be a JSON object such as "
                        f'{{"source": "..."}}, not a {type(value).__name__} ({value!r:.60}); '
                        "wrap the value in an object or drop the field")
    return value


def load_corpus(source: str | os.PathLike | Sequence[dict] = "bundled",
                limit: int | None = None) -> list[dict]:
    """Records {id, title, text, metadata}; the bundled corpus keeps its topic as metadata."""
    if isinstance(source, str) and source == "bundled":
        rows = [{"id": f"wiki-{i}", "title": e["title"], "text": e.get("extract", ""),
                 "metadata": {"topic": e.get("topic", ""),
                              "description": e.get("description", "")}}
                for i, e in enumerate(assets.load_corpus())]
    elif isinstance(source, (str, os.PathLike)):
        path = local_copy(source, "corpus file")  # local, or gs:// fetched once
        if not path.is_file():
            raise DataError(f"corpus file {source} does not exist; pass 'bundled' or a JSONL "
                            "file")
        rows = []
        for n, r in read_jsonl(path):
            if not isinstance(r.get("text"), str):
                raise DataError(f"{source}:{n}: every record needs a string 'text'")
            rows.append({"id": str(r.get("id", f"doc-{n}")), "title": r.get("title"),
                         "text": r["text"],
                         "metadata": _metadata(r.get("metadata"), f"{source}:{n}")})
    else:
        rows = [dict(r) for r in source]
        for i, r in enumerate(rows):
            r.setdefault("id", f"doc-{i}")
            r["metadata"] = _metadata(r.get("metadata"), f"corpus record {i}")
    rows = [r for r in rows if r["text"].strip()]
    if not rows:
        raise DataError("the corpus has no non-empty passages")
    return rows[:limit] if limit else rows


def model_fingerprint(retriever: DualEncoder) -> str:
    """A short hash of the retriever's weights: a store is only valid for the model it used."""
    import jax
    import numpy as np
    from flax import nnx

    h = hashlib.sha256()
    encoder = retriever.context_encoder or retriever.query_encoder
    for leaf in jax.tree.leaves(nnx.state(encoder, nnx.Param)):
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()[:16]


def check_store_fingerprint(store: KnowledgeStore, retriever: DualEncoder, *,
                            allow_foreign: bool = False, where: Any = None) -> None:
    """Refuse ``store`` if another retriever made its embeddings: its recorded
    ``embedding_model_hash`` differs from ``retriever``'s (:func:`model_fingerprint`).

    A store that records no fingerprint (built by hand) is accepted. ``allow_foreign``: the
    user says the embeddings fit (e.g. the same weights in another dtype); then a mismatch is
    only logged.
    """
    recorded = getattr(store, "embedding_model_hash", None)
    if not recorded:
        return
    current = model_fingerprint(retriever)
    if recorded == current:
        return
    name = store.embedding_model or "an unnamed retriever"
    message = (f"the knowledge store {where or ''} was built by another retriever "
               f"({name}, fingerprint {recorded}) than the one in use ({retriever.name or 'this'}"
               f" one, fingerprint {current}): its passage embeddings do not match this "
               "retriever's queries. Rebuild the index with this retriever "
               "(`fedrag-jax index build --retriever ...`), use the retriever that built it, "
               "or, if you know the embeddings fit, pass --allow-foreign-store "
               "(config: allow_foreign_store=true)")
    if not allow_foreign:
        raise StoreFingerprintError(message.replace("  ", " "))
    log.warning("%s; allowed by allow_foreign_store", message.replace("  ", " "))


def build_store(corpus: Sequence[dict], retriever: DualEncoder, *, backend: str = "auto",
                progress: bool = True, **store_kwargs: Any) -> KnowledgeStore:
    embeddings = retriever.encode_context([passage_text(r) for r in corpus], progress=progress)
    store = default_store(embeddings.shape[1], "dot", backend=backend,
                          embedding_model=retriever.name,
                          embedding_model_hash=model_fingerprint(retriever), **store_kwargs)
    store.add([KnowledgeNode(r["id"], passage_text(r), e, dict(r.get("metadata") or {}))
               for r, e in zip(corpus, embeddings, strict=True)])
    return store


def build_index(corpus: Sequence[dict], retriever: DualEncoder, out_dir: str | os.PathLike, *,
                retriever_path: str, generator_path: str, backend: str = "auto",
                progress: bool = True) -> KnowledgeStore:
    """Encode ``corpus`` and write the index folder ``out_dir`` (local or gs://, atomically;
    a folder that is not an earlier index is refused before any encoding)."""
    with staged_directory(out_dir, kind="index") as tmp:
        store = build_store(corpus, retriever, backend=backend, progress=progress)
        store.persist(tmp / "store")
        (tmp / "index.json").write_text(json.dumps(
            {"retriever": str(retriever_path), "generator": str(generator_path),
             "passages": store.count, "store_type": type(store).__name__}, indent=2))
    return store


def reencode_store(store: KnowledgeStore, retriever: DualEncoder, *, backend: str = "auto",
                   progress: bool = False) -> KnowledgeStore:
    """A new store of the same nodes (ids, texts, metadata, metric) whose embeddings come from
    ``retriever``'s context tower, with its index rebuilt: what a store needs once the context
    tower has trained. An exact store keeps its mesh."""
    ids = store.node_ids()
    nodes = store.get(ids)
    embeddings = retriever.encode_context([n.text for n in nodes], progress=progress)
    extra: dict[str, Any] = {}
    if getattr(store, "mesh", None) is not None:
        extra["mesh"] = store.mesh
    new = default_store(embeddings.shape[1], store.metric, backend=backend,
                        embedding_model=retriever.name or store.embedding_model,
                        embedding_model_hash=model_fingerprint(retriever), **extra)
    new.add_arrays(ids, embeddings, [n.text for n in nodes], [n.metadata for n in nodes])
    return new
