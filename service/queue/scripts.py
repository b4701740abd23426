"""The Lua scripts that make each multi-key queue step atomic, on the Redis server's clock (``TIME``).

Shared by the gateway (redis.asyncio) and the worker (redis); each side registers them with
``register_script``. Key and argument order is given above each script.
"""

from __future__ import annotations

from service.queue.keys import GROUP, Keys

# KEYS: jobs, entry:{id} per job   ARGV: max_queue, timeout_s, ttl_s, job JSON per job
# The queue bound and the enqueue in one step, so concurrent requests cannot overshoot max_queue; the jobs of one
# request (its n choices) go in together or not at all. Each entry carries the deadline on the server's clock (field
# ``deadline``): workers on other machines compare against the server's time, never the gateway's.
# Returns {1, depth, deadline} or {0, depth}.
ADMIT_LUA = """
local depth = redis.call('XLEN', KEYS[1])
local n = #ARGV - 3
if depth + n > tonumber(ARGV[1]) then return {0, depth} end
local t = redis.call('TIME')
local deadline = string.format('%.3f', tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[2]))
for i = 1, n do
  local id = redis.call('XADD', KEYS[1], '*', 'job', ARGV[3 + i], 'deadline', deadline)
  redis.call('SET', KEYS[1 + i], id, 'EX', ARGV[3])
end
return {1, depth, deadline}
"""

# KEYS: jobs, entry:{id}, done:{id}   ARGV: old entry id or '', job JSON, deadline, ttl_s, group
# Queue a job again unless it is answered or already queued under a live entry, and drop its old entry
# (ack + delete) in the same step. Used by a worker handing a job back at shutdown, by a worker whose
# server lost its data, and by a gateway that finds its waiting job gone from the server: whichever comes
# first queues it, the others see the live entry — a job is never queued twice. Returns 1 if it queued it.
REQUEUE_LUA = """
local function drop_old()
  if ARGV[1] ~= '' then
    redis.pcall('XACK', KEYS[1], ARGV[5], ARGV[1])
    redis.call('XDEL', KEYS[1], ARGV[1])
  end
end
if redis.call('EXISTS', KEYS[3]) == 1 then drop_old() return 0 end
local cur = redis.call('GET', KEYS[2])
if cur and cur ~= ARGV[1] and #redis.call('XRANGE', KEYS[1], cur, cur) > 0 then drop_old() return 0 end
local id = redis.call('XADD', KEYS[1], '*', 'job', ARGV[2], 'deadline', ARGV[3])
redis.call('SET', KEYS[2], id, 'EX', ARGV[4])
drop_old()
return 1
"""


def requeue_call(keys: Keys, job_id: str, job_json: str, *, deadline: str, ttl_s: int, old_entry_id: str = "") -> dict:
    """REQUEUE_LUA's keys and arguments in their order, for ``await script(**requeue_call(...))``."""
    return {"keys": [keys.jobs, keys.entry(job_id), keys.done(job_id)], "args": [old_entry_id, job_json, deadline, ttl_s, GROUP]}

# KEYS: workers, worker:{id}   ARGV: worker id, status JSON, ttl_s
# A heartbeat: the worker's expiry in the live set (scored on the server's clock) and its status key.
# Returns the server's time, from which the worker keeps its clock offset.
BEAT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return string.format('%.6f', now)
"""

# KEYS: workers   ARGV: (none)
# The number of live workers: members whose expiry is still ahead of the server's time (the rest are removed).
ALIVE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""

# KEYS: done:{id}, result:{id}   ARGV: worker id, ttl_s, event JSON
# Claim the answer (SET NX on done) and publish it in one step; 1 if this call published it.
ANSWER_LUA = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 0 end
redis.call('XADD', KEYS[2], '*', 'event', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""
