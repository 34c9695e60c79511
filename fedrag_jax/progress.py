"""Progress of long loops: a bar on a terminal, a readable line every few seconds in a log.

Every loop that shows progress uses :func:`progress_bar` (the subset of tqdm's interface the
code needs). On a terminal it is tqdm's bar. Without one (a log file, CI, a TPU VM's
captured output) tqdm would print a line per update, thousands per run; instead a line such
as ``encoding passages: 1,280/10,033 (13%) 41.2 passage/s, 3m32s left`` goes to stderr at
most every ``FEDRAG_JAX_PROGRESS_SECONDS`` (default 30) seconds, plus one when it finishes.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("FEDRAG_JAX_PROGRESS_SECONDS", "30")))
    except ValueError:
        return 30.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class LogProgress:
    """tqdm's interface, printing a line at most every ``interval`` seconds."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it",
                 initial: int = 0, disable: bool = False, interval: float | None = None,
                 file: TextIO | None = None, clock=time.monotonic, **_: Any):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.disable = disable
        self.interval = _interval() if interval is None else interval
        self.file = file
        self._clock = clock
        self._start = self._last = clock()
        self._first = initial
        self._postfix = ""
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable:
            return
        now = self._clock()
        if now - self._last >= self.interval and not self._done():
            self._emit(now)

    def _done(self) -> bool:
        return self.total is not None and self.n >= self.total

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self._postfix = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in items.items())

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def line(self, now: float) -> str:
        elapsed = max(now - self._start, 1e-9)
        rate = (self.n - self._first) / elapsed
        count = f"{self.n:,}"
        parts = []
        if self.total:
            count += f"/{self.total:,} ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.3g} {self.unit}/s" if rate > 0 else f"{_duration(elapsed)}")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"{_duration((self.total - self.n) / rate)} left")
        elif self._done():
            parts.append(f"in {_duration(elapsed)}")
        if self._postfix:
            parts.append(self._postfix)
        return f"{self.desc}: {count} " + ", ".join(parts)

    def _emit(self, now: float) -> None:
        self._last = now
        print(self.line(now), file=self.file or sys.stderr, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.disable and self.n > self._first:
            self._emit(self._clock())

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def interactive(stream: TextIO | None = None) -> bool:
    """Whether progress goes to a terminal (then a live bar is useful)."""
    stream = stream or sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(total: int | None = None, *, desc: str = "", unit: str = "it",
                 initial: int = 0, disable: bool = False, **kwargs: Any):
    """tqdm's bar on a terminal, :class:`LogProgress` lines otherwise."""
    if interactive():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=disable,
                    **kwargs)
    return LogProgress(total=total, desc=desc, unit=unit, initial=initial, disable=disable,
                       **kwargs)
