"""The engine's update, held to its closed form rather than to itself: the learning rate at every
step of a run against the warmup-then-cosine formula, and each step's weights against a
hand-written clip-then-AdamW update replayed on the same batches.

A schedule that meets the first value, the end of warmup and the floor but has another shape,
or a clip whose result never reaches the optimiser, fails here.
"""

import copy
import math

import pytest
import torch

from minrnn.experiments.baselines import build_model
from minrnn.training import ModelSpec, TaskWorkload, Trainer
from minrnn.training.config import TrainConfig
from minrnn.training.metrics import read_metrics

LR, MIN_LR, WARMUP, BETAS, WEIGHT_DECAY, EPS = 1e-2, 1e-3, 3, (0.9, 0.99), 0.1, 1e-8


def closed_form_lr(step: int, steps: int) -> float:
    """lr at 0-based optimiser step ``step``: linear warmup from lr / WARMUP, then a half cosine
    from lr to MIN_LR reached at the last step."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / (steps - WARMUP)
    return MIN_LR + (LR - MIN_LR) * (1 + math.cos(math.pi * progress)) / 2


def make_trainer(tmp_path, steps: int, grad_clip: float):
    work = TaskWorkload("parity_check", batch_size=8, train_lengths=(2, 10), eval_lengths=[12])
    spec = ModelSpec(lambda: build_model("mingru", work.vocab_size, None, width=12, num_layers=2),
                     {"model": "mingru"}, logits=lambda model, x: model(x))
    cfg = TrainConfig(steps=steps, eval_every=steps, checkpoint_every=steps, out_dir=str(tmp_path), plot=False,
                      progress="never", data="parity_check", lr=LR, min_lr=MIN_LR, warmup_steps=WARMUP,
                      beta1=BETAS[0], beta2=BETAS[1], weight_decay=WEIGHT_DECAY, grad_clip=grad_clip)
    return Trainer(cfg, work, spec, log=lambda s: None)


def test_the_learning_rate_follows_the_closed_form_at_every_step(tmp_path):
    steps = 13
    trainer = make_trainer(tmp_path, steps, grad_clip=1.0)
    trainer.train()
    logged = [r["lr"] for r in read_metrics(tmp_path)]
    expected = [closed_form_lr(s, steps) for s in range(steps)]
    assert logged == pytest.approx(expected, rel=1e-12, abs=0)
    # past the last step every parameter group rests at the floor
    groups = trainer.optimizer.param_groups
    assert [g["lr"] for g in groups] == pytest.approx([MIN_LR] * len(groups), rel=1e-12)


def hand_written_step(params, grads, moments, step: int, lr: float, max_norm: float) -> float:
    """Clip the gradients' global 2-norm to ``max_norm``, then one AdamW step (decoupled weight
    decay on matrices only), on float64 copies. Returns the norm before clipping."""
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    scale = min(1.0, max_norm / (norm + 1e-6))
    for p, g, (m, v) in zip(params, grads, moments):
        g = g.double() * scale
        if p.dim() >= 2:
            p.mul_(1 - lr * WEIGHT_DECAY)
        m.mul_(BETAS[0]).add_((1 - BETAS[0]) * g)
        v.mul_(BETAS[1]).add_((1 - BETAS[1]) * g * g)
        m_hat = m / (1 - BETAS[0] ** step)
        v_hat = v / (1 - BETAS[1] ** step)
        p.sub_(lr * m_hat / (v_hat.sqrt() + EPS))
    return norm


def test_each_step_is_clip_then_adamw_on_the_same_batch(tmp_path):
    steps, clip = 4, 0.05  # a clip far below the gradients' norm, so that every step is clipped
    trainer = make_trainer(tmp_path, steps, grad_clip=clip)
    replica = copy.deepcopy(trainer.model)  # the weights before the first step
    trainer.train()
    rows = read_metrics(tmp_path)

    params = [p for p in replica.parameters()]
    master = [p.detach().double().clone() for p in params]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in master]
    for step in range(steps):
        with torch.no_grad():
            for p, q in zip(params, master):
                p.copy_(q)
        x, y = trainer.workload.batch(step, 0)
        replica.zero_grad(set_to_none=True)
        loss = trainer.workload.loss(replica(x), y)
        loss.backward()
        assert loss.item() == pytest.approx(rows[step]["train_loss"], rel=1e-5)  # the same batch and weights
        norm = hand_written_step(master, [p.grad for p in params], moments, step + 1,
                                 closed_form_lr(step, steps), clip)
        assert norm == pytest.approx(rows[step]["grad_norm"], rel=1e-4) and norm > 5 * clip
    for name, (p, q) in zip([n for n, _ in replica.named_parameters()], zip(trainer.model.parameters(), master)):
        torch.testing.assert_close(p.detach().double(), q, rtol=0, atol=2e-6, msg=f"parameter {name}")
