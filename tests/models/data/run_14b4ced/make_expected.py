"""Writes expected.safetensors and expected.json beside the two run folders here, from the
minrnn that is importable (run once, at the commit that wrote the run folders: 14b4ced).

    python tests/models/data/run_14b4ced/make_expected.py
"""

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

import minrnn.models  # noqa: F401  (registers the Auto classes)
from minrnn.models import MinRNNForCausalLM

HERE = Path(__file__).parent
RUNS = ("mingru", "minlstm_hybrid")
PROMPT = "ROMEO:\nWhat say you, sir?"


def main() -> None:
    tensors, texts = {}, {}
    for run in RUNS:
        folder = HERE / run / "latest"
        model = MinRNNForCausalLM.from_pretrained(folder).eval()
        ids = torch.tensor([AutoTokenizer.from_pretrained(folder).encode(PROMPT)])
        with torch.no_grad():
            tensors[f"{run}.input_ids"] = ids
            tensors[f"{run}.logits"] = model(ids).logits.contiguous()
            tensors[f"{run}.greedy"] = model.generate(ids, max_new_tokens=24, do_sample=False).contiguous()
        texts[run] = subprocess.run(
            [sys.executable, "-m", "minrnn", "generate", "--run", str(HERE / run), "--prompt", "ROMEO:",
             "--tokens", "40", "--seed", "3"], check=True, capture_output=True, text=True).stdout
    save_file(tensors, HERE / "expected.safetensors")
    (HERE / "expected.json").write_text(json.dumps({"prompt": PROMPT, "sampled": texts}, indent=1) + "\n")


if __name__ == "__main__":
    main()
