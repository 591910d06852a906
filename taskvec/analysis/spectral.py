"""The spectra of task matrices, and how tasks interfere in them (TSV, Iso-C, TALL masks).

Every 2-D delta is a task matrix tau = U S V^T (rank r = its smaller dimension);
the passes stream tensor by tensor in float32, so any `TaskVector` works.

`spectral_profile` — per (vector, matrix): stable rank ||tau||_F^2 / s_1^2;
effective rank exp(-sum p_i log p_i), p_i = s_i / sum s; rank_50/90/99, the
smallest k whose top-k singular values hold that share of sum s^2; and the
energy curves (cumulative share of sum s^2 against k).

`spectral_interference` — for every pair of tasks and matrix:
* singular task interference (TSV paper, Gargiulo et al., CVPR 2025, arXiv 2412.00081v3, eq. 6),
  STI = ||(U^T U - I) S (V^T V - I)||_1 with U = [U_a U_b] (columns concatenated:
  m x 2k), V = [V_a V_b] (n x 2k) and S = diag(S_a, S_b). The paper writes ||.||_1 and
  does not say which matrix 1-norm it means (neither the text nor its appendix defines
  it); we take the entry-wise L1 norm, sum |.| over every entry (`sti_norm="entrywise"`),
  and offer the induced 1-norm, the largest absolute column sum (`sti_norm="induced"`).
  (FusionBench's helper concatenates U and V along rows, which makes U^T U a k x k matrix
  that cannot meet the 2k x 2k S, and asks torch for ord="1", which torch rejects -- so
  it settles neither reading.) The diagonal blocks of U^T U - I vanish (each U_t is
  orthonormal), so only cross-task overlap counts.
* principal angles between the tasks' top-k left singular subspaces (cosines =
  singular values of U_a^T U_b);
with each task's top k = ceil(fraction * r) triplets (fraction 1: the full SVD), less any
with a numerically zero singular value (their vectors are an arbitrary null-space basis).
For every task and matrix: the subspace alignment ratio against the merged update
(Iso-C paper, Marczak et al., ICML 2025, arXiv 2502.04959v3, sec. 3.3, eqs. 5-6),
SAR = ||Pi_k tau_t||_F / ||tau_t||_F with Pi_k the projection onto the merged update's
top-k left singular vectors; k is the paper's k_M, the smallest k with
||Delta_M - Pi_k Delta_M||_F <= epsilon ||Delta_M||_F, i.e. the top k hold >= 1 - epsilon^2
of ||Delta_M||_F^2 (eq. 6 states both forms, with epsilon = 0.05: our default;
analysis scripts that circulate with the paper's `calc_rank(S, norm_thresh=0.95)` instead
stop where sqrt(cumulative energy share) first exceeds 0.95, a looser cut -- we follow eq. 6;
`sar_rank` fixes k instead; the TSV authors' sar.py uses a fixed k = 10; above the exact-SVD
threshold k_M is at most 256). The merged
update is task arithmetic's sum_t tau_t unless `merged` names a method or gives the deltas.
And for every float tensor the TALL-mask labels (Wang et al. 2024): per weight,
sum_t m_t with m_t = 1{|tau_t| >= lambda |tau_MTL - tau_t|}: 0 catastrophic, 1 selfish,
>= 2 general (weights no task changes are counted apart, as "unchanged": every mask holds them).

Exact SVD up to `exact_max_numel` entries (2**24); larger matrices use randomised SVD
(torch.svd_lowrank, seeded, `lowrank_rank` = 256 triplets for the profile): their
energy curves stop at that rank, rank_x beyond it is NaN, and the effective rank is
that of the top-256 spectrum (marked in the `svd` column).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from taskvec.analysis._results import AnalysisResult
from taskvec.analysis._stream import iter_deltas, named_task_vectors
from taskvec.analysis.naming import MODULE_TYPES, layer_label, layer_position, module_type, sort_layer_labels
from taskvec.errors import KeyMismatchError, ParameterError

ENERGY_LEVELS = (0.5, 0.9, 0.99)
LOWRANK_RANK = 256
TALL_LABELS = ("catastrophic", "selfish", "general")


# ----------------------------------------------------------------------------- per-matrix measures
def singular_values(x: torch.Tensor, *, exact_max_numel: int | None = None, lowrank_rank: int = LOWRANK_RANK):
    """(singular values, exact?) of a 2-D tensor: all r of them, or the top `lowrank_rank` above the threshold."""
    from taskvec.methods.spectral import EXACT_SVD_MAX_NUMEL, top_svd

    limit = EXACT_SVD_MAX_NUMEL if exact_max_numel is None else exact_max_numel
    if not bool(x.any()):  # an untouched matrix (e.g. frozen word embeddings): r zeros, no SVD needed
        return torch.zeros(min(x.shape), dtype=x.dtype, device=x.device), True
    if x.numel() <= limit:
        return torch.linalg.svdvals(x), True
    return top_svd(x, lowrank_rank, exact_max_numel=limit)[1], min(x.shape) <= lowrank_rank


def spectrum_stats(s: torch.Tensor, total_energy: float | None = None) -> dict[str, Any]:
    """Stable rank, effective rank, rank_50/90/99 and the energy curve of singular values `s` (descending).

    total_energy: ||tau||_F^2 when `s` is only the top of the spectrum (default: sum s^2).
    An all-zero matrix has every rank 0.
    """
    s = s.detach().to(torch.float64).cpu()
    sq = s * s
    total = float(sq.sum()) if total_energy is None else float(total_energy)
    out: dict[str, Any] = {"stable_rank": 0.0, "effective_rank": 0.0, **{f"rank_{round(100 * q)}": 0 for q in ENERGY_LEVELS}}
    if total <= 0 or float(s[0]) <= 0:
        out["energy"] = np.zeros(len(s))
        return out
    energy = (sq.cumsum(0) / total).numpy()
    p = s / s.sum()
    p = p[p > 0]
    out["stable_rank"] = total / float(sq[0])
    out["effective_rank"] = float(torch.exp(-(p * p.log()).sum()))
    for q in ENERGY_LEVELS:
        k = int(np.searchsorted(energy, q - 1e-9)) + 1  # the tolerance absorbs rounding of a share that is exactly q
        out[f"rank_{round(100 * q)}"] = k if k <= len(s) else math.nan
    out["energy"] = energy
    return out


STI_NORMS = ("entrywise", "induced")


def singular_task_interference(Us: Sequence[torch.Tensor], Ss: Sequence[torch.Tensor], Vhs: Sequence[torch.Tensor],
                               norm: str = "entrywise") -> float:
    """STI = ||(U^T U - I) S (V^T V - I)||_1 for tasks' SVD factors U_t, S_t, V_t^T (TSV eq. 6).

    U = [U_1 ... U_T] and V = [V_1 ... V_T] are concatenated along columns, S = diag(S_1 ... S_T).
    The paper does not define its ||.||_1: norm="entrywise" (default) sums |.| over every entry,
    norm="induced" is the matrix 1-norm, the largest absolute column sum.
    """
    if norm not in STI_NORMS:
        raise ParameterError(f"norm must be one of {STI_NORMS}, got {norm!r}")
    U = torch.cat(list(Us), dim=1)
    V = torch.cat([vh.mT for vh in Vhs], dim=1)
    S = torch.cat(list(Ss))
    eye = torch.eye(U.shape[1], dtype=U.dtype, device=U.device)
    # (A * S) scales A's columns: A diag(S) without the (Tk x Tk) diagonal matrix
    A = (((U.mT @ U - eye) * S) @ (V.mT @ V - eye)).abs()
    if A.numel() == 0:  # no singular directions at all (untouched matrices): nothing interferes
        return 0.0
    return float(A.sum() if norm == "entrywise" else A.sum(dim=0).max())


def principal_cosines(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the column spaces of orthonormal A and B, largest first."""
    return torch.linalg.svdvals(A.mT @ B).clamp_(max=1.0)


