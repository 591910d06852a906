"""Direct tests of the TIES / DARE views (taskvec.widgets.sweeps) that notebooks 03 and 04 call.

A tiny fake lab (same interface as ZooLab, accuracy = closeness to each task's fine-tuned weights)
checks the arithmetic exactly; one test on the fast zoo checks the real-model path.
"""
from __future__ import annotations

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")

from taskvec.errors import ParameterError  # noqa: E402
from taskvec.methods import trim_topk  # noqa: E402
from taskvec.widgets import sweeps  # noqa: E402
from taskvec.widgets.sweeps import TIES_ABLATIONS, TiesVariant  # noqa: E402


from tests.helpers import OutcomeLab  # noqa: E402

class FakeLab(OutcomeLab):
    """ZooLab's interface over small random weights. A task's "accuracy" of weights w is
    exp(−‖w − θ_task‖² / ‖τ_task‖²): 1 at the fine-tuned model, e^-1 at the base, smooth in between;
    the validation split scores the same distance with a slightly different scale."""

    def __init__(self, n_tasks: int = 3, seed: int = 0, scale: float = 1e-3):
        g = torch.Generator().manual_seed(seed)
        self.tasks = [f"task{i}" for i in range(n_tasks)]
        self.control: list[str] = []
        self.base = {
            "encoder.layer.0.attention.self.query.weight": torch.randn(48, 40, generator=g),
            "encoder.layer.0.attention.self.query.bias": torch.randn(48, generator=g),
            "encoder.layer.1.output.dense.weight": torch.randn(40, 48, generator=g),
            "embeddings.position_ids": torch.arange(16).unsqueeze(0),
        }
        self._ft = {}
        for t in self.tasks:
            ft = {}
            for k, v in self.base.items():
                ft[k] = v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            self._ft[t] = ft

    def finetuned(self, task):
        return self._ft[task]

    def task_vector(self, task):
        from taskvec.vector import TaskVector

        return TaskVector.from_models(self.base, self._ft[task])

    def merge(self, method, tasks=None, **params):
        from taskvec.merging import merge

        return merge(self.base, [self._ft[t] for t in (tasks or self.tasks)], method=method, progress=False, **params)

    def accuracy(self, weights=None, *, split="test", tasks=None):
        w = self.base if weights is None else weights
        out = {}
        for t in tasks or self.tasks:
            num = sum(float(((w[k].float() - self._ft[t][k].float()) ** 2).sum()) for k in self.base if self.base[k].is_floating_point())
            den = sum(float(((self._ft[t][k].float() - self.base[k].float()) ** 2).sum()) for k in self.base if self.base[k].is_floating_point())
            out[t] = math.exp(-num / den * (1.0 if split == "test" else 1.1))
        return out

    def finetuned_accuracy(self, split="test"):
        return {t: self.accuracy(self._ft[t], split=split, tasks=[t])[t] for t in self.tasks}

    def base_accuracy(self, split="test"):
        return self.accuracy(None, split=split)

    def normalized(self, acc, split="test"):
        ft = self.finetuned_accuracy(split)
        return {t: acc[t] / ft[t] for t in acc if t in ft}


@pytest.fixture(scope="module")
def lab():
    return FakeLab()


FLOAT_KEYS = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.self.query.bias",
              "encoder.layer.1.output.dense.weight"]


# ------------------------------------------------------------------ task vectors as tensors

def test_float_keys_and_stacked_deltas(lab):
    assert sweeps.float_keys(lab) == FLOAT_KEYS
    got = dict(sweeps.iter_task_deltas(lab))
    for k in FLOAT_KEYS:
        assert got[k].shape == (3, *lab.base[k].shape)
        assert torch.equal(got[k][1], lab.finetuned("task1")[k] - lab.base[k])


def test_scaled_and_delta_of_round_trip(lab):
    merged = lab.merge("task_arithmetic", lam=0.7)
    rebuilt = sweeps.scaled(lab, sweeps.delta_of(lab, merged))(1.0)
    for k in FLOAT_KEYS:
        torch.testing.assert_close(rebuilt[k], merged[k], rtol=0, atol=1e-6)
    assert torch.equal(rebuilt["embeddings.position_ids"], lab.base["embeddings.position_ids"])
    half = sweeps.scaled(lab, sweeps.delta_of(lab, merged))(0.5)
    torch.testing.assert_close(half[FLOAT_KEYS[0]] - lab.base[FLOAT_KEYS[0]],
                               0.5 * (merged[FLOAT_KEYS[0]] - lab.base[FLOAT_KEYS[0]]), rtol=0, atol=1e-6)


