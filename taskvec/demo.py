"""`taskvec demo`: the task-vector idea end to end on a small real model and real data.

Pre-trains a small MLP on scikit-learn's bundled handwritten digits (real data,
no download), fine-tunes it, saves both as safetensors checkpoints, then
extracts τ = θ_ft − θ_base, applies θ₀ + λτ for a few λ (negation included)
and prints accuracy. The full offline-zoo demo builds on this.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def _train(model, x, y, steps: int, lr: float = 0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def _accuracy(state_dict, x, y) -> float:
    model = _mlp()
    model.load_state_dict(state_dict)
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def run_minimal(workdir: Path) -> list[tuple[float, float]]:
    from taskvec import TaskVector
    from taskvec.io import save_safetensors

    torch.manual_seed(0)
    x, y = _digits()
    xtr, ytr, xte, yte = x[:1200], y[:1200], x[1200:], y[1200:]
    model = _train(_mlp(), xtr, ytr, steps=15)  # "pre-trained": barely
    save_safetensors(model.state_dict(), workdir / "base.safetensors")
    _train(model, xtr, ytr, steps=300)  # "fine-tuned"
    save_safetensors(model.state_dict(), workdir / "finetuned.safetensors")

    tau = TaskVector.from_models(workdir / "base.safetensors", workdir / "finetuned.safetensors")
    print(tau, end="\n\n")
    rows = []
    for lam in (-1.0, -0.5, 0.0, 0.5, 1.0):
        acc = _accuracy(tau.apply_to(scaling=lam, show_progress=False), xte, yte)
        rows.append((lam, acc))
    print("θ = θ₀ + λ·τ on held-out digits (real data: sklearn load_digits)")
    print("   λ   accuracy")
    for lam, acc in rows:
        note = {0.0: "  (base)", 1.0: "  (fine-tuned)"}.get(lam, "  (negation)" if lam < 0 else "")
        print(f"{lam:+5.1f}   {acc:7.1%}{note}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="taskvec demo", description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None, help="where to keep the demo checkpoints (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        run_minimal(args.workdir)
    else:
        with tempfile.TemporaryDirectory() as d:
            run_minimal(Path(d))
    return 0
