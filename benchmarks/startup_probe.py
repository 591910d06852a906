"""Run `taskvec merge ...` and report how long after the interpreter started the first input tensor was read.

    python benchmarks/startup_probe.py CONFIG OUT [taskvec merge options]

Prints one JSON line to stderr: startup_to_first_tensor_s (process start -> first `Source.get` of a
safetensors input, from /proc/self/stat, 10 ms resolution), total_s, rc. run_bench.py runs it as the taskvec
command, so the wall time it measures is the same merge.
"""
from __future__ import annotations

import json
import os
import sys
import time


def since_process_start() -> float:
    """Seconds since this process was created (the kernel's start time, so interpreter start-up counts)."""
    ticks = os.sysconf("SC_CLK_TCK")
    start = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19]) / ticks
    return float(open("/proc/uptime").read().split()[0]) - start


def main(argv: list[str]) -> int:
    first: list[float] = []
    from taskvec.io import readers

    real_get = readers.SafetensorsSource.get

    def get(self, key):
        if not first:
            first.append(since_process_start())
        return real_get(self, key)

    readers.SafetensorsSource.get = get
    from taskvec.cli import main as cli_main

    rc = cli_main(["merge", *argv])
    print(json.dumps({"startup_to_first_tensor_s": first[0] if first else None,
                      "total_s": since_process_start(), "rc": rc}), file=sys.stderr)
    return rc


if __name__ == "__main__":
    from taskvec.cli import exit_now

    exit_now("merge", main(sys.argv[1:]))  # as the `taskvec` console script exits
