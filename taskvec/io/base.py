"""The one interface every checkpoint format hides behind.

A `Source` lists tensor names with their shapes and dtypes *without loading
anything*, and loads one tensor at a time on request. Everything downstream
(task vectors, merges, analysis) streams through this interface, so a merge
never holds more than a few tensors, whatever the model size.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


class Source:
    """A read-only checkpoint: names -> lazily loaded tensors.

    Subclasses implement `_index()` (name -> TensorMeta, cheap: headers only)
    and `get(name)`. `name` identifies the checkpoint in messages and
    provenance; `model_dir` is the folder holding config.json / tokenizer files
    (None when there is none, e.g. an in-memory state dict); `files` lists
    the on-disk files this source reads (outputs must never overwrite them).
    """

    name: str = "<source>"
    model_dir: Path | None = None
    files: tuple[Path, ...] = ()

    def _index(self) -> dict[str, TensorMeta]:
        raise NotImplementedError

    @property
    def index(self) -> dict[str, TensorMeta]:
        idx = getattr(self, "_cached_index", None)
        if idx is None:
            idx = self._index()
            self._cached_index = idx
        return idx

    def keys(self) -> list[str]:
        return list(self.index)

    def __contains__(self, key: object) -> bool:
        return key in self.index

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def meta(self, key: str) -> TensorMeta:
        try:
            return self.index[key]
        except KeyError:
            raise KeyError(f"{self.name}: no tensor named {key!r}") from None

    def get(self, key: str) -> torch.Tensor:
        """Load one tensor. Callers may not mutate it (it can be a view of the input)."""
        raise NotImplementedError

    def num_parameters(self, float_only: bool = True) -> int:
        return sum(m.numel for m in self.index.values() if m.is_float or not float_only)

    def config(self) -> dict | None:
        """The model's config.json as a dict, when the source has one."""
        if self.model_dir is None:
            return None
        p = Path(self.model_dir) / "config.json"
        if not p.is_file():
            return None
        import json

        return json.loads(p.read_text())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} tensors)"
