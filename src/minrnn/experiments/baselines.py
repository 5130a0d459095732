"""The models of the side-by-side comparisons, built to a parameter budget.

    model = build_model("llama", vocab_size=65, target_params=1_000_000, max_length=256)
    logits = model(input_ids)                  # (B, T) long -> (B, T, vocab_size)
    parameter_count(model)                     # within 10% of the target (an error otherwise)
    model.baseline                             # BaselineInfo: width, layers, params, ...

Models (each from the library that maintains it, so nobody can call it a strawman):

    mingru, minlstm  minrnn.models.MinRNNForCausalLM (this package)
    mingru-signed,   the same with transitions in (-1, 1) (cells mingru_signed, minlstm_signed):
    minlstm-signed   the same parameters as mingru / minlstm of that width
    mingru-hybrid,   the same with attention in every third block (blocks 2, 5, ...; the last
    minlstm-hybrid   block when there are fewer than 3): RoPE, a window of 128 tokens, 4 heads
                     of the even size nearest width / 4
    llama            transformers' LlamaForCausalLM: RoPE, RMSNorm, SwiGLU MLP
    gpt2             transformers' GPT2LMHeadModel: learned positions, LayerNorm, GELU MLP
                     (nanoGPT's architecture)
    mamba            transformers' MambaForCausalLM
    lstm, gru        torch.nn.LSTM / nn.GRU between an embedding and a linear head

How the size is matched (the rule): the depth is fixed (``num_layers``, default 4; 8 for
mamba, whose blocks have no MLP and so hold about half a Transformer block's parameters, as
in the Mamba paper's comparisons; 2 for lstm and gru) and so is every shape ratio (minRNN
expansion and MLP factors as MinRNNConfig's defaults, 4 attention heads, Mamba's expand 2 and
state 16). The width is then the one whose model comes closest to ``target_params``, over
integers for mingru / minlstm / mamba / lstm / gru and over multiples of 2 x heads (llama: RoPE
needs an even head size) or of heads (gpt2). A Transformer's width moves in steps too coarse
to land within 10% at small sizes, so for llama and gpt2 the width is the one that comes
closest with the standard MLP (8/3 x width for llama's SwiGLU, 4 x width for gpt2), and the
MLP's hidden size is then moved to the integer that brings the count closest to the target
(off the standard ratio by at most what one width step is worth). Any of these can be fixed
with an override.

Counted: every parameter, embeddings and positional tables included, shared tensors once.
Embeddings are tied to the output head in every model (``tie_embeddings=False`` unties
them), so no model gets a free second vocabulary matrix. GPT-2's learned position table
(``max_length`` x width) is part of its budget; the other models have no such table.

Dropout: ``dropout`` goes where each architecture has it: minRNN's embedding and residual
branches, GPT-2's embedding / attention / residual dropout, Llama's attention dropout (the
only one transformers' Llama has), between the LSTM/GRU layers and on their input and output.
transformers' Mamba has none: a non-zero dropout for it is ignored with a warning.

Mamba on CPU: transformers runs its selective scan either with the ``mambapy`` package's
parallel scan (``use_mambapy``) or with a sequential loop over time (same numbers, much
slower). ``mamba_scan="auto"`` (default) takes mambapy when installed, else the loop;
``"mambapy"`` insists on it (ImportError naming the package when it is missing).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["BASELINES", "MINRNN_MODELS", "BaselineInfo", "LogitsOnly", "TorchRNNLM", "build_model", "parameter_count",
           "mambapy_available"]

TOLERANCE = 0.10
GENERIC_KEYS = ("width", "num_layers", "dropout", "max_length", "tie_embeddings", "tolerance")


def parameter_count(model: nn.Module) -> int:
    """All parameters of ``model``, a tensor shared by several modules (tied embeddings) once."""
    return sum(p.numel() for p in model.parameters())


def mambapy_available() -> bool:
    return importlib.util.find_spec("mambapy") is not None


class LogitsOnly(nn.Module):
    """A transformers causal LM seen as ``forward(input_ids (B, T)) -> logits (B, T, V)``.

    ``.model`` is the transformers model itself (for ``generate``, ``save_pretrained``).
    No cache is built: the wrapper is for training and scoring whole sequences.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


