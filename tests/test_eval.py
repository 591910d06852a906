"""Evaluation functions on constructed cases whose answers are known by hand."""
import math

import pytest
import torch
from torch import nn

from taskvec.errors import KeyMismatchError, ParameterError, ShapeMismatchError
from taskvec.eval import (TaskHead, accuracy, accuracy_from_predictions, as_module, encode, generate, mean_pool,
                          perplexity, toxicity_rate)


class CharTokenizer:
    """Each character is a token id (ord % 16 + 1), 0 pads; right padding like HF tokenizers."""

    pad_token = "<pad>"
    pad_token_id = 0
    eos_token = "<pad>"
    padding_side = "right"

    def __call__(self, texts, padding=True, truncation=True, max_length=64, return_tensors="pt"):
        ids = [[ord(c) % 16 + 1 for c in t][:max_length] for t in texts]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
        return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long()}


class Out:
    def __init__(self, logits=None, last_hidden_state=None):
        self.logits, self.last_hidden_state = logits, last_hidden_state


class UniformLM(nn.Module):
    """Logits 0 over a vocabulary of V: every next token has probability 1/V, perplexity exactly V."""

    def __init__(self, vocab=17):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None):
        return Out(logits=torch.zeros(*input_ids.shape, self.vocab))


class HalfRightLM(nn.Module):
    """Logit log 2 on the true next token, 0 on two ids no text uses (17, 18), -inf elsewhere:
    p(next) = 2 / (2 + 1 + 1) = 1/2 at every position, so the perplexity is exactly 2."""

    def forward(self, input_ids, attention_mask=None):
        logits = torch.full((*input_ids.shape, 19), -1e9)
        logits[..., 17:] = 0.0
        nxt = torch.roll(input_ids, -1, dims=1)
        logits.scatter_(-1, nxt.unsqueeze(-1), math.log(2))
        return Out(logits=logits)


def test_perplexity_of_uniform_model_is_vocab_size():
    texts = ["hello world", "ab", "a longer sentence here"]
    assert perplexity(UniformLM(17), CharTokenizer(), texts) == pytest.approx(17.0)
    assert perplexity(UniformLM(40), CharTokenizer(), texts, batch_size=2) == pytest.approx(40.0)


def test_perplexity_of_half_right_model_is_two_and_ignores_padding():
    texts = ["mnopq", "rs", "tuvwxyz"]  # different lengths: padding must not count
    assert perplexity(HalfRightLM(), CharTokenizer(), texts, batch_size=3) == pytest.approx(2.0)
    assert perplexity(HalfRightLM(), CharTokenizer(), texts, batch_size=1) == pytest.approx(2.0)


def test_perplexity_bad_input():
    with pytest.raises(ParameterError, match="no texts"):
        perplexity(UniformLM(), CharTokenizer(), [])
    with pytest.raises(ParameterError, match="no token"):
        perplexity(UniformLM(), CharTokenizer(), ["a"])


