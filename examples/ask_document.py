"""Index a document once, then ask it several questions without a second prefill.

    python examples/ask_document.py path/to/long.txt "First question?" "Second question?"
"""

import sys

from icecache import Engine, IceCacheConfig, SamplingParams


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    path, questions = sys.argv[1], sys.argv[2:]
    engine = Engine.from_pretrained(config=IceCacheConfig(token_budget=256))  # built-in SmolLM2-135M
    with open(path, encoding="utf-8") as f:
        context = engine.index(f.read())
    print(f"indexed {context.num_tokens} tokens in {context.prefill_s + context.build_s:.1f}s")
    for q in questions:
        print(f"\nQ: {q}\nA:", end="", flush=True)
        for piece in engine.stream(f"\n\nQuestion: {q}\nAnswer:", SamplingParams(max_tokens=48, temperature=0.0,
                                                                                 stop=["\n\n"]), context=context):
            print(piece, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
