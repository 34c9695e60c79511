"""Paired comparison of two systems on the same questions: change, bootstrap interval, sign test.

For per-question metric vectors ``a`` (e.g. untuned) and ``b`` (tuned) on the same
questions:

- change: mean(b - a);
- a 95 % **percentile** paired bootstrap interval of that mean: resample question indices
  with replacement (one seeded ``numpy.random.Generator``), take the mean difference of each
  resample, report its 2.5th and 97.5th percentiles (numpy's default linear interpolation);
- an exact two-sided **sign test** on the questions where the systems differ: with ``w``
  questions better and ``l`` worse, p = min(1, 2 * P[X <= min(w, l)]), X ~ Binomial(w + l,
  1/2), computed in exact integer arithmetic. For a 0/1 metric this is McNemar's exact test
  (the discordant pairs are the differing questions). For a continuous metric (token F1,
  reciprocal rank) it tests the signs of the non-zero differences: chosen over the
  Wilcoxon signed-rank test because per-question F1 differences are few-valued with many
  ties and no reason to be symmetric (Wilcoxon assumes both), and because one test for
  every metric makes the columns comparable.

``compare`` runs this per question kind and metric on two per-question tables and flags
harm when p < alpha and either the mean change is negative or more questions got worse
than better (many small losses are not hidden by a few large gains); gain only when p <
alpha, the change is positive and more questions got better.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction

import numpy as np

from ..errors import ConfigError, DataError

HARM = "WORSE"
GAIN = "better"


def _vectors(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise DataError(f"paired vectors must be 1-D and of one length, got shapes {x.shape} "
                        f"and {y.shape}; pass one value per question for each system")
    if x.size == 0:
        raise DataError("no questions to compare; pass at least one pair")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise DataError("paired vectors hold NaN or infinite values")
    return x, y


def sign_test_p(better: int, worse: int) -> float:
    """Exact two-sided sign test: p = min(1, 2 * sum_{i <= min(w, l)} C(n, i) / 2^n), n = w + l.

    4 better and 0 worse give 2 / 16 = 0.125; no differing question gives 1.0.
    """
    for name, v in (("better", better), ("worse", worse)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise DataError(f"{name} must be a count >= 0, got {v!r}")
    n = int(better) + int(worse)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(better, worse) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2 ** n)))


def mcnemar_exact_p(a: Sequence[float], b: Sequence[float]) -> float:
    """McNemar's exact test for 0/1 outcomes: the sign test on the discordant pairs."""
    x, y = _vectors(a, b)
    if not (np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all()):
        raise DataError("mcnemar_exact_p needs 0/1 outcomes; use sign_test_p on the signs of "
                        "the differences for a continuous metric")
    return sign_test_p(int(np.sum((y == 1) & (x == 0))), int(np.sum((y == 0) & (x == 1))))


