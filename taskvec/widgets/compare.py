"""Views for notebooks 05 (SLERP, per-layer t, passthrough) and 06 (every merging method on the zoo).

Each function is what a slider or dropdown calls: plain arguments in, a
DataFrame or a Figure out, so tests call them directly. Hyper-parameters are
chosen on the validation split and reported on the test split (TIES' protocol).

Two facts keep the method comparison cheap enough for a notebook:
* every method of the task-arithmetic family (task arithmetic, TIES, DARE,
  breadcrumbs, DELLA) returns θ₀ + λ·τ_m, so one merge at λ = 1 gives every λ
  on the grid by rescaling τ_m (`rescaled`), bit-for-bit the same up to float rounding;
* Fisher diagonals and RegMean Gram matrices are computed once per (zoo, task,
  number of examples) and kept in memory (`merge_statistics`).
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from taskvec.errors import ParameterError
from taskvec.viz import new_figure, style

# ================================================================== 05: interpolation paths

#: SLERP falls back to linear interpolation above this cosine (mergekit's DOT_THRESHOLD; taskvec.methods.slerp).
SLERP_DOT_THRESHOLD = 0.9995


def _float_keys(lab) -> list[str]:
    return [k for k, v in lab.base.items() if v.is_floating_point()]


def path_coefficients(t: float, cos: float, method: str, dot_threshold: float = SLERP_DOT_THRESHOLD):
    """(c0, c1) with θ(t) = c0·v0 + c1·v1 for one tensor whose endpoints have cosine `cos`.

    linear: (1 − t, t); slerp: sin((1 − t)Ω)/sin Ω, sin(tΩ)/sin Ω with Ω = arccos(cos), and linear where
    |cos| > `dot_threshold` (as `taskvec.methods.slerp` and mergekit do)."""
    if method == "linear" or abs(cos) > dot_threshold:
        return 1.0 - t, t
    if method != "slerp":
        raise ParameterError(f"method must be 'slerp' or 'linear', got {method!r}")
    omega = math.acos(max(-1.0, min(1.0, cos)))
    s = math.sin(omega)
    return math.sin((1.0 - t) * omega) / s, math.sin(t * omega) / s


def pair_geometry(lab, a: str, b: str, space: str = "weights") -> pd.DataFrame:
    """Per tensor: ‖v0‖², ‖v1‖², v0·v1 and the angle between them, for v = θ_task ("weights", what
    mergekit's SLERP interpolates) or v = τ_task ("task_vectors", relative to the base)."""
    if space not in ("weights", "task_vectors"):
        raise ParameterError(f"space must be 'weights' or 'task_vectors', got {space!r}")
    fa, fb = lab.finetuned(a), lab.finetuned(b)
    rows = []
    for k in _float_keys(lab):
        v0, v1 = fa[k].float(), fb[k].float()
        if space == "task_vectors":
            base = lab.base[k].float()
            v0, v1 = v0 - base, v1 - base
        # products in float32, sums in float64: cosines of 0.99995 need the extra digits
        n0, n1 = float((v0 * v0).sum(dtype=torch.float64)), float((v1 * v1).sum(dtype=torch.float64))
        dot = float((v0 * v1).sum(dtype=torch.float64))
        cos = dot / math.sqrt(n0 * n1) if n0 > 0 and n1 > 0 else 0.0
        rows.append({"tensor": k, "sq_norm_0": n0, "sq_norm_1": n1, "dot": dot, "cosine": cos,
                     "angle_deg": math.degrees(math.acos(max(-1.0, min(1.0, cos)))),
                     "numel": lab.base[k].numel()})
    return pd.DataFrame(rows)


def path_norms(geometry: pd.DataFrame, ts: Sequence[float]) -> pd.DataFrame:
    """‖θ(t)‖ along the linear and the SLERP path, exactly, from each tensor's norms and dot product
    (no tensor is built): ‖c0·v0 + c1·v1‖² = c0²‖v0‖² + c1²‖v1‖² + 2·c0·c1·v0·v1, summed over tensors.

    `relative_norm` divides by the straight line between the endpoint norms, (1 − t)‖v0‖ + t‖v1‖:
    1 means the path keeps the endpoints' length."""
    total0 = math.sqrt(geometry["sq_norm_0"].sum())
    total1 = math.sqrt(geometry["sq_norm_1"].sum())
    rows = []
    for method in ("linear", "slerp"):
        for t in ts:
            sq = 0.0
            for r in geometry.itertuples():
                c0, c1 = path_coefficients(float(t), r.cosine, method)
                sq += c0 * c0 * r.sq_norm_0 + c1 * c1 * r.sq_norm_1 + 2 * c0 * c1 * r.dot
            norm = math.sqrt(max(sq, 0.0))
            rows.append({"method": method, "t": float(t), "norm": norm,
                         "relative_norm": norm / ((1 - t) * total0 + t * total1)})
    return pd.DataFrame(rows)


def interpolate(lab, a: str, b: str, t: float, *, method: str = "slerp", space: str = "weights") -> dict:
    """State dict between task a (t = 0) and task b (t = 1).

    space="weights": `merge(None, [θ_a, θ_b], "slerp"|"linear")`, what a mergekit SLERP config does;
    space="task_vectors": θ₀ + path(τ_a, τ_b), the same interpolation applied to the task vectors."""
    from taskvec.merging import merge
    from taskvec.methods import slerp

    t = float(t)
    if method not in ("slerp", "linear"):
        raise ParameterError(f"method must be 'slerp' or 'linear', got {method!r}")
    fa, fb = lab.finetuned(a), lab.finetuned(b)
    if space == "weights":
        if method == "slerp":
            return merge(None, [fa, fb], method="slerp", t=t, progress=False)
        return merge(None, [fa, fb], method="linear", weight=[1.0 - t, t], progress=False)
    if space != "task_vectors":
        raise ParameterError(f"space must be 'weights' or 'task_vectors', got {space!r}")
    out = dict(lab.base)
    for k in _float_keys(lab):
        base = lab.base[k].float()
        d0, d1 = fa[k].float() - base, fb[k].float() - base
        d = slerp(t, d0, d1) if method == "slerp" else (1.0 - t) * d0 + t * d1
        out[k] = (base + d).to(lab.base[k].dtype)
    return out


def accuracy_path(lab, a: str, b: str, ts: Sequence[float], *, space: str = "weights",
                  methods: Sequence[str] = ("linear", "slerp"), split: str = "test",
                  endpoints: dict | None = None) -> pd.DataFrame:
    """Accuracy on both endpoint tasks along t, for each method (tidy: one row per method and t).

    t = 0 and t = 1 are the fine-tuned models themselves whatever the method or space: they are evaluated
    once and kept in `endpoints` (pass the same dict to several calls to share them). The per-example
    outcomes are kept in ``df.attrs["correct"]``: {(space, method, t): {task: bool tensor}}, for paired
    intervals between points of the path (or against a reference on the same examples)."""
    rows, correct = [], {}
    endpoints = {} if endpoints is None else endpoints
    for method in methods:
        for t in ts:
            if float(t) in (0.0, 1.0):
                key = (a, b, split, float(t))
                if key not in endpoints:
                    endpoints[key] = lab.correct(lab.finetuned(b if t else a), split=split, tasks=[a, b])
                outcomes = endpoints[key]
            else:
                outcomes = lab.correct(interpolate(lab, a, b, t, method=method, space=space), split=split,
                                       tasks=[a, b])
            correct[(space, method, float(t))] = outcomes
            acc = {task: float(c.float().mean()) for task, c in outcomes.items()}
            rows.append({"space": space, "method": method, "t": float(t), f"acc_{a}": acc[a], f"acc_{b}": acc[b],
                         "mean_accuracy": (acc[a] + acc[b]) / 2})
    df = pd.DataFrame(rows)
    df.attrs["correct"] = correct
    return df


def plot_norm_paths(norms: Mapping[str, pd.DataFrame], title: str = "Weight norm along the path"):
    """One panel per space: ‖θ(t)‖ relative to the straight line between the endpoint norms."""
    labels = {"weights": "whole weights θ_a → θ_b\n(what mergekit's SLERP interpolates)",
              "task_vectors": "task vectors τ_a → τ_b\n(θ₀ + path)"}
    with style():
        fig, axes = new_figure(ncols=len(norms), figsize=(5.4 * len(norms), 3.9))
        axes = np.atleast_1d(axes)
        for ax, (space, df) in zip(axes, norms.items()):
            for method, color, ls, lw in (("linear", "C0", "-", 3.5), ("slerp", "C3", "--", 2.0)):
                d = df[df["method"] == method]
                ax.plot(d["t"], d["relative_norm"], ls, color=color, lw=lw, label=method,
                        marker="o" if len(d) < 15 else None)
            ax.axhline(1.0, color="0.5", ls=":", lw=1)
            ax.set_xlabel("t (0 = model a, 1 = model b)")
            v = "τ" if space == "task_vectors" else "θ"
            ax.set_ylabel(f"‖{v}(t)‖ / ((1−t)‖{v}_a‖ + t‖{v}_b‖)")
            ax.set_title(labels.get(space, space), fontsize=10)
            lo = float(df["relative_norm"].min())
            if lo > 0.999:  # the dip is tiny: show it on its own scale rather than as a flat line
                ax.ticklabel_format(axis="y", useOffset=False, style="plain")
            ax.legend(loc="center")
        fig.suptitle(title)
    return fig


def plot_accuracy_paths(paths: pd.DataFrame, a: str, b: str, *, reference: Mapping[str, float] | None = None,
                        title: str | None = None):
    """Accuracy on task a and task b along t; linear solid, SLERP dashed; one panel per space."""
    spaces = list(dict.fromkeys(paths["space"]))
    names = {"weights": "whole weights", "task_vectors": "task vectors (θ₀ + path)"}
    with style():
        fig, axes = new_figure(ncols=len(spaces), figsize=(5.4 * len(spaces), 3.9), sharey=True)
        axes = np.atleast_1d(axes)
        for ax, space in zip(axes, spaces):
            p = paths[paths["space"] == space]
            for method, ls, lw, mfc in (("linear", "-", 3.0, None), ("slerp", "--", 1.6, "white")):
                d = p[p["method"] == method]
                ax.plot(d["t"], d[f"acc_{a}"], ls, marker="o", color="C0", lw=lw, mfc=mfc, label=f"{a} ({method})")
                ax.plot(d["t"], d[f"acc_{b}"], ls, marker="s", color="C1", lw=lw, mfc=mfc, label=f"{b} ({method})")
            for task, color in ((a, "C0"), (b, "C1")):
                if reference and task in reference:
                    ax.axhline(reference[task], color=color, ls=":", lw=1)
            lin = p[p["method"] == "linear"].set_index("t")[[f"acc_{a}", f"acc_{b}"]]
            sl = p[p["method"] == "slerp"].set_index("t")[[f"acc_{a}", f"acc_{b}"]]
            same = lin.shape == sl.shape and bool((lin - sl).abs().to_numpy().max() == 0)
            ax.set_xlabel(f"t (0 = fine-tuned on {a}, 1 = on {b})")
            ax.set_title(names.get(space, space) + (" — SLERP = linear here" if same else ""), fontsize=10)
        axes[0].set_ylabel("test accuracy")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=8.5)
        fig.suptitle(title or f"Accuracy along the path {a} → {b} (dotted: base model)")
    return fig


