"""NearSwap, RAM, RAM+ (tensor-local) and Model Stock as fused numba kernels (`fused.fused_nearswap`,
`fused.fused_ram`, `fused.fused_model_stock`) against their torch references (`selective.nearswap`,
`ram.ram_merge`, `model_stock.model_stock`), bit for bit, also through `merge_fast` as `taskvec.merging.merge`
calls it. Inputs are built to hit each branch: entries equal to the base's, changes of exactly epsilon, signed
zeros, updates made by one model only and by several, aligned and opposing task vectors."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskvec.methods import get_method

numba = pytest.importorskip("numba")
from taskvec.methods import fused  # noqa: E402  (after the numba check)
from tests.helpers import float_bits  # noqa: E402

pytestmark = pytest.mark.usefixtures("fused_kernels_in_the_caller")

EPS = 1e-3


def _inputs(n: int, n_models: int, dtype: torch.dtype, seed: int, change: float = 0.4):
    """A base and fine-tunes that each change a random `change` share of the entries; some changes are
    exactly EPS (in the stored dtype) or signed zeros."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(dtype)
    base[:64] = -0.0
    models = []
    for _ in range(n_models):
        delta = torch.randn(n, generator=g) * 0.01
        delta[torch.rand(n, generator=g) > change] = 0.0
        t = (base.float() + delta).to(dtype)
        on_eps = torch.rand(n, generator=g) < 0.01
        t[on_eps] = (base[on_eps].float() + torch.tensor(EPS, dtype=dtype).float()).to(dtype)
        models.append(t)
    return base, models


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("t", [0.0, 1e-3, 0.02, 10.0])
def test_fused_nearswap_is_bit_identical(dtype, t):
    base, (model,) = _inputs(fused.FUSED_MIN + 17, 1, dtype, seed=1)
    fast = fused.fused_nearswap(base, model, t, out_dtype=dtype)
    assert fast is not None and fast.dtype == dtype and fast.shape == base.shape
    ref = get_method("nearswap").merge_checked(base, [model], name="w",
                                               checked=get_method("nearswap").check_params(1, t=t)).to(dtype)
    assert torch.equal(float_bits(fast), float_bits(ref))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_models", [1, 2, 3, 5])
@pytest.mark.parametrize("method,params", [("ram", {}), ("ramplus_tl", {}), ("ramplus_tl", {"r": 0.7, "alpha": 5.0})])
def test_fused_ram_is_bit_identical(dtype, n_models, method, params):
    base, models = _inputs(3 * fused.FUSED_MIN + 5, n_models, dtype, seed=n_models)
    m = get_method(method)
    checked = m.check_params(n_models, epsilon=EPS, **params)
    p = m.resolve(checked, "w", n_models)
    fast = m.fused(base, models, "w", p, dtype)
    assert fast is not None, "the fused kernel should take these tensors"
    ref = m.merge_checked(base, models, name="w", checked=checked).to(dtype)
    assert torch.equal(float_bits(fast), float_bits(ref))


@settings(max_examples=15, deadline=None)
@given(change=st.floats(0.0, 1.0), eps=st.sampled_from([0.0, 1e-5, 5e-3]), n_models=st.integers(2, 4),
       seed=st.integers(0, 2**16), plus=st.booleans())
def test_fused_ram_matches_the_reference_at_any_overlap(change, eps, n_models, seed, plus):
    base, models = _inputs(fused.FUSED_MIN, n_models, torch.bfloat16, seed=seed, change=change)
    m = get_method("ramplus_tl" if plus else "ram")
    checked = m.check_params(n_models, epsilon=eps)
    fast = m.merge_fast(base, models, name="w", checked=checked, out_dtype=torch.bfloat16)
    ref = m.merge_checked(base, models, name="w", checked=checked).to(torch.bfloat16)
    assert torch.equal(float_bits(fast), float_bits(ref))


def test_ram_counts_do_not_depend_on_the_blocks(monkeypatch):
    # the per-block integer counts behind RAM+'s scales add up to the same totals however the tensor is split
    base, models = _inputs(4 * fused.FUSED_MIN, 3, torch.bfloat16, seed=9)
    m = get_method("ramplus_tl")
    checked = m.check_params(3, epsilon=EPS, r=0.5, alpha=3.0)
    one = m.merge_fast(base, models, name="w", checked=checked, out_dtype=torch.bfloat16)
    monkeypatch.setattr(fused, "BLOCK_MIN", 4096)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        many = m.merge_fast(base, models, name="w", checked=checked, out_dtype=torch.bfloat16)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(float_bits(one), float_bits(many))


def test_small_or_non_cpu_tensors_take_the_torch_path():
    base, models = _inputs(100, 2, torch.float32, seed=0)
    assert fused.fused_ram(base, models, EPS, out_dtype=torch.float32) is None
    assert fused.fused_nearswap(base, models[0], 0.1, out_dtype=torch.float32) is None
    assert fused.fused_ram(base, models, EPS, out_dtype=torch.float64) is None  # float64 results: torch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("n_models", [2, 3, 4])
@pytest.mark.parametrize("semantics", ["paper", "mergekit"])
@pytest.mark.parametrize("shared", [0.0, 0.6, -0.6])  # share of a common direction: orthogonal, aligned, opposing
def test_fused_model_stock_is_bit_identical(dtype, n_models, semantics, shared):
    g = torch.Generator().manual_seed(n_models)
    n = 2 * fused.FUSED_MIN + 11  # several float64 chunks, the last one partial
    base = torch.randn(n, generator=g)
    common = torch.randn(n, generator=g)
    models = [(base + 0.01 * ((shared if j % 2 else abs(shared)) * common + torch.randn(n, generator=g))).to(dtype)
              for j in range(n_models)]
    base = base.to(dtype)
    m = get_method("model_stock")
    checked = m.check_params(n_models, semantics=semantics)
    fast = fused.fused_model_stock(base, models, clamp=semantics == "paper", out_dtype=dtype)
    assert fast is not None and fast.dtype == dtype
    ref = m.merge_checked(base, models, name="w", checked=checked).to(dtype)
    assert torch.equal(float_bits(fast), float_bits(ref))
    assert torch.equal(float_bits(m.merge_fast(base, models, name="w", checked=checked, out_dtype=dtype)),
                       float_bits(ref))


def test_model_stock_reference_follows_the_formula_in_float64():
    # the chunked float64 Gram matrix gives the paper's t = N cos / (1 + (N - 1) cos) from exact cosines
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3 * 65536 + 7, generator=g, dtype=torch.float64)
    models = [base + torch.randn(base.shape, generator=g, dtype=torch.float64) * 0.1 + 0.05 for _ in range(3)]
    offs = [(m.float() - base.float()).double() for m in models]
    cos = [float(offs[i] @ offs[j] / (offs[i].norm() * offs[j].norm())) for i in range(3) for j in range(i + 1, 3)]
    c = sum(cos) / 3
    t = 3 * c / (1 + 2 * c)
    from taskvec.methods.model_stock import offset_gram, ratio_from_gram

    assert abs(ratio_from_gram(offset_gram(base.float(), [m.float() for m in models])) - t) < 1e-6


def test_filter_wise_model_stock_takes_the_torch_path():
    base, models = _inputs(fused.FUSED_MIN, 2, torch.float32, seed=4)
    m = get_method("model_stock")
    p = m.resolve(m.check_params(2, filter_wise=True), "w", 2)
    assert m.fused(base.reshape(256, -1), [t.reshape(256, -1) for t in models], "w", p, torch.float32) is None
