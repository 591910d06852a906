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
from taskvec.config.plan import CompiledMerge, _is_pre_weight, _model_path, compile_config, open_models
from taskvec.config.tokenizer import (
    TOKENIZER_SOURCES,
    VocabularyMerge,
    build_output_tokenizer,
    resolve_chat_template,
)
from taskvec.errors import CheckpointError, OutputError, ParameterError
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
    vocab = merge_vocabulary(cfg, opened)
    if vocab is not None:  # embeddings / LM heads re-indexed to the output vocabulary before merging
        opened = vocab.wrap()
    plan = compile_config(cfg, opened)
    out_dtype = cfg.out_dtype or cfg.dtype

    tmp = out.with_name(f".{out.name}.taskvec-config-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _execute(plan, tmp, dtype=out_dtype, device=device, seed=seed, progress=progress,
                 max_shard_size=out_shard_size)
        _finish_folder(cfg, plan, opened, tmp, copy_tokenizer=copy_tokenizer, dtype=out_dtype, vocab=vocab)
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


def merge_vocabulary(cfg: MergeConfig, opened: Mapping[str, Any]) -> VocabularyMerge | None:
    """The output vocabulary of a config with ``tokenizer:`` / ``tokenizer_source:`` (None: nothing to re-index).

    mergekit (plan.py ``MergePlanner``) builds the output tokenizer whenever either
    key is set and re-indexes every model's embeddings and LM head to it. For
    ``tokenizer_source: base | MODEL`` where every model's vocabulary is already
    the output's (identity permutations, no ``tokens:``), taskvec copies the
    tokenizer files instead (same vocabulary and rows; mergekit re-serialises
    them), and it does so too when they can't be loaded but every model has the
    same vocabulary size.
    """
    spec = cfg.tokenizer
    if spec is None:
        return None
    where = str(cfg.path) if cfg.path else "config"
    refs = cfg.referenced_models()
    for tok, e in spec.tokens.items():
        if e.source is not None and e.source.model is not None and e.source.model not in refs:
            raise ParameterError(f"{where}: tokenizer.tokens[{tok!r}].source: model {e.source.model!r} is not one "
                                 f"of the config's models ({', '.join(refs)}); a token's row must come from a merged "
                                 "model")
    dirs = {r: opened[r].model_dir for r in refs}
    if spec.source not in TOKENIZER_SOURCES and spec.source not in dirs:
        p = Path(_model_path(spec.source, cfg.path))
        if not p.is_dir():
            key = "tokenizer_source" if cfg.tokenizer_source else "tokenizer.source"
            raise CheckpointError(f"{where}: {key}: {spec.source!r} is not a model folder")
        dirs[spec.source] = p
    legacy = cfg.tokenizer_source is not None and cfg.tokenizer_source != "union"
    sizes = {tuple(s.index[k].shape) for s in opened.values() for k in s.keys()
             if "embed" in k and s.index[k].shape}
    try:
        info = build_output_tokenizer(spec, cfg.base_model or refs[0], refs, dirs, where)
    except ParameterError:
        if legacy and len(sizes) <= 1:
            return None
        raise
    identity = all(all(k == v for k, v in p.items()) and len(p) == len(info.original_vocabs.get(m, p))
                   and info.vocab_sizes.get(m, info.size) == info.size for m, p in info.permutations.items())
    if legacy and identity and not spec.tokens and not spec.pad_to_multiple_of:
        return None
    slices = cfg.slices or ()
    if cfg.models is not None:  # mergekit adds the base to a `models:` list that omits it (plan.py normalize_config)
        first = last = ([m.model for m in cfg.models] + (
            [cfg.base_model] if cfg.base_model and cfg.base_model not in {m.model for m in cfg.models} else []),
            cfg.base_model)
    else:
        first, last = [([src.model for src in s.sources], s.base_model or cfg.base_model)
                       for s in (slices[0], slices[-1])]
    return VocabularyMerge(info, spec, cfg.base_model, opened,
                           lambda name: first if _is_pre_weight(name) else last)


def _finish_folder(cfg: MergeConfig, plan: CompiledMerge, opened: Mapping[str, Any], folder: Path, *,
                   copy_tokenizer: bool, dtype: str | None, vocab: VocabularyMerge | None = None) -> None:
    """config.json layer count, dtype and vocab_size, tokenizer files, the config itself."""
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
        if vocab is not None:  # mergekit/merge.py _update_config_vocab
            holder = hf["text_config"] if "vocab_size" not in hf and isinstance(hf.get("text_config"), dict) else hf
            if holder.get("vocab_size") != vocab.size:
                holder["vocab_size"] = vocab.size
                changed = True
        if changed:
            cfg_path.write_text(json.dumps(hf, indent=2) + "\n")

    donor_ref = cfg.tokenizer_source
    if donor_ref in (None, *TOKENIZER_SOURCES):
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
    where = str(cfg.path) if cfg.path else "config"
    template = None
    if cfg.chat_template and (vocab is not None or copy_tokenizer or cfg.tokenizer_source):
        template = resolve_chat_template(cfg.chat_template, [opened[r].model_dir for r in cfg.referenced_models()],
                                         where)
    elif cfg.chat_template:
        import warnings

        warnings.warn(f"{where}: chat_template: no tokenizer is written (--no-copy-tokenizer), so the chat template "
                      "is not saved either (as in mergekit)", stacklevel=3)
    if vocab is not None:  # mergekit/merge.py run_merge: the built tokenizer, with the chat template, re-serialised
        if template is not None:
            vocab.info.tokenizer.chat_template = template
        vocab.info.tokenizer.save_pretrained(str(folder))
    elif template is not None and donor_dir is not None:  # merge.py _copy_tokenizer: re-serialised with the template
        from taskvec.config.tokenizer import _load_tokenizer

        tok = _load_tokenizer(Path(donor_dir), f"{where}: chat_template")
        tok.chat_template = template
        tok.save_pretrained(str(folder))
    elif (copy_tokenizer or cfg.tokenizer_source) and donor_dir is not None:
        for f in TOKENIZER_FILES:
            if (Path(donor_dir) / f).is_file():
                shutil.copyfile(Path(donor_dir) / f, folder / f)
    (folder / "mergekit_config.yml").write_text(cfg.text if cfg.text.endswith("\n") else cfg.text + "\n")