def test_sampled_task_vectors_strides_coprime_with_rows(lab):
    full = sweeps.sampled_task_vectors(lab, every=1)
    assert torch.equal(full["task0"][FLOAT_KEYS[0]], (lab.finetuned("task0")[FLOAT_KEYS[0]] - lab.base[FLOAT_KEYS[0]]).reshape(-1))
    sample = sweeps.sampled_task_vectors(lab, every=4)
    # rows of 40 columns: 4 and 5 share a factor with 40, 7 does not
    assert torch.equal(sample["task2"][FLOAT_KEYS[0]], full["task2"][FLOAT_KEYS[0]][::7])
    # rows of 48 columns (the second weight): 5 is the first stride >= 4 coprime with 48
    assert torch.equal(sample["task2"][FLOAT_KEYS[2]], full["task2"][FLOAT_KEYS[2]][::5])
    with pytest.raises(ParameterError, match="every"):
        sweeps.sampled_task_vectors(lab, every=0)


# ------------------------------------------------------------------ TIES steps

STACKED = torch.tensor([[1.0, -2.0, 0.0, 5.0],
                        [3.0, 1.0, 0.0, -1.0],
                        [-1.0, -1.0, 2.0, -1.0]])


@pytest.mark.parametrize("variant, expected", [
    # mass election: signs (+, −, +, +); disjoint mean over the agreeing, non-zero entries
    (TiesVariant("ties"), [2.0, -1.5, 2.0, 5.0]),
    # count election flips the last column: two small negatives outvote one large positive
    (TiesVariant("count", elect="count"), [2.0, -1.5, 2.0, -1.0]),
    # no election: mean of every non-zero entry, whatever its sign
    (TiesVariant("no elect", elect=None), [1.0, -2.0 / 3.0, 2.0, 1.0]),
    # plain mean: the agreeing entries divided by the number of tasks (zeros dilute)
    (TiesVariant("plain", mean="plain"), [4.0 / 3.0, -1.0, 2.0 / 3.0, 5.0 / 3.0]),
])
def test_combine_ties_variants_by_hand(variant, expected):
    torch.testing.assert_close(sweeps.combine_ties(STACKED, variant), torch.tensor(expected))


def test_variant_rejects_unknown_steps():
    with pytest.raises(ParameterError, match="elect"):
        TiesVariant("x", elect="median")
    with pytest.raises(ParameterError, match="mean"):
        TiesVariant("x", mean="median")


def test_trimmed_task_vectors_equal_trim_topk(lab):
    trimmed = sweeps.trimmed_task_vectors(lab, 0.3)
    for t in lab.tasks:
        for k in FLOAT_KEYS:
            expected = trim_topk(lab.finetuned(t)[k] - lab.base[k], 0.3)
            torch.testing.assert_close(trimmed[t][k], expected, rtol=0, atol=1e-6)
            assert (trimmed[t][k] != 0).float().mean() == pytest.approx(0.3, abs=0.03)


@pytest.mark.parametrize("density", [0.2, 0.5])
def test_full_variant_equals_library_ties(lab, density):
    ours = sweeps.ties_delta(lab, density)
    library = sweeps.delta_of(lab, lab.merge("ties", density=density, lam=1.0))
    for k in FLOAT_KEYS:
        torch.testing.assert_close(ours[k], library[k], rtol=0, atol=1e-6)


def test_no_trim_variant_equals_library_ties_at_density_one(lab):
    ours = sweeps.ties_delta(lab, 0.2, TiesVariant("no trim", trim=False))
    library = sweeps.delta_of(lab, lab.merge("ties", density=1.0, lam=1.0))
    for k in FLOAT_KEYS:
        torch.testing.assert_close(ours[k], library[k], rtol=0, atol=1e-6)


