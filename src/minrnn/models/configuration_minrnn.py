"""MinRNNConfig: the hyper-parameters of the minGRU / minLSTM language model.

A transformers 5 configuration: a strict dataclass, so every field is type-checked and
range-checked when the config is built, loaded (from_pretrained) or assigned to, and a
bad value fails there with a one-line ValueError naming the field, not later inside the model.
"""

# No `from __future__ import annotations`: the strict dataclass checks the annotations at
# run time, so they must stay real types.

import functools
import math

from huggingface_hub.dataclasses import strict, validated_field
from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

from ..ops import BACKENDS, check_backend_takes_cell
from ..ops.cells import CELLS, CellSpec, get_cell
from ..ops.expanded import check_expandable

# Keys of earlier versions, each the name one cell family gave a field of today's: key ->
# (today's field, the option inside cell_options or None, the cells it applied to, its check).
# Accepted when a config is built or loaded; the key for the config's cell is mapped, the others dropped.
OLD_KEYS = {
    "forget_bias": ("decay_bias", None, ("minlstm", "minlstm_signed"), "finite"),
    "mingru_forget_bias": ("decay_bias", None, ("mingru", "mingru_signed"), "finite"),
    "minlstm_normalize": ("cell_options", "normalize", ("minlstm", "minlstm_signed"), "bool"),
}


# --- field validators: each raises with the field's name in the message ---------------


def _positive_int(name):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return check


def _positive_number(name):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return check


def _finite(name):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    return check


def _in_unit_interval(name):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return check


def _non_negative(name):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return check


def _optional_finite(name):
    def check(value):
        if value is not None:
            _finite(name)(value)
    return check


def _cell(value):
    # the registry as it is now: a cell registered after import is accepted
    if not isinstance(value, str) or value not in CELLS:
        raise ValueError(f"cell must be one of {sorted(CELLS)} (minrnn.ops.cells.CELLS), got {value!r}")


def _cell_options(value):
    if value is not None and (not isinstance(value, dict) or not all(isinstance(k, str) for k in value)):
        raise ValueError(f"cell_options must be None or a mapping of option names to values, got {value!r}")


def _conv_kernel(value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"conv_kernel must be an integer >= 1 (the causal conv's width in tokens), got {value!r}")


def _activation(value):
    if value not in ACT2FN:
        raise ValueError(f"hidden_act must be one of {sorted(ACT2FN)}, got {value!r}")


# --- attention (hybrid) fields -------------------------------------------------------------


def _optional_positive_int(name, what):
    def check(value):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or a positive integer ({what}), got {value!r}")
    return check


def _attention_layers(value):
    if value is None:
        return
    if (not isinstance(value, list) or len(set(value)) != len(value)
            or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in value)):
        raise ValueError(f"attention_layers must be None or a list of distinct layer indices >= 0, got {value!r}")


def _scan_backend(value):
    if value != "auto" and value not in BACKENDS:
        raise ValueError(f"scan_backend must be 'auto' or one of {sorted(BACKENDS)}, got {value!r}")


