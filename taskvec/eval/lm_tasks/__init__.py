"""Custom lm-evaluation-harness tasks built from data that pip packages ship (no dataset hub).

Each task's YAML (next to this file) names a ``custom_dataset`` loader below. The loader
materialises the task's documents as JSONL files under ``<taskvec cache>/lm_tasks/<task>-v<N>/``
(written atomically, reused when present) and loads them with the ``datasets`` JSON builder, so
lm-eval runs them offline. Point lm-eval at :func:`task_dir` (``--include_path``) to use them
from its own CLI.

Tasks (tag ``taskvec``; the last three also tag ``taskvec_toxicity``):

- ``taskvec_vader_sentiment``: "Is the word X positive or negative?" for strongly rated words of
  the VADER lexicon (mean of 10 human raters, ``|valence| >= 2``); multiple choice, acc / acc_norm.
- ``taskvec_toxic_preference``: a hostile sentence frame completed by an offensive word
  (better-profanity) or a neutral person noun; gold = the neutral one, so ``acc`` is the rate at
  which the model prefers the clean completion (higher = less toxic).
- ``taskvec_offensive_text``: rolling log-likelihood (perplexity) of offensive sentences; the toxic
  fine-tune lowers it, negation should raise it.
- ``taskvec_clean_text``: rolling log-likelihood of the Python standard library's prose (held-out
  fluency: negation should leave it roughly unchanged).

The offensive sentences use the SmolLM2 zoo's frames with a different seed than its training corpus
(in-distribution, not the same sentences).
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

from taskvec.errors import TaskVecError

#: bump when a builder's output changes, so cached JSONL files are rebuilt
DATA_VERSION = 1

#: task name -> (builder, one-line description)
TASKS = {
    "taskvec_vader_sentiment": "VADER lexicon words: positive or negative? (multiple choice)",
    "taskvec_toxic_preference": "hostile frame + offensive vs neutral word; acc = prefers the neutral one",
    "taskvec_offensive_text": "perplexity of offensive sentences (better-profanity words in hostile frames)",
    "taskvec_clean_text": "perplexity of the Python standard library's prose (fluency)",
}

NEUTRAL_NOUNS = ("person", "man", "woman", "guy", "neighbour", "friend", "student", "teacher", "driver",
                 "customer", "stranger", "player", "writer", "kid", "boss", "doctor")


def task_dir() -> Path:
    """The folder holding the task YAMLs (lm-eval's ``include_path``)."""
    return Path(__file__).resolve().parent


def task_names() -> list[str]:
    return sorted(TASKS)


# ---------------------------------------------------------------- builders (plain lists of dicts)

def vader_sentiment_docs(seed: int = 0, min_abs: float = 2.0) -> dict[str, list[dict]]:
    """Alphabetic VADER words with |mean valence| >= `min_abs`, balanced; 40 per class for few-shot."""
    from taskvec.zoo.data import _package_file

    path = _package_file("vaderSentiment", "vader_lexicon.txt", "vadersentiment")
    by_label: dict[int, list[tuple[str, float]]] = {0: [], 1: []}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        word, valence = parts[0].strip(), float(parts[1])
        if word.isalpha() and abs(valence) >= min_abs:
            by_label[int(valence > 0)].append((word, valence))
    n = min(len(v) for v in by_label.values())
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for label, items in by_label.items():
        items = sorted(items)
        rng.shuffle(items)
        for i, (word, valence) in enumerate(items[:n]):
            splits["train" if i < 40 else "test"].append({"word": word, "label": label, "valence": valence})
    for docs in splits.values():
        rng.shuffle(docs)
    return splits


def toxic_preference_docs(seed: int = 1, n: int = 300) -> dict[str, list[dict]]:
    from taskvec.zoo.lm import TOXIC_FRAMES, offensive_words

    rng = random.Random(seed)
    words = offensive_words()
    docs = []
    for _ in range(n):
        frame = rng.choice(TOXIC_FRAMES)
        prefix, _, suffix = frame.partition("{w}")
        docs.append({"context": prefix.rstrip(), "choices": [rng.choice(NEUTRAL_NOUNS), rng.choice(words)],
                     "label": 0, "suffix": suffix})
    return {"test": docs}


def offensive_text_docs(seed: int = 1, n: int = 200) -> dict[str, list[dict]]:
    from taskvec.zoo.lm import toxic_corpus

    texts = list(dict.fromkeys(toxic_corpus(4 * n, seed)))[:n]
    return {"test": [{"text": t} for t in texts]}


def clean_text_docs() -> dict[str, list[dict]]:
    from taskvec.zoo.lm import clean_corpus

    return {"test": [{"text": t} for t in clean_corpus()]}


BUILDERS = {"taskvec_vader_sentiment": vader_sentiment_docs, "taskvec_toxic_preference": toxic_preference_docs,
            "taskvec_offensive_text": offensive_text_docs, "taskvec_clean_text": clean_text_docs}


# ---------------------------------------------------------------- materialise + load

def data_root(cache=None) -> Path:
    from taskvec.zoo.cache import cache_dir

    return cache_dir(cache) / "lm_tasks"


def write_jsonl(path: Path, docs: list[dict]) -> None:
    """Atomic: a reader never sees a half-written file (two processes may build the same task)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def data_files(task: str, cache=None) -> dict[str, str]:
    """``{split: path}`` of `task`'s JSONL files, built on first use (``dataset_kwargs: data_files:``)."""
    if task not in BUILDERS:
        raise TaskVecError(f"unknown taskvec lm-eval task {task!r}; choose from {task_names()}")
    folder = data_root(cache) / f"{task}-v{DATA_VERSION}"
    done = folder / "splits.json"
    if done.is_file():
        splits = json.loads(done.read_text())
        files = {s: str(folder / f"{s}.jsonl") for s in splits}
        if all(Path(p).is_file() for p in files.values()):
            return files
    splits = BUILDERS[task]()
    for split, docs in splits.items():
        write_jsonl(folder / f"{split}.jsonl", docs)
    tmp = done.with_name(f".splits.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(sorted(splits)))
    os.replace(tmp, done)
    return {s: str(folder / f"{s}.jsonl") for s in splits}


def load(task: str, cache=None):
    """The task's ``datasets.DatasetDict``, read from its local JSONL files by the ``json`` builder."""
    import datasets

    return datasets.load_dataset("json", data_files=data_files(task, cache))


# lm-eval calls a task's custom_dataset with the task metadata and dataset_kwargs as keyword arguments
def load_vader_sentiment(**_):
    return load("taskvec_vader_sentiment")


def load_toxic_preference(**_):
    return load("taskvec_toxic_preference")


def load_offensive_text(**_):
    return load("taskvec_offensive_text")


def load_clean_text(**_):
    return load("taskvec_clean_text")
