"""Next-token sampling and incremental detokenisation with stop strings."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from icecache.config import SamplingParams
from icecache.outputs import TokenLogprob


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


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """`token`'s log-probability under the model's distribution (logits [vocab], before any
    temperature or cut-off) and the k most likely tokens'."""
    return rows_logprobs(logits[None], [token], k)[0]


def rows_logprobs(logits: torch.Tensor, tokens: Sequence[int], k: int, block: int = 256) -> list[TokenLogprob]:
    """token_logprob of each row of logits [n, vocab] for tokens[i], `block` rows at a time
    (a prompt's rows over a large vocabulary), each block's results copied to the host at once."""
    out = []
    for at in range(0, len(tokens), block):
        logp = torch.log_softmax(logits[at:at + block].float(), dim=-1)
        ids = torch.tensor(tokens[at:at + block], device=logp.device)
        chosen = logp.gather(1, ids[:, None])[:, 0].tolist()
        top = logp.topk(k, dim=-1) if k else None
        alts = zip(top.indices.tolist(), top.values.tolist()) if top is not None else ([[], []] for _ in chosen)
        out += [TokenLogprob(t, c, list(zip(i, v))) for t, c, (i, v) in zip(tokens[at:at + block], chosen, alts)]
    return out


class TextStream:
    """Turns generated token ids into text pieces, holding back what may still become
    a stop string or an incomplete UTF-8 character.

    Decoding is incremental: each token decodes only the few ids since the last visible
    piece (plus the ids before them, so a tokenizer that drops a leading space still sees
    it), not the whole output again, so a token costs the same at the 10th and the 10,000th."""

    def __init__(self, tokenizer, stop: tuple[str, ...], lock=None) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.lock = lock or contextlib.nullcontext()  # shared with the engine's other tokenizer calls
        self.ids: list[int] = []
        self.emitted = 0  # characters of the text already handed out
        self.stopped = False
        self.text = ""
        self._prefix = self._read = 0  # ids[_prefix:_read] are decoded already; ids[_read:] are pending
        self._longest_stop = max((len(s) for s in stop), default=0)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self.tokenizer is None or self.stopped:
            return ""
        new = self._pending()
        if not new or "\ufffd" in new:  # nothing visible yet, or bytes not (yet) a whole UTF-8 character:
            return ""  # wait, so pieces only ever split where the text is whole (as a full decode would)
        self._take(new)
        if self.stopped:
            return self._emit(len(self.text))
        return self._emit(len(self.text) - max(self._longest_stop - 1, 0))

    def flush(self) -> str:
        if self.tokenizer is not None and not self.stopped:
            new = self._pending()
            if new:
                self._take(new)
        return self._emit(len(self.text))

    def _pending(self) -> str:
        """The text the pending ids add after the decoded ones."""
        with self.lock:
            before = self.tokenizer.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
            after = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=True)
            if not after.startswith(before):  # a tokenizer whose pieces do not concatenate: decode it all
                return self.tokenizer.decode(self.ids, skip_special_tokens=True)[len(self.text):]
        return after[len(before):]

    def _take(self, new: str) -> None:
        """Append new text, cut at the first stop string (one may straddle the old end)."""
        self._prefix, self._read = self._read, len(self.ids)
        start = max(0, len(self.text) - self._longest_stop + 1)
        self.text += new
        cut = [at for at in (self.text.find(s, start) for s in self.stop) if at >= 0]
        if cut:
            self.stopped, self.text = True, self.text[:min(cut)]

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        piece = self.text[self.emitted:end]
        self.emitted = end
        return piece
