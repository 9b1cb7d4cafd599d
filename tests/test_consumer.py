"""The chat consumer through the whole ASGI app (WebsocketCommunicator) on the cluster layer."""

import json

import pytest
from channels.testing import WebsocketCommunicator

from conftest import ORIGIN, join


async def test_v1_message_reaches_every_member_including_sender(application):
    alice, bob = await join(application, "lobby"), await join(application, "lobby")
    await alice.send_to(text_data=json.dumps({"message": "hello"}))
    assert await alice.receive_json_from(timeout=3) == {"message": "hello"}
    assert await bob.receive_json_from(timeout=3) == {"message": "hello"}
    await alice.disconnect()
    await bob.disconnect()


async def test_rooms_are_isolated(application):
    alice, carol = await join(application, "room-a"), await join(application, "room-b")
    await alice.send_to(text_data=json.dumps({"message": "only a"}))
    assert (await alice.receive_json_from(timeout=3))["message"] == "only a"
    assert await carol.receive_nothing(timeout=0.5)
    await alice.disconnect()
    await carol.disconnect()


async def test_v2_frames_carry_room_sender_nonce_offset_and_epoch(application):
    alice = await join(application, "v2room", v2=True)
    assert alice.joined["room"] == "v2room" and alice.joined["offset"] == 0 and alice.joined["epoch"]
    await alice.send_to(text_data=json.dumps({"message": "hi", "nonce": "n-1"}))
    frame = await alice.receive_json_from(timeout=3)
    assert frame["type"] == "message" and frame["message"] == "hi" and frame["nonce"] == "n-1"
    assert frame["room"] == "v2room" and ":" in frame["sender"] and frame["sent_at"] > 0
    assert frame["offset"] == 1 and frame["epoch"] == alice.joined["epoch"]
    await alice.disconnect()


BAD_FRAMES = [
    ("not json", "bad_json", 4400),
    (json.dumps(["message"]), "bad_frame", 4400),
    (json.dumps({}), "bad_message", 4400),
    (json.dumps({"message": 5}), "bad_message", 4400),
    (json.dumps({"message": None}), "bad_message", 4400),
    (json.dumps({"message": "x", "admin": True}), "unknown_field", 4400),
    (json.dumps({"message": "x" * 101}), "message_too_long", 4413),
    (json.dumps({"message": "é" * 90, "pad": "y" * 900}), "frame_too_large", 4413),
    ('{"message": "\\ud800"}', "bad_message", 4400),
    ('{"message": "x", "nonce": "\\udfff"}', "bad_nonce", 4400),
]


@pytest.mark.parametrize("text,reason,code", BAD_FRAMES)
async def test_v1_bad_input_closes_with_a_clear_code(application, text, reason, code):
    bystander = await join(application, "bad-v1")
    client = await join(application, "bad-v1")
    await client.send_to(text_data=text)
    closed = await client.receive_output(timeout=3)
    assert closed["type"] == "websocket.close" and closed["code"] == code
    assert await bystander.receive_nothing(timeout=0.3), "nothing bad reaches the room"
    await bystander.send_to(text_data=json.dumps({"message": "still here"}))
    assert await bystander.receive_json_from(timeout=3) == {"message": "still here"}
    assert await client.receive_nothing(timeout=0.3), "a closed socket gets no room message before its disconnect"
    await bystander.disconnect()


@pytest.mark.parametrize("text,reason,code", BAD_FRAMES)
async def test_v2_bad_input_gets_an_error_frame_and_stays_open(application, text, reason, code):
    client = await join(application, "bad-v2", v2=True)
    await client.send_to(text_data=text)
    error = await client.receive_json_from(timeout=3)
    assert error["type"] == "error" and error["error"] == reason and error["detail"]
    await client.send_to(text_data=json.dumps({"message": "ok"}))
    assert (await client.receive_json_from(timeout=3))["message"] == "ok"
    await client.disconnect()


def test_json_nested_deeper_than_the_parser_is_bad_json_not_a_crash():
    from django.test import override_settings

    from chat.protocol import BadFrame, parse_client_frame

    with override_settings(CHAT_MAX_FRAME_BYTES=1_000_000):
        with pytest.raises(BadFrame) as refused:
            parse_client_frame("[" * 100_000 + "]" * 100_000, 2)
    assert refused.value.reason == "bad_json"


async def test_a_v1_client_that_sends_on_after_a_bad_frame_gets_one_close(application):
    client = await join(application, "bad-twice")
    await client.send_to(text_data="not json")
    await client.send_to(text_data="not json either")
    closed = await client.receive_output(timeout=3)
    assert closed["type"] == "websocket.close" and closed["code"] == 4400
    assert await client.receive_nothing(timeout=0.3), "a second close was sent"


async def test_binary_frames_are_refused(application):
    v1, v2 = await join(application, "binary"), await join(application, "binary", v2=True)
    await v1.send_to(bytes_data=b"\x00\x01")
    closed = await v1.receive_output(timeout=3)
    assert closed["type"] == "websocket.close" and closed["code"] == 4415
    await v2.send_to(bytes_data=b"\x00\x01")
    assert (await v2.receive_json_from(timeout=3))["error"] == "binary_frame"
    await v2.disconnect()


@pytest.mark.parametrize("room", ["has space", "x" * 65, "émoji", "a.b"])
async def test_invalid_room_name_closes_4404(application, room):
    communicator = WebsocketCommunicator(application, f"/ws/chat/{room}/", headers=ORIGIN)
    connected, _ = await communicator.connect(timeout=5)
    assert connected
    closed = await communicator.receive_output(timeout=3)
    assert closed["type"] == "websocket.close" and closed["code"] == 4404


async def test_invalid_room_v2_gets_error_frame_first(application):
    communicator = WebsocketCommunicator(application, "/ws/chat/bad%20room/", headers=ORIGIN, subprotocols=["chat.v2"])
    await communicator.connect(timeout=5)
    assert (await communicator.receive_json_from(timeout=3))["error"] == "bad_room"
    assert (await communicator.receive_output(timeout=3))["code"] == 4404


async def test_unknown_websocket_path_is_refused(application):
    communicator = WebsocketCommunicator(application, "/ws/nowhere/", headers=ORIGIN)
    connected, _ = await communicator.connect(timeout=5)
    assert not connected


async def test_a_room_of_alternating_v1_and_v2_members_encodes_a_message_once_per_version(application, monkeypatch):
    from chat import consumers, metrics

    members = [await join(application, "mixed", v2=index % 2 == 1) for index in range(20)]
    typed = json.dumps({"message": "to all"})
    encoded = []
    dumps = consumers.json.dumps
    monkeypatch.setattr(consumers.json, "dumps", lambda value, *a, **k: encoded.append(value) or dumps(value, *a, **k))

    def observed():
        return next(s.value for m in metrics.FANOUT_LATENCY.collect() for s in m.samples if s.name.endswith("_count"))

    before = observed()
    await members[0].send_to(text_data=typed)
    for index, member in enumerate(members):
        frame = await member.receive_json_from(timeout=3)
        while index % 2 and frame.get("type") != "message":  # v2 members also hear the later joins
            frame = await member.receive_json_from(timeout=3)
        assert frame["message"] == "to all"
    assert len([value for value in encoded if value.get("message") == "to all"]) == 2
    assert observed() - before == 1
    for member in members:
        await member.disconnect()
