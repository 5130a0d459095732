"""The training configuration: a dataclass, read from TOML (or YAML), overridden by ``--key value``.

Every field has a type and a default; a config file sets some of them, the command line
overrides any of them (``--lr 3e-4``, ``--model.hidden_size 128``), and the resolved config is
saved with the run (``config.toml``). A key that is not a field is an error that names the
nearest valid keys, so a typo never trains silently with the default.

Model fields live in the ``[model]`` table and are those of `minrnn.models.MinRNNConfig`
(``vocab_size`` excepted: the tokenizer sets it).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A user error in a config file or an override: the message is meant for the user as is."""


TOKENIZERS = ("char", "byte", "bpe")
DTYPES = ("float32", "bfloat16")
PROGRESS = ("auto", "always", "never")
# What only the optimiser and its schedule read: the settings a compare preset may give one
# model, and `minrnn compare --optim` may change (batch and context also decide the data).
OPTIM_KEYS = ("lr", "min_lr", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "decay_recurrence",
              "fused_optimizer")
PRESET_DIR = Path(__file__).with_name("presets")
# MinRNNConfig fields a config does not set: the tokenizer decides the vocabulary, and the
# cache and special tokens are a matter of generation, not of the trained model.
_NOT_MODEL_KEYS = {"vocab_size", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id"}


@functools.cache
def model_keys() -> dict[str, type]:
    """{key: type} of the ``[model]`` table: MinRNNConfig's own fields, and the earlier names it
    still maps (``OLD_KEYS``), so that configs written before the rename load (imports transformers)."""
    from ..models import MinRNNConfig
    from ..models.configuration_minrnn import OLD_KEYS

    out = {}
    for name, annotation in MinRNNConfig.__annotations__.items():
        if name in _NOT_MODEL_KEYS or typing.get_origin(annotation) is typing.ClassVar:
            continue
        # "X | None": the key takes an X (leaving it out keeps None); lists from TOML arrays
        args = set(typing.get_args(annotation)) - {type(None)}
        if any(typing.get_origin(a) is list for a in args):
            out[name] = list
        else:
            out[name] = float if float in args else args.pop() if len(args) == 1 else annotation
    for name, (_field, _option, _cells, kind) in OLD_KEYS.items():
        out[name] = bool if kind == "bool" else float
    return out


def check_model_config(model: dict) -> None:
    """Build a MinRNNConfig from ``model`` (a [model] table): a ConfigError naming the key
    when the model config refuses a value."""
    from huggingface_hub.errors import StrictDataclassError

    from ..models import MinRNNConfig

    try:
        MinRNNConfig(**model)
    except (StrictDataclassError, ValueError, TypeError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ConfigError(f"[model]: {lines[-1] if lines else e}") from None


@dataclass
class TrainConfig:
    """All settings of a training run (the presets are minrnn/training/presets/*.toml).

    Data: ``data`` is a named corpus (tinyshakespeare, wikitext-2, wikitext-103), a text file
    (split 90/10 into train/valid like nanoGPT), a folder holding train/valid[/test] files, or a
    prepared folder (``minrnn prepare``'s output, a manifest.json in it): its token shards read
    through memory maps, with the folder's own tokenizer and vocabulary (``tokenizer`` and
    ``bpe_vocab_size`` are then not used). ``pack_documents`` (prepared folders only): each
    window starts at a document start and the model gets position_ids restarting at 0 at
    each document start, so that its state resets there.
    A batch is ``batch_size`` windows of ``seq_len`` + 1 tokens; one optimiser step sees
    ``batch_size * grad_accum`` windows in all (over every process under torchrun).
    ``stateful``: instead of windows at random offsets, row r of every batch reads the r-th of
    ``batch_size`` equal, contiguous parts of the train split, one window after the other, and
    the model starts each window from the state its previous window ended in (detached:
    truncated backpropagation through time); the state is saved with each checkpoint.
    ``compile``: the model runs under ``torch.compile`` (``nn.Module.compile``, in place: its
    weights keep their names in checkpoints).
    """

    # data
    data: str = "tinyshakespeare"
    data_dir: str = ""  # where named corpora are looked for first ("" : MINRNN_DATA_DIR, ~/.cache/minrnn/data)
    tokenizer: str = "char"  # not used with a prepared folder: its own tokenizer is
    bpe_vocab_size: int = 8192
    pack_documents: bool = False  # prepared folders: windows start at documents, the state resets at each
    # each batch row reads a contiguous stream and the model's final state is carried into the
    # next step (truncated backpropagation through time); minRNN models of recurrent blocks
    stateful: bool = False
    # optimisation
    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    decay_recurrence: bool = True  # false: no weight decay on a minRNN's gate and candidate projection
    # AdamW's fused kernel: one call for every tensor instead of a few per tensor (faster where a
    # model has many small ones); false: the per-tensor loop (the same rule, rounded differently)
    fused_optimizer: bool = True
    dtype: str = "float32"  # "bfloat16": autocast where the device supports it
    seed: int = 1337
    device: str = "cpu"
    threads: int = 0  # torch.set_num_threads; 0 leaves torch's default
    compile: bool = False  # torch.compile the model for the training step
    # evaluation, logging, checkpoints
    eval_every: int = 100
    eval_windows: int = 64  # validation windows of seq_len + 1 tokens, evenly spaced over the split
    log_every: int = 10
    checkpoint_every: int = 100
    budget_s: float = 0.0  # stop after this many seconds of training (evaluations excluded); 0: no limit
    keep_last: int = 2
    out_dir: str = "runs/default"
    progress: str = "auto"  # progress bar: auto (when stderr is a terminal), always, never
    plot: bool = True
    sample_tokens: int = 200  # sample printed at the end of training (0: none)
    model: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    # --- checks -------------------------------------------------------------------------

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_windows",
                     "log_every", "checkpoint_every", "keep_last", "bpe_vocab_size"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 1, f"{name} must be a positive integer, got {v!r}")
        for name in ("warmup_steps", "threads", "sample_tokens"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 0, f"{name} must be an integer >= 0, got {v!r}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "budget_s"):
            v = getattr(self, name)
            need(math.isfinite(v) and v >= 0, f"{name} must be a finite number >= 0, got {v!r}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            need(0 <= v < 1, f"{name} must be in [0, 1), got {v!r}")
        need(self.tokenizer in TOKENIZERS, f"tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}")
        need(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        need(self.progress in PROGRESS, f"progress must be one of {PROGRESS}, got {self.progress!r}")
        need(bool(self.data), "data must name a corpus, a text file, a folder or a prepared folder")
        need(not (self.stateful and self.pack_documents),
             "stateful and pack_documents exclude each other: a stateful row reads its stream without moving "
             "to document starts")
        keys = model_keys() if self.model else {}
        for key, value in self.model.items():
            if key not in keys:
                raise ConfigError(_unknown("model." + key, ["model." + k for k in keys]))
            self.model[key] = _coerce("model." + key, value, keys[key])

    # --- conversions ----------------------------------------------------------------------

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The resolved config as TOML (what `from_file` reads back)."""
        lines, model = [], []
        for k, v in self.to_dict().items():
            if k != "model":
                lines.append(f"{k} = {_toml_value(v)}")
        for k, v in sorted(self.model.items()):
            model.append(f"{k} = {_toml_value(v)}")
        return "\n".join(lines) + "\n\n[model]\n" + "\n".join(model) + "\n"

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> TrainConfig:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"{source}: " + _unknown(key, list(fields) + ["model." + k for k in model_keys()]))
            if key == "model":
                if not isinstance(value, dict):
                    raise ConfigError(f"{source}: model must be a table of model settings, got {value!r}")
                kwargs[key] = dict(value)
            else:
                kwargs[key] = _coerce(key, value, _field_type(fields[key]))
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict | None = None) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        if path.suffix in (".yaml", ".yml"):
            values = _load_yaml(path)
        else:
            try:
                values = tomllib.loads(path.read_text())
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path} is not valid TOML: {e}") from None
        known = {f.name for f in dataclasses.fields(cls)} | {"model." + k for k in model_keys()}
        for key in overrides or {}:  # a typo on the command line is the command line's, not the file's
            if key not in known and key != "model":
                raise ConfigError("command line: " + _unknown(key, sorted(known)))
        return cls.from_dict(merge(values, overrides or {}), source=str(path))


def field_types() -> dict[str, type]:
    """{key: type} of TrainConfig's fields ([model] excepted)."""
    return {f.name: _field_type(f) for f in dataclasses.fields(TrainConfig) if f.name != "model"}


def list_presets() -> list[str]:
    """The names of the training presets shipped with minrnn (``minrnn train NAME``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def find_config(text: str | Path) -> Path:
    """A config file as given, a run folder's config.toml (``minrnn train RUN --resume``), else a
    shipped preset of that name; a ConfigError naming the presets when none exists."""
    path = Path(text)
    if path.is_file():
        return path
    if path.is_dir() and (path / "config.toml").is_file():
        return path / "config.toml"
    if path.suffix or len(path.parts) > 1:
        raise ConfigError(f"config file {path} not found")
    preset = PRESET_DIR / f"{text}.toml"
    if preset.is_file():
        return preset
    close = difflib.get_close_matches(str(text), list_presets(), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ConfigError(f"config {text!s} is neither a file nor a preset (presets: {', '.join(list_presets())}){hint}")


def merge(values: dict, overrides: dict) -> dict:
    """``values`` with ``overrides`` applied; dotted keys ("model.hidden_size") go into tables."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for key, value in overrides.items():
        if "." in key:
            table, sub = key.split(".", 1)
            if table != "model":
                raise ConfigError(_unknown(key, [f.name for f in dataclasses.fields(TrainConfig)]
                                           + ["model." + k for k in model_keys()]))
            out.setdefault("model", {})[sub] = value
        else:
            out[key] = value
    return out


_BOOL_WORDS = ("true", "false", "1", "0", "yes", "no")


def parse_overrides(tokens: list[str], flags: tuple[str, ...] = (), switches: tuple[str, ...] = ()
                    ) -> tuple[dict, set]:
    """``["--lr", "1e-3", "--model.hidden_size=64", "--resume"]`` -> ({"lr": "1e-3", ...}, {"resume"}).

    Values stay strings (converted against the field's type later); names in ``flags`` take no
    value; names in ``switches`` (boolean keys) may stand alone for true (``--pack-documents``)
    or take one (``--pack-documents false``). Dashes in a key are read as underscores
    (``--out-dir`` is ``out_dir``).
    """
    values, seen_flags = {}, set()
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise ConfigError(f"expected --key value, got {tok!r}")
        key, eq, value = tok[2:].partition("=")
        key = key.replace("-", "_")
        if key in flags:
            if eq:
                raise ConfigError(f"--{key} takes no value")
            seen_flags.add(key)
            i += 1
            continue
        if key in switches and not eq and (i + 1 >= len(tokens) or tokens[i + 1].lower() not in _BOOL_WORDS):
            values[key] = "true"
            i += 1
            continue
        if not eq:
            if i + 1 >= len(tokens):
                raise ConfigError(f"--{key} needs a value")
            value = tokens[i + 1]
            i += 1
        values[key] = value
        i += 1
    return values, seen_flags


# --- helpers -----------------------------------------------------------------------------


def _load_yaml(path: Path) -> dict:
    try:
        import yaml
    except ImportError:
        raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or write the config "
                          "in TOML") from None
    try:
        values = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    return values


def _unknown(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return f"unknown config key {key!r}{hint}"


def _field_type(f: dataclasses.Field) -> type:
    return {"str": str, "int": int, "float": float, "bool": bool, "dict": dict}[str(f.type)]


def _coerce(key: str, value: Any, typ: type) -> Any:
    """``value`` (from TOML, or a string from the command line) as ``typ``, or a ConfigError."""
    if isinstance(value, str) and typ is not str:
        text = value.strip()
        try:
            if typ is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return text.lower() in ("true", "1", "yes")
            if typ is int:
                return int(text)
            if typ is float:
                return float(text)
            if typ in (list, dict):
                # from the command line: a JSON array such as [2, 5], an object such as {"normalize": false}
                parsed = json.loads(text)
                if not isinstance(parsed, typ):
                    raise ValueError
                return parsed
        except ValueError:
            raise ConfigError(f"{key} expects {typ.__name__}, got {value!r}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{key} expects {typ.__name__}, got {value!r}")
    return value


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, dict):  # an inline table, keys quoted
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)  # a JSON string is a valid TOML basic string


# --- one run, one config ----------------------------------------------------------------------

# Settings a resumed run may change: they decide how long it runs and what it reports, not
# what it computes up to the step it resumes from.
RESUMABLE_KEYS = frozenset({"steps", "eval_every", "checkpoint_every", "keep_last", "log_every", "progress",
                            "plot", "sample_tokens", "budget_s", "threads", "out_dir", "data_dir", "device"})


def flat_config(values: dict) -> dict:
    """A config dict with its [model] table as ``model.KEY`` entries."""
    out = {k: v for k, v in values.items() if k != "model"}
    out.update({f"model.{k}": v for k, v in values.get("model", {}).items()})
    return out


def check_resume_settings(saved: TrainConfig, config: TrainConfig) -> None:
    """A ConfigError naming the settings outside RESUMABLE_KEYS where ``config`` differs from
    the run's ``saved`` one: a resumed run keeps its settings."""
    old, new = flat_config(saved.to_dict()), flat_config(config.to_dict())
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_KEYS)
    if changed:
        raise ConfigError(f"--resume: {', '.join(changed)} differ from the run's config.toml; a resumed "
                          f"run keeps its settings (only {', '.join(sorted(RESUMABLE_KEYS))} may change)")


def check_same_config(config: TrainConfig, dist) -> None:
    """Every process of a torchrun job (``dist``: a training.distributed.Dist) must train the
    same run: a ConfigError on every rank naming the keys where its config differs from rank 0's."""
    if not dist.enabled:
        return
    configs = dist.gather(flat_config(config.to_dict()))  # every rank sees every config, so every rank stops
    main = configs[0]
    differ = sorted({k for other in configs[1:] for k in set(main) | set(other) if main.get(k) != other.get(k)})
    if differ:
        raise ConfigError(f"the processes' configs differ from rank 0's in: {', '.join(differ)} "
                          f"(this is rank {dist.rank})")
