"""The sweep engine (taskvec.sweep / taskvec.search): grid expansion, the cache, executors, CLI, resume."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import taskvec
from taskvec.errors import ParameterError
from taskvec.sweeping import expand_grid, search, sweep

REPO = Path(__file__).resolve().parents[1]
LABELS = ["a", "b", "c"]


# ----------------------------------------------------------------------------- fixtures and evaluators
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A base and three 'fine-tunes' (two float tensors and an integer buffer), as safetensors folders."""
    root = tmp_path_factory.mktemp("models")
    g = torch.Generator().manual_seed(0)
    base = {"layer.weight": torch.randn(6, 4, generator=g), "layer.bias": torch.randn(6, generator=g),
            "position_ids": torch.arange(6)}
    paths = {}
    for i, name in enumerate(["base", *LABELS]):
        sd = {k: (v + 0.3 * i * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
              for k, v in base.items()}
        (root / name).mkdir()
        save_file(sd, root / name / "model.safetensors")
        paths[name] = str(root / name)
    return {"base": paths["base"], "models": [paths[n] for n in LABELS], "root": root}


def _state(merged) -> dict[str, torch.Tensor]:
    """The merged weights whether the sweep handed over a state dict or a folder."""
    if isinstance(merged, (str, os.PathLike)):
        src = taskvec.open_source(merged)
        return {k: src.get(k) for k in src.keys()}
    return merged


class CountingEval:
    """Touches one file per evaluation in `counter` (processes and clusters can't share a Python counter);
    `sleep` makes points slow enough to kill a sweep half-way. Its cache identity leaves both out."""

    def __init__(self, counter, sleep: float = 0.0, save: str | None = None):
        self.counter, self.sleep, self.save = str(counter), sleep, save

    def cache_key(self) -> str:
        return "tests.CountingEval/1"

    def __call__(self, merged):
        sd = _state(merged)
        Path(self.counter).mkdir(parents=True, exist_ok=True)
        (Path(self.counter) / uuid.uuid4().hex).touch()
        time.sleep(self.sleep)
        w = sd["layer.weight"].float()
        if self.save:  # keep the merged tensors, to compare with taskvec.merge in the test process
            save_file({k: v.contiguous() for k, v in sd.items()},
                      Path(self.save) / f"{float(w.sum()):.6f}.safetensors")
        return {"norm": float(w.norm()), "mean": float(w.mean()), "format": float(isinstance(merged, (str, os.PathLike)))}


def evaluations(counter) -> int:
    return len(list(Path(counter).glob("*"))) if Path(counter).exists() else 0


# ----------------------------------------------------------------------------- grid expansion
def test_grid_drops_parameters_a_method_does_not_take_and_reports_the_collapsed_points():
    points, skipped = expand_grid({"method": ["ties", "task_arithmetic"], "density": [0.2, 0.5],
                                   "lambda": [0.5, 1.0]}, labels=LABELS)
    got = [(p.method, dict(p.params)) for p in points]
    assert got == [("ties", {"density": 0.2, "lambda": 0.5}), ("ties", {"density": 0.2, "lambda": 1.0}),
                   ("ties", {"density": 0.5, "lambda": 0.5}), ("ties", {"density": 0.5, "lambda": 1.0}),
                   ("task_arithmetic", {"lambda": 0.5}), ("task_arithmetic", {"lambda": 1.0})]
    assert [(s["method"], s["density"], s["lambda"]) for s in skipped] == [("task_arithmetic", 0.5, 0.5),
                                                                           ("task_arithmetic", 0.5, 1.0)]
    assert {s["reason"] for s in skipped} == {"task_arithmetic takes no density"}
    assert all(p.models == (0, 1, 2) for p in points)


def test_grid_model_subsets_per_model_lists_aliases_and_repeats():
    points, skipped = expand_grid({"models": [["a"], ["a", 2]], "lam": [1.0, 1.0]}, labels=LABELS,
                                  method="task_arithmetic", fixed={"weight": [1.0, 2.0, 3.0]})
    assert [(p.models, dict(p.params)) for p in points] == [((0,), {"weight": [1.0], "lam": 1.0}),
                                                            ((0, 2), {"weight": [1.0, 3.0], "lam": 1.0})]
    assert [s["reason"] for s in skipped] == ["duplicate point", "duplicate point"]
    assert points[0].canonical["lam"] == "lambda"


def test_numpy_axes_and_a_seed_axis_reach_merge(tiny, tmp_path):
    import numpy as np

    res = sweep(tiny["base"], tiny["models"], {"method": ["dare_ties", "ties"], "seed": np.arange(2)},
                CountingEval(tmp_path / "n"), density=0.5, executor="serial", progress=False, cache=tmp_path / "c")
    assert evaluations(tmp_path / "n") == 3  # each seed its own cache entry
    assert res.data["method"].tolist() == ["dare_ties", "dare_ties", "ties"]
    want = taskvec.merge(tiny["base"], tiny["models"], "dare_ties", density=0.5, seed=1, progress=False)
    assert res.data["norm"][1] == pytest.approx(float(want["layer.weight"].norm()), rel=1e-6)
    assert res.data["norm"][0] != pytest.approx(res.data["norm"][1])
    assert res.skipped["reason"].tolist() == ["ties takes no seed"]


def test_grid_errors_name_the_key_or_the_point():
    with pytest.raises(ParameterError, match=r"'densty' \(did you mean 'density'\?\)"):
        expand_grid({"densty": [0.2]}, labels=LABELS, method="ties")
    with pytest.raises(ParameterError, match=r"grid point \(ties; density=1.5\).*density must be in"):
        expand_grid({"density": [1.5]}, labels=LABELS, method="ties")
    with pytest.raises(ParameterError, match=r"models\[0\]: 'z' is neither"):
        expand_grid({"models": [["z"]]}, labels=LABELS, method="ties")
    with pytest.raises(ParameterError, match="unknown merge method 'tie'"):
        expand_grid({"method": ["tie"]}, labels=LABELS)
    with pytest.raises(ParameterError, match="give method= or a `method` axis"):
        expand_grid({"density": [0.5]}, labels=LABELS)


# ----------------------------------------------------------------------------- the engine
def test_each_point_equals_taskvec_merge_and_rows_hold_params_metrics_time_memory(tiny, tmp_path):
    saved = tmp_path / "saved"
    saved.mkdir()
    grid = {"method": ["ties", "dare_ties"], "density": [0.3], "models": [["a", "b"], ["a", "b", "c"]]}
    res = sweep(tiny["base"], dict(zip(LABELS, tiny["models"])), grid, CountingEval(tmp_path / "n", save=str(saved)),
                executor="local", workers=1, seed=3, **{"lambda": 0.8})
    d = res.data
    assert len(d) == 4 and res.evaluated == 4 and not d["cached"].any()
    assert list(d.columns[:5]) == ["method", "models", "n_models", "density", "lambda"]
    assert (d["wall_time_s"] > 0).all() and (d["peak_rss_mb"] > 0).all() and (d["peak_anon_mb"] > 0).all()
    for row in d.itertuples():
        subset = [tiny["models"][LABELS.index(x)] for x in row.models.split("+")]
        want = taskvec.merge(tiny["base"], subset, row.method, density=row.density, seed=3, progress=False,
                             **{"lambda": 0.8})
        assert row.norm == pytest.approx(float(want["layer.weight"].norm()), rel=1e-6)
        from safetensors.torch import load_file

        got = load_file(saved / f"{float(want['layer.weight'].sum()):.6f}.safetensors")
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_folder_materialization_gives_the_evaluator_a_path_with_the_same_weights(tiny, tmp_path):
    kw = dict(method="task_arithmetic", executor="serial", progress=False)
    a = sweep(tiny["base"], tiny["models"], {"lambda": [0.5]}, CountingEval(tmp_path / "n"), materialize="folder",
              scratch=tmp_path, **kw)
    b = sweep(tiny["base"], tiny["models"], {"lambda": [0.5]}, CountingEval(tmp_path / "n"),
              materialize="state_dict", **kw)
    assert a.data["format"].item() == 1.0 and b.data["format"].item() == 0.0
    assert a.data["norm"].item() == pytest.approx(b.data["norm"].item(), rel=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["n"]  # the merged folder was removed after evaluation


def test_cache_serves_reruns_and_a_changed_input_is_evaluated_again(tiny, tmp_path):
    models = [str(tmp_path / m) for m in LABELS]
    for src, dst in zip(tiny["models"], models):
        Path(dst).mkdir()
        Path(dst, "model.safetensors").write_bytes(Path(src, "model.safetensors").read_bytes())
    counter, cache = tmp_path / "n", tmp_path / "cache"
    run = lambda: sweep(tiny["base"], models, {"density": [0.2, 0.6], "lambda": [1.0]}, CountingEval(counter),
                        method="ties", executor="serial", cache=cache, progress=False)
    first = run()
    assert evaluations(counter) == 2
    second = run()
    assert evaluations(counter) == 2 and second.evaluated == 0 and second.data["cached"].all()
    pd.testing.assert_frame_equal(first.data[["density", "norm", "mean"]], second.data[["density", "norm", "mean"]])
    os.utime(Path(models[1], "model.safetensors"), ns=(1, 1))  # a rewritten checkpoint: new fingerprint
    run()
    assert evaluations(counter) == 4


def test_record_errors_and_bad_evaluator_answers(tiny, tmp_path):
    class Broken:
        def __call__(self, merged):
            return [1.0]

    with pytest.raises(ParameterError, match="evaluate must return a dict of metrics, got list"):
        sweep(tiny["base"], tiny["models"], {"lambda": [1.0]}, Broken(), method="task_arithmetic", executor="serial")
    res = sweep(tiny["base"], tiny["models"], {"lambda": [1.0]}, Broken(), method="task_arithmetic",
                executor="serial", on_error="record", cache=tmp_path / "c", progress=False)
    assert "evaluate must return a dict" in res.data["error"].item()
    assert len(list((tmp_path / "c").glob("*/*.json"))) == 0  # a failure is never cached


def test_executor_errors_are_clear(tiny, monkeypatch):
    args = (tiny["base"], tiny["models"], {"lambda": [1.0]}, CountingEval("/nonexistent"))
    with pytest.raises(ParameterError, match="executor: unknown 'threads'; choose from serial, local, ray, dask"):
        sweep(*args, method="task_arithmetic", executor="threads")
    for executor, module in (("ray", "ray"), ("dask", "distributed")):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
        with pytest.raises(ParameterError, match=rf"executor='{executor}' needs .*pip install 'taskvec\[scale\]'"):
            sweep(*args, method="task_arithmetic", executor=executor)
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ParameterError, match=r"taskvec.search needs optuna, which is not installed: pip install"):
        search(*args, objective="norm", method="task_arithmetic", executor="serial")
    with pytest.raises(ParameterError, match=r"models\[0\]: executor 'local' opens models by path"):
        sweep(tiny["base"], [{"layer.weight": torch.ones(6, 4)}], {"lambda": [1.0]}, CountingEval("/x"),
              method="task_arithmetic", executor="local")
    with pytest.raises(ParameterError, match="unknown evaluator 'zooo'"):
        sweep(*args[:3], "zooo", method="task_arithmetic", executor="serial")


def test_result_plots_heatmap_and_pareto(tiny, tmp_path):
    res = sweep(tiny["base"], tiny["models"], {"density": [0.2, 0.5, 0.9], "lambda": [0.5, 1.0],
                                               "models": [["a"], ["a", "b", "c"]]},
                CountingEval(tmp_path / "n"), method="ties", executor="serial", progress=False)
    fig = res.heatmap("norm")
    assert fig.axes[0].get_title() == "norm (max over models)"
    assert fig.axes[0].get_xlabel() == "density" and fig.axes[0].get_ylabel() == "lambda"
    fig = res.pareto("norm", "n_models")
    assert fig.axes[0].get_title() == "sweep: n_models vs norm"
    front = taskvec.sweeping.pareto_front(pd.DataFrame({"x": [1, 2, 3, 2], "y": [3, 2, 1, 1]}), "x", "y")
    assert list(front) == [True, True, True, False]
    assert res.best("norm")["norm"] == res.data["norm"].max()
    assert "12 points (12 evaluated, 0 from the cache)" in repr(res)


def test_perplexity_evaluator_loads_merged_weights_into_the_base_architecture(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from taskvec.eval import perplexity
    from tests.helpers import perturbed, tiny_llama

    words = "the cat sat on a mat and dog ran far away".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "</s>", *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="</s>")
    base, texts = tiny_llama(0, layers=2), ["the cat sat on a mat", "a dog ran far away", "the dog sat"]
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    perturbed(base, scale=0.5).save_pretrained(tmp_path / "ft")
    res = sweep(str(tmp_path / "base"), [str(tmp_path / "ft")], {"lambda": [0.0, 1.0]}, "perplexity",
                evaluate_options={"texts": texts}, method="task_arithmetic", executor="serial", progress=False)
    assert res.data["perplexity"][0] == pytest.approx(perplexity(base, tok, texts), rel=1e-5)  # lambda 0: the base
    assert res.data["perplexity"][1] != pytest.approx(res.data["perplexity"][0], rel=1e-3)


# ----------------------------------------------------------------------------- distributed executors
@pytest.fixture
def ray_cluster():  # shut down right after its test: an idle cluster still takes CPU from the next tests
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'taskvec[scale]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # workers start in this directory
    yield ray
    ray.shutdown()


def test_ray_sweep_with_cache_twice_evaluates_nothing_the_second_time(tiny, tmp_path, ray_cluster):
    counter, cache = tmp_path / "n", tmp_path / "cache"
    grid = {"method": ["ties", "task_arithmetic"], "density": [0.3, 0.6], "lambda": [1.0]}
    first = sweep(tiny["base"], tiny["models"], grid, CountingEval(counter), executor="ray", cache=cache,
                  progress=False)
    assert evaluations(counter) == 3 and first.evaluated == 3 and len(first.skipped) == 1
    second = sweep(tiny["base"], tiny["models"], grid, CountingEval(counter), executor="ray", cache=cache,
                   progress=False)
    assert evaluations(counter) == 3 and second.evaluated == 0
    assert list(second.data["norm"]) == list(first.data["norm"])
    assert ray_cluster.is_initialized()  # a cluster the caller started is left running


def test_dask_sweep_matches_serial(tiny, tmp_path):
    pytest.importorskip("distributed", reason="dask.distributed is not installed (pip install 'taskvec[scale]')")
    kw = dict(method="ties", progress=False)
    grid = {"density": [0.3, 0.6]}
    got = sweep(tiny["base"], tiny["models"], grid, CountingEval(tmp_path / "n"), executor="dask", workers=1,
                executor_options={"processes": False}, **kw)
    want = sweep(tiny["base"], tiny["models"], grid, CountingEval(tmp_path / "n"), executor="serial", **kw)
    assert list(got.data["norm"]) == pytest.approx(list(want.data["norm"]))


# ----------------------------------------------------------------------------- search
def test_seeded_search_finds_the_best_point_and_a_rerun_comes_from_the_cache(tiny, tmp_path):
    pytest.importorskip("optuna", reason="optuna is not installed (pip install 'taskvec[scale]')")
    counter, cache = tmp_path / "n", tmp_path / "cache"
    space = {"method": ["ties", "task_arithmetic"], "lambda": (0.1, 1.0), "density": (0.2, 1.0)}
    run = lambda: search(tiny["base"], tiny["models"], space, CountingEval(counter), objective="norm",
                         direction="minimize", n_trials=6, seed=1, executor="serial", cache=cache, progress=False)
    first = run()
    d = first.data
    assert len(d) == 6 and list(d["trial"]) == list(range(6)) and evaluations(counter) == 6
    assert first.best_value == d["objective"].min() == d["norm"].min()
    best = d.loc[d["objective"].idxmin()]
    assert first.best_params["method"] == best["method"] and first.best_params["lambda"] == best["lambda"]
    assert d.loc[d["method"] == "task_arithmetic", "density"].isna().all()  # not suggested where not taken
    second = run()
    assert evaluations(counter) == 6 and second.evaluated == 0 and second.best_params == first.best_params
    with pytest.raises(ParameterError, match=r"space: 'lambda': a range is \(low, high\)"):
        search(tiny["base"], tiny["models"], {"lambda": (1.0, 0.1)}, CountingEval(counter), objective="norm",
               method="ties", n_trials=1, executor="serial")


# ----------------------------------------------------------------------------- command line
def _write_sweep(tmp_path, tiny, *, evaluate: str, grid: str) -> Path:
    rel = {n: os.path.relpath(p, tmp_path) for n, p in zip(["base", *LABELS], [tiny["base"], *tiny["models"]])}
    path = tmp_path / "sweep.yml"
    path.write_text(f"""merge_method: ties
base_model: {rel['base']}
models:
  - model: {rel['a']}
    parameters: {{weight: 1.0}}
  - model: {rel['b']}
    parameters: {{weight: 0.5}}
parameters:
  lambda: 1.0
dtype: float32
grid:
{grid}
evaluate:
{evaluate}
""")
    return path


def test_cli_writes_results_cache_and_figures(tiny, tmp_path):
    from taskvec.cli import main

    counter = tmp_path / "n"
    cfg = _write_sweep(tmp_path, tiny, evaluate=f"  name: tests.test_sweep:CountingEval\n  counter: {counter}",
                       grid="  method: [ties, task_arithmetic]\n  density: [0.2, 0.8]")
    out = tmp_path / "out"
    assert main(["sweep", str(cfg), "--out", str(out), "--executor", "serial", "--no-progress"]) == 0
    d = pd.read_csv(out / "results.csv")
    assert list(d["method"]) == ["ties", "ties", "task_arithmetic"] and evaluations(counter) == 3
    assert pd.read_csv(out / "skipped.csv")["reason"].tolist() == ["task_arithmetic takes no density"]
    assert (out / "figures" / "sweep-norm.png").is_file() and (out / "figures" / "pareto-norm.svg").is_file()
    # mergekit semantics and the per-model weights, as `taskvec merge` would merge this config
    want = taskvec.merge(tiny["base"], tiny["models"][:2], "ties", density=0.2, weight=[1.0, 0.5],
                         semantics="mergekit", progress=False, **{"lambda": 1.0})
    assert d["norm"][0] == pytest.approx(float(want["layer.weight"].norm()), rel=1e-6)


@pytest.mark.parametrize("grid, evaluate, message", [
    ("  densty: [0.2]", "  name: zoo", r"sweep.yml: grid: no swept method \(ties\) takes 'densty'"),
    ("  density: [0.2]", "  fast: true", r"sweep.yml: evaluate: expected an evaluator name"),
    ("  density: [2.0]", "  name: zoo", r"sweep.yml: grid point \(ties; .*density must be in"),
    ("  density: [0.2]", "  name: zoo\n  colour: red", r"sweep.yml: evaluate: zoo: .*'colour'"),
    ("  density: [0.2", "  name: zoo", r"sweep.yml: not valid YAML"),
])
def test_cli_bad_sweep_file_is_a_clear_error_and_writes_nothing(tiny, tmp_path, capsys, grid, evaluate, message):
    from taskvec.cli import main

    cfg = _write_sweep(tmp_path, tiny, evaluate=evaluate, grid=grid)
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "out"), "--executor", "serial"]) == 1
    assert capsys.readouterr().err.startswith("taskvec sweep: error: ") and not (tmp_path / "out").exists()
    with pytest.raises(ParameterError, match=message):
        from taskvec.sweeping.cli import _check, read_sweep

        _check(read_sweep(cfg), cfg)


