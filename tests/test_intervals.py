"""Accuracy intervals and paired-bootstrap differences (taskvec.eval.intervals).

Wilson is checked against values worked out by hand; the bootstrap against cases whose answer is known
exactly (identical methods, a constant shift), a coverage simulation, and hypothesis properties.
Bootstrap sizes are kept small so the whole file runs in a few seconds.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskvec.errors import ParameterError
from taskvec.eval import intervals
from taskvec.eval.intervals import (Interval, accuracy_interval, bootstrap_distribution, compare_methods,
                                    difference_verdict, mean_accuracy_interval, paired_bootstrap,
                                    per_task_table, wilson_interval)

Z = 1.959964  # the 97.5 % point of the standard normal
FAST = dict(n_boot=200, seed=0)


def bernoulli(p: float, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(n) < p


# ---------------------------------------------------------------------------------------------------------
# Wilson


def test_wilson_8_of_10_matches_hand_computation():
    # p = 0.8, n = 10, z^2 = 3.841459:
    #   denominator 1 + z^2/n                         = 1.3841459
    #   centre      (p + z^2/(2n)) / denominator      = 0.99207295 / 1.3841459 = 0.7167402
    #   half width  z sqrt(p(1-p)/n + z^2/(4n^2)) / d = 1.959964 * 0.1600114 / 1.3841459 = 0.2265777
    denom = 1 + Z ** 2 / 10
    centre = (0.8 + Z ** 2 / 20) / denom
    half = Z * math.sqrt(0.8 * 0.2 / 10 + Z ** 2 / 400) / denom
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(centre - half, abs=1e-6)
    assert high == pytest.approx(centre + half, abs=1e-6)
    assert (low, high) == pytest.approx((0.4901625, 0.9433178), abs=1e-6)


@pytest.mark.parametrize("n", [1, 2, 7, 20, 1000])
def test_wilson_edges_stay_in_unit_interval_and_contain_the_estimate(n):
    for correct in (0, n):
        low, high = wilson_interval(correct, n)
        assert 0.0 <= low <= correct / n <= high <= 1.0
        assert high > low  # never the zero-width Wald interval
    # at 0/n the upper bound is z^2 / (n + z^2)
    assert wilson_interval(0, n)[1] == pytest.approx(Z ** 2 / (n + Z ** 2), abs=1e-6)
    assert wilson_interval(n, n) == pytest.approx((1 - Z ** 2 / (n + Z ** 2), 1.0), abs=1e-6)


def test_wilson_widens_with_level_and_shrinks_with_n():
    w = lambda lo_hi: lo_hi[1] - lo_hi[0]  # noqa: E731
    assert w(wilson_interval(8, 10, 0.99)) > w(wilson_interval(8, 10)) > w(wilson_interval(8, 10, 0.8))
    assert w(wilson_interval(800, 1000)) < w(wilson_interval(80, 100)) < w(wilson_interval(8, 10))


def test_accuracy_interval_takes_lists_arrays_and_tensors():
    torch = pytest.importorskip("torch")
    outcomes = [1] * 8 + [0] * 2
    expected = Interval(0.8, *wilson_interval(8, 10))
    for form in (outcomes, np.array(outcomes, dtype=bool), np.array(outcomes, dtype=float),
                 torch.tensor(outcomes, dtype=torch.bool)):
        assert accuracy_interval(form) == expected
    assert str(expected) == "0.800 [0.490, 0.943]"


def test_interval_helpers():
    iv = Interval(0.1, -0.02, 0.3)
    assert iv.contains(0) and iv.contains(0.3) and not iv.contains(0.31)
    assert iv.width == pytest.approx(0.32)
    assert not iv.excludes_zero and difference_verdict(iv) == "within noise"
    assert Interval(0.1, 0.01, 0.2).excludes_zero and difference_verdict(Interval(0.1, 0.01, 0.2)) == "a > b"
    assert difference_verdict(Interval(-0.1, -0.2, -0.01)) == "a < b"
    assert difference_verdict(Interval(0.0, 0.0, 0.0)) == "within noise"


# ---------------------------------------------------------------------------------------------------------
# bootstrap: exact cases


def test_identical_methods_give_exactly_zero():
    a = {"sst2": bernoulli(0.7, 120, 1), "mnli": bernoulli(0.4, 80, 2)}
    diff = paired_bootstrap(a, {k: v.copy() for k, v in a.items()}, **FAST)
    assert (diff.estimate, diff.low, diff.high) == (0.0, 0.0, 0.0)
    assert difference_verdict(diff) == "within noise"


def test_constant_shift_gives_exactly_the_shift():
    a = {"sst2": np.ones(50, bool), "mnli": np.ones(30, bool)}
    b = {"sst2": np.zeros(50, bool), "mnli": np.zeros(30, bool)}
    diff = paired_bootstrap(a, b, **FAST)
    assert (diff.estimate, diff.low, diff.high) == (1.0, 1.0, 1.0)
    assert difference_verdict(diff) == "a > b"
    halved = paired_bootstrap(a, b, normalizer={"sst2": 0.5, "mnli": 0.5}, **FAST)
    assert (halved.low, halved.high) == (2.0, 2.0)


def test_estimate_is_the_unweighted_mean_of_task_accuracies():
    data = {"big": np.r_[np.ones(900), np.zeros(100)], "small": np.r_[np.ones(5), np.zeros(5)]}
    iv = mean_accuracy_interval(data, **FAST)
    assert iv.estimate == pytest.approx((0.9 + 0.5) / 2)  # not the pooled 905 / 1010
    norm = mean_accuracy_interval(data, normalizer={"big": 0.9, "small": 1.0}, **FAST)
    assert norm.estimate == pytest.approx((1.0 + 0.5) / 2)


def test_pairing_is_much_narrower_on_correlated_outcomes():
    # b agrees with a except on 4 % of examples: most of the sampling noise is shared and cancels.
    rng = np.random.default_rng(3)
    a, b = {}, {}
    for task in ("sst2", "mnli", "qqp"):
        a[task] = rng.random(400) < 0.6
        b[task] = a[task] ^ (rng.random(400) < 0.04)
    paired = paired_bootstrap(a, b, n_boot=1000, seed=0)
    unpaired = bootstrap_distribution(a, n_boot=1000, seed=1) - bootstrap_distribution(b, n_boot=1000, seed=2)
    low, high = np.quantile(unpaired, [0.025, 0.975])
    assert paired.contains(paired.estimate) and low < paired.estimate < high
    assert paired.width < 0.5 * (high - low)


def test_coverage_of_mean_accuracy_interval():
    # 200 simulated evaluations of a model whose true accuracy is 0.7 on two tasks.
    hits = 0
    for i in range(200):
        data = {"a": bernoulli(0.7, 150, 2 * i), "b": bernoulli(0.7, 150, 2 * i + 1)}
        hits += mean_accuracy_interval(data, n_boot=400, seed=i).contains(0.7)
    assert 0.90 <= hits / 200 <= 0.99


def test_chunked_replicates_agree_with_unchunked(monkeypatch):
    a = {"t": bernoulli(0.6, 60, 5)}
    b = {"t": bernoulli(0.5, 60, 6)}
    whole = paired_bootstrap(a, b, n_boot=500, seed=0)
    monkeypatch.setattr(intervals, "_MAX_DRAWS", 7 * 60 + 5)  # 7 replicates per chunk, last chunk partial
    chunked = paired_bootstrap(a, b, n_boot=500, seed=0)
    assert chunked == paired_bootstrap(a, b, n_boot=500, seed=0)  # still deterministic
    assert chunked.estimate == whole.estimate
    assert chunked.low == pytest.approx(whole.low, abs=0.05) and chunked.high == pytest.approx(whole.high, abs=0.05)
    same = paired_bootstrap(a, {"t": a["t"].copy()}, n_boot=500, seed=0)
    assert (same.low, same.high) == (0.0, 0.0)


def test_task_order_and_other_tasks_do_not_change_a_tasks_resamples():
    a = {"x": bernoulli(0.6, 50, 7), "y": bernoulli(0.3, 40, 8)}
    reordered = {"y": a["y"], "x": a["x"]}
    np.testing.assert_array_equal(bootstrap_distribution(a, **FAST), bootstrap_distribution(reordered, **FAST))
    assert mean_accuracy_interval(a, **FAST) == mean_accuracy_interval(reordered, **FAST)


# ---------------------------------------------------------------------------------------------------------
# properties


@st.composite
def paired_outcomes(draw):
    n_tasks = draw(st.integers(1, 3))
    a, b = {}, {}
    for t in range(n_tasks):
        n = draw(st.integers(1, 30))
        a[f"task{t}"] = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
        b[f"task{t}"] = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    return a, b


PROPS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(paired_outcomes(), st.sampled_from([0.5, 0.8, 0.95, 0.99]), st.integers(0, 2 ** 32))
def test_estimate_lies_inside_the_interval(ab, level, seed):
    a, b = ab
    for iv in (mean_accuracy_interval(a, n_boot=100, seed=seed, level=level),
               paired_bootstrap(a, b, n_boot=100, seed=seed, level=level)):
        assert iv.low <= iv.estimate <= iv.high and iv.level == level
    acc = accuracy_interval(a["task0"], level=level)
    assert 0 <= acc.low <= acc.estimate <= acc.high <= 1


@PROPS
@given(paired_outcomes(), st.integers(0, 2 ** 32))
def test_swapping_a_and_b_negates_the_interval(ab, seed):
    a, b = ab
    ab_iv = paired_bootstrap(a, b, n_boot=100, seed=seed)
    ba_iv = paired_bootstrap(b, a, n_boot=100, seed=seed)
    assert ba_iv.estimate == -ab_iv.estimate
    assert ba_iv.low == pytest.approx(-ab_iv.high, abs=1e-12)
    assert ba_iv.high == pytest.approx(-ab_iv.low, abs=1e-12)


@PROPS
@given(paired_outcomes(), st.integers(0, 2 ** 32))
def test_same_seed_same_answer(ab, seed):
    a, b = ab
    assert paired_bootstrap(a, b, n_boot=100, seed=seed) == paired_bootstrap(a, b, n_boot=100, seed=seed)
    assert mean_accuracy_interval(a, n_boot=100, seed=seed) == mean_accuracy_interval(a, n_boot=100, seed=seed)


@PROPS
@given(paired_outcomes(), st.floats(0.05, 20), st.integers(0, 2 ** 32))
def test_normalizer_divides_the_interval(ab, c, seed):
    a, b = ab
    norm = {task: c for task in a}
    for plain, scaled in ((mean_accuracy_interval(a, n_boot=100, seed=seed),
                           mean_accuracy_interval(a, normalizer=norm, n_boot=100, seed=seed)),
                          (paired_bootstrap(a, b, n_boot=100, seed=seed),
                           paired_bootstrap(a, b, normalizer=norm, n_boot=100, seed=seed))):
        for x, y in ((plain.estimate, scaled.estimate), (plain.low, scaled.low), (plain.high, scaled.high)):
            assert y == pytest.approx(x / c, rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------
# tables


def test_compare_methods_adjacent_and_reference():
    rng = np.random.default_rng(11)
    good = {t: rng.random(300) < 0.9 for t in ("sst2", "mnli")}
    mid = {t: rng.random(300) < 0.6 for t in ("sst2", "mnli")}
    close = {t: v.copy() for t, v in mid.items()}
    for v in close.values():  # one example per task flipped right -> wrong: not a real difference
        v[np.flatnonzero(v)[0]] = False
    methods = {"close": close, "good": good, "mid": mid}
    table = compare_methods(methods, **FAST)
    assert list(table.index) == ["good", "mid", "close"]
    assert list(table.columns) == ["mean", "low", "high", "diff_vs", "diff", "diff_low", "diff_high", "verdict"]
    assert table.loc["good", "diff_vs"] == "mid" and table.loc["good", "verdict"] == "a > b"
    assert table.loc["mid", "diff_vs"] == "close" and table.loc["mid", "verdict"] == "within noise"
    assert table.loc["mid", "diff"] == pytest.approx(1 / 300)
    assert pd.isna(table.loc["close", "diff_vs"]) and np.isnan(table.loc["close", "diff"])
    assert table.loc["good", "mean"] == mean_accuracy_interval(good, **FAST).estimate
    assert table.loc["good", "low"] == mean_accuracy_interval(good, **FAST).low

    ref = compare_methods(methods, reference="good", **FAST)
    assert ref.loc["mid", "diff_vs"] == "good" and ref.loc["mid", "verdict"] == "a < b"
    assert ref.loc["close", "diff_vs"] == "good"
    assert pd.isna(ref.loc["good", "diff_vs"]) and pd.isna(ref.loc["good", "verdict"])
    expected = paired_bootstrap(close, good, **FAST)
    assert (ref.loc["close", "diff_low"], ref.loc["close", "diff_high"]) == (expected.low, expected.high)

    with pytest.raises(ParameterError, match="'ties'"):
        compare_methods(methods, reference="ties", **FAST)


def test_per_task_table():
    data = {"sst2": [1] * 8 + [0] * 2, "mnli": np.zeros(5, bool)}
    table = per_task_table(data)
    assert list(table.index) == ["sst2", "mnli"] and list(table.columns) == ["n", "accuracy", "low", "high"]
    assert table.loc["sst2", "n"] == 10 and table.loc["sst2", "accuracy"] == 0.8
    assert (table.loc["sst2", "low"], table.loc["sst2", "high"]) == wilson_interval(8, 10)
    normed = per_task_table(data, normalizer={"sst2": 0.5, "mnli": 0.8})
    assert normed.loc["sst2", "normalized"] == pytest.approx(1.6)
    assert normed.loc["sst2", "normalized_low"] == pytest.approx(wilson_interval(8, 10)[0] / 0.5)
    assert normed.loc["mnli", "normalized_high"] == pytest.approx(wilson_interval(0, 5)[1] / 0.8)
    assert isinstance(normed, pd.DataFrame)


# ---------------------------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize("call, names", [
    (lambda: wilson_interval(1, 0), r"\bn\b"),
    (lambda: wilson_interval(-1, 10), "correct"),
    (lambda: wilson_interval(11, 10), "correct"),
    (lambda: wilson_interval(5, 10, level=1.0), "level"),
    (lambda: wilson_interval(5, 10, level=0), "level"),
    (lambda: accuracy_interval([]), "empty"),
    (lambda: accuracy_interval([0, 1, 2]), "0/1"),
    (lambda: accuracy_interval([[1, 0], [0, 1]]), "1-D"),
    (lambda: mean_accuracy_interval({}), "correct_by_task"),
    (lambda: mean_accuracy_interval({"sst2": []}), r"'sst2'.*empty"),
    (lambda: mean_accuracy_interval({"sst2": [1, np.nan]}), "'sst2'"),
    (lambda: mean_accuracy_interval({"sst2": [1, 0]}, n_boot=0), "n_boot"),
    (lambda: mean_accuracy_interval({"sst2": [1, 0]}, seed=-1), "seed"),
    (lambda: mean_accuracy_interval({"sst2": [1, 0]}, level=95), "level"),
    (lambda: mean_accuracy_interval({"sst2": [1, 0]}, normalizer={"mnli": 1.0}), "'sst2'"),
    (lambda: mean_accuracy_interval({"sst2": [1, 0]}, normalizer={"sst2": 0.0}), "'sst2'"),
    (lambda: paired_bootstrap({"sst2": [1, 0, 1]}, {"sst2": [1, 0]}), r"'sst2'.*3.*2"),
    (lambda: paired_bootstrap({"sst2": [1], "mnli": [0]}, {"sst2": [1]}), r"'mnli'.*correct_a.*not in correct_b"),
    (lambda: paired_bootstrap({"sst2": [1]}, {"sst2": [1], "qqp": [0]}), r"'qqp'.*correct_b.*not in correct_a"),
    (lambda: paired_bootstrap({"sst2": [1, 0]}, {"sst2": []}), r"correct_b\['sst2'\].*empty"),
    (lambda: compare_methods({}), "correct_by_method"),
])
def test_bad_inputs_name_the_culprit(call, names):
    with pytest.raises(ParameterError, match=names):
        call()


def test_perplexity_ratio_interval_by_hand():
    from taskvec.eval.intervals import perplexity_ratio_interval

    tokens = np.array([3, 1, 5, 2])
    a = np.array([3.0, 1.0, 4.0, 2.5])
    # b costs exactly 0.1 nats more per token on every text: ratio exp(0.1) in every replicate
    iv = perplexity_ratio_interval(a, a + 0.1 * tokens, tokens, n_boot=200)
    assert iv.estimate == pytest.approx(math.exp(0.1)) and iv.low == pytest.approx(iv.high)
    # b worse on one text only: the estimate is exp(Δ / Σ tokens); resampling spreads it around that
    b = a.copy()
    b[2] += 1.1
    iv = perplexity_ratio_interval(a, b, tokens, n_boot=2000, seed=1)
    assert iv.estimate == pytest.approx(math.exp(1.1 / 11))
    assert iv.low == pytest.approx(1.0) and iv.high > iv.estimate   # replicates without text 2: ratio 1
    with pytest.raises(ParameterError, match="one entry per text"):
        perplexity_ratio_interval(a, b[:3], tokens)
