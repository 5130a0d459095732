"""minrnn.MinRNN, the layer of any registered cell: a toy cell of three pre-activations registered
from this file (no edit to src/) runs forward, step by step and backward on every backend that runs generic
cells, held to the reference; MinGRU / MinLSTM are MinRNN of their cells."""

import math

import pytest
import torch
import torch.nn.functional as F

import minrnn
from minrnn.ops.cells import CELLS, CellSpec, g, log_g, register_cell

from .conftest import FAST_BACKENDS, assert_close_scaled, run_with_grads, step_through


def two_gate_decay(hidden, keep, hold, gain):
    """Three pre-activations: a = sigmoid(keep) sigmoid(hold), b = gain (1 - sigmoid(keep)) g(hidden)."""
    k = torch.sigmoid(keep)
    return k * torch.sigmoid(hold), gain * (1 - k) * g(hidden)


def two_gate_decay_logs(hidden, keep, hold, gain):
    return (F.logsigmoid(keep) + F.logsigmoid(hold),
            math.log(gain) + F.logsigmoid(-keep) + log_g(hidden))


TOY = CellSpec("toy", ("hidden", "keep", "hold"), two_gate_decay, two_gate_decay_logs, decay_slot=1,
               decay_bias_sign=1.0, option_names=("gain",), option_defaults=(1.0,), default_decay_bias=2.0,
               doc="a = sigmoid(keep) sigmoid(hold), b = gain (1 - sigmoid(keep)) g(hidden)")

# every CPU backend runs a cell it has no kernel for (through its scan, or its own cell function)
BACKENDS = ["sequential"] + FAST_BACKENDS


@pytest.fixture
def toy():
    register_cell(TOY)
    yield TOY
    del CELLS["toy"]


def _x(B=3, T=11, D=5, seed=0):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _toy_layer(backend, **kw):
    torch.manual_seed(0)
    return minrnn.MinRNN(5, 6, num_layers=2, cell="toy", backend=backend, gain=0.5, **kw).double()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_toy_cell_runs_through_the_layer(toy, backend):
    layer, ref = _toy_layer(backend), _toy_layer("sequential")
    assert [k for k, _ in layer.named_parameters()] == ["proj.0.weight", "proj.0.bias", "proj.1.weight", "proj.1.bias"]
    assert layer.proj[0].weight.shape == (3 * 6, 5) and layer.cell == "toy" and layer.options == {"gain": 0.5}
    x, h0 = _x(), torch.rand(2, 3, 6, dtype=torch.float64)
    # forward and every gradient (input, start state, parameters) against the reference loop
    params = list(layer.parameters())

    def run(model):
        def fn(x, h0):
            y, h_n = model(x, h0)
            return torch.cat([y, h_n.transpose(0, 1)], dim=1)
        return fn

    weight = torch.randn(3, 11 + 2, 6, dtype=torch.float64)
    got = run_with_grads(run(layer), [x, h0], weight)
    got_params = [p.grad.clone() for p in params]
    want = run_with_grads(run(ref), [x, h0], weight)
    want_params = [p.grad.clone() for p in ref.parameters()]
    for a, b in zip(got + got_params, want + want_params):
        assert_close_scaled(a, b, 1e-10, backend)
    # a loop of step() is forward
    y, h_n = layer(x, h0)
    ys, h = step_through(layer, x, h0)
    assert_close_scaled(ys, y, 1e-12, backend)
    assert_close_scaled(h, h_n, 1e-12, backend)


def test_the_toy_layer_is_the_recurrence_written_out(toy):
    layer = minrnn.MinRNN(5, 6, cell="toy", gain=0.5).double()
    x = _x()
    hidden, keep, hold = F.linear(x, layer.proj[0].weight, layer.proj[0].bias).chunk(3, dim=-1)
    h, ys = torch.zeros(3, 6, dtype=torch.float64), []
    for t in range(x.shape[1]):
        k = torch.sigmoid(keep[:, t])
        h = k * torch.sigmoid(hold[:, t]) * h + 0.5 * (1 - k) * g(hidden[:, t])
        ys.append(h)
    y, h_n = layer(x)
    assert_close_scaled(y, torch.stack(ys, 1), 1e-12)
    assert_close_scaled(h_n[0], h, 1e-12)


def test_a_toy_cell_takes_its_init_bias_and_options_from_its_spec(toy):
    torch.manual_seed(0)
    plain = minrnn.MinRNN(5, 6, cell="toy", forget_bias=0.0)
    torch.manual_seed(0)
    remembering = minrnn.MinRNN(5, 6, cell="toy")  # the spec's default_decay_bias, on its decay slot
    assert remembering.forget_bias == 2.0 and remembering.options == {}
    diff = remembering.proj[0].bias - plain.proj[0].bias
    torch.testing.assert_close(diff, torch.cat([torch.zeros(6), torch.full((6,), 2.0), torch.zeros(6)]))
    assert "cell='toy'" in repr(remembering)
    with pytest.raises(TypeError, match="cell 'toy' has no option 'normalize'"):
        minrnn.MinRNN(5, 6, cell="toy", normalize=True)
    with pytest.raises(ValueError, match="cell 'toy' has no signed variant"):
        minrnn.MinRNN(5, 6, cell="toy", signed=True)


def test_an_unregistered_cell_is_refused():
    with pytest.raises(ValueError, match=r"cell must be one of \[.*'mingru'.*\], got 'toy'"):
        minrnn.MinRNN(5, 6, cell="toy")


@pytest.mark.parametrize("cls,cell,options", [(minrnn.MinGRU, "mingru", {}),
                                              (minrnn.MinLSTM, "minlstm", {"normalize": False})])
@pytest.mark.parametrize("signed", [False, True])
def test_mingru_and_minlstm_are_minrnn_of_their_cell(cls, cell, options, signed):
    torch.manual_seed(0)
    named = cls(5, 6, num_layers=2, learn_init_state=True, signed=signed, **options)
    torch.manual_seed(0)
    generic = minrnn.MinRNN(5, 6, num_layers=2, learn_init_state=True, signed=signed, cell=cell,
                            forget_bias=named.forget_bias, **options)
    assert isinstance(named, minrnn.MinRNN)
    assert named.cell == generic.cell == (f"{cell}_signed" if signed else cell)
    sd, gsd = named.state_dict(), generic.state_dict()
    assert list(sd) == list(gsd) and all(torch.equal(sd[k], gsd[k]) for k in sd)
    x = _x().float()
    for a, b in zip(named(x), generic(x)):
        assert torch.equal(a, b)
