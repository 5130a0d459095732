"""The presets of the side-by-side experiments, TOML files shipped in ``minrnn/experiments/configs/``.

    preset = load_preset("selective_copying", "cpu")
    target, overrides = preset.model_settings("llama", vocab_size=16)
    model = build_model("llama", 16, target, **overrides)

One file per experiment, found in that folder (selective_copying, chomsky, shakespeare_char,
wikitext2, and text: a preset that names no data takes the user's corpus from ``--data``), one
table per preset ("paper" and "cpu"; wikitext2 has "full" and "cpu", since the paper has no
WikiText experiment). Each says where its numbers come from (``source``). A preset's tables:

    models          the models compared (names of minrnn.experiments.baselines.BASELINES)
    extra_models    optional: more models the preset sizes and sets up, run only when named
                    (``--models``): variants beside the compared models, not in the default table.
                    Any other registered baseline may be named too: it is built with ``common``
                    to the preset's budget
    reference       a model whose parameter count every model is built to (name + overrides);
    target_params   or the budget as a number
    common          build_model overrides for every model (dropout, max_length, ...)
    per_model.NAME  overrides for one model (depth, heads, block options)
    per_model_train.NAME  train settings for one model (its tuned learning rate; the preset
                    says how it was chosen)
    data            the task (task / tasks and their lengths) or the corpus and tokenizer
    train           optimiser, schedule and evaluation: TrainConfig's names (LOOP_KEYS:
                    eval_windows for text), the engine's defaults for what it leaves out, and
                    TASK_EVAL_KEYS for the synthetic tasks
    sweep           optional: lists of values of one override to repeat the comparison over

Overrides use MinRNNConfig's names where they mean the same thing (hidden_size,
num_hidden_layers, tie_word_embeddings); the earlier width, num_layers and tie_embeddings, and a
text preset's eval_batches (x batch_size windows), are read as those.

Presets are data: nothing here trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from ..data.corpora import CORPORA
from ..data.tasks import CHOMSKY_TASKS, TASKS
from ..training.config import OPTIM_KEYS, TOKENIZERS, field_types
from . import CONFIG_DIR, experiment_names
from .baselines import BASELINES, GENERIC_KEYS, build_model, canonical_options

EXPERIMENTS = experiment_names()
SPLITS = ("train", "valid", "test")

_TOP_KEYS = {"description": str, "source": str, "models": list, "extra_models": list, "target_params": int, "reference": dict,
             "common": dict, "per_model": dict, "per_model_train": dict, "data": dict, "train": dict,
             "sweep": dict}
_DATA_KEYS = {
    "task": str, "length": int, "num_tokens": int,                                   # one synthetic task
    "tasks": list, "train_lengths": list, "eval_lengths": list, "eval_length_step": int,  # Chomsky
    "corpus": str, "tokenizer": str, "bpe_vocab_size": int, "train_split": str, "eval_split": str,  # text
}
# How a synthetic task is evaluated: eval_batches of eval_batch_size sequences per length, drawn
# from val_seed, the final test from test_seed (text is evaluated on TrainConfig's eval_windows)
TASK_EVAL_KEYS = {"eval_batches": int, "eval_batch_size": int, "val_seed": int, "test_seed": int}
# The TrainConfig settings a preset's train table may give (the rest are the engine's defaults)
LOOP_KEYS = ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_windows", *OPTIM_KEYS)
_TRAIN_KEYS = {**{k: field_types()[k] for k in LOOP_KEYS}, **TASK_EVAL_KEYS}
_OPTIMISER_KEYS = {k: _TRAIN_KEYS[k] for k in OPTIM_KEYS}


class PresetError(ValueError):
    """A preset file that does not follow the schema; the message names the file and key."""


@dataclass(frozen=True)
class Preset:
    experiment: str
    name: str
    description: str
    source: str
    models: tuple[str, ...]
    data: dict[str, Any]
    train: dict[str, Any]
    common: dict[str, Any] = field(default_factory=dict)
    per_model: dict[str, dict[str, Any]] = field(default_factory=dict)
    reference: dict[str, Any] | None = None
    target_params: int | None = None
    sweep: dict[str, list] = field(default_factory=dict)
    per_model_train: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra_models: tuple[str, ...] = ()

    @property
    def available_models(self) -> tuple[str, ...]:
        """Every model this preset can run: its compared models, then the extra ones."""
        return self.models + self.extra_models

    def train_settings(self, model: str) -> dict[str, Any]:
        """The optimiser and schedule of ``model``: ``train`` with its per_model_train entries."""
        return {**self.train, **self.per_model_train.get(model, {})}

    @property
    def user_data(self) -> bool:
        """The preset names no corpus or task: the data comes from ``--data``."""
        return not any(k in self.data for k in ("task", "tasks", "corpus"))

    @property
    def tasks(self) -> tuple[str, ...]:
        """The synthetic tasks of the preset (empty for a text corpus)."""
        if "task" in self.data:
            return (self.data["task"],)
        return tuple(self.data.get("tasks", ()))

    def eval_lengths(self) -> list[int]:
        """Chomsky presets: the evaluation lengths, from eval_lengths[0] to eval_lengths[1]."""
        lo, hi = self.data["eval_lengths"]
        return list(range(lo, hi + 1, self.data.get("eval_length_step", 1)))

    def model_settings(self, model: str, vocab_size: int, options: dict[str, Any] | None = None,
                       **sweep) -> tuple[int | None, dict[str, Any]]:
        """(target_params, overrides) such that ``build_model(model, vocab_size, target_params,
        **overrides)`` builds ``model`` as this preset says (a registered baseline the preset does
        not name: with the common overrides, to the budget); ``sweep`` values (e.g.
        num_hidden_layers=2) apply to every model, the reference included, so the budget follows them.
        ``options`` (a run's ``--set`` values) are merged last; on the reference model they would
        change its size, so unless they fix its width the reference is then built to the plain
        reference's parameter count, its width searched like any other model's."""
        options = canonical_options(options or {}, "options")
        if model not in self.available_models and model not in BASELINES:
            raise KeyError(f"{self.experiment}/{self.name} runs {list(self.available_models)} (or another registered "
                           f"baseline), not {model!r}")
        sweep = canonical_options(sweep, "sweep")
        overrides = {**self.common, **self.per_model.get(model, {}), **sweep}
        if self.reference is None:
            return self.target_params, {**overrides, **options}
        ref = dict(self.reference)
        ref_name = ref.pop("name")
        ref_overrides = {**self.common, **ref, **sweep}
        if model == ref_name and (not options or "hidden_size" in options):
            return None, {**ref_overrides, **options}  # the reference itself: its widths as given
        with torch.device("meta"):  # only its size is needed
            target = build_model(ref_name, vocab_size, None, **ref_overrides).baseline.params
        if model == ref_name:
            overrides = {k: v for k, v in ref_overrides.items() if k != "hidden_size"}
        return target, {**overrides, **options}


def _fail(where: str, msg: str):
    raise PresetError(f"{where}: {msg}")


def _check_types(where: str, table: dict, schema: dict) -> None:
    for key, value in table.items():
        if key not in schema:
            _fail(where, f"unknown key {key!r}; known: {', '.join(sorted(schema))}")
        want = schema[key]
        ok = isinstance(value, want) and not (want in (int, float) and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            _fail(where, f"{key} must be {want.__name__}, got {value!r}")


def _canonical(table: dict, where: str) -> dict:
    """The preset's overrides under their current names (ALIASES read as the names they stand for),
    and text evaluation as eval_windows (eval_batches x batch_size, the earlier setting)."""
    table = dict(table)
    try:
        for key in ("common", "reference", "sweep"):
            if isinstance(table.get(key), dict):
                table[key] = canonical_options(table[key], f"{where}.{key}")
        if isinstance(table.get("per_model"), dict):
            table["per_model"] = {m: canonical_options(v, f"{where}.per_model.{m}") if isinstance(v, dict) else v
                                  for m, v in table["per_model"].items()}
    except ValueError as e:
        raise PresetError(str(e)) from None
    data, train = table.get("data"), table.get("train")
    if isinstance(train, dict) and isinstance(data, dict) and "eval_batches" in train \
            and not any(k in data for k in ("task", "tasks")):
        train = dict(train)
        if "eval_windows" in train:
            _fail(where + ".train", "eval_batches and eval_windows: give eval_windows only")
        train["eval_windows"] = train.pop("eval_batches") * train.get("batch_size", 1)
        table["train"] = train
    return table


def _parse(experiment: str, name: str, table: dict, where: str) -> Preset:
    _check_types(where, table, _TOP_KEYS)
    table = _canonical(table, where)
    for key in ("description", "source", "models", "data", "train"):
        if key not in table:
            _fail(where, f"missing {key!r}")
    models = tuple(table["models"])
    unknown = [m for m in models if m not in BASELINES]
    if unknown or not models:
        _fail(where, f"models must name some of {', '.join(BASELINES)}; unknown: {unknown}")
    extra = tuple(table.get("extra_models", ()))
    unknown = [m for m in extra if m not in BASELINES or m in models]
    if unknown:
        _fail(where, f"extra_models must name baselines not in models; got {unknown}")
    reference = table.get("reference")
    if ("reference" in table) == ("target_params" in table):
        _fail(where, "give exactly one of reference (a model to match) and target_params (a number)")
    if reference is not None and reference.get("name") not in BASELINES:
        _fail(where + ".reference", f"name must be one of {', '.join(BASELINES)}, got {reference.get('name')!r}")
    for model in table.get("per_model", {}):
        if model not in models + extra:
            _fail(where + ".per_model", f"{model!r} is not among the preset's models {list(models + extra)}")
        if reference is not None and model == reference.get("name"):
            _fail(where + ".per_model", f"{model!r} is the reference: set its options in the reference table")
    for key in table.get("common", {}):
        if key not in GENERIC_KEYS:
            _fail(where + ".common", f"{key!r} is not an override every model takes ({', '.join(GENERIC_KEYS)})")
    for key, values in table.get("sweep", {}).items():
        if key not in GENERIC_KEYS or not isinstance(values, list) or not values:
            _fail(where + ".sweep", f"{key} must be a generic override ({', '.join(GENERIC_KEYS)}) with a list of values")
    data, train = table["data"], table["train"]
    _check_types(where + ".data", data, _DATA_KEYS)
    _check_types(where + ".train", train, _TRAIN_KEYS)
    for model, settings in table.get("per_model_train", {}).items():
        if model not in models + extra:
            _fail(where + ".per_model_train", f"{model!r} is not among the preset's models {list(models + extra)}")
        # the optimiser only: data, batch and step budget stay the same for every model
        _check_types(f"{where}.per_model_train.{model}", settings, _OPTIMISER_KEYS)
    if "task" in data and data["task"] not in TASKS:
        _fail(where + ".data", f"unknown task {data['task']!r}; known: {', '.join(TASKS)}")
    for task in data.get("tasks", []):
        if task not in CHOMSKY_TASKS:
            _fail(where + ".data", f"unknown Chomsky task {task!r}; known: {', '.join(CHOMSKY_TASKS)}")
    if "corpus" in data:
        if data["corpus"] not in CORPORA:
            _fail(where + ".data", f"unknown corpus {data['corpus']!r}; known: {', '.join(CORPORA)}")
        if data.get("tokenizer") not in TOKENIZERS:
            _fail(where + ".data", f"tokenizer must be one of {TOKENIZERS}, got {data.get('tokenizer')!r}")
        for key in ("train_split", "eval_split"):
            if key in data and data[key] not in SPLITS:
                _fail(where + ".data", f"{key} must be one of {SPLITS}, got {data[key]!r}")
    named = sum(k in data for k in ("task", "tasks", "corpus"))
    if named == 0 and data.get("tokenizer") not in TOKENIZERS:
        _fail(where + ".data", f"a preset that names no data (--data gives it) needs a tokenizer of {TOKENIZERS}")
    if named > 1:
        _fail(where + ".data", "name at most one of task, tasks (Chomsky) and corpus (none: --data gives a text)")
    if any(k in data for k in ("task", "tasks")) and "eval_windows" in train:
        _fail(where + ".train", "eval_windows is for text; a task is evaluated on eval_batches x eval_batch_size")
    for key in ("train_lengths", "eval_lengths"):
        if key in data:
            pair = data[key]
            if len(pair) != 2 or not all(isinstance(v, int) for v in pair) or not 1 <= pair[0] <= pair[1]:
                _fail(where + ".data", f"{key} must be [min, max] with 1 <= min <= max, got {pair!r}")
    return Preset(experiment, name, table["description"], table["source"], models, dict(data), dict(train),
                  dict(table.get("common", {})), {k: dict(v) for k, v in table.get("per_model", {}).items()},
                  dict(reference) if reference is not None else None, table.get("target_params"),
                  {k: list(v) for k, v in table.get("sweep", {}).items()},
                  {k: dict(v) for k, v in table.get("per_model_train", {}).items()}, extra)


def load_preset_file(path: str | Path, preset: str) -> Preset:
    """Preset ``preset`` of the TOML file ``path`` (the experiment is the file's stem)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preset file {path} not found")
    with open(path, "rb") as f:
        tables = tomllib.load(f)
    if preset not in tables:
        raise KeyError(f"{path.name} has no preset {preset!r}; it has: {', '.join(tables)}")
    return _parse(path.stem, preset, tables[preset], f"{path.name} [{preset}]")


def list_presets() -> dict[str, tuple[str, ...]]:
    """{experiment: (preset names)} of the presets shipped with minrnn."""
    out = {}
    for experiment in experiment_names():
        with open(CONFIG_DIR / f"{experiment}.toml", "rb") as f:
            out[experiment] = tuple(tomllib.load(f))
    return out


def load_preset(experiment: str, preset: str) -> Preset:
    """A shipped preset, e.g. ``load_preset("chomsky", "cpu")``."""
    if experiment not in experiment_names():
        raise KeyError(f"unknown experiment {experiment!r}; known: {', '.join(experiment_names())}")
    return load_preset_file(CONFIG_DIR / f"{experiment}.toml", preset)
