"""Merges on the hypersphere: NuSLERP, Multi-SLERP and the Karcher mean (mergekit 0.1.5's
`nuslerp`, `multislerp`, `karcher`), one pure per-tensor function each.

NuSLERP (mergekit's re-spelling of SLERP; no paper) -- two models, weights w_0, w_1:

    t       = w_1 / (w_0 + w_1)                       (0.5 when the sum is ~0)
    u_i     = v_i / max(|v_i|, 1e-7)                  per row, or the whole tensor (flatten)
    Omega   = arccos(<u_0, u_1>)
    nuslerp = sin((1-t) Omega)/sin(Omega) v_0 + sin(t Omega)/sin(Omega) v_1
    with a base: theta_0 + nuslerp(t, tau_0, tau_1) (interpolate the task vectors)

where v_i are the models (no base) or their task vectors tau_i = theta_i - theta_0.
Exactly colinear rows (1 - cos^2 <= eps^2) are interpolated linearly. Unlike
`slerp.py` (Shoemake's formula with mergekit's `slerp` fallback at |cos| > 0.9995),
NuSLERP takes t from the weights, can work row by row, and falls back to linear
only at exact colinearity -- so `slerp.slerp` is not reused here.

Multi-SLERP (Goddard, https://goddard.blog/posts/multislerp-wow-what-a-cool-idea):
barycentric interpolation of N points on the sphere --

    u_i   = v_i / (|v_i| + eps)                        (v_i = tau_i with a base)
    m     = sum_i w_i u_i / |sum_i w_i u_i|            the weighted Euclidean mean, on the sphere
    g     = sum_i w_i (u_i - <u_i, m> m)               weighted mean in m's tangent space
    x     = cos(|g|) m + sin(|g|) g / |g|              exponential map back to the sphere
    merge = (sum_i w_i |v_i|) x   (+ theta_0)

(one tangent step, not an iterated mean; weights normalised to sum 1 by default).
Note what this computes: m is the normalised weighted mean of the u_i, so
g = sum_i w_i u_i - <sum_i w_i u_i, m> m = 0 by construction (up to rounding), and the
result is m times the weighted mean norm -- a normalised weighted average of the
directions, not the spherical barycentre the blog post describes (for two orthogonal unit
vectors with weights 3:1 it points at atan(1/3) = 18.4 degrees from the first, where slerp at
t = 1/4 points at 22.5). taskvec reproduces mergekit's formula as it is; the
`karcher` method is the iterated spherical mean.

Karcher mean (Wang, Ye & Yin 2026, "Functionality-Oriented LLM Merging on the
Fisher-Rao Manifold", https://arxiv.org/abs/2603.04972): the fixed-point iteration for
the Riemannian (Frechet) mean of the unit directions, rescaled by the mean norm --

    u_i    = v_i / |v_i|,  alpha_i = 1/N              (tensors with |v_i| <= tol leave the mean)
    m      = normalise(sum_i alpha_i u_i)
    repeat max_iter times, until |g| < tol:
        g  = sum_i alpha_i theta_i / sin(theta_i) (u_i - cos(theta_i) m),  theta_i = arccos <m, u_i>
        m  = cos(|g|) m + sin(|g|) g / |g|
    merge  = (sum_i alpha_i |v_i|) m

The paper's code is mergekit's `karcher.py` (the paper says so), so the two agree;
mergekit's `karcher` takes no base (a config's base_model is merged as one more model).

Every function mirrors mergekit 0.1.5's order of float32 operations, so the YAML path
reproduces mergekit's tensors to float32 rounding (tests/test_mergekit_parity.py).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ParameterError


# ---------------------------------------------------------------------------------------------
# NuSLERP

def nuslerp_t(weights: Sequence[float]) -> float:
    """NuSLERP's interpolation position from the two models' weights: w_1 / (w_0 + w_1), 0.5 at a ~0 sum."""
    if len(weights) != 2:
        raise ParameterError(f"weight: nuslerp takes two weights (one per model), got {len(weights)}")
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def _unit_rows(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)


def nuslerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool = False, flatten: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Spherical interpolation from v0 (t = 0) to v1 (t = 1).

    flatten: the whole tensor is one vector (mergekit's default); otherwise every
    vector along the last dimension (row_wise=False) or along dimension 0
    (row_wise=True, i.e. the columns of a matrix) is interpolated on its own.
    """
    if v0.shape != v1.shape:
        raise ParameterError(f"nuslerp: shapes differ, {tuple(v0.shape)} vs {tuple(v1.shape)}")
    shape = v0.shape
    if v0.dtype != v1.dtype:  # one dtype for the in-place steps below
        common = torch.promote_types(v0.dtype, v1.dtype)
        v0, v1 = v0.to(common), v1.to(common)
    dim = 0 if row_wise else -1
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    # mergekit's float operations, in place where a tensor-sized temporary would be (fresh pages each)
    out = _unit_rows(v0)
    cos = torch.sum(out.mul_(_unit_rows(v1)), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    omega = torch.acos(torch.where(colinear, 0, cos))
    torch.mul(torch.sin((1 - t) * omega), v0, out=out)
    out.add_(torch.sin(t * omega) * v1).div_(torch.sin(omega))
    if colinear.any():  # where the two are parallel: the linear interpolation
        out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------
# Multi-SLERP

def multislerp(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], base: torch.Tensor | None = None, *,
    normalize_weights: bool = True, eps: float = 1e-8, name: str = "<tensor>",
) -> torch.Tensor:
    """Barycentric interpolation on the sphere around `base` (the origin without one); see the module docstring.

    One model: that model, unchanged. Two antipodal models with balancing weights fall back to
    their weighted sum; more than two such models are an error naming the tensor.
    """
    if len(weights) != len(tensors):
        raise ParameterError(f"weight: got {len(weights)} values for {len(tensors)} models")
    if len(tensors) == 1:
        return tensors[0].clone()
    # mergekit's float operations in its order; in place where a tensor-sized temporary would be (each is fresh
    # pages to fault in): two (models x entries) buffers at most
    units = torch.stack(list(tensors), dim=0)
    shape = units.shape[1:]
    if base is not None:
        units -= base
    flat = units.view(units.shape[0], -1)
    w = torch.tensor(list(weights), dtype=units.dtype, device=units.device)
    if normalize_weights:
        if float(w.sum()) == 0.0:
            raise ParameterError("weight: the weights sum to 0, cannot normalize (set normalize_weights=False)")
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    flat.div_(norms + eps)  # the unit directions
    scratch = flat * w.view(-1, 1)
    mean = scratch.sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if units.shape[0] == 2:  # antipodal pair: mergekit's linear fallback, on the task vectors
            v = [(x - base).to(units.dtype) if base is not None else x for x in tensors]
            out = (v[0] * w[0] + v[1] * w[1]).view(shape)
            return out + base if base is not None else out
        raise ParameterError(
            f"weight (tensor {name!r}): the weighted mean of the models' directions is zero (antipodal models "
            "whose weights balance out); multislerp has no direction to interpolate around -- change the weights"
        )
    mean.div_(mean_norm)
    cos = torch.mul(flat, mean, out=scratch).sum(-1, keepdim=True)
    flat.sub_(torch.mul(cos, mean, out=scratch))  # the tangents at m: u - <u, m> m
    g = torch.mul(flat, w.view(-1, 1), out=scratch).sum(0)
    del scratch, units, flat
    g_norm = torch.norm(g) + eps
    out = mean.mul_(torch.cos(g_norm)).add_(g.mul_(torch.sin(g_norm) / g_norm))  # exponential map
    out = out.mul_((norms.squeeze(-1) * w).sum()).view(shape)
    return out + base if base is not None else out


