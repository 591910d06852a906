"""Analysis suite: hand-computed values on tiny task vectors, invariants, the `taskvec analyze` CLI."""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

os.environ.setdefault("TASKVEC_NO_PROGRESS", "1")

from taskvec.analysis import (  # noqa: E402
    conflict_counts,
    conflict_vs_density,
    cosine_matrix,
    dare_sweep,
    layer_index,
    layer_label,
    module_type,
    profile,
    sign_conflicts,
    sort_layer_labels,
)
from taskvec.errors import KeyMismatchError, ParameterError, ShapeMismatchError  # noqa: E402

L0, L1 = "model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"


# ----------------------------------------------------------------------------- naming
@pytest.mark.parametrize(
    "name, layer, kind",
    [
        ("model.layers.12.mlp.up_proj.weight", 12, "mlp_up"),
        ("model.layers.3.mlp.gate_proj.weight", 3, "mlp_gate"),
        ("model.layers.3.mlp.down_proj.weight", 3, "mlp_down"),
        ("model.layers.0.self_attn.k_proj.weight", 0, "attn_k"),
        ("model.layers.0.self_attn.o_proj.weight", 0, "attn_o"),
        ("model.layers.10.input_layernorm.weight", 10, "norm"),
        ("model.embed_tokens.weight", None, "embedding"),
        ("model.norm.weight", None, "norm"),
        ("lm_head.weight", None, "head"),
        ("encoder.layer.3.attention.self.query.weight", 3, "attn_q"),
        ("encoder.layer.3.attention.self.value.bias", 3, "attn_v"),
        ("encoder.layer.3.attention.output.dense.weight", 3, "attn_o"),
        ("encoder.layer.3.attention.output.LayerNorm.weight", 3, "norm"),
        ("encoder.layer.3.intermediate.dense.weight", 3, "mlp_up"),
        ("encoder.layer.3.output.dense.weight", 3, "mlp_down"),
        ("embeddings.word_embeddings.weight", None, "embedding"),
        ("transformer.h.7.attn.c_attn.weight", 7, "attn_qkv"),
        ("transformer.h.7.attn.c_proj.weight", 7, "attn_o"),
        ("transformer.h.7.mlp.c_fc.weight", 7, "mlp_up"),
        ("transformer.h.7.mlp.c_proj.weight", 7, "mlp_down"),
        ("transformer.h.7.ln_1.weight", 7, "norm"),
        ("transformer.wte.weight", None, "embedding"),
        ("encoder.block.5.layer.0.SelfAttention.q.weight", 5, "attn_q"),
        ("encoder.block.5.layer.1.DenseReluDense.wo.weight", 5, "mlp_down"),
        ("model.layers.2.block_sparse_moe.experts.6.w1.weight", 2, "mlp_gate"),
        ("model.layers.2.block_sparse_moe.gate.weight", 2, "other"),
        ("visual.transformer.resblocks.11.attn.in_proj_weight", 11, "attn_qkv"),
        ("vision_model.encoder.layers.4.mlp.fc2.weight", 4, "mlp_down"),
    ],
)
def test_layer_index_and_module_type(name, layer, kind):
    assert layer_index(name) == layer
    assert module_type(name) == kind


def test_layer_labels_read_in_network_order():
    assert layer_label("embeddings.LayerNorm.weight") == "embeddings"  # a norm, but part of the embeddings
    assert layer_label("pooler.dense.weight") == "other"
    assert sort_layer_labels(["10", "other", "2", "embeddings", "0"]) == ["embeddings", "0", "2", "10", "other"]


