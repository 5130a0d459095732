"""Checkpoints as transformers folders, and checkpoints that are never lost: extra files
checksummed, a full disk leaves the earlier checkpoints as they were, damaged manifests and
tokenizers fall back to an older checkpoint, eval/generate's strict load names a damaged file."""

import json
import os
import shutil
import warnings

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from minrnn.data.tokenizers import build_tokenizer
from minrnn.training import checkpoint as ckpt
from minrnn.training import hf_export

from ..corpus import shakespeare
from .run_helpers import enospc, flip_byte, manifest, one_line, save, small_model, snapshot

TEXT = shakespeare(20_000)


def _make_run(kind, tmp_path_factory):
    """A run folder with two checkpoints (steps 1 and 2) of a small model saved with its
    transformers files, the model of step 2 and its tokenizer."""
    tok = build_tokenizer(kind, TEXT, bpe_vocab_size=300)
    run = tmp_path_factory.mktemp(f"run_{kind}")
    tok.save(run)
    first, model = small_model(tok.vocab_size, seed=1), small_model(tok.vocab_size, seed=2)
    save(run, 1, first, hf_export.pretrained_files(first, tok), val_loss=2.0)
    save(run, 2, model, hf_export.pretrained_files(model, tok), val_loss=1.5)
    ckpt.prune(run, keep_last=5)
    return run, model, tok


