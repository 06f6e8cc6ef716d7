"""Real processes for the server tests: `specache serve` and Redis on loopback free ports, stopped by pid."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from specache.bench.serve import specache_serve_command
from specache.response_cache.stores.local_redis import LocalRedis, free_port, redis_binaries  # noqa: F401

MODEL = "tiny"


def stop_pid(proc: subprocess.Popen, timeout: float = 30) -> int | None:
    """SIGTERM (graceful shutdown), then SIGKILL if it hangs. Returns the exit code."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


class Server:
    def __init__(self, proc: subprocess.Popen, base: str, log: Path) -> None:
        self.proc, self.base, self.log = proc, base, log

    @property
    def v1(self) -> str:
        return self.base + "/v1"

    def debug(self) -> dict:
        return httpx.get(self.base + "/debug/engine", timeout=30).json()

    def wait_idle(self, timeout: float = 30) -> dict:
        """Aborts land between engine steps: poll until no request holds KV blocks."""
        deadline = time.monotonic() + timeout
        while True:
            snap = self.debug()
            if snap["engine_requests"] == 0 and snap["kv_block_refs_held_by_requests"] == 0:
                return snap
            if time.monotonic() > deadline:
                return snap
            time.sleep(0.1)


@contextmanager
def running_server(
    model_dir: Path, workdir: Path, *args: str, env: dict | None = None, startup_s: float = 180
) -> Iterator[Server]:
    port = free_port()
    cmd = specache_serve_command(model_dir, port, MODEL, "float32", "--kv-cache-memory", "64MiB", *args)
    log = workdir / f"server-{port}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "SPECACHE_HOME": str(workdir), **(env or {})},
        )
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        _wait_healthy(server, startup_s)
        yield server
    finally:
        stop_pid(proc)


def _wait_healthy(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{server.log.read_text()[-3000:]}")
        try:
            if httpx.get(server.base + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not healthy after {timeout} s:\n{server.log.read_text()[-3000:]}")


@contextmanager
def running_redis() -> Iterator[str]:
    with LocalRedis() as server:
        yield server.url
