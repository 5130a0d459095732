"""How many steps the selective_copying cpu preset's models need: a few short runs of the
preset with the span L and the learning rate changed, accuracy every 250 steps.

    python benchmarks/selective_copying_calibration.py --device cuda --budget-s 42

Used once on a lent H100 (2026-11-27, output in results/selective_copying-calibration-h100.txt)
to size the cpu preset: each run is capped at --budget-s seconds of training.
"""
import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import minrnn.experiments.compare as C
from minrnn.experiments.presets import load_preset

RUNS = [("mingru", 256, 1e-3), ("llama", 256, 1e-3), ("mingru", 64, 1e-3), ("mingru", 256, 3e-3)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget-s", type=float, default=42.0)
    ap.add_argument("--steps", type=int, default=3000)
    args = ap.parse_args()
    base = load_preset("selective_copying", "cpu")
    for model, span, lr in RUNS:
        preset = dataclasses.replace(base, data={**base.data, "length": span},
                                     common={**base.common, "max_length": span + 16},
                                     train={**base.train, "lr": lr, "min_lr": lr / 10})
        C.load_preset = lambda *a, p=preset: p
        spec = C.RunSpec("selective_copying", "cpu", model, args.steps, device=args.device, eval_every=250,
                         budget_s=args.budget_s)
        t = time.time()
        with tempfile.TemporaryDirectory() as d:
            r = C.train_run(spec, Path(d), log=lambda s: None, progress=False)
        print(model, "L", span, "lr", lr, "steps", r["steps"],
              "acc", [round(h["val_accuracy"], 3) for h in r["history"]],
              "test", round(r["final_split"]["accuracy"], 3), f"{time.time() - t:.0f}s", flush=True)


if __name__ == "__main__":
    main()
