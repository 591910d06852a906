"""Spectral merges (TSV-M, Iso-C, Iso-CTS, consensus) and spectral analyses against references
derived by hand from the papers' equations, on tiny low-rank matrices with known SVDs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskvec.analysis import singular_task_interference, spectral_interference, spectral_profile
from taskvec.analysis.spectral import alignment_rank, spectrum_stats
from taskvec.errors import ParameterError
from taskvec.methods import (
    consensus,
    get_method,
    iso_c,
    iso_cts,
    keep_rank,
    low_rank_approx,
    polar_factor,
    tall_masks,
    top_svd,
    tsv_merge,
)
from taskvec.methods.spectral import iso_cts_split
from tests.test_analysis import _write_model

F64 = torch.float64


def close(a, b, tol=1e-5):
    a, b = torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=tol, rtol=tol), f"\n{a}\n!=\n{b}"


def orthonormal(n, k, seed):
    """n x k with orthonormal columns (QR of a seeded Gaussian)."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64))[0]


def low_rank(U, s, V):
    return (U * torch.as_tensor(s, dtype=F64)) @ V.mT


def projector(U):
    return U @ U.mT


def rank_of(x, tol=1e-4):
    s = torch.linalg.svdvals(x.double())
    return int((s > tol * s[0]).sum())


# ----------------------------------------------------------------------------- TSV-M
def test_tsv_m_with_mutually_orthogonal_tasks_is_the_sum_of_truncated_task_matrices():
    # 8 x 6, r = 6, T = 2: each task keeps floor(6 / 2) = 3 triplets. Task 1 lives (mostly) in
    # columns 0-2 of U and V, task 2 in columns 3-5; each has one weaker extra direction in the
    # other's space, which the truncation drops -- so the kept blocks are mutually orthogonal.
    U, V = orthonormal(8, 6, 1), orthonormal(6, 6, 2)
    t1 = low_rank(U[:, [0, 1, 2, 3]], [5.0, 4.0, 3.0, 0.5], V[:, [0, 1, 2, 3]])
    t2 = low_rank(U[:, [3, 4, 5, 0]], [6.0, 2.0, 1.0, 0.2], V[:, [3, 4, 5, 0]])
    expected = low_rank(U[:, :3], [5.0, 4.0, 3.0], V[:, :3]) + low_rank(U[:, 3:], [6.0, 2.0, 1.0], V[:, 3:])
    close(tsv_merge([t1.float(), t2.float()]), expected)
    # through the registry: theta_0 + lambda * Delta
    base = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    got = get_method("tsv_m").merge_tensor(base, [base + t1.float(), base + t2.float()], name="l.0.w", **{"lambda": 0.5})
    close(got, base.double() + 0.5 * expected)


def test_tsv_m_general_case_follows_the_equations():
    # overlapping tasks: U = [U_1,k U_2,k U_3,k], U_perp = P Q^T from SVD(U) = P D Q^T, V likewise
    g = torch.Generator().manual_seed(4)
    taus = [torch.randn(7, 9, generator=g, dtype=F64) for _ in range(3)]
    k = 7 // 3
    svds = [torch.linalg.svd(t, full_matrices=False) for t in taus]
    Ucat = torch.cat([u[:, :k] for u, _, _ in svds], 1)
    Scat = torch.cat([s[:k] for _, s, _ in svds])
    Vcat = torch.cat([vh[:k].mT for _, _, vh in svds], 1)
    P, _, Qh = torch.linalg.svd(Ucat, full_matrices=False)
    Pv, _, Qvh = torch.linalg.svd(Vcat, full_matrices=False)
    expected = (P @ Qh) @ torch.diag(Scat) @ (Pv @ Qvh).mT
    close(tsv_merge([t.float() for t in taus]), expected, tol=1e-4)
    # the decorrelated bases are orthonormal
    W = polar_factor(Ucat.float())
    close(W.mT @ W, torch.eye(3 * k), tol=1e-5)


