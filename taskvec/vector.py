"""TaskVector: τ = θ_finetuned − θ_base, lazily.

A task vector is kept as a linear combination Σ cᵢ·τᵢ of *atoms* — a
(base, fine-tuned) pair, a saved vector, or a LoRA adapter — and nothing is
materialised until a tensor is read. So `-(0.5 * (a + b))` costs nothing, and
`tv.apply_to(base, out=...)` on a billion-parameter model streams one tensor
at a time. Deltas are float32 whatever the stored dtype.

    tau_toxic = TaskVector.from_models("gpt2", "gpt2-toxic")
    detoxed = (-tau_toxic).apply_to("gpt2", scaling=0.5)        # θ₀ − 0.5·τ
    tau_d = analogy(tau_a, tau_b, tau_c)                         # τ_c + (τ_b − τ_a)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import torch

from taskvec._progress import progress
from taskvec.errors import CheckpointError, KeyMismatchError, ParameterError, ShapeMismatchError
from taskvec.io import LoraSource, ShardedWriter, Source, TensorMeta, open_source
from taskvec.io.safetensors_format import SafetensorsFileWriter
from taskvec.io.writer import check_output_path

FORMAT_KEY = "taskvec"
FORMAT_VERSION = 1


def fingerprint(source: Source) -> str:
    """A short hash of a model's architecture (float tensor names and shapes): which base a vector fits."""
    h = hashlib.sha256()
    for k, m in sorted(source.index.items()):
        if m.is_float:
            h.update(f"{k}:{m.shape};".encode())
    return h.hexdigest()[:16]


def _short(name: str) -> str:
    p = name.rstrip("/")
    return os.path.basename(p) if ("/" in p and os.path.exists(p)) else p


class _Atom:
    """One irreducible task vector: knows its float keys and computes one delta at a time."""

    label: str
    metas: dict[str, TensorMeta]  # float32 metas of the deltas

    def delta(self, key: str) -> torch.Tensor:
        raise NotImplementedError


class _Difference(_Atom):
    def __init__(self, base: Source, ft: Source, *, keys: str, align_vocab: bool, check_finite: bool):
        self.base, self.ft = base, ft
        self.label = _short(ft.name)
        self.align_vocab, self.check_finite = align_vocab, check_finite
        self.skipped: dict[str, str] = {}
        self.metas = {}
        kb, kf = base.index, ft.index
        only_base, only_ft = [k for k in kb if k not in kf], [k for k in kf if k not in kb]
        if keys == "strict" and (only_base or only_ft):
            parts = []
            if only_base:
                parts.append(f"{len(only_base)} only in base {base.name} (e.g. {only_base[:3]})")
            if only_ft:
                parts.append(f"{len(only_ft)} only in {ft.name} (e.g. {only_ft[:3]})")
            raise KeyMismatchError("tensor names differ: " + "; ".join(parts) +
                                   ". Pass keys='intersection' to use only the shared tensors.")
        for k in only_base:
            self.skipped[k] = "only in base"
        for k in only_ft:
            self.skipped[k] = "only in fine-tuned"
        for k, mb in kb.items():
            if k not in kf:
                continue
            mf = kf[k]
            if not mb.is_float or not mf.is_float:
                if mb.is_float != mf.is_float:
                    raise ShapeMismatchError(f"{k!r}: dtype {mb.dtype} in {base.name} but {mf.dtype} in {ft.name}")
                self.skipped[k] = f"{mb.dtype} buffer (copied from base, carries no delta)"
                continue
            if mb.shape != mf.shape:
                vocab_like = len(mb.shape) >= 1 and mb.shape[1:] == mf.shape[1:]
                if not (vocab_like and align_vocab):
                    hint = " (a vocabulary-size mismatch? pass align_vocab=True to align rows)" if vocab_like else ""
                    raise ShapeMismatchError(f"{k!r}: shape {mb.shape} in {base.name} but {mf.shape} in {ft.name}{hint}")
            self.metas[k] = TensorMeta(mb.shape, torch.float32)

    def delta(self, key: str) -> torch.Tensor:
        b, f = self.base.get(key), self.ft.get(key)
        if b.shape != f.shape:  # align_vocab: shared rows differ, rows the base lacks are dropped, others zero
            n = min(b.shape[0], f.shape[0])
            d = torch.zeros(b.shape, dtype=torch.float32)
            d[:n] = f[:n].float() - b[:n].float()
        else:  # one float32 copy, subtracted in place (fewer tensors alive)
            d = f.to(torch.float32, copy=True).sub_(b)
        if self.check_finite and not torch.isfinite(d).all():
            bad = self.base if not torch.isfinite(b).all() else self.ft
            raise CheckpointError(f"{bad.name}: tensor {key!r} contains NaN or inf")
        return d


