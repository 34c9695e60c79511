"""What travels between server and clients: the trainable parameters, keyed by pytree path.

Only ``TrainState.params`` (the trainable subset: the query tower, or the LoRA adapters)
crosses the wire, as a flat dict ``{"query_tower/layers/0/attn/query/kernel": array}``.
Keys are pytree *paths*, never leaf positions, so a payload built from a model whose
structure differs cannot be silently poured into the wrong leaves.

Two encodings of the same flat dict:
    encode / decode                 msgpack bytes (orbax's msgpack utilities; no pickle)
    to_arrayrecord / from_arrayrecord   a Flower ``ArrayRecord`` (Message API), which the
                                    ``flwr.serverapp.strategy`` strategies aggregate

Whatever is received is validated against a template (the receiver's own params): the
same key set, shapes and dtypes, and finite values. Any failure raises
:class:`PayloadError` saying what was wrong.

Row-sparse uploads: a client's update of a large matrix often touches few of its rows (a
word-embedding table: only the rows of the tokens its batches held get a gradient, and with
a fresh optimizer state each round the other rows stay bitwise equal to the global params).
``to_arrayrecord(params, base=received)`` then sends only the changed rows of such a leaf,
as ``path`` (the rows' values) and ``path#rows`` (their indices); ``read_arrayrecord(...,
row_sparse=True)`` reads them back as a :class:`RowUpdate`. It is exact (changed rows are
found by comparing values), and the server asks for it only where it averages the replies
itself (FedAvg / FedProx without DP, ``server.py``).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import jax
import ml_dtypes
import numpy as np
from orbax.checkpoint import msgpack_utils

from ..errors import PayloadError

FORMAT = "fedrag-jax/params"
VERSION = 1
# Flower's Array serializes through np.save, which cannot name ml_dtypes (bfloat16 comes
# back as raw void bytes): such leaves travel as float32 (exact) and are cast back.
_WIRE_DTYPE = {np.dtype(ml_dtypes.bfloat16): np.dtype(np.float32)}
_NUMPY_STYPE = "numpy.ndarray"  # flwr.common.constant.SType.NUMPY: the Array holds .npy bytes
ROWS = "#rows"  # key suffix of a row-sparse leaf's row indices ('#' is never in a path)
SPARSE_MIN_ROWS = 1024  # smaller matrices always travel whole


@dataclass(frozen=True)
class RowUpdate:
    """A received leaf of which only some rows travelled: ``values[i]`` is row ``rows[i]``
    (sorted, distinct); every other row equals the params the sender received."""

    rows: np.ndarray
    values: np.ndarray

    def dense(self, base: np.ndarray) -> np.ndarray:
        """The whole leaf: ``base`` (what the sender received) with the sent rows."""
        out = np.array(base, dtype=self.values.dtype)
        out[self.rows] = self.values
        return out


def changed_rows(value: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Indices of the rows of ``value`` that differ from ``base`` (NaN counts as changed)."""
    rows = len(value)
    return np.flatnonzero((value != base).reshape(rows, -1).any(axis=1)).astype(np.int32)


