"""Parity with mergekit 0.1.5, in two layers.

1. Goldens (every CI run, mergekit not needed): `tests/goldens/` holds tiny float32
   Llama-shaped inputs, one mergekit config per method both tools share, and the
   tensors `mergekit-yaml` 0.1.5 wrote for each (`benchmarks/make_goldens.py`
   regenerates them). `taskvec merge` of the same config must give:
   * linear, task_arithmetic, ties (also with a negative weight), breadcrumbs(_ties),
     slerp, model_stock (also filter_wise), passthrough, nuslerp (without a base; with one,
     row and column wise), multislerp (with and without a base), karcher (a base_model merged
     as a model), nearswap, arcee_fusion, ram, ramplus_tl, sce (also select_topk): the same
     tensors, to the float32 rounding of a different evaluation order (see ULPS; the eight
     methods added last mirror mergekit's float32 operations and agree bit for bit);
   * dare_linear, dare_ties, della, della_linear: masks are random, so not the same
     entries; what must agree is mergekit's `rescale: true` — one factor per tensor
     that gives the dropped task vector the L1 norm of the whole one — and the kept
     fraction. `python -m tests.test_mergekit_parity` prints the parity table.
2. Live (needs mergekit: importable, or TASKVEC_MERGEKIT_YAML=/tmp/venv-bench/bin/mergekit-yaml,
   which `benchmarks/setup_bench_venv.sh` installs; skipped otherwise): the seed
   article's configs and others on the tiny seed-config models, and a re-run of the
   golden configs, so a new mergekit release that changes its outputs shows up.

    TASKVEC_MERGEKIT_YAML=/tmp/venv-bench/bin/mergekit-yaml pytest -m bench tests/test_mergekit_parity.py
"""
from __future__ import annotations

import atexit
import functools
import hashlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch

from taskvec.config import run_config
from tests.test_config import SEED_BASE, SEED_CONFIGS, SEED_FINETUNES, make_seed_models

GOLDENS = Path(__file__).resolve().parent / "goldens"
MANIFEST = json.loads((GOLDENS / "MANIFEST.json").read_text())
GOLDEN_CONFIGS = sorted(p.stem for p in (GOLDENS / "configs").glob("*.yml"))
RANDOM = set(MANIFEST["random_methods"])
# the CPU numerics the goldens were written under (ATen's AVX2 kernels, MKL's reproducible path): torch's float32
# reductions round differently on AVX-512 machines, so taskvec's side of the golden comparison runs under them too
NUMERICS = MANIFEST.get("numerics_env", {})
# float32 units in the last place allowed between taskvec and mergekit per config: 0 = bit for bit.
# linear: mergekit accumulates with addcmul_ and divides by the weight sum at the end, taskvec multiplies
# each model by w_i / sum(w); slerp: mergekit computes the angle and coefficients in float32 tensors,
# taskvec in double; both round the same float32 sums differently by at most two units. model_stock (whole
# tensor): likewise, mergekit's cosines are float32 reductions, taskvec's a chunked float64 Gram matrix (shared
# with its fused kernel), so t may differ in its last bit (filter_wise stays float32: bit for bit).
ULPS = {"linear": 2, "slerp": 2, "model_stock": 2}


def _mergekit_command() -> list[str] | None:
    exe = os.environ.get("TASKVEC_MERGEKIT_YAML")
    if exe:
        return [exe]
    if importlib.util.find_spec("mergekit") is not None:
        found = shutil.which("mergekit-yaml") or str(Path(sys.executable).with_name("mergekit-yaml"))
        return [found] if Path(found).exists() else None
    return None


MERGEKIT = _mergekit_command()
live = [
    pytest.mark.bench,
    pytest.mark.skipif(MERGEKIT is None, reason="mergekit (the `bench` extra) is not installed; "
                                                "or set TASKVEC_MERGEKIT_YAML to a mergekit-yaml"),
]


