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

Randomness is reproducible per tensor: the generator
for a tensor is seeded from (seed, tensor name) through a stable hash, so a
merge gives the same result whatever order (or thread) tensors are processed in.
"""
from __future__ import annotations

import hashlib
import math

import torch

from ..errors import ParameterError
from .sparsify import check_rescale, rescale_l1


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
    rescale: bool | str = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Drop each entry of `delta` with probability p and rescale the survivors.

    rescale: True divides survivors by (1 - p) (the paper); "l1" multiplies them by
    ||delta||_1 / ||survivors||_1 (mergekit's `rescale: true`, see the module
    docstring); False leaves them as they are. mergekit spells p as `density = 1 - p`.
    Draws come from a CPU generator (then move to delta's device), so the same
    (seed, name) gives the same mask on CPU and GPU. p = 0 returns a copy of delta.
    Returns a new float32 tensor.
    """
    p = check_drop_rate(p)
    mode = check_rescale(rescale)
    x = delta.to(torch.float32)
    keep = torch.rand(x.shape, generator=generator, dtype=torch.float32)
    keep.ge_(p)  # in-place compare keeps float: 1.0 with probability 1 - p
    if mode == "l1":
        return rescale_l1(x * keep.to(x.device), x)
    if mode and p > 0:
        keep.mul_(1.0 / (1.0 - p))
    return x * keep.to(x.device)
