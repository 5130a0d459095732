"""The modules of a MinRNN block, each with its forward over a sequence beside its one-token
``step`` (as mamba's ``Mamba.forward`` / ``Mamba.step``):

    MinRNNRMSNorm      forward (..., D)            step (B, D)
    MinRNNCausalConv   forward (B, T, D) [+ past]  step (B, D) with its window of past inputs
    MinRNNMixer        forward (B, T, D) [+ h0]    step (B, D) with its state h
    MinRNNExpandedMixer  the same with a state of n x d per head (state_expansion n > 1)
    MinRNNMLP          forward (..., D)            step (B, D)
    MinRNNGateProj, MinRNNResidualOut: the Linear layers whose init differs (see modeling_minrnn)

A step runs the decoding kernels of ``minrnn.ops.step`` where they apply (float32/float64 CPU
tensors, no gradient to record) and their torch references otherwise, so it is correct under
autograd too. A step's Linear layer is called as a module, its hooks and wrappers (adapters)
applying as in a forward, unless it is exactly the model's class with no hooks: then its
weights go to F.linear directly (nn.Module's call costs a few percent of a small model's
decoding step). The norms and the conv compute a step from their own weights.

This is the leaf of ``minrnn.models``: the attention mixer and the block import from here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import ACT2FN

from ..layers import is_plain_linear, projected_cell_sequence, projected_cell_step
from ..ops import step as S
from ..ops.conv import causal_conv
from ..ops.expanded import expanded_gates, expanded_scan, expanded_step, expanded_step_fused
from ..ops.norm import rms_norm

_ONE_CALL_DTYPES = (torch.float32, torch.float64)


def linear_step(module: nn.Module, x: Tensor, cls: type = nn.Linear, residual: Tensor | None = None) -> Tensor:
    """module(x) for a step, plus ``residual`` (B, out) when given: F.linear (or, with a residual,
    one torch.addmm) on its weights where it is exactly ``cls`` with no hooks
    (``minrnn.layers.is_plain_linear``, the rule of the fused sequence path), else the call.
    Half precision adds the residual apart, rounding the sum as the sequence path does."""
    if not is_plain_linear(module, cls):
        y = module(x)
    elif residual is not None and residual.dtype in _ONE_CALL_DTYPES:
        out = torch.addmm(residual, x, module.weight.t())
        bias = module.bias
        return out if bias is None else out + bias
    else:
        y = F.linear(x, module.weight, module.bias)
    return y if residual is None else residual + y


class MinRNNRMSNorm(nn.Module):
    """RMSNorm over the last axis, computed in float32: x / sqrt(mean(x^2) + eps) * weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """x (..., D) -> (..., D); ``minrnn.ops.norm.rms_norm`` (fused kernels on float32 CPU tensors)."""
        return rms_norm(x, self.weight, self.eps)

    def step(self, x: Tensor) -> Tensor:
        """x (B, D) -> (B, D), one position per row: the decoding step's norm kernel where it applies."""
        return S.rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class MinRNNCausalConv(nn.Module):
    """Causal depthwise conv over time, channels-last: y_t = bias + sum_j weight[:, 0, j] x_{t-k+1+j}.

    ``weight`` (D, 1, k) and ``bias`` (D,) have nn.Conv1d(D, D, k, groups=D)'s names and shapes,
    so state dicts written when the block held that module load unchanged. The k - 1 inputs
    before a call (its ``past``, or a step's ``window``) are zeros at the start of a sequence.
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.channels, self.kernel_size = channels, kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv1d's default (the model re-initialises it in _init_weights)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}"

    def forward(self, x: Tensor, past: Tensor | None = None, reset: Tensor | None = None) -> Tensor:
        """x (B, T, D) -> y (B, T, D); past (B, D, k - 1): the inputs before x, oldest first
        (None: zeros); reset (B, T) bool, True where a document starts (no position sees
        inputs before its document's start), or None. ``minrnn.ops.conv.causal_conv`` (a CPU
        kernel for float32/float64)."""
        if past is None or past.shape[-1] == 0:
            return causal_conv(x, self.weight, self.bias, reset=reset)
        full = torch.cat([past.transpose(1, 2).to(x.dtype), x], dim=1)
        if reset is not None:
            reset = torch.cat([reset.new_zeros(reset.shape[0], past.shape[-1]), reset], dim=1)
        return causal_conv(full, self.weight, self.bias, reset=reset)[:, past.shape[-1]:]

    def new_window(self, x: Tensor) -> Tensor:
        """The window of a sequence's start for x (B, D): zeros (B, D, k - 1)."""
        return x.new_zeros(x.shape[0], self.channels, self.kernel_size - 1)

    def step(self, x: Tensor, window: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One position: x (B, D), window (B, D, k - 1) the past inputs, oldest first; mask (B,)
        bool, False feeds a zero (padding), or None. Returns (y (B, D), the new window)."""
        xin = x if mask is None else x * mask.unsqueeze(-1).to(x.dtype)
        full = torch.cat([window.to(x.dtype), xin.unsqueeze(-1)], dim=-1)  # (B, D, k)
        y = F.conv1d(full, self.weight, self.bias, groups=self.channels)[..., 0]
        return y, full[..., 1:]

    def add_norm_step(self, x: Tensor, window: Tensor, mask: Tensor | None,
                      norm: MinRNNRMSNorm) -> tuple[Tensor, Tensor, Tensor]:
        """``step`` followed by the block's residual and ``norm``: (x + y, norm.step(x + y), the
        new window), in one kernel (``minrnn.ops.step.conv_norm_step``) where it applies."""
        return S.conv_norm_step(x, mask, window, self.weight.view(self.channels, -1), self.bias,
                                norm.weight, norm.eps)


class MinRNNGateProj(nn.Linear):
    """The mixer's input projection D -> n E; its bias holds the cell's decay bias at init.

    A class of its own so that ``_init_weights``, which transformers calls on the modules that
    hold parameters, can tell it apart: ``decay_bias_sign * decay_bias`` goes on the E-wide
    slice ``decay_slot``, the pre-activation that sets the decay (the cell's ``CellSpec``:
    minLSTM's forget gate gets +decay_bias, minGRU's gate z -decay_bias, since a = 1 - z).
    """

    def __init__(self, in_features: int, rnn_hidden_size: int, n_pre: int, decay_bias: float = 0.0,
                 decay_slot: int = 1, decay_bias_sign: float = 1.0):
        super().__init__(in_features, n_pre * rnn_hidden_size, bias=True)
        self.rnn_hidden_size = rnn_hidden_size
        self.decay_bias, self.decay_slot, self.decay_bias_sign = decay_bias, decay_slot, decay_bias_sign

    def decay_range(self) -> tuple[int, int]:
        """(start, stop) of the output features that take the decay bias: slice ``decay_slot``."""
        E = self.rnn_hidden_size
        return self.decay_slot * E, (self.decay_slot + 1) * E


class MinRNNExpandedProj(MinRNNGateProj):
    """The expanded mixer's input projection D -> [hidden E | each gate H n | query H n]
    (E = H d): the candidate per channel, the cell's gates per key slot, the query per slot."""

    def __init__(self, in_features: int, rnn_hidden_size: int, gate_width: int, n_pre: int,
                 decay_bias: float = 0.0, decay_slot: int = 1, decay_bias_sign: float = 1.0):
        nn.Linear.__init__(self, in_features, rnn_hidden_size + n_pre * gate_width, bias=True)
        self.rnn_hidden_size, self.gate_width = rnn_hidden_size, gate_width
        self.decay_bias, self.decay_slot, self.decay_bias_sign = decay_bias, decay_slot, decay_bias_sign

    def decay_range(self) -> tuple[int, int]:
        start = self.rnn_hidden_size + (self.decay_slot - 1) * self.gate_width
        return start, start + self.gate_width


