"""Fisher merging on the fast zoo: taskvec's former defaults vs Matena & Raffel's reference defaults.

    python benchmarks/fisher_defaults_zoo.py [zoo folder] [--fisher-examples 64] [--test-examples 200]

Merges the zoo's eight fine-tuned encoders with `fisher_merge`, four ways (floor on every model or on
the target only; whole-model Fisher normalisation off or on), and prints each task's test accuracy
normalised by its fine-tuned model's, plus how unequal the per-model Fisher norms are. The target
model (the one whose Fisher is floored) is the first task. Cheap: Fisher on a few dozen training
examples per task, evaluation on a seeded subset of each test split.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from taskvec.eval.zoo_eval import task_fisher
from taskvec.methods.statistics import fisher_merge, fisher_norm
from taskvec.widgets.lab import ZooLab
from taskvec.zoo.core import Zoo

DEFAULT_ZOO = Path.home() / ".cache/taskvec/zoo/minilm-tasks-fast-seed0"
VARIANTS = {  # label: (floor, normalise)
    "floor all, raw F (taskvec before)": ("all", False),
    "floor target, raw F": ("target", False),
    "floor all, normalised F": ("all", True),
    "floor target, normalised F (reference)": ("target", True),
}


def merged_weights(lab: ZooLab, fishers: dict, floor: str, normalise: bool) -> dict[str, torch.Tensor]:
    tasks = lab.tasks
    norms = [fisher_norm(fishers[t]) for t in tasks] if normalise else None
    out = {}
    for k, base in lab.base.items():
        if not base.is_floating_point():
            out[k] = base
            continue
        thetas = [lab.finetuned(t)[k] for t in tasks]
        if k not in fishers[tasks[0]]:  # no statistics (frozen word embeddings): plain average
            out[k] = (sum(x.float() for x in thetas) / len(thetas)).to(base.dtype)
            continue
        out[k] = fisher_merge(thetas, [fishers[t][k] for t in tasks], floor=floor, norms=norms).to(base.dtype)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("zoo", nargs="?", default=str(DEFAULT_ZOO))
    ap.add_argument("--fisher-examples", type=int, default=64)
    ap.add_argument("--test-examples", type=int, default=200)
    args = ap.parse_args()
    root = Path(args.zoo)
    manifest = json.loads((root / "manifest.json").read_text())
    zoo = Zoo(manifest["zoo"], manifest["mode"], root, manifest)
    lab = ZooLab(zoo, limit=args.test_examples)
    started = time.perf_counter()
    fishers = {t: task_fisher(zoo, t, n_samples=args.fisher_examples, weights=lab.finetuned(t)) for t in lab.tasks}
    print(f"Fisher on {args.fisher_examples} examples x {len(lab.tasks)} tasks: {time.perf_counter() - started:.0f} s")
    norms = {t: fisher_norm(f) for t, f in fishers.items()}
    print("per-model Fisher norms:", ", ".join(f"{t} {n:.3g}" for t, n in norms.items()),
          f"(max/min {max(norms.values()) / min(norms.values()):.1f})")
    # how often one model holds most of the Fisher mass of an entry, raw vs normalised
    for normalise in (False, True):
        dominated, total = 0, 0
        for k in fishers[lab.tasks[0]]:
            stack = torch.stack([fishers[t][k] / (norms[t] if normalise else 1.0) for t in lab.tasks])
            share = stack.max(0).values / stack.sum(0).clamp(min=1e-30)
            dominated += int((share > 0.9).sum())
            total += share.numel()
        print(f"entries where one model holds > 90 % of the Fisher mass ({'normalised' if normalise else 'raw'}): "
              f"{dominated / total:.3f}")
    ft = lab.finetuned_accuracy()
    rows = {}
    for label, (floor, normalise) in VARIANTS.items():
        acc = lab.accuracy(merged_weights(lab, fishers, floor, normalise), tasks=lab.tasks)
        rows[label] = {t: acc[t] / ft[t] for t in lab.tasks}
    print(f"\nnormalised test accuracy ({args.test_examples} examples per task; target model = {lab.tasks[0]})")
    print(f"{'variant':<42}" + "".join(f"{t[:9]:>10}" for t in lab.tasks) + f"{'mean':>8}")
    for label, r in rows.items():
        print(f"{label:<42}" + "".join(f"{r[t]:>10.3f}" for t in lab.tasks) + f"{sum(r.values()) / len(r):>8.3f}")


if __name__ == "__main__":
    main()
