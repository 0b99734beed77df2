"""One streamed call's items, from the threads that make them to the event loop that sends them."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator


class ItemStream:
    """Items ("text" pieces, then "stats", "error" or "end") that worker threads put, read on
    `loop` as {kind: value} dicts until "end" (an "error" item's value is raised).

    Text pieces that queued while the reader was busy go out joined in one message: a reader
    slower than the decode steps gets fewer, larger pieces instead of falling behind."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: collections.deque = collections.deque()  # (kind, value), appended on the loop
        self._arrived = asyncio.Event()

    def put(self, kind: str, value=None) -> None:
        """From any thread."""
        self._loop.call_soon_threadsafe(self._push, kind, value)

    def _push(self, kind: str, value) -> None:
        self._items.append((kind, value))
        self._arrived.set()

    async def __aiter__(self) -> AsyncIterator[dict]:
        while True:
            while not self._items:
                self._arrived.clear()
                await self._arrived.wait()
            kind, value = self._items.popleft()
            while kind == "text" and self._items and self._items[0][0] == "text":
                value += self._items.popleft()[1]
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield {kind: value}
