"""Atomic sharded safetensors output.

Everything is written into a hidden temporary folder beside the destination
and renamed into place only when every declared tensor has been written; on
any error (or Ctrl-C, or a full disk) the temporary folder is removed. A
folder named like the output therefore always holds a finished model.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from taskvec.errors import OutputError
from taskvec.io.base import Source, TensorMeta
from taskvec.io.safetensors_format import SafetensorsFileWriter, element_size

_WEIGHT_FILE = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.ckpt|\.gguf|\.index\.json|\.msgpack|\.h5)$")
_NOT_COPIED = {"README.md", ".gitattributes", "adapter_config.json"}
_MAX_AUX_FILE = 64 * 1024 * 1024


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / '1B' (a billion bytes, as mergekit's --out-shard-size) / an int."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]i?B?|B)?\s*", str(size), re.I)
    if not m:
        raise OutputError(f"max_shard_size: can't parse {size!r} (use e.g. 5GB, 500MB, 1B or a number of bytes)")
    num, unit = float(m.group(1)), (m.group(2) or "").upper()
    mult = {"": 1, "B": 10**9, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
            "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(num * mult)


def input_paths(sources: Iterable[Any]) -> list[Path]:
    """Every file and model folder the inputs read from (outputs must not touch them)."""
    paths: list[Path] = []
    for s in sources:
        if isinstance(s, Source):
            paths.extend(Path(f).resolve() for f in s.files)
            if s.model_dir is not None:
                paths.append(Path(s.model_dir).resolve())
        elif isinstance(s, (str, os.PathLike)) and Path(s).exists():
            paths.append(Path(s).resolve())
    return paths


def check_output_path(out: str | os.PathLike, inputs: Iterable[Any] = (), *, overwrite: bool = False,
                      is_file: bool = False) -> Path:
    """Refuse an output that exists (unless overwrite) or that is, contains, or lies in an input."""
    out = Path(out).expanduser().absolute()
    resolved = out.resolve()
    for p in input_paths(inputs):
        if resolved == p or p.is_relative_to(resolved) or (p.is_dir() and resolved.is_relative_to(p)):
            raise OutputError(f"{out}: output would overwrite or sit inside an input ({p}); choose another folder")
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists; choose a new folder or pass overwrite=True")
    if out.exists() and out.is_dir() == is_file:
        raise OutputError(f"{out}: exists and is {'a folder' if is_file else 'not a folder'}")
    return out


def _remove_stale_temps(out: Path) -> None:
    """Remove temp folders left by earlier writes to `out` whose process has died (killed mid-merge)."""
    for d in out.parent.glob(f".{glob.escape(out.name)}.taskvec-tmp-*"):
        m = re.search(r"taskvec-tmp-(\d+)-", d.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)


def staging_dir(out: Path) -> Path:
    """A fresh hidden folder beside `out` (same filesystem, so it can be renamed onto `out`); scratch folders
    that killed runs left for the same `out` are removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.taskvec-tmp-{os.getpid()}-", dir=out.parent))


def replace_dir(new: Path, out: Path) -> None:
    """Rename folder `new` onto `out`. An existing `out` is swapped aside first and deleted afterwards (put
    back if the second rename fails), so `out` is always either the complete old or the complete new folder."""
    if not out.exists():
        os.rename(new, out)
        return
    old = out.with_name(f".{out.name}.taskvec-old-{os.getpid()}")
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShardedWriter:
    """Write a model folder: sharded safetensors + index + config/tokenizer files.

    Every tensor's name, shape and dtype is declared up front (`metas`), so
    each shard's header is final from the start and tensors are written in
    place as they arrive, in any order, from any thread.

        with ShardedWriter(out, metas, inputs=[base, ft]) as w:
            for name in metas:
                w.add(name, compute(name))
            w.copy_from(base.model_dir)
    """

    def __init__(self, out: str | os.PathLike, metas: Mapping[str, TensorMeta], *, max_shard_size: int | str = "5GB",
                 inputs: Iterable[Any] = (), overwrite: bool = False, metadata: Mapping[str, str] | None = None):
        self.out = check_output_path(out, inputs, overwrite=overwrite)
        self.overwrite = overwrite
        self.metas = dict(metas)
        limit = parse_size(max_shard_size)
        shards: list[dict[str, TensorMeta]] = [{}]
        size = 0
        for name, meta in self.metas.items():
            nbytes = meta.numel * element_size(meta.dtype)
            if shards[-1] and size + nbytes > limit:
                shards.append({})
                size = 0
            shards[-1][name] = meta
            size += nbytes
        n = len(shards)
        self._names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.tmp = staging_dir(self.out)
        self._files: list[SafetensorsFileWriter] = []
        self._shard_of: dict[str, SafetensorsFileWriter] = {}
        self.total_size = 0
        try:
            for fname, shard in zip(self._names, shards):
                w = SafetensorsFileWriter(self.tmp / fname, shard, {"format": "pt", **(metadata or {})})
                self._files.append(w)
                self.total_size += w.nbytes
                for name in shard:
                    self._shard_of[name] = w
        except BaseException as e:
            self.abort()
            raise self._os_error(e) if isinstance(e, OSError) else e
        self._done = False

    def _os_error(self, e: OSError) -> OutputError:
        return OutputError(f"{self.out}: writing failed ({e.strerror or e}); nothing was left behind")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        try:
            w = self._shard_of[name]
        except KeyError:
            raise OutputError(f"{self.out}: tensor {name!r} was not declared to the writer") from None
        try:
            w.write(name, tensor)
        except OSError as e:
            raise self._os_error(e) from None

    def copy_from(self, model_dir: str | os.PathLike | None) -> list[str]:
        """Copy config, tokenizer and other small non-weight files from a model folder."""
        copied: list[str] = []
        if model_dir is None:
            return copied
        for f in sorted(Path(model_dir).iterdir()):
            if (f.is_file() and not _WEIGHT_FILE.search(f.name) and f.name not in _NOT_COPIED
                    and not (self.tmp / f.name).exists() and f.stat().st_size <= _MAX_AUX_FILE):
                shutil.copyfile(f, self.tmp / f.name)
                copied.append(f.name)
        return copied

    def write_json(self, name: str, obj: Any) -> None:
        (self.tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")

    def write_text(self, name: str, text: str) -> None:
        (self.tmp / name).write_text(text)

    def commit(self) -> Path:
        try:
            for w in self._files:
                w.close()
            if len(self._files) > 1:
                weight_map = {name: self._names[self._files.index(w)] for name, w in self._shard_of.items()}
                self.write_json("model.safetensors.index.json",
                                {"metadata": {"total_size": self.total_size}, "weight_map": weight_map})
            replace_dir(self.tmp, self.out)  # overwrite=True swaps the old folder out
        except BaseException as e:
            self.abort()
            raise self._os_error(e) if isinstance(e, OSError) else e
        self._done = True
        return self.out

    def abort(self) -> None:
        for w in self._files:
            w.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.commit()
