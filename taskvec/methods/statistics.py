"""Merges that use statistics gathered from data (the statistics themselves are
computed in taskvec.eval / taskvec.zoo; these functions take them as given).

Fisher merging (Matena & Raffel 2022):
    theta = sum_i w_i F_i theta_i / sum_i w_i F_i,   F_i = max(diag Fisher_i, eps)

RegMean (Jin et al. 2023), per linear layer y = x W^T (nn.Linear weight W: [out, in]):
    G_i~ = alpha G_i + (1 - alpha) diag(G_i)          G_i = X_i^T X_i, [in, in]
    W*   = (sum_i W_i G_i~) (sum_i G_i~)^-1
i.e. the least-squares W matching every model's outputs on its own inputs.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ParameterError


def fisher_merge(
    tensors: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    *,
    eps: float = 1e-6,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Fisher-weighted average; eps floors each Fisher so no entry divides by zero."""
    if len(tensors) != len(fishers):
        raise ParameterError(f"fisher: {len(fishers)} Fisher diagonals for {len(tensors)} models")
    if not tensors:
        raise ParameterError("models: need at least one tensor")
    w = [1.0] * len(tensors) if weights is None else [float(x) for x in weights]
    num = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    den = torch.zeros_like(num)
    for wi, t, f in zip(w, tensors, fishers):
        if f.shape != t.shape:
            raise ParameterError(f"fisher: Fisher shape {tuple(f.shape)} != parameter shape {tuple(t.shape)}")
        fi = f.to(torch.float32).clamp(min=eps).mul_(wi)
        num.addcmul_(fi, t.to(torch.float32))
        den.add_(fi)
    return num.div_(den)


def regmean_merge(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float = 0.9) -> torch.Tensor:
    """RegMean for one nn.Linear weight [out, in] given each model's input Gram matrix [in, in].

    Solved in float64 (Gram matrices are often badly conditioned); least squares
    when the summed Gram is singular."""
    a = float(alpha)
    if not 0.0 <= a <= 1.0:
        raise ParameterError(f"alpha must be in [0, 1], got {alpha!r}")
    if len(weights) != len(grams) or not weights:
        raise ParameterError(f"regmean: {len(grams)} Gram matrices for {len(weights)} weights")
    g_sum = None
    wg_sum = None
    for w, g in zip(weights, grams):
        if w.dim() != 2 or g.shape != (w.shape[1], w.shape[1]):
            raise ParameterError(
                f"regmean: weight {tuple(w.shape)} needs a Gram matrix of shape {(w.shape[-1],) * 2}, got {tuple(g.shape)}"
            )
        g = g.to(torch.float64)
        g = a * g + (1.0 - a) * torch.diag(torch.diagonal(g))  # shrink off-diagonals towards plain averaging
        wg = g @ w.to(torch.float64).T  # G W^T: [in, out]
        g_sum = g if g_sum is None else g_sum + g
        wg_sum = wg if wg_sum is None else wg_sum + wg
    try:
        solution = torch.linalg.solve(g_sum, wg_sum)
    except RuntimeError:  # singular: fall back to the minimum-norm least-squares solution
        solution = torch.linalg.lstsq(g_sum, wg_sum).solution
    return solution.T.to(torch.float32).contiguous()
