"""The backend registry: what "auto" picks, and that a missing fast backend is reported once."""

import warnings

import pytest
import torch

from minrnn import ops


@pytest.fixture
def missing_fast_backend(monkeypatch):
    """A backend ranked before every other, for CPU, whose dependency is missing."""
    be = ops.Backend("fake_fast", ops.BACKENDS["sequential"].fn, devices=frozenset({"cpu"}), auto_rank=0,
                     available=lambda: False, doc="needs a package that is not installed")
    monkeypatch.setitem(ops.BACKENDS, "fake_fast", be)
    monkeypatch.setattr(ops.registry, "_SKIPPED_FOR_AUTO", set())
    return be


def test_auto_falls_back_with_one_warning(missing_fast_backend):
    with pytest.warns(RuntimeWarning, match="'fake_fast' is not available .*needs a package"):
        chosen = ops.resolve_backend("auto", torch.device("cpu"))
    assert chosen.name != "fake_fast" and chosen.supports(torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.resolve_backend("auto", torch.device("cpu")) is chosen


def test_no_warning_for_a_backend_of_another_device(monkeypatch):
    monkeypatch.setattr(ops.registry, "_SKIPPED_FOR_AUTO", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.resolve_backend("auto", torch.device("cpu"))  # triton (CUDA only) is skipped silently


def test_asking_for_a_missing_backend_by_name_is_an_error(missing_fast_backend):
    with pytest.raises(RuntimeError, match="'fake_fast' is not available here"):
        ops.resolve_backend("fake_fast", torch.device("cpu"))


def test_norm_and_conv_dispatch_like_the_scan(monkeypatch):
    """A backend that registers a norm and a conv is picked for them by "auto" (by rank, device
    and dtype), as for the scan; a backend without one is refused by name, in one line."""
    from minrnn.ops.conv import causal_conv, causal_conv_reference
    from minrnn.ops.norm import rms_norm, rms_norm_reference

    calls = []
    be = ops.Backend("spy", ops.BACKENDS["sequential"].fn, devices=frozenset({"cpu"}), auto_rank=0,
                     norm=lambda *a: calls.append("norm") or rms_norm_reference(*a),
                     conv=lambda *a: calls.append("conv") or causal_conv_reference(*a),
                     dtypes={"norm": frozenset({torch.float64}), "conv": frozenset({torch.float64})})
    monkeypatch.setitem(ops.BACKENDS, "spy", be)
    x, w = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(3, 1, 2, dtype=torch.float64)
    rms_norm(x, torch.ones(3, dtype=torch.float64))
    causal_conv(x, w)
    assert calls == ["norm", "conv"]
    rms_norm(x.float(), torch.ones(3))  # a dtype it does not take: the next backend in rank
    causal_conv(x.float(), w.float())
    assert calls == ["norm", "conv"]
    assert ops.resolve_backend("auto", torch.device("cpu"), "scan") is be
    assert not be.implements("cell") and be.implements("norm")
    with pytest.raises(ValueError, match=r"backend 'log' has no conv; expected 'auto' or one of \['chunked', "):
        causal_conv(x, w, backend="log")
    with pytest.raises(ValueError, match="conv backend 'spy' takes torch.float64 tensors, got torch.float32"):
        causal_conv(x.float(), w.float(), backend="spy")
