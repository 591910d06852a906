"""DARE's counter-based masks (taskvec.methods.dare): the generator against an independent pure-Python
SplitMix64 and its published reference outputs, drop statistics, exact L1 sums, and the fused numba kernel
against the torch path bit for bit, across dtypes, sizes, rescale rules and thread counts."""
from __future__ import annotations

import hashlib
import math
from fractions import Fraction

import pytest
import torch

from taskvec.methods import dare, get_method
from taskvec.methods.dare import dare_drop, dare_key, draws, drop_threshold, exact_abs_sum, keep_mask, tensor_generator

M64 = (1 << 64) - 1


def splitmix64(state: int, count: int) -> list[int]:
    """Vigna's SplitMix64, sequentially, in Python integers (the reference the counter form must equal)."""
    out = []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        out.append(z ^ (z >> 31))
    return out


def key_of(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def test_reference_implementation_matches_published_splitmix64_outputs():
    # the first outputs of SplitMix64 seeded with 1234567, as in Vigna's reference code's test vectors
    assert splitmix64(1234567, 3) == [6457827717110365317, 3203168211198807973, 9817491932198370423]


@pytest.mark.parametrize("seed,name", [(0, "model.layers.0.mlp.up_proj.weight"), (7, "lm_head.weight"), (12345, "x")])
def test_known_answers_for_seed_name_index(seed, name):
    key = key_of(seed, name)
    assert dare_key(tensor_generator(seed, name)) == key
    expected = [z >> 40 for z in splitmix64(key, 40)]
    assert draws(key, 0, 40).tolist() == expected
    # any window of the stream is addressed directly by its indices (no state to advance)
    assert draws(key, 17, 5).tolist() == expected[17:22]


def test_known_answer_values_are_pinned():
    """A change of the rule changes every DARE mask ever drawn: these three values must never move."""
    key = key_of(0, "x")
    assert key == 714206238375637641
    assert [z >> 40 for z in splitmix64(key, 3)] == draws(key, 0, 3).tolist()
    assert draws(key, 1_000_000, 1).item() == splitmix64(key, 1_000_001)[-1] >> 40


def test_drop_threshold_is_the_float32_rate_rounded_up():
    assert drop_threshold(0.0) == 0
    assert drop_threshold(0.5) == 1 << 23
    p32 = float(torch.tensor(0.9, dtype=torch.float32))
    assert drop_threshold(0.9) == math.ceil(p32 * 2**24)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_fraction_dropped_is_p_within_a_binomial_bound(p):
    n = 1 << 20
    dropped = n - int(keep_mask((n,), key_of(3, f"w{p}"), p).sum())
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(dropped - n * p) < 6 * sigma, (dropped, n * p, sigma)


def test_masks_differ_between_names_seeds_and_models():
    masks = [keep_mask((4096,), key_of(s, n), 0.5) for s, n in [(0, "a"), (0, "b"), (1, "a")]]
    for i in range(3):
        for j in range(i):
            agree = float((masks[i] == masks[j]).float().mean())
            assert 0.45 < agree < 0.55  # independent streams agree on about half the entries at p = 0.5


def test_chunking_does_not_change_the_mask(monkeypatch):
    key = key_of(5, "w")
    whole = keep_mask((3, 1001), key, 0.7)
    monkeypatch.setattr(dare, "CHUNK", 97)  # odd chunks: every entry still gets its own index's draw
    assert torch.equal(keep_mask((3, 1001), key, 0.7), whole)


def test_dare_drop_uses_the_stream():
    tau = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    out = dare_drop(tau, 0.6, rescale=False, generator=tensor_generator(2, "w"))
    kept = draws(key_of(2, "w"), 0, 5000) >= drop_threshold(0.6)
    assert torch.equal(out != 0, kept & (tau != 0))
    assert torch.equal(out[kept], tau[kept])
    # a dropped negative entry is -0.0 (a product, as the fused kernel computes)
    neg_dropped = (~kept) & (tau < 0)
    assert bool(torch.signbit(out[neg_dropped]).all())


def test_exact_abs_sum_is_exact_and_order_free():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(10000, generator=g) * 1e-30, torch.randn(10000, generator=g) * 1e6,
                   torch.tensor([1e-45, -3e-45, 0.0, -0.0])])  # denormals and signed zeros too
    exact = sum((Fraction(v) for v in x.abs().double().tolist()), Fraction(0))
    assert Fraction(exact_abs_sum(x), 1 << 149) == exact
    assert exact_abs_sum(x[torch.randperm(x.numel(), generator=g)]) == exact_abs_sum(x)


