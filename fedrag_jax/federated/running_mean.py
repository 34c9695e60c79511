"""FedAvg's weighted mean, folded in as the replies arrive.

    running = RunningMean(base)           # base: the round's global params, {path: array}
    running.add(reply_arrays, n)          # each screened reply, as it comes in
    mean = running.mean()

The server pulls replies while the other clients are still training
(``server.send_and_receive``), checks each one for NaN / inf and adds it to running sums at
once. When the last client answers, only its own reply and the final scaling are left: the
round's critical path holds one reply's work instead of every reply's, and the server holds
the sums rather than all replies (memory O(model), not O(clients x model)).

    mean = (sum_k n_k w_k) / N,   N = sum_k n_k

with the products n_k w_k (exact: a float32 times an integer below 2**29) summed in float64
and the mean rounded once to float32 at the end. Float64 sums make the result independent
of the order the replies arrive in (bitwise for two replies; for more, a float32 rounding
could differ only where the float64 sums of two orders straddle a rounding boundary, about
once in 10**8 values), and one reply's mean is that reply exactly. Flower's FedAvg,
sum_k (n_k / N) w_k in float32, agrees to float32 rounding but not bitwise. Of a leaf that
replies sent row-sparse (:class:`payload.RowUpdate`) only the rows sent are summed,
sum_k n_k (w_k - base), and the mean is base + that / N on those rows, so the rows nobody
changed stay exactly the global ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import PayloadError
from .payload import RowUpdate, map_arrays, non_finite_key


class RunningMean:
    """Example-weighted running mean of client params, ``{path: array}`` at wire dtypes."""

    def __init__(self, base: Mapping[str, np.ndarray] | None = None):
        self.base = base
        self.sums: dict[str, np.ndarray] = {}  # float64 sum_k n_k w_k of whole leaves
        self.weights: dict[str, float] = {}  # ... and their sum_k n_k
        # row-sparse leaves: float64 sum_k n_k (w_k - base) over the rows sent, which rows
        # were sent, and a copy of base for the mean (made while the clients train)
        self.deltas: dict[str, np.ndarray] = {}
        self.touched: dict[str, np.ndarray] = {}
        self.copies: dict[str, np.ndarray] = {}
        self.dtypes: dict[str, np.dtype] = {}  # the whole leaves' wire dtypes
        self.total = 0.0
        self.count = 0

    def add(self, arrays: Mapping[str, Any], num_examples: int) -> str | None:
        """Fold in one screened reply of ``num_examples`` (> 0). Returns the first key
        holding NaN / inf, in which case nothing of the reply was added, else None."""
        if (bad := non_finite_key(arrays)) is not None:
            return bad
        n = np.float64(num_examples)

        def fold(key: str) -> None:
            value = arrays[key]
            if isinstance(value, RowUpdate):
                if self.base is None:
                    raise PayloadError(f"{key!r} was sent row-sparse but no base params "
                                       "were given")
                base = self.base[key]
                if key not in self.deltas:
                    self.deltas[key] = np.zeros(base.shape, np.float64)
                    self.touched[key] = np.zeros(len(base), bool)
                    self.copies[key] = np.array(base)
                self.deltas[key][value.rows] += n * (value.values.astype(np.float64)
                                                     - base[value.rows])
                self.touched[key][value.rows] = True
                return
            self.dtypes.setdefault(key, value.dtype)
            weighted = np.multiply(value, n, dtype=np.float64)  # exact for n < 2**29
            if key in self.sums:
                self.sums[key] += weighted
            else:
                self.sums[key] = weighted
            self.weights[key] = self.weights.get(key, 0.0) + float(n)

        keys = list(arrays)
        sizes = [getattr(arrays[k], "values", arrays[k]).nbytes for k in keys]
        map_arrays(fold, keys, sizes)  # memory-bound numpy: leaves on a few threads
        self.total += float(n)
        self.count += 1
        return None

    def mean(self) -> dict[str, np.ndarray]:
        """The average of what was added (call once: it may reuse the sums). It is
        finite: every value is a convex combination of finite float32 values (the base's
        and the replies'), which float64 sums cannot overflow."""
        if not self.count:
            raise PayloadError("no reply was added to the mean")

        def finish(key: str) -> np.ndarray:
            if key not in self.deltas:
                return self._divide(self.sums[key], key)
            base, delta = self.base[key], self.deltas[key]
            if key in self.sums:  # mixed: (whole replies' sum + the others' base and their
                self.copies.pop(key)  # sent rows' changes) / N
                out = self.sums[key]
                out += base.astype(np.float64) * (self.total - self.weights[key])
                out += delta
                return self._divide(out, key)
            # only rows: base + sum_k (n_k / N) (w_k - base) on the rows sent, the other
            # rows exactly base
            rows = np.flatnonzero(self.touched[key])
            out = self.copies.pop(key)
            out[rows] = base[rows] + delta[rows] / self.total
            return out

        keys = list(dict.fromkeys([*self.sums, *self.deltas]))
        sizes = [self.deltas[k].nbytes if k in self.deltas else self.sums[k].nbytes
                 for k in keys]
        return dict(zip(keys, map_arrays(finish, keys, sizes), strict=True))

    def _divide(self, sums: np.ndarray, key: str) -> np.ndarray:
        """sums / N at the leaf's wire dtype, divided and rounded in one pass (integer
        leaves stay float64, as Flower's do)."""
        dtype = self.dtypes.get(key)
        if dtype is None or not np.issubdtype(dtype, np.inexact):
            return np.divide(sums, self.total, out=sums)
        return np.divide(sums, self.total, out=np.empty(sums.shape, dtype), casting="same_kind")
