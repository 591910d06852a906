"""`taskvec demo`: the papers' headline experiments on the offline zoo, as figures and a report.

Builds (or reuses) the MiniLM task zoo -- MiniLM-L6 fine-tuned here on text data
that pip packages ship -- then runs, on those real task vectors:

1. negation (EMTA Table 1): θ₀ − λτ forgets the task and keeps the control task;
2. addition (EMTA Fig. 3): θ₀ + λΣτᵢ over 1..n tasks, normalised accuracy;
3. TIES vs task arithmetic vs averaging vs the multi-task model (TIES Table 1), (k, λ) chosen on
   validation, with paired-bootstrap intervals of the differences, and out-of-distribution accuracy;
4. the DARE drop-rate sweep with and without rescale (DARE Fig. 1);
5. cosine similarity between the task vectors (EMTA Fig. 5);

and writes PNG+SVG figures, CSVs and a report (report.md, report.html) to --out: by default
figures/demo in full mode (the published results) and figures/fast/demo in fast mode (not tracked), so
the README's command leaves `git status` clean. The report holds results only, no wall time, so the same
inputs give the same bytes.
``--minimal`` runs the 10-second version without the zoo (a digits MLP).
"""
from __future__ import annotations

import argparse
import html
import shutil
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_OUT = Path("figures") / "demo"            # full mode: the published results
DEFAULT_FAST_OUT = Path("figures") / "fast" / "demo"   # fast mode: not tracked


# ------------------------------------------------------------------ minimal demo (no zoo)

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
    """Two real checkpoints of a digits MLP: extract τ, apply θ₀ + λτ for a few λ (negation included)."""
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


# ------------------------------------------------------------------ zoo demo

#: Grids per mode: λ grids (negation, addition, TIES), TIES densities, addition sizes, DARE drop rates, and
#: examples per task (limit: test, val_limit: validation; None = the whole split).
GRIDS = {
    "fast": dict(negation=(0.5, 1.0, 1.5, 2.0), addition=(0.2, 0.3, 0.4, 0.5, 0.7), sizes=(1, 2, 4, 8),
                 ties_lambdas=(0.8, 1.0, 1.3, 1.6, 2.0, 2.5), densities=(0.1, 0.2, 0.3),
                 drop=(0.0, 0.5, 0.9, 0.99), limit=200, val_limit=100),
    # full: whole test splits; λ chosen on 200 validation examples per task, on the papers' grids at half
    # their resolution (TIES' 0.8–2.5 in steps of 0.2 rather than 0.1; task arithmetic's 0.05–1.0 in 0.1)
    "full": dict(negation=tuple(round(0.25 * i, 2) for i in range(1, 13)),
                 addition=tuple(round(0.1 * i, 1) for i in range(1, 11)), sizes=(1, 2, 3, 4, 6, 8),
                 ties_lambdas=tuple(round(0.8 + 0.2 * i, 1) for i in range(9)), densities=(0.1, 0.2, 0.3),
                 drop=(0.0, 0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99), limit=None, val_limit=200),
}


def _md_table(df, floatfmt: str = ".3f") -> str:
    """A GitHub markdown table (no tabulate dependency)."""
    def cell(v):
        if isinstance(v, float):
            return "" if v != v else format(v, floatfmt)
        return str(v)

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


