"""Plot helpers in the house style: heatmaps, line charts, log-scale histograms.

They draw on a given Axes and return it, so callers compose them into
figures; titles and axis labels are required arguments so every panel says
what it shows.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import pandas as pd

from taskvec.viz.style import DIVERGING_CMAP, PALETTE, SEQUENTIAL_CMAP


def symmetric_limit(values, *, floor: float = 1e-3) -> float:
    """A 'nice' symmetric colour limit covering max |value| (for diverging maps centred at 0)."""
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    m = float(np.abs(arr).max()) if arr.size else 1.0
    m = max(m, floor)
    # Round up to 1, 2, 2.5 or 5 x 10^k so colour bars get readable ticks.
    exp = math.floor(math.log10(m))
    for step in (1, 2, 2.5, 5, 10):
        if step * 10**exp >= m * (1 - 1e-9):
            return step * 10**exp
    return m


def heatmap(
    ax,
    data: pd.DataFrame,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    cbar_label: str,
    diverging: bool = False,
    vmin: float | None = None,
    vmax: float | None = None,
    annot: bool | None = None,
    fmt: str = ".2f",
    cmap: str | None = None,
):
    """Heatmap of a DataFrame (rows top to bottom as given, columns left to right).

    `diverging=True`: colour map centred at 0 with symmetric limits (cosines,
    signed values). Cells are annotated when the grid is small enough to read.
    """
    import seaborn as sns

    values = data.to_numpy(dtype=float)
    if annot is None:
        annot = data.shape[0] * data.shape[1] <= 144 and max(data.shape) <= 14
    if diverging:
        lim = vmax if vmax is not None else symmetric_limit(values)
        vmin, vmax, center, cmap = -lim, lim, 0.0, cmap or DIVERGING_CMAP
    else:
        center, cmap = None, cmap or SEQUENTIAL_CMAP
    n_rows, n_cols = data.shape
    font = 10 if max(n_rows, n_cols) <= 6 else 8.5 if max(n_rows, n_cols) <= 10 else 7
    with warnings.catch_warnings():
        # seaborn 0.13 calls Colormap.set_bad, which matplotlib 3.11 flags as pending deprecation
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        sns.heatmap(
            data.astype(float),
            ax=ax,
            cmap=cmap,
            center=center,
            vmin=vmin,
            vmax=vmax,
            annot=annot,
            fmt=fmt,
            annot_kws={"fontsize": font},
            linewidths=0.5 if n_rows * n_cols <= 400 else 0,
            linecolor="white",
            square=n_rows == n_cols and n_rows <= 16,
            cbar_kws={"label": cbar_label, "shrink": 0.85},
            mask=None if np.isfinite(values).all() else ~np.isfinite(values),
        )
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelrotation=35 if max(len(str(c)) for c in data.columns) > 4 else 0)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right" if label.get_rotation() else "center")
    ax.tick_params(axis="y", labelrotation=0)
    ax.grid(False)
    return ax


def lines(
    ax,
    df: pd.DataFrame,
    *,
    x: str,
    y: str,
    title: str,
    xlabel: str,
    ylabel: str,
    hue: str | None = None,
    style: str | None = None,
    logx: bool = False,
    logy: bool = False,
    legend_title: str | None = None,
    hue_order: Sequence | None = None,
):
    """Line chart with markers (one line per `hue` / `style` level).

    legend_title: None keeps the column name, "" shows no title.
    """
    import seaborn as sns

    sns.lineplot(
        data=df, x=x, y=y, hue=hue, style=style, ax=ax, marker="o", markersize=5,
        palette=PALETTE if hue else None, hue_order=hue_order, errorbar=None,
    )
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    legend = ax.get_legend()
    if legend is not None:
        if legend_title is not None:
            legend.set_title(legend_title or None)
        sns.move_legend(ax, "best", frameon=False)
    return ax


def log_histogram(
    ax,
    edges_lo: np.ndarray,
    edges_hi: np.ndarray,
    heights: np.ndarray,
    *,
    label: str | None = None,
    color=None,
    fill: bool = True,
):
    """Histogram on a log-x axis from precomputed bins (as a step outline plus a light fill)."""
    lo = np.asarray(edges_lo, dtype=float)
    hi = np.asarray(edges_hi, dtype=float)
    h = np.asarray(heights, dtype=float)
    xs = np.concatenate([lo[:1], hi])
    ys = np.concatenate([h, h[-1:]])
    line = ax.step(xs, ys, where="post", label=label, color=color, linewidth=1.4)[0]
    if fill:
        ax.fill_between(xs, ys, step="post", alpha=0.18, color=line.get_color(), linewidth=0)
    ax.set_xscale("log")
    return ax