def interpolation_view(lab, a: str, b: str, t: float = 0.5, space: str = "task_vectors"):
    """The t slider: accuracy on both tasks of the linear and the SLERP model at t, with their norms."""
    acc, norms = {}, {}
    for method in ("linear", "slerp"):
        sd = interpolate(lab, a, b, t, method=method, space=space)
        acc[method] = lab.accuracy(sd, split="test", tasks=[a, b])
        keys = _float_keys(lab)
        ref = lab.base if space == "task_vectors" else {k: torch.zeros(()) for k in keys}
        norms[method] = math.sqrt(sum(float(((sd[k].float() - ref[k].float()) ** 2).sum()) for k in keys))
    x = np.arange(2)
    with style():
        fig, ax = new_figure(figsize=(6.4, 3.8))
        for i, (method, color) in enumerate((("linear", "C0"), ("slerp", "C3"))):
            vals = [acc[method][a], acc[method][b]]
            what = "‖τ(t)‖" if space == "task_vectors" else "‖θ(t)‖"
            ax.bar(x + (i - 0.5) * 0.38, vals, 0.38, color=color, label=f"{method}: {what} = {norms[method]:.3g}")
            for xi, v in zip(x + (i - 0.5) * 0.38, vals):
                ax.text(xi, v + 0.01, f"{v:.2f}", ha="center", fontsize=9)
        ax.set_xticks(x, [a, b])
        ax.set_ylim(0, 1.25)
        ax.set_ylabel("test accuracy")
        ax.set_title(f"t = {t:.2f} between {a} and {b} ({space.replace('_', ' ')})")
        ax.legend(loc="upper center", ncol=2, fontsize=8.5)
    return fig