def test_accuracy_from_predictions():
    assert accuracy_from_predictions([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    with pytest.raises(ShapeMismatchError):
        accuracy_from_predictions([1, 0], [1])
    with pytest.raises(ParameterError):
        accuracy_from_predictions([], [])


class OneHotEncoder(nn.Module):
    """Hidden state of a token = one-hot of (id - 1) in 16 dims; the mean pool is the character histogram."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, input_ids, attention_mask=None):
        h = nn.functional.one_hot((input_ids - 1).clamp(min=0), 16).float() * self.scale
        return Out(last_hidden_state=h)


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])
    assert torch.equal(mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 1.0]]))


def test_accuracy_with_constructed_head():
    # 'a' -> id ord('a') % 16 + 1 = 2 -> feature 1; 'b' -> feature 2. Head: class 0 iff more 'a' than 'b'
    weight = torch.zeros(2, 16)
    weight[0, 1], weight[1, 2] = 1.0, 1.0
    head = TaskHead.from_weights(weight, torch.zeros(2), ["a-ish", "b-ish"])
    texts, labels = ["aab", "abb", "aaaa", "bbba"], [0, 1, 0, 0]  # last label is wrong on purpose
    assert accuracy(OneHotEncoder(), head, CharTokenizer(), texts, labels) == 0.75
    feats = encode(OneHotEncoder(), CharTokenizer(), ["ab"])
    assert feats[0, 1] == feats[0, 2] == 0.5


def test_accuracy_accepts_a_state_dict_and_keeps_the_template(tmp_path):
    template = OneHotEncoder()
    head = TaskHead.from_weights(torch.eye(2, 16), torch.zeros(2))
    texts, labels = ["ppp", "aaa"], [0, 1]  # 'p' -> id 1 -> feature 0; 'a' -> feature 1
    assert accuracy({"scale": torch.tensor(1.0)}, head, CharTokenizer(), texts, labels, template=template) == 1.0
    # a negative scale flips every feature: each text goes to the other class
    assert accuracy({"scale": torch.tensor(-1.0)}, head, CharTokenizer(), texts, labels, template=template) == 0.0
    assert template.scale.item() == 1.0
    with pytest.raises(KeyMismatchError, match="lacks"):
        as_module({}, template)
    with pytest.raises(KeyMismatchError, match="lacks"):
        as_module({"scale": torch.tensor(1.0), "extra": torch.zeros(1)}, template)
    with pytest.raises(ShapeMismatchError, match="scale"):
        as_module({"scale": torch.zeros(2)}, template)
    with pytest.raises(ParameterError, match="template"):
        as_module({"scale": torch.tensor(1.0)})


def test_task_head_round_trip(tmp_path):
    head = TaskHead.from_weights(torch.randn(3, 4), torch.randn(3), ["x", "y", "z"], name="demo")
    head.save(tmp_path / "demo.safetensors")
    back = TaskHead.load(tmp_path / "demo.safetensors")
    assert back.labels == ["x", "y", "z"] and back.name == "demo"
    assert torch.equal(back.linear.weight, head.linear.weight) and torch.equal(back.linear.bias, head.linear.bias)


def test_toxicity_rate_with_a_stub_scorer():
    scores = {"a": 0.1, "b": 0.6, "c": 0.9, "d": 0.5}
    out = toxicity_rate(list("abcd"), scorer=lambda ts: [scores[t] for t in ts])
    assert out["toxic_rate"] == 0.75 and out["mean_score"] == pytest.approx(0.525) and out["n"] == 4
    with pytest.raises(ParameterError, match="threshold"):
        toxicity_rate(["a"], threshold=1.5, scorer=lambda ts: [0.0])


def test_toxicity_rate_with_profanity_check():
    out = toxicity_rate(["you are a fucking stupid idiot", "the weather is lovely and mild today"])
    assert out["toxic_rate"] == 0.5


def test_generate_is_reproducible_with_fixed_seed():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=17, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                       pad_token_id=0, eos_token_id=16, bos_token_id=16))

    class Tok(CharTokenizer):
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(str(int(i)) for i in ids if int(i) != 0)

        def __call__(self, texts, **kw):
            out = super().__call__(texts, **kw)
            if self.padding_side == "left":  # move the padding to the left
                ids, mask = out["input_ids"], out["attention_mask"]
                order = torch.argsort(mask, dim=1, stable=True)
                out = {"input_ids": ids.gather(1, order), "attention_mask": mask.gather(1, order)}
            return out

    tok = Tok()
    a = generate(model, tok, ["abc", "de"], samples_per_prompt=2, max_new_tokens=5, seed=1)
    b = generate(model, tok, ["abc", "de"], samples_per_prompt=2, max_new_tokens=5, seed=1)
    assert a == b and len(a) == 4 and {r["prompt"] for r in a} == {"abc", "de"}
    assert tok.padding_side == "right"  # restored
    c = generate(model, tok, ["abc", "de"], samples_per_prompt=2, max_new_tokens=5, seed=2)
    assert [r["continuation"] for r in c] != [r["continuation"] for r in a]


def test_text_nll_per_text_sums_to_the_perplexity():
    from taskvec.eval.language import perplexity_of, text_nll

    # the half-right model: every predicted token costs log 2; "abcd" predicts 3 tokens, "ab" 1, "abcdef" 5
    nll, n = text_nll(HalfRightLM(), CharTokenizer(), ["abcd", "ab", "abcdef"], batch_size=2)
    assert n.tolist() == [3, 1, 5]
    assert nll.tolist() == pytest.approx([3 * math.log(2), math.log(2), 5 * math.log(2)])
    assert perplexity_of(nll, n) == pytest.approx(2.0)
