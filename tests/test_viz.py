"""House style and figure saving; analysis objects plot themselves with labelled, naturally ordered axes."""
from __future__ import annotations

import os

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

os.environ.setdefault("TASKVEC_NO_PROGRESS", "1")

from taskvec.errors import OutputError  # noqa: E402
from taskvec.viz import figure_name, heatmap, new_figure, save_figure, style, symmetric_limit  # noqa: E402


def test_figure_names_are_stable_and_safe():
    assert figure_name("Cosine matrix: MiniLM / 3 tasks") == "cosine-matrix-minilm-3-tasks"
    assert figure_name("dare_sweep.p0.9") == "dare_sweep.p0.9"
    with pytest.raises(OutputError):
        figure_name("///")


def test_save_figure_writes_png_and_svg_atomically_and_deterministically(tmp_path):
    with style():
        fig, ax = new_figure()
        ax.plot([0, 1], [1, 0])
        ax.set_title("a line")
    paths = save_figure(fig, "My Figure", tmp_path / "figs")
    assert set(paths) == {"png", "svg"}
    assert paths["png"].name == "my-figure.png" and paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in paths["svg"].read_bytes()[:400]
    svg = paths["svg"].read_bytes()
    save_figure(fig, "My Figure", tmp_path / "figs")
    assert paths["svg"].read_bytes() == svg  # no dates / random ids: re-saving gives identical bytes
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["my-figure.png", "my-figure.svg"]  # no temp files


