"""Faults during writing: a killed process or a full disk never leaves something that looks like a model."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from taskvec import TaskVector
from taskvec.errors import OutputError
from taskvec.io import open_source, save_safetensors

KILL_SCRIPT = textwrap.dedent(r'''
    import sys, time
    from pathlib import Path
    import torch
    from taskvec import TaskVector
    from taskvec.io import safetensors_format

    work = Path(sys.argv[1])
    base = {f"layers.{i}.w": torch.zeros(64, 64) for i in range(200)}
    ft = {k: v + 1 for k, v in base.items()}
    slow_write = safetensors_format.SafetensorsFileWriter.write
    def write(self, name, t):  # slow the merge down so the parent can kill it mid-way
        slow_write(self, name, t); time.sleep(0.02)
    safetensors_format.SafetensorsFileWriter.write = write
    TaskVector.from_models(base, ft).apply_to(base, out=work / "merged", max_shard_size="200KB")
''')


def _looks_like_model(d) -> bool:
    return d.is_dir() and any(d.glob("*.safetensors")) and not d.name.startswith(".")


def test_sigkill_mid_merge_leaves_no_finished_model_and_next_run_recovers(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)])
    deadline = time.time() + 120
    while time.time() < deadline and not any(tmp_path.glob(".merged.taskvec-tmp-*/*.safetensors")):
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.poll() is None, "the merge finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "merged").exists()
    assert not any(_looks_like_model(d) for d in tmp_path.iterdir())
    assert any(tmp_path.glob(".merged.taskvec-tmp-*"))  # the dead run's scratch folder, hidden

    base = {"w": torch.zeros(3)}
    out = TaskVector.from_models(base, {"w": torch.ones(3)}).apply_to(base, out=tmp_path / "merged")
    assert torch.equal(open_source(out).get("w"), torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # stale scratch of the dead pid removed


def test_full_disk_is_a_clear_error_and_cleans_up(tmp_path, monkeypatch):
    base = {f"w{i}": torch.zeros(1000) for i in range(10)}
    tv = TaskVector.from_models(base, {k: v + 1 for k, v in base.items()})
    real_pwrite = os.pwrite
    calls = {"n": 0}

    def pwrite_until_full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite_until_full)
    with pytest.raises(OutputError, match="No space left on device") as e:
        tv.apply_to(base, out=tmp_path / "merged")
    assert "merged" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    base = {"w": torch.zeros(4), "v": torch.zeros(4)}
    tv = TaskVector.from_models(base, {"w": torch.ones(4), "v": torch.ones(4)})
    save_safetensors({"old": torch.ones(1)}, tmp_path / "tau.safetensors")
    before = (tmp_path / "tau.safetensors").read_bytes()
    from taskvec.io import safetensors_format

    def broken(self, name, t):
        raise KeyboardInterrupt  # the user hits Ctrl-C mid-save

    monkeypatch.setattr(safetensors_format.SafetensorsFileWriter, "write", broken)
    with pytest.raises(KeyboardInterrupt):
        tv.save(tmp_path / "tau.safetensors", overwrite=True)
    assert (tmp_path / "tau.safetensors").read_bytes() == before  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["tau.safetensors"]
