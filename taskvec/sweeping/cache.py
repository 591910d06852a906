"""The sweep cache: one small JSON per evaluated point, keyed by what determines its result.

The key hashes the inputs' fingerprints (name, size and mtime of every file a
model reads: rewriting a checkpoint invalidates its points), the point's method,
models and parameters, and the evaluator's identity. Each entry is written
atomically as its point finishes, so a killed sweep resumes where it stopped
and a rerun evaluates only the points it lacks.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from taskvec.errors import OutputError, ParameterError

CACHE_VERSION = 1


def fingerprint_input(model: Any) -> Any:
    """What identifies a model's weights without reading them: its files' names, sizes and mtimes.

    A state dict (small, in memory) is hashed by content; a name that is not a local path (a hub id)
    stands for itself.
    """
    from taskvec.io import Source, open_source

    if isinstance(model, (str, os.PathLike)) and not Path(model).exists():
        return str(model)
    if isinstance(model, Mapping):
        h = hashlib.sha256()
        for k in sorted(model):
            t = model[k]
            h.update(k.encode())
            if isinstance(t, torch.Tensor):
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return "sha256:" + h.hexdigest()
    src = model if isinstance(model, Source) else open_source(model)
    if not src.files:
        raise ParameterError(f"cache: can't fingerprint {src.name} (no files behind it); pass models as paths "
                             "or state dicts, or run without cache=")
    return [[Path(f).name, (st := os.stat(f)).st_size, st.st_mtime_ns] for f in sorted(map(str, src.files))]


def evaluator_identity(evaluate: Any) -> str:
    """A stable description of an evaluator: `cache_key()` if it has one, else its qualified name and,
    for an instance, its attributes; for a plain function, a hash of its code too."""
    if hasattr(evaluate, "cache_key"):
        return str(evaluate.cache_key())
    kind = evaluate if inspect.isroutine(evaluate) or inspect.isclass(evaluate) else type(evaluate)
    name = f"{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', repr(kind))}"
    code = getattr(evaluate, "__code__", None)
    if code is not None:
        name += ":" + hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()[:12]
    elif hasattr(evaluate, "__dict__") and not inspect.isroutine(evaluate):
        name += json.dumps(vars(evaluate), sort_keys=True, default=repr)
    return name


def point_key(inputs: Mapping[str, Any], method: str, params: Mapping[str, Any], evaluator: str) -> str:
    """SHA-256 of everything that decides a point's metrics."""
    payload = {"version": CACHE_VERSION, "inputs": inputs, "method": method,
               "params": {k: params[k] for k in sorted(params)}, "evaluator": evaluator}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=repr).encode()).hexdigest()


class ResultCache:
    """DIR/<key[:2]>/<key>.json, one per point; `None` dir: a cache that holds nothing."""

    def __init__(self, root: str | os.PathLike | None):
        self.root = None if root is None else Path(root)
        if self.root is not None:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OutputError(f"cache: can't create {str(self.root)!r}: {e}") from e

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored record, or None (a missing or unreadable entry is evaluated again)."""
        if self.root is None:
            return None
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def put(self, key: str, record: Mapping[str, Any]) -> None:
        if self.root is None:
            return
        from taskvec.viz.style import atomic_file

        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        with atomic_file(path, "w") as fh:
            json.dump(record, fh, sort_keys=True, default=_jsonable)

    def __len__(self) -> int:
        return 0 if self.root is None else sum(1 for _ in self.root.glob("*/*.json"))


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if hasattr(v, "item"):  # numpy scalars
        return v.item()
    return repr(v)
