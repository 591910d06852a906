"""mergekit 0.1.5's nuslerp, multislerp, karcher, nearswap, arcee_fusion, ram, ramplus_tl and sce:
hand-derived values on tiny tensors (worked out from the equations, not by re-running the code),
hypothesis properties of their invariants, clear errors for bad parameters, and the whole-model
paths (`taskvec.merge`, streaming to a folder, a YAML config). Parity with mergekit's own
output is in tests/test_mergekit_parity.py (goldens)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taskvec
from taskvec.errors import ParameterError
from taskvec.methods import (
    arcee_fusion,
    fusion_threshold,
    get_method,
    karcher_mean,
    multislerp,
    nearswap,
    nuslerp,
    nuslerp_t,
    ram_merge,
    ramplus_scales,
    sce_coefficients,
    sce_merge,
    sce_select,
)

T = torch.tensor
R2 = math.sqrt(0.5)
NEW = ("nuslerp", "multislerp", "karcher", "nearswap", "arcee_fusion", "ram", "ramplus_tl", "sce")
GOLDENS = Path(__file__).resolve().parent / "goldens"


def close(a, b, tol=1e-6):
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=tol, rtol=tol), f"\n{a}\n!=\n{b}"


def merge(method, base, tensors, **params):
    return get_method(method).merge_tensor(base, tensors, name="x", **params)


# ------------------------------------------------------------------------------------------------
# NuSLERP


def test_nuslerp_t_from_weights():
    assert nuslerp_t([1.0, 1.0]) == 0.5
    assert nuslerp_t([1.0, 3.0]) == 0.75
    assert nuslerp_t([0.5, -0.5]) == 0.5  # a ~0 sum: the midpoint
    with pytest.raises(ParameterError, match="weight"):
        nuslerp_t([1.0, 2.0, 3.0])


def test_nuslerp_orthogonal_unit_vectors():
    e1, e2 = T([1.0, 0.0, 0.0]), T([0.0, 1.0, 0.0])
    # Omega = pi/2, sin Omega = 1: coefficients sin((1-t) pi/2), sin(t pi/2)
    close(merge("nuslerp", None, [e1, e2]), [R2, R2, 0.0])
    close(merge("nuslerp", None, [e1, e2], weight=[1.0, 3.0]),
          [math.sin(math.pi / 8), math.sin(3 * math.pi / 8), 0.0])


def test_nuslerp_with_a_base_interpolates_task_vectors():
    base = T([1.0, 1.0, 1.0])
    # tau_0 = (2, 0, 0), tau_1 = (0, 2, 0): at t = 1/2, sin(pi/4) (tau_0 + tau_1) = (sqrt 2, sqrt 2, 0)
    out = merge("nuslerp", base, [base + T([2.0, 0.0, 0.0]), base + T([0.0, 2.0, 0.0])])
    close(out, [1 + math.sqrt(2), 1 + math.sqrt(2), 1.0])


def test_nuslerp_flatten_rows_and_columns():
    v0, v1 = T([[1.0, 0.0], [0.0, 1.0]]), T([[0.0, 1.0], [1.0, 1.0]])
    # [1,0] -> [0,1]: Omega = pi/2, midpoint (r, r); [0,1] -> [1,1]: Omega = pi/4,
    # coefficient sin(pi/8)/sin(pi/4) on both: (c, 2c)
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    rows = merge("nuslerp", None, [v0, v1], nuslerp_flatten=False)
    close(rows, [[R2, R2], [c, 2 * c]])
    cols = merge("nuslerp", None, [v0, v1], nuslerp_flatten=False, nuslerp_row_wise=True)
    close(cols, [[R2, c], [R2, 2 * c]])  # the same pairs, now the columns
    # flattened: cos Omega = 1/sqrt(6); at t = 1/2 the coefficient is 1 / (2 cos(Omega/2)) on v0 + v1
    half = math.sqrt((1 + 1 / math.sqrt(6)) / 2)
    close(merge("nuslerp", None, [v0, v1]), (v0 + v1) / (2 * half))


def test_nuslerp_colinear_rows_are_linear():
    v0, v1 = T([[1.0, 2.0], [1.0, 0.0]]), T([[2.0, 4.0], [0.0, 1.0]])
    out = merge("nuslerp", None, [v0, v1], weight=[3.0, 1.0], nuslerp_flatten=False)
    close(out[0], 0.75 * v0[0] + 0.25 * v1[0])  # same direction: linear
    close(out[1], [math.cos(math.pi / 8), math.sin(math.pi / 8)])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=6, max_size=6),
       st.floats(0.1, 10.0), st.booleans())
def test_prop_nuslerp_zero_weight_gives_the_other_endpoint(values, w, flatten):
    a, b = T(values[:3]) + T([3.0, 0.0, 0.0]), T(values[3:]) + T([0.0, 0.0, 3.0])
    close(merge("nuslerp", None, [a, b], weight=[w, 0.0], nuslerp_flatten=flatten), a, tol=1e-4)
    close(merge("nuslerp", None, [a, b], weight=[0.0, w], nuslerp_flatten=flatten), b, tol=1e-4)
    base = T([0.5, -0.5, 0.25])
    close(merge("nuslerp", base, [a, b], weight=[w, 0.0]), a, tol=1e-4)


# ------------------------------------------------------------------------------------------------
# Multi-SLERP


def test_multislerp_is_the_normalised_weighted_mean_direction_times_the_mean_norm():
    # v0 = (2,0,0), v1 = (0,1,0), weights 3:1 -> 0.75, 0.25: direction (0.75, 0.25)/|.| = (3, 1)/sqrt(10),
    # weighted mean norm 0.75 * 2 + 0.25 * 1 = 1.75 (the tangent-space mean is 0 by construction)
    out = multislerp([T([2.0, 0.0, 0.0]), T([0.0, 1.0, 0.0])], [3.0, 1.0])
    close(out, [1.75 * 3 / math.sqrt(10), 1.75 / math.sqrt(10), 0.0])
    # equal weights on orthogonal unit vectors: the slerp midpoint
    close(merge("multislerp", None, [T([1.0, 0.0]), T([0.0, 1.0])]), [R2, R2])


def test_multislerp_with_base_and_without_normalized_weights():
    base = T([1.0, 1.0])
    # task vectors (1,0), (0,1); weights 1, 1 unnormalised: direction (1,1)/sqrt2, scale 1 + 1 = 2
    out = merge("multislerp", base, [base + T([1.0, 0.0]), base + T([0.0, 1.0])], normalize_weights=False)
    close(out, [1 + 2 * R2, 1 + 2 * R2])
    one = T([3.0, -1.0])
    close(merge("multislerp", base, [one]), one)  # one model: that model (mergekit's rule)


def test_multislerp_antipodal():
    a, b = T([1.0, 2.0]), T([-1.0, -2.0])
    close(multislerp([a, b], [1.0, 1.0]), [0.0, 0.0])  # two: the linear fallback
    with pytest.raises(ParameterError, match="weight.*'x'"):
        merge("multislerp", None, [a, b, T([2.0, 4.0]), T([-2.0, -4.0])])
    with pytest.raises(ParameterError, match="weight"):
        merge("multislerp", None, [a, T([2.0, 1.0])], weight=[1.0, -1.0])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=1, max_size=8).filter(
    lambda v: sum(x * x for x in v) > 1e-3), st.integers(2, 4))
def test_prop_multislerp_and_karcher_of_identical_tensors_is_that_tensor(values, n):
    x = T(values)
    close(merge("multislerp", None, [x] * n), x, tol=1e-4)
    close(merge("karcher", None, [x] * n), x, tol=1e-4)
    base = torch.zeros_like(x) + 0.5
    close(merge("multislerp", base, [base + x] * n), base + x, tol=1e-4)


# ------------------------------------------------------------------------------------------------
# Karcher mean


def test_karcher_mean_on_a_circle_is_the_mean_angle():
    e1, e2 = T([1.0, 0.0, 0.0]), T([0.0, 1.0, 0.0])
    # angles 0, 0, 90 degrees -> Karcher mean at 30 degrees; the Euclidean start is atan(1/2) = 26.6
    close(karcher_mean([e1, e1, e2]), [math.cos(math.pi / 6), 0.5, 0.0], tol=1e-5)
    close(karcher_mean([e1, e1, e2], max_iter=0), T([2.0, 1.0, 0.0]) / math.sqrt(5))
    # norms 2 and 1: the direction is the midpoint, the scale the mean norm 1.5
    close(merge("karcher", None, [2 * e1, e2]), [1.5 * R2, 1.5 * R2, 0.0], tol=1e-5)
    close(karcher_mean([e1, e2, T([0.0, 0.0, 1.0])]), [1 / math.sqrt(3)] * 3, tol=1e-5)


def test_karcher_zero_tensors():
    z = torch.zeros(3)
    close(karcher_mean([z, z]), z)
    e1 = T([2.0, 0.0, 0.0])
    # a zero tensor has no direction (left out of the mean) but counts in the mean norm: (2 + 0) / 2
    close(karcher_mean([e1, z]), [1.0, 0.0, 0.0])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=6, max_size=6), st.floats(0.1, 10.0))
def test_prop_karcher_is_scale_equivariant(values, c):
    a, b = T(values[:3]) + T([4.0, 0.0, 0.0]), T(values[3:]) + T([0.0, 4.0, 0.0])
    close(merge("karcher", None, [c * a, c * b]), c * merge("karcher", None, [a, b]), tol=1e-4)


# ------------------------------------------------------------------------------------------------
# NearSwap and Arcee Fusion


def test_nearswap_moves_each_entry_by_at_most_t():
    base, model = T([0.0, 0.0, 0.0, 1.0]), T([0.5, 2.0, -4.0, 1.0])
    # |d| = 0.5, 2, 4, 0 -> w = 1, 1/2, 1/4, 1
    close(merge("nearswap", base, [model], t=1.0), [0.5, 1.0, -1.0, 1.0])
    close(nearswap(base, model, 0.0), base)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=4, max_size=4),
       st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=4, max_size=4), st.floats(0.0, 3.0))
def test_prop_nearswap_distance_is_min_of_gap_and_t(b, m, t):
    base, model = T(b), T(m)
    gap = (model - base).abs()
    moved = (nearswap(base, model, t) - base).abs()
    close(moved, torch.minimum(gap, torch.full_like(gap, t)), tol=1e-4)


def test_arcee_fusion_keeps_the_outlier_changes():
    base = torch.zeros(8)
    model = T([0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 1.0])
    # a 1-D tensor: one KL for the whole vector, so importance ~ |d|; sorted indices 1, 3, 5 (n = 8) give
    # Q1 = 0.02, median = 0.04, Q3 = 0.06: threshold (0.04 + 1.5 * 0.04) KL = 0.10 KL -> only 1.0 passes
    close(merge("arcee_fusion", base, [model]), [0, 0, 0, 0, 0, 0, 0, 1.0])
    # a row equal to the base's has KL 0: nothing in it is important
    b2 = torch.zeros(2, 4)
    m2 = T([[0.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 2.0]])
    out = arcee_fusion(b2, m2)
    close(out[0], b2[0])
    assert float(fusion_threshold(T([1.0, 2.0, 3.0, 4.0, 5.0]))) == pytest.approx(3.0 + 1.5 * 2.0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=12, max_size=12),
       st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=12, max_size=12))
def test_prop_arcee_fusion_takes_each_entry_from_base_or_model(b, m):
    base, model = T(b).reshape(3, 4), T(m).reshape(3, 4)
    out = arcee_fusion(base, model)
    assert bool(((out == base) | (out == base + (model - base))).all())  # theta_0 + m (theta_1 - theta_0), m in {0, 1}


# ------------------------------------------------------------------------------------------------
# RAM and RAM+

TAUS = [T([1.0, 2.0, 7.0, 0.0]), T([3.0, 0.0, 0.0, 5e-6]), T([0.0, 4.0, 0.0, 0.0])]


def test_ram_averages_shared_updates_and_keeps_unique_ones():
    base = T([10.0, 10.0, 10.0, 10.0])
    # entry 0: models 1, 2 -> (1 + 3)/2; entry 1: models 1, 3 -> (2 + 4)/2; entry 2: model 1 only -> 7;
    # entry 3: 5e-6 <= epsilon: no update
    out = merge("ram", base, [base + t for t in TAUS])
    close(out, [12.0, 13.0, 17.0, 10.0], tol=1e-5)
    close(ram_merge(torch.stack(TAUS), 1e-5), [2.0, 3.0, 7.0, 0.0])
    # a large epsilon drops the small updates: entry 0 keeps only 3, entry 1 only 4, entry 2 the 7
    close(ram_merge(torch.stack(TAUS), 2.5), [3.0, 4.0, 7.0, 0.0])


def test_ramplus_scales_unique_updates_by_overlap():
    # model 1: 2 shared, 1 unique -> rho = 2; models 2, 3: 1 shared, 0 unique -> rho = 1/epsilon (capped)
    close(ramplus_scales(torch.stack(TAUS), 1e-5, r=0.5, alpha=3.0), [2.0, 2.5, 2.5])
    base = torch.zeros(4)
    out = merge("ramplus_tl", base, [base + t for t in TAUS], r=0.5, alpha=0.8)  # lambda_1 = 1 + 0.5 * 0.8
    close(out, [2.0, 3.0, 7.0 * 1.4, 0.0], tol=1e-5)
    out = merge("ramplus_tl", base, [base + t for t in TAUS], r=0.5, alpha=3.0)  # lambda_1 = 1 + 0.5 * 2
    close(out, [2.0, 3.0, 14.0, 0.0], tol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-2, 2, allow_nan=False, width=32), min_size=1, max_size=12),
       st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=12, max_size=12), st.integers(1, 3))
def test_prop_ram_of_identical_or_single_models(b, d, n):
    base = T(b)
    tau = T(d[: len(b)])
    model = base + tau
    kept = (model - base).abs() > 1e-5
    expected = torch.where(kept, model, base)
    close(merge("ram", base, [model] * n), expected, tol=1e-5)
    close(merge("ramplus_tl", base, [model]), expected, tol=1e-5)  # one model: nothing is shared, rho = 0


# ------------------------------------------------------------------------------------------------
# SCE


def test_sce_calculate_and_erase():
    t1, t2 = T([1.0, -2.0, 3.0]), T([2.0, 2.0, -1.0])
    # mean squares 14/3 and 3 -> eta = 14/23, 9/23; signs of the sum (3, 0, 2) -> +, + (tie), +
    close(sce_coefficients(torch.stack([t1, t2])), [14 / 23, 9 / 23])
    # entry 0: both agree -> (14 * 1 + 9 * 2) / 23; entry 1: only t2 agrees -> 2; entry 2: only t1 -> 3
    base = T([1.0, 1.0, 1.0])
    for semantics in ("paper", "mergekit"):
        out = merge("sce", base, [base + t1, base + t2], semantics=semantics)
        close(out, [1 + 32 / 23, 3.0, 4.0], tol=1e-5)


def test_sce_select_by_variance():
    t1, t2 = T([1.0, -2.0, 3.0]), T([2.0, 1.0, -1.0])
    # variances 0.25, 2.25, 4: top 70 % of 3 non-zero -> k = int(2.1) = 2 -> entries 1, 2
    close(sce_select(torch.stack([t1, t2]), 0.7), [0.0, 1.0, 1.0])
    # then tau = (0,-2,3), (0,1,-1): eta = 13/15, 2/15; sums (0, -1, 2): entry 1 -> -2, entry 2 -> 3
    close(sce_merge(torch.stack([t1, t2]), 0.7), [0.0, -2.0, 3.0])
    close(sce_select(torch.stack([t1, t2]), 0.1), [0.0, 0.0, 0.0])  # k = int(0.3) = 0: nothing kept


def test_sce_semantics_differ_on_small_task_vectors():
    # mean squares 1e-8 and 9e-8 sum below mergekit's 1e-6: mergekit uses equal coefficients
    t1, t2 = T([1e-4, 1e-4]), T([3e-4, 3e-4])
    base = torch.zeros(2)
    paper = merge("sce", base, [t1, t2])  # eta = 0.1, 0.9
    close(paper, [2.8e-4, 2.8e-4], tol=1e-7)
    mk = merge("sce", base, [t1, t2], semantics="mergekit")  # eta = 0.5, 0.5
    close(mk, [2e-4, 2e-4], tol=1e-7)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-2, 2, allow_nan=False, width=32), min_size=1, max_size=12), st.integers(1, 3),
       st.sampled_from(["paper", "mergekit"]))
def test_prop_sce_of_identical_models_is_that_model(d, n, semantics):
    base = torch.ones(len(d))
    model = base + T(d)
    close(merge("sce", base, [model] * n, semantics=semantics), model, tol=1e-5)


# ------------------------------------------------------------------------------------------------
# Parameters, errors, conventions


@pytest.mark.parametrize("method, params, models, base, needle", [
    ("nuslerp", {}, 3, False, "models"),
    ("nuslerp", {}, 1, False, "models"),
    ("nuslerp", {"nuslerp_flatten": "yes"}, 2, False, "nuslerp_flatten"),
    ("nuslerp", {"t": 0.5}, 2, False, "'t'"),  # nuslerp's position comes from the weights
    ("multislerp", {"eps": 0.0}, 2, False, "eps"),
    ("karcher", {"max_iter": -1}, 2, False, "max_iter"),
    ("karcher", {"max_iter": 1.5}, 2, False, "max_iter"),
    ("karcher", {"tol": -1e-3}, 2, False, "tol"),
    ("nearswap", {}, 1, True, "t"),
    ("nearswap", {"t": -0.1}, 1, True, "t"),
    ("nearswap", {"t": 0.1}, 2, True, "models"),
    ("nearswap", {"t": 0.1}, 1, False, "base"),
    ("arcee_fusion", {}, 2, True, "models"),
    ("arcee_fusion", {}, 1, False, "base"),
    ("ram", {"epsilon": -1.0}, 2, True, "epsilon"),
    ("ramplus_tl", {"r": -0.1}, 2, True, "r"),
    ("ramplus_tl", {"alpha": float("nan")}, 2, True, "alpha"),
    ("sce", {"select_topk": 0.0}, 2, True, "select_topk"),
    ("sce", {"select_topk": 1.5}, 2, True, "select_topk"),
    ("sce", {"semantics": "fusechat"}, 2, True, "semantics"),
])
def test_bad_parameters_name_the_parameter(method, params, models, base, needle):
    x = torch.ones(3)
    with pytest.raises(ParameterError, match=needle):
        merge(method, x if base else None, [x + i for i in range(1, models + 1)], **params)


def test_registry_describes_the_new_methods():
    for name in NEW:
        m = get_method(name)
        assert m.reference, name
        assert name in repr(m)
    assert "optional" in repr(get_method("nuslerp")) and get_method("multislerp").optional_base
    assert get_method("karcher").base_as_model and not get_method("karcher").needs_base
    assert get_method("nearswap").max_models == get_method("arcee_fusion").max_models == 1
    assert get_method("sce").defaults["semantics"] == "paper"


@pytest.mark.parametrize("method", NEW)
def test_integer_tensors_are_copied_and_inputs_untouched(method):
    m = get_method(method)
    params = {"t": 0.1} if method == "nearswap" else {}
    n = 2 if method in ("nuslerp", "karcher", "multislerp", "ram", "ramplus_tl", "sce") else 1
    ids = torch.arange(4)
    base = ids if (m.needs_base or m.optional_base) else None
    out = m.merge_tensor(base, [ids + 1] * n if base is not None else [ids] * n, name="position_ids", **params)
    assert out.dtype == torch.int64 and torch.equal(out, ids)
    b, ft = T([1.0, -2.0, 0.5]), T([1.5, -1.0, 0.25])
    before = (b.clone(), ft.clone())
    fts = [ft, ft * 2] if n == 2 else [ft]
    out = m.merge_tensor(b if (m.needs_base or m.optional_base) else None, fts, name="x", **params)
    assert torch.equal(b, before[0]) and torch.equal(ft, before[1])
    assert out.data_ptr() not in (b.data_ptr(), ft.data_ptr()) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------
# Whole models: taskvec.merge (in memory and streamed to a folder) and YAML configs


def _tiny_models():
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(4, 3, generator=g),
            "model.layers.0.input_layernorm.weight": torch.ones(3),
            "model.position_ids": torch.arange(5)}
    fts = []
    for _ in range(3):
        ft = {k: (v + 0.1 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone()
              for k, v in base.items()}
        fts.append(ft)
    return base, fts


@pytest.mark.parametrize("method, n, params", [
    ("nuslerp", 2, {"weight": [0.3, 0.7]}), ("multislerp", 3, {}), ("karcher", 3, {"max_iter": 5}),
    ("nearswap", 1, {"t": 0.05}), ("arcee_fusion", 1, {}), ("ram", 3, {"epsilon": 0.05}),
    ("ramplus_tl", 3, {"epsilon": 0.05, "r": 0.5}), ("sce", 3, {"select_topk": 0.5}),
])
def test_whole_model_merge_in_memory_and_streamed(method, n, params, tmp_path):
    from taskvec.io import open_source

    base, fts = _tiny_models()
    m = get_method(method)
    use_base = m.needs_base or m.optional_base
    merged = taskvec.merge(base, fts[:n], method, progress=False, **params)
    for k, v in base.items():
        if not v.is_floating_point():
            assert torch.equal(merged[k], v)
            continue
        want = m.merge_tensor(base[k] if use_base else None, [ft[k] for ft in fts[:n]], name=k, **params)
        close(merged[k], want, tol=0)
    folder = taskvec.merge(base, fts[:n], method, out=tmp_path / "out", progress=False, **params)
    src = open_source(folder)
    assert sorted(src.keys()) == sorted(base)
    for k in base:
        assert torch.equal(src.get(k), merged[k]), k


def _config(method: str, models: list, base: str | None = None, parameters: dict | None = None) -> dict:
    cfg = {"merge_method": method, "dtype": "float32",
           "models": [{"model": str(GOLDENS / "inputs" / m), **({"parameters": p} if p else {})} for m, p in models]}
    if base:
        cfg["base_model"] = str(GOLDENS / "inputs" / base)
    if parameters:
        cfg["parameters"] = parameters
    return cfg


def test_yaml_base_model_rules(tmp_path):
    from taskvec.config import plan_config

    # nuslerp: with a base_model the base is the origin; without one, the models themselves
    with_base = plan_config(_config("nuslerp", [("ft1", {"weight": 1.0}), ("ft2", {"weight": 1.0})], "base"))
    assert with_base.base is not None and len(with_base.models) == 2
    without = plan_config(_config("nuslerp", [("ft1", {"weight": 1.0}), ("ft2", {"weight": 1.0})]))
    assert without.base is None and len(without.models) == 2
    # karcher ignores the base role: mergekit merges a base_model as one more model
    karcher = plan_config(_config("karcher", [("ft1", None), ("ft2", None)], "base"))
    assert karcher.base is None and len(karcher.models) == 3
    # nearswap / arcee_fusion: exactly a base and one model
    with pytest.raises(ParameterError, match="base_model"):
        plan_config(_config("nearswap", [("ft1", None)], parameters={"t": 0.1}))
    from taskvec.config import run_config

    with pytest.raises(ParameterError, match="models"):
        run_config(_config("arcee_fusion", [("ft1", None), ("ft2", None)], "base"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ParameterError, match="no parameter 'density'"):
        plan_config(_config("sce", [("ft1", None)], "base", {"select_topk": 0.5, "density": 0.5}))


def test_yaml_sce_runs_with_mergekit_semantics(tmp_path):
    """A YAML config means mergekit's SCE: on small task vectors (mean squares far below 1e-6) equal
    coefficients, where the Python API's paper default weighs the larger fine-tune more."""
    from taskvec.config import run_config
    from taskvec.io import open_source
    from tests.helpers import perturbed, save_model, tiny_llama

    base = tiny_llama(layers=1)
    paths = [save_model(m, tmp_path / n) for m, n in ((base, "base"), (perturbed(base, 1e-4, seed=1), "ft1"),
                                                       (perturbed(base, 3e-4, seed=2), "ft2"))]
    cfg = {"merge_method": "sce", "base_model": str(paths[0]), "dtype": "float32",
           "models": [{"model": str(p)} for p in paths[1:]]}
    out = open_source(run_config(cfg, tmp_path / "out", progress=False, copy_tokenizer=False))
    srcs = [open_source(p) for p in paths]
    k = "model.layers.0.mlp.up_proj.weight"
    b, fts = srcs[0].get(k), [s.get(k) for s in srcs[1:]]
    mk = merge("sce", b, fts, semantics="mergekit")
    assert torch.equal(out.get(k), mk)
    assert not torch.allclose(merge("sce", b, fts), mk, rtol=0, atol=1e-9)