def alignment_rank(s: torch.Tensor, total_energy: float, epsilon: float) -> int:
    """Iso-C's k_M (arXiv 2502.04959v3, eq. 6): the smallest k with ||M - Pi_k M||_F <= epsilon ||M||_F,
    i.e. sum_{i>k} s_i^2 <= eps^2 ||M||_F^2 (the paper uses epsilon = 0.05)."""
    if total_energy <= 0:
        return 0
    tail = total_energy - (s.double() ** 2).cumsum(0)
    hits = torch.nonzero(tail <= (epsilon ** 2) * total_energy + 1e-12 * total_energy)
    return int(hits[0]) + 1 if len(hits) else len(s)


# ----------------------------------------------------------------------------- results: profile
def _layer_module_table(rows: pd.DataFrame, value: str, agg: str = "mean") -> pd.DataFrame:
    table = rows.pivot_table(index="layer", columns="module", values=value, aggfunc=agg)
    cols = [m for m in MODULE_TYPES if m in table.columns]
    return table.reindex(index=sort_layer_labels(table.index), columns=cols)


@dataclass(repr=False, eq=False)
class SpectralProfile(AnalysisResult):
    """Ranks and energy curves of every task matrix (2-D delta) of one or more task vectors.

    `tensors`: one row per (vector, matrix); `curves[(vector, tensor)]`: cumulative share of
    sum s^2 held by the top k singular values, k = 1..len; `energy_curves()` is their tidy form.
    """

    task_names: list[str]
    tensors: pd.DataFrame
    curves: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)

    kind = "spectral"

    def energy_curves(self, grid: int | None = None) -> pd.DataFrame:
        """Tidy curves: vector, tensor, layer, module, k, fraction (k / rank), energy.

        grid: resample each curve at `grid` evenly spaced fractions of its rank (NaN past a
        randomised SVD's last singular value), so matrices of different shapes line up.
        """
        info = self.tensors.set_index(["vector", "tensor"])
        frames = []
        for (vec, ten), e in self.curves.items():
            row = info.loc[(vec, ten)]
            r = int(row["rank"])
            if grid is None:
                k = np.arange(1, len(e) + 1)
                frac, energy = k / r, e
            else:
                frac = np.linspace(0.0, 1.0, grid)
                known = np.concatenate([[0.0], np.arange(1, len(e) + 1) / r])
                energy = np.interp(frac, known, np.concatenate([[0.0], e]), right=np.nan)
                k = frac * r
            frames.append(pd.DataFrame({"vector": vec, "tensor": ten, "layer": row["layer"], "module": row["module"],
                                        "k": k, "fraction": frac, "energy": energy}))
        cols = ["vector", "tensor", "layer", "module", "k", "fraction", "energy"]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)

    def layer_curves(self, grid: int = 51) -> pd.DataFrame:
        """Per vector and layer: the mean energy curve of its matrices at `grid` fractions of the rank.
        Matrices the vector leaves exactly zero (no energy: e.g. frozen word embeddings) are left out of the mean."""
        c = self.energy_curves(grid)
        t = self.tensors
        zero = set(zip(t.loc[t["stable_rank"] == 0, "vector"], t.loc[t["stable_rank"] == 0, "tensor"]))
        if zero:
            c = c[[(v, k) not in zero for v, k in zip(c["vector"], c["tensor"])]]
        out = c.groupby(["vector", "layer", "fraction"], sort=False)["energy"].mean().reset_index()
        out["layer_position"] = out["layer"].map(layer_position)
        return out.sort_values(["vector", "layer_position", "fraction"], kind="stable").reset_index(drop=True)

    def layer_module(self, value: str = "rank_90_share", vector: str | None = None) -> pd.DataFrame:
        """Layer x module table of `value` (mean over matrices, and over vectors unless `vector`)."""
        rows = self.tensors if vector is None else self.tensors[self.tensors["vector"] == vector]
        if value not in rows:
            raise ParameterError(f"value must be a column of .tensors ({', '.join(self.tensors.columns)}), got {value!r}")
        return _layer_module_table(rows, value)

    def tables(self) -> dict[str, pd.DataFrame]:
        return {"tensors": self.tensors, "layer_curves": self.layer_curves()}

    def summary(self) -> list[str]:
        t = self.tensors
        if t.empty:
            return ["no 2-D tensors: nothing to decompose"]
        lines = [f"{len(self.task_names)} task vector(s), {t['tensor'].nunique()} matrices"]
        for v, g in t.groupby("vector", sort=False):
            lines.append(f"{v}: median stable rank {g['stable_rank'].median():.2f}, effective rank "
                         f"{g['effective_rank'].median():.1f}; top {g['rank_90_share'].median():.1%} of the rank "
                         f"holds 90% of the energy (median over matrices)")
        if (t["svd"] != "exact").any():
            lines.append(f"{int((t['svd'] != 'exact').sum())} large matrices: randomised SVD (top {LOWRANK_RANK})")
        return lines

    def _check_vector(self, vector: str | None) -> str:
        if vector is None:
            return self.task_names[0]
        if vector not in self.task_names:
            raise ParameterError(f"vector must be one of {self.task_names}, got {vector!r}")
        return vector

    def plot(self, kind: str = "curves", *, vector: str | None = None, value: str = "rank_90_share"):
        """'curves': energy vs share of the rank, one line per layer (of `vector`, default the first);
        'heatmap': layer x module heatmap of `value` (default rank_90 / rank; mean over vectors unless `vector`)."""
        from taskvec.viz import heatmap, new_figure, style

        with style():
            if kind == "curves":
                vector = self._check_vector(vector)
                c = self.layer_curves()
                c = c[c["vector"] == vector]
                layers = list(dict.fromkeys(c["layer"]))
                fig, ax = new_figure(figsize=(7.4, 4.6))
                import matplotlib

                cmap = matplotlib.colormaps["viridis"]
                for i, layer in enumerate(layers):
                    d = c[c["layer"] == layer]
                    ax.plot(d["fraction"] * 100, d["energy"] * 100, color=cmap(i / max(1, len(layers) - 1)),
                            label="emb" if layer == "embeddings" else layer, lw=1.6)
                ax.set_title(f"Energy of the top singular values per layer ({vector})")
                ax.set_xlabel("top-k singular values (% of the matrix rank)")
                ax.set_ylabel(r"share of $\sum\sigma^2$ (%)")
                ax.set_ylim(0, 101)
                if len(layers) <= 16:
                    ax.legend(title="layer", frameon=False, fontsize=8, ncol=2 if len(layers) > 8 else 1)
            elif kind == "heatmap":
                if vector is not None:
                    self._check_vector(vector)
                table = self.layer_module(value, vector)
                share = value.endswith("_share")
                fig, ax = new_figure(figsize=(max(6.0, 0.7 * table.shape[1] + 3.0), max(3.6, 0.36 * len(table) + 1.8)))
                label = value.replace("_share", " / rank").replace("_", " ")
                heatmap(ax, table * 100 if share else table, title=f"Task-matrix {label} per layer and module"
                        + (f" ({vector})" if vector else ""), xlabel="module type", ylabel="layer",
                        cbar_label=f"{label}{' (%)' if share else ''}", fmt=".0f" if share else ".1f", vmin=0)
            else:
                raise ParameterError(f"SpectralProfile.plot: kind must be 'curves' or 'heatmap', not {kind!r}")
        return fig


