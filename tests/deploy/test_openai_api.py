"""The OpenAI API's request parsing, as plain functions (the routes are tested through the
real app in test_serve.py)."""

import json

import pytest

from deploy.errors import RequestError
from deploy.openai_api import parse_request

MODEL = "SmolLM2-135M-Instruct"


def parse(body: dict, chat: bool = True) -> dict:
    return parse_request(body, chat, MODEL, max_new_tokens=256, max_document_bytes=1 << 20)


def test_fields_clients_send_at_their_off_values_are_accepted():
    """What the openai SDK, LangChain and benchmark clients send explicitly when a feature is off."""
    off = {"n": 1, "logprobs": False, "top_logprobs": 0, "presence_penalty": 0.0, "frequency_penalty": 0,
           "logit_bias": {}, "user": "u1", "stream_options": {"include_usage": True}, "stream": True}
    req = parse({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **off})
    assert req["stream"] and req["include_usage"] and req["sampling"]["max_tokens"] == 256
    req = parse({"prompt": "hi", "max_tokens": 5, "echo": False, "best_of": 1, "logprobs": None, "suffix": None},
                chat=False)
    assert req["prompt"] == "hi" and req["sampling"]["max_tokens"] == 5


@pytest.mark.parametrize("field,value", [("n", 2), ("presence_penalty", 0.5), ("logit_bias", {"50256": -100}),
                                         ("best_of", 3)])
def test_features_this_server_lacks_are_refused_by_name(field, value):
    with pytest.raises(RequestError) as failure:
        parse({"messages": [{"role": "user", "content": "hi"}], field: value})
    assert failure.value.code == "INVALID_ARGUMENT" and failure.value.message.startswith(f"{field}: not supported")


def test_bad_values_name_their_field():
    for body, field in [({"messages": [], "max_tokens": 4}, "messages"),
                        ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_tokens"),
                        ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
                        ({"messages": [{"role": "user", "content": "x"}], "tools": []}, "tools")]:
        with pytest.raises(RequestError) as failure:
            parse(body)
        assert failure.value.message.startswith(field), failure.value.message


def test_logprobs_are_asked_the_way_each_api_asks_them():
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert parse({**chat, "logprobs": True, "top_logprobs": 3})["sampling"]["logprobs"] == 3
    assert parse({**chat, "logprobs": True})["sampling"]["logprobs"] == 0
    assert "logprobs" not in parse({**chat, "logprobs": False})["sampling"]
    assert parse({"prompt": "hi", "logprobs": 2}, chat=False)["sampling"]["logprobs"] == 2
    for body, chat_api, field in [({**chat, "top_logprobs": 2}, True, "top_logprobs"),
                                  ({**chat, "logprobs": True, "top_logprobs": 21}, True, "top_logprobs"),
                                  ({**chat, "logprobs": 1}, True, "logprobs"),
                                  ({"prompt": "hi", "logprobs": True}, False, "logprobs"),
                                  ({"prompt": "hi", "top_logprobs": 2}, False, "top_logprobs")]:
        with pytest.raises(RequestError) as failure:
            parse(body, chat=chat_api)
        assert failure.value.message.startswith(field), failure.value.message


