"""The README.md model card a merged model folder gets, as mergekit users expect.

YAML front matter (Hugging Face model-card metadata: ``base_model`` lists the
parent models that are hub ids, ``tags`` include ``merge``, ``taskvec`` and
``mergekit-compatible``), then the method, the base, the models, and the full
config that produced the merge in a ``yaml`` block — so the card alone is
enough to reproduce the merge with `taskvec merge` or `mergekit-yaml`.
Rendered with `string.Template` (stdlib; no jinja2 needed).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Mapping

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
$notes
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
                      extra_metadata: Mapping[str, object] | None = None) -> str:
    """The model card text for a merge described by `config` (a `taskvec.config.MergeConfig`)."""
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
        config_yaml=config.text.strip("\n"),
    )


def write_model_card(out_dir: str | os.PathLike, config: "MergeConfig", *, name: str | None = None) -> Path:
    """Write README.md into `out_dir`, named after the folder unless `name` is given."""
    out_dir = Path(out_dir)
    path = out_dir / "README.md"
    path.write_text(render_model_card(config, name=name or out_dir.name), encoding="utf-8")
    return path