class TorchRNNLM(nn.Module):
    """Embedding -> dropout -> nn.LSTM or nn.GRU (``num_layers``, dropout between layers)
    -> dropout -> linear head (tied to the embedding unless ``tie_embeddings=False``).

    forward(input_ids (B, T)) -> logits (B, T, vocab_size). The cuDNN kernel runs on GPU.
    """

    def __init__(self, cell: str, vocab_size: int, hidden_size: int, num_layers: int = 2,
                 dropout: float = 0.0, tie_embeddings: bool = True):
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}.get(cell)
        if rnn is None:
            raise ValueError(f"cell must be 'lstm' or 'gru', got {cell!r}")
        self.cell = cell
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.rnn = rnn(hidden_size, hidden_size, num_layers, batch_first=True,
                       dropout=dropout if num_layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, input_ids: Tensor) -> Tensor:
        y, _ = self.rnn(self.drop(self.embed(input_ids)))
        return self.head(self.drop(y))


@dataclass(frozen=True)
class BaselineInfo:
    """What ``build_model`` chose: recorded on the model as ``model.baseline``."""

    name: str
    width: int
    num_layers: int
    params: int
    target_params: int | None
    mlp_width: int | None  # llama / gpt2: the MLP's hidden size; None for the others

    @property
    def relative_error(self) -> float | None:
        return None if self.target_params is None else self.params / self.target_params - 1


# --- the families -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Family:
    default_layers: int
    quantum: Callable[[dict], int]  # the width moves in steps of this (it may depend on the heads)
    make: Callable[..., nn.Module]  # make(vocab, width, mlp_width, layers, opts) -> module
    default_mlp: Callable[[int], int] | None = None  # llama / gpt2: the standard MLP width


def _make_minrnn(cell):
    def make(vocab, width, mlp_width, layers, opts):
        from ..models import MinRNNConfig, MinRNNForCausalLM

        extra = dict(opts["extra"])
        # a cell override may pick the family's signed variant (same parameters), nothing else
        chosen = extra.pop("cell", cell)
        if chosen not in (cell, cell.removesuffix("_signed") + "_signed"):
            raise ValueError(f"cell must be {cell!r} or its signed variant for this model, got {chosen!r}")
        config = MinRNNConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, cell=chosen,
                              dropout=opts["dropout"], tie_word_embeddings=opts["tie_embeddings"], **extra)
        return LogitsOnly(MinRNNForCausalLM(config))
    return make


def _make_minrnn_hybrid(cell):
    plain = _make_minrnn(cell)

    def make(vocab, width, mlp_width, layers, opts):
        from ..models.attention_minrnn import every_third_block

        extra = dict(opts["extra"])
        if "attention_layers" not in extra and "attention_every" not in extra:
            extra["attention_layers"] = every_third_block(layers)
        extra.setdefault("attention_window", 128)
        heads = extra.setdefault("num_attention_heads", 4)
        if "attention_head_dim" not in extra and width % (2 * heads):
            extra["attention_head_dim"] = max(2, 2 * round(width / (2 * heads)))
        return plain(vocab, width, mlp_width, layers, {**opts, "extra": extra})
    return make


def _heads(opts, key):
    return opts["extra"].get(key, 4)


def _make_llama(vocab, width, mlp_width, layers, opts):
    from transformers import LlamaConfig, LlamaForCausalLM

    extra = dict(opts["extra"])
    heads = extra.pop("num_attention_heads", 4)
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=mlp_width, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=extra.pop("num_key_value_heads", heads),
                         max_position_embeddings=opts["max_length"], attention_dropout=opts["dropout"],
                         tie_word_embeddings=opts["tie_embeddings"], bos_token_id=None, eos_token_id=None, **extra)
    return LogitsOnly(LlamaForCausalLM(config))


def _make_gpt2(vocab, width, mlp_width, layers, opts):
    from transformers import GPT2Config, GPT2LMHeadModel

    extra = dict(opts["extra"])
    p = opts["dropout"]
    config = GPT2Config(vocab_size=vocab, n_embd=width, n_inner=mlp_width, n_layer=layers,
                        n_head=extra.pop("n_head", 4), n_positions=opts["max_length"], resid_pdrop=p, embd_pdrop=p,
                        attn_pdrop=p, tie_word_embeddings=opts["tie_embeddings"], bos_token_id=None,
                        eos_token_id=None, **extra)
    return LogitsOnly(GPT2LMHeadModel(config))


