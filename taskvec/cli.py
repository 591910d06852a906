"""`taskvec` command line. Sub-commands import lazily so `--help` starts fast."""
from __future__ import annotations

import importlib
import sys

# name -> (module:function taking argv and returning an exit code, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "merge": ("taskvec.config:cli_main", "merge models from a mergekit-style YAML config"),
    "analyze": ("taskvec.analysis.cli:main", "profile task vectors: sparsity, cosine matrix, sign conflicts"),
    "zoo": ("taskvec.zoo.cli:main", "build / list the offline zoo of real fine-tuned models"),
    "demo": ("taskvec.demo:main", "run the headline experiments on the offline zoo and write figures"),
}

USAGE = "usage: taskvec {" + ",".join(COMMANDS) + "} [options]\n\n" + "\n".join(
    f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()
) + "\n\nRun `taskvec COMMAND --help` for a command's options."


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


if __name__ == "__main__":
    sys.exit(main())
