"""An analysis of task vectors vs simply reading the inputs.

    python benchmarks/bench_analysis.py BASE FT1 [FT2 ...] [--analysis cosine|spectral]
                                        [--repeat 2] [--json OUT.json]

Acceptance (issue 6): the cosine matrix of 3 task vectors of a 1.1B model
takes <= 1.5x the time of reading the inputs. Issue 15 asks the same question of
`spectral_profile` (one SVD per 2-D delta and vector: compute-bound, not I/O-bound),
and its peak memory. Two read floors are timed, both
tensor by tensor over every float tensor of every input (base + fine-tunes):

  read      load each tensor and touch every byte (a copy: mmapped pages must come in)
  read_f32  load each tensor as float32 (what any analysis needs to do arithmetic)

`cosine` is `taskvec.analysis.cosine_matrix` on `TaskVector.from_models(base, ft_i)`
(one shared base: each base tensor is read once per parameter); `spectral` is
`taskvec.analysis.spectral_profile` on the same vectors. The peak of this process's
`RssAnon` (sampled every 20 ms; mmapped input pages are page cache, not counted) is
reported per pass, above the resident size before the pass. Each pass is
repeated and the fastest run is kept, so the page cache is equally warm for all;
wall-clock and process CPU times are both reported (on a shared machine the
CPU-time ratio is the stable one).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import torch

os.environ.setdefault("TASKVEC_NO_PROGRESS", "1")


def read_pass(sources, keys, as_float32: bool) -> None:
    for k in keys:
        for s in sources:
            t = s.get(k)
            t = t.to(torch.float32) if as_float32 and t.dtype != torch.float32 else t.clone()
            del t


def rss_anon() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakAnon:
    """Peak RssAnon of this process while the block runs, above its value at entry (bytes)."""

    def __enter__(self):
        self.start = self.peak = rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_anon())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())
        self.extra = self.peak - self.start


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("finetuned", nargs="+")
    ap.add_argument("--analysis", choices=["cosine", "spectral"], default="cosine")
    ap.add_argument("--repeat", type=int, default=2, help="runs per pass; the fastest is reported (default 2)")
    ap.add_argument("--json", help="also write the timings here")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)

    from taskvec.analysis import cosine_matrix, spectral_profile
    from taskvec.io import open_source
    from taskvec.vector import TaskVector

    base = open_source(args.base)
    fts = [open_source(f) for f in args.finetuned]
    keys = [k for k, m in base.index.items() if m.is_float]
    n_params = sum(base.index[k].numel for k in keys)
    nbytes = sum(base.index[k].numel * base.index[k].dtype.itemsize for k in keys) * (1 + len(fts))

    def timed(fn):
        # wall clock and process CPU time, best of `repeat` (CPU time stays meaningful on a shared machine)
        best_wall = best_cpu = float("inf")
        peak = 0
        for _ in range(max(1, args.repeat)):
            with PeakAnon() as mem:
                w0, c0 = time.perf_counter(), time.process_time()
                out = fn()
                best_wall = min(best_wall, time.perf_counter() - w0)
                best_cpu = min(best_cpu, time.process_time() - c0)
            peak = max(peak, mem.extra)
        return best_wall, best_cpu, peak, out

    load = os.getloadavg()
    r_w, r_c, r_m, _ = timed(lambda: read_pass([base, *fts], keys, as_float32=False))
    r32_w, r32_c, r32_m, _ = timed(lambda: read_pass([base, *fts], keys, as_float32=True))
    tvs = {os.path.basename(f.rstrip("/")): TaskVector.from_models(base, f2) for f, f2 in zip(args.finetuned, fts)}
    name = args.analysis
    analyse = (lambda: cosine_matrix(tvs)) if name == "cosine" else (lambda: spectral_profile(tvs))
    a_w, a_c, a_m, res = timed(analyse)
    gib = 2 ** 30
    result = {
        "analysis": name, "inputs": 1 + len(fts), "float_params_per_model": n_params, "bytes_read_per_pass": nbytes,
        "threads": torch.get_num_threads(), "loadavg_before": [round(x, 2) for x in load],
        "wall_s": {"read": round(r_w, 3), "read_f32": round(r32_w, 3), name: round(a_w, 3)},
        "cpu_s": {"read": round(r_c, 3), "read_f32": round(r32_c, 3), name: round(a_c, 3)},
        "peak_anon_gib": {"read": round(r_m / gib, 3), "read_f32": round(r32_m / gib, 3), name: round(a_m / gib, 3)},
        f"{name}_over_read": round(a_w / r_w, 3), f"{name}_over_read_f32": round(a_w / r32_w, 3),
        f"{name}_over_read_cpu": round(a_c / r_c, 3), f"{name}_over_read_f32_cpu": round(a_c / r32_c, 3),
    }
    if name == "cosine":
        result["cosine_matrix"] = res.matrix().round(6).to_dict()
    else:
        t = res.tensors
        result["svd"] = t["svd"].value_counts().to_dict()
        result["by_module"] = (t.groupby("module")[["stable_rank", "rank_90", "rank_90_share"]].median()
                               .round(3).to_dict(orient="index"))
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
