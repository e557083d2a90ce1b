"""A throwaway redis-server for benchmarks: free port, temporary directory, no persistence."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis


@contextmanager
def scratch_redis(**client_kwargs) -> Iterator[tuple[redis.Redis, Path]]:
    """(a client of a fresh redis-server, its data directory); the server and directory go at the end."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = Path(tempfile.mkdtemp())
    from asyncopd.tools.localstack import redis_binary

    server = subprocess.Popen([redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--dir", str(data)], stdout=subprocess.DEVNULL)
    try:
        r = redis.Redis(port=port, **client_kwargs)
        for _ in range(100):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield r, data
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(data, ignore_errors=True)