def spectral_profile(tvs, *, names=None, exact_max_numel: int | None = None,
                     lowrank_rank: int = LOWRANK_RANK) -> SpectralProfile:
    """Stable rank, effective rank, rank_50/90/99 and energy curves of every 2-D delta, streamed.

    tvs: one task vector, a sequence of them, or a Mapping label -> task vector. See the module
    docstring for the SVD used above `exact_max_numel` entries (default 2**24).
    """
    vectors, names = named_task_vectors(tvs, names)
    if isinstance(lowrank_rank, bool) or not isinstance(lowrank_rank, int) or lowrank_rank < 1:
        raise ParameterError(f"lowrank_rank must be a positive integer, got {lowrank_rank!r}")
    rows, curves = [], {}
    for key, deltas in iter_deltas(vectors, names, desc="spectral profile", flatten=False):
        if deltas[0].dim() != 2 or min(deltas[0].shape) == 0:
            continue
        r = min(deltas[0].shape)
        for n, d in zip(names, deltas):
            s, exact = singular_values(d, exact_max_numel=exact_max_numel, lowrank_rank=lowrank_rank)
            total = None if exact else float(d.double().pow(2).sum())
            stats = spectrum_stats(s, total)
            curves[(n, key)] = stats.pop("energy")
            rows.append({"vector": n, "tensor": key, "layer": layer_label(key), "module": module_type(key),
                         "shape": "x".join(map(str, d.shape)), "rank": r, **stats,
                         **{f"rank_{round(100 * q)}_share": stats[f"rank_{round(100 * q)}"] / r for q in ENERGY_LEVELS},
                         "svd": "exact" if exact else f"randomised top {len(s)}"})
    cols = ["vector", "tensor", "layer", "module", "shape", "rank", "stable_rank", "effective_rank", "rank_50",
            "rank_90", "rank_99", "rank_50_share", "rank_90_share", "rank_99_share", "svd"]
    return SpectralProfile(task_names=names, tensors=pd.DataFrame(rows, columns=cols), curves=curves)


