"""taskvec vs mergekit 0.1.5 vs the I/O floor, on the same synthetic checkpoints, in one run.

    python benchmarks/run_bench.py --size 270m            # iterate
    python benchmarks/run_bench.py --size 1.1b            # the reference size

For each method (linear, task_arithmetic, ties, dare_ties, slerp) the same
YAML config (benchmarks/configs/bench_*.yml, `$WORK` filled in) is run by
`mergekit-yaml` (from a separate venv, --mergekit) and by `taskvec merge`,
interleaved — the order alternates per method — so both see the same machine
load. The I/O floor (benchmarks/io_floor.py) reads every input tensor, adds
them, and writes the result with taskvec's writer: no merge can be faster.

Measured per run: wall time of the whole command (imports included, as a user
sees it), for taskvec also the time from interpreter start to its first input
tensor read (benchmarks/startup_probe.py) and the wall time of a first run with
an empty numba cache (`first_run_s`: what the first merge after installing
costs; the timed run after it finds the kernels cached), and peak anonymous memory of the process tree, sampled every 20 ms
from /proc/PID/status `RssAnon` (max RSS would count the mmapped input pages,
which are page cache, not memory the merge needs). Where the semantics
coincide (linear, task_arithmetic, slerp), the outputs are compared tensor by
tensor. Writes a markdown table to benchmarks/results/bench_SIZE.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from string import Template

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "slerp")
# This wave's methods (`--methods all`, or name them): mergekit 0.1.5's others, and the spectral merges
EXTRA_METHODS = ("model_stock", "nuslerp", "multislerp", "karcher", "nearswap", "arcee_fusion", "ram", "sce",
                 "tsv_m", "iso_c", "iso_cts")
MERGEKIT_LACKS = ("tsv_m", "iso_c", "iso_cts")  # taskvec only: timed against the floor alone
# Outputs compared tool against tool (DARE's random masks differ by design).
PARITY_METHODS = ("linear", "task_arithmetic", "ties", "slerp")


# ------------------------------------------------------------------ measuring

def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def tree_anon_bytes(pid: int) -> int:
    """Sum of RssAnon over a process and all its descendants."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
        stack += _children(p)
    return total


def run_measured(cmd: list[str], log: Path, env: dict | None = None, interval: float = 0.02) -> dict:
    """Run `cmd`; return wall seconds, peak anonymous bytes of its process tree, exit code."""
    load = os.getloadavg()[0]
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, tree_anon_bytes(proc.pid))
            time.sleep(interval)
        wall = time.perf_counter() - t0
    return {"wall": wall, "peak_anon": peak, "rc": proc.returncode, "load_before": load}


# ------------------------------------------------------------------ comparing

def compare_outputs(a: Path, b: Path) -> dict:
    """Max |a - b| over all tensors, and the fraction of elements differing by more than 1 bf16 ulp."""
    import torch

    from taskvec.io import open_source

    sa, sb = open_source(a), open_source(b)
    if set(sa.keys()) != set(sb.keys()):
        return {"same_keys": False}
    max_abs, beyond_ulp, n = 0.0, 0, 0
    for k in sa.keys():
        x, y = sa.get(k).float(), sb.get(k).float()
        d = (x - y).abs()
        max_abs = max(max_abs, float(d.max()) if d.numel() else 0.0)
        # one bf16 ulp at the larger magnitude: 2^(floor(log2|v|) - 7)
        ulp = torch.exp2(torch.floor(torch.log2(torch.maximum(x.abs(), y.abs()).clamp_min(1e-30))) - 7)
        beyond_ulp += int((d > ulp * 1.0001).sum())
        n += d.numel()
    return {"same_keys": True, "max_abs": max_abs, "frac_beyond_1ulp": beyond_ulp / max(n, 1)}


# ------------------------------------------------------------------ running

def write_configs(work: Path, models: dict[str, Path], methods=METHODS) -> dict[str, Path]:
    cfg_dir = work / "configs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    layers = json.loads((models["base"] / "config.json").read_text())["num_hidden_layers"]
    out = {}
    for m in methods:
        text = Template((HERE / "configs" / f"bench_{m}.yml").read_text()).substitute(
            WORK=str(models["base"].parent), LAYERS=layers)
        out[m] = cfg_dir / f"{m}.yml"
        out[m].write_text(text)
    return out


def fmt_s(x: float) -> str:
    return f"{x:.1f}"


