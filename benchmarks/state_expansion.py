"""What a bigger state costs: the minGRU language model of the Shakespeare cpu preset's budget at
state_expansion n = 1 (the paper's minGRU) and each n given, in one process, interleaved.

For each n, built by ``minrnn.experiments.baselines.build_model`` to the preset's parameter count
(the harness's sizing): a training step (forward, backward and AdamW at the preset's batch and
context), the same for the expanded mixer's two sequence methods (the scan over the state's entries,
"states", and the chunkwise form, "chunked"), decoding tokens/s (batch 1, one token per forward
from the cache), and the recurrent state per sequence (bytes, all layers: what the cache holds
whatever the context's length). Medians over ``--rounds`` rounds, each round running every
variant once, so that a machine's load drifts over all of them alike.

``--decode-only`` times decoding alone, for each n > 1 twice: with the expanded step's compiled
kernel (what runs on the CPU without autograd) and with its torch operations (what runs where the
kernel does not apply: a GPU, half precision, autograd).

    python benchmarks/state_expansion.py --n 4 8 16 --rounds 5 --threads 1 --out runs/state_expansion.json
    python benchmarks/state_expansion.py --n 4 8 16 --decode-only --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from unittest import mock

import torch


def build(n: int, method: str):
    from minrnn.experiments.baselines import build_model

    extra = {} if n == 1 else {"state_expansion": n}
    model = build_model("mingru", 65, 806_106, max_length=64, **extra)
    for layer in model.model.model.layers:
        if hasattr(layer.mixer, "method"):
            layer.mixer.method = method
    return model


def lm(model):
    """The MinRNNForCausalLM inside the harness's logits-only wrapper."""
    return model.model


def train_step_s(model, opt, ids) -> float:
    t = time.perf_counter()
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


@torch.no_grad()
def decode_tokens_per_s(model, tokens: int) -> tuple[float, int]:
    from minrnn.models import MinRNNCache

    inner = lm(model).eval()
    cache = MinRNNCache(inner.config)
    ids = torch.zeros(1, 1, dtype=torch.long)
    inner(input_ids=ids, cache=cache, use_cache=True)  # the first step allocates the state
    t = time.perf_counter()
    for _ in range(tokens):
        ids = inner(input_ids=ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    elapsed = time.perf_counter() - t
    inner.train()
    state = sum(layer.recurrent_states[0].numel() * layer.recurrent_states[0].element_size() for layer in cache.layers)
    return tokens / elapsed, state


def torch_step():
    """A context in which the expanded mixer's step runs its torch operations, not the kernel."""
    from minrnn.models import modules_minrnn

    return mock.patch.object(modules_minrnn, "expanded_step_fused", lambda *args: None)


def decode_only(args) -> list[dict]:
    """Decoding tokens/s at n = 1 and each n (kernel, torch step), interleaved over the rounds."""
    variants = [(1, "-")] + [(n, step) for n in args.n for step in ("kernel", "torch")]
    models = {n: build(n, "states") for n in [1, *args.n]}
    tps, state = {v: [] for v in variants}, {}
    for _ in range(args.rounds):
        for v in variants:
            with torch_step() if v[1] == "torch" else contextlib.nullcontext():
                t, state[v[0]] = decode_tokens_per_s(models[v[0]], args.tokens)
            tps[v].append(t)
    base = statistics.median(tps[(1, "-")])
    print("| n | step | params | decode tokens/s | x n=1 | state bytes / sequence |")
    print("|---|---|---|---|---|---|")
    rows = []
    for v in variants:
        dec = statistics.median(tps[v])
        rows.append(dict(n=v[0], step=v[1], params=models[v[0]].baseline.params, decode_tokens_per_s=dec,
                         state_bytes=state[v[0]]))
        print(f"| {v[0]} | {v[1]} | {rows[-1]['params']:,} | {dec:.0f} | {dec / base:.2f} | {state[v[0]]:,} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[4, 8, 16], help="state_expansion values besides 1")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per round (after 2 warm-up)")
    parser.add_argument("--tokens", type=int, default=200, help="decoded tokens per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--decode-only", action="store_true",
                        help="time decoding alone, with the expanded step's kernel and with its torch operations")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.decode_only:
        rows = decode_only(args)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(args=vars(args), rows=rows), f, indent=1)
        return
    variants = [(1, "-")] + [(n, m) for n in args.n for m in ("states", "chunked")]
    models, opts = {}, {}
    for v in variants:
        models[v] = build(*v)
        opts[v] = torch.optim.AdamW(models[v].parameters(), lr=1e-3)
    ids = torch.randint(0, 65, (12, 65))
    step = {v: [] for v in variants}
    decode = {v: [] for v in variants}
    state = {}
    for _ in range(args.rounds):
        for v in variants:
            for i in range(args.steps + 2):
                s = train_step_s(models[v], opts[v], ids)
                if i >= 2:
                    step[v].append(s)
            if v[1] != "chunked":  # decoding runs the step, the same for both methods
                tps, state[v] = decode_tokens_per_s(models[v], args.tokens)
                decode[v].append(tps)
    base_step, base_dec = statistics.median(step[(1, "-")]), statistics.median(decode[(1, "-")])
    rows = []
    print("| n | method | params | train step ms | x n=1 | decode tokens/s | x n=1 | state bytes / sequence |")
    print("|---|---|---|---|---|---|---|---|")
    for v in variants:
        ms = statistics.median(step[v]) * 1000
        dec = statistics.median(decode[v]) if decode[v] else None
        row = dict(n=v[0], method=v[1], params=models[v].baseline.params, width=models[v].baseline.width,
                   train_step_ms=ms, decode_tokens_per_s=dec, state_bytes=state.get(v))
        rows.append(row)
        dec_s = f"{dec:.0f} | {dec / base_dec:.2f}" if dec else "- | -"
        print(f"| {v[0]} | {v[1]} | {row['params']:,} | {ms:.1f} | {ms / (base_step * 1000):.2f} | {dec_s} | "
              f"{state[(v[0], '-' if v[0] == 1 else 'states')]:,} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