def test_tsv_m_averages_non_matrices_and_matrices_thinner_than_the_task_count():
    base = torch.zeros(4)
    ts = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([3.0, 0.0, -1.0, 0.0])]
    close(get_method("tsv_m").merge_tensor(base, ts, name="l.0.bias"), [2.0, 1.0, 1.0, 2.0])
    # a 1 x 3 matrix from 2 tasks: floor(1 / 2) = 0 triplets; the mean instead of a zero delta
    rows = [t[:3].reshape(1, 3) for t in ts]
    close(tsv_merge(rows), ((rows[0] + rows[1]) / 2))
    for m in ("iso_c", "iso_cts"):
        close(get_method(m).merge_tensor(base, ts, name="l.0.bias"), [2.0, 1.0, 1.0, 2.0])


# ----------------------------------------------------------------------------- Iso-C
def test_iso_c_flattens_the_spectrum_of_the_sum_and_keeps_its_subspaces():
    U, V = orthonormal(9, 5, 5), orthonormal(7, 5, 6)
    # two rank-2 tasks sharing one direction: the sum has rank 3, singular values known by hand
    t1 = low_rank(U[:, [0, 1]], [3.0, 1.0], V[:, [0, 1]])
    t2 = low_rank(U[:, [0, 2]], [2.0, 4.0], V[:, [0, 2]])
    # sum = 5 u0 v0^T + 4 u2 v2^T + 1 u1 v1^T: mean singular value (5 + 4 + 1) / 3
    expected = 10.0 / 3 * (U[:, :3] @ V[:, :3].mT)
    got = iso_c([t1.float(), t2.float()])
    close(got, expected)
    s = torch.linalg.svdvals(got.double())
    close(s[:3], [10.0 / 3] * 3)
    assert float(s[3:].max()) < 1e-5
    close(projector(U[:, :3]), projector(torch.linalg.svd(got.double())[0][:, :3]))


def test_iso_c_full_rank_matches_the_reference_formula():
    g = torch.Generator().manual_seed(7)
    taus = [torch.randn(6, 4, generator=g) for _ in range(3)]
    M = sum(t.double() for t in taus)
    # polar factor from the eigen-decomposition of M^T M (no SVD): M (M^T M)^{-1/2}
    w, Q = torch.linalg.eigh(M.mT @ M)
    polar = M @ Q @ torch.diag(w.rsqrt()) @ Q.mT
    close(iso_c(taus), torch.linalg.svdvals(M).mean() * polar, tol=1e-4)


# ----------------------------------------------------------------------------- Iso-CTS
@pytest.mark.parametrize("r, T, f, c, k", [
    (10, 2, 0.8, 8, 1),    # floor(8) = 8, round(2 / 2) = 1
    (10, 3, 0.8, 7, 1),    # round(2 / 3) = 1 -> c = 10 - 3
    (12, 5, 0.5, 7, 1),    # floor(6) = 6, round(6 / 5) = 1 -> c = 12 - 5
])
def test_iso_cts_split(r, T, f, c, k):
    assert iso_cts_split(r, T, f) == (c, k)
    assert iso_cts_split(5, 2, 0.5) == (1, 2)  # round(1.5) = 2 (half to even, as the reference's Python round)
    assert iso_cts_split(2, 3, 0.0) == (2, 0)  # round(2 / 3) = 1 would leave c = -1: capped at floor(r / T)
    assert iso_cts_split(6, 2, 1.0) == (6, 0)


def test_iso_cts_common_plus_task_specific_directions_by_hand():
    # 8 x 6, r = 6, T = 2, f = 0.7: c = 6 - round((6 - 4) / 2) * 2 = 4, one task direction each
    U, V = orthonormal(8, 6, 8), orthonormal(6, 6, 9)
    t1 = low_rank(U[:, [0, 1, 4]], [6.0, 2.0, 0.5], V[:, [0, 1, 4]])
    t2 = low_rank(U[:, [0, 2, 3, 5]], [4.0, 3.0, 1.5, 0.7], V[:, [0, 2, 3, 5]])
    assert iso_cts_split(6, 2, 0.7) == (4, 1)
    # sum: 10 (u0), 3 (u2), 2 (u1), 1.5 (u3), 0.7 (u5), 0.5 (u4) -> common = u0, u2, u1, u3
    # residuals: t1 -> 0.5 u4 v4^T; t2 -> 0.7 u5 v5^T; all six directions orthonormal already
    got = iso_cts([t1.float(), t2.float()], 0.7)
    mean = (10 + 3 + 2 + 1.5 + 0.5 + 0.7) / 6
    close(got, mean * (U @ V.mT), tol=1e-4)
    # f = 1: no task directions -> Iso-C
    close(iso_cts([t1.float(), t2.float()], 1.0), iso_c([t1.float(), t2.float()]), tol=1e-5)


