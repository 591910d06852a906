"""Cosine similarity between task vectors (EMTA Fig. 5): are task vectors orthogonal?

cos(tau_i, tau_j) = <tau_i, tau_j> / (||tau_i|| ||tau_j||), with the inner
products accumulated tensor by tensor: for each parameter we compute the small
Gram matrix of the n deltas (n(n+1)/2 dot products) and keep it. Summing those
Gram matrices over any grouping of parameters (everything, a layer, a module
type) gives the cosine for that group, so one pass serves every variant.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch

from taskvec.analysis._results import AnalysisResult
from taskvec.analysis._stream import iter_delta_blocks, named_task_vectors
from taskvec.analysis.naming import layer_label, module_type, sort_layer_labels, MODULE_TYPES
from taskvec.errors import CheckpointError, ParameterError

Grouping = str | Callable[[str], str] | None


def cosine_from_gram(g: np.ndarray) -> np.ndarray:
    """cos[i, j] = G[i, j] / sqrt(G[i, i] G[j, j]); NaN where a vector is all zeros."""
    norms = np.sqrt(np.clip(np.diag(g), 0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        c = g / np.outer(norms, norms)
    c[~np.isfinite(c)] = np.nan
    return np.clip(c, -1.0, 1.0)


def _group_fn(by: Grouping) -> Callable[[str], str]:
    if by is None or by == "all":
        return lambda name: "all"
    if callable(by):
        return lambda name: str(by(name))
    if by == "layer":
        return layer_label
    if by == "module":
        return module_type
    if by == "tensor":
        return lambda name: name
    raise ParameterError(f"by must be None, 'layer', 'module', 'tensor' or a function name -> group, not {by!r}")


def _group_order(by: Grouping, groups: list[str]) -> list[str]:
    if by == "layer":
        return sort_layer_labels(groups)
    if by == "module":
        return [m for m in MODULE_TYPES if m in set(groups)]
    return list(dict.fromkeys(groups))


@dataclass(repr=False, eq=False)
class CosineMatrix(AnalysisResult):
    """Pairwise cosine similarity of task vectors, overall and per group of parameters.

    `matrix()` is the n x n DataFrame over all parameters; `matrix("layer")`
    etc. give {group: matrix}; `pairs(by)` is the tidy long form.
    """

    task_names: list[str]
    tensor_names: list[str]
    tensor_grams: np.ndarray  # (num_tensors, n, n) float64
    by: Grouping = None

    kind = "cosine"

    def _grouped_grams(self, by: Grouping) -> dict[str, np.ndarray]:
        fn = _group_fn(by)
        out: dict[str, np.ndarray] = {}
        for name, g in zip(self.tensor_names, self.tensor_grams):
            key = fn(name)
            out[key] = out[key] + g if key in out else g.copy()
        order = _group_order(by, list(out))
        return {k: out[k] for k in order}

    def matrix(self, by: Grouping = None):
        """Cosine matrix over all parameters (DataFrame), or {group: DataFrame} when `by` is given."""
        grams = self._grouped_grams(by)
        frames = {k: pd.DataFrame(cosine_from_gram(g), index=self.task_names, columns=self.task_names) for k, g in grams.items()}
        if by is None or by == "all":
            return frames["all"]
        return frames

    def pairs(self, by: Grouping = None) -> pd.DataFrame:
        """Tidy table: one row per (group, task_a, task_b) with a < b: cosine, dot product and both norms."""
        rows = []
        col = "group" if by is None or callable(by) else str(by)
        for group, g in self._grouped_grams(by).items():
            c = cosine_from_gram(g)
            n = len(self.task_names)
            for i in range(n):
                for j in range(i + 1, n):
                    rows.append({
                        col: group, "task_a": self.task_names[i], "task_b": self.task_names[j],
                        "cosine": c[i, j], "dot": g[i, j], "norm_a": float(np.sqrt(g[i, i])), "norm_b": float(np.sqrt(g[j, j])),
                    })
        return pd.DataFrame(rows)

    def tables(self) -> dict[str, pd.DataFrame]:
        m = self.matrix().reset_index(names="task")
        return {"matrix": m, "pairs": self.pairs(), "by_layer": self.pairs("layer"), "by_module": self.pairs("module")}

    def summary(self) -> list[str]:
        c = self.matrix().to_numpy()
        n = len(self.task_names)
        off = c[~np.eye(n, dtype=bool)]
        if not off.size:
            return [f"1 task vector ({self.task_names[0]}): nothing to compare"]
        off = off[np.isfinite(off)]
        if not off.size:
            return ["cosines undefined (a task vector is all zeros)"]
        return [f"{n} task vectors over {len(self.tensor_names)} tensors: off-diagonal cosine "
                f"mean {off.mean():+.4f}, min {off.min():+.4f}, max {off.max():+.4f}"]

    def plot(self, by: Grouping = "default", *, vmax: float | None = None):
        """Heatmap. by=None: the n x n matrix (EMTA Fig. 5); 'layer'/'module': groups x task pairs.

        Colours diverge around 0; the limit is the largest off-diagonal |cos|
        (rounded up) so near-orthogonal structure stays visible — the diagonal
        (1.0) then saturates, as annotated.
        """
        from taskvec.viz import heatmap, new_figure, style

        if by == "default":
            by = self.by
        n = len(self.task_names)
        with style():
            if by is None or by == "all":
                m = self.matrix()
                off = m.to_numpy()[~np.eye(n, dtype=bool)]
                lim = vmax
                if lim is None:
                    from taskvec.viz import symmetric_limit

                    lim = symmetric_limit(off if off.size else [1.0], floor=0.01)
                size = 1.5 + 0.95 * n
                fig, ax = new_figure(figsize=(size + 1.6, size))
                heatmap(ax, m, title="Cosine similarity between task vectors", xlabel="task vector", ylabel="task vector",
                        cbar_label=r"$\cos(\tau_i, \tau_j)$", diverging=True, vmax=lim, fmt=".3f" if lim <= 0.1 else ".2f")
            else:
                p = self.pairs(by)
                col = "group" if callable(by) else str(by)
                p["pair"] = p["task_a"] + " · " + p["task_b"]
                order = list(dict.fromkeys(p[col]))
                table = p.pivot(index=col, columns="pair", values="cosine").reindex(order)
                table = table[list(dict.fromkeys(p["pair"]))]
                # groups no task vector touches (all-zero deltas, e.g. a frozen pooler) have no cosine: drop them
                empty = [str(g) for g in table.index[table.isna().all(axis=1)]]
                table = table.dropna(how="all")
                lim = vmax
                if lim is None:
                    from taskvec.viz import symmetric_limit

                    lim = symmetric_limit(table.to_numpy(), floor=0.01)
                what = "layer" if by == "layer" else "module type" if by == "module" else "group"
                xlabel, ylabel = "task-vector pair", what
                if table.shape[1] > max(8, len(table)):
                    # many pairs (8 tasks: 28): pairs down the rows, so the figure grows in height, not width
                    table, xlabel, ylabel = table.T, what, "task-vector pair"
                h = max(3.2, 0.36 * len(table) + 1.6)
                w = max(4.8, 1.25 * table.shape[1] + 3.2)
                fig, ax = new_figure(figsize=(w, h))
                heatmap(ax, table, title=f"Task-vector cosine similarity per {what}", xlabel=xlabel,
                        ylabel=ylabel, cbar_label="cosine", diverging=True, vmax=lim, fmt=".3f" if lim <= 0.1 else ".2f")
                if empty:
                    ax.text(0.0, -0.02, f"no change (all-zero deltas), not shown: {', '.join(empty)}", transform=fig.transFigure,
                            fontsize=8.5, color="0.3", va="bottom")
        return fig


def cosine_matrix(tvs, names=None, by: Grouping = None) -> CosineMatrix:
    """Pairwise cosine similarity of task vectors, accumulated tensor by tensor in one pass.

    tvs: a sequence of task vectors (Mappings name -> Tensor, e.g. TaskVector) or a
    Mapping label -> task vector. by: the default grouping for `.plot()` / display
    (None = whole model, 'layer', 'module', 'tensor' or a function name -> group);
    every grouping stays available afterwards via `.matrix(by)` / `.pairs(by)`.
    """
    _group_fn(by)  # validate early, before the pass
    vectors, names = named_task_vectors(tvs, names)
    tensor_names, grams = [], []
    for key, blocks in iter_delta_blocks(vectors, names, desc="cosine"):
        g = np.zeros((len(vectors), len(vectors)))
        for x in blocks:
            # n(n+1)/2 dot products per block (measured faster than x @ x.T for n x m blocks on CPU)
            for i in range(len(x)):
                for j in range(i, len(x)):
                    g[i, j] += float(torch.dot(x[i], x[j]))
        g = np.triu(g) + np.triu(g, 1).T
        bad = [n for n, v in zip(names, np.diag(g)) if not np.isfinite(v)]
        if bad:
            raise CheckpointError(f"tensor {key!r} of task vector {bad[0]!r} contains NaN or inf")
        tensor_names.append(key)
        grams.append(g)
    if not grams:
        raise ParameterError("cosine_matrix: the task vectors hold no floating-point parameters")
    return CosineMatrix(task_names=names, tensor_names=tensor_names, tensor_grams=np.stack(grams), by=by)