# ------------------------------------------------------------------------------------------------
# 1. Goldens: every CI run


def _float32_ulp(x: torch.Tensor) -> torch.Tensor:
    """The float32 unit in the last place at |x| (float64, elementwise; subnormal spacing near 0)."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(2.0**-126))) - 23)


def run_golden_config(name: str, out: Path) -> dict[str, torch.Tensor]:
    """`taskvec merge configs/NAME.yml` (run from tests/goldens, as mergekit-yaml was), as a state dict."""
    from taskvec.io import open_source

    cwd = os.getcwd()
    os.chdir(GOLDENS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the negative-weight TIES warning: its own test checks it
            folder = run_config(GOLDENS / "configs" / f"{name}.yml", out, progress=False, copy_tokenizer=False)
    finally:
        os.chdir(cwd)
    src = open_source(folder)
    return {k: src.get(k).clone() for k in src.keys()}


@functools.lru_cache(maxsize=1)
def _pinned_outputs() -> Path | None:
    """Every deterministic golden config merged by taskvec in one child process under NUMERICS (env vars that
    torch reads at import, so not settable here); once per test worker. Returns the folder of NAME.safetensors,
    or None when this process already runs under NUMERICS (merge in-process)."""
    if all(os.environ.get(k) == v for k, v in NUMERICS.items()):
        return None
    out = Path(tempfile.mkdtemp(prefix="taskvec-goldens-"))
    atexit.register(shutil.rmtree, out, True)
    names = [n for n in GOLDEN_CONFIGS if n not in RANDOM]
    code = ("import sys; from pathlib import Path; from safetensors.torch import save_file; "
            "from tests.test_mergekit_parity import run_golden_config\n"
            "out = Path(sys.argv[1])\n"
            "for name in sys.argv[2:]:\n"
            "    save_file(run_golden_config(name, out / name), str(out / f'{name}.safetensors'))\n")
    res = subprocess.run([sys.executable, "-c", code, str(out), *names], capture_output=True, text=True,
                         env={**os.environ, **NUMERICS}, cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def golden_merge(name: str, out: Path) -> dict[str, torch.Tensor]:
    """run_golden_config under the goldens' pinned numerics."""
    folder = _pinned_outputs()
    return run_golden_config(name, out) if folder is None else _load(folder / f"{name}.safetensors")


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _inputs() -> list[dict[str, torch.Tensor]]:
    return [_load(GOLDENS / "inputs" / n / "model.safetensors") for n in ("base", "ft1", "ft2", "ft3")]


def compare_exact(ours: dict, golden: dict, inputs: list[dict] = ()) -> dict:
    """max |difference|; share of entries more than one float32 ulp apart (ulp at the larger |output|);
    the worst difference in ulps of the operands (the largest |input| at that entry, or the output): where
    a weighted sum cancels to ~0, rounding errors are relative to its terms, not to the small result."""
    worst_abs = worst_ulps = 0.0
    beyond = total = 0
    for k, g in golden.items():
        x, y = ours[k].double(), g.double()
        d = (x - y).abs()
        mag = torch.maximum(x.abs(), y.abs())
        operands = mag.clone()
        for sd in inputs:
            if k in sd:
                operands = torch.maximum(operands, sd[k].double().abs())
        worst_abs = max(worst_abs, float(d.max()))
        worst_ulps = max(worst_ulps, float((d / _float32_ulp(operands)).max()))
        beyond += int((d > _float32_ulp(mag)).sum())
        total += d.numel()
    return {"max_abs": worst_abs, "beyond_1ulp": beyond / total, "max_operand_ulps": worst_ulps, "entries": total}