# ----------------------------------------------------------------------------- TALL masks, consensus
def test_tall_masks_and_consensus_on_three_elements_by_hand():
    t1 = torch.tensor([1.0, 0.1, -2.0])
    t2 = torch.tensor([1.0, -0.1, 0.0])
    t3 = torch.tensor([-0.2, 0.0, 0.1])
    # tau_MTL = [1.8, 0.0, -1.9]; |tau_MTL - tau_t|:
    #   t1: [0.8, 0.1, 0.1] * 0.6 = [0.48, 0.06, 0.06] -> |t1| >= : [1, 1, 1]
    #   t2: [0.8, 0.1, 1.9] * 0.6 = [0.48, 0.06, 1.14] -> [1, 1, 0]
    #   t3: [2.0, 0.0, 2.0] * 0.6 = [1.2, 0.0, 1.2]    -> [0, 1, 0]
    m = tall_masks([t1, t2, t3], 0.6)
    assert m.tolist() == [[True, True, True], [True, True, False], [False, True, False]]
    # sum of masks [2, 3, 1]: k = 2 keeps entries 0 and 1 of tau_MTL
    close(consensus([t1, t2, t3], k=2), [1.8, 0.0, 0.0])
    close(consensus([t1, t2, t3], k=3), [0.0, 0.0, 0.0])
    close(consensus([t1, t2, t3], k=0), [1.8, 0.0, -1.9])
    # per-task lambda: lambda_1 = 5 drops t1 from entries 0 (1 < 5 * 0.8) and 1 (0.1 < 5 * 0.1)
    assert tall_masks([t1, t2, t3], [5.0, 0.6, 0.6])[0].tolist() == [False, False, True]
    base = torch.tensor([10.0, 10.0, 10.0])
    got = get_method("consensus").merge_tensor(base, [base + t for t in (t1, t2, t3)], name="w", **{"lambda": 0.5})
    close(got, [10.9, 10.0, 10.0])


def test_spectral_methods_refuse_bad_parameters_by_name():
    base, ts = torch.zeros(3, 3), [torch.eye(3), torch.ones(3, 3)]
    for method, params, name in [("iso_cts", {"common_space_fraction": 1.5}, "common_space_fraction"),
                                 ("consensus", {"mask_lambda": -1.0}, "mask_lambda"),
                                 ("consensus", {"k": 1.5}, "k"),
                                 ("tsv_m", {"lambda": "big"}, "lambda"),
                                 ("iso_c", {"density": 0.5}, "density")]:
        with pytest.raises(ParameterError, match=name):
            get_method(method).merge_tensor(base, ts, name="w", **params)
    with pytest.raises(ParameterError, match="mask_lambda"):
        tall_masks(ts, [0.6, 0.6, 0.6])
    with pytest.raises(ParameterError, match="base"):
        get_method("tsv_m").merge_tensor(None, ts, name="w")
    for bad in (0.0, 1.5, -0.1, True, "half"):
        with pytest.raises(ParameterError, match="fraction"):
            low_rank_approx(torch.eye(3), bad)


def test_svd_embeddings_switch_averages_embedding_tables():
    g = torch.Generator().manual_seed(10)
    base = torch.zeros(6, 4)
    ts = [torch.randn(6, 4, generator=g) for _ in range(2)]
    m = get_method("iso_c")
    mean = (ts[0] + ts[1]) / 2
    close(m.merge_tensor(base, ts, name="embeddings.word_embeddings.weight", svd_embeddings=False), mean)
    close(m.merge_tensor(base, ts, name="embeddings.word_embeddings.weight"), iso_c(ts))
    close(m.merge_tensor(base, ts, name="encoder.layer.0.output.dense.weight", svd_embeddings=False), iso_c(ts))


# ----------------------------------------------------------------------------- whole-model merge + YAML
@pytest.fixture
def models(tmp_path):
    g = torch.Generator().manual_seed(11)
    base = {"encoder.layer.0.attention.self.query.weight": torch.randn(6, 6, generator=g),
            "encoder.layer.0.attention.self.query.bias": torch.randn(6, generator=g),
            "embeddings.position_ids": torch.arange(6).reshape(1, 6)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
           for _ in range(3)]
    return base, fts, _write_model(tmp_path / "base", base), [_write_model(tmp_path / f"ft{i}", ft) for i, ft in enumerate(fts)]


