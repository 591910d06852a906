"""Model Stock (Jang et al. 2024): average the fine-tuned weights, then pull the average
towards the base by a ratio set by the angle between the task vectors.

    cos(theta) = mean over pairs i<j of cos(tau_i, tau_j)
    t          = N cos(theta) / (1 + (N - 1) cos(theta))
    theta_H    = t * mean_i theta_i + (1 - t) * theta_0

Per tensor (or per row with `filter_wise`, as mergekit's option of that name).

The paper's t is an interpolation ratio: it lies in [0, 1] exactly when
cos(theta) does. For cos < 0 the formula extrapolates past the base (t < 0),
and at cos = -1/(N-1) it divides by zero. Two behaviours:

* clamp=True (taskvec's default, `semantics="paper"`): cos is clamped to
  [0, 1] first, so opposing task vectors give t = 0, the base;
* clamp=False (`semantics="mergekit"`, what mergekit 0.1.5 computes): cos in
  [-1, 1], t < 0 extrapolates; within 1e-6 of the singularity t = 0 (the base).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ParameterError

_SINGULAR = 1e-6  # mergekit 0.1.5's threshold on |1 + (N - 1) cos|


def interpolation_ratio(cos: torch.Tensor, n: int, *, clamp: bool = True) -> torch.Tensor:
    """Model Stock's t = N cos / (1 + (N - 1) cos); see the module docstring for `clamp`."""
    if clamp:
        cos = cos.clamp(0.0, 1.0)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < _SINGULAR
    t = (n * cos) / torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(t), t)


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, filter_wise: bool = False,
                clamp: bool = True) -> torch.Tensor:
    if len(tensors) < 2:
        raise ParameterError(f"model_stock needs at least 2 fine-tuned models besides the base, got {len(tensors)}")
    shape = base.shape
    w0 = base.to(torch.float32)
    ws = [t.to(torch.float32) for t in tensors]
    if filter_wise and w0.dim() > 0:
        w0 = w0.reshape(-1, shape[-1]) if w0.dim() > 1 else w0.reshape(1, -1)
    else:
        w0 = w0.reshape(1, -1)
    ws = [w.reshape(w0.shape) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            a, b = offsets[i], offsets[j]
            norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    t = interpolation_ratio(cos, n, clamp=clamp)
    w_avg = sum(ws) / n
    return (t * w_avg + (1 - t) * w0).reshape(shape)
