"""mergekit-compatible YAML configs: parse into a typed plan, run it on taskvec's executor.

The same file you give `mergekit-yaml` runs here unchanged:

    taskvec merge config.yml ./merged --copy-tokenizer

Supported keys (everything else is an error that lists these):

* ``merge_method`` — any method in ``taskvec.methods`` (plus ``passthrough``);
* ``models:`` — ``- model: PATH`` (or ``PATH+LORA_ADAPTER``) with optional per-model ``parameters``;
* ``slices:`` — ``- sources: [{model, layer_range: [start, end], parameters}]``
  with optional per-slice ``base_model`` and ``parameters``;
* ``base_model``, global ``parameters``;
* ``dtype`` (mergekit: the dtype inputs are cast to) and ``out_dtype``: taskvec
  always computes in float32; the output gets ``out_dtype``, else ``dtype``,
  else the base model's dtype;
* ``tokenizer_source``: ``base`` or a model path (``union`` is not supported).

Parameter values follow mergekit's semantics exactly (see `evaluate_setting`):
a scalar; a list of numbers — a *gradient* interpolated linearly over the layer
index normalised to [0, 1] within its slice (``t = i / (n - 1)``; tensors
outside the layer stack, e.g. embeddings and the final norm, use ``t = 0``);
or a list of ``{filter: SUBSTRING, value: ...}`` entries where the first entry
whose filter is a substring of the tensor name (or has no filter, or ``*``)
applies. A per-model parameter is looked up on the model's entry first, then on
its slice, then globally, as mergekit does.

Methods run with ``semantics="mergekit"`` (taskvec.methods.registry): mergekit's
TIES weighting, DARE/DELLA ``rescale: true`` as one L1-matching factor per tensor,
model_stock unclamped. tests/goldens holds mergekit-yaml 0.1.5's outputs for every
shared method; CI compares against them (random masks differ: their rescale is
compared). Known differences: taskvec keeps every entry tied with the k-th largest
magnitude (mergekit's argsort picks some), and refuses a NaN/inf that mergekit writes.

Options that change nothing here are accepted and listed in `NO_EFFECT`
(e.g. ``int8_mask``, a memory trick of mergekit's; taskvec's masks are already
boolean).
"""
from __future__ import annotations

import difflib
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

from taskvec.errors import CheckpointError, OutputError, ParameterError, TaskVecError

Scalar = Union[bool, int, float, str]


@dataclass(frozen=True)
class Conditional:
    """One ``{filter: ..., value: ...}`` entry of a parameter."""

    value: Any  # Scalar or tuple of Scalars (a gradient)
    filter: str | None = None

    def matches(self, tensor_name: str) -> bool:
        return self.filter is None or self.filter == "*" or self.filter in tensor_name


# A parameter setting: a Scalar, a tuple of Scalars (gradient), or a tuple of Conditionals.
Setting = Any


@dataclass(frozen=True)
class ModelEntry:
    model: str
    parameters: Mapping[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class SliceSource:
    model: str
    layer_range: tuple[int, int]
    parameters: Mapping[str, Setting] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


@dataclass(frozen=True)
class OutputSlice:
    sources: tuple[SliceSource, ...]
    base_model: str | None = None
    parameters: Mapping[str, Setting] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.sources[0].num_layers


@dataclass(frozen=True)
class MergeConfig:
    """A parsed mergekit YAML config. Exactly one of `models` / `slices` is set."""

    merge_method: str
    models: tuple[ModelEntry, ...] | None = None
    slices: tuple[OutputSlice, ...] | None = None
    base_model: str | None = None
    parameters: Mapping[str, Setting] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    no_effect: Mapping[str, Any] = field(default_factory=dict)  # accepted options that change nothing here
    text: str = ""  # the YAML as written, for the model card
    path: Path | None = None

    def referenced_models(self) -> list[str]:
        """Every model the config names, base first, in order of appearance, without repeats."""
        seen: dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for m in self.models or ():
            seen[m.model] = None
        for s in self.slices or ():
            if s.base_model:
                seen[s.base_model] = None
            for src in s.sources:
                seen[src.model] = None
        return list(seen)

    def __repr__(self) -> str:
        form = f"{len(self.models)} models" if self.models else f"{len(self.slices or ())} slices"
        return f"MergeConfig({self.merge_method!r}, {form}, base_model={self.base_model!r})"


TOP_LEVEL_KEYS = ("merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype",
                  "tokenizer_source")
NOT_SUPPORTED_KEYS = {
    "modules": "multi-module configs (`modules:`) are not supported; use `models:` or `slices:`",
    "tokenizer": "the `tokenizer:` block (vocabulary surgery) is not supported; use `tokenizer_source: base` or a model path",
    "chat_template": "`chat_template` is not supported; set it in the output's tokenizer_config.json after merging",
}
# Options mergekit accepts that change nothing in taskvec (why, for the docs and the model card).
NO_EFFECT = {
    "int8_mask": "mergekit stores sign masks as int8 to save memory; taskvec's masks are already boolean",
}
DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16", "fp16": "float16",
          "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64"}