class _Lora(_Atom):
    def __init__(self, lora: LoraSource):
        self.lora = lora
        self.label = _short(str(lora.adapter_dir))
        self.metas = {k: TensorMeta(lora.base.meta(k).shape, torch.float32) for k in lora.touched}
        self.skipped = {}

    def delta(self, key: str) -> torch.Tensor:
        return self.lora.delta(key)


class _Stored(_Atom):
    def __init__(self, source: Source, label: str):
        self.source = source
        self.label = label
        self.metas = {k: TensorMeta(m.shape, torch.float32) for k, m in source.index.items() if m.is_float}
        self.skipped = {}

    def delta(self, key: str) -> torch.Tensor:
        d = self.source.get(key)
        return d.float() if d.dtype != torch.float32 else d.clone()


class _LowRank(_Atom):
    """TSV-C: another vector's 2-D deltas truncated to their top ceil(fraction * rank) singular triplets."""

    def __init__(self, inner: "TaskVector", fraction: float):
        self.inner, self.fraction = inner, fraction
        self.label = f"{inner.expression} @ rank {fraction:g}"
        self.metas = dict(inner.metas)
        self.skipped = {}

    def delta(self, key: str) -> torch.Tensor:
        from taskvec.methods.spectral import low_rank_approx

        d = self.inner[key]
        return low_rank_approx(d, self.fraction) if d.dim() == 2 else d


def _fmt_coef(c: float) -> str:
    return f"{c:g}"


