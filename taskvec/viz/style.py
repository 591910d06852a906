"""The one house style: seaborn 'whitegrid' + colour-blind palette, and how figures are saved.

Every figure the project makes (analysis, notebooks, `taskvec demo`) goes
through `new_figure()` and `save_figure()`, so they all look alike and land in
`figures/` as PNG + SVG under stable names.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from taskvec.errors import OutputError

#: Diverging colour map for signed quantities (cosine, signed deltas); always centred at 0.
DIVERGING_CMAP = "RdBu_r"
#: Sequential colour map for rates and magnitudes (conflict fraction, sparsity).
SEQUENTIAL_CMAP = "rocket_r"
#: Qualitative palette (colour-blind safe) for lines and bars.
PALETTE = "colorblind"

_FONT = {"family": "sans-serif", "sans-serif": ["DejaVu Sans", "Arial", "Helvetica"]}


def house_rc() -> dict:
    """The matplotlib rcParams of the house style (seaborn whitegrid/notebook + a few fixes)."""
    import seaborn as sns

    rc: dict = {}
    rc.update(sns.axes_style("whitegrid"))
    rc.update(sns.plotting_context("notebook", font_scale=0.95))
    rc.update(
        {
            "axes.prop_cycle": matplotlib.cycler(color=sns.color_palette(PALETTE)),
            "font.family": _FONT["family"],
            "font.sans-serif": _FONT["sans-serif"],
            "axes.titlesize": 12.5,
            "axes.titleweight": "bold",
            "axes.titlepad": 8.0,
            "axes.labelsize": 11.0,
            "legend.fontsize": 9.5,
            "legend.title_fontsize": 10.0,
            "legend.frameon": False,
            "figure.dpi": 110,
            "savefig.dpi": 150,
            "savefig.bbox": "tight",
            "savefig.pad_inches": 0.08,
            "image.cmap": "viridis",
            "svg.fonttype": "none",  # text stays text in SVGs (searchable, small)
            "svg.hashsalt": "taskvec",  # stable element ids: re-saving an unchanged figure gives the same SVG
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )
    return rc


def set_style() -> None:
    """Apply the house style globally (call once at the top of a notebook)."""
    import matplotlib.pyplot as plt

    plt.rcParams.update(house_rc())


@contextlib.contextmanager
def style():
    """Apply the house style inside a `with` block only (plot functions use this; global state is untouched)."""
    with matplotlib.rc_context(house_rc()):
        yield


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] | None = None, **subplot_kw):
    """A Figure in the house style, not registered with pyplot.

    Notebooks display it once (as the returned value) and loops that make many
    figures don't leak memory. Returns (fig, axes) like `plt.subplots`.
    Call inside `style()` so the figure picks up the house rcParams.
    """
    if figsize is None:
        figsize = (6.4 * ncols, 4.2 * nrows)
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=True, **subplot_kw)
    return fig, axes


def figure_name(name: str) -> str:
    """A stable, filesystem-safe file stem: lower case, [a-z0-9._-] only."""
    stem = re.sub(r"[^a-z0-9._-]+", "-", name.strip().lower()).strip("-.")
    if not stem:
        raise OutputError(f"figure name {name!r} has no usable characters")
    return stem


def save_figure(fig: Figure, name: str, dir: str | os.PathLike = "figures", *, formats: tuple[str, ...] = ("png", "svg")) -> dict[str, Path]:
    """Write `fig` as DIR/NAME.png and DIR/NAME.svg, each atomically (temp file + rename).

    A crash half-way never leaves a truncated figure under the final name.
    Returns {format: path}.
    """
    out_dir = Path(dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"can't create figure directory {str(out_dir)!r}: {e}") from e
    stem = figure_name(name)
    written: dict[str, Path] = {}
    with matplotlib.rc_context(house_rc()):
        for fmt in formats:
            final = out_dir / f"{stem}.{fmt}"
            with atomic_file(final, "wb") as fh:
                # No dates or version strings: the same figure always gives the same bytes.
                metadata = {"Date": None, "Creator": None} if fmt == "svg" else {"Software": None} if fmt == "png" else None
                fig.savefig(fh, format=fmt, metadata=metadata)
            written[fmt] = final
    return written


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb"):
    """Open a temp file beside `path`; rename it onto `path` only if the block succeeds (else delete it)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": ""})) as fh:
            yield fh
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
