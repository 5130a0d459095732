"""The models of the side-by-side comparisons, built to a parameter budget.

    model = build_model("llama", vocab_size=65, target_params=1_000_000, max_length=256)
    logits = model(input_ids)                  # (B, T) long -> (B, T, vocab_size)
    parameter_count(model)                     # within 10% of the target (an error otherwise)
    model.baseline                             # BaselineInfo: width, layers, params, ...

Each model family is one record (`Baseline`: factory, size rule, config class, kind), and
``register_baseline(Baseline(...))`` adds one: the presets, the planner's options, the report's
reference models (kind "transformer") and MINRNN_MODELS are read from the records. The minRNN
families are derived from the cell registry (minrnn.ops.cells.CELLS): a cell registered there is
a model here, by its name with "-" for "_", and one of positive transitions also a "-hybrid".

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

How the size is matched (the rule): the depth is fixed (``num_hidden_layers``, default 4; 8 for
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
Embeddings are tied to the output head in every model (``tie_word_embeddings=False`` unties
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

import importlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..ops.cells import CELLS
from ..training.config import model_keys
from .modules import LogitsOnly, TorchRNNLM, mambapy_available, parameter_count

__all__ = ["BASELINES", "MINRNN_MODELS", "KINDS", "Baseline", "BaselineInfo", "LogitsOnly", "TorchRNNLM",
           "build_model", "canonical_options", "families", "get_baseline", "mambapy_available", "of_kind",
           "parameter_count", "register_baseline", "unregister_baseline"]

TOLERANCE = 0.10


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


# --- the family records ------------------------------------------------------------------------

KINDS = ("transformer", "state-space", "recurrent", "minrnn")
# The build options every family takes (the names of MinRNNConfig / TrainConfig's [model] table)
GENERIC_KEYS = ("hidden_size", "num_hidden_layers", "dropout", "max_length", "tie_word_embeddings", "tolerance")
# Earlier names of generic options, still taken (presets, --set) and read as the new ones
ALIASES = {"width": "hidden_size", "num_layers": "num_hidden_layers", "tie_embeddings": "tie_word_embeddings"}


@dataclass(frozen=True)
class Baseline:
    """One model family of `minrnn compare`: how to build it, how its size is matched, what it is.

    ``make(vocab_size, width, mlp_width, num_layers, opts) -> nn.Module`` builds the model
    (``forward(input_ids (B, T)) -> logits (B, T, vocab_size)``); ``opts`` holds ``dropout``,
    ``max_length``, ``tie_word_embeddings`` and ``extra`` (the family's own options). The size rule:
    ``num_hidden_layers`` is the default depth, the width moves in steps of ``width_step`` (an int,
    or a function of ``opts``: llama's heads), and ``default_mlp(width)``, when given, is the
    standard MLP width that build_model then moves to land on the budget (llama, gpt2).
    ``config``: the transformers config class whose fields are the family's options (a class or
    "module:Class", imported when asked for); ``options``: any other option names it takes.
    ``kind``: "transformer" (the report holds every run to the best of these), "state-space",
    "recurrent" or "minrnn" (this package's model: its options are MinRNNConfig's fields).
    ``packs_documents``: its forward takes ``position_ids`` (B, T) restarting at 0 at each
    document start (transformers' padding-free convention) and keeps the documents apart, so
    `minrnn compare --pack-documents` may run it. ``carries_state``: its forward takes ``state=``
    and ``return_state=True`` (a fixed-size state handed from call to call), so `minrnn compare
    --stateful` may run it.
    """

    name: str
    make: Callable[..., nn.Module]
    kind: str
    num_hidden_layers: int = 4
    width_step: int | Callable[[dict], int] = 1
    default_mlp: Callable[[int], int] | None = None
    config: str | type | None = None
    options: tuple[str, ...] = ()
    doc: str = ""
    packs_documents: bool = False
    carries_state: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not callable(self.make):
            raise TypeError(f"make must be callable, got {self.make!r}")

    def step(self, opts: dict) -> int:
        """The width's step for these options."""
        return self.width_step(opts) if callable(self.width_step) else int(self.width_step)

    def config_class(self) -> type | None:
        if not isinstance(self.config, str):
            return self.config
        module, _, attr = self.config.partition(":")
        return getattr(importlib.import_module(module), attr)

    def option_keys(self) -> set[str]:
        """Every build option the family knows: the generic ones, its config's fields, ``options``."""
        keys = set(GENERIC_KEYS) | set(self.options)
        if self.kind == "minrnn":  # the [model] table of `minrnn train`: one vocabulary for both
            return keys | set(model_keys())
        config = self.config_class()
        return keys | (set(config().to_dict()) if config is not None else set())


_REGISTERED: dict[str, Baseline] = {}


def register_baseline(record: Baseline, replace: bool = False) -> Baseline:
    """Make ``record`` a model of `minrnn compare` (presets, --models, --set, the report)."""
    if not isinstance(record, Baseline):
        raise TypeError(f"record must be a Baseline, got {type(record).__name__}")
    if not replace and record.name in families():
        raise ValueError(f"record: a baseline {record.name!r} exists already (replace=True to replace it)")
    _REGISTERED[record.name] = record
    return record


def unregister_baseline(name: str) -> None:
    """Forget the registered baseline ``name`` (the cells' families come and go with their cells)."""
    if name not in _REGISTERED:
        raise KeyError(f"name: {name!r} is not a registered baseline; registered: {', '.join(_REGISTERED)}")
    del _REGISTERED[name]


def _cell_families() -> dict[str, Baseline]:
    """A family per registered cell (mingru_signed -> "mingru-signed"), then a hybrid (attention
    in every third block) per cell of positive transitions, as MinRNNForCausalLM builds them."""
    config = "minrnn.models:MinRNNConfig"
    out = {}
    for cell, spec in CELLS.items():
        name = cell.replace("_", "-")
        out[name] = Baseline(name, _make_minrnn(cell), "minrnn", config=config, doc=spec.doc, packs_documents=True,
                             carries_state=True)
    for cell, spec in CELLS.items():
        if not spec.signed:
            name = cell.replace("_", "-") + "-hybrid"
            out[name] = Baseline(name, _make_minrnn_hybrid(cell), "minrnn", config=config,
                                 doc=f"{cell}, attention in every third block", packs_documents=True)
    return out


def families() -> dict[str, Baseline]:
    """{name: record} of every model compare can build: the cells' families, then the registered ones."""
    return {**_cell_families(), **_REGISTERED}


def get_baseline(name: str) -> Baseline:
    found = families().get(name)
    if found is None:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(families())}")
    return found


def of_kind(kind: str) -> tuple[str, ...]:
    """The names of the families of ``kind`` (one of KINDS)."""
    return tuple(n for n, b in families().items() if b.kind == kind)


class _Names(Sequence):
    """The names of the families that ``keep`` accepts, read from the registries on each use
    (so a cell or baseline registered later is in it)."""

    def __init__(self, keep: Callable[[Baseline], bool]):
        self._keep = keep

    def _names(self) -> tuple[str, ...]:
        return tuple(n for n, b in families().items() if self._keep(b))

    def __getitem__(self, i):
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self):
        return iter(self._names())

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __repr__(self) -> str:
        return repr(self._names())


