"""Spherical linear interpolation between two models, tensor by tensor (Shoemake 1985;
mergekit's `slerp`).

    Omega = arccos(<v0/|v0|, v1/|v1|>)
    theta = sin((1-t) Omega)/sin(Omega) * v0 + sin(t Omega)/sin(Omega) * v1

Nearly colinear tensors (|cos Omega| > dot_threshold) fall back to linear
interpolation, where the formula is numerically unstable.

The dot product and both norms are accumulated in float64, chunk by chunk (`CHUNK`
entries, chunks added in order): float32 sums drift with tensor size, and the fused
numba kernel (`fused.fused_slerp`) uses the same chunking, so both paths round the
same two float32 coefficients. Within a chunk the two paths add in different orders;
the float64 sums then differ by ~1e-16 relative, which changes a float32 coefficient
only if it straddles a rounding boundary (odds ~1e-7 per tensor): outputs are
bit-identical in practice (tests/test_fused_slerp.py checks it bit for bit).
"""
from __future__ import annotations

import math

import torch

from ..errors import ParameterError


def check_t(t: float, name: str = "t") -> float:
    x = float(t)
    if math.isnan(x) or not (0.0 <= x <= 1.0):
        raise ParameterError(f"{name} must be in [0, 1], got {t!r}")
    return x


CHUNK = 1 << 16  # entries per float64 partial sum; the fused kernel's chunks are the same


def lerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    return (1.0 - t) * v0.to(torch.float32) + t * v1.to(torch.float32)


def _f32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


def slerp_sums(v0: torch.Tensor, v1: torch.Tensor) -> tuple[float, float, float]:
    """(<v0, v1>, |v0|^2, |v1|^2) in float64, per `CHUNK` entries, chunks summed in order (memory: two
    float64 chunks, never a float64 copy of the tensor)."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    ab = aa = bb = 0.0
    for s in range(0, a.numel(), CHUNK):
        x = a[s:s + CHUNK].to(torch.float64)
        y = b[s:s + CHUNK].to(torch.float64)
        ab += float(torch.dot(x, y))
        aa += float(torch.dot(x, x))
        bb += float(torch.dot(y, y))
    return ab, aa, bb


def slerp_coefficients(t: float, ab: float, aa: float, bb: float, *, eps: float = 1e-8,
                       dot_threshold: float = 0.9995) -> tuple[float, float]:
    """(c0, c1), rounded to float32, with theta = c0 v0 + c1 v1: SLERP's, or lerp's when nearly colinear."""
    na, nb = math.sqrt(aa), math.sqrt(bb)
    # as mergekit: a (near-)zero vector is left unnormalised, which makes the dot ~0
    dot = ab / ((na if na > eps else 1.0) * (nb if nb > eps else 1.0))
    if abs(dot) > dot_threshold:
        return _f32(1.0 - t), _f32(t)
    omega = math.acos(max(-1.0, min(1.0, dot)))
    s = math.sin(omega)
    return _f32(math.sin((1.0 - t) * omega) / s), _f32(math.sin(t * omega) / s)


def slerp(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    eps: float = 1e-8,
    dot_threshold: float = 0.9995,
) -> torch.Tensor:
    """SLERP from v0 (t = 0) to v1 (t = 1), treating each tensor as one flat vector."""
    t = check_t(t)
    if v0.shape != v1.shape:
        raise ParameterError(f"slerp: shapes differ, {tuple(v0.shape)} vs {tuple(v1.shape)}")
    a = v0.to(torch.float32)
    b = v1.to(torch.float32)
    c0, c1 = slerp_coefficients(t, *slerp_sums(a, b), eps=eps, dot_threshold=dot_threshold)
    return c0 * a + c1 * b
