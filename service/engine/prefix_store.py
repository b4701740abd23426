"""Prefix KV shared across workers in Redis: a cold worker loads the prompt prefix another worker prefilled.

Layout (the shape of vLLM's prefix caching: full blocks only, a hash chain, extra keys in the hash):

- The tokens of a model input are cut into blocks of ``block_tokens``; only full blocks are shared. Block
  ``i``'s hash is ``sha256(fingerprint || hash[i-1] || tokens[i])`` (32 zero bytes before block 0, tokens as
  int32 little-endian), so a block names its whole prefix, and the fingerprint — the sha256 of the engine's
  weights (its adapter's too), dtype and ``LAYOUT_VERSION`` — keeps models and quantizations apart.
  Python's salted ``hash()`` never enters a key.
- Each block is two keys with the same TTL: ``{p}:kv:{hash}:data`` (a header, then the raw KV bytes
  ``[L, 2, H, block_tokens, D]``), written first, and ``{p}:kv:{hash}`` (the index: the payload's length),
  written after it. A reader looks up index keys only, so it never takes a block whose payload is still
  being written; a payload that is missing, truncated, corrupt (crc32), of another model or of another
  shape is ignored and counted, and the chain stops there: a bad entry costs time, never correctness.
- KV only: logits are recomputed from the last position (one token) by the first search call.

Reads are on the request's path (one pipelined EXISTS, then one MGET of the chain), skipped when the
estimate says recomputing is faster (measured Redis bandwidth vs the engine's measured prefill speed)
or while Redis is failing (a short back-off; the request computes locally). Writes are off the
request's path, on a thread with its own connection. Redis memory: every key has
``prefix_cache_ttl_s``; point ``SAFFRON_PREFIX_CACHE_URL`` at a server of its own with ``maxmemory`` and
``allkeys-lru`` so the least recently used blocks go first (README, "Prefix cache across workers").
"""

from __future__ import annotations

import hashlib
import logging
import queue
import struct
import threading
import time
import zlib
from array import array
from dataclasses import dataclass, field

import redis
import torch

from service.engine.cached_lm import CachedLM, model_geometry
from service.engine.trie_cache import TreeNode

logger = logging.getLogger(__name__)

LAYOUT_VERSION = 1  # kv[L, 2, H, n, D] in the model's dtype; device-independent
FORMAT_VERSION = 1
MAGIC = b"SGKV"
# magic, format version, dtype code, ndim, fingerprint, block hash, payload bytes, crc32 of the payload
_HEADER = struct.Struct("<4sHBB32s32sQI")
_DTYPES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4}
_DTYPE_OF = {code: dtype for dtype, code in _DTYPES.items()}
FAILURE_BACKOFF_S = 5.0  # after a Redis error, reads and writes are skipped this long
WRITE_QUEUE = 64  # pending write-backs; past it new ones are dropped (and counted), never waited for
KNOWN_MAX = 100_000  # block hashes remembered as stored; past it the expired ones are forgotten


def weights_fingerprint(engine: CachedLM) -> bytes:
    """sha256 over the engine's weights (every state-dict tensor; its row adapter's LoRA factors), dtype and layout."""
    digest = hashlib.sha256(f"saffron-kv layout={LAYOUT_VERSION} dtype={next(engine.model.parameters()).dtype}".encode())

    def feed(name: str, value) -> None:
        if isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                feed(f"{name}.{i}", v)
        elif isinstance(value, torch.Tensor):
            t = value.detach()
            if t.is_quantized:  # int8 dynamic quantization: the integers and their scales
                feed(name + ".q", t.int_repr())
                feed(name + ".scale", t.q_per_channel_scales() if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric) else torch.tensor([t.q_scale()]))
                return
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.cpu().contiguous().view(torch.uint8).numpy().data)
        elif value is not None:
            digest.update(f"{name}={value!r}".encode())

    for name, value in engine.model.state_dict().items():
        feed(name, value)
    if engine.adapter is not None and engine.adapters is not None:
        adapter = engine.adapters.adapters[engine.adapter]
        for path in sorted(adapter.lora):
            feed(f"adapter.{path}", adapter.lora[path])
        feed("adapter.head_bias", adapter.head_bias)
    return digest.digest()


