"""Dual-encoder retriever: a query tower and a context tower (shared or separate weights).

Texts are tokenized, sorted by length and encoded in fixed-size batches padded to a few
length buckets, so the jit-compiled encoder compiles once per bucket. With a mesh, each
batch is sharded over the data-parallel axes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from .generator import bucket_length
from .models.bert import Encoder
from .progress import progress_bar
from .sharding import shard_batch

DEFAULT_BUCKETS = (32, 64, 128, 256, 512)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)


class DualEncoder:
    """``encode_query`` / ``encode_context`` -> float32 arrays [N, D]."""

    def __init__(self, query_encoder: Encoder, tokenizer, context_encoder: Encoder | None = None,
                 *, max_length: int = 256, batch_size: int = 64,
                 length_buckets: Sequence[int] = DEFAULT_BUCKETS, mesh: Mesh | None = None,
                 query_prefix: str = "", context_prefix: str = "",
                 name: str | None = None):
        self.query_encoder = query_encoder
        self.context_encoder = context_encoder  # None: the query tower encodes both
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.length_buckets = tuple(b for b in length_buckets if b < max_length) + (max_length,)
        self.mesh = mesh
        if mesh is not None:  # the batch must split evenly over the data-parallel devices
            ways = mesh.shape["data"] * mesh.shape["fsdp"]
            batch_size = -(-batch_size // ways) * ways
        self.batch_size = batch_size
        self.query_prefix = query_prefix  # e5 / bge want "query: " / "passage: " style prefixes
        self.context_prefix = context_prefix
        self.name = name

    @classmethod
    def from_pretrained(cls, query_path, context_path=None, *, dtype: str | None = None,
                        mesh: Mesh | None = None, **kwargs) -> DualEncoder:
        from .models.hf import load_tokenizer

        query = Encoder.from_pretrained(query_path, dtype=dtype, mesh=mesh)
        context = (Encoder.from_pretrained(context_path, dtype=dtype, mesh=mesh)
                   if context_path is not None else None)
        kwargs.setdefault("name", str(query_path))
        return cls(query, load_tokenizer(query_path), context, mesh=mesh, **kwargs)

    @property
    def dimension(self) -> int:
        return self.query_encoder.config.hidden_size

    @property
    def shared(self) -> bool:
        return self.context_encoder is None

    def encode_query(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        return self._encode(self.query_encoder, [self.query_prefix + t for t in texts],
                            progress, "queries")

    def encode_context(self, texts: Sequence[str], *, progress: bool = True) -> np.ndarray:
        encoder = self.context_encoder or self.query_encoder
        return self._encode(encoder, [self.context_prefix + t for t in texts], progress,
                            "passages")

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                              add_special_tokens=True)["input_ids"]

    def _batch_rows(self, n: int) -> int:
        """Rows to pad a batch of ``n`` texts to: a power of two (few shapes to compile), a
        multiple of the data-parallel devices, at most ``batch_size``: a handful of queries
        does not pay for a full batch."""
        ways = 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        rows = max(ways, 1 << max(n - 1, 0).bit_length())
        return min(self.batch_size, -(-rows // ways) * ways)

    def _encode(self, encoder: Encoder, texts: Sequence[str], progress: bool,
                what: str) -> np.ndarray:
        rows = self.tokenize(texts)
        out = np.zeros((len(rows), encoder.config.hidden_size), np.float32)
        order = np.argsort([len(r) for r in rows], kind="stable")  # similar lengths together
        graphdef, state = nnx.split(encoder)
        pad_id = self.tokenizer.pad_token_id or 0
        bar = progress_bar(total=len(rows), desc=f"encoding {what}", unit=what[:-1],
                   disable=not progress)
        for start in range(0, len(rows), self.batch_size):
            chunk = order[start:start + self.batch_size]
            length = bucket_length(max(len(rows[i]) for i in chunk), self.length_buckets)
            n = self._batch_rows(len(chunk))
            ids = np.full((n, length), pad_id, np.int32)
            mask = np.zeros((n, length), bool)
            for j, i in enumerate(chunk):  # right padding, as BERT expects
                ids[j, :len(rows[i])] = rows[i]
                mask[j, :len(rows[i])] = True
            if self.mesh is not None:
                batch = shard_batch({"ids": ids, "mask": mask}, self.mesh)
                ids, mask = batch["ids"], batch["mask"]
            emb = _encode(graphdef, state, ids, mask)
            if not emb.is_fully_addressable:  # a mesh across hosts: gather every row here
                emb = multihost_utils.process_allgather(emb, tiled=True)
            out[chunk] = np.asarray(emb)[: len(chunk)]
            bar.update(len(chunk))
        bar.close()
        return out
