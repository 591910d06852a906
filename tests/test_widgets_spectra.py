"""Notebook 07's views: the weight disentanglement error on a tiny fake predictor (by hand), low-rank task
vectors built from cached SVDs against `TaskVector.low_rank`, and ZooLab predictions against its outcomes."""
from __future__ import annotations

import pytest
import torch

from taskvec.errors import ParameterError
from taskvec.widgets import spectra


def fake_predictor(calls=None):
    """Task 'a' has examples x = 0..9, task 'b' x = 0..4. A model θ₀ + α_a τ_a + α_b τ_b predicts on x:
    a: 1{x < 10·α_a} plus, where α_b > 1, a flip of x = 0 (task b's vector leaks into task a);
    b: 1{x < 5·α_b} -- independent of α_a (no leak the other way)."""
    xs = {"a": torch.arange(10), "b": torch.arange(5)}

    def predict(coefficients, tasks):
        if calls is not None:
            calls.append((dict(coefficients), tuple(tasks)))
        al, bl = coefficients.get("a", 0.0), coefficients.get("b", 0.0)
        out = {}
        for t in tasks:
            if t == "a":
                p = (xs["a"] < 10 * al).long()
                if bl > 1:
                    p[0] = 1 - p[0]
            else:
                p = (xs["b"] < 5 * bl).long()
            out[t] = p
        return out

    return predict


def test_disentanglement_error_by_hand_on_a_fake_predictor():
    calls = []
    df = spectra.disentanglement_error(fake_predictor(calls), ("a", "b"), (0.0, 1.0, 1.5))
    assert df.attrs["pair"] == ("a", "b") and len(df) == 9
    xi = df.set_index(["alpha_1", "alpha_2"])
    # task b never moves with α_a: its term is always 0
    assert (df["xi_b"] == 0).all()
    # on task a, adding α_b τ_b changes exactly one of 10 predictions once α_b > 1
    for a1 in (0.0, 1.0, 1.5):
        assert xi.loc[(a1, 0.0), "xi"] == 0.0 and xi.loc[(a1, 1.0), "xi"] == 0.0
        assert xi.loc[(a1, 1.5), "xi"] == pytest.approx(0.1) and xi.loc[(a1, 1.5), "xi_a"] == pytest.approx(0.1)
    # the single-task models are built once per (task, α): 2 tasks x 3 α + 9 combined models
    singles = [c for c in calls if len(c[1]) == 1]
    assert len(singles) == 6 and len(calls) == 6 + 9


def test_disentanglement_error_refuses_bad_pairs_and_grids():
    with pytest.raises(ParameterError, match="two different tasks"):
        spectra.disentanglement_error(fake_predictor(), ("a", "a"), (1.0,))
    with pytest.raises(ParameterError, match="two different tasks"):
        spectra.disentanglement_error(fake_predictor(), ("a",), (1.0,))
    with pytest.raises(ParameterError, match="empty"):
        spectra.disentanglement_error(fake_predictor(), ("a", "b"), ())


def test_plot_disentanglement_draws_one_map_per_pair():
    import matplotlib.pyplot as plt

    df = spectra.disentanglement_error(fake_predictor(), ("a", "b"), (0.5, 1.5))
    fig = spectra.plot_disentanglement({"a · b": df, "again": df})
    assert len([ax for ax in fig.axes if ax.get_title()]) == 2
    plt.close(fig)


# ------------------------------------------------------------------ the real (fast) zoo

@pytest.fixture(scope="module")
def zoo_lab():
    import taskvec.zoo
    from taskvec.widgets import ZooLab

    return ZooLab(taskvec.zoo.build("minilm-tasks", fast=True), limit=8, val_limit=8)


@pytest.mark.slow
def test_low_rank_weights_match_task_vector_low_rank(zoo_lab):
    lab, task = zoo_lab, zoo_lab.tasks[0]
    for f in (0.1, 1.0):
        ours = spectra.low_rank_weights(lab, task, f)
        ref = lab.task_vector(task).low_rank(f).apply_to(lab.base, show_progress=False)
        for k, v in lab.base.items():
            if v.is_floating_point():
                torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-6)
    # storage: every changed matrix stores k(m + n + 1) entries instead of m·n
    assert spectra.storage_share(lab, 1.0, task) == pytest.approx(1.0)
    assert 0.05 < spectra.storage_share(lab, 0.05, task) < spectra.storage_share(lab, 0.1, task) < 0.5


@pytest.mark.slow
def test_low_rank_curve_and_lab_predictions(zoo_lab):
    lab, task = zoo_lab, zoo_lab.tasks[0]
    df = spectra.low_rank_curve(lab, (0.05, 1.0), tasks=[task], n_boot=200)
    full = df.set_index("fraction").loc[1.0]
    assert full["normalized_accuracy"] == pytest.approx(1.0) and full["diff"] == pytest.approx(0.0)
    assert set(df.attrs["correct"]) == {0.05, 1.0}
    # predictions agree with the cached outcomes of the same model, and fill that cache
    weights = lab.apply({task: 0.7})
    pred = lab.predictions(weights, split="val", tasks=[task])[task]
    labels = torch.tensor(lab.labels(task, "val"))
    assert pred.shape == labels.shape
    assert torch.equal(lab.correct(weights, split="val", tasks=[task])[task], pred == labels)
    xi = spectra.disentanglement_error(spectra.lab_predictor(lab, "val"), (task, lab.tasks[1]), (0.0, 1.0))
    assert xi.set_index(["alpha_1", "alpha_2"]).loc[(0.0, 0.0), "xi"] == 0.0
    assert ((xi["xi"] >= 0) & (xi["xi"] <= 2)).all()
