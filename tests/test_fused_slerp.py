"""SLERP's fused numba path (`fused.fused_slerp`) against the torch reference (`slerp.slerp`), bit for bit:
both accumulate the dot product and norms in float64 per `slerp.CHUNK` entries and round the same float32
coefficients (see slerp.py); and the reference against the formula in float64."""
from __future__ import annotations

import math

import pytest
import torch

from taskvec.methods import get_method, slerp
from taskvec.methods.slerp import CHUNK, slerp_sums

numba = pytest.importorskip("numba")
from taskvec.methods import fused  # noqa: E402  (after the numba check)
from tests.helpers import float_bits  # noqa: E402

pytestmark = pytest.mark.usefixtures("fused_kernels_in_the_caller")


def _pair(n: int, dtype: torch.dtype, mix: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g)
    b = mix * a + (1 - mix) * torch.randn(n, generator=g)
    return a.to(dtype), b.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [fused.FUSED_MIN, 3 * CHUNK + 1001])
@pytest.mark.parametrize("t,mix", [(0.3, 0.5), (0.75, 0.0), (0.5, 1.0)])  # 1.0: colinear, the lerp fallback
def test_fused_slerp_is_bit_identical_to_the_torch_reference(dtype, n, t, mix):
    a, b = _pair(n, dtype, mix)
    fast = fused.fused_slerp(a, b, t, out_dtype=dtype)
    ref = slerp(t, a, b).to(dtype)
    assert fast is not None and fast.dtype == dtype
    assert torch.equal(float_bits(fast), float_bits(ref))


def test_merge_fast_takes_the_fused_slerp_path_with_a_base_and_without():
    a, b = _pair(fused.FUSED_MIN + 7, torch.bfloat16, 0.3, seed=1)
    m = get_method("slerp")
    checked = m.check_params(1, has_base=True, t=0.4)
    out = m.merge_fast(a, [b], name="w", checked=checked, out_dtype=torch.bfloat16)
    assert torch.equal(float_bits(out), float_bits(slerp(0.4, a, b).to(torch.bfloat16)))
    checked = m.check_params(2, has_base=False, t=0.4)
    out = m.merge_fast(None, [a, b], name="w", checked=checked, out_dtype=torch.bfloat16)
    assert torch.equal(float_bits(out), float_bits(slerp(0.4, a, b).to(torch.bfloat16)))


def test_reference_follows_the_formula():
    a, b = _pair(5000, torch.float32, 0.2, seed=2)
    x, y = a.double(), b.double()
    omega = math.acos(float(x @ y) / float(x.norm() * y.norm()))
    t = 0.35
    expected = (math.sin((1 - t) * omega) * x + math.sin(t * omega) * y) / math.sin(omega)
    assert torch.allclose(slerp(t, a, b).double(), expected, rtol=1e-6, atol=1e-6)


def test_sums_are_chunked_float64():
    a, b = _pair(2 * CHUNK + 3, torch.float32, 0.5, seed=3)
    ab, aa, bb = slerp_sums(a, b)
    x, y = a.double(), b.double()
    assert ab == pytest.approx(float(x @ y), rel=1e-12)
    assert aa == pytest.approx(float(x @ x), rel=1e-12) and bb == pytest.approx(float(y @ y), rel=1e-12)