@pytest.mark.parametrize("method, fn, params", [
    ("tsv_m", lambda d, p: tsv_merge(d), {}),
    ("iso_c", lambda d, p: iso_c(d), {}),
    ("iso_cts", lambda d, p: iso_cts(d, p["common_space_fraction"]), {"common_space_fraction": 0.5}),
    ("consensus", lambda d, p: consensus(d, p["k"], p["mask_lambda"]), {"k": 2, "mask_lambda": 0.4}),
])
def test_merge_and_yaml_config_run_the_spectral_methods(models, tmp_path, method, fn, params):
    import taskvec
    from taskvec.config import run_config
    from taskvec.io import open_source

    base, fts, base_dir, ft_dirs = models
    lam = 0.7
    merged = taskvec.merge(base_dir, ft_dirs, method=method, progress=False, **params, **{"lambda": lam})
    w, b = "encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.self.query.bias"
    deltas = [ft[w] - base[w] for ft in fts]
    close(merged[w], base[w] + lam * fn(deltas, params), tol=1e-5)
    if method != "consensus":  # non-matrices: the mean of tau
        close(merged[b], base[b] + lam * sum(ft[b] - base[b] for ft in fts) / 3, tol=1e-5)
    assert torch.equal(merged["embeddings.position_ids"], base["embeddings.position_ids"])

    yaml = "\n".join([f"merge_method: {method}", f"base_model: {base_dir}", "dtype: float32", "models:",
                      *[f"  - model: {d}" for d in ft_dirs], "parameters:", f"  lambda: {lam}",
                      *[f"  {k}: {v}" for k, v in params.items()]])
    out = run_config(yaml, tmp_path / f"yaml-{method}", progress=False)
    src = open_source(out)
    close(src.get(w), merged[w], tol=1e-6)


# ----------------------------------------------------------------------------- TaskVector.low_rank (TSV-C)
def test_low_rank_keeps_the_top_singular_triplets_and_other_tensors():
    from taskvec.vector import TaskVector

    U, V = orthonormal(6, 4, 12), orthonormal(5, 4, 13)
    delta = low_rank(U, [4.0, 3.0, 2.0, 1.0], V).float()
    base = {"l.0.w": torch.zeros(6, 5), "l.0.b": torch.zeros(5)}
    tv = TaskVector.from_models(base, {"l.0.w": delta, "l.0.b": torch.arange(5.0)})
    half = tv.low_rank(0.5)  # ceil(0.5 * 5) = 3 of rank 5
    close(half["l.0.w"], low_rank(U[:, :3], [4.0, 3.0, 2.0], V[:, :3]))
    assert torch.equal(half["l.0.b"], torch.arange(5.0))
    assert torch.equal(tv.low_rank(1.0)["l.0.w"], tv["l.0.w"])
    assert keep_rank(5, 0.5) == 3 and keep_rank(10, 0.3) == 3 and keep_rank(10, 0.01) == 1
    assert "low rank" in half.provenance[-1]
    applied = half.apply_to(base, scaling=2.0)
    close(applied["l.0.w"], 2 * half["l.0.w"])
    with pytest.raises(ParameterError, match="fraction"):
        tv.low_rank(0)


def test_randomised_svd_above_the_threshold_finds_a_clear_top_subspace_and_repeats():
    U, V = orthonormal(60, 3, 14), orthonormal(50, 3, 15)
    noise = 1e-3 * torch.randn(60, 50, generator=torch.Generator().manual_seed(16), dtype=F64)
    x = (low_rank(U, [9.0, 5.0, 2.0], V) + noise).float()
    u1, s1, vh1 = top_svd(x, 3, exact_max_numel=100)  # forced onto torch.svd_lowrank
    u2, s2, _ = top_svd(x, 3, exact_max_numel=100)
    assert torch.equal(s1, s2) and torch.equal(u1, u2)  # seeded: the same sketch every time
    close(s1, torch.linalg.svdvals(x)[:3], tol=1e-4)
    close(projector(u1.double()), projector(U), tol=1e-3)
    state = torch.random.get_rng_state()
    top_svd(x, 3, exact_max_numel=100)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is untouched


