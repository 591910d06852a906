"""Regenerate tests/goldens/: tiny inputs and mergekit 0.1.5's outputs for every method both tools share.

    bash benchmarks/setup_bench_venv.sh                       # mergekit 0.1.5 in /tmp/venv-bench
    python benchmarks/make_goldens.py                          # (taskvec's venv) writes tests/goldens/
    python benchmarks/make_goldens.py --mergekit-yaml PATH     # another mergekit-yaml

tests/test_mergekit_parity.py then compares `taskvec merge CONFIG` with these outputs
in every CI run, mergekit not installed. What is written:

* inputs/{base,ft1,ft2,ft3}/ — a Llama-shaped family (4 layers, hidden 8, vocab 32;
  `make_checkpoints.py`'s base and fine-tune recipe: dense noise, sparse task changes,
  a contested set with opposite signs), stored in float32 so that no two |tau| entries
  tie at a TIES/breadcrumbs threshold (bf16 deltas repeat values, and at a tie the two
  tools keep different entries; see taskvec.methods.sparsify.trim_topk);
* configs/NAME.yml — mergekit configs, `dtype: float32` (both tools compute in float32);
* outputs/NAME.safetensors — what `mergekit-yaml configs/NAME.yml` wrote (run with the
  working directory tests/goldens, so the relative model paths resolve);
* MANIFEST.json — mergekit and torch versions, the pinned CPU numerics (NUMERICS), and the
  SHA-256 of every file.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
GOLDENS = REPO / "tests" / "goldens"
CFG = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
           vocab_size=32, torch_dtype="float32")
SEED = 14

# name -> config. Methods shared with mergekit 0.1.5: linear, task_arithmetic, ties, breadcrumbs(_ties),
# slerp, model_stock, passthrough, nuslerp, multislerp, karcher, nearswap, arcee_fusion, ram, ramplus_tl, sce
# (compared tensor by tensor), and dare_linear, dare_ties, della(_linear)
# (random masks: compared by their per-tensor L1-rescale property, so one fine-tune each).
CONFIGS = {
    "linear": """\
models:
  - model: inputs/ft1
    parameters: {weight: 0.5}
  - model: inputs/ft2
    parameters: {weight: 0.3}
  - model: inputs/ft3
    parameters: {weight: 0.2}
merge_method: linear
dtype: float32
""",
    "task_arithmetic": """\
models:
  - model: inputs/base
  - model: inputs/ft1
    parameters:
      weight: [0.2, 0.8]
  - model: inputs/ft2
    parameters:
      weight:
        - filter: mlp
          value: 0.5
        - value: -0.3
merge_method: task_arithmetic
base_model: inputs/base
parameters:
  lambda: 0.9
dtype: float32
""",
    "ties": """\
models:
  - model: inputs/base
  - model: inputs/ft1
    parameters: {density: 0.5, weight: 0.5}
  - model: inputs/ft2
    parameters: {density: 0.7, weight: 0.3}
  - model: inputs/ft3
    parameters: {density: 0.3, weight: 0.2}
merge_method: ties
base_model: inputs/base
parameters:
  normalize: true
dtype: float32
""",
    "ties_negative_weight": """\
models:
  - model: inputs/base
  - model: inputs/ft1
    parameters: {density: 0.5, weight: 0.6}
  - model: inputs/ft2
    parameters: {density: 0.5, weight: -0.3}
merge_method: ties
base_model: inputs/base
dtype: float32
""",
    **{m: f"""\
models:
  - model: inputs/base
  - model: inputs/ft1
    parameters: {{density: 0.8, gamma: 0.05, weight: 0.6}}
  - model: inputs/ft2
    parameters: {{density: 0.7, gamma: 0.1, weight: 0.4}}
merge_method: {m}
base_model: inputs/base
{extra}dtype: float32
""" for m, extra in (("breadcrumbs", ""), ("breadcrumbs_ties", "parameters:\n  normalize: true\n"))},
    "slerp": """\
slices:
  - sources:
      - model: inputs/ft1
        layer_range: [0, 4]
      - model: inputs/ft2
        layer_range: [0, 4]
