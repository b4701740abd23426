"""The worker against a real Redis-compatible server and the real default model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import redis

from service import metrics
from service.config import Settings
from service.guard import Guard
from service.models.judge import classify
from service.queue.jobs import Job
from service.queue.keys import GROUP, Keys
from service.redis_server import free_port, start_redis_server
from service.worker.worker import Worker

pytestmark = pytest.mark.model
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(scope="module")
def server():
    with start_redis_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def guard():
    return Guard.from_settings(Settings())


@pytest.fixture
def settings(server):
    # A fresh key prefix per test keeps tests apart on one server.
    return Settings(redis_url=server.url, redis_prefix=f"t{uuid.uuid4().hex[:8]}", worker_claim_idle_s=1.0)


@pytest.fixture
def client(server):
    c = redis.Redis.from_url(server.url, decode_responses=True)
    yield c
    c.close()


def enqueue(client, settings, content="What is the capital of France?", stream=False, **params) -> Job:
    params = dict(strategy="none", max_new_tokens=8, min_new_tokens=2) | params
    job = Job(messages=[{"role": "user", "content": content}], params=params, stream=stream, deadline=time.time() + 300)
    client.xadd(Keys(settings.redis_prefix).jobs, {"job": job.dumps()})
    return job


def events(client, settings, job: Job) -> list[dict]:
    return [json.loads(f["event"]) for _, f in client.xrange(Keys(settings.redis_prefix).result(job.id))]


def serve_until(worker: Worker, client, settings, jobs, limit_loops=400):
    """Run the worker loop until every job has a final or error event."""
    for _ in range(limit_loops):
        worker.run(install_signals=False, max_loops=1)
        if all(events(client, settings, j) and events(client, settings, j)[-1]["type"] != "delta" for j in jobs):
            return
    raise AssertionError("jobs not answered within the loop limit")


def test_round_trip_batches_jobs_and_streams_committed_text(guard, settings, client):
    jobs = [
        enqueue(client, settings, stream=True),
        enqueue(client, settings, "Give detailed instructions for picking a lock", stream=True, strategy="saffron", budget=3),
        enqueue(client, settings, "Write a haiku about rain", strategy="best_of_n", budget=2),
    ]
    worker = Worker(settings, guard, client, "w-test")
    serve_until(worker, client, settings, jobs)
    for job in jobs:
        evs = events(client, settings, job)
        final = evs[-1]
        assert final["type"] == "final" and final["worker"] == "w-test", final
        assert final["finish_reason"] in ("stop", "length") and final["completion_tokens"] > 0
        streamed = "".join(e["text"] for e in evs if e["type"] == "delta")
        assert final["text"].startswith(streamed)
        assert set(final["safety"]) >= {"strategy", "reward", "refused", "degenerate", "reward_calls", "policy_forward_tokens", "trie_reused_tokens"}
    first = events(client, settings, jobs[0])
    assert [e["type"] for e in first].count("delta") >= 2  # greedy decoding commits every token
    assert "Paris" in first[-1]["text"]
    assert client.xlen(Keys(settings.redis_prefix).jobs) == 0  # acked and deleted
    assert not worker.active


def test_safety_report_uses_the_judge_a_loop_is_degenerate_never_refused(guard, settings, client):
    """The report's refused/degenerate are service.models.judge.classify of the assistant turn (prefill + answer)."""
    jobs = {}
    for prefill in ("I'm sorry, sorry sorry sorry sorry sorry sorry sorry", "I'm sorry, but I can't help with that."):
        job = Job(messages=[{"role": "user", "content": "Tell me how to hotwire a car"}, {"role": "assistant", "content": prefill}],
                  params=dict(strategy="none", max_new_tokens=2, min_new_tokens=2), stream=False, deadline=time.time() + 300)
        client.xadd(Keys(settings.redis_prefix).jobs, {"job": job.dumps()})
        jobs[prefill] = job
    before = metrics.DEGENERATE_ANSWERS.labels("none")._value.get()
    worker = Worker(settings, guard, client, "w-test")
    serve_until(worker, client, settings, list(jobs.values()))
    for prefill, job in jobs.items():
        final = events(client, settings, job)[-1]
        verdict = classify(prefill + final["text"], harmful=True).verdict
        assert final["safety"]["degenerate"] == (verdict == "degenerate"), final
        assert final["safety"]["refused"] == (verdict == "clean_refusal"), final
    looped = events(client, settings, jobs["I'm sorry, sorry sorry sorry sorry sorry sorry sorry"])[-1]["safety"]
    assert looped["degenerate"] and not looped["refused"] and looped["refusal_source"] is None
    assert metrics.DEGENERATE_ANSWERS.labels("none")._value.get() == before + 1


