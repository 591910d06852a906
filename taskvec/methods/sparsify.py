"""Sparsification steps: TIES trim, Model Breadcrumbs, DELLA MagPrune.

Every function here is pure: it returns a new float32 tensor and never
touches its input. Selection uses an exact radix select on the float bit
patterns (two 16-bit histograms) instead of a sort: O(n), bandwidth-bound,
and it streams, which is how the global (whole-model) TIES threshold is found
without concatenating the model.

Bool tensors are avoided in the hot paths on purpose: on CPU, masking with
`torch.where`/`masked_fill` is ~20x slower than the fused float kernel
`hardshrink`, which keeps x where |x| > lambd and zeros the rest.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from ..errors import ParameterError

_HI_BINS = 1 << 15  # |x| has a zero sign bit: the high 16 bits of its float32 pattern fit in 15 bits
_LO_BINS = 1 << 16
_SMALL = 1 << 16  # below this many elements torch.kthvalue is already fast


def check_density(density: float, name: str = "density") -> float:
    d = float(density)
    if not (0.0 < d <= 1.0) or math.isnan(d):
        raise ParameterError(f"{name} must be in (0, 1], got {density!r}")
    return d


RESCALES = (True, False, "l1")


def check_rescale(rescale, name: str = "rescale") -> bool | str:
    """True (divide by the keep probability, the papers), False, or "l1" (one factor per tensor, mergekit)."""
    if isinstance(rescale, bool):
        return rescale
    if rescale == "l1":
        return "l1"
    raise ParameterError(f"{name} must be True, False or 'l1', got {rescale!r}")


def l1_rescale_factor(masked: torch.Tensor, delta: torch.Tensor, eps: float = 1e-7) -> torch.Tensor | None:
    """||delta||_1 / ||masked||_1 as a float32 scalar tensor, or None when either norm is below eps
    (mergekit 0.1.5's `rescaled_masked_tensor` with `RescaleNorm.l1` then leaves the survivors unscaled)."""
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < eps or after < eps:
        return None
    return before / after


def rescale_l1(masked: torch.Tensor, delta: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Survivors times ||delta||_1 / ||masked||_1, so the result keeps delta's L1 norm (in place on `masked`)."""
    factor = l1_rescale_factor(masked, delta, eps)
    return masked if factor is None else masked.mul_(factor)


def keep_count(numel: int, density: float) -> int:
    """How many entries a density keeps: floor(density * n) as mergekit does, at least one.

    The 1e-9 slack stops float noise (0.29 * 100 = 28.999...) from losing an entry.
    """
    return max(1, min(numel, math.floor(density * numel + 1e-9)))


def _abs_bits(x: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of |x| (float32): their integer order is the order of |x|."""
    x = x.detach().to(torch.float32).contiguous().reshape(-1)
    return x.view(torch.int32).bitwise_and(0x7FFFFFFF)


def _bits_to_float(bits: int) -> float:
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def _bin_holding_kth(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Index of the histogram bin holding the k-th largest item, and how many items lie above it."""
    from_top = hist.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype)).item())
    above = int(from_top[j - 1].item()) if j > 0 else 0
    return hist.numel() - 1 - j, above


class MagnitudeSelector:
    """Exact k-th largest |x| over a stream of tensors, in two streaming passes.

    Radix select on float32 bit patterns: pass 1 histograms the high 16 bits of
    |x| over every tensor; that fixes the bin holding the k-th largest value and
    how many values lie above it. Pass 2 histograms the low 16 bits of the
    values inside that bin, which pins the exact value. Memory: two small
    histograms, whatever the model size; nothing is ever concatenated.

        sel = MagnitudeSelector(k)
        for t in stream(): sel.observe(t)        # pass 1
        for t in stream(): sel.refine(t)         # pass 2
        sel.value                                # exact k-th largest |x|
    """

    def __init__(self, k: int | None = None, *, density: float | None = None):
        if (k is None) == (density is None):
            raise ParameterError("MagnitudeSelector: give exactly one of k or density")
        self.k = k
        self.density = None if density is None else check_density(density)
        self.numel = 0
        self._hist_hi = torch.zeros(_HI_BINS, dtype=torch.int64)
        self._hist_lo: torch.Tensor | None = None
        self._bin: int | None = None
        self._above = 0

    def observe(self, x: torch.Tensor) -> None:
        if self._hist_lo is not None:
            raise RuntimeError("MagnitudeSelector.observe after refine: pass 1 is over")
        bits = _abs_bits(x)
        self.numel += bits.numel()
        self._hist_hi += torch.bincount(bits.bitwise_right_shift_(16), minlength=_HI_BINS).cpu()

    def _target(self) -> int:
        if self.numel == 0:
            raise ParameterError("MagnitudeSelector: no values observed")
        k = self.k if self.k is not None else keep_count(self.numel, self.density)
        if not 1 <= k <= self.numel:
            raise ParameterError(f"k must be in [1, {self.numel}], got {k}")
        return k

    def refine(self, x: torch.Tensor) -> None:
        if self._hist_lo is None:
            self._bin, self._above = _bin_holding_kth(self._hist_hi, self._target())
            self._hist_lo = torch.zeros(_LO_BINS, dtype=torch.int64)
        key = _abs_bits(x).sub_(self._bin << 16).clamp_(-1, _LO_BINS).add_(1)
        self._hist_lo += torch.bincount(key, minlength=_LO_BINS + 2)[1:-1].cpu()

    @property
    def value(self) -> float:
        if self._hist_lo is None:
            raise RuntimeError("MagnitudeSelector.value before the refine pass")
        lo, _ = _bin_holding_kth(self._hist_lo, self._target() - self._above)
        return _bits_to_float((self._bin << 16) | lo)


