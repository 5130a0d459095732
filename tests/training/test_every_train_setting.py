"""Every field of the train config changes what it should: one short run with each field set
away from the reference run's value, each compared with the reference on the behaviour that field
governs. The cases are checked against ``TrainConfig``'s own field list, so a new field without a
case fails here instead of going untested.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minrnn.training.config import TrainConfig

from ..corpus import shakespeare
from .conftest import TINY, minrnn

STEPS = 6
BASE = dict(steps=STEPS, batch_size=4, seq_len=16, warmup_steps=2, eval_every=3, eval_windows=4, log_every=2,
            checkpoint_every=3, keep_last=3, sample_tokens=0, plot="false", progress="never")


@dataclasses.dataclass
class Run:
    out: Path
    code: int
    stdout: str
    stderr: str

    @property
    def rows(self) -> list[dict]:
        return [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines()]

    def column(self, key: str) -> list:
        return [r.get(key) for r in self.rows]

    def weights(self) -> dict:
        return load_file(self.out / "latest" / "model.safetensors")

    def checkpoints(self) -> list[str]:
        return sorted(p.name for p in (self.out / "checkpoints").glob("step_*"))


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(shakespeare(20_000))
    return path


def train(folder: Path, text: Path, **settings) -> Run:
    values = {**BASE, "data": text, **settings}
    out = values.pop("out_dir", folder / "run")
    args = [a for k, v in values.items() for a in (f"--{k}", v)]
    r = minrnn("train", TINY, *args, "--out_dir", out)
    return Run(Path(out), r.returncode, r.stdout, r.stderr)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, text) -> Run:
    run = train(tmp_path_factory.mktemp("reference"), text)
    assert run.code == 0, run.stderr
    return run


def differ(a: dict, b: dict) -> bool:
    return a.keys() != b.keys() or any(a[k].shape != b[k].shape or not torch.equal(a[k], b[k]) for k in a)


# --- what each field changes: (ref, run) -> bool -------------------------------------------------

def same_first_update_then_apart(ref, run):
    """An optimiser setting: the first step's loss (taken before any update) is the reference's,
    the weights it ends with are not."""
    return run.rows[0]["train_loss"] == ref.rows[0]["train_loss"] and differ(ref.weights(), run.weights())


def other_batches(ref, run):
    """A data setting: the losses differ from the first step on."""
    return run.rows[0]["train_loss"] != ref.rows[0]["train_loss"]


def vocabulary(size):
    return lambda ref, run: run.weights()["model.embed_tokens.weight"].shape[0] == size


def write_other_text(tmp: Path) -> Path:
    path = tmp / "other.txt"
    path.write_text(shakespeare(20_000)[::-1])
    return path


def misplaced_corpus(tmp: Path) -> Path:
    folder = tmp / "corpora"
    (folder / "tinyshakespeare").mkdir(parents=True)
    (folder / "tinyshakespeare" / "input.txt").write_text("not the corpus")
    return folder


def best(run) -> float:
    return min(r["val_loss"] for r in run.rows if "val_loss" in r)


CASES = {
    # field: (settings, or a function of a temporary folder giving them; the check)
    "data": (lambda tmp: dict(data=write_other_text(tmp)), other_batches),
    "data_dir": (lambda tmp: dict(data="tinyshakespeare", data_dir=misplaced_corpus(tmp)),
                 lambda ref, run: run.code != 0 and "corpora/tinyshakespeare/input.txt" in run.stderr),
    "tokenizer": (dict(tokenizer="byte"), vocabulary(256)),
    "bpe_vocab_size": (dict(tokenizer="bpe", bpe_vocab_size=300), vocabulary(300)),
    # on a text file, refused (tests/training/test_prepared_data.py packs a prepared folder's documents)
    "pack_documents": (dict(pack_documents="true"),
                       lambda ref, run: run.code == 2 and "pack_documents needs a prepared folder" in run.stderr),
    "stateful": (dict(stateful="true"), other_batches),  # contiguous streams (tests/training/test_stateful.py)
    # the same numbers up to the compiler's rounding (run on aot_eager below: the same capture, compiled quickly)
    "compile": (dict(compile="true"), lambda ref, run: all(
        abs(a - b) < 1e-5 for a, b in zip(ref.column("train_loss"), run.column("train_loss")))),
    "steps": (dict(steps=4), lambda ref, run: run.column("step") == [1, 2, 3, 4]),
    "batch_size": (dict(batch_size=3), other_batches),
    "seq_len": (dict(seq_len=12), other_batches),
    "grad_accum": (dict(grad_accum=2), other_batches),
    "lr": (dict(lr=5e-3), lambda ref, run: run.rows[0]["lr"] == ref.rows[0]["lr"] / 2),
    "min_lr": (dict(min_lr=1e-4), lambda ref, run: (run.column("lr")[:3] == ref.column("lr")[:3]
                                                    and run.rows[-1]["lr"] < ref.rows[-1]["lr"])),
    "warmup_steps": (dict(warmup_steps=4), lambda ref, run: run.rows[0]["lr"] == ref.rows[0]["lr"] / 2),
    "weight_decay": (dict(weight_decay=0.5), same_first_update_then_apart),
    "beta1": (dict(beta1=0.5), same_first_update_then_apart),
    "beta2": (dict(beta2=0.9), same_first_update_then_apart),
    "grad_clip": (dict(grad_clip=1e-3), same_first_update_then_apart),
    "decay_recurrence": (dict(decay_recurrence="false"), same_first_update_then_apart),
    "fused_optimizer": (dict(fused_optimizer="false"), same_first_update_then_apart),
    "dtype": (dict(dtype="bfloat16"), other_batches),  # the same batches, rounded otherwise
    "seed": (dict(seed=7), other_batches),
    "device": (dict(device="meta"), lambda ref, run: run.code != 0 and "device" in run.stderr),
    "threads": (dict(threads=1), lambda ref, run: torch.get_num_threads() == 1),
    "eval_every": (dict(eval_every=2),
                   lambda ref, run: [r["step"] for r in run.rows if "val_loss" in r] == [2, 4, 6]),
    "eval_windows": (dict(eval_windows=2), lambda ref, run: (run.column("train_loss") == ref.column("train_loss")
                                                             and run.rows[2]["val_loss"] != ref.rows[2]["val_loss"])),
    "log_every": (dict(log_every=4), lambda ref, run: ("step 4/6: train loss" in run.stdout
                                                       and "step 2/6: train loss" not in run.stdout
                                                       and "step 2/6: train loss" in ref.stdout)),
    "checkpoint_every": (dict(checkpoint_every=2), lambda ref, run: run.checkpoints() == [
        "step_00000002", "step_00000004", "step_00000006"]),
    "budget_s": (dict(budget_s=1e-9), lambda ref, run: run.column("step") == [1] and "time budget" in run.stdout),
    # a checkpoint every step: the last one is kept, and the best (which pruning never removes)
    "keep_last": (dict(keep_last=1, checkpoint_every=1), lambda ref, run: run.checkpoints() == sorted(
        {"step_00000006", f"step_{min(r['step'] for r in run.rows if r.get('val_loss') == best(run)):08d}"})),
    "out_dir": (lambda tmp: dict(out_dir=tmp / "elsewhere"),
                lambda ref, run: run.out.name == "elsewhere" and (run.out / "metrics.jsonl").is_file()),
    "progress": (dict(progress="always"), lambda ref, run: "6/6 [" in run.stderr and "6/6 [" not in ref.stderr),
    "plot": (dict(plot="true"), lambda ref, run: any(run.out.glob("*.png")) and not any(ref.out.glob("*.png"))),
    "sample_tokens": (dict(sample_tokens=30), lambda ref, run: len(run.stdout) > len(ref.stdout) + 30),
    "model": ({"model.hidden_size": 24}, lambda ref, run: run.weights()["model.embed_tokens.weight"].shape[1] == 24),
}


def test_every_field_of_the_train_config_has_a_case():
    assert set(CASES) == {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize("field", sorted(CASES))
def test_a_non_default_value_changes_what_it_should(field, reference, text, tmp_path, monkeypatch):
    settings, check = CASES[field]
    if field == "compile":
        original = torch.nn.Module.compile
        monkeypatch.setattr(torch.nn.Module, "compile",
                            lambda module, **kw: original(module, **{**kw, "backend": "aot_eager"}))
    settings = settings(tmp_path) if callable(settings) else settings
    threads = torch.get_num_threads()
    try:
        run = train(tmp_path, text, **settings)
        if field not in ("data_dir", "device", "pack_documents"):  # those whose check is an error
            assert run.code == 0, run.stderr
        assert check(reference, run), (f"{field}={settings}: rows {run.rows if run.code == 0 else None}\n"
                                       f"stdout {run.stdout[-2000:]}\nstderr {run.stderr[-2000:]}")
    finally:
        torch.set_num_threads(threads)
