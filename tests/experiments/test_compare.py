"""`minrnn compare` end to end on 2-step budgets: the table and plots are written, finished runs
are kept, an interrupted run resumes to the same numbers, and bad requests are refused."""

import json
import math

import pytest
import torch

import minrnn.experiments.compare as C
import minrnn.experiments.plan as P
from minrnn.cli import main
from minrnn.experiments.compare import CompareConfig, CompareError, RunSpec, train_run
from minrnn.experiments.compare import compare as run_compare
from minrnn.experiments.compare import plan_runs as plan

from ..corpus import requires_corpus, shakespeare


def compare(experiment, preset="cpu", models=None, out="runs/compare", log=print, **kwargs):
    return run_compare(CompareConfig(experiment, preset, models=models, out=str(out), **kwargs), log=log)


def plan_runs(experiment, preset_name="cpu", models=None, **kwargs):
    return plan(CompareConfig(experiment, preset_name, models=models, **kwargs))


def _results(md):
    return json.loads((md.parent / "results.json").read_text())


@requires_corpus("tinyshakespeare", "input")
def test_shakespeare_two_steps_writes_table_and_plots(tmp_path):
    md = compare("shakespeare_char", "cpu", ["mingru", "llama", "lstm"], tmp_path, steps=2, eval_every=1,
                 isolate=False, log=lambda s: None, progress=False)
    assert md == tmp_path / "shakespeare_char-cpu" / "results.md"
    text = md.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert [r.split("|")[1].strip() for r in rows] == ["mingru", "llama", "lstm"]
    assert "steps to llama's best" in text
    for png in ("loss_vs_steps.png", "loss_vs_time.png"):
        assert (md.parent / png).read_bytes()[:4] == b"\x89PNG"
    results = _results(md)
    for r in results:
        assert [h["step"] for h in r["history"]] == [1, 2]
        assert r["steps"] == 2 and r["wall_s"] > 0 and r["tokens_per_s"] > 0
        assert 0.9 * 800_000 < r["params"] < 1.1 * 830_000  # the cpu preset's budget (nanoGPT's CPU model)
        assert r["final_split"]["loss"] < 4.5  # 65 characters: log 65 = 4.17 at chance, a little learned
    # finished runs are kept, not redone
    seen = []
    compare("shakespeare_char", "cpu", ["mingru", "llama", "lstm"], tmp_path, steps=2, eval_every=1,
            isolate=False, log=seen.append, progress=False)
    assert sum("done before, kept" in s for s in seen) == 3


def test_a_run_in_its_own_process_and_the_task_metric(tmp_path):
    md = compare("selective_copying", "cpu", ["mingru"], tmp_path, steps=2, eval_every=2, sweep=False,
                 log=lambda s: None, progress=False, keep_weights=True)
    (r,) = _results(md)
    assert 0.0 <= r["final_val"] <= 1.0 and 0.0 <= r["final_split"]["accuracy"] <= 1.0
    assert "val_accuracy" in r["history"][0] and r["peak_memory_mib"] > 0
    assert "accuracy" in md.read_text()
    run = md.parent / "runs" / "mingru"
    assert not (run / "checkpoints").exists()  # removed once the run is done
    # --keep-weights reaches the run's process: the trained weights, loadable by name
    weights = torch.load(run / "weights.pt", weights_only=True)
    assert sum(v.numel() for v in weights.values()) >= r["params"]


def test_chomsky_reports_each_task_and_the_mean(tmp_path):
    md = compare("chomsky", "cpu", ["mingru", "lstm"], tmp_path, steps=2, eval_every=2,
                 tasks=["parity_check", "cycle_nav"], isolate=False, log=lambda s: None, progress=False)
    text = md.read_text()
    assert "## parity_check" in text and "## cycle_nav" in text
    assert "| model | parity_check | cycle_nav | mean |" in text
    assert {r["run"] for r in _results(md)} == {"parity_check.mingru", "parity_check.lstm",
                                                 "cycle_nav.mingru", "cycle_nav.lstm"}


def test_sweep_runs_every_value(tmp_path):
    runs = plan_runs("selective_copying", "cpu", ["mingru", "lstm"], steps=2)
    assert [r.name for r in runs] == [f"{m}-num_hidden_layers={n}" for n in (1, 2, 3) for m in ("mingru", "lstm")]
    assert len(plan_runs("selective_copying", "cpu", ["mingru"], sweep=False)) == 1


