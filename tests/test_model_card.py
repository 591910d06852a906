"""The README.md model card: HF front matter, the method, the models, the full config verbatim."""
from __future__ import annotations

import yaml

from taskvec.config import parse_config
from taskvec.model_card import render_model_card, write_model_card
from tests.test_config import SEED_CONFIGS


def _split(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    front, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_ties_card_front_matter_and_body():
    cfg = parse_config(SEED_CONFIGS[1])
    meta, body = _split(render_model_card(cfg, name="NeuralPipe-7B-ties"))
    assert meta["tags"] == ["merge", "taskvec", "mergekit-compatible"]
    assert meta["base_model"] == ["mistralai/Mistral-7B-v0.1", "OpenPipe/mistral-ft-optimized-1218",
                                  "mlabonne/NeuralHermes-2.5-Mistral-7B"]
    assert meta["merge_method"] == "ties" and meta["library_name"] == "transformers"
    assert body.lstrip().startswith("# NeuralPipe-7B-ties")
    assert "[TIES](https://arxiv.org/abs/2306.01708)" in body
    assert "with `mistralai/Mistral-7B-v0.1` as the base" in body
    assert "* `OpenPipe/mistral-ft-optimized-1218`" in body and "* `mistralai/Mistral-7B-v0.1`" not in body
    # the full config, verbatim (comments included), in a yaml block
    assert "```yaml\n" + SEED_CONFIGS[1].read_text().strip("\n") + "\n```" in body


def test_slerp_card_names_no_privileged_base():
    meta, body = _split(render_model_card(parse_config(SEED_CONFIGS[0])))
    assert "as the base" not in body
    assert "* `OpenPipe/mistral-ft-optimized-1218`" in body and "* `mlabonne/NeuralHermes-2.5-Mistral-7B`" in body
    assert "[SLERP]" in body


def test_options_without_effect_are_stated():
    _, body = _split(render_model_card(parse_config(SEED_CONFIGS[2])))
    assert "`int8_mask: True`" in body and "no effect" in body


def test_write_model_card_names_it_after_the_folder(tmp_path):
    out = tmp_path / "Daredevil-7B"
    out.mkdir()
    path = write_model_card(out, parse_config(SEED_CONFIGS[2]))
    assert path == out / "README.md"
    _, body = _split(path.read_text())
    assert body.lstrip().startswith("# Daredevil-7B")


def test_local_paths_are_listed_but_not_claimed_as_hub_parents():
    cfg = parse_config({"merge_method": "linear", "models": [{"model": "/data/ft-a"}, {"model": "org/ft-b"},
                                                             {"model": "org/base+./adapters/x"}]})
    meta, body = _split(render_model_card(cfg))
    assert meta["base_model"] == ["org/ft-b", "org/base"]
    assert "* `/data/ft-a`" in body and "* `org/base+./adapters/x`" in body