def test_l1_rescale_keeps_the_l1_norm_to_float32_rounding():
    tau = torch.randn(20000, generator=torch.Generator().manual_seed(4))
    out = dare_drop(tau, 0.8, rescale="l1", generator=tensor_generator(0, "w"))
    assert abs(float(out.double().abs().sum()) / float(tau.double().abs().sum()) - 1) < 1e-5


# ------------------------------------------------------------------ fused kernel == torch path

numba = pytest.importorskip("numba")
from taskvec.methods import fused  # noqa: E402  (after the numba check)
from tests.helpers import float_bits  # noqa: E402

pytestmark = pytest.mark.usefixtures("fused_kernels_in_the_caller")


def _inputs(n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(dtype)
    models = [(base.float() + 0.02 * (j + 1) * torch.randn(n, generator=g)).to(dtype) for j in range(3)]
    return base, models


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [fused.FUSED_MIN + 1, 3 * fused.FUSED_MIN + 17])
@pytest.mark.parametrize("method,params", [
    ("dare_ties", {"semantics": "mergekit", "rescale": True}),  # mergekit's L1 rescale
    ("dare_ties", {"semantics": "paper", "rescale": True}),
    ("dare_linear", {"rescale": False}),
    ("dare_linear", {"semantics": "mergekit", "rescale": True}),
])
def test_fused_dare_is_bit_identical_to_torch(dtype, n, method, params, monkeypatch):
    base, models = _inputs(n, dtype)
    m = get_method(method)
    checked = m.check_params(3, density=[0.3, 0.5, 0.9], weight=[0.5, 0.3, 0.2], seed=11, **params)
    results = []
    real = fused.fused_task_arithmetic
    monkeypatch.setattr(fused, "fused_task_arithmetic", lambda *a, **kw: results.append(real(*a, **kw)) or results[-1])
    fast = m.merge_fast(base, models, name="layer.w", checked=checked, out_dtype=dtype)
    assert len(results) == 1 and results[0] is fast  # the fused kernel produced it, not the fallback
    ref = m.merge_checked(base, models, name="layer.w", checked=checked).to(dtype)
    assert torch.equal(float_bits(fast), float_bits(ref))


def test_fused_dare_does_not_depend_on_the_thread_count():
    base, models = _inputs(2 * fused.FUSED_MIN + 3, torch.bfloat16, seed=2)
    m = get_method("dare_ties")
    checked = m.check_params(3, density=0.4, seed=1, semantics="mergekit", rescale=True)
    before = torch.get_num_threads()  # the kernels' thread pool follows torch's thread count
    outs = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            outs.append(m.merge_fast(base, models, name="w", checked=checked, out_dtype=torch.bfloat16))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(float_bits(outs[0]), float_bits(outs[1]))


def test_fused_l1_bins_equal_the_torch_exact_sums():
    base, models = _inputs(fused.FUSED_MIN + 5, torch.bfloat16, seed=3)
    b = fused._as_bits(base, True)
    ms = tuple(fused._as_bits(t, True) for t in models)
    keys = [key_of(9 + j, "w") for j in range(3)]
    import numpy as np

    args = (b, ms, np.uint32(16), np.array(keys, np.uint64), np.array([drop_threshold(0.7)] * 3, np.uint64))
    bins = fused._dare_l1_bins(*args, 0, b.shape[0])
    split = b.shape[0] // 3  # per-block bins add up to the whole range's: integer sums
    assert np.array_equal(bins, fused._dare_l1_bins(*args, 0, split) + fused._dare_l1_bins(*args, split, b.shape[0]))
    for j, t in enumerate(models):
        delta = t.float() - base.float()
        assert dare.bins_total(bins[j, 0]) == exact_abs_sum(delta)
        assert dare.bins_total(bins[j, 1]) == exact_abs_sum(delta * keep_mask(delta.shape, keys[j], 0.7))
