"""Identity: signed tokens any worker checks at the handshake, the nickname form's token, names on frames."""

import json
import time

import jwt
import pytest
from django.test import AsyncClient, override_settings
from test_abuse_limits import IDENTITY_ON, SECRET, refused, rejected

from chat.tokens import mint
from conftest import ROOT, join


def forged(**claims):
    """A token with these claims over the usual ones, signed with SECRET unless ``key`` says otherwise."""
    key = claims.pop("key", SECRET)
    algorithm = claims.pop("algorithm", "HS256")
    base = {"sub": "u1", "name": "U", "rooms": ["*"], "aud": "chat", "exp": int(time.time()) + 600}
    return jwt.encode({k: v for k, v in {**base, **claims}.items() if v is not None}, key, algorithm=algorithm)


# Claims, not tokens: a token minted at collection would expire before a long run reaches its test.
BAD_TOKENS = [
    ("", "token_missing"),
    ("?token=", "token_missing"),
    ("?token=not-a-jwt", "token_invalid"),
    ({"exp": -60}, "token_expired"),
    ({"key": "another-site-secret-of-40-characters!!"}, "token_invalid"),
    ({"aud": "some-other-service"}, "token_invalid"),
    ({"exp": None}, "token_invalid"),
    ({"algorithm": "none", "key": None}, "token_invalid"),
    ({"name": ""}, "token_invalid"),
    ({"name": 7}, "token_invalid"),
    ({"rooms": "lobby"}, "token_invalid"),
    ({"name": chr(0xD800)}, "token_invalid"),
]


@pytest.mark.parametrize("query,reason", BAD_TOKENS)
async def test_bad_expired_and_foreign_tokens_are_refused_with_4401_and_counted(application, query, reason):
    if isinstance(query, dict):
        claims = {**query, "exp": int(time.time()) + query["exp"]} if query.get("exp") else query
        query = f"?token={forged(**claims)}"
    with override_settings(**IDENTITY_ON):
        before = rejected(reason)
        error = await refused(application, "lobby", 4401, query, v2=True)
        assert error["error"] == reason and error["detail"]
        await refused(application, "lobby", 4401, query)
        assert rejected(reason) - before == 2


async def test_a_token_opens_only_the_rooms_it_names(application):
    with override_settings(**IDENTITY_ON):
        token = mint("u2", "Team member", rooms=["team-*", "lobby"])
        error = await refused(application, "elsewhere", 4403, f"?token={token}", v2=True)
        assert error["error"] == "room_forbidden"
        for room in ("team-red", "lobby"):
            await (await join(application, room, query=f"?token={token}")).disconnect()


async def test_v2_frames_carry_the_senders_name_and_no_client_can_set_it(application):
    with override_settings(**IDENTITY_ON):
        alice = await join(application, "names", v2=True, query=f"?token={mint('alice', 'Alice')}")
        bob = await join(application, "names", query=f"?token={mint('bob', 'Bob')}")
        await bob.send_to(text_data=json.dumps({"message": "hi"}))
        frame = await alice.receive_json_from(timeout=3)
        assert frame["message"] == "hi" and frame["name"] == "Bob"
        assert await bob.receive_json_from(timeout=3) == {"message": "hi"}, "v1 frames stay the tutorial's"
        await alice.send_to(text_data=json.dumps({"message": "x", "name": "Bob"}))
        assert (await alice.receive_json_from(timeout=3))["error"] == "unknown_field"
        await alice.disconnect()
        await bob.disconnect()


async def test_without_identity_frames_carry_no_name_and_tokens_are_not_asked_for(application):
    alice = await join(application, "anon", v2=True)
    await alice.send_to(text_data=json.dumps({"message": "hi"}))
    assert "name" not in await alice.receive_json_from(timeout=3)
    await alice.disconnect()


async def test_a_socket_is_closed_with_4401_when_its_token_ends(application):
    with override_settings(**IDENTITY_ON):
        client = await join(application, "ending", v2=True, query=f"?token={mint('brief', 'Brief', ttl=2)}")
        error = await client.receive_json_from(timeout=5)
        assert error == {"type": "error", "error": "token_expired", "detail": error["detail"]}
        closed = await client.receive_output(timeout=3)
        assert closed["type"] == "websocket.close" and closed["code"] == 4401
        await client.disconnect()


async def test_the_nickname_form_signs_a_token_any_worker_accepts(application):
    with override_settings(**IDENTITY_ON):
        response = await AsyncClient().post("/auth/token", {"name": " Dana "})
        assert response.status_code == 200
        body = response.json()
        assert body["name"] == "Dana" and body["expires_at"] > time.time() + 500
        claims = jwt.decode(body["token"], SECRET, algorithms=["HS256"], audience="chat")
        assert claims["sub"] == "nickname:Dana" and claims["rooms"] == ["*"]
        await (await join(application, "any-room", query=f"?token={body['token']}")).disconnect()
        for name in ("", "x" * 65, "tab\there", "\x00"):
            response = await AsyncClient().post("/auth/token", {"name": name})
            assert response.status_code == 400 and response.json()["error"] == "bad_name"
        assert (await AsyncClient().get("/auth/token")).status_code == 405


async def test_without_the_nickname_mode_no_token_is_signed(application):
    for mode in ("off", "token"):
        with override_settings(**{**IDENTITY_ON, "CHAT_IDENTITY": mode}):
            assert (await AsyncClient().post("/auth/token", {"name": "Eve"})).status_code == 404


def test_settings_refuse_identity_without_a_strong_shared_secret():
    import subprocess
    import sys

    for env, ok in (
        ({"CHAT_IDENTITY": "nickname"}, False),
        ({"CHAT_IDENTITY": "token", "CHAT_TOKEN_SECRET": "short"}, False),
        ({"CHAT_IDENTITY": "sometimes"}, False),
        ({"CHAT_IDENTITY": "token", "CHAT_TOKEN_SECRET": SECRET}, True),
    ):
        result = subprocess.run(
            [sys.executable, "-c", "import chatsite.settings"],
            capture_output=True,
            text=True,
            env={"PYTHONPATH": str(ROOT / "services"), **env},
        )
        assert (result.returncode == 0) == ok, (env, result.stderr[-300:])
        if not ok:
            assert "ImproperlyConfigured: CHAT_" in result.stderr
