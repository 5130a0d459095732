"""Training from a prepared folder (token shards read through memory maps, minrnn.data.shards):
the same losses as the in-memory path on the same tokens, exact resume, packed documents
(windows at document starts, position_ids restarting at 0 at each), and the one-line refusals.

The folders are written here with shards.ShardWriter (not `minrnn prepare`), from the shipped
Shakespeare sample, so the tests need no corpus and no network.
"""

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from minrnn.data.shards import ShardWriter, TokenStream, token_dtype, write_manifest
from minrnn.data.text import packed_starts, packed_windows, split_90_10, train_offsets
from minrnn.data.tokenizers import CharTokenizer
from minrnn.training import TrainConfig, Trainer
from minrnn.training import checkpoint as ckpt
from minrnn.training.metrics import read_metrics

from ..corpus import shakespeare
from .conftest import TINY, assert_one_line_error, minrnn

SMALL = {"steps": 6, "batch_size": 4, "seq_len": 16, "warmup_steps": 2, "eval_every": 3, "eval_windows": 4,
         "checkpoint_every": 3, "keep_last": 3, "progress": "never"}


def documents(text: str) -> list[str]:
    """The text cut into documents at its blank lines (each keeps its trailing newlines), so
    that the documents joined are the text again."""
    parts = text.split("\n\n")
    return [p + "\n\n" for p in parts[:-1]] + [parts[-1]]


def write_prepared(folder: Path, splits: dict[str, list[list[int]]], tokenizer, shard_tokens: int = 4096,
                   boundary: int | None = None) -> Path:
    """A prepared folder holding ``splits`` ({split: documents as token-id lists}) in shards of
    about ``shard_tokens`` tokens, and ``tokenizer`` (saved as a fast-tokenizer folder)."""
    folder.mkdir(parents=True)
    tokenizer.save(folder / "tokenizer")
    vocab = tokenizer.vocab_size
    entries = {}
    for split, docs in splits.items():
        writer = ShardWriter(folder, split, token_dtype(vocab), shard_tokens=shard_tokens)
        for doc in docs:
            writer.add(np.array(([boundary] if boundary is not None else []) + doc, dtype=np.int64))
        entries[split] = writer.finish()
    write_manifest(folder, {"format": "minrnn-prepared", "version": 1, "dtype": token_dtype(vocab).name,
                            "vocab_size": vocab, "boundary_token_id": boundary,
                            "tokenizer": {"source": tokenizer.kind, "kind": tokenizer.kind, "dir": "tokenizer"},
                            "splits": entries, "sources": ["tests"], "command": "tests", "created": "now"})
    return folder


def prepare_text(folder: Path, text: str, tokenizer, **kwargs) -> Path:
    """``text`` split as nanoGPT splits it (90/10), each split cut into documents at blank lines."""
    splits = {k: [tokenizer.encode(d) for d in documents(v)] for k, v in split_90_10(text).items()}
    return write_prepared(folder, splits, tokenizer, **kwargs)


def config(data, out: Path, **more) -> TrainConfig:
    return TrainConfig.from_file(TINY, {**SMALL, "data": str(data), "out_dir": str(out), **more})


def train(cfg: TrainConfig, **kwargs) -> Trainer:
    trainer = Trainer(cfg, log=lambda s: None, **kwargs)
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer


