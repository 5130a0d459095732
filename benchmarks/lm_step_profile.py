"""Training steps of comparison models on CPU: their times side by side, and where each goes.

    python benchmarks/lm_step_profile.py mingru                        # the Shakespeare cpu preset's size
    python benchmarks/lm_step_profile.py llama mingru minlstm --top 0  # times only
    python benchmarks/lm_step_profile.py llama mingru mingru:width=120 mingru:use_conv=False --top 0

Each model is built as `minrnn compare` builds it (``build_model(name, vocab, target_params,
**overrides)``; ``name:key=value,...`` adds overrides, values read as Python literals, and a
``width`` override builds that width instead of matching the budget). One step = forward,
cross-entropy, backward, gradient clipping, AdamW on random tokens of the preset's batch shape,
as in compare. After warm-up, each round times every model ``--per-round`` times in turn, so
a slow spell of the machine hits them all alike; the table gives the median ms per step and
its ratio to the first model's. Then, unless ``--top 0``, torch.profiler's table of the ops
that take the most self time in 20 steps of each model.
"""

from __future__ import annotations

import argparse
import ast
import statistics
import time

import torch


def parse_model(text: str) -> tuple[str, dict]:
    """"mingru:width=120,use_conv=False" -> ("mingru", {"width": 120, "use_conv": False})."""
    name, _, rest = text.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"override {item!r} of {text!r} is not key=value")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return name, overrides


def main(argv=None) -> int:
    from minrnn.experiments.baselines import build_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="mingru, minlstm, llama, gpt2, mamba, lstm or gru, optionally "
                    "with :key=value,... overrides; the first is the baseline of the ratios")
    ap.add_argument("--vocab", type=int, default=65)
    ap.add_argument("--target-params", type=int, default=810_000)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--per-round", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--top", type=int, default=12, help="rows of each profiler table (0: no profile)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            import numba
            numba.set_num_threads(args.threads)
        except ImportError:
            pass
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    entries = []
    for text in args.models:
        name, overrides = parse_model(text)
        torch.manual_seed(0)
        target = None if "width" in overrides else args.target_params
        model = build_model(name, args.vocab, target, max_length=args.seq_len, **overrides)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt):
            loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, args.vocab), y.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(args.warmup):
            step()
        entries.append((text, model.baseline, step, []))
    for _ in range(args.rounds):
        for _, _, step, times in entries:
            for _ in range(args.per_round):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
    print(f"batch {args.batch} x {args.seq_len}, {torch.get_num_threads()} threads, median of "
          f"{args.rounds * args.per_round} interleaved steps\n")
    print("| model | width | params | ms / step | x first |")
    print("|---|---|---|---|---|")
    first = statistics.median(entries[0][3])
    for text, info, _, times in entries:
        med = statistics.median(times)
        print(f"| {text} | {info.width} | {info.params:,} | {1e3 * med:.2f} | {med / first:.3f} |")
    if args.top > 0:
        from torch.profiler import ProfilerActivity, profile

        for text, _, step, _ in entries:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(20):
                    step()
            print(f"\n{text}, 20 steps:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top,
                                            max_name_column_width=40))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
