"""Real-model views over a `ZooLab`: negation, addition, merges and sweeps as tables and figures.

Each function is what a slider calls (plain arguments in, a DataFrame or a
Figure out). λ is chosen on the validation split and reported on the test
split, as in EMTA and TIES.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from taskvec.errors import ParameterError
from taskvec.viz import new_figure, style
from taskvec.widgets.plots import per_task_bars  # noqa: F401  (re-exported: views.per_task_bars)

#: λ grid searched on validation data (EMTA: 0.0..1.0 in steps of 0.05; coarser here to stay fast).
NEGATION_LAMBDAS = (0.5, 1.0, 1.5, 2.0, 3.0)
ADDITION_LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


def _mean(d: Mapping[str, float], keys: Sequence[str]) -> float:
    return float(np.mean([d[k] for k in keys]))


# ------------------------------------------------------------------ the zoo itself

def zoo_table(lab, split: str = "test") -> pd.DataFrame:
    """One row per task: its role (fine-tuned / control / held-out), n, and the accuracy of the zero-shot base,
    of the task's own fine-tune and of the multi-task model (when the zoo has one), each with a Wilson 95 %
    interval (``*_low`` / ``*_high``)."""
    from taskvec.eval.intervals import accuracy_interval

    refs = {"base": lab.reference_correct("base", split), "finetuned": lab.reference_correct("finetuned", split)}
    if getattr(lab, "has_multitask", False):
        refs["multitask"] = lab.reference_correct("multitask", split)
    rows = []
    for task in lab.all_tasks:
        if task not in refs["base"]:
            continue
        role = "fine-tuned" if task in lab.tasks else "control" if task in lab.control else "held-out"
        row = {"task": task, "role": role, "n": int(refs["base"][task].numel())}
        for which, outcomes in refs.items():
            if task in outcomes:
                iv = accuracy_interval(outcomes[task])
                row.update({which: iv.estimate, f"{which}_low": iv.low, f"{which}_high": iv.high})
        rows.append(row)
    return pd.DataFrame(rows)


def base_headroom(lab, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """{"base": mean normalised accuracy of the zero-shot base over the fine-tuned tasks (stratified bootstrap
    interval), "gain": fine-tuned − base in mean accuracy (paired bootstrap on the same test examples)}."""
    from taskvec.eval.intervals import mean_accuracy_interval, paired_bootstrap

    base, ft = lab.reference_correct("base", "test"), lab.reference_correct("finetuned", "test")
    acc_ft = lab.finetuned_accuracy()
    return {"base": mean_accuracy_interval({t: base[t] for t in lab.tasks}, normalizer={t: acc_ft[t] for t in lab.tasks},
                                           n_boot=n_boot, seed=seed),
            "gain": paired_bootstrap({t: ft[t] for t in lab.tasks}, {t: base[t] for t in lab.tasks}, n_boot=n_boot,
                                     seed=seed)}


# ------------------------------------------------------------------ negation (EMTA Table 1)

def negation_table(lab, lambdas: Sequence[float] = NEGATION_LAMBDAS, *, control_floor: float = 0.95,
                   n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """EMTA's negation protocol: for each task, θ₀ − λτ_task with λ the LARGEST value on the grid whose control
    accuracy on the validation split stays ≥ `control_floor` × the base's; numbers on the test split.

    Columns: accuracies with Wilson 95 % intervals (``*_low`` / ``*_high``), and the drops (base − negated, in
    accuracy units) with paired-bootstrap intervals on the same test examples. The per-example outcomes are
    kept in ``df.attrs["correct"]`` for `negation_summary`."""
    from taskvec.eval.intervals import accuracy_interval, paired_bootstrap

    if not lab.control:
        raise ParameterError(f"zoo {lab.zoo.name!r} has no control task to guard negation with")
    ctrl = lab.control
    base_val = lab.base_accuracy("val")
    base = lab.reference_correct("base", "test")
    rows, kept = [], {}
    for task in lab.tasks:
        best = 0.0
        for lam in sorted(lambdas):
            acc = lab.accuracy(lab.apply({task: -lam}), split="val", tasks=ctrl)
            if _mean(acc, ctrl) >= control_floor * _mean(base_val, ctrl):
                best = float(lam)
        neg = lab.correct(lab.apply({task: -best}) if best else None, split="test", tasks=[task] + ctrl)
        kept[task] = neg
        target = accuracy_interval(neg[task])
        drop = paired_bootstrap({task: base[task]}, {task: neg[task]}, n_boot=n_boot, seed=seed)
        cdrop = paired_bootstrap({c: base[c] for c in ctrl}, {c: neg[c] for c in ctrl}, n_boot=n_boot, seed=seed)
        rows.append({"task": task, "lambda": best, "target_base": float(base[task].float().mean()),
                     "target_finetuned": lab.finetuned_accuracy("test")[task], "target_negated": target.estimate,
                     "target_negated_low": target.low, "target_negated_high": target.high,
                     "target_drop": drop.estimate, "target_drop_low": drop.low, "target_drop_high": drop.high,
                     "control_base": _mean({c: float(base[c].float().mean()) for c in ctrl}, ctrl),
                     "control_negated": _mean({c: float(neg[c].float().mean()) for c in ctrl}, ctrl),
                     "control_drop": cdrop.estimate, "control_drop_low": cdrop.low, "control_drop_high": cdrop.high})
    df = pd.DataFrame(rows)
    df.attrs["correct"] = {"base": base, "negated": kept, "control": list(ctrl)}
    return df


def negation_summary(table: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean target drop and mean control drop over the negated tasks (accuracy units, base − negated), each an
    `Interval` from a paired bootstrap: the target drop stratified by task (each task's test examples
    resampled, base and negated model on the same draw); the control drop resamples the control's test
    examples once per replicate for all negated models together (they share those examples)."""
    from taskvec.eval.intervals import Interval, paired_bootstrap

    c = table.attrs.get("correct")
    if not c:
        raise ParameterError("negation_summary needs the table returned by negation_table (per-example outcomes)")
    base, neg, ctrl = c["base"], c["negated"], c["control"]
    target = paired_bootstrap({t: base[t] for t in neg}, {t: neg[t][t] for t in neg}, n_boot=n_boot, seed=seed,
                              level=level)
    # per control example: base outcome minus the mean outcome of the negated models
    rng = np.random.default_rng(seed)
    reps, est = np.zeros(n_boot), 0.0
    for k in ctrl:
        diff = base[k].float().numpy() - np.mean([neg[t][k].float().numpy() for t in neg], axis=0)
        est += diff.mean() / len(ctrl)
        reps += diff[rng.integers(0, diff.size, size=(n_boot, diff.size))].mean(axis=1) / len(ctrl)
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    control = Interval(float(est), float(min(lo, est)), float(max(hi, est)), level)
    return {"target_drop": target, "control_drop": control}


