"""The README.md model card a merged model folder gets, as mergekit users expect.

YAML front matter (Hugging Face model-card metadata: ``base_model`` lists the
parent models that are hub ids, ``tags`` include ``merge``, ``taskvec`` and
``mergekit-compatible``), then the method, the base, the models, and the full
config that produced the merge in a ``yaml`` block — so the card alone is
enough to reproduce the merge with `taskvec merge` or `mergekit-yaml`.
An optional ``evaluation`` (metrics: a dict, a DataFrame, or a sweep) adds an
"Evaluation" table, and a Hugging Face ``model-index`` when the metrics describe
one model. `render_vector_card` is the card of a published task vector.
Rendered with `string.Template` (stdlib; no jinja2 needed).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any, Mapping

from taskvec.errors import ParameterError

if TYPE_CHECKING:  # for annotations only: the card reads what it needs off the config it is given
    from taskvec.config.parse import MergeConfig

TAGS = ("merge", "taskvec", "mergekit-compatible")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")  # org/name; local paths (/x, ./x, a/b/c) are not

# Method name -> (pretty name, paper or reference).
METHOD_REFERENCES: dict[str, tuple[str, str | None]] = {
    "linear": ("Linear (model soups)", "https://arxiv.org/abs/2203.05482"),
    "task_arithmetic": ("Task Arithmetic", "https://arxiv.org/abs/2212.04089"),
    "ties": ("TIES", "https://arxiv.org/abs/2306.01708"),
    "dare_ties": ("DARE-TIES", "https://arxiv.org/abs/2311.03099"),
    "dare_linear": ("DARE (linear)", "https://arxiv.org/abs/2311.03099"),
    "slerp": ("SLERP", "https://en.wikipedia.org/wiki/Slerp"),
    "passthrough": ("Passthrough (layer slices)", None),
    "breadcrumbs": ("Model Breadcrumbs", "https://arxiv.org/abs/2312.06795"),
    "breadcrumbs_ties": ("Model Breadcrumbs with TIES", "https://arxiv.org/abs/2312.06795"),
    "della": ("DELLA", "https://arxiv.org/abs/2406.11617"),
    "della_linear": ("DELLA (linear)", "https://arxiv.org/abs/2406.11617"),
    "model_stock": ("Model Stock", "https://arxiv.org/abs/2403.19522"),
    "fisher": ("Fisher merging", "https://arxiv.org/abs/2111.09832"),
    "regmean": ("RegMean", "https://arxiv.org/abs/2212.09849"),
}

CARD_TEMPLATE = Template("""\
---
$front_matter
---

# $name