def final_weights(run: Path) -> dict:
    return load_file(ckpt.list_checkpoints(run)[-1][1] / ckpt.MODEL_FILE)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(text file, prepared folder of the same text with the same char vocabulary)."""
    tmp = tmp_path_factory.mktemp("prepared")
    text = shakespeare(20_000)
    path = tmp / "sample.txt"
    path.write_text(text)
    return path, prepare_text(tmp / "prepared", text, CharTokenizer.train(text), shard_tokens=5000)


def test_the_same_tokens_prepared_train_to_the_in_memory_losses(tmp_path):
    """How WikiText-2 is checked (docs: the data page): a BPE run in memory, then its tokenizer
    folder given to `minrnn prepare --boundary-token none`, so the shards hold the very ids."""
    split = split_90_10(shakespeare(20_000))
    (tmp_path / "text").mkdir()
    for name, text in split.items():
        (tmp_path / "text" / f"{name}.txt").write_text(text)
    memory = train(config(tmp_path / "text", tmp_path / "memory", tokenizer="bpe", bpe_vocab_size=300))
    r = minrnn("prepare", "--split-files", f"train={tmp_path / 'text' / 'train.txt'}",
               f"valid={tmp_path / 'text' / 'valid.txt'}", "--tokenizer", tmp_path / "memory",
               "--boundary-token", "none", "--out", tmp_path / "prepared", "--progress", "never")
    assert r.returncode == 0, r.stderr
    mapped = train(config(tmp_path / "prepared", tmp_path / "run"))
    assert isinstance(mapped.workload.tokens["train"], TokenStream)
    assert mapped.workload.vocab_size == memory.workload.vocab_size == 300
    # the same windows of the same ids: every loss and every weight bit-identical
    a, b = read_metrics(tmp_path / "memory"), read_metrics(tmp_path / "run")
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    assert [r.get("val_loss") for r in a] == [r.get("val_loss") for r in b] and "val_loss" in a[-1]
    wa, wb = final_weights(tmp_path / "memory"), final_weights(tmp_path / "run")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # the run carries the folder's tokenizer: eval and generate work from the run alone
    r = minrnn("eval", "--run", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["loss"] == pytest.approx(b[-1]["val_loss"], abs=1e-6)
    r = minrnn("generate", "--run", tmp_path / "run", "--prompt", "ROMEO:", "--tokens", 5, "--greedy")
    assert r.returncode == 0 and r.stdout.startswith("ROMEO:"), r.stderr
    # scoring another folder's ids with this run's model is refused
    r = minrnn("eval", "--run", tmp_path / "run", "--data", write_prepared(
        tmp_path / "chars", {"train": [[1] * 40], "valid": [[2] * 40]}, CharTokenizer(list("abc"))))
    assert_one_line_error(r, "tokenizer is not the run's")


def test_a_run_resumed_from_an_earlier_checkpoint_ends_as_the_uninterrupted_one(corpus, tmp_path):
    _, prepared = corpus
    cfg = config(prepared, tmp_path / "run", pack_documents="true")
    train(cfg)
    done, rows = final_weights(tmp_path / "run"), read_metrics(tmp_path / "run")
    # as if killed after the checkpoint of step 3: the later one is gone
    shutil.rmtree(ckpt.list_checkpoints(tmp_path / "run")[-1][1])
    resumed = train(cfg, resume=True)
    assert resumed.step == 6
    again = final_weights(tmp_path / "run")
    assert all(torch.equal(done[k], again[k]) for k in done)
    timeless = [{k: v for k, v in r.items() if k not in ("tokens_per_s", "wall_s")} for r in rows]
    assert [{k: v for k, v in r.items() if k not in ("tokens_per_s", "wall_s")}
            for r in read_metrics(tmp_path / "run")] == timeless


# --- packed documents -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> TokenStream:
    """Documents of lengths 1 to 40 (and one of 200, longer than a window), ids = position in
    the stream mod 50, over several shards."""
    from minrnn.data.shards import PreparedData

    rng = np.random.default_rng(0)
    lengths = [*rng.integers(1, 41, 60).tolist(), 200, *rng.integers(1, 41, 60).tolist()]
    pos, docs = 0, []
    for n in lengths:
        docs.append([(pos + i) % 50 for i in range(n)])
        pos += n
    tok = CharTokenizer([chr(65 + i) for i in range(50)])
    folder = write_prepared(tmp_path_factory.mktemp("docs") / "p", {"train": docs, "valid": docs}, tok,
                            shard_tokens=300)
    return PreparedData.open(folder).split("train")


def test_packed_windows_start_at_documents_and_restart_their_positions(stream):
    seq_len = 24
    starts = set(stream.all_document_starts().tolist())
    assert len(stream.all_document_starts()) == 121 and len(stream._shards) > 3
    moved = 0
    for step in range(20):
        offsets = train_offsets(len(stream), seq_len, 8, seed=3, step=step, micro=0)
        x, y, pos = packed_windows(stream, offsets, seq_len)
        begin = packed_starts(stream, offsets, seq_len)
        for o, s, xi, yi, p in zip(offsets.tolist(), begin.tolist(), x, y, pos):
            # where it starts: the first document start at or after the offset, within a window
            # (else, inside the long document, the offset itself)
            later = sorted(d for d in starts if o <= d <= min(o + seq_len, len(stream) - seq_len - 1))
            assert s == (later[0] if later else o)
            moved += s != o
            window = stream.read(s, s + seq_len + 1)
            assert xi.tolist() == window[:-1].tolist() and yi.tolist() == window[1:].tolist()
            # positions: 0 at the window's start and at every document start inside, counting up between
            expect, last = [], s
            for t in range(s, s + seq_len):
                last = t if t in starts else last
                expect.append(t - last)
            assert p.tolist() == expect
    assert moved > 0
    # a pure function of (seed, step): the same batch again
    again = packed_windows(stream, train_offsets(len(stream), seq_len, 8, seed=3, step=19, micro=0), seq_len)
    assert all(torch.equal(a, b) for a, b in zip((x, y, pos), again))


def test_the_model_gets_the_position_ids_of_packed_documents(corpus, tmp_path):
    _, prepared = corpus
    trainer = Trainer(config(prepared, tmp_path / "run", pack_documents="true", steps=1, seq_len=128),
                      log=lambda s: None)
    seen = []
    trainer.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("position_ids")),
                                            with_kwargs=True)
    try:
        trainer.train()
    finally:
        trainer.close()
    x, y, extras = trainer.workload.batch(0, 0)
    assert torch.equal(seen[0], extras["position_ids"])
    assert all(p is not None and p.shape == (4, 128) for p in seen)  # the evaluation's windows too
    assert (seen[0][:, 1:] == 0).any() and (seen[-1][:, 1:] == 0).any()  # documents begin inside the windows
    assert trainer.workload.signature()["pack_documents"] is True


# --- refusals -----------------------------------------------------------------------------------

def test_a_flipped_byte_is_refused_before_training(corpus, tmp_path):
    _, prepared = corpus
    damaged = tmp_path / "damaged"
    shutil.copytree(prepared, damaged)
    shard = damaged / "train-00001.bin"
    data = bytearray(shard.read_bytes())
    data[7] ^= 0x01
    shard.write_bytes(bytes(data))
    r = minrnn("train", TINY, "--data", damaged, "--out_dir", tmp_path / "run", "--steps", 2)
    assert_one_line_error(r, "train-00001.bin", "SHA-256")
    assert not (tmp_path / "run").exists()


def test_pack_documents_needs_a_prepared_folder(corpus, tmp_path):
    text, _ = corpus
    r = minrnn("train", TINY, "--data", text, "--out_dir", tmp_path / "run", "--pack-documents")
    assert_one_line_error(r, "pack_documents", "prepared folder", str(text))
    r = minrnn("compare", "text", "--data", text, "--pack-documents", "--out", tmp_path)
    assert_one_line_error(r, "--pack-documents", "prepared folder")


@pytest.mark.parametrize("model", ["lstm", "gru", "mamba"])
def test_compare_refuses_to_pack_for_a_model_that_cannot_reset(corpus, tmp_path, model):
    _, prepared = corpus
    r = minrnn("compare", "text", "--data", prepared, "--models", f"mingru,{model}", "--pack-documents",
               "--out", tmp_path)
    assert_one_line_error(r, "--pack-documents", model, "cannot reset")


def test_compare_trains_from_a_prepared_folder_with_packed_documents(corpus, tmp_path):
    from minrnn.experiments.compare import CompareConfig, plan_runs, train_run

    _, prepared = corpus
    (spec,) = plan_runs(CompareConfig("text", data=str(prepared), models=["llama"], steps=2, eval_every=2,
                                      pack_documents=True))
    assert spec.to_json()["pack_documents"] is True
    result = train_run(spec, tmp_path / "run", log=lambda s: None, progress=False)
    assert "prepared" in result["data"] and "documents packed" in result["data"]
    assert [h["step"] for h in result["history"]] == [2] and math.isfinite(result["final_split"]["loss"])
    r = minrnn("compare", "text", "--data", prepared, "--tokenizer", "byte", "--out", tmp_path / "b")
    assert_one_line_error(r, "--tokenizer", "prepared folder")


@pytest.mark.parametrize("name, options", [("llama", {"intermediate_size": 32}), ("gpt2", {"n_inner": 32})])
def test_a_transformer_keeps_packed_documents_apart(name, options):
    """What compare --pack-documents relies on for a Transformer: transformers' Llama and GPT-2,
    given position_ids (and no attention mask), attend within each document only."""
    from minrnn.experiments.baselines import build_model

    torch.manual_seed(0)
    model = build_model(name, 20, None, hidden_size=16, num_hidden_layers=1, **options).eval()
    a, b = torch.tensor([[1, 2, 3, 4, 5]]), torch.tensor([[6, 7, 8]])
    packed = model(torch.cat([a, b], 1), position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]]))
    torch.testing.assert_close(packed[:, 5:], model(b), rtol=0, atol=1e-5)
    assert not torch.allclose(model(torch.cat([a, b], 1))[:, 5:], model(b), atol=1e-3)


def test_a_prepared_folder_whose_tokenizer_disagrees_with_its_manifest(corpus, tmp_path):
    _, prepared = corpus
    bad = tmp_path / "bad"
    shutil.copytree(prepared, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["vocab_size"] += 1
    (bad / "manifest.json").write_text(json.dumps(manifest))
    r = minrnn("train", TINY, "--data", bad, "--out_dir", tmp_path / "run", "--steps", 2)
    assert_one_line_error(r, "tokenizer", "vocab_size")


def test_a_resume_on_other_tokens_is_refused(tmp_path):
    text = shakespeare(20_000)
    prepared = prepare_text(tmp_path / "prepared", text, CharTokenizer.train(text))
    train(config(prepared, tmp_path / "run", steps=3))
    # the same folder, the same sizes, other tokens (two swapped, the checksum updated)
    manifest = json.loads((prepared / "manifest.json").read_text())
    shard = manifest["splits"]["train"]["shards"][0]
    data = bytearray((prepared / shard["file"]).read_bytes())
    data[0:2], data[2:4] = data[2:4], data[0:2]
    (prepared / shard["file"]).write_bytes(bytes(data))
    shard["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="other data"):
        train(config(prepared, tmp_path / "run", steps=6), resume=True)