@strict
class MinRNNConfig(PreTrainedConfig):
    r"""Configuration of `MinRNNModel`, `MinRNNForCausalLM` and `MinRNNForSequenceClassification`.

    The block (one per layer), as in the paper's official code:

        x = x + Conv(x)                  optional causal depthwise conv over the last conv_kernel tokens
        x = x + Out(minRNN(In(Norm(x)))) minGRU or minLSTM of width hidden_size * expansion_factor
        x = x + MLP(Norm(x))             optional, width hidden_size * mlp_mult
    then a final Norm (RMSNorm everywhere) and the head.

    Args:
        vocab_size: number of tokens (default 256: bytes).
        hidden_size: the model width D (default 384).
        num_hidden_layers: number of blocks (default 6).
        cell: a cell registered in ``minrnn.ops.cells.CELLS``: "mingru" (default), "minlstm", or
            their variants with transitions in (-1, 1) "mingru_signed" / "minlstm_signed" (state
            tracking, e.g. parity; not with scan_backend "log"), or one registered later with
            ``minrnn.ops.cells.register_cell``.
        expansion_factor: the recurrent width is round(hidden_size * expansion_factor) (default 2.0).
        decay_bias: a "remember more" bias put at init on the bias of the pre-activation that sets
            the cell's decay (its ``CellSpec.decay_slot``, with its ``decay_bias_sign``): minLSTM's
            forget gate gets +decay_bias, minGRU's gate -decay_bias (a = 1 - z), so the decay of
            a zero input starts near sigmoid(decay_bias). Default None: the cell's own
            (``CellSpec.default_decay_bias``: minGRU 0.0, the paper's, a ~ 1/2; minLSTM 3.0, the
            official code's; the signed cells as their bases).
        cell_options: the cell's options by name (its ``CellSpec.option_names``), e.g. minLSTM's
            {"normalize": False} for f, i instead of f/(f+i), i/(f+i); default None: the cell's
            defaults (minLSTM normalize=True, the paper's equations).
        state_expansion: n, the key slots per head of the recurrent state (default 1: the paper's
            minGRU / minLSTM, one number per channel). n > 1 is the expanded cell of HGRN2 (Qin et
            al. 2024): heads of state_head_dim channels, each with an n x state_head_dim state
            H_t = diag(a_t) H_{t-1} + k_t v_t^T read by a query, o_t = H_t^T q_t; the cell's
            decay a (n per head), its input gate the key k, its candidate g(hidden) the value v,
            and a query projection q added to the input projection. The recurrent width is then
            rounded to a whole number of heads, and the recurrence runs ``minrnn.ops.expanded``
            (its "states" method on scan_backend). The signed cells give decays in (-1, 1) to
            every slot (the "states" method and the step; the chunked form takes log decays).
            See the design page.
        state_head_dim: the value channels per head when state_expansion > 1 (default None:
            state_expansion, as HGRN2, so the key gates are as wide as the recurrent width).
        state_output_gate: with state_expansion > 1, multiply the read o_t by silu(W_g x_t) (a
            D -> E projection of the mixer's input) before the output projection, as HGRN2, GLA
            and Mamba gate their outputs (default False: not in the paper's cells).
        Older names, still accepted when a config is built or loaded (config.json) and mapped:
            forget_bias (minLSTM's decay_bias), mingru_forget_bias (minGRU's decay_bias),
            minlstm_normalize (minLSTM's cell_options["normalize"]); the one for the config's
            cell is kept, those for the other cell are dropped.
        use_conv: put a causal depthwise conv (with a residual) before the recurrence (default True).
        conv_kernel: the conv's width in tokens, >= 1 (default 4); it sees tokens t-k+1 .. t.
        use_mlp: add the MLP sub-block (default True).
        mlp_mult: the MLP's hidden width is round(hidden_size * mlp_mult) (default 4).
        hidden_act: the MLP's activation, a key of transformers' ACT2FN (default "gelu").
        use_bias: biases in the output projection and the MLP (default False). The recurrence's
            input projection always has one: the gates need it.
        rms_norm_eps: epsilon of every RMSNorm (default 1e-6).
        dropout: dropout on the embeddings and on every residual branch (default 0.0).
        initializer_range: std of the normal init (default 0.02); see `MinRNNPreTrainedModel`.
        scan_backend: the minrnn scan backend for the parallel pass (default "auto").
        tie_word_embeddings: share the embedding matrix with the LM head (default True).
        use_cache: return the recurrent cache from forward (default True).
        pad_token_id, bos_token_id, eos_token_id: special tokens (default None).

    Attention layers (a hybrid; none by default): in the blocks they name, a causal multi-head
    attention (``minrnn.models.attention_minrnn``) takes the place of the minRNN mixer; the
    conv, the MLP and the norms stay as they are.

        attention_layers: the 0-based indices of those blocks (default None: none), or
        attention_every: every k-th block (1-based: blocks k-1, 2k-1, ...; default None).
            At most one of the two may be set.
        num_attention_heads: query heads (default 4).
        attention_head_dim: the size of a head, even (RoPE turns pairs); default None:
            hidden_size / num_attention_heads, which must then be an even integer.
        num_key_value_heads: key/value heads (grouped-query attention), dividing
            num_attention_heads (default None: as many as the query heads).
        attention_window: each token sees itself and the attention_window - 1 tokens before
            it (default None: every token before it); the cache keeps that many keys/values.
        rope_theta: the base of the rotary position embedding (default 10000.0).
    """

    model_type = "minrnn"

    vocab_size: int = validated_field(_positive_int("vocab_size"), default=256)
    hidden_size: int = validated_field(_positive_int("hidden_size"), default=384)
    num_hidden_layers: int = validated_field(_positive_int("num_hidden_layers"), default=6)
    cell: str = validated_field(_cell, default="mingru")
    expansion_factor: int | float = validated_field(_positive_number("expansion_factor"), default=2.0)
    decay_bias: int | float | None = validated_field(_optional_finite("decay_bias"), default=None)
    cell_options: dict | None = validated_field(_cell_options, default=None)
    state_expansion: int = validated_field(_positive_int("state_expansion"), default=1)
    state_head_dim: int | None = validated_field(
        _optional_positive_int("state_head_dim", "None: state_expansion"), default=None)
    state_output_gate: bool = False
    use_conv: bool = True
    conv_kernel: int = validated_field(_conv_kernel, default=4)
    use_mlp: bool = True
    mlp_mult: int | float = validated_field(_positive_number("mlp_mult"), default=4)
    hidden_act: str = validated_field(_activation, default="gelu")
    use_bias: bool = False
    rms_norm_eps: int | float = validated_field(_positive_number("rms_norm_eps"), default=1e-6)
    dropout: int | float = validated_field(_in_unit_interval("dropout"), default=0.0)
    initializer_range: int | float = validated_field(_non_negative("initializer_range"), default=0.02)
    scan_backend: str = validated_field(_scan_backend, default="auto")
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # attention (hybrid) fields: the defaults give no attention layer
    attention_layers: list[int] | None = validated_field(_attention_layers, default=None)
    attention_every: int | None = validated_field(
        _optional_positive_int("attention_every", "every k-th block is attention"), default=None)
    num_attention_heads: int = validated_field(_positive_int("num_attention_heads"), default=4)
    attention_head_dim: int | None = validated_field(
        _optional_positive_int("attention_head_dim", "None: hidden_size / num_attention_heads"), default=None)
    num_key_value_heads: int | None = validated_field(
        _optional_positive_int("num_key_value_heads", "None: as many as num_attention_heads"), default=None)
    attention_window: int | None = validated_field(
        _optional_positive_int("attention_window", "None: full causal attention"), default=None)
    rope_theta: int | float = validated_field(_positive_number("rope_theta"), default=10000.0)

    def __post_init__(self, **kwargs):
        _map_old_keys(self, kwargs)
        super().__post_init__(**kwargs)

    @property
    def cell_spec(self) -> CellSpec:
        """The registered ``CellSpec`` of ``cell``."""
        return get_cell(self.cell)

    @property
    def resolved_decay_bias(self) -> float:
        """decay_bias, or the cell's default when it is None."""
        return float(self.cell_spec.default_decay_bias if self.decay_bias is None else self.decay_bias)

    @property
    def resolved_cell_options(self) -> dict:
        """Every option of the cell by name: cell_options where given, else the cell's default."""
        spec = self.cell_spec
        return dict(zip(spec.option_names, spec.options(**(self.cell_options or {}))))

    @property
    def rnn_hidden_size(self) -> int:
        """The recurrent width: round(hidden_size * expansion_factor); with state_expansion > 1,
        rounded to the nearest multiple of the head width (at least one head)."""
        width = int(round(self.hidden_size * self.expansion_factor))
        if self.state_expansion == 1:
            return width
        d = self.resolved_state_head_dim
        return max(d, int(round(width / d)) * d)

    @property
    def resolved_state_head_dim(self) -> int:
        """state_head_dim, or state_expansion when it is None."""
        return self.state_expansion if self.state_head_dim is None else self.state_head_dim

    @property
    def mlp_hidden_size(self) -> int:
        """The MLP's hidden width: round(hidden_size * mlp_mult)."""
        return int(round(self.hidden_size * self.mlp_mult))

    def validate_widths(self):
        """Part of the strict validation: the derived widths must be at least 1."""
        if self.rnn_hidden_size < 1:
            raise ValueError(
                f"expansion_factor={self.expansion_factor} with hidden_size={self.hidden_size} gives a "
                f"recurrent width of {self.rnn_hidden_size}; it must be >= 1"
            )
        if self.use_mlp and self.mlp_hidden_size < 1:
            raise ValueError(
                f"mlp_mult={self.mlp_mult} with hidden_size={self.hidden_size} gives an MLP width of "
                f"{self.mlp_hidden_size}; it must be >= 1"
            )


    @property
    def attention_layer_indices(self) -> tuple[int, ...]:
        """The blocks whose mixer is attention, in order (empty: a pure minRNN model)."""
        if self.attention_layers is not None:
            return tuple(sorted(self.attention_layers))
        if self.attention_every is not None:
            k = self.attention_every
            return tuple(range(k - 1, self.num_hidden_layers, k))
        return ()

    @property
    def kv_heads(self) -> int:
        """The key/value heads: num_key_value_heads, or num_attention_heads when None."""
        return self.num_key_value_heads if self.num_key_value_heads is not None else self.num_attention_heads

    @property
    def head_dim(self) -> int:
        """The size of an attention head: attention_head_dim, or hidden_size / num_attention_heads."""
        if self.attention_head_dim is not None:
            return self.attention_head_dim
        return self.hidden_size // self.num_attention_heads

    def validate_cell_options(self):
        """Part of the strict validation: cell_options names options of the cell, each of its
        default's kind (True/False for a flag)."""
        spec = self.cell_spec
        for key, value in (self.cell_options or {}).items():
            if key not in spec.option_names:
                raise ValueError(f"cell_options: cell {self.cell!r} has no option {key!r} "
                                 f"(its options: {', '.join(spec.option_names) or 'none'})")
            default = spec.option_defaults[spec.option_names.index(key)]
            if isinstance(default, bool) and not isinstance(value, bool):
                raise ValueError(f"cell_options: option {key!r} of cell {self.cell!r} must be True or False, "
                                 f"got {value!r}")

    def validate_state_expansion(self):
        """Part of the strict validation: an expanded state needs a cell with a log form or a signed one."""
        if self.state_expansion > 1:
            check_expandable(self.cell_spec)
        elif self.state_output_gate:
            raise ValueError("state_output_gate needs state_expansion > 1 (it gates the expanded state's read)")

    def validate_backend(self):
        """Part of the strict validation: the scan backend can run the cell (the log-space scan
        holds positive transitions only, so it cannot run the signed cells)."""
        if self.scan_backend == "auto":
            return
        check_backend_takes_cell(self.cell_spec, BACKENDS[self.scan_backend])

    def validate_attention(self):
        """Part of the strict validation: the attention fields agree with each other and the widths."""
        if self.attention_layers is not None and self.attention_every is not None:
            raise ValueError("set at most one of attention_layers and attention_every, "
                             f"got {self.attention_layers!r} and {self.attention_every!r}")
        bad = [i for i in self.attention_layers or () if i >= self.num_hidden_layers]
        if bad:
            raise ValueError(f"attention_layers must be indices in [0, {self.num_hidden_layers}) "
                             f"(num_hidden_layers={self.num_hidden_layers}), got {bad}")
        if not self.attention_layer_indices:
            return
        if self.attention_head_dim is not None and self.attention_head_dim % 2:
            raise ValueError(f"attention_head_dim must be even (RoPE turns pairs), got {self.attention_head_dim}")
        if self.attention_head_dim is None and (self.hidden_size % self.num_attention_heads or self.head_dim % 2):
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must divide hidden_size="
                             f"{self.hidden_size} into an even head size (RoPE turns pairs), or set attention_head_dim")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} must divide "
                             f"num_attention_heads={self.num_attention_heads}")


