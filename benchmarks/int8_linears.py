"""The int8 matrix products one decoding step could use, against float32, at the decode model's
shapes: which kernel ``minrnn.quantize.for_decoding("int8")`` should build on.

    python benchmarks/int8_linears.py --threads 1 --repeats 9

One batch-1 pass through the step's weight matrices of the decode suite's minGRU model
(``minrnn bench --suite decode``: per block its input projection D -> 2E, output projection
E -> D, MLP up D -> M and down M -> D, and the LM head), each way taking turns in one process;
the median over repeats of the mean over ``--passes`` passes:

    float32              F.linear on float32 weights (what the model does without conversion)
    torch dynamic int8   torch.ao.quantization.quantize_dynamic: int8 weights, the activation
                         quantized per call, an int8 product (fbgemm)
    int8pack weight-only torch._weight_int8pack_mm: int8 weights with a scale per output
                         channel, float32 activations
    torchao ...          torchao's Int8WeightOnlyConfig and Int8DynamicActivationInt8WeightConfig
                         through ``torchao.quantization.quantize_``, when torchao is installed

Also printed: the weights' bytes in float32 and int8, and what reading them once from memory
takes at the copy bandwidth measured here (``minrnn.bench.measure.copy_bandwidth``, as the scan
suite measures it), the floor of a step that does nothing else. Writes the figures to --out
(default runs/int8_linears.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn


def decode_shapes(width: int, layers: int, vocab: int) -> list[tuple[int, int]]:
    """(in, out) of every weight matrix one step of the decode suite's minGRU model multiplies."""
    from minrnn.experiments.baselines import build_model

    model = build_model("mingru", vocab, None, hidden_size=width, num_hidden_layers=layers).model
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


class Int8PackLinear(nn.Module):
    """int8 weights with one scale per output channel, through torch._weight_int8pack_mm."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(1).clamp_min(1e-12) / 127
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, x):
        return torch._weight_int8pack_mm(x, self.weight, self.scale)


def variants(stack: nn.ModuleList) -> dict[str, nn.Module]:
    out = {"float32": stack}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        out["torch dynamic int8"] = quantize_dynamic(copy.deepcopy(stack), {nn.Linear}, dtype=torch.qint8)
    out["int8pack weight-only"] = nn.ModuleList(Int8PackLinear(m) for m in stack)
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        return out
    for name, config in (("torchao int8 weight-only", Int8WeightOnlyConfig()),
                         ("torchao int8 dynamic", Int8DynamicActivationInt8WeightConfig())):
        model = copy.deepcopy(stack)
        quantize_(model, config)
        out[name] = model
    return out


def main(argv=None) -> dict:
    from minrnn.bench.measure import copy_bandwidth
    from minrnn.bench.settings import Settings

    s = Settings()  # the decode suite's model by default
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--passes", type=int, default=50)
    p.add_argument("--width", type=int, default=s.decode_width)
    p.add_argument("--layers", type=int, default=s.decode_layers)
    p.add_argument("--vocab", type=int, default=s.decode_vocab)
    p.add_argument("--out", default="runs/int8_linears.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = decode_shapes(args.width, args.layers, args.vocab)
    stack = nn.ModuleList(nn.Linear(i, o, bias=False) for i, o in shapes).eval()
    ways = variants(stack)
    x = {i: torch.randn(1, i) for i, _ in shapes}

    def one_pass(model):
        for m, (i, _) in zip(model, shapes):
            m(x[i])

    times = {name: [] for name in ways}
    with torch.inference_mode():
        for model in ways.values():
            for _ in range(5):
                one_pass(model)
        for _ in range(args.repeats):
            for name, model in ways.items():  # taking turns, so drift hits every way alike
                start = time.perf_counter()
                for _ in range(args.passes):
                    one_pass(model)
                times[name].append((time.perf_counter() - start) / args.passes * 1e3)
    n_weights = sum(i * o for i, o in shapes)
    gbs = copy_bandwidth(s.copy_bytes, s.copy_repeats)["gbps"]
    result = {
        "command": " ".join(["python", "benchmarks/int8_linears.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "threads": args.threads, "matrices": len(shapes),
        "weights": n_weights, "copy_gbs": gbs,
        "floor_ms": {"float32": n_weights * 4 / gbs / 1e6, "int8": n_weights / gbs / 1e6},
        "ms": {name: statistics.median(t) for name, t in times.items()}, "repeats": times,
    }
    base = result["ms"]["float32"]
    print(f"{len(shapes)} matrices, {n_weights / 1e6:.2f}M weights; copy bandwidth {gbs:.1f} GB/s; reading the "
          f"weights once: float32 {result['floor_ms']['float32']:.3f} ms, int8 {result['floor_ms']['int8']:.3f} ms")
    print("| products | ms per step | float32 / this |\n|---|---|---|")
    for name, ms in result["ms"].items():
        print(f"| {name} | {ms:.3f} | {base / ms:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
