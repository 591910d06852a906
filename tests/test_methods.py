"""Per-tensor methods against the papers' equations on tiny hand-computed tensors,
plus hypothesis property tests of their invariants."""
from __future__ import annotations

import hashlib
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskvec.errors import ParameterError, ShapeMismatchError
from taskvec.methods import (
    METHODS,
    MagnitudeSelector,
    analogy,
    dare_drop,
    della_magprune,
    disjoint_mean,
    elect_sign,
    fisher_merge,
    get_method,
    global_magnitude_threshold,
    kth_largest_abs,
    linear_average,
    model_stock,
    negate,
    regmean_merge,
    slerp,
    task_arithmetic,
    tensor_generator,
    trim_breadcrumbs,
    trim_topk,
)

T = torch.tensor


def close(a, b, tol=1e-6):
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=tol, rtol=tol), f"\n{a}\n!=\n{b}"


# ------------------------------------------------------------------------------------------------
# TIES


def test_trim_topk_keeps_the_k_largest_magnitudes():
    tau = T([0.5, -3.0, 1.0, 0.1, -0.2, 2.0, -0.05, 0.3, 0.0, -1.5])
    # density 0.3 of 10 -> k = 3: |-3|, |2|, |-1.5|
    close(trim_topk(tau, 0.3), [0, -3.0, 0, 0, 0, 2.0, 0, 0, 0, -1.5])
    close(trim_topk(tau, 0.1), [0, -3.0, 0, 0, 0, 0, 0, 0, 0, 0])
    close(trim_topk(tau, 1.0), tau)
    # k is floor(density * n) but at least one
    close(trim_topk(T([1.0, -2.0, 3.0]), 0.01), [0, 0, 3.0])


def test_trim_topk_ties_at_the_kth_magnitude_are_all_kept():
    close(trim_topk(T([1.0, -1.0, 0.5, 1.0]), 0.25), [1.0, -1.0, 0, 1.0])


def test_trim_topk_with_global_threshold_and_no_mutation():
    tau = T([[0.5, -3.0], [1.0, 0.1]])
    before = tau.clone()
    close(trim_topk(tau, 0.5, threshold=0.5), [[0.5, -3.0], [1.0, 0.0]])
    assert torch.equal(tau, before)
    out = trim_topk(tau, 1.0)
    assert out.data_ptr() != tau.data_ptr()


def test_trim_topk_large_tensor_uses_exact_radix_select():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300_000, generator=g)
    for density in (0.2, 0.013, 0.9):
        k = math.floor(density * x.numel())
        ref = x.abs().topk(k).values[-1]
        assert kth_largest_abs(x, k) == ref.item()
        kept = trim_topk(x, density)
        assert int(kept.count_nonzero()) == k
        assert torch.equal(kept != 0, x.abs() >= ref)


def test_global_threshold_over_a_stream_matches_concatenation():
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(300, 400, generator=g), 3 * torch.randn(70_000, generator=g), torch.randn(5, generator=g)]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    k = math.floor(0.2 * flat.numel())
    ref = flat.abs().topk(k).values[-1].item()
    assert global_magnitude_threshold(lambda: iter(tensors), 0.2) == ref
    sel = MagnitudeSelector(k=7)
    for t in tensors:
        sel.observe(t)
    for t in tensors:
        sel.refine(t)
    assert sel.value == flat.abs().topk(7).values[-1].item()


def test_global_vs_per_tensor_trim_scope():
    base = {"a": torch.zeros(4), "b": torch.zeros(4)}
    ft = {"a": T([10.0, 9.0, 8.0, 7.0]), "b": T([0.4, -0.3, 0.2, 0.1])}
    ties = get_method("ties")
    # per tensor, density 0.5: the top two of each tensor
    per = {k: ties.merge_tensor(base[k], [ft[k]], name=k, density=0.5) for k in base}
    close(per["a"], [10.0, 9.0, 0, 0])
    close(per["b"], [0.4, -0.3, 0, 0])
    # global, density 0.5 of 8 -> 4: all of a, nothing of b
    thr = global_magnitude_threshold(lambda: (ft[k] - base[k] for k in base), 0.5)
    assert thr == 7.0
    glob = {k: ties.merge_tensor(base[k], [ft[k]], name=k, density=0.5, trim_scope="global", threshold=[thr]) for k in base}
    close(glob["a"], [10.0, 9.0, 8.0, 7.0])
    close(glob["b"], [0, 0, 0, 0])
    with pytest.raises(ParameterError, match="threshold"):
        ties.merge_tensor(base["a"], [ft["a"]], name="a", trim_scope="global")


