"""Plan: a parsed `MergeConfig` + its opened models -> the `CompiledMerge` the executor runs.

Opens every model the config names (headers only), resolves ``slices:`` and
``layer_range`` into virtual sources renumbered into output-layer order, and
resolves every parameter to its value per output tensor with mergekit 0.1.5's
semantics (`evaluate_setting`: gradients over the layer index, ``filter``
lists, per-model -> slice -> global lookup, mergekit's defaults).
`CompiledMerge.describe()` / `parameter_table()` show the result before
anything is merged; `plan_config` is what ``taskvec merge --dry-run`` prints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from taskvec.config.parse import (
    NO_EFFECT,
    Conditional,
    MergeConfig,
    ModelEntry,
    OutputSlice,
    Scalar,
    Setting,
    SliceSource,
    _fail,
    _method_params,
    _registry,
    _uses_base,
    parse_config,
)
from taskvec.errors import CheckpointError, TaskVecError

# ---------------------------------------------------------------- parameter semantics

def _validate_numeric(v: Scalar) -> Scalar:
    """YAML 1.1 reads `1e-3` as a string; mergekit treats numeric strings as numbers for numeric params."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def evaluate_setting(setting: Setting, tensor_name: str, t: float = 0.0) -> Any:
    """A parameter's value for one tensor, exactly as mergekit 0.1.5 resolves it.

    * scalar -> itself;
    * list of numbers -> linear interpolation at ``t`` in [0, 1] over the list
      (``t * (len - 1)`` between neighbours); a list of bools/strings picks
      ``values[int(t * (len - 1))]``;
    * list of conditionals -> the first whose `filter` is a substring of
      `tensor_name` (no filter or ``*`` matches everything), evaluated
      recursively; None when nothing matches.
    """
    if isinstance(setting, Conditional):
        setting = (setting,)
    if not isinstance(setting, tuple):
        return _validate_numeric(setting)
    if not setting:
        return None
    if not isinstance(setting[0], Conditional):
        values = [_validate_numeric(v) for v in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]
    for cond in setting:
        if cond.matches(tensor_name):
            return evaluate_setting(cond.value, tensor_name, t)
    return None


def is_constant(setting: Setting) -> bool:
    """True when the setting gives the same value for every tensor (no gradient, no filter)."""
    if isinstance(setting, tuple):
        if setting and isinstance(setting[0], Conditional):
            return len(setting) == 1 and setting[0].filter in (None, "*") and is_constant(setting[0].value)
        return len(set(setting)) <= 1
    return True


# Where mergekit 0.1.5's defaults differ from taskvec's, a mergekit config gets mergekit's: e.g. TIES without
# `density` keeps every entry in mergekit (density 1), while taskvec's own default is the paper's 0.2.
MERGEKIT_DEFAULTS: dict[str, dict[str, Any]] = {
    m: {"density": 1.0} for m in ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
                                  "della_linear")
}
# Parameters mergekit requires (no default): a tensor no filter gives a value to is an error, as in mergekit.
MERGEKIT_REQUIRED = {"weight", "t"}


# ---------------------------------------------------------------- the plan

@dataclass
class CompiledMerge:
    """What `run_config` hands to the executor: sources and per-tensor parameter values."""

    method: str
    base: Any  # Source or None
    models: list  # list[Source]
    params: dict[str, Any]  # scalar, per-model list, or callable(tensor_name) -> value
    num_layers: int  # layers in the output
    tensor_names: list[str] = field(default_factory=list)  # the output's tensors

    def parameter_table(self):
        """Every parameter's value for every output tensor, as a tidy DataFrame.

        Columns: tensor, layer (None outside the layer stack), parameter, model
        (None for global parameters), value. Shows exactly what gradients and
        filters resolved to before anything is merged.
        """
        import pandas as pd

        from taskvec.merging import layer_index

        models = [m.name for m in self.models]
        rows = []
        for tensor in self.tensor_names:
            layer = layer_index(tensor)
            for name, v in self.params.items():
                if isinstance(v, (list, tuple)):
                    for model, x in zip(models, v):
                        rows.append((tensor, layer, name, model, x(tensor) if callable(x) else x))
                else:
                    rows.append((tensor, layer, name, None, v(tensor) if callable(v) else v))
        return pd.DataFrame(rows, columns=["tensor", "layer", "parameter", "model", "value"])

    def describe(self) -> str:
        """What will be merged: sources, output layers, and per-layer parameter values where they vary."""
        if self.passthrough_slices:
            lines = [f"passthrough: {len(self.passthrough_slices)} slices -> {self.num_layers} output layers"]
            lines += [f"  {src.name} layers [{a}, {b})" for src, (a, b) in self.passthrough_slices]
            return "\n".join(lines)
        lines = [f"{self.method}: {len(self.models)} model(s) -> {self.num_layers} output layers"]
        lines.append(f"  base: {self.base.name if self.base is not None else '(none)'}")
        lines += [f"  model {i}: {m.name}" for i, m in enumerate(self.models)]
        table = self.parameter_table()
        for (name, model), group in table.groupby(["parameter", "model"], dropna=False, sort=False):
            who = f" [{model}]" if isinstance(model, str) else ""
            values = group["value"]
            if values.nunique() <= 1:
                value = values.iloc[0]
                lines.append(f"  {name}{who} = {(value.item() if hasattr(value, 'item') else value)!r}")
                continue
            lines.append(f"  {name}{who} varies by tensor (layer x tensor):")
            g = group.assign(kind=group["tensor"].str.replace(r"^.*?\.\d+\.", "", regex=True))
            pivot = g[g["layer"].notna()].pivot_table(index="layer", columns="kind", values="value", aggfunc="first")
            pivot.index = pivot.index.astype(int)
            lines += ["    " + line for line in _merge_equal_columns(pivot).round(3).to_string().splitlines()]
            outside = g[g["layer"].isna()]
            lines += [f"    {r.tensor}: {r.value:.3g}" for r in outside.itertuples()]
        return "\n".join(lines)
    passthrough_slices: list | None = None  # [(Source, (start, end))] for passthrough


