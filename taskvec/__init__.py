"""taskvec: task vectors (tau = theta_ft - theta_base) — extract, analyse, edit and merge models."""
from __future__ import annotations

__version__ = "0.1.0"

# Public names resolve lazily: `import taskvec` stays cheap (the CLI's --help must start fast).
_LAZY = {
    "TaskVector": "taskvec.vector",
    "analogy": "taskvec.vector",
    "open_source": "taskvec.io",
    "ShardedWriter": "taskvec.io",
    "merge": "taskvec.merging",  # module name differs so the submodule never shadows the function
    "adamerging": "taskvec.methods.adamerging",
    "sweep": "taskvec.sweeping",  # likewise: the package is `sweeping`, the function `sweep`
    "search": "taskvec.sweeping",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'taskvec' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
