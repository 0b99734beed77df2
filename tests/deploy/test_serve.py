"""The Serve app end to end on one node: gRPC over loopback, two SmolLM2 replicas sharing
one node cache. Tests run in file order; the last ones break the app on purpose."""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time

import grpc
import pytest
import ray

from cluster import shm
from cluster.node_cache import find_node_cache
from icecache import SamplingParams
from tests.deploy.conftest import stop_serve, wait_for_no_segments
from tests.icecache.haystack import QUESTION, passkey_document

pytestmark = pytest.mark.slow
GREEDY = {"temperature": 0.0}


def timed_ask(client, prompt: str, max_tokens: int, **kwargs):
    """(text, stats, client-side time to first piece)."""
    start, first, pieces, stats = time.perf_counter(), None, [], None
    for reply in client.generate(prompt, max_tokens, **kwargs):
        if reply.WhichOneof("kind") == "text":
            first = first or time.perf_counter() - start
            pieces.append(reply.text)
        else:
            stats = reply.stats
    return "".join(pieces), stats, first


def code_of(call) -> tuple[grpc.StatusCode, str]:
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (str, bytes)):
            list(result)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


@pytest.fixture(scope="module")
def document(engine) -> str:
    return passkey_document(engine.tokenizer, 6000, 0.35, 61728)


def test_reused_context_starts_5x_sooner_and_answers_like_the_engine(app, engine, document):
    client = app.client(tenant="ttft")
    cold_text, cold, cold_ttft = timed_ask(client, QUESTION, 8, document=document, **GREEDY)
    second = "\nThe pass key mentioned in the text above is"
    warm_text, warm, warm_ttft = timed_ask(client, second, 8, context_id=cold.context_id, **GREEDY)
    print(f"\n[ttft] {cold.context_tokens}-token document: cold {cold_ttft:.2f}s (prefill {cold.prefill_s:.2f}s) | "
          f"reused {warm_ttft:.3f}s | ratio {cold_ttft / warm_ttft:.1f}x")
    assert not cold.context_reused and warm.context_reused and cold.context_tokens > 5500
    assert cold_ttft >= 5 * warm_ttft

    params = SamplingParams(max_tokens=8, temperature=0.0)
    ctx = engine.index(document)
    assert cold_text == engine.generate(QUESTION, params, context=ctx).text
    assert warm_text == engine.generate(second, params, context=ctx).text
    assert "61728" in cold_text


def test_two_replicas_share_one_prefill(app, engine):
    doc = passkey_document(engine.tokenizer, 1500, 0.6, 30417)
    client = app.client(tenant="share")
    indexed = client.index(doc)
    assert not indexed.cached and indexed.num_tokens > 1000
    prefills = sum(n.prefills for n in app.node_stats().values())
    hits = sum(n.hits for n in app.node_stats().values())
    segments, held = shm.list_segments(), sum(n.bytes for n in app.node_stats().values())

    results = []
    def ask():
        results.append(app.client(tenant="share").ask(QUESTION, 4, context_id=indexed.context_id, **GREEDY))
    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)

    assert len(results) == 8 and all(stats.context_reused for _, stats in results)
    assert sum(n.hits for n in app.node_stats().values()) >= hits + 8
    assert len({stats.replica_id for _, stats in results}) == 2, "both replicas served the context"
    assert len({text for text, _ in results}) == 1
    assert client.index(doc).cached
    assert sum(n.prefills for n in app.node_stats().values()) == prefills  # no second prefill anywhere
    # one copy in shared memory: no new segment, no more bytes held
    assert shm.list_segments() == segments and sum(n.bytes for n in app.node_stats().values()) == held


