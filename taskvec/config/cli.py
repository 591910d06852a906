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
    for flag in ("--allow-crimes", "--lazy-unpickle", "--low-cpu-memory", "--trust-remote-code",
                 "--safe-serialization", "--write-model-card"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)  # mergekit muscle memory: no effect
    return p


def cli_main(argv: list[str]) -> int:
    """`taskvec merge CONFIG OUT [options]`: 0 on success, 1 on a clear error, 2 on bad usage."""
    args = _build_parser().parse_args(argv)
    device = "cuda" if args.cuda and args.device == "cpu" else args.device
    try:
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
    except TaskVecError as e:
        print(f"taskvec merge: error: {e}", file=sys.stderr)
        return 1
    print(f"merged into {out}")
    return 0
