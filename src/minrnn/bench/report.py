"""Turning suite results into Markdown tables (stdout), target checks, JSON and PNG plots.

Tables are Markdown so that a run can be pasted into the documentation as printed.
matplotlib is imported only inside the plotting functions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

MiB = 2**20
DASH = "—"


# --- formatting ----------------------------------------------------------------------


def fmt(x: float | None, kind: str = "ms") -> str:
    """A cell: "ms" (3 significant digits), "ratio" (2 decimals), "mib", "err" (1.2e-07),
    "pct"; None is a dash."""
    if x is None:
        return DASH
    if kind == "ratio":
        return f"{x:.2f}"
    if kind == "err":
        return f"{x:.1e}"
    if kind == "pct":
        return f"{x:.0f}%"
    if kind == "mib":
        x = x / MiB
    if x == 0:
        return "0"
    digits = max(0, 2 - int(math.floor(math.log10(abs(x)))))
    return f"{x:.{digits}f}"


def count(n: int) -> str:
    """8388608 -> "8.39M"."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def threads(n: int) -> str:
    return f"{n} thread{'s' if n != 1 else ''}"


def markdown_table(header: list[str], rows: Iterable[list[str]]) -> str:
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [line(r) for r in rows])


def _label(cand: dict) -> str:
    return cand["name"] + (" (auto)" if cand.get("default") else "")


def _pivot(rows: list[dict], names: list[dict], lengths: list[int], cell: Callable[[dict], str]) -> str:
    at = {(r["candidate"], r["T"]): r for r in rows}
    body = []
    for cand in names:
        cells = [cell(at[(cand["name"], T)]) if (cand["name"], T) in at else DASH for T in lengths]
        if any(c != DASH for c in cells):
            body.append([_label(cand)] + cells)
    return markdown_table(["candidate"] + [f"T={T}" for T in lengths], body)


# --- layers --------------------------------------------------------------------------

LAYER_METRICS = [
    # (title, cell, main configuration only)
    ("time per training step, ms (median)", lambda r: fmt(r["ms"]), False),
    ("x its own Linear projection (the floor)", lambda r: fmt(r["ratio_floor"], "ratio"), False),
    ("x nn.GRU / nn.LSTM", lambda r: fmt(r["ratio_rnn"], "ratio"), False),
    ("peak memory of a training step, MiB", lambda r: fmt(r["peak_bytes"], "mib"), True),
    ("saved for backward, MiB", lambda r: fmt(r["saved_bytes"], "mib"), True),
    ("float32 max abs error of the output vs the float64 loop", lambda r: fmt(r["max_abs_err"], "err"), True),
]


def layers_tables(result: dict, meta: dict) -> str:
    parts = []
    for i, cfg in enumerate(result["configs"]):
        b, w, lengths = cfg["batch"], cfg["width"], cfg["lengths"]
        rows = [r for r in result["rows"] if r["batch"] == b and r["width"] == w]
        malloc = f", malloc {meta['malloc'].split()[0]}" if meta.get("malloc") else ""
        parts.append(f"### Layers, B={b}, D=H={w}: forward + backward, {meta['dtype']}, "
                     f"{threads(meta['threads'])}, {meta['device']}{malloc}")
        for title, cell, main_only in LAYER_METRICS:
            if main_only and i > 0:
                continue
            if title.startswith("float32") and all(r["max_abs_err"] is None for r in rows):
                continue
            parts.append(f"\n{title}\n\n" + _pivot(rows, result["candidates"], lengths, cell))
        notes = [f"- {r['candidate']} at T={r['T']}: {r['note']}" for r in rows if r["note"]]
        if notes:
            parts.append("\n" + "\n".join(notes))
        parts.append("")
    return "\n".join(parts)


# --- scan ----------------------------------------------------------------------------


def scan_table(result: dict, meta: dict) -> str:
    copy = result["copy"]
    head = (f"### Scan alone (forward + backward, {meta['dtype']}, {threads(meta['threads'])}), "
            f"B={result['shape']['B']}, C={result['shape']['C']}; copy bandwidth "
            f"{copy['gbps']:.2f} GB/s ({copy['buffer_bytes'] // MiB} MiB buffers)\n")
    order = list(dict.fromkeys(r["backend"] for r in result["rows"]))
    body = [[r["backend"] + (" (auto)" if r["default"] else ""), str(r["T"]), count(r["elements"]),
             fmt(r["ms"]), fmt(r["gbps"]), fmt(r["pct_copy"], "pct"), fmt(r["peak_bytes"], "mib"),
             fmt(r["max_abs_err"], "err"), fmt(r["grad_rel_err"], "err"), r["note"]]
            for r in sorted(result["rows"], key=lambda r: (order.index(r["backend"]), r["T"]))]
    return head + "\n" + markdown_table(
        ["backend", "T", "B*T*C", "ms", "GB/s", "% of copy", "peak MiB", "max abs err h", "grad rel err", "note"],
        body) + "\n"


# --- decode --------------------------------------------------------------------------