# ---------------------------------------------------------------- parsing

def _fail(where: str, msg: str) -> ParameterError:
    return ParameterError(f"{where}: {msg}")


def _scalar(x: Any, where: str) -> Scalar:
    if isinstance(x, (bool, int, float, str)):
        return x
    raise _fail(where, f"expected a number, bool or string, got {x!r}")


def _parse_setting(x: Any, where: str) -> Setting:
    """Scalar | [Scalar, ...] (gradient) | {filter, value} | [{filter, value}, ...]."""
    if isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, Mapping):
        x = [x]
    if isinstance(x, list):
        if not x:
            raise _fail(where, "empty list")
        if all(not isinstance(e, (Mapping, list)) for e in x):
            return tuple(_scalar(e, where) for e in x)
        conds = []
        for i, e in enumerate(x):
            if not isinstance(e, Mapping) or "value" not in e:
                raise _fail(f"{where}[{i}]", f"expected {{filter: ..., value: ...}}, got {e!r}")
            extra = set(e) - {"filter", "value"}
            if extra:
                raise _fail(f"{where}[{i}]", f"unknown key(s) {sorted(extra)}; a conditional value has `filter` and `value`")
            value = e["value"]
            value = tuple(_scalar(v, f"{where}[{i}].value") for v in value) if isinstance(value, list) else _scalar(value, f"{where}[{i}].value")
            flt = e.get("filter")
            conds.append(Conditional(value=value, filter=None if flt is None else str(flt)))
        return tuple(conds)
    raise _fail(where, f"can't read parameter value {x!r}")


def _parse_parameters(x: Any, where: str) -> dict[str, Setting]:
    if x is None:
        return {}
    if not isinstance(x, Mapping):
        raise _fail(where, f"expected a mapping of parameter names to values, got {x!r}")
    return {str(k): _parse_setting(v, f"{where}.{k}") for k, v in x.items()}


def _model_ref(x: Any, where: str) -> str:
    if isinstance(x, Mapping) and "model" in x:  # mergekit's long form {model: {path: ...}}
        x = x["model"]
        if isinstance(x, Mapping):
            x = x.get("path")
    if not isinstance(x, str) or not x.strip():
        raise _fail(where, f"expected a model path or hub id, got {x!r}")
    return x.strip()


def _check_keys(d: Mapping, allowed: Sequence[str], where: str) -> None:
    for k in d:
        if k not in allowed:
            hint = difflib.get_close_matches(str(k), allowed, n=1)
            raise _fail(where, f"unknown key {k!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                               f"supported: {', '.join(allowed)}")


def _layer_range(x: Any, where: str) -> tuple[int, int]:
    if (not isinstance(x, (list, tuple)) or len(x) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in x)):
        raise _fail(where, f"expected [start, end] (two integers), got {x!r}")
    start, end = x
    if start < 0 or end <= start:
        raise _fail(where, f"[{start}, {end}] is empty or negative; need 0 <= start < end")
    return (start, end)


