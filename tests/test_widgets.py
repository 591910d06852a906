"""Widget layer: controls degrade to static output, view callbacks answer slider moves, toy views compute
the papers' steps, and the λ-selection logic of the real-model views follows EMTA's criterion."""
import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from taskvec.errors import ParameterError
from taskvec.widgets import Control, fast_mode, figures_dir, interact, is_static, toy, views


# ------------------------------------------------------------------ core

def test_control_validates_its_default():
    with pytest.raises(ParameterError, match="'lam'.*outside"):
        Control("lam", 2.0, 0.0, 1.0)
    with pytest.raises(ParameterError, match="'task'.*not in"):
        Control("task", "x", options=["a", "b"])


def test_static_interact_renders_once_at_defaults_and_update_recomputes():
    calls = []

    def fn(lam, task):
        calls.append((lam, task))
        return f"{task}:{lam}"

    view = interact(fn, Control("lam", 0.5, 0.0, 1.0, 0.1), Control("task", "a", options=["a", "b"]), static=True)
    assert calls == [(0.5, "a")] and view.last == "a:0.5"
    assert view.update(lam=0.9) == "a:0.9"          # what a slider move does
    assert view.update(task="b") == "b:0.5"
    with pytest.raises(ParameterError, match="unknown control"):
        view.update(density=0.2)


def test_interact_with_widgets_rerenders_on_value_change():
    pytest.importorskip("ipywidgets")
    seen = []
    view = interact(lambda lam: seen.append(lam) or lam, Control("lam", 0.5, 0.0, 1.0, 0.1), static=False)
    assert seen == [0.5]
    view.update(lam=0.8)                             # sets the slider; its observer re-renders
    assert seen[-1] == pytest.approx(0.8) and view.last == pytest.approx(0.8)


def test_a_raising_callback_is_not_swallowed_and_keeps_the_last_result():
    # the slider's observer re-raises (tests and kernels see it) after printing the traceback into the widget's
    # output, which is all a front-end user sees (tests/test_browser.py drives that in a real browser)
    pytest.importorskip("ipywidgets")

    def view_fn(x):
        if x > 0.5:
            raise RuntimeError(f"x = {x} is too large")
        return x

    view = interact(view_fn, Control("x", 0.5, 0.0, 1.0, 0.1), static=False)
    with pytest.raises(RuntimeError, match="too large"):
        view.update(x=0.9)
    assert view.last == 0.5
    view.update(x=0.2)
    assert view.last == pytest.approx(0.2)


def test_environment_switches(monkeypatch, tmp_path):
    monkeypatch.setenv("TASKVEC_FAST", "1")
    assert fast_mode()
    monkeypatch.setenv("TASKVEC_FAST", "0")
    assert not fast_mode()
    monkeypatch.setenv("TASKVEC_STATIC", "1")
    assert is_static()
    monkeypatch.setenv("TASKVEC_FIGURES", str(tmp_path))
    assert figures_dir("elsewhere") == tmp_path


# ------------------------------------------------------------------ toy views (notebook 00)

def test_ties_steps_match_hand_computation():
    s = toy.ties_steps(density=0.5)
    # density 0.5 keeps the 4 largest |τ| of each row of TOY_DELTAS
    assert (s["trimmed"] != 0).sum(1).tolist() == [4, 4, 4]
    assert s["trimmed"][0].tolist() == pytest.approx([0.9, 0, 0.4, 0, -0.7, 0, 0, 0.6])
    # p1: trimmed 0.9, 0.7, -0.2 -> mass +1.4 -> γ = +, disjoint mean (0.9 + 0.7) / 2
    assert s["sign"][0] == 1 and s["ties"][0] == pytest.approx(0.8)
    # p5: -0.7, -0.6, +0.8 -> mass -0.5 -> γ = -, mean of the two negatives
    assert s["sign"][4] == -1 and s["ties"][4] == pytest.approx(-0.65)
    # count election on p5 agrees (2 negatives vs 1 positive)
    assert toy.ties_steps(0.5, "count")["sign"][4] == -1


def test_slerp_path_keeps_the_norm_and_linear_shrinks_it():
    path = toy.slerp_path(21)
    assert np.linalg.norm(path["slerp"], axis=1) == pytest.approx(np.ones(21), abs=1e-6)
    lin = np.linalg.norm(path["linear"], axis=1)
    assert lin[10] == pytest.approx(0.5, abs=1e-6)      # chord midpoint of two unit vectors 120° apart
    assert lin[0] == pytest.approx(1.0) and lin[-1] == pytest.approx(1.0)


@pytest.mark.parametrize("view, kwargs", [
    (toy.task_arithmetic_view, {"lam": 0.7, "negate": "A"}),
    (toy.ties_view, {"density": 0.25, "consensus": "count"}),
    (toy.dare_view, {"p": 0.9, "seed": 3}),
    (toy.slerp_view, {"t": 0.2}),
])
def test_toy_views_draw_a_titled_figure(view, kwargs):
    fig = view(**kwargs)
    assert isinstance(fig, Figure)
    assert all(ax.get_title() for ax in fig.axes if ax.has_data())


