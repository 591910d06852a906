"""LoRA extraction (`TaskVector.to_lora`, `taskvec extract-lora`): the factors, the PEFT folder, the round
trips through `from_lora` and through peft itself (plain and tied embeddings), and bad input."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from taskvec.cli import main
from taskvec.errors import OutputError, ParameterError
from taskvec.io.lora_export import energy_rank, factorize
from taskvec.vector import TaskVector

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


# ------------------------------------------------------------------ factors on tiny tensors
def test_factorize_is_the_truncated_svd():
    torch.manual_seed(0)
    x = torch.randn(12, 7)
    B, A, S = factorize(x, 3)
    assert B.shape == (12, 3) and A.shape == (3, 7)
    U, S_all, Vh = torch.linalg.svd(x, full_matrices=False)
    torch.testing.assert_close(B @ A, (U[:, :3] * S_all[:3]) @ Vh[:3], rtol=1e-5, atol=1e-5)
    # Eckart–Young: the error is the energy of the dropped singular values
    err = torch.linalg.matrix_norm(x - B @ A) / torch.linalg.matrix_norm(x)
    assert float(err) == pytest.approx(float(S_all[3:].square().sum().sqrt() / S_all.square().sum().sqrt()), rel=1e-4)
    B, A, _ = factorize(x, 50)  # capped at min(m, n): exact
    torch.testing.assert_close(B @ A, x, rtol=1e-5, atol=1e-5)


def test_energy_rank_is_the_smallest_k_reaching_the_share():
    S = torch.tensor([3.0, 2.0, 1.0, 0.0])  # σ² = 9, 4, 1, 0 of 14
    assert energy_rank(S, 9 / 14) == 1
    assert energy_rank(S, 9 / 14 + 1e-3) == 2
    assert energy_rank(S, 0.99) == 3
    assert energy_rank(S, 1.0) == 3
    _, _, kept = factorize(torch.diag(S), energy=0.9)
    assert len(kept) == 2


# ------------------------------------------------------------------ tiny transformers models
def _pair(make, folder, name: str = ""):
    """(base folder, fine-tuned folder): a seeded random model and the same with every parameter perturbed."""
    torch.manual_seed(0)
    model = make()
    base, ft = folder / f"{name}base", folder / f"{name}ft"
    model.save_pretrained(base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(ft)
    return base, ft


def _llama(tmp_path, tie: bool, name: str):
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie)
    return _pair(lambda: transformers.LlamaForCausalLM(cfg), tmp_path, name + "-")


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora-export")
    return {tie: _llama(d, tie, "tied" if tie else "untied") for tie in (False, True)}


def _peft_logits(base_dir, adapter_dir, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    with warnings.catch_warnings():  # tied: peft notes that lm_head's (tied) LoRA keys are not in the file
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(model, adapter_dir)
    with torch.no_grad():
        return pm(ids).logits


def _reference_logits(base_dir, state, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_full_rank_round_trip_and_peft_forward(llamas, tmp_path, tie):
    base, ft = llamas[tie]
    tv = TaskVector.from_models(base, ft)
    export = tv.to_lora(tmp_path / "adapter")
    out = export.path
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "lora_report.csv"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    # from_lora reproduces τ to float32 rounding at full rank
    back = TaskVector.from_lora(out, base)
    assert set(back.metas) == set(tv.metas)
    for k in tv:
        torch.testing.assert_close(back[k], tv[k], rtol=0, atol=2e-6 * max(1.0, float(tv[k].abs().max())))
    rep = export.report
    assert list(rep.columns) == ["module", "tensor", "shape", "kind", "rank", "rel_error", "energy_kept",
                                 "norm_share"]
    assert rep.norm_share.sum() == pytest.approx(1.0)
    assert rep[rep.kind.str.startswith("lora")].rel_error.max() < 1e-5
    # peft on the base model gives the forward of θ₀ + τ
    ids = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(1))
    want = _reference_logits(base, back.apply_to(base, show_progress=False), ids)
    torch.testing.assert_close(_peft_logits(base, out, ids), want, rtol=1e-5, atol=1e-5)
    ft_model = transformers.AutoModelForCausalLM.from_pretrained(ft)
    with torch.no_grad():
        torch.testing.assert_close(want, ft_model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("how", [{"rank": 3}, {"energy": 0.8}], ids=["rank3", "energy0.8"])
def test_truncated_adapter_in_peft_equals_base_plus_tau_r(llamas, tmp_path, tie, how):
    base, ft = llamas[tie]
    tv = TaskVector.from_models(base, ft)
    export = tv.to_lora(tmp_path / "adapter", how.get("rank"), energy=how.get("energy"))
    cfg = json.loads((export.path / "adapter_config.json").read_text())
    rep = export.report
    lora = rep[rep.kind.str.startswith("lora")]
    if "rank" in how:
        assert set(lora["rank"]) == {3} and cfg["r"] == 3 and not cfg["rank_pattern"]
    else:  # the ranks vary per module, each recorded in rank_pattern / alpha_pattern
        assert (lora.energy_kept >= 0.8 - 1e-6).all()
        assert cfg["rank_pattern"] == cfg["alpha_pattern"]
        for row in lora.itertuples():
            want = cfg["rank_pattern"].get(row.module.replace(".", "\\."), cfg["r"])
            assert row.rank == want
    assert (lora.rel_error ** 2 + lora.energy_kept).between(1 - 1e-4, 1 + 1e-4).all()  # Pythagoras
    back = TaskVector.from_lora(export.path, base)
    for row in lora.itertuples():  # from_lora reads back exactly τ_r: its error is the reported one
        d, t = back[row.tensor], tv[row.tensor]
        assert float(torch.linalg.matrix_norm(t - d) / torch.linalg.matrix_norm(t)) == pytest.approx(row.rel_error,
                                                                                                      rel=1e-3)
    ids = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(2))
    want = _reference_logits(base, back.apply_to(base, show_progress=False), ids)
    torch.testing.assert_close(_peft_logits(base, export.path, ids), want, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_get_one_adapter(llamas, tmp_path):
    base, ft = llamas[True]
    tv = TaskVector.from_models(base, ft)
    assert "lm_head.weight" not in tv.metas  # a tied checkpoint stores one tensor
    export = tv.to_lora(tmp_path / "adapter", 4)
    keys = load_file(export.path / "adapter_model.safetensors")
    assert not [k for k in keys if "lm_head" in k]
    assert keys["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 48)
    assert keys["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (16, 4)
    cfg = json.loads((export.path / "adapter_config.json").read_text())
    assert cfg["ensure_weight_tying"] is True
    # the untied model: lm_head gets its own (Linear) adapter, and no weight tying
    tv2 = TaskVector.from_models(*llamas[False])
    export2 = tv2.to_lora(tmp_path / "untied", 4)
    keys2 = load_file(export2.path / "adapter_model.safetensors")
    assert keys2["base_model.model.lm_head.lora_A.weight"].shape == (4, 16)
    assert json.loads((export2.path / "adapter_config.json").read_text())["ensure_weight_tying"] is False


def test_tied_pair_stored_twice_must_agree(llamas, tmp_path):
    from safetensors.torch import save_file

    base, ft = llamas[True]
    sd_b, sd_f = load_file(base / "model.safetensors"), load_file(ft / "model.safetensors")
    for name, sd in (("b", sd_b), ("f", sd_f)):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((base / "config.json").read_text())
        save_file({**sd, "lm_head.weight": sd["model.embed_tokens.weight"].clone()}, d / "model.safetensors")
    tv = TaskVector.from_models(tmp_path / "b", tmp_path / "f")
    rep = tv.to_lora(tmp_path / "ok", 2).report
    assert rep.set_index("tensor").loc["lm_head.weight", "kind"] == "tied"
    sd_f["lm_head.weight"] = sd_f["model.embed_tokens.weight"] + 1.0
    save_file(sd_f, tmp_path / "f" / "model.safetensors")
    with pytest.raises(ParameterError, match="tied to the input embedding"):
        TaskVector.from_models(tmp_path / "b", tmp_path / "f").to_lora(tmp_path / "bad", 2)
    assert not (tmp_path / "bad").exists()


def test_non_matrix_deltas_full_weights_or_dropped(tmp_path):
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=24)
    _pair(lambda: transformers.BertModel(cfg, add_pooling_layer=False), tmp_path)
    tv = TaskVector.from_models(tmp_path / "base", tmp_path / "ft")
    export = tv.to_lora(tmp_path / "adapter")
    rep = export.report.set_index("tensor")
    assert rep.loc["embeddings.word_embeddings.weight", "kind"] == "lora_embedding"
    assert rep.loc["encoder.layer.0.attention.self.query.weight", "kind"] == "lora"
    assert rep.loc["embeddings.LayerNorm.weight", "kind"] == "full"  # modules_to_save
    assert rep.loc["encoder.layer.0.attention.self.query.bias", "kind"] == "dropped"  # a LoRA target's bias
    dropped = rep[rep.kind == "dropped"]
    assert 0 < dropped.norm_share.sum() < 0.1
    cfg_json = json.loads((export.path / "adapter_config.json").read_text())
    assert "embeddings.LayerNorm" in cfg_json["modules_to_save"]
    # from_lora: matrices and saved modules exact; dropped biases zero
    back = TaskVector.from_lora(export.path, tmp_path / "base")
    torch.testing.assert_close(back["embeddings.LayerNorm.bias"], tv["embeddings.LayerNorm.bias"], rtol=0, atol=1e-6)
    assert "encoder.layer.0.attention.self.query.bias" not in back.metas  # dropped: the base value stays
    # peft loads it: its forward is θ₀ + τ without the dropped biases
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(3))
    pm = peft.PeftModel.from_pretrained(transformers.BertModel.from_pretrained(tmp_path / "base"), export.path)
    ref = transformers.BertModel.from_pretrained(tmp_path / "base")
    ref.load_state_dict(back.apply_to(tmp_path / "base", show_progress=False), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).last_hidden_state, ref(ids).last_hidden_state, rtol=1e-5, atol=1e-5)
    # extras="drop": nothing but LoRA factors
    rep2 = tv.to_lora(tmp_path / "lean", 2, extras="drop").report
    assert set(rep2.kind) == {"lora", "lora_embedding", "dropped"}
    assert json.loads((tmp_path / "lean" / "adapter_config.json").read_text())["modules_to_save"] is None


def test_gpt2_conv1d_and_tied_wte(tmp_path):
    # Conv1D stores W as [in, out] (fan_in_fan_out); lm_head is tied to `wte`, a name peft's list matching
    # does not know as an embedding: the regex target still gives lm_head the tied LoRA
    cfg = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    _pair(lambda: transformers.GPT2LMHeadModel(cfg), tmp_path)
    tv = TaskVector.from_models(tmp_path / "base", tmp_path / "ft")
    export = tv.to_lora(tmp_path / "adapter", 3)
    cfg_json = json.loads((export.path / "adapter_config.json").read_text())
    assert cfg_json["fan_in_fan_out"] is True and cfg_json["ensure_weight_tying"] is True
    back = TaskVector.from_lora(export.path, tmp_path / "base")
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(4))
    want = _reference_logits(tmp_path / "base", back.apply_to(tmp_path / "base", show_progress=False), ids)
    torch.testing.assert_close(_peft_logits(tmp_path / "base", export.path, ids), want, rtol=1e-5, atol=1e-5)


def test_plain_state_dicts_without_config(tmp_path):
    # no config.json: module kinds from names (embed -> embedding), non-2-D kept as full weights from the base
    torch.manual_seed(0)
    base = {"embed.weight": torch.randn(10, 4), "proj.weight": torch.randn(6, 4), "proj.bias": torch.randn(6),
            "norm.weight": torch.ones(4), "scale": torch.ones(3)}
    ft = {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()}
    tv = TaskVector.from_models(base, ft)
    export = tv.to_lora(tmp_path / "a", 2)
    kinds = dict(zip(export.report.tensor, export.report.kind))
    assert kinds == {"embed.weight": "lora_embedding", "proj.weight": "lora", "proj.bias": "dropped",
                     "norm.weight": "full", "scale": "dropped"}  # a top-level parameter has no module to save


# ------------------------------------------------------------------ bad input
def test_bad_options(llamas, tmp_path):
    tv = TaskVector.from_models(*llamas[False])
    for kw, msg in (({"rank": 0}, "rank"), ({"rank": 2.5}, "rank"), ({"energy": 0.0}, "energy"),
                    ({"energy": 1.5}, "energy"), ({"rank": 2, "energy": 0.5}, "not both"),
                    ({"rank": 2, "extras": "keep"}, "extras")):
        rank = kw.pop("rank", None)
        with pytest.raises(ParameterError, match=msg):
            tv.to_lora(tmp_path / "x", rank, **kw)
    assert not list(tmp_path.iterdir())
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        tv.to_lora(tmp_path / "exists", 2)
    zero = TaskVector.from_models(llamas[False][0], llamas[False][0])
    with pytest.raises(ParameterError, match="zero everywhere"):
        zero.to_lora(tmp_path / "zero", 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_failure_while_writing_leaves_nothing(llamas, tmp_path, monkeypatch):
    import taskvec.io.lora_export as mod

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mod, "save_safetensors", boom)
    with pytest.raises(OSError):
        TaskVector.from_models(*llamas[False]).to_lora(tmp_path / "out", 2)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ command line
def test_cli_extract_lora(llamas, tmp_path, capsys):
    base, ft = llamas[False]
    rc = main(["extract-lora", str(base), str(ft), str(tmp_path / "a"), "--energy", "0.9"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "model.layers.0.self_attn.q_proj.weight" in text and "rel_error" in text and "LoRA adapter" in text
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    assert main(["extract-lora", str(base), str(ft), str(tmp_path / "b"), "--rank", "full"]) == 0
    back = TaskVector.from_lora(tmp_path / "b", base)
    tv = TaskVector.from_models(base, ft)
    torch.testing.assert_close(back["lm_head.weight"], tv["lm_head.weight"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("args, message, code", [
    (["--rank", "0"], "--rank: expected a positive integer", 2),
    (["--energy", "1.5"], "--energy: expected a share", 2),
    (["--rank", "2", "--energy", "0.5"], "not allowed with", 2),
    ([], "one of the arguments --rank --energy is required", 2),
])
def test_cli_bad_arguments(llamas, tmp_path, capsys, args, message, code):
    base, ft = llamas[False]
    with pytest.raises(SystemExit) as e:
        main(["extract-lora", str(base), str(ft), str(tmp_path / "out"), *args])
    assert e.value.code == code
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cli_bad_inputs_name_the_file(llamas, tmp_path, capsys, hash_tree):
    base, ft = llamas[False]
    before = hash_tree(base, ft)
    assert main(["extract-lora", str(base), str(tmp_path / "missing"), str(tmp_path / "out"), "--rank", "2"]) == 1
    assert "missing" in capsys.readouterr().err
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "bert")
    assert main(["extract-lora", str(base), str(tmp_path / "bert"), str(tmp_path / "out"), "--rank", "2"]) == 1
    err = capsys.readouterr().err
    assert "taskvec extract-lora: error:" in err and "model.embed_tokens.weight" in err
    assert main(["extract-lora", str(base), str(ft), str(base), "--rank", "2", "--overwrite"]) == 1
    assert "input" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert hash_tree(base, ft) == before



def test_cli_help_does_not_import_torch():
    # the argparse part of extract-lora lives in taskvec.cli: `--help` stays fast (see test_cli for merge)
    import subprocess
    import sys

    code = ("import sys, contextlib, io; from taskvec.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
            "    main(['extract-lora', '--help'])\n"
            "print('--energy' in out.getvalue(), 'torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["True", "False"]
