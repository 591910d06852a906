"""Fisher diagonal and RegMean Gram matrices, checked against values worked out by hand."""
import math

import pytest
import torch
from torch import nn

from hypothesis import given, settings
from hypothesis import strategies as st

from taskvec.errors import ParameterError
from taskvec.eval.statistics import example_log_likelihood, fisher_diagonal, regmean_grams
from taskvec.methods.statistics import fisher_merge, fisher_norm, fisher_norms, regmean_merge, transposed_names


def zero_linear():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    return model


X = torch.tensor([[1.0, 2.0], [2.0, 0.0]])
Y = torch.tensor([0, 1])


def test_empirical_fisher_matches_hand_computation():
    # W = 0 -> p = (1/2, 1/2); d log p_y / dW = (e_y - p) x^T
    # example 1: x=(1,2), y=0 -> [[.5, 1], [-.5, -1]]^2 = [[.25, 1], [.25, 1]]
    # example 2: x=(2,0), y=1 -> [[-1, 0], [1, 0]]^2   = [[1, 0], [1, 0]]
    fisher = fisher_diagonal(zero_linear(), [{"input": X, "labels": Y}], n_samples=2, mode="empirical")
    assert torch.allclose(fisher["weight"], torch.tensor([[0.625, 0.5], [0.625, 0.5]]))


def test_fisher_is_per_example_not_squared_batch_gradient():
    one_batch = fisher_diagonal(zero_linear(), [(X, Y)], n_samples=2, mode="empirical")
    two_batches = fisher_diagonal(zero_linear(), [(X[:1], Y[:1]), (X[1:], Y[1:])], n_samples=2, mode="empirical")
    assert torch.equal(one_batch["weight"], two_batches["weight"])
    batch_grad = torch.tensor([[0.5 - 1.0, 1.0], [-0.5 + 1.0, -1.0]]) / 2  # mean gradient of the batch
    assert not torch.allclose(one_batch["weight"], batch_grad ** 2)


def test_n_samples_caps_the_examples_used():
    fisher = fisher_diagonal(zero_linear(), [(X, Y)], n_samples=1, mode="empirical")
    assert torch.allclose(fisher["weight"], torch.tensor([[0.25, 1.0], [0.25, 1.0]]))


def test_sampled_fisher_at_uniform_prediction_equals_empirical():
    # with p uniform over two classes, (e_y - p)^2 = 1/4 for either sampled y: the same matrix
    fisher = fisher_diagonal(zero_linear(), [{"input": X}], n_samples=2, mode="sampled", seed=3)
    assert torch.allclose(fisher["weight"], torch.tensor([[0.625, 0.5], [0.625, 0.5]]))


def test_sampled_fisher_converges_to_true_fisher():
    # logits (log .9, log .1) from the bias, x = 1: E_y[(e_y - p)_0^2] = p0 (1 - p0) = 0.09
    model = nn.Linear(1, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.log(torch.tensor([0.9, 0.1])))
    data = [{"input": torch.ones(400, 1)}] * 2
    fisher = fisher_diagonal(model, data, n_samples=800, mode="sampled", seed=0)
    assert fisher["bias"][0].item() == pytest.approx(0.09, abs=0.03)
    assert fisher["weight"][1, 0].item() == pytest.approx(0.09, abs=0.03)


def test_fisher_leaves_model_untouched_and_is_reproducible():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [{"input": torch.randn(5, 3, generator=torch.Generator().manual_seed(1))}]
    a = fisher_diagonal(model, data, n_samples=5, seed=7)
    b = fisher_diagonal(model, data, n_samples=5, seed=7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and all(p.grad is None for p in model.parameters())
    assert set(a) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_empirical_fisher_of_a_network_is_the_mean_of_squared_per_example_gradients():
    # an independent reference: autograd on each example's log p(label | x), squared, averaged
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    fisher = fisher_diagonal(model, [{"input": x, "labels": y}], n_samples=5, mode="empirical")
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(5):
        logp = torch.log_softmax(model(x[i:i + 1]), dim=-1)[0, y[i]]
        for (n, _), g in zip(model.named_parameters(), torch.autograd.grad(logp, list(model.parameters()))):
            ref[n] += g ** 2 / 5
    for n in ref:
        assert torch.allclose(fisher[n], ref[n], rtol=1e-5, atol=1e-8), n


def two_parameter_model():
    # logits (w0 x, w1 x) with w = (ln 3, 0): at x = 1, p = (3/4, 1/4); at x = 2, p = (9/10, 1/10)
    model = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[math.log(3.0)], [0.0]]))
    return model