# --- the O(n) selections behind arcee_fusion's quantiles and SCE's top-k: the same values / sets as torch's

@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3000), levels=st.integers(1, 50), seed=st.integers(0, 2**16))
def test_order_statistics_equal_kthvalue(n, levels, seed):
    from taskvec.methods.selective import order_statistics

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (n,), generator=g).float() / levels  # heavy ties
    qs = (0.25, 0.5, 0.75)
    expected = [x.kthvalue(int(torch.tensor(q) * (n - 1)) + 1).values for q in qs]
    assert [float(v) for v in order_statistics(x, qs)] == [float(v) for v in expected]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 2000), levels=st.integers(2, 40), topk=st.floats(0.01, 0.99), seed=st.integers(0, 2**16))
def test_sce_selection_is_the_topk_set(n, levels, topk, seed):
    from taskvec.methods.sce import sce_select

    g = torch.Generator().manual_seed(seed)
    deltas = torch.randint(-levels, levels, (3, n), generator=g).float() / levels  # ties in the variance
    score = torch.var(deltas, dim=0, unbiased=False).abs()
    k = int(torch.count_nonzero(score) * topk)
    ours = sce_select(deltas, topk)
    assert ours.dtype == torch.float32 and int(ours.sum()) == k
    if k == 0:
        return
    values, _ = torch.topk(score, k)
    kth = values[-1]
    # topk's set above the k-th largest value; at it, the tied entries with the lowest indices
    expected = score > kth
    tied = torch.nonzero(score == kth).view(-1)
    expected[tied[:k - int(expected.sum())]] = True
    assert torch.equal(ours.bool(), expected)
    if int((score >= kth).sum()) == k:  # no tie across the cut: exactly torch.topk's set
        reference = torch.zeros(n, dtype=torch.bool)
        reference[torch.topk(score, k).indices] = True
        assert torch.equal(ours.bool(), reference)