# ---------------------------------------------------------------------------------------------
# Karcher mean

def karcher_mean(
    tensors: Sequence[torch.Tensor], alphas: Sequence[float] | None = None, *, max_iter: int = 10,
    tol: float = 1e-5,
) -> torch.Tensor:
    """Weighted Karcher mean of the tensors' directions times the weighted mean norm (module docstring).

    `alphas` default to 1/N (mergekit's `karcher`); tensors with norm <= tol have no direction
    and leave the mean (their weight is renormalised away), all zero -> zeros.
    """
    tensors = list(tensors)
    if len(tensors) == 1:
        return tensors[0].clone()
    alphas = [1.0 / len(tensors)] * len(tensors) if alphas is None else list(alphas)
    if len(alphas) != len(tensors):
        raise ParameterError(f"weight: got {len(alphas)} values for {len(tensors)} models")
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms, units = [], []
    for x in tensors:
        norm = torch.linalg.vector_norm(x.to(dtype))
        norms.append(norm)
        units.append(torch.zeros_like(x) if norm.item() == 0.0 else (x / norm).to(x.dtype))
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    u = [units[i] for i in valid]
    mean = karcher_initial_mean(u, a, tol)
    for _ in range(max_iter):
        g = karcher_tangent(mean, u, a, tol)
        g_norm = torch.linalg.vector_norm(g.to(dtype))
        if g_norm.item() < tol:
            break
        # exponential map, cos|g| m + sin|g| g / |g|, in place (the same float ops: no tensor-sized temporaries)
        mean.mul_(torch.cos(g_norm)).add_(g.div_(g_norm).mul_(torch.sin(g_norm)))
        norm = torch.linalg.vector_norm(mean.to(dtype))
        if norm.item() > tol:
            mean.div_(norm)
    scale = sum(alpha * n for alpha, n in zip(alphas, norms))
    return mean.mul_(scale)


def karcher_initial_mean(units: Sequence[torch.Tensor], alphas: Sequence[float], tol: float = 1e-5) -> torch.Tensor:
    """The starting point: the normalised weighted Euclidean mean of the unit directions (the first one if ~0)."""
    mean = torch.zeros_like(units[0])
    for alpha, unit in zip(alphas, units):
        mean += alpha * unit
    norm = torch.linalg.vector_norm(mean.to(torch.float64 if mean.dtype == torch.float64 else torch.float32))
    return units[0].clone() if norm.item() < tol else (mean / norm).to(mean.dtype)


def karcher_tangent(mean: torch.Tensor, units: Sequence[torch.Tensor], alphas: Sequence[float],
                    tol: float = 1e-5) -> torch.Tensor:
    """The Riemannian gradient step: sum_i alpha_i log_m(u_i), log_m(u) = theta/sin(theta) (u - cos(theta) m)."""
    g = torch.zeros_like(mean)
    step = torch.empty_like(mean)  # one buffer for every model's term: temporaries are fresh pages otherwise
    for alpha, unit in zip(alphas, units):
        dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
        theta = torch.arccos(dot)
        if theta.item() < tol:
            continue
        torch.mul(mean, dot, out=step)
        torch.sub(unit, step, out=step)
        g.add_(step.mul_(alpha * (theta / torch.sin(theta))))  # alpha theta / sin(theta) (u - cos(theta) m)
    return g