def test_fisher_of_a_two_parameter_model_by_hand():
    # d log p_y / d w_j = (delta_jy - p_j) x
    # x = 1, y = 0: (1/4, -1/4)        -> squared (1/16, 1/16)
    # x = 2, y = 1: (-9/10, 9/10) * 2   -> squared (3.24, 3.24)
    data = [{"input": torch.tensor([[1.0], [2.0]]), "labels": torch.tensor([0, 1])}]
    fisher = fisher_diagonal(two_parameter_model(), data, n_samples=2, mode="empirical")["weight"]
    assert torch.allclose(fisher, torch.full((2, 1), (1 / 16 + 3.24) / 2))
    # sampled y at x = 1: 1/16 if y = 0 was drawn, 9/16 if y = 1; one value for both parameters
    for seed in range(4):
        f = fisher_diagonal(two_parameter_model(), [{"input": torch.ones(1, 1)}], n_samples=1, seed=seed)["weight"]
        assert f[0, 0] == f[1, 0] and min(abs(f[0, 0] - 1 / 16), abs(f[0, 0] - 9 / 16)) < 1e-6


def test_sequence_log_likelihood_skips_masked_and_unlabelled_positions():
    logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens: log p = -log 4 at each position
    labels = torch.tensor([[1, -100, 2]])
    ll = example_log_likelihood(logits, "empirical", labels, mask=torch.tensor([[1, 1, 1]]))
    assert ll.item() == pytest.approx(-2 * torch.log(torch.tensor(4.0)).item())
    ll = example_log_likelihood(logits, "empirical", labels, mask=torch.tensor([[1, 1, 0]]))
    assert ll.item() == pytest.approx(-torch.log(torch.tensor(4.0)).item())


def test_fisher_bad_input():
    with pytest.raises(ParameterError, match="mode"):
        fisher_diagonal(zero_linear(), [(X, Y)], n_samples=1, mode="exact")
    with pytest.raises(ParameterError, match="labels"):
        fisher_diagonal(zero_linear(), [{"input": X}], n_samples=1, mode="empirical")
    with pytest.raises(ParameterError, match="n_samples"):
        fisher_diagonal(zero_linear(), [(X, Y)], n_samples=0)
    with pytest.raises(ParameterError, match="no trainable parameter named 'nope'"):
        fisher_diagonal(zero_linear(), [(X, Y)], n_samples=1, parameters=["nope"])
    with pytest.raises(ParameterError, match="no examples"):
        fisher_diagonal(zero_linear(), [], n_samples=1)


def test_regmean_grams_are_input_gram_matrices():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [1.0, -1.0]]))
        model[0].bias.zero_()
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    summed = regmean_grams(model, [{"input": x[:1]}, {"input": x[1:]}], average=False)
    assert set(summed) == {"0.weight", "2.weight"} and not summed.transposed
    assert torch.equal(summed["0.weight"], torch.tensor([[10.0, 14.0], [14.0, 20.0]]))
    # hidden = relu([[1, -1], [3, -1]]) = [[1, 0], [3, 0]] -> H^T H = [[10, 0], [0, 0]]
    assert torch.equal(summed["2.weight"], torch.tensor([[10.0, 0.0], [0.0, 0.0]]))
    # the default is the reference's mean over rows: X^T X / 2
    mean = regmean_grams(model, [{"input": x[:1]}, {"input": x[1:]}])
    assert torch.equal(mean["0.weight"], torch.tensor([[5.0, 7.0], [7.0, 10.0]]))
    assert torch.equal(mean["2.weight"], torch.tensor([[5.0, 0.0], [0.0, 0.0]]))


def reference_running_mean(batches):
    # the update of the reference compute_grams (Jin et al.), batch by batch
    cov, n = None, 0
    for x in batches:
        xtx = x.T @ x
        cov = xtx / x.shape[0] if cov is None else (cov * n + xtx) / (n + x.shape[0])
        n += x.shape[0]
    return cov


