"""Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic") and averaging.

    addition   theta = theta_0 + lambda * sum_i w_i tau_i
    negation   theta = theta_0 - lambda * tau
    analogy    tau_D = tau_C + (tau_B - tau_A)          ("A is to B as C is to D")
    linear     theta = sum_i w_i theta_i / sum_i w_i     (model soup / weight averaging)

A negative weight is negation in task arithmetic (theta_0 - |w| tau) and an
extrapolation away from that model in a linear average (whose weights must not
sum to 0 when normalised). For sign-electing methods see taskvec.methods.ties.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ParameterError


def _weights(weights: Sequence[float] | None, n: int, what: str = "weight") -> list[float]:
    if weights is None:
        return [1.0] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ParameterError(f"{what}: got {len(w)} values for {n} models")
    return w


def task_arithmetic(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    *,
    lam: float = 1.0,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """theta_0 + lam * sum_i w_i tau_i (float32, new tensor)."""
    w = _weights(weights, len(deltas))
    out = base.to(torch.float32).clone()
    for wi, d in zip(w, deltas):
        out.add_(d.to(torch.float32), alpha=lam * wi)
    return out


def negate(base: torch.Tensor, delta: torch.Tensor, *, lam: float = 1.0) -> torch.Tensor:
    """Forgetting by negation: theta_0 - lam * tau."""
    return task_arithmetic(base, [delta], lam=-lam)


def analogy(tau_a: torch.Tensor, tau_b: torch.Tensor, tau_c: torch.Tensor) -> torch.Tensor:
    """Task analogy A:B :: C:D, tau_D = tau_C + (tau_B - tau_A)."""
    return tau_c.to(torch.float32) + (tau_b.to(torch.float32) - tau_a.to(torch.float32))


def linear_average(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """sum_i w_i theta_i, divided by sum_i w_i when `normalize` (the default)."""
    if not tensors:
        raise ParameterError("models: need at least one tensor to average")
    w = _weights(weights, len(tensors))
    total = sum(w)
    if normalize and abs(total) < 1e-12:
        raise ParameterError(f"weight: weights {w} sum to 0, cannot normalize (pass normalize=False)")
    out = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    for wi, t in zip(w, tensors):
        # multiply, then add (two roundings; add_(alpha=) fuses them on some lanes only): the fused kernel
        # computes exactly this, so both paths give the same bits
        out.add_(t.to(torch.float32) * (wi / total if normalize else wi))
    return out
