"""The sequence classification head learns a tiny synthetic task."""

import pytest
import torch

pytest.importorskip("transformers")

from minrnn.models import MinRNNForSequenceClassification  # noqa: E402

from .conftest import VOCAB, tiny_config  # noqa: E402

MARK, LENGTH = 1, 12


def marker_task(n: int, gen: torch.Generator):
    """Rows of 4 .. 12 tokens, right-padded with 0; label 1 iff the marker token occurs in the
    row (at a random place), so the answer must be carried by the state to the last real token."""
    lengths = torch.randint(4, LENGTH + 1, (n,), generator=gen)
    ids = torch.randint(MARK + 1, VOCAB, (n, LENGTH), generator=gen)
    labels = torch.randint(0, 2, (n,), generator=gen)
    where = (torch.rand(n, generator=gen) * lengths).long()
    ids[labels.bool(), where[labels.bool()]] = MARK
    mask = (torch.arange(LENGTH) < lengths[:, None]).long()
    return ids * mask, mask, labels


@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
def test_classifier_learns_the_marker_task(cell):
    """60 AdamW steps: the mean loss of the last 5 steps falls below 0.2 and below a quarter of
    the first 5 steps' (about ln 2 = 0.69 at the start); held-out accuracy reaches 95%."""
    torch.manual_seed(0)
    model = MinRNNForSequenceClassification(tiny_config(num_labels=2, cell=cell))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        ids, mask, labels = marker_task(64, gen)
        loss = model(ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.2 and last < 0.25 * first, (first, last)
    ids, mask, labels = marker_task(512, torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        accuracy = (model(ids, attention_mask=mask).logits.argmax(-1) == labels).float().mean().item()
    assert accuracy >= 0.95
