"""TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

    tau_hat_i = trim_topk(tau_i, k)                       (sparsify.py)
    gamma     = sign(sum_i tau_hat_i)                     elect_sign, "mass"
    A         = {i : tau_hat_i != 0 and sign(tau_hat_i) = gamma}
    tau_m     = (1 / |A|) sum_{i in A} tau_hat_i          disjoint_mean
    theta     = theta_0 + lambda * tau_m

`combine_deltas` is the shared final step of every task-vector method
(task arithmetic, TIES, DARE, breadcrumbs, DELLA), in two semantics:

* "paper" (default): signs are elected on the unweighted trimmed vectors;
  per-model weights then scale each agreeing vector, and the disjoint mean
  divides by the number of agreeing models |A|. A zero sum elects no sign.
* "mergekit" (as mergekit 0.1.5's generalized task arithmetic): weights
  multiply the vectors *before* the election, a zero sum elects +1, and
  `normalize` divides by the sum of the weights of the agreeing models.

With unit weights the two agree except where the elected mass is exactly 0.

Negative weights (`check_weight_signs`). In task arithmetic, weight < 0 is
negation (theta_0 - |w| tau, EMTA's forgetting). In a sign-electing merge it
is not well defined:
* "paper": the sign is elected on the unweighted vectors, then a negative
  weight flips an agreeing model's entry, so the merged entry contradicts the
  elected sign. Refused (ParameterError) with the alternatives.
* "mergekit": the weight multiplies tau before the vote, so -|w| tau votes
  (a coherent negation) -- but with `normalize` the divisor is the sum of the
  agreeing weights, negative where only negatively weighted models agree,
  which flips those entries back against the elected sign. mergekit does
  exactly this; taskvec computes the same and warns.
On float32 checkpoints, semantics="mergekit" reproduces mergekit 0.1.5's
`ties` output bit for bit: tests/test_mergekit_parity.py checks it in every CI
run against goldens mergekit-yaml wrote (mixed densities; a negative weight).
The one deliberate difference is at exact magnitude ties with the k-th largest
entry, which taskvec all keeps (see trim_topk).
"""
from __future__ import annotations

import warnings

import torch

from ..errors import ParameterError

CONSENSUS = ("mass", "count")
SEMANTICS = ("paper", "mergekit")


def elect_sign(deltas: torch.Tensor, method: str = "mass") -> torch.Tensor:
    """TIES step 2: gamma = sign(sum_i tau_i) ("mass") or sign(sum_i sign(tau_i)) ("count").

    `deltas` is stacked [n_models, ...]; returns +1/-1/0 (0 where the vote ties)
    with shape deltas.shape[1:], in deltas' dtype.
    """
    if method in ("mass", "sum"):
        return deltas.sum(dim=0).sign()
    if method == "count":
        return deltas.sign().sum(dim=0).sign()
    raise ParameterError(f"consensus must be one of {CONSENSUS}, got {method!r}")


def agreement(deltas: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """1.0 where model i's entry is non-zero and has the elected sign, else 0.0 (float, same shape as deltas)."""
    return deltas.sign().mul_(signs).clamp_(min=0)  # sign * sign is 1 only for equal non-zero signs


def disjoint_mean(deltas: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """TIES step 3: per entry, the mean over the models whose entry is non-zero and
    agrees with `signs`; 0 where no model agrees. Zeros (trimmed entries) never dilute the mean."""
    agree = agreement(deltas, signs)
    return (deltas * agree).sum(dim=0).div_(agree.sum(dim=0).clamp_(min=1))


def check_weight_signs(weights, *, consensus: str | None, semantics: str, normalize: bool) -> None:
    """Refuse (paper) or warn about (mergekit + normalize) weights < 0 in a sign-electing merge;
    see the module docstring. No-op without election (there weight < 0 is plain negation)."""
    if consensus is None or weights is None:
        return
    negative = [i for i, w in enumerate(weights) if float(w) < 0]
    if not negative:
        return
    which = ", ".join(f"model {i}: {float(weights[i]):g}" for i in negative)
    if semantics == "paper":
        raise ParameterError(
            f"weight ({which}): a negative weight in a TIES-style merge contradicts the elected sign -- the sign "
            "is elected on the unweighted task vectors, then the weight flips that model's agreeing entries. "
            "To subtract a task vector, merge its negation (TaskVector: -tau applied to the base) with a "
            "positive weight, or use task_arithmetic / dare_linear, where weight < 0 is negation; "
            "semantics='mergekit' lets the weight vote, as mergekit does"
        )
    if normalize:
        warnings.warn(
            f"weight ({which}) < 0 with normalize under semantics='mergekit': as in mergekit 0.1.5, the "
            "divisor is the sum of the agreeing weights, which is negative where only negatively weighted "
            "models agree; those merged entries get the sign opposite to the elected one "
            "(set normalize=False for a plain negation)",
            UserWarning, stacklevel=3,
        )


def _as_column(weights, like: torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    return w.reshape(-1, *([1] * (like.dim() - 1)))


def combine_deltas(
    deltas: torch.Tensor,
    weights=None,
    *,
    consensus: str | None = None,
    normalize: bool = False,
    semantics: str = "paper",
) -> torch.Tensor:
    """Merge stacked (already sparsified) task vectors [n, ...] into one delta.

    consensus None: sum_i w_i tau_i, divided by sum_i w_i when `normalize`.
    consensus "mass"/"count": TIES election + disjoint merge, see the module docstring
    for where the weights enter under each `semantics`.
    """
    if semantics not in SEMANTICS:
        raise ParameterError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    check_weight_signs(weights, consensus=consensus, semantics=semantics, normalize=normalize)
    w = _as_column([1.0] * deltas.shape[0] if weights is None else weights, deltas)
    weighted = deltas * w
    if consensus is None:
        out = weighted.sum(dim=0)
        if normalize:
            total = float(w.sum())
            if abs(total) < 1e-8:
                if semantics == "paper":
                    raise ParameterError("weight: the weights sum to 0, cannot normalize (set normalize=False)")
                total = 1.0  # mergekit leaves the sum undivided
            out.div_(total)
        return out
    if semantics == "paper":
        signs = elect_sign(deltas, consensus)
        agree = agreement(deltas, signs)
        out = (weighted * agree).sum(dim=0)
        return out.div_(agree.sum(dim=0).clamp_(min=1)) if normalize else out
    # mergekit: weighted vote, ties go to +1, divisor = sum of agreeing weights
    if consensus not in CONSENSUS and consensus != "sum":
        raise ParameterError(f"consensus must be one of {CONSENSUS}, got {consensus!r}")
    # (float arithmetic instead of boolean masks: the same values, several times faster on CPU)
    vote = weighted.sum(dim=0) if consensus in ("mass", "sum") else weighted.sign().sum(dim=0)
    signs = vote.sign_().add_(1).sign_().mul_(2).sub_(1)  # sign, with 0 -> +1
    agree = agreement(weighted, signs)
    out = (weighted * agree).sum(dim=0)
    if normalize:
        divisor = (w * agree).sum(dim=0)
        divisor.add_(1 - divisor.abs().sign())  # 0 -> 1
        out.div_(divisor)
    return out