merge_method: slerp
base_model: inputs/ft1
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
    "model_stock": """\
models:
  - model: inputs/base
  - model: inputs/ft1
  - model: inputs/ft2
  - model: inputs/ft3
merge_method: model_stock
base_model: inputs/base
dtype: float32
""",
    "model_stock_filter_wise": """\
models:
  - model: inputs/base
  - model: inputs/ft1
  - model: inputs/ft2
merge_method: model_stock
base_model: inputs/base
parameters:
  filter_wise: true
dtype: float32
""",
    "passthrough": """\
slices:
  - sources:
      - model: inputs/ft1
        layer_range: [0, 3]
  - sources:
      - model: inputs/ft2
        layer_range: [2, 4]
merge_method: passthrough
dtype: float32
""",
    **{m: f"""\
models:
  - model: inputs/base
  - model: inputs/ft1
    parameters: {{density: 0.6, weight: 0.7{extra}}}
merge_method: {m}
base_model: inputs/base
dtype: float32
""" for m, extra in (("dare_linear", ""), ("dare_ties", ""), ("della", ", epsilon: 0.2"),
                     ("della_linear", ", epsilon: 0.2"))},
    # mergekit 0.1.5's other methods. nuslerp: without a base (the models themselves), and with one (their task
    # vectors) row by row and column by column; karcher: the base_model is not in the list, so mergekit merges it
    # as a third model; ram/ramplus_tl: epsilon near the median |tau|, so entries have 0-3 contributors.
    "nuslerp": """\
models:
  - model: inputs/ft1
    parameters: {weight: 0.3}
  - model: inputs/ft2
    parameters: {weight: 0.7}
merge_method: nuslerp
dtype: float32
""",
    **{f"nuslerp_base_{name}": f"""\
models:
  - model: inputs/base
  - model: inputs/ft1
    parameters: {{weight: 0.6}}
  - model: inputs/ft2
    parameters: {{weight: 0.4}}
merge_method: nuslerp
base_model: inputs/base
parameters:
  nuslerp_flatten: false
  nuslerp_row_wise: {row_wise}
dtype: float32
""" for name, row_wise in (("rows", "false"), ("columns", "true"))},
    "multislerp": """\
models:
  - model: inputs/base
  - model: inputs/ft1
    parameters: {weight: 0.5}
  - model: inputs/ft2
    parameters: {weight: 0.3}
  - model: inputs/ft3
    parameters: {weight: 0.2}
merge_method: multislerp
base_model: inputs/base
dtype: float32
""",
    "multislerp_no_base": """\
models:
  - model: inputs/ft1
    parameters: {weight: 0.6}
  - model: inputs/ft2
    parameters: {weight: 0.8}
merge_method: multislerp
parameters:
  normalize_weights: false
dtype: float32
""",
    "karcher": """\
models:
  - model: inputs/ft1
  - model: inputs/ft2
merge_method: karcher
base_model: inputs/base
parameters:
  max_iter: 20
  tol: 1.0e-6
dtype: float32
""",
    "nearswap": """\
models:
  - model: inputs/base
  - model: inputs/ft1
merge_method: nearswap
base_model: inputs/base
parameters:
  t: 0.001
dtype: float32
""",
    "arcee_fusion": """\
models:
  - model: inputs/base
  - model: inputs/ft1
merge_method: arcee_fusion
base_model: inputs/base
dtype: float32
""",
    "ram": """\
models:
  - model: inputs/base
  - model: inputs/ft1
  - model: inputs/ft2
  - model: inputs/ft3
merge_method: ram
base_model: inputs/base
parameters:
  epsilon: 0.0015
dtype: float32
""",
    "ramplus_tl": """\
models:
  - model: inputs/base
  - model: inputs/ft1
  - model: inputs/ft2
  - model: inputs/ft3
merge_method: ramplus_tl
base_model: inputs/base
parameters:
  epsilon: 0.0015
  r: 0.5
  alpha: 0.8
dtype: float32
""",
    **{name: f"""\
models:
  - model: inputs/base
  - model: inputs/ft1
  - model: inputs/ft2
  - model: inputs/ft3
merge_method: sce
base_model: inputs/base
{extra}dtype: float32
""" for name, extra in (("sce", ""), ("sce_select_topk", "parameters:\n  select_topk: 0.4\n"))},
}
RANDOM_METHODS = ("dare_linear", "dare_ties", "della", "della_linear")


