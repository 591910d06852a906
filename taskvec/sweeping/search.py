"""`search`: the sweep's engine under an Optuna study (ask / tell), for spaces too big to grid.

    res = taskvec.search("base/", ["a/", "b/"], {"method": ["ties", "dare_ties"], "density": (0.1, 1.0),
                         "weight": (0.0, 1.5)}, "zoo", objective="mean_accuracy", n_trials=40, cache="cache/")
    res.best_params, res.best_value, res.data

Trials are asked in batches of `workers`, run as sweep points on the same
executors and through the same cache (a rerun of a seeded search is answered
from it), then told their objective. A parameter is suggested only when the
trial's method takes it, so one study can span several methods.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping, Sequence

from taskvec.errors import ParameterError
from taskvec.sweeping.engine import Plan, frame, model_labels, run_points
from taskvec.sweeping.evaluators import bind, get_evaluator
from taskvec.sweeping.executors import get_executor, require
from taskvec.sweeping.grid import SPECIAL_KEYS, expand_grid, method_params
from taskvec.sweeping.results import DIRECTIONS, SearchResult


def _sampler(optuna, sampler: Any, seed: int):
    if sampler in ("optuna", "tpe"):
        return optuna.samplers.TPESampler(seed=seed)
    if sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if isinstance(sampler, optuna.samplers.BaseSampler):
        return sampler
    raise ParameterError(f"sampler: expected 'optuna' (TPE), 'tpe', 'random' or an optuna sampler, got {sampler!r}")


def _check_space(space: Mapping[str, Any]) -> dict[str, Any]:
    """Ranges (lo, hi[, "log"]) and choices [a, b, ...], checked; errors name the key."""
    out = {}
    for k, v in space.items():
        if isinstance(v, tuple):
            if len(v) not in (2, 3) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v[:2]) \
                    or (len(v) == 3 and v[2] != "log") or not v[0] < v[1]:
                raise ParameterError(f"space: {k!r}: a range is (low, high) or (low, high, 'log') with low < high, "
                                     f"got {v!r}")
        elif not isinstance(v, list) or not v:
            raise ParameterError(f"space: {k!r}: expected a (low, high) range or a non-empty list of choices, "
                                 f"got {v!r}")
        out[str(k)] = v
    return out


def _suggest(trial, space: Mapping[str, Any], method: str | None, labels: Sequence[str]) -> dict[str, list]:
    """One trial's point, as a one-value grid: the method first, then only the parameters it takes."""
    grid: dict[str, list] = {}
    if "method" in space:
        method = trial.suggest_categorical("method", list(space["method"]))
        grid["method"] = [method]
    if "models" in space:
        subsets = {"+".join(map(str, s)) if isinstance(s, (list, tuple)) else str(s): s for s in space["models"]}
        grid["models"] = [subsets[trial.suggest_categorical("models", list(subsets))]]
    takes = method_params(method)
    for k, v in space.items():
        if k in SPECIAL_KEYS or k not in takes:
            continue
        if isinstance(v, list):
            grid[k] = [trial.suggest_categorical(k, v)]
        elif all(isinstance(x, int) for x in v[:2]):
            grid[k] = [trial.suggest_int(k, v[0], v[1], log=len(v) == 3)]
        else:
            grid[k] = [trial.suggest_float(k, float(v[0]), float(v[1]), log=len(v) == 3)]
    return grid


def search(
    base: Any,
    models: Sequence[Any] | Mapping[str, Any],
    space: Mapping[str, Any],
    evaluate: Callable[[Any], Mapping[str, Any]] | str,
    *,
    objective: str | Callable[[Mapping[str, Any]], float],
    direction: str = "maximize",
    n_trials: int = 20,
    sampler: Any = "optuna",
    seed: int = 0,
    method: str | None = None,
    executor: str = "local",
    workers: int | None = None,
    cache: str | os.PathLike | None = None,
    materialize: str = "auto",
    dtype: str | None = None,
    evaluate_options: Mapping[str, Any] | None = None,
    executor_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    **params,
) -> SearchResult:
    """Search `space` for the merge that optimises `objective`, with a seeded Optuna sampler (TPE by default).

    The other arguments are those of `taskvec.sweep` (`seed` also seeds the merge's random methods).

    Args:
        space: parameter -> (low, high) / (low, high, "log") range or [choices]; `method` and `models`
            (subsets) are choices. Integer bounds give integer parameters.
        objective: the metric (a key of what `evaluate` returns) or `f(metrics) -> float`.
        direction: "maximize" or "minimize".
        n_trials: trials to run; asked `workers` at a time (one batch runs in parallel).
        sampler: "optuna"/"tpe" (TPESampler(seed=seed)), "random", or an optuna sampler.

    Returns:
        SearchResult: `.data` (one row per trial: trial, parameters, metrics, objective, timings),
        `.best_params`, `.best_value`, `.study`.
    """
    optuna = require("optuna", "taskvec.search")
    if direction not in DIRECTIONS:
        raise ParameterError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")
    if not isinstance(n_trials, int) or n_trials < 1:
        raise ParameterError(f"n_trials: expected a positive integer, got {n_trials!r}")
    space = _check_space(space)
    labels, model_list = model_labels(models)
    # every key and every range's ends checked up front, as a grid of the corners
    corners = {k: (list(v) if isinstance(v, list) else list(v[:2])) for k, v in space.items()}
    expand_grid(corners, labels=labels, method=method, fixed=params, has_base=base is not None)
    evaluate = bind(get_evaluator(evaluate, **dict(evaluate_options or {})), base)
    exe = get_executor(executor, workers, **dict(executor_options or {}))
    plan = Plan(base, model_list, evaluate, cache=cache, materialize=materialize,
                merge_options={"seed": seed, **({"dtype": dtype} if dtype is not None else {})}, scratch=None,
                on_error="record", labels=labels)
    score = objective if callable(objective) else (lambda metrics: metrics.get(objective, math.nan))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=direction, sampler=_sampler(optuna, sampler, seed))
    batch = exe.workers or (1 if exe.in_process else os.cpu_count() or 1)
    points, records, trials, values = [], [], [], []
    with exe:
        while len(trials) < n_trials:
            asked = [study.ask() for _ in range(min(batch, n_trials - len(trials)))]
            batch_points = []
            for t in asked:
                grid = _suggest(t, space, method, labels)
                batch_points += expand_grid(grid, labels=labels, method=method, fixed=params,
                                            has_base=base is not None)[0]
            got = run_points(plan, batch_points, exe, desc=f"search {len(trials)}/{n_trials}", progress=progress)
            for t, rec in zip(asked, got):
                value = float(score(rec.get("metrics", {}))) if not rec.get("error") else math.nan
                if math.isfinite(value):
                    study.tell(t, value)
                else:
                    study.tell(t, state=optuna.trial.TrialState.FAIL)
                values.append(value)
            points += batch_points
            records += got
            trials += asked
    data, metrics = frame(points, records, labels, [k for k in space if k not in ("method", "models")])
    data.insert(0, "trial", [t.number for t in trials])
    data["objective"] = values
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise ParameterError(f"search: no trial produced a finite objective {objective!r}; "
                             f"errors: {list(data.get('error', []))[:3]}")
    return SearchResult(data=data, axes=list(space), metrics=metrics, title="search",
                        objective=objective if isinstance(objective, str) else getattr(objective, "__name__", "objective"),
                        direction=direction, best_params=dict(study.best_params), best_value=float(study.best_value),
                        study=study)
