"""PEFT LoRA adapters as checkpoints: τ = (alpha / r) · B·A per target module.

A LoRA adapter *is* a task vector. `LoraSource` reads one against its base:
as weights it yields θ₀ + ΔW (so it can stand anywhere a model can), and
`delta(key)` yields ΔW exactly (what `TaskVector.from_models` uses, so the
task vector of an adapter is B·A·scale to the last bit, not (θ₀+ΔW)−θ₀).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from taskvec.errors import CheckpointError
from taskvec.io.base import Source, TensorMeta
from taskvec.io.readers import SafetensorsSource, TorchFileSource, _read_json

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"  # what marks a folder as a PEFT adapter


def _pattern_value(module: str, patterns: dict, default):
    # PEFT's rule: a pattern key matches a module name at a dot boundary, as a regex suffix.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraSource(Source):
    def __init__(self, adapter_dir: str | Path, base: Source):
        d = Path(adapter_dir)
        self.adapter_dir = d
        self.base = base
        self.name = f"{base.name} + LoRA {d}"
        self.model_dir = base.model_dir
        cfg = _read_json(d / ADAPTER_CONFIG)
        if not isinstance(cfg, dict) or "r" not in cfg:
            raise CheckpointError(f"{d / ADAPTER_CONFIG}: not a LoRA adapter config (no 'r')")
        if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
            raise CheckpointError(f"{d / ADAPTER_CONFIG}: peft_type {cfg.get('peft_type')!r} is not supported "
                                  "(LORA only)")
        self.cfg = cfg
        if (d / "adapter_model.safetensors").is_file():
            weights: Source = SafetensorsSource([d / "adapter_model.safetensors"], str(d))
        elif (d / "adapter_model.bin").is_file():
            weights = TorchFileSource([d / "adapter_model.bin"], str(d))
        else:
            raise CheckpointError(f"{d}: no adapter_model.safetensors or adapter_model.bin")
        self.adapter = weights
        self.files = tuple(base.files) + tuple(weights.files)
        self._lora: dict[str, tuple[str, str, float, bool]] = {}  # base key -> (A key, B key, scale, transpose)
        self._full: dict[str, str] = {}  # base key -> adapter key holding a full replacement (modules_to_save)
        self._map_keys()

    def _base_key(self, module: str, suffix: str = ".weight") -> str:
        keys = self.base.index
        want = module + suffix
        if want in keys:
            return want
        # The adapter may have been trained on a wrapper (e.g. BertForSequenceClassification: "bert.encoder…")
        # while the base was saved bare ("encoder…"), or the other way round.
        hits = [k for k in keys if k.endswith("." + want) or want.endswith("." + k)]
        if len(hits) == 1:
            return hits[0]
        why = "no" if not hits else f"{len(hits)} ambiguous ({hits[:3]})"
        raise CheckpointError(
            f"{self.adapter_dir}: LoRA target module {module!r} has {why} matching weight in the base model "
            f"{self.base.name}"
        )

    def _map_keys(self) -> None:
        cfg = self.cfg
        for key in self.adapter.keys():
            k = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            m = re.match(r"(.*)\.lora_(A|embedding_A)(?:\.[^.]+)?(?:\.weight)?$", k)
            if m:
                module, kind = m.group(1), m.group(2)
                b_key = key.replace(".lora_A", ".lora_B").replace(".lora_embedding_A", ".lora_embedding_B")
                if b_key not in self.adapter.index:
                    raise CheckpointError(f"{self.adapter_dir}: {key!r} has no matching {b_key!r}")
                r = _pattern_value(module, cfg.get("rank_pattern"), cfg["r"])
                alpha = _pattern_value(module, cfg.get("alpha_pattern"), cfg.get("lora_alpha", r))
                scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
                # Conv1D (GPT-2) stores W as [in, out]; embeddings store ΔW as (B·A)ᵀ.
                transpose = kind == "embedding_A" or bool(cfg.get("fan_in_fan_out"))
                self._lora[self._base_key(module)] = (key, b_key, scale, transpose)
            elif ".lora_B" in k or ".lora_embedding_B" in k:
                continue
            else:  # modules_to_save / trained biases: full replacement tensors
                k = k.replace(".modules_to_save.default", "")
                self._full[self._base_key(k.rsplit(".", 1)[0], "." + k.rsplit(".", 1)[1])] = key
        if not self._lora and not self._full:
            raise CheckpointError(f"{self.adapter_dir}: the adapter holds no LoRA weights")

    def _index(self) -> dict[str, TensorMeta]:
        return dict(self.base.index)

    def delta(self, key: str) -> torch.Tensor | None:
        """ΔW for `key` in float32, or None if the adapter leaves it untouched."""
        if key in self._lora:
            a_key, b_key, scale, transpose = self._lora[key]
            a = self.adapter.get(a_key).float()
            b = self.adapter.get(b_key).float()
            d = (b @ a) * scale
            d = d.T if transpose else d
            want = self.base.meta(key).shape
            if tuple(d.shape) != want:
                raise CheckpointError(f"{self.adapter_dir}: LoRA update for {key!r} has shape {tuple(d.shape)}, "
                                      f"base has {want}")
            return d
        if key in self._full:
            return self.adapter.get(self._full[key]).float() - self.base.get(key).float()
        return None

    @property
    def touched(self) -> list[str]:
        return list(self._lora) + list(self._full)

    def get(self, key: str) -> torch.Tensor:
        base = self.base.get(key)
        if key in self._full:
            return self.adapter.get(self._full[key]).to(base.dtype)
        d = self.delta(key)
        return base if d is None else (base.float() + d).to(base.dtype)
