"""DARE (Yu et al. 2023, "Language Models are Super Mario"): Drop And REscale.

    m ~ Bernoulli(p) per entry,   tau_tilde = (1 - m) * tau / (1 - p)

so E[tau_tilde] = tau (the paper's rescale, `rescale=True`, the Python API's default).

mergekit 0.1.5 rescales differently: with `rescale: true` it multiplies the
survivors of a tensor by ONE factor, ||tau||_1 / ||m_keep * tau||_1, so the
dropped tensor keeps the L1 norm of tau exactly (`sparsify.rescaled_masked_tensor`
with `RescaleNorm.l1`). That is `rescale="l1"` here, and what `rescale=True`
means under `semantics="mergekit"` (every mergekit YAML config). The two agree
in expectation only roughly: 1/(1-p) is unbiased per entry, the L1 factor is
exact in norm per tensor and depends on which entries survived.

Randomness is counter-based, so a mask costs no stored random stream and is the
same whatever order, thread count, process or code path (the fused numba kernel
computes each entry's draw in a register; the torch path here computes the same
integers on index tensors, chunk by chunk). Entry i of a tensor is kept iff

    u_i = splitmix64(key, i) >> 40          (the top 24 bits)
    u_i >= ceil(p * 2^24)                   (p as float32)

where splitmix64(key, i) is output i of Vigna's SplitMix64 generator started at
state `key` (mix(key + (i + 1) * 0x9E3779B97F4A7C15)), and `key` is the seed of
the generator passed in: for `tensor_generator(seed, name)` the BLAKE2b-64 hash of
(seed, tensor name). The mask depends on that seed, not on the generator's state.
The L1 rescale factor is computed from exact (integer) sums of |tau|, so it does
not depend on summation order either.

Change of stream (taskvec 0.1 → this version): masks used to be `torch.rand`
draws from the tensor's generator; a given seed now draws different (equally
random) masks, once. Drop statistics and the rescale rules are unchanged.
"""
from __future__ import annotations

import hashlib
import math
from fractions import Fraction

import torch

from ..errors import ParameterError
from .sparsify import check_rescale

GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment (2^64 / golden ratio)
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
UNIFORM_BITS = 24  # the top 24 bits of each output: exact in float32, so every path compares the same integer
CHUNK = 1 << 20  # entries per step of the torch path: bounds its int64 temporaries to a few MiB
L1_EPS = 1e-7  # as sparsify.l1_rescale_factor: below this either norm leaves the survivors unscaled


def _signed(x: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no uint64 multiply)."""
    return x - (1 << 64) if x >= 1 << 63 else x


def check_drop_rate(p: float, name: str = "p") -> float:
    q = float(p)
    if math.isnan(q) or not (0.0 <= q < 1.0):
        extra = " (p = 1 drops every entry; nothing is left to rescale)" if q == 1.0 else ""
        raise ParameterError(f"{name} (drop rate) must be in [0, 1), got {p!r}{extra}")
    return q


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from (seed, tensor name) by BLAKE2b (stable across runs,
    unlike Python's salted hash()), so each tensor's random draws depend only on its name.
    Its seed is the DARE key of that tensor (`dare_key`)."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{name}".encode(), digest_size=8).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return g


def dare_key(generator: torch.Generator | None) -> int:
    """The counter-based stream's key: the generator's seed; without one, a key drawn from torch's global RNG."""
    if generator is None:
        return int(torch.randint(0, 1 << 62, (), dtype=torch.int64))
    return int(generator.initial_seed()) & ((1 << 64) - 1)


def drop_threshold(p: float) -> int:
    """Entries whose 24-bit draw is below this are dropped: ceil(float32(p) * 2^24), so P(drop) = p to 2^-24."""
    p32 = torch.tensor(float(p), dtype=torch.float32).item()  # the float32 value a kernel compares against
    return math.ceil(p32 * (1 << UNIFORM_BITS))


