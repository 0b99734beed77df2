"""The engine: exact chunked prefill, indexing, sparse decode, sampling and streaming."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import torch

from icecache.cache import ATTN_IMPLEMENTATION, ModelShape
from icecache.config import IceCacheConfig, SamplingParams
from icecache.context import Context, layout_of
from icecache.models import LoadedModel, load_model, resolve_device
from icecache.outputs import GenerationOutput, GenerationStream
from icecache.runner import ModelRunner, Progress, free_device_bytes
from icecache.scheduler import Scheduler
from icecache.sequence import IndexJob


CHAT_DOCUMENT_ROLES = ("system", "user")  # turns a document can open a chat as
_DOCUMENT_PLACEHOLDER = "\u2063document\u2063"


class Engine:
    """A model plus the IceCache KV machinery. Stateless between requests except for the
    contexts it hands out, which callers own."""

    def __init__(self, loaded: LoadedModel, config: IceCacheConfig | None = None,
                 parent: "Engine | None" = None) -> None:
        """parent: an engine over the same weights whose resident contexts this one shares
        when both configs ask for the same resident_context_share (with_config)."""
        self.config = config or IceCacheConfig()
        if not isinstance(self.config, IceCacheConfig):
            raise ValueError(f"config: expected IceCacheConfig, got {type(self.config).__name__}")
        self.model, self.tokenizer, self.model_id = loaded.model, loaded.tokenizer, loaded.model_id
        self.tokenizer_lock = threading.Lock()  # HF fast tokenizers refuse concurrent use
        self.model.config._attn_implementation = ATTN_IMPLEMENTATION
        self.shape = ModelShape.of(self.model)
        if self.config.dense_layers > self.shape.num_layers:
            raise ValueError(f"dense_layers: {self.config.dense_layers} exceeds the model's "
                             f"{self.shape.num_layers} layers")
        self.max_context_tokens = int(self.model.config.max_position_embeddings)
        self.device = self.shape.device
        shared = None
        if parent is not None and parent.config.resident_context_share == self.config.resident_context_share:
            shared = parent.runner.resident
        self.runner = ModelRunner(self.model, self.shape, self.config, self.model_id, shared)

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike | None = None, config: IceCacheConfig | None = None,
                        device: str = "auto", dtype: torch.dtype | None = None,
                        context_length: int | None = None) -> "Engine":
        """Load a model (None = the built-in SmolLM2-135M-Instruct) and wrap it.
        context_length: extend a model's context past what it was trained on to this many
        tokens, by YaRN RoPE scaling (models.extend_context); accuracy past the native
        length is the model's, measured in benchmarks/RESULTS.md for the built-in one."""
        if config is not None and not isinstance(config, IceCacheConfig):
            raise ValueError(f"config: expected IceCacheConfig, got {type(config).__name__}")
        return cls(load_model(model, resolve_device(device), dtype, context_length), config)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer=None, config: IceCacheConfig | None = None,
                   model_id: str = "custom") -> "Engine":
        """Wrap an already loaded transformers causal LM (e.g. random weights for tests)."""
        from icecache.models import prepare
        return cls(LoadedModel(prepare(model, next(model.parameters()).device), tokenizer, model_id), config)

    def with_config(self, config: IceCacheConfig) -> "Engine":
        """The same weights under another config (e.g. mode="full" for a baseline). Both
        engines keep one set of resident contexts (the device copies of documents' KV their
        questions prefill against) when the configs ask for the same resident_context_share
        (its budget is then the parent's, sized when the parent was built), so a document is not
        copied to the device once per engine and each sees the copies the other made."""
        return Engine(LoadedModel(self.model, self.tokenizer, self.model_id), config, parent=self)

    # ---------------------------------------------------------------- inputs
    def _encode(self, prompt: str | Sequence[int], add_special: bool, what: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"{what}: empty")
            if self.tokenizer is None:
                raise ValueError(f"{what}: this engine has no tokenizer; pass token ids")
            with self.tokenizer_lock:
                ids = self.tokenizer(prompt, add_special_tokens=add_special).input_ids
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            vocab = self.model.config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"{what}: token id {bad[0]} outside the vocabulary [0, {vocab})")
        else:
            raise ValueError(f"{what}: expected a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError(f"{what}: empty")
        return ids

    def _check_length(self, num_tokens: int, what: str) -> None:
        if num_tokens > self.max_context_tokens:
            raise ValueError(f"{what}: {num_tokens} tokens exceed the model's context of "
                             f"{self.max_context_tokens} tokens")

    def _check_context(self, context: Context) -> None:
        if not isinstance(context, Context):
            raise ValueError(f"context: expected a Context from Engine.index(), got {type(context).__name__}")
        if context.model_id != self.model_id:
            raise ValueError(f"context: indexed with model {context.model_id!r}, this engine runs {self.model_id!r}")
        if context.layout != layout_of(self.config):
            raise ValueError("context: indexed with a different page/sink/window/tree layout than this config")

    # ---------------------------------------------------------------- indexing
    @torch.inference_mode()
    def index_ids(self, ids: list[int], progress: Progress | None = None, on_device: bool = False) -> Context:
        """Prefill validated token ids (see tokenize) and index them; on_device keeps the
        pages on the GPU (for a caller that writes them elsewhere, e.g. shared memory)."""
        job = IndexJob(ids, lambda result: None, on_device, progress=progress)
        while (ctx := job.run_pass(self.runner)) is None:  # a prefill out of device memory restarts in host memory
            pass
        return ctx

    # ---------------------------------------------------------------- public API
    def index(self, document: str | Sequence[int], progress: Progress | None = None) -> Context:
        """Prefill a document once (exact) and index its KV; returns a reusable handle.

        Args:
            document: text (tokenised with the model's special tokens) or token ids.
            progress: optional callback (tokens done, tokens total) during prefill.
        """
        return self.index_ids(self.tokenize(document), progress)

    def make_resident(self, context: Context, source: Context | None = None) -> bool:
        """Keep a context's KV on the GPU for its questions' prefills now rather than at its
        first question (index does so itself; a caller that indexes with on_device=True and
        keeps another copy, e.g. in shared memory, calls it with the indexed one as source,
        read in place). -> whether it is resident (never on CPU; not if over the budget,
        IceCacheConfig.resident_context_share)."""
        return self.runner.make_resident(context, source)

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                 context: Context | None = None) -> GenerationOutput:
        """Complete raw text (no chat template). With `context`, the prompt continues that
        indexed document and no second prefill of it happens."""
        result = None
        for item in self._iterate(prompt, params, context):
            result = item
        return result

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               context: Context | None = None) -> "GenerationStream":
        """Like generate, yielding text pieces as they are decoded (with `params.logprobs`,
        TextPieces: each with its tokens' log-probabilities; with `params.prompt_logprobs`,
        the first piece is a TextPiece with the prompt's too); once exhausted, the stream's
        `output` holds the GenerationOutput (stats included). `close()` stops decoding
        early. Bad input raises ValueError here, before the first piece."""
        return GenerationStream(self._iterate(prompt, params, context))

    def tokenize(self, document: str | Sequence[int]) -> list[int]:
        """The token ids `index` would prefill for a document (validated, with special tokens)."""
        ids = self._encode(document, add_special=True, what="document")
        self._check_length(len(ids), "document")
        return ids

    def chat(self, messages: list[dict], params: SamplingParams | None = None, context: Context | None = None,
             document_role: str | None = None) -> GenerationOutput:
        """Generate a reply to chat messages using the model's chat template. document_role:
        the context is a document indexed as the chat's first turn of that role
        (chat_document_ids), and the messages continue that chat."""
        return self.generate(self.chat_ids(messages, document_role), params, context)

    def chat_document_ids(self, document: str, role: str = "system") -> list[int]:
        """A document as the first turn of a chat (role "system" or "user"), in the model's
        chat template: what to index so that chats on it (chat_ids with document_role)
        read as one conversation, token for token."""
        if role not in CHAT_DOCUMENT_ROLES:
            raise ValueError(f"chat role: expected one of {CHAT_DOCUMENT_ROLES}, got {role!r}")
        if not isinstance(document, str) or not document:
            raise ValueError("document: expected non-empty text for a chat")
        ids = self._encode(self._render([{"role": role, "content": document}], False), add_special=False,
                           what="document")
        self._check_length(len(ids), "document")
        return ids

    def chat_ids(self, messages: list[dict], document_role: str | None = None) -> list[int]:
        """Prompt ids of chat messages (ending with the assistant's turn opened). With
        document_role, the messages continue a chat whose first turn is an indexed document
        of that role: only what the template puts after that turn."""
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ValueError("messages: expected a non-empty list of {'role': str, 'content': str}")
        if document_role is None:
            return self._encode(self._render(messages, True), add_special=False, what="messages")
        if document_role not in CHAT_DOCUMENT_ROLES:
            raise ValueError(f"chat role: expected one of {CHAT_DOCUMENT_ROLES}, got {document_role!r}")
        # the template rendered with a placeholder document: the text after its turn does not depend on it
        first = [{"role": document_role, "content": _DOCUMENT_PLACEHOLDER}]
        head, whole = self._render(first, False), self._render(first + messages, True)
        if not whole.startswith(head):
            raise ValueError("messages: this model's chat template does not continue a document's turn")
        return self._encode(whole[len(head):], add_special=False, what="messages")

    def _render(self, messages: list[dict], open_reply: bool) -> str:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("messages: this model has no chat template")
        with self.tokenizer_lock:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=open_reply)

    # ---------------------------------------------------------------- the request loop
    def scheduler(self, max_batch: int = 32, max_waiting: int = 1024, device_bytes: int | str | None = "auto",
                  device_pages: bool = False, host_bytes: int | str | None = "auto", keep_idle: int = 8,
                  burst_wait_s: float = 0.0) -> Scheduler:
        """A continuous-batching scheduler over this engine (see icecache.scheduler).
        device_bytes: the KV budget of admitted requests; "auto" = 80% of the GPU memory
        free now on CUDA, torch's cached blocks counted (room for activations and graph
        pools), less what the runner may still take for resident contexts
        (config.resident_context_share), no limit on CPU; None = no limit.
        device_pages: the requests decoding together on one document read its pages from a
        copy in GPU memory instead of over PCIe (faster at high concurrency; the copy is
        not counted in device_bytes).
        host_bytes: the host memory that prompts being indexed inside the scheduler (requests
        without a context) may take together; "auto" = 80% of the memory available now
        (Linux), None = no limit.
        keep_idle: groups kept with their context's device state (dense KV, plans, CUDA
        graphs) after their last request leaves, for the next request on that context.
        burst_wait_s: when requests reach an idle scheduler, it waits while more keep
        arriving (each within 5 ms of the last), at most this long, so questions sent
        together share one prefill pass; a lone request waits 5 ms. 0 = no wait."""
        if device_bytes == "auto":
            device_bytes = None
            if self.device.type == "cuda":  # less what the runner may keep of hot contexts
                resident = self.runner.resident.budget_bytes - self.runner.resident.used_bytes if self.runner.resident else 0
                device_bytes = max(0, int(free_device_bytes(self.device) * 0.8) - resident)
        if host_bytes == "auto":
            host_bytes = _available_host_bytes()
            host_bytes = int(host_bytes * 0.8) if host_bytes is not None else None
        return Scheduler(self, max_batch, max_waiting, device_bytes, device_pages, host_bytes, keep_idle, burst_wait_s)

    def validate(self, prompt, params: SamplingParams | None, context: Context | None
                 ) -> tuple[list[int], SamplingParams, Context | None]:
        """A request's prompt ids, params and context, checked. Raises ValueError for bad input."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: expected SamplingParams, got {type(params).__name__}")
        if context is None:
            ids = self._encode(prompt, add_special=True)
            self._check_length(len(ids), "prompt")
        else:
            self._check_context(context)
            # e.g. mapped from shared memory: host-resident
            context = context.with_index_on(self.device, boxes=self.config.reads_page_boxes)
            ids = self._encode(prompt, add_special=False)
            self._check_length(context.num_tokens + len(ids), "context + prompt")
        if params.force_tokens:
            self._encode(list(params.force_tokens), add_special=False, what="force_tokens")  # in the vocabulary
        return ids, params, context

    def _iterate(self, prompt, params: SamplingParams | None, context: Context | None):
        # alone, a request is never refused for memory
        scheduler = self.scheduler(max_batch=1, device_bytes=None, host_bytes=None)
        seq = scheduler.submit(prompt, params, context)  # validates now, before the first piece
        return self._drive(scheduler, seq)

    def _drive(self, scheduler, seq):
        try:
            while not seq.done or seq.items:
                if not seq.items:
                    scheduler.step()
                while seq.items:
                    item = seq.items.popleft()
                    if isinstance(item, Exception):
                        raise item
                    yield item
        finally:
            seq.cancel()
            seq.release()

    @property
    def static_decode(self) -> bool:
        """Whether requests decode on the static path (CUDA graphs on a GPU) rather than the dynamic one."""
        path = self.config.decode_path
        if self.config.reuse_layers > 1:
            return True  # IceCache-reuse is built on the static path only
        return path == "static" or (path == "auto" and self.device.type == "cuda")

    def precompile_kernels(self) -> int:
        """Compile the GPU decode kernels for documents and batches of every shape now, so
        none compiles on a request's path (call it after a warm-up question has run a
        decode step). On the static CUDA path only; -> variants compiled (0 elsewhere)."""
        if self.device.type != "cuda" or not self.static_decode:
            return 0
        from icecache.kernels.common import precompile
        return precompile(self.config.search_width)

    def _dense_kv(self) -> tuple[int, int]:
        """(layers that keep the whole context on the device, KV bytes a token takes in one layer)."""
        s, c = self.shape, self.config
        dense = s.num_layers if c.mode == "full" else min(c.dense_layers, s.num_layers)
        return dense, s.kv_bytes_per_token

    @property
    def sparse_layers(self) -> int:
        """How many layers attend to a budget of pages (none in mode "full")."""
        return self.shape.num_layers - self._dense_kv()[0]

    def request_device_bytes(self, context_tokens: int, own_tokens: int, max_tokens: int) -> int:
        """Device bytes a request's KV state takes while it decodes (an upper estimate):
        dense layers hold the whole context, sparse layers sinks, window, page slots and
        the request's own tokens, and the keys of its question's pages (copied for the
        re-ranking: half a token's KV each)."""
        c = self.config
        dense, per_token = self._dense_kv()
        own = own_tokens + max_tokens
        copied = c.question_pages * c.page_size // 2
        sparse_tokens = c.sink_tokens + c.window_tokens + c.retrieved_pages * c.page_size + own + copied
        return per_token * (dense * (context_tokens + own) + self.sparse_layers * sparse_tokens) + self._rest_bytes(
            context_tokens)

    def _rest_bytes(self, context_tokens: int) -> int:
        """Device bytes of the page means a context's decoders read with unselected="means"
        (an upper estimate: the value means, and the key means of IceCache-reuse's followers,
        one [H, D] per page, pages padded up to 2x): a token's KV per page_size tokens."""
        if not self.config.estimates_rest:
            return 0
        _, per_token = self._dense_kv()
        return per_token * self.sparse_layers * context_tokens // self.config.page_size

    def context_device_bytes(self, context_tokens: int) -> int:
        """Of request_device_bytes, the part that every request on one context shares on
        the static path (where they decode as one batch): the dense layers' context KV, and
        the page means with unselected="means"."""
        dense, per_token = self._dense_kv()
        return per_token * dense * context_tokens + self._rest_bytes(context_tokens) if self.static_decode else 0

    def context_host_bytes(self, tokens: int) -> int:
        """Host bytes an indexed context of `tokens` takes (an upper estimate): its KV in
        every layer, twice over for page padding, page summaries and the tree (measured:
        1.0-1.33x the KV)."""
        _, per_token = self._dense_kv()
        return 2 * per_token * self.shape.num_layers * tokens

    def eos_ids(self) -> set[int]:
        """Token ids that end a generation (model, generation config and tokenizer)."""
        ids = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))
        return ids


def _available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