def negation_view(lab, task: str, lam: float = 1.0):
    """Accuracy on every task for the base and for θ₀ − λτ_task (the negated task should drop, others stay)."""
    base = lab.base_accuracy("test")
    neg = lab.accuracy(lab.apply({task: -lam}), split="test")
    names = list(neg)
    x = np.arange(len(names))
    with style():
        fig, ax = new_figure(figsize=(7.5, 3.8))
        ax.bar(x - 0.2, [base[n] for n in names], 0.4, color="0.65", label="base θ₀")
        ax.bar(x + 0.2, [neg[n] for n in names], 0.4, color="C3", label=f"θ₀ − {lam:.2f}·τ_{task}")
        ax.set_xticks(x, [n + (" (control)" if n in lab.control else "") + (" ←" if n == task else "")
                          for n in names], rotation=30, ha="right")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1.22)
        ax.set_title(f"Negating τ_{task}: forget {task}, keep the rest")
        ax.legend(loc="upper right", ncol=2)
    return fig


# ------------------------------------------------------------------ addition (EMTA Fig. 3)

def best_lambda(lab, weights_for: Callable[[float], dict], tasks: Sequence[str],
                lambdas: Sequence[float] = ADDITION_LAMBDAS) -> tuple[float, dict]:
    """λ maximising mean normalised validation accuracy over `tasks`; returns (λ, test accuracies)."""
    lam, _ = validated_lambda(lab, weights_for, tasks, lambdas)
    return lam, lab.accuracy(weights_for(lam), split="test")


