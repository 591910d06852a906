"""Real labelled text that pip packages ship, turned into classification tasks.

Every task is built from data installed with a package (no hub, no download at
run time), deterministically: the same package versions and seed give the same
splits. Each `TaskData` records where its text came from so the zoo manifest
can say so.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import json
import pkgutil
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from taskvec.errors import ParameterError, TaskVecError


@dataclass
class TaskData:
    """One classification task: label names and train/val/test splits of (text, label id)."""

    name: str
    labels: list[str]
    splits: dict[str, list[tuple[str, int]]]
    source: str  # human-readable provenance: package, version, file
    description: str
    control: bool = False  # probe-only task that measures what negation must preserve

    def texts(self, split: str) -> list[str]:
        return [t for t, _ in self._split(split)]

    def targets(self, split: str) -> list[int]:
        return [y for _, y in self._split(split)]

    def _split(self, split: str):
        if split not in self.splits:
            raise ParameterError(f"task {self.name!r} has no split {split!r}; choose from {sorted(self.splits)}")
        return self.splits[split]

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.splits.items()}

    def to_json(self) -> dict:
        return {"name": self.name, "labels": self.labels, "source": self.source, "description": self.description,
                "control": self.control, "splits": {k: [[t, y] for t, y in v] for k, v in self.splits.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "TaskData":
        return cls(name=d["name"], labels=list(d["labels"]), source=d["source"], description=d["description"],
                   control=bool(d.get("control", False)),
                   splits={k: [(str(t), int(y)) for t, y in v] for k, v in d["splits"].items()})

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def __repr__(self):
        return (f"TaskData({self.name!r}, labels={self.labels}, sizes={self.sizes()}, "
                f"control={self.control}, source={self.source!r})")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _package_file(module: str, filename: str, dist: str) -> Path:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise TaskVecError(f"the zoo needs the package {dist!r} for its data file {filename!r}: "
                           f"pip install {dist}") from e
    path = Path(mod.__file__).parent / filename
    if not path.is_file():
        raise TaskVecError(f"package {dist!r} ships no {filename!r} at {path}")
    return path


SPLITS = ("probe", "train", "val", "test")


def split_balanced(by_label: dict[int, list[str]], seed: int, per_class: int | None,
                   fractions=(0.15, 0.45, 0.2, 0.2)) -> dict[str, list[tuple[str, int]]]:
    """Shuffle each class with `seed`, cap it at `per_class`, cut probe/train/val/test per class (stratified).

    The "probe" split fits the frozen head (the task's zero-shot head); fine-tuning sees only "train",
    so the head has not already memorised what the encoder is trained on.
    """
    rng = random.Random(seed)
    splits: dict[str, list[tuple[str, int]]] = {name: [] for name in SPLITS}
    for label in sorted(by_label):
        items = sorted(set(by_label[label]))
        rng.shuffle(items)
        if per_class is not None:
            items = items[:per_class]
        cuts = [0]
        for frac in fractions[:-1]:
            cuts.append(cuts[-1] + int(len(items) * frac))
        cuts.append(len(items))
        for name, lo, hi in zip(SPLITS, cuts[:-1], cuts[1:]):
            splits[name] += [(t, label) for t in items[lo:hi]]
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


# ---------------------------------------------------------------- the tasks

def sentiment(seed: int = 0, per_class: int | None = 1500) -> TaskData:
    """VADER lexicon: words/emoticons with the mean valence of 10 human raters; |valence| >= 1 -> pos/neg."""
    path = _package_file("vaderSentiment", "vader_lexicon.txt", "vadersentiment")
    by_label: dict[int, list[str]] = {0: [], 1: []}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        token, valence = parts[0].strip(), float(parts[1])
        if abs(valence) >= 1.0 and token:
            by_label[int(valence > 0)].append(token)
    return TaskData("sentiment", ["negative", "positive"], split_balanced(by_label, seed, per_class),
                    source=f"vadersentiment {_version('vadersentiment')}: vader_lexicon.txt (mean of 10 raters, |v|>=1)",
                    description="polarity of a word or emoticon rated by humans")


LANGUAGES = ("en", "fr", "de", "es")


def language(seed: int = 0, per_class: int | None = 1500, languages=LANGUAGES) -> TaskData:
    """wordfreq top-word lists; a word that is frequent in two of the languages is dropped (ambiguous)."""
    try:
        from wordfreq import top_n_list
    except ImportError as e:
        raise TaskVecError("the zoo's language task needs the package 'wordfreq': pip install wordfreq") from e
    lists = {lang: [w for w in top_n_list(lang, 6000)[100:] if w.isalpha() and len(w) >= 3] for lang in languages}
    seen: dict[str, int] = {}
    for words in lists.values():
        for w in set(words):
            seen[w] = seen.get(w, 0) + 1
    by_label = {i: [w for w in lists[lang] if seen[w] == 1] for i, lang in enumerate(languages)}
    return TaskData("language", list(languages), split_balanced(by_label, seed, per_class),
                    source=f"wordfreq {_version('wordfreq')}: top_n_list ranks 100-6000, words unique to one language",
                    description="language of a frequent word")


def offensive(seed: int = 0, per_class: int | None = 900) -> TaskData:
    """better-profanity's offensive word list vs ordinary English words (wordfreq) not on that list."""
    path = _package_file("better_profanity", "profanity_wordlist.txt", "better-profanity")
    bad = {w.strip().lower() for w in path.read_text(encoding="utf-8").splitlines() if w.strip()}
    try:
        from wordfreq import top_n_list
    except ImportError as e:
        raise TaskVecError("the zoo's offensive task needs the package 'wordfreq': pip install wordfreq") from e
    clean = [w for w in top_n_list("en", 8000)[200:] if w.isalpha() and len(w) >= 3 and w not in bad
             and not any(b in w for b in bad if len(b) >= 4)]
    return TaskData("offensive", ["clean", "offensive"], split_balanced({0: clean, 1: sorted(bad)}, seed, per_class),
                    source=(f"better-profanity {_version('better-profanity')}: profanity_wordlist.txt vs "
                            f"wordfreq {_version('wordfreq')} English top words (not containing a listed word)"),
                    description="offensive word or ordinary word")


PYDOC_PACKAGES = ("asyncio", "email", "logging", "multiprocessing", "unittest")


def _docstrings(package: str) -> list[str]:
    """First paragraph of every docstring of a function/class/method defined in `package` (one level deep)."""
    root = importlib.import_module(package)
    modules = [root]
    for info in pkgutil.iter_modules(getattr(root, "__path__", []), package + "."):
        leaf = info.name.rsplit(".", 1)[-1]
        if leaf.startswith("test") or leaf == "__main__":
            continue
        try:
            modules.append(importlib.import_module(info.name))
        except Exception:  # platform-specific submodules (e.g. Windows-only) are skipped
            continue
    docs: set[str] = set()

    def add(obj):
        doc = inspect.getdoc(obj)
        if doc:
            first = " ".join(doc.split("\n\n")[0].split())
            if len(first) >= 12:
                docs.add(first[:300])

    for mod in modules:
        for obj in vars(mod).values():
            if getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isfunction(obj):
                add(obj)
            elif inspect.isclass(obj):
                add(obj)
                for member in vars(obj).values():
                    # only the package's own methods: other libraries patch classes (transformers adds
                    # Logger.warning_advice), which would make the data depend on what was imported
                    if inspect.isfunction(member) and member.__module__ == mod.__name__:
                        add(member)
    return sorted(docs)


def pydoc(seed: int = 0, per_class: int | None = 250, packages=PYDOC_PACKAGES) -> TaskData:
    """Python standard-library docstrings labelled by the package they document."""
    import sys

    docs = {i: _docstrings(p) for i, p in enumerate(packages)}
    # a docstring shared by two packages (e.g. inherited boilerplate) is ambiguous: drop it
    count: dict[str, int] = {}
    for ds in docs.values():
        for d in ds:
            count[d] = count.get(d, 0) + 1
    by_label = {i: [d for d in ds if count[d] == 1] for i, ds in docs.items()}
    return TaskData("pydoc", list(packages), split_balanced(by_label, seed, per_class),
                    source=f"Python {sys.version.split()[0]} standard library docstrings (first paragraph)",
                    description="which standard-library package a docstring documents")


def iso_names(seed: int = 0, per_class: int | None = 250) -> TaskData:
    """pycountry's ISO databases: is a name a country, a language, a currency or a script? (the control task,
    never fine-tuned; its head is fitted on the probe and train splits together, see the zoo build)"""
    try:
        import pycountry
    except ImportError as e:
        raise TaskVecError("the zoo's control task needs the package 'pycountry': pip install pycountry") from e
    by_label = {
        0: [c.name for c in pycountry.countries],
        1: [lang.name for lang in pycountry.languages if hasattr(lang, "alpha_2")],  # the major languages
        2: [c.name for c in pycountry.currencies],
        3: [s.name for s in pycountry.scripts],
    }
    count: dict[str, int] = {}
    for names in by_label.values():
        for n in set(names):
            count[n] = count.get(n, 0) + 1
    by_label = {k: [n for n in v if count[n] == 1] for k, v in by_label.items()}  # a name in two lists is ambiguous
    return TaskData("iso_names", ["country", "language", "currency", "script"],
                    split_balanced(by_label, seed, per_class),
                    source=f"pycountry {_version('pycountry')}: ISO 3166-1 / 639 / 4217 / 15924 English names",
                    description="kind of ISO-registered name (never fine-tuned: the control task)", control=True)


TASKS: dict[str, Callable[..., TaskData]] = {
    "sentiment": sentiment,
    "language": language,
    "offensive": offensive,
    "pydoc": pydoc,
    "iso_names": iso_names,
}


# bump a task's version when its recipe changes: cached zoos then rebuild that task's data
TASK_VERSIONS = {"sentiment": 1, "language": 1, "offensive": 1, "pydoc": 2, "iso_names": 3}


def load_task(name: str, seed: int = 0, per_class: int | None = None, **kw) -> TaskData:
    """Build task `name` from its package data; `per_class` caps each class (None: the task's default)."""
    if name not in TASKS:
        raise ParameterError(f"unknown zoo task {name!r}; choose from {sorted(TASKS)}")
    if per_class is not None:
        kw["per_class"] = per_class
    return TASKS[name](seed=seed, **kw)
