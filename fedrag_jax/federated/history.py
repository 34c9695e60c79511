"""What a federated run remembers: per-round client results, and per-round checkpoints.

A :class:`RoundRecord` holds, for one round, every client update that was aggregated (its
real training loss and example count), the clients that were rejected (invalid payload)
or failed (raised), whether the round aggregated at all, and the clients' evaluation of the
new global params. Both engines write the same records.

The server checkpoints after every round (orbax, through :class:`CheckpointManager`): the
global params, the server optimizer's moments (FedAdam/FedYogi), the history and the run's
settings, so a run resumes after the last completed round, and only under the settings that
wrote it (the centralized trainer's check: :func:`finetune.trainer.check_settings`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from .. import outputs
from ..checkpoint import CheckpointManager
from ..errors import ConfigError, WeightMismatchError

log = logging.getLogger(__name__)


@dataclass
class ClientResult:
    client_id: int | str  # "node <id>" when a node never said which client it is
    num_examples: int  # the FedAvg weight: examples the client holds
    train_loss: float  # mean of its real local step losses
    examples_seen: int = 0
    steps: int = 0
    learning_rates: list[float] = field(default_factory=list)  # of each local step


@dataclass
class RoundRecord:
    round: int
    clients: list[ClientResult] = field(default_factory=list)  # aggregated updates
    rejected: list[dict[str, Any]] = field(default_factory=list)  # {client_id, reason}
    failed: list[dict[str, Any]] = field(default_factory=list)  # {client_id, reason}
    aggregated: bool = False
    note: str = ""
    evaluation: list[dict[str, Any]] = field(default_factory=list)  # {client_id, eval_loss, n}
    seconds: float = 0.0
    update_norm: float | None = None  # ||new global params - old|| (None: not aggregated)
    # each aggregated client's params ({path: array}); only when asked for, never saved
    client_params: dict[int | str, dict[str, np.ndarray]] | None = field(default=None, repr=False)

    @property
    def train_loss(self) -> float | None:
        """Example-weighted mean of the aggregated clients' training losses."""
        n = sum(c.num_examples for c in self.clients)
        return sum(c.train_loss * c.num_examples for c in self.clients) / n if n else None

    @property
    def eval_loss(self) -> float | None:
        n = sum(e["num_examples"] for e in self.evaluation)
        return (sum(e["eval_loss"] * e["num_examples"] for e in self.evaluation) / n
                if n else None)

    def losses(self) -> dict[int | str, float]:
        return {c.client_id: c.train_loss for c in self.clients}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(dataclasses.replace(self, client_params=None))
        d.pop("client_params")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundRecord:
        d = dict(d)
        d["clients"] = [ClientResult(**c) for c in d.get("clients", [])]
        return cls(**d)


@dataclass
class FederatedResult:
    params: Any  # the final global trainable params: an nnx.State of host (numpy) arrays
    history: list[RoundRecord]
    engine: str
    strategy: str

    def __post_init__(self) -> None:
        # host arrays: the SPMD engine's live on its clients mesh, which the caller's
        # model and mesh know nothing about
        self.params = jax.device_get(self.params)

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "strategy": self.strategy,
                "rounds": [r.to_dict() for r in self.history]}


class RoundCheckpoints:
    """Per-round server checkpoints under ``directory``; step number = completed round.

    ``settings``: what decides the run's trajectory (``finetune.manager.run_settings``);
    saved with every round and compared on resume."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3,
                 settings: dict[str, Any] | None = None):
        self.directory = outputs.out_path(directory)  # local or gs://
        self.manager = CheckpointManager(self.directory, keep=keep, async_save=False)
        self.settings = settings

    def save(self, round_: int, params: Any, server_state: dict | None,
             history: list[RoundRecord], strategy: str, engine: str) -> None:
        state = {"params": params, "server": server_state or {}}
        meta = {"round": round_, "strategy": strategy, "engine": engine,
                "history": [r.to_dict() for r in history]}
        if self.settings is not None:
            meta["settings"] = self.settings
        self.manager.save(round_, jax.device_get(state), meta)  # every process
        if outputs.is_primary():
            outputs.write_text(self.directory / "history.json", json.dumps(meta, indent=1))

    def restore(self, params_template: Any, server_template: dict | None, strategy: str
                ) -> tuple[int, Any, dict | None, list[RoundRecord]] | None:
        """(round, params, server_state, history) of the newest good checkpoint, or None."""
        if self.manager.latest_step() is None:
            return None
        from ..finetune.trainer import check_settings

        template = {"params": params_template, "server": server_template or {}}
        try:
            state, meta = self.manager.restore(template)
        except WeightMismatchError as e:
            raise ConfigError(f"the federated checkpoint in {self.directory} does not fit this "
                              f"run (strategy {strategy!r}): {e}; use another checkpoint "
                              "directory or the same model, trainable filter and strategy") from e
        if meta.get("strategy") != strategy:
            raise ConfigError(f"the federated checkpoint in {self.directory} was written with "
                              f"strategy {meta.get('strategy')!r}, this run uses {strategy!r}; "
                              "use another checkpoint directory")
        if self.settings is not None:
            check_settings(meta.get("settings"), self.settings, self.directory)
        history = [RoundRecord.from_dict(r) for r in meta.get("history", [])]
        log.info("resuming federated run after round %d from %s", meta["round"], self.directory)
        return int(meta["round"]), state["params"], state["server"] or None, history

    def close(self) -> None:
        self.manager.close()


def server_template(strategy: str, params: Any) -> dict | None:
    """The server optimizer's state, shaped like the params (FedAdam/FedYogi), or None."""
    if strategy in ("fedadam", "fedyogi"):
        zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), params)
        return {"m": zeros, "v": jax.tree.map(np.copy, zeros)}
    return None


def open_run(task: Any, checkpoint_dir: str | os.PathLike | None, resume: bool
             ) -> tuple[RoundCheckpoints | None, int, Any, dict | None, list[RoundRecord]]:
    """(checkpoints, last completed round, params, server state, history) to start from."""
    params = task.initial_params()
    server = server_template(task.strategy, params)
    if checkpoint_dir is None:
        return None, 0, params, server, []
    ckpt = RoundCheckpoints(checkpoint_dir, settings=getattr(task, "settings", None))
    if resume:
        restored = ckpt.restore(params, server, task.strategy)
        if restored is not None:
            return (ckpt, *restored)
    return ckpt, 0, params, server, []
