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
* ``tokenizer:`` (``source: union | base | MODEL``, ``tokens:`` overrides, ``pad_to_multiple_of``) and the
  legacy ``tokenizer_source:``: the output vocabulary, every model's embedding / LM-head rows re-indexed to
  it before merging, exactly as mergekit 0.1.5 (`taskvec.config.tokenizer`);
* ``chat_template``: a template name mergekit ships, ``auto`` or a Jinja string, saved with the tokenizer;
* ``modules:`` with mergekit's single module ``default``; other modules (multi-module architectures) are
  refused, naming the module.

Every field of mergekit 0.1.5's schema and its status: `MERGEKIT_CONFIG_KEYS`
(benchmarks/results/mergekit_config_keys.md).

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

The package, in the order data flows through it:

* `taskvec.config.parse` — YAML -> `MergeConfig`, every key and value checked;
* `taskvec.config.plan` — `MergeConfig` + opened models -> `CompiledMerge`
  (slices, layer ranges and per-tensor parameter values resolved; `describe()`);
* `taskvec.config.tokenizer` — the vocabulary merge (pure functions on vocabularies) and chat templates;
* `taskvec.config.run` — `run_config`: execute the plan, write the folder atomically;
* `taskvec.config.cli` — ``taskvec merge``.

Every public name is importable from `taskvec.config` itself.
"""
from __future__ import annotations

# Re-exports: `taskvec.config` was one module and its names stay importable from here. A private helper is
# patched where it is defined (e.g. `taskvec.config.run._finish_folder`): a patch here would not reach its callers.
from taskvec.config.cli import cli_main
from taskvec.config.parse import (
    DTYPES,
    INTERNAL_PARAMS,
    MERGEKIT_CONFIG_KEYS,
    NO_EFFECT,
    NOT_SUPPORTED_KEYS,
    TOP_LEVEL_KEYS,
    Conditional,
    MergeConfig,
    ModelEntry,
    ModuleDef,
    OutputSlice,
    Scalar,
    Setting,
    SliceSource,
    parse_config,
    supported_methods,
)
from taskvec.config.plan import (
    MERGEKIT_DEFAULTS,
    MERGEKIT_REQUIRED,
    CompiledMerge,
    compile_config,
    evaluate_setting,
    is_constant,
    open_models,
    plan_config,
)
from taskvec.config.run import TOKENIZER_FILES, run_config
from taskvec.config.tokenizer import TokenEmbedding, TokenizerSpec, TokenSource
from taskvec.errors import CheckpointError, OutputError, ParameterError, TaskVecError

__all__ = [
    "parse_config", "plan_config", "compile_config", "open_models", "run_config", "cli_main",
    "MergeConfig", "ModelEntry", "SliceSource", "OutputSlice", "ModuleDef", "Conditional", "CompiledMerge", "Scalar",
    "Setting", "TokenizerSpec", "TokenEmbedding", "TokenSource", "MERGEKIT_CONFIG_KEYS",
    "evaluate_setting", "is_constant", "supported_methods",
    "TOP_LEVEL_KEYS", "NOT_SUPPORTED_KEYS", "NO_EFFECT", "DTYPES", "INTERNAL_PARAMS", "MERGEKIT_DEFAULTS",
    "MERGEKIT_REQUIRED", "TOKENIZER_FILES",
    "CheckpointError", "OutputError", "ParameterError", "TaskVecError",
]
