"""One streamed call's items, from the threads that make them to the event loop that sends them."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator


class ItemStream:
    """Items ("text" pieces, then "stats", "error" or "end") that worker threads put, read on
    `loop` as {kind: value} dicts until "end" (an "error" item's value is raised). A text
    piece may carry its tokens' log-probabilities: {"text": piece, "logprobs": [...]}, and a
    stream's first the prompt's: "prompt_logprobs".

    Text pieces that queued while the reader was busy go out joined in one message (their
    log-probabilities too): a reader slower than the decode steps gets fewer, larger pieces
    instead of falling behind."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: collections.deque = collections.deque()  # (kind, value, logprobs, prompt's), on the loop
        self._arrived = asyncio.Event()

    def put(self, kind: str, value=None, logprobs: list | None = None, prompt_logprobs: list | None = None) -> None:
        """From any thread. logprobs: a text piece's tokens'; prompt_logprobs: the prompt's."""
        self._loop.call_soon_threadsafe(self._push, kind, value, logprobs, prompt_logprobs)

    def _push(self, kind: str, value, logprobs: list | None, prompt_logprobs: list | None) -> None:
        self._items.append((kind, value, logprobs, prompt_logprobs))
        self._arrived.set()

    async def __aiter__(self) -> AsyncIterator[dict]:
        while True:
            while not self._items:
                self._arrived.clear()
                await self._arrived.wait()
            kind, value, logprobs, prompt_logprobs = self._items.popleft()
            if kind == "end":
                return
            if kind == "error":
                raise value
            if kind != "text":
                yield {kind: value}
                continue
            while self._items and self._items[0][0] == "text":
                _, more, more_logprobs, _ = self._items.popleft()  # only a stream's first piece has the prompt's
                value += more
                if more_logprobs is not None:
                    logprobs = (logprobs or []) + more_logprobs
            item = {"text": value}
            if logprobs is not None:
                item["logprobs"] = logprobs
            if prompt_logprobs is not None:
                item["prompt_logprobs"] = prompt_logprobs
            yield item
