"""Refresh the LSR candidates (and the knowledge store) while the retriever trains.

LSR scores a fixed set of top-k candidates per query, and its loss constrains the query
tower's scores only *among* them: left alone, the query embeddings drift until passages
that were never scored outrank the candidates, and recall over the whole store falls even as
the loss falls. RA-DIT retrieves with the current query encoder; we approximate that every
``lsr.refresh_every`` steps by re-retrieving each training query's top-k with the current
query tower (LM-scoring only the pairs not scored before: the generator is frozen).

When the context tower trains too, the store's embeddings (and the index built on them)
describe an older model; following REPLUG (Shi et al. 2023, "REPLUG: Retrieval-Augmented
Black-Box Language Models", sec. 4: the index is recomputed every T training steps) and
RA-DIT's asynchronous index refresh, the refresh first re-encodes every passage with the
current context tower and rebuilds the index (ScaNN or exact, as configured), also once
after the last step. So the :class:`IndexRefresher` hook, when due:

    1. (context tower trained) re-encodes the corpus, rebuilds the index -> ``reindex(towers)``
    2. re-retrieves the candidates with the current query tower           -> ``rebuild(towers)``

and logs a ``{"split": "reindex" | "refresh", "step", "seconds"}`` record. The refresher is
also the trainer's data source, so the swap is seen by the next ``batch_at``. The dataset
keeps its size and shapes, so the jitted step does not recompile.

Resume: after a restart from step ``s`` the store is rebuilt from the restored state. That is
the state the last refresh used when ``s`` is a refresh step (``checkpoint_every`` a multiple
of ``refresh_every``), and then the resumed run is exact; otherwise the index is one from
step ``s`` rather than from the last refresh step before it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import ConfigError
from .batches import LSRDataset
from .steps import Towers, TrainState

log = logging.getLogger(__name__)


class IndexRefresher:
    """A trainer hook and data source: refreshes the store and the LSR candidates.

    ``reindex(towers)``: re-encode the corpus with ``towers.context_tower`` and install the
    new store; None when the context tower is frozen (the store stays valid, only the
    candidates are refreshed). ``rebuild(towers) -> LSRDataset``: the training candidates
    retrieved from the (refreshed) store with the current query tower. Neither may keep
    ``towers``: its arrays are donated at the next step.
    """

    def __init__(self, data: LSRDataset, *, every: int, total_steps: int,
                 reindex: Callable[[Towers], Any] | None,
                 rebuild: Callable[[Towers], LSRDataset]):
        if every < 0:
            raise ConfigError(f"lsr.refresh_every={every}: use 0 (only after the last step) "
                              "or a positive number of steps")
        self.data = data
        self.every = every
        self.total_steps = total_steps
        self.reindex = reindex
        self.rebuild = rebuild
        self.trainer: Any = None  # set to the Trainer to log refresh events
        self.refreshed_at: list[int] = []  # steps whose state the refreshes used
        self.event = "reindex" if reindex is not None else "refresh"

    # --- the data source the trainer reads ---------------------------------------------------
    def __len__(self) -> int:
        return len(self.data)

    def batch_at(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        return self.data.batch_at(epoch, index)

    # --- the hook -----------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        # after the last step only a store has something left to refresh
        last = step == self.total_steps and self.reindex is not None
        return last or (self.every > 0 and step % self.every == 0 and step < self.total_steps)

    def refresh(self, step: int, state: TrainState) -> float:
        """Rebuild the store (and, unless training is over, the candidates); seconds taken."""
        start = time.perf_counter()
        towers = state.model()
        if self.reindex is not None:
            self.reindex(towers)
        if step < self.total_steps:  # no batch follows the last step
            data = self.rebuild(towers)
            if len(data) != len(self.data):
                raise ConfigError(f"the refreshed LSR data has {len(data)} batches, not "
                                  f"{len(self.data)}; the records must not change mid-run")
            self.data = data
        self.refreshed_at.append(step)
        return time.perf_counter() - start

    def __call__(self, step: int, state: TrainState, metrics: Any) -> None:
        if not self.due(step):
            return
        seconds = self.refresh(step, state)
        log.info("step %d: %s in %.2fs", step, "re-indexed the store and re-retrieved the "
                 "candidates" if self.reindex else "re-retrieved the candidates", seconds)
        if self.trainer is not None:
            self.trainer.log_event(step, self.event, {"seconds": seconds})

    def on_start(self, step: int, state: TrainState) -> None:
        """After a resume: the store and the candidates from the restored towers."""
        if step >= self.total_steps and self.reindex is None:
            return  # finished, and nothing derived from the state lives outside it
        if step > 0 and (self.every > 0 and step >= self.every or step >= self.total_steps):
            seconds = self.refresh(step, state)
            log.info("resumed at step %d: re-indexed the store in %.2fs", step, seconds)