def _make_mamba(vocab, width, mlp_width, layers, opts):
    from transformers import MambaConfig, MambaForCausalLM

    extra = dict(opts["extra"])
    scan = extra.pop("mamba_scan", "auto")
    if scan not in ("auto", "mambapy", "sequential"):
        raise ValueError(f"mamba_scan must be 'auto', 'mambapy' or 'sequential', got {scan!r}")
    if scan == "mambapy" and not mambapy_available():
        raise ImportError("mamba_scan='mambapy' needs the mambapy package (pip install mambapy); without it "
                          "transformers' Mamba runs its sequential loop on CPU (mamba_scan='sequential')")
    use_mambapy = scan == "mambapy" or (scan == "auto" and mambapy_available())
    config = MambaConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, use_mambapy=use_mambapy,
                         tie_word_embeddings=opts["tie_embeddings"], bos_token_id=None, eos_token_id=None,
                         pad_token_id=None, **extra)
    return LogitsOnly(MambaForCausalLM(config))


def _make_torch_rnn(cell):
    def make(vocab, width, mlp_width, layers, opts):
        if opts["extra"]:
            raise TypeError(f"{cell}: unknown options {sorted(opts['extra'])}; it takes only {list(GENERIC_KEYS)}")
        return TorchRNNLM(cell, vocab, width, layers, opts["dropout"], opts["tie_embeddings"])
    return make


_FAMILIES: dict[str, _Family] = {
    "mingru": _Family(4, lambda opts: 1, _make_minrnn("mingru")),
    "minlstm": _Family(4, lambda opts: 1, _make_minrnn("minlstm")),
    "mingru-signed": _Family(4, lambda opts: 1, _make_minrnn("mingru_signed")),
    "minlstm-signed": _Family(4, lambda opts: 1, _make_minrnn("minlstm_signed")),
    "mingru-hybrid": _Family(4, lambda opts: 1, _make_minrnn_hybrid("mingru")),
    "minlstm-hybrid": _Family(4, lambda opts: 1, _make_minrnn_hybrid("minlstm")),
    "llama": _Family(4, lambda opts: 2 * _heads(opts, "num_attention_heads"), _make_llama,
                     default_mlp=lambda width: round(8 * width / 3)),
    "gpt2": _Family(4, lambda opts: _heads(opts, "n_head"), _make_gpt2, default_mlp=lambda width: 4 * width),
    "mamba": _Family(8, lambda opts: 1, _make_mamba),
    "lstm": _Family(2, lambda opts: 1, _make_torch_rnn("lstm")),
    "gru": _Family(2, lambda opts: 1, _make_torch_rnn("gru")),
}
BASELINES = tuple(_FAMILIES)
# the families built as this package's MinRNNForCausalLM (their options are MinRNNConfig's fields)
MINRNN_MODELS = ("mingru", "minlstm", "mingru-signed", "minlstm-signed", "mingru-hybrid", "minlstm-hybrid")

# the names the configs give to the width, the MLP width and the depth (an override of any fixes it)
_WIDTH_KEYS = {"hidden_size", "n_embd"}
_MLP_KEYS = {"intermediate_size", "n_inner"}
_LAYER_KEYS = {"num_hidden_layers", "n_layer"}


def _count(family: _Family, vocab, width, mlp_width, layers, opts) -> int:
    # on the meta device: exact shapes, no memory, no initialisation cost
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return parameter_count(family.make(vocab, width, mlp_width, layers, opts))


def _search_width(count: Callable[[int], int], quantum: int, target: int) -> tuple[int, int]:
    """(the largest multiple of quantum with count <= target or quantum itself, the next one)."""
    lo, hi = 0, quantum
    while count(hi) <= target:  # count grows with the width: double until past the target
        lo, hi = hi, 2 * hi
    while hi - lo > quantum:  # bisect on multiples of quantum
        mid = (lo + hi) // (2 * quantum) * quantum
        lo, hi = (mid, hi) if count(mid) <= target else (lo, mid)
    return max(lo, quantum), hi