# ================================================================== 05: per-layer t from a mergekit config

def slerp_config(model_a, model_b, t, *, num_layers: int, dtype: str = "float32") -> dict:
    """The seed article's SLERP config (mergekit shape) for two local models: one slice of all layers,
    base_model = model_a (t = 0), `t` a scalar or mergekit's list of {filter, value} entries."""
    a, b = str(model_a), str(model_b)
    return {"slices": [{"sources": [{"model": a, "layer_range": [0, num_layers]},
                                    {"model": b, "layer_range": [0, num_layers]}]}],
            "merge_method": "slerp", "base_model": a, "parameters": {"t": t}, "dtype": dtype}


def t_table(plan) -> pd.DataFrame:
    """Per-layer t a compiled plan resolved to: layer × module group (attention / mlp / other)."""
    table = plan.parameter_table()
    t = table[(table["parameter"] == "t") & table["layer"].notna()].copy()

    def group(name: str) -> str:
        rest = name.split(".", 3)[-1] if ".layer." in name or ".layers." in name else name
        if "attention" in rest or "self_attn" in rest or "attn" in rest:
            return "attention"
        if any(s in rest for s in ("intermediate", "mlp", "output.dense", "output.LayerNorm", "fc", "ffn")):
            return "mlp"
        return "other"

    t["group"] = t["tensor"].map(group)
    pivot = t.pivot_table(index="layer", columns="group", values="value", aggfunc=lambda v: sorted(set(v)))
    pivot = pivot.map(lambda v: v[0] if len(v) == 1 else v)
    pivot.index = pivot.index.astype(int)
    outside = table[(table["parameter"] == "t") & table["layer"].isna()]
    pivot.attrs["outside_layers"] = dict(zip(outside["tensor"], outside["value"]))
    return pivot