def test_ties_tensor_reference_matches_trimmed_path(lab):
    stacked = dict(sweeps.iter_task_deltas(lab))[FLOAT_KEYS[0]]
    trimmed = sweeps.trimmed_task_vectors(lab, 0.25)
    for v in TIES_ABLATIONS:
        got = sweeps.ties_delta(lab, 0.25, v, trimmed=trimmed)[FLOAT_KEYS[0]]
        torch.testing.assert_close(got, sweeps.ties_tensor(stacked, 0.25, v), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ λ selection and tables

def test_evaluate_methods_picks_validation_argmax(lab):
    delta = sweeps.delta_of(lab, lab.merge("task_arithmetic", lam=1.0))
    weights_for = sweeps.scaled(lab, delta)
    grid = [0.1, 0.4, 0.9, 2.0]
    df = sweeps.evaluate_methods(lab, {"ta": (weights_for, grid), "avg": lab.merge("linear"),
                                       "fixed": (weights_for, [0.4])})
    val = {lam: np.mean(list(lab.normalized(lab.accuracy(weights_for(lam), split="val"), "val").values())) for lam in grid}
    best = max(val, key=val.get)
    row = df.set_index("method").loc["ta"]
    assert row["lambda"] == best
    test = lab.accuracy(weights_for(best), split="test")
    # per-example outcomes realise each accuracy to 1 / (2 N): compare at that resolution
    assert row["normalized_accuracy"] == pytest.approx(np.mean([test[t] for t in lab.tasks]), abs=1e-3)
    assert row["low"] <= row["normalized_accuracy"] <= row["high"]
    assert pd.isna(df.set_index("method").loc["avg", "lambda"])
    assert df.set_index("method").loc["fixed", "lambda"] == 0.4
    assert {f"norm_{t}" for t in lab.tasks} <= set(df.columns)
    with pytest.raises(ParameterError, match="empty"):
        sweeps.evaluate_methods(lab, {"bad": (weights_for, [])})


def test_ties_ablation_rows_norm_matched_lambdas(lab):
    grid = (0.5, 1.0, 2.0)
    df = sweeps.ties_ablation(lab, density=0.3, lambdas=grid)
    assert list(df["method"]) == [v.label for v in TIES_ABLATIONS]
    assert list(df["elect"]) == ["mass", "mass", "none", "count", "mass"]
    assert (df["density"] == 0.3).all()
    ref = df["norm"].iloc[0]
    for _, row in df.iterrows():
        # each variant's λ is one grid point times ‖τ_TIES‖ / ‖τ_variant‖
        assert any(row["lambda"] == pytest.approx(g * ref / row["norm"]) for g in grid)
    # the plain mean divides by n instead of the agreeing count, so its merged vector is smaller
    assert df.set_index("method").loc["plain mean instead of disjoint", "norm"] < ref
    assert df["normalized_accuracy"].between(0, 1.0 + 1e-9).all()


def test_alignment_and_reference_rows(lab):
    tau0 = {k: lab.finetuned("task0")[k] - lab.base[k] for k in FLOAT_KEYS}
    cos = sweeps.alignment(lab, {"tau0": tau0, "neg": {k: -2 * v for k, v in tau0.items()}})
    assert cos["tau0"]["task0"] == pytest.approx(1.0, abs=1e-6)
    # independent random task vectors are nearly orthogonal
    assert abs(cos["tau0"]["task1"]) < 0.1
    assert cos["neg"]["task0"] == pytest.approx(-1.0, abs=1e-6)
    assert cos["neg"]["task1"] == pytest.approx(-cos["tau0"]["task1"], abs=1e-6)
    ref = sweeps.reference_rows(lab).set_index("method")
    assert ref.loc["fine-tuned (one model per task)", "normalized_accuracy"] == pytest.approx(1.0)
    base = lab.base_accuracy()
    assert ref.loc["base θ₀ (no merge)", "acc_task2"] == pytest.approx(base["task2"], abs=1e-3)


def test_ties_vs_baselines_has_three_methods(lab):
    df = sweeps.ties_vs_baselines(lab, density=0.5, ties_lambdas=(1.0,), ta_lambdas=(0.3, 0.6))
    assert list(df["method"]) == ["TIES (k = 0.5)", "task arithmetic", "averaging"]
    assert df.loc[0, "lambda"] == 1.0 and df.loc[1, "lambda"] in (0.3, 0.6)
    # averaging = θ₀ + (1/n) Σ τ_i: the same model as task arithmetic at λ = 1/3
    ta = sweeps.scaled(lab, sweeps.delta_of(lab, lab.merge("task_arithmetic", lam=1.0)))(1 / 3)
    acc = lab.accuracy(ta, split="test")
    assert df.loc[2, "absolute_accuracy"] == pytest.approx(np.mean(list(acc.values())), abs=1e-3)
    assert list(sweeps.ties_vs_baselines(lab, 0.5, (1.0,), (0.3,), include_ties=False)["method"]) == [
        "task arithmetic", "averaging"]


# ------------------------------------------------------------------ DARE

def test_delta_range_exact_statistics():
    lab = FakeLab(n_tasks=2, seed=1)
    k = FLOAT_KEYS[1]
    lab._ft["task0"][k] = lab.base[k].clone()
    lab._ft["task0"][k][0] += 0.01  # one delta above DARE's 0.005 limit, the rest of this bias unchanged
    df = sweeps.delta_range(lab).set_index("task")
    n = sum(lab.base[x].numel() for x in FLOAT_KEYS)
    deltas = torch.cat([(lab.finetuned("task0")[x] - lab.base[x]).reshape(-1) for x in FLOAT_KEYS])
    assert df.loc["task0", "numel"] == n
    assert df.loc["task0", "max_abs"] == pytest.approx(float(deltas.abs().max()))
    assert df.loc["task0", "frac_above_0.005"] == pytest.approx(1 / n)
    assert df.loc["task0", "frac_unchanged"] == pytest.approx(float((deltas == 0).sum()) / n)
    assert df.loc["task0", "norm"] == pytest.approx(float(deltas.norm()), rel=1e-5)
    assert df.loc["task1", "frac_above_0.005"] == 0.0
    nz = deltas.abs()[deltas != 0].double()
    assert df.loc["task0", "p50_abs_changed"] == pytest.approx(float(torch.quantile(nz, 0.5)), rel=1e-3)
    assert df.loc["task0", "p50_abs_changed"] <= df.loc["task0", "p99_abs_changed"] <= df.loc["task0", "max_abs"]


def test_dare_curve_endpoints_and_drop_statistics(lab):
    df = sweeps.dare_curve(lab, tasks=["task0", "task2"], ps=(0.0, 0.5, 0.9))
    assert len(df) == 2 * 3 * 2
    assert set(df.columns) >= {"task", "drop_rate", "rescale", "accuracy", "normalized", "base_accuracy",
                               "finetuned_accuracy", "frac_kept", "norm_ratio", "cosine_to_tau"}
    p0 = df[df["drop_rate"] == 0.0]
    # p = 0 drops nothing: θ₀ + τ is the fine-tuned model, with or without rescale (one row per rescale)
    assert len(p0) == 4 and set(p0["rescale"]) == {True, False}
    assert np.allclose(p0["normalized"], 1.0, atol=1e-4)
    for p in (0.5, 0.9):
        rows = df[df["drop_rate"] == p]
        assert np.allclose(rows["frac_kept"], 1 - p, atol=0.03)
        no = rows[~rows["rescale"]]["norm_ratio"]
        yes = rows[rows["rescale"]]["norm_ratio"]
        assert np.allclose(no, math.sqrt(1 - p), rtol=0.1)      # dropped entries shrink the norm
        assert np.allclose(yes, 1 / math.sqrt(1 - p), rtol=0.1)  # rescaling overshoots it (E[τ̃] = τ, not ‖τ̃‖)


def test_dare_curve_rejects_p_one(lab):
    with pytest.raises(ParameterError, match="drop rate"):
        sweeps.dare_curve(lab, tasks=["task0"], ps=(0.5, 1.0))


def test_dare_merges_rows(lab):
    df = sweeps.dare_merges(lab, p=0.5, density=0.5, ties_lambdas=(1.0,), ta_lambdas=(0.5,))
    assert list(df["method"]) == ["task arithmetic", "dare_linear (p = 0.5)", "TIES (k = 0.5)", "dare_ties (p = 0.5)"]
    # dare_linear at λ: θ₀ + λ Σ DARE(τ_i); rebuilding it by hand gives the same accuracy
    merged = lab.merge("dare_linear", p=0.5, lam=0.5, seed=0)
    acc = lab.accuracy(merged, split="test")
    assert df.loc[1, "absolute_accuracy"] == pytest.approx(np.mean([acc[t] for t in lab.tasks]), abs=1e-3)
    # without their own search, the DARE merges take the λ their plain counterparts chose on validation
    reused = sweeps.dare_merges(lab, p=0.5, density=0.5, ties_lambdas=(0.5, 1.0, 2.0), ta_lambdas=(0.1, 0.3, 0.9),
                                search_dare_lambda=False)
    assert reused.loc[1, "lambda"] == reused.loc[0, "lambda"] and reused.loc[3, "lambda"] == reused.loc[2, "lambda"]
    assert pd.isna(reused.loc[1, "val_normalized"]) and not pd.isna(reused.loc[0, "val_normalized"])


# ------------------------------------------------------------------ views and plots

def test_views_and_plots_render(lab):
    from matplotlib.figure import Figure

    fig = sweeps.ties_view(lab, density=0.3, lam=1.0)
    assert isinstance(fig, Figure) and "TIES" in fig.axes[0].get_title()
    fig = sweeps.dare_view(lab, "task1", p=0.5)
    assert isinstance(fig, Figure) and "50%" in fig.axes[0].get_title()
    with pytest.raises(ParameterError):
        sweeps.dare_view(lab, "task1", p=1.0)
    with pytest.raises(ParameterError, match="task"):
        sweeps.dare_view(lab, "nope", p=0.5)
    abl = sweeps.ties_ablation(lab, density=0.3, lambdas=(1.0,))
    fig = sweeps.plot_ties_ablation(abl)
    assert fig.axes[0].get_xlabel().startswith("mean normalised")
    assert "cos" in fig.axes[1].get_xlabel()
    assert len(fig.axes[0].get_yticklabels()) == len(abl)
    curve = sweeps.dare_curve(lab, tasks=["task0", "task1"], ps=(0.0, 0.9, 0.99))
    fig = sweeps.plot_dare_curve(curve)
    assert [ax.get_title() for ax in fig.axes] == ["task0", "task1"]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0", "0.5", "0.9", "0.99"]
    fig = sweeps.plot_delta_range(sweeps.delta_range(lab))
    assert "0.005" in " ".join(t.get_text() for t in fig.axes[0].get_legend().get_texts())


def test_ties_view_merges_once_per_density():
    lab = FakeLab(seed=3)
    calls = []
    merge = lab.merge
    lab.merge = lambda *a, **k: (calls.append(k), merge(*a, **k))[1]
    first = sweeps.ties_view(lab, density=0.3, lam=1.0)
    sweeps.ties_view(lab, density=0.3, lam=0.5)  # a λ move rescales the cached merged vector
    assert len(calls) == 1 and calls[0]["density"] == 0.3
    sweeps.ties_view(lab, density=0.5, lam=1.0)
    assert len(calls) == 2
    # the bars show TIES' per-task accuracy at (k, λ)
    merged = lab.merge("ties", density=0.3, lam=1.0)
    acc = lab.accuracy(merged, split="test")
    heights = [round(b.get_height(), 6) for b in first.axes[0].patches]
    assert all(round(acc[t], 6) in heights for t in lab.tasks)


# ------------------------------------------------------------------ the real zoo

@pytest.fixture(scope="module")
def zoo_lab():
    import taskvec.zoo
    from taskvec.widgets import ZooLab

    return ZooLab(taskvec.zoo.build("minilm-tasks", fast=True), limit=8)


def test_zoo_trim_and_dare_point(zoo_lab):
    lab = zoo_lab
    task = lab.tasks[0]
    trimmed = sweeps.trimmed_task_vectors(lab, 0.2, tasks=[task])[task]
    k = "encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(trimmed[k], trim_topk(lab.finetuned(task)[k].float() - lab.base[k].float(), 0.2),
                               rtol=0, atol=1e-7)
    df = sweeps.dare_curve(lab, tasks=[task], ps=(0.0, 0.9), rescale=(True,))
    assert df.loc[df["drop_rate"] == 0.0, "accuracy"].item() == pytest.approx(lab.finetuned_accuracy()[task])
    assert df.loc[df["drop_rate"] == 0.9, "frac_kept"].item() == pytest.approx(0.1, abs=0.01)