# ----------------------------------------------------------------------------- cosine
def test_cosine_orthogonal_identical_opposite():
    a = {L0: torch.tensor([1.0, 0.0, 0.0])}
    res = cosine_matrix({"a": a, "orth": {L0: torch.tensor([0.0, 2.0, 0.0])},
                         "same": {L0: torch.tensor([3.0, 0.0, 0.0])}, "opp": {L0: torch.tensor([-0.5, 0.0, 0.0])}})
    m = res.matrix()
    assert list(m.index) == ["a", "orth", "same", "opp"]
    assert m.loc["a", "orth"] == pytest.approx(0.0)
    assert m.loc["a", "same"] == pytest.approx(1.0)
    assert m.loc["a", "opp"] == pytest.approx(-1.0)
    assert np.allclose(np.diag(m), 1.0)


def test_cosine_accumulates_over_tensors_like_one_flat_vector():
    # a = (1, 2 | 3), b = (2, 0 | -1): <a,b> = 2 - 3 = -1, |a| = sqrt(14), |b| = sqrt(5)
    a = {L0: torch.tensor([1.0, 2.0]), L1: torch.tensor([[3.0]])}
    b = {L0: torch.tensor([2.0, 0.0]), L1: torch.tensor([[-1.0]])}
    res = cosine_matrix([a, b], names=["a", "b"])
    assert res.matrix().loc["a", "b"] == pytest.approx(-1 / math.sqrt(14 * 5))
    by_layer = res.matrix("layer")
    assert by_layer["0"].loc["a", "b"] == pytest.approx(2 / (math.sqrt(5) * 2))  # (1,2).(2,0) / (sqrt5 * 2)
    assert by_layer["1"].loc["a", "b"] == pytest.approx(-1.0)
    pairs = res.pairs("module")
    assert set(pairs["module"]) == {"mlp_up", "attn_q"}
    assert pairs.set_index("module").loc["attn_q", "dot"] == pytest.approx(-3.0)


def test_cosine_of_zero_vector_is_nan_not_an_error():
    res = cosine_matrix([{L0: torch.zeros(3)}, {L0: torch.ones(3)}])
    assert math.isnan(res.matrix().iloc[0, 1])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=4, max_size=4), st.lists(st.floats(-10, 10), min_size=4, max_size=4),
       st.floats(0.01, 100))
def test_cosine_symmetric_bounded_and_scale_invariant(x, y, c):
    a, b = torch.tensor(x), torch.tensor(y)
    if a.norm() < 1e-3 or b.norm() < 1e-3:
        return
    m = cosine_matrix([{L0: a}, {L0: b}, {L0: c * a}]).matrix().to_numpy()
    assert np.allclose(m, m.T)
    assert np.all(np.abs(m) <= 1.0)
    assert m[0, 1] == pytest.approx(m[2, 1], abs=1e-5)


# ----------------------------------------------------------------------------- profile
def test_profile_counts_norms_and_top_share_by_hand():
    x = torch.tensor([0.0, 1e-7, -2e-3, 4e-3, -0.01, 0.02, 0.0, 1e-6])  # 8 entries
    p = profile({L0: x}, eps=1e-6, rel_eps=0.15, topk=(0.25, 0.5))
    t = p.tensors.iloc[0]
    assert t["numel"] == 8
    assert t["n_abs_le_eps"] == 4  # 0, 1e-7, 0, 1e-6
    assert t["n_rel_le_eps"] == 5  # |x| <= 0.15 * 0.02 = 0.003: also -2e-3
    assert t["n_above_dare_limit"] == 2  # 0.01 and 0.02 exceed 0.005
    sq = float((x.double() ** 2).sum())
    assert t["norm"] == pytest.approx(math.sqrt(sq), rel=1e-5)
    assert t["max_abs"] == pytest.approx(0.02)
    # top 25% = 2 largest (0.02, 0.01); top 50% adds 4e-3 and 2e-3
    assert t["top_25pct_share"] == pytest.approx((0.02**2 + 0.01**2) / sq, rel=1e-5)
    assert t["top_50pct_share"] == pytest.approx((0.02**2 + 0.01**2 + 4e-3**2 + 2e-3**2) / sq, rel=1e-5)
    h = p.histogram
    assert h["count"].sum() == 8
    assert h.loc[h["bin_hi"] <= 1e-10, "count"].sum() == 2  # the exact zeros
    one = h[(h["bin_lo"] <= 0.02) & (h["bin_hi"] > 0.02)]
    assert one["count"].sum() == 1
    s = p.summary_table.iloc[0]
    assert s["frac_above_dare_limit"] == pytest.approx(2 / 8)