def plot_t_table(tables: Mapping[str, pd.DataFrame], title: str = "Per-layer t resolved from the config"):
    with style():
        fig, ax = new_figure(figsize=(6.4, 3.8))
        markers = itertools.cycle("osD^v")
        for i, (label, table) in enumerate(tables.items()):
            for j, col in enumerate(c for c in ("attention", "mlp", "other") if c in table):
                values = table[col]
                if values.map(lambda v: isinstance(v, list)).any():
                    continue
                ax.plot(table.index, values, marker=next(markers), lw=2, ls=("-", "--", ":")[i % 3],
                        color=f"C{j}", label=f"{label}: {col}")
        ax.set_xlabel("layer")
        ax.set_ylabel("t (0 = model a, 1 = model b)")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(title)
        ax.legend(fontsize=8, loc="best")
    return fig


# ================================================================== 05: passthrough

def encoder_accuracy(lab, encoder, *, split: str = "test", tasks: Sequence[str] | None = None) -> dict[str, float]:
    """Accuracy of any encoder module (e.g. a deeper passthrough model) with the lab's frozen heads,
    on the same evaluation subsets `lab.accuracy` uses (default: every task the lab scores, held-out ones too)."""
    from taskvec.eval.classification import accuracy_from_predictions, predict

    encoder.eval()
    out = {}
    for task in (tasks or lab.all_tasks):
        texts, labels = lab._examples(task, split)
        pred = predict(encoder, lab._heads[task], lab.tokenizer, texts, max_length=lab.max_length)
        out[task] = accuracy_from_predictions(pred, labels)
    return out


