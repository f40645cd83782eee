"""Logs of `poe serve` and `poe worker`: one JSON object per line on stderr, with the
request id (or the job id) of whatever the line is about, for a log shipper to index."""

from __future__ import annotations

import json
import logging
import logging.config
from contextvars import ContextVar
from datetime import UTC, datetime

# Set for the duration of a request (app.telemetry) or of a job (app.jobs.worker): every
# line logged meanwhile, by any module, carries it.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
JOB_ID: ContextVar[int | None] = ContextVar("job_id", default=None)

# The attributes every LogRecord has; anything else was passed with `extra=` and is logged
# (but uvicorn's copy of its message with terminal colours).
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName", "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
                "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        request_id, job_id = REQUEST_ID.get(), JOB_ID.get()
        if request_id is not None:
            line["request_id"] = request_id
        if job_id is not None:
            line["job_id"] = job_id
        for key, value in vars(record).items():
            if key not in _STANDARD:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def config(level: str) -> dict:
    """A logging.config.dictConfig of JSON lines at `level`; also what uvicorn applies in
    each of its worker processes (its `log_config`)."""
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": level},
        # uvicorn's own loggers go to the root's handler; its access log is replaced by
        # app.telemetry's (poe.access), which has the request id.
        "loggers": {name: {"handlers": [], "propagate": True, "level": level}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access")}
                   | {"alembic.runtime.plugins": {"level": "WARNING"}},
    }


def use_json(level: str) -> None:
    logging.config.dictConfig(config(level))
