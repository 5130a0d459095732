"""Throughput of `minrnn prepare` (MB of text per second) by tokenizer and --workers.

    python benchmarks/prepare_throughput.py --mb 64 --repeats 3

Writes a synthetic corpus (``--mb`` MB of UTF-8 text: words drawn from a fixed vocabulary,
documents of log-normally varying length, one text file each, in a few folders), then runs
the `minrnn prepare` command on it, each as its own process, timed from start to exit:

    byte          --tokenizer byte
    bpe (trained) --tokenizer bpe: trains the BPE on the train split, then tokenizes
    bpe (folder)  --tokenizer DIR: the tokenizer the bpe run saved, loaded as any AutoTokenizer folder

each at ``--workers`` 1 and 2 (``--workers-list``), configurations taking turns within each
repeat; the median over repeats is reported, of the wall time and of the CPU time (user +
system, the workers' included: on a machine shared with other jobs the wall time depends on
them, the CPU time much less). Beside them, what the machine allows: a plain
read of the corpus files (page cache, as `cat` reads them) and writing as many bytes as the
byte run writes with fsync (the disk). The startup of the command (a prepare of a one-line
corpus) is measured too: it is part of every figure. The table goes to stdout, the JSON of
every repeat to ``--out`` (default runs/prepare_throughput/results.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from minrnn.bench.suites import _cpu_name  # the CPU's name as minrnn bench records it

MB = 1_000_000


def write_corpus(folder: Path, mb: float, seed: int = 0) -> tuple[int, int]:
    """``mb`` MB of text in files of one document each; returns (bytes, documents)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    vocab = ["".join(rng.choice(letters, size=int(rng.integers(1, 11)))) for _ in range(5000)]
    # Zipf-like word frequencies, as in natural text
    p = 1.0 / np.arange(1, len(vocab) + 1)
    p /= p.sum()
    folder.mkdir(parents=True, exist_ok=True)
    total, docs = 0, 0
    while total < mb * MB:
        n_words = int(np.clip(rng.lognormal(7.0, 1.2), 20, 200_000))  # median ~1,100 words
        words = rng.choice(len(vocab), size=n_words, p=p)
        lines = [" ".join(vocab[w] for w in words[i:i + 12]) for i in range(0, n_words, 12)]
        text = "\n".join(lines) + "\n"
        path = folder / f"part{docs // 1000:03d}" / f"doc{docs:06d}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        total += len(text.encode("utf-8"))
        docs += 1
    return total, docs


def read_speed(folder: Path) -> float:
    """Seconds to read every file of ``folder`` (as `cat` does), after one warm-up read."""
    files = sorted(folder.rglob("*.txt"))

    def read_all():
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(1 << 20):
                    pass

    read_all()
    t = time.perf_counter()
    read_all()
    return time.perf_counter() - t


def write_speed(folder: Path, nbytes: int) -> float:
    """Seconds to write ``nbytes`` to a new file and fsync it."""
    path = folder / "write-test.bin"
    block = np.random.default_rng(0).integers(0, 256, size=1 << 22, dtype=np.uint8).tobytes()
    t = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(block[:min(left, len(block))])
            left -= len(block)
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - t
    path.unlink()
    return elapsed


