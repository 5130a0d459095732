"""A two-minute demo: train a small minGRU character model on tiny shakespeare on the CPU,
then generate from it with the O(1)-per-token step().

    make demo                 (or: python examples/demo_shakespeare.py --steps 300)

It checks as it goes that parallel training and step-by-step decoding are the same model:
the logits of a forward pass over the prompt equal those of feeding it one character at a
time. The full training recipe (checkpoints, configs, evaluation) is ``minrnn train``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import minrnn
from minrnn.data import locate_corpus


class CharMinGRU(nn.Module):
    def __init__(self, vocab: int, width: int = 64, hidden: int = 256, layers: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.rnn = minrnn.MinGRU(width, hidden, num_layers=layers)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, idx, h=None):
        y, h = self.rnn(self.embed(idx), h)
        return self.head(y), h

    def step(self, idx_t, h=None):
        y, h = self.rnn.step(self.embed(idx_t), h)
        return self.head(y), h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--data-dir", default=None, help="directory holding tinyshakespeare/input.txt")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    text = locate_corpus("tinyshakespeare", "input", args.data_dir).read_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))  # nanoGPT's 90/10 split
    train, val = data[:n], data[n:]

    def batch(split):
        src = train if split == "train" else val
        i = torch.randint(len(src) - args.context - 1, (args.batch,))
        x = torch.stack([src[j:j + args.context] for j in i])
        y = torch.stack([src[j + 1:j + args.context + 1] for j in i])
        return x, y

    model = CharMinGRU(len(chars))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    loss_fn = nn.CrossEntropyLoss()
    print(f"minGRU char model: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"scan backend '{minrnn.ops.resolve_backend('auto', torch.device('cpu')).name}'")

    @torch.no_grad()
    def val_loss():
        model.eval()
        g = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(10):
            i = torch.randint(len(val) - args.context - 1, (args.batch,), generator=g)
            x = torch.stack([val[j:j + args.context] for j in i])
            y = torch.stack([val[j + 1:j + args.context + 1] for j in i])
            losses.append(loss_fn(model(x)[0].flatten(0, 1), y.flatten()).item())
        model.train()
        return sum(losses) / len(losses)

    t0 = time.time()
    print(f"step 0: val loss {val_loss():.3f}")
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / 30) * (0.1 + 0.9 * (1 - step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = batch("train")
        loss = loss_fn(model(x)[0].flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps:
            print(f"step {step}: train loss {loss.item():.3f}, val loss {val_loss():.3f}, {time.time() - t0:.0f}s")

    model.eval()
    prompt = "ROMEO:\n"
    idx = torch.tensor([[stoi[c] for c in prompt]])
    with torch.no_grad():
        logits_parallel, h = model(idx)
        hs, steps = None, []
        for t in range(idx.shape[1]):
            logits_t, hs = model.step(idx[:, t], hs)
            steps.append(logits_t)
        err = (torch.stack(steps, 1) - logits_parallel).abs().max().item()
        print(f"parallel vs step-by-step logits over the prompt: max difference {err:.1e}")
        out = list(prompt)
        logits_t = logits_parallel[:, -1]
        for _ in range(300):
            nxt = torch.multinomial(torch.softmax(logits_t / 0.8, -1), 1)[:, 0]
            out.append(chars[nxt.item()])
            logits_t, h = model.step(nxt, h)
    print("--- sample ---")
    print("".join(out))


if __name__ == "__main__":
    main()
