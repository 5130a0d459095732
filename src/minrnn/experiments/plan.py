"""What `minrnn compare` asks for (`CompareConfig`) and the runs it makes of it (`RunSpec`).

    runs = plan_runs(CompareConfig("shakespeare_char", models=["mingru", "llama"], steps=200))

A run is one model of a preset, for one Chomsky task, at one sweep value; its spec is written to
its folder, so that a finished run is kept and a changed request is never mixed into it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

from ..data.shards import is_prepared
from ..training.config import DTYPES, OPTIM_KEYS, TOKENIZERS, field_types
from . import experiment_names
from .baselines import BASELINES, canonical_options, get_baseline
from .presets import Preset, load_preset, tomllib

# What --optim may change: the optimiser's settings (the peak learning rate has its own --lr).
COMPARE_OPTIM_KEYS = tuple(k for k in OPTIM_KEYS if k != "lr")


class CompareError(ValueError):
    """A compare request that cannot run as asked; the message says what to change."""


@dataclass
class CompareConfig:
    """A `minrnn compare` request: an experiment's preset and what to change of it.

    ``models``/``tasks``: subsets of the preset's (None: all). ``data``/``tokenizer``: the corpus
    of an experiment whose preset names none (``text``); ``data`` may also be a prepared folder
    (``minrnn prepare``) for any text preset: its train split trains and its valid split
    evaluates, read memory-mapped with its own tokenizer. ``pack_documents``: windows of whole documents, the state reset at each (a prepared
    folder, and models that reset: see baselines.Baseline.packs_documents). ``sweep``: run the preset's sweep (e.g. depths 1, 2, 3).
    ``budget_s``: stop each run after this much training time. ``lr``: the peak learning rate of
    every run (min_lr scaled alike). ``options``: {model: {key: value}} build options on top of
    the preset's (``--set``). ``optim``: optimiser settings on top of the preset's (``--optim``).
    ``isolate``: each run in its own process (its own peak memory; a crash loses one run);
    without it every run trains in this process, so the models, corpora and cells this process
    registered are known to them. ``threads``: CPU threads per run (needs ``isolate``).
    ``keep_weights``: each run also writes its final weights to ``weights.pt``. ``stateful``: text
    runs read contiguous streams and carry the model's state from step to step (models whose
    state is of fixed size: see baselines.Baseline.carries_state). ``compile``: each model runs
    under torch.compile."""

    experiment: str
    preset: str = "cpu"
    models: list[str] | None = None
    tasks: list[str] | None = None
    data: str | None = None
    tokenizer: str | None = None
    steps: int | None = None
    eval_every: int | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    data_dir: str | None = None
    sweep: bool = True
    budget_s: float | None = None
    lr: float | None = None
    options: dict[str, dict] = field(default_factory=dict)
    optim: dict = field(default_factory=dict)
    out: str = "runs/compare"
    isolate: bool = True
    threads: int | None = None
    progress: bool = True
    keep_weights: bool = False
    pack_documents: bool = False
    stateful: bool = False
    compile: bool = False


@dataclass(frozen=True)
class RunSpec:
    """One training run: a model of a preset (for one Chomsky task, at one sweep value)."""

    experiment: str
    preset: str
    model: str
    steps: int
    task: str | None = None                     # Chomsky: the task of this run
    sweep: dict = field(default_factory=dict)   # e.g. {"num_layers": 2}
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    data_dir: str | None = None
    eval_every: int | None = None
    budget_s: float | None = None               # stop a run after this much training wall time
    preset_digest: str = ""                     # the preset's content: an edited preset is a new run
    lr: float | None = None                     # the peak learning rate instead of the preset's (min_lr alike)
    options: dict = field(default_factory=dict)  # model options on top of the preset's (--set)
    optim: dict = field(default_factory=dict)    # optimiser settings on top of the preset's (--optim)
    data: str | None = None                     # text experiment: the corpus (a file or a folder)
    tokenizer: str | None = None                # text experiment: the tokenizer instead of the preset's
    pack_documents: bool = False                # windows of whole documents (a prepared folder as data)
    stateful: bool = False                      # contiguous streams, the state carried between steps
    compile: bool = False                       # the model under torch.compile

    @property
    def name(self) -> str:
        parts = [self.model] + [f"{k}={v}" for k, v in sorted(self.sweep.items())]
        return (f"{self.task}." if self.task else "") + "-".join(parts)

    def to_json(self) -> dict:
        """The spec as written to spec.json: where the data directory is does not change the
        run; unset options (None, {}, False) are left out."""
        return {k: v for k, v in asdict(self).items()
                if k != "data_dir" and v is not None and v != {} and v is not False}


def digest_of(preset: Preset) -> str:
    """A short hash of everything a preset says (models, sizes, data, optimiser)."""
    text = json.dumps(asdict(preset), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan_runs(c: CompareConfig) -> list[RunSpec]:
    """The runs of ``c``, in order: Chomsky tasks x sweep values x models."""
    experiment = c.experiment.replace("-", "_")
    if experiment not in experiment_names():
        raise CompareError(f"unknown experiment {experiment!r}; known: {', '.join(experiment_names())}")
    try:
        preset = load_preset(experiment, c.preset)
    except KeyError as e:
        raise CompareError(f"--preset: {e.args[0]}") from None
    prepared = bool(c.data) and is_prepared(c.data)
    if preset.user_data:
        if not c.data:
            raise CompareError(f"--data: `compare {experiment}` needs a text file, a folder of train/valid files, "
                               "a named corpus or a prepared folder (minrnn prepare)")
    elif c.tokenizer or (c.data and not ("corpus" in preset.data and prepared)):
        raise CompareError(f"--data and --tokenizer are for `compare text`; {experiment} has its own data"
                           + (" (--data may name a prepared folder of it)" if "corpus" in preset.data else ""))
    if prepared and c.tokenizer:
        raise CompareError(f"--tokenizer: {c.data} is a prepared folder, whose own tokenizer the runs use")
    if c.tokenizer is not None and c.tokenizer not in TOKENIZERS:
        raise CompareError(f"--tokenizer must be one of {TOKENIZERS}, got {c.tokenizer!r}")
    models = list(c.models or preset.models)
    # beyond the preset's own models, any registered family: built with the preset's common
    # settings to its budget, trained with its train table
    unknown = [m for m in models if m not in preset.available_models and m not in BASELINES]
    if unknown:
        raise CompareError(f"--models: {unknown} not in the {experiment}/{c.preset} preset's "
                           f"{list(preset.available_models)} nor a registered baseline ({', '.join(BASELINES)})")
    steps = preset.train["steps"] if c.steps is None else c.steps
    if steps < 1:
        raise CompareError(f"--steps must be >= 1, got {steps}")
    if c.eval_every is not None and c.eval_every < 1:
        raise CompareError(f"--eval-every must be >= 1, got {c.eval_every}")
    if c.dtype not in DTYPES:
        raise CompareError(f"--dtype must be one of {DTYPES}, got {c.dtype!r}")
    run_tasks = [None]
    if "tasks" in preset.data:
        run_tasks = list(c.tasks or preset.tasks)
        bad = [t for t in run_tasks if t not in preset.tasks]
        if bad:
            raise CompareError(f"--tasks: {bad} not in the preset's tasks {list(preset.tasks)}")
    elif c.tasks:
        raise CompareError(f"--tasks is for the Chomsky experiment; {experiment} has one task")
    sweeps = [{}]
    if c.sweep and preset.sweep:
        (key, values), = preset.sweep.items()
        sweeps = [{key: v} for v in values]
    if c.budget_s is not None and not c.budget_s > 0:
        raise CompareError(f"--budget-s must be > 0, got {c.budget_s}")
    if c.lr is not None and not (math.isfinite(c.lr) and c.lr > 0):
        raise CompareError(f"--lr must be a positive number, got {c.lr}")
    if c.threads is not None and not c.isolate:
        raise CompareError("threads needs isolated runs (a thread count is fixed per process)")
    try:
        options = {m: canonical_options(o, f"--set {m}") for m, o in (c.options or {}).items()}
    except ValueError as e:
        raise CompareError(str(e)) from None
    stray = [m for m in options if m not in models]
    if stray:
        raise CompareError(f"--set names {stray}, which this comparison does not run (its models: {models})")
    for m, opts in options.items():
        unknown = sorted(set(opts) - get_baseline(m).option_keys())
        if unknown:
            raise CompareError(f"--set {m}.{unknown[0]}: {m} has no option {unknown[0]!r} (transformers configs "
                               "would keep a misspelt key silently, so only known ones are taken)")
    optim = check_optim(c.optim or {})
    if c.pack_documents:
        if not prepared:
            raise CompareError(f"--pack-documents needs a prepared folder as --data (minrnn prepare; documents are "
                               f"known only there), got {c.data or 'none'}")
        unable = [m for m in models if not get_baseline(m).packs_documents]
        if unable:
            raise CompareError(f"--pack-documents: {unable[0]} cannot reset its state at a document start "
                               "(leave it out with --models)")
    if c.stateful:
        if "corpus" not in preset.data and not preset.user_data:
            raise CompareError(f"--stateful is for text experiments; {experiment} draws independent task examples")
        if c.pack_documents:
            raise CompareError("--stateful and --pack-documents exclude each other: a stateful row reads its "
                               "stream without moving to document starts")
        unable = [m for m in models if not get_baseline(m).carries_state]
        if unable:
            raise CompareError(f"--stateful: {unable[0]} carries no fixed-size state from one window to the next "
                               "(leave it out with --models)")
    digest = digest_of(preset)
    return [RunSpec(experiment, c.preset, m, steps, t, s, c.seed, c.device, c.dtype, c.data_dir, c.eval_every,
                    c.budget_s, digest, c.lr, dict(options.get(m, {})), dict(optim), c.data, c.tokenizer,
                    c.pack_documents, c.stateful, c.compile)
            for t in run_tasks for s in sweeps for m in models]


def _toml_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_options(items: list[str]) -> dict[str, dict]:
    """``["mingru.decay_bias=3.0", ...]`` -> ``{"mingru": {"decay_bias": 3.0}}``;
    values are read as TOML values (numbers, true/false, quoted strings), else kept as text."""
    out: dict[str, dict] = {}
    for item in items:
        target, eq, value = item.partition("=")
        model, dot, key = target.partition(".")
        if not (eq and dot and model and key):
            raise CompareError(f"--set {item!r}: expected MODEL.KEY=VALUE, e.g. mingru.decay_bias=3.0")
        out.setdefault(model, {})[key] = _toml_value(value)
    return out


def parse_optim(items: list[str]) -> dict:
    """``["weight_decay=0.3", ...]`` -> ``{"weight_decay": 0.3}`` (values read as TOML values);
    checked by `check_optim` when the runs are planned."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not (eq and key):
            raise CompareError(f"--optim {item!r}: expected KEY=VALUE, e.g. weight_decay=0.3")
        out[key] = _toml_value(value)
    return out


def check_optim(optim: dict) -> dict:
    """``--optim`` settings checked against COMPARE_OPTIM_KEYS: a known key, a value of its type
    (an int is taken for a float), nothing negative; returns them with floats as floats."""
    types = field_types()
    out = {}
    for key, value in optim.items():
        if key not in COMPARE_OPTIM_KEYS:
            raise CompareError(f"--optim {key}: not an optimiser setting; known: {', '.join(sorted(COMPARE_OPTIM_KEYS))} "
                               "(the learning rate has --lr, the step count --steps)")
        kind = types[key]
        ok = (isinstance(value, bool) if kind is bool else
              isinstance(value, int) and not isinstance(value, bool) if kind is int else
              isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
        if not ok or (kind is not bool and value < 0):
            expected = {bool: "true or false", int: "a whole number >= 0", float: "a finite number >= 0"}[kind]
            raise CompareError(f"--optim {key}={value!r}: expected {expected}")
        out[key] = float(value) if kind is float else value
    return out