def addition_curve(lab, lambdas: Sequence[float] = ADDITION_LAMBDAS, *, sizes: Sequence[int] | None = None,
                   n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """θ₀ + λ Σ_{i≤n} τ_i for n in `sizes` (default 1..N tasks): mean normalised test accuracy on those n tasks,
    λ from validation, with a stratified-bootstrap 95 % interval (low/high)."""
    from taskvec.eval.intervals import mean_accuracy_interval

    ft = lab.finetuned_accuracy()
    rows = []
    for n in (sizes or range(1, len(lab.tasks) + 1)):
        tasks = lab.tasks[:n]
        lam, _ = validated_lambda(lab, lambda l, ts=tasks: lab.apply({t: l for t in ts}), tasks, lambdas)
        correct = lab.correct(lab.apply({t: lam for t in tasks}), split="test", tasks=tasks)
        iv = mean_accuracy_interval(correct, normalizer={t: ft[t] for t in tasks}, n_boot=n_boot, seed=seed)
        rows.append({"n_tasks": n, "tasks": "+".join(tasks), "lambda": lam,
                     "normalized_accuracy": iv.estimate, "low": iv.low, "high": iv.high,
                     "absolute_accuracy": _mean({t: float(c.float().mean()) for t, c in correct.items()}, tasks),
                     "base_normalized": _mean(lab.normalized(lab.base_accuracy()), tasks)})
    return pd.DataFrame(rows)


def validated_lambda(lab, weights_for: Callable[[float], dict], tasks: Sequence[str],
                        lambdas: Sequence[float]) -> tuple[float, float]:
    """(λ, its validation score): the λ of the grid with the best mean normalised validation accuracy."""
    scores = {float(lam): _mean(lab.normalized(lab.accuracy(weights_for(lam), split="val", tasks=tasks), "val"), tasks)
              for lam in lambdas}
    lam = max(scores, key=scores.get)
    return lam, scores[lam]


def plot_addition_curve(df: pd.DataFrame):
    with style():
        fig, ax = new_figure(figsize=(6.0, 3.8))
        ax.plot(df["n_tasks"], df["normalized_accuracy"], "o-", color="C0", lw=2, label="θ₀ + λ Σ τ_i (one model)")
        if "low" in df:
            ax.fill_between(df["n_tasks"], df["low"], df["high"], color="C0", alpha=0.18, lw=0, label="95 % interval")
        ax.plot(df["n_tasks"], df["base_normalized"], "s--", color="0.55", label="base θ₀ (frozen heads)")
        ax.axhline(1.0, color="C2", ls=":", label="each fine-tuned model on its own task")
        ax.set_xticks(df["n_tasks"])
        ax.set_xlabel("number of task vectors added")
        ax.set_ylabel("normalised accuracy\n(acc / fine-tuned acc)")
        ax.set_title("Adding task vectors builds a multi-task model")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8.5)
    return fig


def addition_view(lab, lam: float = 0.4):
    """Accuracy per task of θ₀ + λ Σ τ_i (all tasks) next to the base and each fine-tuned model."""
    acc = lab.accuracy(lab.apply({t: lam for t in lab.tasks}), split="test", tasks=lab.tasks)
    return per_task_bars(lab, acc, f"θ₀ + {lam:.2f}·Σ τ_i", title="One model for all tasks: task addition")


# ------------------------------------------------------------------ merge comparisons (TIES, DARE, 06)

def trimmed_sum(lab, density: float, tasks: Sequence[str] | None = None) -> Callable[[float], dict]:
    """TIES ablation "no elect": θ₀ + λ Σ trim_k(τ_i) (trim only, no sign election, no disjoint mean)."""
    from taskvec.methods import trim_topk

    tasks = list(tasks or lab.tasks)
    summed = {}
    for k in lab.task_vector(tasks[0]).keys():
        summed[k] = sum(trim_topk(lab.task_vector(t)[k], density) for t in tasks)

    def weights(lam: float) -> dict:
        out = dict(lab.base)
        for k, d in summed.items():
            out[k] = (lab.base[k].float() + lam * d).to(lab.base[k].dtype)
        return out

    return weights