@pytest.fixture(scope="module", params=["char", "byte", "bpe"])
def trained_any(request, tmp_path_factory):
    return _make_run(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _make_run("bpe", tmp_path_factory)


def test_a_checkpoint_is_a_folder_transformers_loads(trained_any):
    run, model, tok = trained_any
    path = hf_export.pretrained_path(run, "best")
    assert path.name == "step_00000002"
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(manifest(path)["files"])
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    fast = AutoTokenizer.from_pretrained(path)
    ids = tok.encode(TEXT[:64])
    assert fast(TEXT[:64], return_tensors="pt")["input_ids"][0].tolist() == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    generator = pipeline("text-generation", model=str(path))
    out = generator(TEXT[:20], max_new_tokens=12, do_sample=False)[0]["generated_text"]
    prompt = tok.encode(TEXT[:20])
    with torch.no_grad():
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert out == TEXT[:20] + tok.decode(greedy[0, len(prompt):].tolist())


def test_transformers_files_are_checked_like_the_weights(trained, tmp_path):
    run = shutil.copytree(trained[0], tmp_path / "run")
    newest = ckpt.list_checkpoints(run)[-1][1]
    flip_byte(newest / "tokenizer.json", at=50)
    with pytest.raises(ckpt.CheckpointError, match="tokenizer.json does not match its checksum"):
        ckpt.verify(newest)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint.*tokenizer.json"):
        path, _, state, _ = ckpt.load_latest(run)
    assert path.name == "step_00000001" and state["step"] == 1
    # the tokenizer of a run comes from the checkpoint it goes with
    assert hf_export.load_run_tokenizer(run, path).vocab_size == trained[2].vocab_size


@pytest.mark.parametrize("damage", [
    lambda p: p.write_text('{"files": []}'),
    lambda p: p.write_text('{"step": 2, "files": {"model.safetensors": {"si'),
    lambda p: p.write_text("[1, 2]"),
    lambda p: p.write_text('{"files": {"model.safetensors": {"size": 1, "sha256": "x"}}}'),
    lambda p: p.write_text(json.dumps({"files": {**json.loads(p.read_text())["files"], "../x": {"size": 1,
                                                                                                  "sha256": "x"}}})),
    lambda p: p.unlink(),
], ids=["empty-list", "truncated", "not-a-dict", "lists-no-state", "path-outside", "missing"])
def test_damaged_manifest_falls_back_to_the_older_checkpoint(damage, trained, tmp_path):
    run = shutil.copytree(trained[0], tmp_path / "run")
    newest = ckpt.list_checkpoints(run)[-1][1]
    damage(newest / ckpt.MANIFEST)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.verify(newest)
    assert "damaged" in one_line(str(e.value)) and str(newest) in str(e.value)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        path, _, _, _ = ckpt.load_latest(run)
    assert path.name == "step_00000001"


def test_strict_load_refuses_a_damaged_newest_checkpoint_naming_the_file(trained, tmp_path):
    run = shutil.copytree(trained[0], tmp_path / "run")
    newest = ckpt.list_checkpoints(run)[-1][1]
    flip_byte(newest / ckpt.MODEL_FILE)
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors does not match its checksum") as e:
        ckpt.load_latest(run, fallback=False)
    assert str(newest / ckpt.MODEL_FILE) in one_line(str(e.value))
    with pytest.raises(ckpt.CheckpointError, match="checksum"):
        hf_export.pretrained_path(run, "best")


def test_a_checkpoint_deleted_while_listed_is_passed_over(trained, tmp_path, monkeypatch):
    run = shutil.copytree(trained[0], tmp_path / "run")
    listed = ckpt.list_checkpoints(run)
    shutil.rmtree(listed[-1][1])  # pruned by a trainer between the reader's listing and its reading
    listings = iter([listed])  # the first listing is stale, the next ones are not
    real = ckpt.list_checkpoints
    monkeypatch.setattr(ckpt, "list_checkpoints", lambda run_dir: next(listings, None) or real(run_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path, _, _, _ = ckpt.load_latest(run, fallback=False)
    assert path.name == "step_00000001"


def test_config_that_differs_from_the_checkpoint_is_named(trained):
    from minrnn.models import MinRNNConfig

    run, model, _ = trained
    path = ckpt.list_checkpoints(run)[-1][1]
    hf_export.check_pretrained_config(path, model.config)
    edited = MinRNNConfig(**{**model.config.to_dict(), "hidden_act": "relu", "rms_norm_eps": 1e-3})
    with pytest.raises(ckpt.CheckpointError, match="hidden_act: checkpoint 'gelu' vs config 'relu'.*rms_norm_eps"):
        hf_export.check_pretrained_config(path, edited)


# --- a full disk ------------------------------------------------------------------------------

def _fail_on_step(monkeypatch, where):
    """Make the write of checkpoint 3 fail at ``where`` with ENOSPC."""
    if where == "weights":
        monkeypatch.setattr(safetensors.torch, "save_file", enospc)
    elif where == "weights-serialize":  # what safetensors itself raises on a full disk
        from safetensors import SafetensorError

        def full(*a, **k):
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
        monkeypatch.setattr(safetensors.torch, "save_file", full)
    elif where == "state":
        monkeypatch.setattr(torch, "save", enospc)
    elif where == "fsync":
        monkeypatch.setattr(os, "fsync", enospc)
    elif where == "rename":
        monkeypatch.setattr(os, "rename", enospc)
    elif where == "mkdtemp":
        import tempfile

        monkeypatch.setattr(tempfile, "mkdtemp", enospc)


@pytest.mark.parametrize("where", ["mkdtemp", "weights", "weights-serialize", "state", "fsync", "rename"])
def test_full_disk_while_saving_keeps_every_earlier_checkpoint(where, trained, tmp_path, monkeypatch):
    run = shutil.copytree(trained[0], tmp_path / "run")
    model, tok = trained[1], trained[2]
    before = {p.name: snapshot(p) for _, p in ckpt.list_checkpoints(run)}
    latest = (run / "checkpoints" / "latest").read_text()
    extra = hf_export.pretrained_files(model, tok)
    _fail_on_step(monkeypatch, where)
    with pytest.raises(ckpt.CheckpointError) as e:
        save(run, 3, model, extra)
    monkeypatch.undo()
    msg = one_line(str(e.value))
    assert "cannot write checkpoint" in msg and ("No space left" in msg or "StorageFull" in msg)
    assert {p.name: snapshot(p) for _, p in ckpt.list_checkpoints(run)} == before
    assert (run / "checkpoints" / "latest").read_text() == latest
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert ckpt.load_latest(run, fallback=False)[0].name == "step_00000002"


def test_resaving_a_step_that_exists_keeps_it_when_the_rename_fails(trained, tmp_path, monkeypatch):
    run = shutil.copytree(trained[0], tmp_path / "run")
    model, tok = trained[1], trained[2]
    before = snapshot(run / "checkpoints" / "step_00000002")
    real_rename = os.rename

    def rename(src, dst):  # setting the old copy aside works, moving the new one in does not
        if ".tmp-" in str(src):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(ckpt.CheckpointError):
        save(run, 2, small_model(tok.vocab_size, seed=9), hf_export.pretrained_files(model, tok))
    monkeypatch.undo()
    assert snapshot(run / "checkpoints" / "step_00000002") == before
    save(run, 2, small_model(tok.vocab_size, seed=9), hf_export.pretrained_files(model, tok))
    assert snapshot(run / "checkpoints" / "step_00000002") != before
    assert not list((run / "checkpoints").glob(".trash-*"))


def test_extra_files_may_not_replace_the_checkpoints_own(tmp_path):
    model = small_model(10)
    for name in ("model.safetensors", "manifest.json", "../config.json", ""):
        with pytest.raises(ValueError, match="extra_files"):
            save(tmp_path, 1, model, {name: b"x"})
    assert ckpt.list_checkpoints(tmp_path) == []


# --- runs of the earlier format ---------------------------------------------------------------

def test_checkpoint_of_the_earlier_format_loads_and_is_upgraded_in_place(tmp_path):
    tok = build_tokenizer("char", TEXT)
    model = small_model(tok.vocab_size)
    run = tmp_path / "old"
    run.mkdir()
    (run / "tokenizer.json").write_text(json.dumps({"kind": "char", "chars": tok.chars}, ensure_ascii=False))
    # what save_checkpoint wrote before: the two files and a manifest of them, no metadata
    path = run / "checkpoints" / "step_00000005"
    path.mkdir(parents=True)
    safetensors.torch.save_file({k: v.clone() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    torch.save({"step": 5}, path / "trainer_state.pt")
    files = {n: {"size": (path / n).stat().st_size, "sha256": ckpt._sha256(path / n)}
             for n in ("model.safetensors", "trainer_state.pt")}
    (path / "manifest.json").write_text(json.dumps({"step": 5, "val_loss": None, "files": files}))

    assert ckpt.load_latest(run, fallback=False)[0] == path
    assert hf_export.load_run_tokenizer(run, path).chars == tok.chars
    hf_export.check_pretrained_config(path, model.config)  # nothing to compare against: accepted
    weights = (path / "model.safetensors").read_bytes()
    hf_export.add_pretrained_files(path, hf_export.pretrained_files(model, tok))
    ckpt.verify(path)
    assert (path / "model.safetensors").read_bytes() == weights
    assert {"config.json", "tokenizer.json"} <= set(manifest(path)["files"])
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    x = torch.tensor([tok.encode(TEXT[:40])])
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_upgrade_on_a_full_disk_leaves_a_checkpoint_that_verifies(tmp_path, monkeypatch):
    tok = build_tokenizer("byte", "")
    model = small_model(256)
    path = save(tmp_path, 1, model)
    before = manifest(path)
    calls = []

    def replace(src, dst):  # the first file goes in, then the disk is full
        calls.append(dst)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    real_replace = os.replace
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(ckpt.CheckpointError, match="No space left"):
        hf_export.add_pretrained_files(path, hf_export.pretrained_files(model, tok))
    monkeypatch.undo()
    assert manifest(path) == before
    ckpt.verify(path)


def test_remote_code_route_loads_without_importing_minrnn(tmp_path):
    """``remote_code=True``: transformers loads the folder with trust_remote_code=True in a
    process that never imported minrnn (the classes are the installed package's)."""
    import subprocess
    import sys

    from .conftest import cli_env

    tok = build_tokenizer("char", TEXT)
    model = small_model(tok.vocab_size)
    path = save(tmp_path / "run", 1, model, hf_export.pretrained_files(model, tok, remote_code=True))
    ids = tok.encode(TEXT[:30])
    code = ("import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True)\n"
            f"print(m(torch.tensor([{ids}])).logits.sum().item())\n"
            "print(type(m).__module__)")
    env = {**cli_env(), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    total, module = r.stdout.split()
    with torch.no_grad():
        assert float(total) == pytest.approx(model(torch.tensor([ids])).logits.sum().item(), rel=1e-6)
    assert module == "minrnn.models.modeling_minrnn"


def test_latest_and_best_links_name_complete_checkpoints_transformers_loads(tmp_path):
    tok = build_tokenizer("char", TEXT)
    run = tmp_path / "run"
    models = {step: small_model(tok.vocab_size, seed=step) for step in (1, 2, 3)}
    assert hf_export.link_checkpoints(run) == {}
    for step, loss in ((1, 2.0), (2, 1.0), (3, 1.5)):
        save(run, step, models[step], hf_export.pretrained_files(models[step], tok), val_loss=loss)
        ckpt.prune(run, keep_last=1)
        hf_export.link_checkpoints(run)
    assert os.readlink(run / "latest") == os.path.join("checkpoints", "step_00000003")
    assert os.readlink(run / "best") == os.path.join("checkpoints", "step_00000002")
    x = torch.tensor([tok.encode(TEXT[:30])])
    with torch.no_grad():
        for link, step in (("latest", 3), ("best", 2)):
            loaded = AutoModelForCausalLM.from_pretrained(run / link).eval()
            assert torch.equal(loaded(x).logits, models[step](x).logits)
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    # a folder the user made under that name is not replaced
    os.unlink(run / "best")
    (run / "best").mkdir()
    assert list(hf_export.link_checkpoints(run)) == ["latest"] and not (run / "best").is_symlink()