def kth_largest_abs(x: torch.Tensor, k: int) -> float:
    """Exact k-th largest |x| (k = 1 is the max), O(n), no sort."""
    n = x.numel()
    if not 1 <= k <= n:
        raise ParameterError(f"k must be in [1, {n}], got {k}")
    if n <= _SMALL:
        return torch.kthvalue(x.detach().reshape(-1).abs().float().cpu(), n - k + 1).values.item()
    sel = MagnitudeSelector(k)
    sel.observe(x)
    sel.refine(x)
    return sel.value


def global_magnitude_threshold(stream: Callable[[], Iterable[torch.Tensor]], density: float) -> float:
    """The k-th largest |x| over every tensor `stream()` yields, k = floor(density * total).

    `stream` is called twice (radix select needs two passes) and must yield the
    same tensors both times, e.g. `lambda: (tv[k] for k in tv.keys())`. This is
    the paper's TIES trim scope: one threshold for the whole task vector.
    """
    sel = MagnitudeSelector(density=density)
    for t in stream():
        sel.observe(t)
    for t in stream():
        sel.refine(t)
    return sel.value


def _keep_at_least(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """x where |x| >= threshold, else 0 (fresh float32 tensor)."""
    x = x.to(torch.float32)
    if threshold <= 0:
        return x.clone()
    below = torch.nextafter(torch.tensor(threshold, dtype=torch.float32), torch.tensor(0.0)).item()
    return F.hardshrink(x, below)  # keeps |x| > below, i.e. |x| >= threshold


def trim_topk(delta: torch.Tensor, density: float, *, threshold: float | None = None) -> torch.Tensor:
    """TIES step 1 (trim): keep the top-`density` fraction of entries by |delta|, zero the rest.

    k = floor(density * numel) (at least 1); the k-th largest magnitude is found
    exactly without sorting, and every entry with |delta| >= it survives, so
    entries tied with the k-th largest are all kept (mergekit's argsort breaks
    such ties arbitrarily; bf16 deltas do repeat values). With `threshold`
    (the global trim scope, see `global_magnitude_threshold`) the rule is
    simply |delta| >= threshold and `density` is only checked.
    Returns a new float32 tensor; `delta` is not modified.
    """
    density = check_density(density)
    if threshold is not None:
        return _keep_at_least(delta, float(threshold))
    if density >= 1.0 or delta.numel() == 0:
        return delta.to(torch.float32).clone()
    thr = kth_largest_abs(delta, keep_count(delta.numel(), density))
    return _keep_at_least(delta, thr)


def trim_breadcrumbs(delta: torch.Tensor, density: float, gamma: float = 0.01) -> torch.Tensor:
    """Model Breadcrumbs mask (Davari & Belilovsky 2023): drop the largest `gamma`
    fraction (outliers) and the smallest entries, keeping `density` of them.

    Counts follow mergekit's `magnitude_outliers`: n_top = floor(gamma * n),
    keep = floor(density * n), and when keep + n_top > n fewer outliers are cut.
    """
    density = check_density(density)
    g = float(gamma)
    if not (0.0 <= g < 1.0):
        raise ParameterError(f"gamma must be in [0, 1), got {gamma!r}")
    n = delta.numel()
    if n == 0 or density >= 1.0:
        return delta.to(torch.float32).clone()
    keep = keep_count(n, density)
    n_top = min(math.floor(g * n + 1e-9), n - keep)
    low = _keep_at_least(delta, kth_largest_abs(delta, n_top + keep))
    if n_top == 0:
        return low
    return low.sub_(_keep_at_least(delta, kth_largest_abs(delta, n_top)))


def della_magprune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    *,
    rescale: bool | str = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA MagPrune (Deep et al. 2024): drop entries at random, larger ones less often.

    Within each row (last dimension) entries are ranked by |delta|; rank r of
    m maps to keep probability p_r = density - epsilon + 2 epsilon r/(m-1)
    (smallest kept with density - epsilon, largest with density + epsilon).
    rescale: True divides survivors by their own p_r (the paper), so E[result] = delta;
    "l1" multiplies all survivors of the tensor by ||delta||_1 / ||survivors||_1
    (mergekit 0.1.5's `rescale: true`); False leaves them.
    As in mergekit, density >= 1 returns delta, and density +- epsilon must lie in (0, 1).
    """
    density = check_density(density)
    mode = check_rescale(rescale)
    eps = float(epsilon)
    if density >= 1.0 or delta.numel() == 0:
        return delta.to(torch.float32).clone()
    if not (0.0 <= eps and density - eps > 0.0 and density + eps < 1.0):
        raise ParameterError(f"epsilon must keep density +- epsilon inside (0, 1); density={density}, epsilon={epsilon!r}")
    x = delta.to(torch.float32)
    rows = x.reshape(1, -1) if x.dim() < 2 else x.reshape(-1, x.shape[-1])
    m = rows.shape[1]
    order = rows.abs().argsort(dim=1)  # ranks are the method's definition: one sort per row, no way around it
    ranks = torch.empty_like(rows)
    ranks.scatter_(1, order, torch.arange(m, dtype=torch.float32, device=x.device).expand_as(rows))
    keep_prob = ranks.mul_(2 * eps / max(m - 1, 1)).add_(density - eps)
    u = torch.rand(rows.shape, generator=generator, dtype=torch.float32).to(x.device)
    kept = u.lt_(keep_prob)  # float 0/1: kept with probability keep_prob
    if mode == "l1":
        return rescale_l1(rows.mul(kept), rows).reshape(x.shape)
    if mode:
        kept.div_(keep_prob)
    return rows.mul(kept).reshape(x.shape)
