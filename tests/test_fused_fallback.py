"""The fused (numba) TIES selection's fallback: when the sampled bracket misses the k-th largest |delta|
(heavy ties, or a sample that misleads), two 16-bit radix-histogram passes find it. Checked against the
exact k-th largest (torch.topk) and against the eager torch merge, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from taskvec.methods import get_method
from taskvec.methods.sparsify import keep_count

numba = pytest.importorskip("numba")
from taskvec.methods import fused  # noqa: E402  (after the numba check)

N = 1 << 16  # fused.FUSED_MIN: the smallest tensor the fused path takes


@pytest.fixture
def histograms_used(monkeypatch):
    """Take the bracketed selection at this small size, in several blocks, and count the histogram passes."""
    monkeypatch.setattr(fused, "_BRACKET_MIN", 4096)
    monkeypatch.setattr(fused, "BLOCK_MIN", 4096)
    calls = []
    real = fused._hist_high

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(fused, "_hist_high", spy)
    return calls


def exact_threshold_bits(base: torch.Tensor, model: torch.Tensor, k: int) -> int:
    delta = (model.float() - base.float()).abs()
    return int(np.float32(torch.topk(delta, k).values[-1].item()).view(np.uint32))


def selected_bits(base, models, densities):
    bf16 = base.dtype == torch.bfloat16
    b = fused._as_bits(base, bf16)
    ms = tuple(fused._as_bits(t, bf16) for t in models)
    ks = [keep_count(N, d) for d in densities]
    return fused.threshold_bits(b, ms, np.uint32(16 if bf16 else 0), ks), ks


def test_bracket_missing_on_ties_falls_back_to_histograms(histograms_used):
    # |delta| is 0.5 for 90 % of the entries: the k-th largest sits inside a tie far bigger than a bracket
    g = torch.Generator().manual_seed(0)
    base = torch.zeros(N)
    models = []
    for _ in range(2):
        d = torch.where(torch.rand(N, generator=g) < 0.9, 0.5, torch.rand(N, generator=g))
        models.append(base + d * torch.sign(torch.randn(N, generator=g)))
    out, ks = selected_bits(base, models, [0.2, 0.6])
    assert histograms_used, "the bracket should have missed"
    assert [int(x) for x in out] == [exact_threshold_bits(base, m, k) for m, k in zip(models, ks)]
    m = get_method("ties")
    checked = m.check_params(2, density=[0.2, 0.6])
    fast = m.merge_fast(base, models, name="w", checked=checked, out_dtype=torch.float32)
    assert torch.equal(fast, m.merge_checked(base, models, name="w", checked=checked))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forced_histogram_selection_is_exact(histograms_used, monkeypatch, dtype):
    monkeypatch.setattr(fused, "_threshold_by_bracket", lambda *a: None)  # as if every bracket missed
    g = torch.Generator().manual_seed(1)
    base = torch.randn(N, generator=g).to(dtype)
    models = [(base.float() + 0.05 * (i + 1) * torch.randn(N, generator=g)).to(dtype) for i in range(2)]
    out, ks = selected_bits(base, models, [0.05, 0.5])
    assert histograms_used
    assert [int(x) for x in out] == [exact_threshold_bits(base, m, k) for m, k in zip(models, ks)]
    m = get_method("ties")
    checked = m.check_params(2, density=[0.05, 0.5], weight=[0.7, 0.4])
    fast = m.merge_fast(base, models, name="w", checked=checked, out_dtype=dtype)
    assert torch.equal(fast, m.merge_checked(base, models, name="w", checked=checked).to(dtype))


def test_moderate_bf16_ties_stay_on_the_bracket(histograms_used):
    # as the 1.1B benchmark's bf16 fine-tunes: a few % of |delta| equal the k-th largest. The capacity
    # counts the tie on the sample, so one pass finds it (it used to overflow into the histograms).
    g = torch.Generator().manual_seed(2)
    base = torch.randn(N, generator=g).to(torch.bfloat16)
    models = [(base.float() + 0.01 * torch.randn(N, generator=g)).to(torch.bfloat16) for _ in range(3)]
    out, ks = selected_bits(base, models, [0.5, 0.3, 0.5])
    assert not histograms_used
    assert [int(x) for x in out] == [exact_threshold_bits(base, m, k) for m, k in zip(models, ks)]


@settings(max_examples=25, deadline=None)
@given(levels=st.integers(1, 200), zero_share=st.floats(0.0, 0.95), clustered=st.booleans(),
       densities=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=3))
def test_selection_is_exact_under_any_ties(levels, zero_share, clustered, densities):
    # |delta| on a grid of `levels` values, a share of exact zeros, the ties possibly all in one block
    # (a block's capacity then overflows): whichever path runs, the k-th largest is exact
    rng = np.random.default_rng(levels)
    base = torch.zeros(N)
    models = []
    for _ in densities:
        d = torch.from_numpy(rng.integers(1, levels + 1, N).astype(np.float32) / levels)
        zero = torch.from_numpy(rng.random(N) < zero_share)
        if clustered:
            zero = torch.sort(zero.to(torch.uint8), descending=True).values.bool()
        models.append(torch.where(zero, 0.0, d) * torch.sign(torch.from_numpy(rng.standard_normal(N)).float()))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused, "_BRACKET_MIN", 4096)
        out, ks = selected_bits(base, models, densities)
    assert [int(x) for x in out] == [exact_threshold_bits(base, m, k) for m, k in zip(models, ks)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=300), st.integers(0, 2**31), st.data())
def test_rth_largest_of_a_tied_bracket_is_the_sorted_one(offsets, lo, data):
    """Either way of selecting inside the bracket (a count per bit pattern when narrow, np.partition when
    wide) gives the r-th largest of the sorted values, ties and all."""
    values = np.array([min(lo + o, 2**32 - 1) for o in offsets], np.uint32)
    r = data.draw(st.integers(1, values.size))
    expected = np.sort(values)[::-1][r - 1]
    low, high = np.uint32(lo), np.uint32(max(values.max(), lo))
    assert fused._rth_largest(values, r, low, high) == expected  # narrow: counted
    wide = np.uint32(min(int(high) + fused._COUNT_MAX + 1, 2**32 - 1))
    if int(wide) - lo > fused._COUNT_MAX:
        assert fused._rth_largest(values, r, low, wide) == expected  # wide: partitioned
