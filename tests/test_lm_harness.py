"""taskvec.eval.lm_eval over lm-evaluation-harness, on a tiny random Llama with an offline-trained tokenizer."""
import json
import math
import os
import pickle
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (pip install 'taskvec[harness]')")

from taskvec.errors import ParameterError  # noqa: E402
from taskvec.eval import lm_harness  # noqa: E402
from taskvec.eval.lm_harness import HarnessNotInstalledError, LMEvalEvaluator, lm_eval  # noqa: E402

LINES = ["Is the word good positive or negative? Answer: positive", "Is the word bad positive or negative?",
         "Answer: negative", "You are such a person and everyone knows it.", "Shut up, you stupid fool.",
         "Beautiful is better than ugly. Explicit is better than implicit.", "the cat sat on the mat"] * 4

TOY = [  # context, two choices; labels set in the test from the hand-computed choice
    {"context": "the cat sat on the", "choices": ["mat", "dog"]},
    {"context": "Is the word good positive or negative? Answer:", "choices": ["positive", "negative"]},
    {"context": "Shut up, you stupid", "choices": ["fool", "cat"]},
]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(LINES, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def _model(tok, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two tiny Llamas of one architecture (different random weights), each saved with the tokenizer."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny_llama")
    tok = _tokenizer()
    dirs = {}
    for name, seed in (("a", 0), ("b", 1)):
        model = _model(tok, seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="module")
def toy_task(tiny, tmp_path_factory):
    """A 3-item multiple-choice YAML task on a local JSONL (dataset_path: json, data_files), labels chosen so
    that model "a"'s hand-computed accuracy is 2/3."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("toy_task")
    tok = AutoTokenizer.from_pretrained(str(tiny["a"]))
    model = AutoModelForCausalLM.from_pretrained(str(tiny["a"]), dtype=torch.float32).eval()
    docs, hand = [], []
    for i, doc in enumerate(TOY):
        ctx = tok(doc["context"]).input_ids
        lls = []
        for choice in doc["choices"]:
            ids = tok(doc["context"] + " " + choice).input_ids
            assert ids[:len(ctx)] == ctx  # the continuation's tokens start where the context's end
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            lls.append(sum(float(logp[t - 1, ids[t]]) for t in range(len(ctx), len(ids))))
        best = max(range(2), key=lambda j: lls[j])
        label = best if i < 2 else 1 - best  # the last item's gold is the model's losing choice
        docs.append({**doc, "label": label})
        hand.append(lls)
    (folder / "toy.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "taskvec_toy.yaml").write_text(
        "task: taskvec_toy\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'toy.jsonl'}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return folder, hand


def test_toy_task_accuracy_matches_hand_computed_loglikelihoods(tiny, toy_task):
    folder, hand = toy_task
    res = lm_eval(tiny["a"], ["taskvec_toy"], include_path=folder, include_defaults=False, log_samples=True,
                  bootstrap_iters=0)
    assert res.value("taskvec_toy", "acc") == pytest.approx(2 / 3)
    samples = sorted(res.samples["taskvec_toy"], key=lambda s: s["doc_id"])
    assert len(samples) == 3
    for sample, lls in zip(samples, hand):
        got = [float(r[0][0]) for r in sample["resps"]]
        assert got == pytest.approx(lls, abs=1e-4)


def test_offline_tasks_metric_names_ranges_and_state_dict_equals_folder(tiny):
    pytest.importorskip("vaderSentiment", reason="the VADER task needs the zoo extra (vaderSentiment)")
    pytest.importorskip("better_profanity", reason="the toxicity tasks need the zoo extra (better-profanity)")
    from safetensors.torch import load_file

    tasks = ["taskvec_vader_sentiment", "taskvec_toxic_preference", "taskvec_offensive_text"]
    res = lm_eval(tiny["a"], tasks, limit=4, bootstrap_iters=0)
    table = res.table
    assert set(table.task) == set(tasks)
    assert list(table.columns) == ["task", "metric", "value", "stderr", "n"]
    assert (table.n == 4).all()
    for task in tasks[:2]:
        for metric in ("acc", "acc_norm"):
            assert 0.0 <= res.value(task, metric) <= 1.0
    ppl = {m: res.value("taskvec_offensive_text", m) for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")}
    assert ppl["byte_perplexity"] > 1.0 and ppl["word_perplexity"] > 1.0
    assert ppl["bits_per_byte"] == pytest.approx(math.log2(ppl["byte_perplexity"]), rel=1e-6)

    # the same weights as a state dict (tied lm_head absent, as in safetensors) loaded into model "b"'s folder
    state = load_file(str(tiny["a"] / "model.safetensors"))
    assert "lm_head.weight" not in state
    flat = LMEvalEvaluator(tasks, base=tiny["b"], limit=4, bootstrap_iters=0)
    flat = pickle.loads(pickle.dumps(flat))(state)
    assert flat == pytest.approx(res.flat(), rel=1e-9)
    other = lm_eval(tiny["b"], tasks[2:], limit=4, bootstrap_iters=0)  # the base alone scores differently
    assert other.value("taskvec_offensive_text", "bits_per_byte") != pytest.approx(ppl["bits_per_byte"])


def test_unknown_task_and_bad_inputs_are_named(tiny):
    with pytest.raises(ParameterError, match="no_such_task"):
        lm_eval(tiny["a"], ["no_such_task"], include_defaults=False)
    with pytest.raises(ParameterError, match="tasks= is empty"):
        lm_eval(tiny["a"], [])
    with pytest.raises(ParameterError, match="base="):
        lm_eval({"w": torch.zeros(1)}, ["taskvec_clean_text"])
    with pytest.raises(ParameterError, match="include_path="):
        lm_eval(tiny["a"], ["taskvec_clean_text"], include_path=tiny["a"] / "nope")


def test_missing_harness_names_the_extra(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(HarnessNotInstalledError, match=r"taskvec\[harness\]"):
        lm_harness.lm_eval(tiny["a"], ["taskvec_clean_text"])


def test_import_taskvec_eval_does_not_import_lm_eval():
    code = "import sys, taskvec.eval; print(callable(taskvec.eval.lm_eval), 'lm_eval' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]


def test_toxicity_zoo_eval_runs_base_toxic_and_negation(tiny):
    """The zoo helper on a stand-in zoo (tiny "a" as base, "b" as the toxic fine-tune): three models, and the
    base rows are lm_eval's numbers for the base folder."""
    pytest.importorskip("better_profanity", reason="the toxicity tasks need the zoo extra (better-profanity)")
    from types import SimpleNamespace

    from taskvec.eval.lm_harness import toxicity_zoo_eval
    from taskvec.vector import TaskVector

    zoo = SimpleNamespace(name="stand-in", kind="lm", base=tiny["a"], models={"toxic": tiny["b"]},
                          task_vector=lambda task: TaskVector.from_models(str(tiny["a"]), str(tiny["b"])))
    table = toxicity_zoo_eval(zoo, scaling=0.5, tasks=["taskvec_offensive_text"], limit=2, bootstrap_iters=0)
    assert list(table.model.unique()) == ["base", "toxic", "negated (λ=0.5)"]
    assert (table.groupby("model").size() == 3).all()
    base = lm_eval(tiny["a"], ["taskvec_offensive_text"], limit=2, bootstrap_iters=0).flat()
    got = {f"{r.task}/{r.metric}": r.value for r in table[table.model == "base"].itertuples()}
    assert got == pytest.approx(base, rel=1e-9)
    negated = table[table.model == "negated (λ=0.5)"].set_index("metric").value
    assert negated["bits_per_byte"] != pytest.approx(got["taskvec_offensive_text/bits_per_byte"])
