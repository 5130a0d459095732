"""MinGRU / MinLSTM modules: layout as nn.GRU, step == forward, stacking, directions, state."""

import pytest
import torch
from torch import nn

import minrnn

from .conftest import assert_close_scaled, step_through

LAYERS = [minrnn.MinGRU, minrnn.MinLSTM]


def _x(B=3, T=23, D=6, dtype=torch.float32, seed=0):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("learn_init_state", [False, True])
def test_forward_equals_a_loop_of_step(cls, num_layers, learn_init_state):
    layer = cls(6, 8, num_layers=num_layers, learn_init_state=learn_init_state).double()
    if learn_init_state:
        nn.init.normal_(layer.init_state)
    x = _x(dtype=torch.float64)
    for h0 in [None, torch.randn(num_layers, 3, 8, dtype=torch.float64)]:
        y, h_n = layer(x, h0)
        ys, h = step_through(layer, x, h0)
        assert_close_scaled(ys, y, 1e-12)
        assert_close_scaled(h, h_n, 1e-12)


@pytest.mark.parametrize("cls", LAYERS)
def test_shapes_follow_nn_gru(cls):
    for bidirectional in (False, True):
        layer = cls(6, 8, num_layers=2, bidirectional=bidirectional)
        ref = nn.GRU(6, 8, num_layers=2, bidirectional=bidirectional, batch_first=True)
        x = _x()
        y, h_n = layer(x)
        y_ref, h_ref = ref(x)
        assert y.shape == y_ref.shape and h_n.shape == h_ref.shape


@pytest.mark.parametrize("cls", LAYERS)
def test_stack_equals_hand_built_single_layers(cls):
    torch.manual_seed(0)
    stack = cls(6, 8, num_layers=3).double()
    singles = [cls(6 if i == 0 else 8, 8).double() for i in range(3)]
    for i, s in enumerate(singles):
        s.proj[0].load_state_dict(stack.proj[i].state_dict())
    x = _x(dtype=torch.float64)
    h0 = torch.randn(3, 3, 8, dtype=torch.float64)
    y, h_n = stack(x, h0)
    inp, finals = x, []
    for i, s in enumerate(singles):
        inp, h = s(inp, h0[i:i + 1])
        finals.append(h[0])
    assert_close_scaled(y, inp, 1e-13)
    assert_close_scaled(h_n, torch.stack(finals), 1e-13)


@pytest.mark.parametrize("cls", LAYERS)
def test_bidirectional_equals_forward_and_reversed_single_layers(cls):
    torch.manual_seed(0)
    bi = cls(6, 8, num_layers=2, bidirectional=True).double()
    x = _x(dtype=torch.float64)
    h0 = torch.randn(4, 3, 8, dtype=torch.float64)
    y, h_n = bi(x, h0)

    def single(k, in_size):
        s = cls(in_size, 8).double()
        s.proj[0].load_state_dict(bi.proj[k].state_dict())
        return s

    inp, finals = x, []
    for layer in range(2):
        in_size = 6 if layer == 0 else 16
        fwd, bwd = single(2 * layer, in_size), single(2 * layer + 1, in_size)
        y_f, h_f = fwd(inp, h0[2 * layer:2 * layer + 1])
        y_b, h_b = bwd(inp.flip(1), h0[2 * layer + 1:2 * layer + 2])
        inp = torch.cat([y_f, y_b.flip(1)], -1)
        finals += [h_f[0], h_b[0]]
    assert_close_scaled(y, inp, 1e-13)
    assert_close_scaled(h_n, torch.stack(finals), 1e-13)
    # the reverse direction's output at t = 0 is its final state (it has seen everything)
    assert_close_scaled(y[:, 0, 8:], h_n[-1], 1e-13)


@pytest.mark.parametrize("cls", LAYERS)
def test_state_carries_across_calls(cls):
    layer = cls(6, 8, num_layers=2).double()
    x = _x(T=40, dtype=torch.float64)
    y, h_n = layer(x)
    y1, h1 = layer(x[:, :17])
    y2, h2 = layer(x[:, 17:], h1)
    assert_close_scaled(torch.cat([y1, y2], 1), y, 1e-12)
    assert_close_scaled(h2, h_n, 1e-12)


