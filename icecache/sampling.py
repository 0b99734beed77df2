"""Next-token sampling and incremental detokenisation with stop strings."""

from __future__ import annotations

import contextlib

import torch

from icecache.config import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return gen


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """logits: [vocab] -> token id."""
    logits = logits.float().cpu()
    if params.temperature == 0.0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(0) - sorted_p >= params.top_p  # mass before this token already enough
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


class TextStream:
    """Turns generated token ids into text pieces, holding back what may still become
    a stop string or an incomplete UTF-8 character."""

    def __init__(self, tokenizer, stop: tuple[str, ...], lock=None) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.lock = lock or contextlib.nullcontext()  # shared with the engine's other tokenizer calls
        self.ids: list[int] = []
        self.emitted = 0  # characters of the text already handed out
        self.stopped = False
        self.text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self.tokenizer is None:
            return ""
        with self.lock:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                self.stopped, text = True, text[:at]
        self.text = text
        if self.stopped:
            return self._emit(len(text))
        hold = max((len(s) - 1 for s in self.stop), default=0)
        end = len(text) - hold
        if text.endswith("\ufffd"):
            end = min(end, len(text) - 1)
        return self._emit(end)

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        piece = self.text[self.emitted:end]
        self.emitted = end
        return piece
