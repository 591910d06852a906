"""Evaluate a (merged) causal LM on EleutherAI's lm-evaluation-harness (``pip install 'taskvec[harness]'``).

``lm_eval(model, tasks, **kwargs)`` takes the model as an HF folder, a state dict / taskvec Source plus
``base=`` (a folder giving the architecture and tokenizer), or a loaded ``PreTrainedModel``; it wraps
``lm_eval.simple_evaluate`` and passes every other keyword through to it (``limit``, ``num_fewshot``,
``bootstrap_iters``, ``apply_chat_template``, ``gen_kwargs``, ...), and ``model_args`` through to lm-eval's
``HFLM``. taskvec's own offline tasks (``taskvec.eval.lm_tasks``) are always on the include path.

``LMEvalEvaluator(tasks, **kwargs)`` is the picklable callable a sweep needs: ``merged -> {"task/metric": value}``.

lm-eval is imported only when an evaluation runs, so ``import taskvec.eval`` stays light.
"""
from __future__ import annotations

import importlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from taskvec.errors import CheckpointError, KeyMismatchError, ParameterError, ShapeMismatchError, TaskVecError

HARNESS_EXTRA = "taskvec[harness]"


class HarnessNotInstalledError(TaskVecError, ImportError):
    """lm-evaluation-harness is missing (the optional extra ``taskvec[harness]``)."""


def _import_lm_eval():
    try:
        lm_eval = importlib.import_module("lm_eval")
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise HarnessNotInstalledError(
            f"taskvec.eval.lm_eval needs lm-evaluation-harness: pip install '{HARNESS_EXTRA}' "
            f"(or pip install 'lm-eval>=0.4,<0.5'); import failed: {e}") from e
    return lm_eval, HFLM, TaskManager


# ---------------------------------------------------------------- results

@dataclass
class LMEvalResult:
    """lm-eval's numbers as a tidy table (task, metric, value, stderr, n) plus its raw results dict.

    ``flat()`` gives ``{"task/metric": value}`` for sweeps; ``samples`` holds per-document records when the
    run had ``log_samples=True``."""

    table: Any  # pandas.DataFrame
    raw: dict = field(repr=False)
    seconds: float = 0.0

    @property
    def samples(self) -> dict | None:
        return self.raw.get("samples")

    def flat(self) -> dict[str, float]:
        return {f"{r.task}/{r.metric}": float(r.value) for r in self.table.itertuples()}

    def value(self, task: str, metric: str) -> float:
        """One number; a clear error naming what the run has when `task`/`metric` is absent."""
        key = f"{task}/{metric}"
        flat = self.flat()
        if key not in flat:
            raise KeyError(f"no {key!r} in this lm-eval result; it has {sorted(flat)}")
        return flat[key]

    def __repr__(self) -> str:
        return f"LMEvalResult ({self.seconds:.1f} s)\n{self.table.to_string(index=False)}"

    def _repr_html_(self) -> str:
        return f"<b>LMEvalResult</b> ({self.seconds:.1f} s){self.table.to_html(index=False)}"


def _number(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):  # lm-eval writes "N/A" when it has no stderr
        return math.nan


def tidy(raw: dict):
    """lm-eval's ``results`` section -> DataFrame(task, metric, value, stderr, n).

    lm-eval keys metrics ``"<metric>,<filter>"``; the filter is dropped when it is ``none`` (the default)."""
    import pandas as pd

    rows = []
    n_samples = raw.get("n-samples", {})
    for task, metrics in raw.get("results", {}).items():
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or "_stderr," in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric},{filt}"
            stderr = metrics.get(f"{metric}_stderr,{filt}") if filt else metrics.get(f"{metric}_stderr")
            rows.append({"task": task, "metric": name, "value": float(value), "stderr": _number(stderr),
                         "n": n_samples.get(task, {}).get("effective")})
    return pd.DataFrame(rows, columns=["task", "metric", "value", "stderr", "n"])


# ---------------------------------------------------------------- model loading

def _causal_lm(folder: Path, dtype):
    from transformers import AutoModelForCausalLM

    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: not an HF model folder (no config.json)")
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)


def _tokenizer(source, folder: Path | None):
    from transformers import AutoTokenizer

    if source is not None and not isinstance(source, (str, Path)):
        return source  # a tokenizer object
    path = Path(source) if source is not None else folder
    if path is None:
        raise ParameterError("lm_eval needs a tokenizer: pass tokenizer= (a folder or tokenizer object) or base=")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: no tokenizer could be loaded from it ({e}); pass tokenizer=") from e


