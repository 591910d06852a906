"""Uncertainty for reported accuracies: a 95 % interval on every number, and a paired interval on every
difference between two methods.

- One task's accuracy: the Wilson score interval. Unlike the normal ("Wald") interval it stays inside
  [0, 1] and does not collapse to zero width at 0/n or n/n.
- The mean accuracy over several tasks (each task weighted equally, optionally divided by a per-task
  normalizer, the "normalized accuracy" of TIES-Merging): a stratified bootstrap. Examples are resampled
  within each task, because the tasks' test sets are fixed and of fixed size; the interval is the
  percentile interval of the replicates.
- The difference between two methods evaluated on the same examples: a paired bootstrap. Each replicate
  draws one set of example indices per task and applies it to both methods, so the variation shared by
  the two (the hard examples are hard for both) cancels. That interval is much narrower than one that
  treats the methods as independent, and it is the one that answers "is A better than B on this test set".

Everything is plain numpy and deterministic given `seed`. Per-example outcomes may be lists, numpy arrays
or torch tensors of bools or 0/1 numbers.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

from taskvec.errors import ParameterError

__all__ = ["Interval", "wilson_interval", "accuracy_interval", "mean_accuracy_interval", "bootstrap_distribution",
           "paired_bootstrap", "difference_verdict", "compare_methods", "per_task_table"]

# Above this many drawn indices (n_boot * n of one task) the replicates are drawn in chunks, which keeps
# the int64 index matrix near 160 MB whatever the size of the test set.
_MAX_DRAWS = 20_000_000


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval [low, high] at confidence `level`."""

    estimate: float
    low: float
    high: float
    level: float = 0.95

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def contains(self, x: float) -> bool:
        """Whether x lies in the closed interval."""
        return bool(self.low <= x <= self.high)

    @property
    def width(self) -> float:
        return self.high - self.low

    @property
    def excludes_zero(self) -> bool:
        """For a difference: the sign is settled at this level."""
        return self.low > 0 or self.high < 0


# ---------------------------------------------------------------------------------------------------------
# input checks


def _check_level(level) -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float, np.floating, np.integer)) \
            or not 0 < float(level) < 1:
        raise ParameterError(f"level must be a number in (0, 1), e.g. 0.95, got {level!r}")
    return float(level)


