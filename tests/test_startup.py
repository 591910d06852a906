"""Start-up: what `taskvec merge` imports before it needs it, and `taskvec warmup` (the kernels compiled once
after installing). Structural checks only: the timings live in benchmarks/ (startup_probe.py, run_bench.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from taskvec.cli import main


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, timeout=300)
    return set(out.stdout.split())


def test_config_layer_imports_neither_torch_nor_numba_nor_pandas():
    loaded = _modules_after("import taskvec.config, taskvec.cli")
    heavy = {"torch", "numba", "pandas", "matplotlib", "seaborn", "transformers"} & loaded
    assert not heavy, heavy


def test_merging_leaves_numba_to_the_first_merge():
    loaded = _modules_after("import taskvec.merging")
    assert "torch" in loaded  # the executor's tensors
    assert not {"numba", "taskvec.methods.fused", "pandas", "matplotlib", "transformers"} & loaded


def test_warmup_rejects_bad_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["warmup", "--models", "0"])
    assert e.value.code == 2 and "--models" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["warmup", "--dtypes", "int8"])
    assert e.value.code == 2 and "int8" in capsys.readouterr().err


def test_warmup_compiles_the_kernels_a_merge_uses():
    numba = pytest.importorskip("numba")  # noqa: F841
    from taskvec.methods import fused, warmup

    assert warmup.warmup(methods=("linear",), n_models=(2,), dtypes=(torch.float32,)) == 1
    # the weighted-sum kernel now holds a compiled specialisation for two float32 inputs
    assert any(len(sig[0]) == 2 for kernel in fused._WEIGHTED_SUM.values() for sig in kernel.signatures)


_CACHE_PROBE = """
import torch
from numba.core.dispatcher import Dispatcher
from taskvec.methods import fused, warmup
warmup.warmup(methods=("linear", "task_arithmetic"), n_models=(1,), dtypes=(torch.float32,))
kernels = [v for v in vars(fused).values() if isinstance(v, Dispatcher)]
kernels += list(fused._WEIGHTED_SUM.values()) + [k for rules in fused._COMBINE.values() for k in rules.values()]
print(sum(sum(k.stats.cache_misses.values()) for k in kernels), sum(sum(k.stats.cache_hits.values()) for k in kernels))
"""


def test_a_second_process_loads_every_kernel_from_the_cache(tmp_path):
    # numba silently recompiles (seconds per kernel, every run) a kernel it can't cache, e.g. one whose
    # closure holds another jitted function; a warm second process must load everything
    pytest.importorskip("numba")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}

    def run() -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", _CACHE_PROBE], capture_output=True, text=True, env=env,
                             check=True, timeout=600)
        misses, hits = out.stdout.split()[-2:]
        return int(misses), int(hits)

    first_misses, _ = run()
    misses, hits = run()
    assert first_misses > 0 and misses == 0 and hits >= first_misses
