"""What a sweep or a search returns: the tidy table, and the pictures of it (heatmap, Pareto front)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from taskvec.analysis._results import AnalysisResult
from taskvec.errors import ParameterError

DIRECTIONS = ("maximize", "minimize")


def pareto_front(df: pd.DataFrame, x: str, y: str, *, maximize: tuple[bool, bool] = (True, True)) -> pd.Series:
    """Which rows no other row beats on both `x` and `y` (each maximized or minimized)."""
    a = df[[x, y]].to_numpy(dtype=float) * np.where(maximize, 1.0, -1.0)
    ok = np.isfinite(a).all(axis=1)
    front = np.zeros(len(df), dtype=bool)
    for i in np.flatnonzero(ok):
        others = a[ok]
        dominated = ((others >= a[i]).all(axis=1) & (others > a[i]).any(axis=1)).any()
        front[i] = not dominated
    return pd.Series(front, index=df.index)


@dataclass(repr=False, eq=False)
class SweepResult(AnalysisResult):
    """One row per evaluated point: method, models, parameters, metrics, wall time, peak memory.

    `skipped` lists the grid points not evaluated because they coincide with an evaluated one (a
    parameter their method doesn't take, or a repeated value), with the reason.
    """

    data: pd.DataFrame
    axes: list[str]
    metrics: list[str]
    skipped: pd.DataFrame = field(default_factory=pd.DataFrame)
    title: str = "sweep"

    kind = "sweep"

    def tables(self) -> dict[str, pd.DataFrame]:
        out = {"results": self.data}
        if len(self.skipped):
            out["skipped"] = self.skipped
        return out

    @property
    def evaluated(self) -> int:
        """Points evaluated by this run (the rest came from the cache)."""
        return int((~self.data["cached"]).sum()) if "cached" in self.data else len(self.data)

    def summary(self) -> list[str]:
        lines = [f"{self.title}: {len(self.data)} points ({self.evaluated} evaluated, "
                 f"{len(self.data) - self.evaluated} from the cache)" +
                 (f"; {len(self.skipped)} grid points skipped (see .skipped)" if len(self.skipped) else "")]
        for m in self.metrics:
            col = pd.to_numeric(self.data[m], errors="coerce")
            if col.notna().any():
                row = self.data.loc[col.idxmax()]
                at = ", ".join(f"{a}={row[a]}" for a in self._point_columns())
                lines.append(f"max {m} = {col.max():.4g} at {at}")
        if "error" in self.data and self.data["error"].notna().any():
            lines.append(f"{int(self.data['error'].notna().sum())} points failed (see the error column)")
        return lines

    def _point_columns(self) -> list[str]:
        cols = [a for a in self.axes if a in self.data]
        return cols or ["method"]

    def best(self, metric: str | None = None, direction: str = "maximize") -> dict[str, Any]:
        """The row with the best `metric` (default: the first metric), as a dict."""
        metric = self._metric(metric)
        if direction not in DIRECTIONS:
            raise ParameterError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")
        col = pd.to_numeric(self.data[metric], errors="coerce")
        if not col.notna().any():
            raise ParameterError(f"best: no point has a numeric {metric!r}")
        return self.data.loc[col.idxmax() if direction == "maximize" else col.idxmin()].to_dict()

    def _metric(self, metric: str | None) -> str:
        if metric is None:
            if not self.metrics:
                raise ParameterError("this sweep has no metrics")
            return self.metrics[0]
        if metric not in self.data:
            raise ParameterError(f"no column {metric!r}; metrics: {self.metrics}, columns: {list(self.data.columns)}")
        return metric

    def _numeric_axes(self) -> list[str]:
        return [a for a in self.axes if a in self.data and pd.api.types.is_numeric_dtype(self.data[a])
                and self.data[a].nunique() > 1]

    # -- pictures ------------------------------------------------------------------------------
    def plot(self, metric: str | None = None):
        """A heatmap over the first two numeric grid axes, else a line over the one numeric axis (one line
        per method / model subset), else the Pareto plot of the metric against the model count."""
        numeric = self._numeric_axes()
        if len(numeric) >= 2:
            return self.heatmap(metric, x=numeric[0], y=numeric[1])
        if len(numeric) == 1:
            return self._line(self._metric(metric), numeric[0])
        return self.pareto(self._metric(metric), "n_models")

    def _line(self, metric: str, x: str):
        from taskvec.viz import lines, new_figure, style

        hue = next((c for c in ("method", "models") if self.data[c].nunique() > 1), None)
        with style():
            fig, ax = new_figure(figsize=(7.2, 4.4))
            lines(ax, self.data, x=x, y=metric, hue=hue, style=hue, title=f"{self.title}: {metric}",
                  xlabel=x, ylabel=metric, legend_title="")
        return fig

    def heatmap(self, metric: str | None = None, *, x: str | None = None, y: str | None = None,
                agg: str = "max", title: str | None = None):
        """`metric` over two grid axes; points that differ in other axes are reduced by `agg` (max, mean...).
        `title` replaces the default (the metric's column name)."""
        from taskvec.viz import heatmap, new_figure, style

        metric = self._metric(metric)
        numeric = self._numeric_axes()
        candidates = [a for a in self.axes if a in self.data and self.data[a].nunique() > 1]
        x = x or (numeric or candidates or [None])[0]
        y = y or next((a for a in (numeric + candidates) if a != x), None)
        for name, axis in (("x", x), ("y", y)):
            if axis is None or axis not in self.data:
                raise ParameterError(f"heatmap: {name}={axis!r} is not a grid axis with several values; "
                                     f"axes: {self.axes}")
        table = self.data.pivot_table(index=y, columns=x, values=metric, aggfunc=agg).sort_index(ascending=False)
        others = [a for a in self.axes if a not in (x, y) and self.data[a].nunique() > 1]
        note = f" ({agg} over {', '.join(others)})" if others else ""
        with style():
            fig, ax = new_figure(figsize=(1.1 * table.shape[1] + 3.2, 0.6 * table.shape[0] + 2.4))
            heatmap(ax, table, title=(title or metric) + note, xlabel=x, ylabel=y, cbar_label=metric, fmt=".3g")
        return fig

    def pareto(self, x: str | None = None, y: str | None = None, *, minimize: Sequence[str] = ("n_models",),
               label: str | None = None):
        """Every point as `x` vs `y` (metrics, or a column such as n_models / peak_anon_mb), the Pareto front
        (maximizing each, except the columns in `minimize`) joined by a line and labelled."""
        from taskvec.viz import new_figure, style

        x = self._metric(x)
        y = y or ("n_models" if self.data["n_models"].nunique() > 1 or len(self.metrics) < 2
                  else next(m for m in self.metrics if m != x))
        if y not in self.data:
            raise ParameterError(f"pareto: no column {y!r}; columns: {list(self.data.columns)}")
        d = self.data.copy()
        d["_front"] = pareto_front(d, x, y, maximize=(x not in minimize, y not in minimize))
        label = label or next((c for c in ("method", "models") if d[c].nunique() > 1), None)
        with style():
            fig, ax = new_figure(figsize=(7.0, 4.6))
            groups = d.groupby(label, sort=False) if label else [("points", d)]
            for name, g in groups:
                ax.scatter(g[x], g[y], s=28, alpha=0.75, label=str(name))
            front = d[d["_front"]].sort_values(x)
            ax.plot(front[x], front[y], color="0.2", linewidth=1.2, linestyle="--", marker="o", markersize=7,
                    markerfacecolor="none", label="Pareto front")
            for _, r in front.iterrows():
                text = ", ".join(f"{a}={r[a]:g}" if isinstance(r[a], (int, float)) else f"{a}={r[a]}"
                                 for a in self._point_columns() if a not in (x, y) and pd.notna(r[a]))
                ax.annotate(text, (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=7.5)
            ax.set_title(f"{self.title}: {y} vs {x}")
            ax.set_xlabel(x)
            ax.set_ylabel(y)
            ax.legend(frameon=False)
        return fig


@dataclass(repr=False, eq=False)
class SearchResult(SweepResult):
    """The trials of a `search` as a sweep table (plus `trial` and `objective`), and the best point."""

    objective: str = "objective"
    direction: str = "maximize"
    best_params: dict[str, Any] = field(default_factory=dict)
    best_value: float = float("nan")
    study: Any = None

    kind = "search"

    def summary(self) -> list[str]:
        return [f"{self.title}: {len(self.data)} trials ({self.evaluated} evaluated, "
                f"{len(self.data) - self.evaluated} from the cache); best {self.objective} = "
                f"{self.best_value:.4g} ({self.direction}) at {self.best_params}"]

    def plot(self, metric: str | None = None):
        """The objective of every trial and the best so far."""
        from taskvec.viz import new_figure, style

        metric = metric or "objective"
        d = self.data
        best = d[metric].cummax() if self.direction == "maximize" else d[metric].cummin()
        with style():
            fig, ax = new_figure(figsize=(7.0, 4.2))
            ax.scatter(d["trial"], d[metric], s=24, label="trial")
            ax.step(d["trial"], best, where="post", color="0.2", label="best so far")
            ax.set_title(f"{self.title}: {self.objective}")
            ax.set_xlabel("trial")
            ax.set_ylabel(self.objective)
            ax.legend(frameon=False)
        return fig
