"""LoRA extraction on the offline MiniLM zoo: reconstruction error and accuracy vs LoRA rank.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/lora_rank_zoo.py [--full-zoo] [--test-examples 200]
                                                                   [--out figures/lora]

For every fine-tuned task of the zoo, τ = θ_task − θ₀ is exported with `TaskVector.to_lora` at ranks
1, 2, 4, 8, 16, 32 and full (and at energy 0.9), read back with `TaskVector.from_lora` (the adapter
folder as written, not the in-memory SVD), applied to θ₀ and scored on the task's own test split
(a seeded subset, `ZooLab`). Biases and LayerNorms go to `modules_to_save` (exact), except the biases
of the LoRA'd Linear layers, which PEFT cannot carry beside a LoRA and are dropped (their share of ‖τ‖²
is in the table). Writes NAME.csv (one row per task and rank), NAME.md (means over tasks) and the
figure NAME.png/.svg into --out.
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import pandas as pd

RANKS = [1, 2, 4, 8, 16, 32, None]  # None: full rank
NAME = "lora-rank-zoo"


def _label(rank, energy=None) -> str:
    return f"energy {energy:g}" if energy is not None else ("full" if rank is None else str(rank))


def measure(zoo, lab, tasks, settings, workdir: Path) -> pd.DataFrame:
    from taskvec.vector import TaskVector

    records = []
    for task in tasks:
        tv = TaskVector.from_models(str(zoo.base), str(zoo.models[task]))
        for rank, energy in settings:
            started = time.perf_counter()
            out = workdir / f"{task}-{_label(rank, energy).replace(' ', '')}"
            export = tv.to_lora(out, rank, energy=energy)
            seconds = time.perf_counter() - started
            rep = export.report
            lora = rep[rep.kind.isin(["lora", "lora_embedding"])]
            # the whole vector: sqrt(Σ_i err_i² ‖τ_i‖²) / ‖τ‖ over every float tensor (dropped ones count as 1)
            whole = math.sqrt(float((rep.rel_error.fillna(0.0) ** 2 * rep.norm_share).sum()))
            back = TaskVector.from_lora(out, str(zoo.base))
            acc = lab.accuracy(back.apply_to(lab.base, show_progress=False), tasks=[task])[task]
            records.append({
                "task": task, "rank": _label(rank, energy),
                "rel_error": float(lora.rel_error.mean()), "energy_kept": float(lora.energy_kept.mean()),
                "whole_rel_error": whole, "mean_lora_rank": float(lora["rank"].mean()),
                "dropped_norm_share": float(rep.norm_share[rep.kind == "dropped"].sum()),
                "adapter_mb": (out / "adapter_model.safetensors").stat().st_size / 1e6,
                "accuracy": acc, "export_s": seconds,
            })
            print(f"{task:>12} rank {_label(rank, energy):>10}: error {records[-1]['rel_error']:.3f} "
                  f"(whole τ {whole:.3f}), accuracy {acc:.3f}, export {seconds:.1f} s", flush=True)
    return pd.DataFrame(records)


def plot(df: pd.DataFrame, base: dict, ft: dict, out: Path):
    from taskvec.viz.style import new_figure, save_figure, style

    ranks = [_label(r) for r in RANKS]
    x = list(range(len(ranks)))
    d = df[df["rank"].isin(ranks)].copy()
    d["x"] = d["rank"].map({r: i for i, r in enumerate(ranks)})
    d["normalised"] = d.accuracy / d.task.map(ft)
    with style():
        fig, (ax_e, ax_a) = new_figure(1, 2, figsize=(11.5, 4.2))
        for task, g in d.groupby("task", sort=False):
            g = g.sort_values("x")
            ax_e.plot(g.x, g.rel_error, color="0.75", lw=0.9, marker="o", ms=2.5)
            ax_a.plot(g.x, g.normalised, color="0.75", lw=0.9, marker="o", ms=2.5)
        mean = d.groupby("x")[["rel_error", "whole_rel_error", "normalised"]].mean()
        ax_e.plot(mean.index, mean.rel_error, lw=2.4, marker="o", label="matrices (LoRA'd), mean")
        ax_e.plot(mean.index, mean.whole_rel_error, lw=2.0, ls="--", marker="s",
                  label="whole τ (incl. dropped Linear biases)")
        ax_e.plot([], [], color="0.75", lw=0.9, label="one task")
        ax_e.set(xticks=x, xticklabels=ranks, xlabel="LoRA rank (full: min(m, n), ≤ 384)", ylabel="‖τ − τ_r‖_F / ‖τ‖_F",
                 title="Reconstruction error", ylim=(0, 1.02))
        ax_e.legend(loc="upper right")
        ax_a.plot(mean.index, mean.normalised, lw=2.4, marker="o", label="θ₀ + τ_r, mean over tasks")
        base_norm = sum(base[t] / ft[t] for t in ft) / len(ft)
        ax_a.axhline(base_norm, color="0.35", ls=":", lw=1.6, label=f"base θ₀ ({base_norm:.3f})")
        ax_a.axhline(1.0, color="0.35", ls="--", lw=1.0, label="fine-tuned θ₀ + τ (1)")
        ax_a.plot([], [], color="0.75", lw=0.9, label="one task")
        ax_a.set(xticks=x, xticklabels=ranks, xlabel="LoRA rank", ylabel="accuracy / fine-tuned accuracy",
                 title="Task accuracy of θ₀ + τ_r")
        ax_a.legend(loc="best")
        fig.suptitle(f"LoRA extraction of the MiniLM zoo's task vectors ({d.task.nunique()} tasks, test split)")
        return save_figure(fig, NAME, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full-zoo", action="store_true", help="the full zoo instead of the fast one")
    ap.add_argument("--test-examples", type=int, default=200, help="test examples per task (seeded subset)")
    ap.add_argument("--tasks", nargs="+", help="tasks to run (default: all fine-tuned tasks)")
    ap.add_argument("--out", default="figures/lora")
    args = ap.parse_args()

    import taskvec.zoo
    from taskvec.widgets.lab import ZooLab

    started = time.perf_counter()
    zoo = taskvec.zoo.build("minilm-tasks", fast=not args.full_zoo)
    lab = ZooLab(zoo, limit=args.test_examples)
    tasks = args.tasks or lab.tasks
    base, ft = lab.base_accuracy(), lab.finetuned_accuracy()
    base, ft = {t: base[t] for t in tasks}, {t: ft[t] for t in tasks}
    with tempfile.TemporaryDirectory(prefix="lora-rank-zoo-") as tmp:
        df = measure(zoo, lab, tasks, [(r, None) for r in RANKS] + [(None, 0.9)], Path(tmp))
    df["normalised_accuracy"] = df.accuracy / df.task.map(ft)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / f"{NAME}.csv", index=False, float_format="%.5g")
    order = {r: i for i, r in enumerate(df["rank"].unique())}
    table = (df.groupby("rank")[["mean_lora_rank", "rel_error", "whole_rel_error", "energy_kept",
                                 "dropped_norm_share", "adapter_mb", "accuracy", "normalised_accuracy"]]
             .mean().sort_index(key=lambda s: s.map(order)))
    refs = pd.DataFrame([{"accuracy": sum(base.values()) / len(base), "normalised_accuracy":
                          sum(base[t] / ft[t] for t in ft) / len(ft)},
                         {"accuracy": sum(ft.values()) / len(ft), "normalised_accuracy": 1.0}],
                        index=["base θ₀", "fine-tuned θ₀ + τ"])
    table = pd.concat([table, refs])
    table.index.name = "rank"
    header = (f"# LoRA rank vs error and accuracy: minilm-tasks ({zoo.mode}), {len(tasks)} tasks, "
              f"{args.test_examples} test examples per task\n\nMeans over tasks; rel_error: mean over LoRA'd "
              f"matrices of ‖τ − τ_r‖_F/‖τ‖_F; whole_rel_error: over all of τ, dropped Linear biases counted "
              f"in full; accuracy on each task's own test subset.\n\n")
    from taskvec.demo import _md_table

    (out / f"{NAME}.md").write_text(header + _md_table(table.reset_index(), ".4f") + "\n")
    plot(df, base, ft, out)
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
