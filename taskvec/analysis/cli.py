"""`taskvec analyze BASE FT1 [FT2 ...] --out DIR`: profile, cosine matrix, sign conflicts (and with
--spectral the task matrices' spectra and interference) -> CSVs + figures."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from taskvec.errors import OutputError, ParameterError, TaskVecError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="taskvec analyze",
        description="Profile the task vectors tau_i = FT_i - BASE: sparsity and magnitudes, pairwise cosine "
                    "similarity (overall, per layer, per module type) and TIES sign conflicts. Writes tidy CSVs, "
                    "PNG + SVG figures and summary.txt into --out (atomically).",
    )
    p.add_argument("base", metavar="BASE", help="base model: HF folder, safetensors file/folder, .bin/.pt, or hub id")
    p.add_argument("finetuned", metavar="FT", nargs="+", help="fine-tuned model(s) of the same architecture")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--names", nargs="+", help="one short label per fine-tuned model (default: folder names)")
    p.add_argument("--density", type=float, default=0.2, help="TIES trim density k for sign conflicts (default 0.2)")
    p.add_argument("--scope", choices=("tensor", "global"), default="tensor",
                   help="trim scope: top-k per tensor (mergekit, default) or over the whole vector (TIES paper)")
    p.add_argument("--curve", action="store_true", help="also compute sign conflicts vs density (one more pass)")
    p.add_argument("--spectral", action="store_true",
                   help="also the task matrices' spectra (ranks, energy curves) and, with >= 2 models, singular "
                        "task interference, principal angles, subspace alignment and TALL-mask shares (two more passes)")
    p.add_argument("--eps", type=float, default=1e-6, help="|tau| <= eps counts as ~zero in the profile (default 1e-6)")
    p.add_argument("--title", help="caption on every figure (default: 'task vectors of FT... relative to BASE')")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-figures", action="store_true", help="write CSVs and summary only")
    return p


def _label(path: str) -> str:
    p = Path(path.rstrip("/"))
    return p.stem if p.suffix == ".safetensors" else p.name or path


def run(args: argparse.Namespace) -> Path:
    from taskvec.analysis import conflict_vs_density, cosine_matrix, profile, sign_conflicts
    from taskvec.io import check_output_path, open_source
    from taskvec.io.writer import replace_dir, staging_dir
    from taskvec.vector import TaskVector
    from taskvec.viz import save_figure

    names = args.names or [_label(f) for f in args.finetuned]
    if len(names) != len(args.finetuned):
        raise ParameterError(f"--names: got {len(names)} names for {len(args.finetuned)} fine-tuned models")
    if not (0.0 < args.density <= 1.0):
        raise ParameterError(f"--density must be in (0, 1], got {args.density}")
    base = open_source(args.base)
    finetuned = [open_source(f) for f in args.finetuned]
    out = check_output_path(args.out, [base, *finetuned], overwrite=args.overwrite)
    # One base Source shared by every vector: each base tensor is read once per pass.
    tvs = {n: TaskVector.from_models(base, ft) for n, ft in zip(names, finetuned)}

    try:
        tmp = staging_dir(out)
    except OSError as e:
        raise OutputError(f"{out}: can't create the output folder: {e}") from e
    try:
        summary: list[str] = [f"base: {base.name}"] + [f"{n}: {ft.name}" for n, ft in zip(names, finetuned)] + [""]
        figures: list[tuple[object, str]] = []

        prof = profile(tvs, eps=args.eps)
        prof.to_csv(tmp)
        summary += ["## profile"] + prof.summary() + [""]
        figures.append((prof.plot(), "profile"))

        if len(tvs) >= 2:
            cos = cosine_matrix(tvs)
            cos.to_csv(tmp)
            summary += ["## cosine similarity"] + cos.summary() + [""]
            figures += [(cos.plot(None), "cosine"), (cos.plot("layer"), "cosine-by-layer"), (cos.plot("module"), "cosine-by-module")]

            conf = sign_conflicts(tvs, density=args.density, scope=args.scope)
            conf.to_csv(tmp)
            summary += ["## sign conflicts"] + conf.summary() + [""]
            figures += [(conf.plot("layer_module"), "conflicts-layer-module"), (conf.plot("layers"), "conflicts-by-layer")]
            if args.curve:
                curve = conflict_vs_density(tvs, scope=args.scope)
                curve.to_csv(tmp)
                summary += curve.summary() + [""]
                figures.append((curve.plot(), "conflicts-vs-density"))
        else:
            summary += ["(one task vector: cosine matrix and sign conflicts need at least two)"]
        if args.spectral:
            figures += _spectral(tvs, tmp, summary)

        if not args.no_figures:
            caption = args.title or f"task vectors of {', '.join(names)} relative to {_label(args.base)}"
            for fig, name in figures:
                fig.suptitle(caption, fontsize=9, color="0.35", x=0.01, ha="left")
                save_figure(fig, name, tmp)
        (tmp / "summary.txt").write_text("\n".join(summary) + "\n")
        replace_dir(tmp, out)  # the previous results stay in place until the new ones are complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print("\n".join(summary))
    print(f"wrote {out}")
    return out


def _spectral(tvs, tmp: Path, summary: list[str]) -> list[tuple[object, str]]:
    """--spectral: spectral-*.csv and interference-*.csv, their summaries, and the figures to save."""
    from taskvec.analysis import spectral_interference, spectral_profile

    prof = spectral_profile(tvs)
    prof.to_csv(tmp)
    summary += ["## spectra of the task matrices"] + prof.summary() + [""]
    if prof.tensors.empty:
        return []
    figures = [(prof.plot("curves", vector=n), f"spectral-energy-{n}") for n in prof.task_names]
    figures.append((prof.plot("heatmap"), "spectral-rank-heatmap"))
    if len(tvs) >= 2:
        inter = spectral_interference(tvs)
        inter.to_csv(tmp)
        summary += ["## interference in the singular vectors"] + inter.summary() + [""]
        figures += [(inter.plot(kind), f"interference-{kind}") for kind in ("sti", "angles", "alignment", "tall")]
    return figures


def main(argv: list[str]) -> int:
    """Exit codes: 0 success, 1 a clear error (named file/key/parameter), 2 bad usage."""
    args = _parser().parse_args(argv)
    try:
        run(args)
    except TaskVecError as e:
        print(f"taskvec analyze: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