def test_profile_layers_sum_tensors_and_sort_numerically():
    keys = [f"model.layers.{i}.mlp.up_proj.weight" for i in (10, 2, 0)] + ["model.embed_tokens.weight"]
    tv = {k: torch.full((4,), float(i + 1)) for i, k in enumerate(keys)}
    p = profile(tv)
    assert list(p.layers["layer"]) == ["embeddings", "0", "2", "10"]
    assert p.layers.set_index("layer").loc["10", "norm"] == pytest.approx(2.0)  # four entries of 1
    assert p.summary_table.iloc[0]["numel"] == 16


def test_profile_of_many_vectors_is_tidy():
    p = profile({"a": {L0: torch.ones(5)}, "b": {L0: 2 * torch.ones(5)}})
    assert set(p.tensors["task"]) == {"a", "b"}
    assert p.summary_table.set_index("task").loc["b", "norm"] == pytest.approx(2 * math.sqrt(5))


# ----------------------------------------------------------------------------- sign conflicts
A = {L0: torch.tensor([1.0, 2.0, -3.0, 0.1, 0.0, 5.0])}
B = {L0: torch.tensor([-1.0, 2.0, 3.0, 0.0, 0.0, -0.2])}


def test_conflict_counts_on_a_constructed_case():
    c = conflict_counts(torch.stack([A[L0], B[L0]]))
    # params: 0 (+,-) conflict; 1 (+,+); 2 (-,+) conflict; 3 only a; 4 none; 5 (+,-) conflict
    assert c == {"kept": 9, "overlap": 4, "conflict": 3}


def test_sign_conflicts_before_and_after_trim_by_hand():
    res = sign_conflicts([A, B], density=0.5, scope="tensor")
    o = res.overall
    assert o["frac_conflict_before"] == pytest.approx(3 / 6)
    # top 3 of A: 5, -3, 2 (indices 5, 2, 1); top 3 of B: 3, 2, and the tie -1/ -> |-1| = 1 (index 0)
    # kept: idx1 (+,+), idx2 (-,+) conflict, idx5 (+,0), idx0 (0,-)  -> one conflict, two overlaps
    assert o["conflict_after"] == 1
    assert o["overlap_after"] == 2
    assert o["frac_conflict_after"] == pytest.approx(1 / 6)
    assert o["conflict_given_overlap_after"] == pytest.approx(0.5)
    # elect: sums idx0 -1 (B kept), idx1 +4, idx2 0 -> ties: both kept entries dropped, idx5 +5: A kept
    assert o["elect_dropped_after"] == 2


def test_sign_conflicts_global_scope_uses_one_threshold_per_vector():
    a = {L0: torch.tensor([1.0, 2.0]), L1: torch.tensor([10.0, 20.0])}
    b = {L0: torch.tensor([-1.0, -2.0]), L1: torch.tensor([10.0, 20.0])}
    per_tensor = sign_conflicts([a, b], density=0.5, scope="tensor").layers.set_index("layer")
    global_ = sign_conflicts([a, b], density=0.5, scope="global").layers.set_index("layer")
    assert per_tensor.loc["0", "conflict_after"] == 1  # each tensor keeps its own largest: 2 vs -2
    assert global_.loc["0", "kept_after"] == 0  # globally only 10 and 20 survive
    assert global_.loc["1", "kept_after"] == 4