def depth_upscaling_slices(num_layers: int, overlap: int) -> list[tuple[int, int]]:
    """SOLAR's depth up-scaling: two copies of an n-layer model, the last m layers dropped from the first
    and the first m from the second: [0, n − m) + [m, n) → 2(n − m) layers."""
    if not 0 < overlap < num_layers:
        raise ParameterError(f"overlap must be in 1..{num_layers - 1}, got {overlap}")
    return [(0, num_layers - overlap), (overlap, num_layers)]


# ================================================================== 06: every method

@dataclass
class MethodSpec:
    """One row of the comparison: a registered method, fixed parameters, a grid searched on validation
    data and, for θ₀ + λ·τ_m methods, the λ grid (searched by rescaling one merge)."""

    label: str
    method: str
    params: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    lambdas: Sequence[float] | None = None
    statistics: str | None = None  # "fisher" | "gram": per-task statistics passed as the method's parameter
    note: str = ""

    def configurations(self) -> list[dict]:
        names = list(self.grid)
        return [dict(zip(names, combo)) for combo in itertools.product(*(self.grid[n] for n in names))] or [{}]


def default_specs(fast: bool = True) -> list[MethodSpec]:
    """The comparison of notebook 06. Grids follow the papers' searches, shrunk in fast mode.

    λ for sum-type methods (task arithmetic, dare_linear, breadcrumbs) is near 1/n for n tasks; for
    disjoint-mean methods (TIES, dare_ties, DELLA) near 1 (TIES searches 0.8–2.5)."""
    sum_l = (0.3, 0.5) if fast else (0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
    mean_l = (1.0, 1.5) if fast else (0.8, 1.0, 1.2, 1.5, 2.0)
    dens = (0.2,) if fast else (0.1, 0.2, 0.3)
    drop = (0.9,) if fast else (0.5, 0.7, 0.9)
    return [
        MethodSpec("averaging", "linear", note="θ = mean θ_i (model soup)"),
        MethodSpec("fisher", "fisher", statistics="fisher", note="diagonal Fisher per task (sampled y)"),
        MethodSpec("regmean", "regmean", statistics="gram", grid={"alpha": (0.9,) if fast else (0.5, 0.7, 0.9)},
                   note="Gram matrices of every linear layer's inputs"),
        MethodSpec("task_arithmetic", "task_arithmetic", lambdas=sum_l),
        MethodSpec("ties", "ties", grid={"density": dens}, lambdas=mean_l),
        MethodSpec("dare_linear", "dare_linear", grid={"p": drop}, lambdas=sum_l),
        MethodSpec("dare_ties", "dare_ties", grid={"p": drop}, lambdas=mean_l),
        MethodSpec("breadcrumbs", "breadcrumbs", grid={"density": (0.9,) if fast else (0.8, 0.9),
                                                       "gamma": (0.01,)}, lambdas=sum_l),
        MethodSpec("della", "della", grid={"density": (0.7,) if fast else (0.5, 0.7)}, lambdas=mean_l),
        MethodSpec("model_stock", "model_stock", note="no hyper-parameter"),
    ]


_STATISTICS: dict[tuple, dict] = {}


def merge_statistics(lab, kind: str, n_examples: int, tasks: Sequence[str] | None = None) -> dict[str, dict]:
    """{task: statistics} for Fisher merging ("fisher": `zoo_eval.task_fisher`, n_examples samples) or RegMean
    ("gram": `zoo_eval.task_grams` on n_examples examples), computed once per (zoo, kind, n, task) and cached
    in memory."""
    from taskvec.eval.zoo_eval import task_fisher, task_grams

    if kind not in ("fisher", "gram"):
        raise ParameterError(f"statistics kind must be 'fisher' or 'gram', got {kind!r}")
    out = {}
    for task in (tasks or lab.tasks):
        key = (str(lab.zoo.root), kind, int(n_examples), task)
        if key not in _STATISTICS:
            if kind == "fisher":
                _STATISTICS[key] = task_fisher(lab.zoo, task, n_samples=n_examples, weights=lab.finetuned(task))
            else:
                _STATISTICS[key] = task_grams(lab.zoo, task, weights=lab.finetuned(task), limit=n_examples)
        out[task] = _STATISTICS[key]
    return out


def rescaled(lab, merged: Mapping[str, torch.Tensor], lam: float) -> dict[str, torch.Tensor]:
    """θ₀ + λ(θ_merged − θ₀): a merge made at λ = 1 turned into the same merge at λ."""
    out = dict(merged)
    for k, base in lab.base.items():
        if base.is_floating_point():
            out[k] = torch.lerp(base.float(), merged[k].float(), float(lam)).to(base.dtype)  # one fused op
    return out


def _mean(d: Mapping[str, float], keys: Sequence[str]) -> float:
    return float(np.mean([d[k] for k in keys]))


def evaluate_spec(lab, spec: MethodSpec, statistics: Mapping[str, Mapping[str, dict]] | None = None) -> dict:
    """Search `spec`'s grid on validation (mean normalised accuracy over the fine-tuned tasks), then score the
    chosen configuration on test, through `sweeps.evaluate_methods` (the engine behind every method table).
    Returns one row: chosen parameters, validation score, test accuracies with the 95 % interval of the mean,
    and (key "correct") the per-example test outcomes for paired comparisons."""
    from taskvec.widgets.sweeps import evaluate_methods

    tasks = lab.tasks
    fixed = dict(spec.params)
    if spec.statistics:
        if not statistics or spec.statistics not in statistics:
            raise ParameterError(f"{spec.label}: needs {spec.statistics!r} statistics (see merge_statistics)")
        fixed[spec.statistics] = [statistics[spec.statistics][t] for t in tasks]
    started = time.perf_counter()
    configs = spec.configurations()
    candidates = []
    for config in configs:
        merged = lab.merge(spec.method, tasks, **fixed, **config)
        if spec.lambdas:  # θ₀ + λ·τ_m: one merge, rescaled for each λ
            candidates.append((config, lambda lam, m=merged: rescaled(lab, merged=m, lam=lam), tuple(spec.lambdas)))
        else:
            candidates.append((config, lambda lam, m=merged: m, (1.0,)))
    df = evaluate_methods(lab, {spec.label: candidates})
    row = df.iloc[0].to_dict()
    params = {k: row[k] for k in (configs[0] if configs else {})}
    if spec.lambdas:
        params["lambda"] = row["lambda"]
    return {"method": spec.label, "params": ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                                      for k, v in params.items()) or "—",
            "val_normalized": row["val_normalized"] if row["val_normalized"] is not None else float("nan"),
            "normalized_accuracy": row["normalized_accuracy"], "low": row["low"], "high": row["high"],
            "absolute_accuracy": row["absolute_accuracy"], **{f"acc_{t}": row[f"acc_{t}"] for t in tasks + lab.control},
            "configs_tried": len(configs) * len(spec.lambdas or (None,)),
            "seconds": time.perf_counter() - started, "correct": df.attrs["correct"][spec.label]}