def parse_config(config: str | os.PathLike | Mapping) -> MergeConfig:
    """Read a mergekit YAML config (a path, YAML text, or an already-loaded dict) into a `MergeConfig`.

    Checks the structure and names only; models are opened by `run_config`.
    A model may be written `MODEL+LORA_ADAPTER` (mergekit's syntax): the model
    with the LoRA adapter applied.
    """
    import yaml

    path: Path | None = None
    if isinstance(config, Mapping):
        raw, text = dict(config), yaml.safe_dump(dict(config), sort_keys=False)
    else:
        looks_like_yaml = isinstance(config, str) and ("\n" in config or ": " in config)
        if isinstance(config, os.PathLike) or Path(config).is_file() or not looks_like_yaml:
            path = Path(config)
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise ParameterError(f"{path}: config file not found") from None
        else:
            text = str(config)
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ParameterError(f"{path or '<config>'}: not valid YAML ({e})") from None
    where = str(path) if path else "config"
    if not isinstance(raw, Mapping):
        raise _fail(where, f"expected a YAML mapping at the top level, got {type(raw).__name__}")

    for k in raw:
        if k in NOT_SUPPORTED_KEYS:
            raise _fail(where, NOT_SUPPORTED_KEYS[k])
    _check_keys(raw, TOP_LEVEL_KEYS, where)
    if "merge_method" not in raw:
        raise _fail(where, "`merge_method` is missing")
    method = str(raw["merge_method"])
    if bool(raw.get("models")) == bool(raw.get("slices")):
        raise _fail(where, "give exactly one of `models:` or `slices:`")

    models = slices = None
    if raw.get("models"):
        if not isinstance(raw["models"], list):
            raise _fail(f"{where}: models", "expected a list of `- model: ...` entries")
        models = []
        for i, m in enumerate(raw["models"]):
            w = f"{where}: models[{i}]"
            if isinstance(m, str):
                m = {"model": m}
            if not isinstance(m, Mapping):
                raise _fail(w, f"expected `model: ...`, got {m!r}")
            _check_keys(m, ("model", "parameters"), w)
            models.append(ModelEntry(_model_ref(m.get("model"), f"{w}.model"),
                                     _parse_parameters(m.get("parameters"), f"{w}.parameters")))
        models = tuple(models)
    else:
        if not isinstance(raw["slices"], list):
            raise _fail(f"{where}: slices", "expected a list of `- sources: [...]` entries")
        slices = []
        for i, s in enumerate(raw["slices"]):
            w = f"{where}: slices[{i}]"
            if not isinstance(s, Mapping):
                raise _fail(w, f"expected `sources: [...]`, got {s!r}")
            _check_keys(s, ("sources", "base_model", "parameters"), w)
            if not isinstance(s.get("sources"), list) or not s["sources"]:
                raise _fail(w, "`sources` must be a non-empty list")
            sources = []
            for j, src in enumerate(s["sources"]):
                ws = f"{w}.sources[{j}]"
                if not isinstance(src, Mapping):
                    raise _fail(ws, f"expected `model: ...` and `layer_range: [start, end]`, got {src!r}")
                _check_keys(src, ("model", "layer_range", "parameters"), ws)
                if "layer_range" not in src:
                    raise _fail(ws, "`layer_range: [start, end]` is missing")
                sources.append(SliceSource(_model_ref(src.get("model"), f"{ws}.model"),
                                           _layer_range(src["layer_range"], f"{ws}.layer_range"),
                                           _parse_parameters(src.get("parameters"), f"{ws}.parameters")))
            lengths = {x.num_layers for x in sources}
            if len(lengths) > 1:
                raise _fail(w, f"all sources of a slice must span the same number of layers, got "
                               f"{[list(x.layer_range) for x in sources]}")
            slices.append(OutputSlice(tuple(sources),
                                      _model_ref(s["base_model"], f"{w}.base_model") if s.get("base_model") else None,
                                      _parse_parameters(s.get("parameters"), f"{w}.parameters")))
        slices = tuple(slices)

    dtypes = {}
    for key in ("dtype", "out_dtype"):
        if raw.get(key) is not None:
            d = str(raw[key])
            if d not in DTYPES:
                raise _fail(f"{where}: {key}", f"unknown dtype {d!r}; supported: {', '.join(DTYPES)}")
            dtypes[key] = DTYPES[d]

    parameters = _parse_parameters(raw.get("parameters"), f"{where}: parameters")
    no_effect = {k: parameters.pop(k) for k in list(parameters) if k in NO_EFFECT}
    tok = raw.get("tokenizer_source")
    if tok is not None:
        tok = str(tok)
        if tok == "union":
            raise _fail(f"{where}: tokenizer_source", "`union` (merging vocabularies) is not supported; "
                                                      "use `base` or a model path")
    cfg = MergeConfig(
        merge_method=method, models=models, slices=slices,
        base_model=_model_ref(raw["base_model"], f"{where}: base_model") if raw.get("base_model") else None,
        parameters=parameters, dtype=dtypes.get("dtype"), out_dtype=dtypes.get("out_dtype"),
        tokenizer_source=tok, no_effect=no_effect, text=text, path=path,
    )
    _check_method_and_parameters(cfg, where)
    return cfg


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


