"""Regenerate tests/goldens/tokenizer/: tiny models with different vocabularies, merged by mergekit 0.1.5.

    bash benchmarks/setup_bench_venv.sh                          # mergekit 0.1.5 in /tmp/venv-bench
    python benchmarks/make_goldens_tokenizer.py                   # (taskvec's venv) writes tests/goldens/tokenizer/
    python benchmarks/make_goldens_tokenizer.py --mergekit-yaml PATH

tests/test_config_tokenizer.py compares `taskvec merge CONFIG` with these outputs, mergekit
not installed. What is written:

* inputs/{base,ft1,ft2,ft3}/ — Llama-shaped models (2 layers, hidden 8, float32) with real
  `tokenizers` WordLevel tokenizers saved by `PreTrainedTokenizerFast.save_pretrained`:
  base and ft1 share one vocabulary (ft1 = base + noise); ft2 and ft3 have their own
  (some of base's words in another order, words of their own, ft2 an added special token,
  words ft2 and ft3 share that base lacks: mergekit averages those). base and ft1 carry one
  chat template, ft2 another (so ``chat_template: auto`` has a plurality);
* configs/NAME.yml — mergekit configs using ``tokenizer:`` / ``tokenizer_source:`` /
  ``chat_template:`` (``dtype: float32``);
* outputs/NAME/ — what `mergekit-yaml configs/NAME.yml` wrote: model.safetensors (the shards
  joined), config.json and the tokenizer files (run with the working directory
  tests/goldens/tokenizer, so the relative model paths resolve);
* MANIFEST.json — mergekit and torch versions, and the SHA-256 of every file.

mergekit's union gives the tokens it adds ids in the iteration order of a Rust hash map
(`get_vocab()`), which changes from run to run: the tests compare vocabularies and rows by
token, not by id.

A folder of its own with its own MANIFEST.json: benchmarks/make_goldens.py, which rewrites
tests/goldens/, moves it into its new folder untouched.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
GOLDENS = REPO / "tests" / "goldens" / "tokenizer"
SEED = 23
SPECIALS = ["<unk>", "<s>", "</s>"]
BASE_WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "red", "blue", "big", "small", "ran"]
# (vocabulary after the specials, added special tokens)
VOCABS = {
    "base": (BASE_WORDS, []),
    "ft1": (BASE_WORDS, []),
    "ft2": (["dog", "the", "cat", "on", "mat", "ran", "bird", "tree", "green", "fast", "sky"], ["<|im_start|>"]),
    "ft3": (["the", "a", "cat", "red", "tree", "sky", "slow", "moon"], []),
}
TEMPLATE_A = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
TEMPLATE_B = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
TEMPLATES = {"base": TEMPLATE_A, "ft1": TEMPLATE_A, "ft2": TEMPLATE_B, "ft3": None}
CFG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", initializer_range=0.02,
           max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
           attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2, torch_dtype="float32",
           use_cache=True, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
           num_key_value_heads=1)

CONFIGS = {
    # union of four vocabularies; task arithmetic uses the base's rows too; a bundled template name
    "union": """\
models:
  - model: inputs/base
  - model: inputs/ft1
    parameters: {weight: 0.5}
  - model: inputs/ft2
    parameters: {weight: 0.3}
  - model: inputs/ft3
    parameters: {weight: 0.2}
merge_method: task_arithmetic
base_model: inputs/base
tokenizer:
  source: union
chat_template: chatml
dtype: float32
""",
    # per-token overrides of every kind, a token no model has, padding; a literal Jinja template
    "tokens": """\
models:
  - model: inputs/base
    parameters: {weight: 0.4}
  - model: inputs/ft2
    parameters: {weight: 0.3}
  - model: inputs/ft3
    parameters: {weight: 0.3}
merge_method: linear
base_model: inputs/base
tokenizer:
  source: union
  pad_to_multiple_of: 16
  tokens:
    <|im_start|>:
      source:
        kind: zero
    sky:
      source: inputs/ft3
      force: true
    bird:
      source:
        kind: model_token
        model: inputs/base
        token: cat
    <|extra|>:
      source:
        kind: model_token
        model: inputs/ft2
        token_id: 4
    the:
      source: inputs/ft2
chat_template: "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\\n{% endfor %}"
dtype: float32
""",
    # legacy key: the base's vocabulary; rows ft2 lacks come from the base; the plurality template
    "base": """\
models:
  - model: inputs/base
  - model: inputs/ft1
    parameters: {weight: 0.6}
  - model: inputs/ft2
    parameters: {weight: 0.4}
merge_method: task_arithmetic
base_model: inputs/base
tokenizer_source: base
chat_template: auto
dtype: float32
""",
    # slices and SLERP; the legacy key for the union: rows a model lacks come from the slice's base (ft1)
    "slices": """\
slices:
  - sources:
      - model: inputs/ft1
        layer_range: [0, 2]
      - model: inputs/ft3
        layer_range: [0, 2]
merge_method: slerp
base_model: inputs/ft1
parameters:
  t: [0.2, 0.7]
tokenizer_source: union
dtype: float32
""",
    # layer stacking: the embeddings are the first slice's model's, the head the last's, each re-indexed alone
    # (a token that model lacks gets zeros: no other model is merged into that tensor); base_model names the
    # tokenizer's base (without it mergekit picks one of the models from an unordered set)
    "passthrough": """\
