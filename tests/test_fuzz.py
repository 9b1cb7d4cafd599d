"""The fuzzer (loadtest/fuzz.py) against the `make run` stack while a well-behaved room chats.

FUZZ_SECONDS bounds the run: seconds in CI, minutes behind `make fuzz`. Judged: every input answered as
documented (the fuzzer's property), no worker restarted, nothing logged at ERROR and no traceback, and
the room's members got every message with no gap, at the default limits and with identity on.
"""

import asyncio
import json
import os
import re

import pytest

from conftest import ROOT, local_stack
from loadtest.fuzz import Fuzzer, nickname_token
from loadtest.member import Conversation

SECONDS = float(os.environ.get("FUZZ_SECONDS", "20"))
IDENTITY = {"CHAT_IDENTITY": "nickname", "CHAT_TOKEN_SECRET": "fuzz-stack-secret-" + "x" * 32}


@pytest.mark.timeout(SECONDS + 240)
async def test_fuzzed_clients_get_documented_answers_and_the_room_misses_nothing():
    with local_stack(**IDENTITY) as stack:
        # 4 messages a second: within the default limit of 5 a second, which this room must not feel.
        room = await Conversation(
            stack["ws"], "calm", resuming=4, plain=2, interval=0.25, token=nickname_token(stack["url"], "calm")
        ).start()
        fuzzer = Fuzzer(stack["url"], SECONDS, token=nickname_token(stack["url"], "fuzzer"))
        counts = await asyncio.to_thread(fuzzer.run, 1_000_000)
        await room.finish()
        report = room.report()
        log = "".join(stack["log"])
    (ROOT / "artifacts").mkdir(exist_ok=True)
    (ROOT / "artifacts" / "fuzz.json").write_text(
        json.dumps({"seconds": SECONDS, "counts": dict(sorted(counts.items())), "room": report}, indent=1)
    )
    print(json.dumps(dict(sorted(counts.items())), indent=1))

    for kind in ("frames", "flood", "handshake", "request"):
        assert counts[f"examples {kind}"] > 0, f"no {kind} examples ran"
    for answer in ("error bad_json", "close 4400", "flood rate_limited", "flood close 4429", "handshake 403", "http 400"):
        assert counts[answer] > 0, f"{answer} never came back: the fuzzer did not reach it"
    assert report["messages_typed"] >= SECONDS * 3
    assert report["typed_messages_in_the_room_once"] and report["lost_for_everyone"] == 0, report
    assert report["resuming_recovered_exactly"] == report["resuming_members"], report
    assert report["v1_missed"] == 0 and report["resuming_reconnects"] == report["v1_reconnects"] == 0, report
    assert log.count("Booting worker with pid") == 3, "a worker was restarted"
    assert not re.search(r'"level": "(ERROR|CRITICAL)"|Traceback', log), [
        line for line in log.splitlines() if "ERROR" in line or "CRITICAL" in line or "Traceback" in line
    ][:5]