def l1_rescale_report(merged: dict, base: dict, ft: dict) -> dict:
    """Per tensor: the merged delta is c * tau on a kept subset, with ONE c per tensor; returns the worst
    deviation from that form (in float32 ulps of the merged values), ||merged delta||_1 / ||tau||_1 per tensor,
    and the kept fraction over the model."""
    worst_form = 0.0
    ratios = {}
    kept = total = 0
    for k, m in merged.items():
        tau = (ft[k].double() - base[k].double())
        delta = m.double() - base[k].double()
        mask = delta != 0
        c = float(delta[mask].abs().sum() / tau[mask].abs().sum()) if mask.any() else 0.0
        # one factor: delta = c tau where kept, 0 elsewhere, up to the rounding of base + c tau in float32
        err = (delta - c * tau * mask) / _float32_ulp(m.double().abs() + base[k].double().abs())
        worst_form = max(worst_form, float(err.abs().max()))
        ratios[k] = float(delta.abs().sum() / tau.abs().sum())
        kept += int(mask.sum())
        total += mask.numel()
    return {"form_ulps": worst_form, "l1_ratio": ratios, "kept": kept / total, "entries": total}


# the one fine-tune's weight in the random-method configs; della normalizes by it (mergekit's default there)
RANDOM_SCALE = {"dare_linear": 0.7, "dare_ties": 0.7, "della": 1.0, "della_linear": 0.7}
DENSITY = 0.6


def test_goldens_are_what_the_manifest_lists():
    """Inputs, configs and outputs are the files benchmarks/make_goldens.py wrote (edit one: regenerate all)."""
    nested = [d for d in GOLDENS.iterdir() if d.is_dir() and (d / "MANIFEST.json").exists()]  # e.g. tokenizer/
    files = {str(p.relative_to(GOLDENS)) for p in GOLDENS.rglob("*")
             if p.is_file() and p.name != "MANIFEST.json" and not any(d in p.parents for d in nested)}
    assert files == set(MANIFEST["sha256"])
    for rel, digest in MANIFEST["sha256"].items():
        assert hashlib.sha256((GOLDENS / rel).read_bytes()).hexdigest() == digest, rel
    assert MANIFEST["mergekit"] == "0.1.5"
    assert sum((GOLDENS / f).stat().st_size for f in files) < 1_000_000


@pytest.mark.parametrize("name", [n for n in GOLDEN_CONFIGS if n not in RANDOM])
def test_same_tensors_as_mergekit_golden(name, tmp_path):
    golden = _load(GOLDENS / "outputs" / f"{name}.safetensors")
    ours = golden_merge(name, tmp_path / "out")
    assert sorted(ours) == sorted(golden)
    for k, g in golden.items():
        assert ours[k].dtype == g.dtype == torch.float32 and ours[k].shape == g.shape, k
    report = compare_exact(ours, golden, _inputs())
    assert report["max_operand_ulps"] <= ULPS.get(name, 0), report


@pytest.mark.parametrize("name", sorted(RANDOM))
def test_dare_della_rescale_matches_mergekit_golden(name, tmp_path):
    """mergekit's `rescale: true` is one L1-matching factor per tensor; taskvec's YAML path must do the same.
    (Before the fix taskvec divided by 1 - p per entry: the L1 ratio then varies with the mask, ~ +-10 %.)"""
    base = _load(GOLDENS / "inputs" / "base" / "model.safetensors")
    ft = _load(GOLDENS / "inputs" / "ft1" / "model.safetensors")
    golden = _load(GOLDENS / "outputs" / f"{name}.safetensors")
    ours = run_golden_config(name, tmp_path / "out")
    theirs, mine = l1_rescale_report(golden, base, ft), l1_rescale_report(ours, base, ft)
    scale = RANDOM_SCALE[name]
    for report in (theirs, mine):  # the golden documents mergekit's rule; ours must follow it
        assert report["form_ulps"] <= 4, report["form_ulps"]
        for k, r in report["l1_ratio"].items():
            assert math.isclose(r, scale, rel_tol=1e-4), (k, r)
        # kept fraction: Binomial(n, density) over the model (della's keep probabilities average to density)
        sigma = math.sqrt(DENSITY * (1 - DENSITY) / report["entries"])
        assert abs(report["kept"] - DENSITY) <= 5 * sigma, report["kept"]
    assert mine["l1_ratio"].keys() == theirs["l1_ratio"].keys()