# ----------------------------------------------------------------------------- analyses
def test_spectrum_stats_by_hand():
    # s = (3, 2, 1, 0): sum s^2 = 14, stable rank 14 / 9; p = (1/2, 1/3, 1/6)
    st_ = spectrum_stats(torch.tensor([3.0, 2.0, 1.0, 0.0]))
    assert st_["stable_rank"] == pytest.approx(14 / 9)
    assert st_["effective_rank"] == pytest.approx(math.exp(-(0.5 * math.log(0.5) + math.log(1 / 3) / 3 + math.log(1 / 6) / 6)))
    # energy 9/14 = 0.64, 13/14 = 0.93, 1: rank_50 = 1, rank_90 = 2, rank_99 = 3
    assert (st_["rank_50"], st_["rank_90"], st_["rank_99"]) == (1, 2, 3)
    np.testing.assert_allclose(st_["energy"], [9 / 14, 13 / 14, 1.0, 1.0], rtol=1e-6)
    # only the top of the spectrum known: shares against the full ||tau||_F^2; rank_99 unknown
    part = spectrum_stats(torch.tensor([3.0, 2.0]), total_energy=14.0)
    assert part["rank_90"] == 2 and math.isnan(part["rank_99"])
    zero = spectrum_stats(torch.zeros(3))
    assert zero["stable_rank"] == 0 and zero["rank_99"] == 0


def test_spectral_profile_is_tidy_and_skips_non_matrices():
    U, V = orthonormal(8, 2, 17), orthonormal(6, 2, 18)
    a = {"encoder.layer.0.attention.self.query.weight": low_rank(U, [2.0, 1.0], V).float(),
         "encoder.layer.0.attention.self.query.bias": torch.ones(6)}
    b = {k: 2 * v for k, v in a.items()}
    p = spectral_profile({"a": a, "b": b})
    t = p.tensors
    assert list(t["vector"]) == ["a", "b"] and set(t["tensor"]) == {"encoder.layer.0.attention.self.query.weight"}
    assert list(t[["layer", "module", "rank"]].iloc[0]) == ["0", "attn_q", 6]
    assert t["stable_rank"].iloc[0] == pytest.approx(5 / 4, rel=1e-5)  # scale-free: same for b
    assert t["stable_rank"].iloc[1] == pytest.approx(5 / 4, rel=1e-5)
    assert list(t[["rank_50", "rank_90", "rank_99"]].iloc[0]) == [1, 2, 2]
    curves = p.energy_curves()
    assert len(curves) == 12 and curves["energy"].max() == pytest.approx(1.0)
    assert "holds 90%" in repr(p)
    forced = spectral_profile({"a": a}, exact_max_numel=10, lowrank_rank=2)
    assert forced.tensors["svd"].iloc[0].startswith("randomised")
    assert forced.tensors["stable_rank"].iloc[0] == pytest.approx(5 / 4, rel=1e-4)


def test_singular_task_interference_matches_the_paper_equation_and_vanishes_for_orthogonal_tasks():
    U, V = orthonormal(7, 4, 19), orthonormal(5, 4, 20)
    # orthogonal column and row spaces: U^T U = I -> STI 0
    assert singular_task_interference([U[:, :2], U[:, 2:]], [torch.tensor([2.0, 1.0], dtype=F64)] * 2,
                                      [V[:, :2].mT, V[:, 2:].mT]) == pytest.approx(0.0, abs=1e-12)
    g = torch.Generator().manual_seed(21)
    t1, t2 = (torch.randn(7, 5, generator=g, dtype=F64) for _ in range(2))
    (U1, S1, V1h), (U2, S2, V2h) = (torch.linalg.svd(t, full_matrices=False) for t in (t1, t2))
    # for two tasks (U^T U - I) and (V^T V - I) have zero diagonal blocks, so the product is
    # block-diagonal: U1^T U2 S2 V2^T V1 and U2^T U1 S1 V1^T V2
    by_hand = float((U1.mT @ U2 @ torch.diag(S2) @ V2h @ V1h.mT).abs().sum()
                    + (U2.mT @ U1 @ torch.diag(S1) @ V1h @ V2h.mT).abs().sum())
    assert singular_task_interference([U1, U2], [S1, S2], [V1h, V2h]) == pytest.approx(by_hand, rel=1e-10)


