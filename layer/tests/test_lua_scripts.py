"""The layer's Lua scripts: each file opens with its contract, and what Redis runs is the file with its
fragments and the wire format's constants in place."""

from importlib.resources import files

from channels_redis_cluster import scripts, wire

LUA = files("channels_redis_cluster").joinpath("lua")


def script_names():
    return sorted(p.name.removesuffix(".lua") for p in LUA.iterdir() if p.name.endswith(".lua"))


def test_every_script_opens_with_a_comment_that_says_its_keys_or_arguments():
    names = script_names()
    assert len(names) >= 14
    for name in names:
        head = LUA.joinpath(f"{name}.lua").read_text().splitlines()[0]
        assert head.startswith("-- "), name
        contract = "\n".join(line for line in LUA.joinpath(f"{name}.lua").read_text().splitlines() if line.startswith("--"))
        assert "KEYS" in contract or "ARGV" in contract, name


def test_a_script_carries_its_fragments_once_and_the_constants_of_the_wire_format():
    text = scripts.source("history_send")
    assert text.startswith(wire.LUA_CONSTANTS)
    assert f"local TIME_CHARS, ENTRY_BODY = {wire.TIME_CHARS}, {wire.ENTRY_BODY}" in text
    # drop_expired comes through the prologue only once though two parts include it.
    assert text.count("local function drop_expired") == 1 and text.count("local function outlive") == 1
    assert scripts.INCLUDE not in text
