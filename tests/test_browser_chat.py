"""A person chatting: Debian's chromium, driven by Playwright, through the compose ingress."""

import asyncio
import os
import shutil
import signal

import pytest
from playwright.async_api import async_playwright, expect

from conftest import ROOT, local_stack
from loadtest.member import Member, until

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SCREENSHOTS = ROOT / "artifacts" / "browser"


async def open_room(context, url, room):
    """A room page whose socket is connected; returns it with the X-Served-By (host:pid) of its WebSocket handshake."""
    page = await context.new_page()
    cdp = await context.new_cdp_session(page)
    await cdp.send("Network.enable")
    handshakes, handshaken = [], asyncio.Event()

    def on_handshake(event):
        handshakes.append(event["response"]["headers"])
        handshaken.set()

    cdp.on("Network.webSocketHandshakeResponseReceived", on_handshake)
    await page.goto(f"{url}/chat/")
    await page.fill("#room-name-input", room)
    await page.press("#room-name-input", "Enter")
    await expect(page.locator("#chat-status")).to_have_text("connected", timeout=20_000)
    await asyncio.wait_for(handshaken.wait(), 10)
    served_by = {key.lower(): value for key, value in handshakes[-1].items()}["x-served-by"]
    return page, served_by


async def test_two_pages_on_different_containers_chat_and_another_room_hears_nothing(compose_stack):
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian's chromium is not installed: run `sudo docker/host-setup.sh`")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        context = await browser.new_context(viewport={"width": 720, "height": 480})
        alice, alice_served_by = await open_room(context, compose_stack.url, "browser-room")
        alice_container = alice_served_by.partition(":")[0]
        # Round-robin counts every request: a page costs three (index, room, socket), so with three replicas
        # each page's socket would land on the same one. One more request moves bob's along; retry (bounded).
        for _ in range(6):
            await context.request.get(f"{compose_stack.url}/chat/")
            bob, bob_served_by = await open_room(context, compose_stack.url, "browser-room")
            bob_container = bob_served_by.partition(":")[0]
            if bob_container != alice_container:
                break
            await bob.close()
        assert bob_container != alice_container, "both pages' sockets landed on one container"
        carol, _ = await open_room(context, compose_stack.url, "another-room")

        await alice.fill("#chat-message-input", "hello from alice")
        await alice.click("#chat-message-submit")
        await expect(bob.locator("#chat-log")).to_have_value("hello from alice\n", timeout=10_000)
        await expect(alice.locator("#chat-log")).to_have_value("hello from alice\n", timeout=10_000)
        # Carol's own message comes back through the same layer after alice's was fanned out.
        await carol.fill("#chat-message-input", "carol here")
        await carol.press("#chat-message-input", "Enter")
        await expect(carol.locator("#chat-log")).to_have_value("carol here\n", timeout=10_000)
        await expect(bob.locator("#chat-log")).to_have_value("hello from alice\n")

        for name, page in (("alice", alice), ("bob", bob), ("carol", carol)):
            await page.screenshot(path=SCREENSHOTS / f"{name}.png")
        await browser.close()


async def test_page_resumes_after_its_worker_restarts_and_shows_what_was_said_meanwhile():
    """The make run topology: the worker serving a page is stopped while the page cannot reconnect."""
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian's chromium is not installed: run `sudo docker/host-setup.sh`")
    with local_stack(DRAIN_SECONDS="1") as stack:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            context = await browser.new_context(viewport={"width": 720, "height": 480})
            talker = await Member(stack["ws"], "restart-room").start()
            await talker.say("before", nonce="b")
            await until(lambda: not talker.pending, 10, "the first message")
            page, served_by = await open_room(context, stack["url"], "restart-room")
            await expect(page.locator("#chat-log")).to_have_value("before\n", timeout=10_000)  # recent history on open
            await context.set_offline(True)  # the page cannot reconnect until we say so
            os.kill(int(served_by.rpartition(":")[2]), signal.SIGTERM)
            await expect(page.locator("#chat-status")).to_have_text("reconnecting…", timeout=20_000)
            await page.fill("#chat-message-input", "typed while away")
            await page.click("#chat-message-submit")
            await talker.say("during the gap", nonce="d")
            await until(lambda: not talker.pending, 10, "the message sent during the gap")
            await context.set_offline(False)
            await expect(page.locator("#chat-status")).to_have_text("resumed", timeout=30_000)
            await expect(page.locator("#chat-log")).to_have_value("before\nduring the gap\ntyped while away\n", timeout=10_000)
            await until(lambda: [t for *_, t in talker.messages].count("typed while away") == 1, 10, "the typed message once")
            await page.screenshot(path=SCREENSHOTS / "resumed.png")
            await talker.stop()
            await browser.close()


async def test_nickname_pages_chat_under_their_names_and_resume_when_their_token_ends():
    """CHAT_IDENTITY=nickname on the make run topology, with tokens that last 5 s: the page's own flow."""
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian's chromium is not installed: run `sudo docker/host-setup.sh`")
    env = {
        "CHAT_IDENTITY": "nickname",
        "CHAT_TOKEN_SECRET": "browser-" + "k" * 40,
        "CHAT_TOKEN_TTL": "5",
        "CHAT_TOKEN_LEEWAY": "0",
    }
    with local_stack(**env) as stack:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            pages = {}
            for name in ("Alice", "Bob"):
                context = await browser.new_context(viewport={"width": 720, "height": 480})
                page = pages[name] = await context.new_page()
                asked = []  # the names this page asked tokens for
                page.on(
                    "request",
                    lambda request, asked=asked: request.url.endswith("/auth/token") and asked.append(request.post_data),
                )
                await page.goto(f"{stack['url']}/chat/lobby/")  # no name yet: sent to the form, room kept
                await expect(page.locator("#room-name-input")).to_have_value("lobby", timeout=10_000)
                assert asked == [], "a page sent to the form joined the room nameless first"
                await page.fill("#nickname-input", name)
                await page.press("#room-name-input", "Enter")
                await expect(page.locator("#chat-status")).to_have_text("connected", timeout=20_000)
                assert asked == [f"name={name}"]
            # Each page lists who is here, itself included, updated live.
            await expect(pages["Alice"].locator("#chat-member-count")).to_have_text("2", timeout=10_000)
            await expect(pages["Alice"].locator("#chat-member-list li")).to_have_text(["Alice (you)", "Bob"])
            await pages["Alice"].fill("#chat-message-input", "hi")
            await pages["Alice"].click("#chat-message-submit")
            await expect(pages["Bob"].locator("#chat-log")).to_have_value("Alice: hi\n", timeout=10_000)
            # The tokens end: each socket is closed with 4401, the page gets a new token and resumes.
            await expect(pages["Bob"].locator("#chat-status")).to_have_text("resumed", timeout=20_000)
            await expect(pages["Bob"].locator("#chat-member-list li")).to_have_text(["Alice", "Bob (you)"])
            await pages["Bob"].fill("#chat-message-input", "still here")
            await pages["Bob"].click("#chat-message-submit")
            await expect(pages["Alice"].locator("#chat-log")).to_have_value("Alice: hi\nBob: still here\n", timeout=20_000)
            await pages["Alice"].screenshot(path=SCREENSHOTS / "nickname.png")
            await pages["Bob"].close()  # a page closed says goodbye: Bob leaves Alice's list at once
            await expect(pages["Alice"].locator("#chat-member-list li")).to_have_text(["Alice (you)"], timeout=5_000)
            await expect(pages["Alice"].locator("#chat-member-count")).to_have_text("1")
            await browser.close()
