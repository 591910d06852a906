"""Opt-in (TASKVEC_JIT=background): kernels compile in a background thread while the merge takes the torch
path (`fused.kernels_ready`): the first request waits a moment, later ones never block, and a merge gives the
same bits either way."""
from __future__ import annotations

import threading

import pytest
import torch

numba = pytest.importorskip("numba")
from taskvec.methods import fused, get_method  # noqa: E402  (after the numba check)


@pytest.fixture
def jit(monkeypatch):
    monkeypatch.setattr(fused, "BACKGROUND_JIT", True)
    monkeypatch.setattr(fused, "JIT_FIRST_WAIT", 0.0)
    monkeypatch.setattr(fused, "_JIT", {})
    return fused


def test_a_specialisation_is_ready_only_once_its_warm_up_has_run(jit):
    release, ran = threading.Event(), []

    def warm():
        release.wait(60)
        ran.append(1)

    assert jit.kernels_ready(("test", 1), warm) is False  # compiling: the caller takes the torch path
    assert jit.kernels_ready(("test", 1), warm) is False
    release.set()
    jit._JIT[("test", 1)].join(60)
    assert jit.kernels_ready(("test", 1), warm) is True
    assert ran == [1]  # one warm-up per specialisation, however often it is asked for


def test_a_failing_warm_up_leaves_the_error_to_the_real_call(jit):
    def warm():
        raise RuntimeError("boom")

    jit.kernels_ready(("test", 2), warm)  # False or True, depending on how soon the thread failed
    th = jit._JIT[("test", 2)]
    if th is not None:
        th.join(60)
    assert jit.kernels_ready(("test", 2), warm) is True  # the caller then runs the kernel and sees the error


def test_sync_mode_never_waits(monkeypatch):
    monkeypatch.setattr(fused, "BACKGROUND_JIT", False)
    assert fused.kernels_ready(("test", 3), lambda: pytest.fail("no warm-up in sync mode")) is True


def test_merges_give_the_same_bits_before_and_after_the_kernels_are_ready(jit):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(fused.FUSED_MIN + 3, generator=g).bfloat16()
    models = [(base.float() + 0.05 * torch.randn(base.numel(), generator=g)).bfloat16() for _ in range(2)]
    m = get_method("ties")
    checked = m.check_params(2, density=0.3)
    outs = [m.merge_fast(base, models, name="w", checked=checked, out_dtype=torch.bfloat16)]
    for th in list(jit._JIT.values()):
        if th is not None:
            th.join(600)
    outs.append(m.merge_fast(base, models, name="w", checked=checked, out_dtype=torch.bfloat16))
    assert all(v is None for v in jit._JIT.values())  # the second call ran the compiled kernels
    assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16))
