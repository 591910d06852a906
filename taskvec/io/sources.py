"""Checkpoint sources: every format behind the one `Source` interface.

`open_source(x)` accepts a `.safetensors` file, a sharded safetensors folder
(`model.safetensors.index.json`), a Hugging Face model folder or hub id, a
`.bin`/`.pt` state dict (loaded with `weights_only=True`), an in-memory state
dict, an `nn.Module`, or a PEFT LoRA adapter folder (which needs `base=`).
"""
from __future__ import annotations

import json
import mmap
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from taskvec._memory import release_freed_tensors_promptly
from taskvec.errors import CheckpointError, KeyMismatchError
from taskvec.io.base import Source, TensorMeta
from taskvec.io.safetensors_format import element_size, read_header

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
ADAPTER_CONFIG = "adapter_config.json"


class SafetensorsSource(Source):
    """One or more safetensors files, memory-mapped; tensors are zero-copy views.

    Files are mapped copy-on-write, so even a caller that writes into a
    returned tensor can never modify the checkpoint on disk.
    """

    def __init__(self, files: list[Path], name: str | None = None, model_dir: Path | None = None,
                 weight_map: Mapping[str, str] | None = None, index_path: Path | None = None):
        self.files = tuple(Path(f) for f in files)
        self.name = name or str(self.files[0])
        self.model_dir = model_dir
        self._weight_map = weight_map
        self._index_path = index_path
        self._where: dict[str, tuple[Path, int]] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self.metadata: dict[str, str] = {}

    def _index(self) -> dict[str, TensorMeta]:
        index: dict[str, TensorMeta] = {}
        for f in self.files:
            if not f.is_file():
                where = f" (listed in {self._index_path})" if self._index_path else ""
                raise CheckpointError(f"{f}: shard file not found{where}")
            header = read_header(f)
            self.metadata.update(header.metadata)
            for k, m in header.metas.items():
                if k in index:
                    raise CheckpointError(f"{f}: tensor {k!r} also appears in {self._where[k][0]}")
                index[k] = m
                self._where[k] = (f, header.offsets[k])
        if self._weight_map is not None:
            for k, shard in self._weight_map.items():
                if k not in index:
                    raise CheckpointError(f"{self._index_path}: tensor {k!r} is mapped to {shard}, which does not contain it")
        return index

    def get(self, key: str) -> torch.Tensor:
        meta = self.meta(key)
        path, offset = self._where[key]
        mm = self._maps.get(path)
        if mm is None:
            with open(path, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if os.fstat(fh.fileno()).st_size else None
            self._maps[path] = mm
        n = meta.numel
        if n == 0:
            return torch.empty(meta.shape, dtype=meta.dtype)
        if offset % element_size(meta.dtype):  # unaligned: copy rather than make a misaligned view
            raw = bytearray(mm[offset: offset + n * element_size(meta.dtype)])
            return torch.frombuffer(raw, dtype=meta.dtype, count=n).reshape(meta.shape)
        return torch.frombuffer(mm, dtype=meta.dtype, count=n, offset=offset).reshape(meta.shape)

    def __getstate__(self):  # mmaps don't pickle; reopen lazily in the new process
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state


class StateDictSource(Source):
    """An in-memory state dict (or anything mapping names to tensors)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], name: str = "<state_dict>", model_dir: Path | None = None,
                 files: tuple[Path, ...] = ()):
        bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{name}: entry {bad[0]!r} is a {type(state_dict[bad[0]]).__name__}, not a tensor")
        self._sd = state_dict
        self.name = name
        self.model_dir = model_dir
        self.files = files

    def _index(self) -> dict[str, TensorMeta]:
        return {k: TensorMeta(tuple(v.shape), v.dtype) for k, v in self._sd.items()}

    def get(self, key: str) -> torch.Tensor:
        self.meta(key)
        return self._sd[key].detach()


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes)")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) format can't be mmapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — re-raised with the file named
        kind = "refused: it is not a plain tensor state dict (weights_only=True; it may try to run code)" \
            if "weights_only" in str(e) or "Unsupported global" in str(e) else "can't be read"
        raise CheckpointError(f"{path}: {kind}: {str(e).splitlines()[0][:300]}") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a state dict")
    return dict(obj)


class TorchFileSource(StateDictSource):
    """A `.bin`/`.pt` state dict (or a sharded set), loaded with weights_only=True and mmap where possible."""

    def __init__(self, files: list[Path], name: str | None = None, model_dir: Path | None = None):
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            part = _torch_load(Path(f))
            dup = set(part) & set(sd)
            if dup:
                raise CheckpointError(f"{f}: tensor {sorted(dup)[0]!r} appears in more than one shard")
            sd.update(part)
        super().__init__(sd, name or str(files[0]), model_dir, tuple(Path(f) for f in files))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


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
        from taskvec.io.lora import LoraSource

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
        f"{d}: no checkpoint found (looked for {SAFE_INDEX}, {SAFE_SINGLE}, {BIN_INDEX}, {BIN_SINGLE}, *.safetensors, {ADAPTER_CONFIG})"
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
                return SafetensorsSource([p], name or str(p), p.parent if (p.parent / "config.json").is_file() else None)
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
