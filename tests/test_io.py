"""Checkpoint sources and the atomic writer, on real formats."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from taskvec import TaskVector
from taskvec.errors import CheckpointError, KeyMismatchError, OutputError, ShapeMismatchError
from taskvec.io import ShardedWriter, TensorMeta, open_source, save_safetensors
from tests.helpers import perturbed, save_model, tiny_bert


def _sd():
    return {"a.weight": torch.tensor([[1.0, -2.0], [3.0, 0.5]]), "a.bias": torch.tensor([0.25, -0.75]),
            "h.bf": torch.tensor([1.5, 2.0, -3.0], dtype=torch.bfloat16), "ids": torch.arange(4)}


def _metas(sd):
    return {k: TensorMeta(tuple(v.shape), v.dtype) for k, v in sd.items()}


def test_safetensors_file_matches_reference_library(tmp_path):
    sd = _sd()
    save_safetensors(sd, tmp_path / "ours.safetensors")
    ref = load_file(tmp_path / "ours.safetensors")  # the official reader accepts what we write
    save_file(sd, tmp_path / "theirs.safetensors")
    ours = open_source(tmp_path / "theirs.safetensors")  # and we read what it writes
    for k, v in sd.items():
        assert torch.equal(ref[k], v) and ref[k].dtype == v.dtype
        assert torch.equal(ours.get(k), v) and ours.meta(k).dtype == v.dtype
    assert ours.meta("a.weight").shape == (2, 2)


def test_sharded_writer_writes_index_and_any_order(tmp_path):
    sd = _sd()
    with ShardedWriter(tmp_path / "out", _metas(sd), max_shard_size=16) as w:
        for k in reversed(list(sd)):
            w.add(k, sd[k])
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd)
    assert len(set(index["weight_map"].values())) > 1
    src = open_source(tmp_path / "out")
    assert all(torch.equal(src.get(k), v) for k, v in sd.items())
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left


def test_writer_leaves_nothing_on_error(tmp_path):
    sd = _sd()
    with pytest.raises(RuntimeError):
        with ShardedWriter(tmp_path / "out", _metas(sd)) as w:
            w.add("a.weight", sd["a.weight"])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_missing_tensor_and_cleans_up(tmp_path):
    sd = _sd()
    w = ShardedWriter(tmp_path / "out", _metas(sd))
    w.add("a.weight", sd["a.weight"])
    with pytest.raises(CheckpointError, match="never written"):
        w.commit()
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_undeclared_and_wrong_shape(tmp_path):
    sd = _sd()
    with pytest.raises(OutputError, match="'zzz'"):
        with ShardedWriter(tmp_path / "out", _metas(sd)) as w:
            w.add("zzz", torch.zeros(1))
    with pytest.raises(CheckpointError, match="'a.bias'"):
        with ShardedWriter(tmp_path / "out", _metas(sd)) as w:
            w.add("a.bias", torch.zeros(3))
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_existing_output(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        ShardedWriter(tmp_path / "out", _metas(_sd()))


@pytest.fixture
def bert_pair(tmp_path):
    base = tiny_bert()
    ft = perturbed(base)
    return base, ft


def _as(kind: str, model, tmp: Path, tag: str):
    """The same weights in every supported format."""
    sd = model.state_dict()
    if kind == "module":
        return model
    if kind == "dict":
        return sd
    if kind == "safetensors":
        save_safetensors({k: v.contiguous() for k, v in sd.items()}, tmp / f"{tag}.safetensors")
        return tmp / f"{tag}.safetensors"
    if kind == "bin":
        torch.save(sd, tmp / f"{tag}.bin")
        return tmp / f"{tag}.bin"
    if kind == "pt_nested":
        torch.save({"state_dict": sd, "epoch": 3}, tmp / f"{tag}.pt")
        return tmp / f"{tag}.pt"
    if kind == "hf_dir":
        return save_model(model, tmp / f"{tag}_hf")
    if kind == "hf_sharded":
        return save_model(model, tmp / f"{tag}_sharded", max_shard_size="20KB")
    if kind == "bin_dir":
        return save_model(model, tmp / f"{tag}_bin", safe_serialization=False) if _bin_supported() else model
    raise AssertionError(kind)


def _bin_supported() -> bool:
    import inspect

    from transformers import PreTrainedModel

    return "safe_serialization" in inspect.signature(PreTrainedModel.save_pretrained).parameters


KINDS = ["module", "dict", "safetensors", "bin", "pt_nested", "hf_dir", "hf_sharded"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_source_gives_the_same_task_vector(kind, bert_pair, tmp_path):
    base, ft = bert_pair
    expected = {k: (ft.state_dict()[k].float() - v.float()) for k, v in base.state_dict().items() if v.is_floating_point()}
    tv = TaskVector.from_models(_as(kind, base, tmp_path, "base"), _as(kind, ft, tmp_path, "ft"))
    assert set(tv) == set(expected)
    for k, v in expected.items():
        assert torch.equal(tv[k], v), k
    if kind == "hf_sharded":
        assert (tmp_path / "ft_sharded" / "model.safetensors.index.json").is_file()


def test_hf_dir_output_loads_with_from_pretrained(bert_pair, tmp_path):
    from transformers import BertModel

    base, ft = bert_pair
    b = save_model(base, tmp_path / "base")
    f = save_model(ft, tmp_path / "ft")
    out = TaskVector.from_models(b, f).apply_to(b, out=tmp_path / "merged", max_shard_size="10KB")
    assert (out / "config.json").is_file() and (out / "model.safetensors.index.json").is_file()
    loaded = BertModel.from_pretrained(out).eval()
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).last_hidden_state, ft(ids).last_hidden_state, atol=1e-6)


def test_hub_id_resolves_through_snapshot_download(bert_pair, tmp_path, monkeypatch):
    import huggingface_hub

    base, _ = bert_pair
    local = save_model(base, tmp_path / "snap")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, tuple(allow_patterns or ())))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    src = open_source("someone/tiny-bert")
    assert src.name == "someone/tiny-bert" and calls[0][0] == "someone/tiny-bert"
    assert "*.safetensors" in calls[0][1]
    assert set(src.keys()) == set(base.state_dict())


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("We couldn't connect to the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="someone/model-that-needs-network"):
        open_source("someone/model-that-needs-network")


# ------------------------------------------------------------------ LoRA adapters
def _peft_reference(base, config, tmp_path):
    """Save `base` and a PEFT adapter (all LoRA weights random, so every factor matters); return the
    adapter folder, the base folder and PEFT's own merge_and_unload state dict."""
    peft = pytest.importorskip("peft")
    import copy

    model = peft.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload().state_dict()
    save_model(base, tmp_path / "base")
    return tmp_path / "adapter", tmp_path / "base", merged


