"""Training from a prepared folder: peak memory against corpus size, and the cost of a batch.

    python benchmarks/data_memory.py                 # 1 GB and 1 MB corpora, 50 steps each
    python benchmarks/data_memory.py --gb 0.1 --keep

Writes a synthetic corpus of ``--gb`` GB (text files of letters, spaces and lines of varying
length, each line a document) and one of 1 MB, prepares each with
``minrnn prepare CORPUS --tokenizer byte --document-per-line --out DIR``, then runs
``minrnn train shakespeare_char --data DIR --steps 50`` on each, every command its own process.
Reported for each training process: its peak resident memory (``ru_maxrss`` of that child,
from ``os.wait4``) and its median step time (from ``metrics.jsonl``); beside them the same
command on the 1 MB corpus as a text file (the in-memory path). Then, in this process, the time
`TextWorkload.batch` takes to produce a batch of the preset's shape from the large prepared
folder (median over ``--batches`` calls, with and without ``pack_documents``), as a fraction of
the large run's median training step.

The corpora and prepared folders go to a temporary folder under ``--work`` (default runs/),
removed at the end unless ``--keep``; the results to ``--out`` (default
runs/data_memory/results.json).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MB = 1_000_000
PRESET = "shakespeare_char"


def write_corpus(folder: Path, n_bytes: int, seed: int = 0, file_bytes: int = 64 * MB) -> int:
    """``n_bytes`` of ASCII text in files of at most ``file_bytes``: words of lowercase letters,
    lines (documents, with --document-per-line) of log-normally varying length. Returns the bytes written."""
    rng = np.random.default_rng(seed)
    # letters and spaces at English-like rates; the newlines placed afterwards
    alphabet = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz     ", dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    written, index = 0, 0
    while written < n_bytes:
        size = min(file_bytes, n_bytes - written)
        block = alphabet[rng.integers(0, len(alphabet), size)]
        ends = np.cumsum(np.clip(rng.lognormal(7.5, 1.0, size // 200 + 2), 10, None).astype(np.int64))
        block[ends[ends < size]] = ord("\n")
        block[-1] = ord("\n")
        (folder / f"part-{index:04d}.txt").write_bytes(block.tobytes())
        written += size
        index += 1
    return written


@contextlib.contextmanager
def work_folder(parent: Path, prefix: str, keep: bool):
    """A new folder under ``parent`` for a benchmark's corpora and runs, removed at the end
    (an error included) unless ``keep``."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield tmp
    finally:
        if keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def minrnn(*args: str) -> list[str]:
    return [sys.executable, "-m", "minrnn", *args]