def parity_table() -> list[dict]:
    """One row per golden config: max |taskvec - mergekit|, share beyond 1 ulp (random methods: the L1 ratio's
    worst relative deviation from mergekit's per tensor instead), seconds taskvec took."""
    import tempfile

    base = _load(GOLDENS / "inputs" / "base" / "model.safetensors")
    ft = _load(GOLDENS / "inputs" / "ft1" / "model.safetensors")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in GOLDEN_CONFIGS:
            start = time.perf_counter()
            ours = run_golden_config(name, Path(tmp) / name)
            seconds = time.perf_counter() - start
            golden = _load(GOLDENS / "outputs" / f"{name}.safetensors")
            if name in RANDOM:
                a, b = l1_rescale_report(ours, base, ft), l1_rescale_report(golden, base, ft)
                dev = max(abs(a["l1_ratio"][k] / b["l1_ratio"][k] - 1) for k in a["l1_ratio"])
                rows.append({"method": name, "compared": "L1 ratio per tensor", "max_abs": dev, "beyond_1ulp": None,
                             "kept": (a["kept"], b["kept"]), "seconds": seconds})
            else:
                r = compare_exact(ours, golden, _inputs())
                rows.append({"method": name, "compared": "tensors", "max_abs": r["max_abs"],
                             "beyond_1ulp": r["beyond_1ulp"], "max_operand_ulps": r["max_operand_ulps"],
                             "seconds": seconds})
    return rows


# ------------------------------------------------------------------------------------------------
# 2. Live mergekit (skipped unless it is installed)

_MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}

LINEAR = f"""\
models:
  - model: {SEED_FINETUNES[0]}
    parameters: {{weight: 0.5}}
  - model: {SEED_FINETUNES[1]}
    parameters: {{weight: 0.3}}
  - model: {SEED_FINETUNES[2]}
    parameters: {{weight: 0.2}}
merge_method: linear
dtype: bfloat16
"""
# mergekit computes task arithmetic in `dtype`; float32 compute + bfloat16 output is what taskvec does.
TASK_ARITHMETIC = f"""\
models:
  - model: {SEED_BASE}
  - model: {SEED_FINETUNES[0]}
    parameters:
      weight: [0.2, 0.8]
  - model: {SEED_FINETUNES[1]}
    parameters:
      weight:
        - filter: mlp
          value: 0.5
        - value: 0.3
merge_method: task_arithmetic
base_model: {SEED_BASE}
parameters:
  lambda: 0.9
dtype: float32
out_dtype: bfloat16
"""

# Frankenmerges: each output slice merges other layers of the models; t gradients restart in every slice.
FRANKEN_SLERP = f"""\
slices:
  - sources:
      - model: {SEED_FINETUNES[0]}
        layer_range: [0, 16]
      - model: {SEED_FINETUNES[1]}
        layer_range: [0, 16]
  - sources:
      - model: {SEED_FINETUNES[0]}
        layer_range: [8, 24]
      - model: {SEED_FINETUNES[1]}
        layer_range: [16, 32]
merge_method: slerp
base_model: {SEED_FINETUNES[0]}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - value: 0.5
dtype: bfloat16
"""
FRANKEN_LINEAR = f"""\
slices:
  - sources:
      - model: {SEED_FINETUNES[0]}
        layer_range: [0, 16]
        parameters: {{weight: 0.7}}
      - model: {SEED_FINETUNES[1]}
        layer_range: [0, 16]
  - sources:
      - model: {SEED_FINETUNES[0]}
        layer_range: [16, 32]
      - model: {SEED_FINETUNES[2]}
        layer_range: [8, 24]
merge_method: linear
parameters:
  weight: 0.4
dtype: bfloat16
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parity-hub")
    make_seed_models(root)
    (root / "linear.yml").write_text(LINEAR)
    (root / "task_arithmetic.yml").write_text(TASK_ARITHMETIC)
    (root / "franken_slerp.yml").write_text(FRANKEN_SLERP)
    (root / "franken_linear.yml").write_text(FRANKEN_LINEAR)
    return root


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in units of the last place of the output dtype at max(|a|, |b|).

    Where the weighted sum cancels to ~0, float32 evaluation-order noise (a few
    2^-24 of the tensor's scale) is all either side can promise: it is allowed on top.
    """
    if not a.numel():
        return 0.0
    bits = _MANTISSA_BITS[a.dtype]
    x, y = a.double(), b.double()
    mag = torch.maximum(x.abs(), y.abs())
    ulp = torch.exp2(torch.floor(torch.log2(mag.clamp_min(1e-30))) - bits)
    noise = 2.0**-20 * float(mag.max())
    return float(((x - y).abs() - noise).clamp_min(0).div(ulp).max())