def _check_against_peft(adapter, base_dir, base, merged, touched):
    tv = TaskVector.from_lora(adapter, base_dir)
    assert set(tv) == touched
    sd = base.state_dict()
    for k in tv:
        assert torch.allclose(tv[k], merged[k] - sd[k], atol=1e-6), k
    applied = tv.apply_to(base_dir)
    for k, v in merged.items():
        assert torch.allclose(applied[k], v, atol=1e-6), k
    return tv


def test_lora_adapter_task_vector_is_scaled_BA(bert_pair, tmp_path):
    peft = pytest.importorskip("peft")
    base, _ = bert_pair
    cfg = peft.LoraConfig(r=2, lora_alpha=8, target_modules=["query", "value"])
    adapter, base_dir, merged = _peft_reference(base, cfg, tmp_path)
    # (alpha/r) * B @ A == what PEFT's own merge adds; applying τ gives the merged model, untouched tensors copied
    tv = _check_against_peft(adapter, base_dir, base, merged,
                             {k for k in base.state_dict() if ("query.weight" in k or "value.weight" in k)})
    a = load_file(adapter / "adapter_model.safetensors")
    k0 = "encoder.layer.0.attention.self.query.weight"
    A = a["base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"]
    B = a["base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"]
    assert torch.allclose(tv[k0], (8 / 2) * B @ A)


def test_lora_target_missing_in_base_names_module(bert_pair, tmp_path):
    peft = pytest.importorskip("peft")
    base, _ = bert_pair
    import copy

    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["query"]))
    model.save_pretrained(tmp_path / "adapter")
    other = {k.replace("query", "q_proj"): v for k, v in base.state_dict().items()}
    with pytest.raises(CheckpointError, match="query"):
        TaskVector.from_lora(tmp_path / "adapter", other)


def test_rslora_matches_peft(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_bert()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["query"])
    adapter, base_dir, merged = _peft_reference(base, cfg, tmp_path)
    tv = _check_against_peft(adapter, base_dir, base, merged,
                             {f"encoder.layer.{i}.attention.self.query.weight" for i in range(2)})
    # rsLoRA scales by alpha / sqrt(r) = 4, not alpha / r = 2
    a = load_file(adapter / "adapter_model.safetensors")
    pre = "base_model.model.encoder.layer.0.attention.self.query"
    ba = a[f"{pre}.lora_B.weight"] @ a[f"{pre}.lora_A.weight"]
    assert torch.allclose(tv["encoder.layer.0.attention.self.query.weight"], 4 * ba, atol=1e-6)