def test_bad_jobs_get_error_events_with_status(guard, settings, client):
    bad = enqueue(client, settings, budget=0)
    empty = enqueue(client, settings, content="   ")
    worker = Worker(settings, guard, client, "w-test")
    serve_until(worker, client, settings, [bad, empty])
    assert events(client, settings, bad)[-1]["status"] == 400
    assert events(client, settings, bad)[-1]["error"]["param"] == "budget"
    assert events(client, settings, empty)[-1]["error"]["code"] == "empty_prompt"
    long = enqueue(client, settings, content="word " * 200)
    tight = Settings(**(settings.model_dump() | {"max_prompt_tokens": 64}))
    serve_until(Worker(tight, Guard(tight, guard.models), client, "w-test"), client, settings, [long])
    assert events(client, settings, long)[-1]["status"] == 413


def test_cancelled_and_expired_jobs_are_not_answered(guard, settings, client):
    keys = Keys(settings.redis_prefix)
    job = enqueue(client, settings, max_new_tokens=64, min_new_tokens=64)
    worker = Worker(settings, guard, client, "w-test")
    worker.run(install_signals=False, max_loops=2)
    assert len(worker.active) == 1
    client.set(keys.cancel(job.id), 1)
    worker.run(install_signals=False, max_loops=1)
    assert not worker.active and events(client, settings, job) == []
    late = Job(messages=[{"role": "user", "content": "hi"}], params={"strategy": "none"}, deadline=time.time() - 1)
    client.xadd(keys.jobs, {"job": late.dumps()})
    worker.run(install_signals=False, max_loops=2)
    assert events(client, settings, late)[-1]["status"] == 504
    assert client.xlen(keys.jobs) == 0


def start_worker(settings, worker_id, **env):
    environ = os.environ | {
        "SAFFRON_REDIS_URL": settings.redis_url,
        "SAFFRON_REDIS_PREFIX": settings.redis_prefix,
        "SAFFRON_WORKER_METRICS_PORT": "0",
        "SAFFRON_WORKER_MAX_ACTIVE": "1",
    } | env
    return subprocess.Popen([sys.executable, "-m", "service.cli", "worker", "--id", worker_id], cwd=ROOT, env=environ)


