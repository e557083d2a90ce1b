"""Logs an operator can grep and a log pipeline can parse: one line per event, each carrying the service, the
instance, and the job and step being worked on. Stdlib only (the coordinator imports it, torch-free).

The API, for service code::

    setup_logging(level, service, instance, fmt)  # once, first thing in main(); fmt "text" | "json"
    with bind(job_id=job.id, step=step):          # every record logged inside the block carries them
        ...
    set_context(job_id=job.id)                    # the same without a block, for a loop that moves from job
    set_context(step=step)                        #   to job: merges into the current context; None removes
    clear_context()                               #   a field, clear_context() removes all
    adopt_library_loggers()                       # after importing a library that prints on its own (below)

`job_id` and `step` are the fields every format knows; any other keyword (`rank=1`) is carried the same way.
Who sets them: rollout and teacher in `asyncopd.ml.engine_service` (the job whose model is loaded), the
coordinator in `services.coordinator.runner` (the job it starts, releases for, or ends), the learner around
its work on a job and each training step (`with bind(job_id=job.id, step=step):`).
`extra={"job_id": other}` on one call overrides the context for that line (a line about another job).

The context lives in a `contextvars.ContextVar`, so it is per thread: a new thread starts with none (bind in
the thread that does the work; `contextvars.copy_context().run(fn)` carries it over on purpose), and asyncio
tasks copy their creator's.

Formats (`ASYNCOPD_LOG_FORMAT`):

- text: ``2026-11-30T02:38:10.123Z learner learner-host-123 INFO job=tiny-ab12 step=42 services.learner.service:
  message``, on one line (`job=`/`step=` only when set; other context and `extra=` fields follow as `key=value`;
  a traceback follows on its own lines).
- json: one object per line: ``ts`` (ISO-8601 UTC), ``level``, ``service``, ``instance``, ``logger``, ``msg``,
  ``job_id`` and ``step`` when set, the `extra=` fields, and ``exc`` (the traceback, as one string) when there
  is one. A value JSON cannot hold (NaN, an object) is written as its ``str()``; nothing breaks the line.

Everything goes through one handler on the root logger: vLLM is told not to configure its own
(``VLLM_CONFIGURE_LOGGING=0``), uncaught exceptions and `warnings` are logged, and uvicorn is run with
``log_config=None`` so it propagates. Libraries that attach a console handler to their own logger at import
(transformers, DeepSpeed, torch) are rerouted to the root by `adopt_library_loggers()`, which `setup_logging`
runs once and the services run again after their heavy imports (a line such a library prints during the
import itself still goes out in its own format). In json mode tqdm and Hugging Face progress bars are off by
default (vLLM's weight-loading bar follows its own `use_tqdm_on_load`). What native code writes to stderr itself
(torch's C++ warnings, NCCL, gRPC core) is not Python logging and cannot be formatted here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, TextIO

FORMATS = ("text", "json")

_CONTEXT: ContextVar[dict[str, Any] | None] = ContextVar("asyncopd_log_context", default=None)

# Attributes every LogRecord has (plus what formatters add): anything else on a record is a context or extra field,
# except uvicorn's color_message (its message again, with ANSI colour codes).
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName", "service", "instance", "color_message",
}
# Context and extra fields shown first, under these names in text.
_KNOWN = {"job_id": "job", "step": "step"}


# -- the context ------------------------------------------------------------------------------------------


def _merged(fields: dict[str, Any]) -> dict[str, Any]:
    reserved = _RECORD_ATTRS.intersection(fields)
    if reserved:
        raise ValueError(f"log context fields {sorted(reserved)} would shadow LogRecord attributes")
    merged = dict(_CONTEXT.get() or {})
    for key, value in fields.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


@contextlib.contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add fields (job_id=, step=, ...) to every record logged in this block, in this thread; None removes one.
    The block's end restores the context as it was before it."""
    token = _CONTEXT.set(_merged(fields))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def set_context(**fields: Any) -> None:
    """Merge fields into this thread's context until changed; a None value removes the field."""
    _CONTEXT.set(_merged(fields))


def clear_context() -> None:
    _CONTEXT.set(None)


def current_context() -> dict[str, Any]:
    return dict(_CONTEXT.get() or {})


