"""Errors of the training code: plain exceptions, not the service's HTTP-shaped ones.

``service.errors`` gives every error an HTTP status and an OpenAI error type because its callers
are API clients. A malformed prompt file or dataset, or a pipeline pointed at the wrong policy, is
a problem of the person running ``python -m model_store``, who reads the message on stderr.
"""

from __future__ import annotations


class TrainingError(Exception):
    """Base class: the message says what is wrong and how to fix it; ``python -m model_store`` prints it."""


class DatasetError(TrainingError):
    """A prompt file or a dataset directory is malformed; the message says where and why."""
