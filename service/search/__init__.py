"""Search strategies: generators of model calls, run by ``service.search.runner``.

This package's ``__init__`` imports nothing: ``service.search.params`` (the request's search
parameters) must stay importable without torch, for the gateway.
"""
