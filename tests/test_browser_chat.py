"""A person chatting: Debian's chromium, driven by Playwright, through the compose ingress."""

import asyncio
import shutil

import pytest
from playwright.async_api import async_playwright, expect

from conftest import ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SCREENSHOTS = ROOT / "artifacts" / "browser"


async def open_room(context, url, room):
    """A room page whose socket is connected; returns it with the X-Served-By of its WebSocket handshake."""
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
    return page, served_by.partition(":")[0]


async def test_two_pages_on_different_containers_chat_and_another_room_hears_nothing(compose_stack):
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian's chromium is not installed: run `sudo docker/host-setup.sh`")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        context = await browser.new_context(viewport={"width": 720, "height": 480})
        alice, alice_container = await open_room(context, compose_stack.url, "browser-room")
        # Round-robin counts every request: a page costs three (index, room, socket), so with three replicas
        # each page's socket would land on the same one. One more request moves bob's along; retry (bounded).
        for _ in range(6):
            await context.request.get(f"{compose_stack.url}/healthz")
            bob, bob_container = await open_room(context, compose_stack.url, "browser-room")
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
