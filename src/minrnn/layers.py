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
from .ops import BACKENDS, accumulation_dtype, check_backend_takes_cell
from .ops.cells import CELLS, CellSpec, get_cell
from .ops.step import cell_step as fused_cell_step
from .ops.step import fused_applies


def is_plain_linear(module: nn.Module, cls: type) -> bool:
    """Whether ``module`` is exactly ``cls`` with no forward hooks, so that a fused kernel may
    use its weight and bias directly instead of calling it (a subclass, a wrapper such as a
    LoRA adapter, or a hook could change what the call computes)."""
    return type(module) is cls and not module._forward_hooks and not module._forward_pre_hooks


def projected_cell_sequence(spec: CellSpec, proj: nn.Module, x: Tensor, h0: Tensor | None, options: dict,
                            backend: str, mask: Tensor | None = None, plain: type = nn.Linear,
                            reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One layer and direction over a sequence: x (B, T, I) -> ``proj`` -> the cell.

    h0 (B, C) or None; mask (B, T) bool or None (False: padding, an identity step); reset (B, T)
    bool or None (True: a document starts, the state is forgotten). Returns
    (h (B, T, C) in x's dtype, h_last (B, C) in the accumulation dtype). A projection that is
    exactly ``plain`` (no subclass, no hooks) is fused with the cell where the backend can;
    any other module runs as itself.
    """
    if is_plain_linear(proj, plain):
        start = None if h0 is None else h0.to(accumulation_dtype(x.dtype))
        return MF.projected_cell(spec, x, proj.weight, proj.bias, start, mask=mask, reset=reset, backend=backend,
                                 **options)
    pre = proj(x)  # a wrapped or hooked projection (an adapter, a quantised layer) runs as a module
    start = None if h0 is None else h0.to(accumulation_dtype(pre.dtype))
    return MF.cell_on_pre_activations(spec, pre, start, mask=mask, reset=reset, backend=backend, **options)


def projected_cell_step(spec: CellSpec, proj: nn.Module, x_t: Tensor, h: Tensor | None, options: dict,
                        mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One layer and direction for one step: x_t (B, I), or (B, 1, I) as the LM block holds
    it, -> ``proj`` -> the cell's step from h (B, C) or None; mask (B,) bool, False keeps h (an
    identity step), or None.

    Returns (y_t, state): the new state in the projection's output dtype ((B, C), or (B, 1, C)
    for a (B, 1, I) input), and (B, C) in the accumulation dtype (float32 for half inputs: a
    state carried across steps is never rounded).
    """
    pre = proj(x_t)
    timed = pre.dim() == 3
    prev = None if h is None else h.to(accumulation_dtype(pre.dtype))
    if (fused_applies(pre, prev) and (prev is None or prev.shape == (pre.shape[0], pre.shape[-1] // spec.n_pre))
            and (mask is None or mask.shape == pre.shape[:1])):
        # one kernel for the whole update; other shapes, dtypes and autograd go to MF.cell_step,
        # which checks them
        state = fused_cell_step(spec, pre[:, 0] if timed else pre, prev, spec.options(**options), mask)
    else:
        parts = [p[:, 0] if timed else p for p in pre.chunk(spec.n_pre, dim=-1)]
        state = MF.cell_step(spec, parts, prev, mask=mask, **options)
    y = state.to(pre.dtype)
    return (y.unsqueeze(1) if timed else y), state


def check_backend_name(backend) -> None:
    """A one-line error unless ``backend`` is "auto" or a registered backend's name."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _layer_cell(cell: str | CellSpec, signed: bool) -> CellSpec:
    """The CellSpec of a layer of ``cell``, or of its signed variant (``<name>_signed``)."""
    spec = get_cell(cell)
    if signed and not spec.signed:
        if f"{spec.name}_signed" not in CELLS:
            raise ValueError(f"cell {spec.name!r} has no signed variant ({spec.name + '_signed'!r} is not registered)")
        spec = CELLS[f"{spec.name}_signed"]
    return spec


class MinRNN(nn.Module):
    """A stack of minRNN layers of any registered cell, laid out like nn.GRU (batch_first).

    Args:
        input_size, hidden_size, num_layers, bias, dropout, bidirectional: as nn.GRU
            (batch_first always; dropout between layers).
        cell: a name in ``minrnn.ops.cells.CELLS`` or a ``CellSpec`` (``register_cell`` adds
            one): its ``n_pre`` pre-activations come from one nn.Linear per layer and direction.
        learn_init_state: learn a start state per layer and direction (zeros at init), used
            when forward() gets no h0.
        backend: the scan backend (see ``minrnn.scan``); "auto" picks the fastest.
        forget_bias: a "remember more" bias at init on the cell's decay pre-activation (its
            ``decay_slot``, with its ``decay_bias_sign``); None: the cell's ``default_decay_bias``.
        signed: the cell's signed variant (the cell named ``<cell>_signed``: transitions in (-1, 1)).
        cell_options: the cell's options (``option_names``, e.g. minLSTM's ``normalize``).

    Shapes: x (B, T, input_size), h0 (D * L, B, H) or None -> output (B, T, D * H), h_n (D * L, B, H).
    Parameters: ``proj.{k}.weight`` (n_pre * H, in), ``proj.{k}.bias``, k = layer * D + direction,
    and ``init_state`` (D * L, H) with learn_init_state.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 dropout: float = 0.0, bidirectional: bool = False, learn_init_state: bool = False,
                 backend: str = "auto", forget_bias: float | None = None, device=None, dtype=None,
                 signed: bool = False, *, cell: str | CellSpec = "mingru", **cell_options):
        super().__init__()
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(dropout, bool) or not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        for name, v in (("bias", bias), ("bidirectional", bidirectional), ("learn_init_state", learn_init_state),
                        ("signed", signed)):
            _check_flag(name, v)
        check_backend_name(backend)
        self.spec = _layer_cell(cell, signed)
        for name, v in cell_options.items():  # a flag option takes True or False only
            if name in self.spec.option_names and isinstance(self.spec.option_defaults[
                    self.spec.option_names.index(name)], bool):
                _check_flag(name, v)
        self.spec.options(**cell_options)  # an unknown option is an error here
        if forget_bias is None:
            forget_bias = self.spec.default_decay_bias
        if isinstance(forget_bias, bool) or not isinstance(forget_bias, (int, float)) or not math.isfinite(forget_bias):
            raise ValueError(f"forget_bias must be a finite number, got {forget_bias!r}")
        if backend != "auto":
            check_backend_takes_cell(self.spec, BACKENDS[backend])  # e.g. signed on "log": refused here
        self.options = dict(cell_options)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.dropout, self.bidirectional, self.backend = float(dropout), bidirectional, backend
        self.forget_bias = float(forget_bias)
        self.num_directions = 2 if bidirectional else 1
        kw = dict(device=device, dtype=dtype)
        self.proj = nn.ModuleList(
            nn.Linear(input_size if layer == 0 else hidden_size * self.num_directions,
                      self.spec.n_pre * hidden_size, bias=bias, **kw)
            for layer in range(num_layers) for _ in range(self.num_directions)
        )
        # a learned start state, a value of h (used when forward gets no h0)
        self.init_state = (nn.Parameter(torch.zeros(num_layers * self.num_directions, hidden_size, **kw))
                           if learn_init_state else None)
        self.reset_parameters()

    @property
    def cell(self) -> str:
        """The cell's name (``spec.name``; the signed variant's for a signed layer)."""
        return self.spec.name

    def reset_parameters(self) -> None:
        """Weights and biases as nn.Linear's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
        which is what the paper's official code keeps; then ``forget_bias`` goes on the
        bias of the pre-activation that sets the decay (with the sign that makes a positive
        forget_bias remember more)."""
        for lin in self.proj:
            lin.reset_parameters()
        if self.init_state is not None:
            nn.init.zeros_(self.init_state)
        H, slot = self.hidden_size, self.spec.decay_slot
        if self.forget_bias:
            with torch.no_grad():
                for lin in self.proj:
                    if lin.bias is not None:
                        lin.bias[slot * H:(slot + 1) * H] += self.spec.decay_bias_sign * self.forget_bias

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

    def forward(self, x: Tensor, h0: Tensor | None = None, *, reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, T, input_size), h0 (D*L, B, H) or None -> (output (B, T, D*H), h_n (D*L, B, H)).

        reset: (B, T) bool, True where a document starts, or None: documents packed in a row
        give what each gives alone (the forward direction forgets its state at a document's
        first token, the reverse direction at its last; h0 still starts the row's ends).
        """
        self._check_input(x, time_axis=True)
        h0 = self._start_state(h0, x.shape[0], x)
        resets = [reset, None]
        if reset is not None:
            MF.check_reset(reset, tuple(x.shape[:2]), x.device, "(batch, time)")
            # read backwards, a document starts at its last token: the position before a start
            resets[1] = torch.cat([reset[:, 1:], reset.new_zeros(reset.shape[0], 1)], 1).flip(1)
        finals = []
        layer_in = x
        for layer in range(self.num_layers):
            outs = []
            for d in range(self.num_directions):
                k = layer * self.num_directions + d
                seq = layer_in if d == 0 else layer_in.flip(1)
                h, h_last = projected_cell_sequence(self.spec, self.proj[k], seq, None if h0 is None else h0[k],
                                                    self.options, self.backend, reset=resets[d])
                outs.append(h if d == 0 else h.flip(1))
                finals.append(h_last)
            layer_in = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
            if self.dropout and layer < self.num_layers - 1:
                layer_in = F.dropout(layer_in, self.dropout, self.training)
        return layer_in, torch.stack(finals)

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
            inp, state = projected_cell_step(self.spec, self.proj[layer], inp, None if h is None else h[layer],
                                             self.options)
            new.append(state)
            if self.dropout and layer < self.num_layers - 1:
                inp = F.dropout(inp, self.dropout, self.training)
        return inp, torch.stack(new)

    def _layout_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.init_state is not None:
            s += ", learn_init_state=True"
        return s

    def extra_repr(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"{self._layout_repr()}, cell={self.cell!r}{options}, forget_bias={self.forget_bias}"

    @property
    def signed(self) -> bool:
        """Whether the transitions range over (-1, 1) (the cell's signed variant)."""
        return self.spec.signed


class MinGRU(MinRNN):
    """minGRU (Feng et al. 2024): h_t = (1 - z_t) h_{t-1} + z_t g(h~_t), z_t = sigmoid(W_z x_t + b_z),
    h~_t = W_h x_t + b_h, computed as a parallel scan.

    Args:
        input_size, hidden_size, num_layers, bias, dropout, bidirectional: as nn.GRU
            (batch_first always; dropout between layers).
        learn_init_state: learn a start state per layer and direction (zeros at init),
            used when forward() gets no h0.
        backend: the scan backend (see ``minrnn.scan``); "auto" picks the fastest.
        forget_bias: subtracted from the gate's bias at init (default 0.0, the paper's init),
            so that a positive value starts the layer remembering (a = 1 - z).
        signed: transitions in (-1, 1) (the "mingru_signed" cell): a_t = 1 - 2 z_t,
            h_t = (1 - 2 z_t) h_{t-1} + z_t g(h~_t), so that a state can flip its sign (parity).
            Same parameters and shapes; runs on every backend but "log".

    Init: nn.Linear's default for weights and biases (as the official code).
    Parameters per layer: (input_size + bias) * 2 * hidden_size.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 dropout: float = 0.0, bidirectional: bool = False, learn_init_state: bool = False,
                 backend: str = "auto", forget_bias: float = 0.0, device=None, dtype=None, signed: bool = False):
        super().__init__(input_size, hidden_size, num_layers, bias, dropout, bidirectional, learn_init_state,
                         backend, forget_bias, device, dtype, signed, cell="mingru")

    def extra_repr(self) -> str:
        return self._layout_repr() + (", signed=True" if self.signed else "")


class MinLSTM(MinRNN):
    """minLSTM (Feng et al. 2024): h_t = f'_t h_{t-1} + i'_t g(h~_t) with f' = f/(f+i),
    i' = i/(f+i) when ``normalize`` (the paper's equations), f' = f, i' = i otherwise.

    Args: as MinGRU, plus
        normalize: normalise the forget and input gates (default True, as in the paper).
        forget_bias: added to the forget gate's bias at init (default 3.0, the official
            code's default), so the layer starts by remembering.
        signed: transitions in (-1, 1) (the "minlstm_signed" cell): a_t = 2 f'_t - 1,
            h_t = (2 f'_t - 1) h_{t-1} + i'_t g(h~_t). Same parameters and shapes; runs on
            every backend but "log".

    Init: nn.Linear's default, then forget_bias added to the forget-gate bias.
    Parameters per layer: (input_size + bias) * 3 * hidden_size.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 dropout: float = 0.0, bidirectional: bool = False, learn_init_state: bool = False,
                 backend: str = "auto", normalize: bool = True, forget_bias: float = 3.0,
                 device=None, dtype=None, signed: bool = False):
        super().__init__(input_size, hidden_size, num_layers, bias, dropout, bidirectional, learn_init_state,
                         backend, forget_bias, device, dtype, signed, cell="minlstm", normalize=normalize)

    @property
    def normalize(self) -> bool:
        return self.options["normalize"]

    def extra_repr(self) -> str:
        return (self._layout_repr() + (", signed=True" if self.signed else "")
                + f", normalize={self.normalize}, forget_bias={self.forget_bias}")
