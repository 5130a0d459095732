"""Documents packed in one row give what each gives alone: every backend, every cell, with and
without padding, h0, final state and every gradient, held to a loop over the documents."""

import zlib

import pytest
import torch

import minrnn.functional as MF
from minrnn import MinRNN
from minrnn.ops import BACKENDS, available_backends
from minrnn.ops.cells import CELLS
from minrnn.ops.reference import reference_cell

CPU_BACKENDS = [b for b in available_backends() if BACKENDS[b].supports(torch.device("cpu"))]
CELL_NAMES = ["mingru", "minlstm", "mingru_signed", "minlstm_signed"]


def random_resets(B: int, T: int, gen: torch.Generator, first: bool = False) -> torch.Tensor:
    """(B, T) bool with a few document starts per row (row 0 also at t = 0 when ``first``)."""
    reset = torch.rand(B, T, generator=gen) < 0.15
    reset[:, 0] = False
    if first:
        reset[0, 0] = True
    reset[-1, T - 1] = True  # a one-token document at the end
    return reset


def per_document(spec, pre, h0, options, mask, reset):
    """The reference: each row cut at its document starts, each document run alone from zeros
    (the first from h0 unless it starts at t = 0), the pieces joined."""
    rows = []
    for i in range(pre[0].shape[0]):
        starts = [0] + [t for t in reset[i].nonzero().flatten().tolist() if t > 0] + [pre[0].shape[1]]
        pieces, h = [], None if h0 is None else h0[i:i + 1]
        for k, (s, e) in enumerate(zip(starts[:-1], starts[1:])):
            start_state = h if k == 0 and not bool(reset[i, 0]) else None
            m = None if mask is None else mask[i:i + 1, s:e]
            pieces.append(reference_cell(spec, tuple(p[i:i + 1, s:e] for p in pre), start_state, options, m, None))
        rows.append(torch.cat(pieces, 1))
    return torch.cat(rows, 0)


def _inputs(cell, B, T, C, dtype, seed, with_h0):
    gen = torch.Generator().manual_seed(seed)
    spec = CELLS[cell]
    pre = tuple((torch.randn(B, T, C, generator=gen, dtype=dtype) * 2).requires_grad_() for _ in range(spec.n_pre))
    h0 = (torch.rand(B, C, generator=gen, dtype=dtype) + 0.1).requires_grad_() if with_h0 else None
    return spec, pre, h0, gen


# every backend with every cell it runs (the log backend refuses the signed cells: test_signed.py)
BACKEND_CELLS = [(b, c) for b in CPU_BACKENDS for c in CELL_NAMES if BACKENDS[b].signed or not CELLS[c].signed]


@pytest.mark.parametrize("backend,cell", BACKEND_CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padded", [False, True])
def test_packed_rows_equal_documents_alone(backend, cell, dtype, padded):
    B, T, C = 3, 41, 5
    seed = zlib.crc32(f"{backend} {cell} {padded}".encode())
    spec, pre, h0, gen = _inputs(cell, B, T, C, dtype, seed=seed, with_h0=True)
    reset = random_resets(B, T, gen, first=True)
    mask = (torch.rand(B, T, generator=gen) > 0.2) | reset if padded else None
    opts = spec.options()
    h, last = MF.run_cell(cell, pre, h0, mask=mask, reset=reset, backend=backend)
    want = per_document(spec, pre, h0, opts, mask, reset)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, want, **tol)
    torch.testing.assert_close(last, want[:, -1], **tol)
    weights = torch.randn(B, T, C, generator=gen, dtype=dtype)
    got = torch.autograd.grad((h * weights).sum(), [*pre, h0])
    expected = torch.autograd.grad((want * weights).sum(), [*pre, h0])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **tol)


@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
def test_sequential_mode_and_projected_layer_take_resets(cell):
    B, T, C, I = 2, 23, 4, 6
    spec, pre, h0, gen = _inputs(cell, B, T, C, torch.float64, seed=3, with_h0=False)
    reset = random_resets(B, T, gen)
    seq, _ = MF.run_cell(cell, pre, mode="sequential", reset=reset)
    torch.testing.assert_close(seq, per_document(spec, pre, None, spec.options(), None, reset))
    x = torch.randn(B, T, I, generator=gen, dtype=torch.float64)
    w = torch.randn(spec.n_pre * C, I, generator=gen, dtype=torch.float64)
    bias = torch.randn(spec.n_pre * C, generator=gen, dtype=torch.float64)
    for backend in CPU_BACKENDS:
        h, _ = MF.projected_cell(cell, x, w, bias, reset=reset, backend=backend)
        parts = torch.nn.functional.linear(x, w, bias).chunk(spec.n_pre, -1)
        torch.testing.assert_close(h, per_document(spec, parts, None, spec.options(), None, reset))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_layer_rows_equal_documents_alone(bidirectional):
    torch.manual_seed(0)
    layer = MinRNN(5, 4, num_layers=2, bidirectional=bidirectional, cell="minlstm").double()
    docs = [torch.randn(1, n, 5, dtype=torch.float64) for n in (7, 1, 12)]
    packed = torch.cat(docs, 1)
    reset = torch.zeros(1, packed.shape[1], dtype=torch.bool)
    reset[0, [7, 8]] = True
    out, _ = layer(packed, reset=reset)
    alone = torch.cat([layer(d)[0] for d in docs], 1)
    torch.testing.assert_close(out, alone)


def test_reset_is_checked_in_one_line():
    pre = (torch.randn(2, 5, 3), torch.randn(2, 5, 3))
    with pytest.raises(TypeError, match="reset must be a bool tensor"):
        MF.run_cell("mingru", pre, reset=torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"reset must be \(batch, time\) = \(2, 5\)"):
        MF.run_cell("mingru", pre, reset=torch.zeros(2, 4, dtype=torch.bool))


CONV_BACKENDS = [b for b in CPU_BACKENDS if BACKENDS[b].implements("conv")]


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [1, 2, 4])
def test_conv_of_packed_rows_equals_documents_alone(backend, dtype, K):
    from minrnn.ops.conv import causal_conv
    from minrnn.ops.reference import causal_conv_reference

    gen = torch.Generator().manual_seed(K)
    B, T, C = 3, 29, 6
    x = torch.randn(B, T, C, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(C, 1, K, generator=gen, dtype=dtype, requires_grad=True)
    bias = torch.randn(C, generator=gen, dtype=dtype, requires_grad=True)
    reset = random_resets(B, T, gen, first=True)
    reset[1, 5:8] = True  # one-token documents back to back
    y = causal_conv(x, w, bias, reset=reset, backend=backend)
    want = causal_conv_reference(x, w, bias, reset)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(y, want, **tol)
    weights = torch.randn(B, T, C, generator=gen, dtype=dtype)
    for g, e in zip(torch.autograd.grad((y * weights).sum(), [x, w, bias]),
                    torch.autograd.grad((want * weights).sum(), [x, w, bias])):
        torch.testing.assert_close(g, e, **tol)