def method_table(lab, specs: Sequence[MethodSpec] | None = None, *, statistics=None, fast: bool = True,
                 include_references: bool = True) -> pd.DataFrame:
    """Every method in `specs` (default: `default_specs(fast)`) tuned on validation, scored on test: one row
    per method with per-task test accuracy, mean absolute and mean normalised accuracy (acc / fine-tuned acc)
    with its 95 % interval (low / high). `include_references` adds the base model, the multi-task model (when
    the zoo has one) and the individual fine-tuned models (each on its own task). Per-example test outcomes are
    kept in ``df.attrs["correct"]`` (`sweeps.method_differences` gives paired intervals of differences)."""
    from taskvec._progress import progress
    from taskvec.widgets.sweeps import reference_rows

    specs = list(specs if specs is not None else default_specs(fast))
    rows, correct = [], {}
    if include_references:
        refs = reference_rows(lab)
        correct.update(refs.attrs["correct"])
        for r in refs.to_dict("records"):
            rows.append({"method": r["method"].replace("base θ₀ (no merge)", BASE_LABEL), "params": "—",
                         **{k: r[k] for k in ("normalized_accuracy", "low", "high", "absolute_accuracy")},
                         **{k: v for k, v in r.items() if k.startswith("acc_")}})
        correct[BASE_LABEL] = correct.pop("base θ₀ (no merge)")
    for spec in progress(specs, desc="methods"):
        row = evaluate_spec(lab, spec, statistics)
        correct[spec.label] = row.pop("correct")
        rows.append(row)
    df = pd.DataFrame(rows)
    df["reference"] = df["method"].isin([BASE_LABEL, "fine-tuned (one model per task)", "multi-task (trained jointly)"])
    df.attrs["correct"] = correct
    return df


