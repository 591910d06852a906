"""AdaMerging (taskvec.methods.adamerging) against hand computations on tiny linear models."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taskvec
from taskvec.errors import ParameterError
from taskvec.eval.statistics import prediction_entropy
from taskvec.methods.adamerging import AdaMergingResult, adamerging, merged_params
from taskvec.methods.sparsify import global_magnitude_threshold, trim_topk
from taskvec.methods.ties import agreement, elect_sign


def linear_forward(params, batch, task):
    """A linear classifier: logits = x W^T + b (the same for every task)."""
    return batch @ params["W"].T + params["b"]


def toy(seed=0, tasks=("a", "b")):
    g = torch.Generator().manual_seed(seed)
    base = {"W": torch.randn(3, 2, generator=g), "b": torch.randn(3, generator=g), "steps": torch.tensor(7)}
    models = {t: {"W": base["W"] + torch.randn(3, 2, generator=g), "b": base["b"] + torch.randn(3, generator=g),
                  "steps": torch.tensor(9)} for t in tasks}
    unlabeled = {t: [torch.randn(5, 2, generator=g)] for t in tasks}
    return base, models, unlabeled


# ----------------------------------------------------------------------------- the entropy objective
def test_prediction_entropy_of_known_distributions():
    uniform4 = torch.zeros(1, 4)
    assert prediction_entropy(uniform4).item() == pytest.approx(math.log(4))
    p = torch.tensor([0.7, 0.2, 0.1])
    by_hand = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert prediction_entropy(p.log()[None]).item() == pytest.approx(by_hand, rel=1e-6)
    # mean over the batch: a near one-hot row (entropy ~0) and a fair coin (log 2)
    batch = torch.tensor([[60.0, 0.0], [0.0, 0.0]])
    assert prediction_entropy(batch).item() == pytest.approx(math.log(2) / 2, rel=1e-6)


def test_prediction_entropy_rejects_a_vector():
    with pytest.raises(ParameterError, match="logits"):
        prediction_entropy(torch.zeros(3))


# ----------------------------------------------------------------------------- merged weights
def test_merged_params_are_base_plus_weighted_task_vectors():
    base = {"W": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([0.5])}
    tau = {"a": {"W": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([2.0])},
           "b": {"W": torch.tensor([[0.0, -4.0]]), "b": torch.tensor([1.0])}}
    # layer-wise: λ[task, layer] with layers (W, b)
    out = merged_params(base, tau, torch.tensor([[0.5, 0.1], [0.25, 1.0]]), ["W", "b"])
    assert torch.equal(out["W"], torch.tensor([[1.5, 1.0]]))  # [1 + .5, 2 - .25*4]
    assert torch.allclose(out["b"], torch.tensor([0.5 + 0.2 + 1.0]))
    # task-wise: one λ per task for every layer
    out = merged_params(base, tau, torch.tensor([0.5, 0.25]), ["W", "b"])
    assert torch.allclose(out["b"], torch.tensor([0.5 + 1.0 + 0.25]))


def test_init_is_respected_and_merged_is_theta0_plus_lambda_tau():
    base, models, unlabeled = toy()
    res = adamerging(base, models, unlabeled, linear_forward, steps=0)
    assert res.coefficients["lambda"].tolist() == pytest.approx([0.3, 0.3])
    for k in ("W", "b"):
        expected = base[k] + 0.3 * sum(m[k] - base[k] for m in models.values())
        assert torch.allclose(res.merged[k], expected, atol=1e-6)
    assert torch.equal(res.merged["steps"], base["steps"])  # integer buffers come from the base
    res = adamerging(base, models, unlabeled, linear_forward, steps=0, init=0.7, granularity="layer")
    assert set(res.coefficients["lambda"].round(6)) == {0.7}


def test_granularity_gives_one_lambda_per_task_or_per_task_and_tensor():
    base, models, unlabeled = toy()
    task = adamerging(base, models, unlabeled, linear_forward, steps=1, granularity="task")
    layer = adamerging(base, models, unlabeled, linear_forward, steps=1, granularity="layer")
    assert list(task.coefficients["task"]) == ["a", "b"] and set(task.coefficients["layer"]) == {"all"}
    assert len(layer.coefficients) == 2 * 2  # (a, b) x (W, b); the int buffer carries no λ
    assert set(zip(layer.coefficients["task"], layer.coefficients["layer"])) == {
        ("a", "W"), ("a", "b"), ("b", "W"), ("b", "b")}
    assert layer.matrix().shape == (2, 2) and task.matrix().shape == (2, 1)


# ----------------------------------------------------------------------------- the gradient step
def objective(base, models, unlabeled, lam):
    """sum_t mean entropy of the merged linear model on task t's batch, λ per task (by hand)."""
    W = base["W"].double() + sum(l * (models[t]["W"].double() - base["W"].double()) for t, l in zip(models, lam))
    b = base["b"].double() + sum(l * (models[t]["b"].double() - base["b"].double()) for t, l in zip(models, lam))
    total = 0.0
    for t in models:
        p = torch.softmax(unlabeled[t][0].double() @ W.T + b, dim=-1)
        total += float(-(p * p.log()).sum(-1).mean())
    return total