def test_conflict_vs_density_at_full_density_equals_untrimmed():
    torch.manual_seed(0)
    tvs = [{L0: torch.randn(200), L1: torch.randn(50)} for _ in range(3)]
    curve = conflict_vs_density(tvs, densities=(0.1, 0.5, 1.0)).curve
    assert list(curve["density"]) == [0.1, 0.5, 1.0]
    full = curve.iloc[-1]
    assert full["conflict_after"] == full["conflict_before"]
    # three independent gaussians disagree somewhere with probability 1 - 2/8
    assert full["frac_conflict_before"] == pytest.approx(0.75, abs=0.07)
    assert curve["frac_conflict_after"].is_monotonic_increasing


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_subnormal=False), min_size=6, max_size=6),
       st.lists(st.floats(-5, 5, allow_subnormal=False), min_size=6, max_size=6), st.sampled_from([0.2, 0.5, 1.0]))
def test_conflicts_never_exceed_overlaps(x, y, k):
    o = sign_conflicts([{L0: torch.tensor(x)}, {L0: torch.tensor(y)}], density=k).overall
    assert 0 <= o["conflict_after"] <= o["overlap_after"] <= o["numel"]
    assert o["conflict_after"] <= o["conflict_before"]


def test_conflict_errors_name_the_parameter():
    with pytest.raises(ParameterError, match="density"):
        sign_conflicts([A, B], density=0.0)
    with pytest.raises(ParameterError, match="scope"):
        sign_conflicts([A, B], scope="layer")
    with pytest.raises(ParameterError, match="at least two"):
        sign_conflicts([A])


# ----------------------------------------------------------------------------- DARE sweep
def test_dare_sweep_p0_changes_nothing_and_rescale_ablation():
    torch.manual_seed(0)
    tv = {L0: torch.randn(400), L1: torch.randn(20, 10)}
    sweep = dare_sweep(tv, ps=(0.0, 0.5, 0.9), rescale=(True, False))
    d = sweep.data.set_index(["drop_rate", "rescale"])
    for r in (True, False):
        row = d.loc[(0.0, r)]
        assert row["norm_ratio"] == pytest.approx(1.0)
        assert row["cosine_to_tau"] == pytest.approx(1.0)
        assert row["rel_l2_error"] == pytest.approx(0.0, abs=1e-6)
        assert row["frac_kept"] == 1.0
    for p in (0.5, 0.9):
        on, off = d.loc[(p, True)], d.loc[(p, False)]
        # same seed -> same mask: rescaling multiplies tau~ by exactly 1/(1-p)
        assert on["norm_ratio"] == pytest.approx(off["norm_ratio"] / (1 - p), rel=1e-5)
        assert on["cosine_to_tau"] == pytest.approx(off["cosine_to_tau"], rel=1e-5)
        assert on["frac_kept"] == off["frac_kept"]
        assert on["frac_kept"] == pytest.approx(1 - p, abs=0.08)
        # without rescale: ||tau~||^2 = sum of kept squares ~ (1-p)||tau||^2; cos = ||tau~||/||tau||
        assert off["cosine_to_tau"] == pytest.approx(off["norm_ratio"], rel=1e-5)
        assert off["norm_ratio"] == pytest.approx(math.sqrt(1 - p), abs=0.08)
    with pytest.raises(ParameterError, match="drop rate"):
        dare_sweep(tv, ps=(1.0,))