def test_spectral_interference_tables_by_hand():
    U, V = orthonormal(6, 4, 22), orthonormal(6, 4, 23)
    w = "encoder.layer.0.attention.self.query.weight"
    a = {w: low_rank(U[:, :2], [2.0, 1.0], V[:, :2]).float(), "encoder.layer.0.attention.self.query.bias": torch.tensor([1.0, 0.0])}
    b = {w: low_rank(U[:, 2:], [3.0, 1.0], V[:, 2:]).float(), "encoder.layer.0.attention.self.query.bias": torch.tensor([1.0, 0.0])}
    res = spectral_interference({"a": a, "b": b}, fraction=1.0)
    p = res.pairs.iloc[0]
    assert p["sti"] == pytest.approx(0.0, abs=1e-5)  # orthogonal tasks do not interfere
    # principal angles of the top-6 (full) subspaces: the rank-2 parts are orthogonal, the null
    # directions of each span the other's: cosines are not all 0 -- but with fraction 1/3 (k = 2):
    p2 = spectral_interference({"a": a, "b": b}, fraction=1 / 3).pairs.iloc[0]
    assert p2["k"] == 2 and p2["mean_cos"] == pytest.approx(0.0, abs=1e-5) and p2["min_angle_deg"] == pytest.approx(90.0, abs=1e-3)
    same = spectral_interference({"a": a, "a2": a}, fraction=1 / 3).pairs.iloc[0]
    assert same["mean_cos"] == pytest.approx(1.0, abs=1e-5) and same["min_angle_deg"] == pytest.approx(0.0, abs=0.1)
    # SAR against the sum: its top-k_M subspace (k_M = 4, all of the sum's energy) holds each task
    al = res.alignment.set_index("task")
    assert list(al["k_M"]) == [4, 4] and np.allclose(al["sar"], 1.0, atol=1e-5)
    # a fixed rank 1: the sum's top direction is b's u2 (3 > 2): a has no part in it, b has 3^2 / 10
    al1 = spectral_interference({"a": a, "b": b}, sar_rank=1).alignment.set_index("task")
    assert al1.loc["a", "sar"] == pytest.approx(0.0, abs=1e-5)
    assert al1.loc["b", "sar"] == pytest.approx(math.sqrt(9 / 10), rel=1e-5)
    # TALL labels of the bias [1, 0] + [1, 0]: entry 0 general (both >= 0.6 * 1), entry 1 unchanged
    tall = res.tall.set_index("tensor").loc["encoder.layer.0.attention.self.query.bias"]
    assert (tall["general"], tall["unchanged"], tall["selfish"], tall["catastrophic"]) == (1, 1, 0, 0)
    assert res.layer_tall().loc["0"].sum() == pytest.approx(1.0)
    assert "TALL masks" in repr(res) and list(res.layer_pairs("sti").columns) == ["a · b"]


def test_alignment_rank_is_the_iso_c_papers_k_m():
    s = torch.tensor([3.0, 2.0, 1.0, 0.1])
    total = float((s ** 2).sum())  # 14.01
    # tails: k=1 -> 5.01, k=2 -> 1.01, k=3 -> 0.01; eps^2 * total with eps 0.05 = 0.035
    assert alignment_rank(s, total, 0.05) == 3
    assert alignment_rank(s, total, 0.5) == 2  # 0.25 * 14.01 = 3.5 >= 1.01
    assert alignment_rank(s, total, 0.0) == 4


def test_spectral_interference_with_a_merge_method_and_bad_inputs():
    g = torch.Generator().manual_seed(24)
    w = "encoder.layer.0.output.dense.weight"
    tvs = {n: {w: torch.randn(5, 4, generator=g)} for n in "abc"}
    res = spectral_interference(tvs, merged="iso_c")
    assert res.merged == "iso_c" and len(res.pairs) == 3 and len(res.alignment) == 3
    given_deltas = {w: iso_c([t[w] for t in tvs.values()])}
    res2 = spectral_interference(tvs, merged=given_deltas)
    np.testing.assert_allclose(res.alignment["sar"], res2.alignment["sar"], rtol=1e-5)
    with pytest.raises(ParameterError, match="fraction"):
        spectral_interference(tvs, fraction=0)
    with pytest.raises(ParameterError, match="epsilon"):
        spectral_interference(tvs, epsilon=1.5)
    with pytest.raises(ParameterError, match="two task vectors"):
        spectral_interference({"a": tvs["a"]})
    with pytest.raises(ParameterError, match="common_space_fraction"):
        spectral_interference(tvs, merged="iso_cts", merged_params={"common_space_fraction": 2})
    with pytest.raises(ParameterError, match="method"):
        spectral_interference(tvs, merged="no_such_method")


