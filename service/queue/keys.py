"""Every Redis key name and TTL in one place.

| key                              | type   | written by | TTL                  | meaning                                      |
|----------------------------------|--------|------------|----------------------|----------------------------------------------|
| ``{p}:jobs``                     | stream | gateway    | none (entries XDEL'd)| queued + running jobs; group ``workers``      |
| ``{p}:result:{job_id}``          | stream | worker     | RESULT_TTL_S         | token deltas, then one final or error event  |
| ``{p}:cancel:{job_id}``          | string | gateway    | RESULT_TTL_S         | the client went away: stop the search        |
| ``{p}:done:{job_id}``            | string | worker     | RESULT_TTL_S         | SET NX by the one worker that answers a job   |
| ``{p}:worker:{worker_id}``       | string | worker     | HEARTBEAT_TTL_S      | heartbeat: a live worker (JSON status)       |
| ``{p}:rate:{key_fingerprint}``   | hash   | gateway    | burst / rate + 1 s   | an API key's token bucket (SAFFRON_RATE_LIMIT) |

``{p}`` is ``Settings.redis_prefix`` (default ``saffron``), so several deployments can share a server.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "workers"  # the consumer group every worker reads ``jobs`` with
RESULT_TTL_S = 600  # result streams and cancel/done flags outlive a request by this much
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

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    @property
    def worker_pattern(self) -> str:
        return f"{self.prefix}:worker:*"