def test_tenants_cannot_use_or_learn_of_each_others_contexts(app, engine):
    doc = "Alice's contract: the fee is 4711 euros, payable in March. " * 20
    alice, bob = app.client(tenant="alice"), app.client(tenant="bob")
    own = alice.index(doc)
    code, details = code_of(lambda: bob.generate("The fee is", 4, context_id=own.context_id))
    unknown_code, unknown_details = code_of(lambda: bob.generate("The fee is", 4, context_id="f" * 32))
    assert code == unknown_code == grpc.StatusCode.NOT_FOUND
    assert details.replace(own.context_id, "X") == unknown_details.replace("f" * 32, "X")
    assert code_of(lambda: bob.release(own.context_id))[0] == grpc.StatusCode.NOT_FOUND
    assert bob.index(doc).context_id != own.context_id  # the same document gets another id
    assert alice.ask("The fee is", 2, context_id=own.context_id)[1].context_reused  # still Alice's


def test_bad_input_gets_a_clear_status_and_the_server_keeps_serving(app, engine):
    client = app.client(tenant="bad")
    good = client.index("A small document for the bad-input test. " * 10)
    segments_before, leases_before = shm.list_segments(), sum(n.leases for n in app.node_stats().values())
    bytes_before = sum(n.bytes for n in app.node_stats().values())
    long_doc = "word " * 7500
    cases = {
        "empty document": (lambda: client.index(""), "INVALID_ARGUMENT", "document: empty"),
        "empty inline document": (lambda: client.generate("q", 4, document=b""), "INVALID_ARGUMENT", "empty"),
        "unknown context": (lambda: client.generate("q", 4, context_id="0" * 32), "NOT_FOUND", "not found"),
        "malformed context id": (lambda: client.generate("q", 4, context_id="xyz"), "INVALID_ARGUMENT",
                                 "context_id: expected 32 hex digits"),
        "max_tokens 0": (lambda: client.generate("q", 0, context_id=good.context_id), "INVALID_ARGUMENT",
                         "max_tokens: must be positive"),
        "max_tokens negative": (lambda: client.generate("q", -3), "INVALID_ARGUMENT", "max_tokens"),
        "max_tokens over the limit": (lambda: client.generate("q", 257), "INVALID_ARGUMENT", "limit of 256"),
        "invalid UTF-8": (lambda: client.index(b"caf\xc3 \xff\xfe"), "INVALID_ARGUMENT", "not valid UTF-8"),
        "invalid UTF-8 inline": (lambda: client.generate("q", 4, document=b"\xff"), "INVALID_ARGUMENT", "UTF-8"),
        "document over the token limit": (lambda: client.index(long_doc), "INVALID_ARGUMENT", "over the limit of 7000"),
        "document over the byte limit": (lambda: client.index("x" * ((1 << 20) + 1)), "INVALID_ARGUMENT", "bytes"),
        "token id outside the vocabulary": (lambda: client.index([1, 2, 10 ** 8]), "INVALID_ARGUMENT", "vocabulary"),
        "temperature negative": (lambda: client.generate("q", 4, temperature=-1.0), "INVALID_ARGUMENT",
                                 "sampling.temperature"),
        "top_p above 1": (lambda: client.generate("q", 4, top_p=1.5), "INVALID_ARGUMENT", "sampling.top_p"),
        "top_k negative": (lambda: client.generate("q", 4, top_k=-2), "INVALID_ARGUMENT", "sampling.top_k"),
        "nothing to continue": (lambda: client.generate("", 4), "INVALID_ARGUMENT", "prompt: empty"),
        "bad tenant": (lambda: app.client(tenant="a b").index("x"), "INVALID_ARGUMENT", "tenant"),
    }
    failures = []
    for name, (call, code, fragment) in cases.items():
        got, details = code_of(call)
        if got.name != code or fragment not in details:
            failures.append(f"{name}: {got.name} {details!r}")
    assert not failures, failures

    text, stats = client.ask(" It says", 3, context_id=good.context_id)
    assert stats.output_tokens == 3 and stats.context_reused
    assert shm.list_segments() == segments_before  # nothing leaked
    assert sum(n.bytes for n in app.node_stats().values()) == bytes_before
    assert sum(n.leases for n in app.node_stats().values()) == leases_before == 0


