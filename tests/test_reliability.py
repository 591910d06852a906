"""Reliability of whole-model merges: determinism, bounded memory, invariants."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskvec import TaskVector, merge

# ------------------------------------------------------------------ determinism
DETERMINISM = textwrap.dedent(r'''
    import hashlib, json, sys
    import torch
    from taskvec import merge
    threads, reverse, method = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.{m}.weight" for i in range(3) for m in ("self_attn.q_proj", "mlp.up_proj")]
    base = {n: torch.randn(48, 40, generator=g) for n in names}
    fts = [{n: base[n] + 0.01 * torch.randn(48, 40, generator=g) for n in names} for _ in range(3)]
    if reverse:  # a different tensor order must not change any tensor's random mask
        base = dict(reversed(base.items())); fts = [dict(reversed(f.items())) for f in fts]
    out = merge(base, fts, method, density=0.3, seed=1234, progress=False)
    h = {k: hashlib.sha256(out[k].contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() for k in sorted(out)}
    print(json.dumps(h))
''')


def _run_merge(threads: int, reverse: bool, method: str) -> dict:
    r = subprocess.run([sys.executable, "-c", DETERMINISM, str(threads), "1" if reverse else "0", method],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_is_bit_identical_across_runs_threads_and_order(method):
    first = _run_merge(1, False, method)
    assert first == _run_merge(1, False, method)  # a second process
    assert first == _run_merge(2, False, method)  # another thread count
    assert first == _run_merge(2, True, method)  # tensors visited in the opposite order


def test_different_seed_changes_dare():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(200)}
    ft = {"w": base["w"] + torch.randn(200, generator=g)}
    a = merge(base, [ft], "dare_linear", density=0.5, seed=1, progress=False)["w"]
    b = merge(base, [ft], "dare_linear", density=0.5, seed=2, progress=False)["w"]
    assert not torch.equal(a, b)


# ------------------------------------------------------------------ memory bound
MEMORY = textwrap.dedent(r'''
    import json, os, signal, sys, threading, time
    from pathlib import Path
    import torch
    from taskvec import merge
    from taskvec.io import TensorMeta
    from taskvec.io.safetensors_format import SafetensorsFileWriter

    work, cap_mb = Path(sys.argv[1]), float(sys.argv[2])
    n, rows, cols = 96, 512, 2048           # 96 x 1 M = 100 M parameters per checkpoint
    metas = {f"model.layers.{i}.mlp.up_proj.weight": TensorMeta((rows, cols), torch.bfloat16) for i in range(n)}
    for m in range(4):
        (work / f"m{m}").mkdir()
        w = SafetensorsFileWriter(work / f"m{m}" / "model.safetensors", metas)
        g = torch.Generator().manual_seed(m)
        for k in metas:
            w.write(k, torch.randn(rows, cols, generator=g).bfloat16())
        w.close()

    def anon_mb():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024

    baseline = anon_mb(); peak = [0.0]; stop = threading.Event()
    def watchdog():  # the imposed cap: exceeding it kills the process
        while not stop.is_set():
            used = anon_mb() - baseline
            peak[0] = max(peak[0], used)
            if used > cap_mb:
                print(json.dumps({"killed_at_mb": used}), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.002)
    t = threading.Thread(target=watchdog, daemon=True); t.start()
    out = merge(work / "m0", [work / "m1", work / "m2", work / "m3"], "ties", density=0.2,
                out=work / "merged", progress=False)
    stop.set(); t.join()
    inputs_mb = sum(f.stat().st_size for f in work.glob("m?/model.safetensors")) / 2**20
    print(json.dumps({"peak_anon_mb": peak[0], "cap_mb": cap_mb, "inputs_mb": inputs_mb,
                      "inputs_f32_mb": 2 * inputs_mb, "done": (out / "model.safetensors").is_file()}))
''')


@pytest.mark.slow
def test_merge_of_inputs_far_larger_than_a_memory_cap_completes(tmp_path):
    cap_mb = 200.0  # 4 checkpoints of 100 M bf16 parameters: 800 MB on disk, 1.6 GB as float32
    r = subprocess.run([sys.executable, "-c", MEMORY, str(tmp_path), str(cap_mb)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, (r.stdout[-500:], r.stderr[-2000:])
    m = json.loads(r.stdout.strip().splitlines()[-1])
    print("\nmemory:", m)
    assert m["done"] and m["inputs_mb"] >= 3.5 * cap_mb


# ------------------------------------------------------------------ invariants
@st.composite
def base_ft(draw):
    n = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    base = {"a.weight": torch.randn(n, generator=g), "b.weight": torch.randn(2, n, generator=g), "ids": torch.arange(n)}
    ft = {k: (v * (1 + 0.1 * torch.rand(v.shape, generator=g)) if v.is_floating_point() else v) for k, v in base.items()}
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    cast = lambda d: {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in d.items()}  # noqa: E731
    return cast(base), cast(ft)


@settings(max_examples=40, deadline=None)
@given(base_ft())
def test_task_arithmetic_of_one_model_at_lambda_one_is_that_model(pair):
    base, ft = pair
    out = merge(base, [ft], "task_arithmetic", progress=False, **{"lambda": 1.0})
    for k in ft:
        assert out[k].dtype == ft[k].dtype and torch.equal(out[k], ft[k]), k


@settings(max_examples=40, deadline=None)
@given(base_ft(), st.sampled_from(["ties", "dare_ties", "task_arithmetic", "linear", "breadcrumbs"]))
def test_merge_never_mutates_or_aliases_inputs(pair, method):
    base, ft = pair
    snapshot = [{k: v.clone() for k, v in d.items()} for d in (base, ft)]
    out = merge(base, [ft, ft], method, progress=False)
    for t in out.values():
        t.add_(1)  # scribbling on the output must not reach the inputs
    for d, s in zip((base, ft), snapshot):
        assert all(torch.equal(d[k], s[k]) for k in d)


def test_apply_then_negate_returns_base_through_merge():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, generator=g)}
    ft = {"w": base["w"] + 0.01 * torch.randn(64, generator=g)}
    tv = TaskVector.from_models(base, ft)
    there = merge(base, [ft], "task_arithmetic", progress=False, **{"lambda": 0.7})
    back = (-tv).apply_to(there, scaling=0.7)
    assert torch.allclose(back["w"], base["w"], atol=1e-6)
