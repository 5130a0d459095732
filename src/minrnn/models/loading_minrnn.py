"""Refuse weights that do not fit the config, after transformers' ``from_pretrained``.

transformers fills weights missing from a checkpoint with fresh random ones and drops the
ones the model has no place for, with only a warning table. For a MinRNN checkpoint that
means a ``config.json`` edited to more or fewer layers, or with ``tie_word_embeddings``
flipped, loads a model that silently computes something else; this turns it into one line.
"""

from __future__ import annotations

import contextlib
import logging
import re

# the task heads of the MinRNN models: a checkpoint saved by one may hold another's
_HEADS = ("lm_head", "score")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _layer_indices(keys) -> set[int]:
    return {int(m.group(1)) for k in keys if (m := _LAYER.search(k))}


def _sample(keys, n: int = 3) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_loaded_weights(model, loading_info: dict, source=None) -> None:
    """Raise a one-line ValueError if ``model`` (just loaded) has weights the checkpoint lacked
    or the checkpoint had weights the model dropped, other than a task head that belongs to a
    different task (``model._new_head_modules`` may be created fresh; other heads dropped)."""
    config = model.config
    own_new = tuple(model._new_head_modules)
    missing = [k for k in loading_info.get("missing_keys", ()) if k.split(".")[0] not in own_new]
    unexpected = [k for k in loading_info.get("unexpected_keys", ())
                  if not (k.split(".")[0] in _HEADS and not hasattr(model, k.split(".")[0]))]
    where = f" in {source}" if source is not None else ""
    head = getattr(model, "lm_head", None)
    if head is not None and config.tie_word_embeddings and head.weight is not model.get_input_embeddings().weight:
        raise ValueError(f"the weights{where} hold a separate lm_head.weight but the config has "
                         "tie_word_embeddings=True, so saving again would drop it: set tie_word_embeddings to false")
    if not missing and not unexpected:
        return
    if "lm_head.weight" in missing and not config.tie_word_embeddings:
        raise ValueError(f"the weights{where} have no lm_head.weight (saved with tied embeddings) but the config has "
                         "tie_word_embeddings=False, which would leave a random LM head: set tie_word_embeddings to true")
    layers, detail = config.num_hidden_layers, ""
    extra, lacking = _layer_indices(unexpected), _layer_indices(missing)
    if extra and min(extra) == layers:
        detail = f"; the weights hold {max(extra) + 1} layers but the config has num_hidden_layers={layers}"
    elif lacking and lacking == set(range(min(lacking), layers)):
        # whole layers absent (not a few weights of one): the checkpoint has fewer of them
        per_layer = [k for k in model.state_dict() if _layer_indices([k]) == {min(lacking)}]
        if set(per_layer) <= set(missing):
            detail = f"; the weights hold {min(lacking)} layers but the config has num_hidden_layers={layers}"
    parts = ([f"missing from the weights: {_sample(missing)}"] if missing else []) + \
            ([f"not used by the model: {_sample(unexpected)}"] if unexpected else [])
    raise ValueError(f"the weights{where} do not fit the config of {type(model).__name__} "
                     f"({'; '.join(parts)}){detail}")


@contextlib.contextmanager
def report_only_if_accepted(logger_name: str = "transformers.modeling_utils"):
    """Hold back what transformers logs while loading (its table of missing and unexpected
    weights) and pass it on only if the block succeeds: a refusal is one line, not a table
    followed by the line."""
    logger = logging.getLogger(logger_name)
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        held.append(record)
        return False

    logger.addFilter(hold)
    try:
        yield
    finally:
        logger.removeFilter(hold)
    for record in held:  # reached only when the block raised nothing
        logger.handle(record)


__all__ = ["check_loaded_weights", "report_only_if_accepted"]
