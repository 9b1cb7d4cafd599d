"""gunicorn settings shared by `make run`, the container image and the Helm chart."""

import os
import shutil
import tempfile

from chatsite import balance
from chatsite import environment as env
from chatsite.log_config import json_logging

# Metrics of all worker processes are summed per pod; the directory must exist before workers import.
metrics_dir = os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR", os.path.join(tempfile.gettempdir(), f"chat-metrics-{os.getpid()}")
)

# The public port, and the internal one of /healthz, /readyz and /metrics when OPS_BIND is set.
bind = [env.text("BIND"), *filter(None, [env.text("OPS_BIND")])]
workers = env.integer("WEB_CONCURRENCY")
worker_class = "chatsite.worker.ChatUvicornWorker"
# Time given to open WebSockets to close after SIGTERM before workers are killed.
graceful_timeout = env.integer("GRACEFUL_TIMEOUT")
timeout = 60
keepalive = 5
worker_tmp_dir = env.text("WORKER_TMP_DIR") or tempfile.gettempdir()
# The control socket would live under $HOME, which is read-only in the container.
control_socket_disable = True
accesslog = None
errorlog = "-"
loglevel = env.text("LOG_LEVEL").lower()
logconfig_dict = json_logging(loglevel)


# The workers take turns accepting from the shared listening socket (chatsite/balance.py): the table of
# their loads is made here, in the arbiter, before any worker is forked.
if env.flag("ACCEPT_BALANCE") and workers > 1:
    balance.TABLE = balance.WorkerTable()


def on_starting(server):
    shutil.rmtree(metrics_dir, ignore_errors=True)
    os.makedirs(metrics_dir, exist_ok=True)


def pre_fork(server, worker):
    if balance.TABLE is not None:
        worker.accept_row = balance.TABLE.claim({w.accept_row for w in server.WORKERS.values()})


def child_exit(server, worker):
    if balance.TABLE is not None and worker.accept_row is not None:
        balance.TABLE.clear(worker.accept_row)
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
