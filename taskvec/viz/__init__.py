"""House plotting style and helpers; every figure in taskvec goes through here.

    from taskvec.viz import set_style, save_figure
    set_style()                                   # once per notebook
    fig = result.plot()                           # analysis objects plot themselves
    save_figure(fig, "cosine-minilm")             # figures/cosine-minilm.{png,svg}, atomically
"""
from taskvec.viz.plots import heatmap, lines, log_histogram, symmetric_limit
from taskvec.viz.style import (
    DIVERGING_CMAP,
    PALETTE,
    SEQUENTIAL_CMAP,
    atomic_file,
    figure_name,
    house_rc,
    new_figure,
    save_figure,
    set_style,
    style,
)

__all__ = [
    "DIVERGING_CMAP",
    "PALETTE",
    "SEQUENTIAL_CMAP",
    "atomic_file",
    "figure_name",
    "heatmap",
    "house_rc",
    "lines",
    "log_histogram",
    "new_figure",
    "save_figure",
    "set_style",
    "style",
    "symmetric_limit",
]
