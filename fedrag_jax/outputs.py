"""Where run outputs go: a local folder or an object store (``gs://bucket/run``).

Every run output (metrics JSONL, TensorBoard events, checkpoints, plots, results, the saved
RAG system) is addressed with :func:`out_path`, an ``etils.epath.Path``: the same code writes
to a local disk or to Cloud Storage (orbax, which writes the checkpoints, takes these paths
too). Only the first process writes metrics, plots and reports (:func:`is_primary`); every
process takes part in orbax checkpointing.

Atomicity: a local file is written to a temporary sibling, fsynced and renamed over the
target, so a reader sees the old file or the new one. An object store needs none of that: an
uploaded object becomes visible only once its upload completes, and replaces the previous
object whole, so a plain write is already atomic (and there is no rename to lean on: a GCS
"rename" is a copy plus a delete).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from etils import epath

from .atomic import atomic_directory

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def out_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an epath.Path (gs://, s3://, ... or local); local paths made absolute."""
    if is_remote(path):
        return epath.Path(os.fspath(path))
    return epath.Path(os.path.abspath(os.fspath(path)))


def is_remote(path: str | os.PathLike) -> bool:
    """True for object-store URIs (``gs://...``), False for local paths."""
    return bool(_URI.match(os.fspath(path)))


def is_primary() -> bool:
    """The process that writes metrics, plots and reports (every process checkpoints)."""
    import jax

    return jax.process_index() == 0


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open ``path`` for writing; it appears whole, or not at all if the block raises."""
    if mode not in ("w", "wb"):
        raise ValueError(f"open_atomic writes whole files: mode 'w' or 'wb', not {mode!r}")
    if is_remote(path):
        # object stores publish an object only when its upload completes: already atomic
        with out_path(path).open(mode) as f:
            yield f
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a whole text file atomically (local) or as one object (remote)."""
    with open_atomic(path, "w") as f:
        f.write(text)


def upload_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the local folder ``src`` file by file under ``dst`` (local or remote)."""
    src, dst = Path(src), out_path(dst)
    for root, _, files in os.walk(src):
        for name in files:
            local = Path(root) / name
            target = dst / local.relative_to(src).as_posix()
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(local, "rb") as fi, target.open("wb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 22)


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike) -> Iterator[Path]:
    """A local folder to build ``target`` in; on success it becomes ``target``.

    Local: :func:`atomic_directory` (one rename). Remote: the folder is built in a local
    temporary directory, the old objects under ``target`` are removed, and the new files are
    uploaded. Each object is atomic; the folder as a whole is not, so a reader that must not
    see a half-uploaded folder should wait for the run to finish.
    """
    if not is_remote(target):
        with atomic_directory(target) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="fedrag-jax-stage-") as tmp:
        yield Path(tmp)
        remote = out_path(target)
        if remote.exists():
            remote.rmtree()
        upload_tree(tmp, remote)
