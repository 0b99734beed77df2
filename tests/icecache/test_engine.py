"""The engine on the built-in model with real weights (SmolLM2-135M-Instruct)."""

import pickle
import random

import pytest
import torch

from icecache import Engine, IceCacheConfig, SamplingParams
from tests.icecache.haystack import QUESTION, passkey_document

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def document(engine):
    return passkey_document(engine.tokenizer, 1500, 0.4, 48213)


@pytest.fixture(scope="module")
def context(engine, document):
    return engine.index(document)


class TokenCounter:
    """Counts the tokens every forward pass of the model processes."""

    def __init__(self, model):
        self.model, self.tokens = model, 0
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.tokens += kwargs["input_ids"].numel()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_budget_covering_the_context_gives_full_attention_tokens(engine, full_engine, document):
    wide = engine.with_config(IceCacheConfig(token_budget=64 + 16 * 400))
    ctx = wide.index(document)
    a = wide.generate(QUESTION, GREEDY, context=ctx)
    b = full_engine.generate(QUESTION, GREEDY, context=ctx)
    assert a.token_ids == b.token_ids
    assert "48213" in a.text


def test_context_reuse_needs_no_second_prefill(engine, context):
    questions = [QUESTION, "\nRepeat the pass key:", "\nThe special number in the text above is"]
    with TokenCounter(engine.model) as counter:
        reused = [engine.generate(q, GREEDY, context=context) for q in questions]
    q_tokens = sum(len(engine.tokenizer(q, add_special_tokens=False).input_ids) for q in questions)
    decode_tokens = sum(len(o.token_ids) - 1 for o in reused)
    assert counter.tokens == q_tokens + decode_tokens  # the document was never run again
    assert all(o.stats["context_reused"] for o in reused)
    # fresh runs: index anew for every question; the answers are the same
    fresh = [engine.generate(q, GREEDY, context=engine.index(context.token_ids)) for q in questions]
    assert [o.token_ids for o in reused] == [o.token_ids for o in fresh]
    assert "48213" in reused[0].text


def test_requests_do_not_change_the_shared_context(engine, context):
    layer = next(iter(context.sparse.values()))
    before = (layer.pages.keys.sum().item(), layer.pages.valid.sum().item(), context.num_tokens)
    engine.generate("\nSay something long about the text above.", SamplingParams(max_tokens=40, temperature=0.0),
                    context=context)
    assert (layer.pages.keys.sum().item(), layer.pages.valid.sum().item(), context.num_tokens) == before


def test_an_index_moved_to_a_device_leaves_the_page_boxes_on_the_host_unless_quest_reads_them(context):
    # "meta" stands in for the GPU here (tests/icecache/test_gpu.py checks CUDA): only placement matters
    meta = torch.device("meta")
    moved = context.with_index_on(meta)
    tree = next(iter(moved.sparse.values())).tree
    assert tree.page_mean.device == meta and tree.node_mean[0].device == meta and tree.scale.device == meta
    assert tree.page_lo.device.type == tree.page_hi.device.type == "cpu" and moved.box_device.type == "cpu"
    assert moved.uid == context.uid and moved.with_index_on(meta) is moved
    for_quest = moved.with_index_on(meta, boxes=IceCacheConfig(selector="quest").reads_page_boxes)
    assert for_quest.box_device == meta and for_quest.index_device == meta
    assert context.with_index_on(torch.device("cpu")) is context  # the CPU holds it all already
    # a copy of the document (e.g. from shared memory) takes the moved trees, keeps its own boxes
    shared = context.with_index_from(for_quest)
    layer = next(iter(shared.sparse))
    assert shared.index_device == meta and shared.sparse[layer].tree.page_lo is context.sparse[layer].tree.page_lo
    assert context.with_index_from(for_quest, boxes=True).box_device == meta


