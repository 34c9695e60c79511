"""Paired statistics against hand-computed values: exact sign test / McNemar, the seeded
percentile bootstrap, and the per-kind comparison that flags harm."""

from __future__ import annotations

import numpy as np
import pytest

from fedrag_jax.errors import DataError
from fedrag_jax.evals.paired import (
    GAIN,
    HARM,
    bootstrap_indices,
    compare,
    format_markdown,
    harms,
    mcnemar_exact_p,
    paired_bootstrap_ci,
    paired_compare,
    sign_test_p,
)


def test_sign_test_matches_hand_computed_binomial_sums():
    # 4 wins, 0 losses: 2 * C(4,0) / 2^4 = 2/16
    assert sign_test_p(4, 0) == 0.125
    assert sign_test_p(0, 4) == 0.125
    # 5 / 1: n = 6, 2 * (C(6,0) + C(6,1)) / 64 = 14/64
    assert sign_test_p(5, 1) == 14 / 64
    # 3 / 3: 2 * (1 + 6 + 15 + 20) / 64 > 1 -> capped at 1
    assert sign_test_p(3, 3) == 1.0
    assert sign_test_p(0, 0) == 1.0  # nothing changed: no evidence either way
    # 10 / 0: 2 / 1024
    assert sign_test_p(10, 0) == 2 / 1024
    # the figures: 32 better / 16 worse -> 0.0293..., 19 / 136 -> 5.5e-23, 0 / 16
    assert sign_test_p(32, 16) == pytest.approx(0.0293049467205293, rel=1e-12)
    assert sign_test_p(19, 136) == pytest.approx(5.462119416967247e-23, rel=1e-9)
    assert sign_test_p(0, 16) == 2 / 2 ** 16
    with pytest.raises(DataError):
        sign_test_p(-1, 2)


def test_mcnemar_counts_only_the_discordant_pairs():
    untuned = [1, 0, 0, 1, 1, 0, 0]
    tuned = [1, 1, 1, 0, 1, 1, 0]  # better on 1, 2, 5; worse on 3; same on 0, 4, 6
    # n = 4 discordant, min = 1: 2 * (C(4,0) + C(4,1)) / 16 = 10/16
    assert mcnemar_exact_p(untuned, tuned) == 10 / 16
    with pytest.raises(DataError, match="0/1"):
        mcnemar_exact_p([0.5, 1.0], [1.0, 0.0])


def test_bootstrap_interval_on_given_resamples_by_hand():
    # d = b - a = [1, 0, -1]; four resamples with means 1, 0, -1, 0 -> sorted [-1, 0, 0, 1]
    a, b = [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]
    idx = np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2], [0, 1, 2]])
    low, high = paired_bootstrap_ci(a, b, indices=idx)
    # numpy's linear percentile: position 0.025 * 3 = 0.075 -> -1 + 0.075; 2.925 -> 0.925
    assert low == pytest.approx(-0.925)
    assert high == pytest.approx(0.925)


def test_seeded_bootstrap_equals_a_direct_numpy_computation():
    rng = np.random.default_rng(7)
    a = rng.integers(0, 2, size=57).astype(float)
    b = rng.integers(0, 2, size=57).astype(float)
    low, high = paired_bootstrap_ci(a, b, num_resamples=2000, seed=11)
    # the same resamples, written out: question indices drawn with replacement
    idx = np.random.default_rng(11).integers(0, 57, size=(2000, 57))
    means = np.array([np.mean(b[row] - a[row]) for row in idx])
    assert (low, high) == tuple(np.percentile(means, [2.5, 97.5]))
    assert np.array_equal(bootstrap_indices(57, 2000, 11), idx)
    assert paired_bootstrap_ci(a, b, num_resamples=2000, seed=11) == (low, high)  # seeded
    assert paired_bootstrap_ci(a, b, num_resamples=2000, seed=12) != (low, high)
    assert low < np.mean(b - a) < high


def test_continuous_metric_uses_the_signs_of_nonzero_differences():
    untuned = [0.5, 0.2, 1.0, 0.0, 0.3]
    tuned = [0.6, 0.2, 0.4, 0.1, 0.9]  # +, 0, -, +, +
    r = paired_compare(untuned, tuned, metric="f1")
    assert (r.better, r.worse, r.test, r.n) == (3, 1, "sign", 5)
    assert r.p == 10 / 16
    assert r.change == pytest.approx(np.mean(np.subtract(tuned, untuned)))


