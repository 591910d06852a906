"""Whole-model merging: stream every tensor through a method of `taskvec.methods`.

    merged = taskvec.merge(base, [ft_a, ft_b], "ties", density=0.2, **{"lambda": 1.0})
    taskvec.merge(base, [ft_a, ft_b], "dare_ties", p=0.9, out="merged/")     # sharded safetensors

One tensor at a time: a loader thread reads (and converts to float32) the
next tensor of every input while the current one is merged, and a writer
thread writes the previous result, so reading, computing and writing overlap.
Peak memory is a few copies of the largest tensor, never the whole model.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from taskvec._progress import progress as progress_bar
from taskvec.errors import CheckpointError, KeyMismatchError, ParameterError, ShapeMismatchError
from taskvec.io import ShardedWriter, Source, TensorMeta, open_source
from taskvec.io.sources import StateDictSource
from taskvec.methods import MagnitudeSelector, get_method

_FUSED = "taskvec.methods.fused"  # numba and its kernels: imported on first use (0.5 s+ that a run may not need)


def _fused():
    """The fused-kernel module, imported on first use (a background import started by `merge` may be under way)."""
    return importlib.import_module(_FUSED)


def _numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64,
}


def as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """torch dtype from a torch dtype or a name ('bfloat16', 'bf16', 'float16', ...)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.").lower()
    if name not in _DTYPES:
        raise ParameterError(f"dtype: unknown {dtype!r}; use one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[name]


def check_compatible(ref: Source, others: Sequence[Source], *, align_vocab: bool = False) -> None:
    """Every model holds the same float tensors (names, shapes) as `ref`.

    Integer / bool buffers (e.g. `position_ids`, which some saved checkpoints
    hold and a module's state dict may not) are copied from `ref`, so a model
    may lack them. With `align_vocab`, tensors whose first dimension alone
    differs (embedding / head rows of a resized vocabulary) are accepted; see `_align_rows`.
    """
    ka = ref.index
    for src in others:
        kb = src.index
        only_ref = [k for k, m in ka.items() if k not in kb and m.is_float]
        only_src = [k for k, m in kb.items() if k not in ka and m.is_float]
        if only_ref or only_src:
            parts = []
            if only_ref:
                parts.append(f"{len(only_ref)} only in {ref.name} (e.g. {only_ref[:3]})")
            if only_src:
                parts.append(f"{len(only_src)} only in {src.name} (e.g. {only_src[:3]})")
            raise KeyMismatchError("tensor names differ: " + "; ".join(parts))
        for k, m in ka.items():
            o = kb.get(k)
            if o is None:
                continue
            if m.is_float != o.is_float:
                raise ShapeMismatchError(f"{k!r}: dtype {m.dtype} in {ref.name} but {o.dtype} in {src.name}")
            if m.shape != o.shape and m.is_float:
                rows_only = len(m.shape) >= 1 and m.shape[1:] == o.shape[1:]
                if not (rows_only and align_vocab):
                    hint = " (a vocabulary-size mismatch? pass align_vocab=True)" if rows_only else ""
                    raise ShapeMismatchError(f"{k!r}: shape {m.shape} in {ref.name} but {o.shape} in {src.name}{hint}")


def _align_rows(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Rows beyond the reference's vocabulary are dropped; missing rows take the reference's values
    (so they carry no task vector)."""
    if t.shape == ref.shape:
        return t
    n = min(t.shape[0], ref.shape[0])
    out = ref.to(t.dtype, copy=True)
    out[:n] = t[:n]
    return out


def _load(src: Source, key: str, device: str) -> torch.Tensor:
    t = src.get(key)
    # float32 copy made here, in the loader thread: this is what reads the mmapped pages
    return t.to(device=device, dtype=torch.float32, copy=t.dtype == torch.float32 and device == "cpu")


def _check_inputs_finite(key: str, pairs: Sequence[tuple[Source, torch.Tensor | None]]) -> None:
    """A NaN or inf in an input would flow into the merge (or, dropped by DARE, hide): refuse, naming it."""
    for src, t in pairs:
        if t is not None and not _fused().all_finite(t):
            raise CheckpointError(f"{src.name}: tensor {key!r} contains NaN or inf; nothing was merged or written")


def _check_output_finite(key: str, result: torch.Tensor, method: str, float32_result: Callable[[], torch.Tensor]) -> None:
    """A non-finite merged tensor is an error: an overflow of the output dtype (the float32 merge is finite)
    names `dtype`; otherwise the method's parameters produced it from finite inputs."""
    if _fused().all_finite(result):
        return
    full = float32_result()
    if result.dtype != torch.float32 and _fused().all_finite(full):
        peak = float(full.abs().max())
        limit = torch.finfo(result.dtype).max
        raise ParameterError(f"dtype: tensor {key!r} of the {method} merge reaches |x| = {peak:.4g}, beyond "
                             f"{result.dtype}'s largest value {limit:.4g}; write float32 (dtype='float32') or "
                             "bfloat16, or check the merge parameters; nothing was written")
    raise ParameterError(f"tensor {key!r}: the {method} merge produced NaN or inf from finite inputs (check its "
                         "parameters, e.g. lambda and weight); nothing was written")


def tied_aliases(ref: Source, others: Sequence[Source], keys: Sequence[str]) -> dict[str, str]:
    """alias -> first name, for float tensors that are one tensor under two names (tied embeddings).

    Ties are seen in an in-memory reference (a live nn.Module's state dict holds both names of a tied
    embedding on one storage; `_tied_weights_keys` ties exactly so): same storage, offset, shape and
    strides. A pair counts only if every other input holds equal values under both names, so a fine-tune
    that untied them is merged name by name. Files can't tie (safetensors stores one copy): none found.
    """
    if not isinstance(ref, StateDictSource):
        return {}
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for k in keys:
        t = ref.get(k)
        if t.device.type == "meta" or t.numel() == 0:
            continue
        sig = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if sig not in first:
            first[sig] = k
            continue
        canon = first[sig]
        if all(s.get(k).data_ptr() == s.get(canon).data_ptr() or torch.equal(s.get(k), s.get(canon)) for s in others):
            aliases[k] = canon
    return aliases


def _prefetched(keys: Sequence[str], load: Callable[[str], Any], pool: ThreadPoolExecutor) -> Iterator[tuple[str, Any]]:
    """(key, load(key)) in order, with the next key's load running while the caller works on this one."""
    it = iter(keys)
    nxt = next(it, None)
    fut = pool.submit(load, nxt) if nxt is not None else None
    while fut is not None:
        key, value = nxt, fut.result()
        nxt = next(it, None)
        fut = pool.submit(load, nxt) if nxt is not None else None
        yield key, value


def _global_thresholds(base: Source, models: Sequence[Source], densities: Sequence[Any], keys: Sequence[str],
                       device: str, show: bool) -> list[float]:
    """Each task vector's whole-model TIES threshold: two streaming radix-select passes, nothing concatenated."""
    for i, d in enumerate(densities):
        if not isinstance(d, float):
            raise ParameterError(
                f"density (model {i}): trim_scope='global' needs one number per model, not a per-tensor value"
            )
    selectors = [MagnitudeSelector(density=d) for d in densities]
    for step in ("observe", "refine"):
        bar = progress_bar(keys, desc=f"global trim ({step})", total=len(keys), disable=None if show else True)
        for k in bar:
            b = _load(base, k, device)
            for sel, m in zip(selectors, models):
                delta = _load(m, k, device).sub_(b)
                getattr(sel, step)(delta)
    return [s.value for s in selectors]


def _describe(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_describe(v) for v in value) + "]"
    if isinstance(value, (bool, int, float, str)) or value is None:
        return repr(value)
    return "per-tensor (" + type(value).__name__ + ")"


def model_card(method: str, base: Source | None, models: Sequence[Source], params: dict[str, Any]) -> str:
    """A short README.md for a merged model folder (Hugging Face card metadata + how it was made)."""
    parents = ([base.name] if base is not None else []) + [m.name for m in models]
    front = "\n".join(["---", "base_model:", *[f"- {p}" for p in dict.fromkeys(parents)],
                        "tags:", "- merge", "- taskvec", "---", ""])
    lines = [f"# Merged with taskvec ({method})", ""]
    if base is not None:
        lines.append(f"Base model: `{base.name}`")
    lines += ["Models:", *[f"- `{m.name}`" for m in models], "", "Parameters:"]
    lines += [f"- `{k}`: {_describe(v)}" for k, v in sorted(params.items())] or ["- (defaults)"]
    return front + "\n".join(lines) + "\n"


def merge(
    base: Any,
    models: Sequence[Any],
    method: str = "ties",
    *,
    out: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    align_vocab: bool = False,
    **params,
) -> dict[str, torch.Tensor] | Path:
    """Merge `models` (with `base`) by a registered method, streaming tensor by tensor.

    base, models: anything `taskvec.io.open_source` accepts (folder, file, hub id,
    state dict, nn.Module, Source). `base` may be None for methods that don't use
    one (linear, fisher, regmean, karcher, slerp/nuslerp/multislerp without a base);
    given to linear, fisher, regmean or karcher it is only the template (dtype, config,
    non-float buffers); slerp, nuslerp and multislerp use a given base (t = 0 end / origin).
    params: the method's parameters (see `taskvec.methods.get_method(method)`);
    each may be a scalar, a list with one entry per model (per-model parameters),
    or a callable f(tensor_name) -> value (per-layer schedules, name filters).
    `seed` seeds random methods (DARE, DELLA) per tensor name.

    Computes in float32 on `device` (e.g. "cuda"); output dtype is the base's
    unless `dtype` is given; integer/bool buffers are copied from the base.
    TIES-family methods follow the papers by default; `semantics="mergekit"`
    reproduces mergekit's weighting (see `taskvec.methods.ties`). On CPU with
    numba installed, linear, task arithmetic, TIES, DARE, SLERP, Model Stock, NearSwap
    and RAM run as fused kernels straight from the stored bf16/float32 bits
    (`taskvec.methods.fused`), same results; `taskvec warmup` compiles them once
    after installing.
    Returns a state dict, or with `out` writes sharded safetensors + index +
    config/tokenizer files from the base folder atomically and returns the path.
    Inputs are never modified and the returned tensors never share memory with them.

    Tied tensors (one storage under two names in the inputs, e.g. the tied input and
    output embeddings of a live nn.Module) are merged once, so random methods (DARE,
    DELLA) draw one mask for both names; the returned state dict ties them too.
    A NaN or inf in an input, or a merged tensor that is not finite in the output
    dtype (e.g. float32 values beyond float16's range), is an error naming the
    tensor (and the model), raised before anything is written.
    """
    m = get_method(method)
    if _FUSED not in sys.modules and _numba_installed():  # numba and the kernels import while sources open
        threading.Thread(target=_fused, name="taskvec-import-fused", daemon=True).start()
    if isinstance(models, (str, Path, Source, dict, torch.nn.Module)) or not isinstance(models, Sequence):
        raise ParameterError(f"models: expected a list of models, got a {type(models).__name__}")
    out_dtype = as_dtype(dtype)
    if "seed" in m.param_names:
        params.setdefault("seed", seed)
    has_base = base is not None
    n_models = len(models)
    checked = m.check_params(n_models, has_base=has_base, **params)
    if m.name == "slerp" and n_models + has_base != 2:
        raise ParameterError(f"models: slerp interpolates exactly two models (base + one, or two without a base), "
                             f"got {n_models + has_base}")

    base_src = open_source(base) if has_base else None
    model_srcs = [open_source(x) for x in models]
    ref = base_src if base_src is not None else model_srcs[0]
    check_compatible(ref, model_srcs, align_vocab=align_vocab)
    keys = ref.keys()
    float_keys = [k for k in keys if ref.index[k].is_float]
    # base tensors enter the kernel only when the method uses them (slerp's first endpoint, task vectors)
    use_base = m.needs_base or m.optional_base

    if checked.get("trim_scope") == "global":
        checked["threshold"] = _global_thresholds(base_src, model_srcs, checked["density"], float_keys, device,
                                                  progress)

    def target_dtype(k: str) -> torch.dtype:
        meta = ref.index[k]
        return out_dtype if (out_dtype is not None and meta.is_float) else meta.dtype

    # raw path: stored-dtype CPU tensors go to the method's fused kernel (one pass, no float32 copies);
    # otherwise every input is loaded as a float32 copy (on `device`) for the per-tensor kernel
    raw = device == "cpu" and not align_vocab and m.fused is not None and _numba_installed()
    inputs = ([base_src] if base_src is not None else []) + model_srcs
    tied = tied_aliases(ref, [s for s in inputs if s is not ref], float_keys)
    _TIED = object()

    def load(k: str):
        if not ref.index[k].is_float:
            return None
        if k in tied:
            return _TIED  # merged once, under its first name
        if raw:
            b = base_src.get(k) if use_base and base_src is not None else None
            ts = [s.get(k) for s in model_srcs]
            # the finiteness check reads every input entry, so the page reads happen here, in the loader thread
            _check_inputs_finite(k, [(base_src, b), *zip(model_srcs, ts)])
            return b, ts
        b = _load(base_src, k, device) if (use_base or align_vocab) and base_src is not None else None
        ts = [_load(s, k, device) for s in model_srcs]
        _check_inputs_finite(k, [(base_src, b), *zip(model_srcs, ts)])
        if align_vocab:
            anchor = b if b is not None else ts[0]
            ts = [_align_rows(t, anchor) for t in ts]
        return b if use_base else None, ts

    tied_results: dict[str, torch.Tensor] = {}
    canonical = set(tied.values())

    def compute(k: str, loaded) -> torch.Tensor:
        if loaded is None:  # integer / bool buffer: the base's copy
            return ref.get(k).clone()
        if loaded is _TIED:
            return tied_results[tied[k]]
        b, ts = loaded
        if raw:
            result = m.merge_fast(b, ts, name=k, checked=checked, out_dtype=target_dtype(k))
            _check_output_finite(k, result, m.name, lambda: m.merge_checked(b, ts, name=k, checked=checked))
        else:
            merged = m.merge_checked(b, ts, name=k, checked=checked)
            result = merged.to(device="cpu", dtype=target_dtype(k))
            _check_output_finite(k, result, m.name, lambda: merged)
        if k in canonical:
            tied_results[k] = result
        return result

    bar_kw = dict(desc=f"merge ({m.name})", total=len(keys), disable=None if progress else True)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="taskvec-load") as loader:
        if out is None:
            return {k: compute(k, v) for k, v in progress_bar(_prefetched(keys, load, loader), **bar_kw)}
        metas = {k: TensorMeta(ref.index[k].shape, target_dtype(k)) for k in keys}
        with ShardedWriter(out, metas, max_shard_size=max_shard_size, inputs=inputs, overwrite=overwrite) as w:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="taskvec-write") as writer:
                pending = None
                for k, v in progress_bar(_prefetched(keys, load, loader), **bar_kw):
                    result = compute(k, v)
                    if pending is not None:
                        pending.result()  # one write in flight at a time bounds memory
                    pending = writer.submit(w.add, k, result)
                if pending is not None:
                    pending.result()
            w.write_text("README.md", model_card(m.name, base_src, model_srcs, params))
            w.copy_from(ref.model_dir)
        return w.out


