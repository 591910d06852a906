"""Toy views for the merging tour (notebook 00): each method's steps on a handful of parameters.

Every number drawn here is computed by the library's own per-tensor functions
(`taskvec.methods`): the toy shows exactly what runs on a real model.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from taskvec.methods import dare_drop, disjoint_mean, elect_sign, lerp, slerp, tensor_generator, trim_topk
from taskvec.viz import DIVERGING_CMAP, new_figure, style

#: The 2-parameter toy model: a base point and two fine-tuned points (tasks A and B).
TOY_BASE = torch.tensor([0.0, 0.0])
TOY_FINETUNED = {"A": torch.tensor([1.0, 0.35]), "B": torch.tensor([0.15, 0.9])}

#: Three tasks' deltas on eight parameters, chosen so that trim, elect and disjoint mean each change something.
TOY_DELTAS = torch.tensor([
    [0.90, -0.10, 0.40, 0.05, -0.70, 0.30, -0.02, 0.60],
    [0.70, 0.08, -0.50, -0.03, -0.60, -0.35, 0.04, 0.50],
    [-0.20, 0.12, 0.45, 0.02, 0.80, 0.25, -0.06, -0.10],
])


def _arrow(ax, start, end, color, label=None, ls="-"):
    ax.annotate("", xy=end, xytext=start,
                arrowprops={"arrowstyle": "-|>", "color": color, "lw": 2.0, "ls": ls, "shrinkA": 0, "shrinkB": 0})
    if label:
        ax.text(*(np.asarray(end) + 0.04), label, color=color, fontsize=10, fontweight="bold")


def task_arithmetic_view(lam: float = 0.5, negate: str = "none"):
    """θ = θ₀ + λ(τ_A + τ_B) in a 2-parameter model; `negate` = "A" or "B" draws θ₀ − λ τ_X instead."""
    tau = {k: v - TOY_BASE for k, v in TOY_FINETUNED.items()}
    with style():
        fig, ax = new_figure(figsize=(5.6, 5.0))
        colors = {"A": "C0", "B": "C2"}
        for k, t in tau.items():
            _arrow(ax, TOY_BASE, TOY_BASE + t, colors[k], f"τ_{k}")
        if negate in tau:
            target = TOY_BASE - lam * tau[negate]
            label = f"θ₀ − {lam:.2f}·τ_{negate}"
        else:
            target = TOY_BASE + lam * (tau["A"] + tau["B"])
            label = f"θ₀ + {lam:.2f}·(τ_A + τ_B)"
        _arrow(ax, TOY_BASE, target, "C3", ls="--")
        ax.scatter(*target, s=70, color="C3", zorder=5, label=label)
        ax.scatter(*TOY_BASE, s=70, color="black", zorder=5, label="θ₀ (base)")
        for k, p in TOY_FINETUNED.items():
            ax.scatter(*p, s=50, color=colors[k], zorder=5, label=f"θ_{k} (fine-tuned on {k})")
        ax.set_xlim(-1.6, 2.0)
        ax.set_ylim(-1.6, 2.0)
        ax.set_aspect("equal")
        ax.axhline(0, color="0.6", lw=0.8)
        ax.axvline(0, color="0.6", lw=0.8)
        ax.set_xlabel("parameter 1")
        ax.set_ylabel("parameter 2")
        ax.set_title("Task vectors are arrows in weight space")
        ax.legend(loc="lower right")
    return fig


def ties_steps(density: float = 0.5, consensus: str = "mass") -> dict[str, torch.Tensor]:
    """The TIES steps on TOY_DELTAS: trimmed τ̂, elected sign γ, TIES merge, and the plain mean for contrast."""
    trimmed = torch.stack([trim_topk(d, density) for d in TOY_DELTAS])
    signs = elect_sign(trimmed, method=consensus)
    return {"tau": TOY_DELTAS, "trimmed": trimmed, "sign": signs, "ties": disjoint_mean(trimmed, signs),
            "mean": TOY_DELTAS.mean(0)}


def ties_view(density: float = 0.5, consensus: str = "mass"):
    """Four panels: τ_i, trimmed τ̂_i (top-k by |τ|), elected sign γ, and disjoint mean vs plain mean."""
    s = ties_steps(density, consensus)
    n_tasks, n_params = s["tau"].shape
    with style():
        fig, axes = new_figure(1, 3, figsize=(13.5, 3.6))
        vmax = float(s["tau"].abs().max())
        for ax, key, title in ((axes[0], "tau", "1. task vectors τ_i"),
                               (axes[1], "trimmed", f"2. trim: keep top {density:.0%} of |τ_i|")):
            m = s[key].numpy()
            ax.imshow(m, cmap=DIVERGING_CMAP, vmin=-vmax, vmax=vmax, aspect="auto")
            for i in range(n_tasks):
                for j in range(n_params):
                    ax.text(j, i, f"{m[i, j]:+.2f}" if m[i, j] else "0", ha="center", va="center", fontsize=8,
                            color="white" if abs(m[i, j]) > 0.6 * vmax else "black")
            ax.set_yticks(range(n_tasks), [f"task {i + 1}" for i in range(n_tasks)])
            ax.set_xticks(range(n_params), [f"p{j + 1}" for j in range(n_params)])
            ax.set_title(title)
            ax.grid(False)
        x = np.arange(n_params)
        ax = axes[2]
        ax.bar(x - 0.2, s["mean"].numpy(), width=0.4, color="C7", label="plain mean of τ_i")
        ax.bar(x + 0.2, s["ties"].numpy(), width=0.4, color="C0", label="TIES: disjoint mean of agreeing τ̂_i")
        for j, g in enumerate(s["sign"].tolist()):
            ax.text(j, -1.0, {1.0: "+", -1.0: "−", 0.0: "0"}[g], ha="center", va="center", fontsize=12,
                    fontweight="bold", color="C3")
        ax.text(-0.6, -0.85, f"3. elected sign γ ({consensus})", fontsize=9, color="C3", va="bottom")
        ax.set_ylim(-1.15, 1.0)
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set_xticks(x, [f"p{j + 1}" for j in x])
        ax.set_ylabel("merged delta")
        ax.set_title("4. disjoint merge")
        ax.legend(loc="upper right", fontsize=8.5)
    return fig


def dare_view(p: float = 0.7, seed: int = 0, n: int = 48):
    """DARE on one tensor of `n` parameters: drop with probability p, rescale survivors by 1/(1−p)."""
    g = torch.Generator().manual_seed(1234)
    tau = torch.randn(n, generator=g) * 0.02
    dropped = dare_drop(tau, p, rescale=False, generator=tensor_generator(seed, "toy"))
    rescaled = dare_drop(tau, p, rescale=True, generator=tensor_generator(seed, "toy"))
    x = np.arange(n)
    with style():
        fig, axes = new_figure(1, 2, figsize=(12.0, 3.6), gridspec_kw={"width_ratios": [3, 1.2]})
        ax = axes[0]
        ax.bar(x, tau.numpy(), color="0.75", width=0.9, label="τ")
        ax.bar(x, rescaled.numpy(), color="C0", width=0.45, label=f"τ̃ = (1−m)⊙τ / (1−p), p = {p:.2f}")
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set_xlabel("parameter index")
        ax.set_ylabel("delta")
        ax.set_title(f"DARE: drop {p:.0%} of τ at random, rescale the rest")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize=9)
        ax = axes[1]
        sums = [float(tau.sum()), float(dropped.sum()), float(rescaled.sum())]
        ax.bar([0, 1, 2], sums, color=["0.6", "C1", "C0"])
        ax.set_xticks([0, 1, 2], ["τ", "dropped", "dropped +\nrescaled"])
        ax.set_ylabel("Σ delta (what a neuron sums)")
        ax.set_title("Rescale keeps the sum")
        ax.axhline(0, color="0.5", lw=0.8)
    return fig


def slerp_path(n: int = 41) -> dict[str, np.ndarray]:
    """Points along linear and spherical interpolation between two unit-norm 2-D vectors 120° apart."""
    v0 = torch.tensor([1.0, 0.0])
    v1 = torch.tensor([math.cos(2 * math.pi / 3), math.sin(2 * math.pi / 3)])
    ts = np.linspace(0, 1, n)
    lin = np.stack([lerp(float(t), v0, v1).numpy() for t in ts])
    sph = np.stack([slerp(float(t), v0, v1).numpy() for t in ts])
    return {"t": ts, "linear": lin, "slerp": sph, "v0": v0.numpy(), "v1": v1.numpy()}


def slerp_view(t: float = 0.5):
    """Linear (chord) vs spherical (arc) interpolation of two weight vectors, and the norm along each path."""
    path = slerp_path()
    v0, v1 = torch.tensor(path["v0"]), torch.tensor(path["v1"])
    p_lin, p_sph = lerp(t, v0, v1).numpy(), slerp(t, v0, v1).numpy()
    with style():
        fig, axes = new_figure(1, 2, figsize=(11.0, 4.4))
        ax = axes[0]
        circle = np.linspace(0, 2 * np.pi, 200)
        ax.plot(np.cos(circle), np.sin(circle), color="0.85", lw=1)
        ax.plot(*path["linear"].T, color="C1", lw=2, label="linear: (1−t)v₀ + t v₁")
        ax.plot(*path["slerp"].T, color="C0", lw=2, label="SLERP: along the arc")
        ax.scatter(*p_lin, color="C1", s=60, zorder=5)
        ax.scatter(*p_sph, color="C0", s=60, zorder=5)
        for v, name in ((path["v0"], "v₀ (model 0)"), (path["v1"], "v₁ (model 1)")):
            ax.scatter(*v, color="black", s=40, zorder=5)
            ax.text(v[0] + 0.05, v[1] + 0.05, name)
        ax.set_aspect("equal")
        ax.set_xlim(-1.3, 1.4)
        ax.set_ylim(-0.5, 1.3)
        ax.set_xlabel("parameter 1")
        ax.set_ylabel("parameter 2")
        ax.set_title(f"Interpolating two models, t = {t:.2f}")
        ax.legend(loc="lower left", fontsize=8.5)
        ax = axes[1]
        ax.plot(path["t"], np.linalg.norm(path["linear"], axis=1), color="C1", lw=2, label="linear")
        ax.plot(path["t"], np.linalg.norm(path["slerp"], axis=1), color="C0", lw=2, label="SLERP")
        ax.axvline(t, color="0.5", ls=":")
        ax.set_xlabel("interpolation t")
        ax.set_ylabel("‖θ(t)‖")
        ax.set_ylim(0, 1.1)
        ax.set_title("Linear interpolation shrinks the norm")
        ax.legend(loc="lower right")
    return fig
