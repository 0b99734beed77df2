import pytest

from icecache import IceCacheConfig, SamplingParams


@pytest.mark.parametrize("field,value", [
    ("mode", "sparse"), ("token_budget", 0), ("token_budget", 70), ("page_size", -1), ("sink_tokens", -1),
    ("window_tokens", 0), ("dense_layers", 1.5), ("promotion_ratio", (0.0,)), ("promotion_ratio", (1.5, 0.2)),
    ("promotion_ratio", ()), ("search_width", 0), ("reuse_layers", 0), ("prefill_chunk_tokens", 0),
    ("top_level_max", -3), ("token_budget", True), ("prefill_offload", "disk"), ("page_heads", "mean"),
    ("rerank", 0), ("rerank", 2.0), ("question_pages", -1), ("question_pages", 1.5),
    ("question_follow", -1), ("question_follow", "48"), ("unselected", "moments"), ("unselected", None),
])
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        IceCacheConfig(**{field: value})


def test_rerank_and_question_pages_are_the_tree_selectors():
    """Re-ranking and question pages belong to the "icecache" selector (on by default); the
    comparison selectors and full mode leave them out, so they need no fields zeroed."""
    assert IceCacheConfig().candidates == (4, 48)
    assert IceCacheConfig(rerank=4, question_pages=0).candidates == (4, 0)
    assert IceCacheConfig(rerank=4, selector="quest").candidates == (1, 0)
    assert IceCacheConfig(selector="oracle").candidates == (1, 0)
    assert IceCacheConfig(mode="full").candidates == (1, 0)


def test_defaults_follow_the_reference_layout():
    c = IceCacheConfig()
    assert (c.token_budget, c.page_size, c.sink_tokens, c.window_tokens, c.dense_layers) == (256, 16, 32, 32, 2)
    assert c.retrieved_pages == 12  # 256 = 32 sinks + 32 window + 12 pages of 16


def test_full_mode_ignores_budget_floor():
    assert IceCacheConfig(mode="full", token_budget=1).mode == "full"


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("max_tokens", -3), ("temperature", -0.1), ("temperature", float("nan")),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("seed", "x"), ("stop", [""]),
])
def test_invalid_sampling_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_replace_rejects_unknown_fields():
    with pytest.raises(ValueError, match="bogus"):
        IceCacheConfig().replace(bogus=1)
    assert IceCacheConfig().replace(token_budget=512).token_budget == 512
