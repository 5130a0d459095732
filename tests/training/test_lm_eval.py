"""A run folder as lm-evaluation-harness sees it: its stock ``hf`` model loads ``RUN/best`` with
``trust_remote_code=True`` (no import of minrnn.models), and the log-likelihoods it reports for a
local task equal the model's own log-probabilities of the same tokens.

The run trains on a prepared folder (byte tokens with ``<|endoftext|>``, the token the harness
puts before each document); the task's YAML and data file are written here: no network.
"""

import json
import subprocess
import sys

import pytest
import torch

from .conftest import TINY, cli_env, minrnn

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the [eval] extra")

# no context ends in whitespace: the harness would move it into the continuation
DOCS = [("First Citizen:\nBefore we proceed", " any further, hear me speak."),
        ("All:\nSpeak,", " speak."),
        ("You are all resolved rather to die", " than to famish?")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """RUN/best of a 4-step byte-level run on a prepared folder made from the shipped sample."""
    from ..corpus import shakespeare

    tmp = tmp_path_factory.mktemp("lm_eval")
    (tmp / "text.txt").write_text(shakespeare(12_000))
    r = minrnn("prepare", tmp / "text.txt", "--tokenizer", "byte", "--out", tmp / "prepared", "--progress", "never")
    assert r.returncode == 0, r.stderr
    r = minrnn("train", TINY, "--data", tmp / "prepared", "--out_dir", tmp / "run", "--steps", 4, "--eval_every", 2,
               "--checkpoint_every", 2, "--progress", "never")
    assert r.returncode == 0, r.stderr
    return tmp / "run"


def write_tasks(folder) -> list[str]:
    """Two harness tasks over the same documents: each continuation scored given its context
    (``loglikelihood``), and each whole document (``loglikelihood_rolling``)."""
    folder.mkdir()
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps({"context": c, "continuation": t}) + "\n" for c, t in DOCS))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\ntest_split: test\n"
    (folder / "ll.yaml").write_text(
        "task: minrnn_test_ll\n" + common + "output_type: loglikelihood\ndoc_to_text: '{{context}}'\n"
        "doc_to_target: '{{continuation}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: perplexity\n")
    (folder / "rolling.yaml").write_text(
        "task: minrnn_test_rolling\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{context}}{{continuation}}'\nmetric_list:\n  - metric: word_perplexity\n")
    return ["minrnn_test_ll", "minrnn_test_rolling"]


def harness(pretrained, tasks: list[str], tmp_path, monkeypatch, more_args: str = "") -> dict:
    """lm_eval.simple_evaluate with the stock ``hf`` model on ``pretrained`` (offline, the tasks
    from tmp_path/tasks, every sample logged), ``more_args`` appended to its model_args."""
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    return lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={pretrained},trust_remote_code=True,dtype=float32{more_args}",
        tasks=tasks, task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
        log_samples=True, batch_size=2, device="cpu", bootstrap_iters=0)


def own_logprob(model, ids: list[int], scored: int) -> float:
    """Sum of log p(token) the model gives the last ``scored`` of ``ids`` (1-D, float64 sum)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), -1)
    targets = torch.tensor(ids[1:])
    return logp[torch.arange(len(targets)), targets][-scored:].sum().item()


def check_rolling(out: dict, model, tokenizer, prefix: int) -> None:
    """The harness scores every token of each document, the first given only ``prefix`` (the
    boundary token it puts first): its rolling log-likelihoods are the model's own (1e-4)."""
    rolling = {s["doc"]["context"]: s["resps"][0][0] for s in out["samples"]["minrnn_test_rolling"]}
    assert len(rolling) == len(DOCS)
    for context, continuation in DOCS:
        ids = [prefix] + tokenizer(context + continuation, add_special_tokens=False).input_ids
        assert rolling[context] == pytest.approx(own_logprob(model, ids, len(ids) - 1), abs=1e-4)


def test_harness_loglikelihoods_equal_the_models_own(run, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from minrnn.models import MinRNNForCausalLM

    out = harness(run / "best", write_tasks(tmp_path / "tasks"), tmp_path, monkeypatch)

    tokenizer = AutoTokenizer.from_pretrained(run / "best")
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.bos_token is None
    model = MinRNNForCausalLM.from_pretrained(run / "best").eval()
    enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731

    samples = {s["doc"]["context"]: s["resps"][0][0] for s in out["samples"]["minrnn_test_ll"]}
    assert len(samples) == len(DOCS)
    for context, continuation in DOCS:
        ll, _greedy = samples[context]
        want = own_logprob(model, enc(context) + enc(continuation), len(enc(continuation)))
        assert ll == pytest.approx(want, abs=1e-4)

    check_rolling(out, model, tokenizer, tokenizer.eos_token_id)


def test_run_folder_loads_in_a_process_that_never_imported_minrnn(run, tmp_path):
    """AutoModelForCausalLM (trust_remote_code) and AutoTokenizer on RUN/best in a fresh process:
    the same logits as minrnn's own loading, and ``minrnn.models`` imported only by the folder's module.
    (AutoTokenizer reads config.json first and, without trust_remote_code, offers to run the folder's
    code; with no terminal the offer lapses and the tokenizer loads all the same: stdin is empty here.)"""
    from minrnn.training.loop import load_run

    _, tokenizer, model, _ = load_run(run, "best")
    ids = tokenizer.encode(DOCS[0][0])
    code = ("import json, sys, torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"tok = AutoTokenizer.from_pretrained({str(run / 'best')!r})\n"
            "assert 'minrnn.models' not in sys.modules\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(run / 'best')!r}, trust_remote_code=True)\n"
            f"ids = tok({DOCS[0][0]!r}, add_special_tokens=False).input_ids\n"
            "print(chr(10) + json.dumps([ids == " + repr(ids) + ", m(torch.tensor([ids])).logits.double().sum().item(), "
            "tok.eos_token]))")
    env = {**cli_env(), "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    same_ids, total, eos = json.loads(r.stdout.splitlines()[-1])
    assert same_ids and eos == "<|endoftext|>"
    with torch.no_grad():
        assert float(total) == pytest.approx(model(torch.tensor([ids])).logits.double().sum().item(), rel=1e-6)


def test_in_memory_run_scores_documents_after_its_newline(tmp_path, monkeypatch):
    """A run trained on text in memory has no boundary token; the harness's ``prefix_token_id``
    argument gives it the newline, the token the run saw before each line it learnt from, and the
    harness then scores every token of a document given that one (the model's own log-probs)."""
    from transformers import AutoTokenizer

    from minrnn.models import MinRNNForCausalLM

    from ..corpus import shakespeare

    (tmp_path / "text.txt").write_text(shakespeare(12_000))
    r = minrnn("train", TINY, "--data", tmp_path / "text.txt", "--tokenizer", "char", "--out_dir", tmp_path / "run",
               "--steps", 4, "--eval_every", 2, "--checkpoint_every", 2, "--progress", "never")
    assert r.returncode == 0, r.stderr
    best = tmp_path / "run" / "best"
    tokenizer = AutoTokenizer.from_pretrained(best)
    assert tokenizer.bos_token_id is None and tokenizer.eos_token_id is None  # the vocabulary as trained
    (newline,) = tokenizer("\n", add_special_tokens=False).input_ids

    out = harness(best, write_tasks(tmp_path / "tasks")[1:], tmp_path, monkeypatch, f",prefix_token_id={newline}")

    check_rolling(out, MinRNNForCausalLM.from_pretrained(best).eval(), tokenizer, newline)
