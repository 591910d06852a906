"""Evaluate any weights (merged, negated, fine-tuned) on a built zoo's tasks; tidy DataFrames."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from taskvec.eval.classification import accuracy, as_module


@functools.lru_cache(maxsize=4)
def _template(path: str, kind: str):
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if kind == "lm" else AutoModel
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def _model_for(zoo, weights, template):
    if weights is None:
        return _template(str(zoo.base), zoo.kind)
    if isinstance(weights, torch.nn.Module):
        return weights
    if isinstance(weights, (str, Path)):
        return _template(str(weights), zoo.kind)
    return as_module(weights, template if template is not None else _template(str(zoo.base), zoo.kind))


def task_accuracies(zoo, weights=None, *, tasks=None, split: str = "test", template=None, batch_size: int = 128):
    """One row per task: accuracy of `weights` with the task's own frozen head, the base and fine-tuned
    accuracies from the manifest, and `normalized` = accuracy / fine-tuned accuracy (TIES' metric)."""
    import pandas as pd

    model = _model_for(zoo, weights, template)
    tokenizer = zoo.tokenizer()
    max_length = zoo.manifest.get("recipe", {}).get("max_length", 48)
    rows = []
    for task in (tasks if tasks is not None else zoo.tasks + zoo.control_tasks + zoo.heldout_tasks):
        data, head = zoo.task_data(task), zoo.head(task)
        if split not in data.splits:  # e.g. "shift": only the tasks that have a distribution-shifted test set
            continue
        acc = accuracy(model, head, tokenizer, data.texts(split), data.targets(split), batch_size=batch_size,
                       max_length=max_length)
        metrics = zoo.manifest["models"].get(task, {}).get("metrics") or \
            zoo.manifest.get("control_metrics", {}).get(task, {})
        ft = metrics.get(f"finetuned_{split}")
        rows.append({"task": task, "split": split, "accuracy": acc, "base_accuracy": metrics.get(f"base_{split}"),
                     "finetuned_accuracy": ft, "normalized": (acc / ft) if ft else None,
                     "control": task in zoo.control_tasks, "heldout": task in zoo.heldout_tasks,
                     "n": len(data.splits[split])})
    return pd.DataFrame(rows)


def lm_report(zoo, weights=None, *, split: str = "test", template=None, label: str = "model",
              samples_per_prompt: int | None = None, max_new_tokens: int | None = None, seed: int | None = None):
    """Toxic-generation rate (alt-profanity-check) and perplexity on held-out clean text, as a dict row."""
    import json

    from taskvec.eval.language import toxicity_report

    model = _model_for(zoo, weights, template)
    payload = json.loads((zoo.root / "data" / "lm.json").read_text())
    recipe = zoo.manifest.get("recipe", {})
    return toxicity_report(
        model, zoo.tokenizer(), payload["prompts"], payload[f"clean_{split}"],
        samples_per_prompt=samples_per_prompt or recipe.get("samples_per_prompt", 4),
        max_new_tokens=max_new_tokens or recipe.get("max_new_tokens", 24),
        seed=zoo.manifest.get("seed", 0) if seed is None else seed, label=label)


def task_batches(zoo, task: str, *, split: str = "train", batch_size: int = 16, limit: int | None = None):
    """The task's texts as model-ready batches {"input_ids", "attention_mask", "labels"} (for the statistics)."""
    from taskvec.eval.classification import tokenize

    data = zoo.task_data(task)
    texts, labels = data.texts(split)[:limit], data.targets(split)[:limit]
    max_length = zoo.manifest.get("recipe", {}).get("max_length", 48)
    tokenizer = zoo.tokenizer()
    for s in range(0, len(texts), batch_size):
        batch = tokenize(tokenizer, texts[s:s + batch_size], max_length)
        batch["labels"] = torch.tensor(labels[s:s + batch_size])
        yield batch


def _classifier(zoo, task: str, weights):
    from taskvec.eval.classification import SentenceClassifier

    encoder = _model_for(zoo, zoo.models[task] if weights is None else weights, None)
    head = zoo.head(task)
    for p in head.parameters():
        p.requires_grad_(False)  # the head is frozen: only the encoder carries statistics
    return SentenceClassifier(encoder, head)


def _encoder_keys(stats: dict) -> dict:
    return {k.removeprefix("encoder."): v for k, v in stats.items() if k.startswith("encoder.")}


def task_fisher(zoo, task: str, n_samples: int = 256, *, mode: str = "sampled", weights=None, split: str = "train",
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the task's fine-tuned encoder (or `weights`) under its frozen head, on the task's data;
    keyed like the encoder's state dict, ready for `fisher_merge`."""
    from taskvec.eval.statistics import fisher_diagonal

    model = _classifier(zoo, task, weights)
    stats = fisher_diagonal(model, task_batches(zoo, task, split=split, limit=n_samples), n_samples, mode=mode,
                            seed=seed)
    return _encoder_keys(stats)


def task_grams(zoo, task: str, *, weights=None, split: str = "train", limit: int | None = 512,
               average: bool = True) -> dict[str, torch.Tensor]:
    """RegMean Gram matrices of every nn.Linear of the task's fine-tuned encoder, on the task's data: the mean
    X^T X / N as the reference code (average=False: the sum); keyed '<layer>.weight' like the encoder's state
    dict, ready for `regmean_merge`."""
    from taskvec.eval.statistics import regmean_grams

    model = _classifier(zoo, task, weights)
    return _encoder_keys(regmean_grams(model, task_batches(zoo, task, split=split, limit=limit), average=average))
