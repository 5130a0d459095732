"""MinGRU and MinLSTM as torch.nn modules, laid out like nn.GRU (batch_first).

Each layer and direction has one nn.Linear that produces every pre-activation at
once (minGRU: [hidden | gate], 2H wide; minLSTM: [hidden | forget | input], 3H wide),
then a scan. The layer has no hidden-to-hidden weights: that is the whole point.

Shapes (D = 2 if bidirectional else 1, L = num_layers):
    x:      (B, T, input_size)
    h0:     (D * L, B, H) or None           ordered as nn.GRU: layer-major, direction-minor
    output: (B, T, D * H)                   the last layer's states, directions concatenated
    h_n:    (D * L, B, H)                   the final state of every layer and direction
                                            (for the reverse direction: its state after t = 0)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as MF
from .ops import accumulation_dtype


def is_plain_linear(module: nn.Module, cls: type) -> bool:
    """Whether ``module`` is exactly ``cls`` with no forward hooks, so that a fused kernel may
    use its weight and bias directly instead of calling it (a subclass, a wrapper such as a
    LoRA adapter, or a hook could change what the call computes)."""
    return type(module) is cls and not module._forward_hooks and not module._forward_pre_hooks


class _MinRNN(nn.Module):
    n_pre: int  # pre-activations per unit

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 dropout: float = 0.0, bidirectional: bool = False, learn_init_state: bool = False,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.dropout, self.bidirectional, self.backend = float(dropout), bool(bidirectional), backend
        self.num_directions = 2 if bidirectional else 1
        kw = dict(device=device, dtype=dtype)
        self.proj = nn.ModuleList(
            nn.Linear(input_size if layer == 0 else hidden_size * self.num_directions,
                      self.n_pre * hidden_size, bias=bias, **kw)
            for layer in range(num_layers) for _ in range(self.num_directions)
        )
        # a learned start state, a value of h (used when forward gets no h0)
        self.init_state = (nn.Parameter(torch.zeros(num_layers * self.num_directions, hidden_size, **kw))
                           if learn_init_state else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights and biases as nn.Linear's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
        which is what the paper's official code keeps; subclasses add their gate biases."""
        for lin in self.proj:
            lin.reset_parameters()
        if self.init_state is not None:
            nn.init.zeros_(self.init_state)

    # subclasses: the cell's name for minrnn.functional.projected_cell, and one step of it
    cell: str
    normalize: bool = True

    def _cell_step(self, pre: Tensor, h: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _check_input(self, x: Tensor, time_axis: bool) -> None:
        want = "(batch, time, input_size)" if time_axis else "(batch, input_size)"
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != (3 if time_axis else 2) or x.shape[-1] != self.input_size:
            raise ValueError(f"x must be {want} with input_size={self.input_size}, got shape {tuple(x.shape)}")
        w = self.proj[0].weight
        if x.device != w.device:
            raise ValueError(f"x is on {x.device} but the layer's parameters are on {w.device}")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x has dtype {x.dtype} but the layer's parameters are {w.dtype}; "
                            "cast one of them or run under torch.autocast")

    def _start_state(self, h0: Tensor | None, batch: int, like: Tensor) -> Tensor | None:
        n = self.num_layers * self.num_directions
        if h0 is None:
            if self.init_state is None:
                return None
            return self.init_state.unsqueeze(1).expand(n, batch, self.hidden_size)
        if not isinstance(h0, Tensor) or not h0.is_floating_point():
            raise TypeError("h0 must be a floating-point tensor")
        if h0.shape != (n, batch, self.hidden_size):
            raise ValueError(f"h0 must be (num_layers * num_directions, batch, hidden_size) = "
                             f"{(n, batch, self.hidden_size)}, got {tuple(h0.shape)}")
        if h0.device != like.device:
            raise ValueError(f"h0 is on {h0.device} but x is on {like.device}")
        return h0

    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, T, input_size), h0 (D*L, B, H) or None -> (output (B, T, D*H), h_n (D*L, B, H))."""
        self._check_input(x, time_axis=True)
        h0 = self._start_state(h0, x.shape[0], x)
        finals = []
        layer_in = x
        for layer in range(self.num_layers):
            outs = []
            for d in range(self.num_directions):
                k = layer * self.num_directions + d
                seq = layer_in if d == 0 else layer_in.flip(1)
                h, h_last = self._project_and_scan(self.proj[k], seq, None if h0 is None else h0[k])
                outs.append(h if d == 0 else h.flip(1))
                finals.append(h_last)
            layer_in = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
            if self.dropout and layer < self.num_layers - 1:
                layer_in = F.dropout(layer_in, self.dropout, self.training)
        return layer_in, torch.stack(finals)

    def _project_and_scan(self, lin: nn.Linear, x: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
        if is_plain_linear(lin, nn.Linear):
            start = None if h0 is None else h0.to(accumulation_dtype(x.dtype))
            return MF.projected_cell(self.cell, x, lin.weight, lin.bias, start, normalize=self.normalize,
                                     backend=self.backend)
        # a wrapped or hooked projection (an adapter, a quantised layer) must run as a module
        pre = lin(x)
        start = None if h0 is None else h0.to(accumulation_dtype(pre.dtype))
        return MF.cell_on_pre_activations(self.cell, pre, start, normalize=self.normalize, backend=self.backend)

    def step(self, x_t: Tensor, h: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One time step for decoding (unidirectional layers only).

        x_t (B, input_size), h (L, B, H) or None -> (y_t (B, H), h (L, B, H)).
        A loop of step() over t gives exactly forward()'s output and h_n.
        """
        if self.bidirectional:
            raise ValueError("step() needs a unidirectional layer: the reverse direction sees the future")
        self._check_input(x_t, time_axis=False)
        h = self._start_state(h, x_t.shape[0], x_t)
        new = []
        inp = x_t
        for layer in range(self.num_layers):
            pre = self.proj[layer](inp)
            prev = None if h is None else h[layer].to(accumulation_dtype(pre.dtype))
            state = self._cell_step(pre, prev)
            new.append(state)
            inp = state.to(pre.dtype)
            if self.dropout and layer < self.num_layers - 1:
                inp = F.dropout(inp, self.dropout, self.training)
        return inp, torch.stack(new)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.init_state is not None:
            s += ", learn_init_state=True"
        return s


