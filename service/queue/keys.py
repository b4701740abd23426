"""Every Redis key name and TTL in one place.

| key                              | type   | written by | TTL                  | meaning                                      |
|----------------------------------|--------|------------|----------------------|----------------------------------------------|
| ``{p}:jobs``                     | stream | gateway    | none (entries XDEL'd)| queued + running jobs; group ``workers``; bounded by ``max_queue`` |
| ``{p}:entry:{job_id}``           | string | gateway    | result_ttl_s         | the job's current entry id in ``jobs`` (it changes when a job is queued again) |
| ``{p}:result:{job_id}``          | stream | worker     | result_ttl_s         | token deltas, then one final or error event; at most max_tokens + 1 entries |
| ``{p}:cancel:{job_id}``          | string | gateway    | result_ttl_s         | the client went away: stop the search        |
| ``{p}:done:{job_id}``            | string | worker     | result_ttl_s         | SET NX by the one worker that answers a job   |
| ``{p}:workers``                  | zset   | worker     | members expire       | live workers, scored by heartbeat expiry on the server's clock |
| ``{p}:worker:{worker_id}``       | string | worker     | HEARTBEAT_TTL_S      | a worker's status (JSON), for operators and `serve` |
| ``{p}:rate:{key_fingerprint}``   | hash   | gateway    | burst / rate + 1 s   | an API key's token bucket (SAFFRON_RATE_LIMIT) |

``{p}`` is ``Settings.redis_prefix`` (default ``saffron``), so several deployments can share a server.
Times that two machines must agree on (job deadlines, heartbeat expiry) are on the Redis server's clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GROUP = "workers"  # the consumer group every worker reads ``jobs`` with
RESULT_GRACE_S = 60  # result streams and entry/cancel/done flags outlive their request's deadline by this much
HEARTBEAT_TTL_S = 10  # a worker that has not refreshed its key for this long counts as dead
# XAUTOCLAIM (worker takeover) came with Redis 6.2; Valkey reports the Redis version it is compatible with.
MIN_REDIS_VERSION = (6, 2)


def check_redis_version(server_info: dict) -> str:
    """The server's version from ``INFO server``; raises RuntimeError below ``MIN_REDIS_VERSION`` (checked at start)."""
    version = str(server_info.get("redis_version", "0"))
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < MIN_REDIS_VERSION:
        need = ".".join(map(str, MIN_REDIS_VERSION))
        raise RuntimeError(f"the Redis server is version {version}; Saffron Guard needs {need} or newer (XAUTOCLAIM)")
    return version + (f" (valkey {server_info['valkey_version']})" if "valkey_version" in server_info else "")


def result_ttl_s(remaining_s: float) -> int:
    """TTL of a job's keys when its deadline is ``remaining_s`` away: they outlive the request, not much longer."""
    return max(1, math.ceil(remaining_s)) + RESULT_GRACE_S


@dataclass(frozen=True)
class Keys:
    prefix: str = "saffron"

    @property
    def jobs(self) -> str:
        return f"{self.prefix}:jobs"

    def rate(self, caller: str) -> str:
        """A caller's token bucket (a hash; the caller is an API key's fingerprint, never the key)."""
        return f"{self.prefix}:rate:{caller}"

    def result(self, job_id: str) -> str:
        return f"{self.prefix}:result:{job_id}"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}:cancel:{job_id}"

    def done(self, job_id: str) -> str:
        return f"{self.prefix}:done:{job_id}"

    def entry(self, job_id: str) -> str:
        return f"{self.prefix}:entry:{job_id}"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    @property
    def worker_pattern(self) -> str:
        return f"{self.prefix}:worker:*"
