"""Passkey haystacks (the standard long-context retrieval probe), built locally."""

from __future__ import annotations

import random

INTRO = ("There is an important info hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_document(tokenizer, num_tokens: int, depth: float, key: int) -> str:
    """A document of about `num_tokens` tokens with the key planted at `depth` (0..1)."""
    def build(reps: int) -> str:
        parts = [FILLER] * reps
        parts.insert(int(depth * reps), f"The pass key is {key}. Remember it. {key} is the pass key. ")
        return INTRO + "".join(parts)

    reps = max(1, num_tokens // len(tokenizer(FILLER, add_special_tokens=False).input_ids))
    for _ in range(3):  # the filler tokenises differently in context: calibrate on the real count
        actual = len(tokenizer(build(reps), add_special_tokens=True).input_ids)
        reps = max(1, round(reps * num_tokens / actual))
    return build(reps)


def random_keys(count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(10000, 99999) for _ in range(count)]
