"""``saffron-guard worker``: load the models once, serve /metrics, run the job loop."""

from __future__ import annotations

import logging

import redis
from prometheus_client import start_http_server

from service.config import Settings
from service.guard import Guard
from service.worker.worker import Worker

logger = logging.getLogger(__name__)


def run_worker(settings: Settings, worker_id: str | None = None) -> int:
    if not settings.redis_url:
        raise ValueError("the worker needs SAFFRON_REDIS_URL (e.g. redis://127.0.0.1:6379/0)")
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    client.ping()
    guard = Guard.from_settings(settings)
    try:
        start_http_server(settings.worker_metrics_port)
        logger.info("worker metrics on :%d/metrics", settings.worker_metrics_port)
    except OSError as e:  # a busy port must not keep a GPU idle; the jobs matter more than the metrics
        logger.warning("worker metrics disabled: port %d: %s", settings.worker_metrics_port, e)
    worker = Worker(settings, guard, client, worker_id)
    try:
        worker.run()
    finally:
        client.close()
    return 0