class _Report:
    """Sections of text, tables and figures; written as report.md and report.html."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[tuple[str, object]] = []

    def text(self, s: str):
        self.parts.append(("text", s))

    def table(self, df, floatfmt=".3f"):
        self.parts.append(("table", (df, floatfmt)))

    def figure(self, stem: str, caption: str):
        self.parts.append(("figure", (stem, caption)))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, p in self.parts:
            if kind == "text":
                out += [p, ""]
            elif kind == "table":
                out += [_md_table(*p), ""]
            else:
                out += [f"![{p[1]}]({p[0]}.png)", "", f"*{p[1]}*", ""]
        return "\n".join(out)

    def html(self) -> str:
        import re

        out = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(self.title)}</title>",
               "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
               "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}</style>",
               f"<h1>{html.escape(self.title)}</h1>"]
        for kind, p in self.parts:
            if kind == "text":
                s = html.escape(p)
                s = re.sub(r"^## (.*)$", r"<h2>\1</h2>", s, flags=re.M)
                s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
                out.append(s if s.startswith("<h2>") else f"<p>{s}</p>")
            elif kind == "table":
                df, fmt = p
                out.append(df.to_html(index=False, float_format=lambda v: format(v, fmt), na_rep=""))
            else:
                out.append(f"<figure><img src='{p[0]}.png' alt='{html.escape(p[1])}'>"
                           f"<figcaption>{html.escape(p[1])}</figcaption></figure>")
        return "\n".join(out) + "\n"


def run_zoo_demo(out: Path, *, fast: bool = True, cache=None, grid: dict | None = None) -> dict:
    """Build/reuse the zoo, run the five headline experiments, write everything into `out` (atomically).

    `grid` overrides the mode's λ / drop-rate grids and evaluation size (keys of `GRIDS`)."""
    import pandas as pd

    import taskvec.zoo
    from taskvec.analysis import cosine_matrix, dare_sweep
    from taskvec.io.writer import check_output_path, replace_dir, staging_dir
    from taskvec.viz import save_figure, set_style
    from taskvec.widgets import ZooLab, sweeps, views

    out = check_output_path(out, overwrite=True)
    grid = {**GRIDS["fast" if fast else "full"], **(grid or {})}
    set_style()
    started = time.perf_counter()
    last = [started]

    def step(msg: str):
        now = time.perf_counter()
        print(f"{msg}  (+{now - last[0]:.0f} s)", flush=True)
        last[0] = now

    print(f"[1/6] zoo: building or reusing minilm-tasks ({'fast' if fast else 'full'} mode) ...", flush=True)
    zoo = taskvec.zoo.build("minilm-tasks", fast=fast, cache=cache)
    lab = ZooLab(zoo, limit=grid["limit"], val_limit=grid.get("val_limit"))
    tasks, control = lab.tasks, lab.control
    report = _Report(f"taskvec demo: task vectors of MiniLM-L6 fine-tuned on {len(tasks)} text tasks")
    report.text(
        f"Zoo `{zoo.name}` ({zoo.mode} mode): base `{zoo.manifest['base']['source']}`, tasks {', '.join(tasks)}; "
        f"control task {', '.join(control)} and held-out tasks {', '.join(lab.heldout) or '(none)'} (never "
        f"fine-tuned). Each task keeps its own frozen zero-shot head (the normalised embeddings of one prompt per "
        f"label, EMTA's CLIP head transposed to text), so the task vectors act on the encoder only. λ (and TIES' "
        f"k) are chosen on the validation split, numbers are on the test split"
        + (f" ({grid['limit']} examples per task)" if grid["limit"] else "")
        + ". Brackets are 95 % intervals: Wilson for one accuracy, a stratified bootstrap for a mean over tasks, "
          "a paired bootstrap for a difference between two models on the same examples."
    )
    # Written beside `out` and renamed into place at the end: an interrupted demo leaves the old report intact.
    tmp = staging_dir(out)
    results: dict = {}

    def iv(i) -> str:
        return f"{i.estimate:.3f} [{i.low:.3f}, {i.high:.3f}]"

    try:
        fin = views.zoo_table(lab)
        headroom = views.base_headroom(lab)
        results["zoo"] = {"base_normalized": headroom["base"].estimate, "finetuned_gain": headroom["gain"].estimate}
        report.text("## The zoo\n\nTest accuracy of the zero-shot base encoder, of each task's fine-tune and of the "
                    "multi-task model (trained jointly on all tasks), with Wilson 95 % intervals. Base normalised "
                    f"accuracy: **{iv(headroom['base'])}** (fine-tuned = 1).")
        report.table(fin)
        fin.to_csv(tmp / "zoo_accuracy.csv", index=False)

        step("[2/6] negation: θ₀ − λτ per task, λ on validation ...")
        neg = views.negation_table(lab, grid["negation"])
        neg.to_csv(tmp / "negation.csv", index=False)
        summary = views.negation_summary(neg)
        lam0 = float(neg["lambda"].iloc[1]) or 1.0
        save_figure(views.negation_view(lab, tasks[1], lam0), "demo-negation", tmp)
        drop, ctrl = summary["target_drop"], summary["control_drop"]
        results["negation"] = {"target_drop_points": 100 * drop.estimate, "control_drop_points": 100 * ctrl.estimate,
                               "target_drop_interval": [100 * drop.low, 100 * drop.high],
                               "control_drop_interval": [100 * ctrl.low, 100 * ctrl.high]}
        report.text("## 1. Negation (EMTA Table 1)\n\n"
                    "λ: the largest on the grid whose control accuracy on validation stays ≥ 95 % of the base's. "
                    f"θ₀ − λτ lowers target accuracy by **{100 * drop.estimate:.1f} points** "
                    f"[{100 * drop.low:.1f}, {100 * drop.high:.1f}] on average while the control task moves by "
                    f"{100 * ctrl.estimate:.1f} points [{100 * ctrl.low:.1f}, {100 * ctrl.high:.1f}] "
                    "(EMTA, CLIP ViT-L/14: −45.8 points on the targets, control 75.5 → 72.9, −2.6).")
        report.table(neg[["task", "lambda", "target_base", "target_negated", "target_drop", "target_drop_low",
                          "target_drop_high", "control_base", "control_negated", "control_drop"]])
        report.figure("demo-negation", f"Accuracy on every task after negating τ_{tasks[1]}")

        step("[3/6] addition: θ₀ + λΣτᵢ over 1..n tasks ...")
        add = views.addition_curve(lab, grid["addition"], sizes=grid.get("sizes"))
        add.to_csv(tmp / "addition.csv", index=False)
        save_figure(views.plot_addition_curve(add), "demo-addition", tmp)
        last_row = add.iloc[-1]
        results["addition"] = {"normalized_all_tasks": float(last_row["normalized_accuracy"]),
                               "base_normalized": float(last_row["base_normalized"])}
        report.text("## 2. Addition (EMTA Fig. 3)\n\n"
                    f"Adding all {len(tasks)} task vectors gives one model at **{last_row['normalized_accuracy']:.1%}** "
                    f"[{last_row['low']:.1%}, {last_row['high']:.1%}] normalised accuracy (zero-shot base: "
                    f"{last_row['base_normalized']:.1%}; EMTA: 91.2 % for 8 tasks, ViT-L/14).")
        report.table(add)
        report.figure("demo-addition", "Normalised accuracy vs number of task vectors added")

        step("[4/6] merging: averaging vs task arithmetic vs TIES vs multi-task ...")
        cmp = sweeps.ties_vs_baselines(lab, 0.2, grid["ties_lambdas"], grid["addition"], densities=grid["densities"])
        shown = sweeps.with_references(lab, cmp)
        diffs = sweeps.method_differences(lab, shown, [("TIES", "task arithmetic"), ("task arithmetic", "averaging"),
                                                       ("TIES", "averaging")]
                                          + ([("multi-task (trained jointly)", "TIES")] if lab.has_multitask else []))
        shown.to_csv(tmp / "merging_methods.csv", index=False)
        diffs.to_csv(tmp / "merging_differences.csv", index=False)
        save_figure(views.plot_method_comparison(shown.iloc[:-1], "Merging methods vs the multi-task model"),
                    "demo-merging", tmp)
        results["merging"] = dict(zip(cmp["method"], map(float, cmp["normalized_accuracy"])))
        results["merging_differences"] = {f"{a} − {b}": [float(d), float(lo), float(hi)]
                                          for a, b, d, lo, hi in diffs[["a", "b", "diff", "low", "high"]].itertuples(index=False)}
        report.text("## 3. TIES vs task arithmetic vs averaging (TIES Table 1)\n\n"
                    "Mean normalised test accuracy over the tasks; TIES' (k, λ) and task arithmetic's λ are chosen "
                    "on validation. The TIES paper finds TIES > task arithmetic > averaging on T5 and ViT models; "
                    "the second table gives paired-bootstrap intervals of the differences (\"within noise\" only "
                    "when the interval contains 0).")
        report.table(shown[["method", "lambda", "density", "normalized_accuracy", "low", "high", "absolute_accuracy"]])
        report.table(diffs)
        report.figure("demo-merging", "Merging methods: mean normalised accuracy with 95 % intervals")

        best = cmp.set_index("method")
        models = {"averaging": lab.merge("linear"),
                  "task arithmetic": lab.apply({t: float(best.loc["task arithmetic", "lambda"]) for t in tasks}),
                  "TIES": lab.merge("ties", density=float(best.loc["TIES", "density"]),
                                    lam=float(best.loc["TIES", "lambda"]))}
        if lab.has_multitask:
            models["multi-task (trained jointly)"] = lab.multitask()
        ood = views.generalization_table(lab, models)
        ood.to_csv(tmp / "out_of_distribution.csv", index=False)
        report.text("### Out of distribution\n\nMean accuracy on the tasks that were never fine-tuned nor merged "
                    "(held-out, zero-shot heads) and on the shifted test set of a merged task (language ID "
                    "fine-tuned on words, tested on emoji names: phrases), each against the base.")
        report.table(ood[[c for c in ("model", "kind", "tasks", "mean", "low", "high", "diff_vs_base", "diff_low",
                                      "diff_high", "verdict") if c in ood]])

        step("[5/6] DARE: drop rate sweep with and without rescale ...")
        task = tasks[0]
        sweep = dare_sweep(lab.task_vector(task), grid["drop"], eval_fn=views.accuracy_fn(lab, [task]), base=lab.base,
                           name=task)
        sweep.data.to_csv(tmp / "dare_sweep.csv", index=False)
        fig = sweep.plot()
        save_figure(fig, "demo-dare-sweep", tmp)
        d = sweep.data
        at = {(float(p), bool(r)): float(a) for p, r, a in zip(d["drop_rate"], d["rescale"], d[f"acc_{task}"])}
        pmax = max(grid["drop"])
        pmid = 0.9 if 0.9 in grid["drop"] else sorted(grid["drop"])[-2]
        results["dare"] = {"task": task, "acc_p0": at[(0.0, True)], f"acc_p{pmid}_rescale": at[(pmid, True)],
                           f"acc_p{pmid}_no_rescale": at[(pmid, False)], f"acc_p{pmax}_rescale": at[(pmax, True)]}
        report.text("## 4. DARE drop-rate sweep (DARE Fig. 1)\n\n"
                    f"Task {task}: accuracy {at[(0.0, True)]:.3f} with the whole τ; dropping p = {pmid:g} of the deltas "
                    f"gives {at[(pmid, True)]:.3f} with rescale 1/(1−p) and {at[(pmid, False)]:.3f} without; "
                    f"p = {pmax:g} with rescale: {at[(pmax, True)]:.3f}.")
        report.table(d)
        report.figure("demo-dare-sweep", f"DARE: accuracy and weight-space statistics vs drop rate ({task})")

        step("[6/6] cosine similarity between task vectors ...")
        cos = cosine_matrix(lab.task_vectors())
        m = cos.matrix()
        m.to_csv(tmp / "cosine.csv")
        save_figure(cos.plot(), "demo-cosine", tmp)
        off = [abs(float(m.iloc[i, j])) for i in range(len(m)) for j in range(len(m)) if i != j]
        results["cosine_mean_abs_offdiag"] = sum(off) / len(off)
        report.text("## 5. Task vectors are nearly orthogonal (EMTA Fig. 5)\n\n"
                    f"Mean |cos| between different task vectors: **{results['cosine_mean_abs_offdiag']:.3f}**.")
        report.figure("demo-cosine", "Cosine similarity between the task vectors")

        step("done")
        elapsed = time.perf_counter() - started
        # no wall time in the report: the same inputs give the same report (a rerun leaves git status clean)
        report.text("Made by `taskvec demo`. The notebooks in `notebooks/` go further (ablations, sliders, the "
                    "toxicity language model, every merging method).")
        (tmp / "report.md").write_text(report.markdown(), encoding="utf-8")
        (tmp / "report.html").write_text(report.html(), encoding="utf-8")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    results["seconds"] = elapsed
    return results


