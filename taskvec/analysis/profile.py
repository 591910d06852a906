"""Sparsity and magnitude profile of task vectors: how big, how sparse, how redundant.

Per tensor and per layer: norm, the fraction of entries with |tau| <= eps
(absolute, and relative to the tensor's largest |tau|), the share of ||tau||^2
held by the top-k fraction of entries, and a magnitude histogram on fixed log
bins (so tensors and models add up without a second pass). The DARE paper's
redundancy check is the range of |tau|: random drop-and-rescale works when
deltas are small (it is reported to fail once they exceed ~0.005).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from taskvec.analysis._results import AnalysisResult
from taskvec.analysis._stream import iter_deltas, named_task_vectors
from taskvec.analysis.naming import layer_label, layer_position, module_type, sort_layer_labels
from taskvec.errors import ParameterError

#: Fixed log-spaced magnitude bins: 20 per decade over [1e-10, 10), plus [0, 1e-10) and [10, inf).
HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_BINS_PER_DECADE = -10, 1, 20
_N_LOG_BINS = (HIST_LOG10_MAX - HIST_LOG10_MIN) * HIST_BINS_PER_DECADE
HIST_EDGES = np.concatenate(
    [[0.0], 10.0 ** np.linspace(HIST_LOG10_MIN, HIST_LOG10_MAX, _N_LOG_BINS + 1), [np.inf]]
)  # bin b covers [HIST_EDGES[b], HIST_EDGES[b+1])
N_HIST_BINS = len(HIST_EDGES) - 1

#: Deltas above this magnitude make DARE's random drop-and-rescale unreliable (DARE paper, Sec. 4).
DARE_DELTA_LIMIT = 0.005


def magnitude_bins(abs_values: torch.Tensor) -> torch.Tensor:
    """Histogram bin index (0 .. N_HIST_BINS-1) of each |tau| on the fixed log grid."""
    b = torch.floor((torch.log10(abs_values) - HIST_LOG10_MIN) * HIST_BINS_PER_DECADE) + 1
    return b.clamp_(0, N_HIST_BINS - 1).to(torch.int64)  # log10(0) = -inf lands in bin 0


def top_fraction_energy(abs_values: torch.Tensor, bins: torch.Tensor, counts: torch.Tensor, energy: torch.Tensor, fraction: float) -> float:
    """Exact sum of squares of the ceil(fraction * n) largest |tau|.

    Whole histogram bins above the cut are summed from `energy`; only the one
    bin the cut falls in is selected and partially ranked with `topk`, so no
    full sort of the tensor is ever needed.
    """
    n = abs_values.numel()
    k = min(n, max(1, math.ceil(fraction * n)))
    from_top = counts.flip(0).cumsum(0).flip(0)  # from_top[b] = number of entries in bins >= b
    cut = int(torch.nonzero(from_top >= k).max())
    above = int(from_top[cut + 1]) if cut + 1 < len(from_top) else 0
    whole = float(energy[cut + 1:].sum()) if cut + 1 < len(energy) else 0.0
    need = k - above
    in_bin = abs_values[bins == cut]
    part = torch.topk(in_bin, need, sorted=False).values
    return whole + float(torch.dot(part, part))


def _histogram_quantile(counts: np.ndarray, q: float) -> float:
    """|tau| quantile from the log histogram (geometric interpolation inside a bin)."""
    total = counts.sum()
    if total == 0:
        return float("nan")
    target = q * total
    cum = np.cumsum(counts)
    b = int(np.searchsorted(cum, target, side="left"))
    b = min(b, len(counts) - 1)
    lo, hi = HIST_EDGES[b], HIST_EDGES[b + 1]
    if b == 0:
        return 0.0 if counts[0] >= target else float(hi)
    if not np.isfinite(hi):
        return float(lo)
    prev = cum[b - 1] if b else 0.0
    r = (target - prev) / max(counts[b], 1)
    return float(lo * (hi / lo) ** r)


def _histogram_top_share(counts: np.ndarray, energy: np.ndarray, fraction: float) -> float:
    """Share of sum(tau^2) in the top `fraction` of entries, from the histogram (the cut bin is split pro rata)."""
    n, total = counts.sum(), energy.sum()
    if n == 0 or total <= 0:
        return float("nan")
    k = min(n, max(1, math.ceil(fraction * n)))
    kept, e = 0.0, 0.0
    for b in range(len(counts) - 1, -1, -1):
        c = counts[b]
        if kept + c >= k:
            e += energy[b] * (k - kept) / c if c else 0.0
            break
        kept += c
        e += energy[b]
    return float(e / total)


def _pct(f: float) -> str:
    return f"{f * 100:g}pct"


@dataclass(repr=False, eq=False)
class Profile(AnalysisResult):
    """Sparsity / magnitude profile of one or more task vectors.

    Tables (tidy, one row per task x tensor / layer / module / bin):
    `tensors`, `layers`, `modules`, `histogram`, and `summary_table` (one row per task).
    """

    tensors: pd.DataFrame
    histogram: pd.DataFrame
    eps: float
    rel_eps: float
    topk: tuple[float, ...]
    task_names: list[str]
    _hist_counts: dict = field(default_factory=dict, repr=False)
    _hist_energy: dict = field(default_factory=dict, repr=False)

    kind = "profile"

    # -- aggregation ---------------------------------------------------------------------------
    def _aggregate(self, by: str) -> pd.DataFrame:
        t = self.tensors
        counts = ["numel", "n_abs_le_eps", "n_rel_le_eps", "n_above_dare_limit"]
        tops = [f"energy_top_{_pct(f)}" for f in self.topk]
        g = t.groupby(["task", by], sort=False)
        out = g[counts + ["sq_norm"] + tops].sum()
        out["max_abs"] = g["max_abs"].max()
        out["sum_abs"] = g["sum_abs"].sum()
        out = out.reset_index()
        out["norm"] = np.sqrt(out["sq_norm"])
        out["mean_abs"] = out["sum_abs"] / out["numel"]
        out["frac_abs_le_eps"] = out["n_abs_le_eps"] / out["numel"]
        out["frac_rel_le_eps"] = out["n_rel_le_eps"] / out["numel"]
        out["frac_above_dare_limit"] = out["n_above_dare_limit"] / out["numel"]
        for f, col in zip(self.topk, tops):
            # Per-tensor top-k (the trim scope mergekit uses), summed over the group.
            out[f"top_{_pct(f)}_share"] = out[col] / out["sq_norm"].where(out["sq_norm"] > 0)
        return out.drop(columns=["sum_abs"] + tops)

    @property
    def layers(self) -> pd.DataFrame:
        """Per-layer rows ('embeddings', '0', '1', ..., 'other'), in network order."""
        out = self._aggregate("layer")
        out["layer_position"] = out["layer"].map(layer_position)
        return out.sort_values(["task", "layer_position"], kind="stable").reset_index(drop=True)

    @property
    def modules(self) -> pd.DataFrame:
        """Per-module-type rows (attn_q, mlp_up, norm, ...)."""
        return self._aggregate("module")

    @property
    def summary_table(self) -> pd.DataFrame:
        rows = []
        for task in self.task_names:
            t = self.tensors[self.tensors["task"] == task]
            c, e = self._hist_counts[task], self._hist_energy[task]
            n = int(t["numel"].sum())
            row = {
                "task": task,
                "num_tensors": len(t),
                "numel": n,
                "norm": float(np.sqrt(t["sq_norm"].sum())),
                "max_abs": float(t["max_abs"].max()) if len(t) else float("nan"),
                "mean_abs": float(t["sum_abs"].sum() / n) if n else float("nan"),
                "frac_abs_le_eps": float(t["n_abs_le_eps"].sum() / n) if n else float("nan"),
                "frac_rel_le_eps": float(t["n_rel_le_eps"].sum() / n) if n else float("nan"),
                "abs_p50": _histogram_quantile(c, 0.5),
                "abs_p99": _histogram_quantile(c, 0.99),
                "frac_above_dare_limit": float(t["n_above_dare_limit"].sum() / n) if n else float("nan"),
            }
            for f in self.topk:
                # Global top-k over the whole vector (the paper's TIES scope), from the fine histogram.
                row[f"global_top_{_pct(f)}_share"] = _histogram_top_share(c, e, f)
            rows.append(row)
        return pd.DataFrame(rows)

    def tables(self) -> dict[str, pd.DataFrame]:
        return {
            "summary": self.summary_table,
            "tensors": self.tensors,
            "layers": self.layers,
            "modules": self.modules,
            "histogram": self.histogram,
        }

    def summary(self) -> list[str]:
        lines = []
        for r in self.summary_table.itertuples(index=False):
            r = r._asdict()
            k = self.topk[0]
            dare = (
                "all |tau| <= 0.005: small deltas, DARE-friendly"
                if r["frac_above_dare_limit"] == 0
                else f"{r['frac_above_dare_limit']:.2%} of |tau| > 0.005 (DARE degrades on large deltas)"
            )
            lines.append(
                f"{r['task']}: {r['numel']:,} params, ||tau|| = {r['norm']:.4g}, max |tau| = {r['max_abs']:.3g}, "
                f"median |tau| = {r['abs_p50']:.3g}; {r['frac_abs_le_eps']:.1%} of |tau| <= {self.eps:g}; "
                f"top {k:.0%} of entries hold {r[f'global_top_{_pct(k)}_share']:.1%} of ||tau||^2; {dare}"
            )
        return lines

    # -- plots ---------------------------------------------------------------------------------
    def plot(self, kind: str = "all"):
        """Figure: 'histogram' (|tau| on log bins), 'layers' (norm and top-k share per layer), or 'all'."""
        from taskvec.viz import new_figure, style

        if kind not in ("all", "histogram", "layers"):
            raise ParameterError(f"Profile.plot: kind must be 'all', 'histogram' or 'layers', not {kind!r}")
        with style():
            if kind == "histogram":
                fig, ax = new_figure(figsize=(7.0, 4.2))
                self.plot_histogram(ax)
            elif kind == "layers":
                fig, axes = new_figure(1, 2, figsize=(12.5, 4.2))
                self.plot_layers(axes[0], axes[1])
            else:
                fig, axes = new_figure(1, 3, figsize=(18.0, 4.6))
                self.plot_histogram(axes[0])
                self.plot_layers(axes[1], axes[2])
        return fig

    def plot_histogram(self, ax):
        from taskvec.viz import log_histogram

        h = self.histogram
        shown = h[(h["bin_lo"] > 0) & np.isfinite(h["bin_hi"])]
        nonzero = shown[shown["count"] > 0]
        single = len(self.task_names) == 1
        for task in self.task_names:
            s = shown[shown["task"] == task]
            log_histogram(ax, s["bin_lo"].to_numpy(), s["bin_hi"].to_numpy(), s["fraction"].to_numpy(), label=task, fill=single)
        if len(nonzero):
            # Show the bulk: from where the first 0.01 % of entries is passed to the largest bin in use.
            cum = shown.groupby("bin_lo")["fraction"].sum().cumsum()
            lo = cum.index[np.searchsorted(cum.to_numpy(), 1e-4 * cum.iloc[-1])]
            ax.set_xlim(lo / 2, max(nonzero["bin_hi"].max(), DARE_DELTA_LIMIT) * 2)
        zero = h[h["bin_hi"] <= HIST_EDGES[1]].groupby("task")["fraction"].sum()
        if zero.max() > 0.001:
            # The [0, 1e-10) bin can't sit on a log axis; say how much of the vector it holds.
            ax.text(0.02, 0.02, f"not shown: {zero.min():.1%}" + ("" if single else f"-{zero.max():.1%}")
                    + " of entries have |τ| < 1e-10 (unchanged)", transform=ax.transAxes, fontsize=8.5, color="0.3")
        ax.axvline(DARE_DELTA_LIMIT, color="0.35", linestyle="--", linewidth=1)
        ax.text(DARE_DELTA_LIMIT, 0.98, " 0.005 (DARE limit)", transform=ax.get_xaxis_transform(), va="top", fontsize=8.5, color="0.3")
        ax.set_ylim(bottom=0)
        ax.set_title("Magnitude of task-vector entries")
        ax.set_xlabel(r"$|\tau|$ (log scale, 20 bins per decade)")
        ax.set_ylabel("fraction of entries per bin")
        if len(self.task_names) > 1:
            ax.legend(title="task vector")
        return ax

    def plot_layers(self, ax_norm, ax_top=None):
        from taskvec.viz import lines

        lay = self.layers.copy()
        order = sort_layer_labels(lay["layer"])
        lay["layer"] = pd.Categorical(lay["layer"], categories=order, ordered=True)
        lay = lay.sort_values("layer")
        hue = "task" if len(self.task_names) > 1 else None
        lay["x"] = lay["layer"].cat.codes
        hue_order = self.task_names if hue else None
        lines(ax_norm, lay, x="x", y="norm", hue=hue, title="Task-vector norm per layer", xlabel="layer",
              ylabel=r"$\|\tau\|$ within layer", legend_title="task vector", hue_order=hue_order)
        _layer_ticks(ax_norm, order)
        if ax_top is not None:
            f = self.topk[min(1, len(self.topk) - 1)]
            col = f"top_{_pct(f)}_share"
            lines(ax_top, lay, x="x", y=col, hue=hue, title=f"Share of $\\|\\tau\\|^2$ in the top {f:.0%} of entries (per tensor)",
                  xlabel="layer", ylabel="share of squared norm", legend_title="task vector", hue_order=hue_order)
            ax_top.set_ylim(0, 1.02)
            _layer_ticks(ax_top, order)
        return ax_norm


def _layer_ticks(ax, order: list[str]) -> None:
    labels = ["emb" if s == "embeddings" else s for s in order]
    step = max(1, math.ceil(len(order) / 16))
    ax.set_xticks(range(0, len(order), step), labels[::step])


def profile(
    tvs,
    *,
    names=None,
    eps: float = 1e-6,
    rel_eps: float = 1e-3,
    topk: tuple[float, ...] = (0.01, 0.05, 0.2),
    dare_limit: float = DARE_DELTA_LIMIT,
) -> Profile:
    """Sparsity / magnitude profile of one or more task vectors, in one streaming pass.

    eps: absolute threshold; an entry counts as ~zero when |tau| <= eps.
    rel_eps: relative threshold; ~zero when |tau| <= rel_eps * (largest |tau| in its tensor).
    topk: fractions k for "share of ||tau||^2 held by the largest k of entries" (exact per tensor).
    dare_limit: magnitude above which DARE's drop-and-rescale is reported to break down.
    """
    if eps < 0 or not (0 <= rel_eps <= 1):
        raise ParameterError(f"profile: eps must be >= 0 and rel_eps in [0, 1] (got eps={eps}, rel_eps={rel_eps})")
    topk = tuple(float(f) for f in topk)
    if not topk or any(not (0 < f <= 1) for f in topk):
        raise ParameterError(f"profile: topk fractions must lie in (0, 1], got {topk}")
    vectors, names = named_task_vectors(tvs, names)
    rows = []
    hist_c = {n: np.zeros(N_HIST_BINS) for n in names}
    hist_e = {n: np.zeros(N_HIST_BINS) for n in names}
    for key, deltas in iter_deltas(vectors, names, desc="profile"):
        layer, module = layer_label(key), module_type(key)
        for name, x in zip(names, deltas):
            finite = torch.isfinite(x)
            n_nonfinite = int(x.numel() - finite.sum())
            if n_nonfinite:
                x = torch.where(finite, x, torch.zeros((), dtype=x.dtype))
            a = x.abs()
            n = a.numel()
            bins = magnitude_bins(a)
            counts = torch.bincount(bins, minlength=N_HIST_BINS)
            energy = torch.bincount(bins, weights=a * a, minlength=N_HIST_BINS).to(torch.float64)
            sq = float(torch.dot(x, x)) if n else 0.0
            max_abs = float(a.max()) if n else 0.0
            row = {
                "task": name, "tensor": key, "layer": layer, "module": module, "numel": n,
                "norm": math.sqrt(sq), "sq_norm": sq, "max_abs": max_abs,
                "sum_abs": float(a.sum(dtype=torch.float64)),
                "mean_abs": float(a.mean()) if n else float("nan"),
                "n_abs_le_eps": int((a <= eps).sum()),
                "n_rel_le_eps": int((a <= rel_eps * max_abs).sum()),
                "n_above_dare_limit": int((a > dare_limit).sum()),
                "n_nonfinite": n_nonfinite,
            }
            for f in topk:
                row[f"energy_top_{_pct(f)}"] = top_fraction_energy(a, bins, counts, energy, f) if n else 0.0
            rows.append(row)
            hist_c[name] += counts.numpy()
            hist_e[name] += energy.numpy()
    tensors = pd.DataFrame(rows)
    if tensors.empty:
        raise ParameterError("profile: the task vectors hold no floating-point parameters")
    tensors["frac_abs_le_eps"] = tensors["n_abs_le_eps"] / tensors["numel"]
    tensors["frac_rel_le_eps"] = tensors["n_rel_le_eps"] / tensors["numel"]
    for f in topk:
        tensors[f"top_{_pct(f)}_share"] = tensors[f"energy_top_{_pct(f)}"] / tensors["sq_norm"].where(tensors["sq_norm"] > 0)
    hist_rows = []
    for name in names:
        c, e = hist_c[name], hist_e[name]
        total_c, total_e = c.sum(), e.sum()
        for b in range(N_HIST_BINS):
            hist_rows.append({
                "task": name, "bin_lo": HIST_EDGES[b], "bin_hi": HIST_EDGES[b + 1], "count": int(c[b]),
                "fraction": c[b] / total_c if total_c else 0.0,
                "energy_share": e[b] / total_e if total_e > 0 else 0.0,
            })
    return Profile(
        tensors=tensors, histogram=pd.DataFrame(hist_rows), eps=eps, rel_eps=rel_eps, topk=topk,
        task_names=names, _hist_counts=hist_c, _hist_energy=hist_e,
    )
