"""Sweeps and searches at scale: evaluate many merges on local processes, Ray or Dask, with a resumable cache.

    import taskvec
    res = taskvec.sweep("base/", ["a/", "b/"], {"method": ["ties", "dare_ties"], "density": [0.2, 0.5]},
                        "zoo", executor="local", workers=2, cache="cache/")
    res.data; res.heatmap("mean_accuracy"); res.pareto("mean_accuracy", "n_models")
    best = taskvec.search("base/", ["a/", "b/"], {"density": (0.1, 1.0)}, "zoo",
                          objective="mean_accuracy", n_trials=30, cache="cache/")

Modules, in the order a sweep flows through them: `grid` (a dict of lists -> distinct points),
`evaluators` (named, picklable evaluators), `cache` (a JSON per point under a hash of its inputs),
`executors` (serial, local, ray, dask), `engine` (`sweep`), `search` (Optuna), `results` (table and
plots), `cli` (``taskvec sweep SWEEP.yml --out DIR``). The package is `sweeping` so that `taskvec.sweep`
stays the function (as `taskvec.merging` holds `taskvec.merge`).
"""
from taskvec.sweeping.engine import run_point, sweep
from taskvec.sweeping.evaluators import EVALUATORS, LmEvalEvaluator, PerplexityEvaluator, ZooEvaluator, get_evaluator
from taskvec.sweeping.executors import EXECUTORS, get_executor
from taskvec.sweeping.grid import Point, expand_grid
from taskvec.sweeping.results import SearchResult, SweepResult, pareto_front
from taskvec.sweeping.search import search

__all__ = ["sweep", "search", "run_point", "expand_grid", "Point", "EVALUATORS", "get_evaluator", "ZooEvaluator",
           "PerplexityEvaluator", "LmEvalEvaluator", "EXECUTORS", "get_executor", "SweepResult", "SearchResult",
           "pareto_front"]