# --- paths ---------------------------------------------------------------------------------
def _entry_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _flatten(tree: Any) -> tuple[dict[str, Any], Any]:
    """``{path: leaf}`` in leaf order, and the treedef. An nnx.Variable's trailing ``value``
    attribute is not part of the name ("…/kernel", not "…/kernel/value")."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat: dict[str, Any] = {}
    for path, leaf in with_path:
        entries = list(path)
        if entries and isinstance(entries[-1], jax.tree_util.GetAttrKey) \
                and entries[-1].name == "value":
            entries = entries[:-1]
        name = "/".join(_entry_name(e) for e in entries)
        if name in flat:
            raise PayloadError(f"two parameters share the payload key {name!r}; module and "
                               "attribute names must not contain '/'")
        flat[name] = leaf
    return flat, treedef


def flatten_params(params: Any) -> dict[str, np.ndarray]:
    """``nnx.State`` (or any pytree of arrays) -> ``{path: host ndarray}``."""
    flat, _ = _flatten(params)
    return {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}


def wire_flat(params: Any) -> dict[str, np.ndarray]:
    """``{path: host ndarray}`` at the dtypes they travel in (bfloat16 -> float32): what the
    receiver of ``to_arrayrecord(params)`` reads."""
    return {k: v.astype(_WIRE_DTYPE[v.dtype]) if v.dtype in _WIRE_DTYPE else v
            for k, v in flatten_params(params).items()}


def param_paths(template: Any) -> list[str]:
    return list(_flatten(template)[0])


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")


def _expected(template: Any, wire: bool = False) -> dict[str, tuple[tuple[int, ...], Any]]:
    """``{path: (shape, dtype)}`` of ``template`` (``wire``: dtypes as they travel)."""
    out = {}
    for key, leaf in _flatten(template)[0].items():
        dtype = np.dtype(leaf.dtype)
        out[key] = (tuple(leaf.shape), _WIRE_DTYPE.get(dtype, dtype) if wire else dtype)
    return out


def _non_finite(values: np.ndarray) -> int:
    """How many NaN / inf values ``values`` holds (0 for integer arrays)."""
    if not jax.dtypes.issubdtype(values.dtype, np.inexact):
        return 0
    finite = np.isfinite(values.astype(np.float32) if values.dtype.itemsize < 4 else values)
    return 0 if finite.all() else int((~finite).sum())


_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (pid that made it, pool)
# threads pay off on items of >= 1 MiB adding up to >= 16 MiB: numpy holds the GIL for
# the call overhead of small arrays (LoRA's 240 small leaves gain nothing on two threads)
_PARALLEL_MIN_ITEM, _PARALLEL_MIN_BYTES = 2**20, 16 * 2**20


def map_arrays(fn: Callable[[Any], Any], items: list[Any], sizes: list[int]) -> list[Any]:
    """``[fn(x) for x in items]``, on a few threads when there is enough to do (``sizes``:
    the bytes each item reads). A round's array work (NaN checks, the weighted mean) is
    memory-bound numpy that releases the GIL, so a second core nearly halves it on large
    arrays; the items go to the threads in a few size-balanced groups. The results are the
    same as one thread's. ``fn`` must not call map_arrays itself (the pool's threads would
    wait on each other)."""
    global _POOL
    workers = min(4, os.cpu_count() or 1)
    large = sum(size for size in sizes if size >= _PARALLEL_MIN_ITEM)
    if len(items) < 2 or workers < 2 or large < _PARALLEL_MIN_BYTES:
        return [fn(x) for x in items]
    if _POOL is None or _POOL[0] != os.getpid():  # a forked child has no worker threads
        _POOL = (os.getpid(), ThreadPoolExecutor(workers, thread_name_prefix="fedrag-payload"))
    groups: list[list[int]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for i in sorted(range(len(items)), key=lambda i: -sizes[i]):  # largest first
        least = loads.index(min(loads))
        groups[least].append(i)
        loads[least] += sizes[i]
    out: list[Any] = [None] * len(items)

    def run(group: list[int]) -> None:
        for i in group:
            out[i] = fn(items[i])

    list(_POOL[1].map(run, [g for g in groups if g]))  # re-raises a worker's exception
    return out


def non_finite_key(flat: Mapping[str, Any]) -> str | None:
    """The first key of ``flat`` whose values (or sent rows) are not all finite, or None."""
    keys = list(flat)
    values = [v.values if isinstance(v, RowUpdate) else v for v in flat.values()]
    bad_counts = map_arrays(_non_finite, values, [v.nbytes for v in values])
    for key, bad in zip(keys, bad_counts, strict=True):
        if bad:
            return key
    return None


def _check_flat(flat: Mapping[str, Any], expected: Mapping[str, tuple[tuple[int, ...], Any]],
                check_finite: bool = True) -> None:
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    if missing or extra:
        parts = [f"missing keys: {_few(missing)}" if missing else "",
                 f"extra keys: {_few(extra)}" if extra else ""]
        raise PayloadError("payload does not match the model's trainable parameters ("
                           + "; ".join(p for p in parts if p) + "); client and server must "
                           "build the model with the same architecture and trainable filter")
    for key, (shape, dtype) in expected.items():
        got = flat[key]
        if isinstance(got, RowUpdate):  # rows already checked: check the values
            shape, got = (len(got.rows), *shape[1:]), got.values
        if not isinstance(got, np.ndarray):
            raise PayloadError(f"payload key {key!r} holds a {type(got).__name__}, not an array")
        if tuple(got.shape) != shape:
            raise PayloadError(f"payload key {key!r} has shape {tuple(got.shape)}, expected "
                               f"{shape}")
        if got.dtype != dtype:
            raise PayloadError(f"payload key {key!r} has dtype {got.dtype}, expected {dtype}")
    if not check_finite:
        return
    keys = list(expected)
    values = [flat[k].values if isinstance(flat[k], RowUpdate) else flat[k] for k in keys]
    bad_counts = map_arrays(_non_finite, values, [v.nbytes for v in values])
    for key, bad in zip(keys, bad_counts, strict=True):
        if bad:
            raise PayloadError(f"payload key {key!r} holds {bad} non-finite values (NaN or "
                               "inf); the sender diverged")


def validate_flat(flat: Mapping[str, Any], template: Any) -> None:
    """Raise :class:`PayloadError` unless ``flat`` matches ``template`` key for key:
    same paths, shapes and dtypes, and only finite values."""
    _check_flat(flat, _expected(template))


def unflatten_params(flat: Mapping[str, np.ndarray], template: Any, *,
                     cast: bool = False, copy: bool = True) -> Any:
    """Validate ``flat`` against ``template`` and rebuild the template's pytree from it.

    ``cast=True`` first casts every known key to the template's dtype: for arrays the
    *server* computed (Flower's adaptive strategies work in float64), never for what a
    client sent. ``copy=False`` keeps the arrays of ``flat`` that need no cast (the caller
    owns them and will not write to them).
    """
    names, treedef = _flatten(template)
    if cast:
        flat = {k: (np.asarray(v).astype(names[k].dtype, copy=False) if k in names else v)
                for k, v in flat.items()}
    validate_flat(flat, template)
    keep = np.asarray if not copy else np.array
    return jax.tree_util.tree_unflatten(treedef, [keep(flat[k]) for k in names])


# --- msgpack bytes -------------------------------------------------------------------------
def encode(params: Any) -> bytes:
    """msgpack bytes of ``{"format", "version", "arrays": {path: ndarray}}``."""
    body = {"format": FORMAT, "version": VERSION, "arrays": flatten_params(params)}
    return msgpack_utils.msgpack_serialize(body)


def decode(blob: bytes, template: Any) -> Any:
    """The params ``blob`` encodes, in ``template``'s structure; :class:`PayloadError` if the
    bytes are damaged or do not fit the template (keys, shapes, dtypes, finite values)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise PayloadError(f"payload must be bytes, got {type(blob).__name__}")
    try:
        body = msgpack_utils.msgpack_restore(bytes(blob))
    except Exception as e:  # msgpack raises a zoo of types on damaged input
        raise PayloadError(f"payload is not a valid msgpack parameter blob ({e!r:.200})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise PayloadError(f"payload is not a {FORMAT} blob; was it produced by encode()?")
    if body.get("version") != VERSION:
        raise PayloadError(f"payload version {body.get('version')!r} is not supported "
                           f"(expected {VERSION}); upgrade the older side")
    arrays = body.get("arrays")
    if not isinstance(arrays, dict) or not all(isinstance(k, str) for k in arrays):
        raise PayloadError("payload 'arrays' must map string paths to arrays")
    return unflatten_params(arrays, template)


# --- Flower ArrayRecord --------------------------------------------------------------------
def _npy_array(value: np.ndarray) -> Any:
    """A Flower ``Array`` holding exactly the bytes ``np.save`` would write (what
    ``Array(ndarray)`` stores), joined in one copy instead of np.save's two."""
    from flwr.app import Array

    value = np.ascontiguousarray(value)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header,
                                         np.lib.format.header_data_from_array_1_0(value))
    return Array(dtype=str(value.dtype), shape=tuple(value.shape), stype=_NUMPY_STYPE,
                 data=b"".join((header.getvalue(), value.data)))


def to_arrayrecord(params: Any, *, base: Mapping[str, np.ndarray] | None = None):
    """A Flower ``ArrayRecord`` keyed by path (bfloat16 leaves travel as float32).

    ``base``: the params this sender received, ``{path: array}`` at the wire dtypes (what
    :func:`read_arrayrecord` returns). A float leaf of at least ``SPARSE_MIN_ROWS`` rows of
    which at most half changed then travels row-sparse: its changed rows under ``path`` and
    their indices under ``path#rows``.
    """
    from flwr.app import ArrayRecord

    out = {}
    for key, value in wire_flat(params).items():
        ref = base.get(key) if base is not None else None
        if (ref is not None and value.ndim >= 2 and len(value) >= SPARSE_MIN_ROWS
                and ref.shape == value.shape and jax.dtypes.issubdtype(value.dtype, np.inexact)):
            rows = changed_rows(value, ref)
            if 2 * len(rows) <= len(value):
                out[key], out[key + ROWS] = _npy_array(value[rows]), _npy_array(rows)
                continue
        out[key] = _npy_array(value)
    return ArrayRecord(out)


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array of ``shape``/``dtype``."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
        "shape": tuple(shape)})
    return header.getvalue()


