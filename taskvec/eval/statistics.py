"""Per-model statistics that Fisher merging and RegMean consume.

- Fisher merging (Matena & Raffel): F = E_x E_{y~p(y|x)} [(d log p(y|x) / d theta)^2], the diagonal
  of the Fisher information, estimated per example (the square of a batch gradient is not it).
  mode="sampled": y drawn from the model's own prediction (the true Fisher);
  mode="empirical": y = the data's label (the "empirical Fisher").
- RegMean (Jin et al.): for every linear layer, G = X^T X / N, the mean Gram matrix of that layer's
  inputs on the model's own data (as the reference code), gathered with forward hooks. nn.Linear weight
  is [out, in], GPT-2's Conv1D weight [in, out]; G is [in, in].

`data` is an iterable of batches: dicts of tensors passed as `model(**batch)` (a "labels" entry is
held back and used as y in empirical mode), or (inputs, labels) pairs. The model's output is logits
[B, C] (classification) or [B, T, V] (language model: log p(y|x) sums over positions, with the
attention mask when given, and the label at position t is the next token for causal LMs when labels
are the input ids shifted by the caller).

AdaMerging (Yang et al., ICLR 2024) needs no labels at all: its statistic is the Shannon entropy of the
merged model's predictions on unlabeled inputs (`prediction_entropy`), minimised over merging coefficients.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from taskvec._progress import progress
from taskvec.errors import ParameterError


def _split_batch(batch) -> tuple[dict, torch.Tensor | None]:
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch.get("labels")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, labels = batch
        return (dict(inputs) if isinstance(inputs, Mapping) else {"input": inputs}), labels
    raise ParameterError(f"a batch must be a dict of tensors or an (inputs, labels) pair, got {type(batch).__name__}")


def _call(model: nn.Module, inputs: dict):
    out = model(inputs["input"]) if set(inputs) == {"input"} else model(**inputs)
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out


def _rows(inputs: dict, labels, i: int):
    """Example i of a batch (kept 2-D so the model sees a batch of one)."""
    one = {k: (v[i:i + 1] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in inputs.items()}
    return one, (labels[i:i + 1] if labels is not None else None)


def example_log_likelihood(logits: torch.Tensor, mode: str, labels: torch.Tensor | None,
                           mask: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """log p(y|x) of one example: y sampled from softmax(logits) or taken from `labels`."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if mode == "sampled":
        with torch.no_grad():
            probs = logp.detach().exp().reshape(-1, logp.shape[-1])
            y = torch.multinomial(probs, 1, generator=generator).reshape(logp.shape[:-1])
    elif mode == "empirical":
        if labels is None:
            raise ParameterError("fisher_diagonal(mode='empirical') needs labels in the data (a 'labels' entry)")
        y = labels.reshape(logp.shape[:-1]).long()
    else:
        raise ParameterError(f"fisher_diagonal mode must be 'sampled' or 'empirical', got {mode!r}")
    valid = y >= 0  # -100 marks positions without a label (padding)
    if mask is not None and logp.dim() == 3:
        valid = valid & mask.reshape(valid.shape).bool()
    picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * valid).sum()


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """AdaMerging's objective: mean over the batch of H(p) = -sum_c p_c log p_c, p = softmax(logits), in nats.

    Computed from log_softmax (no log(0) when a class gets probability ~0); differentiable in the logits."""
    if logits.dim() < 2 or logits.shape[-1] < 1:
        raise ParameterError(f"logits must be [batch, classes], got shape {tuple(logits.shape)}")
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


