"""One training step of `minrnn compare`'s language models at a preset's shapes, and how much
of it is matrix products.

    python benchmarks/lm_training_step.py --experiment shakespeare_char --preset cpu \
        --models mingru,minlstm,lstm,llama --threads 2 --repeats 7

Each model is built as `minrnn compare` builds it for that preset (same parameter budget), and
trained on one fixed random batch of the preset's shape: forward, cross-entropy, backward, grad
clipping and AdamW, as the engine does (AdamW's fused kernel, the engine's default; ``--optimizer
plain``: its per-tensor loop, the engine's ``fused_optimizer = false``; ``both``: each model
twice, a row per optimiser, from the same
weights; ``--compile both``: a row for each model through ``torch.compile`` too, compiled during the
untimed steps; ``--norm torch``: the minRNN models' RMSNorms through the torch reference instead of
their CPU kernels, ``both``: a row for each; ``--variant mingru.width=120``: also the model built
with that option on top of the preset's, as ``minrnn compare --set`` builds it). The models take turns within each repeat (so a
slower minute of the machine hits all of them) and the median over repeats of each model's
median step is reported, with:

    matmul params   the weights of its matrix products (embedding lookups excluded); forward and
                    backward cost 6 x that many multiply-adds per token, the same for every model
                    at the same budget
    GEMMs alone     every nn.Linear call of one step (forward, grad of the input, grad of the
                    weight) replayed alone on tensors of the step's shapes: the floor of a step
                    built from those products (nn.LSTM's are inside its kernel: not shown)
    rest            step - GEMMs alone: norms, activations, the recurrence, the optimiser, ...

The JSON of every repeat goes to --out (default runs/lm_training_step.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def _build(experiment: str, preset_name: str, models: list[str], data_dir: str | None, options: dict | None = None):
    from minrnn.experiments.plan import CompareConfig, plan_runs
    from minrnn.experiments.presets import load_preset
    from minrnn.experiments.runner import build_run_model, make_workload

    preset = load_preset(experiment, preset_name)
    specs = plan_runs(CompareConfig(experiment, preset_name, models=models, sweep=False, data_dir=data_dir,
                                    options=options or {}))
    work = make_workload(preset, specs[0])
    built = {}
    for spec in specs:
        torch.manual_seed(0)
        built[spec.model] = build_run_model(spec, preset, work)
    return built, work.vocab_size, preset.train


def _matmul_params(model: nn.Module) -> int:
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    heads = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    # a tied head multiplies by the embedding's matrix: counted once, as a product
    return sum(p.numel() for p in model.parameters() if p.dim() >= 2 and (id(p) not in embeddings or id(p) in heads))


def _linear_calls(model: nn.Module, step) -> list[tuple[torch.Size, nn.Linear]]:
    """(input shape, module) of every nn.Linear call in one step."""
    calls, hooks = [], []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(lambda mod, inp, out: calls.append((inp[0].shape, mod))))
    try:
        step()
    finally:
        for h in hooks:
            h.remove()
    return calls


def _gemm_replay(calls):
    """A function doing each call's three products (y = x W^T, dx = dy W, dW = dy^T x)."""
    work = []
    for shape, mod in calls:
        w = mod.weight.detach()
        x = torch.randn(shape).reshape(-1, shape[-1])
        dy = torch.randn(x.shape[0], w.shape[0])
        work.append((x, w, dy))

    def replay():
        for x, w, dy in work:
            F.linear(x, w)
            dy @ w
            dy.t() @ x
    return replay


def _with_norm_backend(model: nn.Module, backend: str) -> nn.Module:
    """A copy of ``model`` whose MinRNNRMSNorms run ``minrnn.ops.norm.rms_norm(backend=...)``;
    "torch" is the reference's torch ops, which the "sequential" backend runs."""
    from minrnn.models.modeling_minrnn import MinRNNRMSNorm
    from minrnn.ops.norm import rms_norm

    backend = "sequential" if backend == "torch" else backend
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, MinRNNRMSNorm):
            m.forward = lambda x, m=m: rms_norm(x, m.weight, m.eps, backend=backend)
    return model


def _has_rms_norm(model: nn.Module) -> bool:
    from minrnn.models.modeling_minrnn import MinRNNRMSNorm

    return any(isinstance(m, MinRNNRMSNorm) for m in model.modules())


def _trainer_step(model: nn.Module, ids: torch.Tensor, vocab: int, clip: float, fused: bool = True):
    from minrnn.training.config import TrainConfig
    from minrnn.training.loop import build_optimizer

    # the engine's AdamW (parameter groups, settings) at the train config's defaults
    opt = build_optimizer(model, TrainConfig(fused_optimizer=fused), torch.device("cpu"))

    def step():
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return step


