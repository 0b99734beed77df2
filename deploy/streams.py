"""One streamed call's items, from the threads that make them to the event loop that sends them."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator


class ItemStream:
    """Items ("text" pieces, then "stats", "error" or "end") that worker threads put, read on
    `loop` as {kind: value} dicts until "end" (an "error" item's value is raised). A text
    piece may carry its tokens' log-probabilities: {"text": piece, "logprobs": [...]}.

    Text pieces that queued while the reader was busy go out joined in one message (their
    log-probabilities too): a reader slower than the decode steps gets fewer, larger pieces
    instead of falling behind."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: collections.deque = collections.deque()  # (kind, value, logprobs), appended on the loop
        self._arrived = asyncio.Event()

    def put(self, kind: str, value=None, logprobs: list | None = None) -> None:
        """From any thread. logprobs: a text piece's tokens'."""
        self._loop.call_soon_threadsafe(self._push, kind, value, logprobs)

    def _push(self, kind: str, value, logprobs: list | None) -> None:
        self._items.append((kind, value, logprobs))
        self._arrived.set()

    async def __aiter__(self) -> AsyncIterator[dict]:
        while True:
            while not self._items:
                self._arrived.clear()
                await self._arrived.wait()
            kind, value, logprobs = self._items.popleft()
            if kind == "end":
                return
            if kind == "error":
                raise value
            if kind != "text":
                yield {kind: value}
                continue
            while self._items and self._items[0][0] == "text":
                _, more, more_logprobs = self._items.popleft()
                value += more
                if more_logprobs is not None:
                    logprobs = (logprobs or []) + more_logprobs
            yield {"text": value} if logprobs is None else {"text": value, "logprobs": logprobs}
