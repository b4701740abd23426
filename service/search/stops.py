"""Stop sequences on decoded text: where an answer ends, and how much of a running one may be streamed.

Token ids are what the search extends, but a stop sequence is text and may span token boundaries
("##" from "#" + "#", or part of a longer token). So each candidate's generated text is decoded and
searched; the answer is cut before the first stop sequence, which is not returned (OpenAI's rule).
"""

from __future__ import annotations


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index in ``text`` where the earliest stop sequence starts, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """``text`` up to (not including) its first stop sequence."""
    i = first_stop(text, stops)
    return text if i is None else text[:i]


def streamable(text: str, stops: tuple[str, ...]) -> str:
    """What of a running answer's committed text may be sent: up to a stop sequence, and never a tail that could
    still become one (it is held back until the next tokens show whether it does)."""
    text = cut_at_stop(text, stops)
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return text[: len(text) - hold]
