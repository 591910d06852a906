"""Figures shared by the widget modules (`views`, `sweeps`, `spectra`): kept apart so that the sweep engine
and the views built on it never import each other."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from taskvec.viz import new_figure, style


def per_task_bars(lab, acc: Mapping[str, float], label: str, *, color: str = "C0", title: str):
    """Test accuracy per task of one merged model (`acc`), between the base and each task's fine-tuned model."""
    base, ft = lab.base_accuracy(), lab.finetuned_accuracy()
    x = np.arange(len(lab.tasks))
    with style():
        fig, ax = new_figure(figsize=(7.5, 3.9))
        ax.bar(x - 0.27, [base[t] for t in lab.tasks], 0.27, color="0.65", label="base θ₀")
        ax.bar(x, [acc[t] for t in lab.tasks], 0.27, color=color, label=label)
        ax.bar(x + 0.27, [ft[t] for t in lab.tasks], 0.27, color="C2", label="fine-tuned on the task")
        ax.set_xticks(x, lab.tasks, rotation=30, ha="right")
        ax.set_ylim(0, 1.22)
        ax.set_ylabel("test accuracy")
        ax.set_title(title)
        ax.legend(loc="upper right", ncol=3, fontsize=8.5)
    return fig
