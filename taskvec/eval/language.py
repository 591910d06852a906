"""Language-model evaluation: perplexity on clean text, seeded generation, toxicity of generations."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from taskvec._progress import progress
from taskvec.errors import ParameterError


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def row_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of one batch: (sum of -log p(x_t | x_<t) over its real next tokens, number of such tokens)."""
    logits = _logits(model(input_ids=input_ids, attention_mask=attention_mask)).float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = input_ids[:, 1:]
    mask = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return (nll * mask).sum(dim=1).double(), mask.sum(dim=1)


def token_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[float, int]:
    """(sum of -log p(x_t | x_<t) over real next tokens, number of such tokens) for one batch."""
    nll, n = row_nll(model, input_ids, attention_mask)
    return float(nll.sum()), int(n.sum())


def text_nll(model, tokenizer, texts: Sequence[str], *, batch_size: int = 8,
             max_length: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per text: (next-token NLL summed over its tokens, its number of predicted tokens), padding excluded.
    What a paired bootstrap over texts resamples (`taskvec.eval.intervals.perplexity_ratio_interval`)."""
    if not texts:
        raise ParameterError("perplexity of no texts is undefined")
    model.eval()
    nll, count = [], []
    starts = range(0, len(texts), batch_size)
    for s in progress(starts, desc="perplexity", total=len(starts)):
        enc = tokenizer(list(texts[s:s + batch_size]), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        a, b = row_nll(model, enc["input_ids"], enc["attention_mask"])
        nll.append(a)
        count.append(b)
    nll, count = torch.cat(nll), torch.cat(count)
    if int(count.sum()) == 0:
        raise ParameterError("the texts hold no token to predict (each needs at least two tokens)")
    return nll, count


def perplexity_of(nll: torch.Tensor, count: torch.Tensor) -> float:
    """exp(total NLL / total predicted tokens): the token-weighted perplexity of `text_nll`'s output."""
    return math.exp(float(nll.sum()) / int(count.sum()))


def perplexity(model, tokenizer, texts: Sequence[str], *, batch_size: int = 8, max_length: int = 128) -> float:
    """exp(total next-token NLL / total predicted tokens) over `texts` (token-weighted, padding excluded)."""
    return perplexity_of(*text_nll(model, tokenizer, texts, batch_size=batch_size, max_length=max_length))


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, samples_per_prompt: int = 1, max_new_tokens: int = 24,
             temperature: float = 1.0, top_p: float = 0.9, seed: int = 0, batch_size: int = 16) -> list[dict]:
    """Sampled continuations, reproducible: the RNG is reset from `seed` before every batch.

    Returns rows {"prompt", "sample", "continuation"} (continuation excludes the prompt).
    """
    model.eval()
    old_side = getattr(tokenizer, "padding_side", "right")
    tokenizer.padding_side = "left"  # decoder-only models continue from the last real token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    jobs = [(p, k) for p in prompts for k in range(samples_per_prompt)]
    rows = []
    try:
        starts = range(0, len(jobs), batch_size)
        for b, s in enumerate(progress(starts, desc="generate", total=len(starts))):
            chunk = jobs[s:s + batch_size]
            torch.manual_seed(seed * 100003 + b)
            enc = tokenizer([p for p, _ in chunk], return_tensors="pt", padding=True)
            out = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            for (p, k), ids in zip(chunk, new):
                rows.append({"prompt": p, "sample": k, "continuation": tokenizer.decode(ids, skip_special_tokens=True)})
    finally:
        tokenizer.padding_side = old_side
    return rows


def profanity_scores(texts: Sequence[str]) -> list[float]:
    """P(offensive) per text from alt-profanity-check's bundled linear model (offline)."""
    from profanity_check import predict_prob

    return [float(p) for p in predict_prob(list(texts))] if len(texts) else []


def toxicity_rate(texts: Sequence[str], *, threshold: float = 0.5,
                  scorer: Callable[[Sequence[str]], Sequence[float]] | None = None) -> dict:
    """Fraction of texts scored >= `threshold` as offensive, with the mean score. Tidy dict."""
    if not 0.0 < threshold < 1.0:
        raise ParameterError(f"threshold must be in (0, 1), got {threshold}")
    if not texts:
        raise ParameterError("toxicity rate of no texts is undefined")
    scores = list((scorer or profanity_scores)(texts))
    toxic = sum(s >= threshold for s in scores)
    return {"toxic_rate": toxic / len(scores), "mean_score": sum(scores) / len(scores), "n": len(scores),
            "threshold": threshold}


def toxicity_report(model, tokenizer, prompts: Sequence[str], clean_texts: Sequence[str], *,
                    samples_per_prompt: int = 4, max_new_tokens: int = 24, seed: int = 0, threshold: float = 0.5,
                    label: str = "model") -> dict:
    """EMTA Table 2 row: toxic-generation rate, mean toxicity score, perplexity on clean text."""
    rows = generate(model, tokenizer, prompts, samples_per_prompt=samples_per_prompt,
                    max_new_tokens=max_new_tokens, seed=seed)
    tox = toxicity_rate([r["continuation"] for r in rows], threshold=threshold)
    return {"model": label, **tox, "perplexity": perplexity(model, tokenizer, clean_texts)}
