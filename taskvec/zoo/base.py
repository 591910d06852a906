"""What every zoo build returns: the `Zoo` handle, and where a build lives in the cache.

Shared by the two ways a zoo is made — fine-tuned here (`taskvec.zoo.core`) or
fetched from the hub (`taskvec.zoo.hub`) — so neither has to import the other
for it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from taskvec.errors import ParameterError
from taskvec.zoo.cache import cache_dir


@dataclass
class Zoo:
    """A built zoo: where its models live, its manifest, and helpers to load and evaluate them."""

    name: str
    mode: str
    root: Path
    manifest: dict = field(repr=False)

    # -------- locations
    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    def _path(self, rel: str) -> Path:
        return self.root / rel  # absolute paths (hub snapshots) stay as they are

    @property
    def base(self) -> Path:
        """The base model's HF directory."""
        return self._path(self.manifest["base"]["path"])

    @property
    def models(self) -> dict[str, Path]:
        """Fine-tuned model directories by task."""
        return {task: self._path(m["path"]) for task, m in self.manifest["models"].items()}

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["models"])

    @property
    def control_tasks(self) -> list[str]:
        """Never fine-tuned; what negation must preserve (EMTA's ImageNet)."""
        return list(self.manifest.get("control", []))

    @property
    def heldout_tasks(self) -> list[str]:
        """Never fine-tuned, never merged: out-of-distribution tasks for merged models (zero-shot heads)."""
        return list(self.manifest.get("heldout", []))

    @property
    def multitask_path(self) -> Path | None:
        """The model fine-tuned jointly on every task (the in-domain upper reference), when built."""
        m = self.manifest.get("multitask")
        return self._path(m["path"]) if m else None

    @property
    def head_kind(self) -> str:
        return self.manifest.get("recipe", {}).get("head", "probe")

    def heads_path(self, task: str) -> Path:
        return self.root / "heads" / f"{task}.safetensors"

    # -------- loading
    def task_data(self, task: str):
        from taskvec.zoo.data import TaskData

        path = self.root / "data" / f"{task}.json"
        if not path.is_file():
            raise ParameterError(f"zoo {self.name!r} has no data for task {task!r}; tasks: "
                                 f"{self.tasks + self.control_tasks}")
        return TaskData.from_json(json.loads(path.read_text()))

    def head(self, task: str):
        from taskvec.eval.classification import TaskHead

        path = self.heads_path(task)
        if not path.is_file():
            raise ParameterError(f"zoo {self.name!r} has no head for task {task!r}")
        return TaskHead.load(path)

    def load(self, which: str = "base"):
        """The base model (``"base"``), ``"multitask"`` or a task's fine-tuned model, as an nn.Module in eval mode."""
        path = {"base": self.base, "multitask": self.multitask_path}.get(which) or self.models.get(which)
        if path is None:
            raise ParameterError(f"zoo {self.name!r} has no model {which!r}; choose 'base', "
                                 f"{'multitask, ' if self.multitask_path else ''}or one of {self.tasks}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if self.kind == "lm":
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        from transformers import AutoModel

        return AutoModel.from_pretrained(str(path)).eval()

    def tokenizer(self):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(self.base))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def task_vector(self, task: str):
        from taskvec.vector import TaskVector

        return TaskVector.from_models(str(self.base), str(self.models[task]))

    # -------- evaluation
    def evaluate(self, weights=None, *, tasks=None, split: str = "test", template=None, **kw):
        """Tidy results for `weights` (module, state dict, Source or dir; None = the base).

        Encoder zoo: accuracy per task with each task's own frozen head, and the accuracy normalised by
        the task's fine-tuned accuracy (TIES). LM zoo: toxic-generation rate and clean-text perplexity.
        """
        from taskvec.eval import zoo_eval

        if self.kind == "lm":
            return zoo_eval.lm_report(self, weights, split=split, template=template, **kw)
        return zoo_eval.task_accuracies(self, weights, tasks=tasks, split=split, template=template, **kw)

    def summary(self):
        import pandas as pd

        rows = []
        for task, m in self.manifest["models"].items():
            rows.append({"task": task, **{k: v for k, v in m.get("metrics", {}).items()},
                         "steps": m.get("training", {}).get("steps")})
        return pd.DataFrame(rows)

    def __repr__(self):
        lines = [f"Zoo({self.name!r}, mode={self.mode!r}, kind={self.kind!r}, root={str(self.root)!r})",
                 f"  base: {self.manifest['base'].get('source', self.base)}"]
        for task, m in self.manifest["models"].items():
            metrics = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in m.get("metrics", {}).items())
            lines.append(f"  {task}: {metrics}")
        if self.multitask_path:
            lines.append(f"  multitask: fine-tuned jointly on all {len(self.tasks)} tasks")
        if self.control_tasks:
            lines.append(f"  control (never fine-tuned): {', '.join(self.control_tasks)}")
        if self.heldout_tasks:
            lines.append(f"  held-out (never fine-tuned or merged): {', '.join(self.heldout_tasks)}")
        lines.append(f"  heads: {self.head_kind}")
        return "\n".join(lines)


def zoo_root(name: str, mode: str, seed: int, cache=None, head: str = "zero-shot") -> Path:
    suffix = "" if head == "zero-shot" else f"-{head}"
    return cache_dir(cache) / "zoo" / f"{name.replace(':', '_').replace('/', '_')}{suffix}-{mode}-seed{seed}"