def _load_state(model: torch.nn.Module, weights) -> None:
    """Copy a state dict / Source into `model` (in place), checking keys and shapes; a tensor tied to another
    (lm_head.weight = embed_tokens.weight) may be absent, as in safetensors files of tied models."""
    from taskvec.eval.classification import _as_state_dict

    state = _as_state_dict(weights)
    expected = model.state_dict()
    present = {expected[k].data_ptr() for k in expected if k in state}
    missing = [k for k in expected if k not in state and expected[k].is_floating_point()
               and expected[k].data_ptr() not in present]
    if missing:
        raise KeyMismatchError(f"state dict lacks {len(missing)} tensor(s) of the base model, e.g. {missing[:3]}")
    extra = [k for k in state if k not in expected]
    if extra:
        raise KeyMismatchError(f"state dict has {len(extra)} tensor(s) the base model lacks, e.g. {extra[:3]}")
    with torch.no_grad():
        for k, v in state.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise ShapeMismatchError(f"tensor {k!r}: shape {tuple(v.shape)} vs base model {tuple(expected[k].shape)}")
            expected[k].copy_(v.to(expected[k].dtype))


def load_model(model, *, base=None, tokenizer=None, dtype=torch.float32):
    """(causal LM module, tokenizer) from a folder, a state dict / Source (+ ``base`` folder) or a module."""
    if isinstance(model, (str, Path)):
        folder = Path(model)
        if not folder.is_dir():
            raise CheckpointError(f"model={folder}: no such model folder")
        module = _causal_lm(folder, dtype)
        has_tok = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
        # a merged folder normally carries its tokenizer; a bare one borrows base='s
        tok = _tokenizer(tokenizer, folder if has_tok or base is None else Path(base))
    elif isinstance(model, torch.nn.Module):
        module = model
        tok = _tokenizer(tokenizer, Path(base) if base is not None else None)
    else:
        if base is None:
            raise ParameterError("model given as a state dict needs base= (an HF folder with the same architecture "
                                 "and the tokenizer)")
        folder = Path(base)
        if not folder.is_dir():
            raise CheckpointError(f"base={folder}: no such model folder")
        module = _causal_lm(folder, dtype)
        _load_state(module, model)
        tok = _tokenizer(tokenizer, folder)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return module.eval(), tok


# ---------------------------------------------------------------- evaluation

_TASK_MANAGERS: dict = {}


def task_manager(include_path=None, include_defaults: bool = True):
    """A (cached) lm-eval TaskManager whose include path holds taskvec's offline tasks and `include_path`.

    Indexing lm-eval's ~15k built-in tasks takes ~15 s; ``include_defaults=False`` skips it."""
    _, _, TaskManager = _import_lm_eval()
    from taskvec.eval.lm_tasks import task_dir

    extra = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    for p in extra:
        if not Path(p).exists():
            raise ParameterError(f"include_path={p}: no such folder or file")
    paths = tuple(str(p) for p in [task_dir(), *extra])
    key = (paths, bool(include_defaults))
    if key not in _TASK_MANAGERS:
        _TASK_MANAGERS[key] = TaskManager(include_path=list(paths), include_defaults=include_defaults)
    return _TASK_MANAGERS[key]


def _task_list(tasks) -> list:
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(tasks or [])
    if not tasks:
        raise ParameterError("tasks= is empty: name at least one lm-eval task (e.g. 'taskvec_vader_sentiment')")
    return tasks


