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
"rename" is a copy plus a delete). A *folder* on an object store cannot be swapped in one
step, so it is versioned (:func:`staged_directory`): the new version is uploaded beside the
old one, checked, and only then does one small marker object switch readers to it; the old
version is deleted last. Nothing replaces a folder that fedrag-jax did not write
(:class:`~fedrag_jax.errors.OutputExistsError`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from etils import epath

from . import paths
from .atomic import MARKER, atomic_directory, check_replaceable, write_marker
from .errors import OutputExistsError
from .paths import is_remote

__all__ = ["check_output", "is_primary", "is_remote", "open_atomic", "out_path",
           "staged_directory", "upload_tree", "write_text"]

log = logging.getLogger(__name__)


def out_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an epath.Path (gs:// or local); local paths made absolute. A URI whose
    scheme or filesystem is not available raises a named error here, before any work."""
    if is_remote(path):
        return epath.Path(paths.check_remote(path))
    return epath.Path(os.path.abspath(os.fspath(path)))


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
        paths.forget(path)
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


def upload_tree(src: str | os.PathLike, dst: str | os.PathLike, *,
                last: str | None = None) -> None:
    """Copy the local folder ``src`` file by file under ``dst`` (local or remote); the file
    ``last`` (relative to ``src``), if given, is copied after all the others."""
    src, dst = Path(src), out_path(dst)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.relative_to(src).as_posix() == last)
    for local in files:
        target = dst / local.relative_to(src).as_posix()
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(local, "rb") as fi, target.open("wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 22)


def _remote_current(remote: epath.Path, kind: str) -> str | None:
    """The current version of the versioned ``kind`` output at ``remote`` (None if nothing is
    there); OutputExistsError if something else is."""
    if not remote.exists():
        return None
    entries = sorted(p.name for p in remote.iterdir())
    if not entries:
        return None
    marker = paths.read_marker(remote)
    hint = "choose a new prefix: fedrag-jax replaces only outputs it wrote"
    if marker is None:
        shown = ", ".join(entries[:4]) + (" ..." if len(entries) > 4 else "")
        raise OutputExistsError(f"{remote} already holds objects fedrag-jax did not write "
                                f"({shown}); {hint}")
    if marker.get("fedrag_jax_output") != kind or not isinstance(marker.get("current"), str):
        raise OutputExistsError(f"{remote} holds a fedrag-jax "
                                f"{marker.get('fedrag_jax_output')!r} output, not a versioned "
                                f"{kind!r} one; {hint}")
    stale = [e for e in entries if e not in (MARKER, marker["current"])]
    if stale:
        log.warning("%s: %s left by an interrupted save (not the current version %s); kept, "
                    "remove them yourself", remote, ", ".join(stale), marker["current"])
    return marker["current"]


def _publish(local: Path, remote: epath.Path, kind: str, old: str | None) -> None:
    """Upload ``local`` as a new version of ``remote``, check it, switch the marker to it,
    then delete the old version: a crash at any point leaves a readable version."""
    paths.forget(remote)
    version = f"v{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    dest = remote / version
    upload_tree(local, dest, last=MARKER)  # the version's own marker last: complete if there
    for file in (p for p in local.rglob("*") if p.is_file()):
        rel = file.relative_to(local).as_posix()
        uploaded = dest / rel
        if not uploaded.exists() or uploaded.stat().length != file.stat().st_size:
            raise OSError(f"upload of {uploaded} did not complete; the previous version "
                          f"{old or '(none)'} stays current")
    write_text(remote / MARKER, json.dumps({"fedrag_jax_output": kind, "current": version},
                                           indent=1))
    if old and old != version:
        try:
            (remote / old).rmtree()
        except OSError as e:  # the switch is done; an old version left behind loses nothing
            log.warning("could not delete the previous version %s/%s: %s", remote, old, e)


def check_output(target: str | os.PathLike, kind: str,
                 legacy_files: Callable[[Path], set[str] | None] | None = None) -> None:
    """Raise OutputExistsError now (before long work) if ``staged_directory(target, kind)``
    would refuse ``target``."""
    if is_remote(target):
        _remote_current(out_path(target), kind)
    else:
        check_replaceable(Path(target).absolute(), kind, legacy_files)


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike, *, kind: str = "output",
                     legacy_files: Callable[[Path], set[str] | None] | None = None,
                     ) -> Iterator[Path]:
    """A local folder to build ``target`` in; on success it becomes ``target``.

    Local: :func:`~fedrag_jax.atomic.atomic_directory` (one rename). Remote: the folder is
    built in a local temporary directory and published as a new version of ``target``
    (``target/<version>/`` plus the marker object ``target/.fedrag-jax-output.json`` naming
    it; readers follow it through :func:`fedrag_jax.paths.resolve`). Either way a target
    that is not an earlier ``kind`` output of fedrag-jax raises OutputExistsError before any
    work is done.
    """
    if not is_remote(target):
        with atomic_directory(target, kind=kind, legacy_files=legacy_files) as tmp:
            yield tmp
        return
    remote = out_path(target)
    old = _remote_current(remote, kind)
    with tempfile.TemporaryDirectory(prefix="fedrag-jax-stage-") as tmp:
        yield Path(tmp)
        write_marker(Path(tmp), kind)
        _publish(Path(tmp), remote, kind, old)