def _num_layers(source) -> int:
    from taskvec.merging import num_layers

    return num_layers(source)


def _model_path(ref: str, config_path: Path | None) -> str:
    """A local path as written (relative to the working directory), else relative to the config file."""
    p = Path(ref).expanduser()
    if p.exists() or p.is_absolute() or config_path is None:
        return str(p) if p.exists() else ref
    q = config_path.parent / p
    return str(q) if q.exists() else ref


def open_models(cfg: MergeConfig) -> dict[str, Any]:
    """Open every model the config names (headers only). A missing model is an error naming it."""
    from taskvec.io import open_source

    where = str(cfg.path) if cfg.path else "config"
    opened = {}
    for ref in cfg.referenced_models():
        try:
            path = _model_path(ref, cfg.path)
            if "+" in ref and not Path(path).exists():  # mergekit's `model+lora`: the model with the adapter applied
                model, adapter = ref.split("+", 1)
                base = open_source(_model_path(model, cfg.path), name=model)
                src = open_source(_model_path(adapter, cfg.path), base=base, name=ref)
            else:
                src = open_source(path, name=ref)
            src.keys()  # parse headers now: a truncated shard fails here, before any output
        except TaskVecError as e:
            raise CheckpointError(f"{where}: model {ref!r} can't be opened: {e}") from None
        opened[ref] = src
    return opened


def _remapped_source(name: str, mapping: Mapping[str, tuple[Any, str]], model_dir):
    """A Source whose tensor `out` is tensor `in_name` of another source: slices renumbered into place."""
    from taskvec.io.base import Source

    class RemappedSource(Source):
        def _index(self):
            return {out: src.meta(k) for out, (src, k) in mapping.items()}

        def get(self, key):
            src, k = mapping[key]
            return src.get(k)

    s = RemappedSource()
    s.name, s.model_dir = name, model_dir
    s.files = tuple(dict.fromkeys(f for src, _ in mapping.values() for f in src.files))
    return s


def _is_pre_weight(tensor_name: str) -> bool:
    """Outside the layer stack, before it (embeddings) vs after it (final norm, LM head)."""
    return "embed" in tensor_name or tensor_name.split(".")[-2] in ("wte", "wpe")


def _merge_equal_columns(table):
    """Columns with identical values become one: `self_attn.*` when a whole module agrees, else `a, b`."""
    import pandas as pd

    groups: dict[tuple, list[str]] = {}
    for col in table.columns:
        groups.setdefault(tuple(table[col].tolist()), []).append(col)
    modules: dict[str, list[str]] = {}
    for col in table.columns:
        modules.setdefault(col.split(".")[0], []).append(col)
    out = {}
    for cols in groups.values():
        parts: list[str] = []
        for col in cols:
            head = col.split(".")[0]
            if set(modules[head]) <= set(cols):  # the whole module agrees: name it once
                part = f"{head}.*" if len(modules[head]) > 1 else col.removesuffix(".weight")
                if part not in parts:
                    parts.append(part)
            else:
                parts.append(col)
        out[", ".join(parts)] = table[cols[0]]
    return pd.DataFrame(out, index=table.index)