BASELINES = _Names(lambda b: True)
# the families built as this package's MinRNNForCausalLM (their options are MinRNNConfig's fields)
MINRNN_MODELS = _Names(lambda b: b.kind == "minrnn")


def canonical_options(options: dict, where: str = "options") -> dict:
    """``options`` with the earlier names of generic options (ALIASES: width, num_layers,
    tie_embeddings) read as the current ones; both names of one option is an error."""
    out, given = {}, {}
    for key, value in options.items():
        name = ALIASES.get(key, key)
        if name in out:
            raise ValueError(f"{where}: {given[name]!r} and {key!r} are one option; give it once")
        out[name], given[name] = value, key
    return out


# --- the factories ------------------------------------------------------------------------------


def _make_minrnn(cell):
    def make(vocab, width, mlp_width, layers, opts):
        from ..models import MinRNNConfig, MinRNNForCausalLM  # transformers: imported when a model is built

        extra = dict(opts["extra"])
        # a cell override may pick the family's signed variant (same parameters), nothing else
        chosen = extra.pop("cell", cell)
        if chosen not in (cell, cell.removesuffix("_signed") + "_signed"):
            raise ValueError(f"cell must be {cell!r} or its signed variant for this model, got {chosen!r}")
        config = MinRNNConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, cell=chosen,
                              dropout=opts["dropout"], tie_word_embeddings=opts["tie_word_embeddings"], **extra)
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
                         tie_word_embeddings=opts["tie_word_embeddings"], bos_token_id=None, eos_token_id=None,
                         **extra)
    return LogitsOnly(LlamaForCausalLM(config))


def _make_gpt2(vocab, width, mlp_width, layers, opts):
    from transformers import GPT2Config, GPT2LMHeadModel

    extra = dict(opts["extra"])
    p = opts["dropout"]
    config = GPT2Config(vocab_size=vocab, n_embd=width, n_inner=mlp_width, n_layer=layers,
                        n_head=extra.pop("n_head", 4), n_positions=opts["max_length"], resid_pdrop=p, embd_pdrop=p,
                        attn_pdrop=p, tie_word_embeddings=opts["tie_word_embeddings"], bos_token_id=None,
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
    if opts["dropout"] > 0:
        warnings.warn("transformers' Mamba has no dropout: dropout is ignored for mamba", stacklevel=4)
    use_mambapy = scan == "mambapy" or (scan == "auto" and mambapy_available())
    config = MambaConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, use_mambapy=use_mambapy,
                         tie_word_embeddings=opts["tie_word_embeddings"], bos_token_id=None, eos_token_id=None,
                         pad_token_id=None, **extra)
    return LogitsOnly(MambaForCausalLM(config))


