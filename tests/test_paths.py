"""No command deletes what it did not write, remote saves never lose the old copy, and gs://
works everywhere a path is accepted (or is refused by name), never becoming a local "gs:"."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from fedrag_jax import outputs
from fedrag_jax.cli import main
from fedrag_jax.errors import (
    FilesystemNotInstalledError,
    OutputExistsError,
    StoreFingerprintError,
    UnsupportedPathError,
)
from fedrag_jax.rag import RAGSystem
from fedrag_jax.types import RAGConfig
from tests.conftest import _gs_folders
from tests.helpers import tiny_rag_files, tiny_rag_parts

PROMPT = "w4 {context} w5 {query} w6"
MARKER = ".fedrag-jax-output.json"


def _users_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my own notes")
    (path / "photos").mkdir()
    (path / "photos" / "cat.jpg").write_bytes(b"meow")
    return path


def _intact(path: Path) -> None:
    assert (path / "notes.txt").read_text() == "my own notes"
    assert (path / "photos" / "cat.jpg").read_bytes() == b"meow"
    assert sorted(p.name for p in path.iterdir()) == ["notes.txt", "photos"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny HF folders (retriever, generator with tokenizer), a corpus and train JSONL."""
    return tiny_rag_files(tmp_path_factory.mktemp("files"), num_passages=10)


@pytest.fixture
def rag(tmp_path):
    retriever, store, generator, _ = tiny_rag_parts(tmp_path, num_passages=8)
    return RAGSystem(retriever, store, generator, RAGConfig(top_k=2, prompt_template=PROMPT),
                     max_new_tokens=3)


# --- nothing deletes a user's folder ------------------------------------------------------
def test_convert_into_a_users_folder_keeps_it_and_exits_with_a_named_error(files, tmp_path,
                                                                           capsys):
    dst = _users_folder(tmp_path / "models")
    assert main(["convert", str(files["generator"]), str(dst)]) == 2
    assert "OutputExistsError" in capsys.readouterr().err
    _intact(dst)
    # an earlier convert output is replaced
    fresh = tmp_path / "converted"
    assert main(["convert", str(files["generator"]), str(fresh)]) == 0
    assert main(["convert", str(files["generator"]), str(fresh)]) == 0
    assert (fresh / "model.safetensors").is_file() and (fresh / MARKER).is_file()


def test_index_build_into_a_users_folder_keeps_it_and_exits_with_a_named_error(files, tmp_path,
                                                                               capsys):
    dst = _users_folder(tmp_path / "index")
    args = ["index", "build", "--corpus", str(files["corpus"]), "--retriever",
            str(files["retriever"]), "--generator", str(files["generator"]), "--backend",
            "exact", "--max-length", "32"]
    assert main([*args, "--out", str(dst)]) == 2
    err = capsys.readouterr().err
    assert "OutputExistsError" in err and "did not write" in err
    _intact(dst)


def test_save_pretrained_into_a_users_folder_keeps_it_and_raises_a_named_error(rag, tmp_path):
    for name, save in [("rag", rag.save_pretrained),
                       ("generator", lambda p: rag.generator.model.save_pretrained(p)),
                       ("retriever", lambda p: rag.retriever.query_encoder.save_pretrained(p)),
                       ("store", rag.store.persist)]:
        dst = _users_folder(tmp_path / name)
        with pytest.raises(OutputExistsError, match="did not write"):
            save(dst)
        _intact(dst)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_export_into_a_users_folder_keeps_it(rag, tmp_path, capsys):
    rag.save_pretrained(tmp_path / "rag")
    dst = _users_folder(tmp_path / "export")
    assert main(["export", "--system", str(tmp_path / "rag"), "--out", str(dst)]) == 2
    assert "OutputExistsError" in capsys.readouterr().err
    _intact(dst)
    assert main(["export", "--system", str(tmp_path / "rag"), "--out",
                 str(tmp_path / "new")]) == 0
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [MARKER, "generator",
                                                                    "retriever"]