def compare_methods(lab, methods: Mapping[str, Callable[[float], dict] | dict[str, float]],
                    lambdas: Sequence[float] = ADDITION_LAMBDAS) -> pd.DataFrame:
    """One row per method: λ from validation, mean normalised test accuracy with its 95 % interval, per-task
    accuracy (`taskvec.widgets.sweeps.evaluate_methods`, the one engine behind every method table).

    `methods` maps a label to either weights_for(λ) or a fixed state dict (methods without λ)."""
    from taskvec.widgets.sweeps import evaluate_methods

    return evaluate_methods(lab, {label: (spec, tuple(lambdas)) if callable(spec) else spec
                                  for label, spec in methods.items()})


def plot_method_comparison(df: pd.DataFrame, title: str = "Merging methods on the zoo"):
    with style():
        fig, ax = new_figure(figsize=(7.0, 0.45 * len(df) + 1.6))
        y = np.arange(len(df))
        ax.barh(y, df["normalized_accuracy"], color="C0")
        has_ci = "low" in df and df["low"].notna().any()
        if has_ci:  # 95 % interval of each mean (stratified bootstrap over test examples)
            v = df["normalized_accuracy"].to_numpy(float)
            ax.errorbar(v, y, xerr=[v - df["low"].to_numpy(float), df["high"].to_numpy(float) - v], fmt="none",
                        ecolor="0.15", capsize=3, lw=1.2)
        for i, v in enumerate(df["normalized_accuracy"]):
            right = float(df["high"].iloc[i]) if has_ci and not pd.isna(df["high"].iloc[i]) else v
            ax.text(right + 0.005, i, f"{v:.3f}", va="center", fontsize=9)
        labels = [m if lam is None or pd.isna(lam) else f"{m} (λ={lam:g})" for m, lam in zip(df["method"], df["lambda"])]
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        lo = max(0.0, float(df["normalized_accuracy"].min()) - 0.1)
        ax.set_xlim(lo, max(1.02, float(df["normalized_accuracy"].max()) + 0.05))
        ax.axvline(1.0, color="C2", ls=":", lw=1)
        ax.set_xlabel("mean normalised test accuracy (acc / fine-tuned acc)" + (", 95 % interval" if has_ci else ""))
        ax.set_title(title)
    return fig


def plot_accuracy_vs(df: pd.DataFrame, x: str, ys: Mapping[str, str], *, title: str, xlabel: str,
                     ylabel: str = "test accuracy", reference: Mapping[str, float] | None = None, logx=False):
    """Lines of df[y] against df[x], one per (label -> column); dotted reference levels."""
    with style():
        fig, ax = new_figure(figsize=(6.4, 3.9))
        for i, (label, col) in enumerate(ys.items()):
            ax.plot(df[x], df[col], "o-", lw=2, color=f"C{i}", label=label)
        for j, (label, v) in enumerate((reference or {}).items()):
            ax.axhline(v, ls=":", color=f"C{j + len(ys)}", lw=1.2, label=label)
        if logx:
            ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(loc="best", fontsize=8.5)
    return fig


def accuracy_fn(lab, tasks: Sequence[str], split: str = "test") -> Callable[[dict], dict]:
    """An eval callback for `taskvec.analysis` sweeps: state dict -> {"acc_<task>": accuracy}."""
    def evaluate(state_dict: dict) -> dict:
        return {f"acc_{t}": v for t, v in lab.accuracy(state_dict, split=split, tasks=list(tasks)).items()}

    return evaluate


def interpolation_path(lab, a: str, b: str, ts: Sequence[float], *, method: str = "slerp") -> pd.DataFrame:
    """Models between θ_a (t = 0) and θ_b (t = 1) by `method` ("slerp" or "linear"): accuracy on both tasks
    and ‖θ(t) − θ₀‖ (how far from the base the path runs)."""
    from taskvec.merging import merge

    rows = []
    fa, fb = lab.finetuned(a), lab.finetuned(b)
    for t in ts:
        if method == "slerp":
            sd = merge(None, [fa, fb], method="slerp", t=float(t), progress=False)
        elif method == "linear":
            sd = merge(None, [fa, fb], method="linear", weight=[1.0 - float(t), float(t)], progress=False)
        else:
            raise ParameterError(f"interpolation method must be 'slerp' or 'linear', got {method!r}")
        acc = lab.accuracy(sd, split="test", tasks=[a, b])
        sq = sum(float(((sd[k].float() - lab.base[k].float()) ** 2).sum()) for k in lab.task_vector(a).keys())
        norm = float(torch.sqrt(torch.tensor(sum(float((sd[k].float() ** 2).sum()) for k in lab.task_vector(a).keys()))))
        rows.append({"method": method, "t": float(t), f"acc_{a}": acc[a], f"acc_{b}": acc[b],
                     "distance_from_base": sq ** 0.5, "weight_norm": norm})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ out-of-distribution (TIES §, seed 001)

