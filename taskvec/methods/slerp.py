"""Spherical linear interpolation between two models, tensor by tensor (Shoemake 1985;
mergekit's `slerp`).

    Omega = arccos(<v0/|v0|, v1/|v1|>)
    theta = sin((1-t) Omega)/sin(Omega) * v0 + sin(t Omega)/sin(Omega) * v1

Nearly colinear tensors (|cos Omega| > dot_threshold) fall back to linear
interpolation, where the formula is numerically unstable.
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


def lerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    return (1.0 - t) * v0.to(torch.float32) + t * v1.to(torch.float32)


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
    na, nb = torch.linalg.vector_norm(a).item(), torch.linalg.vector_norm(b).item()
    # as mergekit: a (near-)zero vector is left unnormalised, which makes the dot ~0
    dot = torch.dot(a.reshape(-1), b.reshape(-1)).item() / ((na if na > eps else 1.0) * (nb if nb > eps else 1.0))
    if abs(dot) > dot_threshold:
        return lerp(t, a, b)
    omega = math.acos(max(-1.0, min(1.0, dot)))
    s = math.sin(omega)
    return (math.sin((1.0 - t) * omega) / s) * a + (math.sin(t * omega) / s) * b
