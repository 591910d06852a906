"""Task vector -> PEFT LoRA adapter: a truncated SVD of every matrix delta.

For a 2-D delta τ = U S Vᵀ (float32), the top-k triplets give τ_k = B·A with the singular
values split evenly, B = U_k √S_k and A = √S_k V_kᵀ, written with lora_alpha = r (scale 1),
so `TaskVector.from_lora` and `peft.PeftModel.from_pretrained` both read back exactly τ_k.

Choosing k per matrix: `rank` (capped at min(m, n)), or `energy` = the smallest k whose top-k
singular values hold at least that share of Σσ² (exact SVD), or neither: full rank (lossless up
to float32 rounding). SVDs go through `taskvec.methods.spectral.top_svd`: exact below 2**24
entries, seeded `torch.svd_lowrank` above (rank mode only). Per-module ranks differing from the
config's `r` are recorded in PEFT's `rank_pattern` / `alpha_pattern` (keys: escaped full names).

Module kinds come from the model class (`config.json` -> `architectures`, built on the meta
device: no weights are read): nn.Linear -> lora_A/lora_B; nn.Embedding -> lora_embedding_A
[k, num_embeddings] / lora_embedding_B [dim, k] (PEFT stores an embedding's ΔW as (B·A)ᵀ);
GPT-2's Conv1D -> `fan_in_fan_out`. Without a config, names decide (`embed`, `wte`, `wpe`).

Tied embeddings (lm_head.weight *is* the input embedding): one tensor, one adapter. Only the
input embedding's factors are written, and the config sets `ensure_weight_tying` (target_modules
then a regex that names lm_head too), with which PEFT (0.21) gives lm_head the embedding's
factors transposed — the tie holds, and the forward equals θ₀ + τ_k's (peft warns that lm_head's
LoRA keys are missing from the file: they are the embedding's). mergekit's extract-lora writes two
independent adapters there. A checkpoint that stores both tensors of a tied pair must carry equal
deltas for them, else it is an error.

Tensors LoRA cannot express (biases, norms, any non-2-D delta): their module goes to
`modules_to_save` as full weights θ₀ + τ (PEFT loads them; `from_lora` reads them back as
deltas) — unless the module is itself a LoRA target (a Linear's bias), is not a leaf module (a
parameter held by a container: copying the container would copy its children) or `extras="drop"`,
when they are dropped. Every tensor is a row of the report, with its share of ‖τ‖², so what was
dropped is visible. Each delta is read once; the factors are held in memory until written (the
adapter's size), into a temporary folder renamed into place at the end.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from taskvec.errors import ParameterError
from taskvec.io.base import Source
from taskvec.io.lora import ADAPTER_CONFIG, PEFT_PREFIX
from taskvec.io.safetensors_format import save_safetensors
from taskvec.io.writer import check_output_path, replace_dir, staging_dir

if TYPE_CHECKING:
    import pandas as pd

ADAPTER_WEIGHTS = "adapter_model.safetensors"
REPORT_FILE = "lora_report.csv"
_EMBED_NAME = re.compile(r"(^|\.)(\w*embed\w*|wte|wpe|shared)$")
REPORT_COLUMNS = ["module", "tensor", "shape", "kind", "rank", "rel_error", "energy_kept", "norm_share"]


@dataclass
class LoraExport:
    """What `TaskVector.to_lora` wrote: the adapter folder and a per-tensor report (a DataFrame)."""

    path: Path
    report: "pd.DataFrame"

    def summary(self) -> str:
        r = self.report
        low = r[r.kind.isin(["lora", "lora_embedding"])]
        dropped = r[r.kind == "dropped"]
        lines = [f"LoRA adapter: {self.path}",
                 f"  {len(low)} matrices as LoRA (rank {int(low['rank'].min()) if len(low) else 0}–"
                 f"{int(low['rank'].max()) if len(low) else 0}), mean relative error "
                 f"{low.rel_error.mean() if len(low) else 0.0:.4f}, "
                 f"{int((r.kind == 'full').sum())} tensors as full weights (modules_to_save), "
                 f"{len(dropped)} dropped ({dropped.norm_share.sum():.2%} of ‖τ‖²)"]
        tied = r[r.kind == "tied"]
        if len(tied):
            lines.append("  tied: " + ", ".join(tied.tensor) + " share the input embedding's adapter")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


# ------------------------------------------------------------------ module kinds
def _model_modules(base: Source | None) -> tuple[dict[str, str], set[str], str | None] | None:
    """{module name: 'linear' | 'embedding' | 'conv1d' | 'other'}, the names of output layers tied
    to the input embedding and the input embedding's name (when tied), from the model class in the base's config.json (built on the meta device)."""
    model_dir = getattr(base, "model_dir", None)
    if model_dir is None or not (Path(model_dir) / "config.json").is_file():
        return None
    try:
        import transformers
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_dir)
        cls = getattr(transformers, (cfg.architectures or [""])[0], None) or transformers.AutoModel
        with torch.device("meta"):
            model = cls._from_config(cfg) if cls is transformers.AutoModel else cls(cfg)
    except Exception:  # noqa: BLE001 — an unknown or custom architecture: fall back to names
        return None
    from transformers.pytorch_utils import Conv1D

    kinds = {}
    for name, mod in model.named_modules():
        kinds[name] = ("embedding" if isinstance(mod, torch.nn.Embedding) else "linear" if isinstance(mod, torch.nn.Linear)
                       else "conv1d" if isinstance(mod, Conv1D) else "other")
    tied, embed = set(), None
    inp, out = model.get_input_embeddings(), getattr(model, "get_output_embeddings", lambda: None)()
    if inp is not None and out is not None and out.weight is inp.weight:
        tied = {n for n, m in model.named_modules() if m is out}
        embed = next(n for n, m in model.named_modules() if m is inp)
    return kinds, tied, embed


def _match(module: str, names) -> str | None:
    """The model's name for a checkpoint module (a wrapper prefix may differ either way)."""
    if module in names:
        return module
    hits = [n for n in names if n.endswith("." + module) or module.endswith("." + n)]
    return hits[0] if len(hits) == 1 else None


