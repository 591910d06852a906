"""TaskVector against EMTA's equations on tiny hand-computed tensors, plus invariants."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from taskvec import TaskVector, analogy
from taskvec.errors import CheckpointError, ParameterError, ShapeMismatchError
from taskvec.io import StateDictSource

BASE = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5]), "pos": torch.tensor([0, 1, 2])}
FT_A = {"w": torch.tensor([1.5, 2.0, 2.0]), "b": torch.tensor([0.25]), "pos": torch.tensor([0, 1, 2])}
FT_B = {"w": torch.tensor([0.0, 4.0, 3.0]), "b": torch.tensor([0.5]), "pos": torch.tensor([0, 1, 2])}


def test_extraction_is_ft_minus_base():
    tv = TaskVector.from_models(BASE, FT_A)
    assert torch.equal(tv["w"], torch.tensor([0.5, 0.0, -1.0]))
    assert torch.equal(tv["b"], torch.tensor([-0.25]))
    assert "pos" not in tv and "pos" in tv.skipped  # integer buffers carry no delta
    assert tv["w"].dtype == torch.float32


def test_arithmetic_by_hand():
    a, b = TaskVector.from_models(BASE, FT_A), TaskVector.from_models(BASE, FT_B)
    # τ_B = [-1, 2, 0], [0]
    assert torch.equal((a + b)["w"], torch.tensor([-0.5, 2.0, -1.0]))
    assert torch.equal((a - b)["w"], torch.tensor([1.5, -2.0, -1.0]))
    assert torch.equal((-a)["w"], torch.tensor([-0.5, 0.0, 1.0]))
    assert torch.equal((0.5 * a)["w"], torch.tensor([0.25, 0.0, -0.5]))
    assert torch.equal((a * 2)["b"], torch.tensor([-0.5]))
    assert torch.equal((a / 2)["w"], torch.tensor([0.25, 0.0, -0.5]))
    assert torch.equal(sum([a, b, a])["w"], torch.tensor([0.0, 2.0, -2.0]))


def test_apply_to_is_base_plus_lambda_tau():
    a = TaskVector.from_models(BASE, FT_A)
    out = a.apply_to(BASE, scaling=0.5)
    assert torch.equal(out["w"], torch.tensor([1.25, 2.0, 2.5]))
    assert torch.equal(out["pos"], BASE["pos"])  # buffers copied
    neg = (-a).apply_to(BASE, scaling=1.0)  # negation: θ₀ − τ
    assert torch.equal(neg["w"], torch.tensor([0.5, 2.0, 4.0]))
    assert torch.equal(a.apply_to(scaling=1.0)["w"], FT_A["w"])  # base remembered


def test_analogy_is_c_plus_b_minus_a():
    a = TaskVector.from_models(BASE, FT_A)
    b = TaskVector.from_models(BASE, FT_B)
    c = 3 * a
    d = analogy(a, b, c)
    assert torch.equal(d["w"], c["w"] + b["w"] - a["w"])
    assert torch.equal(d["w"], torch.tensor([0.0, 2.0, -2.0]))


def test_composition_is_lazy():
    class Counting(StateDictSource):
        reads = 0

        def get(self, key):
            Counting.reads += 1
            return super().get(key)

    a = TaskVector.from_models(Counting(BASE), Counting(FT_A))
    b = TaskVector.from_models(Counting(BASE), Counting(FT_B))
    combo = -(0.5 * (a + b)) - analogy(a, b, a) * 3
    assert Counting.reads == 0  # nothing materialised by composing
    _ = combo["w"]
    assert Counting.reads > 0


def test_expression_and_repr():
    a = TaskVector.from_models(StateDictSource(BASE, "base"), StateDictSource(FT_A, "ft_a"))
    b = TaskVector.from_models(StateDictSource(BASE, "base"), StateDictSource(FT_B, "ft_b"))
    e = (0.5 * a - b).expression
    assert e == "0.5·τ[ft_a] − τ[ft_b]"
    r = repr(a)
    for field in ("TaskVector", "tensors", "parameters", "‖τ‖₂", "base", "skipped"):
        assert field in r
    assert f"{a.norm():.4g}" in r
    assert "<table>" in a._repr_html_()


def test_norm_and_cosine_by_hand():
    x = TaskVector.from_models({"w": torch.zeros(2)}, {"w": torch.tensor([3.0, 4.0])})
    y = TaskVector.from_models({"w": torch.zeros(2)}, {"w": torch.tensor([-4.0, 3.0])})
    assert x.norm() == pytest.approx(5.0)
    assert x.cosine(y) == pytest.approx(0.0)
    assert x.cosine(x) == pytest.approx(1.0)
    assert x.cosine(-x) == pytest.approx(-1.0)


def test_save_load_roundtrip_with_metadata(tmp_path):
    a = TaskVector.from_models(StateDictSource(BASE, "base"), StateDictSource(FT_A, "ft_a"))
    tv = 0.5 * a
    path = tv.save(tmp_path / "tau.safetensors")
    loaded = TaskVector.load(path)
    assert set(loaded) == set(tv)
    assert torch.equal(loaded["w"], tv["w"])
    assert loaded.base_name == "base" and loaded.base_fingerprint == tv.base_fingerprint
    assert loaded.expression == "0.5·τ[ft_a]"
    assert "pos" in loaded.skipped
    assert torch.equal(loaded.apply_to(BASE)["w"], tv.apply_to(BASE)["w"])
    # loaded vectors compose with fresh ones (same architecture fingerprint)
    assert torch.equal((loaded + a)["w"], (tv + a)["w"])


def test_vectors_of_different_architectures_dont_mix():
    a = TaskVector.from_models(BASE, FT_A)
    other = {"w": torch.zeros(3), "extra": torch.zeros(2)}
    c = TaskVector.from_models(other, other)
    with pytest.raises(ShapeMismatchError, match="different architectures"):
        _ = a + c


def test_align_vocab_option():
    base = {"emb": torch.ones(3, 2)}
    ft = {"emb": torch.cat([torch.full((3, 2), 2.0), torch.full((1, 2), 9.0)])}  # one token added
    with pytest.raises(ShapeMismatchError, match="align_vocab"):
        TaskVector.from_models(base, ft)
    tv = TaskVector.from_models(base, ft, align_vocab=True)
    assert torch.equal(tv["emb"], torch.ones(3, 2))
    assert tv.apply_to(base)["emb"].shape == (3, 2)


def test_nan_in_checkpoint_is_named():
    bad = dict(FT_A, w=torch.tensor([1.0, float("nan"), 2.0]))
    tv = TaskVector.from_models(BASE, StateDictSource(bad, "broken_ft"))
    with pytest.raises(CheckpointError, match="broken_ft.*'w'.*NaN"):
        _ = tv["w"]


def test_bad_scaling_is_named():
    a = TaskVector.from_models(BASE, FT_A)
    with pytest.raises(ParameterError, match="scaling"):
        a.apply_to(BASE, scaling=float("nan"))
    with pytest.raises(ParameterError, match="keys"):
        TaskVector.from_models(BASE, FT_A, keys="loose")


def test_inputs_are_not_mutated():
    base = {k: v.clone() for k, v in BASE.items()}
    ft = {k: v.clone() for k, v in FT_A.items()}
    tv = TaskVector.from_models(base, ft)
    out = (2 * tv + tv).apply_to(base, scaling=3.0)
    out["w"].add_(100)
    for k in BASE:
        assert torch.equal(base[k], BASE[k]) and torch.equal(ft[k], FT_A[k])


# ------------------------------------------------------------------ invariants
floats = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@st.composite
def base_and_ft(draw):
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple))
    base = torch.from_numpy(draw(arrays("float32", shape, elements=floats)))
    # fine-tuning moves weights by a relative amount < 50 %, sign kept: Sterbenz's lemma then
    # makes θ_ft − θ₀ exact in float32, so θ₀ + τ must give θ_ft back bit for bit.
    rel = torch.from_numpy(draw(arrays("float32", shape, elements=st.floats(-0.5, 0.5, width=32))))
    return {"p": base}, {"p": base * (1 + rel)}


@settings(max_examples=60, deadline=None)
@given(base_and_ft())
def test_roundtrip_base_plus_tau_is_exact_float32(pair):
    base, ft = pair
    tv = TaskVector.from_models(base, ft)
    assert torch.equal(tv.apply_to(base)["p"], ft["p"])


@settings(max_examples=60, deadline=None)
@given(base_and_ft())
def test_roundtrip_bf16_is_exact(pair):
    base, ft = ({k: v.bfloat16() for k, v in d.items()} for d in pair)
    out = TaskVector.from_models(base, ft).apply_to(base)
    assert out["p"].dtype == torch.bfloat16 and torch.equal(out["p"], ft["p"])


@settings(max_examples=60, deadline=None)
@given(base_and_ft(), st.floats(-3, 3, allow_nan=False))
def test_negate_twice_and_scaling_are_linear(pair, lam):
    base, ft = pair
    tv = TaskVector.from_models(base, ft)
    assert torch.equal((-(-tv))["p"], tv["p"])
    assert torch.allclose((lam * tv)["p"], lam * tv["p"], rtol=1e-6, atol=1e-6)
    # applying τ then −τ returns the base (within float tolerance)
    there = tv.apply_to(base, scaling=lam)
    back = (-tv).apply_to(there, scaling=lam)
    assert torch.allclose(back["p"], base["p"], rtol=1e-5, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# apply_to(dtype=...) and out=: every tensor in the asked dtype, nothing written on failure

PARTIAL_BASE = {"w": torch.tensor([1.0, 2.0, 3.0]), "only_base": torch.tensor([0.1, 0.2]), "pos": torch.tensor([0, 1, 2])}
PARTIAL_FT = {"w": torch.tensor([1.5, 2.0, 2.0]), "pos": torch.tensor([0, 1, 2])}


def test_apply_to_dtype_covers_tensors_without_a_delta():
    tv = TaskVector.from_models(PARTIAL_BASE, PARTIAL_FT, keys="intersection")
    assert "only_base" in tv.skipped and "only_base" not in tv
    out = tv.apply_to(PARTIAL_BASE, dtype=torch.float16)
    assert out["w"].dtype == out["only_base"].dtype == torch.float16
    assert torch.equal(out["w"], torch.tensor([1.5, 2.0, 2.0], dtype=torch.float16))
    assert torch.equal(out["only_base"], PARTIAL_BASE["only_base"].half())
    assert out["pos"].dtype == torch.int64 and torch.equal(out["pos"], PARTIAL_BASE["pos"])  # buffers keep theirs
    assert tv.apply_to(PARTIAL_BASE, dtype="bfloat16")["only_base"].dtype == torch.bfloat16  # names as merge()
    # no dtype: the base's, and a copy (never the caller's tensor)
    plain = tv.apply_to(PARTIAL_BASE)
    assert plain["only_base"].dtype == torch.float32 and plain["only_base"] is not PARTIAL_BASE["only_base"]


def test_apply_to_out_with_dtype_writes_every_tensor_in_that_dtype(tmp_path):
    from taskvec.io import open_source

    tv = TaskVector.from_models(PARTIAL_BASE, PARTIAL_FT, keys="intersection")
    path = tv.apply_to(PARTIAL_BASE, out=tmp_path / "half", dtype=torch.float16)
    src = open_source(path)
    assert {k: m.dtype for k, m in src.index.items()} == {"w": torch.float16, "only_base": torch.float16,
                                                          "pos": torch.int64}
    assert torch.equal(src.get("only_base"), PARTIAL_BASE["only_base"].half())


def test_apply_to_refuses_bad_dtype_before_writing(tmp_path):
    tv = TaskVector.from_models(PARTIAL_BASE, PARTIAL_FT, keys="intersection")
    for bad in (torch.int8, "float13"):
        with pytest.raises(ParameterError, match="dtype"):
            tv.apply_to(PARTIAL_BASE, out=tmp_path / "out", dtype=bad)
    assert list(tmp_path.iterdir()) == []  # not even a staging folder


def test_apply_to_failing_midway_leaves_no_output(tmp_path):
    base = {"a": torch.zeros(2), "b": torch.zeros(2)}
    ft = {"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])}  # found only when "b" is computed
    tv = TaskVector.from_models(base, ft)
    with pytest.raises(CheckpointError, match="'b'.*NaN"):
        tv.apply_to(base, out=tmp_path / "out", dtype=torch.float16)
    assert list(tmp_path.iterdir()) == []
