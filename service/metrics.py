"""Every Prometheus metric object, for the gateway and the worker, in one module.

Everything countable is a counter (rates and hit ratios are computed in PromQL, e.g.
``rate(saffron_trie_reused_tokens_total[5m]) / rate(saffron_trie_query_tokens_total[5m])``);
labels are bounded: strategy (4 values), status (HTTP codes we emit), model (policy/mrm/prm),
source (policy/guard), outcome (a handful).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# LLM requests take from tens of milliseconds (a rejected request) to minutes (a wide search on CPU).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

# --- gateway -------------------------------------------------------------------------------
REQUESTS = Counter("saffron_requests_total", "Chat completion requests answered, by strategy and HTTP status", ["strategy", "status"])
REQUEST_LATENCY = Histogram("saffron_request_latency_seconds", "End-to-end request latency at the gateway", ["strategy"], buckets=LATENCY_BUCKETS)
TIME_TO_FIRST_TOKEN = Histogram(
    "saffron_time_to_first_token_seconds", "Time from request to the first streamed content", ["strategy"], buckets=LATENCY_BUCKETS
)
QUEUE_DEPTH = Gauge("saffron_queue_depth", "Jobs queued or running (length of the jobs stream), sampled by the gateway")

# --- worker --------------------------------------------------------------------------------
QUEUE_WAIT = Histogram("saffron_queue_wait_seconds", "Time a job waited in the queue before a worker started it", ["strategy"], buckets=LATENCY_BUCKETS)
SEARCH_SECONDS = Histogram("saffron_search_seconds", "Time a worker spent on one search", ["strategy"], buckets=LATENCY_BUCKETS)
GENERATED_TOKENS = Counter("saffron_generated_tokens_total", "Completion tokens returned", ["strategy"])
REFUSALS = Counter(
    "saffron_refusals_total", "Answers that refuse cleanly: by the policy itself, or blocked by the guard (content_filter)", ["strategy", "source"]
)
DEGENERATE_ANSWERS = Counter(
    "saffron_degenerate_answers_total", "Answers the judge calls degenerate (a loop or word salad; never counted as refusals)", ["strategy"]
)
REWARD_MODEL_CALLS = Counter("saffron_reward_model_calls_total", "Sequences scored by a reward model or the judge", ["strategy"])
TRIE_QUERY_TOKENS = Counter("saffron_trie_query_tokens_total", "Tokens asked of a model through its trie cache", ["model"])
TRIE_FORWARDED_TOKENS = Counter("saffron_trie_forwarded_tokens_total", "Tokens actually run through a model", ["model"])
TRIE_REUSED_TOKENS = Counter("saffron_trie_reused_tokens_total", "Query tokens served from the trie cache (hits)", ["model"])
TRIE_EVICTED_TOKENS = Counter("saffron_trie_evicted_tokens_total", "Tokens evicted from a trie cache", ["model"])
BATCH_ROWS = Histogram("saffron_batch_rows", "Sequences asked of a model per worker round (across requests)", ["model"], buckets=TOKEN_BUCKETS)
WORKER_BUSY = Gauge("saffron_worker_busy", "Searches a worker is stepping right now")
WORKER_JOBS = Counter("saffron_worker_jobs_total", "Jobs a worker finished, by outcome", ["outcome"])
GATEWAY_REDIS_ERRORS = Counter("saffron_gateway_redis_errors_total", "Redis errors a waiting request survived (it retries until the deadline)", ["kind"])
JOBS_REQUEUED = Counter("saffron_jobs_requeued_total", "Jobs a gateway queued again because the Redis server had lost them")
WORKER_REDIS_ERRORS = Counter("saffron_worker_redis_errors_total", "Redis errors a worker survived (it retries with backoff)", ["kind"])