# ----------------------------------------------------------------------------- results: interference
@dataclass(repr=False, eq=False)
class SpectralInterference(AnalysisResult):
    """Task interference in the singular vectors, per matrix and task pair, and TALL-mask shares per tensor.

    `pairs`: tensor, layer, module, task_a, task_b, k, sti, mean_cos, min_angle_deg, mean_angle_deg.
    `alignment`: tensor, layer, module, task, k_M, proj_sq, norm_sq, sar.
    `tall`: tensor, layer, module, numel, unchanged, catastrophic, selfish, general (weight counts).
    """

    task_names: list[str]
    fraction: float
    merged: str
    epsilon: float
    mask_lambda: Any
    pairs: pd.DataFrame
    alignment: pd.DataFrame
    tall: pd.DataFrame

    kind = "interference"

    @staticmethod
    def _sorted(table: pd.DataFrame) -> pd.DataFrame:
        return table.reindex(sort_layer_labels(table.index))

    def layer_pairs(self, value: str = "sti") -> pd.DataFrame:
        """Layer x task-pair table: STI summed over the layer's matrices; angle measures averaged."""
        if value not in ("sti", "mean_cos", "min_angle_deg", "mean_angle_deg"):
            raise ParameterError(f"value must be 'sti', 'mean_cos', 'min_angle_deg' or 'mean_angle_deg', got {value!r}")
        p = self.pairs.assign(pair=self.pairs["task_a"] + " · " + self.pairs["task_b"])
        table = p.pivot_table(index="layer", columns="pair", values=value, aggfunc="sum" if value == "sti" else "mean")
        return self._sorted(table)[list(dict.fromkeys(p["pair"]))].rename_axis(columns=None)

    def layer_alignment(self) -> pd.DataFrame:
        """Layer x task SAR: sqrt(sum ||Pi tau_t||^2 / sum ||tau_t||^2) over the layer's matrices."""
        g = self.alignment.groupby(["layer", "task"], sort=False)[["proj_sq", "norm_sq"]].sum()
        sar = np.sqrt(g["proj_sq"] / g["norm_sq"].where(g["norm_sq"] > 0))
        return self._sorted(sar.unstack("task"))[self.task_names].rename_axis(columns=None)

    def layer_tall(self) -> pd.DataFrame:
        """Layer x label: the share of the layer's weights that are unchanged / catastrophic / selfish / general."""
        g = self.tall.groupby("layer", sort=False)[["numel", "unchanged", *TALL_LABELS]].sum()
        return self._sorted(g[["unchanged", *TALL_LABELS]].div(g["numel"], axis=0))

    def tables(self) -> dict[str, pd.DataFrame]:
        return {"pairs": self.pairs, "alignment": self.alignment, "tall": self.tall,
                "layer_sti": self.layer_pairs("sti").reset_index(),
                "layer_alignment": self.layer_alignment().reset_index(),
                "layer_tall": self.layer_tall().reset_index()}

    def summary(self) -> list[str]:
        lines = []
        if not self.pairs.empty:
            per_pair = self.pairs.groupby(["task_a", "task_b"], sort=False).agg(sti=("sti", "sum"), cos=("mean_cos", "mean"))
            worst = per_pair["sti"].idxmax()
            lines.append(f"singular task interference (top {self.fraction:.0%} of each rank): total per pair "
                         f"{per_pair['sti'].min():.4g} to {per_pair['sti'].max():.4g} ({' · '.join(worst)} highest); "
                         f"mean principal-angle cosine {per_pair['cos'].mean():.3f}")
        if not self.alignment.empty:
            sar = self.alignment.groupby("task", sort=False)["sar"].mean()
            lines.append(f"subspace alignment with the merged update ({self.merged}, k_M at epsilon={self.epsilon:g}): "
                         + ", ".join(f"{t} {v:.3f}" for t, v in sar.items()))
        if not self.tall.empty:
            s = self.tall[["unchanged", *TALL_LABELS]].sum() / self.tall["numel"].sum()
            lines.append(f"TALL masks (lambda={self.mask_lambda}): catastrophic {s['catastrophic']:.1%}, selfish "
                         f"{s['selfish']:.1%}, general {s['general']:.1%} of the weights (unchanged: {s['unchanged']:.1%})")
        return lines or ["nothing to compare"]

    def _main_table(self) -> pd.DataFrame:
        return self.layer_pairs("sti").reset_index() if not self.pairs.empty else self.tall

    def plot(self, kind: str = "sti"):
        """Heatmaps: 'sti' and 'angles' (layer x task pair), 'alignment' (layer x task), 'tall' (layer x label)."""
        from taskvec.viz import heatmap, new_figure, style

        if kind in ("sti", "angles"):
            table = self.layer_pairs("sti" if kind == "sti" else "mean_cos")
            xlabel = "task pair"
        elif kind == "alignment":
            table, xlabel = self.layer_alignment(), "task"
        elif kind == "tall":
            table, xlabel = self.layer_tall() * 100, "TALL-mask label"
        else:
            raise ParameterError(f"SpectralInterference.plot: kind must be 'sti', 'angles', 'alignment' or 'tall', not {kind!r}")
        titles = {
            "sti": (f"Singular task interference per layer (top {self.fraction:.0%} of each rank)", "STI (sum over matrices)", ".3g"),
            "angles": (f"Overlap of the tasks' top-{self.fraction:.0%} singular subspaces", "mean cos(principal angle)", ".2f"),
            "alignment": (f"Subspace alignment with the merged update ({self.merged})", "SAR", ".2f"),
            "tall": (f"TALL-mask labels per layer (lambda = {self.mask_lambda})", "weights (%)", ".1f"),
        }
        title, cbar, fmt = titles[kind]
        ylabel = "layer"
        if table.shape[1] > max(8, len(table)):
            # many pairs (8 tasks: 28): pairs down the rows, so the figure grows in height, not width (as cosine.py)
            table, xlabel, ylabel = table.T, ylabel, xlabel
        with style():
            fig, ax = new_figure(figsize=(max(6.4, 1.2 * table.shape[1] + 3.2), max(3.2, 0.36 * len(table) + 1.6)))
            heatmap(ax, table, title=title, xlabel=xlabel, ylabel=ylabel, cbar_label=cbar, fmt=fmt, vmin=0,
                    vmax=1.0 if kind in ("angles", "alignment") else None)
        return fig


