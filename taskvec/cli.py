"""`taskvec` command line. Sub-commands import lazily so `--help` starts fast."""
from __future__ import annotations

import importlib
import os
import sys

# name -> (module:function taking argv and returning an exit code, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "merge": ("taskvec.config:cli_main", "merge models from a mergekit-style YAML config"),
    "analyze": ("taskvec.analysis.cli:main", "profile task vectors: sparsity, cosine matrix, sign conflicts"),
    "zoo": ("taskvec.zoo.cli:main", "build / list the offline zoo of real fine-tuned models"),
    "demo": ("taskvec.demo:main", "run the headline experiments on the offline zoo and write figures"),
    "extract-lora": ("taskvec.cli:extract_lora", "export FINETUNED - BASE as a PEFT LoRA adapter (truncated SVD)"),
    "lab": ("taskvec.lab_launcher:main", "open the notebooks in JupyterLab, or one as a Voila app (--voila)"),
    "warmup": ("taskvec.cli:warmup", "compile the fused kernels once after installing (the first merge then pays no JIT)"),
    "sweep": ("taskvec.sweeping.cli:main", "evaluate a grid of merges (mergekit YAML + grid:) on processes, Ray or Dask"),
}

USAGE = "usage: taskvec {" + ",".join(COMMANDS) + "} [options]\n\n" + "\n".join(
    f"  {name:<13} {help_}" for name, (_, help_) in COMMANDS.items()
) + "\n\nRun `taskvec COMMAND --help` for a command's options."


def _rank(text: str) -> int | str:
    if text == "full":  # a string, not None: argparse would count a None as "not given" in a required group
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        import argparse

        raise argparse.ArgumentTypeError(f"expected a positive integer or 'full', got {text!r}")
    return value


def _energy(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        import argparse

        raise argparse.ArgumentTypeError(f"expected a share of the energy in (0, 1], got {text!r}")
    return value


def extract_lora(argv: list[str]) -> int:
    """`taskvec extract-lora BASE FINETUNED OUT --rank R | --energy E`. Exit codes: 0 ok, 1 a clear error, 2 usage."""
    import argparse

    p = argparse.ArgumentParser(
        prog="taskvec extract-lora",
        description="Write tau = FINETUNED - BASE as a PEFT LoRA adapter folder (adapter_config.json + "
                    "adapter_model.safetensors) that peft.PeftModel.from_pretrained loads: a truncated SVD of "
                    "every matrix delta. Biases and norms go to modules_to_save as full weights (or are dropped "
                    "with --drop-extras); tied embeddings get one adapter. Prints each tensor's relative "
                    "reconstruction error |tau - tau_r|_F / |tau|_F. Written atomically: on any error, no OUT.")
    p.add_argument("base", metavar="BASE", help="base model: HF folder, safetensors file/folder, .bin/.pt, or hub id")
    p.add_argument("finetuned", metavar="FINETUNED", help="fine-tuned model of the same architecture")
    p.add_argument("out", metavar="OUT", help="adapter folder to write (must not exist unless --overwrite)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=_rank, help="LoRA rank of every matrix (capped at its smaller side), or 'full'")
    how.add_argument("--energy", type=_energy,
                     help="per matrix, the smallest rank whose singular values keep this share of sum sigma^2 (0-1]")
    p.add_argument("--drop-extras", action="store_true",
                   help="drop biases/norms instead of saving them as full weights (modules_to_save)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the LoRA factors (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)

    from taskvec.errors import TaskVecError

    try:
        import torch

        from taskvec.vector import TaskVector

        tv = TaskVector.from_models(args.base, args.finetuned)
        export = tv.to_lora(args.out, None if args.rank == "full" else args.rank, energy=args.energy, extras="drop" if args.drop_extras else "full",
                            dtype=getattr(torch, args.dtype), overwrite=args.overwrite)
    except TaskVecError as e:
        print(f"taskvec extract-lora: error: {e}", file=sys.stderr)
        return 1
    import pandas as pd

    with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 60):
        print(export.report.drop(columns="module").to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(export.summary())
    return 0


def warmup(argv: list[str]) -> int:
    """`taskvec warmup [--models 1,2,3] [--dtypes bfloat16,float32]`: compile numba's kernels into its cache."""
    import argparse
    import time

    p = argparse.ArgumentParser(
        prog="taskvec warmup",
        description="Compile the fused numba kernels (linear, task arithmetic, TIES, DARE, SLERP) into numba's "
                    "on-disk cache, so the first merge after installing does not spend tens of seconds compiling. "
                    "Kernels specialise on the number of models and the dtypes; others compile on first use.")
    p.add_argument("--models", default="1,2,3", help="numbers of merged models (besides the base) to compile for")
    p.add_argument("--dtypes", default="bfloat16,float32", help="checkpoint dtypes: bfloat16, float32, float16")
    args = p.parse_args(argv)
    try:
        n_models = tuple(int(x) for x in args.models.split(","))
        if any(n < 1 for n in n_models):
            raise ValueError
    except ValueError:
        p.error(f"--models: expected positive integers separated by commas, got {args.models!r}")
    import torch

    names = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
    bad = [d for d in args.dtypes.split(",") if d not in names]
    if bad:
        p.error(f"--dtypes: unknown {bad}; use {', '.join(names)}")
    from taskvec.methods import fused, warmup as kernels

    if not fused.AVAILABLE:
        print("taskvec warmup: numba is not installed; merges use the torch kernels (nothing to compile)")
        return 0
    t0 = time.perf_counter()
    runs = kernels.warmup(n_models=n_models, dtypes=tuple(names[d] for d in args.dtypes.split(",")))
    print(f"taskvec warmup: {runs} synthetic merges ran; their kernels are cached ({time.perf_counter() - t0:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        from taskvec import __version__

        print(f"taskvec {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"taskvec: unknown command {cmd!r}; choose from: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, func = COMMANDS[cmd][0].split(":")
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


# Commands whose work is finished when they return (output renamed into place, files closed): the console
# script then skips the interpreter's teardown, where torch frees its operator registry entry by entry and
# every module is torn down. At 1.1B that took 0.6-1.9 s after a 5 s linear merge had written its output.
FAST_EXIT = frozenset({"merge", "extract-lora", "analyze", "warmup"})


def exit_now(command: str | None, code: int) -> None:
    """Exit with `code`: at once (streams and logging flushed first) after a FAST_EXIT command, else normally."""
    if command in FAST_EXIT:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def entry() -> None:
    """The `taskvec` console script: `main` on sys.argv, then `exit_now`."""
    code = main()
    exit_now(sys.argv[1] if len(sys.argv) > 1 else None, code)


if __name__ == "__main__":
    entry()