def test_results_plot_and_write_csvs(tmp_path):
    g = torch.Generator().manual_seed(25)
    keys = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.1.output.dense.weight", "encoder.layer.1.output.dense.bias"]
    tvs = {n: {k: torch.randn(6, 4, generator=g) if k.endswith("weight") else torch.randn(4, generator=g) for k in keys}
           for n in ("a", "b", "c")}
    prof, inter = spectral_profile(tvs), spectral_interference(tvs)
    import matplotlib.pyplot as plt

    for fig in (prof.plot("curves"), prof.plot("heatmap"), prof.plot("heatmap", value="stable_rank", vector="b"),
                *(inter.plot(k) for k in ("sti", "angles", "alignment", "tall"))):
        assert fig.axes and fig.axes[0].get_title()
        plt.close(fig)
    with pytest.raises(ParameterError, match="kind"):
        prof.plot("pie")
    with pytest.raises(ParameterError, match="vector"):
        prof.plot("curves", vector="zzz")
    # 5 tasks, 10 pairs, 1 layer: pairs go down the rows instead of 10 columns wide
    wide = spectral_interference({n: {keys[0]: torch.randn(4, 3, generator=g)} for n in "abcde"})
    fig = wide.plot("sti")
    assert fig.axes[0].get_ylabel() == "task pair" and len(fig.axes[0].get_yticklabels()) == 10
    plt.close(fig)
    names = {p.name for p in prof.to_csv(tmp_path) + inter.to_csv(tmp_path)}
    assert {"spectral-tensors.csv", "spectral-layer_curves.csv", "interference-pairs.csv",
            "interference-layer_sti.csv", "interference-layer_tall.csv"} <= names


# ----------------------------------------------------------------------------- properties
matrices = st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(0, 10_000)).map(
    lambda a: torch.randn(a[0], a[1], generator=torch.Generator().manual_seed(a[2])))


@settings(max_examples=40, deadline=None)
@given(matrices)
def test_profile_invariants(x):
    stats = spectrum_stats(torch.linalg.svdvals(x))
    r = min(x.shape)
    assert 1 - 1e-5 <= stats["stable_rank"] <= r + 1e-5
    assert 1 - 1e-5 <= stats["effective_rank"] <= r + 1e-5
    assert 1 <= stats["rank_50"] <= stats["rank_90"] <= stats["rank_99"] <= r


@settings(max_examples=30, deadline=None)
@given(st.lists(matrices, min_size=1, max_size=1), st.floats(0.01, 1.0))
def test_low_rank_is_a_truncation(xs, f):
    x = xs[0]
    y = low_rank_approx(x, f)
    k = keep_rank(min(x.shape), f)
    assert rank_of(y) <= k
    # Eckart-Young: the error is the energy of the dropped singular values
    s = torch.linalg.svdvals(x.double())
    assert float(torch.linalg.norm((x - y).double())) == pytest.approx(float(s[k:].norm()), abs=1e-4)
    assert torch.equal(low_rank_approx(x, 1.0), x)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 4), st.integers(2, 6), st.integers(2, 6), st.integers(0, 10_000))
