"""Zoo cache: a directory per built zoo with a manifest of every entry's files and their SHA-256.

An entry (the base copy, a task's data, a head, a fine-tuned model) is reused only when its recorded
inputs ("deps") are unchanged and every file still hashes to what the manifest says; otherwise it is
rebuilt. Entries are written into a temporary path and renamed into place, and the manifest is
rewritten atomically after each entry, so an interrupted build resumes and never reads half a file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

MANIFEST = "manifest.json"


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """`cache`, else $TASKVEC_CACHE, else ~/.cache/taskvec (XDG_CACHE_HOME honoured)."""
    if cache is not None:
        return Path(cache).expanduser()
    if os.environ.get("TASKVEC_CACHE"):
        return Path(os.environ["TASKVEC_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "taskvec"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_hash(weights) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor, names sorted: equal iff the weights are.

    `weights`: a state dict, an nn.Module, or an HF model directory / .safetensors file.
    """
    if isinstance(weights, (str, os.PathLike)):
        from safetensors.torch import load_file

        path = Path(weights)
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        state = {}
        for f in files:
            state.update(load_file(str(f)))
    elif isinstance(weights, torch.nn.Module):
        state = weights.state_dict()
    else:
        state = dict(weights)
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class ZooCache:
    """The manifest of one zoo directory and the verify / record steps around each entry."""

    def __init__(self, root: Path, header: dict):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / MANIFEST
        self.manifest = self._read()
        if {k: self.manifest.get(k) for k in header} != header:
            self.manifest = {**header, "entries": {}}
        self.manifest.update(header)
        self.manifest.setdefault("entries", {})
        self.rebuilt: list[str] = []

    def _read(self) -> dict:
        if not self.path.is_file():
            return {"entries": {}}
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict) and isinstance(data.get("entries"), dict):
                return data
        except (OSError, ValueError):
            pass
        warnings.warn(f"{self.path}: unreadable zoo manifest; every entry will be rebuilt", stacklevel=3)
        return {"entries": {}}

    def problem(self, key: str, deps: dict) -> str | None:
        """Why entry `key` can't be reused (None: it can)."""
        entry = self.manifest["entries"].get(key)
        if entry is None:
            return "not built yet"
        if entry.get("deps") != deps:
            return "built from different inputs"
        for rel, digest in entry.get("files", {}).items():
            f = self.root / rel
            if not f.is_file():
                return f"missing file {rel}"
            if file_sha256(f) != digest:
                return f"corrupt file {rel} (SHA-256 differs from the manifest)"
        return None

    def entry(self, key: str) -> dict:
        return self.manifest["entries"][key]

    def record(self, key: str, deps: dict, paths: list[Path], info: dict) -> dict:
        files = {}
        for p in paths:
            p = Path(p)
            for f in (sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]):
                files[str(f.relative_to(self.root))] = file_sha256(f)
        self.manifest["entries"][key] = {"deps": deps, "files": files, **info}
        self.write()
        return self.manifest["entries"][key]

    def forget(self, key: str) -> None:
        self.manifest["entries"].pop(key, None)

    def write(self) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".manifest.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.manifest, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)

    def staging(self, rel: str) -> Path:
        """A fresh temporary path beside `rel` to write an entry into before `commit`."""
        final = self.root / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.tmp"
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()
        return tmp

    def commit(self, tmp: Path, rel: str) -> Path:
        final = self.root / rel
        if final.is_dir():
            shutil.rmtree(final)
        elif final.exists():
            final.unlink()
        os.replace(tmp, final)
        return final
