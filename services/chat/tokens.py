"""Identity: short-lived signed tokens (JWT, HS256) that any worker checks with no database and no session.

A token names its user (``sub``), the name shown to others (``name``) and the rooms it may join
(``rooms``: names or fnmatch patterns such as ``team-*``; ``*`` is any room). It is meant for this
chat (``aud``) and ends at ``exp``: a socket is refused after it and closed when it is reached.
"""

import fnmatch
import hashlib
import time
from dataclasses import dataclass

import jwt
from django.conf import settings

from .protocol import CLOSE_UNAUTHORIZED, BadFrame, is_text

ALGORITHM = "HS256"
MAX_NAME_CHARS = 64
MAX_ROOM_PATTERNS = 100


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a socket speaks for, as its token says."""

    subject: str
    name: str
    rooms: tuple
    expires_at: float

    def may_join(self, room):
        return any(fnmatch.fnmatchcase(room, pattern) for pattern in self.rooms)

    @property
    def key(self):
        """A fixed-length digest of the subject, for Redis keys (a subject may hold any character)."""
        return hashlib.sha256(self.subject.encode()).hexdigest()[:32]


def mint(subject, name, rooms=("*",), ttl=None):
    """A token for ``subject`` shown as ``name``, valid for ``ttl`` seconds (CHAT_TOKEN_TTL by default)."""
    now = int(time.time())
    claims = {
        "sub": str(subject),
        "name": str(name),
        "rooms": list(rooms),
        "aud": settings.CHAT_TOKEN_AUDIENCE,
        "iat": now,
        "exp": now + int(ttl or settings.CHAT_TOKEN_TTL),
    }
    return jwt.encode(claims, settings.CHAT_TOKEN_SECRET, algorithm=ALGORITHM)


def verify(token):
    """The token's Identity, or BadFrame (close code 4401) saying what is wrong with it."""
    if not token:
        raise BadFrame(CLOSE_UNAUTHORIZED, "token_missing", "this chat needs a token: connect with ?token=<token>")
    try:
        claims = jwt.decode(
            token,
            settings.CHAT_TOKEN_SECRET,
            algorithms=[ALGORITHM],
            audience=settings.CHAT_TOKEN_AUDIENCE,
            options={"require": ["sub", "exp", "aud"]},
            leeway=settings.CHAT_TOKEN_LEEWAY,
        )
    except jwt.ExpiredSignatureError:
        raise BadFrame(CLOSE_UNAUTHORIZED, "token_expired", "the token has expired: get a new one") from None
    except jwt.InvalidTokenError as error:
        raise BadFrame(CLOSE_UNAUTHORIZED, "token_invalid", f"the token is not valid here: {_first_line(error)}") from None
    name, rooms = claims.get("name", claims["sub"]), claims.get("rooms", ["*"])
    if not (
        isinstance(claims["sub"], str)
        and is_text(claims["sub"])
        and isinstance(name, str)
        and is_text(name)
        and 0 < len(name) <= MAX_NAME_CHARS
    ):
        raise BadFrame(CLOSE_UNAUTHORIZED, "token_invalid", f"sub and name must be strings, name 1-{MAX_NAME_CHARS} characters")
    if not (isinstance(rooms, list) and len(rooms) <= MAX_ROOM_PATTERNS and all(isinstance(r, str) for r in rooms)):
        raise BadFrame(
            CLOSE_UNAUTHORIZED, "token_invalid", f"rooms must be a list of at most {MAX_ROOM_PATTERNS} names or patterns"
        )
    return Identity(claims["sub"], name, tuple(rooms), float(claims["exp"]))


def _first_line(error):
    return str(error).splitlines()[0][:120] if str(error) else type(error).__name__