def _check_n_boot(n_boot) -> int:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ParameterError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    return int(n_boot)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ParameterError(f"seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def _outcomes(values, where: str) -> np.ndarray:
    """Per-example outcomes as a 1-D uint8 array of 0/1; `where` names the argument in errors."""
    if hasattr(values, "detach"):  # a torch tensor, possibly on the GPU; np.asarray can't read CUDA memory
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ParameterError(f"{where} must be a 1-D array of per-example outcomes, got shape {arr.shape}")
    if arr.size == 0:
        raise ParameterError(f"{where} is empty: there are no examples to compute an accuracy from")
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind not in "iuf":
        raise ParameterError(f"{where} must hold booleans or 0/1 numbers, got dtype {arr.dtype}")
    bad = ~((arr == 0) | (arr == 1))  # NaN fails both comparisons, so it is caught too
    if bad.any():
        raise ParameterError(f"{where} must hold only 0/1 (or True/False), found {arr[bad][0]!r}")
    return arr.astype(np.uint8)


def _task_outcomes(correct_by_task, name: str) -> dict:
    if not isinstance(correct_by_task, Mapping):
        raise ParameterError(f"{name} must be a mapping task -> per-example outcomes, "
                             f"got {type(correct_by_task).__name__}")
    if not correct_by_task:
        raise ParameterError(f"{name} is empty: it needs at least one task")
    return {task: _outcomes(v, f"{name}[{task!r}]") for task, v in correct_by_task.items()}


def _scales(normalizer, tasks) -> np.ndarray:
    """The per-task divisor (1 without a normalizer), in the order of `tasks`."""
    if normalizer is None:
        return np.ones(len(tasks))
    if not isinstance(normalizer, Mapping):
        raise ParameterError(f"normalizer must be a mapping task -> number, got {type(normalizer).__name__}")
    out = []
    for task in tasks:
        if task not in normalizer:
            raise ParameterError(f"normalizer has no entry for task {task!r}")
        try:
            value = float(normalizer[task])
        except (TypeError, ValueError):
            value = float("nan")
        if not math.isfinite(value) or value <= 0:
            raise ParameterError(f"normalizer[{task!r}] must be a positive finite number, got {normalizer[task]!r}")
        out.append(value)
    return np.asarray(out)


# ---------------------------------------------------------------------------------------------------------
# Wilson


def _z(level: float) -> float:
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson_interval(correct: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for `correct` successes out of `n` trials."""
    for name, value in (("correct", correct), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ParameterError(f"{name} must be an integer, got {value!r}")
    if n <= 0:
        raise ParameterError(f"n must be >= 1 (the number of examples), got {n}")
    if not 0 <= correct <= n:
        raise ParameterError(f"correct must be in [0, n] = [0, {n}], got {correct}")
    z = _z(_check_level(level))
    p, n = correct / n, float(n)
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0/n and n/n one bound is exactly 0 or 1; set it so rounding can't put it a hair outside.
    low = 0.0 if correct == 0 else max(0.0, center - half)
    high = 1.0 if correct == n else min(1.0, center + half)
    return low, high


def accuracy_interval(correct, level: float = 0.95) -> Interval:
    """Accuracy of 1-D per-example outcomes with its Wilson interval."""
    arr = _outcomes(correct, "correct")
    k, n = int(arr.sum()), int(arr.size)
    low, high = wilson_interval(k, n, level)
    return Interval(k / n, low, high, float(level))


# ---------------------------------------------------------------------------------------------------------
# bootstrap


def _task_rng(seed: int, task) -> np.random.Generator:
    # One stream per (seed, task name): a task's resamples don't depend on which other tasks are present or
    # on the order of the mapping, and every method evaluated on that task gets the same indices.
    return np.random.default_rng([seed, zlib.crc32(str(task).encode())])


def _replicate_accuracies(stacked: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap accuracies of the columns of `stacked` [n, k] (k methods on the same n examples).

    Returns [n_boot, k]; every replicate applies one draw of n indices to all k columns (the pairing).
    """
    n, k = stacked.shape
    columns = [np.ascontiguousarray(stacked[:, j]) for j in range(k)]  # 1-D takes are ~10x faster than 2-D
    chunk = max(1, min(n_boot, _MAX_DRAWS // n))
    sums = np.empty((n_boot, k), dtype=np.int64)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        for j, column in enumerate(columns):
            # uint8 gather keeps the [chunk, n] temporary at one byte per draw
            sums[start:stop, j] = np.take(column, idx).sum(axis=1, dtype=np.int64)
    return sums / n


def _bootstrap(outcomes: list[dict], normalizer, n_boot, seed) -> tuple[np.ndarray, float]:
    """Shared core: bootstrap replicates [n_boot] and point estimate of mean_acc(a), or of
    mean_acc(a) - mean_acc(b) when `outcomes` is [a, b] ({task: outcomes} dicts on the same examples)."""
    n_boot, seed = _check_n_boot(n_boot), _check_seed(seed)
    tasks = list(outcomes[0])
    scales = _scales(normalizer, tasks)
    per_task_reps, per_task_est = [], []
    for task, scale in zip(tasks, scales):
        stacked = np.stack([o[task] for o in outcomes], axis=1)  # [n, methods]
        reps = _replicate_accuracies(stacked, n_boot, _task_rng(seed, task))
        # Combine the methods per task before averaging over tasks: for a == b the replicates are then
        # exactly 0, and swapping a and b negates them exactly (float negation is exact).
        per_task_reps.append(_combine(reps) / scale)
        per_task_est.append(_combine(stacked.mean(axis=0, keepdims=True))[0] / scale)
    return np.mean(per_task_reps, axis=0), float(np.mean(per_task_est))


def _combine(acc: np.ndarray) -> np.ndarray:
    """[rows, 1] -> the accuracy; [rows, 2] -> a - b (a plain subtraction: swapping a and b negates it exactly)."""
    return acc[:, 0] if acc.shape[1] == 1 else acc[:, 0] - acc[:, 1]


def _percentile_interval(reps: np.ndarray, estimate: float, level: float) -> Interval:
    alpha = 1 - level
    low, high = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    # The percentile interval can miss the estimate at tiny n or low levels; widen it to keep
    # low <= estimate <= high, which every report relies on.
    return Interval(estimate, float(min(low, estimate)), float(max(high, estimate)), level)


def bootstrap_distribution(correct_by_task: Mapping, *, normalizer: Mapping | None = None, n_boot: int = 2000,
                           seed: int = 0) -> np.ndarray:
    """The n_boot stratified-bootstrap replicates of the mean (normalized) accuracy, e.g. to plot them."""
    outcomes = _task_outcomes(correct_by_task, "correct_by_task")
    return _bootstrap([outcomes], normalizer, n_boot, seed)[0]


def mean_accuracy_interval(correct_by_task: Mapping, *, normalizer: Mapping | None = None, n_boot: int = 2000,
                           seed: int = 0, level: float = 0.95) -> Interval:
    """Mean over tasks of per-task accuracy (÷ normalizer[task] when given), stratified-bootstrap interval."""
    level = _check_level(level)
    outcomes = _task_outcomes(correct_by_task, "correct_by_task")
    reps, estimate = _bootstrap([outcomes], normalizer, n_boot, seed)
    return _percentile_interval(reps, estimate, level)


def _check_paired(a: dict, b: dict, name_a: str, name_b: str) -> None:
    for task in a:
        if task not in b:
            raise ParameterError(f"task {task!r} is in {name_a} but not in {name_b}: "
                                 "a paired comparison needs both evaluated on the same tasks")
    for task in b:
        if task not in a:
            raise ParameterError(f"task {task!r} is in {name_b} but not in {name_a}: "
                                 "a paired comparison needs both evaluated on the same tasks")
    for task in a:
        if a[task].size != b[task].size:
            raise ParameterError(f"task {task!r}: {name_a} has {a[task].size} examples, {name_b} has "
                                 f"{b[task].size}; a paired comparison needs both on the same examples")


def paired_bootstrap(correct_a: Mapping, correct_b: Mapping, *, normalizer: Mapping | None = None,
                     n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Interval:
    """Interval of mean_acc(a) - mean_acc(b) for two methods scored on the same examples.

    Within each task, every replicate resamples example indices once and applies them to both a and b.
    """
    level = _check_level(level)
    a = _task_outcomes(correct_a, "correct_a")
    b = _task_outcomes(correct_b, "correct_b")
    _check_paired(a, b, "correct_a", "correct_b")
    b = {task: b[task] for task in a}  # same task order as a
    reps, estimate = _bootstrap([a, b], normalizer, n_boot, seed)
    return _percentile_interval(reps, estimate, level)


def perplexity_ratio_interval(nll_a, nll_b, tokens, *, n_boot: int = 2000, seed: int = 0,
                              level: float = 0.95) -> Interval:
    """Interval of ppl(b) / ppl(a) for two language models scored on the same texts.

    nll_a, nll_b: per-text summed next-token NLL of each model; tokens: per-text predicted-token counts (the
    same texts and tokenizer, so the counts are shared). ppl = exp(Σ nll / Σ tokens), token-weighted; each
    replicate resamples texts once for both models (a paired percentile bootstrap over texts)."""
    level = _check_level(level)
    n_boot = _check_n_boot(n_boot)
    a, b, n = (np.asarray(x, dtype=float).ravel() for x in (nll_a, nll_b, tokens))
    if not (a.size == b.size == n.size) or a.size == 0:
        raise ParameterError(f"nll_a, nll_b and tokens need one entry per text each, got {a.size}, {b.size}, "
                             f"{n.size}")
    if n.sum() <= 0:
        raise ParameterError("tokens: the texts hold no predicted token")
    rng = np.random.default_rng(_check_seed(seed))
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    reps = np.exp((b[idx].sum(axis=1) - a[idx].sum(axis=1)) / np.maximum(n[idx].sum(axis=1), 1))
    return _percentile_interval(reps, float(np.exp((b.sum() - a.sum()) / n.sum())), level)


def difference_verdict(interval: Interval) -> str:
    """'a > b' or 'a < b' when the interval of a - b excludes 0, else 'within noise'."""
    if interval.low > 0:
        return "a > b"
    if interval.high < 0:
        return "a < b"
    return "within noise"


# ---------------------------------------------------------------------------------------------------------
# tables


def compare_methods(correct_by_method: Mapping[str, Mapping], *, normalizer: Mapping | None = None,
                    reference: str | None = None, n_boot: int = 2000, seed: int = 0,
                    level: float = 0.95) -> pd.DataFrame:
    """One row per method (index "method"), sorted by mean accuracy, best first.

    Columns: mean, low, high (mean_accuracy_interval), then a paired comparison of the row's method
    with `diff_vs`: diff = mean(row) - mean(diff_vs), its interval diff_low/diff_high and the verdict
    ("a > b": the row's method is better). Without `reference`, each method is compared with the one
    ranked just below it (the last row has none); with `reference`, every other method is compared with
    the reference. Rows without a comparison are missing (NaN) there.
    """
    if not isinstance(correct_by_method, Mapping) or not correct_by_method:
        raise ParameterError("correct_by_method must be a non-empty mapping method -> {task: outcomes}")
    if reference is not None and reference not in correct_by_method:
        raise ParameterError(f"reference {reference!r} is not one of the methods: {list(correct_by_method)}")
    kwargs = dict(normalizer=normalizer, n_boot=n_boot, seed=seed, level=level)
    means = {m: mean_accuracy_interval(c, **kwargs) for m, c in correct_by_method.items()}
    order = sorted(means, key=lambda m: -means[m].estimate)  # stable: ties keep the input order
    rows = []
    for i, method in enumerate(order):
        other = reference if reference is not None else (order[i + 1] if i + 1 < len(order) else None)
        row = {"method": method, "mean": means[method].estimate, "low": means[method].low,
               "high": means[method].high, "diff_vs": None, "diff": np.nan, "diff_low": np.nan,
               "diff_high": np.nan, "verdict": None}
        if other is not None and other != method:
            diff = paired_bootstrap(correct_by_method[method], correct_by_method[other], **kwargs)
            row.update(diff_vs=other, diff=diff.estimate, diff_low=diff.low, diff_high=diff.high,
                       verdict=difference_verdict(diff))
        rows.append(row)
    return pd.DataFrame(rows).set_index("method")


def per_task_table(correct_by_task: Mapping, normalizer: Mapping | None = None, level: float = 0.95) -> pd.DataFrame:
    """One row per task (index "task"): n, accuracy, Wilson low/high; plus normalized, normalized_low,
    normalized_high (each divided by normalizer[task]) when a normalizer is given."""
    level = _check_level(level)
    outcomes = _task_outcomes(correct_by_task, "correct_by_task")
    scales = _scales(normalizer, list(outcomes))
    rows = []
    for (task, arr), scale in zip(outcomes.items(), scales):
        interval = accuracy_interval(arr, level)
        row = {"task": task, "n": int(arr.size), "accuracy": interval.estimate, "low": interval.low,
               "high": interval.high}
        if normalizer is not None:
            row.update(normalized=interval.estimate / scale, normalized_low=interval.low / scale,
                       normalized_high=interval.high / scale)
        rows.append(row)
    return pd.DataFrame(rows).set_index("task")
