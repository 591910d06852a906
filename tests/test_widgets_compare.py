"""Direct tests of taskvec.widgets.compare (the views of notebooks 05 and 06), on tiny fake labs."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from taskvec.errors import ParameterError
from taskvec.merging import merge
from taskvec.methods import slerp
from taskvec.widgets import compare


from tests.helpers import OutcomeLab  # noqa: E402

class FakeLab(OutcomeLab):
    """The slice of ZooLab the compare views use: base / fine-tuned weights in memory, `merge`, and an
    accuracy that is a deterministic function of the weights (closer to a task's fine-tuned model on the
    task's own tensor = more accurate), so grid searches have a known best."""

    def __init__(self, n_tasks=3, size=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.tasks = [f"t{i}" for i in range(n_tasks)]
        self.control = ["ctrl"]
        self.base = {f"layers.{i}.w": torch.randn(size, generator=g) for i in range(n_tasks)}
        self.base["ids"] = torch.arange(4)
        self._ft = {}
        for i, t in enumerate(self.tasks):
            ft = {k: v.clone() for k, v in self.base.items()}
            ft[f"layers.{i}.w"] += 0.5 * torch.randn(size, generator=g)
            ft[f"layers.{(i + 1) % n_tasks}.w"] += 0.05 * torch.randn(size, generator=g)
            self._ft[t] = ft
        self.accuracy_calls = 0

    def finetuned(self, task):
        return self._ft[task]

    def merge(self, method, tasks=None, **params):
        return merge(self.base, [self._ft[t] for t in (tasks or self.tasks)], method=method, progress=False,
                     **params)

    def accuracy(self, weights=None, *, split="test", tasks=None):
        self.accuracy_calls += 1  # models evaluated by the code under test (references are cached in ZooLab)
        return self._score(weights, split, tasks)

    def _score(self, weights, split, tasks):
        w = self.base if weights is None else weights
        out = {}
        for t in tasks or self.tasks + self.control:
            if t == "ctrl":
                out[t] = 0.5
                continue
            k = f"layers.{self.tasks.index(t)}.w"   # the task's own tensor, whatever tasks were asked for
            gap = float((w[k] - self._ft[t][k]).norm() / (self._ft[t][k] - self.base[k]).norm())
            out[t] = 0.5 + 0.5 / (1.0 + gap) + (0.01 if split == "val" else 0.0)
        return out

    def finetuned_accuracy(self, split="test"):
        return {t: self._score(self._ft[t], split, self.tasks)[t] for t in self.tasks}

    def base_accuracy(self, split="test"):
        return self._score(None, split, None)

    def normalized(self, acc, split="test"):
        ft = self.finetuned_accuracy(split)
        return {t: acc[t] / ft[t] for t in acc if t in ft}


@pytest.fixture
def lab():
    return FakeLab()


# ------------------------------------------------------------------ 05: paths

@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_path_coefficients_reproduce_slerp_and_lerp(t):
    g = torch.Generator().manual_seed(1)
    v0, v1 = torch.randn(50, generator=g), torch.randn(50, generator=g)
    cos = float(torch.dot(v0, v1) / (v0.norm() * v1.norm()))
    c0, c1 = compare.path_coefficients(t, cos, "slerp")
    assert torch.allclose(c0 * v0 + c1 * v1, slerp(t, v0, v1), atol=1e-5)
    assert compare.path_coefficients(t, cos, "linear") == (1 - t, t)
    # nearly colinear: SLERP falls back to linear, as taskvec.methods.slerp and mergekit do
    assert compare.path_coefficients(t, 0.99999, "slerp") == (1 - t, t)
    with pytest.raises(ParameterError):
        compare.path_coefficients(0.5, 0.1, "cubic")


def test_path_norms_match_the_built_tensors(lab):
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    for space in ("weights", "task_vectors"):
        geometry = compare.pair_geometry(lab, "t0", "t1", space)
        norms = compare.path_norms(geometry, ts).set_index(["method", "t"])
        for method in ("linear", "slerp"):
            for t in ts:
                sd = compare.interpolate(lab, "t0", "t1", t, method=method, space=space)
                ref = lab.base if space == "task_vectors" else {k: 0.0 for k in lab.base}
                built = math.sqrt(sum(float(((sd[k] - ref[k]) ** 2).sum()) for k in geometry["tensor"]))
                assert norms.loc[(method, t), "norm"] == pytest.approx(built, rel=1e-5)
        # endpoints keep their own norm; relative norm is 1 there
        assert norms["relative_norm"].xs(0.0, level="t").to_numpy() == pytest.approx([1.0, 1.0])


def test_task_vectors_of_different_tasks_lose_norm_on_the_chord_not_on_the_arc(lab):
    geometry = compare.pair_geometry(lab, "t0", "t1", "task_vectors")
    assert geometry["angle_deg"].median() > 60  # the fake tasks touch mostly different tensors
    mid = compare.path_norms(geometry, [0.5]).set_index("method")["relative_norm"]
    assert mid["linear"] < 0.9
    assert mid["slerp"] > mid["linear"] + 0.1


def test_interpolate_endpoints_and_errors(lab):
    for space in ("weights", "task_vectors"):
        for method in ("linear", "slerp"):
            at0 = compare.interpolate(lab, "t0", "t1", 0.0, method=method, space=space)
            at1 = compare.interpolate(lab, "t0", "t1", 1.0, method=method, space=space)
            for k, v in lab.base.items():
                if v.is_floating_point():
                    assert torch.allclose(at0[k], lab.finetuned("t0")[k], atol=1e-5)
                    assert torch.allclose(at1[k], lab.finetuned("t1")[k], atol=1e-5)
    with pytest.raises(ParameterError):
        compare.interpolate(lab, "t0", "t1", 0.5, space="logits")
    with pytest.raises(ParameterError):
        compare.interpolate(lab, "t0", "t1", 0.5, method="cubic")


def test_accuracy_path_evaluates_shared_endpoints_once(lab):
    endpoints = {}
    a = compare.accuracy_path(lab, "t0", "t1", [0.0, 0.5, 1.0], space="weights", endpoints=endpoints)
    calls = lab.accuracy_calls
    b = compare.accuracy_path(lab, "t0", "t1", [0.0, 0.5, 1.0], space="task_vectors", endpoints=endpoints)
    assert lab.accuracy_calls - calls == 2  # only the two t = 0.5 models are new
    assert list(a.columns) == ["space", "method", "t", "acc_t0", "acc_t1", "mean_accuracy"]
    assert len(a) == len(b) == 6
    start = a[a["t"] == 0.0]
    assert (start["acc_t0"] == start["acc_t0"].iloc[0]).all()
    # moving towards t1 helps t1
    lin = b[b["method"] == "linear"].set_index("t")
    assert lin.loc[1.0, "acc_t1"] > lin.loc[0.0, "acc_t1"]
    # per-example outcomes of every point, for paired intervals; the endpoints are the shared ones
    correct = b.attrs["correct"]
    assert set(correct) == {("task_vectors", m, t) for m in ("linear", "slerp") for t in (0.0, 0.5, 1.0)}
    for r in b.itertuples():
        assert float(correct[(r.space, r.method, r.t)]["t1"].float().mean()) == pytest.approx(r.acc_t1)
    assert correct[("task_vectors", "linear", 0.0)] is a.attrs["correct"][("weights", "slerp", 0.0)]


def test_plots_of_paths_are_labelled(lab):
    geometry = {s: compare.pair_geometry(lab, "t0", "t1", s) for s in ("weights", "task_vectors")}
    fig = compare.plot_norm_paths({s: compare.path_norms(g, [0, 0.5, 1]) for s, g in geometry.items()})
    assert len(fig.axes) == 2 and all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)
    paths = pd.concat([compare.accuracy_path(lab, "t0", "t1", [0, 0.5, 1], space=s) for s in geometry])
    fig = compare.plot_accuracy_paths(paths, "t0", "t1", reference={"t0": 0.6, "t1": 0.6})
    assert len(fig.axes) == 2 and fig.legends
    fig = compare.interpolation_view(lab, "t0", "t1", 0.5, "task_vectors")
    assert "t = 0.50" in fig.axes[0].get_title()


# ------------------------------------------------------------------ 05: config and passthrough

@pytest.fixture(scope="module")
def tiny_berts(tmp_path_factory):
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("berts")
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = root / f"m{seed}"
        BertModel(cfg).save_pretrained(path)
        paths.append(path)
    return paths


def test_seed_slerp_config_resolves_per_layer_t(tiny_berts):
    from taskvec.config import plan_config

    a, b = tiny_berts
    t = [{"filter": "attention", "value": [0, 0.5, 0.3, 0.7, 1]},
         {"filter": "intermediate", "value": [1, 0.5, 0.7, 0.3, 0]},
         {"filter": "output", "value": [1, 0.5, 0.7, 0.3, 0]},
         {"value": 0.5}]
    cfg = compare.slerp_config(a, b, t, num_layers=3)
    assert cfg["merge_method"] == "slerp" and cfg["base_model"] == str(a)
    table = compare.t_table(plan_config(cfg))
    # 3 layers sit at x = 0, 0.5, 1 of the 5-point gradients
    assert table["attention"].tolist() == pytest.approx([0.0, 0.3, 1.0])
    assert table["mlp"].tolist() == pytest.approx([1.0, 0.7, 0.0])
    assert set(table.attrs["outside_layers"].values()) == {0.5}
    # Llama names match nothing in a BERT: everything takes the fallback
    seed = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": [1, 0]}, {"value": 0.5}]
    verbatim = compare.t_table(plan_config(compare.slerp_config(a, b, seed, num_layers=3)))
    assert set(verbatim.to_numpy().ravel()) == {0.5}
    fig = compare.plot_t_table({"bert names": table, "verbatim": verbatim})
    assert fig.axes[0].get_xlabel() == "layer"


def test_depth_upscaling_slices_and_passthrough(tiny_berts):
    from transformers import AutoModel

    from taskvec.merging import passthrough

    assert compare.depth_upscaling_slices(6, 1) == [(0, 5), (1, 6)]
    assert compare.depth_upscaling_slices(32, 8) == [(0, 24), (8, 32)]  # SOLAR: 48 layers
    for bad in (0, 6):
        with pytest.raises(ParameterError):
            compare.depth_upscaling_slices(6, bad)
    slices = compare.depth_upscaling_slices(3, 1)
    out = passthrough([(str(tiny_berts[0]), s) for s in slices], out=tiny_berts[0].parent / "dus", progress=False)
    model = AutoModel.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    fig = compare.plot_passthrough(pd.DataFrame({"base": {"a": 0.8, "b": 0.7}, "dus": {"a": 0.7, "b": 0.7}}))
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["a", "b"]


# ------------------------------------------------------------------ 06: methods

def test_rescaled_equals_merging_at_that_lambda(lab):
    for method, params in (("task_arithmetic", {}), ("ties", {"density": 0.5}), ("dare_ties", {"p": 0.5})):
        at_one = lab.merge(method, **params, **{"lambda": 1.0})
        direct = lab.merge(method, **params, **{"lambda": 0.4})
        via = compare.rescaled(lab, at_one, 0.4)
        for k, v in direct.items():
            assert torch.allclose(via[k].float(), v.float(), atol=1e-6), (method, k)
        assert torch.equal(via["ids"], lab.base["ids"])


def test_evaluate_spec_picks_the_best_validation_lambda(lab):
    spec = compare.MethodSpec("ta", "task_arithmetic", lambdas=(0.1, 1.0, 3.0))
    row = compare.evaluate_spec(lab, spec)
    # each task vector lives mostly on its own tensor: λ = 1 recovers every fine-tuned model there
    assert row["params"] == "lambda=1"
    assert row["configs_tried"] == 3
    assert 0 < row["normalized_accuracy"] <= 1.0 + 1e-6
    assert {f"acc_{t}" for t in lab.tasks + lab.control} <= set(row)
    # a method with nothing to search is scored once on test, without a validation pass
    calls = lab.accuracy_calls
    row = compare.evaluate_spec(lab, compare.MethodSpec("avg", "linear"))
    assert math.isnan(row["val_normalized"]) and row["params"] == "—"
    assert lab.accuracy_calls - calls == 1
    with pytest.raises(ParameterError):
        compare.evaluate_spec(lab, compare.MethodSpec("f", "fisher", statistics="fisher"))


def test_method_table_and_its_views(lab):
    specs = [compare.MethodSpec("averaging", "linear"),
             compare.MethodSpec("task_arithmetic", "task_arithmetic", lambdas=(0.5, 1.0)),
             compare.MethodSpec("ties", "ties", grid={"density": (0.5, 1.0)}, lambdas=(1.0,))]
    table = compare.method_table(lab, specs)
    assert list(table["method"]) == ["base θ₀ (frozen heads)", "fine-tuned (one model per task)", "averaging",
                                     "task_arithmetic", "ties"]
    assert table.loc[table["method"] == "fine-tuned (one model per task)", "normalized_accuracy"].item() == 1.0
    assert table["reference"].tolist() == [True, True, False, False, False]
    ta = table.set_index("method").loc["task_arithmetic"]
    avg = table.set_index("method").loc["averaging"]
    assert ta["normalized_accuracy"] > avg["normalized_accuracy"]  # averaging dilutes each τ by 1/n
    fig = compare.plot_method_table(table, lab.tasks, lab.finetuned_accuracy())
    assert len(fig.axes) == 3  # bars, heatmap, colorbar
    fig = compare.method_view(table, "ties", lab.tasks, lab.control)
    assert "ties" in fig.axes[0].get_title()
    with pytest.raises(ParameterError):
        compare.method_view(table, "nope", lab.tasks)


def test_default_specs_cover_every_method():
    from taskvec.methods import METHODS

    for fast in (True, False):
        specs = compare.default_specs(fast)
        assert {s.method for s in specs} == {"linear", "fisher", "regmean", "task_arithmetic", "ties",
                                             "dare_linear", "dare_ties", "breadcrumbs", "della", "model_stock"}
        for s in specs:
            METHODS[s.method].check_params(4, has_base=True, **s.params, **s.configurations()[0],
                                           **({s.statistics: [{"w": torch.ones(2, 2)}] * 4} if s.statistics else {}))
    assert sum(len(s.configurations()) * len(s.lambdas or (None,)) for s in compare.default_specs(True)) < \
        sum(len(s.configurations()) * len(s.lambdas or (None,)) for s in compare.default_specs(False))


def test_merge_statistics_are_computed_once(lab, monkeypatch):
    from types import SimpleNamespace

    from taskvec.eval import zoo_eval

    calls = []
    monkeypatch.setattr(zoo_eval, "task_fisher", lambda zoo, task, n_samples, **kw: calls.append(task) or {"x": n_samples})
    monkeypatch.setattr(zoo_eval, "task_grams", lambda zoo, task, limit, **kw: calls.append(task) or {"g": limit})
    monkeypatch.setattr(compare, "_STATISTICS", {})
    lab.zoo = SimpleNamespace(root="/fake/zoo")
    first = compare.merge_statistics(lab, "fisher", 8)
    again = compare.merge_statistics(lab, "fisher", 8)
    assert first == again == {t: {"x": 8} for t in lab.tasks}
    assert calls == lab.tasks
    compare.merge_statistics(lab, "gram", 8)
    compare.merge_statistics(lab, "fisher", 16)
    assert len(calls) == 3 * len(lab.tasks)
    with pytest.raises(ParameterError):
        compare.merge_statistics(lab, "hessian", 8)


def test_fisher_and_regmean_rows_use_the_statistics(lab):
    ones = {t: {k: torch.ones_like(v) for k, v in lab.base.items() if v.is_floating_point()} for t in lab.tasks}
    # a Fisher that trusts each task only on its own tensor recovers each fine-tuned tensor there
    own = {t: {k: (torch.ones_like(v) if k == f"layers.{i}.w" else torch.full_like(v, 1e-8))
               for k, v in lab.base.items() if v.is_floating_point()} for i, t in enumerate(lab.tasks)}
    flat = compare.evaluate_spec(lab, compare.MethodSpec("fisher", "fisher", statistics="fisher"), {"fisher": ones})
    sharp = compare.evaluate_spec(lab, compare.MethodSpec("fisher", "fisher", statistics="fisher"), {"fisher": own})
    assert sharp["normalized_accuracy"] > flat["normalized_accuracy"]


def test_pairwise_table_and_paper_comparison(lab):
    pairs = compare.pairwise_table(lab, [("t0", "t1")])
    assert set(pairs["method"]) == {"linear", "slerp", "slerp (task vectors)"}
    assert (pairs["pair"] == "t0 + t1").all()
    table = pd.DataFrame({"method": ["fine-tuned (one model per task)", "averaging", "ties", "dare_ties"],
                          "absolute_accuracy": [0.9, 0.7, 0.8, 0.85], "normalized_accuracy": [1.0, 0.78, 0.89, 0.94]})
    paper = compare.paper_vs_here(table, {"fine-tuned (one model per task)": 90.0, "averaging": 60.0,
                                          "ties": 72.0, "regmean": 70.0})
    assert list(paper["method"]) == ["fine-tuned (one model per task)", "averaging", "ties"]  # regmean: not here
    assert paper.set_index("method").loc["ties", "paper_normalized"] == pytest.approx(0.8)
    assert paper.set_index("method").loc["ties", "paper_rank"] == 1
    assert paper.set_index("method").loc["averaging", "here_rank"] == 2
    assert np.isnan(paper.set_index("method").loc["fine-tuned (one model per task)", "paper_rank"])
    assert set(compare.PAPER_VIT_B32) >= {"averaging", "fisher", "regmean", "task_arithmetic", "ties"}
    # AdaMerging (ICLR 2024) Table 2, ViT-B/32, 8 tasks: individual models 90.5 (not 90.8), TIES 72.4 (no validation)
    assert compare.PAPER_VIT_B32["fine-tuned (one model per task)"] == 90.5
    assert compare.PAPER_VIT_B32["ties"] == 72.4
