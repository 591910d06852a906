"""Synthetic Llama-shaped bf16 checkpoints for the merge benchmark.

Writes ``base/`` and ``ft1/ ft2/ ft3/`` under OUT, each a sharded safetensors
model (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``)
with a LlamaConfig-compatible ``config.json``, so that mergekit and taskvec
read exactly the same inputs.

A fine-tune is ``base + dense + sparse``:
  * dense:  small Gaussian noise on every element (std = 10 % of the base's),
            as full fine-tuning leaves behind;
  * sparse: a task-specific change on a random 5 % of elements (std = the
            base's), plus a 2 % "contested" set shared by all fine-tunes whose
            sign is drawn per model -- so TIES' sign election has real
            conflicts to resolve.

Usage:  python benchmarks/make_checkpoints.py --size 270m --out benchmarks/work/270m
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

# name -> LlamaConfig fields. 1.1b matches TinyLlama-1.1B's shapes.
SIZES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
    "270m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=18, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000),
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000),
}
MODEL_NAMES = ("base", "ft1", "ft2", "ft3")
DENSE_REL_STD = 0.1
SPARSE_FRACTION = 0.05
CONTESTED_FRACTION = 0.02


def llama_config(size: str) -> dict:
    fields = SIZES[size]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        **fields,
    }


def llama_tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in the order transformers' LlamaForCausalLM names them."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    shapes = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return shapes


def _base_tensor(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm gains sit around 1
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    return 0.02 * torch.randn(shape, generator=g)


def _finetune_delta(base: torch.Tensor, contested: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    std = 0.05 if base.dim() == 1 else 0.02
    delta = torch.randn(base.shape, generator=g).mul_(DENSE_REL_STD * std)
    task = torch.rand(base.shape, generator=g) < SPARSE_FRACTION
    delta += torch.randn(base.shape, generator=g).mul_(std) * task
    sign = 1.0 if torch.rand((), generator=g).item() < 0.5 else -1.0
    delta += contested * (sign * std)
    return delta


class _ShardedSaver:
    def __init__(self, out_dir: Path, shard_bytes: int):
        self.out_dir, self.shard_bytes = out_dir, shard_bytes
        self.buf: dict[str, torch.Tensor] = {}
        self.buf_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0
        out_dir.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.buf and self.buf_bytes + nbytes > self.shard_bytes:
            self._flush()
        self.buf[name] = t
        self.buf_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        idx = len(self.shards)
        save_file(self.buf, str(self.out_dir / f"shard-{idx}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.buf))
        self.buf, self.buf_bytes = {}, 0

    def close(self) -> None:
        if self.buf:
            self._flush()
        n = len(self.shards)
        weight_map = {}
        for idx, names in enumerate(self.shards):
            final = f"model-{idx + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / f"shard-{idx}.tmp", self.out_dir / final)
            weight_map.update({k: final for k in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_family(dirs: dict[str, Path], cfg: dict, *, seed: int = 0, shard_bytes: int = 500_000_000) -> dict[str, Path]:
    """Write one base (the first entry of `dirs`) and fine-tunes of it (the others), tensor by tensor."""
    names = list(dirs)
    savers = {n: _ShardedSaver(Path(d), shard_bytes) for n, d in dirs.items()}
    for ti, (name, shape) in enumerate(llama_tensor_shapes(cfg)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + ti)
        base = _base_tensor(name, shape, g)
        contested = (torch.rand(shape, generator=g) < CONTESTED_FRACTION).float()
        savers[names[0]].add(name, base.to(torch.bfloat16))
        for n in names[1:]:
            savers[n].add(name, (base + _finetune_delta(base, contested, g)).to(torch.bfloat16))
        del base, contested
    for n, s in savers.items():
        s.close()
        # config.json last: its presence marks the checkpoint complete.
        (Path(dirs[n]) / "config.json").write_text(json.dumps(cfg, indent=2))
    return {n: Path(d) for n, d in dirs.items()}


def make_checkpoints(size: str, out: str | os.PathLike, *, seed: int = 0, shard_bytes: int = 500_000_000,
                     num_finetunes: int = 3) -> dict[str, Path]:
    """Write base + `num_finetunes` fine-tunes under `out`; return name -> model dir.

    Existing complete checkpoints (config.json present) are reused, so a
    benchmark can be rerun without paying for generation again.
    """
    out = Path(out)
    dirs = {n: out / n for n in MODEL_NAMES[: 1 + num_finetunes]}
    if all((d / "config.json").is_file() for d in dirs.values()):
        return dirs
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)
    return write_family(dirs, llama_config(size), seed=seed, shard_bytes=shard_bytes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="270m")
    ap.add_argument("--out", required=True, help="folder that receives base/ ft1/ ft2/ ft3/")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-bytes", type=int, default=500_000_000)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    dirs = make_checkpoints(args.size, args.out, seed=args.seed, shard_bytes=args.shard_bytes)
    print(f"wrote {', '.join(str(d) for d in dirs.values())} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
