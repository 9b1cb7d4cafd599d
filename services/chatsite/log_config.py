"""The one logging setup: JSON lines on stdout, used by Django settings and by gunicorn."""


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
        "handlers": {"stdout": {"class": "logging.StreamHandler", "formatter": "json"}},
        "root": {"handlers": ["stdout"], "level": level.upper()},
        "loggers": {
            # gunicorn and uvicorn attach handlers of their own unless told to use these
            name: {"handlers": ["stdout"], "level": level.upper(), "propagate": False}
            for name in ("gunicorn.error", "uvicorn.error")
        },
    }