# ------------------------------------------------------------------ DARE: per-example outcomes and subsets

def test_dare_curve_keeps_outcomes_and_paired_differences(lab):
    df = sweeps.dare_curve(lab, tasks=["task0", "task1"], ps=(0.0, 0.5, 0.9))
    correct = df.attrs["correct"]
    for t in ("task0", "task1"):
        for p in (0.0, 0.5, 0.9):
            for r in (True, False):
                row = df[(df["task"] == t) & (df["drop_rate"] == p) & (df["rescale"] == r)]
                assert float(correct[(t, p, r)].float().mean()) == pytest.approx(row["accuracy"].item())
        # p = 0 is the fine-tuned model itself, not evaluated again
        assert correct[(t, 0.0, True)] is correct[(t, "finetuned")]
    same = sweeps.dare_difference(df, (0.0, True), "finetuned")
    assert same.estimate == 0 and same.low == 0 and same.high == 0
    # the estimate is the difference of the mean normalised accuracies (on the fake, drop-only stays closer to
    # θ_task than the rescaled τ̃, whose error grows as p/(1−p): the sign is the fake's, not DARE's)
    gap = sweeps.dare_difference(df, (0.9, True), (0.9, False))
    at = df.set_index(["rescale", "drop_rate"]).sort_index()
    expected = at.loc[(True, 0.9), "normalized"].mean() - at.loc[(False, 0.9), "normalized"].mean()
    assert gap.estimate == pytest.approx(expected, abs=1e-6) and gap.excludes_zero
    assert gap.low <= gap.estimate <= gap.high
    assert sweeps.dare_difference(df, "finetuned", "base").low > 0
    with pytest.raises(ParameterError, match="no point"):
        sweeps.dare_difference(df, (0.99, True), (0.0, True))
    with pytest.raises(ParameterError, match="dare_curve"):
        sweeps.dare_difference(pd.DataFrame({"task": ["task0"]}), (0.0, True), "base")