def _map_old_keys(config: MinRNNConfig, kwargs: dict) -> None:
    """Pop the old keys out of ``kwargs`` (a config's keywords beyond its fields): each is
    checked, the one for the config's cell goes to its field, the others are dropped."""
    for key, (field, option, cells, kind) in OLD_KEYS.items():
        if key not in kwargs:
            continue
        value = kwargs.pop(key)
        if kind == "bool" and not isinstance(value, bool):
            raise ValueError(f"MinRNNConfig: {key} must be True or False, got {value!r}")
        if kind == "finite" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                 or not math.isfinite(value)):
            raise ValueError(f"MinRNNConfig: {key} must be a finite number, got {value!r}")
        if config.cell not in cells:
            continue
        if option is None:
            if config.decay_bias is not None:
                raise ValueError(f"MinRNNConfig: {key} is the old name of {field}: pass one of them, not both")
            config.decay_bias = value
        else:
            options = dict(config.cell_options or {})
            if option in options:
                raise ValueError(f"MinRNNConfig: {key} is the old name of {field}[{option!r}]: pass one of them, not both")
            options[option] = value
            config.cell_options = options


def _one_line_value_errors(method):
    """Re-raise the strict dataclass's two-line wrapper error as the one-line ValueError of the
    validator (or type check) inside it, which already names the field and what it expects."""

    @functools.wraps(method)
    def checked(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except StrictDataclassError as err:
            cause = err.__cause__ if err.__cause__ is not None else err
            message = " ".join(str(cause).split())
            raise ValueError(f"MinRNNConfig: {message}") from None

    return checked


def _no_old_key_assignment(setattr_):
    """Assigning an old key would set an attribute the model never reads: refuse it by name."""

    @functools.wraps(setattr_)
    def checked(self, name, value):
        if name in OLD_KEYS:
            field, option = OLD_KEYS[name][:2]
            raise ValueError(f"MinRNNConfig: {name} is an old name of "
                             f"{field if option is None else f'{field}[{option!r}]'}; assign that instead")
        setattr_(self, name, value)

    return checked


# After @strict: building (also from_pretrained / from_dict), assigning and validating.
for _name in ("__init__", "__setattr__", "validate"):
    setattr(MinRNNConfig, _name, _one_line_value_errors(getattr(MinRNNConfig, _name)))
del _name
MinRNNConfig.__setattr__ = _no_old_key_assignment(MinRNNConfig.__setattr__)


__all__ = ["MinRNNConfig", "OLD_KEYS"]
