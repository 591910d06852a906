"""Learned merging coefficients on the zoo: AdaMerging vs the hand-tuned merges, with intervals.

    lab = ZooLab(taskvec.zoo.build("minilm-tasks", fast=True), limit=200, val_limit=64)
    table = adamerging_table(lab, fast=True)          # TA, TIES, task-/layer-wise AdaMerging, AdaMerging++
    table.attrs["results"]["layer-wise AdaMerging"].plot()   # λ heatmap, tasks x parameter tensors

The entropy is minimised on the **validation** inputs (labels dropped) by default, so the test accuracy in
the table is held out, like λ chosen on validation for task arithmetic; ``inputs="test"`` is the paper's
transductive setting (unlabeled test inputs). Every row says which one it used.

Measured on the fast zoo (200 test examples per task, validation inputs, 40 Adam steps, lr 1e-2, batches
of 16), mean normalised test accuracy and the paired difference to task arithmetic (λ = 0.5 from
validation), 95 % intervals: task arithmetic 0.927 [0.901, 0.950]; TIES 0.943, +0.016 [+0.005, +0.027];
task-wise AdaMerging 0.940, +0.013 [+0.003, +0.024]; layer-wise 0.934, +0.007 [-0.002, +0.016] (within
noise); layer-wise AdaMerging++ 0.953, +0.027 [+0.013, +0.040]. Cost: ~4 s per step on one free core
(8 forward/backward passes of MiniLM), several times that on a shared machine.
"""
from __future__ import annotations

import time
from typing import Sequence

import pandas as pd
import torch

from taskvec.errors import ParameterError

INPUTS = {"val": "validation inputs (test held out)", "test": "test inputs (transductive, as the paper)"}