class MinRNNResidualOut(nn.Linear):
    """A projection that writes into the residual stream (the mixers' and the MLP's last one):
    initialised with std / sqrt(2 * num_hidden_layers)."""


class MinRNNMixer(nn.Module):
    """In (D -> n E) -> the cell -> Out (E -> D), for any cell registered in ``minrnn.ops.cells``.

    The input projection's pre-activations are the cell's (``[hidden | gate]`` for minGRU,
    ``[hidden | forget | input]`` for minLSTM), E wide each, as in ``minrnn.MinGRU``/``MinLSTM``;
    projection, cell, step and padding run through the same functions as those layers
    (``minrnn.layers.projected_cell_sequence`` / ``projected_cell_step``).
    """

    def __init__(self, config):
        super().__init__()
        self.spec = config.cell_spec
        self.cell = self.spec.name
        self.options = config.resolved_cell_options
        self.option_values = self.spec.options(**self.options)  # in the spec's order, as the kernels take them
        self.backend = config.scan_backend
        self.rnn_hidden_size = config.rnn_hidden_size
        self.n_pre = self.spec.n_pre
        self.in_proj = MinRNNGateProj(config.hidden_size, self.rnn_hidden_size, self.n_pre, config.resolved_decay_bias,
                                      self.spec.decay_slot, self.spec.decay_bias_sign)
        self.out_proj = MinRNNResidualOut(self.rnn_hidden_size, config.hidden_size, bias=config.use_bias)

    def forward(self, x: Tensor, h0: Tensor | None = None, mask: Tensor | None = None,
                reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, T, D), h0 (B, E) or None (zeros), mask (B, T) bool or None (all real), reset
        (B, T) bool or None (True: a document starts there, the state before it is forgotten).

        Returns (y (B, T, D), h_last (B, E)); h_last is in the state dtype (float32 for half).
        """
        if x.shape[1] == 1:
            # one position: the step's O(1) update, whatever the context length
            if reset is not None and h0 is not None:
                h0 = torch.where(reset[:, :1], torch.zeros((), dtype=h0.dtype, device=h0.device), h0)
            y, h_last = projected_cell_step(self.spec, self.in_proj, x, h0, self.options,
                                            None if mask is None else mask[:, 0])
            return self.out_proj(y), h_last
        y, h_last = projected_cell_sequence(self.spec, self.in_proj, x, h0, self.options, self.backend, mask,
                                            plain=MinRNNGateProj, reset=reset)
        return self.out_proj(y), h_last

    def step(self, x: Tensor, h: Tensor | None, mask: Tensor | None = None,
             residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One position: x (B, D), h (B, E) or None (zeros), mask (B,) bool (False keeps h) or
        None. Returns (y (B, D), plus ``residual`` (B, D) when given; the new h (B, E) in the
        state dtype)."""
        pre = linear_step(self.in_proj, x, MinRNNGateProj)
        state = S.cell_step(self.spec, pre, h, self.option_values, mask)
        return linear_step(self.out_proj, state.to(pre.dtype), MinRNNResidualOut, residual), state


