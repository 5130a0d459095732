import os

# Under pytest-xdist (`pytest -n auto`: a worker per core) each worker gets its share of the cores,
# so that the workers' thread pools do not fight over them; set before torch and numba start theirs.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _share = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(_name, _share)

import pytest
import torch

from minrnn.ops import BACKENDS, available_backends
from minrnn.ops import cpu as cpu_ops

# Every backend other than the reference, so a new backend joins the suite by registering.
# The suite's tensors live on the CPU: GPU-only backends (triton) are tested in their own files.
FAST_BACKENDS = [name for name in available_backends()
                 if name != "sequential" and BACKENDS[name].supports(torch.device("cpu"))]
SIGNED_BACKENDS = [name for name in FAST_BACKENDS if BACKENDS[name].signed]


@pytest.fixture(autouse=True)
def every_cpu_output_through_the_cache():
    """The CPU kernels' output cache normally takes only outputs of 1 MiB and more, which the
    suite's small tensors are not: here it takes every one, so the whole suite runs on reused
    blocks (the case where a block handed out while still in use would show)."""
    before = cpu_ops.OUTPUT_CACHE.min_bytes
    cpu_ops.OUTPUT_CACHE.min_bytes = 0
    yield
    cpu_ops.OUTPUT_CACHE.min_bytes = before


def make_scan_inputs(B, T, C, dtype=torch.float64, positive=False, seed=0, with_h0=True):
    """Decays skewed towards 1 (long memory, the hard case for rounding); b and h0 of
    either sign unless ``positive``."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(B, T, C, generator=gen, dtype=torch.float64) ** 0.25
    if positive:
        b = torch.rand(B, T, C, generator=gen, dtype=torch.float64) + 0.05
        h0 = torch.rand(B, C, generator=gen, dtype=torch.float64) + 0.05
    else:
        b = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
        h0 = torch.randn(B, C, generator=gen, dtype=torch.float64)
    return a.to(dtype), b.to(dtype), (h0.to(dtype) if with_h0 else None)


def run_with_grads(fn, inputs, weight):
    """fn(*inputs) -> h; returns [h, d(h.weight)/d input for every tensor input] in float64."""
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    h = fn(*leaves)
    (h * weight.to(h.dtype)).sum().backward()
    # autograd leaves .grad None for an input the output does not depend on: a zero gradient
    grads = [torch.zeros_like(x) if x.grad is None else x.grad for x in leaves if x is not None]
    return [h.detach().double()] + [g.double() for g in grads]


def assert_close_scaled(actual, expected, rtol, msg=""):
    """|actual - expected| <= rtol * max|expected| elementwise (error relative to the scale)."""
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"{msg}: max error {err.item():.3e} > {rtol:.1e} * scale {scale.item():.3e}"


def step_through(layer, x, h0):
    """x (B, T, C) read by ``layer.step`` one position at a time from h0: (outputs (B, T, H), last state)."""
    h, ys = h0, []
    for t in range(x.shape[1]):
        y, h = layer.step(x[:, t], h)
        ys.append(y)
    return torch.stack(ys, 1), h


TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    # Tests read data sets from ../shared/data beside the checkout unless told otherwise.
    import os
    from pathlib import Path

    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not os.environ.get("MINRNN_DATA_DIR") and shared.is_dir():
        os.environ["MINRNN_DATA_DIR"] = str(shared)
