"""The safetensors file format, read and written directly.

Reading: the header is parsed and *checked against the file size* before any
tensor is touched, so a truncated, zero-length or header-corrupted file gives a
clear error naming it (safetensors' own loader reports these less helpfully).

Writing: when every tensor's shape and dtype is known up front — always the
case in a merge — the header is written first and each tensor is `pwrite`n at
its final offset as soon as it is computed, in any order. Peak memory is one
tensor, and no shard is ever buffered or copied.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from taskvec.errors import CheckpointError
from taskvec.io.base import TensorMeta

DTYPE_FROM_STR: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPE_FROM_STR[_name] = getattr(torch, _attr)
STR_FROM_DTYPE = {v: k for k, v in DTYPE_FROM_STR.items()}

_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class Header:
    metas: dict[str, TensorMeta]
    metadata: dict[str, str]
    offsets: dict[str, int]  # absolute byte offset of each tensor's data in the file


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate a safetensors header against the file's size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes; the 8-byte header length is missing)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors header (declares {n} header bytes, file has {size})"
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, expected a .safetensors file") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None

    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    metas: dict[str, TensorMeta] = {}
    offsets: dict[str, int] = {}
    for name, info in header.items():
        try:
            dtype = DTYPE_FROM_STR[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {info!r}") from None
        meta = TensorMeta(shape, dtype)
        if end - start != meta.numel * element_size(dtype) or start < 0:
            raise CheckpointError(f"{path}: tensor {name!r}: data_offsets {start}..{end} don't match shape {shape} {dtype}")
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated — tensor {name!r} ends at byte {end} of the data section, which has {data_size} bytes"
            )
        metas[name] = meta
        offsets[name] = 8 + n + start
    return Header(metas, metadata, offsets)


def _header_bytes(layout: Mapping[str, tuple[TensorMeta, int, int]], metadata: Mapping[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, (meta, start, end) in layout.items():
        header[name] = {"dtype": STR_FROM_DTYPE[meta.dtype], "shape": list(meta.shape), "data_offsets": [start, end]}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
    return raw


class SafetensorsFileWriter:
    """Write one safetensors file whose tensors are all declared up front.

    Tensors may arrive in any order; each is written in place with pwrite.
    `close()` fails if a declared tensor was never written.
    """

    def __init__(self, path: str | os.PathLike, metas: Mapping[str, TensorMeta], metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.layout: dict[str, tuple[TensorMeta, int, int]] = {}
        offset = 0
        for name, meta in metas.items():
            nbytes = meta.numel * element_size(meta.dtype)
            self.layout[name] = (meta, offset, offset + nbytes)
            offset += nbytes
        header = _header_bytes(self.layout, metadata)
        self._data_start = 8 + len(header)
        self._pending = set(self.layout)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.pwrite(self._fd, struct.pack("<Q", len(header)) + header, 0)
            os.ftruncate(self._fd, self._data_start + offset)
        except BaseException:
            os.close(self._fd)
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        meta, start, end = self.layout[name]
        if tuple(tensor.shape) != meta.shape or tensor.dtype != meta.dtype:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} declared {meta.shape} {meta.dtype}, got {tuple(tensor.shape)} {tensor.dtype}"
            )
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if meta.numel:
            buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            written = 0
            while written < len(buf):  # pwrite may write less than asked for large buffers
                written += os.pwrite(self._fd, buf[written:], self._data_start + start + written)
        self._pending.discard(name)

    def close(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        os.close(fd)
        if self._pending:
            missing = sorted(self._pending)
            raise CheckpointError(f"{self.path}: {len(missing)} declared tensors never written, e.g. {missing[:3]}")

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def nbytes(self) -> int:
        return max((end for _, _, end in self.layout.values()), default=0)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write a dict of tensors to one safetensors file (not atomic by itself: see ShardedWriter)."""
    w = SafetensorsFileWriter(path, {k: TensorMeta(tuple(v.shape), v.dtype) for k, v in tensors.items()}, metadata)
    try:
        for k, v in tensors.items():
            w.write(k, v)
    except BaseException:
        w.abort()
        raise
    w.close()