def run_prepare(args: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one `minrnn prepare` process, start to exit; the CPU time
    (user + system) includes its worker processes."""
    cmd = [sys.executable, "-m", "minrnn", "prepare", *args, "--progress", "never", "--overwrite"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=64, help="corpus size in MB (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median; default 3)")
    p.add_argument("--workers-list", type=int, nargs="+", default=[1, 2], help="--workers values (default 1 2)")
    p.add_argument("--bpe-vocab-size", type=int, default=8192)
    p.add_argument("--work", type=Path, default=Path("runs/prepare_throughput"),
                   help="where the corpus and the prepared folders go (default runs/prepare_throughput)")
    p.add_argument("--out", type=Path, default=None, help="the JSON (default WORK/results.json)")
    args = p.parse_args()

    work = args.work
    corpus = work / "corpus"
    if corpus.exists():
        shutil.rmtree(corpus)
    print(f"writing a {args.mb:g} MB corpus to {corpus} ...", file=sys.stderr, flush=True)
    nbytes, ndocs = write_corpus(corpus, args.mb)
    tiny = work / "tiny.txt"
    tiny.write_text("one line\n")

    bpe_dir = work / "bpe-folder-tokenizer"
    configs = {"byte": ["--tokenizer", "byte"],
               "bpe (trained)": ["--tokenizer", "bpe", "--bpe-vocab-size", str(args.bpe_vocab_size)],
               "bpe (folder)": ["--tokenizer", str(bpe_dir)]}
    # the folder tokenizer is the one a bpe run saves: make it once, untimed
    run_prepare([str(corpus), *configs["bpe (trained)"], "--out", str(work / "make-tokenizer")])
    if bpe_dir.exists():
        shutil.rmtree(bpe_dir)
    shutil.copytree(work / "make-tokenizer" / "tokenizer", bpe_dir)

    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    tokens: dict[str, int] = {}
    startup = []
    for r in range(args.repeats):
        startup.append(run_prepare([str(tiny), "--tokenizer", "byte", "--valid-fraction", "0",
                                    "--out", str(work / "tiny-out")])[0])
        for name, extra in configs.items():
            for w in args.workers_list:
                key = f"{name} | {w}"
                out = work / f"out-{name.split()[0]}{'-folder' if 'folder' in name else ''}-w{w}"
                print(f"repeat {r + 1}/{args.repeats}: {key}", file=sys.stderr, flush=True)
                wall, cpu_s = run_prepare([str(corpus), *extra, "--workers", str(w), "--out", str(out)])
                times.setdefault(key, []).append(wall)
                cpu.setdefault(key, []).append(cpu_s)
                manifest = json.loads((out / "manifest.json").read_text())
                tokens[key] = sum(s["tokens"] for s in manifest["splits"].values())

    byte_out = work / f"out-byte-w{args.workers_list[0]}"
    written = sum(f.stat().st_size for f in byte_out.iterdir() if f.is_file())
    read_s = read_speed(corpus)
    write_s = statistics.median(write_speed(work, written) for _ in range(3))
    command = "python benchmarks/prepare_throughput.py " + " ".join(sys.argv[1:])
    result = {
        "command": command, "date": datetime.date.today().isoformat(), "cpu": _cpu_name(), "cores": os.cpu_count(),
        "python": platform.python_version(), "corpus_bytes": nbytes, "documents": ndocs,
        "startup_s": startup, "read_s": read_s, "write_bytes": written, "write_s": write_s,
        "runs": {k: {"seconds": v, "cpu_seconds": cpu[k], "tokens": tokens[k]} for k, v in times.items()},
    }
    out = args.out or work / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"corpus: {nbytes / MB:.1f} MB, {ndocs} documents; {result['cpu']}, {result['cores']} cores\n")
    print("| tokenizer | --workers | seconds (median) | MB/s | tokens/s | CPU seconds (median) | MB per CPU second |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key, v in times.items():
        name, w = key.split(" | ")
        s, c = statistics.median(v), statistics.median(cpu[key])
        print(f"| {name} | {w} | {s:.1f} | {nbytes / MB / s:.1f} | {tokens[key] / s / 1e6:.2f} M | {c:.1f} | "
              f"{nbytes / MB / c:.1f} |")
    print(f"\nstartup of the command (a one-line corpus): {statistics.median(startup):.1f} s, part of every run")
    print(f"reading the corpus files (page cache): {nbytes / MB / read_s:.0f} MB/s; "
          f"writing {written / MB:.0f} MB with fsync (the byte run's output): {written / MB / write_s:.0f} MB/s")
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
