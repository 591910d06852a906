"""Sign conflicts between task vectors (TIES-Merging, Sec. 3): where merges interfere.

For each parameter, look at the tasks whose (trimmed) value is non-zero; the
parameter is a *conflict* when both signs occur among them. Reported before
trimming (raw deltas) and after TIES's trim step (top-k fraction of |tau| kept,
per tensor as mergekit does or over the whole vector as in the paper), per
tensor, per layer, per module type, and as a function of the density k.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch

from taskvec.analysis._results import AnalysisResult
from taskvec.analysis._stream import iter_deltas, named_task_vectors
from taskvec.analysis.naming import MODULE_TYPES, layer_label, layer_position, module_type, sort_layer_labels
from taskvec.errors import ParameterError

SCOPES = ("tensor", "global")


def conflict_counts(deltas: torch.Tensor) -> dict[str, int]:
    """Counts over the parameters of a stacked (n_tasks, numel) tensor of (trimmed) deltas.

    kept: entries != 0 summed over tasks; overlap: parameters where >= 2 tasks are non-zero;
    conflict: parameters where both a positive and a negative value occur.
    """
    pos = (deltas > 0).any(0)
    neg = (deltas < 0).any(0)
    nonzero = deltas != 0
    return {
        "kept": int(nonzero.sum()),
        "overlap": int((nonzero.sum(0) >= 2).sum()),
        "conflict": int((pos & neg).sum()),
    }


def elect_disagreements(deltas: torch.Tensor) -> int:
    """Kept entries whose sign differs from TIES's elected sign (they are dropped by the disjoint merge)."""
    from taskvec.methods.ties import agreement, elect_sign

    return int((deltas != 0).sum()) - int(agreement(deltas, elect_sign(deltas, method="mass")).sum())


def global_thresholds(vectors, names: Sequence[str], densities: Sequence[float]) -> dict[tuple[str, float], float]:
    """Per task vector and density k: TIES's global trim threshold (k-th largest |tau| over the whole vector).

    Exact, in two streaming passes (radix select, `MagnitudeSelector`): every
    (task, density) pair is resolved in the same two passes.
    """
    from taskvec.methods.sparsify import MagnitudeSelector

    selectors = {(n, k): MagnitudeSelector(density=k) for n in names for k in densities}
    for step, what in ((1, "observe"), (2, "refine")):
        for _, deltas in iter_deltas(vectors, names, desc=f"global trim threshold ({step}/2)"):
            for n, d in zip(names, deltas):
                for k in densities:
                    getattr(selectors[(n, k)], what)(d)
    return {key: sel.value for key, sel in selectors.items()}


def _conflict_rows(vectors, names, densities: Sequence[float], scope: str, *, elect: bool) -> pd.DataFrame:
    """One pass: per tensor, conflict counts of the raw deltas and after trimming at each density."""
    from taskvec.methods.sparsify import check_density, trim_topk

    if scope not in SCOPES:
        raise ParameterError(f"scope must be 'tensor' (per-tensor top-k, mergekit) or 'global' (whole vector, TIES paper), not {scope!r}")
    densities = [check_density(k) for k in densities]
    thresholds = global_thresholds(vectors, names, densities) if scope == "global" else {}
    rows = []
    for key, deltas in iter_deltas(vectors, names, desc="sign conflicts"):
        raw = torch.stack(deltas)
        before = conflict_counts(raw)
        del raw
        base = {"tensor": key, "layer": layer_label(key), "module": module_type(key), "numel": deltas[0].numel(),
                "kept_before": before["kept"], "overlap_before": before["overlap"], "conflict_before": before["conflict"]}
        for k in densities:
            trimmed = torch.stack([
                trim_topk(d, k, threshold=thresholds[(n, k)]) if scope == "global" else trim_topk(d, k)
                for n, d in zip(names, deltas)
            ])
            after = conflict_counts(trimmed)
            row = dict(base, density=k, kept_after=after["kept"], overlap_after=after["overlap"], conflict_after=after["conflict"])
            if elect:
                row["elect_dropped_after"] = elect_disagreements(trimmed)
            rows.append(row)
    if not rows:
        raise ParameterError("sign conflicts: the task vectors hold no floating-point parameters")
    return pd.DataFrame(rows)


def _add_fractions(df: pd.DataFrame) -> pd.DataFrame:
    """Fractions from counts (after summing counts over any grouping)."""
    df = df.copy()
    for when in ("before", "after"):
        df[f"frac_conflict_{when}"] = df[f"conflict_{when}"] / df["numel"]
        df[f"frac_overlap_{when}"] = df[f"overlap_{when}"] / df["numel"]
        # Among parameters that at least two tasks touch, how often do they pull in opposite directions?
        df[f"conflict_given_overlap_{when}"] = df[f"conflict_{when}"] / df[f"overlap_{when}"].where(df[f"overlap_{when}"] > 0)
    if "elect_dropped_after" in df:
        df["frac_kept_dropped_by_elect"] = df["elect_dropped_after"] / df["kept_after"].where(df["kept_after"] > 0)
    return df