def test_context_plus_question_equals_the_whole_prompt_in_full_mode(full_engine, context):
    q_ids = full_engine.tokenizer(QUESTION, add_special_tokens=False).input_ids
    with_ctx = full_engine.generate(q_ids, GREEDY, context=context)
    whole = full_engine.generate(list(context.token_ids) + q_ids, GREEDY)
    assert with_ctx.token_ids == whole.token_ids


def test_stream_yields_the_generated_text(engine, context):
    pieces = list(engine.stream(QUESTION, GREEDY, context=context))
    assert len(pieces) > 1
    assert "".join(pieces) == engine.generate(QUESTION, GREEDY, context=context).text
    assert not any(hasattr(p, "logprobs") for p in pieces)  # plain text unless asked
    # asked: each piece carries its own tokens' log-probabilities, in order, and shows their text
    stream = engine.stream(QUESTION, SamplingParams(max_tokens=12, temperature=0.0, logprobs=1), context=context)
    pieces = list(stream)
    carried = [lp for p in pieces for lp in p.logprobs]
    assert all(p.logprobs for p in pieces) and carried == stream.output.logprobs[:len(carried)]
    for p in pieces:
        assert p == engine.tokenizer.decode([lp.token_id for lp in p.logprobs]) or not p.strip()
    sent = pickle.loads(pickle.dumps(pieces[0]))  # as a process hands it on
    assert sent == pieces[0] and sent.logprobs == pieces[0].logprobs
    # the prompt's scores asked: they come with the first piece (only), as the output has them
    stream = engine.stream(QUESTION, SamplingParams(max_tokens=6, temperature=0.0, prompt_logprobs=1),
                           context=context)
    pieces = list(stream)
    assert pieces[0].prompt_logprobs == stream.output.prompt_logprobs and len(pieces[0].prompt_logprobs) > 3
    assert pieces[0].logprobs is None and not any(hasattr(p, "prompt_logprobs") for p in pieces[1:])  # plain text
    sent = pickle.loads(pickle.dumps(pieces[0]))
    assert sent.prompt_logprobs == pieces[0].prompt_logprobs


def test_stop_string_ends_generation_before_it(engine, context):
    full_text = engine.generate(QUESTION, GREEDY, context=context).text
    stop = full_text.strip()[2:4]
    out = engine.generate(QUESTION, SamplingParams(max_tokens=12, temperature=0.0, stop=[stop]), context=context)
    assert out.finish_reason == "stop"
    assert stop not in out.text and full_text.startswith(out.text)


def test_seeded_sampling_is_reproducible(engine, context):
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, top_k=50, seed=7)
    a = engine.generate(QUESTION, p, context=context)
    b = engine.generate(QUESTION, p, context=context)
    c = engine.generate(QUESTION, SamplingParams(max_tokens=16, temperature=1.0, seed=8), context=context)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


@pytest.mark.parametrize("path", ["dynamic", "static"])
def test_logprobs_are_the_models_and_do_not_change_the_tokens(engine, context, path):
    eng = engine.with_config(engine.config.replace(decode_path=path))
    plain = eng.generate(QUESTION, GREEDY, context=context)
    out = eng.generate(QUESTION, SamplingParams(max_tokens=12, temperature=0.0, logprobs=3), context=context)
    assert plain.logprobs is None and out.token_ids == plain.token_ids  # asking for them changes nothing else
    assert [lp.token_id for lp in out.logprobs] == out.token_ids
    for lp in out.logprobs:  # greedy: each token is its step's most likely, with that log-probability
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id and lp.logprob == pytest.approx(lp.top[0][1])
        assert 0 >= lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
    sampled = eng.generate(QUESTION, SamplingParams(max_tokens=8, temperature=1.0, seed=3, logprobs=0),
                           context=context)
    assert [lp.token_id for lp in sampled.logprobs] == sampled.token_ids and all(not lp.top for lp in sampled.logprobs)
    assert all(lp.logprob <= 0 for lp in sampled.logprobs) and sum(lp.logprob for lp in sampled.logprobs) < 0
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)


