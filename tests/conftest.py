import hashlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("TASKVEC_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one xdist worker per core: each worker, and the notebook kernels and CLIs it starts, computes on one
    # thread. A second thread on an already busy core only spins: measured here, MiniLM evaluation took the
    # same wall time with 2 threads as with 1 beside another job, for 46 % more CPU time.
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, "1")


def tree_hash(*paths) -> dict[str, str]:
    """sha256 of every file under the given paths: inputs must be byte-identical after any operation."""
    out = {}
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@pytest.fixture
def hash_tree():
    return tree_hash


@pytest.fixture
def fused_kernels_in_the_caller(monkeypatch):
    """Tests of the fused kernels themselves: compile in the calling thread, so no torch path stands in
    while a kernel compiles in the background (TASKVEC_JIT=background)."""
    from taskvec.methods import fused

    monkeypatch.setattr(fused, "BACKGROUND_JIT", False)
