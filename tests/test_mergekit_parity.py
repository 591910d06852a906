"""Side by side with mergekit 0.1.5: where the semantics coincide, the same config gives the same tensors.

Needs mergekit (the `bench` extra): either importable here, or a `mergekit-yaml`
from another environment named by TASKVEC_MERGEKIT_YAML (mergekit pins its own
dependencies, so the benchmark keeps it in a separate venv):

    TASKVEC_MERGEKIT_YAML=/tmp/venv-bench/bin/mergekit-yaml pytest -m bench tests/test_mergekit_parity.py

Linear, task arithmetic, SLERP (with the seed article's per-filter t
gradients) and passthrough must agree to within one unit in the last place of
the output dtype (both compute in float32 and round once; double rounding can
differ by one ulp), plus float32 evaluation-order noise where a sum cancels to ~0.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from taskvec.config import run_config
from tests.test_config import SEED_BASE, SEED_CONFIGS, SEED_FINETUNES, make_seed_models


def _mergekit_command() -> list[str] | None:
    exe = os.environ.get("TASKVEC_MERGEKIT_YAML")
    if exe:
        return [exe]
    if importlib.util.find_spec("mergekit") is not None:
        found = shutil.which("mergekit-yaml") or str(Path(sys.executable).with_name("mergekit-yaml"))
        return [found] if Path(found).exists() else None
    return None


MERGEKIT = _mergekit_command()
pytestmark = [
    pytest.mark.bench,
    pytest.mark.skipif(MERGEKIT is None, reason="mergekit (the `bench` extra) is not installed; "
                                                "or set TASKVEC_MERGEKIT_YAML to a mergekit-yaml"),
]

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