def test_a_killed_sweep_resumes_and_evaluates_only_the_missing_points(tiny, tmp_path):
    counter, out = tmp_path / "n", tmp_path / "out"
    cfg = _write_sweep(tmp_path, tiny, evaluate=f"  name: tests.test_sweep:CountingEval\n  counter: {counter}\n"
                                                "  sleep: 0.3",
                       grid="  density: [0.1, 0.3, 0.5, 0.7, 0.9, 1.0]")
    cmd = [sys.executable, "-m", "taskvec.cli", "sweep", str(cfg), "--out", str(out), "--executor", "serial",
           "--no-progress", "--no-figures"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while len(list((out / "cache").glob("*/*.json"))) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "the sweep never finished two points"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-sweep, with no chance to clean up
    proc.wait()
    done, before = len(list((out / "cache").glob("*/*.json"))), evaluations(counter)
    assert 2 <= done < 6 and not (out / "results.csv").exists()
    from taskvec.cli import main

    assert main(cmd[3:]) == 0  # the same command again (in this process: one interpreter start less)
    assert evaluations(counter) - before == 6 - done
    d = pd.read_csv(out / "results.csv")
    assert list(d["density"]) == [0.1, 0.3, 0.5, 0.7, 0.9, 1.0] and d["norm"].notna().all()
    assert int(d["cached"].sum()) == done


def test_cli_models_are_labelled_by_folder_name(tiny, tmp_path):
    """`grid: models:` names a subset by the models' folder names (the config holds relative paths)."""
    from taskvec.sweeping.cli import read_sweep

    cfg = _write_sweep(tmp_path, tiny, evaluate="  name: zoo", grid="  models: [[a], [a, b]]")
    spec = read_sweep(cfg)
    assert list(spec["models"]) == ["a", "b"]
    assert [os.path.samefile(p, q) for p, q in zip(spec["models"].values(), tiny["models"])] == [True, True]