def _as_slices(cfg: MergeConfig, opened: Mapping[str, Any], where: str) -> list[OutputSlice]:
    if cfg.slices is not None:
        return list(cfg.slices)
    counts = {m.model: _num_layers(opened[m.model]) for m in cfg.models}
    entries = list(cfg.models)
    spec = _registry().get_method(cfg.merge_method)
    if cfg.base_model and cfg.base_model not in counts and (_uses_base(cfg.merge_method) or spec.optional_base
                                                             or spec.base_as_model):
        entries.append(ModelEntry(cfg.base_model))  # mergekit adds the base when the list omits it
        counts[cfg.base_model] = _num_layers(opened[cfg.base_model])
    if len(set(counts.values())) > 1:
        raise _fail(f"{where}: models", f"models have different numbers of layers {counts}; use `slices:` "
                                        "to say which layers to merge")
    return [OutputSlice(tuple(SliceSource(e.model, (0, counts[e.model]), e.parameters) for e in entries))]


def _lookup(name: str, scopes: Sequence[Mapping[str, Setting]], tensor_name: str, t: float):
    for scope in scopes:
        if name in scope:
            v = evaluate_setting(scope[name], tensor_name, t)
            if v is not None:
                return v
    return None


def compile_config(cfg: MergeConfig, opened: Mapping[str, Any]) -> CompiledMerge:
    """Turn a parsed config and its opened models into sources + per-tensor parameters for the executor."""
    from taskvec.merging import layer_index, renumber_layer

    where = str(cfg.path) if cfg.path else "config"
    slices = _as_slices(cfg, opened, where)
    for i, s in enumerate(slices):
        for j, src in enumerate(s.sources):
            n = _num_layers(opened[src.model])
            if src.layer_range[1] > n:
                raise _fail(f"{where}: slices[{i}].sources[{j}].layer_range",
                            f"{list(src.layer_range)} is out of range: {src.model} has {n} layers (0..{n - 1}); "
                            "the end is exclusive")
    total_layers = sum(s.num_layers for s in slices)

    if cfg.merge_method == "passthrough":
        for i, s in enumerate(slices):
            if len(s.sources) != 1:
                raise _fail(f"{where}: slices[{i}]", f"passthrough takes one source per slice, got {len(s.sources)}")
            if s.sources[0].parameters or s.parameters or cfg.parameters:
                raise _fail(f"{where}: slices[{i}]", "passthrough parameters (`scale`) are not supported")
        pieces = [(opened[s.sources[0].model], s.sources[0].layer_range) for s in slices]
        first, last = pieces[0][0], pieces[-1][0]
        if last is not first:
            # mergekit takes the embeddings from the first slice's model but the final norm and LM head from the
            # last slice's: present the first model with those swapped in.
            post = {k for k in first.keys() if layer_index(k) is None and not _is_pre_weight(k) and k in last}
            mapping = {k: (last if k in post else first, k) for k in first.keys()}
            pieces[0] = (_remapped_source(first.name, mapping, first.model_dir), pieces[0][1])
        return CompiledMerge("passthrough", None, [], {}, total_layers, passthrough_slices=pieces)

    spec = _registry().get_method(cfg.merge_method)
    # nuslerp / multislerp use a base_model when the config names one; karcher merges it as a model (base_as_model)
    needs_base = _uses_base(cfg.merge_method) or (
        spec.optional_base and bool(cfg.base_model or any(s.base_model for s in slices)))
    # Split every slice into its base source and the others, in order: position j = the j-th non-base source.
    bases: list[SliceSource | None] = []
    others: list[list[SliceSource]] = []
    for i, s in enumerate(slices):
        base_ref = s.base_model or cfg.base_model
        if needs_base and not base_ref:
            raise _fail(where, f"{cfg.merge_method} needs a `base_model`")
        b = next((src for src in s.sources if src.model == base_ref), None) if needs_base else None
        if needs_base and b is None:
            raise _fail(f"{where}: slices[{i}]", f"base model {base_ref!r} is not among this slice's sources "
                                                 f"{[src.model for src in s.sources]}")
        bases.append(b)
        others.append([src for src in s.sources if src is not b])
    if len({len(o) for o in others}) > 1:
        raise _fail(where, "every slice must merge the same number of models")
    num_models = len(others[0])
    if num_models == 0:
        raise _fail(where, f"{cfg.merge_method}: nothing to merge (only the base model is listed)")

    base_src = opened[bases[0].model] if bases[0] else None
    ref_src = base_src or opened[others[0][0].model]
    # Which slice (and layer offset within it) each output layer comes from.
    layer_slice: list[tuple[int, int]] = [(k, i) for k, s in enumerate(slices) for i in range(s.num_layers)]

    def locate(out_name: str) -> tuple[int, int | None]:
        """(slice index, layer offset within the slice or None outside the stack) of an output tensor."""
        li = layer_index(out_name)
        if li is None:
            return (0 if _is_pre_weight(out_name) else len(slices) - 1), None
        return layer_slice[li]

    def t_of(k: int, offset: int | None) -> float:
        if offset is None:
            return 0.0  # mergekit 0.1.5 resolves embeddings, final norm and head at t = 0
        n = slices[k].num_layers
        return offset / (n - 1) if n > 1 else 1.0

    def input_name(src: SliceSource, out_name: str, offset: int | None) -> str:
        return out_name if offset is None else renumber_layer(out_name, src.layer_range[0] + offset)

    identity = (len(slices) == 1 and all(src.layer_range == (0, _num_layers(opened[src.model]))
                                         for src in slices[0].sources))
    out_names = [n for n in ref_src.keys() if layer_index(n) is None] + [
        renumber_layer(n, out_l) for out_l, (k, off) in enumerate(layer_slice)
        for n in _layer_keys(ref_src, (bases[k] or others[k][0]).layer_range[0] + off)
    ] if not identity else list(ref_src.keys())

    def virtual(pick: Callable[[int], SliceSource | None], label: str):
        first = pick(0)
        if identity:
            return opened[first.model]
        mapping = {}
        for out_name in out_names:
            k, off = locate(out_name)
            src = pick(k)
            mapping[out_name] = (opened[src.model], input_name(src, out_name, off))
        return _remapped_source(label, mapping, opened[first.model].model_dir)

    base = virtual(lambda k: bases[k], f"base ({bases[0].model})") if needs_base else None
    models = [virtual(lambda k, j=j: others[k][j], others[0][j].model) for j in range(num_models)]

    per_model, global_ = _method_params(cfg.merge_method)
    named = set(cfg.parameters) | {p for s in slices for p in s.parameters} | {
        p for s in slices for src in s.sources for p in src.parameters}
    params: dict[str, Any] = {}
    for name in sorted(named - set(NO_EFFECT)):
        if name in per_model:
            def value(out_name: str, name=name):
                k, off = locate(out_name)
                t = t_of(k, off)
                vals = []
                for src in others[k]:
                    v = _lookup(name, (src.parameters, slices[k].parameters, cfg.parameters),
                                input_name(src, out_name, off), t)
                    if v is None:
                        v = _fallback(cfg.merge_method, name, f"model {src.model!r} at tensor {out_name!r}", where)
                    vals.append(v)
                return vals
        else:
            def value(out_name: str, name=name):
                k, off = locate(out_name)
                v = _lookup(name, (slices[k].parameters, cfg.parameters), out_name, t_of(k, off))
                if v is None:
                    v = _fallback(cfg.merge_method, name, f"tensor {out_name!r}", where)
                return v
        resolved = _constant_or_callable(value, out_names)
        if callable(resolved) and name in per_model:  # one callable per model, as merge() takes per-model values
            resolved = [lambda n, i=i, f=resolved: f(n)[i] for i in range(num_models)]
        params[_registry().get_method(cfg.merge_method).param(name).name] = resolved
    for name, default in MERGEKIT_DEFAULTS.get(cfg.merge_method, {}).items():
        params.setdefault(name, [default] * num_models if name in per_model else default)
    return CompiledMerge(cfg.merge_method, base, models, params, total_layers, tensor_names=out_names)


