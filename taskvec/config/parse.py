"""Parse: a mergekit YAML config -> a typed, validated `MergeConfig`.

Reads the YAML (a path, YAML text or a loaded dict), checks every key and value
against what mergekit accepts, and checks the method and its parameter names
against taskvec's method registry. Errors name the file and the key
(``config.yml: slices[0].sources[1].layer_range: ...``) and suggest the
nearest valid name. Nothing here opens a model: that is `taskvec.config.plan`.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from taskvec.config.tokenizer import (
    TOKENIZER_SOURCES,
    TokenEmbedding,
    TokenizerSpec,
    TokenSource,
    resolve_chat_template,
)
from taskvec.errors import ParameterError

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
    tokenizer: TokenizerSpec | None = None  # the `tokenizer:` block, or `tokenizer_source:` as one
    chat_template: str | None = None
    modules: Mapping[str, "ModuleDef"] | None = None  # `modules:`, by module name
    no_effect: Mapping[str, Any] = field(default_factory=dict)  # accepted options that change nothing here
    text: str = ""  # the YAML as written, for the model card
    path: Path | None = None

    def referenced_models(self) -> list[str]:
        """Every model the config names, base first, in order of appearance, without repeats."""
        seen: dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for models, slices in [(self.models, self.slices)] + [(m.models, m.slices) for m in
                                                               (self.modules or {}).values()]:
            for m in models or ():
                seen[m.model] = None
            for s in slices or ():
                if s.base_model:
                    seen[s.base_model] = None
                for src in s.sources:
                    seen[src.model] = None
        return list(seen)

    def no_effect_reasons(self) -> dict[str, str]:
        """Why each accepted option in `no_effect` changes nothing here (for the model card)."""
        return {k: NO_EFFECT.get(k.rsplit(".", 1)[-1], "no effect in taskvec") for k in self.no_effect}

    def __repr__(self) -> str:
        form = (f"{len(self.models)} models" if self.models else f"{len(self.slices)} slices" if self.slices
                else f"modules {list(self.modules or ())}")
        return f"MergeConfig({self.merge_method!r}, {form}, base_model={self.base_model!r})"


@dataclass(frozen=True)
class ModuleDef:
    """One entry of ``modules:`` (mergekit's ``OutputModuleDefinition``): exactly one of models / slices."""

    models: tuple[ModelEntry, ...] | None = None
    slices: tuple[OutputSlice, ...] | None = None
    parameters: Mapping[str, Setting] = field(default_factory=dict)


TOP_LEVEL_KEYS = ("merge_method", "models", "slices", "modules", "base_model", "parameters", "dtype", "out_dtype",
                  "tokenizer_source", "tokenizer", "chat_template")
# mergekit keys taskvec refuses (key -> why); every key of mergekit 0.1.5's schema is supported, refused here or
# accepted without effect: benchmarks/results/mergekit_config_keys.md.
NOT_SUPPORTED_KEYS: dict[str, str] = {}
# The module name of a single-module architecture in mergekit (architecture/json_definitions.py: "default").
DEFAULT_MODULE = "default"
# Every field of mergekit 0.1.5's config schema (mergekit/config.py, tokenizer/config.py, common.py; the list is
# benchmarks/results/mergekit_config_fields.txt) -> (where it sits in the YAML, status, note). Statuses:
# supported | partial (part of the values refused, by name) | no effect (accepted, listed in the model card) | refused.
# benchmarks/results/mergekit_config_keys.md is this table; tests/test_config_tokenizer.py checks both.
MERGEKIT_CONFIG_KEYS: dict[str, tuple[str, str, str]] = {
    "MergeConfiguration.merge_method": ("merge_method", "supported", "every method in taskvec.methods"),
    "MergeConfiguration.models": ("models", "supported", ""),
    "MergeConfiguration.slices": ("slices", "supported", ""),
    "MergeConfiguration.modules": ("modules", "partial",
                                   "mergekit's single module `default` (one-module architectures); other module "
                                   "names (multi-module architectures: text_decoder, vision_tower, ...) refused, "
                                   "naming the module: taskvec has no architecture definitions"),
    "MergeConfiguration.base_model": ("base_model", "supported", ""),
    "MergeConfiguration.dtype": ("dtype", "supported", "taskvec computes in float32; sets the output dtype "
                                                       "unless out_dtype"),
    "MergeConfiguration.out_dtype": ("out_dtype", "supported", ""),
    "MergeConfiguration.parameters": ("parameters", "supported", "scalars, gradients, filter lists"),
    "MergeConfiguration.tokenizer_source": ("tokenizer_source", "supported", "union | base | model path"),
    "MergeConfiguration.tokenizer": ("tokenizer", "supported", "vocabulary merge (taskvec.config.tokenizer)"),
    "MergeConfiguration.chat_template": ("chat_template", "supported",
                                         "a name mergekit ships (alpaca, chatml, exaone, llama3, mistral), auto, "
                                         "or a Jinja string"),
    "InputModelDefinition.model": ("models[].model", "supported", ""),
    "InputModelDefinition.parameters": ("models[].parameters", "supported", ""),
    "InputSliceDefinition.model": ("slices[].sources[].model", "supported", ""),
    "InputSliceDefinition.layer_range": ("slices[].sources[].layer_range", "supported", ""),
    "InputSliceDefinition.parameters": ("slices[].sources[].parameters", "supported", ""),
    "OutputSliceDefinition.sources": ("slices[].sources", "supported", ""),
    "OutputSliceDefinition.base_model": ("slices[].base_model", "supported", ""),
    "OutputSliceDefinition.residual_weight": ("slices[].residual_weight", "no effect",
                                              "mergekit 0.1.5 parses it but never reads it; a warning says so"),
    "OutputSliceDefinition.parameters": ("slices[].parameters", "supported", ""),
    "OutputModuleDefinition.slices": ("modules.NAME.slices", "supported", "for module `default`"),
    "OutputModuleDefinition.models": ("modules.NAME.models", "supported", "for module `default`"),
    "OutputModuleDefinition.parameters": ("modules.NAME.parameters", "supported",
                                          "between the slice's and the global parameters, as in mergekit"),
    "ConditionalParameter.value": ("parameters.P[].value", "supported", ""),
    "ConditionalParameter.filter": ("parameters.P[].filter", "supported", "substring of the tensor name; `*`"),
    "TokenizerConfig.source": ("tokenizer.source", "supported", "union (default) | base | model path"),
    "TokenizerConfig.tokens": ("tokenizer.tokens", "supported", "token -> {source, force}"),
    "TokenizerConfig.pad_to_multiple_of": ("tokenizer.pad_to_multiple_of", "supported",
                                           "padding rows = mean of the real rows"),
    "TokenEmbeddingConfig.source": ("tokenizer.tokens.T.source", "supported",
                                    "model path | {kind: zero} | {kind: model_token, ...}; another kind is an "
                                    "error naming it"),
    "TokenEmbeddingConfig.force": ("tokenizer.tokens.T.force", "supported", ""),
    "ModelTokenEmbedding.kind": ("tokenizer.tokens.T.source.kind", "supported", "model_token"),
    "ModelTokenEmbedding.model": ("tokenizer.tokens.T.source.model", "supported",
                                  "must be one of the merged models"),
    "ModelTokenEmbedding.token_id": ("tokenizer.tokens.T.source.token_id", "supported", ""),
    "ModelTokenEmbedding.token": ("tokenizer.tokens.T.source.token", "supported", ""),
    "ZeroEmbedding.kind": ("tokenizer.tokens.T.source.kind", "supported", "zero"),
    "ModelReference.model": ("MODEL.model (long form)", "supported", "`PATH` or `{path: PATH}`"),
    "ModelReference.lora": ("MODEL.lora (long form)", "supported", "same as `PATH+LORA`"),
    "ModelReference.override_architecture": ("MODEL.override_architecture", "refused",
                                             "taskvec reads tensor names, not architectures"),
    "ModelPath.path": ("MODEL.model.path", "supported", ""),
    "ModelPath.revision": ("MODEL.model.revision", "refused",
                           "hub revisions can't be fetched; give the downloaded folder"),
}
# Options mergekit accepts that change nothing in taskvec (why, for the docs and the model card).
NO_EFFECT = {
    "int8_mask": "mergekit stores sign masks as int8 to save memory; taskvec's masks are already boolean",
    "residual_weight": "mergekit 0.1.5 parses a slice's residual_weight but never reads it; no effect here either",
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
                raise _fail(f"{where}[{i}]",
                            f"unknown key(s) {sorted(extra)}; a conditional value has `filter` and `value`")
            value = e["value"]
            w = f"{where}[{i}].value"
            value = tuple(_scalar(v, w) for v in value) if isinstance(value, list) else _scalar(value, w)
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


def _model_path_ref(x: Any, where: str) -> Any:
    """mergekit's ``ModelPath``: a string, or ``{path, revision}`` (a hub revision taskvec can't fetch: refused)."""
    if not isinstance(x, Mapping):
        return x
    _check_keys(x, ("path", "revision"), where)
    if x.get("revision") is not None:
        raise _fail(f"{where}.revision", "hub revisions are not supported (taskvec opens local folders and the "
                                         "default revision of hub ids); download that revision and give its folder")
    return x.get("path")


def _model_ref(x: Any, where: str) -> str:
    """A model reference: ``PATH``, ``PATH+LORA`` or mergekit's long form ``{model: {path}, lora: {path}}``."""
    if isinstance(x, Mapping) and "model" in x:  # mergekit's long form ModelReference
        _check_keys(x, ("model", "lora", "override_architecture"), where)
        if x.get("override_architecture") is not None:
            raise _fail(f"{where}.override_architecture", "not supported: taskvec reads tensor names, not "
                                                          "architectures; convert the model's config.json instead")
        lora = _model_path_ref(x.get("lora"), f"{where}.lora")
        x = _model_path_ref(x["model"], f"{where}.model")
        if isinstance(x, str) and isinstance(lora, str) and lora.strip():
            x = f"{x.strip()}+{lora.strip()}"
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


def _parse_models(x: Any, where: str) -> tuple[ModelEntry, ...]:
    """``models:`` — a list of ``- model: REF`` (mergekit's ``InputModelDefinition``)."""
    if not isinstance(x, list):
        raise _fail(where, "expected a list of `- model: ...` entries")
    models = []
    for i, m in enumerate(x):
        w = f"{where}[{i}]"
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, Mapping):
            raise _fail(w, f"expected `model: ...`, got {m!r}")
        _check_keys(m, ("model", "parameters"), w)
        models.append(ModelEntry(_model_ref(m.get("model"), f"{w}.model"),
                                 _parse_parameters(m.get("parameters"), f"{w}.parameters")))
    return tuple(models)


def _parse_slices(x: Any, where: str, no_effect: dict[str, Any]) -> tuple[OutputSlice, ...]:
    """``slices:`` — a list of ``- sources: [...]`` (mergekit's ``OutputSliceDefinition``)."""
    import warnings

    if not isinstance(x, list):
        raise _fail(where, "expected a list of `- sources: [...]` entries")
    slices = []
    for i, s in enumerate(x):
        w = f"{where}[{i}]"
        if not isinstance(s, Mapping):
            raise _fail(w, f"expected `sources: [...]`, got {s!r}")
        _check_keys(s, ("sources", "base_model", "parameters", "residual_weight"), w)
        if s.get("residual_weight") is not None:
            no_effect[f"{w.split(': ', 1)[-1]}.residual_weight"] = s["residual_weight"]
            warnings.warn(f"{w}.residual_weight: {NO_EFFECT['residual_weight']}", stacklevel=4)
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
    return tuple(slices)


def _parse_modules(x: Any, where: str, no_effect: dict[str, Any]) -> dict[str, ModuleDef]:
    """``modules:`` — module name -> ``{models | slices, parameters}`` (mergekit's ``OutputModuleDefinition``)."""
    if not isinstance(x, Mapping):
        raise _fail(where, "expected a mapping of module names to `{models: [...]}` or `{slices: [...]}`")
    out = {}
    for name, m in x.items():
        w = f"{where}.{name}"
        if not isinstance(m, Mapping):
            raise _fail(w, f"expected `models: [...]` or `slices: [...]`, got {m!r}")
        _check_keys(m, ("models", "slices", "parameters"), w)
        if bool(m.get("models")) == bool(m.get("slices")):
            raise _fail(w, "give exactly one of `models:` or `slices:` (as mergekit requires)")
        out[str(name)] = ModuleDef(
            models=_parse_models(m["models"], f"{w}.models") if m.get("models") else None,
            slices=_parse_slices(m["slices"], f"{w}.slices", no_effect) if m.get("slices") else None,
            parameters=_parse_parameters(m.get("parameters"), f"{w}.parameters"))
    return out


def _as_conditionals(setting: Setting) -> tuple[Conditional, ...]:
    if isinstance(setting, tuple) and setting and isinstance(setting[0], Conditional):
        return setting
    return (Conditional(value=setting),)


def _single_module(modules: Mapping[str, ModuleDef], parameters: Mapping[str, Setting], where: str):
    """(models, slices, parameters) of a ``modules:`` config taskvec can run: mergekit's single module ``default``.

    mergekit (plan.py ``normalize_config``) turns ``models:`` / ``slices:`` into the
    one module of a single-module architecture, named ``default``
    (architecture/json_definitions.py); a config that names it is that config.
    The module's ``parameters`` sit between the slice's and the global ones
    (config.py ``ConfigReader.parameter_sources``): each becomes the module's
    filter list followed by the global setting, so the first that gives a value
    wins, exactly as mergekit's resolver falls through. Other module names
    (``text_decoder``, ``vision_tower``, ...) come from mergekit's multi-module
    architecture definitions (a weight prefix and layer templates per module),
    which taskvec does not have: refused, naming the module.
    """
    other = [n for n in modules if n != DEFAULT_MODULE]
    if other:
        raise _fail(f"{where}.{other[0]}", f"module {other[0]!r} is not supported: taskvec has no multi-module "
                    "architecture definitions (mergekit's give each module a weight prefix and layer templates); "
                    f"only mergekit's single module {DEFAULT_MODULE!r} (the whole model) runs here; merge the whole "
                    "model with `models:` / `slices:` instead")
    mod = modules[DEFAULT_MODULE]
    merged = dict(parameters)
    for name, setting in mod.parameters.items():
        merged[name] = (_as_conditionals(setting) + _as_conditionals(parameters[name]) if name in parameters
                        else setting)
    return mod.models, mod.slices, merged


TOKEN_SOURCE_KINDS = ("model_token", "zero")


def _parse_tokenizer(x: Any, where: str) -> TokenizerSpec:
    """The ``tokenizer:`` block (mergekit/tokenizer/config.py ``TokenizerConfig``): source, tokens, pad_to_multiple_of."""
    if not isinstance(x, Mapping):
        raise _fail(where, f"expected `source: union | base | MODEL` and optional `tokens:`, got {x!r}")
    _check_keys(x, ("source", "tokens", "pad_to_multiple_of"), where)
    src = x.get("source", "union")
    src = src if src in TOKENIZER_SOURCES else _model_ref(src, f"{where}.source")
    pad = x.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise _fail(f"{where}.pad_to_multiple_of", f"expected a positive integer, got {pad!r}")
    tokens_raw = x.get("tokens") or {}
    if not isinstance(tokens_raw, Mapping):
        raise _fail(f"{where}.tokens", f"expected a mapping of token -> {{source: ..., force: ...}}, got {tokens_raw!r}")
    tokens = {}
    for tok, e in tokens_raw.items():
        w = f"{where}.tokens[{tok!r}]"
        if e is None:
            e = {}
        if not isinstance(e, Mapping):
            raise _fail(w, f"expected `{{source: ..., force: ...}}`, got {e!r}")
        _check_keys(e, ("source", "force"), w)
        force = e.get("force", False)
        if not isinstance(force, bool):
            raise _fail(f"{w}.force", f"expected true or false, got {force!r}")
        tokens[str(tok)] = TokenEmbedding(_token_source(e.get("source"), f"{w}.source"), force)
    return TokenizerSpec(source=src, tokens=tokens, pad_to_multiple_of=pad)


def _token_source(x: Any, where: str) -> TokenSource | None:
    """A token's ``source``: MODEL | {kind: zero} | {kind: model_token, model, token | token_id} (config.py)."""
    if x is None:
        return None
    if isinstance(x, str):
        return TokenSource("model", _model_ref(x, where))
    if not isinstance(x, Mapping):
        raise _fail(where, f"expected a model, `{{kind: zero}}` or `{{kind: model_token, ...}}`, got {x!r}")
    kind = x.get("kind")
    if kind is None and "model" in x:  # mergekit's long model reference {model: {path: ...}}
        return TokenSource("model", _model_ref(x, where))
    if kind not in TOKEN_SOURCE_KINDS:
        hint = difflib.get_close_matches(str(kind), TOKEN_SOURCE_KINDS, n=1)
        raise _fail(f"{where}.kind", f"unknown token source kind {kind!r}"
                    f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; supported: {', '.join(TOKEN_SOURCE_KINDS)} "
                    "(or a model path)")
    if kind == "zero":
        _check_keys(x, ("kind",), where)
        return TokenSource("zero")
    _check_keys(x, ("kind", "model", "token_id", "token"), where)
    if "model" not in x:
        raise _fail(where, "`model` is missing (kind: model_token takes `model` and `token` or `token_id`)")
    token_id, token = x.get("token_id"), x.get("token")
    if (token_id is None) == (token is None):
        raise _fail(where, "give exactly one of `token_id` or `token` (as mergekit requires)")
    if token_id is not None and (not isinstance(token_id, int) or isinstance(token_id, bool)):
        raise _fail(f"{where}.token_id", f"expected an integer, got {token_id!r}")
    return TokenSource("model_token", _model_ref(x["model"], f"{where}.model"), token_id,
                       None if token is None else str(token))


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
            raise _fail(f"{where}: {k}", NOT_SUPPORTED_KEYS[k])
    _check_keys(raw, TOP_LEVEL_KEYS, where)
    if "merge_method" not in raw:
        raise _fail(where, "`merge_method` is missing")
    method = str(raw["merge_method"])
    if sum(bool(raw.get(k)) for k in ("models", "slices", "modules")) != 1:
        raise _fail(where, "give exactly one of `models:`, `slices:` or `modules:`")

    no_effect: dict[str, Any] = {}
    models = _parse_models(raw["models"], f"{where}: models") if raw.get("models") else None
    slices = _parse_slices(raw["slices"], f"{where}: slices", no_effect) if raw.get("slices") else None
    modules = _parse_modules(raw["modules"], f"{where}: modules", no_effect) if raw.get("modules") else None
    dtypes = {}
    for key in ("dtype", "out_dtype"):
        if raw.get(key) is not None:
            d = str(raw[key])
            if d not in DTYPES:
                raise _fail(f"{where}: {key}", f"unknown dtype {d!r}; supported: {', '.join(DTYPES)}")
            dtypes[key] = DTYPES[d]

    parameters = _parse_parameters(raw.get("parameters"), f"{where}: parameters")
    no_effect.update({k: parameters.pop(k) for k in list(parameters) if k in NO_EFFECT})
    tok = raw.get("tokenizer_source")
    tokenizer = None
    if tok is not None:
        if raw.get("tokenizer") is not None:
            raise _fail(where, "give `tokenizer_source:` or `tokenizer:`, not both (mergekit refuses both too)")
        tok = tok if tok in TOKENIZER_SOURCES else _model_ref(tok, f"{where}: tokenizer_source")
        tokenizer = TokenizerSpec(source=tok)
    elif raw.get("tokenizer") is not None:
        tokenizer = _parse_tokenizer(raw["tokenizer"], f"{where}: tokenizer")
    chat_template = raw.get("chat_template")
    if chat_template is not None and not isinstance(chat_template, str):
        raise _fail(f"{where}: chat_template", f"expected a template name, `auto` or a Jinja string, got "
                                                f"{chat_template!r}")
    resolve_chat_template(chat_template, [], where)  # a name mergekit ships or a Jinja template: checked now
    if modules is not None:
        models, slices, parameters = _single_module(modules, parameters, f"{where}: modules")
    cfg = MergeConfig(
        merge_method=method, models=models, slices=slices, modules=modules,
        base_model=_model_ref(raw["base_model"], f"{where}: base_model") if raw.get("base_model") else None,
        parameters=parameters, dtype=dtypes.get("dtype"), out_dtype=dtypes.get("out_dtype"),
        tokenizer_source=tok, tokenizer=tokenizer, chat_template=chat_template or None, no_effect=no_effect,
        text=text, path=path,
    )
    _check_method_and_parameters(cfg, where)
    return cfg

# ---------------------------------------------------------------- methods and their parameters

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