def test_elect_sign_mass_count_and_ties():
    d = T([[1.0, -2.0, 3.0, 0.0, 1.0], [-3.0, 1.0, 1.0, 0.0, -1.0], [-0.5, 0.5, -5.0, 0.0, 0.0]])
    # mass: sums -2.5, -0.5, -1.0, 0, 0
    close(elect_sign(d, "mass"), [-1, -1, -1, 0, 0])
    # count: sign sums -1, 1, 1, 0, 0
    close(elect_sign(d, "count"), [-1, 1, 1, 0, 0])
    with pytest.raises(ParameterError, match="consensus"):
        elect_sign(d, "vote")


def test_disjoint_mean_ignores_zeros_and_disagreeing_models():
    d = T([[1.0, -2.0, 0.0, 4.0], [3.0, 0.0, 0.0, -2.0], [0.0, -4.0, 0.0, 2.0]])
    signs = T([1.0, -1.0, 1.0, 1.0])
    # col0: mean(1,3)=2 (zero ignored); col1: mean(-2,-4)=-3; col2: none -> 0; col3: mean(4,2)=3
    close(disjoint_mean(d, signs), [2.0, -3.0, 0.0, 3.0])


def test_ties_full_pipeline_by_hand():
    base = T([1.0, 1.0, 1.0, 1.0, 1.0])
    t1 = base + T([0.9, -0.1, 0.5, -0.7, 0.05])
    t2 = base + T([-0.2, 0.8, 0.6, -0.1, -0.02])
    t3 = base + T([0.3, -0.9, -0.05, 0.4, 0.01])
    # density 0.6 -> k = 3 per model
    # trimmed: [0.9, 0, 0.5, -0.7, 0], [-0.2, 0.8, 0.6, 0, 0], [0.3, -0.9, 0, 0.4, 0]
    # mass: 1.0, -0.1, 1.1, -0.3, 0   -> gamma = +, -, +, -, 0
    # disjoint mean: (0.9+0.3)/2, -0.9, (0.5+0.6)/2, -0.7, 0
    out = get_method("ties").merge_tensor(base, [t1, t2, t3], name="w", density=0.6, **{"lambda": 0.5})
    close(out, base + 0.5 * T([0.6, -0.9, 0.55, -0.7, 0.0]))


def test_ties_weights_paper_vs_mergekit_semantics():
    """Paper: unweighted election, weights scale agreeing vectors, divide by |A|.
    mergekit: weighted election (tie -> +1), divide by the sum of agreeing weights."""
    base = torch.zeros(3)
    t1, t2 = T([1.0, 2.0, 1.0]), T([-2.0, -1.0, -1.0])
    w = [3.0, 1.0]
    ties = get_method("ties")
    paper = ties.merge_tensor(base, [t1, t2], name="x", density=1.0, weight=w)
    # unweighted mass: -1, 1, 0 -> signs -, +, 0
    # col0: only model 2 agrees: 1*(-2)/1; col1: model 1: 3*2/1; col2: no sign elected -> 0
    close(paper, [-2.0, 6.0, 0.0])
    mk = ties.merge_tensor(base, [t1, t2], name="x", density=1.0, weight=w, semantics="mergekit")
    # weighted: [3,6,3] and [-2,-1,-1]; mass 1, 5, 2 -> all +; agreeing: model 1 everywhere
    # normalize by agreeing weight 3: [1, 2, 1]
    close(mk, [1.0, 2.0, 1.0])
    mk_sum = ties.merge_tensor(base, [t1, t2], name="x", density=1.0, weight=w, semantics="mergekit", normalize=False)
    close(mk_sum, [3.0, 6.0, 3.0])
    # mergekit resolves a zero vote to +1 where the paper elects no sign
    tie = ties.merge_tensor(base, [T([1.0, 0, 0]), T([-1.0, 0, 0])], name="x", density=1.0, semantics="mergekit")
    close(tie, [1.0, 0, 0])
    close(ties.merge_tensor(base, [T([1.0, 0, 0]), T([-1.0, 0, 0])], name="x", density=1.0), [0, 0, 0])


# ------------------------------------------------------------------------------------------------
# DARE


def test_dare_drop_rescales_survivors():
    tau = T([1.0, -2.0, 3.0, 4.0, -5.0, 6.0, 7.0, 8.0])
    out = dare_drop(tau, 0.75, generator=tensor_generator(1, "w"))
    kept = out != 0
    assert 0 < int(kept.sum()) < tau.numel()
    close(out[kept], tau[kept] * 4.0)  # 1 / (1 - 0.75)
    raw = dare_drop(tau, 0.75, rescale=False, generator=tensor_generator(1, "w"))
    assert torch.equal(raw != 0, kept)
    close(raw[kept], tau[kept])


