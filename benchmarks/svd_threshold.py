"""Time per SVD, exact vs randomised, on the matrix shapes of the benchmark checkpoints; where the switch belongs.

    python benchmarks/svd_threshold.py [--shapes 1024x1024,2816x1024,...] [--out benchmarks/results/svd_threshold.md]

The spectral merges (TSV-M, Iso-C, Iso-CTS) decompose every 2-D task matrix exactly (torch.linalg.svd: Iso-C
needs every singular vector, and a merge must not depend on a random sketch). The analyses and
`TaskVector.low_rank` call `taskvec.methods.spectral.top_svd`, which switches to torch.svd_lowrank (k + 16
columns, 4 power iterations) above `EXACT_SVD_MAX_NUMEL` entries when at most half the rank is asked for.
This measures both on each shape, for k = r/8 and r/32, with the relative error of the top-k singular values
(the sketch's accuracy depends on the spectrum: the matrices here have a power-law spectrum, sigma_i ~ i^-0.5,
plus Gaussian noise of spectral norm ~1 % of sigma_1, as fine-tuning deltas roughly have).
Each row notes the 1-minute load average before it (2 shared cores: timings are noisy).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from taskvec.methods.spectral import EXACT_SVD_MAX_NUMEL, top_svd

# 270M: q/o (1024x1024), k/v (256x1024), MLP (2816x1024); 1.1B: q/o (2048x2048), MLP (5632x2048); embeddings
DEFAULT_SHAPES = "256x1024,1024x1024,2816x1024,2048x2048,5632x2048,32000x1024"


def task_matrix(m: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -0.5
    x = (u * s) @ v.T
    # noise of spectral norm ~1 % of sigma_1 (an m x n Gaussian matrix of std 1 has norm ~ sqrt(m) + sqrt(n))
    return x + 0.01 * float(s[0]) / (m ** 0.5 + n ** 0.5) * torch.randn(m, n, generator=g)


def timed(f, reps: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--reps", type=int, default=2, help="best of this many (1 for matrices over 2**24 entries)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "svd_threshold.md"))
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    rows = []
    for shape in args.shapes.split(","):
        m, n = (int(d) for d in shape.split("x"))
        x = task_matrix(m, n)
        r = min(m, n)
        load = os.getloadavg()[0]
        reps = 1 if x.numel() > EXACT_SVD_MAX_NUMEL else args.reps
        t_exact, (_, s_exact, _) = timed(lambda: torch.linalg.svd(x, full_matrices=False), reps)
        cells = []
        for div in (8, 32):
            k = max(1, r // div)
            t_rand, (_, s_rand, _) = timed(lambda: top_svd(x, k, exact_max_numel=0), reps)
            err = float(((s_rand - s_exact[:k]).abs() / s_exact[:k]).max())
            cells.append((k, t_rand, err))
        default = "randomised" if x.numel() > EXACT_SVD_MAX_NUMEL else "exact"
        rows.append((shape, x.numel(), t_exact, cells, default, load))
        print(rows[-1], flush=True)
    lines = [
        "# Time per SVD: exact (LAPACK) vs randomised (torch.svd_lowrank), float32",
        "",
        f"`benchmarks/svd_threshold.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads. Best of "
        f"{args.reps} (1 above 2**24 entries). Matrices: power-law spectrum (sigma_i ~ i^-0.5) + noise of norm 1 % of sigma_1. "
        f"`top_svd` switches to the sketch above EXACT_SVD_MAX_NUMEL = {EXACT_SVD_MAX_NUMEL:,} entries "
        "(when k <= r/2); the merges always decompose exactly.",
        "",
        "| shape | entries | exact s | k = r/8: randomised s | speed-up | max rel. error of top-k sigma | "
        "k = r/32: randomised s | speed-up | max rel. error | top_svd uses | load before |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for shape, numel, t_exact, cells, default, load in rows:
        (k8, t8, e8), (k32, t32, e32) = cells
        lines.append(f"| {shape} | {numel:,} | {t_exact:.3f} | {t8:.3f} (k={k8}) | {t_exact / t8:.1f}x | {e8:.1e} | "
                     f"{t32:.3f} (k={k32}) | {t_exact / t32:.1f}x | {e32:.1e} | {default} | {load:.1f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
