"""sent_tokenize without punkt: a sentence ends after . ! or ? (and any closing quotes
or brackets) where whitespace and a capital, digit, quote or bracket follow."""

import re

_END = re.compile(r"([.!?][\"')\]]*)\s+(?=[A-Z0-9\"'(\[])")


def sent_tokenize(text: str, language: str = "english") -> list[str]:
    return [s for s in _END.sub("\\1\x00", text).split("\x00") if s.strip()]
