"""Engine configuration: frozen, validated dataclasses whose errors name the field."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from icecache.selectors import SELECTORS

MODES = ("icecache", "full")
PAGE_HEADS = ("max", "sum")
UNSELECTED = ("off", "means")
HEAD_PAGES = ("flat", "share")
DECODE_PATHS = ("auto", "static", "dynamic")
PREFILL_OFFLOAD = ("auto", "device", "host")
OFFLOAD_CHUNK_TOKENS = 8192  # an offloaded prefill's smallest chunk: the past KV crosses PCIe once per chunk
MAX_LOGPROBS = 20  # most alternatives SamplingParams.logprobs asks for (OpenAI's top_logprobs limit)


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class IceCacheConfig:
    """How the KV cache is kept and searched.

    `token_budget` counts everything a sparse layer attends to at one decode step:
    sinks + recent window + retrieved pages (256 = 32 + 32 + 12 pages of 16).
    """

    mode: str = "icecache"  # "icecache" (sparse decode) | "full" (dense baseline, same code path)
    token_budget: int = 256  # tokens a sparse layer attends to per decode step
    page_size: int = 16  # tokens per host page
    sink_tokens: int = 32  # first tokens, always attended
    window_tokens: int = 32  # most recent tokens, always attended
    dense_layers: int = 2  # first layers keep full attention
    promotion_ratio: tuple[float, ...] = (0.03, 0.2)  # level 0->1, then every level above
    search_width: int = 64  # nodes kept per tree level during a query
    top_level_max: int = 64  # stop promoting once a level is at most this large
    reuse_layers: int = 1  # sparse layers per cycle sharing the first one's page layout and selection (1 = off)
    # prompt tokens (questions on a context, packed) prefilled per scheduler step, between decode steps
    prefill_chunk_tokens: int = 1024
    # a document being indexed is prefilled this many tokens per pass (one pass per scheduler step):
    # larger passes run nearer the GPU's matmul peak, smaller ones stall running streams less
    index_chunk_tokens: int = 8192
    # share of the GPU memory free when the engine starts that whole copies of the hot contexts' KV may
    # take (least recently used goes first): a question on one of them attends to that copy instead
    # of reading the context's host pages over PCIe again (0 = off; the decode step never needs it).
    # "auto" = 0.25, raised (to at most 0.5) until one context of the model's longest length fits:
    # at 0.25 an 80 GB card missed a 128k document of an 8B model by 1.7 GB, and each of its
    # questions read 16 GiB over PCIe (388 ms TTFT on an H100)
    resident_context_share: float | str = "auto"
    # where Engine.index keeps a document's KV while prefilling it: "device", "host" (bounded device
    # memory: each chunk reads the past KV back, layer by layer, in chunks of at least
    # OFFLOAD_CHUNK_TOKENS), or "auto" = on the device when the KV and the pages built beside it take
    # at most 3/4 of its free memory, after evicting resident contexts if that makes room (an
    # offloaded 128k prefill of an 8B model took 88 s on an H100, against 11); else host, and host
    # again for one that runs out of device memory anyway (runner.PREFILL_DEVICE_SHARE)
    prefill_offload: str = "auto"
    seed: int = 0  # seeds the tree's random promotion, so an index is reproducible
    decode_path: str = "auto"  # "static" (fixed shapes, CUDA graphs on GPU) | "dynamic" | "auto" = static on CUDA
    selector: str = "icecache"  # which pages fill the budget: icecache | oracle | quest | streaming | random
    # how a KV head's query heads rank its pages: the "max" estimate over the heads (a page one
    # head needs is kept), or the "sum" of each head's softmax share of the pages' estimates
    page_heads: str = "max"
    # How the "icecache" selector fills the budget (the comparison selectors ignore both fields):
    # candidate pages per retrieved page: the key moments (index.tree.moment_score) pick
    # rerank x retrieved_pages candidates, then the candidates' keys rank them by exact
    # attention mass (1 = by the moments alone). 4 since 2026-12-03 (was 2): what the default
    # loses against full attention is pages its candidates miss (RULER 8k @256: 0.82x -> 0.90x
    # of full, +0.5 ms a token at 128k on an H200; benchmarks/HISTORY.md)
    rerank: int = 4
    # pages per KV head that a question's own attention picks while it is prefilled on the context
    # (what its last tokens attend to, and the question_follow positions after it); they join the
    # moments' candidates at every decode step, before the keys keep the best retrieved_pages (0 = off)
    question_pages: int = 48
    # positions after each context token a question attends to that share its weight when the
    # question's pages are picked, the nearest the most (linearly down to 1/question_follow): an
    # answer follows the passage the question matches, and a value copied token by token (an
    # ID, a number, a quoted line) needs every one of its pages
    question_follow: int = 48
    # how the context pages a sparse layer does not retrieve enter its attention: "off" (they do
    # not: their share of the softmax goes to the pages kept), or "means": each one as a single
    # key, the mean of its keys weighted by its token count, carrying the mean of its values
    # (a lower bound of the page's attention mass, by Jensen; read from the index on the device,
    # never from the host pages). Private pages (the question's, generated tokens) stay out.
    # "means" took RULER 8k @256 from 0.90x to 0.95x of full (an interval that includes no gain) for
    # 7.6 -> 9.3 ms a token at 128k on an H200 and the value means on the GPU: off by default
    unselected: str = "off"
    # how a sparse layer's retrieved pages go to its KV heads after re-ranking: "flat" (each
    # keeps retrieved_pages), or "share": the layer's KV heads x retrieved_pages go to the
    # candidates holding the largest estimated share of their head's softmax (over the sinks,
    # the window and the candidates' exact mass), each head between 1 and 2 x retrieved_pages:
    # a head whose attention sits on the sinks and the window, or on one page, gives pages to a
    # flat one (the per-head cut-off of Twilight and PSA, at a fixed total). RULER 4k @256 (CPU, 96 cases):
    # 0.86x -> 0.90x of full (+0.022 [+0.004, +0.048]), @64 0.62x -> 0.68x; on an H100 at 128k +0.3 ms a
    # token (11.1 against 10.8 ms), +3% a step for 16 sessions (benchmarks/RESULTS.md)
    head_pages: str = "share"

    def __post_init__(self) -> None:
        _require(self.mode in MODES, "mode", f"must be one of {MODES}, got {self.mode!r}")
        for name in ("token_budget", "page_size", "search_width", "top_level_max",
                     "reuse_layers", "prefill_chunk_tokens", "index_chunk_tokens", "rerank"):
            value = getattr(self, name)
            _require(_is_int(value) and value > 0, name, f"must be a positive int, got {value!r}")
        share = self.resident_context_share
        _require(share == "auto" or (isinstance(share, (int, float)) and not isinstance(share, bool)
                                     and 0 <= share < 1),
                 "resident_context_share", f"must be a number in [0, 1) or \"auto\", got {share!r}")
        for name in ("sink_tokens", "window_tokens", "dense_layers", "seed", "question_pages", "question_follow"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 0, name, f"must be a non-negative int, got {value!r}")
        _require(self.window_tokens >= 1, "window_tokens", "must be at least 1 (the token being decoded)")
        ratios = self.promotion_ratio
        _require(isinstance(ratios, tuple) and len(ratios) >= 1, "promotion_ratio",
                 f"must be a non-empty tuple of floats, got {ratios!r}")
        for r in ratios:
            _require(isinstance(r, (int, float)) and not isinstance(r, bool) and 0.0 < r < 1.0
                     and math.isfinite(r), "promotion_ratio", f"every ratio must lie in (0, 1), got {ratios!r}")
        _require(self.selector in SELECTORS, "selector", f"must be one of {tuple(SELECTORS)}, got {self.selector!r}")
        _require(self.page_heads in PAGE_HEADS, "page_heads",
                 f"must be one of {PAGE_HEADS}, got {self.page_heads!r}")
        _require(self.unselected in UNSELECTED, "unselected",
                 f"must be one of {UNSELECTED}, got {self.unselected!r}")
        _require(self.head_pages in HEAD_PAGES, "head_pages",
                 f"must be one of {HEAD_PAGES}, got {self.head_pages!r}")
        _require(self.prefill_offload in PREFILL_OFFLOAD, "prefill_offload",
                 f"must be one of {PREFILL_OFFLOAD}, got {self.prefill_offload!r}")
        _require(self.decode_path in DECODE_PATHS, "decode_path",
                 f"must be one of {DECODE_PATHS}, got {self.decode_path!r}")
        if self.reuse_layers > 1:
            _require(SELECTORS[self.selector].walks_tree, "reuse_layers",
                     "cross-layer reuse works with selector='icecache'")
            _require(self.decode_path != "dynamic", "reuse_layers",
                     "cross-layer reuse runs on the static decode path (decode_path 'auto' or 'static')")
        if self.mode == "icecache":
            fixed = self.sink_tokens + self.window_tokens
            _require(self.token_budget >= fixed + self.page_size, "token_budget",
                     f"must cover sink_tokens + window_tokens + one page ({fixed + self.page_size}), "
                     f"got {self.token_budget}")

    @property
    def candidates(self) -> tuple[int, int]:
        """(rerank, question_pages) as the decode paths apply them: only the "icecache"
        selector in "icecache" mode re-ranks and takes question pages."""
        if self.mode == "icecache" and SELECTORS[self.selector].walks_tree:
            return self.rerank, self.question_pages
        return 1, 0

    @property
    def estimates_rest(self) -> bool:
        """Sparse layers fold the pages they do not retrieve into attention by their means
        (unselected="means", in "icecache" mode, for any selector that retrieves pages)."""
        return (self.unselected == "means" and self.mode == "icecache"
                and not SELECTORS[self.selector].window_fills_budget)

    @property
    def reads_page_boxes(self) -> bool:
        """Page selection reads the pages' boxes (quest): the index keeps them beside the rest
        of the tree on its device; otherwise they stay in host memory."""
        return SELECTORS[self.selector].reads_boxes

    @property
    def retrieved_pages(self) -> int:
        """Pages a sparse layer retrieves per step (the budget left after sinks and window)."""
        return (self.token_budget - self.sink_tokens - self.window_tokens) // self.page_size

    @property
    def splits_heads(self) -> bool:
        """A layer's re-ranked pages are split among its KV heads by share (head_pages "share";
        only the "icecache" selector re-ranks)."""
        return self.head_pages == "share" and self.candidates != (1, 0)

    @property
    def page_slots(self) -> int:
        """Page ids a (request, KV head) row holds a step: retrieved_pages, or twice that when
        the layer's pages are split by share (-1 where a row keeps fewer)."""
        return self.retrieved_pages * (2 if self.splits_heads else 1)

    @property
    def ranked_pages(self) -> int:
        """Pages the key moments rank per (request, KV head) row each step, before the keys
        keep retrieved_pages of them: rerank x retrieved_pages (candidates[0])."""
        return self.retrieved_pages * self.candidates[0]

    def replace(self, **changes) -> "IceCacheConfig":
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown IceCacheConfig field(s): {sorted(unknown)}")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return IceCacheConfig(**values)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How tokens are drawn. temperature 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    # None: no log-probabilities; k >= 0: each output token's log-probability under the model
    # (before temperature and cut-offs) and the k most likely tokens' (GenerationOutput.logprobs)
    logprobs: int | None = None
    # the first output tokens, given instead of drawn (teacher forcing): each is fed on through the
    # same decode path and, with logprobs, scored there; after them tokens are drawn as usual
    force_tokens: tuple[int, ...] = ()
    # None: the prompt is not scored; k >= 0: each prompt token's log-probability given all
    # before it (the exact prefill's; GenerationOutput.prompt_logprobs) and the k most likely
    # tokens' at its position. With it, max_tokens may be 0: score the prompt, generate nothing
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        scoring = self.prompt_logprobs is not None
        _require(_is_int(self.max_tokens) and (self.max_tokens > 0 or self.max_tokens == 0 and scoring), "max_tokens",
                 f"must be a positive int (0 only with prompt_logprobs), got {self.max_tokens!r}")
        t = self.temperature
        _require(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t >= 0,
                 "temperature", f"must be a finite number >= 0, got {t!r}")
        p = self.top_p
        _require(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p <= 1,
                 "top_p", f"must lie in (0, 1], got {p!r}")
        _require(_is_int(self.top_k) and self.top_k >= 0, "top_k", f"must be an int >= 0, got {self.top_k!r}")
        _require(self.seed is None or _is_int(self.seed), "seed", f"must be an int or None, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            lp = getattr(self, name)
            _require(lp is None or _is_int(lp) and 0 <= lp <= MAX_LOGPROBS, name,
                     f"must be None or an int in [0, {MAX_LOGPROBS}], got {lp!r}")
        force = self.force_tokens
        if isinstance(force, list):
            object.__setattr__(self, "force_tokens", tuple(force))
        _require(isinstance(self.force_tokens, tuple) and all(_is_int(t) and t >= 0 for t in self.force_tokens),
                 "force_tokens", f"must be token ids (ints >= 0), got {force!r}")
        stop = self.stop
        if isinstance(stop, str):
            object.__setattr__(self, "stop", (stop,))
        elif isinstance(stop, list):
            object.__setattr__(self, "stop", tuple(stop))
        _require(all(isinstance(s, str) and s for s in self.stop), "stop",
                 f"must be non-empty strings, got {stop!r}")