class TaskVector(Mapping):
    """τ = θ_ft − θ_base as a lazy mapping `name -> float32 delta`.

    Build with `from_models`, `from_lora` or `load`; combine with + − unary− scalar·;
    apply with `apply_to`. Only floating-point tensors carry deltas: integer/bool
    buffers (e.g. `position_ids`) are listed in `skipped` and copied from the base on apply.
    """

    def __init__(self, terms: list[tuple[float, _Atom]], *, base: Source | None = None,
                 base_name: str | None = None, base_fingerprint: str | None = None, skipped: dict | None = None,
                 provenance: list[str] | None = None):
        self._terms = [(float(c), a) for c, a in terms]
        self.base = base
        self.base_name = base_name or (base.name if base is not None else None)
        self.base_fingerprint = base_fingerprint or (fingerprint(base) if base is not None else None)
        self.skipped = dict(skipped or {})
        self.provenance = list(provenance or [])
        metas: dict[str, TensorMeta] = {}
        for _, atom in self._terms:
            for k, m in atom.metas.items():
                if k in metas and metas[k].shape != m.shape:
                    raise ShapeMismatchError(f"{k!r}: task vectors disagree on its shape ({metas[k].shape} vs {m.shape})")
                metas.setdefault(k, m)
        self.metas = metas
        self._norm: float | None = None

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_models(cls, base: Any, finetuned: Any, *, keys: str = "strict", align_vocab: bool = False,
                    check_finite: bool = True) -> "TaskVector":
        """τ = θ_ft − θ_base for any two checkpoints `open_source` reads.

        keys: "strict" (default) — both models must hold the same tensor names;
              "intersection" — use the shared ones (others listed in `skipped`).
        align_vocab: allow embeddings whose row counts differ (vocabulary extended
              in fine-tuning): the delta covers the shared rows and has the base's shape.
        """
        if keys not in ("strict", "intersection"):
            raise ParameterError(f"keys: expected 'strict' or 'intersection', got {keys!r}")
        b = open_source(base)
        f = open_source(finetuned, base=b)
        if isinstance(f, LoraSource):
            atom: _Atom = _Lora(f)
        else:
            atom = _Difference(b, f, keys=keys, align_vocab=align_vocab, check_finite=check_finite)
        return cls([(1.0, atom)], base=b, skipped=atom.skipped, provenance=[f"{f.name} − {b.name}"])

    @classmethod
    def from_lora(cls, adapter_dir: str | os.PathLike, base: Any) -> "TaskVector":
        """τ of a PEFT LoRA adapter: (alpha/r)·B·A per target module, keyed by the base's parameter names."""
        b = open_source(base)
        return cls.from_models(b, LoraSource(adapter_dir, b))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TaskVector":
        """Read a vector written by `save` (a safetensors file with JSON metadata)."""
        from taskvec.io import SafetensorsSource

        src = SafetensorsSource([Path(path)])
        src.index  # parse + validate the header now, so errors name the file here
        try:
            info = json.loads(src.metadata.get(FORMAT_KEY, "{}"))
        except ValueError:
            raise CheckpointError(f"{path}: corrupt taskvec metadata") from None
        atom = _Stored(src, info.get("label") or _short(str(path)))
        tv = cls([(1.0, atom)], base_name=info.get("base"), base_fingerprint=info.get("base_fingerprint"),
                 skipped=info.get("skipped"), provenance=info.get("provenance", []) + [f"loaded from {path}"])
        tv._expression = info.get("expression")
        return tv

    # ---------------------------------------------------------------- Mapping
    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.metas:
            raise KeyError(f"task vector has no tensor {key!r}")
        out: torch.Tensor | None = None
        for c, atom in self._terms:
            if key not in atom.metas or c == 0.0:
                continue
            d = atom.delta(key)
            if out is None:
                out = d if c == 1.0 else d.mul_(c)  # atoms return fresh tensors: safe in place
            else:
                out.add_(d, alpha=c)
        return out if out is not None else torch.zeros(self.metas[key].shape, dtype=torch.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self.metas)

    def __len__(self) -> int:
        return len(self.metas)

    def __contains__(self, key: object) -> bool:
        return key in self.metas

    # Mapping's __eq__ would compare tensors elementwise; identity is the meaningful equality here.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def items(self):  # streamed: one delta alive at a time
        for k in self.metas:
            yield k, self[k]

    # ---------------------------------------------------------------- arithmetic
    def _combine(self, other: "TaskVector", sign: float, op: str) -> "TaskVector":
        if not isinstance(other, TaskVector):
            return NotImplemented
        if self.base_fingerprint and other.base_fingerprint and self.base_fingerprint != other.base_fingerprint:
            raise ShapeMismatchError(
                f"task vectors come from different architectures (base {self.base_name} vs {other.base_name})"
            )
        terms = self._terms + [(sign * c, a) for c, a in other._terms]
        tv = TaskVector(terms, base=self.base or other.base, base_name=self.base_name or other.base_name,
                        base_fingerprint=self.base_fingerprint or other.base_fingerprint,
                        skipped={**other.skipped, **self.skipped},
                        provenance=self.provenance + [f"{op} ({'; '.join(other.provenance)})"])
        return tv

    def __add__(self, other):
        return self._combine(other, 1.0, "+")

    def __radd__(self, other):  # sum([...]) starts from 0
        if isinstance(other, (int, float)) and other == 0:
            return self
        return NotImplemented

    def __sub__(self, other):
        return self._combine(other, -1.0, "−")

    def __mul__(self, scalar):
        if isinstance(scalar, torch.Tensor) and scalar.numel() == 1:
            scalar = scalar.item()
        if not isinstance(scalar, (int, float)) or isinstance(scalar, bool):
            return NotImplemented
        if not math.isfinite(scalar):
            raise ParameterError(f"scaling factor must be finite, got {scalar}")
        tv = TaskVector([(scalar * c, a) for c, a in self._terms], base=self.base, base_name=self.base_name,
                        base_fingerprint=self.base_fingerprint, skipped=self.skipped,
                        provenance=self.provenance + [f"× {_fmt_coef(scalar)}"])
        return tv

    __rmul__ = __mul__

    def __truediv__(self, scalar):
        return self * (1.0 / scalar)

    def __neg__(self):
        return self * -1.0

    def __pos__(self):
        return self

    @property
    def expression(self) -> str:
        """The vector as an equation over its atoms, e.g. `0.5·τ[ft_a] − 0.5·τ[ft_b]`."""
        if getattr(self, "_expression", None) and len(self._terms) == 1 and self._terms[0][0] == 1.0:
            return self._expression
        coef: dict[int, float] = {}
        labels: dict[int, str] = {}
        for c, a in self._terms:
            coef[id(a)] = coef.get(id(a), 0.0) + c
            labels[id(a)] = a.label
        parts = []
        for i, (aid, c) in enumerate(coef.items()):
            if c == 0:
                continue
            sign = "−" if c < 0 else "+"
            mag = "" if abs(c) == 1 else f"{abs(c):g}·"
            parts.append(("-" if c < 0 else "") + f"{mag}τ[{labels[aid]}]" if not parts else f" {sign} {mag}τ[{labels[aid]}]")
        return "".join(parts) or "0"

    def low_rank(self, fraction: float) -> "TaskVector":
        """TSV-C (Gargiulo et al. 2025): a lazy vector whose 2-D deltas keep only their top
        ceil(fraction * rank) singular triplets (rank = the smaller dimension); other tensors are kept.

        fraction in (0, 1]; 1 reproduces tau exactly. SVDs are exact up to 2**24 entries per matrix,
        randomised (seeded) beyond (`taskvec.methods.spectral.top_svd`).
        """
        from taskvec.methods.spectral import check_fraction

        fraction = check_fraction(fraction)
        return TaskVector([(1.0, _LowRank(self, fraction))], base=self.base, base_name=self.base_name,
                          base_fingerprint=self.base_fingerprint, skipped=self.skipped,
                          provenance=self.provenance + [f"low rank ({fraction:g} of each matrix's rank)"])

    def to_lora(self, out_dir: str | os.PathLike, rank: int | None = None, *, energy: float | None = None,
                base: Any = None, extras: str = "full", dtype: torch.dtype = torch.float32, overwrite: bool = False):
        """Export as a PEFT LoRA adapter folder (truncated SVD of each matrix delta), atomically.

        rank: LoRA rank per matrix (capped at its smaller dimension); energy: instead, per matrix the
        smallest k whose top-k singular values hold >= energy of Σσ²; neither: full rank (lossless).
        Non-2-D deltas (biases, norms) go to `modules_to_save` as full weights (extras="full", needs the
        base) or are dropped (extras="drop", and always for a LoRA target's own bias). Tied embeddings
        get one adapter (PEFT's `ensure_weight_tying`). Returns a `LoraExport` (`.path`, `.report`:
        module, shape, rank, relative error ‖τ−τ_r‖_F/‖τ‖_F, energy kept, share of ‖τ‖²).
        Details: `taskvec.io.lora_export`.
        """
        from taskvec.io.lora_export import export_lora

        return export_lora(self, out_dir, rank, energy=energy, base=base, extras=extras, dtype=dtype,
                           overwrite=overwrite)

    # ---------------------------------------------------------------- numbers
    @property
    def num_parameters(self) -> int:
        return sum(m.numel for m in self.metas.values())

    def norm(self) -> float:
        """‖τ‖₂ over all float parameters (streamed, cached)."""
        if self._norm is None:
            sq = 0.0
            for k in progress(self.metas, desc="‖τ‖", total=len(self.metas)):
                sq += float(torch.linalg.vector_norm(self[k]) ** 2)
            self._norm = math.sqrt(sq)
        return self._norm

    def dot(self, other: "TaskVector") -> float:
        """⟨τ, τ'⟩ over shared tensors, accumulated tensor by tensor."""
        return sum(float(torch.dot(self[k].reshape(-1), other[k].reshape(-1))) for k in self.metas if k in other.metas)

    def cosine(self, other: "TaskVector") -> float:
        n = self.norm() * other.norm()
        return self.dot(other) / n if n else 0.0

    # ---------------------------------------------------------------- use
    def to_dict(self) -> dict[str, torch.Tensor]:
        """Materialise every delta (float32). For big models prefer streaming (`items()`)."""
        return {k: v for k, v in self.items()}

    def apply_to(self, base: Any = None, scaling: float = 1.0, *, out: str | os.PathLike | None = None,
                 dtype: torch.dtype | None = None, max_shard_size: int | str = "5GB", overwrite: bool = False,
                 show_progress: bool = True) -> dict[str, torch.Tensor] | Path:
        """θ = θ_base + scaling·τ.

        Returns a state dict, or with `out=` writes a model folder (sharded
        safetensors + config/tokenizer from the base) atomically and returns its path:
        every argument is checked before anything is written, and on any error the
        staging folder is removed (no partial output).
        Tensors without a delta (integer buffers, untouched LoRA modules, tensors left
        out by keys="intersection") are copied. Computed in float32; output dtype = base
        dtype unless `dtype` (a floating torch dtype or its name, e.g. "bfloat16") is
        given, which then applies to every float tensor, covered by τ or not.
        """
        from taskvec.merging import as_dtype

        if base is None:
            base = self.base
        if base is None:
            raise ParameterError("apply_to: this task vector doesn't know its base; pass base=")
        if not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
            raise ParameterError(f"scaling: must be a finite number, got {scaling!r}")
        dtype = as_dtype(dtype)
        if dtype is not None and not dtype.is_floating_point:
            raise ParameterError(f"dtype: must be a floating-point dtype (float32, bfloat16, ...), got {dtype}")
        b = open_source(base)
        for k, m in self.metas.items():
            if k not in b.index:
                raise KeyMismatchError(f"{b.name}: the task vector has a delta for {k!r}, which the base model lacks")
            if b.index[k].shape != m.shape:
                raise ShapeMismatchError(f"{k!r}: shape {m.shape} in the task vector but {b.index[k].shape} in {b.name}")
            if not b.index[k].is_float:
                raise ShapeMismatchError(f"{k!r}: is {b.index[k].dtype} in {b.name}; only float tensors take a delta")

        def out_dtype(k: str) -> torch.dtype:
            return dtype if (dtype is not None and b.index[k].is_float) else b.index[k].dtype

        def compute(k: str) -> torch.Tensor:
            t = b.get(k)
            if k not in self.metas:  # no delta: the base tensor, in the output dtype like every other
                if t.dtype != out_dtype(k):
                    return t.to(out_dtype(k))
                return t if out is not None else t.clone()
            d = self[k]  # a fresh float32 tensor: safe to update in place
            if scaling != 1.0:
                d.mul_(scaling)
            return d.add_(t).to(out_dtype(k))

        keys = list(b.index)
        bar = progress(keys, desc="apply τ", total=len(keys), disable=None if show_progress else True)
        if out is None:
            return {k: compute(k) for k in bar}
        metas = {k: TensorMeta(b.index[k].shape, out_dtype(k)) for k in keys}
        with ShardedWriter(out, metas, max_shard_size=max_shard_size, inputs=[b, *self._sources()],
                           overwrite=overwrite) as w:
            for k in bar:
                w.add(k, compute(k))
            w.copy_from(b.model_dir)
        return w.out

    def _sources(self) -> list[Source]:
        found: list[Source] = []
        for _, a in self._terms:
            if isinstance(a, _LowRank):
                found += a.inner._sources()
            for attr in ("base", "ft", "source", "lora"):
                s = getattr(a, attr, None)
                if isinstance(s, Source):
                    found.append(s)
        return found

    def save(self, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
        """Write the deltas to one safetensors file with JSON metadata (base identity, provenance), atomically."""
        path = Path(path)
        check_output_path(path, self._sources(), overwrite=overwrite, is_file=True)
        info = {"version": FORMAT_VERSION, "base": self.base_name, "base_fingerprint": self.base_fingerprint,
                "expression": self.expression, "provenance": self.provenance, "skipped": self.skipped,
                "label": path.stem}
        metas = {k: TensorMeta(m.shape, dtype) for k, m in self.metas.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.taskvec-tmp-{os.getpid()}")
        w = SafetensorsFileWriter(tmp, metas, {"format": "pt", FORMAT_KEY: json.dumps(info)})
        try:
            for k in progress(metas, desc="save τ", total=len(metas)):
                w.write(k, self[k].to(dtype))
            w.close()
            os.replace(tmp, path)
        except BaseException:
            w.abort()
            tmp.unlink(missing_ok=True)
            raise
        return path

    def push_to_hub(self, repo_id: str, *, private: bool = False, token: str | None = None,
                    revision: str | None = None, commit_message: str | None = None, evaluation: Any = None,
                    endpoint: str | None = None):
        """Upload the vector (as `save` writes it, `task_vector.safetensors`) and a model card (base,
        expression, norm, provenance, optional `evaluation` metrics) to the Hub repo `repo_id`.

        Token: `token`, else HF_TOKEN, else `hf auth login`'s. Returns a `PushResult` (repo and
        commit URLs). Details and errors: `taskvec.io.publish.push_task_vector`.
        """
        from taskvec.io.publish import push_task_vector

        return push_task_vector(self, repo_id, private=private, token=token, revision=revision,
                                commit_message=commit_message, evaluation=evaluation, endpoint=endpoint)

    # ---------------------------------------------------------------- display
    def _summary(self) -> dict[str, str]:
        n = self.num_parameters
        norm = f"{self.norm():.4g}" if (self._norm is not None or n <= 300_000_000) else "call .norm() (streams the model)"
        return {
            "τ": self.expression,
            "tensors": f"{len(self.metas)} float" + (f" ({len(self.skipped)} skipped: non-float or unshared)" if self.skipped else ""),
            "parameters": f"{n:,} ({n / 1e6:.1f} M)",
            "‖τ‖₂": norm,
            "dtype": "float32 deltas",
            "base": str(self.base_name),
        }

    def __repr__(self) -> str:
        s = self._summary()
        width = max(map(len, s))
        return "TaskVector\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in s.items())

    def _repr_html_(self) -> str:
        import html

        rows = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>{html.escape(v)}</td></tr>"
                       for k, v in self._summary().items())
        return f"<b>TaskVector</b><table>{rows}</table>"


def analogy(a: TaskVector, b: TaskVector, c: TaskVector) -> TaskVector:
    """A : B :: C : D  →  τ_D = τ_C + (τ_B − τ_A)   (EMTA, task analogies)."""
    return c + (b - a)
