"""Entry-wise selective merges of one model into a base: NearSwap and Arcee Fusion
(mergekit 0.1.5's `nearswap`, `arcee_fusion`). Neither has a paper; the references
are the authors' descriptions.

NearSwap (alchemonaut, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001):
take the model's value where it is already close to the base's, keep the base's where
they are far apart --

    w     = clamp(t / max(|theta_1 - theta_0|, 1e-6), 0, 1)
    theta = w theta_1 + (1 - w) theta_0

so entries within t of the base move all the way to the model, an entry d >= t away moves
by t/d of the way (by exactly t).

Arcee Fusion (Arcee AI, https://arcee.ai, mergekit's reference; described in its model cards as
"importance scoring, dynamic thresholding, selective integration"): keep only the model's most important changes --

    importance = |theta_1 - theta_0| * KL(softmax(theta_1) || softmax(theta_0))    (softmax, KL along the last dim)
    threshold  = median + 1.5 (Q3 - Q1)        of the importance scores (Tukey's outlier fence)
    theta      = theta_0 + [importance >= threshold] (theta_1 - theta_0)

Quantiles are order statistics at index floor(q (n - 1)), as mergekit takes them. mergekit
estimates them from 1,000,000 entries sampled at random (with replacement) when a tensor is
larger than that; taskvec always takes the exact ones (`kthvalue`, no sort), so on tensors
above 10^6 entries the two can keep slightly different sets.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ParameterError


def nearswap(base: torch.Tensor, model: torch.Tensor, t: float) -> torch.Tensor:
    """NearSwap: move each entry of the base to the model's by at most t (all the way when closer than t)."""
    if t < 0:
        raise ParameterError(f"t must be >= 0 (the largest distance swapped outright), got {t!r}")
    w = (t / torch.abs(base - model).clamp(min=1e-6)).clamp(min=0, max=1)
    return w * model + (1 - w) * base


def fusion_importance(model: torch.Tensor, base: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Arcee Fusion step 1: |theta_1 - theta_0| times the KL divergence of the softmaxed rows (last dim)."""
    p = F.softmax(model, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (model - base).abs() * kl


def order_statistics(x: torch.Tensor, qs: tuple[float, ...]) -> list[torch.Tensor]:
    """The sorted values at index floor(q (n - 1)) for each q, without a full sort: on CPU one
    `np.partition` for all of them (one copy, one multi-select), elsewhere `kthvalue` per q."""
    flat = x.reshape(-1)
    n = flat.numel()
    ranks = [int(torch.tensor(q) * (n - 1)) for q in qs]  # float32 q, as mergekit's torch.tensor(q)
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        part = np.partition(flat.detach().numpy(), sorted(set(ranks)))
        return [torch.tensor(part[r], dtype=flat.dtype) for r in ranks]
    return [flat.kthvalue(r + 1).values for r in ranks]


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    """Arcee Fusion step 2: median + 1.5 IQR of the importance scores."""
    q1, median, q3 = order_statistics(importance, (0.25, 0.5, 0.75))
    return median + 1.5 * (q3 - q1)


def arcee_fusion(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """Arcee Fusion step 3: the base plus the model's changes whose importance reaches the threshold."""
    importance = fusion_importance(model, base)
    mask = (importance >= fusion_threshold(importance)).float()
    return base + (model - base) * mask
