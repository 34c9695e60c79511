"""Encoder.save_pretrained writes a folder that sentence-transformers loads as is, and its
embeddings equal ours (bundled all-MiniLM-L6-v2; with and without the Normalize module)."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest

from fedrag_jax import assets
from fedrag_jax.models.bert import Encoder
from fedrag_jax.models.hf import load_tokenizer
from fedrag_jax.retriever import DualEncoder

pytestmark = pytest.mark.slow

TEXTS = [
    "Who wrote Dune?",
    "Frank Herbert's Dune (1965) is set on the desert planet Arrakis.",
    "The mitochondrion is the powerhouse of the cell.",
    " ".join(["a long passage that is cut at the maximum sequence length"] * 40),
]


@pytest.fixture(scope="module")
def minilm():
    importlib.import_module("sentence_transformers")  # a test dependency: fail if missing
    return assets.retriever_path()


@pytest.mark.parametrize("normalize", [True, False])
def test_sentence_transformers_loads_our_export(minilm, tmp_path, normalize):
    from sentence_transformers import SentenceTransformer

    tokenizer = load_tokenizer(minilm)
    encoder = Encoder.from_pretrained(minilm, normalize=normalize)
    out = tmp_path / "st"
    encoder.save_pretrained(out, tokenizer=tokenizer)
    kinds = [m["type"].rsplit(".", 1)[-1] for m in json.loads((out / "modules.json").read_text())]
    assert kinds == ["Transformer", "Pooling"] + (["Normalize"] if normalize else [])

    ours = DualEncoder(encoder, tokenizer, max_length=256).encode_query(TEXTS)
    model = SentenceTransformer(str(out), device="cpu")
    assert model.max_seq_length == 256
    assert [type(m).__name__ for m in model] == kinds
    theirs = model.encode(TEXTS, convert_to_numpy=True, batch_size=8)
    assert theirs.shape == ours.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1) if normalize else 1.0,
                               np.ones(len(TEXTS)), atol=1e-5)
    if not normalize:  # sentence-transformers' own normalisation gives our normalized towers
        unit = model.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=True)
        ours_unit = DualEncoder(Encoder.from_pretrained(minilm), tokenizer).encode_query(TEXTS)
        np.testing.assert_allclose(unit, ours_unit, atol=1e-5, rtol=0)