def generalization_table(lab, models: Mapping[str, Mapping[str, torch.Tensor] | None], *, n_boot: int = 1000,
                         seed: int = 0) -> pd.DataFrame:
    """Out-of-distribution generalisation of merged models, two ways, each against the base θ₀:

    - ``held-out``: tasks that were never fine-tuned nor merged (the zoo's control and held-out tasks), each
      scored zero-shot with its own frozen head;
    - ``shift``: fine-tuned tasks tested on their distribution-shifted split (e.g. language ID trained on
      words, tested on phrases).

    One row per (model, kind): mean accuracy over that kind's tasks with a stratified-bootstrap 95 % interval,
    and the paired-bootstrap interval of its difference from the base. `models` maps a label to weights
    (None = the base). Per-task accuracies with Wilson intervals are in ``df.attrs["per_task"]``."""
    from taskvec.eval.intervals import (accuracy_interval, difference_verdict, mean_accuracy_interval,
                                        paired_bootstrap)

    kinds = {"held-out": ("test", lab.control + [t for t in lab.heldout if t not in lab.control]),
             "shift": ("shift", [t for t in lab.tasks if lab.has_split(t, "shift")])}
    kinds = {k: v for k, v in kinds.items() if v[1]}
    if not kinds:
        raise ParameterError(f"zoo {lab.zoo.name!r} has no held-out tasks and no shifted splits")
    base = {kind: lab.correct(None, split=split, tasks=tasks) for kind, (split, tasks) in kinds.items()}
    rows, per_task = [], []
    for label, weights in {"base θ₀": None, **models}.items():
        for kind, (split, tasks) in kinds.items():
            c = base[kind] if weights is None else lab.correct(weights, split=split, tasks=tasks)
            iv = mean_accuracy_interval(c, n_boot=n_boot, seed=seed)
            row = {"model": label, "kind": kind, "split": split, "tasks": ", ".join(tasks), "mean": iv.estimate,
                   "low": iv.low, "high": iv.high}
            if weights is not None:
                d = paired_bootstrap(c, base[kind], n_boot=n_boot, seed=seed)
                row.update(diff_vs_base=d.estimate, diff_low=d.low, diff_high=d.high, verdict=difference_verdict(d))
            rows.append(row)
            for t, outcomes in c.items():
                a = accuracy_interval(outcomes)
                per_task.append({"model": label, "kind": kind, "task": t, "split": split, "n": int(outcomes.numel()),
                                 "accuracy": a.estimate, "low": a.low, "high": a.high})
    df = pd.DataFrame(rows)
    df.attrs["per_task"] = pd.DataFrame(per_task)
    return df


def plot_intervals(df: pd.DataFrame, *, label: str = "method", value: str = "normalized_accuracy",
                   title: str = "", xlabel: str = "mean normalised test accuracy", reference: float | None = 1.0):
    """Horizontal dot-and-whisker plot of `value` with its [low, high] interval, one row per `label`."""
    with style():
        fig, ax = new_figure(figsize=(7.0, 0.42 * len(df) + 1.5))
        y = np.arange(len(df))
        v = df[value].to_numpy(float)
        lo, hi = df["low"].to_numpy(float), df["high"].to_numpy(float)
        ax.errorbar(v, y, xerr=[v - lo, hi - v], fmt="o", color="C0", ecolor="C0", capsize=3, lw=1.5)
        for i, (x, h) in enumerate(zip(v, hi)):
            ax.text(h + 0.004, i, f"{x:.3f}", va="center", fontsize=8.5)
        ax.set_yticks(y, list(df[label]))
        ax.invert_yaxis()
        if reference is not None:
            ax.axvline(reference, color="C2", ls=":", lw=1)
        span = float(np.nanmax(hi) - np.nanmin(lo)) or 0.1
        ax.set_xlim(float(np.nanmin(lo)) - 0.05 * span, float(np.nanmax(hi)) + 0.18 * span)
        ax.set_xlabel(xlabel + " (95 % interval)")
        ax.set_title(title)
    return fig