def test_an_earlier_output_of_the_same_kind_is_replaced_and_nothing_else(rag, tmp_path):
    target = tmp_path / "rag"
    rag.save_pretrained(target)
    marker = json.loads((target / MARKER).read_text())
    assert marker["fedrag_jax_output"] == "rag-system"
    assert "rag_config.json" in marker["files"] and "store/manifest.json" in marker["files"]
    rag.config = RAGConfig(top_k=3, prompt_template=PROMPT)
    rag.save_pretrained(target)  # the same kind: replaced atomically
    assert RAGSystem.from_pretrained(target).config.top_k == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    with pytest.raises(OutputExistsError, match="'rag-system' output, not a 'knowledge-store'"):
        rag.store.persist(target)  # another kind of output
    (target / "README.md").write_text("added by hand")
    with pytest.raises(OutputExistsError, match="README.md"):
        rag.save_pretrained(target)  # an output someone added a file to
    assert (target / "README.md").read_text() == "added by hand"
    assert RAGSystem.from_pretrained(target).config.top_k == 3

    empty = tmp_path / "empty"
    empty.mkdir()
    rag.save_pretrained(empty)  # an empty folder holds nothing to lose
    assert (empty / "rag_config.json").is_file()


def test_a_store_written_before_markers_is_still_replaced(rag, tmp_path):
    path = rag.store.persist(tmp_path / "store")
    (path / MARKER).unlink()  # as an older fedrag-jax wrote it: its manifest lists every file
    rag.store.persist(path)
    assert (path / MARKER).is_file()
    (path / MARKER).unlink()
    (path / "mine.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="mine.txt"):
        rag.store.persist(path)


# --- remote saves ------------------------------------------------------------------------
def test_remote_save_interrupted_midway_leaves_the_old_copy_loadable(rag, fake_gcs, monkeypatch,
                                                                     caplog):
    rag.save_pretrained("gs://bucket/run/rag")
    folder = fake_gcs / "bucket" / "run" / "rag"
    queries = ["w7 w8 w9", "w10 w11 w12"]
    before = [r.answer for r in rag.batch_query(queries)]

    calls = {"n": 0}
    real = shutil.copyfileobj

    def flaky(src, dst, length=0):
        calls["n"] += 1
        if calls["n"] > 3:
            raise ConnectionError("network lost mid-upload")
        return real(src, dst, length)

    rag.config = RAGConfig(top_k=3, prompt_template=PROMPT)
    with monkeypatch.context() as m:
        m.setattr(shutil, "copyfileobj", flaky)
        with pytest.raises(ConnectionError):
            rag.save_pretrained("gs://bucket/run/rag")
    assert calls["n"] == 4  # it did fail midway, after uploading 3 files
    old = RAGSystem.from_pretrained(folder)  # the stored bytes, read back locally
    assert old.config.top_k == 2
    assert [r.answer for r in old.batch_query(queries)] == before

    rag.save_pretrained("gs://bucket/run/rag")  # the next save completes
    assert RAGSystem.from_pretrained("gs://bucket/run/rag").config.top_k == 3
    assert "interrupted save" in caplog.text  # the partial version is named, not deleted


def test_remote_save_refuses_a_prefix_it_did_not_write(rag, fake_gcs):
    (fake_gcs / "bucket" / "data").mkdir(parents=True)
    (fake_gcs / "bucket" / "data" / "table.csv").write_text("a,b\n")
    with pytest.raises(OutputExistsError, match="table.csv"):
        rag.save_pretrained("gs://bucket/data")
    assert sorted(p.name for p in (fake_gcs / "bucket" / "data").iterdir()) == ["table.csv"]


# --- gs:// everywhere --------------------------------------------------------------------
def _upload(local: Path, uri: str, root: Path) -> None:
    dst = root / uri[len("gs://"):]
    dst.parent.mkdir(parents=True, exist_ok=True)
    (shutil.copytree if local.is_dir() else shutil.copy)(local, dst)


def test_gs_paths_work_for_every_input_and_output(files, rag, fake_gcs, tmp_path, capsys):
    from fedrag_jax.config import load_config
    from fedrag_jax.federated import app
    from fedrag_jax.finetune.manager import build_rag_system

    _upload(files["corpus"], "gs://bucket/in/corpus.jsonl", fake_gcs)
    _upload(files["train"], "gs://bucket/in/train.jsonl", fake_gcs)
    _upload(files["retriever"], "gs://bucket/models/retriever", fake_gcs)
    _upload(files["generator"], "gs://bucket/models/generator", fake_gcs)
    # index build --out gs://, from gs:// inputs; then ask over it
    assert main(["index", "build", "--corpus", "gs://bucket/in/corpus.jsonl", "--retriever",
                 "gs://bucket/models/retriever", "--generator", "gs://bucket/models/generator",
                 "--backend", "exact", "--max-length", "32", "--out", "gs://bucket/idx"]) == 0
    assert (fake_gcs / "bucket" / "idx" / MARKER).is_file()
    capsys.readouterr()
    assert main(["ask", "--index", "gs://bucket/idx", "--top-k", "2", "--max-new-tokens", "2",
                 "w5 w6"]) == 0
    assert "[2]" in capsys.readouterr().out

    # a config reading data.index, data.corpus, data.train and the models from gs://
    config_file = fake_gcs / "bucket" / "cfg.yaml"
    config_file.write_text(yaml.safe_dump({
        "output_dir": "gs://bucket/fed", "progress": False,
        "model": {"retriever": "gs://bucket/models/retriever",
                  "generator": "gs://bucket/models/generator", "use_chat_template": False},
        "data": {"index": "gs://bucket/idx", "corpus": "gs://bucket/in/corpus.jsonl",
                 "train": "gs://bucket/in/train.jsonl"},
        "retrieval": {"backend": "exact"}}))
    config = load_config("gs://bucket/cfg.yaml")
    built, corpus = build_rag_system(config)
    assert built.store.count == len(corpus) == 10
    # the deployed ServerApp: its run config, its checkpoints and a silo's files on gs://
    assert app.config_from_run_config({"config-path": "gs://bucket/cfg.yaml"}) == config
    assert app.checkpoint_dir(config, "lsr") == "gs://bucket/fed/federated_lsr/checkpoints"
    silo = app.silo_files({"data-path": "gs://bucket/in/train.jsonl",
                           "store-path": "gs://bucket/idx/store"})
    assert silo["data-path"].read_text() == files["train"].read_text()
    assert (silo["store-path"] / "manifest.json").is_file()

    # RAGSystem save / load, evaluate --rag, export: all on gs://
    rag.save_pretrained("gs://bucket/run/rag")
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"query": q, "answer": "w9"}) + "\n"
                           for q in ("w5 w6", "w7 w8")))
    _upload(dev, "gs://bucket/in/dev.jsonl", fake_gcs)
    assert main(["evaluate", "--rag", "gs://bucket/run/rag", "--data",
                 "gs://bucket/in/dev.jsonl"]) == 0
    aggregate = fake_gcs / "bucket" / "run" / "eval" / "dev" / "aggregate.json"
    assert json.loads(aggregate.read_text())["num_examples"] == 2
    assert main(["export", "--system", "gs://bucket/run/rag", "--out",
                 "gs://bucket/export"]) == 0
    # the exported models with the store their retriever built (the saved system's)
    exported = RAGSystem.from_parts(retriever="gs://bucket/export/retriever",
                                    generator="gs://bucket/export/generator",
                                    store="gs://bucket/run/rag/store")
    assert exported.store.count == rag.store.count == 8
    # the store another retriever built is refused by name, on gs:// as well
    with pytest.raises(StoreFingerprintError, match="gs://bucket/idx/store"):
        RAGSystem.from_parts(retriever="gs://bucket/export/retriever",
                             generator="gs://bucket/export/generator",
                             store="gs://bucket/idx/store")
    assert list(Path.cwd().iterdir()) == []  # nothing landed in the working directory