def payload_spec(template: Any) -> dict[str, tuple[tuple[int, ...], np.dtype, bytes]]:
    """``{path: (shape, wire dtype, expected .npy header)}``: what :func:`read_arrayrecord`
    checks replies against; build it once per round, not once per reply."""
    return {key: (shape, dtype, _npy_header(shape, dtype))
            for key, (shape, dtype) in _expected(template, wire=True).items()}


def _npy_view(array: Any, expected: tuple[tuple[int, ...], np.dtype, bytes] | None = None
              ) -> np.ndarray:
    """A read-only view of a Flower ``Array``'s ``.npy`` bytes, without the copy that
    ``Array.numpy()`` (``np.load``) makes: the server reads every reply once to screen it
    and once more to average it, so on large trainable sets the copies were the round's
    overhead. When the bytes start with the ``expected`` header (the usual case) the header
    is not parsed again (numpy parses it with ``ast.literal_eval``: ~30 us a leaf)."""
    if array.stype != _NUMPY_STYPE:
        raise ValueError(f"unsupported serialization type {array.stype!r}")
    data = array.data
    if expected is not None:
        shape, dtype, head = expected
        count = math.prod(shape)
        if data.startswith(head) and len(data) == len(head) + count * dtype.itemsize:
            return np.frombuffer(data, dtype=dtype, count=count, offset=len(head)).reshape(shape)
    header = io.BytesIO(data)
    version = np.lib.format.read_magic(header)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(header)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(header)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    if dtype.hasobject:
        raise ValueError("object arrays are not parameters")
    count = int(np.prod(shape))
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=header.tell())
    return flat.reshape(shape, order="F" if fortran else "C")