def block_hashes(fingerprint: bytes, tokens: list[int], block_tokens: int) -> list[bytes]:
    """The hash chain of the full blocks of ``tokens``."""
    out, parent = [], b"\0" * 32
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        parent = hashlib.sha256(fingerprint + parent + array("i", tokens[start : start + block_tokens]).tobytes()).digest()
        out.append(parent)
    return out


def encode_block(fingerprint: bytes, block_hash: bytes, kv: torch.Tensor) -> bytes:
    """Header + raw bytes of one block's KV ``[L, 2, H, block_tokens, D]`` (no pickle)."""
    raw = kv.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, _DTYPES[kv.dtype], kv.dim(), fingerprint, block_hash, len(raw), zlib.crc32(raw))
    return header + struct.pack(f"<{kv.dim()}I", *kv.shape) + raw


class BadBlock(ValueError):
    """A stored block that must not be used; ``reason`` labels the metric."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_block(data: bytes | None, fingerprint: bytes, block_hash: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The block's KV, or BadBlock: missing, truncated, corrupt, foreign (another model or key) or misshapen."""
    if data is None:
        raise BadBlock("missing")
    if len(data) < _HEADER.size:
        raise BadBlock("truncated")
    magic, version, dtype_code, ndim, fp, stored_hash, nbytes, crc = _HEADER.unpack_from(data)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise BadBlock("format")
    if fp != fingerprint or stored_hash != block_hash:
        raise BadBlock("foreign")
    start = _HEADER.size + 4 * ndim
    if len(data) != start + nbytes:
        raise BadBlock("truncated")
    dims = struct.unpack_from(f"<{ndim}I", data, _HEADER.size)
    if dims != tuple(shape) or _DTYPE_OF.get(dtype_code) != dtype:
        raise BadBlock("shape")
    raw = memoryview(data)[start:]
    if zlib.crc32(raw) != crc:
        raise BadBlock("corrupt")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


@dataclass
class PrefixCacheStats:
    """Monotonic counters of one worker's shared prefix cache (the worker exports them as metrics)."""

    hit_blocks: int = 0  # blocks loaded from Redis into the local trie
    miss_blocks: int = 0  # full blocks neither local nor in Redis
    loaded_bytes: int = 0
    stored_blocks: int = 0
    stored_bytes: int = 0
    skipped_loads: int = 0  # loads not tried: recomputing was estimated faster, or Redis was failing
    dropped_stores: int = 0  # write-backs dropped: the queue was full, or Redis was failing
    errors: int = 0  # Redis errors and timeouts (each falls back to local computation)
    bad_blocks: dict[str, int] = field(default_factory=dict)  # reason -> blocks ignored
    load_seconds: list[float] = field(default_factory=list)  # per load, drained by the metrics exporter
    store_seconds: list[float] = field(default_factory=list)


