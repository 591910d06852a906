"""Reinforced Agent Merging (Yuan et al. 2026, "Behavior Knowledge Merge in Reinforced Agentic
Models", https://arxiv.org/abs/2601.13572): mergekit 0.1.5's `ram` and `ramplus_tl`.

RL fine-tuning changes few, task-specific weights; averaging dilutes an update that only one
agent made. RAM sorts every entry by how many task vectors change it (|tau_i| > epsilon):

    m_i     = [|tau_i| > epsilon]                   contribution mask
    c       = sum_i m_i                             contributors per entry
    unique  = [c == 1],  shared = [c > 1]
    tau_RAM = sum_i m_i tau_i (unique + shared / c)  unique updates kept whole, shared ones averaged
    theta   = theta_0 + tau_RAM

Entries no task vector changes by more than epsilon keep the base's value.

RAM+ additionally scales each agent's unique updates up, the more that agent overlaps
with the others (its unique updates carry behaviour its shared ones are averaged away from):

    rho_i    = |m_i and shared| / max(|m_i and unique|, epsilon)
    lambda_i = 1 + r clamp(rho_i, 0, alpha)
    tau_RAM+ = sum_i m_i tau_i (lambda_i unique + shared / c)

mergekit's `ramplus_tl` is the tensor-local form ("_tl"): the counts behind rho_i are taken per
tensor; that is what is implemented here (taskvec offers no whole-model variant).
"""
from __future__ import annotations

import torch

from ..errors import ParameterError


def contribution_masks(deltas: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RAM step 1 on stacked task vectors [n, ...]: m_i = |tau_i| > epsilon (bool) and the count c per entry."""
    if epsilon < 0:
        raise ParameterError(f"epsilon must be >= 0, got {epsilon!r}")
    nonzero = deltas.abs() > epsilon
    return nonzero, nonzero.sum(dim=0, keepdim=True)


def ram_merge(deltas: torch.Tensor, epsilon: float = 1e-5, *, scales: torch.Tensor | None = None) -> torch.Tensor:
    """RAM's merged task vector from stacked task vectors [n, ...]: unique updates kept (times `scales`,
    RAM+'s lambda_i, one per model), shared ones averaged over their contributors."""
    flat = deltas.reshape(deltas.shape[0], -1)
    nonzero, counts = contribution_masks(flat, epsilon)
    shared, unique = counts > 1, counts == 1
    kept = flat * nonzero
    unique_part = kept * unique if scales is None else kept * unique * scales.unsqueeze(-1)
    return (unique_part + kept * shared / counts.clamp(min=1)).sum(dim=0).reshape(deltas.shape[1:])


def ramplus_scales(deltas: torch.Tensor, epsilon: float = 1e-5, r: float = 0.1, alpha: float = 0.2) -> torch.Tensor:
    """RAM+'s lambda_i = 1 + r clamp(rho_i, 0, alpha), rho_i = (agent i's shared entries) / (its unique ones)."""
    flat = deltas.reshape(deltas.shape[0], -1)
    nonzero, counts = contribution_masks(flat, epsilon)
    shared_counts = (nonzero & (counts > 1)).sum(dim=1)
    unique_counts = (nonzero & (counts == 1)).sum(dim=1)
    return ramplus_scales_from_counts(shared_counts, unique_counts, epsilon, r, alpha)


def ramplus_scales_from_counts(shared_counts: torch.Tensor, unique_counts: torch.Tensor, epsilon: float, r: float,
                               alpha: float) -> torch.Tensor:
    """lambda_i from each agent's counts (int64) of shared and unique updates; the fused kernel counts them too."""
    rho = shared_counts / unique_counts.clamp(min=epsilon)
    return 1 + r * rho.clamp(min=0, max=alpha)
