"""`minrnn train / generate / eval` end to end, and the user errors each reports in one line."""

import dataclasses
import json
import math

import pytest
import torch

from minrnn.training.config import ConfigError, TrainConfig, model_keys, parse_overrides

from ..corpus import requires_corpus
from .conftest import TINY, minrnn
from .conftest import assert_one_line_error as assert_user_error


def test_short_run_lowers_validation_loss(trained_run):
    out, r = trained_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [x["val_loss"] for x in records if "val_loss" in x]
    assert len(val) == 2
    # below 3.0 nats: better than the character frequencies alone (a unigram model fitted on this
    # train split scores 3.27 nats on its valid split; a uniform guess over 65 characters 4.17)
    assert val[-1] < 3.0, val
    assert "--- sample ---" in r.stdout
    assert (out / "loss.png").stat().st_size > 1000
    resolved = TrainConfig.from_file(out / "config.toml")
    assert resolved.steps == 100 and resolved.model["hidden_size"] == 32


def test_generate_prints_text_and_eval_reproduces_logged_loss(trained_run):
    out, _ = trained_run
    g = minrnn("generate", "--run", out, "--prompt", "ROMEO:", "--tokens", 30, "--seed", 1)
    assert g.returncode == 0, g.stderr
    assert g.stdout.startswith("ROMEO:") and len(g.stdout.rstrip("\n")) >= 6 + 25
    greedy = [minrnn("generate", "--run", out, "--prompt", "KING", "--tokens", 20, "--greedy").stdout for _ in "ab"]
    assert greedy[0] == greedy[1]

    e = minrnn("eval", "--run", out, "--split", "valid")
    assert e.returncode == 0, e.stderr
    result = json.loads(e.stdout)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]["val_loss"]
    assert result["loss"] == pytest.approx(logged, abs=1e-6)
    assert result["bits_per_character"] == pytest.approx(logged / math.log(2), rel=1e-9)
    assert result["perplexity"] == pytest.approx(math.exp(logged))


def test_bad_prompt_names_the_characters(trained_run):
    out, _ = trained_run
    r = minrnn("generate", "--run", out, "--prompt", "ROMEO: €uro ☃")
    assert_user_error(r, "not in the vocabulary", "'€'", "'☃'")
    assert r.stdout == ""


def test_eval_of_a_split_the_data_lacks(trained_run):
    assert_user_error(minrnn("eval", "--run", trained_run[0], "--split", "test"), "no test split", "train, valid")


def test_user_errors_are_one_line(small_text, tmp_path, trained_run):
    assert_user_error(minrnn("train", TINY, "--stpes", 3), "command line: unknown config key 'stpes'", "did you mean 'steps'")
    assert_user_error(minrnn("train", TINY, "--model.hiden_size", 3), "did you mean 'model.hidden_size'")
    assert_user_error(minrnn("train", TINY, "--steps", "many"), "steps expects int")
    missing = tmp_path / "nothing.txt"
    assert_user_error(minrnn("train", TINY, "--data", missing, "--out_dir", tmp_path / "r1"), str(missing))
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be: that is the question.\n" * 2)
    assert_user_error(minrnn("train", TINY, "--data", short, "--out_dir", tmp_path / "r2"),
                      "does not fit", "seq_len")
    assert_user_error(minrnn("train", tmp_path / "none.toml"), "none.toml not found")