def test_dare_parameters_validated():
    with pytest.raises(ParameterError, match="p"):
        dare_drop(torch.ones(3), 1.0)
    with pytest.raises(ParameterError, match="p"):
        dare_drop(torch.ones(3), -0.1)


def test_tensor_generator_is_stable_and_name_dependent():
    a = torch.rand(5, generator=tensor_generator(3, "layer.0.weight"))
    b = torch.rand(5, generator=tensor_generator(3, "layer.0.weight"))
    c = torch.rand(5, generator=tensor_generator(3, "layer.1.weight"))
    d = torch.rand(5, generator=tensor_generator(4, "layer.0.weight"))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    # the seed is derived independently here: BLAKE2b-64 of "seed NUL name", little-endian, top bit cleared
    # (the documented rule; Python's salted hash() would change between processes)
    digest = hashlib.blake2b(b"0\x00x", digest_size=8).digest()
    expected = sum(byte << (8 * i) for i, byte in enumerate(digest)) % 2**63
    assert expected == 714206238375637641  # pinned: a change of the rule changes every DARE mask ever drawn
    assert tensor_generator(0, "x").initial_seed() == expected
    assert torch.equal(torch.rand(4, generator=tensor_generator(0, "x")),
                       torch.rand(4, generator=torch.Generator().manual_seed(expected)))


def test_dare_ties_paper_mean_vs_mergekit_sum():
    base = torch.zeros(4)
    t1, t2 = T([1.0, 2.0, -1.0, 4.0]), T([3.0, -2.0, -3.0, 2.0])
    dt = get_method("dare_ties")
    # p = 0: no drop; paper -> disjoint mean, mergekit (normalize false by default there) -> disjoint sum
    close(dt.merge_tensor(base, [t1, t2], name="x", p=0.0), [2.0, 0.0, -2.0, 3.0])
    close(dt.merge_tensor(base, [t1, t2], name="x", p=0.0, semantics="mergekit"), [4.0, 2.0, -4.0, 6.0])
    # mergekit's spelling: density = 1 - p
    a = dt.merge_tensor(base, [t1, t2], name="x", density=0.5, seed=7)
    b = dt.merge_tensor(base, [t1, t2], name="x", p=0.5, seed=7)
    assert torch.equal(a, b)
    with pytest.raises(ParameterError, match="not both"):
        dt.merge_tensor(base, [t1, t2], name="x", p=0.5, density=0.5)


