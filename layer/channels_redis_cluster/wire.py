"""The pub/sub frame every process reads, and the entries kept in Redis lists: one definition for Python and Lua.

A frame is a header of the sender, its sequence number and a kind, then the body.

A numbered frame (a group message with history) carries the group's epoch and the message's offset
between the header and the body. History entries keep their frame's header, so any process can publish
an entry as its sender framed it (history.PUBLISH_SCRIPT).
"""

SENDER_BYTES = 12  # hex client prefix of the sending process, then an 8-byte sequence number, then a kind
SEQ_END = SENDER_BYTES + 8
HEADER_BYTES = SEQ_END + 1
# Kinds: a message; one with epoch and offset; none (a duplicate); a presence change watchers must read again.
PLAIN, NUMBERED, SKIPPED, REREAD = b"p", b"h", b"s", b"r"
EPOCH_CHARS = 16
OFFSET_CHARS = 16
EPOCH_END = HEADER_BYTES + EPOCH_CHARS
OFFSET_END = EPOCH_END + OFFSET_CHARS
# Entries of channel queues and group histories start with their expiry time in milliseconds, TIME_CHARS
# ASCII digits; a history entry then keeps the frame header its sender made, then the message (ENTRY_BODY
# on). Offsets and epochs are added when it is published.
TIME_CHARS = 13
ENTRY_BODY = TIME_CHARS + HEADER_BYTES


def entry_time(expires_ms):
    """The start of a queue or history entry: its expiry time, as the scripts' TIME_FORMAT writes it."""
    return b"%0*d" % (TIME_CHARS, expires_ms)


# The same, as the first lines of every script (channels_redis_cluster.scripts).
LUA_CONSTANTS = (
    f"local TIME_CHARS, ENTRY_BODY = {TIME_CHARS}, {ENTRY_BODY}\n"
    f"local TIME_FORMAT, OFFSET_FORMAT = '%0{TIME_CHARS}d', '%0{OFFSET_CHARS}d'\n"
    f"local SKIPPED = '{SKIPPED.decode()}'\n"
)