def draws(key: int, start: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 24-bit draws of entries start .. start+n-1 (int64), SplitMix64 on int64 index tensors.

    int64 multiplication wraps modulo 2^64 like uint64; a right shift of an int64 drags its sign bit
    in, so every shift is masked to a logical one."""
    z = torch.arange(start + 1, start + n + 1, dtype=torch.int64, device=device)
    z.mul_(_signed(GOLDEN)).add_(_signed(key & ((1 << 64) - 1)))
    z.bitwise_xor_(z.bitwise_right_shift(30).bitwise_and_((1 << 34) - 1)).mul_(_signed(MIX1))
    z.bitwise_xor_(z.bitwise_right_shift(27).bitwise_and_((1 << 37) - 1)).mul_(_signed(MIX2))
    z.bitwise_xor_(z.bitwise_right_shift(31).bitwise_and_((1 << 33) - 1))
    return z.bitwise_right_shift_(64 - UNIFORM_BITS).bitwise_and_((1 << UNIFORM_BITS) - 1)


def keep_mask(shape, key: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """DARE's keep mask (bool) for a tensor of `shape` under `key`: the same bits the fused kernel computes."""
    n = math.prod(shape)
    out = torch.empty(n, dtype=torch.bool, device=device)
    t = drop_threshold(p)
    for s in range(0, n, CHUNK):
        m = min(CHUNK, n - s)
        torch.ge(draws(key, s, m, device), t, out=out[s:s + m])
    return out.reshape(shape)


def l1_bins(x: torch.Tensor) -> torch.Tensor:
    """Per float32 exponent, the sum of the mantissas of |x| (int64, 254 bins; see `exact_abs_sum`), chunked."""
    flat = x.detach().reshape(-1)
    bins = torch.zeros(254, dtype=torch.int64, device=x.device)
    for s in range(0, flat.numel(), CHUNK):
        bits = flat[s:s + CHUNK].to(torch.float32).contiguous().view(torch.int32).bitwise_and(0x7FFFFFFF)
        bits = bits.to(torch.int64)
        e = bits.bitwise_right_shift(23)
        m = bits.bitwise_and_(0x7FFFFF).add_(e.gt(0).to(torch.int64).bitwise_left_shift_(23))
        bins.scatter_add_(0, e.sub_(1).clamp_(0, 253), m)  # inf/NaN (e = 255) cannot reach here: inputs are finite
    return bins


def bins_total(bins) -> int:
    """The exact sum that `l1_bins` describes, in units of 2^-149: sum over exponents of mantissas << shift."""
    return sum(int(c) << s for s, c in enumerate(bins.tolist()) if c)


def exact_abs_sum(x: torch.Tensor) -> int:
    """sum |x| of a float32 tensor, exactly, as an integer multiple of 2^-149 (the smallest float32).

    |x| = m * 2^(max(e,1) - 150) for a biased exponent e and mantissa m (implicit bit included), so the
    mantissas are summed per exponent in int64 (no rounding, any order: the fused kernel's per-thread
    bins add up to the same integers) and the bins are combined in Python."""
    return bins_total(l1_bins(x))


def l1_factor(total: int, kept: int) -> float | None:
    """||tau||_1 / ||kept tau||_1 from exact sums (units of 2^-149), as the float32 value both paths multiply
    by; None when either norm is below 1e-7 (mergekit then leaves the survivors unscaled)."""
    eps = Fraction(L1_EPS)
    before, after = Fraction(total, 1 << 149), Fraction(kept, 1 << 149)
    if before < eps or after < eps:
        return None
    b32 = torch.tensor(float(before), dtype=torch.float32)
    a32 = torch.tensor(float(after), dtype=torch.float32)
    return (b32 / a32).item()


def dare_drop(
    delta: torch.Tensor,
    p: float,
    *,
    rescale: bool | str = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Drop each entry of `delta` with probability p and rescale the survivors.

    rescale: True divides survivors by (1 - p) (the paper); "l1" multiplies them by
    ||delta||_1 / ||survivors||_1 (mergekit's `rescale: true`, see the module
    docstring); False leaves them as they are. mergekit spells p as `density = 1 - p`.
    The mask comes from the counter-based stream keyed by the generator's seed
    (`dare_key`), computed where delta lives, so the same (seed, name) gives the same
    mask on CPU and GPU and in the fused kernel. p = 0 returns a copy of delta.
    Returns a new float32 tensor.
    """
    p = check_drop_rate(p)
    mode = check_rescale(rescale)
    x = delta.to(torch.float32)
    key = dare_key(generator)
    keep = keep_mask(x.shape, key, p, x.device)
    out = x * keep  # a product, not a select: a dropped negative entry is -0.0, as in the fused kernel
    if mode == "l1":
        factor = l1_factor(exact_abs_sum(x), exact_abs_sum(out))
        return out if factor is None else out.mul_(factor)
    if mode and p > 0:
        out.mul_(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32).item())
    return out
