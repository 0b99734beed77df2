"""Every supported architecture, as a tiny random model built from its config (no download)."""

import pytest
import torch

from icecache import Engine, IceCacheConfig, SamplingParams
from icecache.models import extend_context
from icecache.testing import random_model, tiny_config

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
SMALL = dict(page_size=8, sink_tokens=8, window_tokens=8, prefill_chunk_tokens=64)


def prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, (n,), generator=g).tolist()


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return request.param, random_model(tiny_config(request.param), torch.device("cpu"), torch.float32)


def reference_logits(model, ids):
    model.config._attn_implementation = "sdpa"
    try:
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    finally:
        model.config._attn_implementation = "icecache"


@torch.inference_mode()
def test_chunked_prefill_is_exact(model):
    arch, hf = model
    ids = prompt(300)
    ref = reference_logits(hf, ids)[-1]
    eng = Engine.from_model(hf, config=IceCacheConfig(token_budget=64, **SMALL), model_id=arch)
    ctx = eng.index(ids)  # 5 chunks of 64
    assert torch.allclose(ctx.last_logits, ref, atol=1e-4, rtol=1e-4)
    # a question prefilled against the stored (paged) context is exact too
    more = prompt(70, seed=1)
    req_logits = reference_logits(hf, ids + more)[-1]
    from icecache.cache import RequestKV
    req = RequestKV(eng.shape, eng.config, ctx)
    got = eng.runner.prefill_one(req, more, ctx.num_tokens)
    assert torch.allclose(got, req_logits, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_full_mode_matches_the_unmodified_model(model):
    """Greedy tokens equal those of the plain transformers model (sdpa) recomputing the
    whole sequence at every step: the reference with no cache of any kind."""
    arch, hf = model
    ids = prompt(200)
    eng = Engine.from_model(hf, config=IceCacheConfig(mode="full", **SMALL), model_id=arch)
    ours = eng.generate(ids, GREEDY).token_ids
    seq = list(ids)
    for _ in range(GREEDY.max_tokens):
        seq.append(int(reference_logits(hf, seq)[-1].argmax()))
    assert ours == seq[len(ids):]


def test_budget_covering_the_context_equals_full(model):
    arch, hf = model
    ids = prompt(400)
    full = Engine.from_model(hf, config=IceCacheConfig(mode="full", **SMALL), model_id=arch)
    wide = Engine.from_model(hf, config=IceCacheConfig(token_budget=16 + 8 * 200, **SMALL), model_id=arch)
    narrow = Engine.from_model(hf, config=IceCacheConfig(token_budget=16 + 8 * 4, **SMALL), model_id=arch)
    expected = full.generate(ids, GREEDY)
    assert wide.generate(ids, GREEDY).token_ids == expected.token_ids
    sparse = narrow.generate(ids, GREEDY)
    assert len(sparse.token_ids) == GREEDY.max_tokens
    assert 0 < sparse.stats["pages_selected_per_token"] <= 4 * hf.config.num_key_value_heads * (
        hf.config.num_hidden_layers - 2)


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config
    with pytest.raises(ValueError, match="architecture"):
        random_model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100), torch.device("cpu"))


def test_context_length_extends_the_rope_with_yarn_and_refuses_what_it_cannot():
    config = tiny_config("llama", max_position_embeddings=256)
    assert not extend_context(config, 200)  # within the model's own context: as trained
    assert config.rope_parameters.get("rope_type", "default") == "default" and config.max_position_embeddings == 256
    assert extend_context(config, 1024)
    rope = config.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 4.0, 256)
    assert config.max_position_embeddings == 1024
    with pytest.raises(ValueError, match="scaled already .*'yarn'"):
        extend_context(config, 4096)
    for bad in (0, -5, 1.5, True, "4k"):
        with pytest.raises(ValueError, match="context_length: expected a positive number of tokens"):
            extend_context(tiny_config("llama"), bad)


