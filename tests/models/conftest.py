"""Shared helpers for the transformers-model tests: tiny configs, seeded models."""

import torch

VOCAB = 50

# The four blocks the issue asks about (both cells, with and without the conv) ...
BLOCKS = {
    "mingru-conv": dict(cell="mingru", use_conv=True),
    "mingru": dict(cell="mingru", use_conv=False),
    "minlstm-conv": dict(cell="minlstm", use_conv=True),
    "minlstm": dict(cell="minlstm", use_conv=False),
}
# ... and the remaining switches: unnormalised minLSTM, a width-1 conv (no past to cache),
# a wide conv without the MLP, untied embeddings with biases
MORE_BLOCKS = {
    "minlstm-raw-conv1": dict(cell="minlstm", cell_options={"normalize": False}, use_conv=True, conv_kernel=1),
    "mingru-conv5-nomlp": dict(cell="mingru", use_conv=True, conv_kernel=5, use_mlp=False),
    "mingru-untied-bias": dict(cell="mingru", tie_word_embeddings=False, use_bias=True, hidden_act="silu"),
    # the signed cells (transitions in (-1, 1)): the same cache, step and padding paths
    "mingru-signed-conv": dict(cell="mingru_signed", use_conv=True, decay_bias=3.0),
    "minlstm-signed": dict(cell="minlstm_signed", use_conv=False),
}
ALL_BLOCKS = {**BLOCKS, **MORE_BLOCKS}


def tiny_config(**overrides):
    from minrnn.models import MinRNNConfig  # test modules importorskip transformers first

    kw = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, expansion_factor=1.5, mlp_mult=2,
              conv_kernel=3, pad_token_id=0, initializer_range=0.2)
    kw.update(overrides)
    return MinRNNConfig(**kw)


def tiny_lm(seed: int = 0, dtype=torch.float32, **overrides):
    """A tiny causal LM in eval mode. initializer_range 0.2 (not 0.02) so that the weights
    are large enough for every part of the block to move the logits."""
    from minrnn.models import MinRNNForCausalLM

    torch.manual_seed(seed)
    return MinRNNForCausalLM(tiny_config(**overrides)).to(dtype).eval()


def random_ids(batch: int, length: int, seed: int = 1, low: int = 1) -> torch.Tensor:
    """Token ids in [low, VOCAB): 0 is the pad token."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, (batch, length), generator=gen)
