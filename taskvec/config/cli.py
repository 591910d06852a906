"""`taskvec merge CONFIG OUT`: the command line over `run_config` (mergekit-yaml's flags accepted)."""
from __future__ import annotations

import sys

from taskvec.config.plan import plan_config
from taskvec.config.run import run_config
from taskvec.errors import TaskVecError


def _build_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="taskvec merge",
        description="Merge models from a mergekit-compatible YAML config (the same file mergekit-yaml takes).",
        epilog="Methods: linear, task_arithmetic, ties, dare_ties, dare_linear, slerp, passthrough and the rest of "
               "taskvec.methods. mergekit's --allow-crimes, --lazy-unpickle and --cuda are accepted.",
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument("out", help="output folder (must not exist)")
    p.add_argument("--device", default="cpu", help="where to compute: cpu (default), cuda, cuda:1, ...")
    p.add_argument("--cuda", action="store_true", help="same as --device cuda (mergekit spelling)")
    p.add_argument("--out-shard-size", default="5B",
                   help="bytes per output shard: 5B (=5e9 bytes, the default, as mergekit), 1B, 500M, 2GB")
    p.add_argument("--copy-tokenizer", dest="copy_tokenizer", action="store_true", default=True,
                   help="copy the tokenizer from tokenizer_source or the base model (default)")
    p.add_argument("--no-copy-tokenizer", dest="copy_tokenizer", action="store_false")
    p.add_argument("--seed", type=int, default=0, help="seed for random methods (DARE); default 0")
    p.add_argument("--random-seed", dest="seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", "--quiet", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config and models, print the plan (per-layer parameter values), write nothing")
    hub = p.add_argument_group("publishing", "upload the merged folder (with its model card) to the Hugging Face "
                               "Hub after the merge; token from HF_TOKEN or `hf auth login`")
    hub.add_argument("--push-to-hub", metavar="REPO", help="Hub repo id (namespace/name) to upload the merge to")
    hub.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)")
    hub.add_argument("--revision", help="branch to push to (created when missing; default main)")
    hub.add_argument("--commit-message", help="commit message of the upload")
    hub.add_argument("--evaluation", metavar="FILE",
                     help="metrics of the merged model for the model card (Evaluation table + model-index): "
                          "a JSON object {metric: value} or {task: {metric: value}}, or a CSV table")
    for flag in ("--allow-crimes", "--lazy-unpickle", "--low-cpu-memory", "--trust-remote-code",
                 "--safe-serialization", "--write-model-card"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)  # mergekit muscle memory: no effect
    return p


def _read_evaluation(path: str):
    """The metrics in an --evaluation file: JSON (an object) or CSV (a table)."""
    import json

    from taskvec.errors import ParameterError

    try:
        if path.lower().endswith(".csv"):
            import pandas as pd

            return pd.read_csv(path)
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ParameterError(f"--evaluation {path}: cannot read it ({e})") from None
    if not isinstance(data, dict):
        raise ParameterError(f"--evaluation {path}: expected a JSON object {{metric: value}} or {{task: {{metric: value}}}}")
    return data


def cli_main(argv: list[str]) -> int:
    """`taskvec merge CONFIG OUT [options]`: 0 on success, 1 on a clear error, 2 on bad usage."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    device = "cuda" if args.cuda and args.device == "cpu" else args.device
    if not args.push_to_hub and (args.private or args.revision or args.commit_message):
        parser.error("--private, --revision and --commit-message need --push-to-hub REPO")
    evaluation = None
    try:
        if args.evaluation:
            evaluation = _read_evaluation(args.evaluation)
        if args.push_to_hub and not args.dry_run:
            from taskvec.io.publish import check_repo_id, resolve_token

            check_repo_id(args.push_to_hub)  # a bad repo id or no token: say so before a long merge, writing nothing
            resolve_token()
        if args.dry_run:
            from taskvec.config.parse import parse_config
            from taskvec.config.plan import open_models
            from taskvec.config.run import merge_vocabulary

            cfg = parse_config(args.config)
            print(plan_config(cfg).describe())
            vocab = merge_vocabulary(cfg, open_models(cfg)) if cfg.tokenizer is not None else None
            if vocab is not None:
                print(vocab.describe())
            return 0
        out = run_config(args.config, args.out, device=device, out_shard_size=args.out_shard_size,
                         copy_tokenizer=args.copy_tokenizer, seed=args.seed, progress=args.progress)
        if evaluation is not None:
            from taskvec.config.parse import parse_config
            from taskvec.model_card import write_model_card

            write_model_card(out, parse_config(args.config), evaluation=evaluation)
    except TaskVecError as e:
        print(f"taskvec merge: error: {e}", file=sys.stderr)
        return 1
    print(f"merged into {out}")
    if args.push_to_hub:
        from taskvec.io.publish import push_folder

        try:
            result = push_folder(out, args.push_to_hub, private=args.private, revision=args.revision,
                                 commit_message=args.commit_message)
        except TaskVecError as e:
            print(f"taskvec merge: the merge succeeded but the push failed: {e}", file=sys.stderr)
            return 1
        print(f"pushed to {result.repo_url} ({result.commit_url})")
    return 0