def test_missing_named_corpus_says_where_it_looked(tmp_path, monkeypatch):
    from minrnn.data import download
    from minrnn.data.text import load_splits

    monkeypatch.setenv("MINRNN_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path))

    def offline(url, timeout=30.0):
        raise OSError("network unreachable")

    monkeypatch.setattr(download, "fetch", offline)
    with pytest.raises(FileNotFoundError, match=r"tinyshakespeare/input.txt not found; looked in: .*empty.*"
                                                r"Downloading https://\S+ failed too: network unreachable"):
        load_splits("tinyshakespeare")
    # a download of the wrong bytes is refused and nothing is written
    monkeypatch.setattr(download, "fetch", lambda url, timeout=30.0: b"not shakespeare")
    with pytest.raises(ValueError, match="Nothing was written"):
        load_splits("tinyshakespeare")
    assert not (tmp_path / "empty" / "tinyshakespeare" / "input.txt").exists()


@requires_corpus("tinyshakespeare", "input")
def test_download_writes_the_checked_file(tmp_path, monkeypatch):
    from minrnn.data import download, locate_corpus

    body = locate_corpus("tinyshakespeare", "input").read_bytes()
    monkeypatch.setattr(download, "fetch", lambda url, timeout=30.0: body)
    monkeypatch.setenv("MINRNN_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path))
    path = download.ensure_corpus("tinyshakespeare", "input", data_dir=tmp_path / "fresh")
    assert path == tmp_path / "fresh" / "tinyshakespeare" / "input.txt" and path.read_bytes() == body


def test_checkpoint_of_another_architecture(trained_run, small_text, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(trained_run[0], out)
    r = minrnn("train", TINY, "--data", small_text, "--out_dir", out, "--model.hidden_size", 48, "--steps", 80, "--resume",
               "--batch_size", 16, "--seq_len", 64)
    assert_user_error(r, "--resume: model.hidden_size differ")
    assert TrainConfig.from_file(out / "config.toml").model["hidden_size"] == 32, "the run's config is kept"
    # weights of another model put in place of the run's
    from minrnn.training.loop import build_model, load_model_state

    cfg = TrainConfig.from_file(out / "config.toml")
    cfg.model["hidden_size"] = 16
    from minrnn.data.tokenizers import load_tokenizer
    from minrnn.training.checkpoint import CheckpointError

    v = load_tokenizer(out).vocab_size
    with pytest.raises(CheckpointError, match=f"another architecture.*checkpoint \\({v}, 32\\) vs model \\({v}, 16\\)"):
        from safetensors.torch import load_file

        load_model_state(build_model(cfg, v), load_file(str(sorted((out / "checkpoints").glob("step_*"))[-1]
                                                             / "model.safetensors")), "ckpt")


def test_corrupt_checkpoint_is_refused_by_eval_naming_the_file(trained_run, tmp_path):
    """eval and generate score the checkpoint asked for or none: a damaged newest one is an
    error naming its file, not a silent fall back to an older model (training's resume does fall back)."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(trained_run[0], out)
    steps = sorted((out / "checkpoints").glob("step_*"))
    newest = steps[-1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    for command in (("eval", "--run", out), ("generate", "--run", out, "--tokens", 5)):
        assert_user_error(minrnn(*command), str(newest), "truncated", f"refusing to use {steps[-1].name}")
    # the older checkpoints are intact and still usable by a resume
    from minrnn.training import checkpoint as ckpt

    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        assert ckpt.load_latest(out)[0] == steps[-2]


def test_run_dir_with_checkpoints_needs_resume(trained_run):
    assert_user_error(minrnn("train", TINY, "--out_dir", trained_run[0]), "already holds a run", "--resume")


# --- config ---------------------------------------------------------------------------------


def test_config_overrides_and_round_trip(tmp_path):
    values, flags = parse_overrides(["--lr", "1e-3", "--model.hidden_size=64", "--resume", "--out-dir", "x"],
                                    flags=("resume",))
    assert values == {"lr": "1e-3", "model.hidden_size": "64", "out_dir": "x"} and flags == {"resume"}
    cfg = TrainConfig.from_file(TINY, values)
    assert cfg.lr == 1e-3 and cfg.model["hidden_size"] == 64 and cfg.out_dir == "x"
    (tmp_path / "c.toml").write_text(cfg.to_toml())
    assert TrainConfig.from_file(tmp_path / "c.toml") == cfg
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        TrainConfig.from_file(TINY, {"batch_size": "0"})
    with pytest.raises(ConfigError, match="--steps needs a value"):
        parse_overrides(["--steps"])


def test_model_keys_match_the_model_config():
    from minrnn.models import MinRNNConfig, configuration_minrnn

    fields = {f.name: f for f in dataclasses.fields(MinRNNConfig)}
    # names of earlier versions the config still takes (and maps), if it keeps any
    earlier = set(getattr(configuration_minrnn, "OLD_KEYS", ()))
    keys = model_keys()
    for key in keys:
        assert key in fields or key in earlier, key
        # a None default only where the field's type allows None
        if key in fields and getattr(MinRNNConfig(), key) is None:
            assert "None" in str(MinRNNConfig.__annotations__[key]), key
    # every field a trained model's shape or numbers depend on is a key; none the tokenizer sets
    own = set(MinRNNConfig.__annotations__) - {"vocab_size", "use_cache", "pad_token_id", "bos_token_id",
                                               "eos_token_id"}
    assert set(keys) == own | earlier and keys["expansion_factor"] is float and keys["use_conv"] is bool
    assert keys["cell_options"] is dict and keys["forget_bias"] is float and keys["minlstm_normalize"] is bool


def test_a_cell_options_table_survives_the_saved_config_and_the_command_line(tmp_path):
    cfg = TrainConfig.from_file(TINY, {"model.cell": "minlstm", "model.cell_options": '{"normalize": false}'})
    assert cfg.model["cell_options"] == {"normalize": False}
    (tmp_path / "c.toml").write_text(cfg.to_toml())
    assert TrainConfig.from_file(tmp_path / "c.toml") == cfg
    with pytest.raises(ConfigError, match="model.cell_options expects dict"):
        TrainConfig.from_file(TINY, {"model.cell_options": "[1]"})


def test_lr_schedule_warmup_then_cosine():
    from minrnn.training.loop import lr_factor

    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    f = [lr_factor(s, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))
    assert f[99] == pytest.approx(0.1, abs=1e-3)
    assert torch.tensor(f).min() >= 0.1 - 1e-12


def test_weight_decay_on_matrices_only_and_bf16_autocast():
    from minrnn.training.loop import autocast_context, build_model, param_groups

    cfg = TrainConfig.from_file(TINY, {"dtype": "bfloat16"})
    model = build_model(cfg, 50)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    x = torch.randint(0, 50, (2, 8))
    with autocast_context(cfg, torch.device("cpu")):
        assert model(input_ids=x, use_cache=False).logits.dtype == torch.bfloat16
    cfg.dtype = "float32"
    with autocast_context(cfg, torch.device("cpu")):
        assert model(input_ids=x, use_cache=False).logits.dtype == torch.float32


def test_progress_bar_when_forced(small_text, tmp_path):
    r = minrnn("train", TINY, "--data", small_text, "--out_dir", tmp_path, "--steps", 4, "--eval_every", 2,
               "--checkpoint_every", 4, "--progress", "always")
    assert r.returncode == 0, r.stderr
    assert "4/4" in r.stderr and "loss=" in r.stderr and "tok_s=" in r.stderr
    assert "step 2/4: train loss" in r.stdout + r.stderr and "step 4/4" in r.stdout + r.stderr


@pytest.mark.parametrize("preset", sorted((TINY.parent).glob("*.toml")), ids=lambda p: p.stem)
def test_presets_load_and_build(preset):
    from minrnn.training.loop import build_model

    cfg = TrainConfig.from_file(preset)
    assert build_model(cfg, 65).config.hidden_size == cfg.model.get("hidden_size", 384)


def test_yaml_config(tmp_path):
    (tmp_path / "c.yaml").write_text("steps: 7\nlr: 0.001\nmodel:\n  hidden_size: 24\n")
    cfg = TrainConfig.from_file(tmp_path / "c.yaml", {"steps": "9"})
    assert cfg.steps == 9 and cfg.lr == 0.001 and cfg.model == {"hidden_size": 24}
    (tmp_path / "bad.yaml").write_text("stepz: 7\n")
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        TrainConfig.from_file(tmp_path / "bad.yaml")


def test_metrics_go_to_tensorboard_when_installed(tmp_path, monkeypatch):
    import sys
    import types

    from minrnn.training.metrics import MetricsLog, read_metrics

    scalars = []

    class FakeWriter:  # stands in for torch.utils.tensorboard.SummaryWriter, which needs tensorboard
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            scalars.append("closed")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    log = MetricsLog(tmp_path)
    assert log.tb.logdir == str(tmp_path / "tb")
    log.write({"step": 3, "train_loss": 2.5, "lr": 0.1, "note": "x"})
    log.close()
    assert scalars == [("train_loss", 2.5, 3), ("lr", 0.1, 3), "closed"]
    assert read_metrics(tmp_path) == [{"step": 3, "train_loss": 2.5, "lr": 0.1, "note": "x"}]


def test_empty_prompt_and_diverging_run(trained_run, small_text, tmp_path):
    assert_user_error(minrnn("generate", "--run", trained_run[0], "--prompt", ""), "no tokens")
    r = minrnn("train", TINY, "--data", small_text, "--out_dir", tmp_path, "--steps", 5, "--lr", "1e30",
               "--warmup_steps", 0, "--grad_clip", 0, "--min_lr", "1e30")
    assert_user_error(r, "the training loss became")


def test_gradient_accumulation_equals_one_big_batch(small_text, tmp_path, monkeypatch):
    """batch_size 8 x grad_accum 2 trains as batch_size 16 on the same 16 windows."""
    from minrnn.data import text
    from minrnn.training import Trainer, workloads
    from minrnn.training.metrics import read_metrics

    def fixed(n_tokens, seq_len, global_batch, seed, step, micro):
        all16 = torch.randint(0, n_tokens - seq_len, (16,), generator=torch.Generator().manual_seed(step))
        return all16[micro * global_batch:(micro + 1) * global_batch]

    monkeypatch.setattr(workloads, "train_offsets", fixed)
    runs = {}
    for name, batch, accum in (("big", 16, 1), ("accum", 8, 2)):
        cfg = TrainConfig.from_file(TINY, {"data": str(small_text), "out_dir": str(tmp_path / name), "steps": 6,
                                           "batch_size": batch, "grad_accum": accum, "checkpoint_every": 6,
                                           "eval_every": 6})
        Trainer(cfg, log=lambda s: None).train()
        runs[name] = [(r["train_loss"], r["grad_norm"]) for r in read_metrics(tmp_path / name)]
    # the gradient norm (before clipping) catches a wrong scale that AdamW would hide
    for (loss_big, norm_big), (loss_acc, norm_acc) in zip(runs["big"], runs["accum"]):
        assert loss_acc == pytest.approx(loss_big, abs=1e-5)
        assert norm_acc == pytest.approx(norm_big, rel=1e-5)
    assert text.train_offsets is not fixed


def test_resume_with_other_data_or_a_missing_device(trained_run, small_text, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(trained_run[0], out)
    other = tmp_path / "other.txt"
    other.write_text(small_text.read_text()[:40_000])
    # a resume keeps the run's settings: another --data is refused by name
    same = ("--batch_size", 16, "--seq_len", 64)
    assert_user_error(minrnn("train", TINY, "--data", other, "--out_dir", out, "--steps", 120, "--resume", *same),
                      "--resume: data differ")
    # the same path holding other text is caught by the checkpoint's data signature
    (out / "config.toml").write_text((out / "config.toml").read_text().replace(str(small_text), str(other)))
    assert_user_error(minrnn("train", TINY, "--data", other, "--out_dir", out, "--steps", 120, "--resume", *same),
                      "was trained on other data")
    if not torch.cuda.is_available():
        assert_user_error(minrnn("train", TINY, "--data", small_text, "--out_dir", tmp_path / "gpu",
                                 "--device", "cuda"), "CUDA is not available")
    assert_user_error(minrnn("train", TINY, "--data", small_text, "--out_dir", tmp_path / "x", "--device", "tpu"),
                      "device")
