"""The bad-input table: every mistake is a clear error naming the file, key or parameter,
leaves no partial output, and leaves the inputs byte-identical.

Each case builds its bad input inside a workspace that already holds a small
real checkpoint pair (`base/`, `ft/`, tiny Llama saved with save_pretrained),
runs one operation, and the harness checks the three guarantees. The table is
mirrored, with what the user sees, in docs/reliability.md.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from taskvec import TaskVector, merge
from taskvec.config import run_config
from taskvec.merging import passthrough
from taskvec.errors import TaskVecError
from taskvec.io import open_source, save_safetensors
from tests.conftest import tree_hash
from tests.helpers import perturbed, save_model, tiny_llama


@dataclass
class Case:
    id: str
    run: Callable[[Path], object]  # gets the workspace; must raise
    names: str  # regex the message must match: the file / key / parameter at fault
    error: type[BaseException] = TaskVecError


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    base = tiny_llama()
    save_model(base, root / "base")
    save_model(perturbed(base), root / "ft")
    return root


@pytest.fixture
def ws(pristine, tmp_path) -> Path:
    shutil.copytree(pristine, tmp_path, dirs_exist_ok=True)
    return tmp_path


def _sd(ws: Path, which: str = "ft") -> dict[str, torch.Tensor]:
    src = open_source(ws / which)
    return {k: src.get(k).clone() for k in src.keys()}


def _write(ws: Path, name: str, sd: dict) -> Path:
    d = ws / name
    d.mkdir()
    save_safetensors(sd, d / "model.safetensors")
    shutil.copy(ws / "base" / "config.json", d / "config.json")
    return d


def _damaged_copy(ws: Path, how: str) -> Path:
    d = ws / "damaged"
    shutil.copytree(ws / "ft", d)
    f = d / "model.safetensors"
    raw = f.read_bytes()
    if how == "truncate":
        f.write_bytes(raw[: len(raw) // 2])
    elif how == "empty":
        f.write_bytes(b"")
    elif how == "header":
        f.write_bytes(raw[:8] + b"\x00garbage" + raw[16:])
    elif how == "header_len":
        f.write_bytes((len(raw) * 4).to_bytes(8, "little") + raw[8:])
    return d


def _sharded_missing(ws: Path) -> Path:
    d = save_model(tiny_llama(), ws / "sharded", max_shard_size="20KB")
    sorted(d.glob("model-*.safetensors"))[0].unlink()
    return d


def _index(ws: Path, content: str) -> Path:
    d = ws / "badindex"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text(content)
    return d


def _evil_pickle(ws: Path) -> Path:
    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(ws / "PWNED"),))

    with open(ws / "evil.bin", "wb") as f:
        pickle.dump({"w": Evil()}, f)
    return ws / "evil.bin"


def _with(ws: Path, **changes) -> Path:
    sd = _sd(ws)
    for k, v in changes.items():
        sd[k.replace("__", ".")] = v
    return _write(ws, "edited", sd)


def _without(ws: Path, key: str) -> Path:
    sd = _sd(ws)
    del sd[key]
    return _write(ws, "edited", sd)


def _lora(ws: Path, targets=("q_proj",), rename: dict | None = None) -> Path:
    import peft

    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=list(targets)))
    model.save_pretrained(ws / "adapter")
    if rename:
        sd = {}
        from safetensors.torch import load_file

        for k, v in load_file(ws / "adapter" / "adapter_model.safetensors").items():
            for a, b in rename.items():
                k = k.replace(a, b)
            sd[k] = v
        save_safetensors(sd, ws / "adapter" / "adapter_model.safetensors")
    return ws / "adapter"


def _tv(ws: Path, ft: Path | None = None, **kw) -> TaskVector:
    return TaskVector.from_models(ws / "base", ft or ws / "ft", **kw)


def _materialise(tv: TaskVector) -> None:
    for _ in tv.items():
        pass


def _yaml(ws: Path, text: str) -> Path:
    (ws / "config.yml").write_text(text)
    return ws / "config.yml"


def _cfg(ws: Path, *, method: str = "ties", ft: str | None = None, extra: str = "") -> str:
    return (f"models:\n  - model: {ws / 'base'}\n  - model: {ft or ws / 'ft'}\n    parameters: {{density: 0.5, weight: 1.0}}\n"
            f"merge_method: {method}\nbase_model: {ws / 'base'}\ndtype: float32\n{extra}\n")


def _slices(ws: Path, layer_range: str) -> str:
    return (f"slices:\n  - sources:\n      - model: {ws / 'base'}\n        layer_range: {layer_range}\n"
            f"merge_method: passthrough\ndtype: float32\n")


EMB = "model.embed_tokens.weight"
Q0 = "model.layers.0.self_attn.q_proj.weight"

CASES = [
    # ---- files that can't be read
    Case("missing-file", lambda ws: _tv(ws, ws / "nope.safetensors"), r"nope\.safetensors.*not found"),
    Case("missing-folder", lambda ws: _tv(ws, ws / "nowhere"), r"nowhere"),
    Case("folder-without-checkpoint", lambda ws: (ws / "emptydir").mkdir() or _tv(ws, ws / "emptydir"), r"emptydir.*no checkpoint"),
    Case("truncated-safetensors", lambda ws: _tv(ws, _damaged_copy(ws, "truncate")), r"damaged/model\.safetensors.*truncated"),
    Case("zero-length-safetensors", lambda ws: _tv(ws, _damaged_copy(ws, "empty")), r"damaged/model\.safetensors.*0 bytes"),
    Case("corrupt-header", lambda ws: _tv(ws, _damaged_copy(ws, "header")), r"damaged/model\.safetensors.*corrupt"),
    Case("header-longer-than-file", lambda ws: _tv(ws, _damaged_copy(ws, "header_len")), r"damaged/model\.safetensors.*header"),
    Case("index-names-missing-shard", lambda ws: _tv(ws, _sharded_missing(ws)), r"model-00001-of-\d+\.safetensors.*not found"),
    Case("index-not-json", lambda ws: _tv(ws, _index(ws, "{oops")), r"model\.safetensors\.index\.json.*JSON"),
    Case("index-without-weight-map", lambda ws: _tv(ws, _index(ws, json.dumps({"metadata": {}}))), r"index\.json.*weight_map"),
    Case("pickle-that-runs-code", lambda ws: _tv(ws, _evil_pickle(ws)), r"evil\.bin.*weights_only"),
    Case("zero-length-bin", lambda ws: (ws / "e.bin").write_bytes(b"") or _tv(ws, ws / "e.bin"), r"e\.bin.*empty"),
    # ---- models that don't match
    Case("key-missing-in-finetuned", lambda ws: _tv(ws, _without(ws, Q0)), r"q_proj"),
    Case("extra-key-in-finetuned", lambda ws: _tv(ws, _with(ws, extra__weight=torch.zeros(2))), r"extra\.weight"),
    Case("shape-mismatch", lambda ws: _tv(ws, _with(ws, **{Q0.replace(".", "__"): torch.zeros(16, 8)})), r"q_proj.*shape"),
    Case("float-vs-int-dtype", lambda ws: _tv(ws, _with(ws, **{Q0.replace(".", "__"): torch.zeros(16, 16, dtype=torch.int32)})), r"q_proj.*dtype"),
    Case("vocab-size-mismatch", lambda ws: _tv(ws, _with(ws, **{EMB.replace(".", "__"): torch.zeros(65, 16)})), r"embed_tokens.*align_vocab"),
    Case("nan-in-checkpoint", lambda ws: _materialise(_tv(ws, _with(ws, **{Q0.replace(".", "__"): torch.full((16, 16), float("nan"))}))), r"edited.*q_proj.*NaN"),
    Case("inf-in-checkpoint", lambda ws: _materialise(_tv(ws, _with(ws, **{Q0.replace(".", "__"): torch.full((16, 16), float("inf"))}))), r"edited.*q_proj.*inf"),
    Case("base-lacks-a-delta-key", lambda ws: _tv(ws).apply_to(_without(ws, Q0)), r"q_proj"),
    Case("different-architectures-added", lambda ws: _tv(ws) + TaskVector.from_models(_sd(ws, "base") | {"x": torch.zeros(1)}, _sd(ws, "base") | {"x": torch.zeros(1)}), r"different architectures"),
    Case("load-a-non-taskvec-garbage-file", lambda ws: TaskVector.load(_damaged_copy(ws, "header") / "model.safetensors"), r"damaged/model\.safetensors"),
    # ---- parameters
    Case("scaling-nan", lambda ws: _tv(ws).apply_to(ws / "base", scaling=float("nan")), r"scaling"),
    Case("scaling-not-a-number", lambda ws: _tv(ws).apply_to(ws / "base", scaling="0.5"), r"scaling"),
    Case("keys-option-typo", lambda ws: _tv(ws, keys="intersect"), r"keys"),
    # ---- outputs
    Case("output-equals-input", lambda ws: _tv(ws).apply_to(ws / "base", out=ws / "base", overwrite=True), r"base.*input"),
    Case("output-inside-input", lambda ws: _tv(ws).apply_to(ws / "base", out=ws / "ft" / "merged"), r"ft.*input"),
    Case("output-already-exists", lambda ws: (ws / "out").mkdir() or _tv(ws).apply_to(ws / "base", out=ws / "out"), r"out.*already exists"),
    Case("save-over-an-input-file", lambda ws: _tv(ws).save(ws / "ft" / "model.safetensors", overwrite=True), r"model\.safetensors.*input"),
    Case("max-shard-size-garbage", lambda ws: _tv(ws).apply_to(ws / "base", out=ws / "out", max_shard_size="lots"), r"max_shard_size"),
    # ---- merge parameters (taskvec.merge)
    Case("empty-model-list", lambda ws: merge(ws / "base", [], "ties"), r"models"),
    Case("models-not-a-list", lambda ws: merge(ws / "base", ws / "ft", "ties"), r"models"),
    Case("unknown-method", lambda ws: merge(ws / "base", [ws / "ft"], "tie"), r"'tie'.*ties"),
    Case("ties-density-zero", lambda ws: merge(ws / "base", [ws / "ft"], "ties", density=0.0), r"density"),
    Case("ties-density-above-one", lambda ws: merge(ws / "base", [ws / "ft"], "ties", density=1.5), r"density"),
    Case("dare-drop-rate-one", lambda ws: merge(ws / "base", [ws / "ft"], "dare_linear", p=1.0), r"\bp\b"),
    Case("slerp-t-outside-0-1", lambda ws: merge(ws / "base", [ws / "ft"], "slerp", t=1.5), r"\bt\b"),
    Case("weights-wrong-length", lambda ws: merge(ws / "base", [ws / "ft", ws / "ft"], "linear", weight=[0.5, 0.3, 0.2]), r"weight"),
    Case("unknown-method-parameter", lambda ws: merge(ws / "base", [ws / "ft"], "ties", densty=0.5), r"densty"),
    Case("merge-models-of-different-shapes", lambda ws: merge(ws / "base", [_with(ws, **{Q0.replace(".", "__"): torch.zeros(16, 8)})], "ties"), r"q_proj"),
    Case("merge-output-equals-input", lambda ws: merge(ws / "base", [ws / "ft"], "ties", out=ws / "ft", overwrite=True), r"ft.*input"),
    Case("merge-output-exists", lambda ws: (ws / "out").mkdir() or merge(ws / "base", [ws / "ft"], "ties", out=ws / "out"), r"out.*already exists"),
    Case("passthrough-range-outside-model", lambda ws: passthrough([(ws / "base", (0, 4)), (ws / "ft", (2, 9))], out=ws / "merged"), r"\[2, 9\)|9|layer"),
    # ---- mergekit YAML configs (taskvec merge CONFIG OUT)
    Case("config-file-missing", lambda ws: run_config(ws / "nope.yml", ws / "merged"), r"nope\.yml.*not found"),
    Case("config-not-yaml", lambda ws: run_config(_yaml(ws, "models: [\n  - model: x\n bad"), ws / "merged"), r"config\.yml.*YAML"),
    Case("config-unknown-key", lambda ws: run_config(_yaml(ws, _cfg(ws, extra="mergekit_magic: 1")), ws / "merged"), r"mergekit_magic"),
    Case("config-method-typo", lambda ws: run_config(_yaml(ws, _cfg(ws, method="ties_merging")), ws / "merged"), r"ties_merging"),
    Case("config-names-missing-model", lambda ws: run_config(_yaml(ws, _cfg(ws, ft=str(ws / "missing_model"))), ws / "merged"), r"missing_model"),
    Case("config-bad-layer-range", lambda ws: run_config(_yaml(ws, _slices(ws, "[0, 12]")), ws / "merged"), r"layer_range|\[0, 12\]|12"),
    Case("config-inverted-layer-range", lambda ws: run_config(_yaml(ws, _slices(ws, "[3, 1]")), ws / "merged"), r"\[3, 1\]"),
    # ---- LoRA adapters
    Case("lora-targets-missing-in-base", lambda ws: TaskVector.from_lora(_lora(ws, rename={"q_proj": "qkv_fused"}), ws / "base"), r"qkv_fused"),
    Case("lora-without-base", lambda ws: open_source(_lora(ws)), r"adapter.*LoRA.*base="),
    Case("lora-without-weights", lambda ws: (_lora(ws) / "adapter_model.safetensors").unlink() or TaskVector.from_lora(ws / "adapter", ws / "base"), r"adapter.*adapter_model"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, ws: Path):
    before = tree_hash(ws)
    with pytest.raises(case.error, match=case.names):
        case.run(ws)
    after = tree_hash(ws)
    # no partial output: no scratch folder, no output folder
    leftovers = [p for p in ws.rglob("*") if ".taskvec-" in p.name or p.name == "PWNED"]
    assert leftovers == []
    for p in ("out", "merged"):  # cases that pre-create out/ to provoke the error: it stays empty
        assert not (ws / p).exists() or not any((ws / p).iterdir())
    # the inputs (base/, ft/) are byte-identical; what a case built for itself may differ
    for f, h in before.items():
        assert after.get(f) == h, f"{f} was modified or removed"


def test_table_has_at_least_thirty_cases():
    assert len(CASES) >= 30


DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"


def test_reliability_doc_lists_every_case():
    text = DOC.read_text()
    missing = [c.id for c in CASES if f"`{c.id}`" not in text]
    assert not missing, f"docs/reliability.md is stale; run `python -m tests.test_bad_inputs` (missing {missing})"


def write_doc() -> None:
    """Regenerate docs/reliability.md: run every case and record the message the user sees."""
    import re
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        pristine_dir = root / "pristine"
        base = tiny_llama()
        save_model(base, pristine_dir / "base")
        save_model(perturbed(base), pristine_dir / "ft")
        for c in CASES:
            w = root / c.id
            shutil.copytree(pristine_dir, w)
            try:
                c.run(w)
                msg = "(no error!)"
            except BaseException as e:  # noqa: BLE001
                msg = f"{type(e).__name__}: {e}"
            msg = re.sub(re.escape(str(w)) + r"/?", "", msg).replace("|", "\\|").replace("\n", " ")
            rows.append(f"| `{c.id}` | {msg[:240]} |")
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(HEADER + "\n".join(rows) + "\n" + FOOTER)


HEADER = """# Reliability: what taskvec does with bad input

