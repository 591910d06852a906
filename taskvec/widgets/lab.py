"""`ZooLab`: an encoder zoo held in memory for interactive work.

The notebooks and `taskvec demo` move sliders over λ, density, drop rate and t,
and each move needs a model evaluated in seconds. ZooLab keeps the base weights,
each task's fine-tuned weights and frozen head in memory, builds weights with
the library's own functions (`TaskVector` algebra, `taskvec.merging.merge`) and
scores them with `taskvec.eval` on a fixed, seeded, class-stratified subset of
each split (``limit`` examples per task; ``None`` = the whole split, which gives
the zoo manifest's numbers).

Every accuracy comes from per-example outcomes (`correct`), so each number can
carry a 95 % interval and two models compared on the same examples get a
paired-bootstrap interval of their difference (`taskvec.eval.intervals`).
"""
from __future__ import annotations

import functools
from typing import Mapping, Sequence

import torch

from taskvec.errors import ParameterError


def _save_atomic(obj, path) -> None:
    """torch.save into a temporary file beside `path`, renamed into place (readers never see half a file)."""
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _subset(n: int, limit: int | None, seed: int) -> list[int]:
    if limit is None or limit >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:limit].tolist())


class ZooLab:
    """Base, fine-tuned weights and heads of an encoder zoo in memory; fast accuracy on split subsets."""

    def __init__(self, zoo, *, limit: int | None = None, val_limit: int | None = None, seed: int = 0):
        if zoo.kind != "encoder":
            raise ParameterError(f"ZooLab needs an encoder zoo (accuracy per task); {zoo.name!r} is a {zoo.kind} zoo")
        self.zoo = zoo
        self.limit = limit  # examples per task on the test split; None = all
        self.val_limit = limit if val_limit is None else val_limit  # on the validation split (λ / k choice)
        self.seed = seed
        self.tasks: list[str] = list(zoo.tasks)
        self.control: list[str] = list(zoo.control_tasks)
        # never fine-tuned, never merged: out-of-distribution tasks for merged models (zero-shot heads)
        self.heldout: list[str] = list(getattr(zoo, "heldout_tasks", []))
        self.model = zoo.load("base")  # the working module: weights are loaded into it for each evaluation
        self.base: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.tokenizer = zoo.tokenizer()
        self.max_length = zoo.manifest.get("recipe", {}).get("max_length", 48)
        self._ft: dict[str, dict[str, torch.Tensor]] = {}
        self._heads = {t: zoo.head(t) for t in self.all_tasks}
        self._data = {t: zoo.task_data(t) for t in self.all_tasks}

    @property
    def all_tasks(self) -> list[str]:
        """Fine-tuned tasks, then the control, then the held-out tasks."""
        return self.tasks + self.control + [t for t in self.heldout if t not in self.control]

    def has_split(self, task: str, split: str) -> bool:
        return split in self._data[task].splits

    def __repr__(self):
        return (f"ZooLab({self.zoo.name!r}, mode={self.zoo.mode!r}, tasks={self.tasks}, control={self.control}, "
                f"heldout={self.heldout}, limit={self.limit}, val_limit={self.val_limit})")

    # ------------------------------------------------------------ weights
    def finetuned(self, task: str) -> dict[str, torch.Tensor]:
        """Task `task`'s fine-tuned state dict (cached)."""
        if task not in self.tasks:
            raise ParameterError(f"no fine-tuned model for task {task!r}; tasks: {self.tasks}")
        if task not in self._ft:
            from taskvec.io import open_source

            src = open_source(str(self.zoo.models[task]))
            self._ft[task] = {k: src.get(k).clone() for k in src.keys()}
        return self._ft[task]

    @functools.lru_cache(maxsize=None)
    def task_vector(self, task: str):
        """τ_task = θ_task − θ_base as a (lazy) `TaskVector` over the in-memory weights."""
        from taskvec.vector import TaskVector

        return TaskVector.from_models(self.base, self.finetuned(task))

    def task_vectors(self, tasks: Sequence[str] | None = None) -> dict:
        return {t: self.task_vector(t) for t in (tasks or self.tasks)}

    def apply(self, coefficients: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """θ₀ + Σ_i λ_i τ_i (task arithmetic; a negative λ negates)."""
        if not coefficients:
            return dict(self.base)
        tv = sum(float(lam) * self.task_vector(t) for t, lam in coefficients.items())
        return tv.apply_to(self.base, show_progress=False)

    def merge(self, method: str, tasks: Sequence[str] | None = None, **params) -> dict[str, torch.Tensor]:
        """`taskvec.merging.merge(θ₀, [θ_task ...], method, **params)` on the in-memory weights."""
        from taskvec.merging import merge

        return merge(self.base, [self.finetuned(t) for t in (tasks or self.tasks)], method=method, progress=False,
                     **params)

    # ------------------------------------------------------------ evaluation
    def _examples(self, task: str, split: str):
        data = self._data[task]
        texts, labels = data.texts(split), data.targets(split)
        # limit: test; val_limit: validation; other splits (the distribution-shifted "shift" test set, which only
        # one task has) are used whole: they are small, and the shift effect needs their precision
        limit = {"val": self.val_limit, "test": self.limit}.get(split)
        keep = _subset(len(texts), limit, self.seed)
        return [texts[i] for i in keep], [labels[i] for i in keep]

    def labels(self, task: str, split: str = "test") -> list[int]:
        return self._examples(task, split)[1]

    @torch.no_grad()
    def correct(self, weights: Mapping[str, torch.Tensor] | None = None, *, split: str = "test",
                tasks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """{task: bool tensor, one entry per evaluated example} of `weights` (None = the base), each task with
        its own frozen head. Tasks without `split` (e.g. "shift", which only some tasks have) are skipped.

        Outcomes are cached by a fingerprint of the weights (SHA-256 of every tensor's bytes), in memory and in
        the zoo's ``eval-cache/``: a merge that another cell, notebook or the demo already scored on the same
        examples is not evaluated again (``TASKVEC_EVAL_CACHE=0`` turns the disk cache off)."""
        from taskvec.eval.classification import predict

        state = self.base if weights is None else weights
        wanted = []
        for task in (tasks or self.tasks + self.control):
            if task not in self._data:
                raise ParameterError(f"unknown task {task!r}; tasks: {self.all_tasks}")
            if self.has_split(task, split):
                wanted.append(task)
        fingerprint = self._fingerprint(state)
        keys = {t: self._outcome_key(fingerprint, t, split) for t in wanted}
        out = {t: self._cached_outcome(keys[t], t, split) for t in wanted}
        todo = [t for t in wanted if out[t] is None]
        if todo:
            self._load(state)
            for task in todo:
                texts, labels = self._examples(task, split)
                pred = predict(self.model, self._heads[task], self.tokenizer, texts, max_length=self.max_length)
                out[task] = pred == torch.tensor(labels)
                self._store_outcome(keys[task], out[task])
        return out

    @torch.no_grad()
    def predictions(self, weights: Mapping[str, torch.Tensor] | None = None, *, split: str = "test",
                    tasks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """{task: predicted class per evaluated example} of `weights` (None = the base), on the same examples,
        in the same order, as `correct` (what comparing two models' predictions needs, e.g. the weight
        disentanglement error). Kept in memory under `correct`'s keys; each evaluation also stores its
        outcomes (prediction == label) in `correct`'s cache, so the model is not scored again there."""
        from taskvec.eval.classification import predict

        state = self.base if weights is None else weights
        names = list(tasks or self.tasks + self.control)
        unknown = [t for t in names if t not in self._data]
        if unknown:
            raise ParameterError(f"unknown task {unknown[0]!r}; tasks: {self.all_tasks}")
        wanted = [t for t in names if self.has_split(t, split)]
        fingerprint = self._fingerprint(state)
        keys = {t: self._outcome_key(fingerprint, t, split) for t in wanted}
        memory = self.__dict__.setdefault("_predictions", {})
        todo = [t for t in wanted if keys[t] not in memory]
        if todo:
            self._load(state)
            for task in todo:
                texts, labels = self._examples(task, split)
                pred = predict(self.model, self._heads[task], self.tokenizer, texts, max_length=self.max_length)
                memory[keys[task]] = pred
                if self._cached_outcome(keys[task], task, split) is None:
                    self._store_outcome(keys[task], pred == torch.tensor(labels))
        return {t: memory[keys[t]] for t in wanted}

    def _load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load `state` into the working module; every float tensor of the model must be there."""
        missing = self.model.load_state_dict(state, strict=False).missing_keys
        missing = [k for k in missing if self.base[k].is_floating_point()]
        if missing:
            raise ParameterError(f"weights lack {len(missing)} float tensor(s) of the model, e.g. {missing[:3]}")

    # ------------------------------------------------------------ outcome cache
    def _fingerprint(self, state: Mapping[str, torch.Tensor]) -> str:
        """SHA-256 of the weights' names, dtypes, shapes and bytes; a tensor equal to the base's (e.g. the frozen
        word embeddings, half of MiniLM) is hashed as "= base" after an exact comparison, which costs less."""
        import hashlib

        if state is self.base and getattr(self, "_base_fingerprint", None):
            return self._base_fingerprint
        h = hashlib.sha256()  # hardware-accelerated on most CPUs: about twice BLAKE2b's speed here
        for key in sorted(state):
            t = state[key]
            if not isinstance(t, torch.Tensor):
                raise ParameterError(f"weights[{key!r}] is a {type(t).__name__}, not a tensor")
            t = t.detach().to("cpu")
            h.update(f"{key}\x00{t.dtype}\x00{tuple(t.shape)}\x00".encode())
            ref = self.base.get(key)
            if state is not self.base and ref is not None and ref.dtype == t.dtype and ref.shape == t.shape \
                    and (t is ref or torch.equal(t, ref)):
                h.update(b"= base")
            else:
                h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
        digest = h.hexdigest()
        if state is self.base:
            self._base_fingerprint = digest
        return digest

    def _outcome_key(self, fingerprint: str, task: str, split: str) -> str:
        import hashlib
        import json

        limit = {"val": self.val_limit, "test": self.limit}.get(split)
        # the base too: tensors equal to it are fingerprinted as "= base", and it supplies the non-float buffers
        deps = self._file_deps(["base", f"heads/{task}", f"data/{task}"])
        if deps is None:  # a zoo without cache entries (the head or data file unknown): memory only
            return f"mem-{fingerprint}-{task}-{split}-{limit}-{self.seed}"
        key = json.dumps({"weights": fingerprint, "task": task, "split": split, "limit": limit, "seed": self.seed,
                          "max_length": self.max_length, "deps": deps}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:32]

    def _outcome_path(self, key: str):
        import os

        if key.startswith("mem-") or os.environ.get("TASKVEC_EVAL_CACHE", "1") in ("0", ""):
            return None
        return self.zoo.root / "eval-cache" / "outcomes" / f"{key}.pt"

    def _cached_outcome(self, key: str, task: str, split: str) -> torch.Tensor | None:
        memory = self.__dict__.setdefault("_outcomes", {})
        if key in memory:
            return memory[key]
        path = self._outcome_path(key)
        if path is not None and path.is_file():
            try:
                cached = torch.load(path, weights_only=True)
            except Exception:  # unreadable (e.g. truncated): evaluate again and overwrite it
                cached = None
            if isinstance(cached, torch.Tensor) and cached.dtype == torch.bool and \
                    len(cached) == len(self._examples(task, split)[1]):
                memory[key] = cached
                return cached
        return None

    def _store_outcome(self, key: str, outcome: torch.Tensor) -> None:
        self.__dict__.setdefault("_outcomes", {})[key] = outcome
        path = self._outcome_path(key)
        if path is not None:
            _save_atomic(outcome, path)

    def accuracy(self, weights: Mapping[str, torch.Tensor] | None = None, *, split: str = "test",
                 tasks: Sequence[str] | None = None) -> dict[str, float]:
        """{task: accuracy} of `weights` (None = the base) with each task's frozen head."""
        return {t: float(c.float().mean()) for t, c in self.correct(weights, split=split, tasks=tasks).items()}

    @functools.lru_cache(maxsize=None)
    def reference_correct(self, which: str, split: str = "test") -> dict[str, torch.Tensor]:
        """Per-example outcomes of a reference model (cached): ``"base"`` on every task, ``"finetuned"``
        (each task's own fine-tune on its task), ``"multitask"`` (the jointly fine-tuned model, when the zoo has one).

        Also cached on disk in the zoo folder, keyed by everything they depend on (weight hashes, head and data
        files, evaluation subset), so notebooks opened one after another evaluate the references once."""
        if which not in ("base", "finetuned", "multitask"):
            raise ParameterError(f"reference must be 'base', 'finetuned' or 'multitask', got {which!r}")
        path = self._reference_cache_path(which, split)
        if path is not None and path.is_file():
            try:
                cached = torch.load(path, weights_only=True)
                if isinstance(cached, dict) and all(isinstance(v, torch.Tensor) for v in cached.values()):
                    return cached
            except Exception:  # unreadable (e.g. a truncated file): evaluate again and overwrite it
                pass
        if which == "base":
            out = self.correct(None, split=split, tasks=self.all_tasks)
        elif which == "finetuned":
            out = {}
            for t in self.tasks:
                out.update(self.correct(self.finetuned(t), split=split, tasks=[t]))
        else:
            out = self.correct(self.multitask(), split=split, tasks=self.all_tasks)
        if path is not None:
            _save_atomic(out, path)
        return out

    def _file_deps(self, keys: Sequence[str]) -> dict | None:
        """{entry: (weights hash, file hashes)} of zoo cache entries, from the manifest (None if any is absent)."""
        entries = self.zoo.manifest.get("entries") or {}
        try:
            return {k: (entries[k].get("weights_hash"), entries[k]["files"]) for k in keys}
        except KeyError:
            return None

    def _reference_cache_path(self, which: str, split: str):
        import hashlib
        import json

        keys = ["base"] + [f"heads/{t}" for t in self.all_tasks] + [f"data/{t}" for t in self.all_tasks]
        keys += {"finetuned": [f"models/{t}" for t in self.tasks], "multitask": ["models/multitask"]}.get(which, [])
        deps = self._file_deps(keys)
        if deps is None:
            return None
        limit = {"val": self.val_limit, "test": self.limit}.get(split)
        key = json.dumps({"which": which, "split": split, "limit": limit, "seed": self.seed,
                          "max_length": self.max_length, "deps": deps}, sort_keys=True)
        return self.zoo.root / "eval-cache" / f"{which}-{split}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"

    def _reference(self, which: str, split: str) -> dict[str, float]:
        return {t: float(c.float().mean()) for t, c in self.reference_correct(which, split).items()}

    @property
    def has_multitask(self) -> bool:
        return getattr(self.zoo, "multitask_path", None) is not None

    def multitask(self) -> dict[str, torch.Tensor]:
        """The multi-task model (fine-tuned jointly on every task; the in-domain upper reference)."""
        if not self.has_multitask:
            raise ParameterError(f"zoo {self.zoo.name!r} ({self.zoo.mode}) has no multi-task model")
        if "__multitask__" not in self._ft:
            from taskvec.io import open_source

            src = open_source(str(self.zoo.multitask_path))
            self._ft["__multitask__"] = {k: src.get(k).clone() for k in src.keys()}
        return self._ft["__multitask__"]

    def base_accuracy(self, split: str = "test") -> dict[str, float]:
        """Accuracy of the base encoder with each task's frozen head (EMTA's zero-shot)."""
        return dict(self._reference("base", split))

    def finetuned_accuracy(self, split: str = "test") -> dict[str, float]:
        """Each fine-tuned model on its own task (the normaliser of TIES' normalised accuracy)."""
        return dict(self._reference("finetuned", split))

    def normalized(self, acc: Mapping[str, float], split: str = "test") -> dict[str, float]:
        """accuracy / fine-tuned accuracy, per fine-tuned task."""
        ft = self.finetuned_accuracy(split)
        return {t: acc[t] / ft[t] for t in acc if t in ft and ft[t]}

    def table(self, rows: Mapping[str, Mapping[str, torch.Tensor] | None], *, split: str = "test"):
        """Tidy DataFrame: one row per (model label, task) with accuracy and normalised accuracy."""
        import pandas as pd

        ft = self.finetuned_accuracy(split)
        base = self.base_accuracy(split)
        records = []
        for label, weights in rows.items():
            for task, acc in self.accuracy(weights, split=split).items():
                records.append({"model": label, "task": task, "accuracy": acc, "base_accuracy": base[task],
                                "finetuned_accuracy": ft.get(task),
                                "normalized": acc / ft[task] if ft.get(task) else None,
                                "control": task in self.control})
        return pd.DataFrame(records)