def decode_table(result: dict, meta: dict) -> str:
    """One table per batch: tokens/s of every model and mode per context, the ceiling, the
    ratios to Llama and the state each model carries."""
    at = {(r["model"], r["mode"], r["batch"], r["context"]): r for r in result["rows"]}
    contexts = sorted({r["context"] for r in result["rows"]})
    models = result["models"]
    desc = "; ".join(f"{m}: {v['layers']} x {v['width']}, {v['params'] / 1e6:.2f}M parameters"
                     for m, v in models.items())
    cols = [(m, mode) for m in models for mode in ("generate", "step", "general") if any(
        (m, mode, b, c) in at for b in result["batches"] for c in contexts)]
    out = []
    for B in result["batches"]:
        def tps(m, mode, c, B=B):
            r = at.get((m, mode, B, c))
            return None if r is None else r["tokens_per_s"]

        def ratio(a, b):
            return None if a is None or b is None else a / b

        header = (["context"] + [f"{m} {mode}" for m, mode in cols] + ["matmul ceiling"]
                  + [f"{m} / Llama ({mode})" for m in ("minGRU", "minLSTM") for mode in ("generate", "step")]
                  + ["minGRU generate time / matmul time"]
                  + [f"{m} step: general path time / fast" for m in ("minGRU", "minLSTM")]
                  + [f"{m} state MiB" for m in models])
        body = []
        for c in contexts:
            ceiling = tps("minGRU", "matmul", c)
            body.append([str(c)] + [fmt(tps(m, mode, c)) for m, mode in cols] + [fmt(ceiling)]
                        + [fmt(ratio(tps(m, mode, c), tps("Llama", mode, c)), "ratio")
                           for m in ("minGRU", "minLSTM") for mode in ("generate", "step")]
                        + [fmt(ratio(ceiling, tps("minGRU", "generate", c)), "ratio")]
                        + [fmt(ratio(tps(m, "step", c), tps(m, "general", c)), "ratio") for m in ("minGRU", "minLSTM")]
                        + [fmt((at.get((m, "step", B, c)) or {}).get("state_bytes"), "mib") for m in models])
        out.append(f"### Decoding tokens/s, batch {B}, {threads(meta['threads'])}, {meta['dtype']} ({desc}); "
                   f"median per-token time over {result['window']} tokens, median of {result['repeats']} "
                   f"repeats\n\n" + markdown_table(header, body) + "\n")
    return "\n".join(out)


# --- targets: what a fast minRNN layer and scan should reach ---------------------------

FLOOR_RATIO_MAX = 1.3
FLOOR_RATIO_LENGTHS = (256, 4096)
MEMORY_LENGTH = 4096
BANDWIDTH_MIN_ELEMENTS = 8_000_000
BANDWIDTH_MIN_PCT = 50.0
ERROR_LENGTH = 4096
ERROR_MAX = 1e-5


def _target(text: str, value: str, ok: bool | None) -> dict:
    return {"target": text, "measured": value, "pass": ok}


def layer_targets(result: dict) -> list[dict]:
    """The layer targets (near its projection, faster and leaner than nn.GRU), on the main
    configuration (the first)."""
    cfg = result["configs"][0]
    rows = [r for r in result["rows"] if r["batch"] == cfg["batch"] and r["width"] == cfg["width"]]
    default = {f: {r["T"]: r for r in rows if r["family"] == f and r["default"]} for f in ("minGRU", "minLSTM")}
    by = {(r["candidate"], r["T"]): r for r in rows}
    out = []
    for family, floor in (("minGRU", "Linear(D,2D)"), ("minLSTM", "Linear(D,3D)")):
        for T in FLOOR_RATIO_LENGTHS:
            r = default[family].get(T)
            ratio = None if r is None else r["ratio_floor"]
            out.append(_target(f"{family} (auto) <= {FLOOR_RATIO_MAX}x {floor} at T={T}",
                               "not measured" if ratio is None else f"{ratio:.2f}x",
                               None if ratio is None else ratio <= FLOOR_RATIO_MAX))
    pairs = [(T, r["ratio_rnn"]) for T, r in sorted(default["minGRU"].items()) if r["ratio_rnn"] is not None]
    unmeasured = [T for T, r in sorted(default["minGRU"].items()) if r["ratio_rnn"] is None]
    if pairs:
        T_worst, worst = max(pairs, key=lambda p: p[1])
        value = f"worst {worst:.2f}x nn.GRU at T={T_worst}"
        if unmeasured:
            value += f" (no nn.GRU time at T={', '.join(map(str, unmeasured))})"
        out.append(_target("minGRU (auto) faster than nn.GRU at every T >= 16", value, worst < 1.0))
    else:
        out.append(_target("minGRU (auto) faster than nn.GRU at every T >= 16", "not measured", None))
    r, g = default["minGRU"].get(MEMORY_LENGTH), by.get(("nn.GRU", MEMORY_LENGTH))
    if r and g and r["peak_bytes"] is not None and g["peak_bytes"] is not None:
        out.append(_target(f"minGRU (auto) peak training memory <= nn.GRU's at T={MEMORY_LENGTH}",
                           f"{r['peak_bytes'] / MiB:.1f} vs {g['peak_bytes'] / MiB:.1f} MiB",
                           r["peak_bytes"] <= g["peak_bytes"]))
    else:
        out.append(_target(f"minGRU (auto) peak training memory <= nn.GRU's at T={MEMORY_LENGTH}",
                           "not measured", None))
    shape = f" (B={cfg['batch']}, D={cfg['width']})"
    for t in out:
        t["target"] += shape
    return out


