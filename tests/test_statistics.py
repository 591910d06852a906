"""Fisher diagonal and RegMean Gram matrices, checked against values worked out by hand."""
import pytest
import torch
from torch import nn

from taskvec.errors import ParameterError
from taskvec.eval.statistics import example_log_likelihood, fisher_diagonal, regmean_grams


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
    assert all((v >= 0).all() for v in a.values())


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
    grams = regmean_grams(model, [{"input": x[:1]}, {"input": x[1:]}])
    assert set(grams) == {"0.weight", "2.weight"}
    assert torch.equal(grams["0.weight"], torch.tensor([[10.0, 14.0], [14.0, 20.0]]))
    # hidden = relu([[1, -1], [3, -1]]) = [[1, 0], [3, 0]] -> H^T H = [[10, 0], [0, 0]]
    assert torch.equal(grams["2.weight"], torch.tensor([[10.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(regmean_grams(model, [{"input": x}], average=True)["0.weight"],
                       torch.tensor([[5.0, 7.0], [7.0, 10.0]]))


class MaskedEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(2, 2)

    def forward(self, input_ids, attention_mask):
        return self.proj(input_ids)


def test_regmean_grams_leave_out_padding():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])  # last position is padding
    grams = regmean_grams(MaskedEncoder(), [{"input_ids": x, "attention_mask": torch.tensor([[1, 1, 0]])}])
    assert torch.equal(grams["proj.weight"], torch.tensor([[1.0, 0.0], [0.0, 4.0]]))


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
    with pytest.raises(ParameterError, match="no nn.Linear"):
        regmean_grams(nn.ReLU(), [{"input": X}])
    with pytest.raises(ParameterError, match="no data"):
        regmean_grams(zero_linear(), [])