BASE_LABEL = "base θ₀ (frozen heads)"


def plot_method_table(table: pd.DataFrame, tasks: Sequence[str], finetuned: Mapping[str, float],
                      title: str = "Merging the zoo's fine-tuned models: every method"):
    """Left: mean normalised test accuracy per method (sorted). Right: normalised accuracy per task
    (heatmap, 1 = the task's own fine-tuned model)."""
    df = table.sort_values("normalized_accuracy", ascending=False).reset_index(drop=True)
    norm = np.array([[row[f"acc_{t}"] / finetuned[t] for t in tasks] for _, row in df.iterrows()])
    with style():
        fig, (ax, hx) = new_figure(ncols=2, figsize=(12.5, 0.42 * len(df) + 1.9),
                                   gridspec_kw={"width_ratios": [1.0, 1.15]})
        y = np.arange(len(df))
        colors = ["0.6" if r else "C0" for r in df.get("reference", [False] * len(df))]
        ax.barh(y, df["normalized_accuracy"], color=colors)
        for i, v in enumerate(df["normalized_accuracy"]):
            ax.text(v + 0.004, i, f"{v:.3f}", va="center", fontsize=8.5)
        labels = [m if p in ("—", None) or (isinstance(p, float) and math.isnan(p)) else f"{m} ({p})"
                  for m, p in zip(df["method"], df["params"])]
        ax.set_yticks(y, labels, fontsize=8.5)
        ax.invert_yaxis()
        lo = max(0.0, float(df["normalized_accuracy"].min()) - 0.05)
        ax.set_xlim(lo, max(1.03, float(df["normalized_accuracy"].max()) + 0.04))
        ax.axvline(1.0, color="C2", ls=":", lw=1)
        ax.set_xlabel("mean normalised test accuracy\n(acc / fine-tuned acc; grey: references)")
        vmin = max(0.0, math.floor(float(norm.min()) * 20) / 20 - 0.05)  # spread the colours over the data
        vmax = max(1.02, float(norm.max()))
        im = hx.imshow(norm, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        hx.grid(False)
        for i in range(norm.shape[0]):
            for j in range(norm.shape[1]):
                v = norm[i, j]
                hx.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if v > (vmin + vmax) / 2 else "white")
        hx.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
        hx.set_yticks(y, [""] * len(df))
        hx.set_title("normalised accuracy per task", fontsize=10)
        fig.colorbar(im, ax=hx, fraction=0.04, pad=0.02, label="acc / fine-tuned acc")
        fig.suptitle(title)
    return fig


def method_view(table: pd.DataFrame, method: str, tasks: Sequence[str], control: Sequence[str] = ()):
    """The dropdown: one method's test accuracy per task next to the base and the fine-tuned models."""
    rows = table.set_index("method")
    if method not in rows.index:
        raise ParameterError(f"method {method!r} not in the table; it has {list(rows.index)}")
    names = list(tasks) + list(control)
    series = {"base θ₀": ("base θ₀ (frozen heads)", "0.65"), method: (method, "C0"),
              "fine-tuned": ("fine-tuned (one model per task)", "C2")}
    x = np.arange(len(names))
    with style():
        fig, ax = new_figure(figsize=(7.5, 3.8))
        width = 0.8 / len(series)
        for i, (label, (row, color)) in enumerate(series.items()):
            if row not in rows.index:
                continue
            vals = [rows.loc[row].get(f"acc_{n}", np.nan) for n in names]
            ax.bar(x + (i - 1) * width, vals, width, color=color, label=label)
        ax.set_xticks(x, [n + (" (control)" if n in control else "") for n in names], rotation=30, ha="right")
        ax.set_ylim(0, 1.18)
        ax.set_ylabel("test accuracy")
        r = rows.loc[method]
        params = "" if r["params"] in ("—", None) else f" ({r['params']})"
        ax.set_title(f"{method}{params}: mean normalised accuracy {r['normalized_accuracy']:.3f}")
        ax.legend(loc="upper center", ncol=3, fontsize=8.5)
    return fig


