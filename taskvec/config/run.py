"""Run: execute a config's plan and write the merged model folder, atomically.

`run_config` parses and plans (`taskvec.config.parse`, `taskvec.config.plan`),
streams the merge through taskvec's executor (`taskvec.merging`) into a hidden
folder beside the output, completes it as a Hugging Face model folder
(config.json layer count and dtype, tokenizer, the config itself, a model card)
and renames it into place; on any error nothing is left behind.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from taskvec.config.parse import MergeConfig, _registry, parse_config
from taskvec.config.plan import CompiledMerge, _model_path, compile_config, open_models
from taskvec.errors import CheckpointError, OutputError
from taskvec.model_card import write_model_card

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
        write_model_card(tmp, cfg, name=name or out.name)
        if out.exists():
            raise OutputError(f"{out}: appeared while merging; the merge was discarded")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out



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