def test_one_sgd_step_follows_the_finite_difference_gradient():
    base, models, unlabeled = toy(seed=3)
    res = adamerging(base, models, unlabeled, linear_forward, steps=1, lr=1.0, optimizer="sgd", clamp=None)
    eps = 1e-5
    for i in range(2):
        up, down = [0.3, 0.3], [0.3, 0.3]
        up[i] += eps
        down[i] -= eps
        grad = (objective(base, models, unlabeled, up) - objective(base, models, unlabeled, down)) / (2 * eps)
        assert res.coefficients["lambda"][i] == pytest.approx(0.3 - grad, abs=1e-4)
    assert res.history["entropy"][0] == pytest.approx(objective(base, models, unlabeled, [0.3, 0.3]) / 2, rel=1e-5)


def test_one_adam_step_moves_each_lambda_by_lr_against_its_gradient_sign():
    base, models, unlabeled = toy(seed=3)
    res = adamerging(base, models, unlabeled, linear_forward, steps=1, lr=1e-3)
    for i in range(2):
        up, down = [0.3, 0.3], [0.3, 0.3]
        up[i] += 1e-5
        down[i] -= 1e-5
        grad = objective(base, models, unlabeled, up) - objective(base, models, unlabeled, down)
        # Adam's first step is lr * m_hat / (sqrt(v_hat) + eps) = lr * sign(g)
        assert res.coefficients["lambda"][i] == pytest.approx(0.3 - 1e-3 * math.copysign(1, grad), abs=1e-7)


def test_clamp_keeps_lambda_in_unit_interval():
    base, models, unlabeled = toy(seed=3)
    res = adamerging(base, models, unlabeled, linear_forward, steps=3, lr=10.0, optimizer="sgd", init=0.5)
    assert res.coefficients["lambda"].between(0.0, 1.0).all()


# ----------------------------------------------------------------------------- TIES vectors (AdaMerging++)
def test_ties_vectors_are_globally_trimmed_and_sign_agreeing():
    base = {"W": torch.zeros(2, 2), "b": torch.zeros(2)}
    models = {"a": {"W": torch.tensor([[4.0, -1.0], [0.5, 3.0]]), "b": torch.tensor([-2.0, 0.1])},
              "b": {"W": torch.tensor([[-5.0, 2.0], [0.2, 1.0]]), "b": torch.tensor([3.0, -0.3])}}
    unlabeled = {t: [torch.ones(1, 2)] for t in models}
    res = adamerging(base, models, unlabeled, linear_forward, steps=0, init=1.0, vectors="ties", density=0.5)
    # global top-3 of 6 per task: a keeps 4, 3, -2; b keeps -5, 3, 2. Elected signs: W00 4-5<0 -> only b's -5;
    # W01 b's 2 (a's -1 trimmed); W11 a's 3; b0 -2+3>0 -> only b's 3.
    assert torch.equal(res.merged["W"], torch.tensor([[-5.0, 2.0], [0.0, 3.0]]))
    assert torch.equal(res.merged["b"], torch.tensor([3.0, 0.0]))
    # the same as taskvec's TIES functions, step by step
    tau = {t: {k: models[t][k] - base[k] for k in base} for t in models}
    trimmed = {t: {k: trim_topk(v, 0.5, threshold=global_magnitude_threshold(lambda t=t: iter(tau[t].values()), 0.5))
                   for k, v in tau[t].items()} for t in tau}
    for k in base:
        stacked = torch.stack([trimmed[t][k] for t in tau])
        expected = (stacked * agreement(stacked, elect_sign(stacked))).sum(0)
        assert torch.equal(res.merged[k], expected)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kw, name", [
    ({"granularity": "block"}, "granularity"), ({"steps": -1}, "steps"), ({"steps": 1.5}, "steps"),
    ({"lr": 0.0}, "lr"), ({"lr": float("nan")}, "lr"), ({"vectors": "dare"}, "vectors"),
    ({"optimizer": "lbfgs"}, "optimizer"), ({"init": "0.3"}, "init"), ({"density": 0.0}, "density"),
])
def test_bad_parameters_are_named(kw, name):
    base, models, unlabeled = toy()
    with pytest.raises(ParameterError, match=name):
        adamerging(base, models, unlabeled, linear_forward, vectors=kw.pop("vectors", "ties" if "density" in kw
                                                                           else "task_arithmetic"), **kw)