@pytest.mark.parametrize("cls", LAYERS)
def test_learned_initial_state_gets_a_gradient(cls):
    layer = cls(6, 8, num_layers=2, bidirectional=True, learn_init_state=True)
    y, h_n = layer(_x())
    (y.square().sum() + h_n.sum()).backward()
    assert layer.init_state.grad is not None
    assert layer.init_state.grad.abs().min() > 0  # every layer, direction and unit
    # an explicit h0 overrides it
    layer.zero_grad()
    y, _ = layer(_x(), torch.zeros(4, 3, 8))
    y.sum().backward()
    assert layer.init_state.grad is None or (layer.init_state.grad == 0).all()


@pytest.mark.parametrize("cls", LAYERS)
def test_bf16_autocast_runs_and_stays_close(cls):
    torch.manual_seed(0)
    layer = cls(32, 64, num_layers=2)
    x = _x(B=4, T=100, D=32)
    y32, h32 = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, h16 = layer(x)
        y16.float().sum().backward()  # trains too
    assert y16.dtype == torch.bfloat16 and h16.dtype == torch.float32
    assert_close_scaled(y16.float(), y32, 3e-2)
    assert_close_scaled(h16, h32, 3e-2)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_parameter_count_and_init():
    gru = minrnn.MinGRU(10, 20)
    assert sum(p.numel() for p in gru.parameters()) == (10 + 1) * 2 * 20
    lstm = minrnn.MinLSTM(10, 20, forget_bias=3.0)
    assert sum(p.numel() for p in lstm.parameters()) == (10 + 1) * 3 * 20
    bound = 10 ** -0.5  # nn.Linear's default bias init is U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    forget = lstm.proj[0].bias[20:40]
    assert ((forget >= 3 - bound) & (forget <= 3 + bound)).all()
    others = torch.cat([lstm.proj[0].bias[:20], lstm.proj[0].bias[40:]])
    assert (others.abs() <= bound).all()


def test_every_backend_gives_the_same_layer_output():
    for cls, opts in LAYER_OPTIONS:
        layer = cls(6, 8, num_layers=2, **opts).double()
        x = _x(dtype=torch.float64)
        ref, ref_h = layer(x)
        for name in minrnn.available_backends():
            layer.backend = name
            y, h = layer(x)
            assert_close_scaled(y, ref, 1e-12, f"{cls.__name__} {opts} {name}")
            assert_close_scaled(h, ref_h, 1e-12, f"{cls.__name__} {opts} {name} final state")


def test_dropout_between_layers_only_in_training():
    layer = minrnn.MinGRU(6, 8, num_layers=3, dropout=0.5)
    x = _x()
    layer.eval()
    assert torch.equal(layer(x)[0], layer(x)[0])
    layer.train()
    assert not torch.equal(layer(x)[0], layer(x)[0])


