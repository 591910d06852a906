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

#: λ grid searched on validation data (EMTA: 0.0..1.0 in steps of 0.05; coarser here to stay fast).
NEGATION_LAMBDAS = (0.5, 1.0, 1.5, 2.0, 3.0)
ADDITION_LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


def _mean(d: Mapping[str, float], keys: Sequence[str]) -> float:
    return float(np.mean([d[k] for k in keys]))


# ------------------------------------------------------------------ negation (EMTA Table 1)

def negation_table(lab, lambdas: Sequence[float] = NEGATION_LAMBDAS, *, control_floor: float = 0.95) -> pd.DataFrame:
    """For each task: θ₀ − λτ_task with λ chosen on validation data as the largest target-accuracy drop that
    keeps control accuracy ≥ `control_floor` × base control accuracy (EMTA's criterion); test numbers."""
    if not lab.control:
        raise ParameterError(f"zoo {lab.zoo.name!r} has no control task to guard negation with")
    base_val, base_test = lab.base_accuracy("val"), lab.base_accuracy("test")
    ctrl = lab.control
    rows = []
    for task in lab.tasks:
        best, best_acc = 0.0, base_val[task]
        for lam in lambdas:
            acc = lab.accuracy(lab.apply({task: -lam}), split="val", tasks=[task] + ctrl)
            if _mean(acc, ctrl) >= control_floor * _mean(base_val, ctrl) and acc[task] < best_acc:
                best, best_acc = lam, acc[task]
        test = lab.accuracy(lab.apply({task: -best}) if best else None, split="test", tasks=[task] + ctrl)
        rows.append({"task": task, "lambda": best, "target_base": base_test[task],
                     "target_finetuned": lab.finetuned_accuracy("test")[task], "target_negated": test[task],
                     "control_base": _mean(base_test, ctrl), "control_negated": _mean(test, ctrl)})
    return pd.DataFrame(rows)


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
                          for n in names])
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1.22)
        ax.set_title(f"Negating τ_{task}: forget {task}, keep the rest")
        ax.legend(loc="upper right", ncol=2)
    return fig


# ------------------------------------------------------------------ addition (EMTA Fig. 3)

def best_lambda(lab, weights_for: Callable[[float], dict], tasks: Sequence[str],
                lambdas: Sequence[float] = ADDITION_LAMBDAS) -> tuple[float, dict]:
    """λ maximising mean normalised validation accuracy over `tasks`; returns (λ, test accuracies)."""
    scores = {}
    for lam in lambdas:
        acc = lab.accuracy(weights_for(lam), split="val", tasks=tasks)
        scores[lam] = _mean(lab.normalized(acc, "val"), tasks)
    lam = max(scores, key=scores.get)
    return lam, lab.accuracy(weights_for(lam), split="test")


def addition_curve(lab, lambdas: Sequence[float] = ADDITION_LAMBDAS) -> pd.DataFrame:
    """θ₀ + λ Σ_{i≤n} τ_i for n = 1..N tasks: mean normalised test accuracy on those n tasks (λ from validation)."""
    rows = []
    for n in range(1, len(lab.tasks) + 1):
        tasks = lab.tasks[:n]
        lam, acc = best_lambda(lab, lambda l, ts=tasks: lab.apply({t: l for t in ts}), tasks, lambdas)
        norm = lab.normalized(acc)
        rows.append({"n_tasks": n, "tasks": "+".join(tasks), "lambda": lam,
                     "normalized_accuracy": _mean(norm, tasks), "absolute_accuracy": _mean(acc, tasks),
                     "base_normalized": _mean(lab.normalized(lab.base_accuracy()), tasks)})
    return pd.DataFrame(rows)


def plot_addition_curve(df: pd.DataFrame):
    with style():
        fig, ax = new_figure(figsize=(6.0, 3.8))
        ax.plot(df["n_tasks"], df["normalized_accuracy"], "o-", color="C0", lw=2, label="θ₀ + λ Σ τ_i (one model)")
        ax.plot(df["n_tasks"], df["base_normalized"], "s--", color="0.55", label="base θ₀ (frozen heads)")
        ax.axhline(1.0, color="C2", ls=":", label="each fine-tuned model on its own task")
        ax.set_xticks(df["n_tasks"])
        ax.set_xlabel("number of task vectors added")
        ax.set_ylabel("normalised accuracy\n(acc / fine-tuned acc)")
        ax.set_title("Adding task vectors builds a multi-task model")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8.5)
    return fig


def per_task_bars(lab, acc: Mapping[str, float], label: str, *, color: str = "C0", title: str):
    """Test accuracy per task of one merged model (`acc`), between the base and each task's fine-tuned model."""
    base, ft = lab.base_accuracy(), lab.finetuned_accuracy()
    x = np.arange(len(lab.tasks))
    with style():
        fig, ax = new_figure(figsize=(7.5, 3.9))
        ax.bar(x - 0.27, [base[t] for t in lab.tasks], 0.27, color="0.65", label="base θ₀")
        ax.bar(x, [acc[t] for t in lab.tasks], 0.27, color=color, label=label)
        ax.bar(x + 0.27, [ft[t] for t in lab.tasks], 0.27, color="C2", label="fine-tuned on the task")
        ax.set_xticks(x, lab.tasks)
        ax.set_ylim(0, 1.22)
        ax.set_ylabel("test accuracy")
        ax.set_title(title)
        ax.legend(loc="upper right", ncol=3, fontsize=8.5)
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
    """One row per method: λ from validation, mean normalised and absolute test accuracy, per-task accuracy.

    `methods` maps a label to either weights_for(λ) or a fixed state dict (methods without λ)."""
    rows = []
    for label, spec in methods.items():
        if callable(spec):
            lam, acc = best_lambda(lab, spec, lab.tasks, lambdas)
        else:
            lam, acc = None, lab.accuracy(spec, split="test")
        norm = lab.normalized(acc)
        rows.append({"method": label, "lambda": lam, "normalized_accuracy": _mean(norm, lab.tasks),
                     "absolute_accuracy": _mean(acc, lab.tasks),
                     **{f"acc_{t}": acc[t] for t in lab.tasks + lab.control}})
    return pd.DataFrame(rows)


def plot_method_comparison(df: pd.DataFrame, title: str = "Merging methods on the zoo"):
    with style():
        fig, ax = new_figure(figsize=(7.0, 0.45 * len(df) + 1.6))
        y = np.arange(len(df))
        ax.barh(y, df["normalized_accuracy"], color="C0")
        for i, v in enumerate(df["normalized_accuracy"]):
            ax.text(v + 0.005, i, f"{v:.3f}", va="center", fontsize=9)
        labels = [m if lam is None or pd.isna(lam) else f"{m} (λ={lam:g})" for m, lam in zip(df["method"], df["lambda"])]
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        lo = max(0.0, float(df["normalized_accuracy"].min()) - 0.1)
        ax.set_xlim(lo, max(1.02, float(df["normalized_accuracy"].max()) + 0.05))
        ax.axvline(1.0, color="C2", ls=":", lw=1)
        ax.set_xlabel("mean normalised test accuracy (acc / fine-tuned acc)")
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