def _merged_lookup(merged, merged_params: Mapping | None, n_tasks: int):
    """A function (key, deltas) -> merged delta, and its label."""
    if merged is None or merged in ("sum", "task_arithmetic"):
        return (lambda key, deltas: torch.stack(deltas).sum(dim=0)), "task arithmetic, sum of tau"
    if isinstance(merged, str):
        from taskvec.methods import get_method

        method = get_method(merged)
        checked = method.check_params(n_tasks, has_base=True, **dict(merged_params or {}))  # errors before the pass

        def run(key, deltas):
            base = torch.zeros_like(deltas[0])  # base 0: the method's output is lambda * Delta
            return method.merge_checked(base, deltas, name=key, checked=checked)

        return run, merged
    if isinstance(merged, Mapping):
        def look(key, deltas):
            if key not in merged:
                raise KeyMismatchError(f"merged: the merged deltas have no tensor {key!r}")
            return merged[key].detach().to(torch.float32)

        return look, getattr(merged, "expression", None) or "given deltas"
    raise ParameterError(f"merged must be None, a method name or a Mapping name -> merged delta, got {type(merged).__name__}")


def spectral_interference(tvs, *, names=None, fraction: float = 0.1, merged=None, merged_params: Mapping | None = None,
                          epsilon: float = 0.05, sar_rank: int | None = None, mask_lambda=0.6,
                          exact_max_numel: int | None = None, sti_norm: str = "entrywise") -> SpectralInterference:
    """Singular task interference, principal angles, subspace alignment and TALL-mask shares, in one pass.

    fraction: each task's top ceil(fraction * r) singular triplets enter STI and the principal angles.
    merged: the update SAR measures against: None (sum_t tau_t), a registered method name (run per
    tensor on base 0, with `merged_params`), or a Mapping name -> merged delta (e.g. a TaskVector).
    epsilon: Iso-C's k_M criterion; sar_rank: a fixed k instead. mask_lambda: TALL masks' lambda
    (one value, or one per task). sti_norm: "entrywise" or "induced" (`singular_task_interference`).
    """
    from taskvec.methods.spectral import (
        EXACT_SVD_MAX_NUMEL, check_fraction, drop_null_triplets, keep_rank, tall_masks, top_svd,
    )

    vectors, names = named_task_vectors(tvs, names)
    if len(vectors) < 2:
        raise ParameterError("spectral_interference needs at least two task vectors")
    fraction = check_fraction(fraction)
    if sti_norm not in STI_NORMS:
        raise ParameterError(f"sti_norm must be one of {STI_NORMS}, got {sti_norm!r}")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not (0.0 <= epsilon < 1.0):
        raise ParameterError(f"epsilon must be in [0, 1), got {epsilon!r}")
    if sar_rank is not None and (isinstance(sar_rank, bool) or not isinstance(sar_rank, int) or sar_rank < 1):
        raise ParameterError(f"sar_rank must be a positive integer or None, got {sar_rank!r}")
    limit = EXACT_SVD_MAX_NUMEL if exact_max_numel is None else exact_max_numel
    merge_fn, merged_label = _merged_lookup(merged, merged_params, len(vectors))
    pairs, alignment, tall = [], [], []
    for key, deltas in iter_deltas(vectors, names, desc="spectral interference", flatten=False):
        where = {"tensor": key, "layer": layer_label(key), "module": module_type(key)}
        counts = tall_masks(deltas, mask_lambda).sum(dim=0)
        zero = torch.stack(deltas).eq(0).all(dim=0)
        tall.append({**where, "numel": counts.numel(), "unchanged": int(zero.sum()),
                     "catastrophic": int((counts == 0).sum()), "selfish": int((counts == 1).sum()),
                     "general": int(((counts >= 2) & ~zero).sum())})
        if deltas[0].dim() != 2 or min(deltas[0].shape) == 0:
            continue
        k = keep_rank(min(deltas[0].shape), fraction)
        # null-space directions (zero singular values) are arbitrary: they take part in neither measure
        svds = []
        for d in deltas:
            if not bool(d.any()):  # an untouched matrix has no singular directions (and costs no SVD)
                svds.append((d.new_zeros(d.shape[0], 0), d.new_zeros(0), d.new_zeros(0, d.shape[1])))
                continue
            U, S, Vh = top_svd(d, k, exact_max_numel=limit)
            svds.append(drop_null_triplets(U, S, Vh, S[0] if len(S) else 0.0, d.shape))
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                (Ua, Sa, Va), (Ub, Sb, Vb) = svds[a], svds[b]
                cos = principal_cosines(Ua, Ub).double() if len(Sa) and len(Sb) else torch.full((1,), math.nan, dtype=torch.float64)
                angles = torch.rad2deg(torch.arccos(cos))
                pairs.append({**where, "task_a": names[a], "task_b": names[b], "k": k,
                              "sti": singular_task_interference([Ua, Ub], [Sa, Sb], [Va, Vb], sti_norm),
                              "mean_cos": float(cos.mean()), "min_angle_deg": float(angles.min()),
                              "mean_angle_deg": float(angles.mean())})
        M = merge_fn(key, deltas)
        total = float(M.double().pow(2).sum())
        if total == 0.0:
            U = M.new_zeros(M.shape[0], 0)
        elif sar_rank is not None:
            U = top_svd(M, sar_rank, exact_max_numel=limit)[0]
        else:
            U, S, _ = top_svd(M, None if M.numel() <= limit else LOWRANK_RANK, exact_max_numel=limit)
            U = U[:, :alignment_rank(S, total, epsilon)]
        for n, d in zip(names, deltas):
            proj, norm = float((U.mT @ d).double().pow(2).sum()), float(d.double().pow(2).sum())
            alignment.append({**where, "task": n, "k_M": U.shape[1], "proj_sq": proj, "norm_sq": norm,
                              "sar": math.sqrt(proj / norm) if norm > 0 else math.nan})
    if not tall:
        raise ParameterError("spectral_interference: the task vectors hold no floating-point parameters")
    return SpectralInterference(
        task_names=names, fraction=fraction, merged=merged_label, epsilon=epsilon, mask_lambda=mask_lambda,
        pairs=pd.DataFrame(pairs, columns=["tensor", "layer", "module", "task_a", "task_b", "k", "sti", "mean_cos",
                                           "min_angle_deg", "mean_angle_deg"]),
        alignment=pd.DataFrame(alignment, columns=["tensor", "layer", "module", "task", "k_M", "proj_sq", "norm_sq", "sar"]),
        tall=pd.DataFrame(tall, columns=["tensor", "layer", "module", "numel", "unchanged", *TALL_LABELS]),
    )
