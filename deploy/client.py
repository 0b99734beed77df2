"""`icecache-client`: talk to a running IceCache Serve app over gRPC.

    icecache-client index book.txt                  # -> context id
    icecache-client ask CONTEXT_ID "Who wrote it?"  # streams the answer
    icecache-client stats
    icecache-client release CONTEXT_ID
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from protos import icecache_pb2 as pb
from protos import icecache_pb2_grpc as pb_grpc

CHUNK_BYTES = 1 << 20


class Client:
    """A thin typed wrapper over the generated stub (also used by tests and examples)."""

    def __init__(self, address: str = "localhost:9000", app: str = "icecache", tenant: str | None = None,
                 timeout_s: float | None = None) -> None:
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20),
                                                               ("grpc.max_send_message_length", 64 << 20)])
        self.stub = pb_grpc.IceCacheStub(self.channel)
        self.metadata = [("application", app)] + ([("tenant", tenant)] if tenant else [])
        self.timeout_s = timeout_s

    def close(self) -> None:
        self.channel.close()

    def index(self, document: str | bytes | list[int], chat_role: str | None = None) -> pb.IndexReply:
        """Upload a document in chunks and index it; with chat_role ("system" or "user"), as
        the first turn of a chat that generate(messages=...) continues."""
        return self.stub.IndexDocument(_chunks(document, chat_role), metadata=self.metadata, timeout=self.timeout_s)

    def generate(self, prompt: str, max_tokens: int = 64, context_id: str | None = None,
                 document: str | bytes | None = None, messages: list[dict] | None = None,
                 chat_role: str | None = None, **sampling) -> Iterator[pb.GenerateReply]:
        """Stream replies: text pieces, then one with stats. messages (prompt ""): chat turns
        {"role", "content"} in the model's template, continuing the document's chat."""
        request = pb.GenerateRequest(prompt=prompt, sampling=pb.Sampling(max_tokens=max_tokens, **sampling),
                                     messages=[pb.ChatMessage(**m) for m in messages or ()],
                                     chat_role=chat_role or "")
        if context_id is not None:
            request.context_id = context_id
        if document is not None:
            request.document = document.encode() if isinstance(document, str) else document
        return self.stub.Generate(request, metadata=self.metadata, timeout=self.timeout_s)

    def ask(self, prompt: str, max_tokens: int = 64, **kwargs) -> tuple[str, pb.GenerationStats]:
        text, stats = [], None
        for reply in self.generate(prompt, max_tokens, **kwargs):
            if reply.WhichOneof("kind") == "text":
                text.append(reply.text)
            else:
                stats = reply.stats
        return "".join(text), stats

    def release(self, context_id: str) -> bool:
        return self.stub.ReleaseContext(pb.ReleaseRequest(context_id=context_id), metadata=self.metadata,
                                        timeout=self.timeout_s).released

    def stats(self) -> pb.StatsReply:
        return self.stub.GetStats(pb.StatsRequest(), metadata=self.metadata, timeout=self.timeout_s)


def _chunks(document: str | bytes | list[int], chat_role: str | None = None) -> Iterator[pb.DocumentChunk]:
    role = chat_role or ""
    if isinstance(document, list):
        for i in range(0, max(len(document), 1), CHUNK_BYTES // 4):
            yield pb.DocumentChunk(token_ids=document[i:i + CHUNK_BYTES // 4], chat_role=role)
        return
    data = document.encode() if isinstance(document, str) else document
    for i in range(0, max(len(data), 1), CHUNK_BYTES):
        yield pb.DocumentChunk(text=data[i:i + CHUNK_BYTES], chat_role=role)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="icecache-client", description=__doc__.split("\n")[0])
    parser.add_argument("--address", default="localhost:9000")
    parser.add_argument("--app", default="icecache", help="Serve application name")
    parser.add_argument("--tenant", default=None)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("index", help="upload and index a document file")
    p.add_argument("file", type=Path)
    p = sub.add_parser("ask", help="ask a question about an indexed context, streaming the answer")
    p.add_argument("context_id")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--logprobs", type=int, default=None, metavar="K",
                   help="print each output token's log-probability and the K most likely tokens' (0-20)")
    sub.add_parser("stats", help="per-node cache figures")
    p = sub.add_parser("release", help="release an indexed context")
    p.add_argument("context_id")
    args = parser.parse_args(argv)
    client = Client(args.address, args.app, args.tenant)
    try:
        if args.command == "index":
            start = time.perf_counter()
            reply = client.index(args.file.read_bytes())
            print(reply.context_id)
            print(f"{reply.num_tokens} tokens | {'cached' if reply.cached else 'prefilled'} on node "
                  f"{reply.node_id[:12]} | prefill {reply.prefill_s:.2f}s + index {reply.index_build_s:.2f}s | "
                  f"{time.perf_counter() - start:.2f}s total", file=sys.stderr)
        elif args.command == "ask":
            start, first = time.perf_counter(), None
            extra = {"logprobs": args.logprobs} if args.logprobs is not None else {}
            for reply in client.generate(args.prompt, args.max_tokens, context_id=args.context_id,
                                         temperature=args.temperature, **extra):
                if reply.WhichOneof("kind") == "text":
                    first = first or time.perf_counter() - start
                    sys.stdout.write(reply.text)
                    sys.stdout.flush()
                else:
                    s = reply.stats
                    print(f"\n[{s.output_tokens} tokens, {s.finish_reason}] TTFT {first or 0:.2f}s (client) | "
                          f"TPOT {s.tpot_s * 1000:.0f}ms | context {s.context_tokens} tokens "
                          f"{'reused' if s.context_reused else 'prefilled'}", file=sys.stderr)
                    for t in s.logprobs:
                        alternatives = "".join(f" | {a.token!r} {a.logprob:.3f}" for a in t.top)
                        print(f"{t.token!r} {t.logprob:.3f}{alternatives}", file=sys.stderr)
        elif args.command == "stats":
            for n in client.stats().nodes:
                print(f"node {n.node_id[:12]}: {n.contexts} contexts, {n.bytes / 2**20:.1f} MiB of "
                      f"{n.capacity_bytes / 2**30:.1f} GiB, hits {n.hits}, misses {n.misses}, "
                      f"prefills {n.prefills}, evictions {n.evictions}, leases {n.leases}")
        elif args.command == "release":
            client.release(args.context_id)
            print("released")
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
