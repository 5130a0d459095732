"""Where one training step of a comparison model goes on CPU (torch.profiler, self time per op).

    python benchmarks/lm_step_profile.py mingru                  # the Shakespeare cpu preset's size
    python benchmarks/lm_step_profile.py llama --threads 2 --top 15

Builds the model as `minrnn compare` does (``build_model(name, vocab, target_params)``), runs
AdamW steps on random tokens of the preset's batch shape, prints the median step time over
``--repeats`` steps and the profiler's table of the ops that take the most self time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv=None) -> int:
    from minrnn.experiments.baselines import build_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="mingru, minlstm, llama, gpt2, mamba, lstm or gru")
    ap.add_argument("--vocab", type=int, default=65)
    ap.add_argument("--target-params", type=int, default=810_000)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            import numba
            numba.set_num_threads(args.threads)
        except ImportError:
            pass
    torch.manual_seed(0)
    model = build_model(args.model, args.vocab, args.target_params, max_length=args.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len))
    y = torch.randint(0, args.vocab, (args.batch, args.seq_len))

    def step():
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, args.vocab), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(10):
        step()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(f"{args.model}: {model.baseline.params:,} parameters, batch {args.batch} x {args.seq_len}, "
          f"{torch.get_num_threads()} threads: median step {1e3 * statistics.median(times):.2f} ms "
          f"over {args.repeats}")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