def _views(record: Any, spec: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{key: read-only view}`` of every Array of ``record`` (``spec``: expected headers)."""
    flat: dict[str, np.ndarray] = {}
    for key in record.keys():
        try:
            flat[key] = _npy_view(record[key], spec.get(key))
        except Exception as e:  # damaged npy bytes, or a non-numpy stype
            raise PayloadError(f"payload key {key!r} cannot be read as an array ({e!r:.200})") \
                from None
    return flat


def _row_updates(flat: dict[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    """``flat`` with each ``path`` + ``path#rows`` pair joined into a :class:`RowUpdate`
    (the indices checked here, the values by ``_check_flat``)."""
    for key in [k for k in flat if k.endswith(ROWS)]:
        leaf = key[:-len(ROWS)]
        if leaf not in spec or leaf not in flat:
            raise PayloadError(f"payload key {key!r} names no matrix of the model")
        rows, rows_of = flat.pop(key), spec[leaf][0][0]
        if rows.ndim != 1 or rows.dtype != np.int32:
            raise PayloadError(f"payload key {key!r} must be a 1-D int32 array, got "
                               f"{rows.dtype} {rows.shape}")
        if len(rows) and (rows[0] < 0 or rows[-1] >= rows_of or np.any(rows[1:] <= rows[:-1])):
            raise PayloadError(f"payload key {key!r}: row indices must be increasing and "
                               f"within 0..{rows_of - 1}")
        if isinstance(flat[leaf], np.ndarray) and flat[leaf].ndim < 2:
            raise PayloadError(f"payload key {leaf!r}: sent rows of a {flat[leaf].ndim}-D array")
        flat[leaf] = RowUpdate(rows, flat[leaf])
    return flat


def read_arrayrecord(record: Any, template: Any, *,
                     spec: Mapping[str, tuple[tuple[int, ...], np.dtype, bytes]] | None = None,
                     row_sparse: bool = False, check_finite: bool = True) -> dict[str, Any]:
    """``{path: read-only array}`` of a Flower ``ArrayRecord``, validated against
    ``template`` at the wire dtypes (bfloat16 leaves stay float32: cast after averaging).
    The arrays are views into the record's bytes; copy before writing to them. ``spec``:
    :func:`payload_spec` of ``template``, when the caller reads many records.
    ``row_sparse``: accept row-sparse leaves (returned as :class:`RowUpdate`).
    ``check_finite=False`` leaves out the NaN / inf check (the server's FedAvg makes it
    while folding the reply into its mean, see ``server.fold_replies``)."""
    from flwr.app import ArrayRecord

    if not isinstance(record, ArrayRecord):
        raise PayloadError(f"expected a Flower ArrayRecord, got {type(record).__name__}")
    spec = spec if spec is not None else payload_spec(template)
    flat = _views(record, spec)
    if row_sparse:
        flat = _row_updates(flat, spec)
    _check_flat(flat, {key: (shape, dtype) for key, (shape, dtype, _) in spec.items()},
                check_finite)
    return flat


def tree_from_flat(flat: Mapping[str, np.ndarray], template: Any) -> Any:
    """``template``'s pytree of the (validated, dense) ``flat`` arrays at the template's
    dtypes (wire float32 -> bfloat16); an array already at its dtype is not copied."""
    names, treedef = _flatten(template)
    return jax.tree_util.tree_unflatten(
        treedef, [np.asarray(flat[k], dtype=names[k].dtype) for k in names])


def from_arrayrecord(record: Any, template: Any, *, cast: bool = False) -> Any:
    """Params from a Flower ``ArrayRecord``, validated against ``template`` (``cast``: as
    in :func:`unflatten_params`)."""
    from flwr.app import ArrayRecord

    if not isinstance(record, ArrayRecord):
        raise PayloadError(f"expected a Flower ArrayRecord, got {type(record).__name__}")
    if cast:  # a server-computed record (float64 from Flower's adaptive strategies)
        return unflatten_params(_views(record, {}), template, cast=True)
    # views into the message's bytes (a client's local training copies them onto its devices)
    return tree_from_flat(read_arrayrecord(record, template), template)
