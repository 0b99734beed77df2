"""The OpenAI API's request parsing, as plain functions (the routes are tested through the
real app in test_serve.py)."""

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


@pytest.mark.parametrize("field,value", [("logprobs", True), ("top_logprobs", 5), ("n", 2), ("presence_penalty", 0.5),
                                         ("logit_bias", {"50256": -100}), ("echo", True)])
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