def scan_targets(result: dict) -> list[dict]:
    rows = [r for r in result["rows"] if r["default"]]
    big = [r for r in rows if r["elements"] >= BANDWIDTH_MIN_ELEMENTS and r["pct_copy"] is not None]
    text = f"scan (auto) forward + backward >= {BANDWIDTH_MIN_PCT:.0f}% of copy bandwidth for B*T*C >= 8M"
    if big:
        worst = min(big, key=lambda r: r["pct_copy"])
        out = [_target(text, f"worst {worst['pct_copy']:.0f}% at T={worst['T']}",
                       worst["pct_copy"] >= BANDWIDTH_MIN_PCT)]
    else:
        out = [_target(text, "not measured", None)]
    text = f"scan (auto) float32 max abs error < {ERROR_MAX:g} at T={ERROR_LENGTH}, |h| <= 3"
    r = next((r for r in rows if r["T"] == ERROR_LENGTH and r["max_abs_err"] is not None), None)
    out.append(_target(text, "not measured" if r is None else f"{r['max_abs_err']:.1e}",
                       None if r is None else r["max_abs_err"] < ERROR_MAX))
    return out


def targets_table(targets: list[dict]) -> str:
    mark = {True: "yes", False: "NO", None: DASH}
    return "### Targets\n\n" + markdown_table(
        ["target", "measured", "met"], [[t["target"], t["measured"], mark[t["pass"]]] for t in targets]) + "\n"


# --- files ---------------------------------------------------------------------------


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_axes(ax, xs: Iterable[int]) -> None:
    """Log-log axes with the measured x values as the x ticks, written out."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    xs = sorted(set(xs))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [count(x) for x in xs])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="both", alpha=0.3)


def _style(role: str, default: bool) -> dict:
    style = {"floor": dict(ls="--", color="black"), "rnn": dict(ls=":", lw=2)}.get(role, {})
    return {"marker": "o", "ms": 3, "lw": 2.5 if default else 1.2, **style}


def plot_layers(result: dict, meta: dict, path: Path) -> None:
    """Log-log time vs T for the main configuration, one panel per family."""
    plt = _pyplot()
    cfg = result["configs"][0]
    rows = [r for r in result["rows"] if r["batch"] == cfg["batch"] and r["width"] == cfg["width"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, family in zip(axes, ("minGRU", "minLSTM")):
        for cand in result["candidates"]:
            if cand["family"] != family:
                continue
            pts = [(r["T"], r["ms"]) for r in rows if r["candidate"] == cand["name"] and r["ms"] is not None]
            if pts:
                ax.plot(*zip(*pts), label=_label(cand), **_style(cand["role"], cand["default"]))
        _log_axes(ax, cfg["lengths"])
        ax.set(xlabel="sequence length T", title=family)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("ms per training step (forward + backward)")
    fig.suptitle(f"One layer, B={cfg['batch']}, D=H={cfg['width']}, {meta['dtype']}, {threads(meta['threads'])}, "
                 f"{meta['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _series_plot(path: Path, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str,
                 title: str, hlines: Iterable[tuple[float, dict]] = ()) -> None:
    """One log-log panel: a line per series of (x, y) points, optional horizontal lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for label, pts in series.items():
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    for y, style in hlines:
        ax.axhline(y, **style)
    _log_axes(ax, (x for pts in series.values() for x, _ in pts))
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scan(result: dict, meta: dict, path: Path) -> None:
    rows = result["rows"]
    series = {be: [(r["elements"], r["gbps"]) for r in rows if r["backend"] == be and r["gbps"] is not None]
              for be in dict.fromkeys(r["backend"] for r in rows)}
    copy = result["copy"]["gbps"]
    _series_plot(path, series, "elements per tensor B*T*C", "effective GB/s (8 B*T*C elements moved)",
                 f"Scan forward + backward, {meta['dtype']}, {threads(meta['threads'])}",
                 [(copy, dict(color="black", ls="--", label="copy bandwidth")),
                  (copy / 2, dict(color="gray", ls=":", label="50% of copy"))])


def plot_decode(result: dict, meta: dict, path: Path) -> None:
    B = result["batches"][0]
    series = {f"{r_m} {mode}": [(r["context"], r["tokens_per_s"]) for r in result["rows"]
                                if r["model"] == r_m and r["mode"] == mode and r["batch"] == B]
              for r_m, mode in sorted({(r["model"], r["mode"]) for r in result["rows"]})}
    _series_plot(path, series, "context length (tokens in the prompt)", "tokens per second",
                 f"Decoding, batch {B}, {threads(meta['threads'])}")
