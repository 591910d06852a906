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
from functools import lru_cache
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
    prompts: list[str] | None = None  # one zero-shot prompt per label (same order); None: the label names
    shift_source: str | None = None  # provenance of the optional "shift" split (distribution-shifted test set)

    def __post_init__(self):
        self.prompts = list(self.labels) if self.prompts is None else list(self.prompts)
        if len(self.prompts) != len(self.labels):
            raise ParameterError(f"task {self.name!r}: {len(self.prompts)} prompts for {len(self.labels)} labels")

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
        return {"name": self.name, "labels": self.labels, "prompts": self.prompts, "source": self.source,
                "description": self.description, "control": self.control, "shift_source": self.shift_source,
                "splits": {k: [[t, y] for t, y in v] for k, v in self.splits.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "TaskData":
        return cls(name=d["name"], labels=list(d["labels"]), source=d["source"], description=d["description"],
                   control=bool(d.get("control", False)), prompts=d.get("prompts"),  # old JSON: prompts = labels
                   shift_source=d.get("shift_source"),
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


def _package_dir(module: str, dist: str) -> Path:
    """The folder of an installed package, found without importing it (some import heavy dependencies)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise TaskVecError(f"the zoo needs the package {dist!r}: pip install {dist}")
    return Path(list(spec.submodule_search_locations)[0])


def _require(module: str, dist: str, task: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TaskVecError(f"the zoo's {task} task needs the package {dist!r}: pip install {dist}") from e


def _unambiguous(by_label: dict[int, list[str]], key=lambda t: t) -> dict[int, list[str]]:
    """Drop every text whose `key` occurs under two labels (ambiguous); dedupe within a label."""
    owners: dict[str, set[int]] = {}
    for label, texts in by_label.items():
        for t in texts:
            owners.setdefault(key(t), set()).add(label)
    return {label: sorted({t for t in texts if len(owners[key(t)]) == 1}) for label, texts in by_label.items()}


SPLITS = ("probe", "train", "val", "test")
SHIFT = "shift"  # optional extra split: a distribution-shifted test set with the same labels
FRACTIONS = (0.1, 0.4, 0.2, 0.3)  # probe (optional logistic-probe head) / train / val / test


def split_balanced(by_label: dict[int, list[str]], seed: int, per_class: int | None,
                   fractions=FRACTIONS) -> dict[str, list[tuple[str, int]]]:
    """Shuffle each class with `seed`, cap it at `per_class`, cut probe/train/val/test per class (stratified).

    Fine-tuning sees only "train"; "probe" is kept apart for an optional logistic-probe head (the zoo's heads are
    zero-shot prompt heads), so a probe head has not memorised what the encoder is trained on.
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


def add_shift(splits: dict[str, list[tuple[str, int]]], by_label: dict[int, list[str]], seed: int,
              per_class: int | None, fractions=FRACTIONS, key=lambda t: t.lower()) -> dict:
    """Add the "shift" split: each class shuffled with `seed`, texts already in another split (by `key`) dropped,
    capped at the test split's share of `per_class` (uncapped when `per_class` is None)."""
    rng = random.Random(seed + 7919)
    taken = {key(t) for rows in splits.values() for t, _ in rows}
    cap = None if per_class is None else max(1, int(per_class * fractions[-1]))
    rows: list[tuple[str, int]] = []
    for label in sorted(by_label):
        items = sorted({t for t in by_label[label] if key(t) not in taken})
        rng.shuffle(items)
        rows += [(t, label) for t in items[:cap]]
    rng.shuffle(rows)
    splits[SHIFT] = rows
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
                    description="polarity of a word or emoticon rated by humans",
                    prompts=PROMPTS["sentiment"])


LANGUAGES = ("en", "fr", "de", "es")


def _emoji_names(lang: str) -> list[str]:
    """CLDR short names of the fully-qualified emoji in language `lang`, without skin-tone variants (read from the
    package's JSON files: `emoji.config.load_language` would change the library's global state)."""
    folder = _package_dir("emoji", "emoji") / "unicode_codes"
    base = json.loads((folder / "emoji.json").read_text(encoding="utf-8"))
    names_file = folder / ("emoji.json" if lang == "en" else f"emoji_{lang}.json")
    if not names_file.is_file():
        raise TaskVecError(f"package 'emoji' ships no {names_file.name} (languages: {sorted(p.name for p in folder.glob('*.json'))})")
    localized = base if lang == "en" else json.loads(names_file.read_text(encoding="utf-8"))
    names = []
    for char in sorted(base):
        entry = base[char]
        if entry.get("status") != 2 or any(0x1F3FB <= ord(c) <= 0x1F3FF for c in char):  # 2: fully qualified
            continue
        name = entry.get("en") if lang == "en" else localized.get(char)
        if name:
            names.append(" ".join(name.strip(":").replace("_", " ").split()))
    return names


def language(seed: int = 0, per_class: int | None = 1500, languages=LANGUAGES) -> TaskData:
    """wordfreq top-word lists; a word that is frequent in two of the languages is dropped (ambiguous).
    The "shift" split: emoji names (CLDR, via the `emoji` package) in the same languages: phrases, not words."""
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
    splits = split_balanced(by_label, seed, per_class)
    shift = _unambiguous({i: _emoji_names(lang) for i, lang in enumerate(languages)}, key=str.lower)
    add_shift(splits, shift, seed, per_class)
    names = {"en": "English", "fr": "French", "de": "German", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
             "nl": "Dutch"}
    return TaskData("language", list(languages), splits,
                    source=f"wordfreq {_version('wordfreq')}: top_n_list ranks 100-6000, words unique to one language",
                    description="language of a frequent word (shift: of an emoji name)",
                    prompts=[PROMPTS["language"].format(names.get(lang, lang)) for lang in languages],
                    shift_source=(f"emoji {_version('emoji')}: unicode_codes/emoji_<lang>.json CLDR names of "
                                  f"fully-qualified emoji (no skin tones), names in two languages dropped"))


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
                    description="offensive word or ordinary word", prompts=PROMPTS["offensive"])


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
        doc = _first_paragraph(obj)
        if doc:
            docs.add(doc)

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


def _first_paragraph(obj, max_chars: int = 300) -> str | None:
    doc = inspect.getdoc(obj)
    if not doc:
        return None
    first = " ".join(doc.split("\n\n")[0].split())
    return first[:max_chars] if len(first) >= 12 else None


def pydoc(seed: int = 0, per_class: int | None = 400, packages=PYDOC_PACKAGES) -> TaskData:
    """Python standard-library docstrings labelled by the package they document."""
    import sys

    docs = {i: _docstrings(p) for i, p in enumerate(packages)}
    # a docstring shared by two packages (e.g. inherited boilerplate) is ambiguous: drop it
    by_label = _unambiguous(docs)
    return TaskData("pydoc", list(packages), split_balanced(by_label, seed, per_class),
                    source=f"Python {sys.version.split()[0]} standard library docstrings (first paragraph)",
                    description="which standard-library package a docstring documents",
                    prompts=[PROMPTS["pydoc"][p] for p in packages])


def iso_names(seed: int = 0, per_class: int | None = 250) -> TaskData:
    """pycountry's ISO databases: is a name a country, a language, a currency or a script? (the control task,
    never fine-tuned)"""
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
    by_label = _unambiguous(by_label)  # a name in two lists is ambiguous
    return TaskData("iso_names", ["country", "language", "currency", "script"],
                    split_balanced(by_label, seed, per_class),
                    source=f"pycountry {_version('pycountry')}: ISO 3166-1 / 639 / 4217 / 15924 English names",
                    description="kind of ISO-registered name (never fine-tuned: the control task)", control=True,
                    prompts=PROMPTS["iso_names"])


EMOTIONS = ("anger", "disgust", "fear", "joy", "sadness")


def emotion(seed: int = 0, per_class: int | None = 600, emotions=EMOTIONS) -> TaskData:
    """NRC Emotion Lexicon (as shipped by `nrclex`): English words associated with exactly one of `emotions`."""
    path = _package_dir("nrclex", "nrclex") / "data" / "nrc_en.json"
    if not path.is_file():
        raise TaskVecError(f"package 'nrclex' ships no data/nrc_en.json at {path}")
    lexicon = json.loads(path.read_text(encoding="utf-8"))
    by_label: dict[int, list[str]] = {i: [] for i in range(len(emotions))}
    for word, tags in lexicon.items():
        hits = [emotions.index(t) for t in set(tags) if t in emotions]
        if len(hits) == 1 and word.strip():
            by_label[hits[0]].append(word.strip())
    return TaskData("emotion", list(emotions), split_balanced(_unambiguous(by_label), seed, per_class),
                    source=(f"nrclex {_version('nrclex')}: data/nrc_en.json (NRC Emotion Lexicon, Mohammad & Turney), "
                            f"words tagged with exactly one of {', '.join(emotions)}"),
                    description="the emotion a word is associated with (crowd-sourced annotation)",
                    prompts=[PROMPTS["emotion"].format(e) for e in emotions])


NAME_LOCALES = ("en_US", "en_GB", "en_IE", "de_DE", "fr_FR", "es_ES", "it_IT", "pt_BR", "pt_PT", "nl_NL", "sv_SE",
                "da_DK", "no_NO", "fi_FI", "cs_CZ", "pl_PL", "hu_HU", "tr_TR")


def name_gender(seed: int = 0, per_class: int | None = 1500, locales=NAME_LOCALES) -> TaskData:
    """Faker's per-locale first-name lists (female / male); a name on both lists (in any locale) is dropped."""
    _require("faker", "faker", "name_gender")
    by_label: dict[int, list[str]] = {0: [], 1: []}
    used = []
    for loc in locales:
        try:
            provider = importlib.import_module(f"faker.providers.person.{loc}").Provider
        except ImportError:
            continue
        female, male = getattr(provider, "first_names_female", ()), getattr(provider, "first_names_male", ())
        if female and male:
            used.append(loc)
            by_label[0] += [n.strip() for n in female if n.strip() and " " not in n.strip()]
            by_label[1] += [n.strip() for n in male if n.strip() and " " not in n.strip()]
    return TaskData("name_gender", ["female", "male"], split_balanced(_unambiguous(by_label, str.lower), seed, per_class),
                    source=(f"faker {_version('faker')}: providers/person/<locale>/__init__.py first_names_female / "
                            f"first_names_male for {', '.join(used)}; names on both lists dropped"),
                    description="whether a first name is given to girls or to boys", prompts=PROMPTS["name_gender"])


CODE_LANGUAGES = ("python", "c", "cpp", "cython")
CODE_PER_FILE = {"python": 6, "c": 400, "cpp": 6, "cython": 60}  # lines per file: few files of C and Cython


def _code_files(lang: str) -> tuple[list[Path], str]:
    """(source files, provenance) for one programming language, from the stdlib and installed zoo dependencies."""
    import sysconfig

    if lang == "python":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [p for p in root.glob("*/*.py") if not any(part in ("test", "tests", "site-packages", "idlelib")
                                                          or part.startswith("lib2to3") for part in p.parts)]
        files += list(root.glob("*.py"))
        import sys
        return files, f"Python {sys.version.split()[0]} stdlib *.py"
    if lang == "c":
        np_root = Path(importlib.import_module("numpy").__file__).parent
        torch_inc = Path(importlib.import_module("torch").__file__).parent / "include"
        files = list((np_root / "_core" / "include").rglob("*.h")) + list(torch_inc.glob("*.h"))
        return files, (f"numpy {_version('numpy')} _core/include/**/*.h + torch {_version('torch')} "
                       f"include/*.h (C APIs: oneDNN, cpuinfo, sleef, ...)")
    if lang == "cpp":
        torch_inc = Path(importlib.import_module("torch").__file__).parent / "include"
        return list((torch_inc / "c10").rglob("*.h")), f"torch {_version('torch')} include/c10/**/*.h"
    if lang == "cython":
        sk_root = Path(importlib.import_module("sklearn").__file__).parent
        return list(sk_root.rglob("*.pyx")) + list(sk_root.rglob("*.pxd")), \
            f"scikit-learn {_version('scikit-learn')} **/*.pyx + *.pxd"
    raise ParameterError(f"unknown code language {lang!r}")


@lru_cache(maxsize=None)
def _code_pool(lang: str) -> tuple[tuple[str, ...], str]:
    """(lines, provenance) of one programming language; cached per process (reading torch's headers takes ~1 s)."""
    files, src = _code_files(lang)
    key = (lambda p: p.parent.name + "/" + p.name) if lang == "python" else (lambda p: p.name + str(len(p.parts)))
    # a few lines per file: variety across files; the total cap keeps the scan of torch's 8000 headers short
    return tuple(_code_lines(files, key, per_file=CODE_PER_FILE[lang], total=3000)), src


def _code_lines(files: list[Path], root_key, per_file: int, total: int) -> list[str]:
    """Up to `per_file` distinct code lines (no comments, no preprocessor, 24-110 chars) from each file, files in a
    fixed pseudo-random order (sha1 of their relative path), until `total` lines."""
    lines: list[str] = []
    seen: set[str] = set()
    for path in sorted(files, key=lambda p: hashlib.sha1(root_key(p).encode()).hexdigest()):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        taken = 0
        in_doc = False
        for raw in text.splitlines():
            line = " ".join(raw.split())
            if line.startswith(('"""', "'''")) or (in_doc and (line.endswith('"""') or line.endswith("'''"))):
                in_doc = not in_doc if line.count('"""') + line.count("'''") == 1 else in_doc
                continue
            if in_doc or not (24 <= len(line) <= 110) or line.startswith(("#", "//", "/*", "*", "\"", "'")):
                continue
            if sum(c.isalpha() for c in line) < 8 or line in seen:
                continue
            seen.add(line)
            lines.append(line)
            taken += 1
            if taken >= per_file:
                break
        if len(lines) >= total:
            break
    return lines


def code(seed: int = 0, per_class: int | None = 1500, languages=CODE_LANGUAGES) -> TaskData:
    """Programming language of one line of source code, from files that Python and the zoo's dependencies install."""
    by_label, sources = {}, []
    for i, lang in enumerate(languages):
        lines, src = _code_pool(lang)
        by_label[i] = list(lines)
        sources.append(src)
    return TaskData("code", list(languages), split_balanced(_unambiguous(by_label), seed, per_class),
                    source="; ".join(sources) + " (lines of 24-110 chars, comments and preprocessor lines dropped)",
                    description="programming language of a line of source code",
                    prompts=[PROMPTS["code"][lang] for lang in languages])


LIBDOC_PACKAGES = {  # label: modules whose functions / classes / methods (defined in the label's package) count
    "numpy": ("numpy", "numpy.linalg", "numpy.fft", "numpy.random", "numpy.ma", "numpy.polynomial.polynomial"),
    "pandas": ("pandas", "pandas.api.types", "pandas.plotting", "pandas.tseries.offsets"),
    "torch": ("torch", "torch.nn", "torch.nn.functional", "torch.optim", "torch.utils.data", "torch.distributions"),
    "scikit-learn": ("sklearn.linear_model", "sklearn.ensemble", "sklearn.cluster", "sklearn.decomposition",
                     "sklearn.metrics", "sklearn.preprocessing", "sklearn.model_selection", "sklearn.svm",
                     "sklearn.tree", "sklearn.neighbors", "sklearn.feature_extraction.text", "sklearn.manifold"),
    "matplotlib": ("matplotlib.axes", "matplotlib.figure", "matplotlib.colors", "matplotlib.patches",
                   "matplotlib.text", "matplotlib.lines", "matplotlib.ticker", "matplotlib.collections"),
}
_LIB_ROOT = {"scikit-learn": "sklearn"}


@lru_cache(maxsize=None)
def _library_docstrings(label: str) -> tuple[str, ...]:
    root = _LIB_ROOT.get(label, label)
    docs: set[str] = set()

    def own(obj) -> bool:
        mod = getattr(obj, "__module__", None) or ""
        return mod == root or mod.startswith(root + ".")

    for name in LIBDOC_PACKAGES[label]:
        mod = _require(name, label, "libdoc")
        for attr in sorted(vars(mod)):
            if attr.startswith("_"):
                continue
            obj = vars(mod)[attr]
            if not (inspect.isfunction(obj) or inspect.isclass(obj)) or not own(obj):
                continue
            for item in [obj] + ([m for k, m in sorted(vars(obj).items()) if not k.startswith("_")
                                  and inspect.isfunction(m) and own(m)] if inspect.isclass(obj) else []):
                doc = _first_paragraph(item, max_chars=200)
                if doc:
                    docs.add(doc)
    return tuple(sorted(docs))


def libdoc(seed: int = 0, per_class: int | None = 600, libraries=tuple(LIBDOC_PACKAGES)) -> TaskData:
    """Docstrings (first paragraph) of the public API of the scientific-Python libraries that the zoo installs,
    labelled by library; a docstring that two libraries share is dropped."""
    by_label = _unambiguous({i: list(_library_docstrings(lib)) for i, lib in enumerate(libraries)})
    return TaskData("libdoc", list(libraries), split_balanced(by_label, seed, per_class),
                    source=", ".join(f"{lib} {_version(lib)}" for lib in libraries)
                    + ": public functions / classes / methods of the modules in LIBDOC_PACKAGES, first paragraph",
                    description="which scientific-Python library a docstring documents",
                    prompts=[PROMPTS["libdoc"][lib] for lib in libraries])


JOB_LOCALES = {"en": "en_US", "fr": "fr_FR", "de": "de_AT", "es": "es_ES", "pt": "pt_BR"}


def job_titles(seed: int = 0, per_class: int | None = 900, locales=JOB_LOCALES) -> TaskData:
    """Faker's per-locale job-title lists (phrases), labelled by language (held out: never fine-tuned)."""
    _require("faker", "faker", "job_titles")
    by_label = {}
    for i, loc in enumerate(locales.values()):
        jobs = importlib.import_module(f"faker.providers.job.{loc}").Provider.jobs
        by_label[i] = [" ".join(j.split()) for j in jobs if 3 <= len(j.strip()) <= 120]
    names = {"en": "English", "fr": "French", "de": "German", "es": "Spanish", "pt": "Portuguese"}
    return TaskData("job_titles", list(locales), split_balanced(_unambiguous(by_label, str.lower), seed, per_class),
                    source=(f"faker {_version('faker')}: providers/job/<locale>/__init__.py jobs for "
                            + ", ".join(f"{k}={v}" for k, v in locales.items()) + "; titles in two lists dropped"),
                    description="language of a job title (held out: never fine-tuned)",
                    prompts=[PROMPTS["job_titles"].format(names[k]) for k in locales])


# zero-shot prompt heads: logits = 30 * cos(emb(text), emb(prompt)); chosen on the base encoder (see docs)
PROMPTS: dict = {
    "sentiment": ["a negative word", "a positive word"],
    "language": "a {} word",
    "offensive": ["an ordinary word", "an offensive swear word"],
    "pydoc": {"asyncio": "asynchronous I/O, coroutines and event loops",
              "email": "email messages, MIME and headers",
              "logging": "logging messages, handlers and log levels",
              "multiprocessing": "processes, process pools and shared memory",
              "unittest": "unit tests, test cases and assertions"},
    "iso_names": ["a country", "a language", "a currency", "a writing system"],
    "emotion": "a word expressing {}",
    "name_gender": ["a girl's name", "a boy's name"],
    "code": {"python": "Python code", "c": "C code", "cpp": "C++ code", "cython": "Cython code"},
    "libdoc": {"numpy": "NumPy arrays", "pandas": "pandas DataFrame tables", "torch": "PyTorch tensors and neural networks",
               "scikit-learn": "scikit-learn machine learning models", "matplotlib": "matplotlib plots and figures"},
    "job_titles": "a job title in {}",
}


TASKS: dict[str, Callable[..., TaskData]] = {
    "sentiment": sentiment,
    "language": language,
    "offensive": offensive,
    "pydoc": pydoc,
    "iso_names": iso_names,
    "emotion": emotion,
    "name_gender": name_gender,
    "code": code,
    "libdoc": libdoc,
    "job_titles": job_titles,
}

FINETUNED_TASKS = ("sentiment", "language", "offensive", "pydoc", "emotion", "name_gender", "code", "libdoc")
CONTROL_TASKS = ("iso_names",)
HELDOUT_TASKS = ("job_titles",)  # never fine-tuned: out-of-distribution evaluation of merged models


# bump a task's version when its recipe changes: cached zoos then rebuild that task's data
TASK_VERSIONS = {"sentiment": 2, "language": 2, "offensive": 2, "pydoc": 3, "iso_names": 4,
                 "emotion": 1, "name_gender": 1, "code": 1, "libdoc": 1, "job_titles": 1}


def load_task(name: str, seed: int = 0, per_class: int | None = None, **kw) -> TaskData:
    """Build task `name` from its package data; `per_class` caps each class (None: the task's default)."""
    if name not in TASKS:
        raise ParameterError(f"unknown zoo task {name!r}; choose from {sorted(TASKS)}")
    if per_class is not None:
        kw["per_class"] = per_class
    return TASKS[name](seed=seed, **kw)
