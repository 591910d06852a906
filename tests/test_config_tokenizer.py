"""mergekit's tokenizer: / tokenizer_source: / chat_template: / modules: keys, against mergekit-yaml 0.1.5.

tests/goldens/tokenizer holds tiny Llama-shaped models with different vocabularies and
what mergekit 0.1.5 made of them (benchmarks/make_goldens_tokenizer.py). mergekit gives
the tokens its union adds ids in a run-dependent order, so vocabularies and rows are
compared by token.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from taskvec.config import parse_config, run_config
from taskvec.config.parse import MERGEKIT_CONFIG_KEYS
from taskvec.config.tokenizer import (
    TokenEmbedding,
    TokenSource,
    assign_sources,
    padded_size,
    permutation,
    permute_rows,
    resolve_chat_template,
    union_additions,
)
from taskvec.errors import CheckpointError, ParameterError

REPO = Path(__file__).resolve().parents[1]
GOLDENS = REPO / "tests" / "goldens" / "tokenizer"
MERGEKIT_TEMPLATES = next(Path("/tmp/venv-bench/lib").glob("python3*/site-packages/mergekit/_data/chat_templates"),
                          None) if Path("/tmp/venv-bench/lib").is_dir() else None
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _vocab(folder: Path) -> dict[str, int]:
    t = json.loads((folder / "tokenizer.json").read_text())
    return {**t["model"]["vocab"], **{a["content"]: a["id"] for a in t["added_tokens"]}}


def _added(folder: Path) -> dict[str, bool]:
    return {a["content"]: a["special"] for a in json.loads((folder / "tokenizer.json").read_text())["added_tokens"]}


def _template(folder: Path) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    return json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")


def _run(tmp_path: Path, config, name: str = "out") -> Path:
    return run_config(config, tmp_path / name, progress=False)


@pytest.fixture
def in_goldens(monkeypatch):
    """The golden configs name their models relative to tests/goldens/tokenizer (mergekit-yaml ran there)."""
    monkeypatch.chdir(GOLDENS)


# ---------------------------------------------------------------- goldens

@pytest.mark.parametrize("name", ["union", "tokens", "base", "slices", "passthrough", "model_source"])
def test_vocabulary_and_rows_equal_mergekit(tmp_path, in_goldens, name):
    out = _run(tmp_path, GOLDENS / "configs" / f"{name}.yml")
    gold = GOLDENS / "outputs" / name
    ours, theirs = _vocab(out), _vocab(gold)
    assert set(ours) == set(theirs)
    assert _added(out) == _added(gold)  # the same tokens added, with the same `special` flags
    a, b = load_file(str(out / "model.safetensors")), load_file(str(gold / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = 0.0
    for k in b:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        if k in VOCAB_TENSORS:
            for tok, gid in theirs.items():  # row by token: the union's new ids differ run to run in mergekit
                worst = max(worst, (a[k][ours[tok]] - b[k][gid]).abs().max().item())
            n = len(theirs)
            if b[k].shape[0] > n:  # pad_to_multiple_of: the mean row
                worst = max(worst, (a[k][n:] - b[k][n:]).abs().max().item())
        else:
            worst = max(worst, (a[k] - b[k]).abs().max().item())
    assert worst <= 2.4e-7, f"{name}: max abs difference {worst}"  # float32 rounding (sums in another order)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == \
        json.loads((gold / "config.json").read_text())["vocab_size"]
    assert _template(out) == _template(gold)


def test_union_ids_of_the_base_stay_and_new_ids_are_deterministic(tmp_path, in_goldens):
    first = _vocab(_run(tmp_path, GOLDENS / "configs" / "union.yml", "a"))
    again = _vocab(_run(tmp_path, GOLDENS / "configs" / "union.yml", "b"))
    assert first == again
    base = _vocab(GOLDENS / "inputs" / "base")
    assert all(first[t] == i for t, i in base.items())
    # the new tokens in config order (ft2's, then ft3's), each model in id order, then the added tokens
    assert sorted(first, key=first.get)[len(base):] == ["bird", "tree", "green", "fast", "sky", "slow", "moon",
                                                         "<|im_start|>"]


def test_legacy_tokenizer_source_union_is_the_tokenizer_block(tmp_path, in_goldens):
    text = (GOLDENS / "configs" / "union.yml").read_text().replace("tokenizer:\n  source: union\n",
                                                                    "tokenizer_source: union\n")
    cfg = tmp_path / "legacy.yml"
    cfg.write_text(text.replace("inputs/", f"{GOLDENS}/inputs/"))
    assert parse_config(cfg).tokenizer.source == "union"
    out = _run(tmp_path, cfg)
    ref = _run(tmp_path, GOLDENS / "configs" / "union.yml", "ref")
    assert _vocab(out) == _vocab(ref)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)


# ---------------------------------------------------------------- pure functions on toy vocabularies

def test_union_additions_order_and_vocab_size_cut():
    base = {"a": 0, "b": 1}
    plain, added = union_additions(base, [(base, [], 2), ({"c": 1, "b": 0, "z": 3, "<x>": 2}, ["<x>"], 3),
                                          ({"d": 0, "c": 1}, [], 2)])
    assert plain == ["c", "d"]  # "z" sits beyond its model's vocab_size
    assert added == ["<x>"]


def test_permutation_marks_missing_and_padding_tokens():
    assert permutation({"a": 0, "b": 1, "c": 2}, {"b": 0, "c": 5, "a": 1}, vocab_size=3) == {0: 1, 1: 0, 2: -1}


def test_assign_sources_follows_mergekit():
    vocab = {"both": 0, "only_y": 1, "none": 2, "yz": 3, "explicit": 4}
    perms = {"x": {0: 0, 1: -1, 2: -1, 3: -1, 4: 1}, "y": {0: 1, 1: 0, 2: -1, 3: 2, 4: -1},
             "z": {0: 0, 1: -1, 2: -1, 3: 1, 4: -1}}
    explicit = {"explicit": TokenEmbedding(TokenSource("zero"))}
    configs, average = assign_sources(vocab, perms, ["x", "y", "z"], "x", explicit)
    assert configs["both"].source == TokenSource("model", "x")  # the base has it
    assert configs["only_y"].source == TokenSource("model", "y")
    assert configs["none"].source == TokenSource("zero")
    assert configs["explicit"] is explicit["explicit"]
    assert average == {"yz"}  # several models but not the base: averaged


def test_permute_rows_on_a_toy_vocabulary():
    x = torch.tensor([[1.0, 1.0], [2.0, 2.0]])        # x: "a", "b"
    y = torch.tensor([[10.0, 0.0], [20.0, 0.0], [30.0, 0.0]])  # y: "c", "a", "d"
    vocab = {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4}
    perms = {"x": permutation(vocab, {"a": 0, "b": 1}), "y": permutation(vocab, {"c": 0, "a": 1, "d": 2})}
    tokens = {"d": TokenEmbedding(TokenSource("model_token", "x", token="b"), force=True),
              "e": TokenEmbedding(TokenSource("model_token", "y", token_id=0))}
    out = permute_rows({"x": x, "y": y}, vocab, perms, base_model="x", tokens=tokens,
                       original_vocabs={"x": {"a": 0, "b": 1}, "y": {"c": 0, "a": 1, "d": 2}}, pad_to_multiple_of=3)
    assert out["x"].shape == (6, 2) and padded_size(5, 3) == 6
    assert out["x"][:5].tolist() == [[1, 1], [2, 2], [10, 0], [2, 2], [10, 0]]
    assert out["y"][:5].tolist() == [[20, 0], [2, 2], [10, 0], [2, 2], [10, 0]]  # "b" from x; "d" forced
    assert torch.allclose(out["y"][5], out["y"][:5].mean(0))


def test_permute_rows_averages_over_the_models_that_have_the_token():
    vocab = {"a": 0, "n": 1}
    perms = {"base": {0: 0, 1: -1}, "p": {0: 0, 1: 1}, "q": {0: 1, 1: 0}}
    t = {"base": torch.zeros(1, 2), "p": torch.tensor([[0.0, 0], [2.0, 4]]), "q": torch.tensor([[4.0, 8], [9.0, 9]])}
    out = permute_rows(t, vocab, perms, base_model="base")
    assert out["base"][1].tolist() == [3.0, 6.0] and out["p"][1].tolist() == [2.0, 4.0]


# ---------------------------------------------------------------- chat templates

@pytest.mark.skipif(MERGEKIT_TEMPLATES is None, reason="mergekit's templates: /tmp/venv-bench not installed")
def test_bundled_templates_are_mergekits():
    from taskvec.config.chat_templates import CHAT_TEMPLATES

    files = {p.stem: p.read_text() for p in MERGEKIT_TEMPLATES.glob("*.jinja")}
    assert CHAT_TEMPLATES == files


def test_chat_template_names_literals_auto_and_errors():
    from taskvec.config.chat_templates import CHAT_TEMPLATES

    assert resolve_chat_template("chatml", []) == CHAT_TEMPLATES["chatml"]
    literal = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_chat_template(literal, []) == literal
    dirs = [GOLDENS / "inputs" / n for n in ("ft2", "base", "ft1", "ft3")]
    assert resolve_chat_template("auto", dirs) == _template(GOLDENS / "inputs" / "base").strip()  # 2 of 3
    with pytest.raises(ParameterError, match="chat_template: 'chatmlx' is neither"):
        parse_config({"merge_method": "linear", "models": ["a"], "chat_template": "chatmlx"})


def test_chat_template_without_a_tokenizer_block_lands_in_the_copied_tokenizer(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"models:\n  - model: {GOLDENS}/inputs/base\n  - model: {GOLDENS}/inputs/ft1\n"
                   "merge_method: linear\nparameters: {weight: 1}\nchat_template: alpaca\ndtype: float32\n")
    from taskvec.config.chat_templates import CHAT_TEMPLATES

    assert _template(_run(tmp_path, cfg)) == CHAT_TEMPLATES["alpaca"]


def test_chat_template_without_any_tokenizer_written_warns(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"models:\n  - model: {GOLDENS}/inputs/base\n  - model: {GOLDENS}/inputs/ft1\n"
                   "merge_method: linear\nparameters: {weight: 1}\nchat_template: chatml\n")
    with pytest.warns(UserWarning, match="chat_template: no tokenizer is written"):
        out = run_config(cfg, tmp_path / "out", progress=False, copy_tokenizer=False)
    assert not (out / "tokenizer.json").exists() and not (out / "chat_template.jinja").exists()


# ---------------------------------------------------------------- modules

def test_default_module_is_the_models_config(tmp_path):
    models = tmp_path / "m.yml"
    models.write_text(f"models:\n  - model: {GOLDENS}/inputs/base\n  - model: {GOLDENS}/inputs/ft1\n"
                      "    parameters: {weight: [0.2, 0.8]}\nmerge_method: task_arithmetic\n"
                      f"base_model: {GOLDENS}/inputs/base\nparameters: {{weight: 0.1, lambda: 0.9}}\ndtype: float32\n")
    modules = tmp_path / "mod.yml"
    modules.write_text(f"modules:\n  default:\n    models:\n      - model: {GOLDENS}/inputs/base\n"
                       f"      - model: {GOLDENS}/inputs/ft1\n        parameters: {{weight: [0.2, 0.8]}}\n"
                       "    parameters: {lambda: [{filter: mlp, value: 0.9}]}\n"
                       f"merge_method: task_arithmetic\nbase_model: {GOLDENS}/inputs/base\n"
                       "parameters: {weight: 0.1, lambda: 0.9}\ndtype: float32\n")
    a = load_file(str(_run(tmp_path, models, "a") / "model.safetensors"))
    b = load_file(str(_run(tmp_path, modules, "b") / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the module's lambda falls through to the global one


def test_multi_module_configs_are_refused_naming_the_module():
    with pytest.raises(ParameterError, match=r"modules\.vision_tower: module 'vision_tower' is not supported"):
        parse_config({"merge_method": "linear", "modules": {"vision_tower": {"models": ["a"]}}})
    with pytest.raises(ParameterError, match=r"modules\.text_decoder: module 'text_decoder'.*no multi-module"):
        parse_config({"merge_method": "linear", "modules": {"default": {"models": ["a"]},
                                                            "text_decoder": {"models": ["a"]}}})
    with pytest.raises(ParameterError, match=r"modules\.default: give exactly one of `models:` or `slices:`"):
        parse_config({"merge_method": "linear", "modules": {"default": {"parameters": {"weight": 1}}}})


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("tokenizer, match", [
    ({"source": "union", "tokens": {"x": {"source": {"kind": "model_tokn", "model": "a", "token": "b"}}}},
     r"tokenizer\.tokens\['x'\]\.source\.kind: unknown token source kind 'model_tokn' \(did you mean 'model_token'"),
    ({"tokens": {"x": {"source": {"kind": "model_token", "model": "a"}}}},
     r"tokenizer\.tokens\['x'\]\.source: give exactly one of `token_id` or `token`"),
    ({"tokens": {"x": {"force": "yes"}}}, r"tokenizer\.tokens\['x'\]\.force: expected true or false"),
    ({"source": "union", "pad_to_multiple_of": 0}, r"tokenizer\.pad_to_multiple_of: expected a positive integer"),
    ({"sources": "union"}, r"tokenizer: unknown key 'sources' \(did you mean 'source'\?\)"),
])
def test_bad_tokenizer_blocks_name_the_key(tokenizer, match):
    with pytest.raises(ParameterError, match=match):
        parse_config({"merge_method": "linear", "models": ["a"], "tokenizer": tokenizer})


def test_residual_weight_is_accepted_without_effect_as_in_mergekit():
    with pytest.warns(UserWarning, match=r"slices\[0\]\.residual_weight: mergekit 0\.1\.5 parses"):
        cfg = parse_config({"merge_method": "passthrough", "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 2]}], "residual_weight": 0.5}]})
    assert cfg.no_effect == {"slices[0].residual_weight": 0.5}
    assert "never reads it" in cfg.no_effect_reasons()["slices[0].residual_weight"]


def test_long_form_model_references():
    cfg = parse_config({"merge_method": "linear", "models": [{"model": {"model": {"path": "a"}, "lora": "l"}}]})
    assert cfg.models[0].model == "a+l"
    with pytest.raises(ParameterError, match=r"models\[0\]\.model\.model\.revision: hub revisions"):
        parse_config({"merge_method": "linear", "models": [{"model": {"model": {"path": "a", "revision": "v2"}}}]})
    with pytest.raises(ParameterError, match=r"override_architecture: not supported"):
        parse_config({"merge_method": "linear", "models": [{"model": {"model": "a", "override_architecture": "X"}}]})


def _bad_run(tmp_path, text: str, error, match: str):
    cfg = tmp_path / "bad.yml"
    cfg.write_text(text)
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        run_config(cfg, out, progress=False)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_token_source_that_is_not_merged_fails_before_any_output(tmp_path):
    _bad_run(tmp_path, f"models:\n  - model: {GOLDENS}/inputs/base\n  - model: {GOLDENS}/inputs/ft2\n"
                       "merge_method: linear\nparameters: {weight: 1}\n"
                       f"tokenizer:\n  tokens:\n    sky:\n      source: {GOLDENS}/inputs/ft3\n",
             ParameterError, r"tokenizer\.tokens\['sky'\]\.source: model '.*ft3' is not one of the config's models")


def test_a_missing_tokenizer_source_fails_before_any_output(tmp_path):
    _bad_run(tmp_path, f"models:\n  - model: {GOLDENS}/inputs/base\n  - model: {GOLDENS}/inputs/ft1\n"
                       "merge_method: linear\nparameters: {weight: 1}\ntokenizer:\n  source: ./no/such/model\n",
             CheckpointError, r"tokenizer\.source: './no/such/model' is not a model folder")


def test_a_token_row_from_a_model_lacking_it_fails_naming_the_token(tmp_path):
    _bad_run(tmp_path, f"models:\n  - model: {GOLDENS}/inputs/base\n  - model: {GOLDENS}/inputs/ft2\n"
                       "merge_method: linear\nparameters: {weight: 1}\n"
                       f"tokenizer:\n  tokens:\n    bird:\n      source: {GOLDENS}/inputs/base\n",
             ParameterError, r"tokenizer\.tokens\['bird'\]\.source: token 'bird' is not in .*base's vocabulary")


# ---------------------------------------------------------------- mergekit's schema, key by key

def test_every_mergekit_config_field_has_a_status():
    fields = (REPO / "benchmarks" / "results" / "mergekit_config_fields.txt").read_text().split()
    assert fields and set(fields) == set(MERGEKIT_CONFIG_KEYS)
    assert {s for _, s, _ in MERGEKIT_CONFIG_KEYS.values()} <= {"supported", "partial", "no effect", "refused"}
    table = (REPO / "benchmarks" / "results" / "mergekit_config_keys.md").read_text()
    rows = dict(re.findall(r"^\| `([\w.]+)` \| `[^`]*` \| ([\w ]+) \|", table, flags=re.M))
    assert rows == {k: s for k, (_, s, _) in MERGEKIT_CONFIG_KEYS.items()}


@pytest.mark.skipif(not Path("/tmp/venv-bench/bin/python").exists(), reason="mergekit 0.1.5 not installed")
def test_the_committed_field_list_is_mergekits():
    import subprocess

    code = ("from mergekit.config import *; from mergekit.tokenizer.config import *; from mergekit.common import *\n"
            "for c in (MergeConfiguration, InputModelDefinition, InputSliceDefinition, OutputSliceDefinition, "
            "OutputModuleDefinition, ConditionalParameter, TokenizerConfig, TokenEmbeddingConfig, ModelTokenEmbedding, "
            "ZeroEmbedding, ModelReference, ModelPath):\n    print(*[f'{c.__name__}.{f}' for f in c.model_fields])\n")
    res = subprocess.run(["/tmp/venv-bench/bin/python", "-c", code], capture_output=True, text=True, check=True)
    fields = (REPO / "benchmarks" / "results" / "mergekit_config_fields.txt").read_text().split()
    assert res.stdout.split() == fields


def test_dry_run_shows_the_vocabulary_plan(in_goldens, capsys):
    from taskvec.config import cli_main

    assert cli_main(["configs/tokens.yml", "/tmp/never-written", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "tokenizer: union -> 24 tokens, 32 rows (pad_to_multiple_of 16)" in out
    assert "2 averaged" not in out and "1 averaged" in out and not Path("/tmp/never-written").exists()