def _make_checkpoints():
    spec = importlib.util.spec_from_file_location("make_checkpoints", REPO / "benchmarks" / "make_checkpoints.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_inputs(root: Path) -> None:
    """base + ft1..3 in float32 (make_checkpoints' recipe, without its bf16 rounding)."""
    gen = _make_checkpoints()
    cfg = {**gen.llama_config("tiny"), **CFG}
    names = ["base", "ft1", "ft2", "ft3"]
    sds: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    for ti, (name, shape) in enumerate(gen.llama_tensor_shapes(cfg)):
        g = torch.Generator().manual_seed(SEED * 1_000_003 + ti)
        base = gen._base_tensor(name, shape, g)
        contested = (torch.rand(shape, generator=g) < gen.CONTESTED_FRACTION).float()
        sds["base"][name] = base
        for n in names[1:]:
            sds[n][name] = base + gen._finetune_delta(base, contested, g)
    for n, sd in sds.items():
        d = root / n
        d.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


# torch's float32 reductions and MKL's GEMMs round differently with the CPU's vector width (AVX-512 or AVX2
# kernels; MKL's code path per CPU vendor), so that Karcher means and Arcee Fusion's quantile threshold differ
# in the last bits between machines. The goldens are written, and compared, with these pinned: ATen's AVX2
# kernels and MKL's conditional-numerical-reproducibility path (tests/test_mergekit_parity.py reads them from
# MANIFEST.json).
NUMERICS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}


def run_mergekit(exe: str, config: Path, out: Path, cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **NUMERICS)
    res = subprocess.run([exe, str(config), str(out), "--no-copy-tokenizer", "--no-write-model-card", "--quiet",
                          "--random-seed", "0"], capture_output=True, text=True, env=env, cwd=cwd)
    if res.returncode != 0:
        raise SystemExit(f"mergekit-yaml failed on {config.name}:\n{res.stderr[-3000:]}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def publish(staging: Path, out: Path, manifest: dict) -> None:
    """Write staging/MANIFEST.json (`manifest` + the SHA-256 of every file), then put staging in out's place.

    Other generators' goldens nested in `out` (a folder with its own MANIFEST.json, e.g. tokenizer/ from
    make_goldens_tokenizer.py) are not ours to rewrite: they move into the new folder untouched.
    """
    os.chmod(staging, 0o755)  # mkdtemp makes it private
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    manifest = {**manifest, "sha256": {str(p.relative_to(staging)): _sha256(p) for p in files}}
    (staging / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        for sub in sorted(out.iterdir()):
            if sub.is_dir() and (sub / "MANIFEST.json").exists():
                os.rename(sub, staging / sub.name)
        shutil.rmtree(out)
    os.rename(staging, out)


def parse_cli(argv: list[str] | None, doc: str, default_out: Path, packages: tuple[str, ...]):
    """(args, versions): --mergekit-yaml / --out, and the versions of `packages` in mergekit's venv."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--mergekit-yaml", default=os.environ.get("TASKVEC_MERGEKIT_YAML", "/tmp/venv-bench/bin/mergekit-yaml"))
    ap.add_argument("--out", type=Path, default=default_out)
    args = ap.parse_args(argv)
    exe = args.mergekit_yaml
    if not Path(exe).exists():
        raise SystemExit(f"{exe}: no mergekit-yaml there; run benchmarks/setup_bench_venv.sh first")
    code = "import importlib.metadata as m; print(" + ", ".join(f"m.version({p!r})" for p in packages) + ")"
    version = subprocess.run([str(Path(exe).with_name("python")), "-c", code],
                             capture_output=True, text=True).stdout.split()
    return args, version


def main(argv: list[str] | None = None) -> int:
    args, version = parse_cli(argv, __doc__, GOLDENS, ("mergekit", "torch"))
    exe = args.mergekit_yaml
    staging = Path(tempfile.mkdtemp(prefix=".goldens-", dir=args.out.parent))
    try:
        write_inputs(staging / "inputs")
        (staging / "configs").mkdir()
        (staging / "outputs").mkdir()
        for name, text in CONFIGS.items():
            cfg = staging / "configs" / f"{name}.yml"
            cfg.write_text(text)
            folder = staging / "mergekit-out" / name
            run_mergekit(exe, cfg, folder, cwd=staging)
            tensors: dict[str, torch.Tensor] = {}
            for f in sorted(folder.glob("*.safetensors")):
                tensors.update(load_file(str(f)))
            save_file(tensors, str(staging / "outputs" / f"{name}.safetensors"), metadata={"format": "pt"})
            print(f"{name}: {len(tensors)} tensors")
        shutil.rmtree(staging / "mergekit-out")
        (staging / "README.md").write_text("# mergekit 0.1.5 goldens\n\nWritten by `benchmarks/make_goldens.py`; do not "
                                           "edit by hand.\n" + __doc__.split("\n\n", 2)[2])
        publish(staging, args.out, {
            "mergekit": version[0] if version else "?", "torch": version[1] if len(version) > 1 else "?",
            "regenerate": "python benchmarks/make_goldens.py", "random_methods": list(RANDOM_METHODS),
            "numerics_env": NUMERICS})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({total / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