def fmt_gb(x: int) -> str:
    return f"{x / 2**30:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="270m", help="270m, 1.1b or tiny (see make_checkpoints.py)")
    ap.add_argument("--work", default=str(HERE / "work"), help="where checkpoints and outputs go (gitignored)")
    ap.add_argument("--mergekit", default="/tmp/venv-bench/bin/mergekit-yaml", help="mergekit-yaml of mergekit 0.1.5")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated, or 'all' (adds " + ", ".join(EXTRA_METHODS) + ")")
    ap.add_argument("--no-first-run", action="store_true", help="skip the cold-numba-cache first run per method")
    ap.add_argument("--no-mergekit", action="store_true", help="taskvec and floor only")
    ap.add_argument("--results", default=str(HERE / "results"))
    ap.add_argument("--tag", default="", help="suffix for the result file name")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(HERE))
    from make_checkpoints import make_checkpoints

    work = Path(args.work) / args.size
    t0 = time.perf_counter()
    models = make_checkpoints(args.size, work)
    print(f"checkpoints ready in {time.perf_counter() - t0:.0f} s: {work}", flush=True)
    methods = list(METHODS + EXTRA_METHODS) if args.methods == "all" else args.methods.split(",")
    configs = write_configs(work, models, methods)
    outs = work / "outputs"
    shutil.rmtree(outs, ignore_errors=True)
    outs.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TASKVEC_NO_PROGRESS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    mk_env = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    logs = work / "logs"
    logs.mkdir(exist_ok=True)

    def taskvec_cmd(cfg: Path, out: Path) -> list[str]:
        # `taskvec merge`, through the probe that notes when the first input tensor is read
        return [sys.executable, str(HERE / "startup_probe.py"), str(cfg), str(out), "--no-progress"]

    def probe(log: Path) -> float | None:
        for line in reversed(log.read_text(errors="replace").splitlines()):
            if line.startswith("{") and "startup_to_first_tensor_s" in line:
                return json.loads(line)["startup_to_first_tensor_s"]
        return None

    numba_cache = work / "numba-cache"  # a cache of the bench's own: the first run of each method starts it empty

    def mergekit_cmd(cfg: Path, out: Path) -> list[str]:
        return [args.mergekit, str(cfg), str(out), "--no-copy-tokenizer", "--quiet"]

    # The floor first: it also brings the inputs into the page cache for everyone after it.
    floor_cmd = [sys.executable, str(HERE / "io_floor.py"), *(str(models[n]) for n in ("base", "ft1", "ft2", "ft3"))]
    subprocess.run(floor_cmd + [str(outs / "floor-warmup")], check=True, env=env, cwd=REPO, capture_output=True)
    shutil.rmtree(outs / "floor-warmup")
    floor = run_measured(floor_cmd + [str(outs / "floor")], logs / "floor.log", env)
    if floor["rc"]:
        raise SystemExit(f"floor failed, see {logs / 'floor.log'}")
    shutil.rmtree(outs / "floor")
    print(f"floor: {floor['wall']:.1f} s, {fmt_gb(floor['peak_anon'])} GiB anon", flush=True)

    # Fixed costs (interpreter start + imports), part of every wall time below.
    startup = {"taskvec": run_measured([sys.executable, "-c", "import taskvec.config, taskvec.merging"],
                                       logs / "startup-taskvec.log", env)["wall"]}
    if not args.no_mergekit:
        startup["mergekit"] = run_measured([args.mergekit, "--help"], logs / "startup-mergekit.log", mk_env)["wall"]
    print("startup:", {k: round(v, 1) for k, v in startup.items()}, flush=True)

    rows = []
    tv_env = {**env, "NUMBA_CACHE_DIR": str(numba_cache)}
    for i, method in enumerate(methods):
        runs = {}
        first_run = None
        if not args.no_first_run:
            shutil.rmtree(numba_cache, ignore_errors=True)
            out = outs / f"taskvec-first-{method}"
            first_run = run_measured(taskvec_cmd(configs[method], out), logs / f"taskvec-first-{method}.log", tv_env)
            shutil.rmtree(out, ignore_errors=True)
            print(f"{method:16s} first run {first_run['wall']:7.1f} s (empty numba cache)", flush=True)
        order = ["mergekit", "taskvec"] if i % 2 == 0 else ["taskvec", "mergekit"]
        if args.no_mergekit or method in MERGEKIT_LACKS:
            order = ["taskvec"]
        for tool in order:
            out = outs / f"{tool}-{method}"
            cmd = taskvec_cmd(configs[method], out) if tool == "taskvec" else mergekit_cmd(configs[method], out)
            r = run_measured(cmd, logs / f"{tool}-{method}.log", tv_env if tool == "taskvec" else mk_env)
            if tool == "taskvec":
                r["startup_to_first_tensor_s"] = probe(logs / f"{tool}-{method}.log")
                r["first_run_s"] = first_run["wall"] if first_run else None
            if r["rc"]:  # reported in the table (and its log kept), not fatal: the other methods still run
                tail = (logs / f"{tool}-{method}.log").read_text(errors="replace")[-600:]
                print(f"{method:16s} {tool:8s} FAILED (rc {r['rc']}), see {logs / f'{tool}-{method}.log'}:\n{tail}",
                      flush=True)
            runs[tool] = r
            print(f"{method:16s} {tool:8s} {r['wall']:7.1f} s  {fmt_gb(r['peak_anon'])} GiB anon", flush=True)
        parity = None
        if "mergekit" in runs and method in PARITY_METHODS and not any(r["rc"] for r in runs.values()):
            parity = compare_outputs(outs / f"taskvec-{method}", outs / f"mergekit-{method}")
        for tool in order:
            shutil.rmtree(outs / f"{tool}-{method}", ignore_errors=True)
        rows.append((method, runs, parity))

    lines = [
        f"# taskvec vs mergekit 0.1.5 — {args.size} synthetic Llama-shaped bf16 checkpoints",
        "",
        f"Base + 3 fine-tunes ({_describe(models['base'])}), generated by `benchmarks/make_checkpoints.py`; "
        f"configs `benchmarks/configs/bench_*.yml`; run by `benchmarks/run_bench.py --size {args.size}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}.",
        "",
        "Wall time is the whole command (interpreter start and imports included); peak anon = peak of the summed "
        "`RssAnon` of the process tree sampled every 20 ms (mmapped inputs are page cache, not counted). "
        "I/O floor: read every input tensor, add them, write (taskvec's writer).",
        "",
        f"I/O floor: **{floor['wall']:.1f} s**, {fmt_gb(floor['peak_anon'])} GiB peak anon (1-min load average "
        f"{floor['load_before']:.1f} before it). Fixed cost of "
        "starting each tool (interpreter + imports, included in every wall time): "
        + ", ".join(f"{k} {v:.1f} s" for k, v in startup.items()) + ".",
        "",
        "| method | mergekit s | taskvec s | taskvec/mergekit | taskvec/floor | first_run_s | first/warm | "
        "startup_to_first_tensor_s | mergekit GiB | taskvec GiB | load avg before (mk / tv) | "
        "parity (max abs diff; share > 1 bf16 ulp) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    def wall(r: dict) -> str:
        return f"failed (rc {r['rc']})" if r["rc"] else fmt_s(r["wall"])

    for method, runs, parity in rows:
        tv, mk = runs["taskvec"], runs.get("mergekit")
        par = "—"
        if parity is not None:
            par = ("keys differ" if not parity["same_keys"]
                   else f"{parity['max_abs']:.2e}; {parity['frac_beyond_1ulp']:.2%}")
        failed = any(r["rc"] for r in runs.values())
        ratio = f"{tv['wall'] / mk['wall']:.2f}" if mk and not failed else "—"
        first = tv.get("first_run_s")
        to_first = tv.get("startup_to_first_tensor_s")
        first_ratio = f"{first / tv['wall']:.2f}" if first and not tv["rc"] else "—"
        to_floor = f"{tv['wall'] / floor['wall']:.2f}" if not tv["rc"] else "—"
        lines.append(f"| {method} | {wall(mk) if mk else '—'} | {wall(tv)} | {ratio} | "
                     f"{to_floor} | "
                     f"{fmt_s(first) if first else '—'} | "
                     f"{first_ratio} | "
                     f"{f'{to_first:.2f}' if to_first is not None else '—'} | {fmt_gb(mk['peak_anon']) if mk else '—'} | "
                     f"{fmt_gb(tv['peak_anon'])} | {mk['load_before'] if mk else float('nan'):.1f} / "
                     f"{tv['load_before']:.1f} | {par} |")
    lines += [
        "",
        f"Caveat: the machine's {os.cpu_count()} cores are shared with other jobs (the load average before each run "
        "is in the table), so timings are noisy; each method's two runs are back to back (order alternating) so "
        "they see similar load. Rerun to gauge the spread.",
        "",
        "Parity: linear and slerp compute in float32 in both tools. mergekit computes task arithmetic, TIES "
        "and DARE in the config's `dtype` — bfloat16 here — while taskvec computes in float32 and rounds once, hence "
        "the differences beyond 1 ulp; with `dtype: float32` task arithmetic agrees within 1 ulp "
        "(`tests/test_mergekit_parity.py`). TIES also differs where magnitudes tie at the trim threshold "
        "(mergekit keeps an arbitrary `argsort` subset of equal values). DARE-TIES is not compared: random masks "
        "differ by design.",
    ]
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"bench_{args.size}{args.tag}.md"
    path.write_text("\n".join(lines) + "\n")
    (results / f"bench_{args.size}{args.tag}.json").write_text(json.dumps(
        {"floor": floor, "startup": startup, "rows": [{"method": m, "runs": r, "parity": p} for m, r, p in rows]}, indent=2))
    print("\n".join(lines))
    print(f"\nwrote {path}")
    return 0


def _describe(model_dir: Path) -> str:
    cfg = json.loads((model_dir / "config.json").read_text())
    idx = json.loads((model_dir / "model.safetensors.index.json").read_text())
    n = idx["metadata"]["total_size"] / 2
    return (f"{n / 1e9:.2f} B parameters each, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
            f"{idx['metadata']['total_size'] / 2**30:.2f} GiB per checkpoint")


if __name__ == "__main__":
    sys.exit(main())
