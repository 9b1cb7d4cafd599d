"""The chat wire protocol: v1 (the tutorial's) and the opt-in v2, with validation of client frames."""

import json
import re

from django.conf import settings

ROOM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
ROOM_NAME_RULE = "1-64 characters of A-Z, a-z, 0-9, _ and -"
V2 = "chat.v2"  # WebSocket subprotocol that opts in to error frames and extra fields
V1_FIELDS = frozenset({"message"})
V2_FIELDS = frozenset({"message", "nonce"})
MAX_NONCE_CHARS = 64

# Close codes for v1 clients, which never receive a frame without "message".
CLOSE_BAD_REQUEST = 4400
CLOSE_NOT_FOUND = 4404
CLOSE_TOO_LARGE = 4413
CLOSE_UNSUPPORTED = 4415
CLOSE_UNAVAILABLE = 4503


class BadFrame(Exception):
    """A client frame that is refused; ``code`` is the v1 close code, ``reason`` the v2 error code."""

    def __init__(self, close_code, reason, detail):
        super().__init__(detail)
        self.close_code = close_code
        self.reason = reason
        self.detail = detail


def parse_client_frame(text, version):
    """The validated frame as a dict with "message" (and for v2 optionally "nonce"), or BadFrame."""
    if text is None:
        raise BadFrame(CLOSE_UNSUPPORTED, "binary_frame", "binary frames are not supported; send JSON text")
    if len(text.encode()) > settings.CHAT_MAX_FRAME_BYTES:
        raise BadFrame(CLOSE_TOO_LARGE, "frame_too_large", f"frames are limited to {settings.CHAT_MAX_FRAME_BYTES} bytes")
    try:
        frame = json.loads(text)
    except ValueError:
        raise BadFrame(CLOSE_BAD_REQUEST, "bad_json", "frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise BadFrame(CLOSE_BAD_REQUEST, "bad_frame", 'frame must be a JSON object like {"message": "..."}')
    unknown = sorted(set(frame) - (V2_FIELDS if version == 2 else V1_FIELDS))
    if unknown:
        raise BadFrame(CLOSE_BAD_REQUEST, "unknown_field", f"unknown field(s): {', '.join(unknown)[:200]}")
    message = frame.get("message")
    if not isinstance(message, str):
        raise BadFrame(CLOSE_BAD_REQUEST, "bad_message", '"message" is required and must be a string')
    if len(message) > settings.CHAT_MAX_MESSAGE_CHARS:
        raise BadFrame(CLOSE_TOO_LARGE, "message_too_long", f"messages are limited to {settings.CHAT_MAX_MESSAGE_CHARS} characters")
    nonce = frame.get("nonce")
    if nonce is not None and not (isinstance(nonce, str) and len(nonce) <= MAX_NONCE_CHARS):
        raise BadFrame(CLOSE_BAD_REQUEST, "bad_nonce", f'"nonce" must be a string of at most {MAX_NONCE_CHARS} characters')
    return frame


def error_frame(reason, detail):
    """A v2 error frame."""
    return json.dumps({"type": "error", "error": reason, "detail": detail})