def test_load_32_concurrent_streams_on_one_context(app, engine):
    client = app.client(tenant="load")
    indexed = client.index(passkey_document(engine.tokenizer, 1500, 0.5, 55001))
    segments_before = shm.list_segments()
    results, errors = [], []

    def stream():
        try:
            start = time.perf_counter()
            _, stats, ttft = timed_ask(app.client(tenant="load"), QUESTION, 4, context_id=indexed.context_id,
                                       **GREEDY)
            results.append((time.perf_counter() - start, ttft, stats))
        except grpc.RpcError as e:
            errors.append(f"{e.code().name}: {e.details()}")

    start = time.perf_counter()
    threads = [threading.Thread(target=stream) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[2].output_tokens for r in results)
    print(f"\n[load] 32 streams, {indexed.num_tokens}-token shared context: wall {wall:.1f}s | "
          f"{tokens / wall:.1f} tok/s | latency p50 {statistics.median(latencies):.2f}s "
          f"p99 {latencies[-1]:.2f}s | TTFT p50 {statistics.median(r[1] for r in results):.2f}s")
    assert not errors and len(results) == 32
    assert all(r[2].context_reused and r[2].output_tokens >= 1 for r in results)
    peak = max(r[2].peak_batch for r in results)
    print(f"[load] most streams decoded in one step: {peak}")
    assert peak >= 4  # the replicas batch concurrent streams instead of serialising them
    # where a first token's wait went, server side: leasing, then queueing, then a shared prefill pass
    assert all(0 < r[2].lease_s <= r[2].queue_s <= r[2].ttft_s and 0 < r[2].prefill_pass_s <= r[2].ttft_s
               for r in results)
    assert max(r[2].prefill_batch for r in results) >= 2  # questions waiting together are prefilled together
    assert shm.list_segments() == segments_before
    assert sum(n.leases for n in app.node_stats().values()) == 0


def http_json(method: str, url: str, tenant: str, body: dict | bytes | None = None) -> tuple[int, dict]:
    """One plain HTTP call (the context endpoints are ours, not in the openai client)."""
    import json
    import urllib.error
    import urllib.request
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"X-Tenant": tenant, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def openai_client(app, tenant: str):
    import openai
    return openai.OpenAI(base_url=f"{app.http}/v1", api_key="unused", default_headers={"X-Tenant": tenant},
                         max_retries=0, timeout=300)