def _targets(modules: list[str], tied_out: list[str]):
    """PEFT's target_modules: full module names; with a tied output layer, one regex that also names it.

    PEFT (0.21) ties an output layer's LoRA to the input embedding's only when it sees an embedding among
    the targets, and for a *list* it looks for the names `embed_tokens` / `lm_head` only (GPT-2's `wte`
    would get no tied LoRA on lm_head); a regex that matches `lm_head` itself works for every name.
    """
    if not tied_out:
        return modules
    return "(?:" + "|".join(re.escape(m) for m in modules + tied_out) + ")"


def _check_options(rank, energy, extras) -> None:
    if rank is not None and energy is not None:
        raise ParameterError("to_lora: give rank or energy, not both")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ParameterError(f"rank must be a positive integer (or None for full rank), got {rank!r}")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not 0.0 < float(energy) <= 1.0):
        raise ParameterError(f"energy must be in (0, 1] (a share of Σσ²), got {energy!r}")
    if extras not in ("full", "drop"):
        raise ParameterError(f"extras must be 'full' (modules_to_save) or 'drop', got {extras!r}")


def energy_rank(S: torch.Tensor, energy: float) -> int:
    """The smallest k whose top-k singular values hold >= `energy` of Σσ²."""
    e = torch.cumsum(S.double() ** 2, 0)
    return min(len(S), int(torch.searchsorted(e, energy * e[-1] * (1 - 1e-12)).item()) + 1)


def factorize(mat: torch.Tensor, rank: int | None = None, energy: float | None = None):
    """(B [m, k], A [k, n], S) with B·A the best rank-k approximation of `mat` (float32)."""
    r = min(mat.shape)
    if energy is not None:
        U, S, Vh = torch.linalg.svd(mat, full_matrices=False)  # the whole spectrum decides k: exact
        k = energy_rank(S, float(energy))
        U, S, Vh = U[:, :k], S[:k], Vh[:k]
    else:
        from taskvec.methods.spectral import top_svd

        U, S, Vh = top_svd(mat, r if rank is None else min(rank, r))
    root = S.sqrt()
    return (U * root).contiguous(), (root[:, None] * Vh).contiguous(), S


