"""Small real-format checkpoints for tests (tiny BERT / Llama configs saved with save_pretrained)."""
from __future__ import annotations

from pathlib import Path

import torch


def tiny_bert(seed: int = 0, vocab_size: int = 64):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    return BertModel(cfg).eval()


def tiny_llama(seed: int = 0, layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def perturbed(model, scale: float = 0.01, seed: int = 1):
    """A 'fine-tune': every float weight nudged by a relative amount (keeps θ_ft/θ₀ near 1)."""
    import copy

    g = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1 + scale * torch.rand(p.shape, generator=g))
    return m


def save_model(model, path: Path, **kw) -> Path:
    model.save_pretrained(path, **kw)
    return path


class OutcomeLab:
    """Mixin for fake labs whose `accuracy` is a known function of the weights: per-example outcomes that
    realise that accuracy (the first round(acc · N) of N examples correct), so code built on
    `ZooLab.correct` / `reference_correct` (intervals, paired differences) runs on the fake."""

    N_EXAMPLES = 2000
    heldout: list = []
    has_multitask = False

    @property
    def all_tasks(self):
        return list(self.tasks) + list(self.control) + [t for t in self.heldout if t not in self.control]

    def has_split(self, task, split):
        return split in ("val", "test")

    def correct(self, weights=None, *, split="test", tasks=None):
        out = {}
        for t, a in self.accuracy(weights, split=split, tasks=tasks).items():
            c = torch.zeros(self.N_EXAMPLES, dtype=torch.bool)
            c[:round(a * self.N_EXAMPLES)] = True
            out[t] = c
        return out

    def reference_correct(self, which, split="test"):
        if which == "base":
            return self.correct(None, split=split, tasks=self.all_tasks)
        out = {}
        for t in self.tasks:
            out.update(self.correct(self.finetuned(t), split=split, tasks=[t]))
        return out


def float_bits(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's raw bits as an integer view (bit-for-bit comparisons of kernels)."""
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])