def _make_torch_rnn(cell):
    def make(vocab, width, mlp_width, layers, opts):
        if opts["extra"]:
            raise TypeError(f"{cell}: unknown options {sorted(opts['extra'])}; it takes only {list(GENERIC_KEYS)}")
        return TorchRNNLM(cell, vocab, width, layers, opts["dropout"], opts["tie_word_embeddings"])
    return make


register_baseline(Baseline("llama", _make_llama, "transformer", width_step=lambda opts: 2 * _heads(opts, "num_attention_heads"),
                           default_mlp=lambda width: round(8 * width / 3), config="transformers:LlamaConfig",
                           doc="transformers' LlamaForCausalLM: RoPE, RMSNorm, SwiGLU MLP", packs_documents=True))
register_baseline(Baseline("gpt2", _make_gpt2, "transformer", width_step=lambda opts: _heads(opts, "n_head"),
                           default_mlp=lambda width: 4 * width, config="transformers:GPT2Config",
                           doc="transformers' GPT2LMHeadModel (nanoGPT's architecture)", packs_documents=True))
register_baseline(Baseline("mamba", _make_mamba, "state-space", num_hidden_layers=8, config="transformers:MambaConfig",
                           options=("mamba_scan",), doc="transformers' MambaForCausalLM"))
register_baseline(Baseline("lstm", _make_torch_rnn("lstm"), "recurrent", num_hidden_layers=2,
                           doc="torch.nn.LSTM between an embedding and a linear head", carries_state=True))
register_baseline(Baseline("gru", _make_torch_rnn("gru"), "recurrent", num_hidden_layers=2,
                           doc="torch.nn.GRU between an embedding and a linear head", carries_state=True))

# the names the configs give to the width, the MLP width and the depth (an override of any fixes it)
_WIDTH_KEYS = {"n_embd"}
_MLP_KEYS = {"intermediate_size", "n_inner"}
_LAYER_KEYS = {"n_layer"}


def _count(family: Baseline, vocab, width, mlp_width, layers, opts) -> int:
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
            given (``hidden_size``, and for llama / gpt2 the MLP width) without matching.
        overrides (the earlier names width, num_layers, tie_embeddings are taken too):
            hidden_size: fix the model width instead of searching it;
            num_hidden_layers: depth (default: the family's; 4, mamba 8, lstm and gru 2);
            dropout: 0.0 by default (see the module docstring for where it goes);
            max_length: the longest sequence (GPT-2's position table, Llama's RoPE range; 1024);
            tie_word_embeddings: tie the output head to the embedding (default True);
            tolerance: allowed |params / target - 1| (default 0.10);
            mamba_scan: "auto", "mambapy" or "sequential" (mamba only);
            any other key: a field of the model's config (e.g. expansion_factor, use_conv for
            mingru; num_attention_heads or intermediate_size for llama; n_head or n_inner for
            gpt2; state_size for mamba).
    Returns:
        an nn.Module with ``forward(input_ids (B, T)) -> logits (B, T, vocab_size)`` and a
        ``baseline`` attribute (BaselineInfo).
    Raises:
        ValueError when the budget cannot be met within the tolerance (e.g. the embedding
        alone is larger than the budget), KeyError for an unknown name.
    """
    family = get_baseline(name)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if target_params is not None and (isinstance(target_params, bool) or not isinstance(target_params, int)
                                      or target_params < 1):
        raise ValueError(f"target_params must be a positive integer or None, got {target_params!r}")
    overrides = canonical_options(overrides, "overrides")
    extra = {k: v for k, v in overrides.items() if k not in GENERIC_KEYS}
    width = overrides.get("hidden_size")
    for key in _WIDTH_KEYS & extra.keys():
        width = extra.pop(key)  # the config's own name for the width, accepted as hidden_size
    layers = overrides.get("num_hidden_layers", family.num_hidden_layers)
    for key in _LAYER_KEYS & extra.keys():
        layers = extra.pop(key)  # the config's own name for the depth, accepted as num_hidden_layers
    mlp_width = None
    for key in _MLP_KEYS & extra.keys():
        if family.default_mlp is None:
            raise TypeError(f"{name} has no {key}")
        mlp_width = extra.pop(key)
    opts = {
        "dropout": float(overrides.get("dropout", 0.0)),
        "max_length": int(overrides.get("max_length", 1024)),
        "tie_word_embeddings": bool(overrides.get("tie_word_embeddings", True)),
        "extra": extra,
    }
    layers = int(layers)
    tolerance = float(overrides.get("tolerance", TOLERANCE))
    quantum = family.step(opts)
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
                         f"more than {tolerance:.0%} away from the target {target_params:,}; change "
                         "num_hidden_layers or the target (the embedding alone is vocab_size x width)")
    model.baseline = BaselineInfo(name, width, layers, params, target_params, mlp_width)
    return model