def fisher_diagonal(model: nn.Module, data: Iterable, n_samples: int, mode: str = "sampled", *,
                    seed: int = 0, parameters: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Diagonal Fisher information of `model` per parameter name, averaged over `n_samples` examples.

    Each example gets its own backward pass (the Fisher is a mean of squared per-example gradients).
    Parameters that don't require grad are skipped; `parameters` restricts to some names. The model is
    put in eval mode (no dropout) and restored; its weights and grads are left as they were.
    """
    if n_samples < 1:
        raise ParameterError(f"n_samples must be >= 1, got {n_samples}")
    if mode not in ("sampled", "empirical"):
        raise ParameterError(f"fisher_diagonal mode must be 'sampled' or 'empirical', got {mode!r}")
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if parameters is not None:
        wanted = list(parameters)
        unknown = [n for n in wanted if n not in named]
        if unknown:
            raise ParameterError(f"no trainable parameter named {unknown[0]!r} in the model")
        named = {n: named[n] for n in wanted}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named.items()}
    saved_grads = {n: p.grad for n, p in named.items()}
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    seen = 0
    bar = progress(total=n_samples, desc=f"fisher ({mode})")
    try:
        for batch in data:
            inputs, labels = _split_batch(batch)
            size = next(v for v in inputs.values() if torch.is_tensor(v)).shape[0]
            for i in range(size):
                if seen >= n_samples:
                    break
                one, y = _rows(inputs, labels, i)
                logits = _call(model, one)
                ll = example_log_likelihood(logits, mode, y, one.get("attention_mask"), generator)
                grads = torch.autograd.grad(ll, list(named.values()), allow_unused=True)
                for (n, _), g in zip(named.items(), grads):
                    if g is not None:
                        fisher[n] += g.detach().float() ** 2
                seen += 1
                bar.update(1)
            if seen >= n_samples:
                break
    finally:
        bar.close()
        model.train(was_training)
        for n, p in named.items():
            p.grad = saved_grads[n]
    if seen == 0:
        raise ParameterError("fisher_diagonal got no examples from `data`")
    return {n: f / seen for n, f in fisher.items()}


class RegMeanGrams(dict):
    """{weight name: Gram matrix [in, in]}, plus `transposed`: the names whose weight is stored [in, out]
    (GPT-2's Conv1D), which `regmean_merge` must be told about (`transposed=True`)."""

    def __init__(self, grams=(), transposed=()):
        super().__init__(grams)
        self.transposed = frozenset(transposed)


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers absent or reorganised: no Conv1D layers to find
        return None
    return Conv1D


def _linear_layers(model: nn.Module) -> tuple[dict[str, nn.Module], set[str]]:
    """nn.Linear and GPT-2 Conv1D layers by module name, and the names of the Conv1D ones."""
    conv1d = _conv1d_class()
    layers, transposed = {}, set()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            layers[name] = m
        elif conv1d is not None and isinstance(m, conv1d):
            layers[name] = m
            transposed.add(name)
    return layers, transposed


@torch.no_grad()
def regmean_grams(model: nn.Module, data: Iterable, *, mask_key: str = "attention_mask",
                  average: bool = True) -> RegMeanGrams:
    """Gram matrix of the inputs of every nn.Linear and GPT-2 Conv1D, keyed by that layer's weight name.

    X stacks the layer's input rows over the whole data ([N, in], sequence positions flattened); padded
    positions (mask 0) are left out when the batch has an attention mask of matching shape.
    average=True (default): X^T X / N, the running mean of the reference `compute_grams` (Jin et al.'s
    code); with unequal amounts of data per model this is what RegMean merges (each model's Gram counts
    alike, whatever its N). average=False: the sum X^T X, the paper's equation taken literally, which
    weights each model by its number of rows. Conv1D layers store their weight [in, out]: their names
    are in the result's `transposed`.
    """
    layers, conv = _linear_layers(model)
    if not layers:
        raise ParameterError(f"{type(model).__name__} has no nn.Linear or Conv1D layer to gather RegMean statistics on")
    grams = {name: None for name in layers}
    rows = {name: 0 for name in layers}
    current_mask: list[torch.Tensor | None] = [None]

    def hook_for(name):
        def hook(module, args, output):
            x = args[0].detach().float()
            mask = current_mask[0]
            if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
                x = x[mask.bool()]
            x = x.reshape(-1, x.shape[-1])
            xtx = x.T @ x
            grams[name] = xtx if grams[name] is None else grams[name] + xtx
            rows[name] += x.shape[0]
        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in progress(data, desc="regmean grams"):
            inputs, _ = _split_batch(batch)
            current_mask[0] = inputs.get(mask_key)
            _call(model, inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if all(n == 0 for n in rows.values()):
        raise ParameterError("regmean_grams got no data")
    def key(name: str) -> str:  # the layer's weight name as named_parameters spells it (root module: "weight")
        return f"{name}.weight" if name else "weight"

    out = {}
    for name, m in layers.items():
        n_in = m.weight.shape[0] if name in conv else m.weight.shape[1]
        g = grams[name] if grams[name] is not None else torch.zeros(n_in, n_in)
        # the sum over all rows divided once: the reference's running mean up to rounding
        out[key(name)] = g / max(rows[name], 1) if average else g
    return RegMeanGrams(out, {key(name) for name in conv})
