"""Evaluators a sweep can name: `"zoo"`, `"perplexity"`, `"lm_eval"`, or `"package.module:callable"`.

An evaluator is called with the merged model (a state dict, or the path of a
merged folder) and returns a dict of numbers. They are classes with
`__call__`, not closures, so they pickle and travel to worker processes;
`bind(base)` gives one the sweep's base model (the architecture template a
state dict is loaded into), `materialize` says which form it prefers.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from taskvec.errors import ParameterError


@dataclass
class ZooEvaluator:
    """Accuracy on a built zoo's tasks (each with its frozen head): `{task}_accuracy`, `mean_accuracy`,
    `mean_normalized`. `zoo` is a Zoo or a zoo name (built, or reused from the cache, in the worker)."""

    zoo: Any = "minilm-tasks"
    fast: Any = True
    tasks: Sequence[str] | None = None
    split: str = "test"
    materialize = "state_dict"

    def _zoo(self):
        if isinstance(self.zoo, str):
            from taskvec.zoo import build

            return build(self.zoo, fast=self.fast)
        return self.zoo

    def cache_key(self) -> str:
        zoo = self.zoo if isinstance(self.zoo, str) else f"{self.zoo.name}:{self.zoo.mode}:{self.zoo.root}"
        return f"zoo:{zoo}:{self.fast}:{list(self.tasks or [])}:{self.split}"

    def __call__(self, merged) -> dict[str, float]:
        from taskvec.eval.zoo_eval import task_accuracies

        table = task_accuracies(self._zoo(), merged, tasks=self.tasks, split=self.split)
        out = {f"{r.task}_accuracy": float(r.accuracy) for r in table.itertuples()}
        out["mean_accuracy"] = float(table["accuracy"].mean())
        if table["normalized"].notna().any():
            out["mean_normalized"] = float(table["normalized"].dropna().astype(float).mean())
        return out


@dataclass
class PerplexityEvaluator:
    """Perplexity of the merged causal LM on `texts` (a list, or a text file with one text a line).

    A merged state dict is loaded into the architecture of `template` (default: the sweep's base folder);
    the tokenizer comes from `tokenizer` (default: the template)."""

    texts: Any = None
    template: str | None = None
    tokenizer: str | None = None
    max_length: int = 128
    batch_size: int = 8
    materialize = "state_dict"

    def __post_init__(self):
        if self.texts is None:
            raise ParameterError("evaluate: perplexity needs texts= (a list of texts or a text file)")
        if isinstance(self.texts, (str, Path)):
            path = Path(self.texts)
            if not path.is_file():
                raise ParameterError(f"evaluate: perplexity texts: no file {str(path)!r}")
            self.texts = [t for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]
        self.texts = list(self.texts)

    def bind(self, base: Any) -> "PerplexityEvaluator":
        return self if self.template or not isinstance(base, (str, Path)) else replace(self, template=str(base))

    def __call__(self, merged) -> dict[str, float]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from taskvec.eval.language import perplexity

        if isinstance(merged, (str, Path)):
            model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
        else:
            if self.template is None:
                raise ParameterError("evaluate: perplexity of a state dict needs template= (a model folder)")
            model = AutoModelForCausalLM.from_pretrained(self.template, dtype=torch.float32)
            model.load_state_dict(merged, strict=False)
        tok = AutoTokenizer.from_pretrained(self.tokenizer or (merged if isinstance(merged, (str, Path))
                                                               else self.template))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return {"perplexity": perplexity(model.eval(), tok, self.texts, batch_size=self.batch_size,
                                         max_length=self.max_length)}


@dataclass
class LmEvalEvaluator:
    """lm-evaluation-harness scores, `{"task/metric": value}`, through
    `taskvec.eval.lm_harness.lm_eval(merged, tasks=..., **options)` (imported in the worker, when first used).
    A merged state dict is loaded into the architecture of `base` (default: the sweep's base folder)."""

    tasks: Sequence[str] = ()
    options: Mapping[str, Any] = field(default_factory=dict)

    def bind(self, base: Any) -> "LmEvalEvaluator":
        if "base" in self.options or not isinstance(base, (str, Path)):
            return self
        return replace(self, options={**self.options, "base": str(base)})

    def __call__(self, merged) -> dict[str, float]:
        try:
            harness = importlib.import_module("taskvec.eval.lm_harness")
        except ImportError as e:
            raise ParameterError(f"evaluate: lm_eval needs taskvec.eval.lm_harness and lm-eval "
                                 f"(pip install 'taskvec[harness]'): {e}") from None
        result = harness.lm_eval(merged, tasks=list(self.tasks), **dict(self.options))
        return result.flat() if hasattr(result, "flat") else dict(result)


def _lm_eval(tasks: Sequence[str] | str = (), **options) -> LmEvalEvaluator:
    if not tasks:
        raise ParameterError("evaluate: lm_eval needs tasks= (lm-eval task names)")
    return LmEvalEvaluator([tasks] if isinstance(tasks, str) else list(tasks), options)


#: name -> factory(**options) -> evaluator
EVALUATORS: dict[str, Callable[..., Callable]] = {
    "zoo": ZooEvaluator,
    "perplexity": PerplexityEvaluator,
    "lm_eval": _lm_eval,
}


def get_evaluator(evaluate: Any, **options) -> Callable:
    """An evaluator from a callable (returned as is), a registered name, or `"package.module:attr"`
    (a class, instantiated with `options`, or a function, the evaluator itself)."""
    if callable(evaluate):
        if options:
            raise ParameterError(f"evaluate: options {sorted(options)} are for a named evaluator, not a callable")
        return evaluate
    if not isinstance(evaluate, str):
        raise ParameterError(f"evaluate: expected a callable or an evaluator name, got {type(evaluate).__name__}")
    if evaluate in EVALUATORS:
        factory = EVALUATORS[evaluate]
    elif ":" in evaluate:
        module, _, attr = evaluate.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ParameterError(f"evaluate: can't import {evaluate!r}: {e}") from None
        if not isinstance(factory, type):  # a function is the evaluator itself
            return get_evaluator(factory, **options)
    else:
        raise ParameterError(f"evaluate: unknown evaluator {evaluate!r}; known: {', '.join(EVALUATORS)}, "
                             "or 'package.module:callable'")
    try:
        return factory(**options)
    except TypeError as e:
        raise ParameterError(f"evaluate: {evaluate}: {e}") from None


def bind(evaluate: Callable, base: Any) -> Callable:
    """The evaluator with the sweep's base model given to it, if it wants one."""
    return evaluate.bind(base) if hasattr(evaluate, "bind") else evaluate
