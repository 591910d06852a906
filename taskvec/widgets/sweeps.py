"""TIES and DARE views over a `ZooLab`: ablations, method comparisons, drop-rate curves, delta ranges.

What notebooks 03 (TIES) and 04 (DARE) call, as plain functions of their
parameters returning DataFrames or Figures (sliders call the `*_view`s).

Merged task vectors are computed once per setting (trim density, drop rate)
and then scaled: for every method here the merged model is linear in λ,
θ(λ) = θ₀ + λ·τ_m, so a λ search costs evaluations, not merges. λ is chosen
on the validation split and reported on the test split (TIES, EMTA).

The TIES ablation removes exactly one step at a time, through `merge()`
parameters where they express it (density=1, consensus="count",
normalize=False) and through the per-tensor steps of `taskvec.methods`
(`trim_topk`, `elect_sign`, `agreement`) where they don't; the tests check
every variant against a per-tensor reference (`ties_tensor`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from taskvec._progress import progress
from taskvec.errors import ParameterError
from taskvec.viz import new_figure, style
from taskvec.widgets.plots import per_task_bars

#: λ grids searched on validation data. TIES' disjoint mean has the size of one task's update (λ ≈ 1);
#: task arithmetic sums n task vectors (λ ≈ 0.3-0.5, EMTA).
TIES_LAMBDAS = (0.8, 1.0, 1.2, 1.5, 2.0)
TASK_ARITHMETIC_LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
#: DARE Fig. 1's drop rates (the paper goes up to 0.99).
DARE_DROP_RATES = (0.0, 0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
#: DARE's delta range, as the official repository's README words it (yule-BUAA/MergeLM: SFT delta parameters
#: "within 0.005"); the ICML 2024 text (arXiv 2311.03099 v3) says "within 0.002" (`DARE_DELTA_RANGE_V3`).
DARE_DELTA_LIMIT = 0.005
DARE_DELTA_RANGE_V3 = 0.002

WeightsFor = Callable[[float], dict]


# ------------------------------------------------------------------ task vectors as plain tensors

def float_keys(lab) -> list[str]:
    """Names of the parameters that carry task vectors (floating point), in the base's order."""
    return [k for k, v in lab.base.items() if v.is_floating_point()]