def test_regmean_grams_match_the_reference_running_mean_on_unequal_batches():
    torch.manual_seed(0)
    batches = [torch.randn(3, 4), torch.randn(1, 4), torch.randn(7, 4)]
    grams = regmean_grams(nn.Linear(4, 2), [{"input": b} for b in batches])
    assert torch.allclose(grams["weight"], reference_running_mean(batches), rtol=1e-5, atol=1e-6)


def test_regmean_with_unequal_data_per_model_merges_as_the_reference():
    # 1-in, 1-out; model a sees x = 1 twice (mean Gram 1), model b sees x = 2 once (mean Gram 4):
    # W* = (1*0 + 4*5) / (1 + 4) = 4 (with summed Grams it would be (2*0 + 4*5) / 6 = 3.33)
    ga = regmean_grams(nn.Linear(1, 1, bias=False), [{"input": torch.ones(2, 1)}])["weight"]
    gb = regmean_grams(nn.Linear(1, 1, bias=False), [{"input": torch.full((1, 1), 2.0)}])["weight"]
    merged = regmean_merge([torch.zeros(1, 1), torch.full((1, 1), 5.0)], [ga, gb])
    assert merged.item() == pytest.approx(4.0)


class Conv1DNet(nn.Module):
    def __init__(self, w):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.proj = Conv1D(nf=w.shape[1], nx=w.shape[0])  # y = x W + b, W stored [in, out]
        with torch.no_grad():
            self.proj.weight.copy_(w)
            self.proj.bias.zero_()

    def forward(self, input):
        return self.proj(input)


def test_regmean_grams_hook_gpt2_conv1d_layers():
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    grams = regmean_grams(Conv1DNet(torch.zeros(2, 3)), [{"input": x}])
    assert set(grams) == {"proj.weight"} and grams.transposed == {"proj.weight"}
    assert transposed_names([{"x": 1}, grams]) == {"proj.weight"}
    assert torch.equal(grams["proj.weight"], torch.tensor([[5.0, 1.0], [1.0, 2.0]]))  # X^T X / 2


def test_regmean_grams_cover_every_layer_of_gpt2():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=1, n_head=2))
    grams = regmean_grams(model, [{"input_ids": torch.randint(0, 50, (2, 5))}])
    conv = {f"h.0.{n}.weight" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert set(grams) == conv and grams.transposed == conv
    state = model.state_dict()
    for key in conv:
        assert grams[key].shape == (state[key].shape[0],) * 2  # [in, in] for weight [in, out]
        assert grams[key].abs().sum() > 0


def test_regmean_merge_of_conv1d_weights_solves_the_least_squares_problem():
    # RegMean (alpha = 1) minimises sum_i ||X_i W - X_i W_i||^2 over W [in, out]: the gradient vanishes
    torch.manual_seed(1)
    ws = [torch.randn(3, 2), torch.randn(3, 2)]
    xs = [torch.randn(6, 3), torch.randn(4, 3)]
    grams = [regmean_grams(Conv1DNet(w), [{"input": x}], average=False)["proj.weight"] for w, x in zip(ws, xs)]
    merged = regmean_merge(ws, grams, alpha=1.0, transposed=True)
    assert merged.shape == (3, 2)
    grad = sum(x.T @ (x @ (merged - w)) for w, x in zip(ws, xs))
    assert grad.abs().max() < 1e-4
    # the same merge of the nn.Linear layout, transposed
    assert torch.allclose(regmean_merge([w.T for w in ws], grams, alpha=1.0).T, merged, atol=1e-6)
    with pytest.raises(ParameterError, match="transposed"):
        regmean_merge([torch.zeros(3, 2)], [torch.eye(2)], transposed=True)
    with pytest.raises(ParameterError, match="Conv1D.*pass transposed=True"):
        regmean_merge(ws, grams)  # a [3, 2] Conv1D weight with its [3, 3] Gram, taken for nn.Linear


def test_regmean_by_name_takes_the_conv1d_layout_from_the_gram_mappings():
    # a square Conv1D weight: its shape cannot tell [in, out] from [out, in], the Gram mapping's .transposed does
    from taskvec.methods import get_method

    torch.manual_seed(2)
    ws = [torch.randn(3, 3), torch.randn(3, 3)]
    xs = [torch.randn(5, 3), torch.randn(7, 3)]
    grams = [regmean_grams(Conv1DNet(w), [{"input": x}]) for w, x in zip(ws, xs)]
    by_name = get_method("regmean").merge_tensor(None, ws, name="proj.weight", gram=grams, alpha=1.0)
    expected = regmean_merge(ws, [g["proj.weight"] for g in grams], alpha=1.0, transposed=True)
    assert torch.allclose(by_name, expected, atol=1e-6)
    assert not torch.allclose(by_name, regmean_merge(ws, [g["proj.weight"] for g in grams], alpha=1.0), atol=1e-3)


def test_regmean_never_active_features_keep_the_average():
    # feature 1 is zero in every model's data: its column is the plain mean (3 + ... ), not 0;
    # feature 0: (1*1 + 3*3) / (1 + 3) = 2.5
    w1, w2 = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 6.0]])
    g1, g2 = torch.diag(torch.tensor([1.0, 0.0])), torch.diag(torch.tensor([3.0, 0.0]))
    for alpha in (0.9, 1.0):
        assert torch.allclose(regmean_merge([w1, w2], [g1, g2], alpha=alpha), torch.tensor([[2.5, 4.0]]))
    # no model saw anything: plain averaging
    zero = torch.zeros(2, 2)
    assert torch.allclose(regmean_merge([w1, w2], [zero, zero]), torch.tensor([[2.0, 4.0]]))


