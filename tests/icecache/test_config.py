import pytest

from icecache import IceCacheConfig, SamplingParams
from icecache.runner import resident_budget, resident_bytes


@pytest.mark.parametrize("field,value", [
    ("mode", "sparse"), ("token_budget", 0), ("token_budget", 70), ("page_size", -1), ("sink_tokens", -1),
    ("window_tokens", 0), ("dense_layers", 1.5), ("promotion_ratio", (0.0,)), ("promotion_ratio", (1.5, 0.2)),
    ("promotion_ratio", ()), ("search_width", 0), ("reuse_layers", 0), ("prefill_chunk_tokens", 0),
    ("top_level_max", -3), ("token_budget", True), ("prefill_offload", "disk"), ("page_heads", "mean"),
    ("rerank", 0), ("rerank", 2.0), ("question_pages", -1), ("question_pages", 1.5),
    ("question_follow", -1), ("question_follow", "48"), ("unselected", "moments"), ("unselected", None),
    ("head_pages", "top-p"), ("resident_context_share", 1.0), ("resident_context_share", "half"), ("resident_context_share", True),
])
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        IceCacheConfig(**{field: value})


def test_auto_resident_share_fits_one_context_of_the_longest_length():
    """resident_context_share "auto": a quarter of the free memory, raised until one context
    of the model's longest length fits, never past half; a number is taken as it is."""
    free = 62 * 10**9  # an 80 GB card after an 8B model's weights
    longest = resident_bytes(131072, 32, 30, 8, 128, 2)  # that model's 128k context: K, V and page maps
    assert 16 * 2**30 < longest < 17 * 2**30
    assert resident_budget(0.25, free, longest) == free // 4 < longest  # what missed it on an H100
    assert longest <= resident_budget("auto", free, longest) < longest * 1.02
    assert resident_budget("auto", 123 * 10**9, longest) == int(123 * 10**9 * 0.25)  # an H200: the floor
    assert resident_budget("auto", free, 3 * longest) == free // 2  # never more than half
    assert resident_budget(0.0, free, longest) == 0


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
