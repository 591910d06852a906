"""Merges that use statistics gathered from data (the statistics themselves are
computed in taskvec.eval / taskvec.zoo; these functions take them as given).

Fisher merging (Matena & Raffel 2022), with the defaults of their reference code
(github.com/mmatena/model_merging, merging.py: normalize_fishers=True, favor_target_model=True):
    theta = sum_i c_i F~_i theta_i / sum_i c_i F~_i
    c_i   = w_i / ||F_i||      ||F_i||: L2 norm of model i's whole Fisher, over all its parameters
                               (`fisher_norm`; the coefficient is w_i when not normalising)
    F~_0  = max(F_0, eps),  F~_i = F_i (i > 0)     floor="target": the first model is the target
    F~_i  = max(F_i, eps) for every i              floor="all"
Normalising stops one model from dominating every parameter because its Fisher is larger overall
(a longer input, a sharper model: the Fisher is a sum over positions); flooring the target alone makes
an entry no model has Fisher mass for keep the target model's value instead of an unweighted average.

RegMean (Jin et al. 2023), per linear layer y = x W^T (nn.Linear weight W: [out, in]):
    G_i~ = alpha G_i + (1 - alpha) diag(G_i)          G_i = X_i^T X_i / N_i, [in, in]
    W*   = (sum_i W_i G_i~) (sum_i G_i~)^-1
i.e. the least-squares W matching every model's outputs on its own inputs. GPT-2's Conv1D stores
W^T ([in, out]): pass transposed=True. Input features that no model's data ever activated (a zero
row/column in every G_i) are not constrained by the equation: they keep the plain average of the
models' weights (the reference inverts the Gram and has no answer there).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Sequence

import torch

from ..errors import ParameterError

FISHER_FLOORS = ("target", "all")


def fisher_norm(fisher: Mapping[str, torch.Tensor] | torch.Tensor) -> float:
    """||F|| over every parameter of one model (a mapping name -> Fisher diagonal, or one tensor):
    the constant Fisher merging divides that model's weight by (`fisher_merge(norms=...)`).

    Accumulated in float64 tensor by tensor; a model is one norm, never one per tensor."""
    tensors = [fisher] if isinstance(fisher, torch.Tensor) else list(fisher.values())
    sq = 0.0
    for f in tensors:
        if not isinstance(f, torch.Tensor):
            raise ParameterError(f"fisher: a Fisher diagonal must be a tensor, got {type(f).__name__}")
        sq += float(torch.linalg.vector_norm(f.to(torch.float64)) ** 2)
    norm = math.sqrt(sq)
    if not (norm > 0 and math.isfinite(norm)):
        raise ParameterError(f"fisher: cannot normalise a Fisher whose norm is {norm} (all zero, or NaN/inf)")
    return norm


def fisher_norms(fishers: Sequence) -> list[float]:
    """`fisher_norm` of each model's Fisher (a mapping name -> tensor, or one tensor), for
    `fisher_merge(norms=...)`: computed once per merge, before the tensor loop."""
    out = []
    for i, f in enumerate(fishers):
        if not isinstance(f, (Mapping, torch.Tensor)):
            raise ParameterError(
                f"fisher (model {i}): normalising needs the whole Fisher (a mapping name -> tensor), got "
                f"{type(f).__name__}; pass normalize=False or the norms"
            )
        try:
            out.append(fisher_norm(f))
        except ParameterError as e:
            raise ParameterError(f"fisher (model {i}): {e}") from None
    return out


def transposed_names(grams: Sequence) -> frozenset[str]:
    """Weight names stored [in, out] (GPT-2 Conv1D) according to any model's Gram mapping
    (`regmean_grams(...).transposed`); empty for plain dicts."""
    return frozenset().union(*(getattr(g, "transposed", ()) for g in grams))


def fisher_merge(
    tensors: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    *,
    eps: float = 1e-6,
    weights: Sequence[float] | None = None,
    floor: str = "target",
    norms: Sequence[float] | None = None,
) -> torch.Tensor:
    """Fisher-weighted average of one tensor: sum_i c_i F~_i theta_i / sum_i c_i F~_i (module docstring).

    eps:     the floor on Fisher entries (1e-6, the reference's fisher_floor), applied to the raw Fisher.
    floor:   "target" (default, the reference's favor_target_model): only the first model's Fisher is
             floored; "all": every model's.
    norms:   each model's whole-model Fisher norm (`fisher_norm`), to divide its weight by; None = no
             normalisation. The reference normalises by default: whole-model merges (`merge`) pass them.
    weights: w_i, default 1 each; they must not sum to 0.
    Inputs are never modified; the result is float32.
    """
    n = len(tensors)
    if len(fishers) != n:
        raise ParameterError(f"fisher: {len(fishers)} Fisher diagonals for {n} models")
    if not tensors:
        raise ParameterError("models: need at least one tensor")
    if floor not in FISHER_FLOORS:
        raise ParameterError(f"floor must be one of {FISHER_FLOORS}, got {floor!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
        raise ParameterError(f"eps must be a finite number >= 0, got {eps!r}")
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(w) != n:
        raise ParameterError(f"weight: got {len(w)} weights for {n} models")
    if abs(sum(w)) < 1e-12:  # as `linear`: the weighted mean is undefined, not NaN
        raise ParameterError(f"weight: weights {w} sum to 0, cannot take a Fisher-weighted mean")
    if norms is not None:
        if len(norms) != n:
            raise ParameterError(f"fisher: {len(norms)} Fisher norms for {n} models")
        for i, c in enumerate(norms):
            if not (float(c) > 0 and math.isfinite(float(c))):
                raise ParameterError(f"fisher: the Fisher norm of model {i} must be a positive number, got {c!r}")
        w = [wi / float(c) for wi, c in zip(w, norms)]
    num = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    den = torch.zeros_like(num)
    for i, (wi, t, f) in enumerate(zip(w, tensors, fishers)):
        if f.shape != t.shape:
            raise ParameterError(f"fisher: Fisher shape {tuple(f.shape)} != parameter shape {tuple(t.shape)} (model {i})")
        fi = f.to(torch.float32, copy=True)  # a copy: the in-place ops below must not touch the caller's Fisher
        if floor == "all" or i == 0:
            fi.clamp_(min=eps)
        fi.mul_(wi)
        num.addcmul_(fi, t.to(torch.float32))
        den.add_(fi)
    if not bool((den != 0).all()):
        bad = int((den == 0).sum())
        raise ParameterError(
            f"fisher: {bad} entries have no Fisher mass in any model (weighted sum 0); give the first model a "
            "positive weight and eps > 0, or use floor='all'"
        )
    return num.div_(den)


def regmean_merge(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float = 0.9, *,
                  transposed: bool = False) -> torch.Tensor:
    """RegMean for one linear weight given each model's input Gram matrix [in, in].

    The weight is nn.Linear's [out, in], or with `transposed=True` GPT-2 Conv1D's [in, out]; the result
    has the weights' layout. Solved in float64 (Gram matrices are often badly conditioned) as the
    deviation D from the plain average W_avg: (sum G~) D^T = sum G~ (W_i - W_avg)^T, which is RegMean
    wherever the summed Gram is invertible. Features no model saw active (zero Gram diagonal in every
    model) keep W_avg; any other singular direction (possible only when alpha = 1) takes the
    minimum-norm D, i.e. W_avg there as well."""
    a = float(alpha)
    if not 0.0 <= a <= 1.0:
        raise ParameterError(f"alpha must be in [0, 1], got {alpha!r}")
    if len(weights) != len(grams) or not weights:
        raise ParameterError(f"regmean: {len(grams)} Gram matrices for {len(weights)} weights")
    # work on W^T ([in, out]) throughout: Conv1D already stores it
    wts = [w.to(torch.float64) if transposed else w.to(torch.float64).T for w in weights]
    for w, wt, g in zip(weights, wts, grams):
        if w.dim() != 2 or g.shape != (wt.shape[0], wt.shape[0]):
            layout = "[in, out] (transposed)" if transposed else "[out, in]"
            hint = ""
            if w.dim() == 2 and not transposed and g.shape == (w.shape[0], w.shape[0]):
                hint = " (a GPT-2 Conv1D weight, stored [in, out]? pass transposed=True)"
            raise ParameterError(
                f"regmean: weight {tuple(w.shape)} {layout} needs a Gram matrix of shape {(wt.shape[0],) * 2}, "
                f"got {tuple(g.shape)}{hint}"
            )
    w_avg = sum(wts) / len(wts)
    g_sum = None
    rhs = None
    for wt, g in zip(wts, grams):
        g = g.to(torch.float64)
        g = a * g + (1.0 - a) * torch.diag(torch.diagonal(g))  # shrink off-diagonals towards plain averaging
        term = g @ (wt - w_avg)  # G~ (W_i - W_avg)^T: [in, out]
        g_sum = g if g_sum is None else g_sum + g
        rhs = term if rhs is None else rhs + term
    seen = torch.diagonal(g_sum) > 0  # a feature is constrained only if some model's data activated it
    dev = torch.zeros_like(w_avg)
    if bool(seen.any()):
        idx = seen.nonzero().squeeze(1)
        g_seen, rhs_seen = g_sum[idx][:, idx], rhs[idx]
        if a < 1.0:  # (1 - alpha) diag(G) > 0 on the seen features: positive definite, a plain solve
            dev[idx] = torch.linalg.solve(g_seen, rhs_seen)
        else:  # alpha = 1 may leave dependent features (singular): minimum-norm least squares
            dev[idx] = torch.linalg.pinv(g_seen, hermitian=True) @ rhs_seen
    out = w_avg + dev
    return (out if transposed else out.T).to(torch.float32).contiguous()