def test_regmean_dependent_features_at_alpha_one_average_the_free_direction():
    # x = (1, 1) only: W (1, 1)^T is pinned to (1*1 + 2*3) / 3 = 7/3; W (1, -1)^T is free and keeps the
    # average's -1: W = [[2/3, 5/3]]
    ones = torch.ones(2, 2)
    merged = regmean_merge([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])], [ones, 2 * ones], alpha=1.0)
    assert torch.allclose(merged, torch.tensor([[2 / 3, 5 / 3]]), atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(2, 3), st.integers(0, 10_000))
def test_regmean_solves_the_normal_equations(n_in, n_out, n_models, seed):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(n_out, n_in, generator=g) for _ in range(n_models)]
    xs = [torch.randn(n_in + 2, n_in, generator=g) for _ in range(n_models)]
    grams = [x.T @ x for x in xs]
    merged = regmean_merge(ws, grams, alpha=1.0).double()
    residual = sum(gi.double() @ (merged - w.double()).T for gi, w in zip(grams, ws))
    assert residual.abs().max() < 1e-4 * (1 + max(gi.abs().max() for gi in grams))


class MaskedEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(2, 2)

    def forward(self, input_ids, attention_mask):
        return self.proj(input_ids)


def test_regmean_grams_leave_out_padding():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])  # last position is padding
    grams = regmean_grams(MaskedEncoder(), [{"input_ids": x, "attention_mask": torch.tensor([[1, 1, 0]])}])
    assert torch.equal(grams["proj.weight"], torch.tensor([[1.0, 0.0], [0.0, 4.0]]) / 2)  # two unpadded rows


def test_regmean_grams_cover_every_linear_of_a_transformer():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=16)
    torch.manual_seed(0)
    model = BertModel(cfg)
    ids = torch.randint(0, 50, (2, 5))
    grams = regmean_grams(model, [{"input_ids": ids, "attention_mask": torch.ones(2, 5, dtype=torch.long)}])
    weights = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(grams) == {f"{n}.weight" for n in weights}
    state = model.state_dict()
    for key, g in grams.items():
        assert g.shape == (state[key].shape[1], state[key].shape[1])  # [in, in] for weight [out, in]
        assert torch.allclose(g, g.T, atol=1e-4)


def test_regmean_needs_linear_layers_and_data():
    with pytest.raises(ParameterError, match="no nn.Linear or Conv1D"):
        regmean_grams(nn.ReLU(), [{"input": X}])
    with pytest.raises(ParameterError, match="no data"):
        regmean_grams(zero_linear(), [])


# ------------------------------------------------------------------------------------------------
# Fisher merging: the reference's defaults (normalised Fishers, floor on the target model)

def test_fisher_floor_on_the_target_model_only():
    a, b = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([3.0, 5.0, 3.0])
    fa, fb = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 0.0])
    # entry 0, no Fisher anywhere: the target's value (target floor) vs the plain mean (floor on all)
    # entry 1: (0.01 * 1 + 1 * 5) / 1.01 either way;  entry 2: 1 exactly vs (1 + 0.01 * 3) / 1.01
    target = fisher_merge([a, b], [fa, fb], eps=0.01)
    assert torch.allclose(target, torch.tensor([1.0, 5.01 / 1.01, 1.0]))
    every = fisher_merge([a, b], [fa, fb], eps=0.01, floor="all")
    assert torch.allclose(every, torch.tensor([2.0, 5.01 / 1.01, 1.03 / 1.01]))


