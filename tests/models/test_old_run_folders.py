"""Run folders written by an earlier minrnn (commit 14b4ced) still load, score and generate as
they did there: the logits of a prompt, greedy decoding and the CLI's seeded sampling.

The folders and the expected outputs lie in tests/models/data/run_14b4ced/ (written by the
make_expected.py beside them, at that commit); they hold config keys that later versions may
rename, so this guards the mapping of old keys as well as the numbers.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from minrnn.cli import main as cli_main  # noqa: E402
from minrnn.models import MinRNNForCausalLM  # noqa: E402

HERE = Path(__file__).parent / "data" / "run_14b4ced"
EXPECTED = load_file(HERE / "expected.safetensors")
TEXTS = json.loads((HERE / "expected.json").read_text())
RUNS = ("mingru", "minlstm_hybrid")


@pytest.mark.parametrize("run", RUNS)
def test_an_old_checkpoint_gives_the_same_logits_and_greedy_tokens(run):
    folder = HERE / run / "latest"
    model = MinRNNForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(folder).encode(TEXTS["prompt"])])
    assert torch.equal(ids, EXPECTED[f"{run}.input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, EXPECTED[f"{run}.logits"], rtol=0, atol=1e-5)
        greedy = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(greedy, EXPECTED[f"{run}.greedy"])


@pytest.mark.parametrize("run", RUNS)
def test_an_old_run_folder_samples_the_same_text_from_the_cli(run, tmp_path, capsys):
    folder = tmp_path / run
    shutil.copytree(HERE / run, folder, symlinks=True)  # the run lock is taken inside the folder
    assert cli_main(["generate", "--run", str(folder), "--prompt", "ROMEO:", "--tokens", "40", "--seed", "3"]) == 0
    assert capsys.readouterr().out == TEXTS["sampled"][run]