# ------------------------------------------------------------------------------------------------
# Passthrough: stack layer slices (frankenmerges, depth up-scaling)

_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|layer|blocks))\.(?P<index>\d+)(?P<rest>\..*|$)")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def layer_index(name: str) -> int | None:
    """The transformer-block index in a tensor name ('model.layers.7.mlp...' -> 7), or None."""
    m = _LAYER.match(name)
    return int(m.group("index")) if m else None


def renumber_layer(name: str, index: int) -> str:
    m = _LAYER.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a layer tensor")
    return f"{m.group('prefix')}.{index}{m.group('rest')}"


def num_layers(src: Source) -> int:
    """Layer count from the config (num_hidden_layers / n_layer / num_layers), else from tensor names."""
    cfg = src.config() or {}
    for section in (cfg, cfg.get("text_config") or {}):
        for key in _LAYER_COUNT_KEYS:
            if isinstance(section.get(key), int):
                return section[key]
    found = [i for i in map(layer_index, src.keys()) if i is not None]
    if not found:
        raise ParameterError(f"{src.name}: no layer tensors found (names like 'model.layers.N....')")
    return max(found) + 1


def _updated_config(cfg: dict, total: int, slices: Sequence[tuple[int, int]]) -> dict:
    cfg = dict(cfg)
    for section in (cfg, cfg.get("text_config")):
        if not isinstance(section, dict):
            continue
        for key in _LAYER_COUNT_KEYS:
            if isinstance(section.get(key), int):
                section[key] = total
        # per-layer lists (e.g. layer_types of hybrid-attention models) follow the slices
        for key, value in list(section.items()):
            if key in ("layer_types",) and isinstance(value, list):
                section[key] = [value[i] for s, e in slices for i in range(s, e) if i < len(value)]
    return cfg