@settings(max_examples=30, deadline=None)
@given(n_models=st.integers(1, 6), n=st.integers(1, 5000), scale=st.sampled_from([1e-6, 1e-2, 1.0, 1e4]),
       bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_population_variance_is_torch_var_bit_for_bit(n_models, n, scale, bf16, seed):
    from taskvec.methods import sce

    g = torch.Generator().manual_seed(seed)
    deltas = torch.randn(n_models, n, generator=g) * scale
    if bf16:  # fine-tuning deltas of bf16 checkpoints, signed zeros included
        base = torch.randn(n, generator=g).to(torch.bfloat16).float()
        deltas = (base + deltas).to(torch.bfloat16).float() - base
        deltas[:, :3] = -0.0
    from taskvec.methods import fused

    expected = torch.var(deltas.reshape(n_models, n, 1), dim=0, unbiased=False)
    fused_result = sce.population_variance(deltas.reshape(n_models, n, 1))  # numba's pass where installed
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused, "AVAILABLE", False)  # the torch path: float64 chunks
        mp.setattr(sce, "_VAR_CHUNK", 1000)  # several chunks, the last one partial
        torch_result = sce.population_variance(deltas.reshape(n_models, n, 1))
    for ours in (fused_result, torch_result):
        assert torch.equal(ours.view(torch.int32), expected.view(torch.int32))
