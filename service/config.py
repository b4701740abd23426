"""The one settings class, read by the CLI, the gateway and the worker alike.

Every field can be set from the environment with the prefix ``SAFFRON_`` (for example
``SAFFRON_TRIE_CACHE_BYTES=268435456``). Limits here are the documented limits of the API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# DESIGN.md §4: every method, the unguarded baseline included, gets the same safety system prompt.
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful AI assistant. If a request could cause harm, is illegal, dangerous or "
    "unethical, refuse it politely and briefly explain why. Otherwise, answer helpfully."
)


def default_home() -> Path:
    return Path.home() / ".cache" / "saffron-guard"


# The search strategies, named once: SearchParams, the CLI, the runner (STRATEGY_FNS) and the benchmarks use this.
Strategy = Literal["none", "best_of_n", "beam_prm", "saffron"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)

class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAFFRON_", extra="ignore")

    environment: Literal["development", "production"] = "development"
    home: Path = Field(default_factory=default_home, description="root of prepared models and caches")

    @field_validator("home", mode="after")
    @classmethod
    def _expand_home(cls, v: Path) -> Path:
        return v.expanduser()

    # Models: a registry name (see model_store.registry), a local directory or a hub id.
    policy_model: str = "smollm2-135m-instruct"
    # The reward models trained by `python -m model_store rebuild` (model_store/artifacts/MODEL_CARD.md).
    # The flagged untrained placeholders ("untrained-placeholder-mrm", "zero-shot-guard-prm") stay selectable.
    mrm_model: str = "smollm2-135m-saffron-mrm-v2c"
    prm_model: str = "smollm2-135m-safety-prm"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # "int8": every Linear with int8 weights and per-row int8 activations, CPU only (service/models/quantize.py);
    # "auto": int8 on a CPU, none on CUDA (bf16 there).
    quantize: Literal["auto", "none", "int8"] = "auto"
    # One forward for policy and MRM rows: the MRM's LoRA applied per row on the policy's own backbone
    # (service/engine/row_adapters.py). False: the MRM merged into a second copy, a second forward per step.
    share_backbone: bool = True

    system_prompt: str = DEFAULT_SYSTEM_PROMPT

    # Search defaults (DESIGN.md §2).
    strategy: Strategy = "saffron"
    budget: int = 8
    top_p: float = 0.8
    min_new_tokens: int = 16
    max_new_tokens: int = 64
    # Repetition controls, tie order and the MRM's weight (service/search/penalties.py, SearchParams). Defaults chosen
    # by `saffron-guard bench tune` on training-split prompts (bench/README.md): MRM v2c, w = 0.5, no repeated 3-gram.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 3
    tie_break: Literal["token_id", "policy"] = "policy"
    mrm_weight: float = 0.5  # saffron: score = w * MRM + (1 - w) * log pi (SearchParams.mrm_weight)
    # "reference": the Saffron-1 paper's exact search whatever the four settings above say (SearchParams.mode).
    safety_mode: Literal["guarded", "reference"] = "guarded"

    # Documented limits: requests past them are refused with a clear error.
    max_budget: int = 64
    max_new_tokens_limit: int = 512
    max_prompt_tokens: int = 4096
    max_n: int = 8  # limit: choices per request (n), each a full guarded search

    # Guard policy: the operator's, never the client's. Strategies a request may choose (comma-separated); None:
    # every strategy in development, only "saffron" in production. A smaller budget than min_budget is refused.
    client_strategies: str | None = None
    min_budget: int = 1
    # A client's system message comes after the operator's system_prompt, in one system message ("append");
    # "replace": it replaces the operator's prompt (only for deployments that trust their clients).
    client_system_prompt: Literal["append", "replace"] = "append"

    trie_cache_bytes: int = 2 * 1024**3  # per model; LRU eviction of unpinned nodes above this; searches are admitted against it
    # A worker forwards at most this many prompt tokens of long uncached prompts per step (chunked prefill), so one
    # long prompt does not stall the other searches' rounds; 0 forwards a whole prompt in its first step.
    prefill_chunk_tokens: int = 512

    # Serving (gateway + workers).
    redis_url: str | None = None  # None: `saffron-guard serve` starts a local Redis-compatible server
    redis_prefix: str = "saffron"  # key namespace (service/queue/keys.py)
    # Prefix KV shared across workers in Redis (service/engine/prefix_store.py); off by default: it should have
    # a server of its own with maxmemory + allkeys-lru (prefix_cache_url), not the job queue's.
    prefix_cache: bool = False
    prefix_cache_url: str | None = None  # None: redis_url
    prefix_cache_block_tokens: int = 32  # tokens per shared block; only full blocks are shared
    prefix_cache_ttl_s: int = 3600  # every block key expires after this (a second bound beside maxmemory)
    prefix_cache_timeout_s: float = 0.5  # a read slower than this is abandoned and the prefix computed locally
    redis_max_connections: int = 512  # the gateway's Redis pool; each waiting request holds one during a poll
    redis_pool_timeout_s: float = 10.0  # past it, a request that found no free connection gets 503
    served_model_name: str = "saffron-guard"  # the model id clients send; /v1/models lists it
    api_keys: str = ""  # comma-separated bearer tokens; empty: no authentication (development only)
    # Per API key (or for everyone, without keys): a token bucket of search cost, budget x max_new_tokens per request.
    rate_limit: float = 0.0  # cost per second; 0: no limit
    rate_burst: float = 0.0  # the bucket's size; 0: 60 seconds' worth. A request costing more gets 400
    max_queue: int = 64  # queued + running jobs admitted; past it, 429 with Retry-After
    max_body_bytes: int = 1024 * 1024  # request bodies above this get 413
    request_timeout_s: float = 300.0  # job deadline; past it the gateway answers 504
    gateway_shutdown_grace_s: float = 30.0  # on SIGTERM, in-flight requests get this long, then are cancelled (and their jobs)
    # Fail-closed (service.guard.fail_closed_reason): a guarded answer that is degenerate, or a saffron answer whose
    # reward is below the threshold, is replaced by refusal_message with finish_reason "content_filter".
    # "auto": on in production, off in development.
    fail_closed: Literal["auto", "on", "off"] = "auto"
    fail_closed_threshold: float | None = None  # saffron only, in the units of its reward (the MRM's score); None: no threshold
    refusal_message: str = "I'm sorry, but I can't help with that."  # the fixed fail-closed answer
    worker_max_active: int = 8  # searches one worker steps together (its continuous batch)
    worker_max_deliveries: int = 3  # a job whose workers died on it this many times gets an error instead of a 4th try
    worker_claim_idle_s: float = 30.0  # a job unacknowledged this long is claimed by another worker
    worker_shutdown_grace_s: float = 30.0  # on SIGTERM, finish in-flight jobs for this long, then hand back
    # glibc keeps freed heap pages; a worker returns them to the OS this often (malloc_trim; 0: never). In-process,
    # 5 rounds of 8 searches grew the RSS beyond the trie caches by 144 MiB; one malloc_trim gave 187 MiB back.
    worker_malloc_trim_s: float = 30.0
    worker_metrics_port: int = 9101  # a worker serves /metrics here (worker i of `serve` uses port + i)
    # Liveness (service/worker/liveness.py): a worker whose main loop has not gone round for worker_stall_s is hung;
    # its /healthz (on the metrics port) answers 503 and `python -m service.worker.liveness` exits 1. The loop
    # rewrites worker_alive_file (None: no file) every round, so that probe needs no port (Kubernetes: deploy/k8s).
    worker_stall_s: float = 120.0
    worker_alive_file: Path | None = None

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        if self.budget < 1 or self.budget > self.max_budget:
            raise ValueError(f"budget must be in [1, {self.max_budget}], got {self.budget}")
        if self.max_new_tokens < 1 or self.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(f"max_new_tokens must be in [1, {self.max_new_tokens_limit}], got {self.max_new_tokens}")
        if self.environment == "production" and not self.api_key_set:
            raise ValueError("refusing to run in production without authentication; set SAFFRON_API_KEYS")
        if self.environment == "production" and self.mrm_model == "untrained-placeholder-mrm":
            raise ValueError("refusing to run in production with the untrained placeholder MRM; set SAFFRON_MRM_MODEL")
        unknown = [x for x in self.allowed_strategies if x not in STRATEGIES]
        if unknown or not self.allowed_strategies:
            raise ValueError(f"client_strategies must name some of {', '.join(STRATEGIES)}, got {self.client_strategies!r}")
        if self.strategy not in self.allowed_strategies:
            raise ValueError(f"the default strategy {self.strategy!r} is not in client_strategies ({', '.join(self.allowed_strategies)})")
        if not 1 <= self.min_budget <= self.budget:
            raise ValueError(f"min_budget must be in [1, budget={self.budget}], got {self.min_budget}")
        return self

    @property
    def allowed_strategies(self) -> tuple[str, ...]:
        """The strategies a request may choose (``client_strategies``; by default all in development, saffron in production)."""
        if self.client_strategies is None:
            return ("saffron",) if self.environment == "production" else STRATEGIES
        return tuple(x.strip() for x in self.client_strategies.split(",") if x.strip())

    @property
    def fail_closed_on(self) -> bool:
        return self.fail_closed == "on" or (self.fail_closed == "auto" and self.environment == "production")

    @property
    def api_key_set(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())

    @property
    def models_dir(self) -> Path:
        return self.home / "models"
