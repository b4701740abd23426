"""``saffron-guard worker``: load the models once, serve /metrics and /healthz, run the job loop."""

from __future__ import annotations

import logging

import redis

from service.config import Settings
from service.guard import Guard
from service.metrics import WORKER_REGISTRY
from service.worker.liveness import Liveness, serve_metrics
from service.worker.worker import Worker

logger = logging.getLogger(__name__)


class LiveWorker(Worker):
    """A ``Worker`` whose main loop reports every round to ``liveness``, so probes see a hung loop as dead.

    ``Worker._serve`` calls ``check_cancel_and_deadlines`` once per round (after taking jobs, before the step),
    and ``on_redis_error`` instead when a round failed on Redis: the loop is alive in both cases; a round
    stuck in a step or a Redis call calls neither. (tests/service/worker/test_liveness.py holds this to the loop.)
    """

    def __init__(self, settings: Settings, guard: Guard, client: redis.Redis, worker_id: str | None = None, *, liveness: Liveness):
        super().__init__(settings, guard, client, worker_id)
        self.liveness = liveness

    def check_cancel_and_deadlines(self) -> None:
        super().check_cancel_and_deadlines()
        self.liveness.beat()

    def on_redis_error(self, error: redis.RedisError, wait_s: float) -> None:
        super().on_redis_error(error, wait_s)
        self.liveness.beat()


def run_worker(settings: Settings, worker_id: str | None = None) -> int:
    if not settings.redis_url:
        raise ValueError("the worker needs SAFFRON_REDIS_URL (e.g. redis://127.0.0.1:6379/0)")
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    client.ping()
    liveness = Liveness(settings.worker_stall_s, settings.worker_alive_file)  # not alive until the loop goes round
    guard = Guard.from_settings(settings)
    try:
        serve_metrics(settings.worker_metrics_port, liveness, WORKER_REGISTRY)  # this process's metrics only
        logger.info("worker metrics on :%d/metrics, liveness on /healthz", settings.worker_metrics_port)
    except OSError as e:  # a busy port must not keep a GPU idle; the jobs matter more than the metrics
        logger.warning("worker metrics disabled: port %d: %s", settings.worker_metrics_port, e)
    worker = LiveWorker(settings, guard, client, worker_id, liveness=liveness)
    try:
        worker.run()
    finally:
        worker.close()
        client.close()
    return 0
