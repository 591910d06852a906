"""SCE: Select, Calculate, Erase (Wan et al. 2024, FuseChat, https://arxiv.org/abs/2408.07990),
mergekit 0.1.5's `sce`. Per tensor, on stacked task vectors tau_i = theta_i - theta_0:

    Select:    keep the fraction select_topk of entries where the task vectors vary most
               (variance over the models), the same entries for every model
    Calculate: eta_i = ||tau_i||^2 / sum_j ||tau_j||^2             (one coefficient per model)
    Erase:     gamma = sign(sum_i tau_i) (0 -> +1); drop entries whose sign is not gamma
    Merge:     theta = theta_0 + sum_i eta_i m_i tau_i / max(sum_i eta_i m_i, 1e-6)

The selection keeps k = floor(select_topk * (entries with non-zero variance)) entries
(the set `torch.topk` keeps, as mergekit; k = 0 keeps none; on CPU found in O(n) from the k-th
largest variance; where that value is tied across the cut, the tied entries with the lowest indices,
where topk's choice is its implementation's). Election and agreement are TIES's
(`ties.elect_sign`, `ties.agreement`).

Where mergekit departs from the paper (`semantics`): mergekit computes eta from mean squares
and, when the mean squares of all task vectors sum to less than 1e-6, silently falls back to
equal coefficients 1/N. Fine-tuning deltas of large models are often that small (entries ~1e-4
give mean squares ~1e-8), so there the mergekit merge is an unweighted one. semantics="paper"
(taskvec's default) always uses the paper's eta (equal only when every task vector is exactly
zero); semantics="mergekit" (every YAML run) reproduces mergekit's fallback. Likewise mergekit
divides by max(sum_i eta_i m_i, 1e-6), which shrinks entries where only models with a tiny eta
agree; under "paper" the divisor is sum_i eta_i m_i itself (1 where no model agrees). "paper" is
also what mergekit's SCE computed before 0.1.5 (exact-zero tests in both places).
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import ParameterError
from .ties import agreement, elect_sign

_MERGEKIT_FLOOR = 1e-6  # mergekit 0.1.5's threshold on the sum of the mean squares


def sce_select(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """Select: a 0/1 mask (shape deltas.shape[1:]) of the top `select_topk` fraction of entries by variance
    across the models (population variance), counted among entries whose variance is non-zero."""
    if not 0.0 < select_topk <= 1.0:
        raise ParameterError(f"select_topk must be in (0, 1], got {select_topk!r}")
    if select_topk >= 1:
        return torch.ones_like(deltas[0])
    var = population_variance(deltas)
    k = int(torch.count_nonzero(var) * select_topk)
    if k == 0:
        return torch.zeros_like(var)
    score = var.abs().view(-1)
    kept = _top_k_by_threshold(score, k)
    if kept is not None:
        return kept.to(var.dtype).view_as(var)
    mask = torch.zeros_like(var)
    mask.view(-1)[torch.topk(score, k=k, largest=True).indices] = 1
    return mask


_VAR_CHUNK = 1 << 20  # entries per float64 chunk of population_variance (without numba)


def population_variance(deltas: torch.Tensor) -> torch.Tensor:
    """torch.var(deltas, dim=0, unbiased=False), bit for bit, faster on CPU float32.

    torch's CPU kernel runs Welford's update in float64 per entry (tests/test_methods_mergekit.py checks the
    bits); for a reduction over a handful of models it is slow (7 s for 3 x 32M entries on 2 cores). The same
    updates as one numba pass over the entries (fused.py), or without numba as elementwise float64 ops over
    chunks of entries, take a fraction of that."""
    if deltas.device.type != "cpu" or deltas.dtype != torch.float32 or deltas.dim() < 2:
        return torch.var(deltas, dim=0, unbiased=False)
    flat = deltas.reshape(deltas.shape[0], -1)
    from . import fused  # numba, where installed: imported here, by the one method that needs it

    if fused.AVAILABLE:  # one pass over the entries, the same updates
        return fused.population_variance(flat).view(deltas.shape[1:])
    out = torch.empty(flat.shape[1], dtype=torch.float32)
    for s in range(0, flat.shape[1], _VAR_CHUNK):
        block = flat[:, s:s + _VAR_CHUNK]
        mean = torch.zeros(block.shape[1], dtype=torch.float64)
        m2 = torch.zeros(block.shape[1], dtype=torch.float64)
        for i, row in enumerate(block):
            x = row.to(torch.float64)
            delta = x - mean
            mean += delta / (i + 1)
            m2 += delta * (x - mean)
        out[s:s + _VAR_CHUNK] = m2 / flat.shape[0]
    return out.view(deltas.shape[1:])


def _top_k_by_threshold(score: torch.Tensor, k: int) -> torch.Tensor | None:
    """The k largest entries of `score` as a bool mask, found by the k-th largest value (one O(n)
    `np.partition`, no sort): the entries above it, and of those equal to it the first ones in index order
    up to k. That is torch.topk's set unless the k-th largest is tied across the cut; there topk's choice
    among the tied entries is its implementation's (it differs between devices and inputs), taskvec's is
    the lowest indices, the same on every run. None off CPU float32/float64 (the caller runs topk)."""
    if score.device.type != "cpu" or score.dtype not in (torch.float32, torch.float64):
        return None
    values = score.detach().numpy()
    threshold = np.partition(values, values.size - k)[values.size - k]
    kept = values > threshold
    ties = np.flatnonzero(values == threshold)
    kept[ties[:k - int(kept.sum())]] = True
    return torch.from_numpy(kept)


def sce_coefficients(deltas: torch.Tensor, semantics: str = "paper") -> torch.Tensor:
    """Calculate: eta_i proportional to tau_i's mean square (= its sum of squares / entries), summing to 1."""
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    floor = _MERGEKIT_FLOOR if semantics == "mergekit" else 0.0
    if abs(total) < floor or total == 0.0:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


def sce_erase(deltas: torch.Tensor) -> torch.Tensor:
    """Erase: 1.0 where tau_i is non-zero with the sign of sum_i tau_i (a zero sum elects +), else 0.0."""
    signs = elect_sign(deltas, "mass")
    return agreement(deltas, signs.masked_fill_(signs == 0, 1))


def sce_merge(deltas: torch.Tensor, select_topk: float = 1.0, semantics: str = "paper") -> torch.Tensor:
    """The merged task vector from stacked task vectors [n, ...]: select, calculate, erase, weighted mean."""
    if semantics not in ("paper", "mergekit"):
        raise ParameterError(f"semantics must be 'paper' or 'mergekit', got {semantics!r}")
    if select_topk < 1:
        deltas = deltas * sce_select(deltas, select_topk).unsqueeze(0)
    eta = sce_coefficients(deltas, semantics)
    eta = eta.reshape(-1, *([1] * (deltas.dim() - 1)))
    # in place on the fresh (models x entries) tensors: each temporary of that size is fresh pages to fault in
    weights = sce_erase(deltas).mul_(eta)
    divisor = torch.sum(weights, dim=0)
    if semantics == "mergekit":
        divisor = divisor.clamp_(min=1e-6)
    else:  # the reference code's: 1 where no model agrees (the numerator is 0 there too)
        divisor = divisor.masked_fill_(divisor == 0, 1)
    return weights.mul_(deltas).sum(dim=0).div_(divisor)