def _median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="shakespeare_char")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--models", default="mingru,minlstm,lstm,llama", help="comma-separated, of the preset's")
    p.add_argument("--threads", type=int, default=None, help="torch (and numba) threads; default: every core")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat (after 3 untimed)")
    p.add_argument("--optimizer", choices=["plain", "fused", "both"], default="fused",
                   help="AdamW's fused kernel (the engine's default), its per-tensor loop (plain: the engine's "
                        "fused_optimizer = false), "
                        "or a row for each")
    p.add_argument("--norm", choices=["kernel", "torch", "both"], default="kernel",
                   help="the minRNN models' RMSNorm: the library's default (kernels on float32 CPU tensors), "
                        "the torch reference, or a row for each")
    p.add_argument("--variant", action="append", default=[], metavar="MODEL.KEY=VALUE",
                   help="also time MODEL built with this option on top of the preset's (compare's --set, e.g. "
                        "mingru.width=120), as a row of its own; repeatable")
    p.add_argument("--compile", choices=["eager", "compiled", "both"], default="eager",
                   help="run each model as it is, through torch.compile (default mode, inductor; compiled "
                        "during the untimed steps), or a row for each")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile's backend for the compiled rows (default inductor)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="runs/lm_training_step.json")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.steps < 1:
        p.error(f"--repeats and --steps must be >= 1, got {args.repeats} and {args.steps}")
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
        try:  # the cpu backend's kernels run on numba's own pool
            import numba

            numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
        except ImportError:
            pass
    wanted = [m for m in args.models.split(",") if m]
    experiment = args.experiment.replace("-", "_")
    built, vocab, train = _build(experiment, args.preset, wanted, args.data_dir)
    for item in args.variant:
        from minrnn.experiments.plan import CompareError, parse_options

        try:
            ((model, option),) = parse_options([item]).items()
            name = f"{model} ({item.partition('.')[2]})"
            built[name] = _build(experiment, args.preset, [model], args.data_dir, {model: option})[0][model]
        except (CompareError, ValueError) as e:  # a malformed option, or a model off the preset's budget
            p.error(f"--variant: {e}")
        wanted.append(name)
    optimizers = {"plain": [False], "fused": [True], "both": [True, False]}[args.optimizer]
    norms = {"kernel": ["auto"], "torch": ["torch"], "both": ["auto", "torch"]}[args.norm]
    models, fused_of = {}, {}
    for n in wanted:
        for norm in norms if _has_rms_norm(built[n]) else ["auto"]:
            for fused in optimizers:
                name = n + (" + torch RMSNorm" if norm == "torch" and args.norm == "both" else "") + (
                    " + AdamW loop" if not fused and args.optimizer == "both" else "")
                # every variant from the same weights
                models[name] = copy.deepcopy(built[n]) if norm == "auto" else _with_norm_backend(built[n], norm)
                fused_of[name] = fused
    if args.compile != "eager":
        for name in list(models):
            models[name + " (torch.compile)"] = copy.deepcopy(models[name])  # the same weights
            fused_of[name + " (torch.compile)"] = fused_of[name]
            if args.compile == "compiled":
                del models[name], fused_of[name]
    names = list(models)
    B, T = train["batch_size"], train["seq_len"]
    ids = torch.randint(0, vocab, (B, T + 1), generator=torch.Generator().manual_seed(0))
    steps = {n: _trainer_step(torch.compile(m.train(), backend=args.compile_backend) if n.endswith("(torch.compile)") else m.train(), ids, vocab,
                              train.get("grad_clip", 0.0), fused_of[n])
             for n, m in models.items()}
    replays = {}
    for n, m in models.items():
        if n.endswith("(torch.compile)"):  # the GEMMs are the eager row's; hooks would recompile the graph
            replays[n] = None
            continue
        calls = _linear_calls(m, steps[n])
        replays[n] = _gemm_replay(calls) if calls and not any(isinstance(x, nn.RNNBase) for x in m.modules()) else None
    for n in names:
        for _ in range(3):
            steps[n]()
    found = {n: {"step_ms": [], "gemm_ms": []} for n in names}
    for _ in range(args.repeats):
        for n in names:
            found[n]["step_ms"].append(_median_ms(steps[n], args.steps))
            if replays[n] is not None:
                found[n]["gemm_ms"].append(_median_ms(replays[n], args.steps))
    rows = []
    for n in names:
        step_ms = statistics.median(found[n]["step_ms"])
        gemm_ms = statistics.median(found[n]["gemm_ms"]) if found[n]["gemm_ms"] else None
        mm = _matmul_params(models[n])
        rows.append({"model": n, "params": sum(p.numel() for p in models[n].parameters()), "matmul_params": mm,
                     "step_ms": step_ms, "tokens_per_s": B * T / (step_ms / 1e3),
                     "gemm_ms": gemm_ms, "rest_ms": None if gemm_ms is None else step_ms - gemm_ms,
                     "gflops": 6 * mm * B * T / (step_ms / 1e3) / 1e9,
                     "step_ms_repeats": found[n]["step_ms"], "gemm_ms_repeats": found[n]["gemm_ms"]})
    head = ["model", "params", "matmul params", "ms / step", "tokens/s", "GEMMs alone ms", "rest ms",
            "GFLOP/s (6 x matmul params x tokens)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        g = "-" if r["gemm_ms"] is None else f"{r['gemm_ms']:.1f}"
        rest = "-" if r["rest_ms"] is None else f"{r['rest_ms']:.1f}"
        lines.append(f"| {r['model']} | {r['params']:,} | {r['matmul_params']:,} | {r['step_ms']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {g} | {rest} | {r['gflops']:.1f} |")
    table = "\n".join(lines)
    meta = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "batch": B, "seq_len": T, "experiment": args.experiment,
            "preset": args.preset, "variants": args.variant, "repeats": args.repeats, "steps": args.steps,
            "optimizer": args.optimizer, "norm": args.norm, "compile": args.compile,
            "compile_backend": args.compile_backend}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "markdown": table}, indent=1))
    print(f"{args.experiment} / {args.preset}: batch {B} x {T} tokens, {meta['threads']} threads, "
          f"AdamW: {args.optimizer}; RMSNorm: {args.norm}; "
          f"median of {args.repeats} repeats of {args.steps} steps\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
