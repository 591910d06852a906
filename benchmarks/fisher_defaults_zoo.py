"""Fisher merging on the fast zoo: taskvec's former defaults vs Matena & Raffel's reference defaults.

    python benchmarks/fisher_defaults_zoo.py [zoo folder] [--fisher-examples 64] [--test-examples 200]
                                             [--fisher-cache FILE]

Merges the zoo's eight fine-tuned encoders with `fisher_merge`, four ways (floor on every model or on
the target only; whole-model Fisher normalisation off or on), and prints each task's test accuracy
normalised by its fine-tuned model's (with a paired-bootstrap 95 % interval of each variant's mean minus
the former default's), plus how unequal the per-model Fisher norms are. The target
model (the one whose Fisher is floored) is the first task. Cheap: Fisher on a few dozen training
examples per task, evaluation on a seeded subset of each test split.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from taskvec.eval.intervals import mean_accuracy_interval, paired_bootstrap
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
    ap.add_argument("--fisher-cache", help="torch file to keep the Fishers in (reused when it exists)")
    args = ap.parse_args()
    root = Path(args.zoo)
    manifest = json.loads((root / "manifest.json").read_text())
    zoo = Zoo(manifest["zoo"], manifest["mode"], root, manifest)
    lab = ZooLab(zoo, limit=args.test_examples)
    cache = Path(args.fisher_cache) if args.fisher_cache else None
    if cache is not None and cache.is_file():
        fishers = torch.load(cache, weights_only=True)
    else:
        started = time.perf_counter()
        fishers = {t: task_fisher(zoo, t, n_samples=args.fisher_examples, weights=lab.finetuned(t)) for t in lab.tasks}
        print(f"Fisher on {args.fisher_examples} examples x {len(lab.tasks)} tasks: {time.perf_counter() - started:.0f} s")
        if cache is not None:
            torch.save(fishers, cache)
    norms = {t: fisher_norm(f) for t, f in fishers.items()}
    print("per-model Fisher norms:", ", ".join(f"{t} {n:.3g}" for t, n in norms.items()),
          f"(max/min {max(norms.values()) / min(norms.values()):.1f})")
    # each model's average share of an entry's Fisher mass (its weight in the merge), raw vs normalised, over
    # the entries some model has Fisher mass for (unseen token rows, unused positions: none, and the floor decides)
    for normalise in (False, True):
        share_sum = {t: 0.0 for t in lab.tasks}
        with_mass = total = 0
        for k in fishers[lab.tasks[0]]:
            stack = torch.stack([fishers[t][k] / (norms[t] if normalise else 1.0) for t in lab.tasks])
            mass = stack.sum(0)
            share = stack[:, mass > 0] / mass[mass > 0]
            for t, s in zip(lab.tasks, share):
                share_sum[t] += float(s.sum())
            with_mass += share.shape[1]
            total += mass.numel()
        print(f"mean share of the Fisher mass per entry ({'normalised' if normalise else 'raw'}; the {with_mass / total:.1%} "
              "of entries with any): " + ", ".join(f"{t} {v / with_mass:.3f}" for t, v in share_sum.items()))
    ft = lab.finetuned_accuracy()
    correct = {label: lab.correct(merged_weights(lab, fishers, floor, normalise), tasks=lab.tasks)
               for label, (floor, normalise) in VARIANTS.items()}
    before = next(iter(VARIANTS))
    print(f"\nnormalised test accuracy ({args.test_examples} examples per task; target model = {lab.tasks[0]}); "
          f"mean with its 95 % interval; difference to '{before}', paired bootstrap")
    print(f"{'variant':<40}" + "".join(f"{t[:9]:>10}" for t in lab.tasks) + f"{'mean':>24}{'difference':>28}")
    for label, c in correct.items():
        r = {t: float(c[t].float().mean()) / ft[t] for t in lab.tasks}
        mean = mean_accuracy_interval(c, normalizer=ft)
        diff = paired_bootstrap(c, correct[before], normalizer=ft)
        print(f"{label:<40}" + "".join(f"{r[t]:>10.3f}" for t in lab.tasks) + f"{str(mean):>24}{str(diff):>28}")


if __name__ == "__main__":
    main()