def test_save_figure_failure_leaves_no_file(tmp_path, monkeypatch):
    fig, _ = new_figure()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", boom)
    with pytest.raises(RuntimeError):
        save_figure(fig, "broken", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_style_is_scoped():
    before = matplotlib.rcParams["axes.titleweight"]
    with style():
        assert matplotlib.rcParams["axes.titleweight"] == "bold"
    assert matplotlib.rcParams["axes.titleweight"] == before


def test_symmetric_limit_rounds_up_to_readable_values():
    assert symmetric_limit([0.013, -0.004]) == pytest.approx(0.02)
    assert symmetric_limit([-0.3, 0.1]) == pytest.approx(0.5)
    assert symmetric_limit([1.0]) == pytest.approx(1.0)


def test_diverging_heatmap_is_centred_at_zero():
    data = pd.DataFrame([[1.0, -0.03], [-0.03, 1.0]], index=["a", "b"], columns=["a", "b"])
    with style():
        fig, ax = new_figure()
        heatmap(ax, data, title="t", xlabel="x", ylabel="y", cbar_label="cos", diverging=True, vmax=0.05)
    mesh = ax.collections[0]
    assert mesh.norm.vmin == pytest.approx(-0.05) and mesh.norm.vmax == pytest.approx(0.05)
    assert [t.get_text() for t in ax.texts] == ["1.00", "-0.03", "-0.03", "1.00"]


def _tvs(n_layers=12):
    g = torch.Generator().manual_seed(0)
    keys = [f"model.layers.{i}.{m}.weight" for i in range(n_layers) for m in ("self_attn.q_proj", "mlp.down_proj")]
    keys += ["model.embed_tokens.weight", "model.norm.weight"]
    return {name: {k: torch.randn(16, generator=g) * 1e-3 for k in keys} for name in ("math", "code")}


def _labels(ax, axis):
    ticks = ax.get_yticklabels() if axis == "y" else ax.get_xticklabels()
    return [t.get_text() for t in ticks]


def test_analysis_plots_have_titles_labels_and_numeric_layer_order():
    from taskvec.analysis import conflict_vs_density, cosine_matrix, dare_sweep, profile, sign_conflicts

    tvs = _tvs()
    cos = cosine_matrix(tvs)
    fig = cos.plot(None)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    assert _labels(ax, "y") == ["math", "code"]

    ax = cos.plot("layer").axes[0]
    expected = ["embeddings"] + [str(i) for i in range(12)] + ["other"]  # 2 before 10, layer 0 at the top
    assert _labels(ax, "y") == expected

    # many pairs (9 vectors: 36 pairs, more than the 14 layer groups): one row per pair, groups along x
    many = {f"t{i}": tvs["math"] if i % 2 else tvs["code"] for i in range(9)}
    ax = cosine_matrix(many).plot("layer").axes[0]
    assert ax.get_ylabel() == "task-vector pair" and len(_labels(ax, "y")) == 36
    assert _labels(ax, "x") == expected

    ax = sign_conflicts(tvs, density=0.5).plot("layer_module").axes[0]
    assert _labels(ax, "y") == expected
    assert _labels(ax, "x") == ["attn_q", "mlp_down", "embedding", "norm"]
    assert "conflict" in ax.get_title().lower()

    fig = profile(tvs).plot()
    assert len([a for a in fig.axes if a.get_title()]) == 3
    layer_ax = fig.axes[1]
    assert _labels(layer_ax, "x")[:3] == ["emb", "0", "1"]

    for fig in (conflict_vs_density(tvs, densities=(0.2, 1.0)).plot(), dare_sweep(tvs["math"], ps=(0, 0.5)).plot()):
        ax = fig.axes[0]
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()


def _drawn(ax):
    """The data lines of an axis (seaborn also parks empty legend handles in ax.lines)."""
    return [(np.asarray(ln.get_xdata(), float), np.asarray(ln.get_ydata(), float)) for ln in ax.lines
            if len(ln.get_xdata())]


def test_analysis_plots_draw_their_data():
    from taskvec.analysis import conflict_vs_density, cosine_matrix, dare_sweep, profile, sign_conflicts
    from taskvec.analysis.naming import sort_layer_labels

    tvs = _tvs()
    # cosine heatmap: every cell is the matrix entry, annotated; colours centred at 0 up to the rounded-up
    # largest off-diagonal |cos| (0.05 -> 0.1)
    cos = cosine_matrix(tvs)
    m = cos.matrix().to_numpy()
    ax = cos.plot(None).axes[0]
    mesh = ax.collections[0]
    assert np.allclose(np.asarray(mesh.get_array()).reshape(2, 2), m)
    assert [t.get_text() for t in ax.texts] == [f"{v:.3f}" for v in m.ravel()]
    assert (mesh.norm.vmin, mesh.norm.vmax) == pytest.approx((-symmetric_limit([m[0, 1]], floor=0.01),
                                                             symmetric_limit([m[0, 1]], floor=0.01)))

    # sign-conflict heatmap: layer x module cells in percent
    sc = sign_conflicts(tvs, density=0.5)
    cells = np.asarray(sc.plot("layer_module").axes[0].collections[0].get_array(), float).reshape(14, 4)
    table = sc.layer_module("frac_conflict_after").to_numpy() * 100
    assert np.allclose(np.nan_to_num(cells), np.nan_to_num(table)) and 0 <= np.nanmin(cells) <= np.nanmax(cells) <= 100

    # profile: one histogram outline per task (+ the DARE limit marker at 0.005), one line per task per layer
    # panel, x = the 14 layers in natural order, y = the per-layer norms / top-k shares
    prof = profile(tvs)
    fig = prof.plot()
    hist = _drawn(fig.axes[0])
    assert len(hist) == 3 and np.allclose(hist[2][0], 0.005)
    for task, (_, ys) in zip(prof.task_names, hist[:2]):
        shown = prof.histogram[(prof.histogram["task"] == task) & (prof.histogram["bin_lo"] > 0)
                               & np.isfinite(prof.histogram["bin_hi"])]
        assert np.allclose(ys[:-1], shown["fraction"].to_numpy())
    order = sort_layer_labels(prof.layers["layer"])
    for ax, col in ((fig.axes[1], "norm"), (fig.axes[2], "top_5pct_share")):
        drawn = _drawn(ax)
        assert len(drawn) == 2
        for task, (xs, ys) in zip(prof.task_names, drawn):
            want = prof.layers[prof.layers["task"] == task].set_index("layer").loc[order, col].to_numpy()
            assert np.array_equal(xs, np.arange(14)) and np.allclose(ys, want)
    assert fig.axes[2].get_ylim() == pytest.approx((0, 1.02))

    # conflicts vs density: two measures, x = the densities, y = percentages
    curve = conflict_vs_density(tvs, densities=(0.2, 1.0))
    drawn = _drawn(curve.plot().axes[0])
    assert len(drawn) == 2
    assert all(np.allclose(xs, [0.2, 1.0]) for xs, _ in drawn)
    assert np.allclose(drawn[0][1], curve.curve["frac_conflict_after"] * 100)
    assert np.allclose(drawn[1][1], curve.curve["conflict_given_overlap_after"] * 100)

    # DARE sweep: with and without rescale, x = drop rates, y = cosine to tau (1 at p = 0)
    sweep = dare_sweep(tvs["math"], ps=(0, 0.5))
    ax = sweep.plot().axes[0]
    drawn = _drawn(ax)
    assert len(drawn) == 2 and "cos" in ax.get_ylabel()
    for xs, ys in drawn:
        assert np.allclose(xs, [0.0, 0.5]) and ys[0] == pytest.approx(1.0) and 0 < ys[1] < 1
    assert np.allclose(sorted(drawn[0][1]), sorted(sweep.data[sweep.data["rescale"]]["cosine_to_tau"]))


def test_results_render_in_notebooks_and_text():
    from taskvec.analysis import cosine_matrix

    res = cosine_matrix(_tvs(2))
    html = res._repr_html_()
    assert "<table" in html and "CosineMatrix" in html
    assert "off-diagonal cosine" in repr(res)
    assert np.isfinite(res.matrix().to_numpy()).all()
