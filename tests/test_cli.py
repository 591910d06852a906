"""`taskvec merge CONFIG OUT`: the seed configs from the command line, mergekit's flags, clean failures."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from taskvec.cli import main
from tests.test_config import SEED_BASE, SEED_CONFIGS, SEED_FINETUNES
from tests.test_config import seed_models as hub  # noqa: F401  (a fixture: this module gets its own copy)


@pytest.fixture(autouse=True)
def _in_hub(hub, monkeypatch):  # noqa: F811
    monkeypatch.chdir(hub)


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _write(hub: Path, name: str, text: str) -> Path:
    p = hub / name
    p.write_text(text)
    return p


def test_help_does_not_import_torch():
    # `taskvec --help` and `taskvec merge --help` must start fast: neither may pull in torch.
    code = ("import sys, contextlib, io\n"
            "from taskvec.cli import main\n"
            "for argv in (['--help'], ['merge', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "        try: main(argv)\n"
            "        except SystemExit: pass\n"
            "    assert 'merge' in out.getvalue()\n"
            "print('torch' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


def test_merge_help_lists_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["merge", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--device", "--out-shard-size", "--copy-tokenizer", "--seed"):
        assert opt in text


def test_seed_config_with_mergekit_flags(hub, capsys):
    out = hub / "cli-marcoro"
    rc = main(["merge", str(SEED_CONFIGS[4]), str(out), "--copy-tokenizer", "--allow-crimes",
               "--out-shard-size", "1B", "--lazy-unpickle", "--seed", "3"])
    assert rc == 0, capsys.readouterr().err
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "mergekit_config.yml", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert (out / "mergekit_config.yml").read_text() == SEED_CONFIGS[4].read_text()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"  # the config's dtype
    assert _hidden(hub) == []


def test_small_shards_and_no_tokenizer(hub):
    out = hub / "cli-sharded"
    assert main(["merge", str(SEED_CONFIGS[0]), str(out), "--out-shard-size", "20000", "--no-copy-tokenizer"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert not (out / "tokenizer.json").exists()


def test_tokenizer_comes_from_the_base_or_tokenizer_source(hub):
    tokenizer_of = lambda out: json.loads((out / "tokenizer_config.json").read_text())["name"]  # noqa: E731
    assert main(["merge", str(SEED_CONFIGS[4]), str(hub / "cli-tok-base")]) == 0
    assert tokenizer_of(hub / "cli-tok-base") == "AIDC-ai-business/Marcoroni-7B-v3"  # the base
    cfg = _write(hub, "tok.yml", f"models:\n  - model: {SEED_FINETUNES[0]}\n    parameters: {{weight: 1}}\n"
                                 f"  - model: {SEED_FINETUNES[1]}\n    parameters: {{weight: 1}}\n"
                                 f"merge_method: linear\ntokenizer_source: {SEED_FINETUNES[1]}\n")
    out = hub / "cli-tok"
    assert main(["merge", str(cfg), str(out), "--no-copy-tokenizer"]) == 0  # an explicit source wins
    assert tokenizer_of(out) == SEED_FINETUNES[1]


@pytest.mark.parametrize("text, message", [
    ("models:\n  - model: ./no/such/model\nmerge_method: linear\n", "model './no/such/model' can't be opened"),
    (f"models:\n  - model: {SEED_BASE}\nmerge_method: tiez\nbase_model: {SEED_BASE}\n",
     "unknown method 'tiez' (did you mean 'ties'?)"),
    (f"slices:\n  - sources:\n      - model: {SEED_BASE}\n        layer_range: [30, 34]\nmerge_method: passthrough\n",
     "layer_range: [30, 34] is out of range"),
    (f"slices:\n  - sources:\n      - model: {SEED_BASE}\n        layer_range: [8, 4]\nmerge_method: passthrough\n",
     "[8, 4] is empty or negative"),
])
def test_bad_configs_fail_cleanly(hub, capsys, text, message):
    cfg = _write(hub, "bad.yml", text)
    out = hub / "cli-bad"
    assert main(["merge", str(cfg), str(out)]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists() and _hidden(hub) == []


def test_existing_output_is_refused_and_untouched(hub, capsys):
    out = hub / "cli-exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", str(SEED_CONFIGS[0]), str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and _hidden(hub) == []


def test_failure_during_the_merge_leaves_nothing(hub, capsys, monkeypatch):
    import taskvec.config.run as run  # patched where run_config looks it up

    def broken(*args, **kwargs):
        raise run.CheckpointError("disk on fire")

    monkeypatch.setattr(run, "_finish_folder", broken)  # fails after the tensors were written
    out = hub / "cli-broken"
    assert main(["merge", str(SEED_CONFIGS[0]), str(out)]) == 1
    assert "disk on fire" in capsys.readouterr().err
    assert not out.exists() and _hidden(hub) == []


def test_console_entry_point_runs_a_config(hub):
    out = hub / "cli-subprocess"
    res = subprocess.run([sys.executable, "-m", "taskvec.cli", "merge", str(SEED_CONFIGS[3]), str(out),
                          "--no-progress"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 40


def test_dry_run_prints_the_plan_and_writes_nothing(hub, capsys):
    out = hub / "cli-dry"
    assert main(["merge", str(SEED_CONFIGS[0]), str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("slerp: 1 model(s) -> 32 output layers") and "t varies by tensor" in text
    assert not out.exists() and _hidden(hub) == []


def test_console_script_exits_at_once_with_its_output_complete(hub):
    """`python -m taskvec.cli merge` (the console script's `entry`) skips the interpreter's teardown after a
    merge: the exit code, the printed line and the renamed output must all be there; a failure still exits 1."""
    out = hub / "cli-fast-exit"
    res = subprocess.run([sys.executable, "-m", "taskvec.cli", "merge", str(SEED_CONFIGS[0]), str(out),
                          "--no-progress"], capture_output=True, text=True, cwd=hub)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"merged into {out}"
    assert (out / "model.safetensors").is_file() and _hidden(hub) == []
    bad = subprocess.run([sys.executable, "-m", "taskvec.cli", "merge", str(hub / "missing.yml"), str(hub / "x")],
                         capture_output=True, text=True, cwd=hub)
    assert bad.returncode == 1 and "missing.yml" in bad.stderr and not (hub / "x").exists()
