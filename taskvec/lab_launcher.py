"""`taskvec lab`: open the notebooks in JupyterLab (or serve one as a Voilà app) with the right kernel.

The "right kernel" is this interpreter: the server gets a private kernel spec named ``python3`` (the name the
notebooks ask for) whose command is ``sys.executable -m ipykernel_launcher``, placed first on ``JUPYTER_PATH``,
so a user-wide ``python3`` kernel that points at another Python can't shadow the environment taskvec is
installed in. ``--fast`` exports ``TASKVEC_FAST=1`` to the server and so to every kernel it starts.

The notebooks live in the repository (``notebooks/``); a non-editable install does not ship them, so the
folder is looked up as: ``--notebooks DIR``, ``$TASKVEC_NOTEBOOKS``, the checkout this package was imported
from, ``./notebooks``. Exit codes: the server's own, 1 for a clear error (a missing package, no notebooks),
2 for bad usage.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent   # taskvec/ (no import of the package: it imports torch)
UI_EXTRA_HINT = 'pip install "taskvec[ui]"   (from a checkout: pip install -e ".[ui]")'


class LabError(Exception):
    """A clear, user-facing error of `taskvec lab` (exit code 1)."""


@dataclass
class LabCommand:
    """What `taskvec lab` would run: the command line, its working directory and the environment it adds."""

    argv: list[str]
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)
    app: str = "jupyterlab"
    notebook: Path | None = None

    def describe(self) -> str:
        lines = [f"cd {self.cwd}"]
        lines += [f"export {k}={v}" for k, v in sorted(self.env.items())]
        lines.append(" ".join(self.argv))
        return "\n".join(lines)


def have(module: str) -> bool:
    """True when `module` can be imported in this interpreter (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def packaged_notebooks_dir() -> Path | None:
    """The checkout's ``notebooks/`` next to the imported `taskvec` package (an editable or source install);
    None for an installed wheel, which does not ship the notebooks."""
    candidate = PACKAGE_DIR.parent / "notebooks"
    return candidate if candidate.is_dir() and any(candidate.glob("*.ipynb")) else None


def find_notebooks_dir(explicit: str | os.PathLike | None = None) -> Path:
    if explicit is not None:
        d = Path(explicit).expanduser()
        if not d.is_dir():
            raise LabError(f"--notebooks {explicit}: no such folder")
        return d.resolve()
    if os.environ.get("TASKVEC_NOTEBOOKS"):
        d = Path(os.environ["TASKVEC_NOTEBOOKS"]).expanduser()
        if not d.is_dir():
            raise LabError(f"TASKVEC_NOTEBOOKS={d}: no such folder")
        return d.resolve()
    found = packaged_notebooks_dir()
    if found is not None:
        return found
    here = Path.cwd() / "notebooks"
    if here.is_dir() and any(here.glob("*.ipynb")):
        return here.resolve()
    raise LabError(
        "the notebooks are not shipped with an installed (non-editable) taskvec package, and none were found "
        f"(looked next to {PACKAGE_DIR} and in ./notebooks). Point at a "
        "checkout's notebooks folder: `taskvec lab --notebooks path/to/taskvec/notebooks` (or set "
        "TASKVEC_NOTEBOOKS), or install from a checkout with `pip install -e .`.")


def resolve_notebook(name: str, notebooks_dir: Path) -> Path:
    """A notebook path, file name, stem or unique prefix ("04", "04_dare", "04_dare.ipynb") -> its path."""
    p = Path(name).expanduser()
    if p.suffix == ".ipynb" and p.is_file():
        return p.resolve()
    for candidate in (notebooks_dir / name, notebooks_dir / f"{name}.ipynb"):
        if candidate.suffix == ".ipynb" and candidate.is_file():
            return candidate.resolve()
    available = sorted(q.name for q in notebooks_dir.glob("*.ipynb"))
    matches = [q for q in available if q.startswith(name)]
    if len(matches) == 1:
        return (notebooks_dir / matches[0]).resolve()
    if len(matches) > 1:
        raise LabError(f"notebook {name!r} is ambiguous in {notebooks_dir}: {', '.join(matches)}")
    raise LabError(f"no notebook {name!r} in {notebooks_dir}; available: {', '.join(available) or 'none'}")


def kernel_spec(python: str | None = None) -> dict:
    """The kernel spec of this interpreter, under the name the notebooks ask for (``python3``)."""
    return {
        "argv": [python or sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (taskvec)",
        "language": "python",
        "metadata": {"debugger": True},
    }


def write_kernel_spec(root: Path, python: str | None = None) -> Path:
    """Write ``root/kernels/python3/kernel.json``; put `root` first on JUPYTER_PATH to use it."""
    d = root / "kernels" / "python3"
    d.mkdir(parents=True, exist_ok=True)
    (d / "kernel.json").write_text(json.dumps(kernel_spec(python), indent=1))
    return root


def check_packages(app: str) -> None:
    """Clear error naming what is missing (the server app and the kernel) and the pip extra to install."""
    missing = [m for m in (app, "ipykernel") if not have(m)]
    if missing:
        names = " and ".join(m for m in missing)
        what = {"voila": "serving a notebook as a Voilà app", "jupyterlab": "JupyterLab",
                "notebook": "Jupyter Notebook"}.get(app, app)
        raise LabError(f"{names} {'is' if len(missing) == 1 else 'are'} not installed in {sys.executable} "
                       f"(needed for {what}). Install the ui extra: {UI_EXTRA_HINT}")


def build_command(args: argparse.Namespace, extra: list[str] | None = None) -> LabCommand:
    """The server command for parsed `taskvec lab` arguments (checks packages and paths; starts nothing)."""
    given = Path(args.notebook).expanduser() if args.notebook else None
    if given is not None and given.suffix == ".ipynb" and given.is_file() and args.notebooks is None:
        notebook = given.resolve()     # a notebook path needs no notebooks folder (an installed wheel has none)
        nb_dir = notebook.parent
    else:
        nb_dir = find_notebooks_dir(args.notebooks)
        notebook = resolve_notebook(args.notebook, nb_dir) if args.notebook else None
    env: dict[str, str] = {}
    if args.fast:
        env["TASKVEC_FAST"] = "1"
    if args.voila:
        app = "voila"
        check_packages(app)
        target = notebook if notebook is not None else nb_dir    # a folder: Voilà's tree of notebooks
        argv = [sys.executable, "-m", "voila", str(target)]
        if args.port is not None:
            argv.append(f"--port={args.port}")
        if args.no_browser:
            argv.append("--no-browser")
        argv.append(f"--Voila.ip={args.ip}")
        cwd = target.parent if notebook is not None else nb_dir
    else:
        app = "notebook" if args.classic else ("jupyterlab" if have("jupyterlab") or not have("notebook") else "notebook")
        check_packages(app)
        argv = [sys.executable, "-m", app, f"--ServerApp.root_dir={nb_dir}", f"--ServerApp.ip={args.ip}"]
        if args.port is not None:
            argv.append(f"--ServerApp.port={args.port}")
        if args.no_browser:
            argv.append("--no-browser")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            argv.append("--allow-root")   # containers often run as root; Jupyter refuses to start without it
        if notebook is not None:
            argv.append(str(notebook.relative_to(nb_dir)) if notebook.is_relative_to(nb_dir) else str(notebook))
        cwd = nb_dir
    return LabCommand(argv + list(extra or []), cwd, env, app, notebook)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="taskvec lab",
        description="Open taskvec's notebooks in JupyterLab (Jupyter Notebook when JupyterLab is missing, or "
                    "--classic), or serve one as a Voilà app (--voila), with a kernel running this Python "
                    f"({sys.executable}). Needs the ui extra: {UI_EXTRA_HINT}. Arguments after `--` go to "
                    "the server unchanged.")
    p.add_argument("notebook", nargs="?", metavar="NOTEBOOK",
                   help="notebook to open: a path, or a name / unique prefix in the notebooks folder "
                        "(e.g. 04 or 04_dare); without it, the folder")
    p.add_argument("--voila", action="store_true", help="serve NOTEBOOK (or the folder's tree) as a Voilà app")
    p.add_argument("--fast", action="store_true", help="set TASKVEC_FAST=1: the fast zoo and evaluation subsets")
    p.add_argument("--port", type=int, default=None, help="port to listen on (default: the server's)")
    p.add_argument("--ip", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--no-browser", action="store_true", help="don't open a web browser")
    p.add_argument("--notebooks", metavar="DIR", default=None,
                   help="the notebooks folder (default: $TASKVEC_NOTEBOOKS, else the checkout's notebooks/; "
                        "an installed wheel does not ship them)")
    p.add_argument("--classic", action="store_true", help="Jupyter Notebook instead of JupyterLab")
    p.add_argument("--dry-run", action="store_true", help="print the command and environment; start nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = parser().parse_args(argv)
    if args.port is not None and not 0 <= args.port <= 65535:
        parser().error(f"--port must be in 0-65535, got {args.port}")
    if args.voila and args.classic:
        parser().error("--classic and --voila exclude each other")
    try:
        cmd = build_command(args, extra)
    except LabError as e:
        print(f"taskvec lab: error: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(cmd.describe())
        return 0
    with tempfile.TemporaryDirectory(prefix="taskvec-lab-") as tmp:
        env = {**os.environ, **cmd.env}
        env["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(write_kernel_spec(Path(tmp))),
                                                            os.environ.get("JUPYTER_PATH")]))
        print(f"taskvec lab: {cmd.app} on {cmd.notebook or cmd.cwd}"
              + (" (TASKVEC_FAST=1)" if cmd.env.get("TASKVEC_FAST") else "")
              + f"; kernel: {sys.executable}", file=sys.stderr)
        proc = subprocess.Popen(cmd.argv, cwd=cmd.cwd, env=env)
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # the server got the same Ctrl-C: let it shut its kernels down itself
                continue
