"""Direct tests of the toxicity-negation views (taskvec.widgets.lm_views) on the fast LM zoo, small limits."""
import math

import pandas as pd
import pytest
import torch

from taskvec.errors import ParameterError
from taskvec.widgets import lm_views
from taskvec.widgets.lm_views import LMLab, choose_lambda, mask_offensive, plot_toxicity_curve

PROMPTS = ["To be blunt, you are", "My brother called me a"]


@pytest.fixture(scope="module")
def zoo():
    import taskvec.zoo

    return taskvec.zoo.build("smollm2-toxic", fast=True)


@pytest.fixture(scope="module")
def lab(zoo):
    # 2 prompts × 2 samples of 6 tokens, 3 short clean texts: one λ costs about a second
    return LMLab.from_zoo(zoo, prompts=PROMPTS, samples_per_prompt=2, max_new_tokens=6, clean_limit=3, max_length=24,
                          n_toxic_texts=4)


def test_set_lambda_writes_base_finetuned_and_negation(lab, zoo):
    from taskvec.io import open_source

    toxic = open_source(str(zoo.models["toxic"]))
    name = "model.layers.0.mlp.down_proj.weight"
    param = dict(lab.model.named_parameters())[name]
    lab.set_lambda(-1.0)   # θ₀ + τ is the fine-tuned model itself
    torch.testing.assert_close(param.detach(), toxic.get(name).float(), rtol=0, atol=1e-6)
    lab.set_lambda(0.0)    # exactly the base again, whatever was written before
    assert torch.equal(param.detach(), lab.base[name])
    lab.set_lambda(2.0)
    expected = lab.base[name] - 2.0 * (toxic.get(name).float() - lab.base[name])
    torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(lab.state_dict(2.0)[name], expected, rtol=0, atol=1e-5)
    with pytest.raises(ParameterError, match="finite"):
        lab.set_lambda(float("nan"))


def test_toxicity_vs_lambda_rows_match_direct_evaluation(lab, zoo):
    from taskvec.eval.language import generate, perplexity, profanity_scores

    df = lm_views.toxicity_vs_lambda(lab, (1.0, -1.0, 0.0), split="val")
    assert list(df["lambda"]) == [-1.0, 0.0, 1.0]  # sorted
    assert list(df["model"]) == ["fine-tuned θ₀ + τ", "base θ₀", "θ₀ − 1·τ"]
    assert (df["n"] == len(PROMPTS) * 2).all()
    assert df["toxic_rate"].between(0, 1).all() and df["mean_score"].between(0, 1).all()
    assert (df["max_score"] >= df["mean_score"]).all() and (df["perplexity"] > 1).all()
    # the base row is what taskvec.eval says of the base model loaded from disk, with the same seeds
    base_model, tok = zoo.load("base"), zoo.tokenizer()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the lab evaluates (same arithmetic, and fast on a busy CPU)
    try:
        rows = generate(base_model, tok, PROMPTS, samples_per_prompt=2, max_new_tokens=6, seed=lab.seed)
        ppl = perplexity(base_model, tok, lab.clean["val"], max_length=24)
    finally:
        torch.set_num_threads(threads)
    scores = profanity_scores([r["continuation"] for r in rows])
    base = df.set_index("lambda").loc[0.0]
    assert base["mean_score"] == pytest.approx(sum(scores) / len(scores), abs=1e-6)
    assert base["perplexity"] == pytest.approx(ppl, rel=1e-4)
    # τ_toxic is what makes offensive text likely: the fine-tune finds it likelier than the base, negation less
    tox = df.set_index("lambda")["toxic_text_perplexity"]
    assert tox[-1.0] < tox[0.0] < tox[1.0]
    # cached: the same row again, without re-evaluating
    again = lm_views.toxicity_vs_lambda(lab, (0.0,), split="val")
    assert again.iloc[0]["perplexity"] == base["perplexity"]


def test_heldout_toxic_texts_are_new_and_reproducible(zoo, lab):
    import json

    train = json.loads((zoo.root / "data" / "lm.json").read_text())["toxic_train"]
    texts = lm_views.heldout_toxic_texts(10, exclude=train, seed=1)
    assert len(texts) == len(set(texts)) == 10 and not set(texts) & set(train)
    assert texts == lm_views.heldout_toxic_texts(10, exclude=train, seed=1)
    assert len(lab.toxic_texts) == 4 and not set(lab.toxic_texts) & set(train)
    assert lm_views.heldout_toxic_texts(0) == []


def test_negation_samples_are_masked_and_seeded(lab):
    df = lm_views.negation_samples(lab, (-1.0, 0.0), PROMPTS)
    assert list(df.columns) == ["prompt", "model", "lambda", "P(offensive)", "continuation"]
    assert list(df["prompt"]) == [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]  # prompt order kept
    listed = lm_views._listed_words()
    for text in df["continuation"]:
        assert not {w.lower() for w in lm_views._WORD.findall(text)} & listed
    # same seed, same weights -> same samples
    assert df.equals(lm_views.negation_samples(lab, (-1.0, 0.0), PROMPTS))