# ---------------------------------------------------------------- methods

def _registry():
    from taskvec import methods

    return methods


def supported_methods() -> list[str]:
    return sorted(_registry().METHODS)


def _method_params(method: str) -> tuple[set[str], set[str]]:
    """(per-model, global) parameter names `method` accepts, aliases included."""
    spec = _registry().get_method(method)
    per_model = {n for p in spec.params if p.per_model for n in (p.name, *p.aliases)}
    global_ = {n for p in spec.params if not p.per_model for n in (p.name, *p.aliases)}
    # Set by taskvec itself, never by a config.
    return per_model - INTERNAL_PARAMS, global_ - INTERNAL_PARAMS


# Parameters of taskvec's methods that a mergekit config must not set: `semantics` is always "mergekit" here,
# `seed` comes from --seed, `threshold` is computed by the executor.
INTERNAL_PARAMS = {"semantics", "seed", "threshold"}


# Where mergekit 0.1.5's defaults differ from taskvec's, a mergekit config gets mergekit's: e.g. TIES without
# `density` keeps every entry in mergekit (density 1), while taskvec's own default is the paper's 0.2.
MERGEKIT_DEFAULTS: dict[str, dict[str, Any]] = {
    m: {"density": 1.0} for m in ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
                                  "della_linear")
}
# Parameters mergekit requires (no default): a tensor no filter gives a value to is an error, as in mergekit.
MERGEKIT_REQUIRED = {"weight", "t"}


def _uses_base(method: str) -> bool:
    """SLERP has no *required* base in taskvec, but a mergekit config's base_model is its t = 0 end."""
    return method != "passthrough" and (_registry().get_method(method).needs_base or method == "slerp")