@pytest.mark.parametrize("config", [
    "linear.yml", "task_arithmetic.yml", "franken_slerp.yml", "franken_linear.yml", SEED_CONFIGS[0].name, SEED_CONFIGS[3].name, SEED_CONFIGS[4].name,
])
@live[0]
@live[1]
def test_same_tensors_as_mergekit(hub, monkeypatch, config):
    from taskvec.io import open_source

    monkeypatch.chdir(hub)
    path = hub / config if (hub / config).exists() else next(p for p in SEED_CONFIGS if p.name == config)
    ours, theirs = hub / f"taskvec-{path.stem}", hub / f"mergekit-{path.stem}"
    run_config(path, ours, progress=False)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run([*MERGEKIT, str(path), str(theirs), "--no-copy-tokenizer", "--no-write-model-card",
                          "--quiet"], capture_output=True, text=True, env=env, cwd=hub)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = open_source(ours), open_source(theirs)
    assert sorted(a.keys()) == sorted(b.keys())
    worst = {}
    for k in a.keys():
        x, y = a.get(k), b.get(k)
        assert x.dtype == y.dtype and x.shape == y.shape, k
        worst[k] = _ulps_apart(x, y)
    name, ulps = max(worst.items(), key=lambda kv: kv[1])
    assert ulps <= 1.0, f"{name}: {ulps:.1f} ulps apart"


@live[0]
@live[1]
@pytest.mark.parametrize("name", GOLDEN_CONFIGS)
def test_goldens_are_current_with_mergekit(name, tmp_path):
    """Re-run mergekit on a golden config: deterministic methods must reproduce the committed tensors."""
    from taskvec.io import open_source

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **NUMERICS)
    res = subprocess.run([*MERGEKIT, str(GOLDENS / "configs" / f"{name}.yml"), str(tmp_path / "mk"),
                          "--no-copy-tokenizer", "--no-write-model-card", "--quiet"],
                         capture_output=True, text=True, env=env, cwd=GOLDENS)
    assert res.returncode == 0, res.stderr[-3000:]
    src = open_source(tmp_path / "mk")
    fresh = {k: src.get(k) for k in src.keys()}
    golden = _load(GOLDENS / "outputs" / f"{name}.safetensors")
    assert sorted(fresh) == sorted(golden)
    if name not in RANDOM:
        assert all(torch.equal(fresh[k], golden[k]) for k in golden)


if __name__ == "__main__":  # the parity table (markdown)
    print("| config | compared | max abs difference | share beyond 1 ulp | taskvec seconds |")
    print("|---|---|---|---|---|")
    for row in parity_table():
        share = "—" if row["beyond_1ulp"] is None else f"{row['beyond_1ulp']:.2%}"
        label = f"{row['max_abs']:.3g}" if row["compared"] == "tensors" else f"L1 ratio rel. dev. {row['max_abs']:.2g}"
        print(f"| {row['method']} | {row['compared']} | {label} | {share} | {row['seconds']:.2f} |")
