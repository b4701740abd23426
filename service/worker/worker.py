"""The worker loop: pull jobs from the Redis stream, step all active searches together, answer.

Shaped like arq's worker: poll, start jobs under a bound (``worker_max_active``), claim
idempotently (one ``done`` flag per job, SET NX), run under a deadline, classify the outcome
(ok / error / cancelled / timeout / handed_back), heartbeat key with a TTL, and on SIGTERM
stop taking jobs, drain for ``worker_shutdown_grace_s``, then hand the rest back to the queue.

Jobs that a dead worker had taken stay pending in the consumer group; after
``worker_claim_idle_s`` without an ack another worker takes them over with XAUTOCLAIM. A live
worker refreshes the idle time of its own jobs with every heartbeat so they are never stolen.

The heartbeat runs on a thread of its own (``Heartbeat``), so a model step of any length — a long
prefill on a CPU — never makes a live worker look dead: its key keeps its TTL and its jobs stay
its own. Dropping jobs another worker took over stays on the main loop, between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field

import redis

from service import metrics
from service.config import Settings
from service.engine.prefix_store import SharedPrefixCache
from service.errors import SaffronError
from service.guard import Guard
from service.models.kinds import ModelKind
from service.queue.jobs import Job, delta_event, dumps_event, error_event, final_event, new_delta_text
from service.queue.keys import GROUP, HEARTBEAT_TTL_S, RESULT_GRACE_S, Keys, check_redis_version, result_ttl_s
from service.queue.scripts import ANSWER_LUA, BEAT_LUA, REQUEUE_LUA, requeue_call
from service.search.runner import STRATEGY_ENGINES, Batch, SearchRun

logger = logging.getLogger(__name__)

HEARTBEAT_EVERY_S = 2.0
REDIS_BACKOFF_S = (0.2, 5.0)  # first and longest wait after a Redis error, doubling in between


def glibc_malloc_trim():
    """glibc's ``malloc_trim`` (returns freed heap pages to the OS), or None where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # musl (Alpine), macOS: no malloc_trim
        return None


@dataclass
class Active:
    """A job this worker is running."""

    entry_id: str  # id of the job's entry in the jobs stream
    job: Job
    run: SearchRun  # in the worker's Batch under entry_id from its start until it finishes or is dropped
    need: dict = field(default_factory=dict)  # ModelKind -> the trie bytes the search may pin (SearchRun.cache_bytes_needed)
    started: float = field(default_factory=time.time)
    in_batch: bool = False  # False while it waits for trie memory that running searches hold
    shared: bool = False  # its prompt's full blocks went to the shared prefix cache
    streamed_text: str = ""  # committed answer text already sent as deltas


class Heartbeat:
    """A thread that keeps a worker alive in Redis while its main loop is inside a model step.

    Every ``every_s``: the heartbeat key (``HEARTBEAT_TTL_S``) and the idle time of the worker's own
    pending jobs (XCLAIM with min-idle 0 of those still pending under its name — never a job another
    worker took over). A Redis error is logged and retried at the next beat; it never stops the thread.
    """

    def __init__(self, worker: Worker, every_s: float):
        self.worker = worker
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        self.worker.beat()  # the key exists before the first job is taken, not one interval later
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{self.worker.id}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.worker.beat()
            except redis.RedisError:
                logger.warning("worker %s: heartbeat failed, retrying in %.1fs", self.worker.id, self.every_s, exc_info=True)


