"""The reproduction protocols on tiny inputs with known answers: EMTA's zero-shot head (logits = s · cos), the
negation criterion (largest λ keeping the control), intervals on negation / addition / method tables, the
out-of-distribution table and the head comparison."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from taskvec.errors import ParameterError
from taskvec.eval.classification import TaskHead


def test_zero_shot_head_is_scaled_cosine_to_the_prompts(tmp_path):
    prompts = torch.tensor([[3.0, 4.0], [1.0, 0.0]])          # embeddings of two label prompts
    w = torch.nn.functional.normalize(prompts, dim=-1)          # [[0.6, 0.8], [1, 0]]
    head = TaskHead.from_weights(w, torch.zeros(2), ["a", "b"], "t", normalize=True, scale=30.0, kind="zero-shot")
    f = torch.tensor([[0.0, 2.0], [5.0, 0.0]])                  # features: unit (0, 1) and (1, 0) after normalising
    # by hand: cos((0,1), (0.6,0.8)) = 0.8, cos((0,1), (1,0)) = 0; cos((1,0), ·) = 0.6, 1
    assert torch.allclose(head(f), torch.tensor([[24.0, 0.0], [18.0, 30.0]]), atol=1e-5)
    head.save(tmp_path / "h.safetensors")
    back = TaskHead.load(tmp_path / "h.safetensors")
    assert (back.kind, back.scale, back.normalize) == ("zero-shot", 30.0, True)
    assert torch.equal(back(f), head(f))
    # a probe head uses the features as they are
    probe = TaskHead.from_weights(w, torch.zeros(2))
    assert torch.allclose(probe(f), torch.tensor([[1.6, 0.0], [3.0, 5.0]]), atol=1e-5)


def test_zero_shot_head_from_an_encoder_checks_its_inputs():
    from tests.helpers import tiny_bert

    class Tok:
        def __call__(self, texts, **kw):
            ids = torch.tensor([[1 + (hash(t) % 50), 2] for t in texts])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    enc = tiny_bert()
    head = TaskHead.zero_shot(enc, Tok(), ["a cat", "a dog"], ["cat", "dog"], "pets", scale=10.0)
    assert head.linear.weight.norm(dim=1).tolist() == pytest.approx([1.0, 1.0])
    assert head.prompts == ["a cat", "a dog"] and head.kind == "zero-shot"
    with pytest.raises(ParameterError, match="pets.*1 prompts for 2 labels"):
        TaskHead.zero_shot(enc, Tok(), ["a cat"], ["cat", "dog"], "pets")
    with pytest.raises(ParameterError, match="scale"):
        TaskHead.zero_shot(enc, Tok(), ["a cat", "a dog"], None, "pets", scale=0)


# ------------------------------------------------------------------ a lab with known per-example outcomes

class KnownLab:
    """Accuracies are known functions of the coefficients, realised as per-example outcomes (see OutcomeLab):
    negating a task lowers it by 0.15 per unit of λ; every negation costs the control 0.01 λ²; adding all
    tasks helps up to λ = 0.5. Its held-out task and shifted split keep the base's accuracy minus 0.02 per unit
    of total |λ|."""

    def __new__(cls):
        from tests.helpers import OutcomeLab

        class _Lab(OutcomeLab):
            tasks = ["a", "b"]
            control = ["c"]
            heldout = ["h"]
            zoo = None

            def apply(self, coefficients):
                return dict(coefficients)

            def finetuned(self, task):
                return {task: 1.0}

            def has_split(self, task, split):
                return split in ("val", "test") or (split == "shift" and task == "a")

            def _acc(self, w, task, split):
                w = w or {}
                total = sum(abs(v) for v in w.values())
                if task == "c":
                    return 0.8 - 0.01 * sum(v ** 2 for v in w.values())
                if task == "h" or split == "shift":
                    return 0.6 - 0.02 * total
                lam = w.get(task, 0.0)
                return 0.6 + 0.6 * lam - 0.8 * max(lam - 0.5, 0.0) if lam >= 0 else max(0.6 + 0.15 * lam, 0.0)

            def accuracy(self, weights=None, *, split="test", tasks=None):
                return {t: self._acc(weights, t, split) for t in (tasks or self.tasks + self.control)}

            def base_accuracy(self, split="test"):
                return self.accuracy(None, split=split, tasks=self.all_tasks)

            def finetuned_accuracy(self, split="test"):
                return {"a": 0.9, "b": 0.9}

            def normalized(self, acc, split="test"):
                return {t: acc[t] / 0.9 for t in acc if t in ("a", "b")}

        return _Lab()


def test_negation_takes_the_largest_lambda_that_keeps_the_control_and_reports_intervals():
    from taskvec.widgets import views

    lab = KnownLab()
    # control after −λτ: 0.8 − 0.01 λ²; floor 0.95 · 0.8 = 0.76 -> λ ≤ 2 allowed: the largest is 2
    table = views.negation_table(lab, lambdas=(0.5, 1.0, 2.0, 3.0))
    assert table["lambda"].tolist() == [2.0, 2.0]
    assert table["target_negated"].tolist() == pytest.approx([0.3, 0.3], abs=1e-3)
    assert table["target_drop"].tolist() == pytest.approx([0.3, 0.3], abs=1e-3)
    assert (table["target_drop_low"] <= table["target_drop"]).all() and (table["target_drop"] <= table["target_drop_high"]).all()
    s = views.negation_summary(table)
    assert s["target_drop"].estimate == pytest.approx(0.3, abs=1e-3) and s["target_drop"].excludes_zero
    assert s["control_drop"].estimate == pytest.approx(0.04, abs=1e-3)
    # outcomes are deterministic patterns (the first k of N examples): a constant shift has a zero-width interval
    assert s["control_drop"].low == pytest.approx(0.04, abs=0.02)
    with pytest.raises(ParameterError, match="negation_table"):
        views.negation_summary(pd.DataFrame({"task": ["a"]}))       # a table without per-example outcomes


def test_addition_curve_interval_brackets_the_estimate():
    from taskvec.widgets import views

    lab = KnownLab()
    curve = views.addition_curve(lab, (0.2, 0.5, 1.0), sizes=(1, 2))
    assert curve["lambda"].tolist() == [0.5, 0.5]                          # the peak of 0.6 + 0.6 λ
    assert curve["normalized_accuracy"].tolist() == pytest.approx([0.9 / 0.9, 0.9 / 0.9], abs=1e-3)
    assert (curve["low"] <= curve["normalized_accuracy"]).all() and (curve["normalized_accuracy"] <= curve["high"]).all()


def test_generalization_table_compares_each_model_with_the_base_on_heldout_and_shift():
    from taskvec.widgets import views

    lab = KnownLab()
    df = views.generalization_table(lab, {"sum": lab.apply({"a": 1.0, "b": 1.0})})
    row = df.set_index(["model", "kind"])
    # held-out: control c (0.8 − 0.01·2) and h (0.6 − 0.02·2), mean vs base mean (0.8 + 0.6) / 2
    assert row.loc[("base θ₀", "held-out"), "mean"] == pytest.approx(0.7, abs=1e-3)
    assert row.loc[("sum", "held-out"), "mean"] == pytest.approx((0.78 + 0.56) / 2, abs=1e-3)
    assert row.loc[("sum", "held-out"), "diff_vs_base"] == pytest.approx(-0.03, abs=1e-3)
    assert row.loc[("sum", "shift"), "mean"] == pytest.approx(0.56, abs=1e-3)
    assert row.loc[("sum", "shift"), "verdict"] == "a < b"
    per_task = df.attrs["per_task"]
    assert set(per_task["task"]) == {"c", "h", "a"}
