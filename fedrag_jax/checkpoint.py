"""Orbax checkpoints of a :class:`TrainState`, with an integrity manifest per step.

Each step directory holds three orbax items: ``state`` (every array leaf of the state, in a
flat dict keyed by its pytree path), ``metadata`` (the caller's JSON dict: data position,
epoch, config, ...) and ``layout`` (path -> shape, dtype, to check a template against).
Once orbax has written a step, and *before* it renames the step directory into place, a
manifest (``integrity.json``: sha256 and size of every file) is written into it, so a
finished step always has one. ``restore`` checks it: a truncated, edited or missing file (or
a missing manifest) raises :class:`CorruptCheckpointError`, and without an explicit step the
newest good earlier step is used instead, with a warning.

Nothing is pickled: arrays go through orbax (tensorstore), the rest through JSON.

``directory`` may be local or ``gs://...``: paths are ``etils.epath`` paths (orbax's own), and
every process of a multi-host run takes part in saving (orbax coordinates them); only the
first writes the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from . import outputs
from .errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    NonFiniteError,
    WeightMismatchError,
)

log = logging.getLogger(__name__)

MANIFEST = "integrity.json"
# orbax rewrites its step metadata (timestamps) after our manifest is written: for it the
# manifest only records that it exists and must parse as JSON
_MUTABLE = frozenset({"_CHECKPOINT_METADATA"})
FORMAT_VERSION = 1
# orbax writes a step into "<step>.orbax-checkpoint-tmp" and renames it when finalized
_ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"


# --- the state as a flat dict of arrays -----------------------------------------------------
def _key_name(entry: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def flatten_state(tree: Any) -> tuple[dict[str, Any], Any]:
    """``{"params.query_tower.pooler.kernel.value": leaf, ...}`` and the treedef.

    Keyed by path, never by leaf order, so a template whose structure differs is caught.
    """
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat: dict[str, Any] = {}
    for path, leaf in with_path:
        name = ".".join(_key_name(e) for e in path)
        if name in flat:
            raise ConfigError(f"two state leaves share the checkpoint name {name!r}; rename one "
                              "of the modules (names must not contain '.')")
        flat[name] = leaf
    return flat, treedef


def _to_saveable(leaf: Any) -> Any:
    if _is_key(leaf):  # typed PRNG keys: save the raw key data, re-wrap on restore
        return jax.random.key_data(leaf)
    return leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)


def _key_impl(leaf: Any) -> Any:
    if isinstance(leaf, jax.Array):
        return jax.random.key_impl(leaf)
    return leaf.dtype._impl  # an abstract key (ShapeDtypeStruct): the impl rides on its dtype


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
    """Restore target for one template leaf: its shape, dtype and sharding."""
    sharding = getattr(leaf, "sharding", None) or jax.sharding.SingleDeviceSharding(
        jax.devices()[0])
    if _is_key(leaf):
        shape = jax.eval_shape(jax.random.key_data, leaf)
        # a key's sharding covers its leading dims; the trailing key-data dim is replicated
        return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding)
    if not hasattr(leaf, "dtype"):
        leaf = np.asarray(leaf)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_leaves(flat: dict[str, Any]) -> list[str]:
    """The names of the floating-point leaves that hold NaN or inf (one device reduction for
    the device arrays, NumPy for host ones)."""
    floats = {k: v for k, v in flat.items() if hasattr(v, "dtype") and not _is_key(v)
              and jnp.issubdtype(v.dtype, jnp.inexact)}
    bad = [k for k, v in floats.items() if not isinstance(v, jax.Array)
           and not np.isfinite(np.asarray(v)).all()]
    groups: dict[frozenset, list[str]] = {}  # one reduction per set of devices
    for k, v in floats.items():
        if isinstance(v, jax.Array):
            groups.setdefault(frozenset(v.sharding.device_set), []).append(k)
    for names in groups.values():
        ok = np.asarray(jax.device_get(_all_finite([floats[k] for k in names])))
        bad += [k for k, good in zip(names, ok, strict=True) if not good]
    return sorted(bad)


def _layout(flat: dict[str, Any]) -> dict[str, list]:
    return {k: [list(v.shape), str(v.dtype)] for k, v in flat.items()}


# --- integrity manifests ----------------------------------------------------------------------
def _sha256(path: epath.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: epath.Path) -> list[str]:
    """Every file under ``step_dir``, as sorted posix paths relative to it (local or gs://;
    walk, not rglob: object stores refuse recursive globs)."""
    base, out = os.fspath(step_dir).rstrip("/"), []
    for root, _, names in step_dir.walk():
        rel_root = os.fspath(root)[len(base):].strip("/")
        out += [f"{rel_root}/{n}" if rel_root else n for n in names]
    return sorted(out)


def write_manifest(step_dir: str | os.PathLike, step: int) -> None:
    """Hash every file under ``step_dir`` into ``step_dir/integrity.json`` (atomically)."""
    step_dir = outputs.out_path(step_dir)
    files = {}
    for rel in _files(step_dir):
        if rel == MANIFEST or rel.startswith(f".{MANIFEST}"):
            continue
        path = step_dir / rel
        files[rel] = ({"json": True} if rel in _MUTABLE
                      else {"sha256": _sha256(path), "size": path.stat().length})
    body = json.dumps({"version": FORMAT_VERSION, "step": step, "files": files}, indent=1)
    outputs.write_text(step_dir / MANIFEST, body)


def verify_manifest(step_dir: str | os.PathLike, step: int) -> None:
    """Raise :class:`CorruptCheckpointError` naming the step and file if anything differs.

    Files not in the manifest (orbax's own commit marker, written at the rename) are ignored:
    the restore reads only what the manifest covers.
    """
    step_dir = outputs.out_path(step_dir)
    where = f"checkpoint step {step} in {step_dir}"
    advice = "delete that step directory (or restore an earlier step)"
    try:
        manifest = json.loads((step_dir / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("step") != step or not isinstance(files, dict) or not files:
            raise ValueError("manifest does not describe this step")
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"{where} has no integrity manifest ({MANIFEST}): it was not finished or was "
            f"damaged; {advice}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(
            f"{where}: integrity manifest {MANIFEST} is unreadable ({e}); {advice}") from None
    for rel, expected in files.items():
        path = step_dir / rel
        if not path.is_file():
            raise CorruptCheckpointError(f"{where}: file {rel} is missing; {advice}")
        if expected.get("json"):
            try:
                json.loads(path.read_bytes())
            except ValueError:
                raise CorruptCheckpointError(
                    f"{where}: file {rel} is not valid JSON (damaged); {advice}") from None
            continue
        size = path.stat().length
        if size != expected["size"]:
            raise CorruptCheckpointError(
                f"{where}: file {rel} has {size} bytes, expected {expected['size']} "
                f"(truncated or overwritten); {advice}")
        if _sha256(path) != expected["sha256"]:
            raise CorruptCheckpointError(
                f"{where}: file {rel} fails its sha256 check (edited or damaged); {advice}")


# --- the manager ------------------------------------------------------------------------------
class CheckpointManager:
    """Keep the newest ``keep`` checkpoints of a TrainState under ``directory``.

    ``save`` returns as soon as the arrays are copied off the device (``async_save``); the
    files are written in the background. ``wait()`` blocks until they are on disk.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int | None = 3,
                 async_save: bool = True):
        if keep is not None and keep < 1:
            raise ConfigError(f"keep={keep}: keep at least 1 checkpoint (or None for all)")
        self.directory = outputs.out_path(directory)  # local (absolute) or gs://
        self.async_save = async_save
        self._pending: int | None = None  # step being written in the background
        self.last_restored_step: int | None = None
        # Always an AsyncCheckpointer (the manifest hook needs one); sync = save + wait.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_manifest))
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "metadata", "layout"))

    # -- writing -------------------------------------------------------------------------------
    def save(self, step: int, state: Any, metadata: dict | None = None) -> None:
        """Checkpoint ``state`` (any pytree of arrays, e.g. a TrainState) as ``step``.

        ``metadata`` must be JSON-serialisable (data position, epoch, config, ...). A state
        holding NaN or inf is refused (:class:`NonFiniteError`): it would pass the integrity
        check, be resumed from and evict good checkpoints.
        """
        self.wait()  # one save in flight at a time (orbax would wait here anyway)
        step = int(step)
        flat, _ = flatten_state(state)
        bad = nonfinite_leaves(flat)
        if bad:
            raise NonFiniteError(
                f"refusing to checkpoint step {step} in {self.directory}: "
                + ", ".join(repr(k) for k in bad[:5]) + (f" (+{len(bad) - 5} more)" if
                                                          len(bad) > 5 else "")
                + " hold NaN or inf; the earlier checkpoints are kept")
        self._clear_newer(step)
        flat = {k: _to_saveable(v) for k, v in flat.items()}
        try:
            meta_json = json.loads(json.dumps(metadata or {}))
        except TypeError as e:
            raise ConfigError(f"checkpoint metadata must be JSON-serialisable: {e}") from None
        layout = {"version": FORMAT_VERSION, "leaves": _layout(flat)}
        self._pending = step
        saved = self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(flat), metadata=ocp.args.JsonSave(meta_json),
            layout=ocp.args.JsonSave(layout)), force=True)
        if not saved:  # orbax declines silently; we do not
            raise ConfigError(f"orbax declined to save step {step} in {self.directory}")
        if not self.async_save:
            self.wait()

    def _write_manifest(self) -> None:
        """orbax's post-finalization hook: runs before the tmp dir is renamed into place."""
        step = self._pending
        if step is None or not outputs.is_primary():
            return
        tmp = self.directory / f"{step}{_ORBAX_TMP_SUFFIX}"
        step_dir = tmp if tmp.is_dir() else self._step_dir(step)
        write_manifest(step_dir, step)

    def _clear_newer(self, step: int) -> None:
        """Move damaged steps >= ``step`` aside (after a fallback they would block the save);
        refuse to overwrite good ones."""
        newer = [s for s in self.all_steps() if s >= step]
        for s in newer:
            try:
                verify_manifest(self._step_dir(s), s)
            except CorruptCheckpointError:
                self._quarantine(s)
                continue
            raise ConfigError(
                f"checkpoint step {s} already exists in {self.directory} and is not older than "
                f"step {step}; resume from it, or use another output directory")

    def _quarantine(self, step: int) -> None:
        dest_root = self.directory.parent / f"{self.directory.name}-corrupt"
        dest_root.mkdir(parents=True, exist_ok=True)
        dest, n = dest_root / str(step), 1
        while dest.exists():
            dest, n = dest_root / f"{step}-{n}", n + 1
        self._step_dir(step).rename(dest)  # local: one rename; gs://: copy, then delete
        log.warning("moved damaged checkpoint step %d to %s", step, dest)
        self._manager.reload()

    def wait(self) -> None:
        """Block until every started save is on disk (manifest included)."""
        self._manager.wait_until_finished()
        self._pending = None

    # -- reading -------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Finished steps on disk, oldest first (damaged ones included)."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def verify(self, step: int) -> None:
        """Raise :class:`CorruptCheckpointError` if ``step`` is damaged."""
        verify_manifest(self._step_dir(step), step)

    def restore(self, state_template: Any, step: int | None = None) -> tuple[Any, dict]:
        """Read a checkpoint into the structure, dtypes and shardings of ``state_template``.

        ``step=None``: the newest step that passes its integrity check (damaged newer ones
        are logged and skipped). An explicit ``step`` is never substituted.
        Returns ``(state, metadata)``.
        """
        self.wait()
        steps = self.all_steps()
        if not steps:
            raise CheckpointNotFoundError(
                f"no checkpoint in {self.directory}; train first or point at another directory")
        if step is not None:
            if step not in steps:
                raise CheckpointNotFoundError(
                    f"no checkpoint step {step} in {self.directory}; it has steps {steps}")
            self.verify(step)
            return self._restore(state_template, step)
        failures: list[str] = []
        for s in reversed(steps):
            try:
                self.verify(s)
            except CorruptCheckpointError as e:
                log.warning("%s; falling back to an earlier checkpoint", e)
                failures.append(str(e))
                continue
            if failures:
                log.warning("restoring checkpoint step %d (newer steps are damaged)", s)
            return self._restore(state_template, s)
        raise CorruptCheckpointError(
            f"every checkpoint in {self.directory} is damaged: " + " | ".join(failures))

    def _restore(self, template: Any, step: int) -> tuple[Any, dict]:
        t_flat, treedef = flatten_state(template)
        target = {k: _abstract(v) for k, v in t_flat.items()}
        saved = self._manager.restore(step, args=ocp.args.Composite(
            layout=ocp.args.JsonRestore()))["layout"]["leaves"]
        _check_layout(saved, _layout(target), step)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), metadata=ocp.args.JsonRestore(),
            layout=ocp.args.JsonRestore()))
        arrays = restored["state"]
        leaves = []
        for name, leaf in t_flat.items():
            value = arrays[name]
            if _is_key(leaf):
                value = jax.random.wrap_key_data(value, impl=_key_impl(leaf))
            leaves.append(value)
        self.last_restored_step = step
        return jax.tree_util.tree_unflatten(treedef, leaves), dict(restored["metadata"] or {})

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        self.wait()
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_layout(saved: dict[str, list], wanted: dict[str, list], step: int) -> None:
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    changed = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
    if missing or extra or changed:
        def few(names: Sequence[str] | Iterable[str]) -> str:
            names = list(names)
            return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
        detail = "; ".join(part for part in (
            missing and f"not in the checkpoint: {few(missing)}",
            extra and f"only in the checkpoint: {few(extra)}",
            changed and "shape/dtype differ: " + few(
                f"{k} {saved[k]} vs {wanted[k]}" for k in changed)) if part)
        raise WeightMismatchError(
            f"checkpoint step {step} does not fit the state template ({detail}); build the "
            "state with the model, trainable filter and optimizer the checkpoint was saved with")