@pytest.mark.parametrize("path", ["dynamic", "static"])
def test_forced_tokens_are_fed_and_scored_on_the_decode_path(engine, context, path):
    eng = engine.with_config(engine.config.replace(decode_path=path))
    free = eng.generate(QUESTION, SamplingParams(max_tokens=10, temperature=0.0, logprobs=2), context=context)
    # forcing the greedy answer itself scores it as the free run did
    same = eng.generate(QUESTION, SamplingParams(max_tokens=10, temperature=0.0, logprobs=2,
                                                 force_tokens=free.token_ids), context=context)
    assert same.token_ids == free.token_ids
    assert [lp.logprob for lp in same.logprobs] == pytest.approx([lp.logprob for lp in free.logprobs], abs=1e-4)
    # another answer is fed on: its tokens come out, each scored, and greedy decoding goes on after them
    other = eng.tokenizer(" The pass key is 11111", add_special_tokens=False).input_ids
    out = eng.generate(QUESTION, SamplingParams(max_tokens=len(other) + 4, temperature=0.0, logprobs=2,
                                                ignore_eos=True, force_tokens=other), context=context)
    assert out.token_ids[:len(other)] == other and len(out.token_ids) == len(other) + 4
    forced = out.logprobs[:len(other)]
    assert any(lp.top[0][0] != lp.token_id for lp in forced)  # the model would not have said "11111"
    assert all(lp.logprob <= lp.top[0][1] + 1e-6 for lp in forced)
    assert all(lp.top[0][0] == lp.token_id for lp in out.logprobs[len(other):])  # greedy again
    with pytest.raises(ValueError, match="force_tokens: token id"):
        eng.generate(QUESTION, SamplingParams(force_tokens=[eng.model.config.vocab_size]), context=context)
    with pytest.raises(ValueError, match="force_tokens"):
        SamplingParams(force_tokens=[-1])


def exact_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log-softmax of transformers' own forward over ids (sdpa, no IceCache): [len(ids), vocab]."""
    impl = model.config._attn_implementation
    model.config._attn_implementation = "sdpa"
    try:
        with torch.inference_mode():
            return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().log_softmax(-1)
    finally:
        model.config._attn_implementation = impl


def test_prompt_logprobs_are_the_exact_prefills_with_and_without_a_context(engine, context, document):
    """SamplingParams.prompt_logprobs scores each prompt token given everything before it, as
    full attention over the document and the prompt does (the prefill is exact), over several
    prefill passes; max_tokens=0 scores without generating."""
    small = engine.with_config(engine.config.replace(prefill_chunk_tokens=16))  # a 30-token prompt: two passes
    prompt = engine.tokenizer(" The pass key mentioned in the text above, written out in digits, is the number",
                              add_special_tokens=False).input_ids
    out = small.generate(prompt, SamplingParams(max_tokens=0, prompt_logprobs=2), context=context)
    assert out.token_ids == [] and out.text == "" and out.finish_reason == "length" and out.stats["ttft_s"] > 0
    whole = engine.tokenize(document) + prompt
    exact = exact_logprobs(engine.model, whole)[-len(prompt) - 1:-1]  # the rows that predict the prompt
    assert [lp.token_id for lp in out.prompt_logprobs] == prompt
    got = torch.tensor([lp.logprob for lp in out.prompt_logprobs])
    torch.testing.assert_close(got, exact[torch.arange(len(prompt)), prompt], atol=2e-3, rtol=1e-3)
    for lp, row in zip(out.prompt_logprobs, exact):
        assert [t for t, _ in lp.top] == row.topk(2).indices.tolist() or abs(lp.top[0][1] - lp.top[1][1]) < 1e-3
    # no context: the prompt is indexed for its own request; its first token has nothing before it
    alone = small.generate(prompt, SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=0, logprobs=0))
    assert alone.prompt_logprobs[0].logprob is None and len(alone.prompt_logprobs) == len(prompt)
    exact = exact_logprobs(engine.model, prompt)[:-1]
    got = torch.tensor([lp.logprob for lp in alone.prompt_logprobs[1:]])
    torch.testing.assert_close(got, exact[torch.arange(len(prompt) - 1), prompt[1:]], atol=2e-3, rtol=1e-3)
    assert len(alone.token_ids) == 3 and alone.logprobs[0].token_id == alone.token_ids[0]
    # scored only (max_tokens 0): prefilled as a prompt of its own, no index built, the same scores
    only = small.generate(prompt, SamplingParams(max_tokens=0, prompt_logprobs=0))
    assert only.stats["context_tokens"] == 0 and only.stats["prompt_tokens"] == len(prompt)
    assert only.stats["index_build_s"] is None and only.prompt_logprobs[0].logprob is None
    assert [lp.logprob for lp in only.prompt_logprobs[1:]] == pytest.approx(got.tolist(), abs=1e-4)
    assert engine.generate(prompt, GREEDY, context=context).prompt_logprobs is None
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)  # nothing to generate and nothing to score
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)