def build_model(name: str, vocab_size: int, target_params: int | None, **overrides) -> nn.Module:
    """A ``name`` model of about ``target_params`` parameters; forward(input_ids) -> logits.

    Args:
        name: one of BASELINES.
        vocab_size: the number of token ids (inputs and outputs).
        target_params: the parameter budget, every parameter counted; None builds the widths
            given (``width``, and for llama / gpt2 the MLP width) without matching.
        overrides:
            width: fix the model width instead of searching it;
            num_layers: depth (default 4; mamba 8; lstm and gru 2);
            dropout: 0.0 by default (see the module docstring for where it goes);
            max_length: the longest sequence (GPT-2's position table, Llama's RoPE range; 1024);
            tie_embeddings: tie the output head to the embedding (default True);
            tolerance: allowed |params / target - 1| (default 0.10);
            mamba_scan: "auto", "mambapy" or "sequential" (mamba only);
            any other key: a field of the model's transformers config (e.g. expansion_factor,
            use_conv for mingru; num_attention_heads or intermediate_size for llama; n_head or
            n_inner for gpt2; state_size for mamba).
    Returns:
        an nn.Module with ``forward(input_ids (B, T)) -> logits (B, T, vocab_size)`` and a
        ``baseline`` attribute (BaselineInfo).
    Raises:
        ValueError when the budget cannot be met within the tolerance (e.g. the embedding
        alone is larger than the budget), KeyError for an unknown name.
    """
    if name not in _FAMILIES:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(BASELINES)}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if target_params is not None and (isinstance(target_params, bool) or not isinstance(target_params, int)
                                      or target_params < 1):
        raise ValueError(f"target_params must be a positive integer or None, got {target_params!r}")
    family = _FAMILIES[name]
    extra = {k: v for k, v in overrides.items() if k not in GENERIC_KEYS}
    width = overrides.get("width")
    for key in _WIDTH_KEYS & extra.keys():
        width = extra.pop(key)  # the config's own name for the width, accepted as "width"
    layers = overrides.get("num_layers", family.default_layers)
    for key in _LAYER_KEYS & extra.keys():
        layers = extra.pop(key)  # the config's own name for the depth, accepted as "num_layers"
    mlp_width = None
    for key in _MLP_KEYS & extra.keys():
        if family.default_mlp is None:
            raise TypeError(f"{name} has no {key}")
        mlp_width = extra.pop(key)
    opts = {
        "dropout": float(overrides.get("dropout", 0.0)),
        "max_length": int(overrides.get("max_length", 1024)),
        "tie_embeddings": bool(overrides.get("tie_embeddings", True)),
        "extra": extra,
    }
    layers = int(layers)
    tolerance = float(overrides.get("tolerance", TOLERANCE))
    if name == "mamba" and opts["dropout"] > 0:
        warnings.warn("transformers' Mamba has no dropout: dropout is ignored for mamba", stacklevel=2)
    quantum = family.quantum(opts)
    if width is not None and width % quantum:
        raise ValueError(f"{name}: width {width} must be a multiple of {quantum} (the heads, and RoPE's even head size)")

    def count(w, m=None):
        return _count(family, vocab_size, w, m if m is not None else _mlp(w), layers, opts)

    def _mlp(w):
        if family.default_mlp is None:
            return None
        return mlp_width if mlp_width is not None else family.default_mlp(w)

    if target_params is None:
        if width is None:
            raise ValueError("give target_params or a width")
    elif width is None:
        lo, hi = _search_width(count, quantum, target_params)
        width = min((lo, hi), key=lambda w: abs(count(w) - target_params))
    if target_params is not None and family.default_mlp is not None and mlp_width is None:
        # the count is affine in the MLP width: two counts give the slope
        m0 = family.default_mlp(width)
        c0, c1 = count(width, m0), count(width, m0 + 1)
        mlp_width = max(1, m0 + round((target_params - c0) / (c1 - c0)))
    mlp_width = _mlp(width)

    model = family.make(vocab_size, width, mlp_width, layers, opts)
    params = parameter_count(model)
    if target_params is not None and abs(params / target_params - 1) > tolerance:
        raise ValueError(f"{name}: the closest model has {params:,} parameters (width {width}, {layers} layers), "
                         f"more than {tolerance:.0%} away from the target {target_params:,}; change num_layers or "
                         "the target (the embedding alone is vocab_size x width)")
    model.baseline = BaselineInfo(name, width, layers, params, target_params, mlp_width)
    return model
