"""IceCache: long-context LLM serving with the KV cache in host memory, indexed by a
DCI-tree, and only the pages a query needs brought to the GPU at each decode step."""

from icecache.config import IceCacheConfig, SamplingParams
from icecache.context import Context
from icecache.engine import Engine, GenerationOutput
from icecache.outputs import TextPiece, TokenLogprob

__all__ = ["Context", "Engine", "GenerationOutput", "IceCacheConfig", "SamplingParams", "TextPiece", "TokenLogprob"]
__version__ = "0.1.0"
