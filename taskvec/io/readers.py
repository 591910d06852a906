"""The concrete readers behind `Source`: safetensors files, torch state-dict files, in-memory state dicts.

Each reads one storage format and nothing more; choosing the reader for a path,
a folder or a hub id is `taskvec.io.sources.open_source`. Kept apart from that
dispatch so that readers built from other readers (`taskvec.io.lora`) can use
them without importing the dispatch that in turn chooses them.
"""
from __future__ import annotations

import json
import mmap
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from taskvec.errors import CheckpointError
from taskvec.io.base import Source, TensorMeta
from taskvec.io.safetensors_format import element_size, read_header


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
                    raise CheckpointError(f"{self._index_path}: tensor {k!r} is mapped to {shard}, "
                                          "which does not contain it")
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

    def __init__(self, state_dict: Mapping[str, torch.Tensor], name: str = "<state_dict>",
                 model_dir: Path | None = None, files: tuple[Path, ...] = ()):
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