class MinRNNExpandedMixer(nn.Module):
    """In (D -> [hidden | gates | query]) -> the expanded cell -> Out (E -> D): a state of
    n x d per head (``config.state_expansion`` n, ``config.resolved_state_head_dim`` d, H = E / d
    heads), ``minrnn.ops.expanded``. The cell's decay and input gate (n per head) are the decay
    and the key, its candidate g(hidden) (d per head) the value, and the query (n per head) reads
    the state: o_t = H_t^T q_t, E wide, then Out.

    The state is (B, H, n, d), float32 for half-precision models. A sequence runs
    ``minrnn.ops.expanded.expanded_scan`` by ``method`` ("states": one scan over the state's
    entries on ``config.scan_backend``, the faster on the CPU; "chunked": the chunkwise form),
    one position (decoding) the step; all give the per-step loop's numbers.
    """

    method = "states"

    def __init__(self, config):
        super().__init__()
        self.spec = config.cell_spec
        self.cell = self.spec.name
        self.options = config.resolved_cell_options
        self.option_values = self.spec.options(**self.options)
        self.backend = config.scan_backend
        self.rnn_hidden_size = E = config.rnn_hidden_size
        self.n, self.head_dim = config.state_expansion, config.resolved_state_head_dim
        self.heads = E // self.head_dim
        self.gate_width = self.heads * self.n
        # the cell's gates (all its pre-activations but hidden) and the query, each n per head
        self.n_gates = self.spec.n_pre - 1
        self.in_proj = MinRNNExpandedProj(config.hidden_size, E, self.gate_width, self.n_gates + 1,
                                          config.resolved_decay_bias, self.spec.decay_slot, self.spec.decay_bias_sign)
        # the read's output gate (config.state_output_gate): o * silu(W_g x), E wide
        self.gate_proj = nn.Linear(config.hidden_size, E, bias=False) if config.state_output_gate else None
        self.out_proj = MinRNNResidualOut(E, config.hidden_size, bias=config.use_bias)

    def _gated(self, o: Tensor, x: Tensor, step: bool = False) -> Tensor:
        """o (..., E) times silu(W_g x) where the mixer has an output gate, else o."""
        if self.gate_proj is None:
            return o
        gate = linear_step(self.gate_proj, x) if step else self.gate_proj(x)
        return o * F.silu(gate.to(o.dtype))

    def state_shape(self, batch: int) -> tuple[int, int, int, int]:
        """(B, H, n, d): the recurrent state of ``batch`` rows."""
        return batch, self.heads, self.n, self.head_dim

    def _decay_args(self, dec: Tensor) -> dict[str, Tensor | None]:
        """``_qkva``'s decays as the expanded functions take them: log_a, or a for a signed cell."""
        return {"log_a": None, "a": dec} if self.spec.signed else {"log_a": dec, "a": None}

    def _qkva(self, pre: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Pre-activations (..., E + (gates + 1) H n) -> q, k, log a (a signed cell: a) (..., H, n)
        and v (..., H, d), computed in the accumulation dtype (float32 for half)."""
        dt = torch.float32 if pre.dtype in (torch.float16, torch.bfloat16) else pre.dtype
        parts = pre.to(dt).split([self.rnn_hidden_size] + [self.gate_width] * (self.n_gates + 1), dim=-1)
        hidden, gates, query = parts[0], parts[1:-1], parts[-1]
        log_a, k, v = expanded_gates(self.spec, (hidden, *gates), self.option_values)
        lead = pre.shape[:-1]
        return (query.reshape(*lead, self.heads, self.n), k.reshape(*lead, self.heads, self.n),
                v.reshape(*lead, self.heads, self.head_dim), log_a.reshape(*lead, self.heads, self.n))

    def forward(self, x: Tensor, h0: Tensor | None = None, mask: Tensor | None = None,
                reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, T, D), h0 (B, H, n, d) or None (zeros), mask (B, T) bool or None, reset (B, T)
        bool or None (True: a document starts there). Returns (y (B, T, D), h_last (B, H, n, d))."""
        B, T, _ = x.shape
        if T == 1:  # one position: the step's O(1) update
            if reset is not None and h0 is not None:
                h0 = torch.where(reset[:, 0, None, None, None], torch.zeros((), dtype=h0.dtype, device=h0.device), h0)
            y, h_last = self.step(x[:, 0], h0, None if mask is None else mask[:, 0])
            return y.unsqueeze(1), h_last
        q, k, v, dec = self._qkva(self.in_proj(x))
        o, h_last = expanded_scan(q, k, v, h0=h0, **self._decay_args(dec), mask=mask, reset=reset,
                                  method=self.method, backend=self.backend)
        o = self._gated(o.reshape(B, T, self.rnn_hidden_size), x)
        return self.out_proj(o.to(x.dtype)), h_last

    def step(self, x: Tensor, h: Tensor | None, mask: Tensor | None = None,
             residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One position: x (B, D), h (B, H, n, d) or None (zeros), mask (B,) bool (False keeps h)
        or None. Returns (y (B, D), plus ``residual`` when given; the new h (B, H, n, d))."""
        pre = linear_step(self.in_proj, x, MinRNNExpandedProj)
        fused = expanded_step_fused(self.spec, pre, h, self.option_values, mask, self.heads, self.n)
        if fused is not None:  # one compiled kernel where it applies (CPU, no autograd)
            o = self._gated(fused[0], x, step=True)
            return linear_step(self.out_proj, o, MinRNNResidualOut, residual), fused[1]
        q, k, v, dec = self._qkva(pre)
        if h is None:
            h = q.new_zeros(self.state_shape(x.shape[0]))
        else:
            h = h.to(torch.promote_types(q.dtype, h.dtype))
        if mask is not None:  # the identity step: a = 1 (log a = 0), k = 0
            m = mask[:, None, None]
            k = torch.where(m, k, torch.zeros((), dtype=k.dtype, device=k.device))
            dec = torch.where(m, dec, torch.full((), float(self.spec.signed), dtype=dec.dtype, device=dec.device))
        o, h = expanded_step(q, k, v, h=h, **self._decay_args(dec))
        o = self._gated(o.reshape(x.shape[0], -1), x, step=True)
        return linear_step(self.out_proj, o.to(x.dtype), MinRNNResidualOut, residual), h


class MinRNNMLP(nn.Module):
    """W2 act(W1 x): D -> round(D * mlp_mult) -> D."""

    def __init__(self, config):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.mlp_hidden_size, bias=config.use_bias)
        self.down_proj = MinRNNResidualOut(config.mlp_hidden_size, config.hidden_size, bias=config.use_bias)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        """x (..., D) -> (..., D)."""
        return self.down_proj(self.act(self.up_proj(x)))

    def step(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """x (B, D) -> (B, D), plus ``residual`` (B, D) when given: one position (the MLP keeps
        no state: its forward's numbers)."""
        return linear_step(self.down_proj, self.act(linear_step(self.up_proj, x)), MinRNNResidualOut, residual)


__all__ = ["linear_step", "MinRNNRMSNorm", "MinRNNCausalConv", "MinRNNGateProj", "MinRNNExpandedProj",
           "MinRNNResidualOut", "MinRNNMixer", "MinRNNExpandedMixer", "MinRNNMLP"]
