"""Parameter sweeps with an evaluation callback: DARE drop rate (DARE Fig. 1), lambda, density.

Callback protocol (shared by every sweep): `eval_fn(state_dict) -> dict of
metrics`, where `state_dict` maps every parameter name of the base model to a
tensor (the edited / merged model). Each grid point becomes one row of a tidy
DataFrame: the swept parameter(s), weight-space statistics, and the metrics.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from taskvec._progress import progress
from taskvec.analysis._results import AnalysisResult
from taskvec.analysis._stream import iter_deltas, named_task_vectors
from taskvec.errors import ParameterError

EvalFn = Callable[[dict[str, torch.Tensor]], dict[str, Any]]

DEFAULT_DROP_RATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def _metrics(eval_fn: EvalFn, state_dict: dict[str, torch.Tensor], where: str) -> dict[str, Any]:
    out = eval_fn(state_dict)
    if not isinstance(out, dict):
        raise ParameterError(f"eval_fn must return a dict of metrics, got {type(out).__name__} ({where})")
    return {str(k): (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v) for k, v in out.items()}


def _open_base(base, tv=None):
    from taskvec.io import open_source

    if base is None:
        base = getattr(tv, "base", None)
        if base is None:
            raise ParameterError("base: this task vector doesn't know its base model; pass base=")
    return open_source(base)


@dataclass(repr=False, eq=False)
class Sweep(AnalysisResult):
    """Tidy results of a sweep: one row per grid point (+ optional reference rows such as the base model)."""

    data: pd.DataFrame
    x: str
    title: str
    hue: str | None = None
    metrics: list[str] = field(default_factory=list)
    reference: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> metrics (drawn as lines)

    kind = "sweep"

    def tables(self) -> dict[str, pd.DataFrame]:
        out = {"data": self.data}
        if self.reference:
            out["reference"] = pd.DataFrame([{"model": k, **v} for k, v in self.reference.items()])
        return out

    def summary(self) -> list[str]:
        lines = [f"{self.title}: {len(self.data)} grid points over {self.x}"]
        for m in self.metrics:
            col = self.data[m]
            if pd.api.types.is_numeric_dtype(col) and col.notna().any():
                best = self.data.loc[col.idxmax()]
                hue = f", {self.hue}={best[self.hue]}" if self.hue else ""
                lines.append(f"max {m} = {best[m]:.4g} at {self.x}={best[self.x]:g}{hue}")
        return lines

    def plot(self, metric: str | None = None, *, logx: bool = False):
        """Line chart of `metric` (default: the first callback metric, else the first weight statistic) vs x."""
        from taskvec.viz import lines, new_figure, style

        if metric is None:
            metric = self.metrics[0] if self.metrics else _default_stat(self.data)
        if metric not in self.data:
            raise ParameterError(f"Sweep.plot: no column {metric!r}; choose from {list(self.data.columns)}")
        with style():
            fig, ax = new_figure(figsize=(7.2, 4.4))
            d = self.data.copy()
            if self.hue:
                d[self.hue] = d[self.hue].map(_hue_label(self.hue))
            lines(ax, d, x=self.x, y=metric, hue=self.hue, style=self.hue, title=f"{self.title}: {_label(metric)}",
                  xlabel=_label(self.x), ylabel=_label(metric), logx=logx, legend_title="")
            styles = ["--", ":", "-."]
            for i, (name, vals) in enumerate(self.reference.items()):
                if metric in vals and isinstance(vals[metric], (int, float)):
                    ax.axhline(vals[metric], color="0.35", linestyle=styles[i % 3], linewidth=1.1, label=name)
            if self.reference:
                ax.legend(frameon=False)
        return fig


def _default_stat(df: pd.DataFrame) -> str:
    for c in ("cosine_to_tau", "norm_ratio", "merged_norm"):
        if c in df:
            return c
    return df.columns[-1]


_LABELS = {
    "drop_rate": "drop rate p (fraction of delta entries zeroed)",
    "norm_ratio": r"$\|\tilde\tau\| \,/\, \|\tau\|$",
    "rel_norm_error": r"relative error of $\|\tilde\tau\|$",
    "cosine_to_tau": r"$\cos(\tilde\tau, \tau)$",
    "rel_l2_error": r"$\|\tilde\tau - \tau\| \,/\, \|\tau\|$",
    "frac_kept": "fraction of non-zero deltas kept",
    "lambda": r"scaling coefficient $\lambda$",
    "density": r"density $k$ (fraction of $|\tau|$ kept)",
    "merged_norm": r"$\|\theta_{merged} - \theta_{base}\|$",
}


def _label(col: str) -> str:
    return _LABELS.get(col, col.replace("_", " "))


def _hue_label(hue: str):
    if hue == "rescale":
        return lambda v: "with rescale 1/(1-p)" if v else "without rescale"
    return str


def dare_sweep(
    tv,
    ps: Sequence[float] = DEFAULT_DROP_RATES,
    rescale: Sequence[bool] = (True, False),
    eval_fn: EvalFn | None = None,
    base=None,
    seed: int = 0,
    *,
    eval_base: bool = True,
    name: str | None = None,
) -> Sweep:
    """DARE drop-rate sweep (DARE paper, Fig. 1): drop a fraction p of tau's entries, with/without rescale.

    For every (p, rescale): tau~ = dare_drop(tau, p, rescale) with the generator of
    each tensor seeded from (seed, tensor name), so masks are reproducible and
    nested across p. Weight-space statistics: ||tau~||/||tau||, the relative error
    of ||tau~||, cos(tau~, tau), ||tau~ - tau||/||tau||, fraction of non-zeros kept.
    With `eval_fn`, each point also evaluates theta_base + tau~ (built tensor by
    tensor from `base`, default tv.base); `eval_base` adds the base model itself
    as a reference line.
    """
    from taskvec.methods.dare import check_drop_rate, dare_drop, tensor_generator

    ps = [check_drop_rate(p) for p in ps]
    if not ps:
        raise ParameterError("dare_sweep: no drop rates given")
    rescales = [bool(r) for r in rescale]
    if not rescales:
        raise ParameterError("dare_sweep: rescale must list at least one of True/False")
    vectors, names = named_task_vectors(tv, None if name is None else [name])
    if len(vectors) != 1:
        raise ParameterError("dare_sweep takes one task vector")
    grid = [(p, r) for r in rescales for p in ps]
    # sums per grid point: <tau~, tau~>, <tau~, tau>, non-zeros kept; and <tau, tau>, non-zeros of tau
    acc = {g: [0.0, 0.0, 0] for g in grid}
    sq_tau, nnz_tau = 0.0, 0

    def stats(key: str, d: torch.Tensor, p: float, r: bool) -> torch.Tensor:
        dt = dare_drop(d, p, rescale=r, generator=tensor_generator(seed, key))
        a = acc[(p, r)]
        a[0] += float(torch.dot(dt, dt))
        a[1] += float(torch.dot(dt, d))
        a[2] += int(torch.count_nonzero(dt))
        return dt

    reference: dict[str, dict[str, Any]] = {}
    metrics_rows: dict[tuple[float, bool], dict[str, Any]] = {}
    if eval_fn is None:
        for key, (d,) in iter_deltas(vectors, names, desc="DARE sweep"):
            sq_tau += float(torch.dot(d, d))
            nnz_tau += int(torch.count_nonzero(d))
            for p, r in grid:
                stats(key, d, p, r)
    else:
        src = _open_base(base, vectors[0])
        keys = set(vectors[0].keys())
        missing = sorted(keys - set(src.keys()))
        if missing:
            raise ParameterError(f"base {src.name} lacks tensors the task vector has, e.g. {missing[:3]}")
        if eval_base:
            reference["base model"] = _metrics(eval_fn, {k: src.get(k) for k in src.keys()}, "base model")
        first = True
        for p, r in progress(grid, desc="DARE sweep", total=len(grid)):
            sd: dict[str, torch.Tensor] = {}
            for k in src.keys():
                t = src.get(k)
                if k not in keys:
                    sd[k] = t
                    continue
                d = vectors[0][k].to(torch.float32).reshape(-1)
                if first:
                    sq_tau += float(torch.dot(d, d))
                    nnz_tau += int(torch.count_nonzero(d))
                dt = stats(k, d, p, r)
                sd[k] = (t.to(torch.float32) + dt.view(t.shape)).to(t.dtype)
                del d, dt
            first = False
            metrics_rows[(p, r)] = _metrics(eval_fn, sd, f"p={p}, rescale={r}")
            del sd
    norm_tau = math.sqrt(sq_tau)
    rows = []
    for p, r in grid:
        sq, cross, kept = acc[(p, r)]
        norm_t = math.sqrt(sq)
        row = {
            "drop_rate": p, "rescale": r,
            "norm_ratio": norm_t / norm_tau if norm_tau else float("nan"),
            "rel_norm_error": abs(norm_t - norm_tau) / norm_tau if norm_tau else float("nan"),
            "cosine_to_tau": cross / (norm_t * norm_tau) if norm_t and norm_tau else float("nan"),
            "rel_l2_error": math.sqrt(max(sq - 2 * cross + sq_tau, 0.0)) / norm_tau if norm_tau else float("nan"),
            "frac_kept": kept / nnz_tau if nnz_tau else float("nan"),
        }
        row.update(metrics_rows.get((p, r), {}))
        rows.append(row)
    data = pd.DataFrame(rows)
    metric_names = list(dict.fromkeys(k for m in metrics_rows.values() for k in m))
    return Sweep(data=data, x="drop_rate", hue="rescale" if len(rescales) > 1 else None, title="DARE drop-rate sweep" + ("" if names[0] == "task 1" else f" ({names[0]})"),
                 metrics=metric_names, reference=reference)


def merge_sweep(
    base,
    models: Sequence[Any],
    *,
    method: str,
    param: str,
    values: Sequence[float],
    eval_fn: EvalFn | None = None,
    weight_stats: bool = True,
    title: str | None = None,
    **params,
) -> Sweep:
    """Sweep one parameter of any merge method: `taskvec.merging.merge(base, models, method=, **{param: v}, **params)`.

    Each merged state dict goes to `eval_fn` (if given). `weight_stats` adds
    ||theta_merged - theta_base|| and the cosine between the merged delta and each
    model's task vector (how much of each task survives the merge). Runs on the
    sweep engine (`taskvec.sweep`), in this process, with the merges in memory.
    """
    from taskvec.sweeping import sweep

    values = [float(v) for v in values]
    if not values:
        raise ParameterError(f"{param}: no values to sweep")
    if param in params:
        raise ParameterError(f"{param} is the swept parameter; don't also pass it as a fixed parameter")
    src = _open_base(base)
    tvs = tv_names = None
    if weight_stats:
        from taskvec.vector import TaskVector

        labels = [os.path.basename(str(m).rstrip("/")) if isinstance(m, (str, os.PathLike)) else f"model {i + 1}"
                  for i, m in enumerate(models)]
        tvs, tv_names = named_task_vectors([TaskVector.from_models(src, m) for m in models], labels)
    merge_options = {k: params.pop(k) for k in _MERGE_OPTIONS if k in params}
    evaluate = _PointEvaluator(src, tvs, tv_names, eval_fn, param)
    result = sweep(src, list(models), {param: values}, evaluate, method=method, executor="serial",
                   materialize="state_dict", merge_options=merge_options, desc=f"{method} sweep over {param}",
                   **params)
    data = result.data[[param, *result.metrics]].reset_index(drop=True)
    metric_names = [c for c in data.columns if c != param and not c.startswith(("merged_norm", "cos_merged_to_"))]
    return Sweep(data=data, x=param, title=title or f"{method} sweep over {param}", metrics=metric_names)


# keyword arguments of `taskvec.merge` itself (not of the method) that merge_sweep passes through
_MERGE_OPTIONS = ("dtype", "device", "seed", "align_vocab")


@dataclass(eq=False)
class _PointEvaluator:
    """One sweep point's row: the merged delta's statistics, then the callback's metrics."""

    src: Any
    tvs: Any
    names: Any
    eval_fn: EvalFn | None
    param: str

    def __call__(self, merged: dict[str, torch.Tensor]) -> dict[str, Any]:
        row: dict[str, Any] = {}
        if self.tvs is not None:
            row.update(_merged_delta_stats(self.src, merged, self.tvs, self.names))
        if self.eval_fn is not None:
            row.update(_metrics(self.eval_fn, merged, f"{self.param} sweep"))
        return row


