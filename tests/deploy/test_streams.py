"""ItemStream: a producer thread's items read on an event loop."""

from __future__ import annotations

import asyncio
import threading
import time


from deploy.errors import RequestError
from deploy.streams import ItemStream


def read(pieces: list[str], last: tuple, reader_delay_s: float = 0.0,
         logprobs: bool = False) -> tuple[list[dict], BaseException | None]:
    """Put pieces (1 ms apart; with logprobs, each carrying [piece] as its tokens'), `last`
    and the end from a thread; read them back on a loop that takes reader_delay_s over each
    message. -> (messages, the error raised or None)."""
    messages: list[dict] = []

    async def main():
        stream = ItemStream(asyncio.get_running_loop())

        def produce():
            for i, piece in enumerate(pieces):
                stream.put("text", piece, [piece] if logprobs else None, ["prompt"] if logprobs and i == 0 else None)
                time.sleep(0.001)
            stream.put(*last)
            stream.put("end")
        threading.Thread(target=produce, daemon=True).start()
        async for item in stream:
            messages.append(item)
            await asyncio.sleep(reader_delay_s)
    try:
        asyncio.run(main())
    except RequestError as e:
        return messages, e
    return messages, None


def test_a_slow_reader_gets_the_queued_pieces_joined_and_nothing_lost():
    pieces = [f"t{i} " for i in range(60)]
    messages, error = read(pieces, ("stats", {"output_tokens": 60}), reader_delay_s=0.02)
    texts = [m["text"] for m in messages if "text" in m]
    assert error is None and "".join(texts) == "".join(pieces)  # nothing lost, nothing reordered
    assert len(texts) < len(pieces) // 2  # ~60 ms of tokens read 20 ms a message: a handful of messages
    assert messages[-1] == {"stats": {"output_tokens": 60}}


def test_a_fast_reader_gets_each_piece_and_an_error_ends_the_stream():
    messages, error = read(["x", "y"], ("error", RequestError("INVALID_ARGUMENT", "bad")))
    assert "".join(m["text"] for m in messages) == "xy" and all(set(m) == {"text"} for m in messages)
    assert isinstance(error, RequestError) and error.code == "INVALID_ARGUMENT"


def test_joined_pieces_carry_their_tokens_logprobs_in_order():
    pieces = [f"t{i} " for i in range(60)]
    messages, error = read(pieces, ("stats", {"output_tokens": 60}), reader_delay_s=0.02, logprobs=True)
    texts = [m for m in messages if "text" in m]
    assert error is None and len(texts) < len(pieces) // 2
    assert all(m["logprobs"] == [p for p in pieces if p in m["text"]] for m in texts)
    assert [t for m in texts for t in m["logprobs"]] == pieces
    assert texts[0]["prompt_logprobs"] == ["prompt"] and all("prompt_logprobs" not in m for m in texts[1:])