def test_gs_without_the_cloud_storage_filesystem_is_a_named_error(monkeypatch, tmp_path,
                                                                  capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gcsfs", "tensorflow")
                        else real(name, *a))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FilesystemNotInstalledError, match=r"pip install 'fedrag-jax\[gcs\]'"):
        outputs.out_path("gs://bucket/run")
    # a run fails at once, before any training, naming the extra
    assert main(["train", "output_dir=gs://bucket/run", "lsr.steps=1"]) == 2
    assert "fedrag-jax[gcs]" in capsys.readouterr().err
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert any(r.startswith("gcsfs") for r in pyproject["project"]["optional-dependencies"]["gcs"])
    assert list(tmp_path.iterdir()) == []


def test_paths_that_cannot_be_served_are_refused_by_name(tmp_path, monkeypatch, capsys):
    from fedrag_jax.atomic import atomic_directory

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsupportedPathError, match="s3:// paths are not supported"):
        outputs.out_path("s3://bucket/run")
    with pytest.raises(UnsupportedPathError), atomic_directory("gs://bucket/x"):
        pass
    assert main(["demo", "--out", "gs://bucket/demo"]) == 2
    assert "UnsupportedPathError" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_gs_folder_guard_sees_what_pathlib_makes_of_a_uri(tmp_path):
    collapsed = tmp_path / Path("gs://bucket/run")  # pathlib: tmp_path/gs:/bucket/run
    collapsed.mkdir(parents=True)
    assert _gs_folders(tmp_path) == [os.path.join(tmp_path, "gs:")]
    shutil.rmtree(tmp_path / "gs:")  # (or the autouse guard fails this test)

