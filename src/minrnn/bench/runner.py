"""Time a set of candidates at one problem size, fairly, within a time and memory budget.

Fairness: every candidate runs in this process, on the same inputs, and the timed
repeats are interleaved (round r times every candidate once before round r + 1), so
a slow drift of the machine (another job, frequency scaling) lands on all of them
alike. Each candidate first gets warm-up steps (allocator, lazy compilation), then
one step under the memory probes, then its timed repeats; its time is the median.
A repeat of a step shorter than ``min_repeat_s`` runs it k times back to back (its
untimed-elsewhere reset, a few attribute stores, included) and reports the mean of
the k, so the median is over repeats of at least ~10 ms.

Warm steps: interleaving means a candidate's repeat starts where another candidate left
the caches, the allocator and the thread pools. A step shorter than ``warm_below_s``
therefore runs once more, timed on its own, right before each timed repeat, so that every
timed step is the candidate's second or later in a row (otherwise a one-step repeat would
be all cold step and a two-step one half). The cold steps' times are kept too (``cold_ms``).

Budget: a candidate is skipped when its step, predicted from the previous (smaller)
size by linear scaling, or measured in warm-up, would take longer than
``max_step_s``, or its peak memory, predicted the same way, would exceed
``max_bytes``. A candidate whose repeats would take longer than ``budget_s`` in all
gets fewer repeats (at least one). A candidate whose warm-up raises (a backend that
cannot run this size, an out-of-memory error) is recorded as failed, with the error,
and the run goes on. All of this is recorded in its ``note``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .measure import median, peak_memory, saved_tensor_bytes, time_once


@dataclass
class Case:
    """One candidate at one size. ``step`` runs one forward + backward; ``reset``
    (untimed, before every step) drops the gradients the previous step left."""

    name: str
    step: Callable[[], object]
    reset: Callable[[], object] = lambda: None
    #: tensors left out of saved_bytes (parameters)
    params: tuple[Tensor, ...] = ()


@dataclass
class Budget:
    repeats: int = 5
    max_step_s: float = 5.0
    budget_s: float = 20.0
    max_bytes: int | None = None
    measure_memory: bool = True
    #: a repeat of a step shorter than this runs it several times (reset included) and
    #: divides, so that timer resolution and per-call jitter do not dominate tiny sizes
    min_repeat_s: float = 0.01
    max_steps_per_repeat: int = 100
    #: a step shorter than this runs once, untimed for the median, before each timed repeat
    #: (see "Warm steps" above); a longer one is not affected by where it starts
    warm_below_s: float = 1.0


@dataclass
class Result:
    ms: float | None = None  # median, None when skipped
    times_ms: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    saved_bytes: int | None = None
    steps_per_repeat: int = 1
    #: minor page faults of the process per step, one value per timed repeat (None where
    #: the platform cannot count them)
    faults: list[float | None] = field(default_factory=list)
    #: the warm step before each timed repeat, timed alone (empty for a step of at least
    #: Budget.warm_below_s): the first step after the other candidates
    cold_ms: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def skipped(self) -> bool:
        return self.ms is None

    def fields(self) -> dict:
        """The row fields every suite reports for a measured case."""
        return {"ms": self.ms, "times_ms": self.times_ms, "repeats": len(self.times_ms),
                "steps_per_repeat": self.steps_per_repeat, "peak_bytes": self.peak_bytes,
                "saved_bytes": self.saved_bytes, "page_faults": _median_or_none(self.faults),
                "cold_ms": _median_or_none(self.cold_ms), "note": self.note}


def _median_or_none(xs: list[float | None]) -> float | None:
    known = [x for x in xs if x is not None]
    return median(known) if known else None


def minor_page_faults() -> int | None:
    """Minor page faults of this process so far (None where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # not Unix
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def progress(msg: str) -> None:
    """A progress line on stderr (stdout carries the tables)."""
    print(msg, file=sys.stderr, flush=True)


def _memory(case: Case, device: torch.device) -> tuple[int, int]:
    """(peak_bytes, saved_bytes) of one step. Both probes watch the same step: the
    saved-tensor hooks hand autograd back the very tensor it saves, so they change
    neither what is kept nor when it is freed, and the peak is that of a plain step."""
    saved: list[int] = []
    case.reset()
    peak = peak_memory(lambda: saved.append(saved_tensor_bytes(case.step, exclude=case.params)), device)
    return peak, saved[0]


def _repeat(case: Case, k: int) -> Callable[[], None]:
    def run():
        for _ in range(k):
            case.reset()
            case.step()

    return run


def run_cases(cases: list[Case], device: torch.device, budget: Budget,
              previous: dict[str, Result] | None = None, scale: float = 1.0) -> dict[str, Result]:
    """Measure every case; ``previous`` holds the results at a size ``scale`` times smaller
    (used only to predict and skip). Returns {case.name: Result}."""
    previous = previous or {}
    results: dict[str, Result] = {}
    planned: dict[str, int] = {}
    warms: dict[str, bool] = {}
    for case in cases:
        res = results[case.name] = Result()
        prev = previous.get(case.name)
        if prev is not None and prev.skipped:
            res.note = "skipped (skipped at a smaller size)"
            continue
        if prev is not None:
            est_s = prev.ms / 1e3 * scale
            if est_s > budget.max_step_s:
                res.note = f"skipped (one step ~{est_s:.1f} s > {budget.max_step_s:g} s)"
                continue
            if budget.max_bytes is not None and prev.peak_bytes is not None:
                est_b = prev.peak_bytes * scale
                if est_b > budget.max_bytes:
                    res.note = f"skipped (peak memory ~{est_b / 2**30:.1f} GiB > {budget.max_bytes / 2**30:.1f} GiB)"
                    continue
        # warm-up: a first step pays for allocation and lazy compilation (a JIT kernel
        # compiles on its first call, at the first size); a second, if cheap or if this
        # is the first size, lets the allocator settle and gives the estimate
        try:
            case.reset()
            est = time_once(case.step, device)
            if est < 1.0 or prev is None:
                case.reset()
                est = time_once(case.step, device)
        except Exception as e:  # noqa: BLE001 -- one candidate failing must not lose the others' run
            res.note = f"failed ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
            progress(f"{case.name}: {res.note}")
            continue
        if est > budget.max_step_s:
            res.note = f"skipped (one step took {est:.1f} s > {budget.max_step_s:g} s)"
            continue
        if budget.measure_memory:
            res.peak_bytes, res.saved_bytes = _memory(case, device)
        res.steps_per_repeat = max(1, min(budget.max_steps_per_repeat, int(budget.min_repeat_s / max(est, 1e-9))))
        warm = est < budget.warm_below_s
        per_repeat = est * (res.steps_per_repeat + warm)
        n = budget.repeats
        if per_repeat * n > budget.budget_s:
            n = max(1, int(budget.budget_s // per_repeat))
            res.note = f"{n} repeat{'s' if n > 1 else ''} (time budget)"
        planned[case.name] = n
        warms[case.name] = warm
    rounds = max(planned.values(), default=0)
    for r in range(rounds):
        for case in cases:
            if planned.get(case.name, 0) > r:
                res = results[case.name]
                if warms[case.name]:
                    case.reset()
                    res.cold_ms.append(time_once(case.step, device) * 1e3)
                f0 = minor_page_faults()
                res.times_ms.append(time_once(_repeat(case, res.steps_per_repeat), device) * 1e3
                                    / res.steps_per_repeat)
                f1 = minor_page_faults()
                res.faults.append(None if f0 is None else (f1 - f0) / res.steps_per_repeat)
    for res in results.values():
        if res.times_ms:
            res.ms = median(res.times_ms)
    return results