# ------------------------------------------------------------------ λ selection on a lab with known answers

from tests.helpers import OutcomeLab  # noqa: E402

class FakeLab(OutcomeLab):
    """Accuracy is a known function of the coefficients: target falls 0.2 per unit of λ, the control
    falls 0.02 λ² (so only small λ keep it), addition helps up to λ = 0.5."""

    tasks = ["a", "b"]
    control = ["c"]

    def apply(self, coefficients):
        return dict(coefficients)

    def _acc(self, w, task):
        w = w or {}
        if task == "c":
            return 0.8 - 0.02 * sum(lam ** 2 for lam in w.values())
        lam = w.get(task, 0.0)
        return 0.9 + 0.2 * lam - 0.4 * max(lam - 0.5, 0.0) if lam >= 0 else 0.9 + 0.2 * lam

    def accuracy(self, weights=None, *, split="test", tasks=None):
        return {t: self._acc(weights, t) for t in (tasks or self.tasks + self.control)}

    def base_accuracy(self, split="test"):
        return self.accuracy(None, split=split)

    def finetuned_accuracy(self, split="test"):
        return {"a": 1.0, "b": 1.0}

    def normalized(self, acc, split="test"):
        ft = self.finetuned_accuracy(split)
        return {t: acc[t] / ft[t] for t in acc if t in ft}


def test_negation_lambda_is_the_largest_drop_that_keeps_the_control():
    table = views.negation_table(FakeLab(), lambdas=(1.0, 2.0, 3.0))
    # control: 0.78, 0.72, 0.62 vs floor 0.95 * 0.8 = 0.76 -> only λ = 1 is allowed
    assert table["lambda"].tolist() == [1.0, 1.0]
    assert table["target_negated"].tolist() == pytest.approx([0.7, 0.7])
    assert table["control_negated"].tolist() == pytest.approx([0.78, 0.78])
    loose = views.negation_table(FakeLab(), lambdas=(1.0, 2.0, 3.0), control_floor=0.5)
    assert loose["lambda"].tolist() == [3.0, 3.0]


def test_best_lambda_maximises_mean_normalised_validation_accuracy():
    lab = FakeLab()
    lam, acc = views.best_lambda(lab, lambda l: lab.apply({"a": l, "b": l}), ["a", "b"], (0.2, 0.5, 1.0))
    assert lam == 0.5 and acc["a"] == pytest.approx(1.0)


def test_addition_curve_and_method_comparison_rows():
    lab = FakeLab()
    curve = views.addition_curve(lab, (0.2, 0.5, 1.0))
    assert curve["n_tasks"].tolist() == [1, 2] and curve["lambda"].tolist() == [0.5, 0.5]
    assert curve["normalized_accuracy"].tolist() == pytest.approx([1.0, 1.0])
    cmp = views.compare_methods(lab, {"fixed": {"a": 0.2, "b": 0.2}, "tuned": lambda l: {"a": l, "b": l}}, (0.2, 0.5))
    assert cmp["method"].tolist() == ["fixed", "tuned"]
    assert cmp["lambda"].isna().tolist() == [True, False]
    assert cmp["normalized_accuracy"].tolist() == pytest.approx([0.94, 1.0])
    assert isinstance(views.plot_method_comparison(cmp), Figure)
    assert isinstance(views.plot_addition_curve(curve), Figure)


def test_trimmed_sum_is_base_plus_lambda_sum_of_trimmed_vectors():
    class TinyLab:
        base = {"w": torch.zeros(4)}
        tasks = ["x", "y"]
        vectors = {"x": {"w": torch.tensor([1.0, -3.0, 0.5, 2.0])}, "y": {"w": torch.tensor([-4.0, 1.0, 0.1, 0.2])}}

        def task_vector(self, t):
            return self.vectors[t]

    w = views.trimmed_sum(TinyLab(), density=0.5)(0.5)["w"]
    # top-2 of x: -3, 2; top-2 of y: -4, 1 -> sum [-4, -2, 0, 2] * 0.5
    assert w.tolist() == pytest.approx([-2.0, -1.0, 0.0, 1.0])


def test_live_view_also_carries_a_static_rendering(monkeypatch):
    """A notebook run headless (CI, nbconvert, GitHub) has no widget front-end: the displayed bundle must
    hold the current figure as a PNG (or a table as HTML) next to the widget view."""
    pytest.importorskip("ipywidgets")
    import base64

    import pandas as pd

    from taskvec.widgets import core

    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj, raw=False, **kw: shown.append((obj, raw)))
    view = interact(toy.slerp_view, Control("t", 0.5, 0.0, 1.0, 0.05), static=False)
    view._ipython_display_()
    bundle, raw = shown[-1]
    assert raw and "application/vnd.jupyter.widget-view+json" in bundle
    assert base64.b64decode(bundle["image/png"]).startswith(b"\x89PNG")
    assert "<table" in core.static_bundle(pd.DataFrame({"a": [1]}))["text/html"]