def _pts(interval) -> str:
    return f"[{interval[0]:.1f}, {interval[1]:.1f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="taskvec demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None,
                    help=f"folder for figures and report, replaced (default: {DEFAULT_FAST_OUT} in fast mode, "
                         f"{DEFAULT_OUT} with --full)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--fast", dest="fast", action="store_true", default=None, help="fast zoo and small grids (default)")
    mode.add_argument("--full", dest="fast", action="store_false", help="the full zoo and grids (longer)")
    ap.add_argument("--cache", type=Path, default=None, help="zoo cache folder (default: $TASKVEC_CACHE or ~/.cache/taskvec)")
    ap.add_argument("--minimal", action="store_true", help="10-second version without the zoo (digits MLP)")
    ap.add_argument("--workdir", type=Path, default=None, help="--minimal: where to keep its checkpoints (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.minimal:
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
            run_minimal(args.workdir)
        else:
            with tempfile.TemporaryDirectory() as d:
                run_minimal(Path(d))
        return 0
    fast = True if args.fast is None else args.fast
    if args.out is None:
        args.out = DEFAULT_FAST_OUT if fast else DEFAULT_OUT
    results = run_zoo_demo(args.out, fast=fast, cache=args.cache)
    neg, add, cmp = results["negation"], results["addition"], results["merging"]
    print()
    print("headline numbers (test split):")
    print(f"  negation: target −{neg['target_drop_points']:.1f} points {_pts(neg['target_drop_interval'])}, "
          f"control −{neg['control_drop_points']:.1f} points {_pts(neg['control_drop_interval'])}")
    print(f"  addition of all tasks: {add['normalized_all_tasks']:.1%} normalised accuracy (base {add['base_normalized']:.1%})")
    print("  merging (normalised accuracy): " + ", ".join(f"{k} {v:.3f}" for k, v in cmp.items()))
    for k, (d, lo, hi) in results["merging_differences"].items():
        print(f"    {k}: {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    print("  DARE: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in results["dare"].items()))
    print(f"  mean |cos| between task vectors: {results['cosine_mean_abs_offdiag']:.3f}")
    print(f"\nfigures and report: {args.out.resolve()}/report.md (and report.html), in {results['seconds']:.0f} s")
    return 0
