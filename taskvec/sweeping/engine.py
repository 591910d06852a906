"""`sweep`: evaluate a merge at every point of a parameter grid, on any executor, with a resumable cache.

    res = taskvec.sweep("base/", ["ft_a/", "ft_b/"],
                        {"method": ["ties", "task_arithmetic"], "density": [0.2, 0.5], "lambda": [0.5, 1.0]},
                        "zoo", executor="local", workers=2, cache="sweep-cache/")
    res.data              # one row per point: parameters, metrics, wall time, peak memory
    res.heatmap("mean_accuracy", x="density", y="lambda"); res.pareto("mean_accuracy", "n_models")

A point is one `taskvec.merge(base, models, method, **params)` streamed by a
worker from the checkpoints' paths, then `evaluate(merged)`. Its record goes to
the cache the moment it arrives, so a rerun (or a resumed, killed sweep)
evaluates only what is missing.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from taskvec._progress import progress as progress_bar
from taskvec.errors import ParameterError
from taskvec.sweeping.cache import ResultCache, evaluator_identity, fingerprint_input, point_key
from taskvec.sweeping.evaluators import bind, get_evaluator
from taskvec.sweeping.executors import get_executor
from taskvec.sweeping.grid import MERGE_KEYS, Point, expand_grid
from taskvec.sweeping.results import SweepResult

MATERIALIZE = ("auto", "state_dict", "folder")
#: "auto" writes a folder when the inputs are larger than this (a merged state dict would not fit beside them)
AUTO_FOLDER_BYTES = 2 << 30
TIMING_COLUMNS = ("wall_time_s", "merge_time_s", "peak_rss_mb", "peak_anon_mb")


@dataclass
class Job:
    """What a worker needs for one point: paths (or, in-process, objects), the method, parameters, evaluator."""

    base: Any
    models: list
    method: str
    params: dict
    evaluate: Callable
    materialize: str = "state_dict"
    merge_options: dict = field(default_factory=dict)
    scratch: str | None = None
    on_error: str = "raise"


class _PeakMemory:
    """Peak RSS (VmHWM, reset at entry) and peak anonymous memory (RssAnon, sampled every 20 ms) of this
    process while the block runs, in MB. Linux only; elsewhere NaN."""

    def __enter__(self):
        self.rss = self.anon = float("nan")
        self._status = Path("/proc/self/status")
        if not self._status.exists():
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, so it is this point's peak
        except OSError:
            pass
        self.anon = self._read("RssAnon:")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _read(self, field_: str) -> float:
        for line in self._status.read_text().splitlines():
            if line.startswith(field_):
                return int(line.split()[1]) / 1024
        return float("nan")

    def _sample(self):
        while not self._stop.wait(0.02):
            self.anon = max(self.anon, self._read("RssAnon:"))

    def __exit__(self, *exc):
        if hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            self.anon = max(self.anon, self._read("RssAnon:"))
            self.rss = self._read("VmHWM:")
        return False


def _scalar(v: Any) -> Any:
    """A one-element tensor / numpy value as a Python number; anything else as is."""
    n = v.numel() if hasattr(v, "numel") else getattr(v, "size", None)
    return v.item() if n == 1 and hasattr(v, "item") else v


def as_metrics(out: Any, where: str) -> dict[str, Any]:
    """An evaluator's answer checked (a dict) and made plain (numbers, not tensors)."""
    if not isinstance(out, Mapping):
        raise ParameterError(f"evaluate must return a dict of metrics, got {type(out).__name__} ({where})")
    return {str(k): _scalar(v) for k, v in out.items()}


def run_point(job: Job) -> dict[str, Any]:
    """Merge one point (streaming from the inputs) and evaluate it; what the workers run."""
    from taskvec.merging import merge

    started = time.perf_counter()
    tmp = None
    try:
        with _PeakMemory() as mem:
            kw = dict(progress=False, **job.merge_options)
            if job.materialize == "folder":
                tmp = tempfile.mkdtemp(prefix="taskvec-sweep-", dir=job.scratch)
                kw["out"] = Path(tmp) / "merged"
            merged = merge(job.base, job.models, job.method, **kw, **job.params)
            merged_at = time.perf_counter()
            metrics = as_metrics(job.evaluate(merged), f"{job.method} {job.params}")
            del merged
    except Exception as e:
        if job.on_error == "raise":
            raise
        return {"metrics": {}, "error": f"{type(e).__name__}: {e}"}
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"metrics": metrics, "wall_time_s": time.perf_counter() - started, "merge_time_s": merged_at - started,
            "peak_rss_mb": mem.rss, "peak_anon_mb": mem.anon}