def _merged_delta_stats(src, merged: dict[str, torch.Tensor], tvs, names) -> dict[str, float]:
    """||theta_merged - theta_base|| and cos(theta_merged - theta_base, tau_i), streamed over the task vectors' tensors."""
    sq, dots, sq_tau = 0.0, np.zeros(len(tvs)), np.zeros(len(tvs))
    for key, deltas in iter_deltas(tvs, names, desc="merged-delta stats"):
        if key not in merged:
            continue
        m = merged[key].to(torch.float32).reshape(-1) - src.get(key).to(torch.float32).reshape(-1)
        sq += float(torch.dot(m, m))
        for i, d in enumerate(deltas):
            dots[i] += float(torch.dot(m, d))
            sq_tau[i] += float(torch.dot(d, d))
    out = {"merged_norm": math.sqrt(sq)}
    for i, n in enumerate(names):
        denom = math.sqrt(sq * sq_tau[i])
        out[f"cos_merged_to_{n}"] = dots[i] / denom if denom else float("nan")
    return out


def lambda_sweep(base, models, lambdas: Sequence[float] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0), *, method: str = "task_arithmetic",
                 eval_fn: EvalFn | None = None, param: str = "lambda", **params) -> Sweep:
    """Sweep the scaling coefficient lambda of `method` (task arithmetic: theta = theta_0 + lambda sum tau_i)."""
    s = merge_sweep(base, models, method=method, param=param, values=lambdas, eval_fn=eval_fn,
                    title=f"{method}: lambda sweep", **params)
    s.data = s.data.rename(columns={param: "lambda"})
    s.x = "lambda"
    return s


def density_sweep(base, models, densities: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0), *, method: str = "ties",
                  eval_fn: EvalFn | None = None, param: str = "density", **params) -> Sweep:
    """Sweep the trim density k of `method` (TIES / DARE-TIES / breadcrumbs ...)."""
    for k in densities:
        if not (0.0 < float(k) <= 1.0):
            raise ParameterError(f"densities must be in (0, 1], got {k}")
    s = merge_sweep(base, models, method=method, param=param, values=densities, eval_fn=eval_fn,
                    title=f"{method}: density sweep", **params)
    s.data = s.data.rename(columns={param: "density"})
    s.x = "density"
    return s
