"""ipywidgets front-ends over taskvec.methods and taskvec.analysis, static without a front-end.

    from taskvec.widgets import interact, Control, toy
    interact(toy.task_arithmetic_view, Control("lam", 0.5, -1.0, 1.5, 0.05, label="λ"))

Every view is a plain function of its slider values returning a figure or a
table, so tests (and scripts) call it directly. `ZooLab` holds an encoder zoo
in memory so that a slider move evaluates a model in seconds; `LMLab` does the same for the
language-model (toxicity) zoo.
"""
from taskvec.widgets.core import Control, View, fast_mode, figures_dir, interact, is_static
from taskvec.widgets.lab import ZooLab

__all__ = ["Control", "LMLab", "View", "ZooLab", "fast_mode", "figures_dir", "interact", "is_static"]


def __getattr__(name: str):
    # LMLab (language-model zoo in memory) lives with its views; imported on first use
    if name == "LMLab":
        from taskvec.widgets.lm_views import LMLab

        return LMLab
    raise AttributeError(f"module 'taskvec.widgets' has no attribute {name!r}")