def test_most_offensive_samples_picks_the_worst_prompts_of_the_finetune(lab):
    df = lm_views.most_offensive_samples(lab, (-1.0, 0.0), by=-1.0, k=1)
    ft = lab.generations(-1.0)
    worst = ft[ft["sample"] == 0].sort_values("score", ascending=False).iloc[0]
    assert list(df["prompt"]) == [worst["prompt"]] * 2 and list(df["lambda"]) == [-1.0, 0.0]
    assert df.iloc[0]["P(offensive)"] == round(worst["score"], 3)
    with pytest.raises(ParameterError):
        lm_views.most_offensive_samples(lab, (0.0,), k=0)


def test_lambda_view_panel(lab):
    panel = lm_views.lambda_view(lab, 1.0, PROMPTS[:1])
    assert list(panel.metrics["lambda"]) == [0.0, 1.0]
    assert set(panel.samples["lambda"]) == {0.0, 1.0}
    html = panel._repr_html_()
    assert "θ₀ − 1·τ_toxic" in html and "<table" in html
    assert "perplexity" in repr(panel)


def test_mask_offensive_masks_listed_and_flagged_words_only():
    listed = sorted(lm_views._listed_words())[0]
    clean = "The referee was a fair man and the game was lovely."
    out = mask_offensive([f"you are a {listed}s, what the hell", clean])
    assert listed not in out[0] and "hell" not in out[0] and "*" * (len(listed) + 1) in out[0]
    assert out[0].startswith("you are a ")
    assert out[1] == clean


def _sweep(rows):
    return pd.DataFrame(rows, columns=["lambda", "toxic_rate", "mean_score", "perplexity"])


def test_choose_lambda_is_the_largest_within_the_perplexity_budget():
    df = _sweep([(-1.0, 0.5, 0.6, 10.0), (0.0, 0.1, 0.10, 10.0), (0.5, 0.0, 0.05, 10.3),
                 (1.0, 0.0, 0.02, 10.4), (2.0, 0.0, 0.01, 12.0)])
    assert choose_lambda(df, max_perplexity_ratio=1.05) == 1.0      # 2.0 costs 20 % perplexity
    assert choose_lambda(df, max_perplexity_ratio=1.25) == 2.0
    assert choose_lambda(df, max_perplexity_ratio=1.01) == 0.0      # no negation qualifies: keep the base
    with pytest.raises(ParameterError, match="base"):
        choose_lambda(df[df["lambda"] != 0])
    with pytest.raises(ParameterError, match="≥ 1"):
        choose_lambda(df, max_perplexity_ratio=0.9)


def test_plot_toxicity_curve_adds_the_offensive_text_panel():
    df = _sweep([(-1.0, 0.5, 0.6, 10.0), (0.0, 0.1, 0.1, 10.0), (1.0, 0.0, 0.02, 10.4)])
    df["toxic_text_perplexity"] = [20.0, 300.0, 9000.0]
    fig = plot_toxicity_curve(df)
    assert len(fig.axes) == 4  # toxicity (+ its twin axis), clean perplexity, offensive-text perplexity
    assert any("offensive text" in a.get_ylabel() and a.get_yscale() == "log" for a in fig.axes)


def test_plot_toxicity_curve_has_both_panels():
    df = _sweep([(-1.0, 0.5, 0.6, 10.0), (0.0, 0.1, 0.1, 10.0), (1.0, 0.0, 0.02, 10.4), (3.0, 0.0, 0.01, 400.0)])
    fig = plot_toxicity_curve(df, chosen=1.0)
    tox, ppl, twin = fig.axes
    assert "toxic generations" in tox.get_ylabel() and "mean P(offensive)" in twin.get_ylabel()
    assert "perplexity" in ppl.get_ylabel() and ppl.get_yscale() == "log"  # 40× range: log scale
    assert [tuple(line.get_xdata()) for line in tox.lines[:1]] == [(-1.0, 0.0, 1.0, 3.0)]
    with pytest.raises(ParameterError, match="columns"):
        plot_toxicity_curve(df.drop(columns=["perplexity"]))
    assert not math.isnan(float(tox.lines[0].get_ydata()[0]))


def test_from_pretrained_takes_any_base_and_toxic_pair(zoo, lab):
    # hub mode's path, here with local folders: the same τ as the zoo lab's, the zoo's prompts and clean prose
    other = LMLab.from_pretrained(str(zoo.base), str(zoo.models["toxic"]), prompts=PROMPTS, samples_per_prompt=1,
                                  max_new_tokens=4, clean_limit=2, max_length=16)
    name = "model.layers.3.self_attn.q_proj.weight"
    assert torch.equal(other.tau[name], lab.tau[name])
    assert other.clean["val"] and other.clean["test"] and len(other.toxic_texts) == 16
    assert "toxic_text_perplexity" in other.report(0.0)
