"""Passkey retrieval with the real built-in model: ~4k and ~6.5k-token haystacks, 5 depths,
IceCache at a 256-token budget and full attention, each on one shared prefill.

Past ~6k tokens the model itself starts to miss keys (measured 2026-11-23 with full
attention: 6.5k misses depths 0.75 and 0.95; 7.0k misses 0.75). There the test asks what
the cache controls: IceCache recovers every key full attention recovers."""

import pytest

from icecache import SamplingParams
from tests.icecache.haystack import QUESTION, passkey_document, random_keys

DEPTHS = [0.05, 0.25, 0.5, 0.75, 0.95]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


def run_depths(engine, full_engine, num_tokens, depths=DEPTHS):
    found = {"icecache": set(), "full": set()}
    for depth, key in zip(depths, random_keys(len(DEPTHS), seed=num_tokens)):
        ctx = engine.index(passkey_document(engine.tokenizer, num_tokens, depth, key))
        assert abs(ctx.num_tokens - num_tokens) < 100
        for eng in (engine, full_engine):
            out = eng.generate(QUESTION, GREEDY, context=ctx)
            print(f"{num_tokens} tokens depth {depth:.2f} {eng.config.mode:8s} key {key}: {out.text!r}")
            if str(key) in out.text:
                found[eng.config.mode].add(depth)
    return found


@pytest.mark.slow
def test_passkey_4k_every_depth_both_modes(engine, full_engine):
    found = run_depths(engine, full_engine, 4000)
    assert found["icecache"] == found["full"] == set(DEPTHS)


@pytest.mark.slow
def test_passkey_6k5_icecache_finds_every_key_full_attention_finds(engine, full_engine):
    """The depths full attention answers at 6.5k (it misses 0.75 and 0.95, where the
    comparison asks nothing of IceCache: 37 s of the suite's time for no assertion)."""
    found = run_depths(engine, full_engine, 6500, DEPTHS[:3])
    assert len(found["full"]) >= 3  # the model still works at this length, so the comparison means something
    assert found["full"] <= found["icecache"]