def test_the_openai_client_completes_and_chats_on_an_indexed_document(app, engine):
    import openai
    oai, grpc_client = openai_client(app, "oa"), app.client(tenant="oa")
    assert [m.id for m in oai.models.list().data] == ["SmolLM2-135M-Instruct"]
    doc = "The secret code of the vault is 4711. The vault is in Zurich. " * 3
    status, made = http_json("POST", f"{app.http}/v1/contexts", "oa", {"document": doc})
    assert status == 200 and made["object"] == "context" and made["num_tokens"] > 0

    prompt = "\nThe secret code of the vault is"
    whole = oai.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=8, temperature=0,
                                   extra_body={"context_id": made["id"]})
    streamed = "".join(c.choices[0].text for c in oai.completions.create(
        prompt=prompt, max_tokens=8, temperature=0, stream=True, model="SmolLM2-135M-Instruct",
        extra_body={"context_id": made["id"]}))
    text, stats = grpc_client.ask(prompt, 8, context_id=made["id"], **GREEDY)
    assert whole.choices[0].text == streamed == text and "4711" in text  # the same answer over HTTP and gRPC
    assert whole.usage.prompt_tokens == stats.context_tokens + stats.prompt_tokens
    assert whole.usage.prompt_tokens_details.cached_tokens == made["num_tokens"]  # the document was reused
    assert whole.usage.completion_tokens == 8 and whole.choices[0].finish_reason == "length"

    # a chat whose first turn is the document: indexed once, then continued by messages
    _, chat_doc = http_json("POST", f"{app.http}/v1/contexts", "oa", {"document": doc, "chat_role": "system"})
    messages = [{"role": "user", "content": "What is the secret code?"}]
    reply = oai.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=12,
                                        temperature=0, extra_body={"context_id": chat_doc["id"]})
    chunks = list(oai.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=12,
                                              temperature=0, stream=True, stream_options={"include_usage": True},
                                              extra_body={"context_id": chat_doc["id"]}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    inline = oai.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=12,
                                         temperature=0, extra_body={"document": doc})  # same text: the same context
    # the template applied to the whole conversation at once, sent as one plain prompt (exact prefill)
    at_once = engine.tokenizer.apply_chat_template([{"role": "system", "content": doc}, *messages], tokenize=False,
                                                   add_generation_prompt=True)
    plain = oai.completions.create(model="SmolLM2-135M-Instruct", prompt=at_once, max_tokens=12, temperature=0)
    answer = reply.choices[0].message.content
    assert answer == streamed == inline.choices[0].message.content == plain.choices[0].text and "4711" in answer
    assert reply.usage.prompt_tokens_details.cached_tokens == chat_doc["num_tokens"]
    over_grpc = grpc_client.index(doc, chat_role="system")  # the same chat over gRPC: the same context, answer
    assert over_grpc.context_id == chat_doc["id"] and over_grpc.cached
    assert grpc_client.ask("", 12, context_id=over_grpc.context_id, messages=messages, **GREEDY)[0] == answer
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens

    status, gone = http_json("DELETE", f"{app.http}/v1/contexts/{made['id']}", "oa")
    assert status == 200 and gone["deleted"]
    with pytest.raises(openai.NotFoundError):  # released: the next request on it is a 404
        oai.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=2,
                               extra_body={"context_id": made["id"]})


