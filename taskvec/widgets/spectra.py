"""Views for notebook 07 (spectra of task vectors, low-rank task vectors, interference in weights and outputs).

* `low_rank_curve`: TSV-C (Gargiulo et al., CVPR 2025) on the zoo. Each task's fine-tuned model is replaced by
  θ₀ + low_rank_f(τ_t) -- every 2-D delta keeps its top ceil(f·r) singular triplets, exactly what
  `TaskVector.low_rank(f)` builds -- and scored on its own task, so its normalised accuracy is what the paper's
  "retains 99 % of accuracy" measures. One exact SVD per task and matrix serves every fraction (`task_svds`).
* `disentanglement_error`: the weight disentanglement error of Ortiz-Jiménez et al. (NeurIPS 2023),
  ξ(α₁, α₂) = Σ_t E_x[1{pred(θ₀ + α_t τ_t)(x) ≠ pred(θ₀ + α₁τ₁ + α₂τ₂)(x)}], x from task t's data, over a
  grid of α: 0 where adding the other task's vector changes no prediction on a task. It takes any predictor
  (`lab_predictor` wraps a `ZooLab`), so the tests run it on a tiny fake one.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from taskvec.errors import ParameterError
from taskvec.viz import new_figure, style
from taskvec.widgets.plots import per_task_bars

Predictor = Callable[[Mapping[str, float], Sequence[str]], Mapping[str, torch.Tensor]]


# ------------------------------------------------------------------ TSV-C: low-rank task vectors

def task_svds(lab, task: str) -> dict[str, tuple]:
    """{tensor: (U, S, Vh)} of every non-zero 2-D delta θ_task − θ₀ (exact SVD, float32), cached on the lab.

    The slices U[:, :k], S[:k], Vh[:k] are what `top_svd` (hence `TaskVector.low_rank`) returns for matrices up to
    `EXACT_SVD_MAX_NUMEL` entries; larger ones are left to `low_rank_approx` (see `low_rank_weights`)."""
    from taskvec.methods.spectral import EXACT_SVD_MAX_NUMEL

    cache = lab.__dict__.setdefault("_task_svds", {})
    if task not in cache:
        ft, out = lab.finetuned(task), {}
        for key, base in lab.base.items():
            if not base.is_floating_point() or base.dim() != 2 or base.numel() > EXACT_SVD_MAX_NUMEL:
                continue
            delta = ft[key].to(torch.float32) - base.to(torch.float32)
            if bool(delta.any()):
                out[key] = torch.linalg.svd(delta, full_matrices=False)
        cache[task] = out
    return cache[task]


def low_rank_weights(lab, task: str, fraction: float) -> dict[str, torch.Tensor]:
    """θ₀ + low_rank_f(τ_task): the weights `lab.task_vector(task).low_rank(fraction).apply_to(lab.base)` gives,
    built from the cached SVDs (every fraction costs compositions, not decompositions)."""
    from taskvec.methods.spectral import check_fraction, compose, keep_rank, low_rank_approx

    fraction = check_fraction(fraction)
    svds, ft, out = task_svds(lab, task), lab.finetuned(task), dict(lab.base)
    for key, base in lab.base.items():
        if not base.is_floating_point():
            continue
        b = base.to(torch.float32)
        delta = ft[key].to(torch.float32) - b
        if key in svds:
            U, S, Vh = svds[key]
            k = keep_rank(min(delta.shape), fraction)
            if k < len(S):
                delta = compose(U[:, :k], S[:k], Vh[:k])
        elif delta.dim() == 2 and bool(delta.any()):
            delta = low_rank_approx(delta, fraction)
        out[key] = (b + delta).to(base.dtype)
    return out


def storage_share(lab, fraction: float, task: str | None = None) -> float:
    """Entries stored for low_rank_f(τ) over entries of the dense τ: k(m + n + 1) per changed matrix (U_k, S_k,
    V_k), every entry of other changed tensors; tensors the fine-tune leaves exactly unchanged count on neither side."""
    from taskvec.methods.spectral import check_fraction, keep_rank

    fraction = check_fraction(fraction)
    task = task or lab.tasks[0]
    ft = lab.finetuned(task)
    stored = dense = 0
    for key, base in lab.base.items():
        if not base.is_floating_point() or torch.equal(ft[key], base):
            continue
        dense += base.numel()
        if base.dim() == 2:
            m, n = base.shape
            stored += min(keep_rank(min(m, n), fraction) * (m + n + 1), m * n)
        else:
            stored += base.numel()
    return stored / dense if dense else float("nan")


def low_rank_curve(lab, fractions: Sequence[float], tasks: Sequence[str] | None = None, *, n_boot: int = 1000,
                   seed: int = 0) -> pd.DataFrame:
    """TSV-C per task: for each fraction f, θ₀ + low_rank_f(τ_t) scored on task t's test split.

    Columns: fraction, normalized_accuracy (mean over tasks of acc / fine-tuned acc) with its 95 % interval
    (low, high; stratified bootstrap), diff / diff_low / diff_high (paired bootstrap against the fine-tuned
    models on the same examples), absolute_accuracy, storage (`storage_share`), acc_<task>. Fraction 1 is the
    fine-tuned model itself (low_rank_1(τ) = τ). Per-example outcomes in ``df.attrs["correct"]``."""
    from taskvec.eval.intervals import mean_accuracy_interval, paired_bootstrap

    tasks = list(tasks or lab.tasks)
    unknown = [t for t in tasks if t not in lab.tasks]
    if unknown:
        raise ParameterError(f"no fine-tuned model for {unknown}; tasks: {lab.tasks}")
    if not fractions:
        raise ParameterError("low_rank_curve needs at least one fraction")
    ft_acc = lab.finetuned_accuracy()
    reference = lab.reference_correct("finetuned", "test")
    norm = {t: ft_acc[t] for t in tasks}
    rows, correct = [], {}
    for f in sorted({float(f) for f in fractions}):
        if f == 1.0:
            outcomes = {t: reference[t] for t in tasks}
        else:
            outcomes = {t: lab.correct(low_rank_weights(lab, t, f), split="test", tasks=[t])[t] for t in tasks}
        iv = mean_accuracy_interval(outcomes, normalizer=norm, n_boot=n_boot, seed=seed)
        d = paired_bootstrap(outcomes, {t: reference[t] for t in tasks}, normalizer=norm, n_boot=n_boot, seed=seed)
        acc = {t: float(c.float().mean()) for t, c in outcomes.items()}
        rows.append({"fraction": f, "normalized_accuracy": iv.estimate, "low": iv.low, "high": iv.high,
                     "diff": d.estimate, "diff_low": d.low, "diff_high": d.high,
                     "absolute_accuracy": float(np.mean(list(acc.values()))),
                     "storage": storage_share(lab, f, tasks[0]), **{f"acc_{t}": acc[t] for t in tasks}})
        correct[f] = outcomes
    df = pd.DataFrame(rows)
    df.attrs["correct"] = correct
    return df


def plot_low_rank_curve(df: pd.DataFrame, *, base_normalized: float | None = None,
                        title: str = "TSV-C: each task's fine-tune with a low-rank task vector"):
    """Left: mean normalised accuracy (95 % band) against the kept fraction of each matrix's rank (log x).
    Right: the share of the task vector's entries stored, against the same fractions."""
    f = df["fraction"].to_numpy()
    with style():
        fig, (ax, sx) = new_figure(ncols=2, figsize=(11.5, 4.0), gridspec_kw={"width_ratios": [1.6, 1.0]})
        ax.fill_between(f, df["low"], df["high"], color="C0", alpha=0.2, lw=0, label="95 % interval")
        ax.plot(f, df["normalized_accuracy"], "o-", color="C0", label="θ₀ + low-rank τ_t on task t")
        for x, y in zip(f, df["normalized_accuracy"]):
            ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)
        ax.axhline(1.0, color="C2", ls=":", lw=1, label="fine-tuned (= fraction 1)")
        if base_normalized is not None:
            ax.axhline(base_normalized, color="0.5", ls="--", lw=1, label="base θ₀ (fraction 0)")
        ax.set_xscale("log")
        ax.set_xticks(f, [f"{x:g}" for x in f])
        ax.minorticks_off()
        ax.set_xlabel("fraction of each matrix's rank kept (top singular triplets)")
        ax.set_ylabel("mean normalised test accuracy\n(acc / fine-tuned acc)")
        lo = min(float(df["low"].min()), base_normalized if base_normalized is not None else 1.0)
        ax.set_ylim(max(0.0, lo - 0.05), 1.06)
        ax.legend(loc="lower right", fontsize=8.5)
        ax.set_title("accuracy kept")
        sx.plot(f, df["storage"] * 100, "s-", color="C1")
        for x, y in zip(f, df["storage"] * 100):
            sx.annotate(f"{y:.1f} %", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
        sx.set_xscale("log")
        sx.set_xticks(f, [f"{x:g}" for x in f])
        sx.minorticks_off()
        sx.set_ylim(0, 118)
        sx.set_xlabel("fraction of each matrix's rank kept")
        sx.set_ylabel("entries stored (% of the dense τ)")
        sx.set_title("storage: k(m + n + 1) per matrix")
        fig.suptitle(title)
    return fig


def low_rank_view(lab, fraction: float = 0.1):
    """The rank-fraction slider: each task's θ₀ + low_rank_f(τ_t) on its own task, next to the base and the
    fine-tuned model (one evaluation per task per move; the SVDs are cached)."""
    acc = {t: float(lab.correct(low_rank_weights(lab, t, fraction), split="test", tasks=[t])[t].float().mean())
           for t in lab.tasks}
    norm = float(np.mean(list(lab.normalized(acc).values())))
    return per_task_bars(lab, acc, f"low rank, f = {fraction:g}", color="C0",
                               title=f"TSV-C at {fraction:.0%} of each rank ({storage_share(lab, fraction):.1%} of "
                                     f"the entries)\nnormalised accuracy {norm:.3f}")


def merged_lambda_view(lab, merged: Mapping[str, Mapping[str, torch.Tensor]], method: str, lam: float = 1.0):
    """The λ slider over merges made at λ = 1 (`merged[method]`, full state dicts): θ₀ + λ(θ_merged − θ₀),
    per-task test accuracy next to the base and the fine-tuned models."""
    from taskvec.widgets.compare import rescaled

    if method not in merged:
        raise ParameterError(f"method {method!r} is not among the merges {list(merged)}")
    acc = lab.accuracy(rescaled(lab, merged[method], lam), split="test", tasks=lab.tasks)
    norm = float(np.mean(list(lab.normalized(acc).values())))
    return per_task_bars(lab, acc, f"{method}, λ = {lam:.2f}", color="C4",
                               title=f"{method} at λ = {lam:.2f}: normalised accuracy {norm:.3f}")


# ------------------------------------------------------------------ weight disentanglement

def disentanglement_error(predict: Predictor, pair: Sequence[str], alphas: Sequence[float]) -> pd.DataFrame:
    """ξ(α₁, α₂) = Σ_t E_x[1{pred(θ₀ + α_t τ_t)(x) ≠ pred(θ₀ + α₁τ₁ + α₂τ₂)(x)}] for t in `pair`, x from task t.

    `predict(coefficients, tasks)` returns {task: predicted labels on that task's examples} of the model
    θ₀ + Σ coefficients[t]·τ_t (always the same examples per task). Returns one row per (α₁, α₂): alpha_1,
    alpha_2, xi (in [0, 2]), and the two terms xi_<task>."""
    a, b = (list(pair) + [None, None])[:2]
    if len(pair) != 2 or a == b:
        raise ParameterError(f"pair must be two different tasks, got {list(pair)!r}")
    alphas = [float(x) for x in alphas]
    if not alphas:
        raise ParameterError("alphas: empty grid")
    single = {}
    for t in (a, b):
        for x in alphas:
            single[(t, x)] = torch.as_tensor(predict({t: x}, [t])[t])
    rows = []
    for x1 in alphas:
        for x2 in alphas:
            both = predict({a: x1, b: x2}, [a, b])
            terms = {}
            for t, x in ((a, x1), (b, x2)):
                p, s = torch.as_tensor(both[t]), single[(t, x)]
                if p.shape != s.shape or p.numel() == 0:
                    raise ParameterError(f"predictions on task {t!r}: {tuple(p.shape)} vs {tuple(s.shape)}")
                terms[t] = float((p != s).float().mean())
            rows.append({"alpha_1": x1, "alpha_2": x2, "xi": terms[a] + terms[b],
                         f"xi_{a}": terms[a], f"xi_{b}": terms[b]})
    df = pd.DataFrame(rows)
    df.attrs["pair"] = (a, b)
    return df


def lab_predictor(lab, split: str = "val") -> Predictor:
    """A `disentanglement_error` predictor over a ZooLab: θ₀ + Σ α_t τ_t (`lab.apply`), predictions on `split`."""
    def predict(coefficients: Mapping[str, float], tasks: Sequence[str]) -> dict[str, torch.Tensor]:
        weights = lab.apply({t: float(c) for t, c in coefficients.items() if c != 0.0})
        return lab.predictions(weights, split=split, tasks=list(tasks))

    return predict


def plot_disentanglement(maps: Mapping[str, pd.DataFrame], title: str = "Weight disentanglement error ξ(α₁, α₂)"):
    """One heatmap per task pair (shared colour scale): rows α₂ (the second task), columns α₁."""
    from taskvec.viz import heatmap

    vmax = max(float(df["xi"].max()) for df in maps.values()) or 1.0
    with style():
        fig, axes = new_figure(ncols=len(maps), figsize=(4.9 * len(maps) + 0.6, 4.4))
        axes = np.atleast_1d(axes)
        for ax, (label, df) in zip(axes, maps.items()):
            a, b = df.attrs.get("pair", ("task 1", "task 2"))
            table = df.pivot(index="alpha_2", columns="alpha_1", values="xi").sort_index(ascending=False)
            table.index = [f"{v:g}" for v in table.index]
            table.columns = [f"{v:g}" for v in table.columns]
            heatmap(ax, table * 100, title=label, xlabel=f"α₁ ({a})", ylabel=f"α₂ ({b})",
                    cbar_label="ξ (% of examples, summed over the 2 tasks)", fmt=".1f", vmin=0, vmax=vmax * 100)
        fig.suptitle(title)
    return fig
