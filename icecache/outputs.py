"""What a request returns: its output, and the stream of pieces that ends with it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """One output token's log-probability under the model, and the most likely tokens' at its step."""
    token_id: int
    logprob: float | None  # None only for a prompt's first token, which nothing precedes
    top: list[tuple[int, float]]  # (token id, log-probability), most likely first


class TextPiece(str):
    """A streamed text piece of a request that asked for log-probabilities: the text, and
    `logprobs`, the tokens decoded since the previous piece (a token whose text is held back,
    an incomplete character or a possible stop string, comes with the piece that shows it;
    the final output holds every token's); None where only prompt_logprobs were asked.
    `prompt_logprobs`: on a stream's first piece, where SamplingParams.prompt_logprobs asked
    for them, the prompt's tokens' (as GenerationOutput.prompt_logprobs; so a client can show
    the scored prompt before the reply); None on the other pieces."""

    logprobs: list[TokenLogprob] | None
    prompt_logprobs: list[TokenLogprob] | None

    def __new__(cls, text: str, logprobs: list[TokenLogprob] | None,
                prompt_logprobs: list[TokenLogprob] | None = None) -> "TextPiece":
        piece = super().__new__(cls, text)
        piece.logprobs, piece.prompt_logprobs = logprobs, prompt_logprobs
        return piece

    def __reduce__(self):  # pickled (sent between processes) with its log-probabilities
        return TextPiece, (str(self), self.logprobs, self.prompt_logprobs)


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length"
    stats: dict = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when SamplingParams.logprobs asked
    # one per prompt token, when SamplingParams.prompt_logprobs asked (a prompt that continues a
    # context: its first token's given the context; else that one's logprob is None)
    prompt_logprobs: list[TokenLogprob] | None = None


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