def _status(pid: int) -> dict[str, int]:
    """RssAnon and RssFile (KiB) of process ``pid`` now; {} once it has gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in lines) if k in ("RssAnon", "RssFile")}


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` as a child: its wall time, its peak resident memory (MiB: ru_maxrss of that
    child, from os.wait4) and, sampled every 20 ms from /proc, the peaks of its two parts:
    anonymous memory (what the process allocates) and file-backed pages (the memory-mapped
    shards' pages it has touched, and the libraries: page cache, which the kernel may reclaim)."""
    t0 = time.perf_counter()
    peaks = {"RssAnon": 0, "RssFile": 0}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            for k, v in _status(proc.pid).items():
                peaks[k] = max(peaks[k], v)
            time.sleep(0.02)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {code}); its output: {log}")
    return {"command": " ".join(["minrnn", *cmd[3:]]), "wall_s": round(wall, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # KiB on Linux
            "peak_anon_mib": round(peaks["RssAnon"] / 1024, 1), "peak_file_mib": round(peaks["RssFile"] / 1024, 1)}


def step_times(run_dir: Path) -> list[float]:
    """Each step's training time (s) from metrics.jsonl's cumulative wall_s."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    walls = [0.0] + [r["wall_s"] for r in rows]
    return [b - a for a, b in zip(walls, walls[1:])]


def train(data: Path, out: Path, steps: int, threads: int) -> dict:
    cmd = minrnn("train", PRESET, "--data", str(data), "--steps", str(steps), "--out_dir", str(out),
                 "--progress", "never", "--plot", "false", "--sample_tokens", "0")
    if threads:
        cmd += ["--threads", str(threads)]
    result = run_measured(cmd, out.with_suffix(".log"))
    times = step_times(out)
    # the first steps compile and warm caches: the median of the rest
    result["median_step_s"] = statistics.median(times[5:] if len(times) > 10 else times)
    return result


def batch_times(prepared: Path, repeats: int, pack: bool) -> float:
    """Median seconds of TextWorkload.batch at the preset's batch shape on ``prepared``."""
    from minrnn.data.shards import PreparedData
    from minrnn.training.config import TrainConfig, find_config
    from minrnn.training.loop import prepared_tokenizer
    from minrnn.training.workloads import prepared_workload

    config = TrainConfig.from_file(find_config(PRESET))
    data = PreparedData.open(prepared, verify=False)
    work = prepared_workload(data, prepared_tokenizer(data), seq_len=config.seq_len, batch_size=config.batch_size,
                             seed=config.seed, pack_documents=pack)
    times = []
    for step in range(repeats):
        t0 = time.perf_counter()
        work.batch(step, 0)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.0, help="size of the large corpus in GB (default 1)")
    ap.add_argument("--steps", type=int, default=50, help="training steps of each run (default 50)")
    ap.add_argument("--batches", type=int, default=300, help="calls of TextWorkload.batch timed (default 300)")
    ap.add_argument("--threads", type=int, default=0, help="--threads of the training runs (0: torch's default)")
    ap.add_argument("--work", type=Path, default=Path("runs"), help="where the temporary folder goes (default runs/)")
    ap.add_argument("--keep", action="store_true", help="keep the corpora, prepared folders and runs")
    ap.add_argument("--out", type=Path, default=Path("runs/data_memory/results.json"))
    args = ap.parse_args(argv)

    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "preset": PRESET, "steps": args.steps, "runs": {}}
    with work_folder(args.work, "data_memory-", args.keep) as tmp:
        sizes = {"large": int(args.gb * 1000 * MB), "small": MB}
        for name, n in sizes.items():
            t0 = time.perf_counter()
            write_corpus(tmp / f"{name}-text", n)
            print(f"{name}: wrote {n / MB:,.0f} MB of text in {time.perf_counter() - t0:.0f} s", flush=True)
            prep = run_measured(minrnn("prepare", str(tmp / f"{name}-text"), "--tokenizer", "byte",
                                       "--document-per-line", "--out", str(tmp / f"{name}-prepared"),
                                       "--progress", "never"), tmp / f"{name}-prepare.log")
            print(f"{name}: prepared in {prep['wall_s']:.0f} s", flush=True)
            manifest = json.loads((tmp / f"{name}-prepared" / "manifest.json").read_text())
            run = train(tmp / f"{name}-prepared", tmp / f"{name}-run", args.steps, args.threads)
            run.update(corpus_bytes=n, tokens={s: v["tokens"] for s, v in manifest["splits"].items()},
                       documents={s: v["documents"] for s, v in manifest["splits"].items()}, prepare=prep)
            results["runs"][f"prepared {n / MB:,.0f} MB"] = run
            print(f"{name}: peak RSS {run['peak_rss_mib']:.0f} MiB, median step {run['median_step_s'] * 1e3:.0f} ms",
                  flush=True)
        # the in-memory path on the small corpus (one text file), for reference
        text = tmp / "small.txt"
        text.write_bytes(b"".join(p.read_bytes() for p in sorted((tmp / "small-text").iterdir())))
        results["runs"]["text file 1 MB (in memory)"] = train(text, tmp / "text-run", args.steps, args.threads)

        large = results["runs"][f"prepared {sizes['large'] / MB:,.0f} MB"]
        small = results["runs"]["prepared 1 MB"]
        results["peak_rss_difference_mib"] = round(large["peak_rss_mib"] - small["peak_rss_mib"], 1)
        for pack in (False, True):
            t = batch_times(tmp / "large-prepared", args.batches, pack)
            key = "batch_packed" if pack else "batch"
            results[f"{key}_median_s"] = t
            results[f"{key}_fraction_of_step"] = t / large["median_step_s"]
    write_json(args.out, results)
    print("\n| run | peak RSS (MiB) | peak anonymous (MiB) | peak file-backed (MiB) | median step (ms) |\n"
          "| --- | ---: | ---: | ---: | ---: |")
    for name, r in results["runs"].items():
        print(f"| {name} | {r['peak_rss_mib']:.0f} | {r['peak_anon_mib']:.0f} | {r['peak_file_mib']:.0f} | "
              f"{r['median_step_s'] * 1e3:.0f} |")
    print(f"\npeak RSS, large minus 1 MB prepared: {results['peak_rss_difference_mib']:.0f} MiB")
    for key, what in (("batch", "a batch"), ("batch_packed", "a batch of packed documents")):
        print(f"{what}: {results[f'{key}_median_s'] * 1e3:.2f} ms, "
              f"{results[f'{key}_fraction_of_step']:.2%} of a training step")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