@torch.inference_mode()
def test_a_yarn_extended_model_decodes_past_its_own_context_as_transformers_does():
    """Positions past the native 256 (prompt 300, then 24 tokens) under YaRN: the engine's
    full-mode greedy tokens equal those of the unmodified model recomputing every step, and
    its sparse decode runs there."""
    config = tiny_config("llama", max_position_embeddings=256)
    extend_context(config, 1024)
    hf = random_model(config, torch.device("cpu"), torch.float32)
    ids = prompt(300)
    eng = Engine.from_model(hf, config=IceCacheConfig(mode="full", **SMALL), model_id="yarn")
    assert eng.max_context_tokens == 1024
    ours = eng.generate(ids, GREEDY).token_ids
    seq = list(ids)
    for _ in range(GREEDY.max_tokens):
        seq.append(int(reference_logits(hf, seq)[-1].argmax()))
    assert ours == seq[len(ids):]
    sparse = eng.with_config(IceCacheConfig(token_budget=16 + 8 * 4, **SMALL)).generate(ids, GREEDY)
    assert len(sparse.token_ids) == GREEDY.max_tokens and sparse.stats["pages_selected_per_token"] > 0


def test_the_built_in_model_takes_a_longer_context_when_asked():
    engine = Engine.from_pretrained(device="cpu", context_length=16384)
    assert engine.max_context_tokens == 16384 and engine.model.config.rope_parameters["rope_type"] == "yarn"
    assert engine.model_id == "SmolLM2-135M-Instruct@yarn16384"  # its contexts are not the plain model's
    long_prompt = list(range(1000, 1000 + 10_000))
    assert len(engine.validate(long_prompt, None, None)[0]) == 10_000
    with pytest.raises(ValueError, match="prompt"):  # as trained: 8192 tokens
        Engine.from_pretrained(device="cpu").validate(long_prompt, None, None)


def test_a_gguf_is_converted_once_and_loads_from_then_on_as_it_would_from_the_file(tmp_path, monkeypatch, caplog):
    """The built-in GGUF: where the cache directory cannot be made, the file itself is
    read (a warning says so); then it is converted once, and the converted model has the
    file's weights exactly and its tokenizer (text and chat template); a bad GGUF file is
    still a clear error."""
    import logging

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from icecache.models import converted_gguf, default_model_path, load_model
    path = default_model_path()
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("ICECACHE_CACHE_DIR", str(tmp_path / "not-a-dir" / "cache"))
    with caplog.at_level(logging.INFO, logger="icecache.models"):
        assert converted_gguf(path) == (str(path.parent), {"gguf_file": path.name})
        assert "cannot keep a conversion" in caplog.text
        monkeypatch.setenv("ICECACHE_CACHE_DIR", str(tmp_path / "cache"))
        first = load_model(None, torch.device("cpu"))
        assert caplog.text.count(" once, into ") == 1
        again = load_model(None, torch.device("cpu"))
        assert caplog.text.count(" once, into ") == 1  # the second load read the conversion
    made = list((tmp_path / "cache").iterdir())
    assert len(made) == 1 and made[0].name.startswith(path.stem) and (made[0] / "config.json").is_file()
    direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    want = direct.state_dict()
    for loaded in (first, again):
        got = loaded.model.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    chat = [{"role": "user", "content": "Où est la clé ? 42 — done.\n\tdef f(x): return x ** 2"}]
    for loaded in (first, again):
        assert loaded.tokenizer(chat[0]["content"]).input_ids == tokenizer(chat[0]["content"]).input_ids
        assert (loaded.tokenizer.apply_chat_template(chat, tokenize=False)
                == tokenizer.apply_chat_template(chat, tokenize=False))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ValueError, match="model: cannot load"):
        load_model(bad, torch.device("cpu"))
    assert len(list((tmp_path / "cache").iterdir())) == 1  # nothing kept of it
