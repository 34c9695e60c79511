"""Atomic directory writes that never delete what fedrag-jax did not write.

A folder is built in a temporary sibling, then swapped into place: a reader sees the old
folder or the new one, never half of one. Every folder written this way carries a marker,
``.fedrag-jax-output.json``: the kind of output (``rag-system``, ``index``, ``hf-model``,
...) and every file in it. An existing target is replaced only if it is empty, or an earlier
output of the same kind holding nothing but the files its marker lists; anything else (a
user's folder, a different kind of output, an output someone added files to) raises
:class:`~fedrag_jax.errors.OutputExistsError` and is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import OutputExistsError, UnsupportedPathError

MARKER = ".fedrag-jax-output.json"  # the same name as paths.MARKER (the ground floor)


def _files(folder: Path) -> set[str]:
    """Every file (and symlink) under ``folder``, as posix paths relative to it."""
    out = set()
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        out |= {(rel / n).as_posix() for n in files}
        out |= {(rel / d).as_posix() for d in dirs if os.path.islink(os.path.join(root, d))}
    return out


def read_marker(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(folder: Path, kind: str) -> None:
    """Mark ``folder`` as a ``kind`` output holding exactly the files it holds now."""
    files = sorted(_files(folder) - {MARKER})
    (folder / MARKER).write_text(json.dumps({"fedrag_jax_output": kind, "files": files},
                                            indent=1))


def _listing(names: set[str], n: int = 4) -> str:
    shown = sorted(names)[:n]
    return ", ".join(shown) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_replaceable(target: Path, kind: str,
                      legacy_files: Callable[[Path], set[str] | None] | None = None) -> None:
    """Raise OutputExistsError unless writing a ``kind`` output at ``target`` deletes only
    what fedrag-jax wrote there. ``legacy_files(target)``: the files an older, unmarked
    output of this kind consists of (from its own manifest), or None if it is not one."""
    if not os.path.lexists(target):
        return
    if not target.is_dir() or target.is_symlink():
        raise OutputExistsError(f"{target} exists and is not a folder; choose another output "
                                "path")
    present = _files(target)
    if not present and not any(target.iterdir()):
        return
    marker = read_marker(target)
    hint = ("choose a new or empty folder, or move its contents away yourself: fedrag-jax "
            "replaces only folders it wrote")
    if marker is None:
        owned = legacy_files(target) if legacy_files else None
        if owned is None:
            raise OutputExistsError(f"{target} already holds files fedrag-jax did not write "
                                    f"({_listing(present or {'empty folders'})}); {hint}")
    else:
        found = marker.get("fedrag_jax_output")
        if found != kind or not isinstance(marker.get("files"), list):
            raise OutputExistsError(f"{target} holds a fedrag-jax {found!r} output, not a "
                                    f"{kind!r} one; {hint}")
        owned = set(marker["files"]) | {MARKER}
    foreign = present - owned
    if foreign:
        raise OutputExistsError(f"{target} is an earlier {kind} output but also holds files "
                                f"fedrag-jax did not write there ({_listing(foreign)}); {hint}")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, kind: str = "output",
                     legacy_files: Callable[[Path], set[str] | None] | None = None,
                     ) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``target`` in one rename.

    ``target`` must not exist, be empty, or be an earlier ``kind`` output of fedrag-jax
    (see :func:`check_replaceable`), else OutputExistsError before anything is written. On an
    exception the temporary directory is removed and ``target`` is left untouched.
    """
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", os.fspath(target)):
        raise UnsupportedPathError(f"{os.fspath(target)}: atomic_directory writes local "
                                   "folders; use outputs.staged_directory for object stores")
    target = Path(target).absolute()
    check_replaceable(target, kind, legacy_files)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        write_marker(tmp, kind)
        for root, _, files in os.walk(tmp):  # make the contents durable before the swap
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        check_replaceable(target, kind, legacy_files)  # nothing appeared there meanwhile
        if os.path.lexists(target):
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "d")
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old / "d", target)  # put the old folder back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