class SharedPrefixCache:
    """One worker's view of the prefix blocks in Redis, for its cached engines (policy, MRM)."""

    def __init__(self, url: str, prefix: str, *, block_tokens: int = 32, ttl_s: int = 3600, timeout_s: float = 0.5):
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        self.redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.writer_redis = redis.Redis.from_url(url, socket_timeout=max(timeout_s, 5.0), socket_connect_timeout=timeout_s)
        self.prefix, self.block_tokens, self.ttl_s = prefix, block_tokens, ttl_s
        self.stats = PrefixCacheStats()
        self.bytes_per_s = 200e6  # Redis read bandwidth estimate, refined by every load (200 MB/s to start)
        self.round_trip_s = 1e-3
        self._fingerprints: dict[int, bytes] = {}
        self._failing_until = 0.0
        self._known: dict[bytes, float] = {}  # block hash -> until when we trust it is stored (skip re-writing it)
        self._writes: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE)
        self._writer = threading.Thread(target=self._write_loop, name="prefix-cache-writer", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------------ keys
    def index_key(self, block_hash: bytes) -> str:
        return f"{self.prefix}:kv:{block_hash.hex()}"

    def data_key(self, block_hash: bytes) -> str:
        return f"{self.prefix}:kv:{block_hash.hex()}:data"

    def fingerprint(self, engine: CachedLM) -> bytes:
        if id(engine) not in self._fingerprints:
            t0 = time.perf_counter()
            self._fingerprints[id(engine)] = weights_fingerprint(engine)
            logger.info("prefix cache: %s fingerprint %s (%.2fs)", engine.name, self._fingerprints[id(engine)].hex()[:16], time.perf_counter() - t0)
        return self._fingerprints[id(engine)]

    def block_shape(self, engine: CachedLM) -> tuple[int, ...]:
        n_layers, n_heads, head_dim = model_geometry(engine.model)
        return (n_layers, 2, n_heads, self.block_tokens, head_dim)

    # ------------------------------------------------------------------ reads (the request's path)
    def load(self, engine: CachedLM, seq: list[int]) -> TreeNode | None:
        """Load the longest chain of ``seq``'s full blocks that Redis has beyond what the local trie holds.

        Returns the new trie node, pinned (the caller unpins it once the search's first call has pinned its
        own), or None when nothing was loaded. Never raises for Redis trouble: it counts it and returns None.
        """
        full = len(seq) // self.block_tokens * self.block_tokens
        node, cached = engine.cache.match_prefix(seq[:full])
        first = cached // self.block_tokens  # blocks before it are all local
        if full == 0 or cached >= full:
            return None
        now = time.monotonic()
        want_tokens = full - cached
        block_bytes = engine.kv_bytes_per_token * self.block_tokens
        if now < self._failing_until or not self._worth_loading(engine, want_tokens, (full // self.block_tokens - first) * block_bytes):
            self.stats.skipped_loads += 1
            return None
        fp = self.fingerprint(engine)
        hashes = block_hashes(fp, seq[:full], self.block_tokens)[first:]
        t0 = time.perf_counter()
        try:
            pipe = self.redis.pipeline(transaction=False)
            for h in hashes:
                pipe.exists(self.index_key(h))
            present = pipe.execute()
            chain = hashes[: next((i for i, p in enumerate(present) if not p), len(hashes))]
            self.stats.miss_blocks += len(hashes) - len(chain)
            if not chain:
                return None
            payloads = self.redis.mget([self.data_key(h) for h in chain])
        except redis.RedisError as e:
            self._failed("load", e)
            return None
        blocks, shape, dtype = [], self.block_shape(engine), next(engine.model.parameters()).dtype
        for h, data in zip(chain, payloads):
            try:
                blocks.append(decode_block(data, fp, h, shape, dtype))
            except BadBlock as bad:
                self.stats.bad_blocks[bad.reason] = self.stats.bad_blocks.get(bad.reason, 0) + 1
                logger.warning("prefix cache: block %s of %s ignored (%s)", h.hex()[:16], engine.name, bad.reason)
                break
        if not blocks:
            return None
        elapsed = time.perf_counter() - t0
        nbytes = sum(len(p) for p in payloads[: len(blocks)])
        self.stats.hit_blocks += len(blocks)
        self.stats.loaded_bytes += nbytes
        self.stats.load_seconds.append(elapsed)
        self.bytes_per_s = 0.7 * self.bytes_per_s + 0.3 * nbytes / max(elapsed, 1e-6)
        end = (first + len(blocks)) * self.block_tokens
        device = next(engine.model.parameters()).device
        kv = torch.cat(blocks, dim=-2)[..., cached - first * self.block_tokens :, :].to(device).contiguous()
        loaded = engine.cache.insert(node, tuple(seq[cached:end]), kv, None)
        engine.cache.inc_lock_ref(loaded)
        for h in chain[: len(blocks)]:
            self._known[h] = time.monotonic() + self.ttl_s / 2
        logger.info("prefix cache: %s loaded %d tokens (%d blocks, %.1f MB) in %.3fs", engine.name, end - cached, len(blocks), nbytes / 1e6, elapsed)
        return loaded

    def _worth_loading(self, engine: CachedLM, tokens: int, nbytes: int) -> bool:
        """Loading is estimated faster than forwarding those tokens (no estimate of the prefill speed yet: try)."""
        rate = engine.prefill_tokens_per_s
        return rate is None or self.round_trip_s * 2 + nbytes / self.bytes_per_s < tokens / rate

    # ------------------------------------------------------------------ writes (off the request's path)
    def store(self, engine: CachedLM, seq: list[int]) -> None:
        """Queue the full blocks of ``seq`` that the local trie holds for writing to Redis (on the writer thread)."""
        full = len(seq) // self.block_tokens * self.block_tokens
        if full == 0 or time.monotonic() < self._failing_until:
            return
        fp = self.fingerprint(engine)
        hashes = block_hashes(fp, seq[:full], self.block_tokens)
        now = time.monotonic()
        if len(self._known) > KNOWN_MAX:
            self._known = {h: t for h, t in self._known.items() if t > now}
        todo = [i for i, h in enumerate(hashes) if self._known.get(h, 0.0) < now]
        if not todo:
            return
        node, n = engine.cache.match_prefix(seq[:full])
        if n < full:
            return  # evicted meanwhile: nothing to share
        # References to the nodes' KV (a split clones, never writes in place): the thread slices them.
        segments = [(seg.value, seg.start, seg.end) for seg in engine.cache.path(node)]
        try:
            self._writes.put_nowait((fp, hashes, todo, segments))
        except queue.Full:
            self.stats.dropped_stores += 1

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until the queued write-backs are done (benchmarks and tests)."""
        deadline = time.monotonic() + timeout_s
        while self._writes.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def _write_loop(self) -> None:
        while True:
            task = self._writes.get()
            try:
                if task is None:
                    return
                self._write(*task)
            except redis.RedisError as e:
                self._failed("store", e)
            except Exception:
                logger.exception("prefix cache: a write-back failed")
            finally:
                self._writes.task_done()

    def _write(self, fp: bytes, hashes: list[bytes], todo: list[int], segments: list[tuple[torch.Tensor, int, int]]) -> None:
        t0 = time.perf_counter()
        pipe = self.writer_redis.pipeline(transaction=False)
        for i in todo:
            pipe.exists(self.index_key(hashes[i]))
        missing = [i for i, there in zip(todo, pipe.execute()) if not there]
        now = time.monotonic()
        for i in set(todo) - set(missing):
            self._known[hashes[i]] = now + self.ttl_s / 2
        if not missing:
            return
        kv = torch.cat([value for value, _, _ in segments], dim=-2)
        written = 0
        for i in missing:
            block = kv[..., i * self.block_tokens : (i + 1) * self.block_tokens, :]
            payload = encode_block(fp, hashes[i], block)
            pipe = self.writer_redis.pipeline(transaction=False)
            pipe.set(self.data_key(hashes[i]), payload, ex=self.ttl_s)  # the payload first…
            pipe.set(self.index_key(hashes[i]), len(payload), ex=self.ttl_s)  # …then the index that points to it
            pipe.execute()
            written += len(payload)
            self._known[hashes[i]] = time.monotonic() + self.ttl_s / 2
        self.stats.stored_blocks += len(missing)
        self.stats.stored_bytes += written
        self.stats.store_seconds.append(time.perf_counter() - t0)

    def _failed(self, what: str, error: Exception) -> None:
        self.stats.errors += 1
        self._failing_until = time.monotonic() + FAILURE_BACKOFF_S
        logger.warning("prefix cache: Redis %s failed (%s); computing locally for %.0fs", what, error, FAILURE_BACKOFF_S)

    def close(self) -> None:
        try:
            self._writes.put(None, timeout=10)
        except queue.Full:
            logger.warning("prefix cache: write-backs still queued at close are dropped")
        self._writer.join(timeout=10)
        self.redis.close()
        self.writer_redis.close()
