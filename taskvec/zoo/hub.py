"""Hub mode: the papers' published checkpoints, fetched with `huggingface_hub.snapshot_download`.

Needs the network. The zoo directory holds a manifest (repo ids, local snapshot paths, SHA-256 of the
weight files); a snapshot whose files no longer match is fetched again (force_download), never used.
"""
from __future__ import annotations

import time
from pathlib import Path

from taskvec.errors import CheckpointError, ParameterError
from taskvec.zoo.base import Zoo, zoo_root
from taskvec.zoo.cache import ZooCache, cache_dir, weights_hash

# The checkpoints behind the papers' figures (EMTA, TIES, DARE, RegMean).
HUB_ZOOS: dict[str, dict] = {
    "hub:clip-vit-b32-tasks": {
        "description": "CLIP ViT-B/32 fine-tuned on EMTA's 8 image tasks (FusionBench checkpoints)",
        "kind": "vision",
        "base": "openai/clip-vit-base-patch32",
        "models": {t: f"tanganke/clip-vit-base-patch32_{t}" for t in
                   ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")},
    },
    "hub:bert-glue": {
        "description": "BERT-base fine-tuned on GLUE tasks (TIES / RegMean-style text merging)",
        "kind": "encoder",
        "base": "google-bert/bert-base-uncased",
        "models": {t: f"textattack/bert-base-uncased-{t}" for t in ("SST-2", "MRPC", "QNLI", "RTE", "CoLA")},
    },
    "hub:roberta-glue": {
        "description": "RoBERTa-base fine-tuned on GLUE tasks",
        "kind": "encoder",
        "base": "FacebookAI/roberta-base",
        "models": {t: f"textattack/roberta-base-{t}" for t in ("SST-2", "MRPC", "QNLI", "RTE", "CoLA")},
    },
    "hub:gpt2-toxicity": {
        "description": "GPT-2 family base for EMTA's toxicity negation (fine-tune it on toxic text locally)",
        "kind": "lm",
        "base": "openai-community/gpt2-large",
        "models": {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium"},
    },
}

ALLOW = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "vocab*", "merges*", "*.bin"]


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise CheckpointError(f"{folder}: the hub snapshot holds no weights (*.safetensors or *.bin)")
    return files


def fetch(repo_id: str, cache: Path, force: bool = False) -> Path:
    """Local snapshot of `repo_id` (config, tokenizer, weights; safetensors preferred)."""
    import huggingface_hub  # looked up at call time so tests can replace snapshot_download

    try:
        path = huggingface_hub.snapshot_download(repo_id=repo_id, allow_patterns=ALLOW,
                                                 cache_dir=str(cache / "hub"), force_download=force)
    except Exception as e:  # offline, unknown repo, auth: say which repo
        raise CheckpointError(f"cannot fetch {repo_id!r} from the hub: {e}") from e
    return Path(path)


def build_hub(name: str, cache=None, rebuild: bool = False, models: list[str] | None = None):
    """Fetch a hub zoo's base and task checkpoints; manifest with SHA-256 of every weight file."""
    if name not in HUB_ZOOS:
        raise ParameterError(f"unknown hub zoo {name!r}; choose from {sorted(HUB_ZOOS)}")
    spec = HUB_ZOOS[name]
    root = zoo_root(name, "hub", 0, cache)
    store = ZooCache(root, {"zoo": name, "mode": "hub", "seed": 0, "kind": spec["kind"]})
    if rebuild:
        store.manifest["entries"] = {}
    started = time.time()
    wanted = {"base": spec["base"], **{t: r for t, r in spec["models"].items() if models is None or t in models}}
    paths = {}
    for key, repo in wanted.items():
        entry = store.manifest["entries"].get(key)
        ok = entry is not None and entry.get("deps") == {"repo": repo} and _intact(Path(entry["path"]), entry)
        if not ok:
            if entry is not None:
                store.rebuilt.append(f"{key}: snapshot of {repo} missing or corrupt")
            folder = fetch(repo, cache_dir(cache), force=entry is not None)
            files = _weight_files(folder)
            from taskvec.zoo.cache import file_sha256

            store.manifest["entries"][key] = {
                "deps": {"repo": repo}, "path": str(folder), "repo": repo,
                "files": {f.name: file_sha256(f) for f in files}, "weights_hash": weights_hash(folder)
                if files[0].suffix == ".safetensors" else None}
            store.write()
        paths[key] = store.manifest["entries"][key]["path"]
    store.manifest["base"] = {"path": paths["base"], "source": spec["base"],
                              "weights_hash": store.manifest["entries"]["base"]["weights_hash"]}
    store.manifest["models"] = {t: {"path": paths[t], "repo": r, "metrics": {},
                                    "weights_hash": store.manifest["entries"][t]["weights_hash"]}
                                for t, r in wanted.items() if t != "base"}
    store.manifest["control"] = []
    store.manifest["last_build_seconds"] = round(time.time() - started, 1)
    store.manifest["rebuilt"] = store.rebuilt
    store.write()
    return Zoo(name, "hub", root, store.manifest)


def _intact(folder: Path, entry: dict) -> bool:
    from taskvec.zoo.cache import file_sha256

    try:
        return all((folder / f).is_file() and file_sha256(folder / f) == h for f, h in entry["files"].items())
    except OSError:
        return False