_COUNTS = ["numel", "kept_before", "overlap_before", "conflict_before", "kept_after", "overlap_after", "conflict_after"]


def _aggregate(rows: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    cols = _COUNTS + (["elect_dropped_after"] if "elect_dropped_after" in rows else [])
    return _add_fractions(rows.groupby(by, sort=False)[cols].sum().reset_index())


@dataclass(repr=False, eq=False)
class SignConflicts(AnalysisResult):
    """Sign-conflict fractions of a set of task vectors at one density, per tensor / layer / module."""

    task_names: list[str]
    density: float
    scope: str
    rows: pd.DataFrame  # per tensor counts

    kind = "conflicts"

    @property
    def tensors(self) -> pd.DataFrame:
        return _add_fractions(self.rows)

    @property
    def layers(self) -> pd.DataFrame:
        out = _aggregate(self.rows, ["layer"])
        out["layer_position"] = out["layer"].map(layer_position)
        return out.sort_values("layer_position", kind="stable").reset_index(drop=True)

    @property
    def modules(self) -> pd.DataFrame:
        out = _aggregate(self.rows, ["module"])
        order = {m: i for i, m in enumerate(MODULE_TYPES)}
        return out.sort_values("module", key=lambda s: s.map(order)).reset_index(drop=True)

    @property
    def overall(self) -> pd.Series:
        s = self.rows[[c for c in _COUNTS + ["elect_dropped_after"] if c in self.rows]].sum()
        return _add_fractions(s.to_frame().T).iloc[0]

    def layer_module(self, value: str = "frac_conflict_after") -> pd.DataFrame:
        """Layer x module-type table of `value` (rows in network order, NaN where a layer lacks the module)."""
        agg = _aggregate(self.rows, ["layer", "module"])
        table = agg.pivot(index="layer", columns="module", values=value)
        rows = sort_layer_labels(table.index)
        cols = [m for m in MODULE_TYPES if m in table.columns]
        return table.reindex(index=rows, columns=cols)

    def tables(self) -> dict[str, pd.DataFrame]:
        lm = self.layer_module().reset_index()
        return {"layers": self.layers, "tensors": self.tensors, "modules": self.modules, "layer_module": lm}

    def summary(self) -> list[str]:
        o = self.overall
        where = "per tensor" if self.scope == "tensor" else "over the whole vector"
        lines = [
            f"{len(self.task_names)} task vectors ({', '.join(self.task_names)}), {int(o['numel']):,} parameters",
            f"before trim: {o['frac_conflict_before']:.2%} of parameters have conflicting signs "
            f"({o['conflict_given_overlap_before']:.2%} of those touched by >= 2 tasks)",
            f"after trim to the top {self.density:.0%} ({where}): {o['frac_conflict_after']:.2%} conflict "
            f"({o['conflict_given_overlap_after']:.2%} of the {o['frac_overlap_after']:.2%} touched by >= 2 tasks)",
        ]
        if "frac_kept_dropped_by_elect" in o:
            lines.append(f"sign election drops {o['frac_kept_dropped_by_elect']:.2%} of the kept entries")
        return lines

    def plot(self, kind: str = "layer_module", *, value: str = "frac_conflict_after"):
        """'layer_module': heatmap layer x module type; 'layers': conflict fraction per layer before/after trim."""
        from taskvec.viz import heatmap, lines, new_figure, style

        trim = f"top {self.density:.0%} kept {'per tensor' if self.scope == 'tensor' else 'globally'}"
        with style():
            if kind == "layer_module":
                table = self.layer_module(value)
                fig, ax = new_figure(figsize=(max(6.0, 0.7 * table.shape[1] + 3.0), max(3.6, 0.36 * len(table) + 1.8)))
                pct = table * 100
                what = _VALUE_LABELS.get(value, value)
                heatmap(ax, pct, title=f"Sign conflicts after trim ({trim})", xlabel="module type", ylabel="layer",
                        cbar_label=f"{what} (%)", fmt=".1f", vmin=0)
            elif kind == "layers":
                lay = self.layers
                long = pd.concat([
                    pd.DataFrame({"x": range(len(lay)), "value": lay["frac_conflict_before"] * 100, "when": "before trim (all non-zero deltas)"}),
                    pd.DataFrame({"x": range(len(lay)), "value": lay["frac_conflict_after"] * 100, "when": f"after trim ({trim})"}),
                ])
                fig, ax = new_figure(figsize=(8.0, 4.2))
                lines(ax, long, x="x", y="value", hue="when", title="Sign conflicts per layer",
                      xlabel="layer", ylabel="parameters with conflicting signs (%)", legend_title="")
                from taskvec.analysis.profile import _layer_ticks

                _layer_ticks(ax, list(lay["layer"]))
                ax.set_ylim(bottom=0)
            else:
                raise ParameterError(f"SignConflicts.plot: kind must be 'layer_module' or 'layers', not {kind!r}")
        return fig


_VALUE_LABELS = {
    "frac_conflict_after": "parameters with conflicting signs",
    "conflict_given_overlap_after": "conflicts among parameters ≥ 2 tasks keep",
    "frac_overlap_after": "parameters ≥ 2 tasks keep",
}


def sign_conflicts(tvs, density: float = 0.2, scope: str = "tensor", *, names=None, elect: bool = True) -> SignConflicts:
    """Sign-conflict fractions before and after TIES trimming at `density`, in one streaming pass.

    scope: 'tensor' keeps the top-k of each tensor (mergekit); 'global' the top-k of
    the whole task vector (TIES paper; two extra passes find the exact thresholds).
    elect: also count kept entries that TIES's sign election would drop.
    """
    vectors, names = named_task_vectors(tvs, names)
    if len(vectors) < 2:
        raise ParameterError("sign_conflicts needs at least two task vectors")
    from taskvec.methods.sparsify import check_density

    density = check_density(density)
    rows = _conflict_rows(vectors, names, [density], scope, elect=elect).drop(columns="density")
    return SignConflicts(task_names=names, density=density, scope=scope, rows=rows)


@dataclass(repr=False, eq=False)
class ConflictCurve(AnalysisResult):
    """Conflict rate as a function of the trim density k."""

    task_names: list[str]
    scope: str
    rows: pd.DataFrame  # per tensor x density counts

    kind = "conflict-vs-density"

    @property
    def curve(self) -> pd.DataFrame:
        return _aggregate(self.rows, ["density"]).sort_values("density").reset_index(drop=True)

    @property
    def by_module(self) -> pd.DataFrame:
        return _aggregate(self.rows, ["module", "density"]).sort_values(["module", "density"]).reset_index(drop=True)

    def tables(self) -> dict[str, pd.DataFrame]:
        return {"curve": self.curve, "by_module": self.by_module}

    def summary(self) -> list[str]:
        c = self.curve
        before = c["frac_conflict_before"].iloc[0]
        parts = ", ".join(f"k={r.density:g}: {r.frac_conflict_after:.2%}" for r in c.itertuples())
        return [f"conflicting parameters before trim {before:.2%}; after trim {parts}"]

    def plot(self, by_module: bool = False):
        from taskvec.viz import lines, new_figure, style

        with style():
            fig, ax = new_figure(figsize=(7.2, 4.4))
            if by_module:
                d = self.by_module.assign(pct=lambda t: t["frac_conflict_after"] * 100)
                lines(ax, d, x="density", y="pct", hue="module", title="Sign conflicts vs trim density, per module type",
                      xlabel=r"density $k$ (fraction of $|\tau|$ kept)", ylabel="parameters with conflicting signs (%)", logx=True,
                      legend_title="module", hue_order=[m for m in MODULE_TYPES if m in set(d["module"])])
            else:
                c = self.curve
                long = pd.concat([
                    pd.DataFrame({"density": c["density"], "pct": c["frac_conflict_after"] * 100, "measure": "conflicting (% of all parameters)"}),
                    pd.DataFrame({"density": c["density"], "pct": c["conflict_given_overlap_after"] * 100, "measure": "conflicting (% of parameters ≥ 2 tasks keep)"}),
                ])
                lines(ax, long, x="density", y="pct", hue="measure", logx=True,
                      title="Sign conflicts vs TIES trim density", xlabel=r"density $k$ (fraction of $|\tau|$ kept)",
                      ylabel="percent", legend_title="")
            scope = "per tensor" if self.scope == "tensor" else "over the whole vector"
            ax.text(0.99, 0.02, f"top-k {scope}; {len(self.task_names)} task vectors", transform=ax.transAxes, ha="right", va="bottom", fontsize=8.5, color="0.35")
            ax.set_ylim(bottom=0)
        return fig


def conflict_vs_density(tvs, densities: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
                        scope: str = "tensor", *, names=None) -> ConflictCurve:
    """Sign-conflict rate after trimming at each density (one pass over the vectors for all densities)."""
    vectors, names = named_task_vectors(tvs, names)
    if len(vectors) < 2:
        raise ParameterError("conflict_vs_density needs at least two task vectors")
    from taskvec.methods.sparsify import check_density

    densities = sorted({check_density(k, "densities") for k in densities})
    if not densities:
        raise ParameterError("conflict_vs_density: no densities given")
    rows = _conflict_rows(vectors, names, densities, scope, elect=False)
    return ConflictCurve(task_names=names, scope=scope, rows=rows)