Generated by `python -m tests.test_bad_inputs` from the table in
`tests/test_bad_inputs.py`; every row is a test. For **every** row, taskvec
guarantees:

1. a clear error (a `taskvec.errors.TaskVecError` subclass) whose message names
   the file, tensor key or parameter at fault;
2. no partial output: no output folder, no scratch folder left beside it;
3. inputs byte-identical afterwards (checked by hashing every input file).

Paths below are shown relative to the test's workspace (`base/`, `ft/`: a
small Llama checkpoint pair saved with `save_pretrained`).

| case | what the user sees |
|---|---|
"""

FOOTER = """
## Beyond bad input

| situation | what is guaranteed | test |
|---|---|---|
| the process is killed (SIGKILL) mid-merge | no folder that looks like a model is left; only a hidden `.NAME.taskvec-tmp-PID-*` scratch folder, removed by the next write to the same output | `tests/test_faults.py` |
| the disk fills up | `OutputError: …: writing failed (No space left on device); nothing was left behind` | `tests/test_faults.py` |
| Ctrl-C while saving a task vector over an existing file | the old file is intact | `tests/test_faults.py` |
| inputs several times larger than memory | a 4 × 100 M-parameter TIES merge (768 MB bf16, 1.5 GB as float32) completes under a 200 MB anonymous-memory cap enforced by a watchdog; applying τ to a 210 M-parameter model peaks ~32 MB above the interpreter | `tests/test_reliability.py`, `tests/test_memory.py` |
| DARE / dare_ties randomness | bit-identical output for the same seed across processes, thread counts and tensor order (each tensor's generator is seeded from (seed, tensor name)) | `tests/test_reliability.py` |
| merge invariants | task arithmetic of one model at λ = 1 returns it bit for bit (fp32, bf16, fp16); merge outputs never alias or mutate inputs; applying τ then −τ returns the base | `tests/test_reliability.py`, `tests/test_vector.py` |
"""


if __name__ == "__main__":
    write_doc()
    print(f"wrote {DOC}")