@pytest.mark.parametrize("cls", LAYERS)
def test_dropout_is_not_applied_to_the_last_layer(cls):
    """As nn.GRU: dropout acts on each layer's output except the last. One layer with dropout
    in training mode is the eval-mode layer exactly; with two, the first layer's output is
    dropped (the output changes) but the last one's is not (no element is zeroed)."""
    one = cls(6, 8, num_layers=1, dropout=0.5)
    x = _x()
    one.eval()
    y_eval, h_eval = one(x)
    one.train()
    y_train, h_train = one(x)
    assert torch.equal(y_train, y_eval) and torch.equal(h_train, h_eval)
    y_step, h_step = one.step(x[:, 0])
    assert torch.equal(y_step, one.eval().step(x[:, 0])[0])
    two = cls(6, 8, num_layers=2, dropout=0.5).train()
    y1, _ = two(x)
    two.eval()
    y0, _ = two(x)
    assert not torch.equal(y1, y0)
    assert (y1 != 0).all()


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (lambda m: m(torch.randn(23, 6)), ValueError, r"x must be \(batch, time, input_size\) with input_size=6"),
        (lambda m: m(torch.randn(3, 23, 5)), ValueError, r"input_size=6, got shape \(3, 23, 5\)"),
        (lambda m: m(torch.randn(3, 23, 6).long()), TypeError, r"x must be a floating-point tensor"),
        (lambda m: m(torch.randn(3, 23, 6).double()), TypeError, r"x has dtype torch.float64 but the layer's parameters are torch.float32"),
        (lambda m: m(torch.randn(3, 23, 6), torch.zeros(2, 3, 8)), ValueError, r"h0 must be \(num_layers \* num_directions, batch, hidden_size\) = \(1, 3, 8\)"),
        (lambda m: m.step(torch.randn(3, 23, 6)), ValueError, r"x must be \(batch, input_size\)"),
        (lambda m: m.step(torch.randn(3, 6), torch.zeros(1, 4, 8)), ValueError, r"h0 must be"),
        (lambda m: m(torch.randn(3, 23, 6, device="meta")), ValueError, r"x is on meta but the layer's parameters are on cpu"),
    ],
)
def test_bad_input(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(minrnn.MinGRU(6, 8))


def test_bad_config():
    with pytest.raises(ValueError, match="hidden_size must be a positive integer"):
        minrnn.MinGRU(6, 0)
    with pytest.raises(ValueError, match="dropout must be in"):
        minrnn.MinGRU(6, 8, dropout=1.5)
    with pytest.raises(ValueError, match="step\\(\\) needs a unidirectional layer"):
        minrnn.MinLSTM(6, 8, bidirectional=True).step(torch.randn(2, 6))


@pytest.mark.parametrize(
    "make, exc, pattern",
    [
        (lambda: minrnn.MinGRU(6, 8, backend="foo"), ValueError, r"backend must be 'auto' or one of \[.*'cpu'"),
        (lambda: minrnn.MinGRU(6, 8, backend=None), ValueError, r"backend must be 'auto' or one of"),
        (lambda: minrnn.MinGRU(6, 8, bias="yes"), TypeError, r"bias must be True or False, got 'yes'"),
        (lambda: minrnn.MinGRU(6, 8, bidirectional=1), TypeError, r"bidirectional must be True or False"),
        (lambda: minrnn.MinGRU(6, 8, learn_init_state=None), TypeError, r"learn_init_state must be True or False"),
        (lambda: minrnn.MinLSTM(6, 8, normalize="no"), TypeError, r"normalize must be True or False"),
        (lambda: minrnn.MinLSTM(6, 8, forget_bias=float("nan")), ValueError, r"forget_bias must be a finite number"),
        (lambda: minrnn.MinGRU(6, 8, forget_bias="3"), ValueError, r"forget_bias must be a finite number"),
        (lambda: minrnn.MinGRU(6, 8, dropout=True), ValueError, r"dropout must be in \[0, 1\)"),
        (lambda: minrnn.MinGRU(6, 8, num_layers=2.0), ValueError, r"num_layers must be a positive integer"),
        (lambda: minrnn.MinGRU(True, 8), ValueError, r"input_size must be a positive integer"),
    ],
)
def test_every_option_is_validated_at_construction(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()


# --- every layer and option held to a loop written out here ----------------------------------

LAYER_OPTIONS = [
    (minrnn.MinGRU, {}),
    (minrnn.MinGRU, {"forget_bias": 2.0}),
    (minrnn.MinLSTM, {}),
    (minrnn.MinLSTM, {"normalize": False}),
    (minrnn.MinLSTM, {"normalize": False, "forget_bias": -1.0, "bias": False}),
]


def _g(x):
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def _loop(layer, x, h0):
    """The layer's equations as a plain loop over time, layer by layer and direction by
    direction, from its own weights: (output, h_n)."""
    H, D = layer.hidden_size, layer.num_directions
    normalize = getattr(layer, "normalize", None)
    inp, finals = x, []
    for lay in range(layer.num_layers):
        outs = []
        for d in range(D):
            k = lay * D + d
            lin = layer.proj[k]
            pre = torch.nn.functional.linear(inp if d == 0 else inp.flip(1), lin.weight, lin.bias)
            h = torch.zeros(x.shape[0], H, dtype=x.dtype) if h0 is None else h0[k]
            hs = []
            for t in range(x.shape[1]):
                p = pre[:, t]
                if isinstance(layer, minrnn.MinGRU):
                    z = torch.sigmoid(p[:, H:])
                    a, i = 1 - z, z
                else:
                    f, i = torch.sigmoid(p[:, H:2 * H]), torch.sigmoid(p[:, 2 * H:])
                    a, i = (f / (f + i), i / (f + i)) if normalize else (f, i)
                h = a * h + i * _g(p[:, :H])
                hs.append(h)
            y = torch.stack(hs, 1)
            outs.append(y if d == 0 else y.flip(1))
            finals.append(h)
        inp = torch.cat(outs, -1)
    return inp, torch.stack(finals)


@pytest.mark.parametrize("cls, opts", LAYER_OPTIONS)
@pytest.mark.parametrize("num_layers, bidirectional", [(1, False), (2, False), (2, True)])
@pytest.mark.parametrize("with_h0", [False, True])
def test_forward_step_and_final_state_match_the_loop(cls, opts, num_layers, bidirectional, with_h0):
    torch.manual_seed(0)
    layer = cls(6, 8, num_layers=num_layers, bidirectional=bidirectional, **opts).double()
    x = _x(dtype=torch.float64)
    h0 = torch.randn(layer.num_directions * num_layers, 3, 8, dtype=torch.float64) if with_h0 else None
    want_y, want_h = _loop(layer, x, h0)
    y, h_n = layer(x, h0)
    assert_close_scaled(y, want_y, 1e-12, "forward output")
    assert_close_scaled(h_n, want_h, 1e-12, "forward final state")
    if not bidirectional:
        ys, h = step_through(layer, x, h0)
        assert_close_scaled(ys, want_y, 1e-12, "step output")
        assert_close_scaled(h, want_h, 1e-12, "step final state")


@pytest.mark.parametrize("cls, opts", LAYER_OPTIONS)
@pytest.mark.parametrize("backend", minrnn.available_backends())
def test_empty_batch_and_zero_length(cls, opts, backend):
    """B = 0 gives empty outputs; T = 0 gives an empty output and h_n = h0 (zeros without one,
    the learned start state with one)."""
    layer = cls(6, 8, num_layers=2, backend=backend, **opts)
    y, h_n = layer(torch.randn(0, 5, 6))
    assert y.shape == (0, 5, 8) and h_n.shape == (2, 0, 8)
    h0 = torch.randn(2, 3, 8)
    y, h_n = layer(torch.randn(3, 0, 6), h0)
    assert y.shape == (3, 0, 8) and torch.equal(h_n, h0)
    y, h_n = layer(torch.randn(3, 0, 6))
    assert torch.equal(h_n, torch.zeros(2, 3, 8))
    y, h_n = layer(torch.randn(0, 5, 6, requires_grad=True))
    y.sum().backward()  # an empty batch trains too


def test_forget_bias_goes_on_the_decay_with_the_sign_that_remembers():
    """MinLSTM adds forget_bias to the forget gate's bias; MinGRU subtracts it from its gate's
    (a = 1 - z): either way a zero input then starts with decay about sigmoid(forget_bias)."""
    for cls in LAYERS:
        torch.manual_seed(0)
        plain = cls(6, 8, forget_bias=0.0)
        torch.manual_seed(0)
        biased = cls(6, 8, forget_bias=2.5)
        diff = biased.proj[0].bias - plain.proj[0].bias
        sign = -1.0 if cls is minrnn.MinGRU else 1.0
        torch.testing.assert_close(diff[8:16], torch.full((8,), sign * 2.5))
        assert torch.equal(diff[:8], torch.zeros(8)) and torch.equal(diff[16:], torch.zeros(diff[16:].numel()))