def test_fisher_normalisation_by_hand():
    # F_b = 20 F_a: unnormalised, b takes 20/21 of every entry; normalised (||F_a|| = 5, ||F_b|| = 100)
    # both Fishers become (0.6, 0.8) and the merge is the plain mean
    a, b = torch.zeros(2), torch.full((2,), 21.0)
    fa, fb = torch.tensor([3.0, 4.0]), torch.tensor([60.0, 80.0])
    assert torch.allclose(fisher_merge([a, b], [fa, fb], eps=0.0), torch.full((2,), 20.0))
    norms = fisher_norms([{"w": fa}, fb])
    assert norms == [5.0, 100.0]
    assert torch.allclose(fisher_merge([a, b], [fa, fb], eps=0.0, norms=norms), torch.full((2,), 10.5))
    # one norm per model, over all its tensors: ||(3, 4, 12)|| = 13
    assert fisher_norm({"x": torch.tensor([3.0, 4.0]), "y": torch.tensor([[12.0]])}) == pytest.approx(13.0)


def test_fisher_merge_bad_input_and_inputs_untouched():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    fa, fb = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])
    copies = [t.clone() for t in (a, b, fa, fb)]
    fisher_merge([a, b], [fa, fb], weights=[2.0, 1.0], norms=[1.0, 2.0])
    assert all(torch.equal(x, y) for x, y in zip(copies, (a, b, fa, fb)))
    with pytest.raises(ParameterError, match="sum to 0"):
        fisher_merge([a, b], [fa, fb], weights=[1.0, -1.0])
    with pytest.raises(ParameterError, match="no Fisher mass"):  # target weighted 0, b has no Fisher at entry 0
        fisher_merge([a, b], [fa, torch.tensor([0.0, 1.0])], weights=[0.0, 1.0])
    with pytest.raises(ParameterError, match="floor"):
        fisher_merge([a, b], [fa, fb], floor="donor")
    with pytest.raises(ParameterError, match="norm"):
        fisher_merge([a, b], [fa, fb], norms=[1.0, 0.0])
    with pytest.raises(ParameterError, match="norms for 2 models"):
        fisher_merge([a, b], [fa, fb], norms=[1.0])
    with pytest.raises(ParameterError, match="eps"):
        fisher_merge([a, b], [fa, fb], eps=-1.0)
    with pytest.raises(ParameterError, match="cannot normalise"):
        fisher_norm({"w": torch.zeros(3)})
    with pytest.raises(ParameterError, match=r"model 1.*cannot normalise"):
        fisher_norms([{"w": fa}, {"w": torch.zeros(2)}])
    with pytest.raises(ParameterError, match=r"model 0.*normalize=False"):
        fisher_norms([lambda name: fa])


positive = st.floats(0.01, 100.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-10, 10), positive, positive, positive), min_size=2, max_size=4),
       st.lists(positive, min_size=4, max_size=4))
def test_fisher_merge_properties(models, scales):
    # per model: (parameter value, Fisher at entry 0, Fisher at entry 1, weight); entry values shared
    thetas = [torch.tensor([v, -v]) for v, *_ in models]
    fishers = [torch.tensor([f0, f1]) for _, f0, f1, _ in models]
    weights = [w for *_, w in models]
    merged = fisher_merge(thetas, fishers, weights=weights)
    lo, hi = torch.stack(thetas).min(0).values, torch.stack(thetas).max(0).values
    assert ((merged >= lo - 1e-4 * (1 + lo.abs())) & (merged <= hi + 1e-4 * (1 + hi.abs()))).all()  # a mean
    # normalised, a model's Fisher scale does not matter: F_i -> s_i F_i gives the same merge (eps = 0)
    norms = [fisher_norm(f) for f in fishers]
    scaled = [f * s for f, s in zip(fishers, scales)]
    a = fisher_merge(thetas, fishers, weights=weights, eps=0.0, norms=norms)
    b = fisher_merge(thetas, scaled, weights=weights, eps=0.0, norms=[fisher_norm(f) for f in scaled])
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