def _fallback(method: str, name: str, what: str, where: str):
    """A parameter no scope gives a value for (no filter matched): mergekit's default, or an error."""
    spec = _registry().get_method(method).param(name)
    if name in MERGEKIT_DEFAULTS.get(method, {}):
        return MERGEKIT_DEFAULTS[method][name]
    if spec.name in MERGEKIT_REQUIRED or spec.required:
        raise _fail(where, f"parameter {name!r} has no value for {what} (no filter matched and mergekit has "
                           "no default for it); add a `- value: ...` fallback")
    return spec.default


def _layer_keys(source, index: int) -> list[str]:
    from taskvec.merging import layer_index

    return [k for k in source.keys() if layer_index(k) == index]


def _constant_or_callable(value: Callable[[str], Any], names: Sequence[str]):
    """Collapse a per-tensor parameter to a constant when it is one (cheap: names only, no tensors)."""
    seen = None
    for n in names:
        v = value(n)
        if seen is None:
            seen = (v,)
        elif v != seen[0]:
            return value
    return seen[0] if seen is not None else value


def plan_config(config: str | os.PathLike | Mapping | MergeConfig) -> CompiledMerge:
    """Parse a config and open its models (headers only): the plan `run_config` would execute."""
    cfg = config if isinstance(config, MergeConfig) else parse_config(config)
    return compile_config(cfg, open_models(cfg))
