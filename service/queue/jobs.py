"""The job a gateway enqueues and the events a worker sends back, as JSON on Redis streams.

A job is one stream entry with a single field ``job`` (JSON of ``Job``). Its result stream
carries entries with a single field ``event`` (JSON of one of the events below), in order:
zero or more ``delta`` events (streaming only), then exactly one ``final`` or ``error``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Job:
    messages: list[dict]  # OpenAI chat messages; a trailing assistant message is continued (prefill)
    params: dict  # SearchParams fields, already validated by the gateway
    stream: bool = False  # emit delta events while searching
    deadline: float = 0.0  # unix time after which the worker gives up (504)
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: float = field(default_factory=time.time)
    model: str = ""  # the model name the client asked for (echoed back)

    def dumps(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def loads(cls, raw: str | bytes) -> Job:
        data = json.loads(raw)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def delta_event(text: str, offset: int) -> dict[str, Any]:
    """Newly committed text: every live search node agrees on it, so it will not change.

    ``offset`` is where ``text`` starts in the answer, so a reader can drop a delta it already has:
    after a takeover the old owner may still publish the delta of the step it was in.
    """
    return {"type": "delta", "text": text, "offset": offset}


def new_delta_text(sent: str, event: dict[str, Any]) -> str:
    """The part of a delta event that extends ``sent`` (the text already taken from earlier deltas); "" if none.

    A delta that starts inside ``sent`` and agrees with it gives only its new tail; one that starts
    past it (a gap) or disagrees gives nothing — the final event carries the whole answer anyway.
    An event without an offset (an older worker) is taken whole.
    """
    text = event.get("text") or ""
    offset = event.get("offset")
    if offset is None:
        return text
    overlap = sent[offset:]  # what of this delta the reader already has
    if offset > len(sent) or not text.startswith(overlap):
        return ""
    return text[len(overlap) :]


def final_event(result: dict[str, Any]) -> dict[str, Any]:
    """The answer: text (the full continuation), finish_reason, usage and the safety report.

    ``result`` keys: text, finish_reason ("stop" | "length" | "content_filter"), logprobs (OpenAI's content list or None),
    prompt_tokens, completion_tokens, safety (dict), worker (id), queue_wait_s, run_s.
    """
    return {"type": "final", **result}


def error_event(status: int, message: str, *, type_: str = "server_error", param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """An OpenAI-style error with the HTTP status the gateway should answer with."""
    return {"type": "error", "status": status, "error": {"message": message, "type": type_, "param": param, "code": code}}


def dumps_event(event: dict[str, Any]) -> dict[str, str]:
    return {"event": json.dumps(event)}


def loads_event(fields: dict) -> dict[str, Any]:
    raw = fields.get("event") or fields.get(b"event")
    return json.loads(raw)
