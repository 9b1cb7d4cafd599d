"""The layer packs its commands itself: byte for byte what redis-py's packer makes, and the same refusals."""

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from channels_redis_cluster import cluster
from channels_redis_cluster.cluster import pack_commands


class StrSubclass(str):
    pass


class IntSubclass(int):
    pass


class FloatSubclass(float):
    pass


COMMANDS = [
    (
        "EVALSHA",
        "a" * 40,
        4,
        "k1",
        b"k2",
        "{p:g:room}:log",
        -7,
        1732838400123,
        0.25,
        "é ü",
        b"",
        bytearray(b"ba"),
        memoryview(b"mv"),
    ),
    ("SPUBLISH", "chan", b"\x00\xff" * 300),
    ("SET", StrSubclass("k"), IntSubclass(3), FloatSubclass(0.5)),
    ("PING",),
]


def test_commands_pack_as_redis_py_packs_them():
    assert pack_commands(COMMANDS) == b"".join(Connection().pack_commands(COMMANDS))


def test_commands_hiredis_packs_pack_as_redis_py_packs_them():
    """The common case, which hiredis' C packer takes (the extra is installed here): the same bytes."""
    plain = [command for command in COMMANDS if all(type(arg) in (str, bytes, int, float) for arg in command)]
    assert cluster._pack_command is not None and len(plain) >= 2
    assert pack_commands(plain) == b"".join(Connection().pack_commands(plain))


@pytest.mark.parametrize("bad", [True, None, object(), ["list"]])
def test_an_argument_redis_py_refuses_is_refused(bad):
    with pytest.raises(DataError):
        Connection().pack_commands([("SET", "k", bad)])
    with pytest.raises(DataError):
        pack_commands([("SET", "k", bad)])