def model_labels(models: Sequence[Any] | Mapping[str, Any]) -> tuple[list[str], list[Any]]:
    if isinstance(models, Mapping):
        return [str(k) for k in models], list(models.values())
    if isinstance(models, (str, os.PathLike)) or not isinstance(models, Sequence):
        raise ParameterError(f"models: expected a list (or a dict label -> model), got {type(models).__name__}")
    labels = []
    for i, m in enumerate(models):
        name = os.path.basename(str(m).rstrip("/")) if isinstance(m, (str, os.PathLike)) else f"model {i + 1}"
        labels.append(name if name not in labels else f"{name} ({i + 1})")
    return labels, list(models)


def _input_bytes(paths: Sequence[Any]) -> int:
    total = 0
    for p in paths:
        if isinstance(p, (str, os.PathLike)) and Path(p).exists():
            q = Path(p)
            total += q.stat().st_size if q.is_file() else sum(f.stat().st_size for f in q.rglob("*.safetensors"))
    return total


def _materialize(materialize: str, evaluate: Callable, inputs: Sequence[Any]) -> str:
    if materialize not in MATERIALIZE:
        raise ParameterError(f"materialize: expected one of {', '.join(MATERIALIZE)}, got {materialize!r}")
    if materialize != "auto":
        return materialize
    preferred = getattr(evaluate, "materialize", None)
    if preferred in ("state_dict", "folder"):
        return preferred
    return "folder" if _input_bytes(inputs) > AUTO_FOLDER_BYTES else "state_dict"


class Plan:
    """What every point of a sweep shares (inputs, evaluator, cache, merge options); makes each point's
    cache key and its job."""

    def __init__(self, base, models, evaluate, *, cache, materialize, merge_options, scratch, on_error, labels):
        self.base, self.models, self.labels = base, models, labels
        self.evaluate = evaluate
        self.cache = cache if isinstance(cache, ResultCache) else ResultCache(cache)
        self.materialize = _materialize(materialize, evaluate, [base, *models])
        self.merge_options, self.scratch, self.on_error = merge_options, scratch, on_error
        self._fingerprints: dict[int, Any] = {}
        self._evaluator = evaluator_identity(evaluate) if self.cache.root is not None else ""

    def _fp(self, i: int | None) -> Any:
        if i not in self._fingerprints:
            self._fingerprints[i] = fingerprint_input(self.base if i is None else self.models[i])
        return self._fingerprints[i]

    def key(self, point: Point) -> str:
        if self.cache.root is None:
            return ""
        inputs = {"base": None if self.base is None else self._fp(None), "models": [self._fp(i) for i in point.models]}
        params = {point.canonical.get(k, k): v for k, v in point.params.items()}
        return point_key(inputs, point.method, {**self.merge_options, **params}, self._evaluator)  # as `job`

    def job(self, point: Point) -> Job:
        merge_options = dict(self.merge_options)
        params = dict(point.params)
        for k in (*MERGE_KEYS, "seed"):  # keywords of merge() itself (seed: also DARE's parameter)
            if k in params:
                merge_options[k] = params.pop(k)
        return Job(self.base, [self.models[i] for i in point.models], point.method, params, self.evaluate,
                   self.materialize, merge_options, self.scratch, self.on_error)


def run_points(plan: Plan, points: Sequence[Point], executor, *, desc: str, progress: bool = True
               ) -> list[dict[str, Any]]:
    """Records of `points` in order: from the cache where it has them, else run on `executor` (each
    stored in the cache as it arrives). A record: {"metrics", timings..., "cached"}."""
    keys = [plan.key(p) for p in points]
    records: list[dict[str, Any] | None] = [None] * len(points)
    todo = []
    for i, k in enumerate(keys):
        hit = plan.cache.get(k) if k else None
        if hit is not None:
            records[i] = {**hit, "cached": True}
        else:
            todo.append(i)
    if todo:
        if not executor.in_process:
            for what, m in [("base", plan.base), *((f"models[{i}]", m) for i, m in enumerate(plan.models))]:
                if m is not None and not isinstance(m, (str, os.PathLike)):
                    raise ParameterError(f"{what}: executor {executor.name!r} opens models by path in its workers; "
                                         f"got a {type(m).__name__} (save it, or use executor='serial')")
        jobs = [plan.job(points[i]) for i in todo]
        bar = progress_bar(total=len(points), initial=len(points) - len(todo), desc=desc,
                           disable=None if progress else True)
        try:
            for j, out in executor.run(run_point, jobs):
                i = todo[j]
                if "error" not in out:
                    plan.cache.put(keys[i], out)
                records[i] = {**out, "cached": False}
                bar.update(1)
        finally:
            bar.close()
    return records