def test_a_scored_prompt_packed_with_others_leaves_them_as_they_were(engine, context):
    """Prompts prefilled in one pass, one of them scored: the others' outputs are unchanged, and
    the scored one's log-probabilities are those it gets alone."""
    params = SamplingParams(max_tokens=6, temperature=0.0)
    scored = SamplingParams(max_tokens=6, temperature=0.0, prompt_logprobs=1)
    alone = [engine.generate(q, params, context=context).token_ids for q in (QUESTION, " Say it again:")]
    by_itself = engine.generate(" Which number?", scored, context=context)
    sched = engine.scheduler(max_batch=4)
    seqs = [sched.submit(QUESTION, params, context=context), sched.submit(" Which number?", scored, context=context),
            sched.submit(" Say it again:", params, context=context)]
    while sched.has_work:
        sched.step()
    outs = [s.items[-1] for s in seqs]
    assert outs[1].stats["prefill_batch"] == 3  # all three in one pass
    assert [outs[0].token_ids, outs[2].token_ids] == alone and outs[0].prompt_logprobs is None
    assert outs[1].token_ids == by_itself.token_ids
    assert [lp.logprob for lp in outs[1].prompt_logprobs] == pytest.approx(
        [lp.logprob for lp in by_itself.prompt_logprobs], abs=1e-4)


def test_chat_uses_the_template_and_stops_at_eos(engine):
    out = engine.chat([{"role": "user", "content": "What is the capital of France? One word."}],
                      SamplingParams(max_tokens=20, temperature=0.0))
    assert "Paris" in out.text
    assert out.finish_reason == "eos"


def test_chat_over_an_indexed_document_reads_as_one_conversation(engine):
    doc = "The secret code of the vault is 4711. The vault is in Zurich."
    messages = [{"role": "user", "content": "What is the secret code?"}]
    ctx = engine.index(engine.chat_document_ids(doc, "system"))
    on_context = engine.chat(messages, GREEDY, context=ctx, document_role="system")
    whole = engine.tokenizer.apply_chat_template([{"role": "system", "content": doc}, *messages], tokenize=False,
                                                 add_generation_prompt=True)
    whole_ids = engine.tokenizer(whole, add_special_tokens=False).input_ids
    # the document's turn plus the continuation are exactly the template over the whole chat...
    assert list(ctx.token_ids) + engine.chat_ids(messages, "system") == whole_ids
    # ...so the answer is the one the whole chat prefilled at once gets (the budget covers it all)
    assert on_context.token_ids == engine.generate(whole_ids, GREEDY).token_ids and "4711" in on_context.text
    with pytest.raises(ValueError, match="chat role"):
        engine.chat_document_ids(doc, "assistant")
    with pytest.raises(ValueError, match="chat role"):
        engine.chat_ids(messages, "tool")