class MinGRU(_MinRNN):
    """minGRU (Feng et al. 2024): h_t = (1 - z_t) h_{t-1} + z_t g(h~_t), z_t = sigmoid(W_z x_t + b_z),
    h~_t = W_h x_t + b_h, computed as a parallel scan.

    Args:
        input_size, hidden_size, num_layers, bias, dropout, bidirectional: as nn.GRU
            (batch_first always; dropout between layers).
        learn_init_state: learn a start state per layer and direction (zeros at init),
            used when forward() gets no h0.
        backend: the scan backend (see ``minrnn.scan``); "auto" picks the fastest.

    Init: nn.Linear's default for weights and biases (as the official code).
    Parameters per layer: (input_size + bias) * 2 * hidden_size.
    """

    n_pre = 2
    cell = "mingru"

    def _cell_step(self, pre, h):
        hidden, gate = pre.chunk(2, dim=-1)
        return MF.mingru_step(hidden, gate, h)


class MinLSTM(_MinRNN):
    """minLSTM (Feng et al. 2024): h_t = f'_t h_{t-1} + i'_t g(h~_t) with f' = f/(f+i),
    i' = i/(f+i) when ``normalize`` (the paper's equations), f' = f, i' = i otherwise.

    Args: as MinGRU, plus
        normalize: normalise the forget and input gates (default True, as in the paper).
        forget_bias: added to the forget gate's bias at init (default 3.0, the official
            code's default), so the layer starts by remembering.

    Init: nn.Linear's default, then forget_bias added to the forget-gate bias.
    Parameters per layer: (input_size + bias) * 3 * hidden_size.
    """

    n_pre = 3
    cell = "minlstm"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 dropout: float = 0.0, bidirectional: bool = False, learn_init_state: bool = False,
                 backend: str = "auto", normalize: bool = True, forget_bias: float = 3.0,
                 device=None, dtype=None):
        if not math.isfinite(forget_bias):
            raise ValueError(f"forget_bias must be finite, got {forget_bias!r}")
        self.normalize, self.forget_bias = bool(normalize), float(forget_bias)
        super().__init__(input_size, hidden_size, num_layers, bias, dropout, bidirectional,
                         learn_init_state, backend, device, dtype)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        H = self.hidden_size
        with torch.no_grad():
            for lin in self.proj:
                if lin.bias is not None:
                    lin.bias[H:2 * H] += self.forget_bias

    def _cell_step(self, pre, h):
        hidden, forget, input = pre.chunk(3, dim=-1)
        return MF.minlstm_step(hidden, forget, input, h, normalize=self.normalize)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", normalize={self.normalize}, forget_bias={self.forget_bias}"
