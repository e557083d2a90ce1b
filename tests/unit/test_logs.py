"""asyncopd.logs: both formats write one line per event carrying service, instance, job and step; the context
is per thread; a traceback keeps a JSON event on one line; a real coordinator started with
ASYNCOPD_LOG_FORMAT=json writes nothing but JSON lines (uvicorn's included)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings

import httpx
import pytest

from asyncopd import logs
from asyncopd.ports import free_port
from tests.helpers import ROOT, submit, tiny_job, wait_until_ready

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (\S+) (\S+) ([A-Z]+) (.*?)(\S+): (.*)$")


@pytest.fixture(autouse=True)
def fresh_context():
    """The main thread's log context is module state: each test starts and ends with none."""
    logs.clear_context()
    yield
    logs.clear_context()


@pytest.fixture
def isolated(monkeypatch):
    """Leaves the root logger, the hooks and the environment as setup_logging found them."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    hooks = sys.excepthook, threading.excepthook
    for name in ("VLLM_CONFIGURE_LOGGING", "TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    sys.excepthook, threading.excepthook = hooks
    logging.captureWarnings(False)


def capture(fmt: str, name: str = "services.learner.service") -> tuple[logging.Logger, io.StringIO]:
    """A logger writing through a handler of `fmt` into a buffer, apart from the root."""
    buf = io.StringIO()
    logger = logging.getLogger(f"test_logs.{fmt}.{name}")
    logger.handlers[:] = [logs.build_handler("learner", "learner-host-123", fmt, buf)]
    logger.propagate, logger.level = False, logging.DEBUG
    return logger, buf


def lines(buf: io.StringIO) -> list[str]:
    return buf.getvalue().splitlines()


# -- formats ----------------------------------------------------------------------------------------------


def test_text_is_one_line_with_service_instance_job_and_step():
    log, buf = capture("text")
    log.info("no job yet")
    with logs.bind(job_id="tiny-ab12", step=42):
        log.warning("step %d done", 42)
    first, second = lines(buf)
    m = TEXT_LINE.match(first)
    assert m and m.group(1, 2, 3, 4) == ("learner", "learner-host-123", "INFO", ""), first
    assert m.group(6) == "no job yet" and "job=" not in first
    m = TEXT_LINE.match(second)
    assert m and m.group(3, 4, 6) == ("WARNING", "job=tiny-ab12 step=42 ", "step 42 done"), second
    assert m.group(5) == log.name


def test_json_is_one_object_per_line_with_the_fields():
    log, buf = capture("json")
    log.info("idle")
    with logs.bind(job_id="tiny-ab12", step=42):
        log.info("trained\nstep %d", 42, extra={"loss": 1.5, "tokens": [1, 2], "path": ROOT, "nan": float("nan")})
    idle, trained = (json.loads(line) for line in lines(buf))
    assert set(idle) == {"ts", "level", "service", "instance", "logger", "msg"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", idle["ts"])
    assert trained == {
        "ts": trained["ts"], "level": "INFO", "service": "learner", "instance": "learner-host-123",
        "logger": log.name, "msg": "trained\nstep 42", "job_id": "tiny-ab12", "step": 42, "loss": 1.5,
        "tokens": [1, 2], "path": str(ROOT), "nan": "nan",  # what JSON cannot hold is written as str()
    }


def test_an_exception_stays_one_json_line():
    log, buf = capture("json")
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        log.exception("step failed")
    (line,) = lines(buf)
    event = json.loads(line)
    assert event["msg"] == "step failed" and event["level"] == "ERROR"
    assert event["exc"].startswith("Traceback") and "RuntimeError: boom\nsecond line" in event["exc"]


def test_a_bad_format_string_is_still_one_json_line():
    log, buf = capture("json")
    log.info("%d samples", "many")
    (line,) = lines(buf)
    assert "message formatting failed" in json.loads(line)["msg"]


def test_extra_overrides_the_context_and_none_removes_a_field():
    log, buf = capture("json")
    with logs.bind(job_id="a", step=1):
        log.info("about another job", extra={"job_id": "b"})
        with logs.bind(step=None):
            log.info("no step")
        log.info("step back")
    other, no_step, back = (json.loads(line) for line in lines(buf))
    assert (other["job_id"], other["step"]) == ("b", 1)
    assert no_step["job_id"] == "a" and "step" not in no_step
    assert back["step"] == 1


def test_set_context_merges_and_clear_context_empties():
    logs.set_context(job_id="a")
    logs.set_context(step=3)
    assert logs.current_context() == {"job_id": "a", "step": 3}
    logs.set_context(job_id=None)
    assert logs.current_context() == {"step": 3}
    logs.clear_context()
    assert logs.current_context() == {}
    with pytest.raises(ValueError, match="shadow"):
        logs.bind(msg="x").__enter__()


def test_context_is_per_thread():
    log, buf = capture("json")
    barrier = threading.Barrier(3)

    def work(job: str) -> None:
        logs.set_context(job_id=job)
        barrier.wait()  # all three threads hold a context at once
        for step in range(3):
            with logs.bind(step=step):
                log.info("step")
        barrier.wait()

    threads = [threading.Thread(target=work, args=(job,)) for job in ("a", "b")]
    for t in threads:
        t.start()
    with logs.bind(job_id="main"):
        barrier.wait()
        log.info("main")
        barrier.wait()
    for t in threads:
        t.join()
    events = [json.loads(line) for line in lines(buf)]
    by_job: dict[str, list] = {}
    for e in events:
        by_job.setdefault(e["job_id"], []).append(e.get("step"))
    assert by_job == {"a": [0, 1, 2], "b": [0, 1, 2], "main": [None]}
    assert logs.current_context() == {}  # the main thread's block ended; the threads' contexts never leaked


# -- setup_logging ----------------------------------------------------------------------------------------


def test_setup_logging_routes_libraries_warnings_and_uncaught_errors_through_one_handler(isolated):
    lib = logging.getLogger("test_logs.fakelib")  # a library that prints on its own, like transformers
    lib.handlers.clear()
    lib.setLevel(logging.NOTSET)
    own = logging.StreamHandler(sys.stderr)
    own.setLevel(logging.WARNING)
    lib.addHandler(own)
    lib.propagate = False
    buf = io.StringIO()
    logs.setup_logging("info", "teacher", "t-1", "json", stream=buf)
    assert os.environ["VLLM_CONFIGURE_LOGGING"] == "0" and os.environ["TQDM_DISABLE"] == "1"
    assert lib.handlers == [] and lib.propagate and lib.level == logging.WARNING  # no louder than before

    logs.set_context(job_id="j")
    lib.info("dropped: the library's handler was at WARNING")
    lib.warning("from the library")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("deprecated thing", UserWarning, stacklevel=1)

    def crash() -> None:
        logs.set_context(job_id="k")
        raise ValueError("thread died")

    t = threading.Thread(target=crash, name="worker")
    t.start()
    t.join()
    events = [json.loads(line) for line in lines(buf)]
    assert [(e["logger"], e["job_id"]) for e in events] == [
        ("test_logs.fakelib", "j"), ("py.warnings", "j"), ("asyncopd.uncaught", "k")]
    assert all(e["service"] == "teacher" and e["instance"] == "t-1" for e in events)
    assert "deprecated thing" in events[1]["msg"]
    assert "ValueError: thread died" in events[2]["exc"] and "worker" in events[2]["msg"]


def test_setup_logging_rejects_an_unknown_format(isolated):
    with pytest.raises(ValueError, match="xml"):
        logs.setup_logging("INFO", "rollout", "r-1", "xml")


def test_log_format_setting_accepts_text_and_json_only(monkeypatch):
    from pydantic import ValidationError

    from asyncopd.settings import ServiceSettings

    assert ServiceSettings().log_format == "text"
    monkeypatch.setenv("ASYNCOPD_LOG_FORMAT", "json")
    assert ServiceSettings().log_format == "json"
    monkeypatch.setenv("ASYNCOPD_LOG_FORMAT", "yaml")
    with pytest.raises(ValidationError, match="log_format"):
        ServiceSettings()


# -- a real service process -------------------------------------------------------------------------------


def test_coordinator_with_json_format_writes_only_json_lines(redis_server, r, tmp_path):
    port = free_port()
    env = {**os.environ, "ASYNCOPD_REDIS_URL": redis_server, "ASYNCOPD_HTTP_PORT": str(port),
           "ASYNCOPD_ROLLOUT_REPLICAS": "0", "ASYNCOPD_DATA_DIR": str(tmp_path / "data"),
           "ASYNCOPD_LOG_DIR": str(tmp_path / "logs"), "ASYNCOPD_LOG_FORMAT": "json",
           "ASYNCOPD_INSTANCE": "coord-test", "ASYNCOPD_TICK_S": "0.05"}
    out_path = tmp_path / "coordinator.out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.coordinator"], env=env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        wait_until_ready(url, proc, out_path)
        assert httpx.get(f"{url}/v1/jobs").status_code == 200
        yaml_body = {"content-type": "application/yaml"}
        assert httpx.post(f"{url}/v1/jobs", content=b"- not a mapping", headers=yaml_body).status_code == 422
        # A job whose models are missing fails preflight in the runner: that line names the job.
        job = submit(url, tiny_job({"student": "/nonexistent/student", "teacher": "/nonexistent/teacher"}))
        while "model path /nonexistent/student does not exist" not in out_path.read_text():
            assert time.monotonic() < deadline + 30, out_path.read_text()
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)

    text = out_path.read_text()
    events = []
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}\n--- whole output:\n{text}")
    assert events, "the coordinator logged nothing"
    for e in events:
        assert {"ts", "level", "service", "instance", "logger", "msg"} <= set(e), e
        assert (e["service"], e["instance"]) == ("coordinator", "coord-test"), e
    assert any(e["logger"].startswith("uvicorn") for e in events), "uvicorn's lines should go through the root"
    assert not any("color_message" in e for e in events)
    preflight = [e for e in events if "model path /nonexistent/student does not exist" in e["msg"]]
    assert preflight and preflight[0]["job_id"] == job["id"], preflight