# ------------------------------------------------------------------ which head? (zero-shot vs probe)

def head_comparison(labs: Mapping[str, object], *, ties_lambdas: Sequence[float], ta_lambdas: Sequence[float],
                    densities: Sequence[float] = (0.1, 0.2, 0.3)) -> pd.DataFrame:
    """The same zoo with different frozen heads (e.g. {"zero-shot": lab, "probe": lab_probe}): base headroom and
    the spread of the merges. One row per (head, model): mean normalised test accuracy with its 95 % interval,
    for the base, averaging, task arithmetic and TIES ((k, λ) from validation); ``spread`` rows hold the paired
    interval of TIES − averaging. With probe heads the base is near the fine-tunes and the merges bunch up
    within noise; with zero-shot heads they separate (the reason the zoo's default is EMTA's head)."""
    from taskvec.widgets import sweeps

    rows = []
    for head, lab in labs.items():
        table = sweeps.with_references(lab, sweeps.ties_vs_baselines(lab, 0.2, ties_lambdas, ta_lambdas,
                                                                     densities=densities))
        for r in table.to_dict("records"):
            if r["method"].startswith("fine-tuned"):
                continue
            rows.append({"head": head, "model": r["method"], "normalized_accuracy": r["normalized_accuracy"],
                         "low": r["low"], "high": r["high"]})
        d = sweeps.method_differences(lab, table, [("TIES", "averaging")]).iloc[0]
        rows.append({"head": head, "model": "spread: TIES − averaging", "normalized_accuracy": d["diff"],
                     "low": d["low"], "high": d["high"]})
    return pd.DataFrame(rows)


def plot_head_comparison(df: pd.DataFrame, title: str = "Zero-shot prompt heads vs logistic-probe heads"):
    """Left: mean normalised accuracy (95 % intervals) of base, averaging, task arithmetic, TIES and the multi-task
    model per head kind. Right: the paired interval of TIES − averaging per head kind."""
    heads = list(dict.fromkeys(df["head"]))
    models = [m for m in dict.fromkeys(df["model"]) if not m.startswith("spread")]
    with style():
        fig, (ax, ax2) = new_figure(1, 2, figsize=(10.5, 0.5 * len(models) + 2.0),
                                    gridspec_kw={"width_ratios": [2.2, 1]})
        y = np.arange(len(models))
        for j, head in enumerate(heads):
            sub = df[(df["head"] == head)].set_index("model")
            v = np.array([sub.loc[m, "normalized_accuracy"] if m in sub.index else np.nan for m in models])
            lo = np.array([sub.loc[m, "low"] if m in sub.index else np.nan for m in models])
            hi = np.array([sub.loc[m, "high"] if m in sub.index else np.nan for m in models])
            off = (j - (len(heads) - 1) / 2) * 0.25
            ax.errorbar(v, y + off, xerr=[v - lo, hi - v], fmt="o", color=f"C{j}", capsize=3, label=f"{head} heads")
            s = df[(df["head"] == head) & df["model"].str.startswith("spread")].iloc[0]
            ax2.errorbar([s["normalized_accuracy"]], [j], xerr=[[s["normalized_accuracy"] - s["low"]],
                                                                [s["high"] - s["normalized_accuracy"]]],
                         fmt="o", color=f"C{j}", capsize=3)
        ax.set_yticks(y, models)
        ax.invert_yaxis()
        ax.axvline(1.0, color="C2", ls=":", lw=1)
        ax.set_xlabel("mean normalised test accuracy (95 % interval)")
        ax.legend(loc="lower left", fontsize=8.5)
        ax.set_title(title)
        ax2.axvline(0.0, color="0.4", lw=1)
        ax2.set_yticks(range(len(heads)), [f"{h} heads" for h in heads])
        ax2.set_ylim(-0.7, len(heads) - 0.3)
        ax2.invert_yaxis()
        ax2.set_xlabel("TIES − averaging (paired 95 % interval)")
        ax2.set_title("merge spread")
    return fig