This model is a merge of pre-trained language models made with
[taskvec](https://pypi.org/project/taskvec/) $version from a
[mergekit](https://github.com/arcee-ai/mergekit)-compatible configuration.

## Merge method

This model was merged using the $method merge method$base_text.

## Models merged

The following models were included in the merge:
$model_list
$notes$evaluation
## Configuration

The following YAML configuration was used to produce this model
(`taskvec merge config.yml OUT` or `mergekit-yaml config.yml OUT` reproduce it):

```yaml
$config_yaml
```
""")


def _method_md(method: str) -> str:
    pretty, url = METHOD_REFERENCES.get(method, (method, None))
    return f"[{pretty}]({url})" if url else pretty


def render_model_card(config: "MergeConfig", *, name: str | None = None,
                      extra_metadata: Mapping[str, object] | None = None, evaluation: Any = None) -> str:
    """The model card text for a merge described by `config` (a `taskvec.config.MergeConfig`).

    `evaluation` (optional): metrics of the merged model — ``{metric: value}``,
    ``{task: {metric: value}}``, a DataFrame (one row per task, or tidy task/metric/value
    columns, or a sweep's grid), or a sweep result (anything with a ``.data`` DataFrame).
    Rendered as a table under "Evaluation"; one model's metrics also go to ``model-index``.
    """
    import yaml

    from taskvec import __version__

    models = config.referenced_models()
    hub_ids = [part for m in models for part in m.split("+") if _HUB_ID.match(part)]
    # mergekit's convention: SLERP has no privileged base in the prose (t=0 is just one end).
    base = None if config.merge_method == "slerp" else config.base_model
    metadata = {
        "base_model": hub_ids,  # Hugging Face metadata: hub ids only, as mergekit writes it
        "tags": list(TAGS),
        "library_name": "transformers",
        "merge_method": config.merge_method,
        **(extra_metadata or {}),
    }
    eval_md, model_index = evaluation_section(evaluation, name=name or "Merged model")
    if model_index:
        metadata["model-index"] = model_index
    bullets = [f"* `{m}`" for m in models if m != base] or ["* (none)"]
    notes = ""
    if config.no_effect:
        reasons = config.no_effect_reasons()
        lines = [f"* `{k}: {v}` — {reasons[k]}" for k, v in config.no_effect.items()]
        notes = "\nOptions in the configuration that have no effect in taskvec:\n" + "\n".join(lines) + "\n"
    return CARD_TEMPLATE.substitute(
        front_matter=yaml.safe_dump(metadata, sort_keys=False).rstrip(),
        name=name or "Merged model",
        version=__version__,
        method=_method_md(config.merge_method),
        base_text=f" with `{base}` as the base" if base else "",
        model_list="\n".join(bullets),
        notes=notes,
        evaluation=eval_md,
        config_yaml=config.text.strip("\n"),
    )


def write_model_card(out_dir: str | os.PathLike, config: "MergeConfig", *, name: str | None = None,
                     evaluation: Any = None) -> Path:
    """Write README.md into `out_dir`, named after the folder unless `name` is given."""
    out_dir = Path(out_dir)
    path = out_dir / "README.md"
    path.write_text(render_model_card(config, name=name or out_dir.name, evaluation=evaluation), encoding="utf-8")
    return path


# ---------------------------------------------------------------- evaluation

def _is_number(v: Any) -> bool:
    import numbers

    return isinstance(v, numbers.Number) and not isinstance(v, bool)


def _cell(v: Any) -> str:
    if _is_number(v):
        v = float(v) if not isinstance(v, int) else v
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
    else:
        text = "" if v is None else str(v)
    return text.replace("|", "\\|").replace("\n", " ")


def evaluation_table(evaluation: Any) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of an evaluation: a dict of metrics, a dict of dicts (task -> metrics),
    a DataFrame, or a sweep (anything with a ``.data`` DataFrame)."""
    data = getattr(evaluation, "data", None)
    if data is not None and hasattr(data, "to_dict") and hasattr(data, "columns"):
        evaluation = data
    if hasattr(evaluation, "to_dict") and hasattr(evaluation, "columns"):  # a pandas DataFrame
        df = evaluation
        if df.index.name is not None or not (list(df.index) == list(range(len(df)))):
            df = df.reset_index()
        columns = [str(c) for c in df.columns]
        rows = [{str(k): v for k, v in r.items()} for r in df.to_dict("records")]
        return columns, rows
    if isinstance(evaluation, Mapping):
        if evaluation and all(isinstance(v, Mapping) for v in evaluation.values()):
            rows = [{"task": str(t), "metric": str(m), "value": v}
                    for t, metrics in evaluation.items() for m, v in metrics.items()]
            return ["task", "metric", "value"], rows
        return ["metric", "value"], [{"metric": str(m), "value": v} for m, v in evaluation.items()]
    raise ParameterError(f"evaluation: expected a dict of metrics, a dict of dicts (task -> metrics), a DataFrame "
                         f"or a sweep result, got {type(evaluation).__name__}")


def _model_index(columns: list[str], rows: list[dict[str, Any]], name: str) -> list[dict] | None:
    """Hugging Face `model-index` results for one model's metrics; None for a grid (a sweep's many models)."""
    triples: list[tuple[str, str, str, float]] = []  # (task type, dataset, metric, value)
    if {"metric", "value"} <= set(columns):
        for r in rows:
            if not _is_number(r["value"]):
                continue
            task = str(r.get("task") or r.get("dataset") or "evaluation")
            triples.append((str(r.get("task_type") or "other"), task, str(r["metric"]), float(r["value"])))
    elif rows:
        label = "task" if "task" in columns else ("dataset" if "dataset" in columns else None)
        if label is None and len(rows) != 1:
            return None  # a sweep: one row per grid point, not one model
        for r in rows:
            task = str(r[label]) if label else "evaluation"
            for c in columns:
                if c not in ("task", "dataset", "task_type") and _is_number(r[c]):
                    triples.append((str(r.get("task_type") or "other"), task, c, float(r[c])))
    if not triples:
        return None
    results: dict[tuple[str, str], list[dict]] = {}
    for task_type, task, metric, value in triples:
        results.setdefault((task_type, task), []).append({"type": metric, "value": value, "name": metric})
    return [{"name": name, "results": [
        {"task": {"type": task_type}, "dataset": {"name": task, "type": task}, "metrics": metrics}
        for (task_type, task), metrics in results.items()]}]


def evaluation_section(evaluation: Any, *, name: str) -> tuple[str, list[dict] | None]:
    """The card's "Evaluation" markdown (a table) and its `model-index` (or None); ("", None) without one."""
    if evaluation is None:
        return "", None
    columns, rows = evaluation_table(evaluation)
    if not rows:
        return "", None
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    md = "\n## Evaluation\n\n" + "\n".join(lines) + "\n"
    return md, _model_index(columns, rows, name)


VECTOR_CARD_TEMPLATE = Template("""\
---
$front_matter
---

# $name

A task vector τ = θ_finetuned − θ_base made with [taskvec](https://pypi.org/project/taskvec/) $version.

| | |
|---|---|
| base model | `$base` |
| τ | `$expression` |
| ‖τ‖₂ | $norm |
| tensors | $tensors |
| parameters | $parameters |
| file | `$filename` (float deltas, safetensors with taskvec metadata) |
$provenance$evaluation
## Use

```python
from huggingface_hub import hf_hub_download
from taskvec import TaskVector

tau = TaskVector.load(hf_hub_download("$repo_id", "$filename"))
tau.apply_to("$base", scaling=1.0, out="edited-model")   # θ_base + λ·τ, a model folder
```
""")


def render_vector_card(*, name: str, repo_id: str, base: str | None, expression: str, norm: float | None,
                       num_tensors: int, num_parameters: int, filename: str, provenance: list[str] = (),
                       evaluation: Any = None) -> str:
    """The README.md of a published task vector: base, terms (its expression), norm, provenance, evaluation."""
    import yaml

    from taskvec import __version__

    metadata: dict[str, Any] = {}
    if base and _HUB_ID.match(base):
        metadata["base_model"] = base
    metadata["tags"] = ["taskvec", "task-vector"]
    eval_md, model_index = evaluation_section(evaluation, name=name)
    if model_index:
        metadata["model-index"] = model_index
    prov = ""
    if provenance:
        prov = "\nHow it was made:\n\n" + "\n".join(f"* {p}" for p in provenance) + "\n"
    return VECTOR_CARD_TEMPLATE.substitute(
        front_matter=yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).rstrip(),
        name=name, version=__version__, base=base or "unknown", expression=expression,
        norm="n/a" if norm is None else f"{norm:.6g}", tensors=f"{num_tensors:,}",
        parameters=f"{num_parameters:,}", filename=filename, provenance=prov, evaluation=eval_md,
        repo_id=repo_id)