def test_bad_unlabeled_and_models_are_named():
    base, models, unlabeled = toy()
    with pytest.raises(ParameterError, match="unlabeled"):
        adamerging(base, models, {}, linear_forward)
    with pytest.raises(ParameterError, match="same tasks.*'c'"):
        adamerging(base, models, {**unlabeled, "c": unlabeled["a"]}, linear_forward)
    with pytest.raises(ParameterError, match=r"unlabeled\['a'\] holds no batch"):
        adamerging(base, models, {"a": [], "b": unlabeled["b"]}, linear_forward, steps=1)
    with pytest.raises(ParameterError, match="models"):
        adamerging(base, {}, unlabeled, linear_forward)
    with pytest.raises(ParameterError, match=r"models\['a'\] lacks tensor 'b'"):
        adamerging(base, {**models, "a": {"W": models["a"]["W"]}}, unlabeled, linear_forward)
    with pytest.raises(ParameterError, match="forward"):
        adamerging(base, models, unlabeled, None)


# ----------------------------------------------------------------------------- entropy minimisation helps
def test_entropy_minimisation_raises_lambda_on_separable_tasks():
    """Two tasks, each a linear classifier reading its own feature (task a: x0, task b: x1) from a zero base.
    The merged logits are λ_a·(±x0) + λ_b·(±x1): on each task's inputs (its feature of magnitude 2, the other
    feature ~0) the entropy falls as that task's λ grows, so every λ must rise from 0.3 and the entropy fall."""
    g = torch.Generator().manual_seed(0)
    base = {"W": torch.zeros(2, 2), "b": torch.zeros(2)}
    models = {"a": {"W": torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), "b": torch.zeros(2)},
              "b": {"W": torch.tensor([[0.0, 1.0], [0.0, -1.0]]), "b": torch.zeros(2)}}

    def inputs(axis):
        x = 0.05 * torch.randn(32, 2, generator=g)
        x[:, axis] = 2.0 * torch.where(torch.rand(32, generator=g) < 0.5, -1.0, 1.0)
        return [x[:16], x[16:]]

    unlabeled = {"a": inputs(0), "b": inputs(1)}
    res = adamerging(base, models, unlabeled, linear_forward, steps=40, lr=1e-2)
    lam = dict(zip(res.coefficients["task"], res.coefficients["lambda"]))
    assert lam["a"] > 0.6 and lam["b"] > 0.6
    assert res.history["entropy"].iloc[-1] < 0.5 * res.history["entropy"].iloc[0]


# ----------------------------------------------------------------------------- properties
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_lambda_zero_is_the_base_and_lambda_one_on_one_task_is_the_finetuned_model(seed):
    base, models, unlabeled = toy(seed=seed)
    zero = adamerging(base, models, unlabeled, linear_forward, steps=0, init=0.0, show_progress=False)
    for k in base:
        assert torch.allclose(zero.merged[k], base[k])
    one = adamerging(base, {"a": models["a"]}, {"a": unlabeled["a"]}, linear_forward, steps=0, init=1.0,
                     granularity="layer", show_progress=False)
    for k in ("W", "b"):
        assert torch.allclose(one.merged[k], models["a"][k], atol=1e-6)


# ----------------------------------------------------------------------------- the result object
def test_result_prints_plots_and_is_exported_lazily():
    base, models, unlabeled = toy()
    res = taskvec.adamerging(base, models, unlabeled, linear_forward, steps=2, granularity="layer")
    assert isinstance(res, AdaMergingResult)
    text = repr(res)
    assert "layer-wise AdaMerging" in text and "4 coefficients" in text and "2 adam steps" in text
    assert list(res.history.columns[:2]) == ["step", "entropy"] and len(res.history) == 2
    fig = res.plot()
    assert fig.axes[0].get_title() == "layer-wise AdaMerging: learned λ"
    assert len(res.plot_history().axes[0].lines) == 3  # the mean and one curve per task
