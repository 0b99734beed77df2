"""What a request returns: its output, and the stream of pieces that ends with it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """One output token's log-probability under the model, and the most likely tokens' at its step."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-probability), most likely first


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length"
    stats: dict = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when SamplingParams.logprobs asked


class GenerationStream:
    """Text pieces of one request as they are decoded; `output` once the stream ends."""

    def __init__(self, items: Iterator) -> None:
        self._items = items
        self.output: GenerationOutput | None = None

    def __iter__(self) -> Iterator[str]:
        for item in self._items:
            if isinstance(item, GenerationOutput):
                self.output = item
            else:
                yield item

    def close(self) -> None:
        """Stop decoding; the request's memory is freed."""
        self._items.close()
