"""`taskvec warmup`: run the fused merges once on synthetic tensors so numba compiles (or caches) their kernels.

Its own module because it drives merges through the registry, and the registry loads `fused` lazily: kept in
`fused`, the two would import each other.
"""
from __future__ import annotations

import torch

from . import fused
from .registry import get_method


WARMUP_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp", "model_stock", "nearswap",
                  "ram", "ramplus_tl")
_REQUIRED = {"t": 0.01}  # values for parameters without a default (nearswap's t)


def warmup(methods=WARMUP_METHODS, n_models=(1, 2, 3), dtypes=(torch.bfloat16, torch.float32),
           semantics=("mergekit", "paper")) -> int:
    """Compile (or load from numba's cache) the kernels these merges use, on synthetic tensors, so the first real
    merge after installing pays no JIT: `taskvec warmup` runs it once. Kernels specialise on the input and output
    dtypes and the number of models (SLERP: two ends). Returns how many merges it ran."""
    if not fused.AVAILABLE:
        return 0
    background, fused.BACKGROUND_JIT = fused.BACKGROUND_JIT, False  # compile here, whatever TASKVEC_JIT says
    try:
        runs = _warm_all(methods, n_models, dtypes, semantics)
    finally:
        fused.BACKGROUND_JIT = background
    return runs


def _warm_all(methods, n_models, dtypes, semantics) -> int:
    runs = 0
    for name in methods:
        m = get_method(name)
        for dtype in dtypes:
            for n in (1,) if name == "slerp" else [n for n in n_models if m.min_models <= n <= (m.max_models or n)]:
                for sem in semantics if "semantics" in m.param_names else (None,):
                    g = torch.Generator().manual_seed(0)
                    sizes = (fused.FUSED_MIN, fused._BRACKET_MIN) if name == "ties" else (fused.FUSED_MIN,)  # both selections
                    for size in sizes:
                        base = torch.randn(size, generator=g).to(dtype)
                        ts = [(base.float() + torch.randn(size, generator=g)).to(dtype) for _ in range(n)]
                        params = {k: v for k, v in _REQUIRED.items() if k in m.param_names and m.param(k).required}
                        params.update({} if sem is None else {"semantics": sem})
                        if name.startswith("dare"):
                            params["rescale"] = True  # paper: 1/(1-p); mergekit: the L1 factor (its own kernel)
                        checked = m.check_params(n, has_base=True, **params)
                        fused.all_finite(base)  # the finiteness check's kernel, which merges also run
                        m.merge_fast(base, ts, name="warmup", checked=checked, out_dtype=dtype)
                        runs += 1
    return runs
