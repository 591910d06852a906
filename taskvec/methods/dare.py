"""DARE (Yu et al. 2023, "Language Models are Super Mario"): Drop And REscale.

    m ~ Bernoulli(p) per entry,   tau_tilde = (1 - m) * tau / (1 - p)

so E[tau_tilde] = tau. Randomness is reproducible per tensor: the generator
for a tensor is seeded from (seed, tensor name) through a stable hash, so a
merge gives the same result whatever order (or thread) tensors are processed in.
"""
from __future__ import annotations

import hashlib
import math

import torch

from ..errors import ParameterError


def check_drop_rate(p: float, name: str = "p") -> float:
    q = float(p)
    if math.isnan(q) or not (0.0 <= q < 1.0):
        extra = " (p = 1 drops every entry; nothing is left to rescale)" if q == 1.0 else ""
        raise ParameterError(f"{name} (drop rate) must be in [0, 1), got {p!r}{extra}")
    return q


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from (seed, tensor name) by BLAKE2b (stable across runs,
    unlike Python's salted hash()), so each tensor's random draws depend only on its name."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{name}".encode(), digest_size=8).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return g


def dare_drop(
    delta: torch.Tensor,
    p: float,
    *,
    rescale: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Drop each entry of `delta` with probability p; divide survivors by (1 - p) when `rescale`.

    Draws come from a CPU generator (then move to delta's device), so the same
    (seed, name) gives the same mask on CPU and GPU. p = 0 returns a copy of delta.
    mergekit spells this `density = 1 - p` with the same rescale; returns a new float32 tensor.
    """
    p = check_drop_rate(p)
    x = delta.to(torch.float32)
    keep = torch.rand(x.shape, generator=generator, dtype=torch.float32)
    keep.ge_(p)  # in-place compare keeps float: 1.0 with probability 1 - p
    if rescale and p > 0:
        keep.mul_(1.0 / (1.0 - p))
    return x * keep.to(x.device)
