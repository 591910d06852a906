"""Checkpoint sources: `open_source` picks the reader for whatever names or holds a checkpoint.

`open_source(x)` accepts a `.safetensors` file, a sharded safetensors folder
(`model.safetensors.index.json`), a Hugging Face model folder or hub id, a
`.bin`/`.pt` state dict (loaded with `weights_only=True`), an in-memory state
dict, an `nn.Module`, or a PEFT LoRA adapter folder (which needs `base=`).
The readers themselves are in `taskvec.io.readers` and `taskvec.io.lora`
(their names stay importable from here).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from taskvec._memory import release_freed_tensors_promptly
from taskvec.errors import CheckpointError, KeyMismatchError
from taskvec.io.base import Source
from taskvec.io.lora import ADAPTER_CONFIG, LoraSource
from taskvec.io.readers import SafetensorsSource, StateDictSource, TorchFileSource, _read_json

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


def _sharded(index_path: Path, model_dir: Path, name: str | None, kind: str) -> Source:
    index = _read_json(index_path)
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index_path}: no 'weight_map' in the index")
    shards = sorted(set(wm.values()))
    files = [model_dir / s for s in shards]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: shard file not found (listed in {index_path})")
    if kind == "safetensors":
        return SafetensorsSource(files, name or str(model_dir), model_dir, weight_map=wm, index_path=index_path)
    return TorchFileSource(files, name or str(model_dir), model_dir)


def _from_dir(d: Path, name: str | None = None, base: Any = None) -> Source:
    if (d / ADAPTER_CONFIG).is_file():
        if base is None:
            raise CheckpointError(f"{d}: is a LoRA adapter; pass base= (the model it adapts) to read it as weights")
        return LoraSource(d, open_source(base))
    if (d / SAFE_INDEX).is_file():
        return _sharded(d / SAFE_INDEX, d, name, "safetensors")
    if (d / SAFE_SINGLE).is_file():
        return SafetensorsSource([d / SAFE_SINGLE], name or str(d), d)
    if (d / BIN_INDEX).is_file():
        return _sharded(d / BIN_INDEX, d, name, "bin")
    if (d / BIN_SINGLE).is_file():
        return TorchFileSource([d / BIN_SINGLE], name or str(d), d)
    singles = sorted(d.glob("*.safetensors"))
    if singles:  # a folder of safetensors files without an index
        return SafetensorsSource(singles, name or str(d), d)
    raise CheckpointError(
        f"{d}: no checkpoint found (looked for {SAFE_INDEX}, {SAFE_SINGLE}, {BIN_INDEX}, {BIN_SINGLE}, "
        f"*.safetensors, {ADAPTER_CONFIG})"
    )


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def download_from_hub(repo_id: str, revision: str | None = None) -> Path:
    """Fetch a hub model's weights, config and tokenizer (not other formats) into the HF cache."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - transformers depends on it
        raise CheckpointError(f"{repo_id}: huggingface_hub is needed to load hub ids") from e
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*.jinja"]
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"{repo_id}: not a local path, and downloading it from the Hugging Face hub failed "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    p = Path(path)
    if not any(p.glob("*.safetensors")):  # old repos only ship .bin
        try:
            path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns + ["*.bin"])
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{repo_id}: hub download failed ({e})") from None
    return Path(path)


def open_source(x: Any, *, base: Any = None, name: str | None = None) -> Source:
    """Turn anything that names or holds a checkpoint into a `Source`."""
    release_freed_tensors_promptly()  # every streaming pass starts by opening a checkpoint
    if isinstance(x, Source):
        return x
    if isinstance(x, torch.nn.Module):
        return StateDictSource(x.state_dict(), name or f"<{type(x).__name__}>",
                               _module_dir(x))
    if isinstance(x, Mapping):
        return StateDictSource(x, name or "<state_dict>")
    if isinstance(x, (str, os.PathLike)):
        p = Path(x).expanduser()
        if p.is_dir():
            return _from_dir(p.resolve(), name, base)
        if p.is_file() or p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"):
            if not p.is_file():
                raise CheckpointError(f"{p}: file not found")
            p = p.resolve()
            if p.suffix == ".safetensors":
                model_dir = p.parent if (p.parent / "config.json").is_file() else None
                return SafetensorsSource([p], name or str(p), model_dir)
            if p.name.endswith(".index.json"):
                kind = "safetensors" if "safetensors" in p.name else "bin"
                return _sharded(p, p.parent, name, kind)
            if p.suffix in (".bin", ".pt", ".pth", ".ckpt"):
                return TorchFileSource([p], name or str(p), p.parent if (p.parent / "config.json").is_file() else None)
            raise CheckpointError(f"{p}: unknown checkpoint format (expected .safetensors, .bin, .pt or a folder)")
        s = str(x)
        if _HUB_ID.match(s) and not s.startswith((".", "/", "~")):
            return _from_dir(download_from_hub(s), name or s, base)
        raise CheckpointError(f"{x}: no such file or directory")
    raise CheckpointError(f"can't read a checkpoint from a {type(x).__name__}")


def _module_dir(module: torch.nn.Module) -> Path | None:
    path = getattr(getattr(module, "config", None), "_name_or_path", None) or getattr(module, "name_or_path", None)
    return Path(path) if path and Path(path).is_dir() else None


def check_same_keys(a: Source, b: Source, *, what: str = "") -> None:
    """Raise KeyMismatchError naming the first differing key(s)."""
    ka, kb = set(a.keys()), set(b.keys())
    if ka == kb:
        return
    only_a, only_b = sorted(ka - kb), sorted(kb - ka)
    parts = []
    if only_a:
        parts.append(f"{len(only_a)} only in {a.name} (e.g. {only_a[:3]})")
    if only_b:
        parts.append(f"{len(only_b)} only in {b.name} (e.g. {only_b[:3]})")
    raise KeyMismatchError(f"{what}tensor names differ: " + "; ".join(parts))
