"""The one logging setup: JSON lines on stdout, used by Django settings and by gunicorn."""

import logging


class ClientErrorsAreWarnings(logging.Filter):
    """A request refused with a 4xx (e.g. Django's DisallowedHost for a bad Host header) is the client's
    error, not the site's: logged as one WARNING line, without the traceback Django attaches. So is a
    readiness probe answered 503: the worker is draining or cannot reach Redis, said at WARNING already."""

    def filter(self, record):
        status = getattr(record, "status_code", 0)
        probe = status == 503 and getattr(getattr(record, "request", None), "path", None) == "/readyz"
        if (400 <= status < 500 or probe) and record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


def json_logging(level):
    """A dictConfig that writes every record as one JSON object per line."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {
                "()": "pythonjsonlogger.json.JsonFormatter",
                "fmt": "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s",
                "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger", "process": "pid"},
            }
        },
        "filters": {"client_errors": {"()": ClientErrorsAreWarnings}},
        "handlers": {"stdout": {"class": "logging.StreamHandler", "formatter": "json", "filters": ["client_errors"]}},
        "root": {"handlers": ["stdout"], "level": level.upper()},
        "loggers": {
            # gunicorn and uvicorn attach handlers of their own unless told to use these
            name: {"handlers": ["stdout"], "level": level.upper(), "propagate": False}
            for name in ("gunicorn.error", "uvicorn.error")
        },
    }