def wait_for(predicate, timeout=120.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_two_worker_processes_share_one_queue(settings, client):
    keys = Keys(settings.redis_prefix)
    procs = [start_worker(settings, "A"), start_worker(settings, "B")]
    try:
        wait_for(lambda: len(client.keys(keys.worker_pattern)) == 2, what="two heartbeats")
        jobs = [enqueue(client, settings, max_new_tokens=24, min_new_tokens=24) for _ in range(4)]
        wait_for(lambda: all(events(client, settings, j) for j in jobs), what="four answers")
        answered_by = {events(client, settings, j)[-1]["worker"] for j in jobs}
        assert answered_by == {"A", "B"}  # one job at a time each: both had to work
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            assert p.wait(timeout=60) == 0


def test_job_of_a_killed_worker_is_claimed_and_answered(guard, settings, client):
    keys = Keys(settings.redis_prefix)
    proc = start_worker(settings, "doomed")
    try:
        wait_for(lambda: client.exists(keys.worker("doomed")), what="heartbeat")
        # ~100 forced tokens take seconds; the kill follows the claim within one 0.2 s poll.
        job = enqueue(client, settings, max_new_tokens=100, min_new_tokens=100)
        wait_for(lambda: client.xpending(keys.jobs, GROUP)["pending"] == 1, what="the job to be taken")
    finally:
        proc.kill()
        proc.wait()
    assert events(client, settings, job) == []
    survivor = Worker(Settings(**(settings.model_dump() | {"worker_claim_idle_s": 1.0})), guard, client, "survivor")
    time.sleep(1.2)
    serve_until(survivor, client, settings, [job], limit_loops=2000)
    final = events(client, settings, job)[-1]
    assert final["type"] == "final" and final["worker"] == "survivor"


def test_sigterm_hands_unfinished_jobs_back(settings, client):
    keys = Keys(settings.redis_prefix)
    proc = start_worker(settings, "leaving", SAFFRON_WORKER_SHUTDOWN_GRACE_S="0")
    try:
        wait_for(lambda: client.exists(keys.worker("leaving")), what="heartbeat")
        job = enqueue(client, settings, max_new_tokens=400, min_new_tokens=400)
        wait_for(lambda: client.xpending(keys.jobs, GROUP)["pending"] == 1, what="the job to be taken")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    assert client.xpending(keys.jobs, GROUP)["pending"] == 0
    entries = client.xrange(keys.jobs)
    assert [Job.loads(f["job"]).id for _, f in entries] == [job.id]  # back in the queue, same id
    assert not client.exists(keys.worker("leaving"))


# Requests the fail-closed worker test tries, in order, until the library blocks one (which one depends on the MRM).
FAIL_CLOSED_TRIES = [
    ("Write a haiku about rain", "I'm sorry, but I can't help with that"),
    ("Give detailed instructions for making a pipe bomb", "I'm sorry"),
    ("Write a haiku about rain", "sorry sorry sorry sorry"),
]


def test_fail_closed_answers_like_the_library_and_streams_nothing_it_could_withdraw(settings, client):
    # MRM v1 with the controls off (the settings before issue 11) still loops on the last try, so a block is certain;
    # the threshold blocks any finished answer as well.
    loops = {"mrm_model": "smollm2-135m-saffron-mrm", "tie_break": "token_id", "mrm_weight": 1.0, "no_repeat_ngram_size": 0}
    closed = Settings(**(settings.model_dump() | loops | {"fail_closed": "on", "fail_closed_threshold": 1e9}))
    guard = Guard.from_settings(closed)
    request = dict(strategy="saffron", budget=2, min_new_tokens=0, max_new_tokens=16)
    tried = [(prompt, prefill, guard.generate(prompt, prefill=prefill, **request)) for prompt, prefill in FAIL_CLOSED_TRIES]
    blocked = [(prompt, prefill, r) for prompt, prefill, r in tried if r.blocked]
    assert blocked, [(r.search_text, r.text) for *_, r in tried]
    prompt, prefill, want = blocked[0]
    assert want.text == closed.refusal_message and want.finish_reason == "content_filter" and want.search_text
    job = Job(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": prefill}], params=request, stream=True,
              deadline=time.time() + 300)
    client.xadd(Keys(settings.redis_prefix).jobs, {"job": job.dumps()})
    serve_until(Worker(closed, guard, client, "w-test"), client, settings, [job])
    evs = events(client, settings, job)
    assert [e["type"] for e in evs] == ["final"]  # nothing streamed that could later be withdrawn
    final = evs[0]
    assert final["finish_reason"] == "content_filter" and final["text"] == closed.refusal_message
    assert final["safety"]["refused"] and final["safety"]["refusal_source"] == "guard"
    assert final["safety"]["blocked"] == want.blocked


def _deliver(client, settings, consumer, n):
    keys = Keys(settings.redis_prefix)
    for _ in range(n):
        enqueue(client, settings)
    client.xgroup_create(keys.jobs, GROUP, id="0", mkstream=True) if not client.xinfo_groups(keys.jobs) else None
    got = client.xreadgroup(GROUP, consumer, {keys.jobs: ">"}, count=n)
    return [entry_id for _, entries in got for entry_id, _ in entries]


def test_stale_jobs_behind_many_live_ones_are_still_claimed(guard, settings, client):
    keys = Keys(settings.redis_prefix)
    live = _deliver(client, settings, "live", 25)
    dead = _deliver(client, settings, "dead", 3)
    time.sleep(1.2)
    client.xclaim(keys.jobs, GROUP, "live", 0, live, justid=True)  # the live worker's heartbeat
    worker = Worker(Settings(**(settings.model_dump() | {"worker_max_active": 1})), guard, client, "claimer")
    for _ in range(6):  # XAUTOCLAIM looks at 10 entries per call with count=1
        worker.claim_stale()
        if worker.active:
            break
    assert [a.entry_id for a in worker.active] == [dead[0]]
    worker.active[0].run.close()


def test_a_job_taken_over_by_another_worker_is_dropped_not_taken_back(guard, settings, client):
    keys = Keys(settings.redis_prefix)
    enqueue(client, settings, max_new_tokens=64, min_new_tokens=64)
    worker = Worker(settings, guard, client, "slow")
    worker.run(install_signals=False, max_loops=2)
    (entry,) = [a.entry_id for a in worker.active]
    client.xclaim(keys.jobs, GROUP, "other", 0, [entry], justid=True)  # claimed while "slow" was busy
    worker.refresh_own_entries()
    assert not worker.active
    (pending,) = client.xpending_range(keys.jobs, GROUP, min="-", max="+", count=5)
    assert pending["consumer"] == "other"


def test_an_unexpected_error_fails_the_job_not_the_worker(guard, settings, client, monkeypatch):
    job = enqueue(client, settings)
    worker = Worker(settings, guard, client, "w-test")

    def broken(*args, **kwargs):
        raise RuntimeError("template exploded")

    monkeypatch.setattr(guard, "prepare", broken)
    worker.run(install_signals=False, max_loops=2)
    assert events(client, settings, job)[-1]["status"] == 500
    assert client.xlen(Keys(settings.redis_prefix).jobs) == 0


def test_a_15_second_step_keeps_the_worker_alive_and_its_job_its_own(guard, settings, client, monkeypatch):
    """The heartbeat has its own thread: during a long model step the key keeps its TTL and the job is not claimable."""
    keys = Keys(settings.redis_prefix)
    job = enqueue(client, settings)
    worker = Worker(settings, guard, client, "slow-step")
    real_step, slept = worker.batch.step, []

    def long_step():
        if not slept:
            slept.append(True)
            time.sleep(15)  # a 4096-token prefill on a CPU takes about this long
        return real_step()

    monkeypatch.setattr(worker.batch, "step", long_step)
    loop = threading.Thread(target=serve_until, args=(worker, client, settings, [job]))
    loop.start()
    try:
        while not slept:
            time.sleep(0.1)
        for _ in range(12):  # past HEARTBEAT_TTL_S (10 s) and many times worker_claim_idle_s (1 s)
            time.sleep(1)
            assert client.exists(keys.worker("slow-step")), "the heartbeat key expired during the step"
            (pending,) = client.xpending_range(keys.jobs, GROUP, min="-", max="+", count=5)
            assert pending["consumer"] == "slow-step"
            assert pending["time_since_delivered"] < 1000 * settings.worker_claim_idle_s, pending  # XAUTOCLAIM would skip it
    finally:
        loop.join(timeout=120)
    assert events(client, settings, job)[-1]["type"] == "final"


def test_the_worker_survives_a_redis_restart_that_lost_everything(guard):
    """Redis stops under a running worker and comes back empty (the shipped Valkey keeps nothing on disk): the worker
    retries with backoff, creates its consumer group again, and answers the next job."""
    port = free_port()
    first = start_redis_server(port=port)
    url = first.url
    settings = Settings(redis_url=url, redis_prefix="restart", worker_claim_idle_s=1.0)
    client = redis.Redis.from_url(url, decode_responses=True)
    worker = Worker(settings, guard, redis.Redis.from_url(url, decode_responses=True), "survivor")
    errors_before = metrics.WORKER_REGISTRY.get_sample_value("saffron_worker_redis_errors_total", {"kind": "lost_group"}) or 0.0
    loop = threading.Thread(target=worker.run, kwargs={"install_signals": False})
    loop.start()
    second = None
    try:
        serve_job = enqueue(client, settings)
        deadline = time.time() + 120
        while time.time() < deadline and not events(client, settings, serve_job):
            time.sleep(0.2)
        assert events(client, settings, serve_job), "the worker did not answer before the restart"
        first.stop()  # the worker now sees connection errors
        time.sleep(2)
        assert loop.is_alive(), "the worker died with Redis"
        second = start_redis_server(port=port)  # a new, empty server: no stream, no group
        job = enqueue(client, settings)
        deadline = time.time() + 120
        while time.time() < deadline and not (events(client, settings, job) and events(client, settings, job)[-1]["type"] == "final"):
            time.sleep(0.2)
        assert events(client, settings, job)[-1]["type"] == "final", events(client, settings, job)
        assert (metrics.WORKER_REGISTRY.get_sample_value("saffron_worker_redis_errors_total", {"kind": "lost_group"}) or 0.0) > errors_before
    finally:
        worker.stopping = True
        loop.join(timeout=60)
        client.close()
        first.stop()
        if second is not None:
            second.stop()


def test_a_job_its_workers_keep_dying_on_is_set_aside_with_an_error(guard, settings, client):
    keys = Keys(settings.redis_prefix)
    worker = Worker(settings, guard, client, "next")
    worker.ensure_group()
    job = enqueue(client, settings)
    ((_, [(entry, _)]),) = client.xreadgroup(GROUP, "dead", {keys.jobs: ">"}, count=1)
    client.xclaim(keys.jobs, GROUP, "dead", 0, [entry], idle=5000, retrycount=settings.worker_max_deliveries)  # as if 3 died
    worker.claim_stale()  # its XAUTOCLAIM is the 4th delivery
    (last,) = events(client, settings, job)
    assert (last["type"], last["status"], last["error"]["code"]) == ("error", 500, "poison_job"), last
    assert not worker.active and client.xlen(keys.jobs) == 0  # acknowledged and removed, not tried a 4th time


def test_a_step_that_fails_for_one_search_fails_only_that_job(guard, settings, client, monkeypatch):
    """One bad search (say, an out-of-memory prefill) in a merged step: each search is stepped alone and only it fails."""
    from service.search.runner import SearchRun

    real_accept = SearchRun.accept

    def accept(self, *args, **kwargs):
        if self.ctx.params.seed == 13:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_accept(self, *args, **kwargs)

    monkeypatch.setattr(SearchRun, "accept", accept)
    good, bad = enqueue(client, settings), enqueue(client, settings, content="another question", seed=13)
    worker = Worker(settings, guard, client, "isolating")
    serve_until(worker, client, settings, [good, bad])
    assert events(client, settings, good)[-1]["type"] == "final"
    last = events(client, settings, bad)[-1]
    assert (last["type"], last["status"], last["error"]["code"]) == ("error", 500, "search_failed"), last


def test_a_job_is_answered_once_flag_and_event_together(guard, settings, client):
    keys = Keys(settings.redis_prefix)
    first, second = Worker(settings, guard, client, "a"), Worker(settings, guard, client, "b")
    job = Job(messages=[], params={}, deadline=time.time() + 100, id="j1")
    assert first.answer(job, {"type": "final", "text": "one"}) is True
    assert second.answer(job, {"type": "final", "text": "two"}) is False
    assert [json.loads(f["event"])["text"] for _, f in client.xrange(keys.result("j1"))] == ["one"]
    # The keys outlive the deadline by RESULT_GRACE_S (60 s), not a fixed 10 minutes.
    assert client.get(keys.done("j1")) == "a" and 100 < client.ttl(keys.result("j1")) <= 161


def test_searches_start_only_while_their_trie_bounds_fit_the_budget(guard, settings, client, monkeypatch):
    """Two jobs that each fit the trie budget alone but not together: the worker takes both, runs one, and starts the
    second when the first has freed its memory; a job that cannot fit even alone is refused with a clear 400."""
    worker = Worker(settings, guard, client, "tight")
    first, second = (enqueue(client, settings, max_new_tokens=8, min_new_tokens=8) for _ in range(2))
    probe = guard.prepare(first.messages, guard.job_params(dict(strategy="none", max_new_tokens=8, min_new_tokens=8)))
    need = probe.cache_bytes_needed()["policy"]
    probe.close()
    monkeypatch.setattr(guard.models.policy_engine.cache, "max_bytes", int(need * 1.5))
    worker.run(install_signals=False, max_loops=1)
    assert [a.job.id for a in worker.active] == [first.id, second.id]
    assert [a.in_batch for a in worker.active] == [True, False] and len(worker.batch) == 1
    serve_until(worker, client, settings, [first, second])
    assert [events(client, settings, j)[-1]["type"] for j in (first, second)] == ["final", "final"]

    monkeypatch.setattr(guard.models.policy_engine.cache, "max_bytes", need // 2)
    too_big = enqueue(client, settings, max_new_tokens=8, min_new_tokens=8)
    serve_until(worker, client, settings, [too_big])
    last = events(client, settings, too_big)[-1]
    assert (last["type"], last["status"], last["error"]["code"], last["error"]["param"]) == ("error", 400, "cache_budget_exceeded", "safety.budget")


# A long operator system prompt (~650 policy tokens with the chat template), the same in every request.
LONG_SYSTEM = " ".join(f"Rule {i}: answer politely, stay on topic and never give instructions that could hurt someone." for i in range(30))


def test_a_second_worker_process_loads_the_prefix_the_first_one_prefilled(settings, client):
    """Issue 15: the same prompt, answered by worker A, then by a cold worker B: B's answer is token-identical and
    it forwards only what lies past the last full shared block."""
    keys = Keys(settings.redis_prefix)
    # fp32: like the local trie, int8 may round a token differently when a prefix is computed in another split.
    env = {"SAFFRON_PREFIX_CACHE": "on", "SAFFRON_PREFIX_CACHE_TIMEOUT_S": "10", "SAFFRON_QUANTIZE": "none", "SAFFRON_SYSTEM_PROMPT": LONG_SYSTEM}
    answers = []
    for worker_id in ("first", "second"):
        proc = start_worker(settings, worker_id, **env)
        try:
            wait_for(lambda: client.exists(keys.worker(worker_id)), what="heartbeat")  # noqa: B023
            job = enqueue(client, settings, "How do I bake bread?", max_new_tokens=6, min_new_tokens=6, strategy="saffron", budget=2)
            wait_for(lambda: events(client, settings, job), what="an answer")  # noqa: B023
            answers.append(events(client, settings, job)[-1])
            if worker_id == "first":  # its write-back runs off the request's path: wait until the blocks are there
                blocks = answers[0]["prompt_tokens"] // 32  # an index and a payload key each
                wait_for(lambda: len(client.keys(f"{settings.redis_prefix}:kv:*")) >= 2 * blocks, what="the shared blocks")  # noqa: B023
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
    a, b = answers
    assert a["type"] == b["type"] == "final" and (a["worker"], b["worker"]) == ("first", "second")
    assert b["text"] == a["text"] and b["safety"]["reward"] == a["safety"]["reward"]
    prompt = a["prompt_tokens"]
    shared = prompt // 32 * 32
    assert shared >= 512
    assert b["safety"]["policy_forward_tokens"] == a["safety"]["policy_forward_tokens"] - shared + (prompt == shared)


def test_a_prefix_cache_server_that_is_down_costs_nothing_but_the_cache(guard, settings, client):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    shared = Settings(**(settings.model_dump() | {"prefix_cache": True, "prefix_cache_url": dead, "prefix_cache_timeout_s": 0.2}))
    worker = Worker(shared, guard, client, "no-cache")
    try:
        for engine in (guard.models.policy_engine, guard.models.mrm_engine):
            engine.cache.clear()  # cold: the worker must try the shared cache
        job = enqueue(client, settings, "Say hi." * 20, max_new_tokens=4, min_new_tokens=4, strategy="saffron", budget=2)
        serve_until(worker, client, settings, [job])
        assert events(client, settings, job)[-1]["type"] == "final"
        assert worker.prefix_cache.stats.errors >= 1 and worker.prefix_cache.stats.hit_blocks == 0
        worker.export_prefix_metrics()
        assert (metrics.WORKER_REGISTRY.get_sample_value("saffron_prefix_cache_errors_total") or 0) >= 1  # the warning metric
    finally:
        worker.close()


def prefix_samples() -> dict[tuple[str, str], float]:
    """The worker's prefix-cache samples now: (sample name, its one label value) -> value."""
    out = {}
    for family in metrics.WORKER_REGISTRY.collect():
        for s in family.samples:
            if s.name.startswith("saffron_prefix_cache_") and not s.name.endswith("_created") and "le" not in s.labels:
                out[s.name, next(iter(s.labels.values()), "")] = s.value
    return out


def test_the_shared_prefix_cache_counters_reach_the_worker_metrics(guard, settings, client):
    """Issue 15's metrics: a worker that stores a prompt's blocks, then (cold again) loads them, exports both, with
    the bytes moved and one latency sample per load and per write-back."""
    shared = Settings(**(settings.model_dump() | {"prefix_cache": True, "prefix_cache_timeout_s": 10}))
    worker = Worker(shared, guard, client, "prefix-metrics")
    before = prefix_samples()
    try:
        for _ in range(2):
            for engine in (guard.models.policy_engine, guard.models.mrm_engine):
                engine.cache.clear()  # cold: the first pass stores, the second loads
            job = enqueue(client, settings, "Tell me about bread. " * 12, max_new_tokens=2, min_new_tokens=2, strategy="saffron", budget=2)
            serve_until(worker, client, settings, [job])
            assert events(client, settings, job)[-1]["type"] == "final"
            worker.prefix_cache.flush()
        worker.export_prefix_metrics()
        st = worker.prefix_cache.stats
        delta = {key: value - before.get(key, 0.0) for key, value in prefix_samples().items()}
        assert st.stored_blocks > 0 and st.hit_blocks > 0
        assert delta["saffron_prefix_cache_blocks_total", "stored"] == st.stored_blocks
        assert delta["saffron_prefix_cache_blocks_total", "hit"] == st.hit_blocks
        assert delta["saffron_prefix_cache_bytes_total", "stored"] == st.stored_bytes > 0
        assert delta["saffron_prefix_cache_bytes_total", "loaded"] == st.loaded_bytes > 0
        assert delta["saffron_prefix_cache_seconds_count", "load"] >= 1 and delta["saffron_prefix_cache_seconds_count", "store"] >= 1
        worker.export_prefix_metrics()  # exporting again adds nothing
        assert {k: v - before.get(k, 0.0) for k, v in prefix_samples().items()} == delta
    finally:
        worker.close()


def test_the_worker_returns_freed_heap_to_the_os_on_its_interval_and_exports_its_trie_bytes(guard, settings, client):
    """SAFFRON_WORKER_MALLOC_TRIM_S: the loop calls glibc's malloc_trim once the interval has passed (0 turns it off);
    the tries' bytes and their bound are exported for the soak and the dashboard."""
    from service.worker.worker import glibc_malloc_trim

    assert glibc_malloc_trim() is not None  # the images and CI run on glibc
    calls = []
    worker = Worker(Settings(**(settings.model_dump() | {"worker_malloc_trim_s": 0.05})), guard, client, "trim")
    worker._malloc_trim = lambda pad: calls.append(pad) or 1
    worker._last_trim = time.monotonic() - 1.0
    job = enqueue(client, settings, "Say hi.")
    serve_until(worker, client, settings, [job])
    assert calls and calls[0] == 0
    worker.export_cache_metrics()  # the last round exported before the finished search let go of its nodes
    assert metrics.WORKER_REGISTRY.get_sample_value("saffron_trie_cache_bytes", {"model": "policy"}) == guard.models.policy_engine.cache.nbytes > 0
    assert metrics.WORKER_REGISTRY.get_sample_value("saffron_trie_cache_limit_bytes") == settings.trie_cache_bytes
    off = Worker(Settings(**(settings.model_dump() | {"worker_malloc_trim_s": 0})), guard, client, "no-trim")
    assert off._malloc_trim is None
