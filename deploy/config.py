"""The Serve application's settings: the yaml's `args:` block, validated."""

from __future__ import annotations

import os
import re
import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from icecache import IceCacheConfig

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str) -> int:
    """1073741824, "1GiB", "512 MiB", "2GB" -> bytes."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"not a byte size: {value!r} (use e.g. 8GiB or 512MiB)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])


class AppArgs(BaseModel):
    """Arguments of `deploy.app:build_app` (the `args:` block of deploy/app.yaml)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(None, description="HF id in the local cache, local dir or .gguf; None = SmolLM2")
    device: str = Field("auto", description="auto | cpu | cuda")
    context_length: int | None = Field(None, gt=0, description="extend the model past its own context to this "
                                       "many tokens (YaRN RoPE scaling); null = as trained")
    mode: Literal["icecache", "full"] = "icecache"
    token_budget: int = Field(256, description="tokens a sparse layer attends to per decode step")
    dense_layers: int = 2
    cache_capacity: int | str = Field("8GiB", description="shared-memory bytes per node for indexed contexts")
    cache_preallocate: bool | Literal["auto"] = Field(
        "auto", description="make the whole cache_capacity of shared memory when the first replica starts, and "
        "page-lock it in every replica then, so no document pays for it; auto = on a GPU")
    max_document_tokens: int = Field(0, description="longest document accepted; 0 = the model's context")
    max_document_bytes: int | str = Field("16MiB", description="largest document upload before tokenising")
    max_new_tokens: int = Field(1024, description="upper limit on a request's max_tokens")
    replica_gpus: float | Literal["auto"] = Field("auto", description="GPUs per replica; auto = 1 if any")
    replica_cpus: float = Field(1.0, description="CPUs reserved per replica")
    max_batch: int = Field(16, description="requests one replica decodes together (continuous batching)")
    max_waiting: int = Field(256, description="requests a replica queues beyond max_batch before refusing")
    burst_wait_s: float = Field(0.0, ge=0, le=1, description="an idle replica gathers questions arriving together "
                                "(each within 5 ms of the last) for at most this long, to prefill them in one pass; "
                                "a lone question waits 5 ms; 0 = no wait (see the README)")
    tenant_secret: str | None = Field(
        None, description="keys tenants' context ids; default: $ICECACHE_TENANT_SECRET, else random per deploy")
    engine: dict[str, Any] = Field(
        default_factory=dict, description="any other IceCacheConfig field (rerank, page_size, "
        "index_chunk_tokens, ...), validated by IceCacheConfig itself")
    warmup_tokens: int | Literal["auto"] = Field(
        "auto", description="a replica indexes and answers a private document of this many tokens before it "
        "serves (kernel compiles, first CUDA graphs); 0 = none; auto = 4096 on a GPU, 0 on a CPU")

    @field_validator("cache_capacity", "max_document_bytes")
    @classmethod
    def _bytes(cls, value):
        n = parse_bytes(value)
        if n <= 0:
            raise ValueError("must be positive")
        return n

    @field_validator("max_new_tokens", "token_budget", "max_batch", "max_waiting")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("must be positive")
        return value

    @field_validator("max_document_tokens", "warmup_tokens")
    @classmethod
    def _non_negative(cls, value: int | str) -> int | str:
        if value != "auto" and value < 0:
            raise ValueError("must be >= 0")
        return value

    @model_validator(mode="after")
    def _engine_fields(self) -> "AppArgs":
        self.engine_config()  # a bad engine field is refused when the app is built, with IceCacheConfig's message
        return self

    def engine_config(self) -> IceCacheConfig:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in self.engine.items()}  # yaml lists
        try:
            return IceCacheConfig(**{"mode": self.mode, "token_budget": self.token_budget,
                                     "dense_layers": self.dense_layers, **fields})
        except TypeError as e:  # an unknown field
            raise ValueError(f"engine: {e}") from None

    def resolved_secret(self) -> str:
        return self.tenant_secret or os.environ.get("ICECACHE_TENANT_SECRET") or secrets.token_hex(32)