def test_dare_linear_is_task_arithmetic_of_dropped_vectors():
    base = T([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    t = [base + T([1.0, -1.0, 2.0, 0.5, 3.0, -2.0]), base + T([0.5, 0.5, -1.0, 1.0, 1.0, 1.0])]
    out = get_method("dare_linear").merge_tensor(base, t, name="m.w", p=0.5, seed=3, weight=[1.0, 0.5])
    d0 = dare_drop(t[0] - base, 0.5, generator=tensor_generator(3, "m.w"))
    d1 = dare_drop(t[1] - base, 0.5, generator=tensor_generator(4, "m.w"))
    close(out, base + d0 + 0.5 * d1)


# ------------------------------------------------------------------------------------------------
# Task arithmetic, averaging, SLERP, breadcrumbs, DELLA, model stock, Fisher, RegMean


def test_task_arithmetic_negation_analogy():
    base = T([1.0, 2.0, 3.0])
    tau1, tau2 = T([0.5, 0.0, -1.0]), T([1.0, 1.0, 1.0])
    close(task_arithmetic(base, [tau1, tau2], lam=0.4), [1.6, 2.4, 3.0])
    close(negate(base, tau1, lam=2.0), [0.0, 2.0, 5.0])
    close(analogy(T([1.0, 0, 0]), T([0, 1.0, 0]), T([0, 0, 1.0])), [-1.0, 1.0, 1.0])
    out = get_method("task_arithmetic").merge_tensor(base, [base + tau1, base + tau2], name="x", weight=[1.0, -1.0])
    close(out, [0.5, 1.0, 1.0])


def test_linear_average_weighted_and_unnormalized():
    a, b = T([1.0, 2.0]), T([3.0, 6.0])
    close(linear_average([a, b], [1.0, 3.0]), [2.5, 5.0])
    close(linear_average([a, b], [1.0, 3.0], normalize=False), [10.0, 20.0])
    close(get_method("linear").merge_tensor(None, [a, b], name="x"), [2.0, 4.0])
    with pytest.raises(ParameterError, match="weight"):
        get_method("linear").merge_tensor(None, [a, b], name="x", weight=[1.0])
    with pytest.raises(ParameterError, match="sum to 0"):
        linear_average([a, b], [1.0, -1.0])


def test_slerp_endpoints_midpoint_and_colinear():
    v0, v1 = T([1.0, 0.0]), T([0.0, 1.0])
    close(slerp(0.0, v0, v1), v0)
    close(slerp(1.0, v0, v1), v1)
    # quarter circle, midpoint at 45 degrees: sin(pi/4)/sin(pi/2) each
    h = math.sqrt(0.5)
    close(slerp(0.5, v0, v1), [h, h])
    # nearly colinear: linear interpolation
    close(slerp(0.25, T([1.0, 2.0]), T([2.0, 4.0])), [1.25, 2.5])
    with pytest.raises(ParameterError, match="t must be"):
        slerp(1.5, v0, v1)
    m = get_method("slerp")
    close(m.merge_tensor(v0, [v1], name="x", t=0.5), [h, h])
    close(m.merge_tensor(None, [v0, v1], name="x", t=0.5), [h, h])
    with pytest.raises(ParameterError, match="exactly two"):
        m.merge_tensor(v0, [v0, v1], name="x")


def test_breadcrumbs_drops_outliers_and_small_entries():
    tau = T([10.0, -9.0, 5.0, -4.0, 3.0, 2.0, -1.0, 0.5, 0.2, 0.1])
    # gamma 0.1 -> the single largest goes; density 0.5 -> five kept below it
    close(trim_breadcrumbs(tau, 0.5, 0.1), [0, -9.0, 5.0, -4.0, 3.0, 2.0, 0, 0, 0, 0])
    close(trim_breadcrumbs(tau, 0.5, 0.0), [10.0, -9.0, 5.0, -4.0, 3.0, 0, 0, 0, 0, 0])
    # keep + outliers > n: fewer outliers cut (mergekit's rule)
    close(trim_breadcrumbs(tau, 0.95, 0.2), [0, -9.0, 5.0, -4.0, 3.0, 2.0, -1.0, 0.5, 0.2, 0.1])


def test_della_keep_probability_follows_rank():
    g = torch.Generator().manual_seed(0)
    row = torch.arange(1, 11, dtype=torch.float32)  # ranks 0..9, keep prob 0.4 .. 0.8
    keeps = torch.zeros(10)
    n = 4000
    for _ in range(n):
        keeps += della_magprune(row, 0.6, 0.2, rescale=False, generator=g) != 0
    expected = 0.4 + 0.4 * torch.arange(10) / 9
    # each count is Binomial(n, p_r): allow 4.5 standard deviations per entry, no relative slack
    # (P(any of 10 beyond) < 1e-4); an off-by-one rank mapping (r/m instead of r/(m-1)) is 5 sigma off
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((keeps / n - expected).abs() <= 4.5 * sigma).all(), (keeps / n, expected)
    # rescale divides by each entry's own keep probability
    out = della_magprune(row, 0.6, 0.2, generator=torch.Generator().manual_seed(1))
    kept = out != 0
    close(out[kept], (row / expected)[kept], tol=1e-5)
    with pytest.raises(ParameterError, match="epsilon"):
        della_magprune(row, 0.9, 0.2)


def test_dare_l1_rescale_by_hand():
    """mergekit's rescale: one factor per tensor, ||tau||_1 / ||kept tau||_1 (here ||tau||_1 = 1+2+3+4 = 10)."""
    tau = T([1.0, -2.0, 3.0, -4.0])
    raw = dare_drop(tau, 0.5, rescale=False, generator=tensor_generator(1, "w"))
    kept = raw != 0
    assert 0 < kept.sum() < 4  # this seed keeps some and drops some
    factor = 10.0 / float(tau[kept].abs().sum())
    out = dare_drop(tau, 0.5, rescale="l1", generator=tensor_generator(1, "w"))
    close(out, torch.where(kept, tau * factor, 0.0))
    close(out.abs().sum(), 10.0)
    # the paper's rescale is per entry: 1 / (1 - p) = 2
    close(dare_drop(tau, 0.5, generator=tensor_generator(1, "w")), torch.where(kept, 2 * tau, 0.0))
    with pytest.raises(ParameterError, match="rescale"):
        dare_drop(tau, 0.5, rescale="l2")


def test_della_l1_rescale_is_one_factor_per_tensor():
    tau = torch.arange(1.0, 13.0).reshape(3, 4) * T([1.0, -1.0, 1.0, -1.0])
    raw = della_magprune(tau, 0.5, 0.2, rescale=False, generator=torch.Generator().manual_seed(3))
    out = della_magprune(tau, 0.5, 0.2, rescale="l1", generator=torch.Generator().manual_seed(3))
    kept = raw != 0
    close(out, torch.where(kept, tau * (78.0 / float(tau[kept].abs().sum())), 0.0))  # 1 + ... + 12 = 78


@pytest.mark.parametrize("method,params", [
    ("dare_linear", {"p": 0.6}), ("dare_ties", {"density": 0.4}), ("della", {"density": 0.5, "epsilon": 0.2}),
    ("della_linear", {"density": 0.5, "epsilon": 0.2}),
])
def test_rescale_is_l1_under_mergekit_semantics_and_per_entry_in_the_paper(method, params):
    base = torch.zeros(2, 50)
    tau = torch.linspace(-3, 4, 100).reshape(2, 50)
    m = get_method(method)
    for rescale in (True, "l1"):  # mergekit's `rescale: true` is the L1 factor
        out = m.merge_tensor(base, [base + tau], name="w", semantics="mergekit", seed=2, rescale=rescale, **params)
        assert math.isclose(float(out.abs().sum()), float(tau.abs().sum()), rel_tol=1e-6), rescale
        kept = out != 0
        ratio = out[kept] / tau[kept]
        assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-6)  # one factor for the whole tensor
    # the paper's default: each survivor divided by its own keep probability, so ||.||_1 is only kept on average
    paper = m.merge_tensor(base, [base + tau], name="w", seed=2, **params)
    l1 = m.merge_tensor(base, [base + tau], name="w", seed=2, rescale="l1", **params)
    assert torch.equal(paper != 0, l1 != 0) and not torch.allclose(paper, l1)


def test_ties_negative_weight_refused_in_the_paper_and_warned_under_mergekit():
    base = torch.zeros(2)
    fts = [T([2.0, -1.0]), T([1.0, 1.0])]
    ties = get_method("ties")
    with pytest.raises(ParameterError, match=r"weight \(model 1: -0.5\).*contradicts the elected sign"):
        ties.merge_tensor(base, fts, name="w", density=1.0, weight=[1.0, -0.5])
    # mergekit: -0.5 * tau_1 votes: weighted [2, -1], [-0.5, -0.5] -> signs [+, -]; agreeing sums [2, -1.5];
    # normalize divides by the agreeing weights [1, 1 - 0.5] -> [2, -3]
    with pytest.warns(UserWarning, match="opposite to the elected"):
        out = ties.merge_tensor(base, fts, name="w", density=1.0, weight=[1.0, -0.5], semantics="mergekit")
    close(out, [2.0, -3.0])
    # where only the negatively weighted model agrees, normalize flips the entry against the elected sign
    with pytest.warns(UserWarning):
        out = ties.merge_tensor(base[:1], [T([2.0])], name="w", density=1.0, weight=[-1.0], semantics="mergekit")
    close(out, [2.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # without normalize it is a plain, coherent negation: no warning
        out = ties.merge_tensor(base[:1], [T([2.0])], name="w", density=1.0, weight=[-1.0], semantics="mergekit",
                                normalize=False)
        close(out, [-2.0])
        # and in task arithmetic weight < 0 is negation, in both semantics
        close(get_method("task_arithmetic").merge_tensor(base, [T([2.0, -1.0])], name="w", weight=[-1.0]),
              [-2.0, 1.0])


def test_integer_tensors_pass_through_merge_tensor_as_in_merge():
    ids, other = torch.arange(4), torch.arange(4) * 3
    for method in ("linear", "task_arithmetic", "ties", "dare_linear", "model_stock", "slerp"):
        m = get_method(method)
        n = 2 if method == "model_stock" else 1
        out = m.merge_tensor(ids, [other] * n, name="position_ids")
        assert out.dtype == torch.int64 and torch.equal(out, ids) and out.data_ptr() != ids.data_ptr(), method
    # without a base the first model is the template, as merge() copies its buffers
    assert torch.equal(get_method("linear").merge_tensor(None, [other, ids], name="position_ids"), other)
    with pytest.raises(ShapeMismatchError, match="position_ids.*float and non-float"):
        get_method("linear").merge_tensor(None, [other.float(), ids], name="position_ids")


def test_model_stock_by_hand():
    base = T([0.0, 0.0])
    w1, w2 = T([1.0, 0.0]), T([0.0, 1.0])  # orthogonal task vectors: cos 0 -> t = 0 -> base
    close(model_stock(base, [w1, w2]), [0.0, 0.0])
    w1, w2 = T([1.0, 1.0]), T([2.0, 2.0])  # parallel: cos 1 -> t = 1 -> average
    close(model_stock(base, [w1, w2]), [1.5, 1.5])
    # cos 0.5: t = 2*0.5 / (1 + 0.5) = 2/3
    w1, w2 = T([1.0, 0.0]), T([0.5, math.sqrt(3) / 2])
    close(model_stock(base, [w1, w2]), (2 / 3) * (w1 + w2) / 2, tol=1e-5)


def test_model_stock_opposing_task_vectors():
    base = T([1.0, 1.0])
    m = get_method("model_stock")
    # N = 2, cos = -1 = -1/(N-1): the formula divides by zero. Clamped (paper) and mergekit's guard: the base
    w1, w2 = T([2.0, 1.0]), T([0.0, 1.0])
    close(model_stock(base, [w1, w2]), base)
    close(model_stock(base, [w1, w2], clamp=False), base)
    # N = 3 at 120 degrees apart: cos = -1/2 = -1/(N-1), singular again
    c, s3 = -0.5, math.sqrt(3) / 2
    ws = [base + T([1.0, 0.0]), base + T([c, s3]), base + T([c, -s3])]
    for sem in ("paper", "mergekit"):
        close(m.merge_tensor(base, ws, name="w", semantics=sem), base)
    # N = 2, cos = -1/2: clamped to 0 -> t = 0 -> the base; mergekit extrapolates, t = 2(-1/2)/(1 - 1/2) = -2
    w1, w2 = base + T([1.0, 0.0]), base + T([c, s3])
    close(m.merge_tensor(base, [w1, w2], name="w"), base)
    avg = (w1 + w2) / 2
    close(m.merge_tensor(base, [w1, w2], name="w", semantics="mergekit"), -2 * avg + 3 * base, tol=1e-5)
    assert torch.isfinite(model_stock(base, [w1, w2], clamp=False)).all()


def test_model_stock_filter_wise_is_one_angle_per_row():
    base = torch.zeros(2, 2)
    w1, w2 = T([[1.0, 0.0], [1.0, 1.0]]), T([[0.0, 1.0], [2.0, 2.0]])
    # row 0 orthogonal (cos 0, t = 0: the base row); row 1 parallel (cos 1, t = 1: the average row)
    close(model_stock(base, [w1, w2], filter_wise=True), [[0.0, 0.0], [1.5, 1.5]])
    close(get_method("model_stock").merge_tensor(base, [w1, w2], name="w", filter_wise=True),
          [[0.0, 0.0], [1.5, 1.5]])
    # whole tensor: dot = 0 + 0 + 2 + 2 = 4, norms sqrt(3) and 3 -> cos = 4 / (3 sqrt 3), t = 2 cos / (1 + cos)
    cos = 4 / (3 * math.sqrt(3))
    close(model_stock(base, [w1, w2]), (2 * cos / (1 + cos)) * (w1 + w2) / 2, tol=1e-6)
    # a 1-D tensor is one row either way
    v1, v2 = T([1.0, 0.0]), T([1.0, 1.0])
    close(model_stock(torch.zeros(2), [v1, v2], filter_wise=True), model_stock(torch.zeros(2), [v1, v2]))


def test_fisher_merge_by_hand():
    a, b = T([1.0, 1.0, 4.0]), T([3.0, 5.0, 0.0])
    fa, fb = T([1.0, 0.0, 2.0]), T([1.0, 1.0, 2.0])
    # col0: (1+3)/2; col1: F_a floored to eps -> ~5; col2: (8+0)/4
    close(fisher_merge([a, b], [fa, fb], eps=1e-6), [2.0, (1e-6 + 5) / (1 + 1e-6), 2.0], tol=1e-5)
    m = get_method("fisher")
    out = m.merge_tensor(None, [a, b], name="w", fisher=[{"w": fa}, {"w": fb}], normalize=False)
    close(out, fisher_merge([a, b], [fa, fb]))
    # by name, the default normalises each whole Fisher: ||F_a|| = sqrt(5), ||F_b|| = sqrt(6);
    # col0: (1/r5 * 1 + 1/r6 * 3) / (1/r5 + 1/r6); col2: (2/r5 * 4) / (2/r5 + 2/r6)
    r5, r6 = 5 ** 0.5, 6 ** 0.5
    out = m.merge_tensor(None, [a, b], name="w", fisher=[{"w": fa}, {"w": fb}])
    close(out, [(1 / r5 + 3 / r6) / (1 / r5 + 1 / r6), (1e-6 / r5 + 5 / r6) / (1e-6 / r5 + 1 / r6),
                (8 / r5) / (2 / r5 + 2 / r6)], tol=1e-5)
    # a tensor no model has statistics for is plainly averaged
    close(m.merge_tensor(None, [a, b], name="other", fisher=[{"w": fa}, {"w": fb}]), (a + b) / 2)


def test_regmean_by_hand():
    # 1-in, 1-out: W* = (w1 g1 + w2 g2) / (g1 + g2)
    close(regmean_merge([T([[2.0]]), T([[4.0]])], [T([[1.0]]), T([[3.0]])]), [[3.5]])
    # alpha = 0 drops the off-diagonals: each column is a Gram-diagonal-weighted mean
    w1, w2 = T([[1.0, 0.0]]), T([[0.0, 1.0]])
    g1, g2 = T([[3.0, 1.0], [1.0, 1.0]]), T([[1.0, 1.0], [1.0, 3.0]])
    close(regmean_merge([w1, w2], [g1, g2], alpha=0.0), [[0.75, 0.75]])
    # full alpha: W* = (W1 G1 + W2 G2)(G1 + G2)^-1
    ref = (w1 @ g1 + w2 @ g2) @ torch.linalg.inv(g1 + g2)
    close(regmean_merge([w1, w2], [g1, g2], alpha=1.0), ref, tol=1e-5)
    m = get_method("regmean")
    close(m.merge_tensor(None, [w1, w2], name="fc.weight", gram=[{"fc": g1}, {"fc": g2}], alpha=1.0), ref, tol=1e-5)
    close(m.merge_tensor(None, [T([1.0]), T([3.0])], name="fc.bias", gram=[{"fc": g1}, {"fc": g2}]), [2.0])


# ------------------------------------------------------------------------------------------------
# Registry and validation


def test_registry_names_and_descriptions():
    expected = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "breadcrumbs",
                "breadcrumbs_ties", "della", "della_linear", "model_stock", "fisher", "regmean", "passthrough"}
    assert expected <= set(METHODS)
    ties = get_method("ties")
    assert ties.needs_base and "density" in ties.per_model_params and "lambda" in ties.global_params
    assert ties.defaults["density"] == 0.2
    assert "density" in repr(ties)
    with pytest.raises(ParameterError) as e:
        get_method("tie")
    assert "task_arithmetic" in str(e.value) and "passthrough" in str(e.value)


@pytest.mark.parametrize(
    "method,params,match",
    [
        ("ties", {"density": 0.0}, "density"),
        ("ties", {"density": 1.5}, "density"),
        ("ties", {"density": [0.5, 0.5, 0.5]}, "density: got 3 values for 2 models"),
        ("ties", {"weight": [1.0]}, "weight"),
        ("dare_ties", {"p": 1.0}, "p"),
        ("dare_linear", {"p": -0.5}, "p"),
        ("slerp", {"t": 1.2}, "t"),
        ("ties", {"lambda": [1.0, 2.0]}, "global"),
        ("ties", {"densty": 0.5}, "densty"),
        ("ties", {"consensus": "vote"}, "consensus"),
        ("ties", {"normalize": "yes"}, "normalize"),
    ],
)
def test_parameters_validated_up_front(method, params, match):
    m = get_method(method)
    with pytest.raises(ParameterError, match=match):
        m.check_params(2 if method != "slerp" else 1, **params)


def test_empty_model_list_and_missing_base():
    with pytest.raises(ParameterError, match="empty"):
        get_method("linear").check_params(0)
    with pytest.raises(ParameterError, match="base"):
        get_method("ties").merge_tensor(None, [torch.ones(2)], name="x")


def test_callable_params_resolved_per_tensor_and_checked():
    base = torch.zeros(4)
    t = T([4.0, 3.0, 2.0, 1.0])
    density = lambda name: 0.25 if "mlp" in name else 1.0  # noqa: E731
    ties = get_method("ties")
    close(ties.merge_tensor(base, [t], name="mlp.w", density=density), [4.0, 0, 0, 0])
    close(ties.merge_tensor(base, [t], name="attn.w", density=density), t)
    with pytest.raises(ParameterError, match="density.*attn"):
        ties.merge_tensor(base, [t], name="attn.w", density=lambda name: 2.0)
    close(ties.merge_tensor(base, [t], name="mlp.w", density=[lambda name: 0.5]), [4.0, 3.0, 0, 0])


# ------------------------------------------------------------------------------------------------
# Properties

small = st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=1, max_size=24)


@settings(max_examples=40, deadline=None)
@given(small, st.integers(0, 2**31))
def test_prop_dare_p0_is_identity(values, seed):
    tau = T(values)
    assert torch.equal(dare_drop(tau, 0.0, generator=tensor_generator(seed, "x")), tau)


@settings(max_examples=10, deadline=None)
@given(st.floats(0.05, 0.9), st.integers(0, 1000))
def test_prop_dare_unbiased(p, seed):
    tau = torch.linspace(-2, 2, 16)
    mean = torch.stack([dare_drop(tau, p, generator=tensor_generator(seed, f"t{i}")) for i in range(3000)]).mean(0)
    # std of the mean per entry: |tau| sqrt(p / (1-p) / 3000)
    tol = 5 * 2 * math.sqrt(p / (1 - p) / 3000) + 1e-6
    assert torch.allclose(mean, tau, atol=tol)


@settings(max_examples=40, deadline=None)
@given(small, small)
def test_prop_ties_density1_single_model_is_task_arithmetic(b, d):
    n = min(len(b), len(d))
    base, ft = T(b[:n]), T(b[:n]) + T(d[:n])
    lam = 0.7
    ties = get_method("ties").merge_tensor(base, [ft], name="x", density=1.0, **{"lambda": lam})
    ta = get_method("task_arithmetic").merge_tensor(base, [ft], name="x", **{"lambda": lam})
    close(ties, ta, tol=1e-5)


@settings(max_examples=40, deadline=None)
@given(small, small, st.floats(0.0, 1.0))
def test_prop_slerp_endpoints(a, b, t):
    n = min(len(a), len(b))
    v0, v1 = T(a[:n]), T(b[:n])
    close(slerp(0.0, v0, v1), v0, tol=1e-5)
    close(slerp(1.0, v0, v1), v1, tol=1e-5)
    assert torch.isfinite(slerp(t, v0, v1)).all()


@settings(max_examples=40, deadline=None)
@given(small, st.integers(1, 4))
def test_prop_averaging_identical_models_is_identity(values, n):
    theta = T(values)
    close(get_method("linear").merge_tensor(None, [theta] * n, name="x"), theta, tol=1e-5)
    close(get_method("fisher").merge_tensor(None, [theta] * n, name="x", fisher=[{"x": theta.abs() + 1.0}] * n), theta, tol=1e-5)


@settings(max_examples=30, deadline=None)
@given(small, small, st.sampled_from(sorted(set(METHODS) - {"fisher", "regmean", "passthrough", "model_stock", "slerp",
                                                               "nuslerp", "nearswap"})))  # test_methods_mergekit.py
def test_prop_merge_tensor_never_aliases_or_mutates(b, d, method):
    n = min(len(b), len(d))
    base, ft = T(b[:n]), T(b[:n]) + T(d[:n])
    before = (base.clone(), ft.clone())
    m = get_method(method)
    out = m.merge_tensor(base, [ft], name="x") if m.needs_base else m.merge_tensor(None, [ft], name="x")
    assert torch.equal(base, before[0]) and torch.equal(ft, before[1])
    assert out.data_ptr() not in (base.data_ptr(), ft.data_ptr())
    out.add_(1.0)
    assert torch.equal(base, before[0]) and torch.equal(ft, before[1])


@settings(max_examples=40, deadline=None)
@given(small, st.floats(0.01, 1.0))
def test_prop_trim_topk_keeps_at_least_k_largest(values, density):
    tau = T(values)
    out = trim_topk(tau, density)
    k = max(1, math.floor(density * tau.numel() + 1e-9))
    kth = tau.abs().topk(k).values[-1]
    assert torch.equal(out, torch.where(tau.abs() >= kth, tau, torch.zeros_like(tau)))


@settings(max_examples=30, deadline=None)
@given(small, st.floats(0.05, 0.95), st.integers(0, 2**31))
def test_prop_dare_l1_rescale_keeps_the_l1_norm(values, p, seed):
    tau = T(values)
    out = dare_drop(tau, p, rescale="l1", generator=tensor_generator(seed, "x"))
    kept = out != 0
    if float(tau[kept].abs().sum()) >= 1e-6:  # below mergekit's eps nothing is rescaled
        assert math.isclose(float(out.abs().sum()), float(tau.abs().sum()), rel_tol=1e-5)