def test_openai_errors_have_their_status_and_shape(app):
    import openai
    oai = openai_client(app, "oa-bad")
    cases = [(lambda: oai.completions.create(model="SmolLM2-135M-Instruct", prompt="x", max_tokens=0),
              openai.BadRequestError, "max_tokens"),
             (lambda: oai.completions.create(model="SmolLM2-135M-Instruct", prompt="x", max_tokens=4, n=2),
              openai.BadRequestError, "n: not supported"),
             (lambda: oai.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[], max_tokens=4),
              openai.BadRequestError, "messages"),
             (lambda: oai.completions.create(model="SmolLM2-135M-Instruct", prompt="x", max_tokens=4,
                                             extra_body={"context_id": "0" * 32}), openai.NotFoundError, "not found"),
             (lambda: oai.completions.create(model="gpt-4", prompt="x", max_tokens=4), openai.NotFoundError,
              "does not exist")]
    for call, kind, fragment in cases:
        with pytest.raises(kind) as failure:
            call()
        assert fragment in failure.value.body["message"] and failure.value.body["type"], failure.value.body
    status, bad_json = http_json("POST", f"{app.http}/v1/completions", "oa-bad", b"{")
    assert status == 400 and "JSON" in bad_json["error"]["message"]
    status, bad_tenant = http_json("POST", f"{app.http}/v1/completions", "a b", {"prompt": "x"})
    assert status == 400 and "X-Tenant" in bad_tenant["error"]["message"]
    assert http_json("DELETE", f"{app.http}/v1/contexts/{'0' * 32}", "oa-bad")[0] == 404
    assert oai.completions.create(model="SmolLM2-135M-Instruct", prompt="Hello", max_tokens=2).usage.completion_tokens
    assert oai.models.retrieve("SmolLM2-135M-Instruct").id == "SmolLM2-135M-Instruct"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4")
    # what real clients send with features off is accepted through the whole path
    chat = oai.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}],
                                       max_completion_tokens=2, logprobs=False, n=1, presence_penalty=0.0)
    assert 1 <= chat.usage.completion_tokens <= 2 and chat.choices[0].logprobs is None
    # log-probabilities: one entry per output token, the greedy token its step's most likely
    chat = oai.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token and c.logprob <= 0 for c in content)
    legacy = oai.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is", max_tokens=3,
                                    temperature=0, logprobs=1).choices[0].logprobs
    assert len(legacy.tokens) == len(legacy.token_logprobs) == 3 and all(len(t) == 1 for t in legacy.top_logprobs)
    # echo, as evaluation harnesses score a text: the prompt back, each token scored given those
    # before it (the first has nothing before it), and nothing generated with max_tokens 0
    sentence = "The capital of France is Paris"
    scored = oai.completions.create(model="SmolLM2-135M-Instruct", prompt=sentence, max_tokens=0, echo=True, logprobs=1)
    echoed = scored.choices[0].logprobs
    assert scored.choices[0].text == sentence == "".join(echoed.tokens) and scored.usage.completion_tokens == 0
    assert echoed.token_logprobs[0] is None and echoed.top_logprobs[0] is None and len(echoed.tokens) > 3
    assert all(lp <= 0 for lp in echoed.token_logprobs[1:]) and all(len(t) == 1 for t in echoed.top_logprobs[1:])
    more = oai.completions.create(model="SmolLM2-135M-Instruct", prompt=sentence, max_tokens=2, echo=True, logprobs=0,
                                  temperature=0).choices[0]
    assert more.text.startswith(sentence) and len(more.logprobs.tokens) == len(echoed.tokens) + 2
    assert more.logprobs.token_logprobs[0] is None  # the same prompt scored the same, then two tokens
    assert more.logprobs.token_logprobs[1:-2] == pytest.approx(echoed.token_logprobs[1:], abs=1e-4)
    # echo streamed: the prompt (and its scores) as the first event, then the completion, together the whole reply
    for tokens in (2, 0):
        events = list(oai.completions.create(model="SmolLM2-135M-Instruct", prompt=sentence, max_tokens=tokens,
                                             echo=True, logprobs=0, temperature=0, stream=True))
        assert events[0].choices[0].text == sentence
        assert "".join(c.text for e in events for c in e.choices) == (more.text if tokens else sentence)
        scores = [lp for e in events for c in e.choices if c.logprobs for lp in c.logprobs.token_logprobs]
        assert scores[0] is None and scores[1:] == pytest.approx(
            more.logprobs.token_logprobs[1:len(scores)], abs=1e-4) and len(scores) == len(echoed.tokens) + tokens
    # streamed: each chunk with its tokens', together the same as the whole reply's
    hi = [{"role": "user", "content": "Hi"}]
    chunks = list(oai.chat.completions.create(model="SmolLM2-135M-Instruct", messages=hi, max_tokens=4, temperature=0,
                                              logprobs=True, top_logprobs=2, stream=True))
    streamed = [c for chunk in chunks for choice in chunk.choices if choice.logprobs for c in choice.logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, pytest.approx(c.logprob, abs=1e-5)) for c in content]
    assert "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices) == \
        chat.choices[0].message.content
    # over gRPC: the same tokens and log-probabilities, in the final stats
    grpc_client = app.client(tenant="oa-bad")
    text, stats = grpc_client.ask("The capital of France is", 3, logprobs=1, **GREEDY)
    assert [t.token for t in stats.logprobs] == legacy.tokens and "".join(legacy.tokens) == text
    assert [t.logprob for t in stats.logprobs] == pytest.approx(legacy.token_logprobs, abs=1e-5)
    assert all(len(t.top) == 1 and t.top[0].token == t.token for t in stats.logprobs)
    assert 0 < stats.tpot_median_s and stats.decode_pass_s >= 0  # the replica's own time per token, as it logs it
    text_only, scored = grpc_client.ask(sentence, 0, prompt_logprobs=1)  # gRPC's prompt_logprobs: as echo scores
    assert text_only == "" and "".join(t.token for t in scored.prompt_logprobs) == sentence
    assert not scored.prompt_logprobs[0].HasField("logprob") and scored.output_tokens == 0
    assert [t.logprob for t in scored.prompt_logprobs[1:]] == pytest.approx(echoed.token_logprobs[1:], abs=1e-5)
    replies = list(grpc_client.generate("The capital of France is", 3, logprobs=1, **GREEDY))
    pieces = [r for r in replies if r.WhichOneof("kind") == "text"]
    assert all(r.logprobs for r in pieces) and "".join(r.text for r in pieces) == text  # each with its tokens'
    assert [t.token for r in pieces for t in r.logprobs] == legacy.tokens[:sum(len(r.logprobs) for r in pieces)]
    assert not grpc_client.ask("The capital of France is", 2, **GREEDY)[1].logprobs  # only when asked
    code, message = code_of(lambda: grpc_client.ask("x", 2, logprobs=21))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "sampling.logprobs" in message, message