def test_interrupted_run_resumes_to_the_uninterrupted_numbers(tmp_path, monkeypatch):
    # a synthetic task: cheap to evaluate; the text path shares the loop
    (spec,) = plan_runs("selective_copying", "cpu", ["mingru"], steps=4, eval_every=2, sweep=False)
    whole = train_run(spec, tmp_path / "whole", log=lambda s: None, progress=False)

    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def crash_on_third(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # after the checkpoint of step 2
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        train_run(spec, tmp_path / "cut", log=lambda s: None, progress=False)
    assert (tmp_path / "cut" / "checkpoints").is_dir()
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    lines = []
    resumed = train_run(spec, tmp_path / "cut", log=lines.append, progress=False)
    assert any("resumed from" in s and "(step 2)" in s for s in lines)
    for a, b in zip(whole["history"], resumed["history"], strict=True):
        assert a["step"] == b["step"]
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6)
        assert a["val_accuracy"] == b["val_accuracy"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
    # one line per step, those after the checkpoint written once
    assert [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_time_budget_stops_and_says_so(tmp_path):
    (spec,) = plan_runs("selective_copying", "cpu", ["lstm"], steps=1000, eval_every=500, budget_s=1e-9,
                        sweep=False)
    r = train_run(spec, tmp_path, log=lambda s: None, progress=False)
    assert r["steps"] == 1 and r["planned_steps"] == 1000 and len(r["history"]) == 1


def test_a_changed_request_is_not_mixed_into_old_results(tmp_path):
    compare("selective_copying", "cpu", ["lstm"], tmp_path, steps=1, sweep=False, isolate=False,
            log=lambda s: None, progress=False)
    with pytest.raises(CompareError, match="another spec"):
        compare("selective_copying", "cpu", ["lstm"], tmp_path, steps=2, sweep=False, isolate=False,
                log=lambda s: None, progress=False)


def test_an_edited_preset_changes_the_spec(monkeypatch):
    (before,) = plan_runs("shakespeare_char", "cpu", ["lstm"])
    real = C.load_preset

    def edited(*args):
        p = real(*args)
        return type(p)(**{**p.__dict__, "train": {**p.train, "lr": 5e-3}})

    monkeypatch.setattr(P, "load_preset", edited)
    (after,) = plan_runs("shakespeare_char", "cpu", ["lstm"])
    assert before.preset_digest != after.preset_digest


@pytest.mark.parametrize("kwargs, message", [
    (dict(experiment="tetris"), "unknown experiment"),
    (dict(preset_name="huge"), "--preset"),
    (dict(models=["mingru", "rwkv"]), "--models"),
    (dict(steps=0), "--steps"),
    (dict(tasks=["parity_check"]), "--tasks is for the Chomsky"),
    (dict(dtype="float16"), "--dtype"),
    (dict(budget_s=0.0), "--budget-s"),
    (dict(lr=-1e-3), "--lr"),
    (dict(lr=float("nan")), "--lr"),
])
def test_bad_requests_name_the_option(kwargs, message):
    args = dict(experiment="shakespeare_char", preset_name="cpu")
    args.update(kwargs)
    with pytest.raises(CompareError, match=message):
        plan_runs(**args)


def test_cli_reports_user_errors_without_a_traceback(tmp_path, capsys):
    assert main(["compare", "shakespeare_char", "--models", "mingru,rwkv", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "minrnn compare: error: --models" in err and "Traceback" not in err


def test_run_names_are_stable():
    spec = RunSpec("chomsky", "cpu", "mingru", 10, task="parity_check", sweep={"num_layers": 2})
    assert spec.name == "parity_check.mingru-num_layers=2"


def test_lr_override_sets_peak_and_floor_and_is_recorded(tmp_path):
    (spec,) = plan_runs("selective_copying", "cpu", ["lstm"], steps=2, eval_every=1, sweep=False, lr=2e-3)
    preset = C.load_preset("selective_copying", "cpu")
    base = preset.train_settings("lstm")
    train = C.run_train_settings(preset, spec)
    assert train["lr"] == 2e-3 and train["min_lr"] == pytest.approx(base["min_lr"] * 2e-3 / base["lr"])
    assert spec.to_json()["lr"] == 2e-3
    r = train_run(spec, tmp_path, log=lambda s: None, progress=False)
    assert r["lr"] == 2e-3 and r["history"][0]["lr"] == pytest.approx(2e-3 * 1 / base["warmup_steps"])
    (plain,) = plan_runs("selective_copying", "cpu", ["lstm"], steps=2, sweep=False)
    assert "lr" not in plain.to_json() and C.run_train_settings(preset, plain) == base


def test_set_adds_a_model_option_records_it_and_refuses_unknown_keys(tmp_path):
    opts = C.parse_options(["mingru.decay_bias=3.0", "mingru.use_conv=true", "llama.hidden_act=\"silu\""])
    assert opts == {"mingru": {"decay_bias": 3.0, "use_conv": True}, "llama": {"hidden_act": "silu"}}
    # a cell's options: a TOML inline table
    assert C.parse_options(["minlstm.cell_options={normalize = false}"]) == {
        "minlstm": {"cell_options": {"normalize": False}}}
    for bad in ("decay_bias=3", "mingru.=3", ".x=3", "mingru.x"):
        with pytest.raises(CompareError, match="expected MODEL.KEY=VALUE"):
            C.parse_options([bad])
    with pytest.raises(CompareError, match="mingru has no option 'mingru_forget_bais'"):
        plan_runs("selective_copying", "cpu", ["mingru"], steps=2, sweep=False,
                  options={"mingru": {"mingru_forget_bais": 3.0}})
    with pytest.raises(CompareError, match=r"--set names \['gru'\]"):
        plan_runs("selective_copying", "cpu", ["mingru"], steps=2, sweep=False, options={"gru": {"dropout": 0.1}})
    specs = plan_runs("selective_copying", "cpu", ["mingru", "lstm"], steps=1, eval_every=1, sweep=False,
                      options={"mingru": {"decay_bias": 3.0}})
    assert specs[0].options == {"decay_bias": 3.0} and specs[1].options == {}
    assert "options" not in specs[1].to_json()  # unset options are left out of spec.json
    md = compare("selective_copying", "cpu", ["mingru"], tmp_path, steps=1, eval_every=1, sweep=False,
                 isolate=False, log=lambda s: None, progress=False, options={"mingru": {"decay_bias": 3.0}})
    assert "mingru.decay_bias=3.0" in md.read_text()
    assert _results(md)[0]["options"] == {"decay_bias": 3.0}
    assert main(["compare", "selective_copying", "--models", "mingru", "--set", "mingru.nope=1",
                 "--out", str(tmp_path)]) == 2
    # the option reached the model: the gate's bias starts at -3 (checked on a fresh build)
    preset = C.load_preset("selective_copying", "cpu")
    target, overrides = preset.model_settings("mingru", 16)
    from minrnn.experiments.baselines import build_model
    model = build_model("mingru", 16, target, **{**overrides, **specs[0].options})
    proj = model.model.model.layers[0].mixer.in_proj
    assert torch.all(proj.bias[proj.rnn_hidden_size:] == -3.0)


def test_optim_parses_checks_and_applies_on_top_of_the_preset():
    assert C.parse_optim(["weight_decay=0.3", "decay_recurrence=true", "warmup_steps=10", "fused_optimizer=true"]) == {
        "weight_decay": 0.3, "decay_recurrence": True, "warmup_steps": 10, "fused_optimizer": True}
    for bad in ("weight_decay", "=0.3"):
        with pytest.raises(CompareError, match="expected KEY=VALUE"):
            C.parse_optim([bad])
    for optim, message in [({"batch_size": 8}, "batch_size: not an optimiser setting"),
                           ({"lr": 1e-3}, "the learning rate has --lr"),
                           ({"weight_decay": -0.1}, "expected a finite number >= 0"),
                           ({"weight_decay": float("nan")}, "expected a finite number >= 0"),
                           ({"weight_decay": "lots"}, "expected a finite number >= 0"),
                           ({"warmup_steps": 2.5}, "expected a whole number >= 0"),
                           ({"decay_recurrence": 1}, "expected true or false"),
                           ({"fused_optimizer": "yes"}, "expected true or false")]:
        with pytest.raises(CompareError, match=message):
            plan_runs("selective_copying", "cpu", ["lstm"], steps=2, sweep=False, optim=optim)
    preset = C.load_preset("selective_copying", "cpu")
    base = preset.train_settings("mingru")
    (spec,) = plan_runs("selective_copying", "cpu", ["mingru"], steps=2, sweep=False, lr=1e-2,
                        optim={"weight_decay": 1, "min_lr": 5e-4})
    train = C.run_train_settings(preset, spec)
    # an int is taken for a float; an explicit floor wins over the one scaled with --lr
    assert train["weight_decay"] == 1.0 and isinstance(train["weight_decay"], float)
    assert train["lr"] == 1e-2 and train["min_lr"] == 5e-4
    assert {k: v for k, v in train.items() if k not in ("lr", "min_lr", "weight_decay")} == \
        {k: v for k, v in base.items() if k not in ("lr", "min_lr", "weight_decay")}
    (plain,) = plan_runs("selective_copying", "cpu", ["mingru"], steps=2, sweep=False)
    assert "optim" not in plain.to_json()


def test_optim_reaches_the_optimiser_and_is_reported(tmp_path):
    """One step each: with the preset's decay_recurrence = false, a larger weight decay moves the
    decayed matrices but leaves the recurrent projection exactly where the preset's run puts it;
    decay_recurrence = true moves that too."""
    def weights(optim, name):
        md = compare("selective_copying", "cpu", ["mingru"], tmp_path / name, steps=1, eval_every=1,
                     sweep=False, isolate=False, log=lambda s: None, progress=False, keep_weights=True,
                     optim=optim)
        return md, torch.load(md.parent / "runs" / "mingru" / "weights.pt")

    _, base = weights({}, "base")
    md, decayed = weights({"weight_decay": 5.0}, "wd")
    _, all_decayed = weights({"weight_decay": 5.0, "decay_recurrence": True}, "wd_rec")
    recurrent = [k for k in base if "mixer.in_proj.weight" in k]
    others = [k for k in base if k.endswith("weight") and base[k].dim() == 2 and k not in recurrent]
    assert recurrent and others
    assert all(torch.equal(decayed[k], base[k]) for k in recurrent)
    assert all(not torch.equal(decayed[k], base[k]) for k in others)
    assert all(not torch.equal(all_decayed[k], base[k]) for k in recurrent)
    assert "`--optim`" in md.read_text() and "weight_decay=5.0" in md.read_text()
    assert _results(md)[0]["optim"] == {"weight_decay": 5.0}
    assert main(["compare", "selective_copying", "--models", "mingru", "--optim", "batch_size=3",
                 "--out", str(tmp_path / "cli")]) == 2


def test_sweep_report_holds_each_run_to_its_own_depth_and_adds_the_matrix(tmp_path):
    md = compare("selective_copying", "cpu", ["mingru", "llama"], tmp_path, steps=1, eval_every=1,
                 isolate=False, log=lambda s: None, progress=False)
    text = md.read_text()
    assert "steps to the best Transformer's best (same num_hidden_layers)" in text
    assert "| model | num_hidden_layers=1 | num_hidden_layers=2 | num_hidden_layers=3 |" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| llama-")}
    # each llama run reaches its own best at its one evaluation: 1 step, at every depth
    assert len(rows) == 3 and all(line.split("|")[8].strip() == "1" for line in rows.values())
    results = _results(md)
    matrix = [line for line in text.splitlines() if line.startswith("| mingru |")]
    want = [f"{r['final_split']['accuracy']:.3f}" for r in sorted(
        (r for r in results if r["model"] == "mingru"), key=lambda r: r["sweep"]["num_hidden_layers"])]
    assert matrix == ["| mingru | " + " | ".join(want) + " |"]


def test_compare_text_on_a_users_file_end_to_end(tmp_path, capsys):
    """`minrnn compare text --data FILE`: the file split 90/10, every model on the same tokens."""
    data = tmp_path / "corpus.txt"
    data.write_text(shakespeare(30_000))
    out = tmp_path / "out"
    assert main(["compare", "text", "--data", str(data), "--tokenizer", "byte", "--models", "mingru,llama",
                 "--steps", "2", "--eval-every", "1", "--out", str(out), "--no-progress"]) == 0
    md = out / "text-cpu" / "results.md"
    assert "written: " + str(md) in capsys.readouterr().out
    results = _results(md)
    assert [r["model"] for r in results] == ["mingru", "llama"]
    for r in results:
        assert r["data"].startswith("corpus.txt (byte tokens)") and r["steps"] == 2
        assert [h["step"] for h in r["history"]] == [1, 2] and r["final_split"]["loss"] < math.log(256)
        run = out / "text-cpu" / "runs" / r["model"]
        assert json.loads((run / "spec.json").read_text())["data"] == str(data)
        assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
        assert not (run / "checkpoints").exists()
    # both models were built to the same budget at the byte vocabulary
    assert abs(results[0]["params"] / results[1]["params"] - 1) < 0.1
    # BPE, in this process
    md = compare("text", "cpu", ["mingru"], tmp_path / "bpe", data=str(data), tokenizer="bpe", steps=1,
                 eval_every=1, isolate=False, log=lambda s: None, progress=False)
    assert "bpe tokens" in _results(md)[0]["data"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(experiment="text"), "--data: `compare text` needs"),
    (dict(experiment="shakespeare_char", options={"mingru": {"width": 100, "hidden_size": 100}}),
     "'width' and 'hidden_size' are one option"),
    (dict(experiment="shakespeare_char", data="x.txt"), "--data and --tokenizer are for `compare text`"),
    (dict(experiment="text", data="x.txt", tokenizer="words"), "--tokenizer must be one of"),
])
def test_text_requests_are_checked(kwargs, message):
    with pytest.raises(CompareError, match=message):
        plan(CompareConfig(**kwargs))


def test_one_place_steps_an_optimiser():
    """The package has one training loop: exactly one optimiser step, in the engine."""
    import re
    from pathlib import Path

    import minrnn

    root = Path(minrnn.__file__).parent
    hits = [(p.relative_to(root).as_posix(), line.strip()) for p in root.rglob("*.py")
            for line in p.read_text().splitlines()
            if re.search(r"\b(opt|optim|optimizer|optimiser)\.step\(", line)]
    assert hits == [("training/loop.py", "self.optimizer.step()  # the package's one optimiser step")]