def test_dare_sweep_calls_eval_fn_with_base_plus_dropped_delta():
    base = {L0: torch.ones(10), "model.pos_ids": torch.arange(3)}
    tau = {L0: torch.linspace(-1, 1, 10)}
    seen = []

    def eval_fn(sd):
        seen.append(sd)
        assert set(sd) == {L0, "model.pos_ids"}  # every base tensor, integer buffers copied
        return {"sum": float(sd[L0].sum()), "mean": torch.tensor(sd[L0].mean().item())}

    sweep = dare_sweep(tau, ps=(0.0, 0.5), rescale=(True,), eval_fn=eval_fn, base=base)
    assert len(seen) == 3  # the base reference + two grid points
    assert torch.equal(seen[1][L0], base[L0] + tau[L0])  # p = 0: the fine-tuned model itself
    assert sweep.reference["base model"]["sum"] == pytest.approx(10.0)
    from taskvec.methods.dare import dare_drop, tensor_generator

    dropped = dare_drop(tau[L0], 0.5, rescale=True, generator=tensor_generator(0, L0))  # seeded by tensor name
    assert torch.equal(seen[2][L0], base[L0] + dropped)
    assert list(sweep.data["sum"]) == pytest.approx([float((base[L0] + tau[L0]).sum()), float(seen[2][L0].sum())])
    assert sweep.metrics == ["sum", "mean"]
    assert isinstance(sweep.data["mean"].iloc[0], float)


def test_lambda_and_density_sweeps_call_merge_per_grid_point():
    from taskvec.analysis import density_sweep, lambda_sweep

    base = {L0: torch.zeros(4)}
    models = [{L0: torch.tensor([1.0, 0.0, 0.0, 0.0])}, {L0: torch.tensor([0.0, 2.0, 0.0, -0.5])}]
    calls = []
    sweep = lambda_sweep(base, models, lambdas=(0.0, 0.5, 1.0), eval_fn=lambda sd: calls.append(sd) or {"x1": float(sd[L0][1])})
    assert list(sweep.data["lambda"]) == [0.0, 0.5, 1.0]
    assert list(sweep.data["x1"]) == pytest.approx([0.0, 1.0, 2.0])  # theta_0 + lambda (tau_1 + tau_2)
    assert sweep.data["merged_norm"].iloc[2] == pytest.approx(math.sqrt(1 + 4 + 0.25))
    assert sweep.data["cos_merged_to_model 1"].iloc[2] == pytest.approx(1 / math.sqrt(5.25))
    assert len(calls) == 3 and sweep.metrics == ["x1"]
    dens = density_sweep(base, models, densities=(0.25, 1.0), method="ties", eval_fn=None)
    # k = 0.25 keeps one entry per model: tau_1 -> (1,0,0,0), tau_2 -> (0,2,0,0)
    assert dens.data.set_index("density").loc[0.25, "merged_norm"] == pytest.approx(math.sqrt(5))


# ----------------------------------------------------------------------------- bad input
def test_mismatched_vectors_are_clear_errors():
    with pytest.raises(KeyMismatchError, match="b"):
        cosine_matrix({"a": {L0: torch.ones(2)}, "b": {L1: torch.ones(2)}})
    with pytest.raises(ShapeMismatchError, match=L0):
        cosine_matrix({"a": {L0: torch.ones(2)}, "b": {L0: torch.ones(3)}})
    with pytest.raises(ParameterError, match="names"):
        cosine_matrix([{L0: torch.ones(2)}], names=["x", "y"])


def test_inputs_are_not_modified():
    a, b = {L0: torch.tensor([1.0, -2.0, 3.0])}, {L0: torch.tensor([-1.0, 2.0, 0.5])}
    copies = [{k: v.clone() for k, v in t.items()} for t in (a, b)]
    profile([a, b]), cosine_matrix([a, b]), sign_conflicts([a, b], density=0.5), dare_sweep(a, ps=(0.5,))
    for t, c in zip((a, b), copies):
        assert torch.equal(t[L0], c[L0])


# ----------------------------------------------------------------------------- TaskVector + CLI
def _write_model(folder, tensors):
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 2}))
    return folder


