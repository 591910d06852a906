"""The fused (numba) TIES selection's fallback: when the sampled bracket misses the k-th largest |delta|
(heavy ties, or a sample that misleads), two 16-bit radix-histogram passes find it. Checked against the
exact k-th largest (torch.topk) and against the eager torch merge, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from taskvec.methods import get_method
from taskvec.methods.sparsify import keep_count

numba = pytest.importorskip("numba")
from taskvec.methods import fused  # noqa: E402  (after the numba check)

N = 1 << 16  # fused.FUSED_MIN: the smallest tensor the fused path takes


@pytest.fixture
def histograms_used(monkeypatch):
    """Take the bracketed selection at this small size, and count the histogram passes."""
    monkeypatch.setattr(fused, "_BRACKET_MIN", 4096)
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
    return fused.threshold_bits(b, ms, np.uint32(16 if bf16 else 0), ks, 2), ks


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
