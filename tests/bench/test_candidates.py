"""The benchmark's candidates compute what they claim: a candidate that computes
something else is no fair comparison."""

import dataclasses

import pytest
import torch

import minrnn
from minrnn.bench.layers import PaperMinGRU, layer_candidates, paper_mingru
from minrnn.bench.layers import run as run_layers
from minrnn.bench.runner import Budget
from minrnn.bench.settings import Settings
from minrnn.ops import BACKENDS

CPU = torch.device("cpu")


@pytest.mark.parametrize("with_h0", [False, True])
def test_paper_listing_matches_minrnn_mingru(with_h0):
    gen = torch.Generator().manual_seed(1)
    hidden = (3 * torch.randn(3, 128, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    gate = (3 * torch.randn(3, 128, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    h0 = (torch.rand(3, 5, generator=gen, dtype=torch.float64) + 0.1).requires_grad_() if with_h0 else None
    w = torch.randn(3, 128, 5, generator=gen, dtype=torch.float64)
    inputs = [t for t in (hidden, gate, h0) if t is not None]

    h = paper_mingru(hidden, gate, h0)
    grads = torch.autograd.grad((h * w).sum(), inputs)
    h_ref, _ = minrnn.functional.mingru(hidden, gate, h0, mode="sequential")
    grads_ref = torch.autograd.grad((h_ref * w).sum(), inputs)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11)


def test_paper_layer_matches_mingru_layer_with_the_same_weights():
    paper = PaperMinGRU(8, 6, dtype=torch.float64)
    layer = minrnn.MinGRU(8, 6, dtype=torch.float64)
    layer.proj[0].load_state_dict(paper.proj.state_dict())
    x = torch.randn(2, 50, 8, dtype=torch.float64)
    torch.testing.assert_close(paper(x), layer(x)[0], rtol=1e-10, atol=1e-12)


def test_paper_listing_rejects_a_misshapen_h0():
    with pytest.raises(ValueError, match="h0"):
        paper_mingru(torch.randn(2, 4, 3), torch.randn(2, 4, 3), torch.rand(3, 3))


def test_every_registered_backend_becomes_a_candidate(monkeypatch):
    # a backend registered later joins with no edit here (copies of the sequential one stand in)
    loop = BACKENDS["sequential"]
    monkeypatch.setitem(BACKENDS, "loop-copy", dataclasses.replace(loop, name="loop-copy"))
    monkeypatch.setitem(BACKENDS, "gpu-only", dataclasses.replace(loop, name="gpu-only",
                                                                  devices=frozenset({"cuda"})))
    names = {c.name for c in layer_candidates(CPU)}
    assert {"minGRU[loop-copy]", "minLSTM[loop-copy]"} <= names
    assert not any("gpu-only" in n for n in names)
    # the suite itself, on the reference backends and the new one only (no JIT compiling here)
    for name in [n for n in BACKENDS if n not in ("sequential", "chunked", "loop-copy", "gpu-only")]:
        monkeypatch.delitem(BACKENDS, name)
    s = Settings.make(quick=True, lengths=[8], batches=[2], widths=[4], threads=1, plots=False,
                      budget=Budget(repeats=1, measure_memory=False))
    rows = run_layers(s)["rows"]
    assert {r["candidate"] for r in rows} == {c.name for c in layer_candidates(CPU)}
    row = next(r for r in rows if r["candidate"] == "minGRU[loop-copy]")
    assert row["ms"] > 0 and row["max_abs_err"] < 1e-6 and row["backend"] == "loop-copy"


def test_layer_configs_put_the_main_one_first():
    s = Settings.make(lengths=[16, 256, 1024, 4096], batches=[16, 64], widths=[128, 256])
    assert s.layer_configs() == [(16, 128, [16, 256, 1024, 4096]), (16, 256, [256, 1024]), (64, 128, [256, 1024])]
    s = Settings.make(lengths=[32, 64], batches=[16], widths=[128, 256])
    assert s.layer_configs() == [(16, 128, [32, 64]), (16, 256, [64])]  # extra lengths absent: the longest