class ContextFilter(logging.Filter):
    """Puts service, instance and the context's fields on each record the handler sees (a field given with
    extra= on the call wins)."""

    def __init__(self, service: str, instance: str) -> None:
        super().__init__()
        self.service, self.instance = service, instance

    def filter(self, record: logging.LogRecord) -> bool:
        record.service, record.instance = self.service, self.instance
        for key, value in (_CONTEXT.get() or {}).items():
            if key not in record.__dict__:
                setattr(record, key, value)
        return True


# -- formats ----------------------------------------------------------------------------------------------


def _utc(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # a bad %-format must not end as logging's multi-line "--- Logging error ---"
        return f"{record.msg!r} % {record.args!r} (message formatting failed)"


_factory_attrs: dict[int, frozenset[str]] = {}


def _record_attrs() -> frozenset[str]:
    """What every record has, including what an installed record factory adds to all of them (vLLM's adds
    `vllm_process_name`): not a field anyone passed."""
    factory = logging.getLogRecordFactory()
    if id(factory) not in _factory_attrs:
        _factory_attrs[id(factory)] = _RECORD_ATTRS | frozenset(factory("", 0, "", 0, "", (), None).__dict__)
    return _factory_attrs[id(factory)]


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """Context and extra= fields of a record: job_id and step first, the rest in the order given."""
    attrs = _record_attrs()
    extra = {k: v for k, v in record.__dict__.items() if k not in attrs and not k.startswith("_")}
    known = {k: extra.pop(k) for k in _KNOWN if k in extra}
    return known | extra


def _service(record: logging.LogRecord) -> tuple[str, str]:
    return getattr(record, "service", "-"), getattr(record, "instance", "-")


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        service, instance = _service(record)
        parts = [_utc(record), service, instance, record.levelname]
        for key, value in _fields(record).items():
            text = str(value)
            if not text or any(c.isspace() or c in '="' for c in text):
                text = json.dumps(text)
            parts.append(f"{_KNOWN.get(key, key)}={text}")
        line = f"{' '.join(parts)} {record.name}: {_message(record)}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):  # an object, NaN/inf (a diverged loss), a cycle: keep the line valid JSON
        return str(value)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        service, instance = _service(record)
        doc: dict[str, Any] = {"ts": _utc(record), "level": record.levelname, "service": service,
                               "instance": instance, "logger": record.name, "msg": _message(record)}
        for key, value in _fields(record).items():
            doc[key if key not in doc else f"extra_{key}"] = _jsonable(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc)  # escapes newlines: an event is one line whatever it holds


# -- set-up -----------------------------------------------------------------------------------------------


def build_handler(service: str, instance: str, fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """A stream handler writing records in `fmt` with service, instance and the context on each."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {FORMATS}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter(service, instance))
    handler._asyncopd = True  # type: ignore[attr-defined]  # ours: adopt_library_loggers leaves it alone
    return handler


def _is_console(handler: logging.Handler) -> bool:
    if getattr(handler, "_asyncopd", False) or isinstance(handler, logging.FileHandler):
        return False
    if not isinstance(handler, logging.StreamHandler):
        return False
    return handler.stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)


def adopt_library_loggers() -> list[str]:
    """Route loggers that print to the console on their own (transformers' `[transformers] ...`, DeepSpeed's,
    torch's) through the root handler instead; returns their names. Idempotent and cheap: call it again after
    importing such a library. The logger keeps the threshold its console handler had, so nothing gets louder."""
    adopted = []
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger):
            continue
        console = [h for h in logger.handlers if _is_console(h)]
        if not console:
            continue
        floor = min(h.level for h in console)
        if floor > logger.getEffectiveLevel():
            logger.setLevel(floor)
        for h in console:
            logger.removeHandler(h)
        logger.propagate = True
        adopted.append(name)
    return adopted


def _log_uncaught(exc_type, exc, tb) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    logging.getLogger("asyncopd.uncaught").critical("uncaught %s", exc_type.__name__, exc_info=(exc_type, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("asyncopd.uncaught").error("uncaught %s in thread %s", args.exc_type.__name__, name,
                                                 exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def setup_logging(level: str, service: str, instance: str, fmt: str = "text",
                  stream: TextIO | None = None) -> logging.Handler:
    """Replace the root logger's handlers with one writing `fmt` ("text" or "json") to stderr; returns it."""
    handler = build_handler(service, instance, fmt, stream)
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM logs through the root, not its own handler
    if fmt == "json":  # progress bars are not JSON lines
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
    adopt_library_loggers()
    return handler