def unlabeled_batches(lab, *, split: str = "val", batch_size: int = 16, tasks: Sequence[str] | None = None
                      ) -> dict[str, list[dict]]:
    """{task: [tokenized batches {"input_ids", "attention_mask"}]} of `split`'s inputs (the lab's subset of it,
    the same examples `lab.correct` scores), labels dropped."""
    from taskvec.eval.classification import tokenize

    if split not in INPUTS:
        raise ParameterError(f"split must be one of {list(INPUTS)}, got {split!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ParameterError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    out = {}
    for task in tasks or lab.tasks:
        texts, _ = lab._examples(task, split)
        out[task] = [dict(tokenize(lab.tokenizer, texts[s:s + batch_size], lab.max_length))
                     for s in range(0, len(texts), batch_size)]
    return out


def zoo_forward(lab):
    """forward(params, batch, task) -> logits: the lab's encoder run with `params` (torch.func.functional_call),
    mean-pooled, through the task's frozen zero-shot head. The heads get no gradient."""
    from taskvec.eval.classification import mean_pool

    heads = {t: lab._heads[t].eval().requires_grad_(False) for t in lab.tasks}
    model = lab.model.eval()

    def forward(params, batch, task):
        out = torch.func.functional_call(model, params, args=(), kwargs=dict(batch))
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return heads[task](mean_pool(hidden, batch["attention_mask"]))

    return forward


def unlabeled_entropy(lab, weights, *, split: str = "val", batch_size: int = 64) -> pd.Series:
    """Mean prediction entropy (nats) of `weights` on every unlabeled `split` input of each task, and their
    mean over tasks ("mean"): AdaMerging's objective divided by the number of tasks, on all the inputs rather
    than one batch per step (so a run's start and end compare on the same data)."""
    from taskvec.eval.statistics import prediction_entropy

    forward = zoo_forward(lab)
    out = {}
    with torch.no_grad():
        for task, batches in unlabeled_batches(lab, split=split, batch_size=batch_size).items():
            sizes = [len(b["input_ids"]) for b in batches]
            out[task] = sum(float(prediction_entropy(forward(weights, b, task))) * n for b, n in zip(batches, sizes)) \
                / sum(sizes)
    series = pd.Series(out, name="entropy")
    series["mean"] = series.mean()
    return series


def learn(lab, *, granularity: str = "layer", vectors: str = "task_arithmetic", inputs: str = "val",
          steps: int = 500, lr: float = 1e-3, batch_size: int = 16, **kw):
    """`taskvec.adamerging` on the lab's fine-tuned tasks (encoder tensors only, frozen heads)."""
    from taskvec.methods.adamerging import adamerging

    return adamerging(lab.base, {t: lab.finetuned(t) for t in lab.tasks},
                      unlabeled_batches(lab, split=inputs, batch_size=batch_size), zoo_forward(lab),
                      granularity=granularity, vectors=vectors, steps=steps, lr=lr, data=INPUTS[inputs], **kw)


def adamerging_table(lab, *, fast: bool = True, steps: int | None = None, lr: float | None = None,
                     batch_size: int | None = None, inputs: str = "val", n_boot: int = 2000,
                     seed: int = 0) -> pd.DataFrame:
    """Task arithmetic and TIES (λ, density chosen on validation as notebook 06 does), task-wise and layer-wise
    AdaMerging and layer-wise AdaMerging++ (TIES vectors): mean normalised test accuracy over the fine-tuned
    tasks with its 95 % stratified-bootstrap interval, and each method minus task arithmetic with its paired
    95 % interval (`intervals.compare_methods`, reference "task_arithmetic").

    fast: 5 steps on batches of 8 (a smoke run: the fast zoo in about 90 s on one thread; λ barely moves);
    else the paper's 500 steps on batches of 16. `lr` defaults to the paper's 1e-3, raised to 2e-2 in fast
    mode so a few steps can move λ at all (Adam moves each λ by about lr per step).
    Extra columns: params, data (which inputs the entropy saw), seconds. ``attrs["results"]``: the
    AdaMergingResult of each learned row (their `.plot()` is the λ heatmap); ``attrs["correct"]``: outcomes."""
    from taskvec.eval.intervals import compare_methods
    from taskvec.widgets.compare import default_specs, evaluate_spec

    if inputs not in INPUTS:
        raise ParameterError(f"inputs must be one of {list(INPUTS)}, got {inputs!r}")
    steps = (5 if fast else 500) if steps is None else steps
    lr = (2e-2 if fast else 1e-3) if lr is None else lr
    batch_size = (8 if fast else 16) if batch_size is None else batch_size
    rows, correct, results = {}, {}, {}
    specs = {s.label: s for s in default_specs(fast)}
    for label in ("task_arithmetic", "ties"):
        row = evaluate_spec(lab, specs[label])
        correct[label] = {t: row["correct"][t] for t in lab.tasks}
        rows[label] = {"params": row["params"], "data": "λ (and density) chosen on validation labels",
                       "seconds": row["seconds"]}
    for granularity, vectors in (("task", "task_arithmetic"), ("layer", "task_arithmetic"), ("layer", "ties")):
        started = time.perf_counter()
        res = learn(lab, granularity=granularity, vectors=vectors, inputs=inputs, steps=steps, lr=lr,
                    batch_size=batch_size, seed=seed)
        outcomes = lab.correct(res.merged, split="test", tasks=lab.tasks)
        correct[res.label], results[res.label] = outcomes, res
        lam = res.coefficients["lambda"]
        rows[res.label] = {"params": f"{steps} steps, lr={lr:g}, batch {batch_size}; λ mean {lam.mean():.3f} "
                                     f"[{lam.min():.3f}, {lam.max():.3f}]",
                           "data": res.settings["data"], "seconds": time.perf_counter() - started}
    normalizer = lab.finetuned_accuracy("test")
    table = compare_methods(correct, normalizer={t: normalizer[t] for t in lab.tasks},
                            reference="task_arithmetic", n_boot=n_boot, seed=seed)
    extra = pd.DataFrame.from_dict(rows, orient="index")
    table = table.join(extra)
    table.attrs["results"], table.attrs["correct"] = results, correct
    return table


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m taskvec.widgets.learned [--full-zoo] [--full] [--steps N] [--lr X] [--transductive]`"""
    import argparse

    import taskvec.zoo
    from taskvec.widgets import ZooLab

    p = argparse.ArgumentParser(prog="python -m taskvec.widgets.learned", description=adamerging_table.__doc__)
    p.add_argument("--full-zoo", action="store_true", help="the full zoo and whole test splits (else fast)")
    p.add_argument("--full", action="store_true", help="full mode: the paper's 500 steps, lr 1e-3")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--transductive", action="store_true", help="entropy on unlabeled test inputs (the paper)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    zoo = taskvec.zoo.build("minilm-tasks", fast=not args.full_zoo)
    lab = ZooLab(zoo) if args.full_zoo else ZooLab(zoo, limit=200, val_limit=64)
    table = adamerging_table(lab, fast=not args.full, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                             inputs="test" if args.transductive else "val")
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
        print(table.drop(columns=["diff_vs"]).round(4))
    for res in table.attrs["results"].values():
        print(res)
    print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
