"""A chat.v2 member's place in its room, as every client here keeps it: the member client, Locust and the bench.

The place is the last room message the member has (offset and epoch): the ``joined`` frame of a fresh
join sets it, each message moves it on, a ``recovered`` frame sets it where the server's replay ended.
A resume asks for everything after it (``?since=&epoch=``, docs/resume.md). Transport-agnostic: each
client hands it the frames it read, decoded.
"""

NEW, DUPLICATE, OTHER = "new", "duplicate", "other"  # what a frame was to the member


class Place:
    """The last room message a member has; None until its first join."""

    __slots__ = ("epoch", "joined_at", "offset")

    def __init__(self):
        self.offset = self.epoch = self.joined_at = None

    def query(self):
        """The resume's query parameters: {} before the first join."""
        return {} if self.epoch is None else {"since": self.offset, "epoch": self.epoch}

    def forget(self):
        """Join afresh next time (a new member, not a resume)."""
        self.offset = self.epoch = self.joined_at = None

    def on_frame(self, frame):
        """Move the place on for ``frame`` (a decoded v2 frame): NEW for a room message past it, DUPLICATE for
        one at or below it in the same epoch, OTHER for everything else."""
        kind = frame.get("type")
        if kind == "message" and "offset" in frame:
            if frame["epoch"] == self.epoch and frame["offset"] <= self.offset:
                return DUPLICATE
            self.offset, self.epoch = frame["offset"], frame["epoch"]
            return NEW
        if kind == "joined" and self.epoch is None:
            self.offset, self.epoch = frame["offset"], frame["epoch"]
            self.joined_at = self.offset
        elif kind == "recovered":
            self.offset, self.epoch = frame["offset"], frame["epoch"]
        return NEW if kind == "message" else OTHER
