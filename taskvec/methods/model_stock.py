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

Per tensor, the dot products and norms of the task vectors (their Gram matrix) are accumulated
in float64, `CHUNK` entries at a time, chunks added in order, as SLERP's (slerp.py): float32
sums drift with tensor size, and the fused numba kernel (`fused.fused_model_stock`) sums the
same chunks, so both round the same float32 ratio t. Per row (filter_wise) the rows are short
and the cosines are taken in float32.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ParameterError

_SINGULAR = 1e-6  # mergekit 0.1.5's threshold on |1 + (N - 1) cos|
CHUNK = 1 << 16  # entries per float64 partial Gram matrix; the fused kernel's chunks are the same


def interpolation_ratio(cos: torch.Tensor, n: int, *, clamp: bool = True) -> torch.Tensor:
    """Model Stock's t = N cos / (1 + (N - 1) cos); see the module docstring for `clamp`."""
    if clamp:
        cos = cos.clamp(0.0, 1.0)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < _SINGULAR
    t = (n * cos) / torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(t), t)


def offset_gram(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """G[i, j] = <theta_i - theta_0, theta_j - theta_0> over the whole tensor, float64, `CHUNK` entries at
    a time (offsets in float32, as the merge takes them), chunks added in order."""
    w0 = base.reshape(-1)
    ws = [t.reshape(-1) for t in tensors]
    gram = torch.zeros(len(ws), len(ws), dtype=torch.float64)
    for s in range(0, w0.numel(), CHUNK):
        b = w0[s:s + CHUNK].to(torch.float32)
        off = torch.stack([w[s:s + CHUNK].to(torch.float32) - b for w in ws]).to(torch.float64)
        gram += off @ off.T
    return gram


def ratio_from_gram(gram: torch.Tensor, *, clamp: bool = True) -> float:
    """Model Stock's t (a float32 value) from the offsets' Gram matrix: the mean pairwise cosine (norms
    floored at 1e-6 as mergekit, each cosine clipped to [-1, 1]) through `interpolation_ratio`."""
    n = gram.shape[0]
    norms = gram.diagonal().sqrt()
    cosines = [(gram[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
               for i in range(n) for j in range(i + 1, n)]
    return float(interpolation_ratio(torch.stack(cosines).mean(), n, clamp=clamp).to(torch.float32))


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, filter_wise: bool = False,
                clamp: bool = True) -> torch.Tensor:
    if len(tensors) < 2:
        raise ParameterError(f"model_stock needs at least 2 fine-tuned models besides the base, got {len(tensors)}")
    shape = base.shape
    n = len(tensors)
    w0 = base.to(torch.float32)
    ws = [t.to(torch.float32) for t in tensors]
    if filter_wise and w0.dim() > 0:  # one angle per row, in float32
        w0 = w0.reshape(-1, shape[-1]) if w0.dim() > 1 else w0.reshape(1, -1)
        ws = [w.reshape(w0.shape) for w in ws]
        offsets = [w - w0 for w in ws]
        cosines = []
        for i in range(n):
            for j in range(i + 1, n):
                a, b = offsets[i], offsets[j]
                norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
                cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
        t = interpolation_ratio(torch.stack(cosines).mean(dim=0).unsqueeze(-1), n, clamp=clamp)
    else:
        t = torch.tensor(ratio_from_gram(offset_gram(base, tensors), clamp=clamp), dtype=torch.float32)
    return combine(t, w0, ws).reshape(shape)


def combine(t: torch.Tensor, w0: torch.Tensor, ws: Sequence[torch.Tensor]) -> torch.Tensor:
    """theta_H = t * mean_i theta_i + (1 - t) * theta_0, in float32 (the fused kernel repeats these steps)."""
    w_avg = sum(ws) / len(ws)
    return t * w_avg + (1 - t) * w0