def bootstrap_indices(n: int, num_resamples: int, seed: int) -> np.ndarray:
    """The (num_resamples, n) question indices the interval is computed from."""
    return np.random.default_rng(seed).integers(0, n, size=(num_resamples, n))


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], *, num_resamples: int = 10_000,
                        seed: int = 0, confidence: float = 0.95,
                        indices: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile interval of mean(b - a) over question resamples (see module docstring)."""
    x, y = _vectors(a, b)
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence!r}")
    if isinstance(num_resamples, bool) or not isinstance(num_resamples, int) or num_resamples < 1:
        raise ConfigError(f"num_resamples must be an integer >= 1, got {num_resamples!r}")
    idx = bootstrap_indices(x.size, num_resamples, seed) if indices is None else indices
    if idx.ndim != 2 or idx.shape[1] != x.size:
        raise DataError(f"bootstrap indices of shape {idx.shape} do not fit {x.size} questions")
    means = (y - x)[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


@dataclass
class PairedResult:
    """One (kind, metric) comparison: a row of the report."""

    kind: str
    metric: str
    n: int
    untuned: float
    tuned: float
    change: float
    ci_low: float
    ci_high: float
    better: int
    worse: int
    p: float
    test: str  # "mcnemar" (0/1 metric) or "sign" (continuous)
    flag: str  # HARM, GAIN or ""


def paired_compare(a: Sequence[float], b: Sequence[float], *, kind: str = "all",
                   metric: str = "metric", alpha: float = 0.05, num_resamples: int = 10_000,
                   seed: int = 0, indices: np.ndarray | None = None) -> PairedResult:
    """Compare ``b`` (tuned) with ``a`` (untuned), question by question."""
    x, y = _vectors(a, b)
    d = y - x
    better, worse = int(np.sum(d > 0)), int(np.sum(d < 0))
    binary = bool(np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all())
    p = sign_test_p(better, worse)
    low, high = paired_bootstrap_ci(x, y, num_resamples=num_resamples, seed=seed,
                                    indices=indices)
    change = float(d.mean())
    # harm: the mean fell, or significantly more questions got worse (a few large gains
    # must not hide many losses); gain only when both say better
    significant = p < alpha
    if significant and (change < 0 or worse > better):
        flag = HARM
    elif significant and change > 0 and better > worse:
        flag = GAIN
    else:
        flag = ""
    return PairedResult(kind, metric, int(x.size), float(x.mean()), float(y.mean()), change,
                        low, high, better, worse, p, "mcnemar" if binary else "sign", flag)


def _stable_seed(seed: int, kind: str) -> int:
    # one resample set per kind (shared by its metrics), independent of the kinds' order
    return int.from_bytes(f"{seed}:{kind}".encode(), "little") % (2 ** 63)


def compare(untuned: Iterable[Mapping], tuned: Iterable[Mapping], metrics: Sequence[str], *,
            key: str = "id", kind_key: str = "kind", alpha: float = 0.05,
            num_resamples: int = 10_000, seed: int = 0, overall: bool = False,
            ) -> list[PairedResult]:
    """Per kind and metric, the paired comparison of two per-question tables.

    Each table is rows ``{key: question id, kind_key: kind, metric: value, ...}``; both must
    hold the same question ids (a question of one table missing from the other is a
    :class:`DataError`). A metric that is None for a question in either table (it does not
    apply) leaves that question out of that metric. ``overall`` adds an "all" row per metric
    after the kinds (the per-kind rows are always there).
    """
    def index(rows: Iterable[Mapping], which: str) -> dict:
        out = {}
        for r in rows:
            if key not in r or kind_key not in r:
                raise DataError(f"every {which} row needs {key!r} and {kind_key!r}; got {dict(r)}")
            if r[key] in out:
                raise DataError(f"question {r[key]!r} appears twice in the {which} table")
            out[r[key]] = r
        return out

    a, b = index(untuned, "untuned"), index(tuned, "tuned")
    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys(), key=str), sorted(b.keys() - a.keys(), key=str)
        raise DataError(f"the tables must hold the same questions: {len(only_a)} only untuned "
                        f"(e.g. {only_a[:3]}), {len(only_b)} only tuned (e.g. {only_b[:3]})")
    for q in a:
        if a[q][kind_key] != b[q][kind_key]:
            raise DataError(f"question {q!r} is of kind {a[q][kind_key]!r} untuned but "
                            f"{b[q][kind_key]!r} tuned")
    kinds = list(dict.fromkeys(a[q][kind_key] for q in a))
    groups = [(k, [q for q in a if a[q][kind_key] == k]) for k in kinds]
    if overall:
        groups.append(("all", list(a)))
    results = []
    for kind, ids in groups:
        idx_cache: dict[int, np.ndarray] = {}
        for metric in metrics:
            usable = [q for q in ids if a[q].get(metric) is not None
                      and b[q].get(metric) is not None]
            if not usable:
                continue
            n = len(usable)
            if n not in idx_cache:
                idx_cache[n] = bootstrap_indices(n, num_resamples, _stable_seed(seed, kind))
            results.append(paired_compare(
                [float(a[q][metric]) for q in usable], [float(b[q][metric]) for q in usable],
                kind=kind, metric=metric, alpha=alpha, num_resamples=num_resamples,
                indices=idx_cache[n]))
    return results


def harms(results: Iterable[PairedResult]) -> list[PairedResult]:
    return [r for r in results if r.flag == HARM]


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def format_markdown(results: Sequence[PairedResult], *, title: str | None = None,
                    untuned: str = "untuned", tuned: str = "tuned") -> str:
    """A Markdown table of the comparison. Significant harm is impossible to miss: a
    warning line above the table names every harmed (kind, metric), and its row is
    marked "**WORSE**" with the change in bold."""
    lines = [f"### {title}", ""] if title else []
    bad = harms(results)
    if bad:
        lines += ["> **WARNING: significantly worse** (p < 0.05): " + "; ".join(
            f"**{r.kind} / {r.metric}** {r.change:+.3f} ({r.better} better, {r.worse} worse, "
            f"p = {_p(r.p)})" for r in bad), ""]
    lines += [f"| kind | metric | n | {untuned} | {tuned} | change | 95% CI | better | worse "
              "| p | |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        change = f"{r.change:+.3f}"
        mark = ""
        if r.flag == HARM:
            change, mark = f"**{change}**", "**WORSE**"
        elif r.flag == GAIN:
            mark = "better"
        lines.append(f"| {r.kind} | {r.metric} | {r.n} | {r.untuned:.3f} | {r.tuned:.3f} | "
                     f"{change} | [{r.ci_low:+.3f}, {r.ci_high:+.3f}] | {r.better} | {r.worse} "
                     f"| {_p(r.p)} | {mark} |")
    lines += ["", "change = tuned - untuned, mean over questions; 95% CI: percentile paired "
              "bootstrap over questions; p: exact two-sided sign test on the questions that "
              "changed (McNemar's exact test for 0/1 metrics); WORSE: p < 0.05 and the mean "
              "fell or more questions got worse than better."]
    return "\n".join(lines)


def results_to_json(results: Sequence[PairedResult]) -> str:
    return json.dumps([asdict(r) for r in results], indent=2)