def test_the_replicas_metrics_reach_prometheus(app):
    """After the requests above: the replicas' histograms and counters, tagged by tenant and
    model, on the node's Prometheus endpoint (Ray exports every few seconds)."""
    import urllib.request
    wanted = ["ray_icecache_ttft_seconds_bucket", "ray_icecache_tpot_seconds_bucket", "ray_icecache_queue_seconds_bucket",
              "ray_icecache_pages_per_token_bucket", "ray_icecache_requests", 'status="OK"',
              'status="NOT_FOUND"', 'tenant="oa"', 'model="SmolLM2-135M-Instruct"', "ray_icecache_output_tokens",
              "ray_icecache_prompt_tokens", "ray_icecache_documents_indexed", "ray_icecache_cache_slab_bytes"]
    deadline, missing = time.monotonic() + 60, wanted
    while missing and time.monotonic() < deadline:
        text = urllib.request.urlopen(app.metrics, timeout=10).read().decode()
        missing = [w for w in wanted if w not in text]
        time.sleep(2)
    assert not missing, missing


def test_a_cancelled_stream_stops_decoding_and_releases_its_context(app, engine, document):
    client = app.client(tenant="ttft", timeout_s=120)
    context_id = client.index(document).context_id
    cache = find_node_cache(ray.get_runtime_context().get_node_id())
    stream = client.generate("\nNow write a long story:", 200, context_id=context_id, ignore_eos=True, **GREEDY)
    next(iter(stream))
    assert len(ray.get(cache.lease_holders.remote())) == 1
    stream.cancel()
    deadline = time.monotonic() + 30  # the replica notices at its next token
    while ray.get(cache.lease_holders.remote()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.get(cache.lease_holders.remote()) == []


def test_a_replica_killed_mid_stream_ends_the_call_with_unavailable(app, engine, document):
    client = app.client(tenant="ttft", timeout_s=120)
    context_id = client.index(document).context_id
    cache = find_node_cache(ray.get_runtime_context().get_node_id())
    stream = client.generate("\nNow write a long story:", 200, context_id=context_id, ignore_eos=True, **GREEDY)
    next(iter(stream))  # the first piece arrived: the replica holds a lease and is decoding
    holders = ray.get(cache.lease_holders.remote())
    assert len(holders) == 1
    os.kill(holders[0], signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as failure:
        for _ in stream:
            pass
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE, failure.value.details()
    assert ray.get(cache.lease_holders.remote()) == []  # the dead replica's lease is gone

    deadline = time.monotonic() + 240  # Serve replaces the replica; the app serves again
    while True:
        try:
            _, stats = app.client(tenant="ttft").ask(QUESTION, 2, context_id=context_id)
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline, "the app did not recover"
            time.sleep(2)
    assert stats.context_reused


def test_shutdown_leaves_no_segment(app):
    assert shm.list_segments()  # contexts of the tests above
    stop_serve()
    assert wait_for_no_segments() == []