def pairwise_table(lab, pairs: Sequence[tuple[str, str]] | None = None, *, t: float = 0.5) -> pd.DataFrame:
    """SLERP merges exactly two models, so it gets its own table: for each pair of tasks, SLERP at t next to
    linear interpolation at t on the whole weights (what a mergekit config does), and SLERP on the task
    vectors (θ₀ + slerp(τ_a, τ_b, t)); test accuracy on the pair's two tasks."""
    pairs = list(pairs or itertools.combinations(lab.tasks, 2))
    rows = []
    for a, b in pairs:
        for method, space in (("linear", "weights"), ("slerp", "weights"), ("slerp", "task_vectors")):
            acc = lab.accuracy(interpolate(lab, a, b, t, method=method, space=space), split="test", tasks=[a, b])
            norm = lab.normalized(acc)
            rows.append({"pair": f"{a} + {b}", "method": method if space == "weights" else "slerp (task vectors)",
                         "t": t, "acc_a": acc[a], "acc_b": acc[b], "normalized_accuracy": _mean(norm, [a, b])})
    return pd.DataFrame(rows)


#: Published numbers to set beside ours: CLIP ViT-B/32 merged over 8 image tasks, average absolute test
#: accuracy (%), as tabulated in AdaMerging (Yang et al., ICLR 2024, Table 2). "fine-tuned" = one
#: fine-tuned model per task ("individual", 90.5 there). Task arithmetic 69.1 and TIES 72.4 are AdaMerging's
#: entries, without validation-tuned hyper-parameters; with validation TIES reaches 73.6 and task arithmetic
#: 70.1 (as tabulated in EMR-Merging, NeurIPS 2024, Table 2). "multi-task": one model trained jointly on
#: all 8 tasks (88.9 in the same table).
PAPER_VIT_B32 = {
    "fine-tuned (one model per task)": 90.5,
    "multi-task (trained jointly)": 88.9,
    "averaging": 65.8,
    "fisher": 68.3,
    "regmean": 71.8,
    "task_arithmetic": 69.1,
    "ties": 72.4,
}


def paper_vs_here(table: pd.DataFrame, paper: Mapping[str, float] = PAPER_VIT_B32) -> pd.DataFrame:
    """Paper's absolute accuracy (and its ratio to the paper's fine-tuned models) next to ours, per method,
    with each side's rank among the methods both report."""
    rows = table.set_index("method")
    ft_paper = paper.get("fine-tuned (one model per task)")
    out = []
    for method, value in paper.items():
        if method not in rows.index:
            continue
        r = rows.loc[method]
        out.append({"method": method, "paper_accuracy_%": value,
                    "paper_normalized": value / ft_paper if ft_paper else np.nan,
                    "here_accuracy_%": 100 * r["absolute_accuracy"], "here_normalized": r["normalized_accuracy"]})
    df = pd.DataFrame(out)
    merged = ~df["method"].str.startswith("fine-tuned")
    df.loc[merged, "paper_rank"] = df.loc[merged, "paper_accuracy_%"].rank(ascending=False).astype(int)
    df.loc[merged, "here_rank"] = df.loc[merged, "here_normalized"].rank(ascending=False, method="min").astype(int)
    return df


def plot_passthrough(table: pd.DataFrame, title: str = "Depth up-scaling before any training"):
    """Grouped bars: accuracy per task (rows of `table`) for each model (columns)."""
    names = list(table.index)
    x = np.arange(len(names))
    width = 0.8 / max(1, table.shape[1])
    with style():
        fig, ax = new_figure(figsize=(7.5, 3.8))
        for i, col in enumerate(table.columns):
            ax.bar(x + (i - (table.shape[1] - 1) / 2) * width, table[col].to_numpy(dtype=float), width,
                   color=("0.65", "C4", "C2", "C1")[i % 4], label=col)
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylim(0, 1.18)
        ax.set_ylabel("test accuracy (frozen heads)")
        ax.set_title(title)
        ax.legend(loc="upper center", ncol=2, fontsize=8.5)
    return fig
