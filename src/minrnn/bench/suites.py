"""The suites of `minrnn bench` and the run that drives them: each suite's result, its
targets, its JSON, its plot and its tables, with the metadata a result needs to be cited."""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple, TextIO

import torch

from . import decode, layers, report, scan
from .measure import num_threads, set_malloc_policy
from .runner import progress
from .settings import Settings


class Suite(NamedTuple):
    run: Callable[[Settings], dict]
    table: Callable[[dict, dict], str]
    plot: Callable[[dict, dict, Path], None]
    targets: Callable[[dict], list] | None = None


SUITES = {
    "layers": Suite(layers.run, report.layers_tables, report.plot_layers, report.layer_targets),
    "scan": Suite(scan.run, report.scan_table, report.plot_scan, report.scan_targets),
    "decode": Suite(decode.run, report.decode_table, report.plot_decode),
}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_meta(settings: Settings, command: str) -> dict:
    """What a result must carry to be cited: command, date, versions, machine, settings."""
    from .. import __version__
    from ..ops import available_backends, resolve_backend

    device = settings.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "minrnn": __version__, "git_commit": _git_commit(), "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "cpu": _cpu_name(), "device": f"{device.type} ({name})", "dtype": str(settings.dtype).replace("torch.", ""),
        "threads": settings.threads, "quick": settings.quick,
        "backends": available_backends(), "auto_backend": resolve_backend("auto", device).name,
        "settings": asdict(settings),
    }


def run(suites: list[str], settings: Settings, command: str = "minrnn bench",
        stream: TextIO = sys.stdout) -> dict[str, dict]:
    """Run ``suites`` (names from SUITES, or "all") with ``settings``: print tables to
    ``stream``, write JSON (and PNG unless settings.plots is False) under settings.out.

    Returns {suite: {"meta", "result", "targets"}} as written to <out>/<suite>.json.
    """
    names = list(SUITES) if "all" in suites else list(dict.fromkeys(suites))
    unknown = [s for s in names if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; expected some of {sorted(SUITES)} or 'all'")
    out = Path(settings.out)
    written: dict[str, dict] = {}
    all_targets: list[dict] = []
    malloc = set_malloc_policy(settings.malloc)
    with num_threads(settings.threads) as n:
        settings.threads = n
        meta = run_meta(settings, command)
        meta["malloc"] = malloc
        for name in names:
            suite = SUITES[name]
            result = suite.run(settings)
            targets = suite.targets(result) if suite.targets else []
            all_targets += targets
            doc = written[name] = {"meta": meta, "result": result, "targets": targets}
            report.write_json(out / f"{name}.json", doc)
            if settings.plots:
                suite.plot(result, meta, out / f"{name}.png")
            print(suite.table(result, meta), file=stream, flush=True)
    if all_targets:
        print(report.targets_table(all_targets), file=stream, flush=True)
    progress(f"results in {out}/")
    return written