@pytest.fixture
def checkpoints(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {
        "encoder.layer.0.attention.self.query.weight": torch.randn(8, 8, generator=g),
        "encoder.layer.0.output.dense.weight": torch.randn(8, 16, generator=g),
        "encoder.layer.1.attention.self.query.weight": torch.randn(8, 8, generator=g),
        "embeddings.word_embeddings.weight": torch.randn(20, 8, generator=g),
        "embeddings.position_ids": torch.arange(8).reshape(1, 8),
    }
    fts = []
    for i in range(3):
        ft = {k: (v + 0.01 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v for k, v in base.items()}
        fts.append(_write_model(tmp_path / f"ft{i}", ft))
    return _write_model(tmp_path / "base", base), fts


def test_task_vectors_with_shared_base_match_plain_deltas(checkpoints):
    from taskvec.analysis._stream import _shared_base_loader
    from taskvec.io import open_source
    from taskvec.vector import TaskVector

    base_dir, fts = checkpoints
    base = open_source(base_dir)
    tvs = [TaskVector.from_models(base, f) for f in fts]
    assert _shared_base_loader(tvs) is not None  # the base is read once per tensor
    plain = [{k: tv[k].clone() for k in tv.keys()} for tv in tvs]
    fast, slow = cosine_matrix(tvs).matrix().to_numpy(), cosine_matrix(plain).matrix().to_numpy()
    assert np.allclose(fast, slow, atol=1e-6)
    assert "embeddings.position_ids" not in cosine_matrix(tvs).tensor_names


def test_cli_writes_csvs_figures_and_summary(checkpoints, tmp_path, capsys):
    from taskvec.analysis.cli import main

    base_dir, fts = checkpoints
    out = tmp_path / "report"
    rc = main([str(base_dir), *map(str, fts), "--out", str(out), "--names", "a", "b", "c", "--density", "0.3"])
    assert rc == 0, capsys.readouterr().err
    names = {p.name for p in out.iterdir()}
    for f in ("profile-summary.csv", "profile-layers.csv", "cosine-matrix.csv", "cosine-by_layer.csv",
              "conflicts-layers.csv", "conflicts-layer_module.csv", "summary.txt",
              "cosine.png", "cosine.svg", "profile.png", "conflicts-layer-module.png"):
        assert f in names, f
    m = pd.read_csv(out / "cosine-matrix.csv").set_index("task")
    assert list(m.index) == ["a", "b", "c"] and np.allclose(np.diag(m[["a", "b", "c"]]), 1.0)
    layers = pd.read_csv(out / "profile-layers.csv")
    assert list(layers[layers["task"] == "a"]["layer"].astype(str)) == ["embeddings", "0", "1"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report")]  # no temp dirs left
    # the figures draw these tasks: the names label the cosine heatmap's rows, with every cell annotated
    # (3 x 3 values, 2 decimals or 3), and the PNG is a picture, not a blank canvas
    svg = (out / "cosine.svg").read_text()
    assert "Cosine similarity between task vectors" in svg
    assert all(f">{n}<" in svg for n in ("a", "b", "c"))
    cells = [float(v) for v in re.findall(r">(-?\d\.\d{2,3})<", svg)]
    assert len(cells) >= 9 and sorted(cells)[-3:] == [1.0, 1.0, 1.0]
    from matplotlib import pyplot as plt

    png = plt.imread(out / "cosine.png")
    assert png.shape[0] > 200 and png.shape[1] > 200 and png[..., :3].std() > 0.05

    # existing output: refused without --overwrite, nothing touched
    before = sorted(p.name for p in out.iterdir())
    assert main([str(base_dir), str(fts[0]), "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_cli_bad_input_leaves_no_partial_output(checkpoints, tmp_path, capsys):
    from taskvec.analysis.cli import main

    base_dir, fts = checkpoints
    other = _write_model(tmp_path / "other", {"encoder.layer.0.attention.self.query.weight": torch.zeros(8, 8)})
    out = tmp_path / "bad"
    assert main([str(base_dir), str(fts[0]), str(other), "--out", str(out), "--no-figures"]) == 1
    err = capsys.readouterr().err
    assert "taskvec analyze: error" in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]
    assert main([str(base_dir), str(fts[0]), "--out", str(tmp_path / "x"), "--names", "a", "b"]) == 1
    assert "--names" in capsys.readouterr().err