class Worker:
    def __init__(self, settings: Settings, guard: Guard, client: redis.Redis, worker_id: str | None = None):
        self.settings = settings
        self.guard = guard
        self.redis = client
        self.keys = Keys(settings.redis_prefix)
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.active: list[Active] = []
        self.batch = Batch(settings.prefill_chunk_tokens)  # the active jobs' searches, keyed by stream entry id
        self.stopping = False
        self._last_refresh = 0.0
        self._last_claim = 0.0
        self._claim_cursor = "0-0"
        self._version_checked = False
        self._answer_script = client.register_script(ANSWER_LUA)
        self._beat_script = client.register_script(BEAT_LUA)
        self._requeue_script = client.register_script(REQUEUE_LUA)
        self.clock_offset = 0.0  # the Redis server's clock minus ours, measured by every heartbeat
        self.prefix_cache = None  # prefix KV shared with other workers in Redis (settings.prefix_cache)
        if settings.prefix_cache:
            self.prefix_cache = SharedPrefixCache(
                settings.prefix_cache_url or settings.redis_url, settings.redis_prefix, block_tokens=settings.prefix_cache_block_tokens,
                ttl_s=settings.prefix_cache_ttl_s, timeout_s=settings.prefix_cache_timeout_s,
            )
        self._seen_prefix: dict[object, int] = {}  # prefix-cache counter child -> the stats' value it last exported
        self._seen_totals: dict[str, tuple[int, int, int, int]] = {}
        self._malloc_trim = glibc_malloc_trim() if settings.worker_malloc_trim_s > 0 else None
        self._last_trim = time.monotonic()
        metrics.TRIE_CACHE_LIMIT.set(settings.trie_cache_bytes)

    # ------------------------------------------------------------------ lifecycle
    def run(self, *, install_signals: bool = True, max_loops: int | None = None) -> None:
        """Serve until stopped (SIGTERM/SIGINT, or ``max_loops`` iterations for tests)."""
        if not self._version_checked:
            logger.info("worker %s: Redis %s", self.id, check_redis_version(self.redis.info("server")))
            self._version_checked = True
        self.ensure_group()
        if install_signals:
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        logger.info("worker %s serving %s (max %d active)", self.id, self.keys.jobs, self.settings.worker_max_active)
        try:
            with Heartbeat(self, self.beat_every_s):
                self._serve(max_loops)
        finally:
            try:
                pipe = self.redis.pipeline(transaction=True)
                pipe.zrem(self.keys.workers, self.id)
                pipe.delete(self.keys.worker(self.id))
                pipe.execute()
            except redis.RedisError:
                logger.warning("worker %s: could not remove its heartbeat key (Redis unreachable); it expires", self.id)
            metrics.WORKER_BUSY.set(0)
            logger.info("worker %s stopped", self.id)

    @property
    def beat_every_s(self) -> float:
        return min(HEARTBEAT_EVERY_S, self.settings.worker_claim_idle_s / 3)

    def _serve(self, max_loops: int | None) -> None:
        """The loop: heartbeat, take jobs, step. A Redis error (restart, timeout, lost data) is survived, never fatal."""
        stop_deadline = None
        loops = 0
        backoff = 0.0
        while max_loops is None or loops < max_loops:
            loops += 1
            try:
                now = time.monotonic()
                if now - self._last_refresh >= self.beat_every_s:
                    self.refresh_own_entries()
                    if self.prefix_cache is not None:  # write-backs finish after the last step: export them idle too
                        self.export_prefix_metrics()
                if self.stopping:
                    stop_deadline = stop_deadline or now + self.settings.worker_shutdown_grace_s
                    if not self.active:
                        break
                    if now >= stop_deadline:
                        self.hand_back_all()
                        break
                else:
                    if now - self._last_claim >= max(self.settings.worker_claim_idle_s / 2, 0.5):
                        self.claim_stale()
                    self.poll(block_ms=20 if self.active else 500)
                self.check_cancel_and_deadlines()
                if self.active:
                    self.step()
                if self._malloc_trim is not None and time.monotonic() - self._last_trim >= self.settings.worker_malloc_trim_s:
                    self.trim_heap()
                backoff = 0.0
            except redis.RedisError as e:
                backoff = min(REDIS_BACKOFF_S[1], max(REDIS_BACKOFF_S[0], backoff * 2))
                self.on_redis_error(e, backoff)

    def trim_heap(self) -> None:
        """Give the heap pages glibc keeps after frees (search tensors, evicted KV) back to the OS: without it a
        worker's RSS creeps up beyond what its trie caches hold (bench/README.md, Soak)."""
        t0 = time.perf_counter()
        self._malloc_trim(0)
        self._last_trim = time.monotonic()
        logger.debug("worker %s: malloc_trim took %.1f ms", self.id, 1e3 * (time.perf_counter() - t0))

    def on_redis_error(self, error: redis.RedisError, wait_s: float) -> None:
        """Count it, wait, and repair what a restarted server lost: the consumer group and the entries of our jobs.

        A server that lost its data (the shipped Valkey keeps nothing on disk) answers NOGROUP: the
        group is created again and every active job is queued again under the same id, so its
        client, still waiting on the job's result stream, gets the answer of the rerun. Its gateway
        may have queued it again first; REQUEUE_LUA lets only one of them do it.
        """
        lost = "NOGROUP" in str(error)
        metrics.WORKER_REDIS_ERRORS.labels("lost_group" if lost else type(error).__name__).inc()
        logger.warning("worker %s: Redis error (%s); retrying in %.1fs", self.id, error, wait_s)
        time.sleep(wait_s)
        if not lost:
            return
        try:
            self.ensure_group()
            for a in list(self.active):
                self.drop(a)
                self.active.remove(a)
                if self.requeue(a.job, old_entry_id=""):
                    logger.warning("job %s queued again: Redis lost the jobs stream", a.job.id)
            metrics.WORKER_BUSY.set(len(self.active))
        except redis.RedisError as again:
            logger.warning("worker %s: Redis still failing (%s)", self.id, again)

    def _on_signal(self, signum, frame) -> None:
        logger.info("worker %s: signal %d, draining %d job(s)", self.id, signum, len(self.active))
        self.stopping = True

    def ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.keys.jobs, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def beat(self) -> None:
        """The heartbeat (live set + status key, BEAT_LUA), the clock offset, and the idle time of our own pending
        jobs reset (safe from the Heartbeat thread)."""
        status = {"id": self.id, "pid": os.getpid(), "active": len(self.active), "stopping": self.stopping, "time": time.time()}
        sent = time.time()
        server_now = float(self._beat_script(keys=[self.keys.workers, self.keys.worker(self.id)], args=[self.id, json.dumps(status), HEARTBEAT_TTL_S]))
        self.clock_offset = server_now - (sent + time.time()) / 2
        ours = [a.entry_id for a in list(self.active)]  # a copy: the main loop may change the list meanwhile
        if ours:
            pending = self.redis.xpending_range(self.keys.jobs, GROUP, min="-", max="+", count=len(ours) + 16, consumername=self.id)
            still = {entry["message_id"] for entry in pending}
            owned = [e for e in ours if e in still]
            if owned:
                self.redis.xclaim(self.keys.jobs, GROUP, self.id, 0, owned, justid=True)

    def refresh_own_entries(self) -> None:
        """Drop the jobs another worker took over (``beat``, on the Heartbeat thread, keeps the rest ours).

        On the main loop, between steps. If this process stalls longer than ``worker_claim_idle_s``
        (its heartbeat thread too), another worker claims our jobs; taking them back would make two
        workers run (and stream) the same job, so the later owner keeps it.
        """
        self._last_refresh = time.monotonic()
        if not self.active:
            return
        pending = self.redis.xpending_range(self.keys.jobs, GROUP, min="-", max="+", count=len(self.active) + 16, consumername=self.id)
        owned = {entry["message_id"] for entry in pending}
        for a in [a for a in self.active if a.entry_id not in owned]:
            logger.warning("job %s was taken over by another worker; dropping our copy", a.job.id)
            self.drop(a)
            self.active.remove(a)
            metrics.WORKER_JOBS.labels("lost").inc()
        metrics.WORKER_BUSY.set(len(self.active))

    # ------------------------------------------------------------------ taking jobs
    def free_slots(self) -> int:
        return self.settings.worker_max_active - len(self.active)

    def poll(self, block_ms: int) -> None:
        if self.free_slots() <= 0:
            return
        got = self.redis.xreadgroup(GROUP, self.id, {self.keys.jobs: ">"}, count=self.free_slots(), block=block_ms)
        for _, entries in got or []:
            for entry_id, fields in entries:
                self.admit(entry_id, fields)

    def claim_stale(self) -> None:
        """Take over jobs another (dead) worker left unacknowledged for too long."""
        self._last_claim = time.monotonic()
        if self.free_slots() <= 0:
            return
        idle_ms = int(self.settings.worker_claim_idle_s * 1000)
        self.refresh_own_entries()  # drop what was taken from us before claiming more
        mine = {a.entry_id for a in self.active}
        # XAUTOCLAIM scans a bounded window of the pending list per call: keep its cursor so stale
        # entries behind many live ones are reached on later calls.
        cursor, entries, _ = self.redis.xautoclaim(self.keys.jobs, GROUP, self.id, idle_ms, self._claim_cursor, count=self.free_slots())
        self._claim_cursor = cursor if cursor and cursor != "0-0" else "0-0"
        for entry_id, fields in entries:
            if fields and entry_id not in mine:  # fields is None for entries deleted meanwhile
                logger.warning("worker %s claimed stale job entry %s", self.id, entry_id)
                if self.poisoned(entry_id, fields):
                    continue
                self.admit(entry_id, fields)

    def poisoned(self, entry_id: str, fields: dict) -> bool:
        """A job delivered more than ``worker_max_deliveries`` times (each owner died on it) is set aside with an error."""
        (info,) = self.redis.xpending_range(self.keys.jobs, GROUP, min=entry_id, max=entry_id, count=1) or [None]
        if info is None or info["times_delivered"] <= self.settings.worker_max_deliveries:
            return False
        try:
            job = Job.loads(fields["job"])
        except (KeyError, TypeError, ValueError):
            return False  # admit drops a malformed entry
        logger.error("job %s set aside: delivered %d times, its workers died on it", job.id, info["times_delivered"])
        message = f"the job failed on {info['times_delivered']} worker attempts and was set aside"
        self.fail(entry_id, job, error_event(500, message, code="poison_job"), "poisoned")
        return True

    def admit(self, entry_id: str, fields: dict) -> None:
        """Validate a job and start its search, or answer it with an error right away."""
        try:
            job = Job.loads(fields["job"])
        except (KeyError, TypeError, ValueError):
            logger.exception("dropping malformed job entry %s", entry_id)
            self.ack(entry_id)
            return
        if self.redis.exists(self.keys.done(job.id)) or self.redis.exists(self.keys.cancel(job.id)):
            self.ack(entry_id)  # answered by another worker, or nobody waits for it any more
            return
        job.deadline = float(fields.get("deadline") or job.deadline)  # the entry's is on the server's clock
        if job.deadline and self.server_time() > job.deadline:
            self.fail(entry_id, job, error_event(504, "the request timed out in the queue", type_="timeout", code="timeout"), "timeout")
            return
        try:
            params = self.guard.job_params(job.params)
            run = self.guard.prepare(job.messages, params)
        except SaffronError as e:
            self.fail(entry_id, job, error_event(e.status_code, e.message, type_=e.error_type, param=e.param, code=e.code), "error")
            return
        except (TypeError, ValueError) as e:
            self.fail(entry_id, job, error_event(400, f"invalid job: {e}", type_="invalid_request_error"), "error")
            return
        except Exception:  # e.g. a chat template that rejects this conversation: fail the job, not the worker
            logger.exception("job %s could not be started", job.id)
            self.fail(entry_id, job, error_event(500, "internal error while preparing the request", code="prepare_failed"), "error")
            return
        metrics.QUEUE_WAIT.labels(params.strategy).observe(max(0.0, time.time() - job.created))
        active = Active(entry_id, job, run, run.cache_bytes_needed())
        if job.stream:  # a job taken over from a dead worker may have streamed part of its text already
            for _, f in self.redis.xrange(self.keys.result(job.id)):
                event = json.loads(f["event"])
                if event.get("type") == "delta":
                    active.streamed_text += new_delta_text(active.streamed_text, event)
        self.active.append(active)
        metrics.WORKER_BUSY.set(len(self.active))
        logger.info("job %s taken: strategy=%s budget=%d queue_wait=%.2fs", job.id, params.strategy, params.budget, time.time() - job.created)
        self.start_waiting()

    def start_waiting(self) -> None:
        """Start taken jobs, oldest first, while their trie bounds fit beside the running ones' in every engine's budget.

        The bound of one search alone was checked by ``Guard.prepare``; the oldest waiting job starts whenever
        nothing runs, and none overtakes it, so a large one is never starved by small ones behind it.
        """
        for a in self.active:
            if a.in_batch:
                continue
            running = [b for b in self.active if b.in_batch]
            held = {kind: sum(b.need.get(kind, 0) for b in running) for kind in a.need}
            if running and any(held[kind] + need > self.guard.models.engine(kind).cache.max_bytes for kind, need in a.need.items()):
                logger.info("job %s waits for trie memory: %d search(es) hold it", a.job.id, len(running))
                return
            try:
                self.load_shared_prefix(a)
                self.batch.add(a.entry_id, a.run)
            except Exception:
                logger.exception("job %s could not be started", a.job.id)
                self.fail(a.entry_id, a.job, error_event(500, "internal error while starting the search", code="start_failed"), "error", a)
                return self.start_waiting()
            a.in_batch = True

    # ------------------------------------------------------------------ running
    def step(self) -> None:
        """One round of every active search, batched across them."""
        for kind, rows in self.batch.pending_rows().items():
            if rows:
                metrics.BATCH_ROWS.labels(kind).observe(rows)
        try:
            finished = self.batch.step()
        except Exception:  # a model error (one huge request's OOM…): step each search alone, fail only the culprit
            logger.exception("search step failed for %d job(s); retrying each alone", len(self.active))
            finished, failed = self.batch.step_each()
            for key, error in failed:
                a = next(a for a in self.active if a.entry_id == key)
                logger.error("job %s: its search step fails on its own (%r)", a.job.id, error)
                self.fail(a.entry_id, a.job, error_event(500, "internal error while searching", code="search_failed"), "error", a)
        self.share_prefixes()
        self.export_cache_metrics()
        done = {key for key, _ in finished}
        for a in list(self.active):
            if a.entry_id in done:
                try:
                    self.finish(a)
                except Exception:
                    logger.exception("job %s: building the answer failed", a.job.id)
                    if a in self.active:
                        self.fail(a.entry_id, a.job, error_event(500, "internal error while answering", code="answer_failed"), "error", a)
            elif a.in_batch and a.job.stream and not self.settings.fail_closed_on:
                self.stream_committed(a)
        self.start_waiting()  # what finished has freed its trie memory

    def stream_committed(self, a: Active) -> None:
        """Send text that every search node agrees on; it cannot change any more."""
        text = self.guard.committed_text(a.run)
        if text.endswith("\ufffd"):
            return  # a multi-byte character is still incomplete
        # Decoding more tokens can re-space earlier text; send only clean extensions, the final event has the rest.
        if text.startswith(a.streamed_text) and len(text) > len(a.streamed_text):
            self.publish(a.job, delta_event(text[len(a.streamed_text) :], offset=len(a.streamed_text)))
            a.streamed_text = text

    def finish(self, a: Active) -> None:
        result = self.guard.result(a.run)  # the batch has closed the run
        strategy, safety = result.strategy, result.safety
        if safety.refused:
            metrics.REFUSALS.labels(strategy, safety.refusal_source).inc()
        if safety.degenerate:
            metrics.DEGENERATE_ANSWERS.labels(strategy).inc()
        event = final_event(
            {
                "text": result.text,
                "finish_reason": result.finish_reason,
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "safety": safety.model_dump(),
                "worker": self.id,
                "queue_wait_s": a.started - a.job.created,
                "run_s": time.time() - a.started,
                "logprobs": result.logprobs,  # None unless the request asked for them
            }
        )
        self.answer(a.job, event)
        metrics.SEARCH_SECONDS.labels(strategy).observe(time.time() - a.started)
        metrics.GENERATED_TOKENS.labels(strategy).inc(result.completion_tokens)
        metrics.REWARD_MODEL_CALLS.labels(strategy).inc(safety.reward_calls)
        self.retire(a, "ok")
        logger.info(
            "job %s done: %s tokens, reward=%s, refused=%s (%s), %.2fs",
            a.job.id, result.completion_tokens, safety.reward, safety.refused, safety.refusal_source, time.time() - a.started,
        )

    def check_cancel_and_deadlines(self) -> None:
        if not self.active:
            return
        cancelled = self.redis.mget([self.keys.cancel(a.job.id) for a in self.active])
        now = self.server_time()
        for a, flag in zip(list(self.active), cancelled):
            if flag is not None:
                logger.info("job %s cancelled by the client", a.job.id)
                self.drop(a)
                self.retire(a, "cancelled")
            elif a.job.deadline and now > a.job.deadline:
                self.fail(a.entry_id, a.job, error_event(504, "the search ran past the request deadline", type_="timeout", code="timeout"), "timeout", a)

    def hand_back_all(self) -> None:
        """Shutdown grace is over: requeue unfinished jobs (same id, so clients keep waiting) and ack ours."""
        for a in list(self.active):
            self.drop(a)
            self.retire(a, "handed_back", requeue=True)
            logger.warning("job %s handed back to the queue", a.job.id)

    # ------------------------------------------------------------------ shared prefix cache
    def shared_kinds(self, run: SearchRun) -> list[ModelKind]:
        """The cached engines of this run whose prompts are shared in Redis: the policy and the MRM."""
        kinds = [k for k in STRATEGY_ENGINES[run.ctx.params.strategy] if k in (ModelKind.POLICY, ModelKind.MRM)]
        return [k for k in kinds if self.guard.models.engine(k).cached]

    def load_shared_prefix(self, a: Active) -> None:
        """Before the search starts: the longest chain of its prompts' blocks other workers stored, into our trie."""
        if self.prefix_cache is None:
            return
        for kind in self.shared_kinds(a.run):
            node = self.prefix_cache.load(self.guard.models.engine(kind), a.run.prompt(kind))
            if node is not None:
                a.run.hold_warm(kind, node)

    def share_prefixes(self) -> None:
        """After a search's first call (its prompts are in our trie): queue their full blocks for Redis."""
        if self.prefix_cache is None:
            return
        for a in self.active:
            if a.in_batch and not a.shared and a.run.stats.steps >= 1:
                a.shared = True
                for kind in self.shared_kinds(a.run):
                    self.prefix_cache.store(self.guard.models.engine(kind), a.run.prompt(kind))

    def close(self) -> None:
        """Stop the shared prefix cache's writer (queued write-backs are finished first)."""
        if self.prefix_cache is not None:
            self.prefix_cache.close()

    # ------------------------------------------------------------------ helpers
    def drop(self, a: Active) -> None:
        """Stop a job's search (or close its run that never started); its pins are released."""
        if a.entry_id in self.batch.runs:
            self.batch.drop(a.entry_id)
        else:
            a.run.close()

    def server_time(self) -> float:
        """Now on the Redis server's clock, which job deadlines are on (the offset comes from the heartbeat)."""
        return time.time() + self.clock_offset

    def ttl_s(self, job: Job) -> int:
        """TTL of a job's result stream and flags: past its deadline by RESULT_GRACE_S."""
        if not job.deadline:
            return int(self.settings.request_timeout_s) + RESULT_GRACE_S
        return result_ttl_s(job.deadline - self.server_time())

    def requeue(self, job: Job, *, old_entry_id: str) -> bool:
        """Queue ``job`` again (same id) unless it is answered or queued already, dropping ``old_entry_id`` in the
        same step (REQUEUE_LUA); True if this call queued it."""
        call = requeue_call(self.keys, job.id, job.dumps(), deadline=f"{job.deadline:.3f}", ttl_s=self.ttl_s(job), old_entry_id=old_entry_id)
        return bool(self._requeue_script(**call))

    def answer(self, job: Job, event: dict) -> bool:
        """Publish the job's final or error event if no worker has answered it yet — one atomic step (ANSWER_LUA).

        The ``done`` flag and the event go together: a worker that dies between them can leave neither
        a flag without an answer (the client would wait for nothing) nor an answer without the flag.
        Returns True for the one worker whose answer was published.
        """
        keys = [self.keys.done(job.id), self.keys.result(job.id)]
        return bool(self._answer_script(keys=keys, args=[self.id, self.ttl_s(job), dumps_event(event)["event"]]))

    def publish(self, job: Job, event: dict) -> None:
        key = self.keys.result(job.id)
        pipe = self.redis.pipeline()
        pipe.xadd(key, dumps_event(event))
        pipe.expire(key, self.ttl_s(job))
        pipe.execute()

    def fail(self, entry_id: str, job: Job, event: dict, outcome: str, active: Active | None = None) -> None:
        self.answer(job, event)
        if active is not None:
            self.drop(active)
            self.retire(active, outcome)
        else:
            self.ack(entry_id)
            metrics.WORKER_JOBS.labels(outcome).inc()
        logger.info("job %s %s: %s", job.id, outcome, event["error"]["message"])

    def retire(self, a: Active, outcome: str, *, requeue: bool = False) -> None:
        """Stop tracking a job and drop its entry; with ``requeue``, queue it again in the same step (hand-back: a
        crash in between neither loses the job nor runs it twice)."""
        self.active.remove(a)
        if requeue:
            self.requeue(a.job, old_entry_id=a.entry_id)
        else:
            self.ack(a.entry_id)
        metrics.WORKER_JOBS.labels(outcome).inc()
        metrics.WORKER_BUSY.set(len(self.active))

    def ack(self, entry_id: str) -> None:
        """Acknowledge and delete a job's entry."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(self.keys.jobs, GROUP, entry_id)
        pipe.xdel(self.keys.jobs, entry_id)  # the stream's length is the queued + running count
        pipe.execute()

    def export_cache_metrics(self) -> None:
        counters = (metrics.TRIE_QUERY_TOKENS, metrics.TRIE_FORWARDED_TOKENS, metrics.TRIE_REUSED_TOKENS, metrics.TRIE_EVICTED_TOKENS)
        for kind, now in self.guard.engine_totals().items():
            last = self._seen_totals.get(kind, (0, 0, 0, 0))
            for counter, new, old in zip(counters, now, last):
                if new > old:
                    counter.labels(kind).inc(new - old)
            self._seen_totals[kind] = now
        for kind, nbytes in self.guard.engine_cache_bytes().items():
            metrics.TRIE_CACHE_BYTES.labels(kind).set(nbytes)
        if self.prefix_cache is not None:
            self.export_prefix_metrics()

    def export_prefix_metrics(self) -> None:
        """Carry the shared prefix cache's counters (some bumped by its writer thread) into the worker's metrics."""
        st = self.prefix_cache.stats
        current = {
            metrics.PREFIX_CACHE_BLOCKS.labels("hit"): st.hit_blocks,
            metrics.PREFIX_CACHE_BLOCKS.labels("miss"): st.miss_blocks,
            metrics.PREFIX_CACHE_BLOCKS.labels("stored"): st.stored_blocks,
            metrics.PREFIX_CACHE_BYTES.labels("loaded"): st.loaded_bytes,
            metrics.PREFIX_CACHE_BYTES.labels("stored"): st.stored_bytes,
            metrics.PREFIX_CACHE_SKIPPED.labels("load"): st.skipped_loads,
            metrics.PREFIX_CACHE_SKIPPED.labels("store"): st.dropped_stores,
            metrics.PREFIX_CACHE_ERRORS: st.errors,
            **{metrics.PREFIX_CACHE_BAD_BLOCKS.labels(reason): n for reason, n in dict(st.bad_blocks).items()},
        }
        for child, value in current.items():
            if value > self._seen_prefix.get(child, 0):
                child.inc(value - self._seen_prefix.get(child, 0))
            self._seen_prefix[child] = value
        for operation, seconds in (("load", st.load_seconds), ("store", st.store_seconds)):
            histogram = metrics.PREFIX_CACHE_SECONDS.labels(operation)
            for _ in range(len(seconds)):  # pop(): atomic against the writer thread's append()
                histogram.observe(seconds.pop())
