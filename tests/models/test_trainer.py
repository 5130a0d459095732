"""transformers.Trainer trains MinRNNForCausalLM as it trains any causal LM (the docs' recipe)."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers.Trainer needs it

from .conftest import tiny_config  # noqa: E402


class RepeatingText(torch.utils.data.Dataset):
    """A learnable toy corpus: each row counts up by one modulo the vocabulary, from its own start."""

    def __init__(self, vocab: int, length: int = 32, rows: int = 64):
        starts = torch.arange(rows) % (vocab - 1)
        self.ids = (starts[:, None] + torch.arange(length)) % (vocab - 1) + 1  # 0 is the pad token

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
def test_trainer_lowers_the_loss(tmp_path, cell):
    from transformers import Trainer, TrainingArguments

    from minrnn.models import MinRNNForCausalLM

    torch.manual_seed(0)
    config = tiny_config(cell=cell, initializer_range=0.02)
    model = MinRNNForCausalLM(config)
    data = RepeatingText(config.vocab_size)
    batch = data.ids[:16]
    with torch.no_grad():
        before = model(batch, labels=batch).loss.item()
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=16, learning_rate=1e-2,
        warmup_steps=0, logging_steps=10, save_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    result = Trainer(model=model, args=args, train_dataset=data).train()

    assert result.global_step == 30
    model.eval()
    with torch.no_grad():
        after = model(batch, labels=batch).loss.item()
    assert after < 0.7 * before, (before, after)
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, weights[k])]
    # every weight trains: the recurrence's projections, the conv, the MLP and the tied embedding
    assert len(changed) == len(weights), sorted(set(weights) - set(changed))