def iter_task_deltas(lab, tasks: Sequence[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, stacked float32 deltas [n_tasks, *shape]) tensor by tensor, straight from the in-memory weights."""
    tasks = list(tasks or lab.tasks)
    for key in float_keys(lab):
        base = lab.base[key].to(torch.float32)
        yield key, torch.stack([lab.finetuned(t)[key].to(torch.float32) - base for t in tasks])


def sampled_task_vectors(lab, every: int = 1, tasks: Sequence[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """{task: {name: flattened τ entries}}: every entry (every=1) or a fixed strided sample of each tensor.

    The stride is made coprime with each tensor's row length, so a sample walks through all columns
    instead of repeating the same ones (an unbiased systematic sample for per-entry statistics such as
    sign-conflict fractions and magnitude histograms, `every` times cheaper to analyse)."""
    every = int(every)
    if every < 1:
        raise ParameterError(f"every must be a positive integer, got {every!r}")
    tasks = list(tasks or lab.tasks)
    out: dict[str, dict[str, torch.Tensor]] = {t: {} for t in tasks}
    for key, stacked in iter_task_deltas(lab, tasks):
        flat = stacked.reshape(len(tasks), -1)
        step = every
        row = stacked.shape[-1] if stacked.dim() > 1 else 1
        while step > 1 and math.gcd(step, row) != 1:
            step += 1
        if step > 1 and flat.shape[1] >= 2 * step:
            flat = flat[:, ::step]
        for i, t in enumerate(tasks):
            out[t][key] = flat[i].clone()
    return out


def delta_of(lab, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """θ − θ₀ over the float parameters (float32): turns a merge at λ = 1 into its merged task vector."""
    return {k: weights[k].to(torch.float32) - lab.base[k].to(torch.float32) for k in float_keys(lab)}


def scaled(lab, delta: Mapping[str, torch.Tensor]) -> WeightsFor:
    """weights_for(λ) = θ₀ + λ·delta (in the base's dtypes): a λ slider without re-merging."""
    def weights(lam: float) -> dict:
        out = dict(lab.base)
        for k, d in delta.items():
            out[k] = (lab.base[k].to(torch.float32) + float(lam) * d).to(lab.base[k].dtype)
        return out

    return weights


def delta_norm(delta: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(torch.sum(d.to(torch.float32) ** 2)) for d in delta.values()))


# ------------------------------------------------------------------ TIES, step by step

@dataclass(frozen=True)
class TiesVariant:
    """One row of the TIES ablation (TIES paper, Table 6 "remove one component at a time").

    trim: keep the top-k |τ| of each tensor (False: keep everything, k = 1).
    elect: "mass" (γ = sign Σ τ̂, the paper), "count" (γ = sign Σ sign τ̂, majority vote) or None
        (no election: every kept entry counts, whatever its sign).
    mean: "disjoint" (divide by the number of entries that count, zeros never dilute) or "plain"
        (divide by the number of tasks n, as a plain average of the trimmed vectors does).
    """

    label: str
    trim: bool = True
    elect: str | None = "mass"
    mean: str = "disjoint"

    def __post_init__(self):
        if self.elect not in ("mass", "count", None):
            raise ParameterError(f"elect must be 'mass', 'count' or None, got {self.elect!r}")
        if self.mean not in ("disjoint", "plain"):
            raise ParameterError(f"mean must be 'disjoint' or 'plain', got {self.mean!r}")


TIES_ABLATIONS = (
    TiesVariant("TIES: trim + elect (mass) + disjoint mean"),
    TiesVariant("− trim (every entry kept)", trim=False),
    TiesVariant("− elect (no sign election)", elect=None),
    TiesVariant("elect by count instead of mass", elect="count"),
    TiesVariant("plain mean instead of disjoint", mean="plain"),
)


def trimmed_task_vectors(lab, density: float, tasks: Sequence[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """{task: trim_k(τ_task)}: TIES step 1 alone, per tensor (top-k |τ| kept, the rest zeroed).

    Computed as `merge(method="ties")` of that one model (a single model elects its own signs and its
    disjoint mean is itself), which runs the library's fused top-k kernel: the same values as
    `taskvec.methods.trim_topk`, several times faster on a whole model."""
    from taskvec.methods import check_density

    density = check_density(density)
    return {t: delta_of(lab, lab.merge("ties", tasks=[t], density=density, lam=1.0))
            for t in (tasks or lab.tasks)}


def combine_ties(stacked: torch.Tensor, variant: TiesVariant = TIES_ABLATIONS[0]) -> torch.Tensor:
    """TIES steps 2-3 on one tensor's stacked (already trimmed or not) task vectors [n, ...]: elect a sign
    per entry (or not), then average the entries that count (disjoint) or divide by n (plain)."""
    from taskvec.methods import agreement, elect_sign

    n = stacked.shape[0]
    if variant.elect is None:
        counts = (stacked != 0).to(torch.float32)
    else:
        counts = agreement(stacked, elect_sign(stacked, variant.elect))
    total = (stacked * counts).sum(dim=0)
    if variant.mean == "disjoint":
        return total.div_(counts.sum(dim=0).clamp_(min=1))
    return total.div_(n)


def ties_tensor(stacked: torch.Tensor, density: float, variant: TiesVariant = TIES_ABLATIONS[0]) -> torch.Tensor:
    """The merged τ_m of one tensor from raw stacked task vectors [n, ...], with the steps `variant` keeps
    (the per-tensor reference: `trim_topk`, `elect_sign`, `agreement` from `taskvec.methods`)."""
    from taskvec.methods import trim_topk

    kept = torch.stack([trim_topk(d, density) for d in stacked]) if variant.trim else stacked.to(torch.float32)
    return combine_ties(kept, variant)


def ties_delta(lab, density: float = 0.2, variant: TiesVariant = TIES_ABLATIONS[0],
               tasks: Sequence[str] | None = None, *, trimmed: Mapping[str, Mapping[str, torch.Tensor]] | None = None
               ) -> dict[str, torch.Tensor]:
    """Merged task vector τ_m of `variant` over the whole model (θ = θ₀ + λ τ_m).

    Variants that `merge(method="ties")` can express run there (fused kernels): no trim = density 1,
    count election = consensus="count", plain mean = normalize=False (the agreeing sum) divided by n.
    Without election, the trimmed vectors (`trimmed`, or `trimmed_task_vectors`) are combined here with
    `combine_ties`. `tests/test_widgets_sweeps.py` checks every variant against `ties_tensor`."""
    from taskvec.methods import check_density

    density = check_density(density)
    tasks = list(tasks or lab.tasks)
    if variant.elect is not None:
        params = {"density": density if variant.trim else 1.0, "consensus": variant.elect,
                  "normalize": variant.mean == "disjoint"}
        delta = delta_of(lab, lab.merge("ties", tasks=tasks, lam=1.0, **params))
        if variant.mean == "plain":
            for d in delta.values():
                d.div_(len(tasks))
        return delta
    if not variant.trim:
        return {k: _combine_active_rows(stacked, variant) for k, stacked in iter_task_deltas(lab, tasks)}
    trimmed = trimmed if trimmed is not None else trimmed_task_vectors(lab, density, tasks)
    return {k: _combine_active_rows(torch.stack([trimmed[t][k] for t in tasks]), variant) for k in float_keys(lab)}


def _combine_active_rows(stacked: torch.Tensor, variant: TiesVariant) -> torch.Tensor:
    """`combine_ties` on the rows some task changed; other rows merge to 0 anyway. Fine-tuning touches only
    the embedding rows of tokens in its data (MiniLM: half of all parameters, ~99% of them unchanged)."""
    if stacked.dim() != 3:
        return combine_ties(stacked, variant)
    active = stacked.ne(0).any(dim=2).any(dim=0)
    if int(active.sum()) > stacked.shape[1] // 2:
        return combine_ties(stacked, variant)
    out = torch.zeros(stacked.shape[1:], dtype=torch.float32)
    out[active] = combine_ties(stacked[:, active], variant)
    return out


# ------------------------------------------------------------------ choosing λ and comparing

def _mean(d: Mapping[str, float], keys: Sequence[str]) -> float:
    return float(np.mean([d[k] for k in keys]))


def _candidates(label: str, spec) -> list[tuple[dict, WeightsFor | None, tuple, dict | None]]:
    """A method spec as a list of (params, weights_for, λ grid, fixed weights) to choose from on validation."""
    if isinstance(spec, Mapping):
        return [({}, None, (), spec)]
    if isinstance(spec, tuple) and len(spec) == 2 and callable(spec[0]):
        spec = [({}, spec[0], spec[1])]
    if isinstance(spec, list) and all(isinstance(c, tuple) and len(c) == 3 and callable(c[1]) for c in spec):
        out = []
        for params, weights_for, lambdas in spec:
            if not lambdas:
                raise ParameterError(f"{label}: empty λ grid")
            out.append((dict(params), weights_for, tuple(float(l) for l in lambdas), None))
        return out
    raise ParameterError(f"{label}: expected (weights_for, lambdas), a list of (params, weights_for, lambdas) "
                         f"or a state dict, got {type(spec).__name__}")


def _test_columns(lab, outcomes: Mapping[str, torch.Tensor], ft: Mapping[str, float], n_boot: int, seed: int) -> dict:
    """A model's test columns from its per-example outcomes: mean normalised accuracy with its interval
    (stratified bootstrap), mean absolute accuracy, acc_<task> (fine-tuned and control tasks), norm_<task>."""
    from taskvec.eval.intervals import mean_accuracy_interval

    acc = {t: float(c.float().mean()) for t, c in outcomes.items()}
    norm = lab.normalized({t: acc[t] for t in lab.tasks})
    iv = mean_accuracy_interval({t: outcomes[t] for t in lab.tasks}, normalizer={t: ft[t] for t in lab.tasks},
                                n_boot=n_boot, seed=seed)
    return {"normalized_accuracy": iv.estimate, "low": iv.low, "high": iv.high,
            "absolute_accuracy": _mean(acc, lab.tasks),
            **{f"acc_{t}": acc[t] for t in lab.tasks + lab.control if t in acc},
            **{f"norm_{t}": norm[t] for t in lab.tasks}}


def evaluate_methods(lab, methods: Mapping[str, object], *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per method: hyperparameters chosen on validation (mean normalised accuracy over the tasks),
    test accuracy with a 95 % interval. The one engine behind every method table of the notebooks and demo.

    `methods` maps a label to
    - (weights_for(λ), λ grid): λ searched on validation (a one-value grid is used as given);
    - [(params, weights_for(λ), λ grid), ...]: every (params, λ) searched on validation, e.g. TIES' density k
      × λ grid (the chosen params become columns);
    - a fixed state dict (no λ, e.g. averaging).
    Columns: method, lambda, [params], val_normalized, normalized_accuracy with low/high (stratified bootstrap
    over each task's test examples), absolute_accuracy, acc_<task> (fine-tuned and control tasks), norm_<task>.
    The test outcomes of every row are kept in ``df.attrs["correct"]`` for `method_differences`."""
    ft = lab.finetuned_accuracy()
    rows, correct = [], {}
    for label, spec in progress(methods.items(), desc="methods", total=len(methods)):
        val_score, lam, params = None, None, {}
        options = _candidates(label, spec)
        if options[0][3] is not None:
            weights = options[0][3]
        else:
            scored = []
            for opt_params, weights_for, lambdas in ((o[0], o[1], o[2]) for o in options):
                if len(options) == 1 and len(lambdas) == 1:
                    scored.append((None, opt_params, weights_for, lambdas[0]))
                    continue
                for l in lambdas:
                    acc = lab.accuracy(weights_for(l), split="val", tasks=lab.tasks)
                    scored.append((_mean(lab.normalized(acc, "val"), lab.tasks), opt_params, weights_for, l))
            val_score, params, weights_for, lam = max(scored, key=lambda r: -1.0 if r[0] is None else r[0])
            weights = weights_for(lam)
        outcomes = lab.correct(weights, split="test", tasks=lab.tasks + lab.control)
        correct[label] = outcomes
        rows.append({"method": label, "lambda": lam, **params, "val_normalized": val_score,
                     **_test_columns(lab, outcomes, ft, n_boot, seed)})
    df = pd.DataFrame(rows)
    df.attrs["correct"] = correct
    return df


def method_differences(lab, table: pd.DataFrame, pairs: Sequence[tuple[str, str]] | None = None, *,
                       n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Paired-bootstrap 95 % intervals of the difference in mean normalised test accuracy, a − b, for each
    pair of methods of `table` (default: every method against the next one in the table's order), from the
    per-example outcomes `evaluate_methods` kept. `verdict` is "a > b", "a < b", or "within noise" exactly
    when the interval contains 0."""
    from taskvec.eval.intervals import difference_verdict, paired_bootstrap

    correct = table.attrs.get("correct")
    if not correct:
        raise ParameterError("method_differences needs a table from evaluate_methods (it keeps the test outcomes)")
    labels = list(table["method"])
    pairs = list(pairs) if pairs is not None else list(zip(labels[:-1], labels[1:]))
    ft = lab.finetuned_accuracy()
    rows = []
    for a, b in pairs:
        for m in (a, b):
            if m not in correct:
                raise ParameterError(f"method {m!r} is not in the table; methods: {labels}")
        iv = paired_bootstrap({t: correct[a][t] for t in lab.tasks}, {t: correct[b][t] for t in lab.tasks},
                              normalizer={t: ft[t] for t in lab.tasks}, n_boot=n_boot, seed=seed)
        rows.append({"a": a, "b": b, "diff": iv.estimate, "low": iv.low, "high": iv.high,
                     "verdict": difference_verdict(iv)})
    return pd.DataFrame(rows)


def reference_rows(lab, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """The base θ₀, the multi-task model (when the zoo has one) and the fine-tuned models (each on its own
    task) in `evaluate_methods`' columns."""
    ft = lab.finetuned_accuracy()
    refs = [("base θ₀ (no merge)", "base")]
    if getattr(lab, "has_multitask", False):
        refs.append(("multi-task (trained jointly)", "multitask"))
    refs.append(("fine-tuned (one model per task)", "finetuned"))
    rows, correct = [], {}
    for label, which in refs:
        outcomes = lab.reference_correct(which, "test")
        correct[label] = outcomes
        rows.append({"method": label, "lambda": None, "val_normalized": None,
                     **_test_columns(lab, outcomes, ft, n_boot, seed)})
    df = pd.DataFrame(rows)
    df.attrs["correct"] = correct
    return df


def with_references(lab, table: pd.DataFrame) -> pd.DataFrame:
    """`table` followed by `reference_rows`, per-example outcomes of both kept (for `method_differences`)."""
    refs = reference_rows(lab)
    out = pd.concat([table, refs], ignore_index=True)
    out.attrs["correct"] = {**table.attrs.get("correct", {}), **refs.attrs["correct"]}
    return out


def alignment(lab, deltas: Mapping[str, Mapping[str, torch.Tensor]], tasks: Sequence[str] | None = None
              ) -> dict[str, dict[str, float]]:
    """{label: {task: cos(τ_m, τ_task)}} for several merged vectors τ_m in one pass over the task vectors:
    how much of each task's update direction a merge keeps."""
    tasks = list(tasks or lab.tasks)
    labels = list(deltas)
    dots = np.zeros((len(labels), len(tasks)))
    sq_m, sq_tau = np.zeros(len(labels)), np.zeros(len(tasks))
    for key, stacked in iter_task_deltas(lab, tasks):
        flat = stacked.reshape(len(tasks), -1)
        sq_tau += (flat * flat).sum(dim=1).double().numpy()
        for j, label in enumerate(labels):
            m = deltas[label][key].reshape(-1)
            sq_m[j] += float(torch.dot(m, m))
            dots[j] += (flat @ m).double().numpy()
    denom = np.sqrt(np.outer(sq_m, sq_tau))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, dots / np.where(denom > 0, denom, 1.0), np.nan)
    return {label: dict(zip(tasks, map(float, cos[j]))) for j, label in enumerate(labels)}


def ties_ablation(lab, density: float = 0.2, lambdas: Sequence[float] = TIES_LAMBDAS,
                  variants: Sequence[TiesVariant] = TIES_ABLATIONS) -> pd.DataFrame:
    """TIES with one step removed or swapped at a time (TIES Table 6), λ chosen on validation for each.

    Every variant searches the same distances from θ₀: its τ_m is rescaled to the norm of full TIES' τ_m
    before λ, so that a variant whose mean is simply smaller (a plain mean divides by n) is not penalised
    by a grid that never reaches its best λ. The `lambda` column is the coefficient actually applied
    to the variant's own τ_m; `norm` is ‖τ_m‖; cos_<task> is cos(τ_m, τ_task) and mean_cos their mean
    (how much of each task's update direction survives the merge)."""
    trimmed = trimmed_task_vectors(lab, density) if any(v.elect is None and v.trim for v in variants) else None
    deltas = {v.label: ties_delta(lab, density, v, trimmed=trimmed) for v in progress(variants, desc="TIES variants")}
    del trimmed
    ref = delta_norm(deltas[variants[0].label])
    methods, norms = {}, {}
    for v in variants:
        norms[v.label] = delta_norm(deltas[v.label])
        factor = ref / norms[v.label] if norms[v.label] else 1.0
        methods[v.label] = (scaled(lab, deltas[v.label]), [lam * factor for lam in lambdas])
    cosines = alignment(lab, deltas)
    df = evaluate_methods(lab, methods)
    df.insert(1, "density", float(density))
    df.insert(3, "norm", df["method"].map(norms))
    for t in lab.tasks:
        df[f"cos_{t}"] = df["method"].map(lambda m, t=t: cosines[m][t])
    df["mean_cos"] = df[[f"cos_{t}" for t in lab.tasks]].mean(axis=1)
    df["trim"] = [v.trim for v in variants]
    df["elect"] = [v.elect or "none" for v in variants]
    df["mean"] = [v.mean for v in variants]
    return df


def ties_vs_baselines(lab, density: float = 0.2, ties_lambdas: Sequence[float] = TIES_LAMBDAS,
                      ta_lambdas: Sequence[float] = TASK_ARITHMETIC_LAMBDAS, *, densities: Sequence[float] | None = None,
                      include_ties: bool = True) -> pd.DataFrame:
    """TIES (`merge(method="ties")`), task arithmetic (θ₀ + λ Σ τ_i) and averaging (Σ θ_i / n), all tasks.

    TIES' λ — and its density k when `densities` is given (the papers' protocol: k and λ chosen together on
    validation) — and task arithmetic's λ are chosen on the validation split. include_ties=False leaves TIES
    out (when its row is already measured, e.g. by `ties_ablation`)."""
    methods: dict = {}
    if include_ties:
        if densities:
            methods["TIES"] = [({"density": float(k)}, scaled(lab, delta_of(lab, lab.merge("ties", density=k, lam=1.0))),
                                ties_lambdas) for k in densities]
        else:
            ties = delta_of(lab, lab.merge("ties", density=density, lam=1.0))
            methods[f"TIES (k = {density:g})"] = (scaled(lab, ties), ties_lambdas)
    methods["task arithmetic"] = (scaled(lab, delta_of(lab, lab.merge("task_arithmetic", lam=1.0))), ta_lambdas)
    methods["averaging"] = lab.merge("linear")
    return evaluate_methods(lab, methods)


def ties_view(lab, density: float = 0.2, lam: float = 1.0):
    """Per-task test accuracy of TIES at (density k, λ) next to the base and each fine-tuned model.

    The merged τ_m of the last few densities is kept on the lab, so moving the λ slider costs one evaluation."""
    from taskvec.methods import check_density

    cache = lab.__dict__.setdefault("_ties_view_deltas", {})
    key = round(check_density(density), 6)
    if key not in cache:
        if len(cache) >= 3:
            cache.pop(next(iter(cache)))
        cache[key] = delta_of(lab, lab.merge("ties", density=density, lam=1.0))
    acc = lab.accuracy(scaled(lab, cache[key])(lam), split="test", tasks=lab.tasks)
    norm = _mean(lab.normalized(acc), lab.tasks)
    return per_task_bars(lab, acc, f"TIES k = {density:.2f}, λ = {lam:.2f}", color="C1",
                               title=f"One TIES-merged model for all tasks (normalised accuracy {norm:.3f})")


def plot_ties_ablation(df: pd.DataFrame, title: str = "TIES ablation: remove one step at a time"):
    """Bars per variant, full TIES first and highlighted: mean normalised test accuracy, and (when the
    table has it) the mean cosine between the merged vector and each task vector."""
    panels = [("normalized_accuracy", "mean normalised test accuracy\n(acc / fine-tuned acc)")]
    if "mean_cos" in df:
        panels.append(("mean_cos", r"mean over tasks of $\cos(\tau_m, \tau_i)$" + "\n(task direction kept)"))
    with style():
        fig, axes = new_figure(1, len(panels), figsize=(5.2 * len(panels) + 3.2, 0.5 * len(df) + 1.9), sharey=True)
        axes = np.atleast_1d(axes)
        y = np.arange(len(df))
        colors = ["C1" if i == 0 else "C0" for i in range(len(df))]
        for ax, (col, xlabel) in zip(axes, panels):
            vals = df[col].astype(float)
            ax.barh(y, vals, color=colors)
            span = float(vals.max() - vals.min()) or 0.05
            for i, v in enumerate(vals):
                ax.text(v + 0.02 * span, i, f"{v:.3f}", va="center", fontsize=9)
            lo = max(0.0, float(vals.min()) - 1.5 * span)
            ax.set_xlim(lo, float(vals.max()) + 0.8 * span)
            ax.axvline(float(vals.iloc[0]), color="C1", ls="--", lw=1)
            ax.set_xlabel(xlabel)
        axes[0].set_yticks(y, [f"{m}  (λ={lam:.2g})" for m, lam in zip(df["method"], df["lambda"])])
        axes[0].invert_yaxis()
        fig.suptitle(title)
    return fig


# ------------------------------------------------------------------ DARE

def delta_range(lab, tasks: Sequence[str] | None = None, sample_every: int = 1) -> pd.DataFrame:
    """Per task: how large the deltas are (DARE's precondition: SFT deltas are small — "within 0.002" in the
    ICML 2024 text, "within 0.005" in the official repository's README).

    Exact over every entry: ‖τ‖, max |τ|, fraction unchanged (τ = 0), fractions above 0.002 and 0.005.
    Quantiles of |τ| among the changed entries (p50, p90, p99) on every `sample_every`-th entry (1: all)."""
    tasks = list(tasks or lab.tasks)
    sq = {t: 0.0 for t in tasks}
    mx = {t: 0.0 for t in tasks}
    zero = {t: 0 for t in tasks}
    above = {t: 0 for t in tasks}
    above_v3 = {t: 0 for t in tasks}
    n = 0
    samples: dict[str, list[torch.Tensor]] = {t: [] for t in tasks}
    for _, stacked in iter_task_deltas(lab, tasks):
        flat = stacked.reshape(len(tasks), -1).abs_()
        n += flat.shape[1]
        for i, t in enumerate(tasks):
            a = flat[i]
            sq[t] += float(torch.dot(a, a))
            mx[t] = max(mx[t], float(a.max())) if a.numel() else mx[t]
            zero[t] += int((a == 0).sum())
            above[t] += int((a > DARE_DELTA_LIMIT).sum())
            above_v3[t] += int((a > DARE_DELTA_RANGE_V3).sum())
            s = a[::sample_every] if sample_every > 1 else a
            samples[t].append(s[s > 0])
    rows = []
    for t in tasks:
        nz = torch.cat(samples[t]) if samples[t] else torch.zeros(0)
        q = (torch.quantile(nz[torch.linspace(0, len(nz) - 1, min(len(nz), 1_000_000)).long()].double(),
                            torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
             if len(nz) else [float("nan")] * 3)
        rows.append({"task": t, "numel": n, "norm": math.sqrt(sq[t]), "max_abs": mx[t],
                     "frac_unchanged": zero[t] / n, "frac_above_0.002": above_v3[t] / n,
                     "frac_above_0.005": above[t] / n,
                     "p50_abs_changed": q[0], "p90_abs_changed": q[1], "p99_abs_changed": q[2]})
    return pd.DataFrame(rows)


def plot_delta_range(df: pd.DataFrame):
    """Per task, the span of |τ| among changed entries (median, p90, p99, max) against DARE's 0.005 line."""
    from matplotlib.ticker import NullFormatter

    with style():
        fig, ax = new_figure(figsize=(8.6, 0.6 * len(df) + 1.9))
        y = np.arange(len(df))
        ax.hlines(y, df["p50_abs_changed"], df["max_abs"], color="C0", lw=2.5, label="median → max")
        for col, marker, label in (("p50_abs_changed", "o", "median"), ("p90_abs_changed", "s", "90th percentile"),
                                   ("p99_abs_changed", "D", "99th percentile"), ("max_abs", "|", "max")):
            ax.plot(df[col], y, marker, ms=8 if marker != "|" else 16, mew=2, ls="none", label=label)
        ax.axvline(DARE_DELTA_RANGE_V3, color="C3", ls=":", lw=1.2, label="0.002 (DARE, ICML 2024 text)")
        ax.axvline(DARE_DELTA_LIMIT, color="C3", ls="--", lw=1.2, label="0.005 (DARE repository README)")
        ax.set_xscale("log")
        lo = float(df["p50_abs_changed"].min()) / 1.5
        hi = max(float(df["max_abs"].max()), DARE_DELTA_LIMIT) * 1.6
        ax.set_xlim(lo, hi)
        ticks = [t for t in (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1) if lo <= t <= hi]
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_yticks(y, df["task"])
        ax.set_ylim(len(df) - 0.5, -0.5)
        ax.set_xlabel(r"$|\tau|$ of the changed entries (log scale)")
        ax.set_title("How large are the fine-tuning deltas?" + (" (all below 0.002)"
                     if (df["max_abs"] <= DARE_DELTA_RANGE_V3).all() else " (all below 0.005)"
                     if (df["max_abs"] <= DARE_DELTA_LIMIT).all() else ""))
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8.5, frameon=False)
    return fig


def task_subset(lab, tasks: Sequence[str] | None):
    """`lab` restricted to the fine-tuned `tasks` (same weights, heads, data and evaluation subsets; the
    control and held-out tasks kept): every view, merge and reference of the returned lab covers only those
    tasks. Fast mode's DARE sweeps and merges run on a few tasks instead of fewer examples per task.
    None or all of lab's tasks: `lab` itself."""
    import copy

    if tasks is None or list(tasks) == list(lab.tasks):
        return lab
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in lab.tasks]
    if unknown or not tasks or len(set(tasks)) != len(tasks):
        raise ParameterError(f"tasks must be distinct fine-tuned tasks of the lab {lab.tasks}, got {tasks}")
    sub = copy.copy(lab)  # shares the in-memory weights; its reference outcomes are cached separately
    sub.tasks = tasks
    return sub


def dare_curve(lab, tasks: Sequence[str] | None = None, ps: Sequence[float] = DARE_DROP_RATES,
               rescale: Sequence[bool] = (True, False), seed: int = 0) -> pd.DataFrame:
    """DARE Fig. 1 on the zoo: for each task, θ₀ + DARE(τ_task, p) on that task's test split, for every p,
    with and without the 1/(1−p) rescale (`taskvec.analysis.dare_sweep`).

    Tidy rows: task, drop_rate, rescale, accuracy, normalized (acc / fine-tuned acc), base_accuracy,
    finetuned_accuracy and dare_sweep's weight statistics (cosine_to_tau, norm_ratio, frac_kept).
    p = 0 drops nothing: its row is the fine-tuned model itself (not evaluated twice).
    The per-example test outcomes are kept in ``df.attrs["correct"]``: {(task, drop_rate, rescale): bool
    tensor, (task, "base"): ..., (task, "finetuned"): ...}, for paired intervals (`dare_difference`).
    Only the requested tasks are evaluated (with all of lab's tasks, the lab's cached reference outcomes are
    used); tensors that fine-tuning left unchanged (τ = 0, e.g. frozen word embeddings) are not re-drawn:
    dropping zeros gives zeros."""
    from taskvec.analysis import dare_sweep
    from taskvec.methods import check_drop_rate

    tasks = list(tasks or lab.tasks)
    ps = [check_drop_rate(p) for p in ps]
    if not ps:
        raise ParameterError("dare_curve needs at least one drop rate")
    rescale = [bool(r) for r in rescale]
    if not rescale:
        raise ParameterError("rescale must list at least one of True/False")
    unknown = [t for t in tasks if t not in lab.tasks]
    if unknown:
        raise ParameterError(f"no fine-tuned model for {unknown}; tasks: {lab.tasks}")
    references = sorted(tasks) == sorted(lab.tasks)
    correct: dict = {}
    frames = []
    for t in progress(tasks, desc="DARE curves"):
        if references:
            base_c = lab.reference_correct("base", "test")[t]
            ft_c = lab.reference_correct("finetuned", "test")[t]
        else:
            base_c = lab.correct(None, split="test", tasks=[t])[t]
            ft_c = lab.correct(lab.finetuned(t), split="test", tasks=[t])[t]
        correct[(t, "base")], correct[(t, "finetuned")] = base_c, ft_c
        base_acc, ft_acc = float(base_c.float().mean()), float(ft_c.float().mean())
        # τ as plain tensors, computed once: every grid point re-reads the whole vector. All-zero tensors are
        # left out (the sweep then takes them from the base unchanged, exactly what dropping zeros gives).
        tau = {}
        for k in float_keys(lab):
            d = lab.finetuned(t)[k].to(torch.float32) - lab.base[k].to(torch.float32)
            if bool(d.any()):
                tau[k] = d
        grid = [p for p in ps if p != 0]
        parts = []
        for r in rescale:
            if 0.0 in ps:  # nothing dropped: θ₀ + τ is the fine-tuned model
                parts.append(pd.DataFrame([{"drop_rate": 0.0, "rescale": r, "norm_ratio": 1.0, "rel_norm_error": 0.0,
                                            "cosine_to_tau": 1.0, "rel_l2_error": 0.0, "frac_kept": 1.0,
                                            "accuracy": ft_acc}]))
                correct[(t, 0.0, r)] = ft_c
            if not grid:
                continue
            outcomes: list[torch.Tensor] = []

            def evaluate(state_dict, t=t, outcomes=outcomes):
                c = lab.correct(state_dict, split="test", tasks=[t])[t]
                outcomes.append(c)
                return {"accuracy": float(c.float().mean())}

            sweep = dare_sweep(tau, ps=grid, rescale=(r,), eval_fn=evaluate,
                               base=lab.base, seed=seed, eval_base=False, name=t)
            # dare_sweep evaluates its grid in order, one call per drop rate
            for p, c in zip(sweep.data["drop_rate"], outcomes):
                correct[(t, float(p), r)] = c
            parts.append(sweep.data.assign(rescale=r))
        d = pd.concat(parts, ignore_index=True)
        d["drop_rate"] = d["drop_rate"].astype(float)
        d["rescale"] = d["rescale"].astype(bool)
        d = d.sort_values(["rescale", "drop_rate"], ascending=[False, True], ignore_index=True)
        d.insert(0, "task", t)
        d["base_accuracy"] = base_acc
        d["finetuned_accuracy"] = ft_acc
        d["normalized"] = d["accuracy"] / ft_acc
        frames.append(d)
        del tau
    df = pd.DataFrame(pd.concat(frames, ignore_index=True))
    df.attrs["correct"] = correct
    return df


def dare_difference(curve: pd.DataFrame, a, b, *, tasks: Sequence[str] | None = None, n_boot: int = 2000,
                    seed: int = 0):
    """Paired-bootstrap 95 % interval (`taskvec.eval.intervals.Interval`) of the difference in mean
    normalised test accuracy (accuracy / fine-tuned accuracy, averaged over the curve's tasks), a − b, where
    a and b are (drop_rate, rescale) points of `dare_curve`, or "base" / "finetuned". Both are scored on the
    same test examples, resampled together within each task."""
    from taskvec.eval.intervals import paired_bootstrap

    correct = curve.attrs.get("correct")
    if not correct:
        raise ParameterError("dare_difference needs a table from dare_curve (it keeps the test outcomes)")
    tasks = list(tasks or dict.fromkeys(curve["task"]))

    def key(t, point):
        if isinstance(point, str):
            return (t, point)
        p, r = point
        return (t, float(p), bool(r))

    for point in (a, b):
        missing = [t for t in tasks if key(t, point) not in correct]
        if missing:
            raise ParameterError(f"the curve has no point {point!r} for tasks {missing}")
    ft = {t: float(correct[(t, "finetuned")].float().mean()) for t in tasks}
    return paired_bootstrap({t: correct[key(t, a)] for t in tasks}, {t: correct[key(t, b)] for t in tasks},
                            normalizer=ft, n_boot=n_boot, seed=seed)


def _drop_axis(ax, ps):
    """x = −log10(1 − p): spreads 0.9 / 0.99 apart (where DARE's claim lives) while keeping p labels."""
    ticks = [p for p in (0.0, 0.5, 0.9, 0.99) if min(ps) <= p <= max(ps)]
    ax.set_xticks([-math.log10(1 - p) for p in ticks], [f"{p:g}" for p in ticks])
    ax.set_xlabel("drop rate p (fraction of delta entries reset to θ₀)")


def plot_dare_curve(df: pd.DataFrame):
    """DARE Fig. 1: one panel per task, accuracy vs drop rate with and without rescale, base and fine-tuned."""
    tasks = list(dict.fromkeys(df["task"]))
    cols = min(len(tasks), 4)   # 8 tasks: two rows of four, not one 4,000-pixel strip
    rows = -(-len(tasks) // cols)
    with style():
        fig, axes = new_figure(rows, cols, figsize=(3.3 * cols + 0.6, 3.5 * rows + 0.4), sharey=True)
        axes = np.atleast_1d(axes).ravel()
        for ax in axes[len(tasks):]:
            ax.set_visible(False)
        for ax, t in zip(axes, tasks):
            d = df[df["task"] == t]
            for r, color, label in ((True, "C0", "DARE: drop + rescale 1/(1−p)"), (False, "C3", "drop only (no rescale)")):
                s = d[d["rescale"] == r].sort_values("drop_rate")
                if len(s):
                    ax.plot(-np.log10(1 - s["drop_rate"]), s["accuracy"], "o-", color=color, lw=2, label=label)
            ax.axhline(d["finetuned_accuracy"].iloc[0], color="C2", ls=":", lw=1.3, label="fine-tuned (p = 0)")
            ax.axhline(d["base_accuracy"].iloc[0], color="0.45", ls="--", lw=1.1, label="base θ₀ (p = 1)")
            _drop_axis(ax, list(d["drop_rate"]))
            ax.set_xlabel("drop rate p")
            ax.set_title(t)
        for ax in axes[::cols]:
            ax.set_ylabel("test accuracy")
        axes[0].legend(loc="lower left", fontsize=7.5)
        fig.suptitle("DARE: accuracy vs drop rate of the delta parameters (DARE Fig. 1 on the zoo)",
                     y=1.07 if rows == 1 else 1.02)
    return fig


def dare_merges(lab, p: float = 0.9, density: float = 0.2, ties_lambdas: Sequence[float] = TIES_LAMBDAS,
                ta_lambdas: Sequence[float] = TASK_ARITHMETIC_LAMBDAS, seed: int = 0, *,
                search_dare_lambda: bool = True, pairs: Sequence[str] = ("task_arithmetic", "ties")) -> pd.DataFrame:
    """dare_linear and dare_ties at drop rate p next to task arithmetic and TIES (k = density), all tasks.

    dare_linear = DARE then task arithmetic (λ grid of task arithmetic); dare_ties = DARE then TIES'
    election and disjoint mean (λ grid of TIES). search_dare_lambda=False gives each DARE merge the λ its
    plain counterpart got on validation (DARE's rescale keeps E[τ̃] = τ, so the same λ applies; fewer
    evaluations). The test outcomes of every row are kept in ``df.attrs["correct"]`` (`method_differences`).
    `pairs` picks the (plain, DARE) pairs: "task_arithmetic" (with dare_linear) and/or "ties" (with dare_ties).
    To merge only some of the lab's tasks, pass ``task_subset(lab, tasks)``."""
    plain = {"task_arithmetic": ("task arithmetic", {}, ta_lambdas),
             "ties": (f"TIES (k = {density:g})", {"density": density}, ties_lambdas)}
    pairs = list(pairs)
    if not pairs or any(m not in plain for m in pairs) or len(set(pairs)) != len(pairs):
        raise ParameterError(f"pairs must list distinct entries of {list(plain)}, got {pairs}")
    plain = {m: plain[m] for m in pairs}
    dare = {"task_arithmetic": ("dare_linear", f"dare_linear (p = {p:g})"),
            "ties": ("dare_ties", f"dare_ties (p = {p:g})")}
    frames = []
    for method, (label, params, lambdas) in progress(plain.items(), desc="merges", total=len(plain)):
        row = evaluate_methods(lab, {label: (scaled(lab, delta_of(lab, lab.merge(method, lam=1.0, **params))), lambdas)})
        dare_method, dare_label = dare[method]
        merged = lab.merge(dare_method, lam=1.0, p=p, seed=seed)
        dare_lambdas = lambdas if search_dare_lambda else (float(row["lambda"].iloc[0]),)
        frames += [row, evaluate_methods(lab, {dare_label: (scaled(lab, delta_of(lab, merged)), dare_lambdas)})]
    df = pd.concat(frames, ignore_index=True)
    # the per-example test outcomes of every row, for `method_differences` / `with_references`
    df.attrs["correct"] = {k: v for f in frames for k, v in f.attrs.get("correct", {}).items()}
    return df


def dare_view(lab, task: str, p: float = 0.9, seed: int = 0):
    """θ₀ + DARE(τ_task, p) on `task`, with and without rescale, next to the base and the fine-tuned model."""
    from taskvec.methods import check_drop_rate, dare_drop, tensor_generator

    p = check_drop_rate(p)
    if task not in lab.tasks:
        raise ParameterError(f"task must be one of {lab.tasks}, got {task!r}")
    acc = {}
    for r in (True, False):
        delta = {k: dare_drop(lab.finetuned(task)[k].to(torch.float32) - lab.base[k].to(torch.float32), p, rescale=r,
                              generator=tensor_generator(seed, k)) for k in float_keys(lab)}
        acc[r] = lab.accuracy(scaled(lab, delta)(1.0), split="test", tasks=[task])[task]
    base, ft = lab.base_accuracy()[task], lab.finetuned_accuracy()[task]
    with style():
        fig, ax = new_figure(figsize=(6.4, 3.6))
        labels = ["base θ₀", "fine-tuned θ₀ + τ", f"DARE p = {p:.2f}\n(rescaled)", f"drop only p = {p:.2f}\n(no rescale)"]
        vals = [base, ft, acc[True], acc[False]]
        ax.bar(range(4), vals, color=["0.65", "C2", "C0", "C3"])
        for i, v in enumerate(vals):
            ax.text(i, v + 0.01, f"{v:.3f}", ha="center", fontsize=9)
        ax.set_xticks(range(4), labels)
        ax.set_ylim(0, 1.08)
        ax.set_ylabel(f"test accuracy on {task}")
        ax.set_title(f"Drop {p:.0%} of τ_{task}'s entries")
    return fig
