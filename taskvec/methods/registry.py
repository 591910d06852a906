"""The method registry: every merge method by name, with its parameters described.

A `MergeMethod` knows whether it needs a base model, which parameters are
per-model (one value per fine-tuned model: weight, density, ...) and which are
global (lambda, normalize, t, ...), their defaults and valid ranges, and merges
one tensor at a time with `merge_tensor`, always in float32.

Parameter values may be given as
  * a scalar (one value for every model / the global value),
  * a list with one entry per model (per-model parameters only),
  * a callable f(tensor_name) -> value (per-layer schedules, name filters),
  * a mapping / Source / TaskVector looked up by tensor name (Fisher diagonals, Gram matrices);
list entries may themselves be callables or mappings.

`semantics` ("paper", the default, or "mergekit", which every mergekit YAML config
runs with) changes four things: where TIES-family weights enter (ties.py); what
DARE/DELLA's `rescale=True` means (paper: divide each survivor by its keep
probability; mergekit: one factor per tensor, ||tau||_1 / ||kept tau||_1, which is
also `rescale="l1"` under either semantics); whether model_stock clamps its
cosine to [0, 1] (paper) or extrapolates as mergekit does (model_stock.py); and
whether SCE falls back to equal coefficients on small task vectors as mergekit does (sce.py).

What `weight < 0` means, method by method:
  * linear: an extrapolation away from that model, sum_i w_i theta_i / sum_i w_i
    (the sum of the weights must not be 0 with normalize);
  * task_arithmetic, dare_linear, breadcrumbs, della_linear: negation of that task
    vector, theta_0 - |w| tau (EMTA's forgetting), in both semantics;
  * ties, dare_ties, breadcrumbs_ties, della (sign election): refused under "paper"
    semantics, where it would contradict the elected sign; under "mergekit" -|w| tau
    votes, and with normalize a warning says where the divisor flips it (ties.py);
  * fisher: scales that model's Fisher weight; slerp, model_stock, regmean, tsv_m, iso_c, iso_cts,
    consensus: no weights;
  * nuslerp (t = w_1 / (w_0 + w_1)), multislerp (barycentric weights): extrapolation, as in mergekit;
    karcher, nearswap, arcee_fusion, ram, ramplus_tl, sce: no weights.

Integer / bool tensors carry no task vector: `merge_tensor` returns a copy of the
base's (the first model's without a base), as whole-model `merge()` does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..errors import ParameterError, ShapeMismatchError
from .arithmetic import linear_average
from .dare import dare_drop, tensor_generator
from .model_stock import model_stock
from .ram import ram_merge, ramplus_scales
from .sce import sce_merge
from .selective import arcee_fusion, nearswap
from .slerp import slerp
from .spectral import consensus, iso_c, iso_cts, tsv_merge
from .spherical import karcher_mean, multislerp, nuslerp, nuslerp_t
from .sparsify import RESCALES, della_magprune, trim_breadcrumbs, trim_topk
from .statistics import FISHER_FLOORS, fisher_merge, fisher_norms, regmean_merge, transposed_names
from .ties import check_weight_signs, combine_deltas

_NO_DEFAULT = object()


@dataclass(frozen=True)
class Param:
    """One method parameter: its default, range and whether it is per-model."""

    name: str
    default: Any
    doc: str
    per_model: bool = False
    kind: str = "float"  # float | int | bool | choice | tensor
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    aliases: tuple[str, ...] = ()
    nullable: bool = False

    @property
    def required(self) -> bool:
        return self.default is _NO_DEFAULT

    def range_text(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(map(repr, self.choices))
        if self.low is None and self.high is None:
            return self.kind
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"

    def check(self, value: Any, where: str = "") -> Any:
        """Validate one concrete value; `where` says which model / tensor, for the message."""
        label = f"{self.name}{where}"
        if value is None:
            if self.nullable:
                return None
            raise ParameterError(f"{label}: a value is required ({self.doc})")
        if self.kind == "tensor":
            if not isinstance(value, torch.Tensor):
                raise ParameterError(f"{label} must be a tensor, got {type(value).__name__}")
            return value
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ParameterError(f"{label} must be true or false, got {value!r}")
            return value
        if self.kind == "choice":
            if value not in self.choices:
                raise ParameterError(f"{label} must be {self.range_text()}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParameterError(f"{label} must be a number, got {value!r}")
        if self.kind == "int":
            if int(value) != value:
                raise ParameterError(f"{label} must be an integer, got {value!r}")
            value = int(value)  # and in range, below
        v = float(value)
        bad = math.isnan(v)
        if self.low is not None:
            bad |= v <= self.low if self.low_open else v < self.low
        if self.high is not None:
            bad |= v >= self.high if self.high_open else v > self.high
        if bad:
            raise ParameterError(f"{label} must be in {self.range_text()}, got {value!r}")
        return value if self.kind == "int" else v


def _is_lookup(v: Any) -> bool:
    return not isinstance(v, (torch.Tensor, str, list, tuple)) and hasattr(v, "get") and hasattr(v, "__contains__")


def _is_deferred(v: Any) -> bool:
    """A value only known once the tensor name is: a callable or a by-name lookup."""
    return _is_lookup(v) or (callable(v) and not isinstance(v, torch.Tensor))


def resolve_value(v: Any, name: str) -> Any:
    """A parameter value for tensor `name`: call callables, look mappings up, pass the rest through."""
    if _is_lookup(v):
        if name in v:
            return v.get(name)
        module = name.removesuffix(".weight")  # per-layer statistics (Gram matrices) are keyed by module name
        return v.get(module) if module != name and module in v else None
    if callable(v) and not isinstance(v, torch.Tensor):
        return v(name)
    return v


@dataclass(frozen=True)
class _Shared:
    """A per-model parameter given as one callable / lookup for every model."""

    value: Any


Kernel = Callable[[torch.Tensor | None, list, str, dict], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: name, parameter specs and the per-tensor kernel.

    `merge_tensor(base, tensors, name=..., **params)` validates, resolves
    per-name values, computes in float32 and returns a new float32 tensor
    (integer / bool tensors: a copy of the base's); inputs are never modified.
    """

    name: str
    summary: str
    kernel: Kernel = field(repr=False)
    params: tuple[Param, ...] = ()
    needs_base: bool = True
    # a base, when given, enters the kernel (slerp's t = 0 end; nuslerp's / multislerp's origin)
    optional_base: bool = False
    # a mergekit config's base_model is merged as one more model (mergekit's base-ignoring `karcher`)
    base_as_model: bool = False
    min_models: int = 1
    max_models: int | None = None
    reference: str = ""
    # optional fused fast path on raw (stored-dtype) CPU tensors: (base, tensors, name, params, out_dtype)
    # -> Tensor in out_dtype, or None where it does not apply; must match `kernel` (tests compare them)
    fused: Callable[..., torch.Tensor | None] | None = field(default=None, repr=False)

    # --- describing -------------------------------------------------------------
    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    @property
    def per_model_params(self) -> list[str]:
        return [p.name for p in self.params if p.per_model]

    @property
    def global_params(self) -> list[str]:
        return [p.name for p in self.params if not p.per_model]

    @property
    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params if not p.required}

    def param(self, name: str) -> Param:
        for p in self.params:
            if name == p.name or name in p.aliases:
                return p
        raise ParameterError(f"{self.name} has no parameter {name!r}; its parameters: {', '.join(self.param_names) or 'none'}")

    def __repr__(self) -> str:
        role = "required" if self.needs_base else "optional (used when given)" if self.optional_base else "not used"
        lines = [f"MergeMethod {self.name!r}: {self.summary}", f"  base model: {role}"]
        for p in self.params:
            scope = "per-model" if p.per_model else "global"
            default = "required" if p.required else repr(p.default)
            lines.append(f"  {p.name:<12} {scope:<9} default {default:<8} {p.range_text():<24} {p.doc}")
        if self.reference:
            lines.append(f"  reference: {self.reference}")
        return "\n".join(lines)

    # --- validating -------------------------------------------------------------
    def check_params(self, n_models: int, *, has_base: bool = True, **params) -> dict[str, Any]:
        """Canonical names, defaults filled in, every concrete value range-checked.

        Callables and by-name lookups are checked later, per tensor. Raises
        ParameterError naming the parameter at fault.
        """
        if n_models < 1:
            raise ParameterError(f"models: {self.name} needs at least one model, got an empty list")
        if n_models < self.min_models:
            raise ParameterError(f"models: {self.name} needs at least {self.min_models} models, got {n_models}")
        if self.max_models is not None and n_models > self.max_models:
            raise ParameterError(f"models: {self.name} takes at most {self.max_models} models, got {n_models}")
        if self.needs_base and not has_base:
            raise ParameterError(f"base: {self.name} needs a base model")
        out: dict[str, Any] = {}
        for key, value in params.items():
            spec = self.param(key)
            if spec.name in out:
                raise ParameterError(f"{spec.name} given twice (as {key!r} and another alias)")
            out[spec.name] = self._check_form(spec, value, n_models)
        for spec in self.params:
            if spec.name not in out:
                if spec.required:
                    raise ParameterError(f"{spec.name}: {self.name} needs it ({spec.doc})")
                out[spec.name] = [spec.default] * n_models if spec.per_model else spec.default
        return self._whole_model_statistics(out)

    def _whole_model_statistics(self, out: dict[str, Any]) -> dict[str, Any]:
        """Parameters that need every tensor of a model, computed once before the tensor loop:
        Fisher merging's per-model norms, RegMean's set of transposed (Conv1D) weights."""
        if self.name == "fisher" and out["normalize"] and all(v is None for v in out["fisher_norm"]):
            if isinstance(out["fisher"], _Shared):
                raise ParameterError("fisher: normalize=True needs one whole Fisher mapping per model "
                                     "(or fisher_norm); pass normalize=False")
            out["fisher_norm"] = fisher_norms(out["fisher"])
        if self.name == "regmean" and out["transposed"] is None:
            names = transposed_names([] if isinstance(out["gram"], _Shared) else out["gram"])
            out["transposed"] = lambda name: name in names  # deferred: `resolve` asks per tensor
        return out

    @staticmethod
    def _resolve_shared(spec: Param, value: Any, name: str, n: int) -> list:
        """One callable/lookup for all models: it may answer one value (shared) or a list, one per model."""
        v = resolve_value(value, name)
        if isinstance(v, (list, tuple)):
            if len(v) != n:
                raise ParameterError(f"{spec.name} (tensor {name!r}): got {len(v)} values for {n} models")
            return [spec.check(x, f" (model {i}, tensor {name!r})") for i, x in enumerate(v)]
        return [spec.check(v, f" (tensor {name!r})")] * n

    def _check_form(self, spec: Param, value: Any, n: int) -> Any:
        if spec.per_model:
            if isinstance(value, (list, tuple)):
                if len(value) != n:
                    raise ParameterError(f"{spec.name}: got {len(value)} values for {n} models")
                return [v if _is_deferred(v) else spec.check(v, f" (model {i})") for i, v in enumerate(value)]
            return _Shared(value) if _is_deferred(value) else [spec.check(value)] * n
        if _is_deferred(value):
            return value
        if isinstance(value, (list, tuple)):
            raise ParameterError(
                f"{spec.name} is global (one value for all models), got a list; "
                "for per-layer values pass a callable f(tensor_name) -> value"
            )
        return spec.check(value)

    def resolve(self, checked: dict[str, Any], name: str, n_models: int) -> dict[str, Any]:
        """Concrete, validated values for tensor `name` from `check_params` output."""
        out = {}
        for spec in self.params:
            v = checked[spec.name]
            where = f" (tensor {name!r})"
            if spec.per_model and isinstance(v, _Shared):
                out[spec.name] = self._resolve_shared(spec, v.value, name, n_models)
            elif spec.per_model:
                out[spec.name] = [
                    spec.check(resolve_value(x, name), f" (model {i}, tensor {name!r})") if _is_deferred(x) else x
                    for i, x in enumerate(v)
                ]
            else:
                out[spec.name] = spec.check(resolve_value(v, name), where) if _is_deferred(v) else v
        return out

    # --- merging ----------------------------------------------------------------
    def merge_tensor(
        self, base: torch.Tensor | None, tensors: Sequence[torch.Tensor], *, name: str = "<tensor>", **params
    ) -> torch.Tensor:
        checked = self.check_params(len(tensors), has_base=base is not None, **params)
        return self.merge_checked(base, tensors, name=name, checked=checked)

    def merge_checked(
        self, base: torch.Tensor | None, tensors: Sequence[torch.Tensor], *, name: str, checked: dict[str, Any]
    ) -> torch.Tensor:
        """`merge_tensor` with parameters already through `check_params` (the whole-model loop uses this).

        Integer / bool tensors carry no task vector: as in `taskvec.merging.merge`, the base's copy
        (the first model's without a base) is returned unchanged; a float/non-float mix is an error.
        """
        ref = base if base is not None else tensors[0]
        for i, t in enumerate(tensors):
            if t.shape != ref.shape:
                raise ParameterError(f"tensor {name!r}: model {i} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        floats = [t.is_floating_point() for t in ([base] if base is not None else []) + list(tensors)]
        if not all(floats):
            if any(floats):
                dtypes = ", ".join(str(t.dtype) for t in ([base] if base is not None else []) + list(tensors))
                raise ShapeMismatchError(f"tensor {name!r}: float and non-float dtypes mixed ({dtypes}); "
                                         "only floating-point tensors can be merged")
            return ref.clone()  # an integer buffer (e.g. position_ids): copied, never averaged
        p = self.resolve(checked, name, len(tensors))
        return self._run_kernel(base, tensors, name, p)

    def merge_fast(
        self, base: torch.Tensor | None, tensors: Sequence[torch.Tensor], *, name: str, checked: dict[str, Any],
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """Merge raw (stored-dtype) tensors straight to `out_dtype`: the fused kernel when it
        applies, else the float32 kernel. Shapes must already agree (merge() checks them)."""
        p = self.resolve(checked, name, len(tensors))
        if self.fused is not None and (base is not None or not self.needs_base):
            out = self.fused(base, list(tensors), name, p, out_dtype)
            if out is not None:
                return out
        return self._run_kernel(base, tensors, name, p).to(out_dtype)

    def _run_kernel(self, base, tensors, name, p) -> torch.Tensor:
        b = None if base is None else base.to(torch.float32)
        ts = [t.to(torch.float32) for t in tensors]
        out = self.kernel(b, ts, name, p)
        # a kernel may return one of its (float32) inputs unchanged: never hand back an alias
        if any(out is x for x in ts) or (b is not None and out is b):
            out = out.clone()
        return out


# ---------------------------------------------------------------------------------
# Kernels. Each gets float32 base (or None), float32 tensors, the tensor name and
# resolved params; none mutates its inputs.

def _lam(p: dict) -> float:
    return p["lambda"]


def _drop_rates(p: dict) -> list[float]:
    """DARE's drop rate per model: `p`, or 1 - `density` (mergekit's spelling), default 0.9."""
    out = []
    for i, (drop, density) in enumerate(zip(p["p"], p["density"])):
        if drop is not None and density is not None:
            raise ParameterError(f"p and density (model {i}): give the drop rate p or the keep rate density, not both")
        out.append(drop if drop is not None else (1.0 - density if density is not None else 0.9))
    return out


def _rescale_mode(p: dict) -> bool | str:
    """What DARE/DELLA's `rescale` means here: True is the paper's 1/keep-probability, except under
    semantics="mergekit", where mergekit's `rescale: true` is one L1-matching factor per tensor."""
    r = p["rescale"]
    if r == "l1" or (bool(r) and p["semantics"] == "mergekit"):
        return "l1"
    return bool(r)


def _gta_kernel(sparsifier: str | None, consensus: bool, normalize_default: dict[str, bool]) -> Kernel:
    """Generalised task arithmetic: sparsify each tau_i, optionally elect signs, combine, scale, add to base."""

    def kernel(base, tensors, name, p):
        semantics = p["semantics"]
        n = len(tensors)
        stacked = torch.empty((n, *base.shape), dtype=torch.float32, device=base.device)
        drops = _drop_rates(p) if sparsifier == "random" else None
        for i, t in enumerate(tensors):
            delta = torch.sub(t, base, out=stacked[i])
            if sparsifier == "magnitude":
                threshold = p["threshold"][i]
                if p["trim_scope"] == "global" and threshold is None:
                    raise ParameterError(
                        "threshold: trim_scope='global' needs each model's whole-task-vector threshold "
                        "(taskvec.merging.merge computes it; or use methods.global_magnitude_threshold)"
                    )
                stacked[i] = trim_topk(delta, p["density"][i], threshold=threshold if p["trim_scope"] == "global" else None)
            elif sparsifier == "random":
                stacked[i] = dare_drop(delta, drops[i], rescale=_rescale_mode(p),
                                       generator=tensor_generator(p["seed"] + i, name))
            elif sparsifier == "breadcrumbs":
                stacked[i] = trim_breadcrumbs(delta, p["density"][i], p["gamma"][i])
            elif sparsifier == "della":
                g = tensor_generator(p["seed"] + i, name)
                stacked[i] = della_magprune(delta, p["density"][i], p["epsilon"][i], rescale=_rescale_mode(p),
                                            generator=g)
        normalize = p["normalize"] if p["normalize"] is not None else normalize_default[semantics]
        merged = combine_deltas(
            stacked,
            p["weight"],
            consensus=p["consensus"] if consensus else None,
            normalize=normalize,
            semantics=semantics,
        )
        return merged.mul_(_lam(p)).add_(base)

    return kernel


def _linear(base, tensors, name, p):
    return linear_average(tensors, p["weight"], normalize=p["normalize"])


def _linear_fused(base, tensors, name, p, out_dtype):
    from . import fused as fz  # imports numba: only when a merge runs

    return fz.fused_linear(list(tensors), p["weight"], normalize=p["normalize"], out_dtype=out_dtype)


def _slerp(base, tensors, name, p):
    ends = ([base] if base is not None else []) + list(tensors)
    if len(ends) != 2:
        raise ParameterError(f"models: slerp interpolates exactly two models (base + one model, or two models), got {len(ends)}")
    return slerp(p["t"], ends[0], ends[1])


def _slerp_fused(base, tensors, name, p, out_dtype):
    from . import fused as fz  # imports numba: only when a merge runs

    ends = ([base] if base is not None else []) + list(tensors)
    return fz.fused_slerp(ends[0], ends[1], p["t"], out_dtype=out_dtype) if len(ends) == 2 else None


def _model_stock(base, tensors, name, p):
    return model_stock(base, tensors, filter_wise=p["filter_wise"], clamp=p["semantics"] == "paper")


def _model_stock_fused(base, tensors, name, p, out_dtype):
    from . import fused as fz  # imports numba: only when a merge runs

    if p["filter_wise"]:
        return None  # one angle per row: the torch path
    return fz.fused_model_stock(base, list(tensors), clamp=p["semantics"] == "paper", out_dtype=out_dtype)


def _fisher(base, tensors, name, p):
    fishers = p["fisher"]
    if all(f is None for f in fishers):  # no statistics for this tensor (e.g. a frozen one): plain average
        return linear_average(tensors, p["weight"])
    if any(f is None for f in fishers):
        missing = [i for i, f in enumerate(fishers) if f is None]
        raise ParameterError(f"fisher: tensor {name!r} has a Fisher diagonal for some models but not models {missing}")
    return fisher_merge(tensors, fishers, eps=p["eps"], weights=p["weight"], floor=p["floor"],
                        norms=p["fisher_norm"] if p["normalize"] else None)


def _regmean(base, tensors, name, p):
    grams = p["gram"]
    if all(g is None for g in grams) or tensors[0].dim() != 2:
        return linear_average(tensors)  # RegMean merges linear weights; everything else is averaged
    if any(g is None for g in grams):
        missing = [i for i, g in enumerate(grams) if g is None]
        raise ParameterError(f"gram: tensor {name!r} has a Gram matrix for some models but not models {missing}")
    return regmean_merge(tensors, grams, alpha=p["alpha"], transposed=bool(p["transposed"]))


def _spectral_kernel(merge_matrices: Callable[[list, dict], torch.Tensor]) -> Kernel:
    """SVD merges (spectral.py): matrices through `merge_matrices`, other tensors the mean of tau; base + lambda Delta."""

    def kernel(base, tensors, name, p):
        deltas = [t - base for t in tensors]
        matrix = deltas[0].dim() == 2 and min(deltas[0].shape) > 0
        if matrix and not p["svd_embeddings"]:
            from ..analysis.naming import module_type  # lazy: taskvec.analysis imports methods

            matrix = module_type(name) != "embedding"
        delta = merge_matrices(deltas, p) if matrix else torch.stack(deltas).mean(dim=0)
        return delta.mul_(_lam(p)).add_(base)

    return kernel


def _consensus(base, tensors, name, p):
    return consensus([t - base for t in tensors], p["k"], p["mask_lambda"]).mul_(_lam(p)).add_(base)


def _passthrough(base, tensors, name, p):
    return tensors[0].clone()


def _nuslerp(base, tensors, name, p):
    t = nuslerp_t(p["weight"])
    kw = dict(row_wise=p["nuslerp_row_wise"], flatten=p["nuslerp_flatten"])
    if base is None:
        return nuslerp(t, tensors[0], tensors[1], **kw)
    return nuslerp(t, tensors[0] - base, tensors[1] - base, **kw).add_(base)


def _multislerp(base, tensors, name, p):
    return multislerp(tensors, p["weight"], base, normalize_weights=p["normalize_weights"], eps=p["eps"], name=name)


def _karcher(base, tensors, name, p):
    return karcher_mean(tensors, max_iter=p["max_iter"], tol=p["tol"])


def _nearswap(base, tensors, name, p):
    return nearswap(base, tensors[0], p["t"])


def _nearswap_fused(base, tensors, name, p, out_dtype):
    from . import fused as fz  # imports numba: only when a merge runs

    return fz.fused_nearswap(base, tensors[0], p["t"], out_dtype=out_dtype)


def _arcee_fusion(base, tensors, name, p):
    return arcee_fusion(base, tensors[0])


def _stacked_deltas(base, tensors):
    return torch.stack([t - base for t in tensors], dim=0)


def _ram(base, tensors, name, p):
    return base + ram_merge(_stacked_deltas(base, tensors), p["epsilon"])


def _ramplus_tl(base, tensors, name, p):
    deltas = _stacked_deltas(base, tensors)
    scales = ramplus_scales(deltas, p["epsilon"], r=p["r"], alpha=p["alpha"])
    return base + ram_merge(deltas, p["epsilon"], scales=scales)


def _ram_fused(base, tensors, name, p, out_dtype):
    from . import fused as fz  # imports numba: only when a merge runs

    return fz.fused_ram(base, tensors, p["epsilon"], out_dtype=out_dtype)


def _ramplus_tl_fused(base, tensors, name, p, out_dtype):
    from . import fused as fz  # imports numba: only when a merge runs

    return fz.fused_ram(base, tensors, p["epsilon"], plus=(p["r"], p["alpha"]), out_dtype=out_dtype)


def _sce(base, tensors, name, p):
    return base + sce_merge(_stacked_deltas(base, tensors), p["select_topk"], p["semantics"])


# ---------------------------------------------------------------------------------
# Parameter specs shared by several methods.

def _weight(default=1.0):
    return Param("weight", default, "scale of this model's contribution", per_model=True, aliases=("weights",))


LAMBDA = Param("lambda", 1.0, "scale of the merged task vector (EMTA's lambda)", aliases=("lambda_", "lam", "scaling_coef"))
SEMANTICS = Param(
    "semantics", "paper", "where weights enter TIES / what normalize divides by (see ties.py)",
    kind="choice", choices=("paper", "mergekit"),
)
CONSENSUS = Param(
    "consensus", "mass", "sign election: total mass (paper) or majority count",
    kind="choice", choices=("mass", "count", "sum"), aliases=("consensus_method",),
)
INT8_MASK = Param("int8_mask", False, "accepted for mergekit configs; no effect (masks are float here)", kind="bool")
SEED = Param("seed", 0, "random seed; each tensor's draws come from (seed + model index, tensor name)", kind="int")
RESCALE = Param(
    "rescale", True, "True: divide survivors by their keep probability (paper; under semantics='mergekit' one "
    "L1-matching factor per tensor, as mergekit); 'l1': always the L1 factor; False: no rescale",
    kind="choice", choices=RESCALES,
)


def _density(default, *, nullable=False):
    return Param(
        "density", default, "fraction of task-vector entries kept", per_model=True,
        low=0.0, high=1.0, low_open=True, nullable=nullable,
    )


def _normalize(default, doc="divide by the number (paper) / weight (mergekit) of agreeing models"):
    return Param("normalize", default, doc, kind="bool", nullable=default is None)


def _gta_fused(sparsifier: str | None, consensus: bool, normalize_default: dict[str, bool]):
    """The fused (numba) version of `_gta_kernel`: magnitude trim, DARE, or no sparsification."""
    if sparsifier not in (None, "magnitude", "random"):
        return None

    def fused(base, tensors, name, p, out_dtype):
        from . import fused as fz  # imports numba: only when a merge runs, not with taskvec.methods

        if not fz.AVAILABLE:
            return None
        semantics = p["semantics"]
        normalize = p["normalize"] if p["normalize"] is not None else normalize_default[semantics]
        densities = thresholds = None
        if sparsifier == "magnitude":
            if p["trim_scope"] == "global":
                thresholds = p["threshold"]
                if any(t is None for t in thresholds):
                    return None  # the torch path raises the explanatory error
            else:
                densities = p["density"]
        dare = None
        if sparsifier == "random":  # same generators, same draws as the torch kernel's dare_drop
            dare = (_drop_rates(p), _rescale_mode(p), [tensor_generator(p["seed"] + i, name) for i in range(len(tensors))])
        check_weight_signs(p["weight"], consensus=p["consensus"] if consensus else None, semantics=semantics,
                           normalize=normalize)  # before the fused kernel, as combine_deltas does
        mode = fz.MODE_SUM if not consensus else (fz.MODE_PAPER if semantics == "paper" else fz.MODE_MERGEKIT)
        return fz.fused_task_arithmetic(
            base, tensors, densities=densities, thresholds=thresholds, weights=p["weight"], lam=_lam(p), mode=mode,
            count_vote=consensus and p["consensus"] == "count", normalize=normalize, out_dtype=out_dtype, dare=dare,
        )

    return fused


def _gta(name, summary, sparsifier, consensus, normalize_default, extra, reference):
    params = [_weight(), *extra, LAMBDA]
    if consensus:
        params += [CONSENSUS]
    params += [_normalize(None), SEMANTICS, INT8_MASK]
    return MergeMethod(
        name=name,
        summary=summary,
        kernel=_gta_kernel(sparsifier, consensus, normalize_default),
        fused=_gta_fused(sparsifier, consensus, normalize_default),
        params=tuple(params),
        needs_base=True,
        reference=reference,
    )


SVD_EMBEDDINGS = Param(
    "svd_embeddings", True, "decompose 2-D embedding tables like other matrices (the reference code); "
    "False: average them like non-2-D tensors", kind="bool",
)

# per model, as mergekit 0.1.5's della/della_linear (ParameterScope.NON_BASE)
_EPSILON = Param("epsilon", 0.15, "keep probabilities span density +- epsilon", per_model=True, low=0.0, high=1.0,
                 high_open=True)

_DARE_PARAMS = (
    Param("p", None, "drop rate (DARE's p; default 0.9 when neither p nor density is given)", per_model=True,
          low=0.0, high=1.0, high_open=True, nullable=True, aliases=("drop_rate",)),
    _density(None, nullable=True),
    RESCALE,
    SEED,
)

_METHOD_LIST = [
    MergeMethod(
        "linear", "weighted average sum_i w_i theta_i / sum_i w_i", _linear,
        (_weight(), _normalize(True, "divide by the sum of the weights")),
        needs_base=False, reference="https://arxiv.org/abs/2203.05482", fused=_linear_fused,
    ),
    _gta("task_arithmetic", "theta_0 + lambda sum_i w_i tau_i", None, False,
         {"paper": False, "mergekit": False}, (), "https://arxiv.org/abs/2212.04089"),
    _gta("ties", "TIES: trim top-k |tau|, elect sign, disjoint mean", "magnitude", True,
         {"paper": True, "mergekit": True},
         (_density(0.2),
          Param("trim_scope", "tensor", "trim per tensor (mergekit) or over the whole task vector (paper)",
                kind="choice", choices=("tensor", "global")),
          Param("threshold", None, "global-trim magnitude threshold (computed by merge())", per_model=True,
                low=0.0, nullable=True)),
         "https://arxiv.org/abs/2306.01708"),
    _gta("dare_linear", "DARE drop + rescale, then task arithmetic", "random", False,
         {"paper": False, "mergekit": False}, _DARE_PARAMS, "https://arxiv.org/abs/2311.03099"),
    _gta("dare_ties", "DARE drop + rescale, then TIES sign election + disjoint merge", "random", True,
         {"paper": True, "mergekit": False}, _DARE_PARAMS, "https://arxiv.org/abs/2311.03099"),
    _gta("breadcrumbs", "drop the largest gamma and smallest entries, then task arithmetic", "breadcrumbs", False,
         {"paper": False, "mergekit": False},
         (_density(0.9), Param("gamma", 0.01, "fraction of largest entries (outliers) removed", per_model=True,
                               low=0.0, high=1.0, high_open=True)),
         "https://arxiv.org/abs/2312.06795"),
    _gta("breadcrumbs_ties", "breadcrumbs, then TIES sign election + disjoint merge", "breadcrumbs", True,
         {"paper": True, "mergekit": False},
         (_density(0.9), Param("gamma", 0.01, "fraction of largest entries (outliers) removed", per_model=True,
                               low=0.0, high=1.0, high_open=True)),
         "https://arxiv.org/abs/2312.06795"),
    _gta("della", "DELLA MagPrune (rank-based drop), then TIES sign election + disjoint merge", "della", True,
         {"paper": True, "mergekit": True},
         (_density(0.7), _EPSILON, RESCALE, SEED),
         "https://arxiv.org/abs/2406.11617"),
    _gta("della_linear", "DELLA MagPrune, then task arithmetic", "della", False,
         {"paper": False, "mergekit": False},
         (_density(0.7), _EPSILON, RESCALE, SEED),
         "https://arxiv.org/abs/2406.11617"),
    MergeMethod(
        "slerp", "spherical interpolation from the base (t=0) to the model (t=1)", _slerp,
        (Param("t", 0.5, "interpolation position", low=0.0, high=1.0),),
        needs_base=False, optional_base=True, max_models=2, fused=_slerp_fused,
    ),
    MergeMethod(
        "model_stock", "average pulled towards the base by the task-vector angle", _model_stock,
        (Param("filter_wise", False, "one angle per row instead of per tensor", kind="bool"),
         Param("semantics", "paper", "paper: cos clamped to [0, 1], so t stays in [0, 1]; mergekit: unclamped "
               "(t < 0 extrapolates for opposing task vectors), see model_stock.py",
               kind="choice", choices=("paper", "mergekit"))),
        needs_base=True, min_models=2, reference="https://arxiv.org/abs/2403.19522", fused=_model_stock_fused,
    ),
    MergeMethod(
        "fisher", "Fisher-weighted average sum F_i theta_i / sum F_i", _fisher,
        (Param("fisher", _NO_DEFAULT, "per-parameter Fisher diagonal (mapping name -> tensor)", per_model=True,
               kind="tensor", nullable=True, aliases=("fishers",)),
         _weight(),
         Param("eps", 1e-6, "floor on Fisher entries (see floor)", low=0.0, aliases=("fisher_floor",)),
         Param("floor", "target", "whose Fisher eps floors: the first (target) model's, as the reference code, "
               "or every model's", kind="choice", choices=FISHER_FLOORS),
         Param("normalize", True, "divide each model's weight by the L2 norm of its whole Fisher (reference "
               "default)", kind="bool", aliases=("normalize_fishers",)),
         Param("fisher_norm", None, "each model's whole-model Fisher norm; computed from fisher when normalize",
               per_model=True, nullable=True, low=0.0, low_open=True)),
        needs_base=False, reference="https://arxiv.org/abs/2111.09832",
    ),
    MergeMethod(
        "regmean", "RegMean: least-squares merge of linear layers from input Gram matrices", _regmean,
        (Param("gram", _NO_DEFAULT, "input Gram matrix X^T X per linear layer (mapping name -> tensor)",
               per_model=True, kind="tensor", nullable=True, aliases=("grams",)),
         Param("alpha", 0.9, "scale of the Gram off-diagonals", low=0.0, high=1.0),
         Param("transposed", None, "weights stored [in, out] (GPT-2 Conv1D); default: the Gram mappings' "
               ".transposed", kind="bool", nullable=True)),
        needs_base=False, reference="https://arxiv.org/abs/2212.09849",
    ),
    MergeMethod(
        "tsv_m", "TSV-M: each task's top r/T singular triplets, decorrelated (polar factors of U, V)",
        _spectral_kernel(lambda deltas, p: tsv_merge(deltas)), (LAMBDA, SVD_EMBEDDINGS),
        needs_base=True, reference="https://arxiv.org/abs/2412.00081",
    ),
    MergeMethod(
        "iso_c", "Iso-C: SVD of sum_t tau_t with every singular value set to their mean",
        _spectral_kernel(lambda deltas, p: iso_c(deltas)), (LAMBDA, SVD_EMBEDDINGS),
        needs_base=True, reference="https://arxiv.org/abs/2502.04959",
    ),
    MergeMethod(
        "iso_cts", "Iso-CTS: common subspace of sum_t tau_t + task-specific directions, isotropic spectrum",
        _spectral_kernel(lambda deltas, p: iso_cts(deltas, p["common_space_fraction"])),
        (Param("common_space_fraction", 0.8, "share of the rank kept for the common subspace of sum_t tau_t",
               low=0.0, high=1.0),
         LAMBDA, SVD_EMBEDDINGS),
        needs_base=True, reference="https://arxiv.org/abs/2502.04959",
    ),
    MergeMethod(
        "consensus", "Consensus (TALL masks): sum_t tau_t where at least k tasks' masks keep the weight",
        _consensus,
        (Param("k", 2, "keep weights that at least k tasks' TALL masks select", kind="int", low=0),
         Param("mask_lambda", 0.6, "TALL mask threshold: |tau_t| >= lambda |tau_MTL - tau_t|", per_model=True,
               low=0.0, aliases=("tall_mask_lambda",)),
         LAMBDA),
        needs_base=True, reference="https://arxiv.org/abs/2405.07813",
    ),
    MergeMethod(
        "nuslerp", "NuSLERP: slerp with t = w_1 / (w_0 + w_1), of the task vectors when a base is given",
        _nuslerp,
        (_weight(),
         Param("nuslerp_flatten", True, "interpolate the whole tensor as one vector; false: row by row", kind="bool"),
         Param("nuslerp_row_wise", False, "with nuslerp_flatten false: interpolate along dimension 0 (columns) "
               "instead of the last dimension (rows)", kind="bool")),
        needs_base=False, optional_base=True, min_models=2, max_models=2,
        reference="https://github.com/arcee-ai/mergekit (mergekit's nuslerp)",
    ),
    MergeMethod(
        "multislerp", "Multi-SLERP: barycentric interpolation of N models on the sphere (around the base if given)",
        _multislerp,
        (_weight(),
         Param("normalize_weights", True, "divide the weights by their sum", kind="bool"),
         Param("eps", 1e-8, "numerical floor added to norms", low=0.0, low_open=True)),
        needs_base=False, optional_base=True, reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    ),
    MergeMethod(
        "karcher", "Karcher mean: Riemannian mean of the directions on the sphere, times the mean norm", _karcher,
        (Param("max_iter", 10, "fixed-point iterations at most", kind="int", low=0),
         Param("tol", 1e-5, "stop when the tangent step is shorter; smaller norms count as zero", low=0.0)),
        needs_base=False, base_as_model=True, reference="https://arxiv.org/abs/2603.04972",
    ),
    MergeMethod(
        "nearswap", "NearSwap: move base entries to the model's by at most t (all the way when closer)",
        _nearswap,
        (Param("t", _NO_DEFAULT, "distance below which the model's value is taken outright", low=0.0),),
        needs_base=True, max_models=1, reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        fused=_nearswap_fused,
    ),
    MergeMethod(
        "arcee_fusion", "Arcee Fusion: keep the model's changes whose |delta| x KL importance is an outlier",
        _arcee_fusion, (), needs_base=True, max_models=1, reference="https://arcee.ai",
    ),
    MergeMethod(
        "ram", "RAM: keep updates only one model makes, average shared ones", _ram,
        (Param("epsilon", 1e-5, "|tau| above this counts as an update", low=0.0),),
        needs_base=True, reference="https://arxiv.org/abs/2601.13572", fused=_ram_fused,
    ),
    MergeMethod(
        "ramplus_tl", "RAM+ (tensor-local): RAM with each model's unique updates scaled by its overlap",
        _ramplus_tl,
        (Param("r", 0.1, "strength of the unique-update rescaling", low=0.0),
         Param("alpha", 0.2, "cap on the overlap ratio rho", low=0.0),
         Param("epsilon", 1e-5, "|tau| above this counts as an update", low=0.0)),
        needs_base=True, reference="https://arxiv.org/abs/2601.13572", fused=_ramplus_tl_fused,
    ),
    MergeMethod(
        "sce", "SCE: select high-variance entries, weight models by energy, erase minority signs", _sce,
        (Param("select_topk", 1.0, "fraction of entries (by variance across models) kept", low=0.0, high=1.0,
               low_open=True),
         Param("semantics", "paper", "paper: coefficients always from the task vectors' energy; mergekit: equal "
               "coefficients when the mean squares sum below 1e-6, divisor floored at 1e-6 (sce.py)",
               kind="choice", choices=("paper", "mergekit")),
         INT8_MASK),
        needs_base=True, reference="https://arxiv.org/abs/2408.07990",
    ),
    MergeMethod(
        "passthrough", "copy one model's tensors (layer stacking: taskvec.merging.passthrough)", _passthrough,
        (), needs_base=False, max_models=1,
    ),
]

METHODS: dict[str, MergeMethod] = {m.name: m for m in _METHOD_LIST}


def get_method(name: str | MergeMethod) -> MergeMethod:
    """The registered method called `name` (a MergeMethod passes through)."""
    if isinstance(name, MergeMethod):
        return name
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ParameterError(f"method: unknown merge method {name!r}; known: {', '.join(METHODS)}") from None


def register(method: MergeMethod, *, replace: bool = False) -> MergeMethod:
    """Add a method to the registry (e.g. a research variant) so merge() and configs can name it."""
    if method.name in METHODS and not replace:
        raise ParameterError(f"method: {method.name!r} is already registered (pass replace=True)")
    METHODS[method.name] = method
    return method
