"""The id of the serving process, sent as X-Served-By."""

import os
import socket

from . import environment as env

HEADER = b"x-served-by"
_host = env.text("POD_NAME") or socket.gethostname()


def worker_id():
    """Pod (or host) name and pid: unique per serving process, also across forks."""
    return f"{_host}:{os.getpid()}"
