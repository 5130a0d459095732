"""WikiText-2 prepared into token shards trains and evaluates to the in-memory path's losses.

    python benchmarks/prepared_equivalence.py --steps 100 [--data-dir DIR]

The cpu preset of `minrnn compare wikitext2` trains on valid.txt and evaluates on test.txt with
a BPE vocabulary of 2048 learnt from valid.txt. This script:

1. builds that tokenizer as compare does (minrnn.training.workloads.text_tokenizer) and saves
   it as a tokenizer folder;
2. runs ``minrnn prepare --split-files train=valid.txt valid=test.txt --tokenizer FOLDER
   --boundary-token none`` (each file one document: the shards hold the ids of the in-memory
   path; a prepared run trains on the folder's train split and evaluates on its valid split)
   and checks that they do;
3. runs ``minrnn compare wikitext2 --preset cpu --models mingru --steps N`` twice, in memory and
   with ``--data`` the prepared folder, and compares every training loss (metrics.jsonl), every
   validation loss and the loss over the whole test split.

The JSON goes to ``--out`` (default runs/prepared_equivalence/results.json); the work folder
(under runs/) is removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--model", default="mingru")
    ap.add_argument("--data-dir", default=None, help="where wikitext-2/ is (else MINRNN_DATA_DIR)")
    ap.add_argument("--work", type=Path, default=Path("runs"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("runs/prepared_equivalence/results.json"))
    args = ap.parse_args(argv)

    from data_memory import work_folder, write_json  # this folder's: the benchmarks run as scripts

    from minrnn.data.corpora import locate_corpus
    from minrnn.data.shards import PreparedData
    from minrnn.data.text import load_splits
    from minrnn.experiments.presets import load_preset
    from minrnn.training.workloads import text_tokenizer

    data = load_preset("wikitext2", "cpu").data
    train_split, eval_split = data["train_split"], data["eval_split"]
    files = {s: locate_corpus("wikitext-2", s, args.data_dir) for s in (train_split, eval_split)}
    splits = load_splits("wikitext-2", args.data_dir, splits=(train_split, eval_split))
    with work_folder(args.work, "prepared_equivalence-", args.keep) as tmp:
        tokenizer = text_tokenizer(splits, data["tokenizer"], data["bpe_vocab_size"], train_split)
        tokenizer.save(tmp / "tokenizer")
        # the folder's train and valid splits are what a prepared run trains and evaluates on
        names = {train_split: "train", eval_split: "valid"}
        prepare = ["minrnn", "prepare", "--split-files", *(f"{names[s]}={f}" for s, f in files.items()), "--tokenizer",
                   str(tmp / "tokenizer"), "--boundary-token", "none", "--out", str(tmp / "prepared"),
                   "--progress", "never"]
        subprocess.run([sys.executable, "-m", *prepare], check=True)
        prepared = PreparedData.open(tmp / "prepared")
        same_ids = {s: bool(np.array_equal(prepared.split(names[s]).read(0, len(prepared.split(names[s]))),
                                           np.array(tokenizer.encode(splits[s]))))
                    for s in (train_split, eval_split)}
        print(f"the shards hold the in-memory ids: {same_ids}", flush=True)

        env = dict(os.environ, **({"MINRNN_DATA_DIR": args.data_dir} if args.data_dir else {}))
        commands, results = {}, {}
        for name, extra in (("in memory", []), ("prepared", ["--data", str(tmp / "prepared")])):
            out = tmp / name.replace(" ", "-")
            cmd = ["minrnn", "compare", "wikitext2", "--preset", "cpu", "--models", args.model, "--steps",
                   str(args.steps), "--eval-every", str(args.eval_every), "--no-progress", "--out", str(out), *extra]
            subprocess.run([sys.executable, "-m", *cmd], check=True, env=env, stdout=subprocess.DEVNULL)
            run = out / "wikitext2-cpu" / "runs" / args.model
            result = json.loads((run / "result.json").read_text())
            metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            commands[name] = " ".join(cmd)
            results[name] = {"train_loss": [r["train_loss"] for r in metrics],
                             "val_loss": {r["step"]: r["val_loss"] for r in metrics if "val_loss" in r},
                             "test_loss": result["final_split"]["loss"], "data": result["data"]}
        a, b = results["in memory"], results["prepared"]
        summary = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "prepare": " ".join(prepare), "commands": commands, "same_ids": same_ids,
            "train_losses_identical": a["train_loss"] == b["train_loss"],
            "max_train_loss_difference": max(abs(x - y) for x, y in zip(a["train_loss"], b["train_loss"])),
            "val_losses_identical": a["val_loss"] == b["val_loss"],
            "test_losses_identical": a["test_loss"] == b["test_loss"],
            "results": results,
        }
    write_json(args.out, summary)
    print("| step | val loss, in memory | val loss, prepared |\n| ---: | ---: | ---: |")
    for step, loss in a["val_loss"].items():
        print(f"| {step} | {loss:.6f} | {b['val_loss'][step]:.6f} |")
    print(f"| whole test split | {a['test_loss']:.6f} | {b['test_loss']:.6f} |")
    print(f"training losses identical at all {len(a['train_loss'])} steps: {summary['train_losses_identical']} "
          f"(largest difference {summary['max_train_loss_difference']:.3g})")
    print(f"written: {args.out}")
    return 0 if summary["train_losses_identical"] and summary["val_losses_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