def test_iso_c_spectrum_is_flat_and_merges_are_permutation_invariant(T, m, n, seed):
    g = torch.Generator().manual_seed(seed)
    taus = [torch.randn(m, n, generator=g) for _ in range(T)]
    out = iso_c(taus)
    s = torch.linalg.svdvals(out.double())
    close(s, torch.full_like(s, float(torch.linalg.svdvals(sum(taus).double()).mean())), tol=1e-4)
    close(iso_c(taus[::-1]), out, tol=1e-4)
    close(consensus(taus[::-1]), consensus(taus), tol=1e-6)
    # TSV-M: the result has rank T * floor(r / T) at most
    assert rank_of(tsv_merge(taus)) <= T * (min(m, n) // T) or min(m, n) < T


def test_cli_spectral_adds_the_spectral_csvs(models, tmp_path, capsys):
    from taskvec.analysis.cli import main

    _, _, base_dir, ft_dirs = models
    out = tmp_path / "report"
    rc = main([str(base_dir), *map(str, ft_dirs), "--out", str(out), "--names", "a", "b", "c", "--spectral", "--no-figures"])
    assert rc == 0, capsys.readouterr().err
    names = {p.name for p in out.iterdir()}
    assert {"spectral-tensors.csv", "spectral-layer_curves.csv", "interference-pairs.csv", "interference-alignment.csv",
            "interference-tall.csv", "interference-layer_sti.csv"} <= names
    text = (out / "summary.txt").read_text()
    assert "## spectra of the task matrices" in text and "TALL masks" in text
    import pandas as pd

    t = pd.read_csv(out / "spectral-tensors.csv")
    assert list(t["vector"]) == ["a", "b", "c"] and set(t["rank"]) == {6}


def test_sti_norm_choices_entrywise_and_induced():
    g = torch.Generator().manual_seed(31)
    t1, t2 = (torch.randn(6, 4, generator=g, dtype=F64) for _ in range(2))
    (U1, S1, V1h), (U2, S2, V2h) = (torch.linalg.svd(t, full_matrices=False) for t in (t1, t2))
    U, V = torch.cat([U1, U2], 1), torch.cat([V1h.mT, V2h.mT], 1)
    A = ((U.mT @ U - torch.eye(8, dtype=F64)) @ torch.diag(torch.cat([S1, S2])) @ (V.mT @ V - torch.eye(8, dtype=F64))).abs()
    args = ([U1, U2], [S1, S2], [V1h, V2h])
    assert singular_task_interference(*args) == pytest.approx(float(A.sum()), rel=1e-10)
    assert singular_task_interference(*args, norm="induced") == pytest.approx(float(A.sum(0).max()), rel=1e-10)
    assert singular_task_interference(*args, norm="induced") == pytest.approx(
        float(torch.linalg.matrix_norm(A, ord=1)), rel=1e-10)
    with pytest.raises(ParameterError, match="norm"):
        singular_task_interference(*args, norm="l1")
    w = "encoder.layer.0.attention.self.query.weight"
    a, b = {w: t1.float()}, {w: t2.float()}
    e = spectral_interference({"a": a, "b": b}, fraction=1.0).pairs.iloc[0]["sti"]
    i = spectral_interference({"a": a, "b": b}, fraction=1.0, sti_norm="induced").pairs.iloc[0]["sti"]
    assert 0 < i < e
    with pytest.raises(ParameterError, match="sti_norm"):
        spectral_interference({"a": a, "b": b}, sti_norm="fro")


def test_untouched_matrices_skip_the_svd_and_give_the_same_numbers():
    w, z = "encoder.layer.0.attention.self.query.weight", "embeddings.word_embeddings.weight"
    g = torch.Generator().manual_seed(32)
    a = {w: torch.randn(6, 5, generator=g), z: torch.zeros(9, 4)}
    b = {w: torch.randn(6, 5, generator=g), z: torch.zeros(9, 4)}
    for fn in (tsv_merge, iso_c, lambda d: iso_cts(d, 0.5)):
        assert torch.equal(fn([a[z], b[z]]), torch.zeros(9, 4))
    assert torch.equal(low_rank_approx(a[z], 0.5), torch.zeros(9, 4))
    profile = spectral_profile({"a": a})
    prof = profile.tensors.set_index("tensor")
    assert prof.loc[z, "stable_rank"] == 0 and prof.loc[z, "rank_90"] == 0
    # the zero matrix is left out of its layer's mean energy curve (which ends at 100 %, not 50 %)
    curves = profile.layer_curves(grid=5)
    assert "embeddings" not in set(curves["layer"]) and curves["energy"].max() == pytest.approx(1.0)
    res = spectral_interference({"a": a, "b": b}, fraction=1.0)
    p = res.pairs.set_index("tensor")
    assert math.isnan(p.loc[z, "mean_cos"]) and p.loc[z, "sti"] == 0.0
    induced = spectral_interference({"a": a, "b": b}, fraction=1.0, sti_norm="induced").pairs.set_index("tensor")
    assert induced.loc[z, "sti"] == 0.0
    al = res.alignment.set_index(["tensor", "task"])
    assert al.loc[(z, "a"), "k_M"] == 0 and math.isnan(al.loc[(z, "a"), "sar"])