def passthrough(
    slices: Sequence[tuple[Any, tuple[int, int]]],
    *,
    out: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, torch.Tensor] | Path:
    """Stack layer ranges [start, end) from several models into one deeper (or shallower) model.

    slices: [(model, (start, end)), ...] in output order; layers are renumbered
    0..total-1 and the config's layer count is updated. Tensors outside the layer
    stack (embeddings, final norm, head) and the config come from the first slice's model.
    """
    if not slices:
        raise ParameterError("slices: need at least one (model, (start, end)) slice")
    out_dtype = as_dtype(dtype)
    opened: list[tuple[Source, int, int]] = []
    for i, item in enumerate(slices):
        try:
            model, (start, end) = item
        except (TypeError, ValueError):
            raise ParameterError(f"slices[{i}]: expected (model, (start, end)), got {item!r}") from None
        src = open_source(model)
        n = num_layers(src)
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= n):
            raise ParameterError(f"slices[{i}]: layer_range ({start}, {end}) is outside {src.name}, which has "
                                 f"{n} layers (need 0 <= start < end <= {n})")
        opened.append((src, start, end))

    first = opened[0][0]
    template = {k: first.index[k] for k in first.keys() if layer_index(k) is None}

    def layer_tensors(src: Source, index: int) -> dict[str, str]:
        """Tensor names of one layer, keyed by their name with the index set to 0 (comparable across models)."""
        return {renumber_layer(k, 0): k for k in src.keys() if layer_index(k) == index}

    reference_layer = layer_tensors(first, opened[0][1])
    plan: dict[str, tuple[Source, str]] = {k: (first, k) for k in template}
    total = 0
    for i, (src, start, end) in enumerate(opened):
        for li in range(start, end):
            names = layer_tensors(src, li)
            if names.keys() != reference_layer.keys():
                diff = sorted(set(names) ^ set(reference_layer))[:3]
                raise KeyMismatchError(f"slices[{i}]: layer {li} of {src.name} has different tensors than layer "
                                       f"{opened[0][1]} of {first.name} (e.g. {diff})")
            for rel, name in names.items():
                want = first.index[reference_layer[rel]].shape
                if src.index[name].shape != want:
                    raise ShapeMismatchError(f"slices[{i}]: {name!r} of {src.name} has shape {src.index[name].shape}, "
                                             f"expected {want}")
                plan[renumber_layer(rel, total)] = (src, name)
            total += 1

    def target(src: Source, name: str) -> torch.dtype:
        meta = src.index[name]
        return out_dtype if (out_dtype is not None and meta.is_float) else meta.dtype

    def compute(k: str) -> torch.Tensor:
        src, name = plan[k]
        return src.get(name).to(target(src, name), copy=True)

    bar = progress_bar(plan, desc="passthrough", total=len(plan), disable=None if progress else True)
    if out is None:
        return {k: compute(k) for k in bar}
    metas = {k: TensorMeta(src.index[name].shape, target(src, name)) for k, (src, name) in plan.items()}
    with ShardedWriter(out, metas, max_shard_size=max_shard_size, inputs=[s for s, _, _ in opened],
                       overwrite=overwrite) as w:
        for k in bar:
            w.add(k, compute(k))
        cfg = first.config()
        if cfg is not None:
            w.write_json("config.json", _updated_config(cfg, total, [(s, e) for _, s, e in opened]))
        w.copy_from(first.model_dir)
    return w.out
