"""The gunicorn worker class: uvicorn, with draining on SIGTERM and limits from settings."""

import os
import sys

from gunicorn.arbiter import Arbiter
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

from . import health

# wsproto holds an idle socket in about 15% less memory than websockets-sansio, which fans out somewhat
# faster; both are measured side by side by `make bench`.
WS_DEFAULT = "wsproto"
# The server refuses frames far beyond the app's own limit; the app answers smaller oversize frames clearly.
WS_MAX_SIZE = 4 * int(os.environ.get("CHAT_MAX_FRAME_BYTES", "16384"))


class DrainingServer(Server):
    """Marks the process as draining as soon as the stop signal arrives, so /readyz fails at once."""

    def handle_exit(self, sig, frame):
        health.start_draining()
        super().handle_exit(sig, frame)


class ChatUvicornWorker(UvicornWorker):
    """uvicorn with uvloop and httptools, no lifespan (Django has none) and a bounded frame size."""

    CONFIG_KWARGS = {
        "loop": os.environ.get("UVICORN_LOOP", "uvloop"),
        "http": "httptools",
        "ws": os.environ.get("UVICORN_WS", WS_DEFAULT),
        "lifespan": "off",
        "ws_max_size": WS_MAX_SIZE,
        "ws_per_message_deflate": False,
    }

    async def _serve(self):
        self.config.app = self.wsgi
        server = DrainingServer(config=self.config)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
