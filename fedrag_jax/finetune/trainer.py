"""The training loop: steps over epochs, evaluation, logs, checkpoints, exact resume.

    for each step:  batch_at(epoch, index) -> shard -> step(state, batch) -> hooks
                    log (JSONL + TensorBoard + tqdm) | eval | checkpoint (async orbax)

Resume is exact: a checkpoint holds the whole TrainState (optimizer state and rng
included) and the data position, and ``batch_at`` is deterministic, so an interrupted and
resumed run ends with the same parameters, bit for bit on CPU, as one that never stopped.

Non-finite steps: the train steps leave the state as it was when a step's loss or gradient
is NaN / inf and say so in their ``nonfinite`` metric. ``nonfinite="stop"`` (the default)
ends the run there with :class:`~fedrag_jax.errors.NonFiniteError` (nothing after the last
good checkpoint is saved); ``"skip"`` goes on and counts them (``nonfinite_steps``). Either
way no checkpoint ever holds a non-finite value (the checkpoint manager refuses one).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from .. import outputs
from ..checkpoint import CheckpointManager
from ..errors import ConfigError, DataError, NonFiniteError, ResumeMismatchError
from ..progress import progress_bar
from ..sharding import shard_batch
from .steps import TrainState, compile_step, place_state

log = logging.getLogger(__name__)

Hook = Callable[[int, TrainState, dict[str, Any]], Any]


class BatchSource(Protocol):
    def __len__(self) -> int:
        """Batches per epoch."""
        ...

    def batch_at(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        """Deterministic: the same (epoch, index) gives the same batch (shuffled by epoch)."""
        ...


@dataclass
class TrainerConfig:
    total_steps: int
    output_dir: str
    eval_every: int = 0  # 0: no periodic evaluation (an eval_fn still runs once at the end)
    checkpoint_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 3
    log_every: int = 1
    progress: bool = True
    resume: bool = True
    plot: bool = True
    name: str = "train"
    # what this run trains (model, data, method settings; JSON-able): a checkpoint written
    # with other settings is refused on resume instead of silently continued
    settings: dict[str, Any] | None = None
    # a step with a NaN / inf loss or gradient (its update is never applied): "stop" the run
    # with NonFiniteError, or "skip" it and count it in the metrics (nonfinite_steps)
    nonfinite: str = "stop"

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ConfigError(f"total_steps={self.total_steps}: train for at least 1 step")
        for field in ("eval_every", "checkpoint_every"):
            if getattr(self, field) < 0:
                raise ConfigError(f"{field}={getattr(self, field)}: use 0 (off) or a positive "
                                  "number of steps")
        if self.log_every < 1:
            raise ConfigError(f"log_every={self.log_every}: log at least every step count >= 1")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints={self.keep_checkpoints}: keep at least 1")
        if self.nonfinite not in ("skip", "stop"):
            raise ConfigError(f"nonfinite={self.nonfinite!r}: choose skip or stop")


class Trainer:
    """Runs ``config.total_steps`` optimizer steps of ``step_fn`` over ``data``.

    ``step_fn(state, batch) -> (state, metrics)``: a jitted step (e.g. from
    :func:`compile_step`); a plain function is jitted here with the state donated (with a
    ``mesh``: compiled for it, and the state placed on it). The state passed in is consumed.
    ``eval_fn(state) -> {name: float}``. ``hooks``: ``hook(step, state, metrics)`` after every
    step (metrics still on device), e.g. to re-index a store; a hook may return a new
    TrainState to continue with. Hooks must not keep the state: the next step donates it.
    A hook with an ``on_start(step, state)`` method has it called once before the first step
    (``step``: the steps already done, > 0 after a resume), to rebuild what it derives from
    the state. Hooks may log with :meth:`log_event`.
    """

    def __init__(self, state: TrainState, step_fn: Callable, data: BatchSource,
                 config: TrainerConfig, *, eval_fn: Callable[[TrainState], dict] | None = None,
                 mesh: jax.sharding.Mesh | None = None, hooks: Sequence[Hook] = ()):
        self.config = config
        self.data = data
        self.eval_fn = eval_fn
        self.mesh = mesh
        self.hooks = tuple(hooks)
        self.steps_per_epoch = len(data)
        if self.steps_per_epoch < 1:
            raise DataError("the training data has no batches; check the dataset and batch size")
        if not hasattr(step_fn, "lower"):  # not jitted yet
            if mesh is None:
                step_fn = jax.jit(step_fn, donate_argnums=0)
            else:
                state = place_state(state, mesh)
                step_fn = compile_step(step_fn, state, data.batch_at(0, 0), mesh)
        self.state = _own_buffers(state)
        self.step_fn = step_fn
        self.output_dir = outputs.out_path(config.output_dir)  # local or gs://
        self.primary = outputs.is_primary()  # one host writes logs and plots
        # open only inside train(): the logs, and the throughput window [start, steps, examples]
        self._jsonl: Any = None
        self._writer: Any = None
        self._tb: Any = None
        self._window: list | None = None
        self._t0 = time.time()
        self._nonfinite_steps = 0  # steps whose update was skipped (restored on resume)
        self._last_ckpt = 0

    @property
    def metrics_path(self):
        return self.output_dir / "metrics.jsonl"

    # --- the loop ---------------------------------------------------------------------------
    def train(self) -> TrainState:
        cfg = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        ckpt = CheckpointManager(self.output_dir / "checkpoints", keep=cfg.keep_checkpoints)
        try:
            return self._train(ckpt)
        finally:
            ckpt.close()

    def _train(self, ckpt: CheckpointManager) -> TrainState:
        from tensorboardX import SummaryWriter

        cfg = self.config
        state, done, (epoch, index) = self._start(ckpt)
        self.state = state  # let go of the template: it may be a whole second copy
        self._truncate_metrics(done)
        for hook in self.hooks:
            if hasattr(hook, "on_start"):
                hook.on_start(done, state)
        if done >= cfg.total_steps:
            log.info("%s: already trained for %d steps (total_steps=%d); nothing to do",
                     cfg.name, done, cfg.total_steps)
            self._plot()
            return state
        self._tb = _TensorBoardDir(self.output_dir / "tensorboard") if self.primary else None
        writer = SummaryWriter(str(self._tb.local), purge_step=done + 1 if done else None) \
            if self._tb is not None else None
        self._jsonl = MetricsLog(self.metrics_path) if self.primary else None
        self._writer = writer
        bar = progress_bar(total=cfg.total_steps, initial=done, desc=cfg.name, unit="step",
                   disable=not (cfg.progress and self.primary), dynamic_ncols=True)
        self._bar = bar
        self._t0 = time.time()
        self._window = [time.perf_counter(), 0, 0]  # start, steps, examples since last log
        pending = None  # the last log step's metrics, still on device
        unchecked = None  # (step, epoch, index, metrics) whose non-finite flag is unread
        last_eval = last_ckpt = None
        self._last_ckpt = done
        try:
            for step in range(done + 1, cfg.total_steps + 1):
                batch = self.data.batch_at(epoch, index)
                batch_epoch, batch_index = epoch, index
                self._window[1] += 1
                self._window[2] += _num_examples(batch)
                if self.mesh is not None:
                    batch = shard_batch(batch, self.mesh)
                state, metrics = self.step_fn(state, batch)
                index += 1
                if index == self.steps_per_epoch:
                    epoch, index = epoch + 1, 0
                for hook in self.hooks:
                    out = hook(step, state, metrics)
                    if isinstance(out, TrainState):
                        state = out
                # Read the previous step's flag and log its metrics now: this step is
                # already queued, so the device is not left idle while we wait for them.
                if unchecked is not None:
                    self._check_finite(*unchecked, pending)
                    unchecked = None
                if pending is not None:
                    self._log_train(*pending)
                    pending = None
                if "nonfinite" in metrics:
                    unchecked = (step, batch_epoch, batch_index, metrics)
                if step % cfg.log_every == 0 or step == cfg.total_steps:
                    pending = (step, batch_epoch, metrics)
                do_eval = self.eval_fn is not None and cfg.eval_every and \
                    step % cfg.eval_every == 0
                do_ckpt = cfg.checkpoint_every and step % cfg.checkpoint_every == 0
                if unchecked is not None and (do_eval or do_ckpt or step == cfg.total_steps):
                    self._check_finite(*unchecked, pending)  # before it is kept
                    unchecked = None
                if pending is not None and (do_eval or do_ckpt):
                    self._log_train(*pending)  # records on disk before the checkpoint
                    pending = None
                if do_eval:
                    self._evaluate(state, step, batch_epoch)
                    last_eval = step
                if do_ckpt:
                    self._save(ckpt, step, state, epoch, index)
                    last_ckpt = self._last_ckpt = step
                bar.update(1)
            if pending is not None:
                self._log_train(*pending)
            if self.eval_fn is not None and last_eval != cfg.total_steps:
                self._evaluate(state, cfg.total_steps, batch_epoch)
            if last_ckpt != cfg.total_steps:
                self._save(ckpt, cfg.total_steps, state, epoch, index)
            ckpt.wait()
        finally:
            bar.close()
            if self._jsonl is not None:
                self._jsonl.close()
            if writer is not None:
                writer.close()
                self._tb.close()
            self._jsonl = self._writer = self._window = None
        self._plot()
        self.state = state
        return state

    def _start(self, ckpt: CheckpointManager) -> tuple[TrainState, int, tuple[int, int]]:
        """(state, steps done, data position): fresh, or from the newest good checkpoint."""
        cfg = self.config
        if ckpt.latest_step() is None:
            return self.state, 0, (0, 0)
        if not cfg.resume:
            raise ConfigError(
                f"{ckpt.directory} holds checkpoints (steps {ckpt.all_steps()}) but "
                "resume=False; set resume=True to continue, or choose an empty output_dir")
        state, meta = ckpt.restore(self.state)  # logs and skips damaged newer steps
        if cfg.settings is not None:
            check_settings((meta.get("config") or {}).get("settings"), cfg.settings,
                           ckpt.directory)
        self._nonfinite_steps = int(meta.get("nonfinite_steps", 0))
        done = int(meta.get("step", ckpt.last_restored_step))
        epoch, index = (int(x) for x in meta["data_position"])
        log.info("%s: resumed from checkpoint step %d (epoch %d, batch %d)",
                 cfg.name, done, epoch, index)
        return state, done, (epoch, index)

    def _check_finite(self, step: int, epoch: int, index: int, metrics: dict[str, Any],
                      pending: tuple | None) -> None:
        """Read step ``step``'s non-finite flag: count it (skip) or end the run (stop)."""
        if not int(jax.device_get(metrics["nonfinite"])):
            return
        self._nonfinite_steps += 1
        if self.config.nonfinite == "skip":
            log.warning("%s step %d: non-finite loss or gradient (batch %d of epoch %d); "
                        "the update was skipped (%d so far)", self.config.name, step, index,
                        epoch, self._nonfinite_steps)
            return
        if pending is not None and pending[0] <= step:  # its record reaches the log first
            self._log_train(*pending)
        if pending is None or pending[0] != step:
            self._log_train(step, epoch, metrics)
        values = {k: _to_python(v) for k, v in jax.device_get(
            {k: metrics[k] for k in ("loss", "grad_norm") if k in metrics}).items()}
        raise NonFiniteError(
            f"{self.config.name} step {step}: the loss or gradient is not finite ({values}; "
            f"batch {index} of epoch {epoch}). Its update was not applied and the last "
            f"checkpoint is step {self._last_ckpt}. Lower the learning rate, check that "
            "batch's data, or set nonfinite=skip to skip such steps and count them")

    # --- logging ----------------------------------------------------------------------------
    def _record(self, record: dict[str, Any]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(record)
        if self._writer is not None:
            split, step = record["split"], record["step"]
            for key, value in record.items():
                if key not in ("split", "step") and isinstance(value, int | float):
                    self._writer.add_scalar(f"{split}/{key}", value, step)

    def log_event(self, step: int, name: str, values: dict[str, Any]) -> None:
        """A ``{"split": name, "step": step, **values}`` record (JSONL and TensorBoard
        ``name/key``), e.g. a store refresh. ``values["seconds"]`` is taken out of the
        training throughput, as evaluation time is."""
        if "seconds" in values and self._window is not None:
            self._window[0] += float(values["seconds"])
        self._record({"split": name, "step": step, **values,
                      "wall_time_s": time.time() - self._t0})

    def _log_train(self, step: int, epoch: int, metrics: dict[str, Any]) -> None:
        values = {k: _to_python(v) for k, v in jax.device_get(metrics).items()}
        start, steps, examples = self._window
        elapsed = max(time.perf_counter() - start, 1e-9)
        record = {"split": "train", "step": step, "epoch": epoch, **values,
                  "steps_per_s": steps / elapsed, "examples_per_s": examples / elapsed,
                  "wall_time_s": time.time() - self._t0}
        if "nonfinite" in values:
            record["nonfinite_steps"] = self._nonfinite_steps
        self._window = [time.perf_counter(), 0, 0]
        self._record(record)
        postfix = {"ex/s": f"{record['examples_per_s']:.1f}"}
        if isinstance(values.get("loss"), float):
            postfix = {"loss": f"{values['loss']:.4g}", **postfix}
        self._bar.set_postfix(postfix, refresh=False)

    def _evaluate(self, state: TrainState, step: int, epoch: int) -> None:
        t = time.perf_counter()
        results = self.eval_fn(state)
        spent = time.perf_counter() - t
        self._window[0] += spent  # evaluation time is not training throughput
        values = {k: _to_python(v) for k, v in jax.device_get(dict(results)).items()}
        self._record({"split": "eval", "step": step, "epoch": epoch, **values,
                      "eval_time_s": spent, "wall_time_s": time.time() - self._t0})
        log.info("%s step %d eval: %s", self.config.name, step, values)

    def _save(self, ckpt: CheckpointManager, step: int, state: TrainState, epoch: int,
              index: int) -> None:
        # the logs reach the disk before the checkpoint that they lead up to
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._writer is not None:
            self._writer.flush()
            self._tb.sync()
        t = time.perf_counter()
        ckpt.save(step, state, {"step": step, "epoch": epoch, "data_position": [epoch, index],
                                "name": self.config.name, "nonfinite_steps": self._nonfinite_steps,
                                "config": dataclasses.asdict(self.config)})
        self._window[0] += time.perf_counter() - t

    def _truncate_metrics(self, done: int) -> None:
        """Drop records past the step we resume from (written after that checkpoint, by a run
        that then died), and a half-written last line, so the log is one unbroken history."""
        if not self.primary or not self.metrics_path.exists():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= done:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        outputs.write_text(self.metrics_path, "".join(line + "\n" for line in keep))

    def _plot(self) -> None:
        if self.config.plot and self.primary and self.metrics_path.exists():
            plot_metrics(read_metrics(self.metrics_path), self.output_dir / "loss.png",
                         title=self.config.name)


# --- outputs ----------------------------------------------------------------------------------
class MetricsLog:
    """``metrics.jsonl``, one JSON record a line. Local: appended to, line by line. On an
    object store, which cannot append, the records are kept and the whole object rewritten
    at each ``flush`` (each checkpoint) and at ``close``: the log is small."""

    def __init__(self, path: Any):
        self.path = path
        self.remote = outputs.is_remote(path)
        if self.remote:
            self._lines = path.read_text().splitlines(keepends=True) if path.exists() else []
        else:
            self._file = open(path, "a")  # closed in close()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        if self.remote:
            self._lines.append(line)
        else:
            self._file.write(line)

    def flush(self) -> None:
        if self.remote:
            outputs.write_text(self.path, "".join(self._lines))
        else:
            self._file.flush()

    def close(self) -> None:
        self.flush()
        if not self.remote:
            self._file.close()


class _TensorBoardDir:
    """Where the SummaryWriter writes: the output folder itself when local; for an object
    store, a local folder whose event files are uploaded at every ``sync`` (tensorboardX
    would need the google-cloud-storage client to write gs:// itself)."""

    def __init__(self, target: Any):
        self.target = target
        self.remote = outputs.is_remote(target)
        self.local = Path(tempfile.mkdtemp(prefix="fedrag-jax-tb-")) if self.remote else \
            Path(os.fspath(target))

    def sync(self) -> None:
        if self.remote:
            outputs.upload_tree(self.local, self.target)

    def close(self) -> None:
        if self.remote:
            self.sync()
            shutil.rmtree(self.local, ignore_errors=True)


# --- helpers ----------------------------------------------------------------------------------
def _own_buffers(state: TrainState) -> TrainState:
    """Commit every leaf to its device, and copy any leaf whose buffer an earlier leaf uses.

    A fresh state's zero counters (step, optimizer counts) can share one cached buffer, and a
    donated argument must not hold the same buffer twice. Committed, because a restored state
    is: the jitted step then compiles once for both (it keys on committedness).
    """
    seen: set[int] = set()

    def own(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.committed:
            x = jax.device_put(x, x.sharding)
        try:
            ptrs = [s.data.unsafe_buffer_pointer() for s in x.addressable_shards]
        except Exception:  # no pointer to compare (e.g. a PRNG key): a copy is always safe
            return jnp.copy(x)
        if seen.intersection(ptrs):
            return jnp.copy(x)
        seen.update(ptrs)
        return x

    return jax.tree.map(own, state)


def _jsonable(value: Any) -> Any:
    """``value`` as a checkpoint's JSON metadata would give it back (tuples as lists)."""
    return json.loads(json.dumps(value, default=str))


def check_settings(saved: Any, settings: Any, where: Any) -> None:
    """Raise :class:`ResumeMismatchError` if checkpoints in ``where`` were written under
    other ``settings`` (the centralized trainer and the federated server both call this).
    Checkpoints that recorded no settings (``saved`` None: an older fedrag-jax) cannot be
    told apart from another run's, and are refused too."""
    if saved is None:
        raise ResumeMismatchError(
            f"{where} holds checkpoints that recorded no run settings (written by an older "
            "fedrag-jax): they cannot be checked against this run. Choose another output_dir "
            f"to start fresh, or delete {where} to start over")
    changed = _changed_settings(saved, _jsonable(settings))
    if changed:
        raise ResumeMismatchError(
            f"{where} holds checkpoints of a run with other settings ("
            + "; ".join(changed[:8]) + (f"; +{len(changed) - 8} more" if len(changed) > 8
                                        else "")
            + "): resuming would mix two runs. Choose another output_dir to start fresh, or "
            f"delete {where} to start over")


def _changed_settings(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two nested settings dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                out.append(f"{name}: {old.get(key, '(absent)')!r} -> "
                           f"{new.get(key, '(absent)')!r}")
            else:
                out += _changed_settings(old[key], new[key], name)
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def _num_examples(batch: dict[str, Any]) -> int:
    """Examples of the batch: its instance weights' length if it has them (a packed RALT
    batch has fewer rows than instances), else its arrays' leading dimension."""
    first = batch.get("weights", next(iter(batch.values()), None))
    return int(np.shape(first)[0]) if first is not None and np.ndim(first) else 0


def _to_python(value: Any) -> Any:
    array = np.asarray(value)
    if array.size == 1:
        return array.item() if array.dtype.kind in "iub" else float(array.reshape(()))
    return array.tolist()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a torn last line is skipped)."""
    records = []
    for line in outputs.out_path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


_NOT_CURVES = {"split", "step", "epoch", "wall_time_s", "eval_time_s", "steps_per_s",
               "examples_per_s"}


def plot_metrics(records: Iterable[dict[str, Any]], path: str | os.PathLike,
                 title: str = "") -> None:
    """Train loss vs step, and each eval metric vs step, to a PNG (Agg, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = list(records)
    train = [r for r in records if r.get("split") == "train" and _finite(r.get("loss"))]
    evals = [r for r in records if r.get("split") == "eval"]
    eval_keys = sorted({k for r in evals for k, v in r.items()
                        if k not in _NOT_CURVES and _finite(v)})
    fig = Figure(figsize=(10 if eval_keys else 6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if eval_keys else 1, squeeze=False)[0]
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    axes[0].set(xlabel="step", ylabel="loss", title=f"{title} train loss".strip())
    if eval_keys:
        for key in eval_keys:
            points = [(r["step"], r[key]) for r in evals if _finite(r.get(key))]
            axes[1].plot(*zip(*points, strict=True), marker="o", label=key)
        axes[1].set(xlabel="step", title=f"{title} eval".strip())
        axes[1].legend()
    with outputs.open_atomic(path, "wb") as f:  # local or gs://
        fig.savefig(f, format="png", dpi=100)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
