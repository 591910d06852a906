"""mergekit YAML configs: parsing, mergekit's parameter semantics, plans, and `run_config` end to end.

The five configs of the seed article (benchmarks/configs/seeds/) run unchanged
on tiny 32-layer Llama-shaped checkpoints created in folders named like the
hub models they cite.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskvec.config import (
    NO_EFFECT,
    Conditional,
    compile_config,
    evaluate_setting,
    is_constant,
    open_models,
    parse_config,
    run_config,
)
from taskvec.errors import CheckpointError, ParameterError

REPO = Path(__file__).resolve().parents[1]
SEEDS = REPO / "benchmarks" / "configs" / "seeds"
SEED_CONFIGS = sorted(SEEDS.glob("*.yml"))

# The models the seed configs name: one base and fine-tunes of it (tiny, but 32 layers like Mistral-7B).
SEED_BASE = "mistralai/Mistral-7B-v0.1"
SEED_FINETUNES = [
    "OpenPipe/mistral-ft-optimized-1218", "mlabonne/NeuralHermes-2.5-Mistral-7B", "samir-fama/SamirGPT-v1",
    "abacusai/Slerp-CM-mist-dpo", "EmbeddedLLM/Mistral-7B-Merge-14-v0.2", "AIDC-ai-business/Marcoroni-7B-v3",
    "EmbeddedLLM/Mistral-7B-Merge-14-v0.1",
]
TINY_LLAMA = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=32, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=32)


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_checkpoints", REPO / "benchmarks" / "make_checkpoints.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_seed_models(root: Path, **overrides) -> dict[str, Path]:
    """Tiny Llama checkpoints at root/<hub id> for every model the seed configs name.

    Each gets stand-in tokenizer files naming their model, so tests can see whose tokenizer was copied.
    """
    gen = _load_generator()
    cfg = {**gen.llama_config("tiny"), **TINY_LLAMA, **overrides}
    dirs = {n: root / n for n in [SEED_BASE, *SEED_FINETUNES]}
    gen.write_family(dirs, cfg, seed=1)
    for name, d in dirs.items():
        (d / "tokenizer_config.json").write_text(json.dumps({"name": name}))
        (d / "tokenizer.json").write_text('{"version": "1.0"}')
    return dirs


@pytest.fixture(scope="module")
def seed_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    make_seed_models(root)
    return root


def _load(path: Path) -> dict[str, torch.Tensor]:
    from taskvec.io import open_source

    s = open_source(path)
    return {k: s.get(k).clone() for k in s.keys()}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------ parsing

def test_seed_configs_parse():
    assert len(SEED_CONFIGS) == 5
    methods = [parse_config(p).merge_method for p in SEED_CONFIGS]
    assert methods == ["slerp", "ties", "dare_ties", "passthrough", "slerp"]
    slerp = parse_config(SEED_CONFIGS[0])
    assert slerp.slices[0].sources[1].layer_range == (0, 32)
    assert slerp.parameters["t"][0] == Conditional(value=(0, 0.5, 0.3, 0.7, 1), filter="self_attn")
    assert slerp.parameters["t"][2] == Conditional(value=0.5, filter=None)
    ties = parse_config(SEED_CONFIGS[1])
    assert ties.models[1].parameters == {"density": 0.5, "weight": 0.5}
    assert ties.models[0].parameters == {} and ties.dtype == "float16"
    dare = parse_config(SEED_CONFIGS[2])
    assert dare.no_effect == {"int8_mask": True} and "int8_mask" not in dare.parameters
    assert parse_config(SEED_CONFIGS[3]).slices[1].sources[0].layer_range == (24, 32)


def test_parse_accepts_text_and_dict_and_lists_referenced_models():
    text = "models:\n  - model: a\n  - model: b\nmerge_method: linear\n"
    cfg = parse_config(text)
    assert cfg.referenced_models() == ["a", "b"] and cfg.text == text
    cfg2 = parse_config({"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}, {"model": "b"}]})
    assert cfg2.referenced_models() == ["b", "a"]


@pytest.mark.parametrize("cfg, match", [
    ({"merge_method": "ties", "models": [{"model": "a"}], "base_model": "a", "dtyp": "bf16"},
     r"unknown key 'dtyp' \(did you mean 'dtype'\?\); supported: merge_method, models"),
    ({"merge_method": "tiess", "models": [{"model": "a"}]}, r"unknown method 'tiess' \(did you mean 'ties'\?\).*dare_ties"),
    ({"merge_method": "ties", "models": [{"model": "a", "parameters": {"densty": 0.5}}]},
     r"models\[0\] \(a\)\.parameters: ties has no parameter 'densty' \(did you mean 'density'\?\)"),
    ({"merge_method": "ties", "models": [{"model": "a"}],
      "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]}, "exactly one of `models:`, `slices:`"),
    ({"models": [{"model": "a"}]}, "`merge_method` is missing"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [4, 2]}]}]},
     r"slices\[0\]\.sources\[0\]\.layer_range: \[4, 2\] is empty"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, "x"]}]}]},
     "expected \\[start, end\\]"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, 4]},
                                                        {"model": "b", "layer_range": [0, 3]}]}]},
     "same number of layers"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a"}]}]}, "layer_range: \\[start, end\\]` is missing"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "tokenizer_source": "union", "tokenizer": {}},
     "`tokenizer_source:` or `tokenizer:`, not both"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "modules": {"default": {"models": [{"model": "a"}]}}},
     "exactly one of `models:`, `slices:` or `modules:`"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "dtype": "bfloat17"}, "unknown dtype 'bfloat17'"),
    ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": {"filter": "x"}}}]},
     "expected \\{filter: ..., value: ...\\}"),
])
def test_bad_configs_name_the_problem(cfg, match):
    with pytest.raises(ParameterError, match=match):
        parse_config(cfg)


def test_missing_config_file(tmp_path):
    with pytest.raises(ParameterError, match="config file not found"):
        parse_config(tmp_path / "nope.yml")


def test_invalid_yaml_names_the_file(tmp_path):
    p = tmp_path / "bad.yml"
    p.write_text("models: [\n")
    with pytest.raises(ParameterError, match="bad.yml: not valid YAML"):
        parse_config(p)


def test_int8_mask_is_accepted_and_documented():
    assert "int8_mask" in NO_EFFECT
    cfg = parse_config({"merge_method": "dare_ties", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}],
                        "parameters": {"int8_mask": True}})
    assert cfg.no_effect == {"int8_mask": True}


# ------------------------------------------------------------------ mergekit's parameter semantics

GRADIENT = (0, 0.5, 0.3, 0.7, 1)


@pytest.mark.parametrize("t, expected", [(0.0, 0.0), (1.0, 1.0), (0.5, 0.3), (0.25, 0.5), (0.375, 0.4),
                                         (0.125, 0.25), (0.9375, 0.925)])
def test_gradient_interpolates_by_hand(t, expected):
    # t * (5 - 1) picks the segment; e.g. t = 0.375 -> 1.5: halfway between 0.5 and 0.3
    assert evaluate_setting(GRADIENT, "x", t) == pytest.approx(expected)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(-10, 10), min_size=1, max_size=8), t=st.floats(0, 1))
def test_gradient_is_numpy_interp_over_normalised_layer_index(values, t):
    import numpy as np

    xp = np.linspace(0, 1, len(values)) if len(values) > 1 else np.array([0.0])
    got = evaluate_setting(tuple(values), "x", t)
    assert got == pytest.approx(float(np.interp(t, xp, values)), abs=1e-9)
    assert min(values) - 1e-9 <= got <= max(values) + 1e-9


def test_filters_pick_the_first_match_with_fallback():
    t = (Conditional(GRADIENT, "self_attn"), Conditional((1, 0.5, 0.7, 0.3, 0), "mlp"), Conditional(0.5))
    assert evaluate_setting(t, "model.layers.0.self_attn.q_proj.weight", 0.0) == 0
    assert evaluate_setting(t, "model.layers.31.self_attn.q_proj.weight", 1.0) == 1
    assert evaluate_setting(t, "model.layers.0.mlp.up_proj.weight", 0.0) == 1
    assert evaluate_setting(t, "model.layers.8.mlp.up_proj.weight", 0.25) == pytest.approx(0.5)
    assert evaluate_setting(t, "model.norm.weight", 0.0) == 0.5
    assert evaluate_setting(t[:2], "model.norm.weight", 0.0) is None  # no match, no fallback
    assert evaluate_setting((Conditional(0.2, "*"),), "anything", 0.0) == 0.2


def test_non_numeric_lists_select_and_numeric_strings_are_numbers():
    assert evaluate_setting((True, False), "x", 0.4) is True
    assert evaluate_setting((True, False), "x", 1.0) is False
    assert evaluate_setting("1e-3", "x") == pytest.approx(1e-3)


def test_is_constant():
    assert is_constant(0.5) and is_constant((Conditional(0.5),)) and is_constant((0.3, 0.3))
    assert not is_constant(GRADIENT) and not is_constant((Conditional(0.5, "mlp"),))


# ------------------------------------------------------------------ plans

def test_slerp_plan_resolves_t_per_tensor(seed_models, monkeypatch):
    monkeypatch.chdir(seed_models)
    cfg = parse_config(SEED_CONFIGS[0])
    plan = compile_config(cfg, open_models(cfg))
    assert plan.base.name == "OpenPipe/mistral-ft-optimized-1218"
    assert [m.name for m in plan.models] == ["mlabonne/NeuralHermes-2.5-Mistral-7B"]
    t = plan.params["t"]
    assert callable(t)
    assert t("model.layers.0.self_attn.q_proj.weight") == 0
    assert t("model.layers.31.self_attn.o_proj.weight") == pytest.approx(1)
    assert t("model.layers.0.mlp.down_proj.weight") == 1
    # layer 31 of 32 -> t = 31/31 = 1; layer 10 -> t = 10/31, segment 1 (0.5 .. 0.3)
    s = 10 / 31 * 4
    assert t("model.layers.10.self_attn.k_proj.weight") == pytest.approx(0.5 + (s - 1) * (0.3 - 0.5))
    assert t("model.layers.5.input_layernorm.weight") == 0.5
    assert t("model.embed_tokens.weight") == 0.5 and t("lm_head.weight") == 0.5


def test_ties_plan_has_per_model_lists_and_excludes_base(seed_models, monkeypatch):
    monkeypatch.chdir(seed_models)
    cfg = parse_config(SEED_CONFIGS[1])
    plan = compile_config(cfg, open_models(cfg))
    assert plan.base.name == SEED_BASE and len(plan.models) == 2
    assert plan.params == {"density": [0.5, 0.5], "weight": [0.5, 0.3], "normalize": True}


def test_mergekit_defaults_apply_where_taskvec_differs(seed_models, monkeypatch):
    monkeypatch.chdir(seed_models)
    cfg = parse_config({"merge_method": "ties", "base_model": SEED_BASE,
                        "models": [{"model": SEED_FINETUNES[0], "parameters": {"weight": 1.0}}]})
    plan = compile_config(cfg, open_models(cfg))
    assert plan.params["density"] == [1.0]  # mergekit keeps everything without `density`; taskvec's default is 0.2


def test_global_parameter_gives_every_model_a_value(seed_models, monkeypatch):
    monkeypatch.chdir(seed_models)
    cfg = parse_config({"merge_method": "task_arithmetic", "base_model": SEED_BASE,
                        "models": [{"model": SEED_BASE}, {"model": SEED_FINETUNES[0], "parameters": {"weight": 0.7}},
                                   {"model": SEED_FINETUNES[1]}],
                        "parameters": {"weight": [0.1, 0.9]}})  # a per-model gradient set globally
    plan = compile_config(cfg, open_models(cfg))
    w = plan.params["weight"]  # one callable per model
    assert [f("model.layers.0.mlp.up_proj.weight") for f in w] == [0.7, pytest.approx(0.1)]
    assert [f("model.layers.31.mlp.up_proj.weight") for f in w] == [0.7, pytest.approx(0.9)]


def test_filter_without_fallback_is_an_error_naming_the_tensor(seed_models, monkeypatch):
    monkeypatch.chdir(seed_models)
    cfg = parse_config({"merge_method": "slerp", "base_model": SEED_BASE,
                        "models": [{"model": SEED_BASE}, {"model": SEED_FINETUNES[0]}],
                        "parameters": {"t": [{"filter": "mlp", "value": 0.3}]}})
    with pytest.raises(ParameterError, match="parameter 't' has no value for tensor '(model.embed_tokens|lm_head).weight'"):
        compile_config(cfg, open_models(cfg))


def test_layer_range_beyond_the_model(seed_models, monkeypatch):
    monkeypatch.chdir(seed_models)
    cfg = parse_config({"merge_method": "passthrough",
                        "slices": [{"sources": [{"model": SEED_BASE, "layer_range": [24, 40]}]}]})
    with pytest.raises(ParameterError, match=r"layer_range: \[24, 40\] is out of range: .* has 32 layers"):
        compile_config(cfg, open_models(cfg))


def test_base_model_missing_from_slice(seed_models, monkeypatch):
    monkeypatch.chdir(seed_models)
    cfg = parse_config({"merge_method": "ties", "base_model": SEED_BASE,
                        "slices": [{"sources": [{"model": SEED_FINETUNES[0], "layer_range": [0, 32]},
                                                {"model": SEED_FINETUNES[1], "layer_range": [0, 32]}]}]})
    with pytest.raises(ParameterError, match="base model 'mistralai/Mistral-7B-v0.1' is not among"):
        compile_config(cfg, open_models(cfg))


def test_missing_model_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = parse_config({"merge_method": "linear", "models": [{"model": "./no/such/model"}]})
    with pytest.raises(CheckpointError, match="model './no/such/model' can't be opened"):
        open_models(cfg)


def test_slices_with_a_merge_method_renumber_and_merge_per_slice(seed_models, monkeypatch):
    """Two output slices, each merging other layers of other models (a frankenmerge with linear)."""
    monkeypatch.chdir(seed_models)
    a, b, c = SEED_FINETUNES[:3]
    cfg = {"merge_method": "linear", "parameters": {"weight": 1.0}, "dtype": "float32",
           "slices": [{"sources": [{"model": a, "layer_range": [0, 16]}, {"model": b, "layer_range": [0, 16]}]},
                      {"sources": [{"model": a, "layer_range": [16, 32]}, {"model": c, "layer_range": [8, 24]}]}]}
    out = run_config(cfg, seed_models / "franken-linear", progress=False)
    got, ta, tb, tc = (_load(p) for p in (out, seed_models / a, seed_models / b, seed_models / c))
    assert sorted(got) == sorted(ta)

    def avg(x, y):
        return (x.float() + y.float()) / 2

    for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
        for layer in (0, 15):
            k = f"model.layers.{layer}.{name}"
            torch.testing.assert_close(got[k], avg(ta[k], tb[k]), rtol=0, atol=0)
        for layer in (16, 31):
            k, kc = f"model.layers.{layer}.{name}", f"model.layers.{layer - 8}.{name}"
            torch.testing.assert_close(got[k], avg(ta[k], tc[kc]), rtol=0, atol=0)
    # embeddings come from the first slice's models, the final norm and head from the last slice's (as mergekit)
    torch.testing.assert_close(got["model.embed_tokens.weight"], avg(ta["model.embed_tokens.weight"],
                                                                     tb["model.embed_tokens.weight"]), rtol=0, atol=0)
    torch.testing.assert_close(got["lm_head.weight"], avg(ta["lm_head.weight"], tc["lm_head.weight"]), rtol=0, atol=0)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 32


def test_passthrough_stacks_and_renumbers(seed_models, monkeypatch):
    monkeypatch.chdir(seed_models)
    out = run_config(SEED_CONFIGS[3], seed_models / "passthrough-9b", progress=False)
    got, first, second = (_load(p) for p in (out, seed_models / SEED_FINETUNES[0], seed_models / SEED_FINETUNES[1]))
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 40
    assert torch.equal(got["model.layers.31.mlp.up_proj.weight"], first["model.layers.31.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.32.mlp.up_proj.weight"], second["model.layers.24.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.39.self_attn.o_proj.weight"], second["model.layers.31.self_attn.o_proj.weight"])
    assert torch.equal(got["model.embed_tokens.weight"], first["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], second["model.norm.weight"])  # mergekit: from the last slice
    assert _leftovers(seed_models) == []


@pytest.mark.parametrize("index", range(5))
def test_seed_config_runs_unchanged(seed_models, monkeypatch, index):
    monkeypatch.chdir(seed_models)
    cfg = SEED_CONFIGS[index]
    out = run_config(cfg, seed_models / f"seed-{cfg.stem}", progress=False)
    merged = _load(out)
    base = _load(seed_models / SEED_BASE)
    assert merged.keys() >= base.keys()
    assert all(torch.isfinite(t.float()).all() for t in merged.values())
    want = {"bfloat16": torch.bfloat16, "float16": torch.float16}[parse_config(cfg).dtype]
    assert {t.dtype for t in merged.values()} == {want}
    assert (out / "README.md").read_text().startswith("---\nbase_model:")
    assert _leftovers(seed_models) == []


def test_model_plus_lora_applies_the_adapter(tmp_path, monkeypatch):
    """mergekit's `model+adapter` syntax: the model with the LoRA delta B A * alpha / r applied."""
    import copy

    import peft

    from tests.helpers import save_model, tiny_llama

    monkeypatch.chdir(tmp_path)
    base = tiny_llama(seed=3)
    save_model(base, tmp_path / "base")
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                                      init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    expected = lora.merge_and_unload().state_dict()
    cfg = {"merge_method": "linear", "models": [{"model": "base+adapter", "parameters": {"weight": 1.0}}],
           "dtype": "float32"}
    got = _load(run_config(cfg, tmp_path / "merged", progress=False))
    k = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(got[k], base.state_dict()[k])
    torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["model.layers.1.mlp.up_proj.weight"], base.state_dict()["model.layers.1.mlp.up_proj.weight"])


def test_parameter_table_shows_what_gradients_resolved_to(seed_models, monkeypatch):
    from taskvec.config import plan_config

    monkeypatch.chdir(seed_models)
    plan = plan_config(SEED_CONFIGS[0])
    table = plan.parameter_table()
    assert set(table["parameter"]) == {"t"} and len(table) == len(plan.tensor_names)
    at = table.set_index("tensor")["value"]
    assert at["model.layers.31.self_attn.q_proj.weight"] == pytest.approx(1.0)
    assert at["model.layers.0.mlp.up_proj.weight"] == pytest.approx(1.0)
    assert at["model.norm.weight"] == 0.5
    text = plan.describe()
    assert "t varies by tensor" in text and "self_attn.*" in text and "mlp.*" in text
    ties = plan_config(SEED_CONFIGS[1]).parameter_table()
    weights = ties[(ties.parameter == "weight") & (ties.tensor == "lm_head.weight")]
    assert weights.set_index("model")["value"].to_dict() == {SEED_FINETUNES[0]: 0.5, SEED_FINETUNES[1]: 0.3}
