"""Spectral merges of task matrices: TSV-M, Iso-C, Iso-CTS, and TALL-mask consensus.

Each 2-D delta tau_t (a "task matrix", r = min of its dimensions, T tasks) is
merged through its singular value decomposition tau_t = U_t S_t V_t^T:

    TSV-C  (Gargiulo et al. 2025)  low_rank_approx: keep the top ceil(f r) triplets
    TSV-M  (Gargiulo et al. 2025)  tsv_merge: top floor(r/T) triplets of every task in
           disjoint blocks of U, S, V; U -> P_U Q_U^T (polar factor, from
           SVD(U) = P_U D Q_U^T), V likewise; Delta = U_perp S V_perp^T
    Iso-C  (Marczak et al. 2025)   iso_c: SVD of sum_t tau_t, every singular value
           replaced by their mean: Delta = s_bar U V^T
    Iso-CTS (Marczak et al. 2025)  iso_cts: top-c triplets of sum_t tau_t (common
           subspace) + top floor((r - c)/T) triplets of each tau_t - U_c U_c^T tau_t,
           orthogonalised as TSV-M, every singular value set to their mean
    Consensus (Wang et al. 2024, TALL masks)  consensus: weights at least k tasks
           call important, 1{sum_t m_t >= k} * sum_t tau_t, with
           m_t = 1{|tau_t| >= lambda_t |tau_MTL - tau_t|}, tau_MTL = sum_t tau_t

The registered methods (registry.py) add lambda * Delta to the base. Tensors
that are not matrices (biases, norms, conv kernels) get the mean of tau_t in the
SVD methods, as in the reference code; consensus masks every tensor element-wise, as
the TALL-mask paper does (a mask is per weight, so the mean rule has no reason to apply).

SVDs are exact (LAPACK via torch.linalg.svd) in the merges: Iso-C/Iso-CTS need
every singular vector, and a merge must not depend on a random sketch. The
analyses and `TaskVector.low_rank` use `top_svd`: exact while the matrix holds
at most EXACT_SVD_MAX_NUMEL entries (2**24, e.g. 4096 x 4096) or more than half
its rank is asked for; above that, randomised SVD (torch.svd_lowrank, k + 16
columns, 4 power iterations, seeded so that results repeat).

Where the released code differs (FusionBench `method/task_singular_vector`,
`method/isotropic_merging`, whose code the Iso-C authors' repository shares):
* 2-D tensors: the reference code decomposes every 2-D tensor (token and position
  embeddings included) except CLIP's `text_projection` / an exclude list. We do the
  same by default; `svd_embeddings=False` averages embedding tables instead (a
  lookup table is not a linear map, and rows of unseen tokens have no delta).
* r < T (e.g. a 1 x n matrix merged from 2 tasks): floor(r/T) = 0, and the
  reference TSV-M writes a zero delta for that tensor. We take the mean instead,
  as for a non-2-D tensor (`tsv_merge`).
* Scaling: both reference implementations add `scaling_factor * Delta`, alpha tuned
  on validation data; Iso-C's s_bar is the mean singular value of the *sum* of the
  task matrices (not of their mean). Here `lambda` is that alpha, default 1.
* Zero singular values: their singular vectors are an arbitrary basis of a null space,
  so triplets with sigma <= max(m, n) * eps_float32 * sigma_max are left out before
  orthogonalising and averaging. For numerically full-rank task matrices (fully
  fine-tuned models) nothing changes; for rank-deficient ones (LoRA task vectors, tiny
  tests) the reference code's result depends on LAPACK's choice of null vectors and
  Iso-C's mean counts the zeros, while ours keeps the rank of the update.
* Iso-CTS: c = r - round((r - floor(r f)) / T) T as the reference, with Python's
  round (half to even) like theirs; where that would make c < 0 (tiny r, many
  tasks) we give each task floor(r / T) directions instead.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import ParameterError

#: Largest matrix (entries) the analyses decompose exactly; beyond it, randomised SVD.
EXACT_SVD_MAX_NUMEL = 1 << 24
#: Extra columns of the random sketch beyond the k triplets wanted (Halko et al.'s p).
LOWRANK_OVERSAMPLE = 16
#: Power iterations of the sketch: sharpens slowly decaying spectra (torch's default is 2).
LOWRANK_NITER = 4


def check_fraction(fraction, name: str = "fraction") -> float:
    """A share of the rank in (0, 1]; ParameterError naming `name` otherwise."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (0.0 < float(fraction) <= 1.0):
        raise ParameterError(f"{name} must be in (0, 1] (a share of the rank), got {fraction!r}")
    return float(fraction)


def keep_rank(rank: int, fraction: float) -> int:
    """ceil(fraction * rank), the TSV-C rank; a hair of tolerance so 0.3 * 10 stays 3."""
    return min(rank, math.ceil(check_fraction(fraction) * rank - 1e-9))