slices:
  - sources:
      - model: inputs/ft2
        layer_range: [0, 1]
  - sources:
      - model: inputs/ft1
        layer_range: [1, 2]
merge_method: passthrough
base_model: inputs/ft2
tokenizer:
  source: union
dtype: float32
""",
    # another model's vocabulary
    "model_source": """\
models:
  - model: inputs/base
    parameters: {weight: 0.5}
  - model: inputs/ft2
    parameters: {weight: 0.5}
merge_method: linear
base_model: inputs/base
tokenizer:
  source: inputs/ft2
chat_template: llama3
dtype: float32
""",
}


def make_tokenizer(words: list[str], added: list[str], template: str | None):
    import tokenizers
    import transformers
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    tok = tokenizers.Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")
    if added:
        fast.add_special_tokens({"additional_special_tokens": added})
    if template:
        fast.chat_template = template
    return fast


def write_inputs(root: Path) -> None:
    g = torch.Generator().manual_seed(SEED)
    h, inter, n_layers = CFG["hidden_size"], CFG["intermediate_size"], CFG["num_hidden_layers"]
    kv = CFG["num_key_value_heads"] * (h // CFG["num_attention_heads"])
    layer_shapes = {"input_layernorm.weight": (h,), "self_attn.q_proj.weight": (h, h),
                    "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
                    "self_attn.o_proj.weight": (h, h), "post_attention_layernorm.weight": (h,),
                    "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
                    "mlp.down_proj.weight": (h, inter)}

    def rand(shape):
        return 1.0 + 0.05 * torch.randn(shape, generator=g) if len(shape) == 1 else 0.02 * torch.randn(shape,
                                                                                                      generator=g)

    base_layers = {f"model.layers.{i}.{k}": rand(s) for i in range(n_layers) for k, s in layer_shapes.items()}
    base_layers["model.norm.weight"] = rand((h,))
    # one row per token string, shared by every model that has the token (+ that model's noise)
    all_tokens = dict.fromkeys(t for words, added in VOCABS.values() for t in SPECIALS + words + added)
    rows = {t: (0.02 * torch.randn(h, generator=g), 0.02 * torch.randn(h, generator=g)) for t in all_tokens}
    for name, (words, added) in VOCABS.items():
        tok = make_tokenizer(words, added, TEMPLATES[name])
        vocab = tok.get_vocab()
        v = len(vocab)
        noise = 0.0 if name == "base" else 0.01
        sd = {k: t + noise * torch.randn(t.shape, generator=g) for k, t in base_layers.items()}
        emb, head = torch.zeros(v, h), torch.zeros(v, h)
        for t, i in sorted(vocab.items(), key=lambda kv: kv[1]):  # id order: get_vocab()'s order varies by run
            emb[i] = rows[t][0] + noise * torch.randn(h, generator=g)
            head[i] = rows[t][1] + noise * torch.randn(h, generator=g)
        sd["model.embed_tokens.weight"], sd["lm_head.weight"] = emb, head
        d = root / name
        d.mkdir(parents=True)
        save_file({k: x.contiguous() for k, x in sorted(sd.items())}, str(d / "model.safetensors"),
                  metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({**CFG, "vocab_size": v}, indent=2) + "\n")
        tok.save_pretrained(str(d))


def run_mergekit(exe: str, config: Path, out: Path, cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run([exe, str(config), str(out), "--no-write-model-card", "--quiet", "--random-seed", "0"],
                         capture_output=True, text=True, env=env, cwd=cwd)
    if res.returncode != 0:
        raise SystemExit(f"mergekit-yaml failed on {config.name}:\n{res.stderr[-3000:]}")


@functools.lru_cache(maxsize=1)
def _make_goldens():
    spec = importlib.util.spec_from_file_location("make_goldens", REPO / "benchmarks" / "make_goldens.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    args, version = _make_goldens().parse_cli(argv, __doc__, GOLDENS, ("mergekit", "torch", "transformers"))
    exe = args.mergekit_yaml
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".goldens-tokenizer-", dir=args.out.parent))
    try:
        write_inputs(staging / "inputs")
        (staging / "configs").mkdir()
        for name, text in CONFIGS.items():
            cfg = staging / "configs" / f"{name}.yml"
            cfg.write_text(text)
            folder = staging / "mergekit-out" / name
            run_mergekit(exe, cfg, folder, cwd=staging)
            dest = staging / "outputs" / name
            dest.mkdir(parents=True)
            tensors: dict[str, torch.Tensor] = {}
            for f in sorted(folder.glob("*.safetensors")):
                tensors.update(load_file(str(f)))
            save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
            for f in sorted(folder.iterdir()):
                if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json" and f.is_file():
                    shutil.copyfile(f, dest / f.name)
            print(f"{name}: {len(tensors)} tensors, {sorted(p.name for p in dest.iterdir())}")
        shutil.rmtree(staging / "mergekit-out")
        (staging / "README.md").write_text("# mergekit 0.1.5 tokenizer goldens\n\nWritten by "
                                           "`benchmarks/make_goldens_tokenizer.py`; do not edit by hand.\n\n"
                                           + __doc__.split("\n\n", 2)[2])
        _make_goldens().publish(staging, args.out, {
            "mergekit": version[0] if version else "?", "torch": version[1] if len(version) > 1 else "?",
            "transformers": version[2] if len(version) > 2 else "?",
            "regenerate": "python benchmarks/make_goldens_tokenizer.py"})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({total / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