def export_lora(tv: Any, out_dir: str | os.PathLike, rank: int | None = None, *, energy: float | None = None,
                base: Any = None, extras: str = "full", dtype: torch.dtype = torch.float32,
                overwrite: bool = False) -> LoraExport:
    """Write the TaskVector `tv` as a PEFT LoRA adapter folder (see the module docstring); returns the folder and
    report. (`tv` is duck-typed: importing taskvec.vector here would make the two modules import each other.)"""
    import pandas as pd

    from taskvec.io.sources import open_source

    _check_options(rank, energy, extras)
    b = open_source(base) if base is not None else tv.base
    out = check_output_path(out_dir, [*tv._sources(), *([b] if b is not None else [])], overwrite=overwrite)
    if b is not None:
        for k, m in tv.metas.items():
            if k not in b.index or b.index[k].shape != m.shape:
                raise ParameterError(f"base {b.name}: {k!r} is {'missing' if k not in b.index else b.index[k].shape}"
                                     f", the task vector has {m.shape}")
    kinds, tied_out, tied_in = _model_modules(b) or ({}, set(), None)

    def naming(key: str) -> tuple[str, str, str]:  # (module in the model, parameter, kind)
        module, _, param = key.rpartition(".")
        name = _match(module, kinds) if kinds else None
        kind = kinds.get(name, "other") if name else ("embedding" if _EMBED_NAME.search(module) else "linear")
        return name or module, param, kind

    tensors: dict[str, torch.Tensor] = {}
    rows: list[dict] = []
    ranks: dict[str, int] = {}
    targets: set[str] = set()
    fan_in_fan_out = False
    embed_delta: torch.Tensor | None = None  # the tied input embedding's delta

    def row(key, module, kind, d, rank_=0, err=0.0, kept=1.0):
        rows.append({"module": module, "tensor": key, "shape": "×".join(map(str, tv.metas[key].shape)), "kind": kind,
                     "rank": rank_, "rel_error": err, "energy_kept": kept,
                     "norm_share": float(torch.linalg.vector_norm(d)) ** 2})

    named = {k: naming(k) for k in tv.metas}
    matrices = [k for k, (_, param, kind) in named.items()
                if len(tv.metas[k].shape) == 2 and param == "weight" and kind != "other"]
    matrices.sort(key=lambda k: named[k][0] in tied_out)  # the tied output layer last: checked against the input
    for key in matrices:
        module, _, kind = named[key]
        d = tv[key]
        if module in tied_out:
            emb = embed_delta if embed_delta is not None else torch.zeros_like(d)
            if not torch.allclose(d, emb, rtol=1e-5, atol=1e-6):
                raise ParameterError(f"{key!r} is tied to the input embedding {tied_in!r}, but the two deltas differ "
                                     f"(max |Δ| {float((d - emb).abs().max()):.3g}); a tied model has one tensor")
            row(key, module, "tied", d, ranks.get(tied_in, 0), math.nan, math.nan)
            continue
        if module == tied_in:
            embed_delta = d
        if not bool(d.any()):
            row(key, module, "unchanged", d)
            continue
        mat = d.T if kind == "conv1d" else d  # PEFT's Conv1D (GPT-2) stores W as [in, out]
        fan_in_fan_out |= kind == "conv1d"
        B, A, S = factorize(mat, rank, energy)
        norm = float(torch.linalg.matrix_norm(mat))
        err = float(torch.linalg.matrix_norm(mat - B @ A)) / norm
        kept = float((S.double() ** 2).sum()) / norm ** 2
        k = len(S)
        p = PEFT_PREFIX + module
        if kind == "embedding":  # ΔW = (B_e A_e)ᵀ: A_e = Bᵀ [k, num_embeddings], B_e = Aᵀ [dim, k]
            tensors[p + ".lora_embedding_A"], tensors[p + ".lora_embedding_B"] = B.T.to(dtype), A.T.to(dtype)
        else:
            tensors[p + ".lora_A.weight"], tensors[p + ".lora_B.weight"] = A.to(dtype), B.to(dtype)
        ranks[module] = k
        targets.add(module)
        row(key, module, "lora_embedding" if kind == "embedding" else "lora", d, k, err, min(kept, 1.0))

    saved: set[str] = set()
    done = set(matrices)
    parents = {n.rpartition(".")[0] for n in kinds}  # modules_to_save copies a whole module: leaves only
    for key in tv.metas:
        if key in done:
            continue
        module, param, _ = named[key]
        d = tv[key]
        if not bool(d.any()):
            row(key, module, "unchanged", d)
        elif extras == "drop" or module in targets or b is None or not module or module in parents:
            row(key, module, "dropped", d, 0, 1.0, 0.0)
        else:
            tensors[f"{PEFT_PREFIX}{module}.{param}"] = (b.get(key).float() + d).to(b.index[key].dtype)
            saved.add(module)
            row(key, module, "full", d)
    if not tensors:
        raise ParameterError("to_lora: the task vector is zero everywhere; there is nothing to write")

    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    r = rank if (rank is not None and rank in ranks.values()) else r
    pattern = {re.escape(m): k for m, k in sorted(ranks.items()) if k != r}
    tied = tied_in in targets
    if tied and ranks[tied_in] != r:  # the tied output layer's LoRA takes its r and alpha from the patterns
        pattern.update({re.escape(m): ranks[tied_in] for m in tied_out})
    config = {
        "peft_type": "LORA", "task_type": None,
        "base_model_name_or_path": str(b.model_dir) if b is not None and b.model_dir else tv.base_name,
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": _targets(sorted(targets), sorted(tied_out) if tied else []),
        "modules_to_save": sorted(saved) or None,
        "fan_in_fan_out": fan_in_fan_out, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True, "ensure_weight_tying": tied,
    }
    report = pd.DataFrame(rows, columns=REPORT_COLUMNS)
    report["norm_share"] /= report.norm_share.sum() or 1.0
    tmp = staging_dir(out)
    try:
        save_safetensors(tensors, tmp / ADAPTER_WEIGHTS, {"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        report.to_csv(tmp / REPORT_FILE, index=False)
        replace_dir(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return LoraExport(out, report)
