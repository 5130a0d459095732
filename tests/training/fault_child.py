"""A child process for test_fault_injection: saves a checkpoint and SIGKILLs itself at a chosen
point of the write, or holds a run folder's lock until its stdin closes.

    python fault_child.py save RUN STEP SEED KILL_AT
    python fault_child.py hold RUN
    python fault_child.py write-loop RUN STEPS
"""

import os
import shutil
import signal
import sys

import torch

from minrnn.training import checkpoint as ckpt
from minrnn.training.run_folder import RunFolderError, RunLock

KILL_POINTS = ("none", "mid-weights", "weights", "state", "extra", "manifest", "before-rename", "after-rename",
               "aside", "prune")


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def state_of(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(64, 16, generator=g), "head.bias": torch.randn(64, generator=g)}


def arm(kill_at: str) -> None:
    """Patch the functions save_checkpoint and prune call so the process dies at ``kill_at``."""
    import safetensors.torch

    real_save_file, real_torch_save, real_write = safetensors.torch.save_file, torch.save, ckpt._write_file
    real_rename = os.rename
    if kill_at == "mid-weights":
        def save_file(tensors, path, metadata=None):
            real_save_file(tensors, path, metadata=metadata)
            with open(path, "r+b") as f:  # the kernel had only half of the file when the process died
                f.truncate(os.path.getsize(path) // 2)
            die()
        safetensors.torch.save_file = save_file
    elif kill_at == "weights":
        safetensors.torch.save_file = lambda *a, **k: (real_save_file(*a, **k), die())
    elif kill_at == "state":
        torch.save = lambda *a, **k: (real_torch_save(*a, **k), die())
    elif kill_at in ("extra", "manifest"):
        target = "config.json" if kill_at == "extra" else ckpt.MANIFEST
        ckpt._write_file = lambda path, data: (real_write(path, data), path.name == target and die())
    elif kill_at == "before-rename":
        os.rename = lambda src, dst: die() if ".tmp-" in str(src) else real_rename(src, dst)
    elif kill_at == "after-rename":
        ckpt.write_atomic = lambda *a, **k: die()
    elif kill_at == "aside":
        os.rename = lambda src, dst: (real_rename(src, dst), ".trash-" in str(dst) and die())
    elif kill_at == "prune":
        def rmtree(path, ignore_errors=False):  # one file of the pruned checkpoint deleted, then killed
            os.unlink(os.path.join(path, min(os.listdir(path))))
            die()
        shutil.rmtree = rmtree
    else:
        assert kill_at == "none", kill_at


def main(argv) -> int:
    action, run = argv[0], argv[1]
    if action == "hold":
        try:
            lock = RunLock(run)
        except RunFolderError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        print(f"locked {os.getpid()}", flush=True)
        sys.stdin.read()  # until the parent closes it (or kills this process)
        lock.release()
        return 0
    if action == "write-loop":  # a trainer saving often, keeping one checkpoint, beside a reader
        for step in range(1, int(argv[2]) + 1):
            ckpt.save_checkpoint(run, step, state_of(step), {"step": step}, val_loss=1.0 / step)
            ckpt.prune(run, keep_last=1)
        return 0
    step, seed, kill_at = int(argv[2]), int(argv[3]), argv[4]
    assert kill_at in KILL_POINTS, kill_at
    arm(kill_at)
    extra = {"config.json": b'{"seed": %d}\n' % seed, "tokenizer.json": b"{}\n"}
    try:
        ckpt.save_checkpoint(run, step, state_of(seed), {"step": step, "seed": seed}, val_loss=1.0 / step,
                             extra_files=extra)
        ckpt.prune(run, keep_last=2)
    except ckpt.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