def top_svd(x: torch.Tensor, k: int | None = None, *, exact_max_numel: int = EXACT_SVD_MAX_NUMEL, seed: int = 0):
    """(U[:, :k], S[:k], Vh[:k]) of a 2-D float tensor, largest first; k None = all r.

    Exact for matrices up to `exact_max_numel` entries or when k > r/2 (a sketch
    would not be cheaper); otherwise torch.svd_lowrank with k + LOWRANK_OVERSAMPLE
    columns and LOWRANK_NITER power iterations, under a fixed seed.
    """
    r = min(x.shape)
    k = r if k is None else min(int(k), r)
    if x.numel() <= exact_max_numel or 2 * k > r:
        U, S, Vh = torch.linalg.svd(x, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k]
    devices = [x.device.index or 0] if x.is_cuda else []
    with torch.random.fork_rng(devices=devices):  # the sketch's draws neither use nor move the caller's RNG
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(x, q=min(r, k + LOWRANK_OVERSAMPLE), niter=LOWRANK_NITER)
    return U[:, :k], S[:k], V[:, :k].mT


def compose(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    """U diag(S) Vh without forming diag(S)."""
    return (U * S) @ Vh


def low_rank_approx(delta: torch.Tensor, fraction: float, **svd_kw) -> torch.Tensor:
    """TSV-C: the top ceil(fraction * r) singular triplets of a 2-D delta (a new tensor).

    fraction 1 returns an exact copy (no round trip through the SVD).
    """
    if delta.dim() != 2:
        raise ParameterError(f"low_rank_approx: expected a 2-D delta, got shape {tuple(delta.shape)}")
    k = keep_rank(min(delta.shape), fraction)
    if k == min(delta.shape) or not bool(delta.any()):  # all of it, or an untouched (zero) matrix: no SVD
        return delta.clone()
    return compose(*top_svd(delta, k, **svd_kw))


def polar_factor(A: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix nearest A: P Q^T from SVD(A) = P D Q^T (TSV-M's decorrelation).

    Orthonormal columns for a tall A, orthonormal rows for a wide one (so V^T's rows directly)."""
    P, _, Qh = torch.linalg.svd(A, full_matrices=False)
    return P @ Qh


def _check_deltas(deltas: Sequence[torch.Tensor], what: str) -> None:
    if not len(deltas):
        raise ParameterError(f"{what}: no task matrices given")
    if deltas[0].dim() != 2:
        raise ParameterError(f"{what}: expected 2-D task matrices, got shape {tuple(deltas[0].shape)}")


def _all_zero(deltas: Sequence[torch.Tensor]) -> bool:
    """Every task matrix is exactly zero (the merge is zero; skipping the SVD changes no number)."""
    return not any(bool(d.any()) for d in deltas)


def drop_null_triplets(U, S, Vh, sigma_max, shape) -> tuple:
    """The triplets within the numerical rank, sigma > max(m, n) eps sigma_max (torch.linalg.matrix_rank's
    default): a zero singular value's vectors are an arbitrary basis of a null space, so they are left out."""
    keep = S > max(shape) * torch.finfo(S.dtype).eps * sigma_max
    return U[:, keep], S[keep], Vh[keep]


def _orthogonal_merge(blocks: list, shape, *, isotropic: bool = False) -> torch.Tensor:
    """Concatenate per-block triplets, replace U and V by their polar factors, recompose
    (with every singular value replaced by their mean when `isotropic`)."""
    if not sum(len(S) for _, S, _ in blocks):
        return torch.zeros(shape, dtype=blocks[0][1].dtype, device=blocks[0][1].device)
    U, S, Vh = (torch.cat(parts, dim=d) for parts, d in zip(zip(*blocks), (1, 0, 0)))
    U, Vh = polar_factor(U), polar_factor(Vh)
    return (U @ Vh).mul_(S.mean()) if isotropic else compose(U, S, Vh)


def tsv_merge(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """TSV-M: Delta = U_perp S V_perp^T from each task's top floor(r/T) singular triplets.

    Blocks are concatenated task by task (U = [U_1,k ... U_T,k], S = diag(S_1,k ... S_T,k),
    V likewise); U_perp = P_U Q_U^T and V_perp = P_V Q_V^T. When the tasks' column and row
    spaces are already mutually orthogonal, U and V are unchanged and Delta = sum_t of the
    truncated tau_t. When floor(r/T) = 0, the mean of the tau_t (see the module docstring).
    Triplets with a numerically zero singular value (a task of rank < k) are left out.
    """
    _check_deltas(deltas, "tsv_merge")
    T, shape = len(deltas), deltas[0].shape
    k = min(shape) // T
    if k == 0:
        return torch.stack(list(deltas)).mean(dim=0)
    if _all_zero(deltas):  # untouched by every task (e.g. frozen word embeddings): nothing to decompose
        return torch.zeros_like(deltas[0])
    blocks = []
    for d in deltas:
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        blocks.append(drop_null_triplets(U[:, :k], S[:k], Vh[:k], S[0], shape))
    return _orthogonal_merge(blocks, shape)


def iso_c(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Iso-C: with sum_t tau_t = U S V^T, Delta = mean(S) U V^T (a flat, isotropic spectrum).

    Over the non-zero singular values: for a numerically full-rank sum (the usual case) that is
    all r of them, as the reference code; a rank-deficient sum (e.g. of LoRA task vectors) keeps
    its rank instead of spreading mass over arbitrary null-space directions.
    """
    _check_deltas(deltas, "iso_c")
    total = torch.stack(list(deltas)).sum(dim=0)
    if not bool(total.any()):  # a zero sum has no singular directions: the merge is zero, no SVD needed
        return torch.zeros_like(total)
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    U, S, Vh = drop_null_triplets(U, S, Vh, S[0], total.shape)
    return (U @ Vh).mul_(S.mean()) if len(S) else torch.zeros_like(total)


def iso_cts_split(rank: int, n_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(c, per-task k) of Iso-CTS: c = r - round((r - floor(r f)) / T) T, k = (r - c) / T."""
    if isinstance(common_space_fraction, bool) or not (0.0 <= float(common_space_fraction) <= 1.0):
        raise ParameterError(f"common_space_fraction must be in [0, 1], got {common_space_fraction!r}")
    k = round((rank - int(rank * common_space_fraction)) / n_tasks)  # Python round, as the reference
    k = min(k, rank // n_tasks)  # never more task directions than the rank holds (c >= 0)
    return rank - k * n_tasks, k


def iso_cts(deltas: Sequence[torch.Tensor], common_space_fraction: float = 0.8) -> torch.Tensor:
    """Iso-CTS: common subspace of sum_t tau_t plus task-specific directions, isotropic spectrum.

    U_c, S_c, V_c: the top c triplets of sum_t tau_t (`iso_cts_split`); each task adds the top k
    triplets of its residual tau_t - U_c U_c^T tau_t; U and V are orthogonalised as in TSV-M
    (polar factors) and every singular value is replaced by the mean of all r of them.
    """
    _check_deltas(deltas, "iso_cts")
    shape = deltas[0].shape
    c, k = iso_cts_split(min(shape), len(deltas), common_space_fraction)
    if _all_zero(deltas):
        return torch.zeros_like(deltas[0])
    total = torch.stack(list(deltas)).sum(dim=0)
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    U, S, Vh = drop_null_triplets(U, S, Vh, S[0], shape)
    Uc = U[:, :c]
    blocks = []
    for d in deltas if k else ():
        u, s, vh = torch.linalg.svd(d - Uc @ (Uc.mT @ d), full_matrices=False)
        # numerically zero relative to the task itself: a task inside the common subspace adds nothing
        blocks.append(drop_null_triplets(u[:, :k], s[:k], vh[:k], torch.linalg.matrix_norm(d, ord=2), shape))
    # task blocks first, then the common subspace, as the reference lays them out (the order is immaterial)
    blocks.append((Uc, S[:c], Vh[:c]))
    return _orthogonal_merge(blocks, shape, isotropic=True)


def tall_masks(deltas: Sequence[torch.Tensor], mask_lambda=0.6) -> torch.Tensor:
    """TALL masks m_t = 1{|tau_t| >= lambda_t |tau_MTL - tau_t|}, tau_MTL = sum_t tau_t.

    Returns a bool tensor [T, *shape]. `mask_lambda`: one lambda for all tasks or one per task.
    An entry no task changes (all tau_t = 0) is in every mask (0 >= 0), as in the paper's code.
    """
    stacked = torch.stack(list(deltas))
    lam = torch.as_tensor(mask_lambda, dtype=stacked.dtype, device=stacked.device)
    if lam.dim() > 1 or (lam.dim() == 1 and len(lam) != len(stacked)):
        raise ParameterError(f"mask_lambda: one value or one per task ({len(stacked)}), got {list(lam.shape)}")
    if bool((lam < 0).any()) or not bool(torch.isfinite(lam).all()):
        raise ParameterError(f"mask_lambda must be >= 0, got {mask_lambda!r}")
    lam = lam.reshape(-1, *([1] * (stacked.dim() - 1)))
    return stacked.abs() >= lam * (stacked.sum(dim=0) - stacked).abs()


def consensus(deltas: Sequence[torch.Tensor], k: int = 2, mask_lambda=0.6) -> torch.Tensor:
    """Consensus merging (TALL masks paper): 1{sum_t m_t >= k} * sum_t tau_t, element-wise.

    k = 0 keeps everything (task arithmetic); weights fewer than k tasks need ("selfish",
    "catastrophic") are dropped.
    """
    if isinstance(k, bool) or int(k) != k or k < 0:
        raise ParameterError(f"k must be an integer >= 0 (tasks that must agree), got {k!r}")
    masks = tall_masks(deltas, mask_lambda)
    return torch.stack(list(deltas)).sum(dim=0).mul_(masks.sum(dim=0) >= k)
