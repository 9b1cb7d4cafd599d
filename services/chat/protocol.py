"""The chat wire protocol: v1 (the tutorial's) and the opt-in v2, with validation of client frames."""

import json
import re
from urllib.parse import parse_qs

from django.conf import settings

ROOM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
ROOM_NAME_RULE = "1-64 characters of A-Z, a-z, 0-9, _ and -"
V2 = "chat.v2"  # WebSocket subprotocol that opts in to error frames and extra fields
V1_FIELDS = frozenset({"message"})
V2_FIELDS = frozenset({"message", "nonce"})
MAX_NONCE_CHARS = 64
EPOCH = re.compile(r"[0-9a-f]{1,32}")
NUMBER = re.compile(r"[0-9]{1,18}")  # not str.isdigit(), which also passes digits int() refuses ("²")
MAX_HISTORY = 500  # most messages a fresh join may ask for with ?history=

# Close codes for v1 clients, which never receive a frame without "message".
CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401  # no token, or a bad, expired or foreign one: get a new token
CLOSE_FORBIDDEN = 4403  # the token does not name this room
CLOSE_NOT_FOUND = 4404
CLOSE_TOO_SLOW = 4408  # the client read too slowly and messages were held back: reconnect and resume
CLOSE_TOO_LARGE = 4413
CLOSE_UNSUPPORTED = 4415
CLOSE_TOO_MANY = 4429  # a limit: messages per second, rooms or sockets per identity
CLOSE_UNAVAILABLE = 4503
CLOSE_TRY_AGAIN = 1013  # this worker holds its most sockets: reconnect (the balancer picks another)


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
    except RecursionError:  # [[[[... nested deeper than the parser's stack
        raise BadFrame(CLOSE_BAD_REQUEST, "bad_json", "frame nests too deeply") from None
    if not isinstance(frame, dict):
        raise BadFrame(CLOSE_BAD_REQUEST, "bad_frame", 'frame must be a JSON object like {"message": "..."}')
    unknown = sorted(set(frame) - (V2_FIELDS if version == 2 else V1_FIELDS))
    if unknown:
        raise BadFrame(CLOSE_BAD_REQUEST, "unknown_field", f"unknown field(s): {', '.join(unknown)[:200]}")
    message = frame.get("message")
    if not isinstance(message, str):
        raise BadFrame(CLOSE_BAD_REQUEST, "bad_message", '"message" is required and must be a string')
    if not is_text(message):
        raise BadFrame(CLOSE_BAD_REQUEST, "bad_message", '"message" must be Unicode text (it holds a lone surrogate)')
    if len(message) > settings.CHAT_MAX_MESSAGE_CHARS:
        raise BadFrame(
            CLOSE_TOO_LARGE, "message_too_long", f"messages are limited to {settings.CHAT_MAX_MESSAGE_CHARS} characters"
        )
    nonce = frame.get("nonce")
    if nonce is not None and not (isinstance(nonce, str) and len(nonce) <= MAX_NONCE_CHARS and is_text(nonce)):
        raise BadFrame(CLOSE_BAD_REQUEST, "bad_nonce", f'"nonce" must be a string of at most {MAX_NONCE_CHARS} characters')
    return frame


def is_text(value):
    """False for a string that holds a lone surrogate ("\\ud800" is valid JSON but no UTF-8 text)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def parse_query(query_string):
    """A WebSocket URL's query as {name: last value}; bytes that are no UTF-8 are kept as their latin-1 characters."""
    return {name: values[-1] for name, values in parse_qs(query_string.decode("latin1"), keep_blank_values=True).items()}


class Resume:
    """A v2 connection's query: resume after ``since`` of ``epoch``, or on a fresh join the ``history`` latest."""

    __slots__ = ("epoch", "history", "since")

    def __init__(self, query):
        since, epoch, history = (query.get(name) for name in ("since", "epoch", "history"))
        if (since is None) != (epoch is None):
            raise BadFrame(CLOSE_BAD_REQUEST, "bad_resume", "since and epoch go together")
        if since is not None and not (NUMBER.fullmatch(since) and EPOCH.fullmatch(epoch)):
            raise BadFrame(CLOSE_BAD_REQUEST, "bad_resume", "since must be an offset and epoch the epoch it came with")
        if history is not None and not (NUMBER.fullmatch(history) and int(history) <= MAX_HISTORY):
            raise BadFrame(CLOSE_BAD_REQUEST, "bad_history", f"history must be a number from 0 to {MAX_HISTORY}")
        self.since = None if since is None else int(since)
        self.epoch = epoch
        self.history = 0 if history is None else int(history)


def joined_frame(room, offset, epoch, member=None, member_key=None):
    """The v2 frame sent right after accept: the room's current top, and who this socket is in its presence.

    ``member_key`` (anonymous sockets only) is the secret a resume passes back to stay the same member.
    """
    frame = {"type": "joined", "room": room, "offset": offset, "epoch": epoch}
    if member is not None:
        frame["member"] = member
    if member_key is not None:
        frame["member_key"] = member_key
    return json.dumps(frame)


def recovered_frame(recovered, offset, epoch):
    """The v2 frame that ends a replay: whether it was exact, and where the room stands."""
    return json.dumps({"type": "recovered", "recovered": recovered, "offset": offset, "epoch": epoch})


def error_frame(reason, detail):
    """A v2 error frame."""
    return json.dumps({"type": "error", "error": reason, "detail": detail})