def lm_eval(model, tasks, *, base=None, tokenizer=None, limit: int | float | None = None,
            num_fewshot: int | None = None, batch_size: int | str = 8, device: str | None = None,
            dtype=torch.float32, include_path=None, include_defaults: bool | None = None,
            log_samples: bool = False, bootstrap_iters: int = 1000, model_args: dict | None = None,
            **kwargs) -> LMEvalResult:
    """Run lm-evaluation-harness `tasks` on `model` and return an :class:`LMEvalResult`.

    model: an HF model folder (with its tokenizer), a state dict or taskvec Source (then ``base=`` names the
    folder giving architecture and tokenizer), or a loaded ``PreTrainedModel`` (then ``tokenizer=`` or
    ``base=``). tasks: names (or a comma-separated string), lm-eval task dicts, or tags; taskvec's offline
    tasks are ``taskvec.eval.lm_tasks.task_names()`` (tag ``taskvec``).
    include_path: extra folder(s) of task YAMLs. include_defaults: also index lm-eval's built-in tasks (slow,
    ~15 s); by default only when a requested task is not one of taskvec's own.
    device: default the model's own device. model_args: passed to lm-eval's ``HFLM`` (e.g. ``max_length``,
    ``add_bos_token``). Every other keyword goes to ``lm_eval.simple_evaluate`` unchanged (``gen_kwargs``,
    ``apply_chat_template``, ``random_seed``, ``samples``, ...). ``bootstrap_iters`` defaults to 1000 (lm-eval:
    100000) to keep stderr cheap on CPU; 0 skips stderrs.
    """
    lm_eval_mod, HFLM, _ = _import_lm_eval()
    from taskvec.eval.lm_tasks import task_names

    started = time.time()
    task_list = _task_list(tasks)
    if include_defaults is None:
        own = set(task_names()) | {"taskvec", "taskvec_toxicity"}
        include_defaults = not (include_path is None and all(isinstance(t, str) and t in own for t in task_list))
    manager = task_manager(include_path, include_defaults)
    names = [t for t in task_list if isinstance(t, str)]
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        hint = "" if include_defaults else " (lm-eval's built-in tasks were not indexed: include_defaults=False)"
        raise ParameterError(f"unknown lm-eval task(s) {unknown}{hint}; taskvec's offline tasks: {task_names()} "
                             f"(tags 'taskvec', 'taskvec_toxicity'); add your own YAMLs with include_path=")

    module, tok = load_model(model, base=base, tokenizer=tokenizer, dtype=dtype)
    if device is not None:
        module = module.to(device)
    lm = HFLM(pretrained=module, tokenizer=tok, batch_size=batch_size, **(model_args or {}))
    raw = lm_eval_mod.simple_evaluate(model=lm, tasks=task_list, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=log_samples,
                                      bootstrap_iters=bootstrap_iters, **kwargs)
    if raw is None:  # a non-zero rank under a distributed launcher
        raise TaskVecError("lm-eval returned no results (not rank 0 of a distributed run?)")
    raw = dict(raw)
    return LMEvalResult(tidy(raw), raw, time.time() - started)


class LMEvalEvaluator:
    """``LMEvalEvaluator(tasks, **kwargs)(merged) -> {"task/metric": value}``: lm_eval as a sweep callback.

    Holds only the task list and keyword arguments (picklable: sweeps may run it in worker processes);
    ``merged`` is whatever :func:`lm_eval` accepts (a state dict needs ``base=`` among the kwargs)."""

    def __init__(self, tasks, **kwargs):
        self.tasks = _task_list(tasks)
        self.kwargs = kwargs

    def __call__(self, merged) -> dict[str, float]:
        return lm_eval(merged, self.tasks, **self.kwargs).flat()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"LMEvalEvaluator({self.tasks!r}{', ' if args else ''}{args})"


# ---------------------------------------------------------------- the SmolLM2 toxicity zoo

TOXICITY_TASKS = ("taskvec_toxic_preference", "taskvec_offensive_text", "taskvec_clean_text")


def toxicity_zoo_eval(zoo=None, *, scaling: float = 1.0, tasks: Sequence[str] = TOXICITY_TASKS,
                      limit: int | float | None = 40, **kwargs):
    """The SmolLM2 toxicity zoo through lm-eval: base, toxic fine-tune and negation θ₀ − λ·τ_toxic.

    zoo: a built ``smollm2-toxic`` zoo (default: ``taskvec.zoo.build("smollm2-toxic", fast=True)``).
    Returns a DataFrame (model, task, metric, value, stderr, n, seconds); `kwargs` go to :func:`lm_eval`.

    Measured on the fast zoo (limit=40, λ=1, CPU; 2 shared cores: ~3 min per model): bits per byte of
    offensive text base 2.53, toxic 1.83, negated 3.47; of clean stdlib prose 1.293, 1.305, 1.315 (+1.7 %);
    toxic-preference acc_norm 0.80, 0.75, 0.85 (acc is near its ceiling: 0.975, 0.95, 0.975)."""
    import pandas as pd

    if zoo is None:
        from taskvec.zoo import build

        zoo = build("smollm2-toxic", fast=True)
    if zoo.kind != "lm":
        raise ParameterError(f"zoo {zoo.name!r} is not the language-model zoo (smollm2-toxic)")
    negated = zoo.task_vector("toxic").apply_to(zoo.base, scaling=-scaling, show_progress=False)
    frames = []
    for label, weights in (("base", zoo.base), ("toxic", zoo.models["toxic"]), (f"negated (λ={scaling:g})", negated)):
        res = lm_eval(weights, list(tasks), base=zoo.base, limit=limit, **kwargs)
        frames.append(res.table.assign(model=label, seconds=round(res.seconds, 1)))
    table = pd.concat(frames, ignore_index=True)
    return table[["model", "task", "metric", "value", "stderr", "n", "seconds"]]