def test_rank_and_alpha_patterns_match_peft(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_bert()
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                          rank_pattern={"layer.1.attention.self.query": 6}, alpha_pattern={"value": 12})
    adapter, base_dir, merged = _peft_reference(base, cfg, tmp_path)
    touched = {f"encoder.layer.{i}.attention.self.{m}.weight" for i in range(2) for m in ("query", "value")}
    _check_against_peft(adapter, base_dir, base, merged, touched)
    a = load_file(adapter / "adapter_model.safetensors")
    assert a["base_model.model.encoder.layer.1.attention.self.query.lora_A.weight"].shape[0] == 6  # pattern used


def test_fan_in_fan_out_gpt2_conv1d_matches_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    base = GPT2Model(GPT2Config(vocab_size=40, n_positions=16, n_embd=8, n_layer=2, n_head=2)).eval()
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    adapter, base_dir, merged = _peft_reference(base, cfg, tmp_path)
    touched = {f"h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")}
    tv = _check_against_peft(adapter, base_dir, base, merged, touched)
    assert tv["h.0.attn.c_attn.weight"].shape == (8, 24)  # Conv1D's [in, out]: the update is (B A)^T


def test_embedding_lora_matches_peft(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_bert()
    cfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["word_embeddings", "query"])
    adapter, base_dir, merged = _peft_reference(base, cfg, tmp_path)
    a = load_file(adapter / "adapter_model.safetensors")
    assert any("lora_embedding_A" in k for k in a)
    touched = {"embeddings.word_embeddings.weight"} | {f"encoder.layer.{i}.attention.self.query.weight" for i in range(2)}
    tv = _check_against_peft(adapter, base_dir, base, merged, touched)
    # apply_to(dtype=): the tensors the adapter leaves alone follow the dtype too
    half = tv.apply_to(base_dir, dtype=torch.float16)
    assert {v.dtype for v in half.values() if v.is_floating_point()} == {torch.float16}
    assert torch.equal(half["pooler.dense.weight"], base.state_dict()["pooler.dense.weight"].half())


# ------------------------------------------------------------------ bad inputs
def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        open_source(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        open_source(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("damage", ["truncated", "zero_length", "header_garbage", "header_too_long"])
def test_damaged_safetensors_is_named(damage, tmp_path, hash_tree):
    p = tmp_path / "m.safetensors"
    save_safetensors(_sd(), p)
    raw = p.read_bytes()
    if damage == "truncated":
        p.write_bytes(raw[:-7])
    elif damage == "zero_length":
        p.write_bytes(b"")
    elif damage == "header_garbage":
        p.write_bytes(raw[:8] + b"{not json" + raw[17:])
    else:
        p.write_bytes((10**12).to_bytes(8, "little") + raw[8:])
    before = hash_tree(tmp_path)
    with pytest.raises(CheckpointError, match="m.safetensors"):
        TaskVector.from_models(p, p)
    assert hash_tree(tmp_path) == before


def test_index_pointing_to_missing_shard(bert_pair, tmp_path):
    base, _ = bert_pair
    d = save_model(base, tmp_path / "sharded", max_shard_size="20KB")
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        open_source(d).keys()


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(CheckpointError, match="evil.bin.*weights_only"):
        open_source(tmp_path / "evil.bin")
    assert not marker.exists()


def test_key_missing_in_one_model_is_named(tmp_path):
    a = _sd()
    b = {k: v for k, v in a.items() if k != "a.bias"}
    with pytest.raises(KeyMismatchError, match="a.bias"):
        TaskVector.from_models(a, b)
    tv = TaskVector.from_models(a, b, keys="intersection")
    assert "a.bias" not in tv and tv.skipped["a.bias"] == "only in base"


def test_shape_mismatch_is_named():
    a = _sd()
    b = dict(a, **{"a.weight": torch.zeros(3, 2)})
    with pytest.raises(ShapeMismatchError, match="a.weight"):
        TaskVector.from_models(a, b)


def test_non_float_model_has_no_task_vector():
    ints = {"ids": torch.arange(3), "mask": torch.ones(2, dtype=torch.bool)}
    tv = TaskVector.from_models(ints, ints)
    assert len(tv) == 0 and set(tv.skipped) == {"ids", "mask"}
    with pytest.raises(ShapeMismatchError, match="ids"):
        TaskVector.from_models(ints, {"ids": torch.zeros(3), "mask": ints["mask"]})


def test_output_equal_to_input_is_refused_and_inputs_untouched(bert_pair, tmp_path, hash_tree):
    base, ft = bert_pair
    b = save_model(base, tmp_path / "base")
    f = save_model(ft, tmp_path / "ft")
    before = hash_tree(tmp_path)
    tv = TaskVector.from_models(b, f)
    for out in (b, f, b / "sub", tmp_path):
        with pytest.raises(OutputError):
            tv.apply_to(b, out=out, overwrite=True)
    with pytest.raises(OutputError):
        tv.save(f / "model.safetensors", overwrite=True)
    assert hash_tree(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft"]
