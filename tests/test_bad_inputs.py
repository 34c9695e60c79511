"""Bad inputs that used to escape as raw tracebacks: each a named error saying what to do."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from fedrag_jax.cli import main
from fedrag_jax.errors import CorruptCheckpointError, DataError
from fedrag_jax.indexing import load_corpus
from fedrag_jax.models.safetensors_io import open_tensors, save_file
from tests.helpers import tiny_rag_files


# --- corpus metadata -----------------------------------------------------------------------
def test_corpus_metadata_given_as_a_string_is_a_data_error(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "a", "text": "fine", "metadata": {"k": 1}}) + "\n"
                      + json.dumps({"id": "b", "text": "bad", "metadata": "source=wiki"}) + "\n")
    with pytest.raises(DataError, match=r"corpus.jsonl:2: 'metadata' must be a JSON object"):
        load_corpus(corpus)
    with pytest.raises(DataError, match=r"corpus record 0: 'metadata' must be a JSON object"):
        load_corpus([{"text": "x", "metadata": ["a", "b"]}])
    assert load_corpus([{"text": "x", "metadata": None}])[0]["metadata"] == {}


def test_index_build_on_string_metadata_exits_with_the_named_error(tmp_path, capsys):
    files = tiny_rag_files(tmp_path, num_passages=3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "w5 w6", "metadata": "oops"}) + "\n")
    assert main(["index", "build", "--corpus", str(bad), "--retriever", str(files["retriever"]),
                 "--backend", "exact", "--out", str(tmp_path / "idx")]) == 2
    assert "DataError" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()


# --- safetensors headers -------------------------------------------------------------------
def _with_header(path, header: object, data: bytes = b"\0" * 16) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize("entry, problem", [
    ({"dtype": "F32", "shape": [2]}, "has no 'data_offsets'"),
    ({"dtype": "F32", "data_offsets": [0, 8]}, "has no 'shape'"),
    ({"dtype": "F32", "shape": [2], "data_offsets": "0-8"}, "has data_offsets '0-8'"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, r"has data_offsets \[8, 0\]"),
    ({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}, "has shape '2'"),
    ({"dtype": 7, "shape": [2], "data_offsets": [0, 8]}, "has dtype 7"),
    ([0, 8], "has list"),
])
def test_malformed_safetensors_header_is_a_corrupt_checkpoint(tmp_path, entry, problem):
    path = tmp_path / "model.safetensors"
    _with_header(path, {"__metadata__": {"format": "pt"}, "w": entry})
    with pytest.raises(CorruptCheckpointError, match=f"malformed safetensors header: tensor "
                                                    f"'w' {problem}"):
        open_tensors(path)


def test_safetensors_header_that_is_not_an_object(tmp_path):
    path = tmp_path / "model.safetensors"
    _with_header(path, [1, 2, 3])
    with pytest.raises(CorruptCheckpointError, match="not a JSON object"):
        open_tensors(path)


def test_a_good_safetensors_file_still_reads(tmp_path):
    path = tmp_path / "ok.safetensors"
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    save_file({"x": x}, path)
    got = open_tensors(path)
    np.testing.assert_array_equal(got["x"], x)
