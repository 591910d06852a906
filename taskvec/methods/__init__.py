"""Editing and merging methods: one pure per-tensor function per step of each paper,
plus a registry so whole-model code (taskvec.merging.merge, YAML configs) looks
methods up by name.

    from taskvec.methods import trim_topk, elect_sign, disjoint_mean   # TIES, step by step
    get_method("ties")                                                 # prints its parameters
"""
from .arithmetic import analogy, linear_average, negate, task_arithmetic
from .dare import check_drop_rate, dare_drop, tensor_generator
from .model_stock import model_stock
from .ram import contribution_masks, ram_merge, ramplus_scales
from .registry import METHODS, MergeMethod, Param, get_method, register, resolve_value
from .sce import sce_coefficients, sce_erase, sce_merge, sce_select
from .selective import arcee_fusion, fusion_importance, fusion_threshold, nearswap
from .slerp import check_t, lerp, slerp
from .spectral import (
    check_fraction,
    consensus,
    iso_c,
    iso_cts,
    keep_rank,
    low_rank_approx,
    polar_factor,
    tall_masks,
    top_svd,
    tsv_merge,
)
from .spherical import karcher_initial_mean, karcher_mean, karcher_tangent, multislerp, nuslerp, nuslerp_t
from .sparsify import (
    MagnitudeSelector,
    check_density,
    della_magprune,
    global_magnitude_threshold,
    keep_count,
    kth_largest_abs,
    trim_breadcrumbs,
    trim_topk,
)
from .statistics import fisher_merge, fisher_norm, fisher_norms, regmean_merge, transposed_names
from .ties import agreement, combine_deltas, disjoint_mean, elect_sign


def ties_merge(base, tensors, *, density=0.2, lam=1.0, consensus="mass", weights=None):
    """TIES on one tensor, paper semantics: theta_0 + lam * disjoint_mean(trim(tau_i), elect_sign)."""
    return get_method("ties").merge_tensor(
        base, tensors, name="<tensor>", density=density, consensus=consensus,
        **{"lambda": lam}, **({} if weights is None else {"weight": weights}),
    )


__all__ = [
    "METHODS", "MagnitudeSelector", "MergeMethod", "Param", "agreement", "analogy", "check_density",
    "check_drop_rate", "check_fraction", "check_t", "consensus", "iso_c", "iso_cts", "keep_rank", "low_rank_approx",
    "polar_factor", "tall_masks", "top_svd", "tsv_merge", "combine_deltas", "dare_drop", "della_magprune", "disjoint_mean",
    "elect_sign", "fisher_merge", "fisher_norm", "fisher_norms", "get_method", "global_magnitude_threshold", "keep_count",
    "kth_largest_abs", "lerp", "linear_average", "model_stock", "negate", "regmean_merge", "register",
    "resolve_value", "slerp", "task_arithmetic", "tensor_generator", "ties_merge", "trim_breadcrumbs",
    "transposed_names", "trim_topk",
    # mergekit 0.1.5's other methods
    "arcee_fusion", "contribution_masks", "fusion_importance", "fusion_threshold", "karcher_initial_mean",
    "karcher_mean", "karcher_tangent", "multislerp", "nearswap", "nuslerp", "nuslerp_t", "ram_merge",
    "ramplus_scales", "sce_coefficients", "sce_erase", "sce_merge", "sce_select",
]
