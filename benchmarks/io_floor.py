"""The I/O floor of a merge: read every input tensor, add them, write the result.

    python benchmarks/io_floor.py BASE FT1 [FT2 ...] OUT

Same reader (mmapped safetensors) and writer (taskvec.io.ShardedWriter) as
taskvec's merges, one add per input and no merge arithmetic: no merge of
these inputs can be faster than this on the same machine.
"""
from __future__ import annotations

import sys

import torch

from taskvec.io import ShardedWriter, open_source


def io_floor(inputs: list[str], out: str) -> None:
    sources = [open_source(p) for p in inputs]
    first = sources[0]
    with ShardedWriter(out, first.index, inputs=sources) as w:
        for name in first.keys():
            acc = sources[0].get(name).clone()
            for s in sources[1:]:
                acc.add_(s.get(name))
            w.add(name, acc)
            del acc
        w.copy_from(first.model_dir)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    torch.set_grad_enabled(False)
    io_floor(sys.argv[1:-1], sys.argv[-1])
    from taskvec.cli import exit_now

    exit_now("merge", 0)  # no interpreter teardown, as `taskvec merge` exits: the floor stays a floor
