"""Streaming text from a trained model: `model.generate` (the recurrent-cache decoding of
minrnn.models) with a streamer that prints each piece of text as soon as it is complete."""

from __future__ import annotations

import sys

import torch


class TextStream:
    """A transformers streamer: decodes the ids so far and writes the new text. Text that ends
    in a partial UTF-8 sequence (byte and BPE tokenizers) waits for the next token."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.ids: list[int] = []
        self.printed = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands the prompt over first
            self.prompt_seen = True
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids)
        if len(text) > self.printed:  # what a partial UTF-8 sequence held back
            self.out.write(text[self.printed:])
            self.out.flush()
        self.printed = len(text)

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids)


@torch.no_grad()
def sample(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float | None = 0.8,
           top_k: int | None = None, seed: int = 0, out=None) -> str:
    """Continue ``prompt`` by ``max_new_tokens`` tokens, writing them to ``out`` (stdout) as they
    come; returns the new text. ``temperature=None`` decodes greedily. Raises VocabularyError
    for a prompt the tokenizer cannot encode (naming the characters)."""
    from ..data.tokenizers import VocabularyError

    ids = tokenizer.encode(prompt)
    if not ids:
        raise VocabularyError("the prompt encodes to no tokens; give at least one character")
    device = next(model.parameters()).device
    stream = TextStream(tokenizer, out)
    was_training = model.training
    model.eval()
    rng = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        kwargs = dict(do_sample=False) if temperature is None else dict(do_sample=True, temperature=temperature,
                                                                           top_k=top_k or 0, top_p=1.0)
        model.generate(torch.tensor([ids], device=device), max_new_tokens=max_new_tokens, streamer=stream,
                       min_new_tokens=max_new_tokens, pad_token_id=0, **kwargs)
    finally:
        torch.set_rng_state(rng)  # sampling leaves the training RNG where it was
        model.train(was_training)
    return stream.text