def _check_method_and_parameters(cfg: MergeConfig, where: str) -> None:
    import warnings

    methods = supported_methods()
    if cfg.merge_method not in methods:
        hint = difflib.get_close_matches(cfg.merge_method, methods, n=1)
        raise _fail(f"{where}: merge_method", f"unknown method {cfg.merge_method!r}"
                    f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; supported: {', '.join(methods)}")
    if cfg.merge_method == "passthrough":
        return
    per_model, global_ = _method_params(cfg.merge_method)
    allowed = per_model | global_
    scopes: list[tuple[str, Mapping[str, Setting], bool]] = [("parameters", cfg.parameters, False)]
    for i, m in enumerate(cfg.models or ()):
        scopes.append((f"models[{i}] ({m.model}).parameters", m.parameters, True))
    for i, s in enumerate(cfg.slices or ()):
        scopes.append((f"slices[{i}].parameters", s.parameters, False))
        for j, src in enumerate(s.sources):
            scopes.append((f"slices[{i}].sources[{j}] ({src.model}).parameters", src.parameters, True))
    for scope, params, model_scope in scopes:
        for name in params:
            if name in NO_EFFECT:
                continue
            if name not in allowed:
                hint = difflib.get_close_matches(name, sorted(allowed), n=1)
                raise _fail(f"{where}: {scope}", f"{cfg.merge_method} has no parameter {name!r}"
                            f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; it accepts: "
                            f"{', '.join(sorted(allowed)) or 'none'}; accepted without effect: {', '.join(NO_EFFECT)}")
            if model_scope and name in global_:
                # mergekit reads global parameters only from the slice and top-level scopes; so do we.
                warnings.warn(f"{where}: {scope}: {name!r} is a global parameter of {cfg.merge_method}; "
                              "it has no effect here (as in mergekit) — set it under the top-level `parameters:`",
                              stacklevel=3)


# ---------------------------------------------------------------- plan

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
    if cfg.base_model and cfg.base_model not in counts and _uses_base(cfg.merge_method):
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

    needs_base = _uses_base(cfg.merge_method)
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


# ---------------------------------------------------------------- run

TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                   "added_tokens.json", "merges.txt", "vocab.json", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")


def run_config(config: str | os.PathLike | Mapping | MergeConfig, out: str | os.PathLike, *, device: str = "cpu",
               out_shard_size: int | str = "5B", copy_tokenizer: bool = True, seed: int = 0,
               progress: bool = True, name: str | None = None) -> Path:
    """Run a mergekit YAML config (path, YAML text, dict or `MergeConfig`) and write the merged model to `out`.

    `out` must not exist. It receives sharded safetensors + index, config.json,
    the tokenizer (from `tokenizer_source`, else the base model) when
    `copy_tokenizer`, the config as ``mergekit_config.yml`` and a README.md
    model card. Everything is written into a hidden folder beside `out` and
    renamed into place at the end: on any error nothing is left behind.
    `out_shard_size` is in bytes ("5B" = 5e9 bytes, as mergekit's
    --out-shard-size behaves).
    """
    from taskvec.io import check_output_path

    cfg = config if isinstance(config, MergeConfig) else parse_config(config)
    out = Path(out).expanduser().absolute()
    if out.exists():
        raise OutputError(f"{out}: already exists; choose a new folder (nothing was written)")
    opened = open_models(cfg)
    check_output_path(out, opened.values())
    plan = compile_config(cfg, opened)
    out_dtype = cfg.out_dtype or cfg.dtype

    tmp = out.with_name(f".{out.name}.taskvec-config-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _execute(plan, tmp, dtype=out_dtype, device=device, seed=seed, progress=progress,
                 max_shard_size=out_shard_size)
        _finish_folder(cfg, plan, opened, tmp, copy_tokenizer=copy_tokenizer, dtype=out_dtype)
        from taskvec.model_card import write_model_card

        write_model_card(tmp, cfg, name=name or out.name)
        if out.exists():
            raise OutputError(f"{out}: appeared while merging; the merge was discarded")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def plan_config(config: str | os.PathLike | Mapping | MergeConfig) -> CompiledMerge:
    """Parse a config and open its models (headers only): the plan `run_config` would execute."""
    cfg = config if isinstance(config, MergeConfig) else parse_config(config)
    return compile_config(cfg, open_models(cfg))


def _execute(plan: CompiledMerge, out: Path, *, dtype, device, seed, progress, max_shard_size) -> None:
    from taskvec import merging

    if plan.method == "passthrough":
        merging.passthrough(slices=plan.passthrough_slices, out=out, dtype=dtype, max_shard_size=max_shard_size,
                            progress=progress)
        return
    params = dict(plan.params)
    if "semantics" in _registry().get_method(plan.method).param_names:
        params["semantics"] = "mergekit"  # a mergekit config means mergekit's weighting (see taskvec.methods.ties)
    merging.merge(plan.base, plan.models, plan.method, out=out, dtype=dtype, device=device, seed=seed,
                  progress=progress, max_shard_size=max_shard_size, **params)


def _finish_folder(cfg: MergeConfig, plan: CompiledMerge, opened: Mapping[str, Any], folder: Path, *,
                   copy_tokenizer: bool, dtype: str | None) -> None:
    """config.json layer count and dtype, tokenizer files, the config itself."""
    import json

    cfg_path = folder / "config.json"
    if cfg_path.is_file():
        hf = json.loads(cfg_path.read_text())
        changed = False
        if "num_hidden_layers" in hf and plan.num_layers and hf["num_hidden_layers"] != plan.num_layers:
            hf["num_hidden_layers"] = plan.num_layers
            changed = True
        if dtype:
            for key in ("torch_dtype", "dtype"):
                if key in hf and hf[key] != dtype:
                    hf[key] = dtype
                    changed = True
        if changed:
            cfg_path.write_text(json.dumps(hf, indent=2) + "\n")

    donor_ref = cfg.tokenizer_source
    if donor_ref in (None, "base"):
        donor_ref = cfg.base_model or cfg.referenced_models()[0]
    donor = opened.get(donor_ref)
    if donor is None:  # tokenizer_source names a model that is not merged: open it just for the tokenizer
        donor_dir = Path(_model_path(donor_ref, cfg.path))
        if not donor_dir.is_dir():
            raise CheckpointError(f"{cfg.path or 'config'}: tokenizer_source {donor_ref!r} is not a model folder")
    else:
        donor_dir = donor.model_dir
    for f in TOKENIZER_FILES:
        (folder / f).unlink(missing_ok=True)
    if (copy_tokenizer or cfg.tokenizer_source) and donor_dir is not None:
        for f in TOKENIZER_FILES:
            if (Path(donor_dir) / f).is_file():
                shutil.copyfile(Path(donor_dir) / f, folder / f)
    (folder / "mergekit_config.yml").write_text(cfg.text if cfg.text.endswith("\n") else cfg.text + "\n")


# ---------------------------------------------------------------- CLI

def _build_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="taskvec merge",
        description="Merge models from a mergekit-compatible YAML config (the same file mergekit-yaml takes).",
        epilog="Methods: linear, task_arithmetic, ties, dare_ties, dare_linear, slerp, passthrough and the rest of "
               "taskvec.methods. mergekit's --allow-crimes, --lazy-unpickle and --cuda are accepted.",
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument("out", help="output folder (must not exist)")
    p.add_argument("--device", default="cpu", help="where to compute: cpu (default), cuda, cuda:1, ...")
    p.add_argument("--cuda", action="store_true", help="same as --device cuda (mergekit spelling)")
    p.add_argument("--out-shard-size", default="5B",
                   help="bytes per output shard: 5B (=5e9 bytes, the default, as mergekit), 1B, 500M, 2GB")
    p.add_argument("--copy-tokenizer", dest="copy_tokenizer", action="store_true", default=True,
                   help="copy the tokenizer from tokenizer_source or the base model (default)")
    p.add_argument("--no-copy-tokenizer", dest="copy_tokenizer", action="store_false")
    p.add_argument("--seed", type=int, default=0, help="seed for random methods (DARE); default 0")
    p.add_argument("--random-seed", dest="seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", "--quiet", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config and models, print the plan (per-layer parameter values), write nothing")
    for flag in ("--allow-crimes", "--lazy-unpickle", "--low-cpu-memory", "--trust-remote-code",
                 "--safe-serialization", "--write-model-card"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)  # mergekit muscle memory: no effect
    return p


def cli_main(argv: list[str]) -> int:
    """`taskvec merge CONFIG OUT [options]`: 0 on success, 1 on a clear error, 2 on bad usage."""
    args = _build_parser().parse_args(argv)
    device = "cuda" if args.cuda and args.device == "cpu" else args.device
    try:
        if args.dry_run:
            print(plan_config(args.config).describe())
            return 0
        out = run_config(args.config, args.out, device=device, out_shard_size=args.out_shard_size,
                         copy_tokenizer=args.copy_tokenizer, seed=args.seed, progress=args.progress)
    except TaskVecError as e:
        print(f"taskvec merge: error: {e}", file=sys.stderr)
        return 1
    print(f"merged into {out}")
    return 0