def test_task_subset_restricts_merges_and_references():
    lab = FakeLab(n_tasks=3, seed=2)
    sub = sweeps.task_subset(lab, ["task0", "task2"])
    assert sub.tasks == ["task0", "task2"] and lab.tasks == ["task0", "task1", "task2"]
    assert sweeps.task_subset(lab, None) is lab and sweeps.task_subset(lab, lab.tasks) is lab
    assert set(sub.reference_correct("finetuned")) == {"task0", "task2"}
    with pytest.raises(ParameterError):
        sweeps.task_subset(lab, ["task0", "nope"])
    df = sweeps.dare_merges(sub, p=0.5, density=0.5, ta_lambdas=(0.5,), pairs=("task_arithmetic",))
    assert list(df["method"]) == ["task arithmetic", "dare_linear (p = 0.5)"]
    assert set(df.attrs["correct"]) == set(df["method"])
    assert set(df.attrs["correct"]["task arithmetic"]) == {"task0", "task2"}
    diffs = sweeps.method_differences(sub, df, [("dare_linear (p = 0.5)", "task arithmetic")])
    assert diffs.loc[0, "verdict"] in ("a > b", "a < b", "within noise")
    with pytest.raises(ParameterError, match="pairs"):
        sweeps.dare_merges(sub, pairs=("slerp",))


def test_delta_range_counts_both_published_bounds():
    lab = FakeLab(n_tasks=1, seed=3, scale=1e-4)   # every delta far below 0.002
    k = FLOAT_KEYS[1]
    lab._ft["task0"][k] = lab.base[k].clone()
    lab._ft["task0"][k][0] += 0.003   # above the ICML text's 0.002, below the README's 0.005
    df = sweeps.delta_range(lab).set_index("task")
    n = sum(lab.base[x].numel() for x in FLOAT_KEYS)
    assert df.loc["task0", "frac_above_0.005"] == 0.0
    assert df.loc["task0", "frac_above_0.002"] == pytest.approx(1 / n)
