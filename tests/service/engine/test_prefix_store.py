"""The shared prefix cache on a tiny random Llama and a real Redis server: what is loaded equals what was computed,
and every bad entry (corrupt, foreign, truncated, half-written) or a Redis outage costs time, never correctness."""

from __future__ import annotations

import uuid

import pytest
import redis
import torch

from service.engine.cached_lm import CachedLM
from service.engine.prefix_store import (
    BadBlock,
    SharedPrefixCache,
    block_hashes,
    decode_block,
    encode_block,
    weights_fingerprint,
)
from service.engine.trie_cache import TrieCache
from service.redis_server import free_port

BLOCK = 8
SEQ = [3 + (i * 5) % 90 for i in range(45)]  # 5 full blocks of 8, then 5 tokens


@pytest.fixture
def cache(redis_url):
    c = SharedPrefixCache(redis_url, f"pc{uuid.uuid4().hex[:8]}", block_tokens=BLOCK, ttl_s=60)
    yield c
    c.close()


def engine(model) -> CachedLM:
    return CachedLM(model, TrieCache(1 << 30), "policy")


def stored(cache: SharedPrefixCache, model) -> CachedLM:
    """A first worker: computes SEQ and shares its blocks."""
    first = engine(model)
    first.last_logits([SEQ])
    cache.store(first, SEQ)
    cache.flush()
    return first


def test_block_hashes_chain_full_blocks_and_the_fingerprint():
    a = block_hashes(b"A" * 32, SEQ, BLOCK)
    assert len(a) == 5 and len(set(a)) == 5
    assert block_hashes(b"A" * 32, SEQ, BLOCK) == a  # stable: sha256, not Python's salted hash()
    assert set(block_hashes(b"B" * 32, SEQ, BLOCK)).isdisjoint(a)  # another model shares nothing
    changed = block_hashes(b"A" * 32, [SEQ[0] + 1, *SEQ[1:]], BLOCK)
    assert set(changed).isdisjoint(a)  # a block names its whole prefix


def test_encode_decode_round_trip_and_every_bad_payload_is_named():
    kv = torch.randn(2, 2, 2, BLOCK, 12)
    fp, h = b"F" * 32, b"H" * 32
    data = encode_block(fp, h, kv)
    assert torch.equal(decode_block(data, fp, h, tuple(kv.shape), torch.float32), kv)
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    cases = {
        "missing": None,
        "truncated": data[:-7],
        "corrupt": bytes(flipped),
        "foreign": encode_block(b"G" * 32, h, kv),
        "format": b"XXXX" + data[4:],
    }
    for reason, payload in cases.items():
        with pytest.raises(BadBlock) as e:
            decode_block(payload, fp, h, tuple(kv.shape), torch.float32)
        assert e.value.reason == reason
    with pytest.raises(BadBlock, match="shape"):
        decode_block(data, fp, h, (2, 2, 2, BLOCK, 13), torch.float32)
    with pytest.raises(BadBlock, match="foreign"):
        decode_block(data, fp, b"I" * 32, tuple(kv.shape), torch.float32)  # stored under another key


def test_a_cold_engine_loads_the_blocks_and_forwards_only_the_rest(cache, tiny_llama):
    first = stored(cache, tiny_llama)
    assert cache.stats.stored_blocks == 5
    cold = engine(tiny_llama)
    node = cache.load(cold, SEQ)
    assert node is not None and node.end == 40 and node.lock_ref == 1  # pinned until the search's first call
    assert torch.equal(node.value, first.cache.match_prefix(SEQ[:40])[0].value)  # the very KV computed
    cold.cache.dec_lock_ref(node)
    logits, _, stats = cold.last_logits([SEQ])
    assert stats.forwarded_tokens == 5  # the 5 tokens past the last full block
    torch.testing.assert_close(logits, first.last_logits([SEQ])[0])
    assert (cache.stats.hit_blocks, cache.stats.miss_blocks) == (5, 0)


def test_nothing_is_stored_twice(cache, tiny_llama):
    stored(cache, tiny_llama)
    again = engine(tiny_llama)
    again.last_logits([SEQ])
    cache._known.clear()  # forget what this worker stored: the writer still finds the index keys
    cache.store(again, SEQ)
    cache.flush()
    assert cache.stats.stored_blocks == 5


@pytest.mark.parametrize("damage", ["corrupt", "foreign", "truncated", "half_written", "index_without_payload"])
def test_a_bad_block_is_ignored_counted_and_ends_the_chain(cache, tiny_llama, damage):
    stored(cache, tiny_llama)
    r = redis.Redis.from_url(cache_url(cache))
    cold = engine(tiny_llama)
    hashes = block_hashes(cache.fingerprint(cold), SEQ, BLOCK)
    bad = hashes[2]  # blocks 0 and 1 stay good
    data = r.get(cache.data_key(bad))
    if damage == "corrupt":
        r.set(cache.data_key(bad), data[:-1] + bytes([data[-1] ^ 1]))
    elif damage == "foreign":
        r.set(cache.data_key(bad), b"SGKV" + data[4:40] + b"\x00" * 32 + data[72:])
    elif damage == "truncated":
        r.set(cache.data_key(bad), data[: len(data) // 2])
    elif damage == "half_written":  # the payload is there, the index that points to it is not yet
        r.delete(cache.index_key(bad))
    else:  # the payload expired or was evicted before its index
        r.delete(cache.data_key(bad))
    node = cache.load(cold, SEQ)
    assert node is not None and node.end == 16  # the two good blocks, nothing past the bad one
    reason = {"half_written": None, "index_without_payload": "missing"}.get(damage, damage)
    if reason is None:
        assert cache.stats.miss_blocks == 3 and not cache.stats.bad_blocks
    else:
        assert cache.stats.bad_blocks == {reason: 1}
    cold.cache.dec_lock_ref(node)
    logits, _, stats = cold.last_logits([SEQ])
    assert stats.forwarded_tokens == len(SEQ) - 16
    torch.testing.assert_close(logits, engine(tiny_llama).last_logits([SEQ])[0])
    r.close()


def cache_url(cache: SharedPrefixCache) -> str:
    kw = cache.redis.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}"


def test_redis_down_computes_locally_and_counts_it(tiny_llama):
    down = SharedPrefixCache(f"redis://127.0.0.1:{free_port()}/0", "down", block_tokens=BLOCK, timeout_s=0.2)
    try:
        cold = engine(tiny_llama)
        assert down.load(cold, SEQ) is None  # no exception: the request goes on
        assert down.stats.errors == 1
        assert down.load(cold, SEQ) is None and down.stats.skipped_loads == 1  # backing off: not even tried
        _, _, stats = cold.last_logits([SEQ])
        assert stats.forwarded_tokens == len(SEQ)
        down.store(cold, SEQ)  # skipped while failing; never raises
        down.flush()
    finally:
        down.close()


def test_a_load_estimated_slower_than_recomputing_is_skipped(cache, tiny_llama):
    stored(cache, tiny_llama)
    cold = engine(tiny_llama)
    cold.prefill_tokens_per_s = 1e12  # a GPU-fast prefill: fetching 5 blocks cannot beat it
    assert cache.load(cold, SEQ) is None and cache.stats.skipped_loads == 1


def test_the_fingerprint_tells_weights_apart(tiny_llama):
    a = weights_fingerprint(engine(tiny_llama))
    assert weights_fingerprint(engine(tiny_llama)) == a
    other = type(tiny_llama)(tiny_llama.config).eval()
    assert weights_fingerprint(engine(other)) != a
