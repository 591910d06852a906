"""Text classification with a frozen per-task head on a (possibly merged) encoder.

EMTA keeps each task's classifier frozen (CLIP's zero-shot head) so the task
vector lives in the encoder. The text analogue used here: sentence features are
the attention-masked mean of the encoder's last hidden states (how MiniLM
sentence embeddings are pooled); a task's head is the cosine between them and
the embedding of one prompt per label (zero-shot), or a fitted linear probe.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from taskvec._progress import progress
from taskvec.errors import CheckpointError, KeyMismatchError, ParameterError, ShapeMismatchError


class TaskHead(nn.Module):
    """A task's frozen classifier on sentence features: logits = W f + b, with W [n_labels, dim].

    Two kinds:
    - ``zero-shot`` (EMTA's CLIP head, transposed to text): W holds the L2-normalised sentence embeddings of
      one prompt per label ("a French word", ...), the features are L2-normalised too, and
      logits = scale · cos(f, prompt_label). Built from the base encoder alone: `TaskHead.zero_shot`.
    - ``probe``: a linear map fitted on base features (logistic regression), features used as they are.
    """

    def __init__(self, dim: int, n_labels: int, labels: Sequence[str] | None = None, name: str = "task", *,
                 normalize: bool = False, scale: float = 1.0, kind: str = "probe", prompts: Sequence[str] | None = None):
        super().__init__()
        self.linear = nn.Linear(dim, n_labels)
        self.labels = list(labels) if labels is not None else [str(i) for i in range(n_labels)]
        self.name = name
        self.normalize = bool(normalize)  # cosine head: features on the unit sphere
        self.scale = float(scale)         # logit scale s (CLIP's temperature)
        self.kind = kind
        self.prompts = list(prompts) if prompts is not None else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            features = nn.functional.normalize(features, dim=-1)
        return self.scale * self.linear(features)

    @classmethod
    def from_weights(cls, weight: torch.Tensor, bias: torch.Tensor, labels=None, name: str = "task",
                     **kind) -> "TaskHead":
        head = cls(weight.shape[1], weight.shape[0], labels, name, **kind)
        with torch.no_grad():
            head.linear.weight.copy_(weight)
            head.linear.bias.copy_(bias)
        return head

    @classmethod
    def zero_shot(cls, encoder: nn.Module, tokenizer, prompts: Sequence[str], labels: Sequence[str] | None = None,
                  name: str = "task", *, scale: float = 30.0, max_length: int = 48) -> "TaskHead":
        """EMTA's zero-shot head: normalised embeddings of one prompt per label, logits = scale · cos."""
        if labels is not None and len(prompts) != len(labels):
            raise ParameterError(f"task {name!r}: {len(prompts)} prompts for {len(labels)} labels")
        if scale <= 0:
            raise ParameterError(f"scale must be > 0, got {scale}")
        emb = nn.functional.normalize(encode(encoder, tokenizer, list(prompts), max_length=max_length,
                                             desc=f"prompts {name}"), dim=-1)
        return cls.from_weights(emb, torch.zeros(len(prompts)), labels, name, normalize=True, scale=scale,
                                kind="zero-shot", prompts=prompts)

    def save(self, path: str | Path) -> None:
        import json

        from safetensors.torch import save_file

        meta = {"labels": json.dumps(self.labels), "task": self.name, "kind": self.kind,
                "normalize": json.dumps(self.normalize), "scale": repr(self.scale)}
        if self.prompts is not None:
            meta["prompts"] = json.dumps(self.prompts)
        save_file({"weight": self.linear.weight.detach().contiguous(), "bias": self.linear.bias.detach().contiguous()},
                  str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "TaskHead":
        import json

        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
        except Exception as e:  # safetensors raises several types for a bad file
            raise CheckpointError(f"cannot read task head {path}: {e}") from e
        prompts = meta.get("prompts")
        return cls.from_weights(weight, bias, json.loads(meta.get("labels", "null")), meta.get("task", Path(path).stem),
                                normalize=json.loads(meta.get("normalize", "false")),
                                scale=float(meta.get("scale", "1.0")), kind=meta.get("kind", "probe"),
                                prompts=json.loads(prompts) if prompts else None)

    def __repr__(self):
        extra = f", scale={self.scale:g}" if self.kind == "zero-shot" else ""
        return f"TaskHead({self.name!r}, kind={self.kind!r}, labels={self.labels}, dim={self.linear.in_features}{extra})"


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden states over the real (unpadded) tokens: [B, T, D], [B, T] -> [B, D]."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class SentenceClassifier(nn.Module):
    """encoder -> mean pool -> head; `forward(input_ids, attention_mask)` returns logits [B, n_labels]."""

    def __init__(self, encoder: nn.Module, head: TaskHead):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def features(self, input_ids, attention_mask, **kw) -> torch.Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return mean_pool(hidden, attention_mask)

    def forward(self, input_ids, attention_mask, **kw) -> torch.Tensor:
        return self.head(self.features(input_ids, attention_mask, **kw))


def as_module(weights, template: nn.Module | None = None) -> nn.Module:
    """A model from `weights`: an nn.Module (returned as is), a state dict / Source / TaskVector-applied
    mapping (loaded into a copy of `template`; the template is never modified), or an HF directory."""
    if isinstance(weights, nn.Module):
        return weights
    if isinstance(weights, (str, Path)):
        from transformers import AutoModel

        path = Path(weights)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a model directory")
        return AutoModel.from_pretrained(str(path)).eval()
    if template is None:
        raise ParameterError("weights given as a state dict need `template=` (a model with the same architecture)")
    state = _as_state_dict(weights)
    model = copy.deepcopy(template)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    # integer buffers (position_ids) carry no task vector: keep the template's when a merge left them out
    missing_float = [k for k in missing if expected[k].is_floating_point()]
    if missing_float:
        raise KeyMismatchError(f"state dict lacks {len(missing_float)} tensor(s) of the model, e.g. {missing_float[:3]}")
    extra = [k for k in state if k not in expected]
    if extra:
        raise KeyMismatchError(f"state dict has {len(extra)} tensor(s) the model lacks, e.g. {extra[:3]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ShapeMismatchError(f"tensor {k!r}: shape {tuple(v.shape)} vs model {tuple(expected[k].shape)}")
    with torch.no_grad():
        for k, v in state.items():
            expected[k].copy_(v.to(expected[k].dtype))
    return model.eval()


def _as_state_dict(weights) -> dict[str, torch.Tensor]:
    if isinstance(weights, Mapping):
        return {k: weights[k] for k in weights.keys()}
    if hasattr(weights, "keys") and hasattr(weights, "get"):  # a taskvec.io Source
        return {k: weights.get(k) for k in weights.keys()}
    raise ParameterError(f"cannot read weights from a {type(weights).__name__}: give a module, a state dict or a Source")


def tokenize(tokenizer, texts: Sequence[str], max_length: int = 48) -> dict[str, torch.Tensor]:
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def encode(encoder: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 128, max_length: int = 48,
           desc: str = "encode") -> torch.Tensor:
    """Sentence features [N, dim] (masked mean pool), batched, in eval mode, in the order of `texts`.

    Batches are cut from the texts sorted by length, so short texts are not padded to the longest one
    (several times faster on mixed words and sentences); padding does not change a mean-pooled feature."""
    encoder.eval()
    pool = SentenceClassifier(encoder, TaskHead(1, 1))
    texts = list(texts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunks = []
    starts = range(0, len(texts), batch_size)
    for s in progress(starts, desc=desc, total=len(starts)):
        batch = tokenize(tokenizer, [texts[i] for i in order[s:s + batch_size]], max_length)
        chunks.append(pool.features(**batch).float())
    if not chunks:
        return torch.zeros(0, getattr(getattr(encoder, "config", None), "hidden_size", 0))
    out = torch.empty(len(texts), chunks[0].shape[1])
    out[torch.tensor(order)] = torch.cat(chunks)
    return out


@torch.no_grad()
def predict(encoder: nn.Module, head: TaskHead, tokenizer, texts: Sequence[str], batch_size: int = 128,
            max_length: int = 48) -> torch.Tensor:
    feats = encode(encoder, tokenizer, texts, batch_size, max_length, desc=f"eval {head.name}")
    return head(feats).argmax(-1)


def accuracy_from_predictions(predictions, labels) -> float:
    """Fraction of positions where prediction == label."""
    predictions, labels = torch.as_tensor(predictions), torch.as_tensor(labels)
    if predictions.shape != labels.shape:
        raise ShapeMismatchError(f"predictions {tuple(predictions.shape)} vs labels {tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ParameterError("accuracy of zero examples is undefined")
    return float((predictions == labels).float().mean())


def accuracy(encoder, head: TaskHead, tokenizer, texts: Sequence[str], labels: Sequence[int], *,
             template: nn.Module | None = None, batch_size: int = 128, max_length: int = 48) -> float:
    """Accuracy of `head` on the features of `encoder` (a module, a state dict + `template`, or a dir)."""
    model = as_module(encoder, template)
    return accuracy_from_predictions(predict(model, head, tokenizer, texts, batch_size, max_length), list(labels))
