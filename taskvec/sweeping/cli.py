"""`taskvec sweep SWEEP.yml --out DIR`: a mergekit config plus a `grid:` and an `evaluate:` block.

    merge_method: ties            # the method of points whose grid has no `method` axis
    base_model: ./base
    models:
      - model: ./ft_a
      - model: ./ft_b
    parameters: {weight: 1.0}     # shared by every point (scalars); per-model values under each model
    dtype: float32
    grid:
      method: [ties, task_arithmetic]
      density: [0.2, 0.5, 0.8]
      lambda: [0.5, 1.0]
      models: [[ft_a], [ft_a, ft_b]]
    evaluate: {name: zoo, zoo: minilm-tasks, fast: true}   # or `evaluate: perplexity`, or module:Class

Writes DIR/results.csv (and DIR/skipped.csv), the cache in DIR/cache (a rerun
or a resumed, killed run evaluates only the missing points) and the figures in
DIR/figures. The whole file is checked before anything is written or merged.
Like `taskvec merge`, methods run with mergekit's semantics.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping

from taskvec.errors import ParameterError, TaskVecError

SWEEP_KEYS = ("grid", "evaluate")


def _fail(path: Path, key: str, msg: str) -> ParameterError:
    return ParameterError(f"{path}: {key}: {msg}")


def _scalar(value: Any, path: Path, key: str) -> Any:
    if isinstance(value, (tuple, list)) or value is None:
        raise _fail(path, key, f"a sweep takes one number per parameter here (gradients and filters are not "
                               f"swept), got {value!r}")
    return value


def read_sweep(path: str | Path) -> dict[str, Any]:
    """The sweep file as `sweep()` arguments: base, models (label -> path), grid, evaluate, method, params, dtype.

    Every error names the file and the key."""
    import yaml

    from taskvec.config.parse import parse_config
    from taskvec.config.plan import _model_path
    from taskvec.sweeping.engine import model_labels
    from taskvec.methods import get_method

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParameterError(f"{path}: sweep file not found") from None
    except yaml.YAMLError as e:
        raise ParameterError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, Mapping):
        raise ParameterError(f"{path}: expected a YAML mapping at the top level")
    raw = dict(raw)
    blocks = {k: raw.pop(k, None) for k in SWEEP_KEYS}
    if not isinstance(blocks["grid"], Mapping) or not blocks["grid"]:
        raise _fail(path, "grid", "expected a mapping of parameter -> list of values (e.g. density: [0.2, 0.5])")
    evaluate = blocks["evaluate"]
    if isinstance(evaluate, str):
        evaluate = {"name": evaluate}
    if not isinstance(evaluate, Mapping) or not isinstance(evaluate.get("name"), str):
        raise _fail(path, "evaluate", "expected an evaluator name (zoo, perplexity, lm_eval, module:Class) or "
                                      "a mapping with `name:` and its options")
    try:
        cfg = parse_config(raw)
    except ParameterError as e:
        text = str(e)
        raise ParameterError(f"{path}{text[len('config'):]}" if text.startswith("config") else f"{path}: {text}") \
            from None
    if not cfg.models:
        raise _fail(path, "models", "a sweep merges a list of `models:` (slices and modules are not swept)")
    ref = Path(path)
    resolve = {m.model: _model_path(m.model, ref) for m in cfg.models}
    labels = model_labels([m.model for m in cfg.models])[0]  # folder names: what `grid: models:` and results.csv use
    method = get_method(cfg.merge_method)
    params = {k: _scalar(v, path, f"parameters.{k}") for k, v in cfg.parameters.items()}
    per_model = {k for m in cfg.models for k in m.parameters}
    for k in per_model:
        default = method.param(k).default
        params[k] = [_scalar(m.parameters.get(k, default), path, f"models[{i}].parameters.{k}")
                     for i, m in enumerate(cfg.models)]
    grid = dict(blocks["grid"])
    methods = grid.get("method") or [cfg.merge_method]
    if any("semantics" in get_method(m).param_names for m in (methods if isinstance(methods, list) else [methods])):
        params["semantics"] = "mergekit"  # the config is a mergekit config: mergekit's weighting, as `taskvec merge`
    options = {k: v for k, v in evaluate.items() if k != "name"}
    return {"base": _model_path(cfg.base_model, ref) if cfg.base_model else None,
            "models": dict(zip(labels, (resolve[m.model] for m in cfg.models))), "grid": grid,
            "method": cfg.merge_method,
            "evaluate": evaluate["name"], "evaluate_options": options, "dtype": cfg.out_dtype or cfg.dtype,
            "params": params}


def _check(spec: dict[str, Any], path: Path) -> None:
    """The grid and the evaluator checked as `sweep` will use them, before anything is written."""
    from taskvec.sweeping.evaluators import get_evaluator
    from taskvec.sweeping.grid import expand_grid

    try:
        expand_grid(spec["grid"], labels=list(spec["models"]), method=spec["method"], fixed=spec["params"],
                    has_base=spec["base"] is not None)
        get_evaluator(spec["evaluate"], **spec["evaluate_options"])
    except ParameterError as e:
        raise ParameterError(f"{path}: {e}") from None


def main(argv: list[str]) -> int:
    """`taskvec sweep SWEEP.yml --out DIR [--executor E] [--workers N]`: 0 ok, 1 a clear error, 2 usage."""
    import argparse

    p = argparse.ArgumentParser(prog="taskvec sweep", description=__doc__.split("\n\n")[0] + " Every point is "
                                "merged from the checkpoints by a worker and evaluated; results are cached.")
    p.add_argument("config", metavar="SWEEP.yml", help="mergekit-style config with `grid:` and `evaluate:` blocks")
    p.add_argument("--out", required=True, help="output folder: results.csv, cache/, figures/ (reused by a rerun)")
    p.add_argument("--executor", default="local", choices=("serial", "local", "ray", "dask"),
                   help="where points run (default: local processes)")
    p.add_argument("--workers", type=int, help="parallel workers (default: every core)")
    p.add_argument("--materialize", default="auto", choices=("auto", "state_dict", "folder"),
                   help="give the evaluator a state dict or a merged folder (default: what it prefers)")
    p.add_argument("--seed", type=int, default=0, help="seed of random methods (DARE, DELLA)")
    p.add_argument("--no-figures", dest="figures", action="store_false", help="write no figures")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = p.parse_args(argv)
    path = Path(args.config)
    try:
        spec = read_sweep(path)
        _check(spec, path)
        result = _run(spec, args)
    except TaskVecError as e:
        print(f"taskvec sweep: error: {e}", file=sys.stderr)
        return 1
    print(result)
    return 0


def _run(spec: dict[str, Any], args):
    from taskvec.analysis._results import write_csv_atomic
    from taskvec.sweeping.engine import sweep

    out = Path(args.out)
    params = spec.pop("params")
    result = sweep(**spec, **params, executor=args.executor, workers=args.workers, cache=out / "cache",
                   materialize=args.materialize, seed=args.seed, progress=args.progress, desc=Path(args.config).stem)
    write_csv_atomic(result.data, out / "results.csv")
    if len(result.skipped):
        write_csv_atomic(result.skipped, out / "skipped.csv")
    if args.figures and result.metrics:
        _figures(result, out / "figures")
    return result


def _figures(result, folder: Path) -> None:
    from taskvec.viz import save_figure

    for metric in result.metrics:
        if result.data[metric].dtype.kind not in "fi":
            continue
        save_figure(result.plot(metric), f"sweep-{metric}", folder)
        if len(result.metrics) > 1 or result.data["n_models"].nunique() > 1:
            save_figure(result.pareto(metric), f"pareto-{metric}", folder)
