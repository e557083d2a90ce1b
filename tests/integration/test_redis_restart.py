"""A real redis-server stopped (SIGTERM, append-only file kept) while a service writes, then started again on
the same port: what the services' retrying client (`state.connect`) writes must land exactly once.

Why this exists: Redis stopping applies and persists the commands it has read but may never send their
replies, so the client's retry sends them again. A plain RPUSH transaction repeated a step record in every
one of 15 tries of this test before `state.append_record`."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import redis

from asyncopd import state
from asyncopd.ports import free_port
from asyncopd.tools.localstack import redis_command


def start(tmp_path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(redis_command(tmp_path, port, None), stdout=subprocess.DEVNULL)
    probe = redis.Redis(port=port)
    for _ in range(200):
        try:
            probe.ping()
            return proc
        except redis.ConnectionError:
            time.sleep(0.02)
    raise AssertionError("redis-server did not start")


def test_records_written_across_a_redis_stop_and_restart_land_once(tmp_path):
    port = free_port()
    proc = start(tmp_path, port)
    r = state.connect(f"redis://127.0.0.1:{port}/0", outage_s=20)
    written, stop = [0], threading.Event()

    def writer():  # the learner's recorder, as fast as it can go
        while not stop.is_set():
            step = written[0] + 1
            state.append_record(r, "steps", f'{{"step": {step}, "time": {time.time()}}}', "progress", {"step": step})
            written[0] = step

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.5)
        proc.terminate()
        proc.wait(10)
        time.sleep(0.5)
        proc = start(tmp_path, port)
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join(30)
    try:
        steps = [json.loads(text)["step"] for text in r.lrange("steps", 0, -1)]
        assert written[0] > 10  # it wrote on both sides of the outage
        assert steps == list(range(1, written[0] + 1))
        assert r.hget("progress", "step") == str(written[0])
    finally:
        proc.terminate()
        proc.wait(10)