def frame(points: Sequence[Point], records: Sequence[Mapping[str, Any]], labels: Sequence[str],
          axes: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """The tidy table: one row per point (method, models, parameters, metrics, timings), and the metric names."""
    rows, metrics = [], {}
    for p, rec in zip(points, records):
        row = {"method": p.method, "models": "+".join(labels[i] for i in p.models), "n_models": len(p.models)}
        row.update({a: p.params.get(a) for a in axes})
        row.update({k: v for k, v in p.params.items() if k not in row})
        row.update(rec.get("metrics", {}))
        metrics.update(dict.fromkeys(rec.get("metrics", {})))
        row.update({c: rec.get(c, float("nan")) for c in TIMING_COLUMNS})
        row["cached"] = bool(rec.get("cached"))
        if rec.get("error"):
            row["error"] = rec["error"]
        rows.append(row)
    return pd.DataFrame(rows), list(metrics)


def sweep(
    base: Any,
    models: Sequence[Any] | Mapping[str, Any],
    grid: Mapping[str, Sequence[Any]],
    evaluate: Callable[[Any], Mapping[str, Any]] | str,
    *,
    method: str | None = None,
    executor: str = "local",
    workers: int | None = None,
    cache: str | os.PathLike | None = None,
    materialize: str = "auto",
    dtype: str | None = None,
    seed: int = 0,
    evaluate_options: Mapping[str, Any] | None = None,
    executor_options: Mapping[str, Any] | None = None,
    on_error: str = "raise",
    scratch: str | os.PathLike | None = None,
    merge_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    desc: str | None = None,
    **params: Any,
) -> SweepResult:
    """Evaluate `taskvec.merge(base, subset_of_models, method, **point)` at every point of `grid`.

    Args:
        base: the base model (path; in-memory models only with executor="serial").
        models: fine-tuned models, a list of paths or a dict label -> path.
        grid: dict of lists whose product is swept: `method`, method parameters (`weight`, `lambda`,
            `density`, `epsilon`, `t`, ...), `models` (a list of subsets, by index or label), `dtype`.
            A parameter a point's method does not take is dropped from that point and the points that
            then coincide are evaluated once (the others are in `.skipped`).
        evaluate: `f(merged) -> dict of numbers` (merged: a state dict or a folder path, see
            `materialize`), or an evaluator name: "zoo", "perplexity", "lm_eval", "package.module:Class";
            its options in `evaluate_options`. Process executors pickle it: with cloudpickle (which
            ray and dask bring) notebook-defined classes and functions travel too; else define it in a module.
        method: the method of grids without a `method` axis.
        executor: "serial" (this process), "local" (spawned processes), "ray", "dask".
        workers: processes / CPUs (default: every core).
        cache: a folder: each point's record is stored there as it finishes, keyed by the inputs'
            fingerprints, method, parameters and evaluator; points found there are not evaluated again.
        materialize: "state_dict" (in memory), "folder" (written under `scratch`, removed after
            evaluation: models larger than RAM), "auto" (the evaluator's preference, else by input size).
        dtype: output dtype of the merges (`taskvec.merge`'s dtype).
        seed: seed of random methods (DARE, DELLA).
        merge_options: other keywords of `taskvec.merge` (e.g. device, align_vocab).
        on_error: "raise" (default) or "record" (the row gets an `error` column; nothing is cached).
        **params: parameters every point shares (a list with one value per model is per-model and follows
            the `models` axis).

    Returns:
        SweepResult: `.data` (one row per point), `.skipped`, `.heatmap()`, `.pareto()`, `.best()`.
    """
    if on_error not in ("raise", "record"):
        raise ParameterError(f"on_error: expected 'raise' or 'record', got {on_error!r}")
    labels, model_list = model_labels(models)
    evaluate = bind(get_evaluator(evaluate, **dict(evaluate_options or {})), base)
    points, skipped = expand_grid(grid, labels=labels, method=method, fixed=params, has_base=base is not None)
    exe = get_executor(executor, workers, **dict(executor_options or {}))
    merge_options = {"seed": seed, **({"dtype": dtype} if dtype is not None else {}), **dict(merge_options or {})}
    plan = Plan(base, model_list, evaluate, cache=cache, materialize=materialize, merge_options=merge_options,
                scratch=None if scratch is None else str(scratch), on_error=on_error, labels=labels)
    with exe:
        records = run_points(plan, points, exe, desc=desc or f"sweep ({len(points)} points)", progress=progress)
    axes = [k for k in grid if k not in ("method", "models")]
    data, metrics = frame(points, records, labels, axes)
    varied = [k for k in grid if len(set(map(repr, grid[k]))) > 1] if isinstance(grid, Mapping) else []
    return SweepResult(data=data, axes=varied, metrics=metrics, skipped=pd.DataFrame(skipped),
                       title=desc or "sweep")