def test_logprobs_come_back_in_each_apis_shape():
    from deploy.openai_api import Reply
    stats = {"finish_reason": "length", "context_tokens": 0, "prompt_tokens": 2, "output_tokens": 2,
             "context_reused": False, "logprobs": [{"token": "Hi", "logprob": -0.5, "top": [["Hi", -0.5], ["Yo", -1.5]]},
                                                   {"token": " there", "logprob": -0.25, "top": [[" there", -0.25]]}]}
    chat = Reply(True, MODEL).whole("Hi there", stats)["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in chat] == ["Hi", " there"] and chat[0]["bytes"] == list(b"Hi")
    assert chat[0]["top_logprobs"][1] == {"token": "Yo", "logprob": -1.5, "bytes": list(b"Yo")}
    legacy = Reply(False, MODEL).whole("Hi there", stats)["choices"][0]["logprobs"]
    assert legacy == {"tokens": ["Hi", " there"], "token_logprobs": [-0.5, -0.25],
                      "top_logprobs": [{"Hi": -0.5, "Yo": -1.5}, {" there": -0.25}], "text_offset": [0, 2]}
    assert Reply(True, MODEL).whole("x", {**stats, "logprobs": None})["choices"][0]["logprobs"] is None


def test_a_streams_logprobs_go_with_its_chunks_and_the_rest_with_the_last():
    """Each text chunk carries its tokens' log-probabilities; tokens that showed no text (held
    back, then cut at a stop string) come with the finishing chunk; the offsets of a completion
    stream count from its first character."""
    import json

    from deploy.openai_api import Reply
    tokens = [{"token": t, "logprob": -0.1 * i, "top": [[t, -0.1 * i]]} for i, t in enumerate(["Hi", " there", "!"])]
    stats = {"finish_reason": "stop", "context_tokens": 0, "prompt_tokens": 2, "output_tokens": 3,
             "context_reused": False, "logprobs": tokens}

    def choice(chunk: str) -> dict:
        return json.loads(chunk.removeprefix("data: "))["choices"][0]

    chat = Reply(True, MODEL)
    assert choice(chat.chunk(first=True))["logprobs"] is None
    first, second = choice(chat.chunk("Hi", logprobs=tokens[:1])), choice(chat.chunk(" there", logprobs=tokens[1:2]))
    assert [c["token"] for c in first["logprobs"]["content"]] == ["Hi"] and first["delta"] == {"content": "Hi"}
    assert [c["token"] for c in second["logprobs"]["content"]] == [" there"]
    last = choice(chat.chunk(stats=stats))
    assert last["finish_reason"] == "stop" and [c["token"] for c in last["logprobs"]["content"]] == ["!"]
    legacy = Reply(False, MODEL)
    assert choice(legacy.chunk("Hi", logprobs=tokens[:1]))["logprobs"]["text_offset"] == [0]
    assert choice(legacy.chunk(" there", logprobs=tokens[1:2]))["logprobs"]["text_offset"] == [2]
    assert choice(legacy.chunk(stats={**stats, "logprobs": tokens[:2]}))["logprobs"] is None  # nothing left


def test_echo_asks_for_the_prompts_tokens_and_puts_them_first():
    """A completion with echo scores its prompt (prompt_logprobs, k = logprobs), may ask for no
    new token (max_tokens 0: how evaluation harnesses score a text), and returns the prompt's
    text and tokens before its own, the first prompt token with no log-probability."""
    from deploy.openai_api import Reply, echo_text
    req = parse({"prompt": "Hi there", "echo": True, "max_tokens": 0, "logprobs": 2}, chat=False)
    assert req["echo"] and req["sampling"] == {**req["sampling"], "max_tokens": 0, "prompt_logprobs": 2, "logprobs": 2}
    assert parse({"prompt": "Hi", "echo": True}, chat=False)["sampling"]["prompt_logprobs"] == 0
    assert "echo" not in parse({"prompt": "Hi", "echo": False}, chat=False)
    for body, chat, fragment in [({"prompt": "Hi", "max_tokens": 0}, False, "max_tokens"),
                                 ({"prompt": "Hi", "echo": 1}, False, "echo: expected"),
                                 ({"messages": [{"role": "user", "content": "x"}], "echo": True}, True, "echo: a")]:
        with pytest.raises(RequestError) as failure:
            parse(body, chat=chat)
        assert failure.value.message.startswith(fragment), failure.value.message
    prompt = [{"token": "Hi", "logprob": None, "top": []}, {"token": " there", "logprob": -2.0, "top": [[" all", -1.0]]}]
    stats = {"finish_reason": "length", "context_tokens": 0, "prompt_tokens": 2, "output_tokens": 1,
             "context_reused": False, "prompt_logprobs": prompt,
             "logprobs": [{"token": "!", "logprob": -0.5, "top": [["!", -0.5]]}]}
    assert echo_text("Hi there", prompt) == echo_text([1, 2], prompt) == "Hi there"
    choice = Reply(False, MODEL).whole("!", stats, echo="Hi there")["choices"][0]
    assert choice["text"] == "Hi there!"
    assert choice["logprobs"] == {"tokens": ["Hi", " there", "!"], "token_logprobs": [None, -2.0, -0.5],
                                  "top_logprobs": [None, {" all": -1.0}, {"!": -0.5}], "text_offset": [0, 2, 8]}
    assert Reply(False, MODEL).whole("!", {**stats, "logprobs": None}, echo="Hi there")["choices"][0]["logprobs"] is None
    # streamed (echo with stream: true): the prompt as the first event, the completion's chunks after it with
    # their own tokens' log-probabilities, offsets counted from the prompt's start
    reply = Reply(False, MODEL)
    events = [json.loads(e[len("data: "):]) for e in (reply.echo_chunk("Hi there", prompt),
                                                      reply.chunk("!", logprobs=stats["logprobs"]),
                                                      reply.chunk(stats=stats))]
    assert "".join(e["choices"][0]["text"] for e in events) == choice["text"]
    streamed = [e["choices"][0]["logprobs"] for e in events if e["choices"][0]["logprobs"]]
    assert [t for lp in streamed for t in lp["tokens"]] == choice["logprobs"]["tokens"]
    assert [o for lp in streamed for o in lp["text_offset"]] == choice["logprobs"]["text_offset"]
    assert events[-1]["choices"][0]["finish_reason"] == "length" and reply.logprobs_sent == 1
    assert Reply(False, MODEL).echo_chunk("Hi there", None).count('"logprobs": null') == 1
