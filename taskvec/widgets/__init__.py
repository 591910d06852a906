"""ipywidgets front-ends over taskvec.methods and taskvec.analysis, static without a front-end.

    from taskvec.widgets import interact, Control, toy
    interact(toy.task_arithmetic_view, Control("lam", 0.5, -1.0, 1.5, 0.05, label="λ"))

Every view is a plain function of its slider values returning a figure or a
table, so tests (and scripts) call it directly. `ZooLab` holds an encoder zoo
in memory so that a slider move evaluates a model in seconds.
"""
from taskvec.widgets.core import Control, View, fast_mode, figures_dir, interact, is_static
from taskvec.widgets.lab import ZooLab

__all__ = ["Control", "View", "ZooLab", "fast_mode", "figures_dir", "interact", "is_static"]