def _table(kind_values: dict[str, list[float]], metric: str = "contained") -> list[dict]:
    rows = []
    for kind, values in kind_values.items():
        rows += [{"id": f"{kind}-{i}", "kind": kind, metric: v} for i, v in enumerate(values)]
    return rows


def test_compare_flags_the_kind_made_worse_and_the_kind_made_better():
    untuned = _table({"title": [0] * 10 + [1, 1], "year": [1] * 10 + [0, 1]})
    tuned = _table({"title": [1] * 10 + [1, 1],  # 10 better, 0 worse
                    "year": [0] * 10 + [0, 1]})  # 10 worse: the deliberately broken kind
    results = compare(untuned, tuned, ["contained"], seed=3)
    by_kind = {r.kind: r for r in results}
    year, title = by_kind["year"], by_kind["title"]
    assert (year.n, year.better, year.worse) == (12, 0, 10)
    assert year.untuned == pytest.approx(11 / 12) and year.tuned == pytest.approx(1 / 12)
    assert year.change == pytest.approx(-10 / 12)
    assert year.p == 2 / 1024 and year.flag == HARM and year.test == "mcnemar"
    assert year.ci_high < 0
    assert title.flag == GAIN and title.p == 2 / 1024 and title.ci_low > 0
    assert harms(results) == [year]
    table = format_markdown(results, title="tuned vs untuned")
    assert "WARNING: significantly worse" in table
    assert "**year / contained** -0.833" in table
    year_row = next(line for line in table.splitlines() if line.startswith("| year |"))
    assert "**WORSE**" in year_row and "**-0.833**" in year_row
    title_row = next(line for line in table.splitlines() if line.startswith("| title |"))
    assert "WORSE" not in title_row and "better" in title_row


def test_compare_without_significant_change_flags_nothing():
    untuned = _table({"place": [1, 0, 1, 0, 1, 0]})
    tuned = _table({"place": [0, 1, 1, 0, 1, 0]})
    results = compare(untuned, tuned, ["contained"], overall=True)
    assert [r.flag for r in results] == ["", ""]
    assert [r.kind for r in results] == ["place", "all"]
    assert "WARNING" not in format_markdown(results)


def test_compare_skips_questions_a_metric_does_not_apply_to():
    untuned = [{"id": 1, "kind": "k", "f1": 0.5, "mrr": None}, {"id": 2, "kind": "k", "f1": 1.0,
                                                                "mrr": 1.0}]
    tuned = [{"id": 2, "kind": "k", "f1": 0.0, "mrr": 0.5}, {"id": 1, "kind": "k", "f1": 1.0,
                                                             "mrr": 0.25}]
    rows = {r.metric: r for r in compare(untuned, tuned, ["f1", "mrr"])}
    assert rows["f1"].n == 2 and rows["mrr"].n == 1
    assert rows["mrr"].change == -0.5


def test_compare_rejects_tables_of_different_questions():
    with pytest.raises(DataError, match="same questions"):
        compare(_table({"a": [1, 0]}), _table({"a": [1, 0, 1]}), ["contained"])
    bad = _table({"a": [1, 0]})
    bad[0]["kind"] = "b"
    with pytest.raises(DataError, match="of kind"):
        compare(_table({"a": [1, 0]}), bad, ["contained"])
    with pytest.raises(DataError, match="twice"):
        compare(_table({"a": [1]}) * 2, _table({"a": [1]}), ["contained"])


def test_many_small_losses_are_harm_even_when_a_few_big_gains_lift_the_mean():
    # what the demo's tuned system did to taxon F1: 8 questions up by 0.9, 27 down by 0.1;
    # the mean rises (+0.13) but significantly more questions got worse: never call it better
    untuned = [0.1] * 8 + [0.5] * 27
    tuned = [1.0] * 8 + [0.4] * 27
    r = paired_compare(untuned, tuned, metric="f1")
    assert r.change > 0 and (r.better, r.worse) == (8, 27) and r.p < 0.05
    assert r.flag == HARM
