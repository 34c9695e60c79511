"""The one path layer: every input and output path fedrag-jax accepts goes through here.

A path is local (a file or folder on this machine) or an object-store URI. ``gs://`` is
served through ``etils.epath`` (fsspec's gcsfs, the ``gcs`` extra, or TensorFlow's gfile
where TensorFlow is installed); any other scheme is refused with
:class:`~fedrag_jax.errors.UnsupportedPathError`. A URI is never handed to ``pathlib``:
``pathlib.Path("gs://b/x")`` is the *local* path ``gs:/b/x``.

Inputs that libraries read as local files (safetensors memory maps, tokenizers, pyarrow,
ScaNN, YAML and JSONL readers) are copied once per process into a temporary cache
(:func:`local_copy`), removed at exit; fedrag-jax's own writes to a remote path drop its
cached copy (:func:`forget`).

An output folder that fedrag-jax writes on an object store is versioned (see
``outputs.staged_directory``): its files live under ``<folder>/<version>/`` and the marker
object ``<folder>/.fedrag-jax-output.json`` names the current version. Readers follow it
(:func:`resolve`), so a save interrupted midway leaves the previous version readable.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from .atomic import MARKER  # the marker of every output folder fedrag-jax writes
from .errors import FilesystemNotInstalledError, RemotePathNotFoundError, UnsupportedPathError

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# scheme -> (the module that serves it, the extra that installs it)
SCHEMES = {"gs": ("gcsfs", "gcs")}


def is_remote(path: str | os.PathLike) -> bool:
    """True for object-store URIs (``gs://...``), False for local paths."""
    return bool(_URI.match(os.fspath(path)))


def _filesystem_installed(scheme: str) -> bool:
    module, _ = SCHEMES[scheme]
    # etils.epath serves gs:// through TensorFlow's gfile when TensorFlow is installed
    return any(importlib.util.find_spec(m) is not None for m in (module, "tensorflow"))


def check_remote(path: str | os.PathLike) -> str:
    """``path`` as a string, once its scheme is known to be served here; else a named error."""
    uri = os.fspath(path)
    scheme = _URI.match(uri).group(1).lower()
    if scheme not in SCHEMES:
        raise UnsupportedPathError(
            f"{uri}: {scheme}:// paths are not supported; use a local path or gs://BUCKET/...")
    if not _filesystem_installed(scheme):
        module, extra = SCHEMES[scheme]
        raise FilesystemNotInstalledError(
            f"{uri}: {scheme}:// paths need the Cloud Storage filesystem ({module}), which is "
            f"not installed: pip install 'fedrag-jax[{extra}]'")
    return uri


def as_path(path: str | os.PathLike) -> Any:
    """An ``etils.epath.Path`` for a URI (checked: scheme and filesystem), else an absolute
    ``pathlib.Path``."""
    if is_remote(path):
        from etils import epath

        return epath.Path(check_remote(path))
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def require_local(path: str | os.PathLike, what: str) -> Path:
    """A local ``pathlib.Path`` for a place that cannot serve an object store."""
    if is_remote(path):
        raise UnsupportedPathError(f"{what} takes a local path, not {os.fspath(path)}; copy "
                                   "it to this machine first")
    return Path(os.path.expanduser(os.fspath(path)))


def read_marker(folder: Any) -> dict | None:
    """The output marker of ``folder`` (local or remote), or None if it has none."""
    marker = folder / MARKER
    try:
        if not marker.is_file():
            return None
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def resolve(path: str | os.PathLike) -> Any:
    """``path`` (epath for a URI, pathlib otherwise) with every versioned output folder on
    the way followed to its current version: ``gs://b/export/retriever`` reads
    ``gs://b/export/<current>/retriever``."""
    p = as_path(path)
    if is_remote(path):
        from etils import epath

        scheme, rest = os.fspath(p).split("://", 1)
        bucket, *parts = rest.strip("/").split("/")
        out = epath.Path(f"{scheme}://{bucket}")
    else:
        out, parts = Path(p.anchor), list(p.parts[1:])
    i = 0
    while i < len(parts):
        out, i = out / parts[i], i + 1
        current = _follow(out)
        if current != out:
            if i < len(parts) and parts[i] == current.name:
                i += 1  # the path already names the version
            out = current
    return out


def _follow(p: Any) -> Any:
    """``p``'s current version if ``p`` is a versioned output folder, else ``p``."""
    if not _is_dir(p):
        return p
    marker = read_marker(p)
    current = marker.get("current") if marker else None
    if isinstance(current, str) and re.fullmatch(r"v[0-9A-Za-z-]+", current):
        return p / current
    return p


def _is_dir(p: Any) -> bool:
    try:
        return p.is_dir()
    except OSError:
        return False


_cache_lock = threading.Lock()
_cache: dict[str, Path] = {}
_cache_root: Path | None = None


def _cache_dir() -> Path:
    global _cache_root
    if _cache_root is None:
        _cache_root = Path(tempfile.mkdtemp(prefix="fedrag-jax-remote-"))
        atexit.register(shutil.rmtree, _cache_root, True)
    return _cache_root


def download(src: Any, dst: Path) -> None:
    """Copy the remote file or folder ``src`` (an epath.Path) to the local ``dst``."""
    if not src.is_dir():
        dst.parent.mkdir(parents=True, exist_ok=True)
        with src.open("rb") as fi, open(dst, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 22)
        return
    base = os.fspath(src).rstrip("/")
    for root, _, files in src.walk():
        rel = os.fspath(root).rstrip("/")[len(base):].lstrip("/")
        for name in files:
            download(root / name, dst / rel / name)


def local_copy(path: str | os.PathLike, what: str) -> Path:
    """A local path holding ``path``'s contents: a local path as it is (a versioned output
    resolved to its current version); a remote file or folder downloaded once per process.

    ``what`` names the input in the error for a remote path that does not exist.
    """
    if not is_remote(path):
        return resolve(path)
    remote = resolve(path)
    key = os.fspath(remote)
    with _cache_lock:
        if key in _cache and _cache[key].exists():
            return _cache[key]
        if not remote.exists():
            raise RemotePathNotFoundError(f"{what} {os.fspath(path)} does not exist")
        name = key.rstrip("/").rsplit("/", 1)[-1] or "root"
        local = Path(tempfile.mkdtemp(dir=_cache_dir())) / name
        download(remote, local)
        _cache[key] = local
        return local


def forget(path: str | os.PathLike) -> None:
    """Drop cached copies of ``path`` and of everything under it (it is being rewritten)."""
    prefix = os.fspath(path).rstrip("/")
    with _cache_lock:
        for key in [k for k in _cache if k == prefix or k.startswith(prefix + "/")]:
            del _cache[key]
