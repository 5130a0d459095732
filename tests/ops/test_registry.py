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
    monkeypatch.setattr(ops, "_SKIPPED_FOR_AUTO", set())
    return be


def test_auto_falls_back_with_one_warning(missing_fast_backend):
    with pytest.warns(RuntimeWarning, match="'fake_fast' is not available .*needs a package"):
        chosen = ops.resolve_backend("auto", torch.device("cpu"))
    assert chosen.name != "fake_fast" and chosen.supports(torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.resolve_backend("auto", torch.device("cpu")) is chosen


def test_no_warning_for_a_backend_of_another_device(monkeypatch):
    monkeypatch.setattr(ops, "_SKIPPED_FOR_AUTO", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.resolve_backend("auto", torch.device("cpu"))  # triton (CUDA only) is skipped silently


def test_asking_for_a_missing_backend_by_name_is_an_error(missing_fast_backend):
    with pytest.raises(RuntimeError, match="'fake_fast' is not available here"):
        ops.resolve_backend("fake_fast", torch.device("cpu"))
