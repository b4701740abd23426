"""Every Prometheus metric object in one module, each registered only in the registry of the process that owns it.

The gateway serves ``GATEWAY_REGISTRY`` on its ``/metrics``, a worker ``WORKER_REGISTRY`` on
``SAFFRON_WORKER_METRICS_PORT``, so a gateway never exports ``saffron_worker_busy 0`` and a worker never exports
``saffron_queue_depth 0``: a series exists only where it means something (``absent()`` and dashboards rely on it).
A new metric goes in the section of its process with ``registry=`` that section's registry; nothing goes in
prometheus_client's default ``REGISTRY``, which no process serves (tests/deploy/test_observability.py checks both).

Everything countable is a counter (rates and hit ratios are computed in PromQL, e.g.
``rate(saffron_trie_reused_tokens_total[5m]) / rate(saffron_trie_query_tokens_total[5m])``);
labels are bounded: strategy (4 values), status (HTTP codes we emit), model (policy/mrm/prm),
source (policy/guard), outcome (a handful), kind (Redis error class names), result/direction/operation/reason of
the prefix cache (a handful each).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

# LLM requests take from tens of milliseconds (a rejected request) to minutes (a wide search on CPU).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

GATEWAY_REGISTRY = CollectorRegistry()
WORKER_REGISTRY = CollectorRegistry()
for _registry in (GATEWAY_REGISTRY, WORKER_REGISTRY):  # process_* (memory, CPU, open files), python_* of each process
    ProcessCollector(registry=_registry)
    PlatformCollector(registry=_registry)
    GCCollector(registry=_registry)

# --- gateway: registry=GATEWAY_REGISTRY ------------------------------------------------------
_GW = GATEWAY_REGISTRY
REQUESTS = Counter("saffron_requests_total", "Chat completion requests answered, by strategy and HTTP status", ["strategy", "status"], registry=_GW)
REQUEST_LATENCY = Histogram("saffron_request_latency_seconds", "End-to-end request latency at the gateway", ["strategy"], buckets=LATENCY_BUCKETS, registry=_GW)
TIME_TO_FIRST_TOKEN = Histogram(
    "saffron_time_to_first_token_seconds", "Time from request to the first streamed content", ["strategy"], buckets=LATENCY_BUCKETS, registry=_GW
)
GATEWAY_REDIS_ERRORS = Counter("saffron_gateway_redis_errors_total", "Redis errors a waiting request survived (it retries until the deadline)", ["kind"], registry=_GW)
JOBS_REQUEUED = Counter("saffron_jobs_requeued_total", "Jobs a gateway queued again because the Redis server had lost them", registry=_GW)
# Sampled from Redis on every scrape of /metrics (GatewayService.sample_gauges).
QUEUE_DEPTH = Gauge("saffron_queue_depth", "Jobs queued or running (length of the jobs stream), sampled by the gateway", registry=_GW)
LIVE_WORKERS = Gauge("saffron_live_workers", "Workers with an unexpired heartbeat, sampled by the gateway", registry=_GW)
GATEWAY_READY = Gauge("saffron_gateway_ready", "1 when GET /ready would answer 200 (Redis answers, a worker heartbeats), else 0", registry=_GW)
# The limits alert rules compare against, so that they follow the configuration (deploy/prometheus/rules/).
MAX_QUEUE = Gauge("saffron_max_queue", "SAFFRON_MAX_QUEUE: queued + running jobs admitted before 429", registry=_GW)
REQUEST_TIMEOUT = Gauge("saffron_request_timeout_seconds", "SAFFRON_REQUEST_TIMEOUT_S: a request's deadline (504 past it)", registry=_GW)

# --- worker: registry=WORKER_REGISTRY --------------------------------------------------------
_WK = WORKER_REGISTRY
QUEUE_WAIT = Histogram("saffron_queue_wait_seconds", "Time a job waited in the queue before a worker started it", ["strategy"], buckets=LATENCY_BUCKETS, registry=_WK)
SEARCH_SECONDS = Histogram("saffron_search_seconds", "Time a worker spent on one search", ["strategy"], buckets=LATENCY_BUCKETS, registry=_WK)
GENERATED_TOKENS = Counter("saffron_generated_tokens_total", "Completion tokens returned", ["strategy"], registry=_WK)
REFUSALS = Counter(
    "saffron_refusals_total", "Answers that refuse cleanly: by the policy itself, or blocked by the guard (content_filter)", ["strategy", "source"], registry=_WK
)
DEGENERATE_ANSWERS = Counter(
    "saffron_degenerate_answers_total", "Answers the judge calls degenerate (a loop or word salad; never counted as refusals)", ["strategy"], registry=_WK
)
REWARD_MODEL_CALLS = Counter("saffron_reward_model_calls_total", "Sequences scored by a reward model or the judge", ["strategy"], registry=_WK)
TRIE_QUERY_TOKENS = Counter("saffron_trie_query_tokens_total", "Tokens asked of a model through its trie cache", ["model"], registry=_WK)
TRIE_FORWARDED_TOKENS = Counter("saffron_trie_forwarded_tokens_total", "Tokens actually run through a model", ["model"], registry=_WK)
TRIE_REUSED_TOKENS = Counter("saffron_trie_reused_tokens_total", "Query tokens served from the trie cache (hits)", ["model"], registry=_WK)
TRIE_EVICTED_TOKENS = Counter("saffron_trie_evicted_tokens_total", "Tokens evicted from a trie cache", ["model"], registry=_WK)
# The prefix KV shared across workers in Redis (SAFFRON_PREFIX_CACHE; service/engine/prefix_store.py), policy and MRM together.
PREFIX_CACHE_BLOCKS = Counter(
    "saffron_prefix_cache_blocks_total", "Full prefix blocks looked up in Redis (hit: loaded into the trie, miss: not there) or written back (stored)",
    ["result"], registry=_WK,
)
PREFIX_CACHE_BYTES = Counter("saffron_prefix_cache_bytes_total", "Bytes of prefix KV moved between a worker and Redis", ["direction"], registry=_WK)
PREFIX_CACHE_BAD_BLOCKS = Counter(
    "saffron_prefix_cache_bad_blocks_total", "Prefix blocks ignored: header, checksum, shape or fingerprint mismatch (the prefix is computed locally)",
    ["reason"], registry=_WK,
)
PREFIX_CACHE_SKIPPED = Counter(
    "saffron_prefix_cache_skipped_total", "Prefix loads not tried (recomputing estimated faster, or Redis failing) and write-backs dropped",
    ["operation"], registry=_WK,
)
PREFIX_CACHE_ERRORS = Counter(
    "saffron_prefix_cache_errors_total", "Redis errors and timeouts of the prefix cache; each falls back to local computation", registry=_WK
)
PREFIX_CACHE_SECONDS = Histogram(
    "saffron_prefix_cache_seconds", "Time of one prefix load from Redis (on the request's path) or one write-back (off it)", ["operation"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=_WK,
)
TRIE_CACHE_BYTES = Gauge("saffron_trie_cache_bytes", "Bytes a model's trie cache holds now (KV and frontier logits)", ["model"], registry=_WK)
TRIE_CACHE_LIMIT = Gauge("saffron_trie_cache_limit_bytes", "SAFFRON_TRIE_CACHE_BYTES: the bound of each model's trie cache", registry=_WK)
BATCH_ROWS = Histogram("saffron_batch_rows", "Sequences asked of a model per worker round (across requests)", ["model"], buckets=TOKEN_BUCKETS, registry=_WK)
WORKER_BUSY = Gauge("saffron_worker_busy", "Searches a worker is stepping right now", registry=_WK)
WORKER_JOBS = Counter("saffron_worker_jobs_total", "Jobs a worker finished, by outcome", ["outcome"], registry=_WK)
WORKER_REDIS_ERRORS = Counter("saffron_worker_redis_errors_total", "Redis errors a worker survived (it retries with backoff)", ["kind"], registry=_WK)
