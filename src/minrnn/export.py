"""A trained MinRNNForCausalLM as two ONNX graphs: the prefill and the one-token step.

    prefill.onnx   input_ids (B, T) int64
                   -> logits (B, V) at the last position, conv (L, B, D, k-1), states (L, B, E)
    step.onnx      input_ids (B, 1) int64, conv (L, B, D, k-1), states (L, B, E)
                   -> logits (B, V), the new conv and states

L blocks, D the model width, k the conv's kernel (k - 1 = 0 without a conv), E the recurrent
width; everything float32. The state is the whole memory of the model: a fixed-size tensor in
and out, no KV cache. B and T are the ones given to ``export_onnx`` (the graphs have fixed
shapes); a prompt of another length runs through the step graph token by token.

How: each graph is a small module around the model (a ``MinRNNCache`` built from the state
tensors, the model's cached forward, the new state read back) traced by ``torch.export``. The
CPU kernels are custom ops (``minrnn.ops.cpu.library``) that ONNX has no operator for, so the
traced program is decomposed with their torch references first; the result is translated by
torch's ONNX exporter (``torch.onnx.export``, onnxscript). Needs ``pip install minrnn[export]``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .ops.cells import get_cell
from .ops.reference import causal_conv_reference, rms_norm_reference

GRAPHS = ("prefill", "step")


def _state_tensors(cache) -> tuple[Tensor, Tensor]:
    """(conv windows (L, B, D, k-1), states (L, B, E)) held by a MinRNNCache after a call."""
    states = torch.stack([layer.recurrent_states[0] for layer in cache.layers])
    windows = [layer.conv_states[0] for layer in cache.layers]
    if windows[0] is None:  # no conv: an empty window
        B, D = states.shape[1], cache.layers[0].recurrent_states[0].shape[-1]
        return states.new_zeros(len(windows), B, D, 0), states
    return torch.stack(windows), states


class PrefillGraph(nn.Module):
    """input_ids (B, T) -> (logits (B, V) of the last position, conv (L, B, D, k-1), states (L, B, E))."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor):
        from .models.cache_minrnn import MinRNNCache

        cache = MinRNNCache(self.model.config)
        logits = self.model(input_ids=input_ids, cache=cache, use_cache=True).logits[:, -1]
        return (logits, *_state_tensors(cache))


class StepGraph(nn.Module):
    """input_ids (B, 1), conv (L, B, D, k-1), states (L, B, E) -> (logits (B, V), conv, states)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, conv: Tensor, states: Tensor):
        from .models.cache_minrnn import MinRNNCache

        cache = MinRNNCache(self.model.config)
        for i, layer in enumerate(cache.layers):
            layer.store_step(conv[i] if conv.shape[-1] else None, states[i])
        logits = self.model(input_ids=input_ids, cache=cache, use_cache=True).logits[:, -1]
        return (logits, *_state_tensors(cache))


# --- the custom ops' torch references, for the decomposition --------------------------------


def _cell_loop(cell: str, options, pre: Tensor, h0: Tensor | None, reset: Tensor | None) -> Tensor:
    """The cell's step loop over packed pre-activations (B, T, n*C): h (B, T, C). T is fixed in
    an exported graph, so the loop unrolls."""
    spec = get_cell(cell)
    parts = pre.chunk(spec.n_pre, dim=-1)
    h, out = h0, []
    for t in range(pre.shape[1]):
        h = spec.step(tuple(p[:, t] for p in parts), h, tuple(options), None, None if reset is None else reset[:, t])
        out.append(h)
    return torch.stack(out, 1)


def _scan_ref(a, b, h0):
    h, out = h0, []
    for t in range(a.shape[1]):
        h = b[:, t] if h is None else a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, 1)


def _projected_ref(x, weight, bias, h0, cell, options, reset):
    pre = x @ weight.t()
    return _cell_loop(cell, options, pre if bias is None else pre + bias, h0, reset), pre


def _norm_ref(x, weight, eps):
    r = x.float().pow(2).mean(-1).add(eps).rsqrt().reshape(-1).to(x.dtype)
    return rms_norm_reference(x, weight, eps), r


def references() -> dict:
    """The decomposition table: each forward custom op of the CPU backend -> its torch reference."""
    ops = torch.ops.minrnn
    return {ops.cpu_scan.default: _scan_ref,
            ops.cpu_cell.default: lambda pre, h0, cell, options, reset: _cell_loop(cell, options, pre, h0, reset),
            ops.cpu_projected_cell.default: _projected_ref,
            ops.cpu_causal_conv.default: causal_conv_reference,
            ops.cpu_rms_norm.default: _norm_ref}


def _check_exportable(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "minrnn":
        raise TypeError(f"model must be a MinRNNForCausalLM, got {type(model).__name__}")
    if getattr(config, "attention_layer_indices", ()):
        raise ValueError("export takes minRNN models without attention blocks (their cache grows with the context)")
    if getattr(config, "state_expansion", 1) != 1:
        raise ValueError(f"export takes state_expansion = 1, got {config.state_expansion}")


def export_program(module: nn.Module, args: tuple) -> torch.export.ExportedProgram:
    """``torch.export`` of ``module`` on ``args`` with the custom ops replaced by their references."""
    program = torch.export.export(module, args)
    table = torch.export.default_decompositions()
    table.update(references())
    return program.run_decompositions(table)


def export_onnx(model: nn.Module, out_dir: str | Path, *, batch: int = 1, prompt_length: int = 16) -> dict[str, Path]:
    """Write ``prefill.onnx`` and ``step.onnx`` for ``model`` (a MinRNNForCausalLM, float32,
    on the CPU) into ``out_dir``.

    Args:
        batch: B of both graphs.
        prompt_length: T of the prefill graph, >= 1.
    Returns:
        {"prefill": path, "step": path}.
    """
    _check_exportable(model)
    for name, value in (("batch", batch), ("prompt_length", prompt_length)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().cpu().eval()
    ids = torch.zeros(batch, prompt_length, dtype=torch.long)
    with torch.no_grad():
        _, conv, states = PrefillGraph(model)(ids)
    graphs = {
        "prefill": (PrefillGraph(model), (ids,), ["input_ids"]),
        "step": (StepGraph(model), (ids[:, :1], conv, states), ["input_ids", "conv", "states"]),
    }
    paths = {}
    for name, (module, args, inputs) in graphs.items():
        program = export_program(module, args)
        onnx_program = torch.onnx.export(program, input_names=inputs, output_names=["logits", "conv_out", "states_out"],
                                         dynamo=True, verbose=False)
        paths[name] = out / f"{name}.onnx"
        onnx_program.save(str(paths[name]))
    return paths


__all__ = ["GRAPHS", "PrefillGraph", "StepGraph", "export_onnx", "export_program", "references"]