def test_stats_report_what_happened(engine, context):
    out = engine.generate(QUESTION, GREEDY, context=context)
    s = out.stats
    assert s["ttft_s"] > 0 and s["tpot_s"] > 0 and s["output_tokens"] == len(out.token_ids)
    assert s["context_tokens"] == context.num_tokens and s["host_bytes"] > 0
    sparse_layers = engine.shape.num_layers - engine.config.dense_layers
    # at most 12 pages per KV head and sparse layer per step
    assert 0 < s["pages_selected_per_token"] <= 12 * engine.shape.num_kv_heads * sparse_layers
    assert s["pages_loaded_per_token"] <= s["pages_selected_per_token"]


@pytest.mark.parametrize("call,match", [
    (lambda e: e.generate(""), "prompt: empty"),
    (lambda e: e.generate([]), "prompt: empty"),
    (lambda e: e.generate(None), "prompt"),
    (lambda e: e.generate([1, 2, 10**9]), "outside the vocabulary"),
    (lambda e: e.generate(list(range(100, 8300))), "exceed the model's context of 8192"),
    (lambda e: e.index(""), "document: empty"),
    (lambda e: e.stream(""), "prompt: empty"),
    (lambda e: e.generate("hi", SamplingParams(max_tokens=2), context="not a context"), "context"),
    (lambda e: e.generate("hi", params={"max_tokens": 2}), "params"),
    (lambda e: e.chat([]), "messages"),
    (lambda e: e.chat([{"role": "user"}]), "messages"),
])
def test_bad_input_raises_value_error_naming_it(engine, call, match):
    with pytest.raises(ValueError, match=match):
        call(engine)


def test_over_long_question_on_a_context_is_refused(engine, context):
    with pytest.raises(ValueError, match="context \\+ prompt"):
        engine.generate(list(range(100, 100 + 8192 - context.num_tokens + 1)), GREEDY, context=context)


def test_context_of_another_layout_is_refused(engine, context):
    other = engine.with_config(IceCacheConfig(page_size=32, token_budget=512))
    with pytest.raises(ValueError, match="layout"):
        other.generate("hi", GREEDY, context=context)


@pytest.mark.parametrize("model,match", [
    ("/nonexistent/model/dir", "not found"),
    ("./no/such.gguf", "GGUF file not found"),
    ("no-such-org/no-such-model", "cannot load"),
])
def test_unknown_model_is_a_clear_error(model, match):
    with pytest.raises(ValueError, match=match):
        Engine.from_pretrained(model, device="cpu")


def test_bad_device_and_config_are_refused(engine):
    with pytest.raises(ValueError, match="config"):
        Engine.from_pretrained(config={"token_budget": 256}, device="cpu")
    with pytest.raises(ValueError, match="config: expected IceCacheConfig"):
        engine.with_config({"token_budget": 256})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            Engine.from_pretrained(device="cuda")


def test_text_stream_pieces_equal_a_full_decode(engine):
    """Incremental detokenisation hands out pieces that join to exactly what decoding all
    ids at once gives, for real text (multi-byte characters, leading spaces) and for random
    ids (bytes that are no whole UTF-8 character), and cuts at the first stop string,
    also one that spans two tokens, without a piece of the stop string escaping first."""
    from icecache.sampling import TextStream
    tok, rng = engine.tokenizer, random.Random(0)
    text = "  Hello world, ça va? 日本語のテキスト 🙂 done.\n    return x ** 2  # ü"
    cases = [tok(text, add_special_tokens=False).input_ids]
    cases += [cases[0][:9] + [rng.randrange(tok.vocab_size) for _ in range(60)] for _ in range(4)]
    for ids in cases:
        full = tok.decode(ids, skip_special_tokens=True)
        stream = TextStream(tok, ())
        pieces = [stream.add(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == full == stream.text
        assert sum(bool(p) for p in pieces) > 1  # it did stream
    ids = cases[0]
    full = tok.decode(ids, skip_special_tokens=True)
    for stop in ("ça va", "🙂", "return x"):
        stream = TextStream(tok, (stop, "never there"))
        pieces = []
        for i in ids:
            pieces.append(stream.add(i))
            if stream.stopped:
                break
        pieces.append(stream.flush())
        assert stream.stopped and "".join(pieces) == full[:full.find(stop)] == stream.text
