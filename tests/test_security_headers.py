"""The headers a Django site should send on its pages, and a page's scripts allowed by its own policy."""

import re

from django.test import Client, override_settings


@override_settings(ALLOWED_HOSTS=["testserver"], CHAT_IDENTITY="nickname", CHAT_TOKEN_SECRET="h" * 40)
def test_pages_send_a_nonce_policy_no_framing_and_no_sniffing():
    for path in ("/chat/", "/chat/lobby/"):
        response = Client().get(path)
        assert response.status_code == 200
        policy = dict(part.strip().split(" ", 1) for part in response["Content-Security-Policy"].split(";"))
        nonce = re.search(r"'nonce-([^']+)'", policy["script-src"]).group(1)
        scripts = re.findall(r"<script( [^>]*)?>", response.content.decode())
        runnable = [attrs for attrs in scripts if 'type="application/json"' not in (attrs or "")]
        assert runnable and all(f'nonce="{nonce}"' in attrs for attrs in runnable), "every inline script carries the nonce"
        assert policy["default-src"] == "'self'" and policy["connect-src"] == "'self'"
        assert policy["frame-ancestors"] == "'none'" and policy["object-src"] == "'none'" and policy["base-uri"] == "'none'"
        assert response["X-Frame-Options"] == "DENY" and response["X-Content-Type-Options"] == "nosniff"
        assert response["Referrer-Policy"] == "same-origin" and response["Cross-Origin-Opener-Policy"] == "same-origin"
    assert Client().get("/chat/")["Content-Security-Policy"] != Client().get("/chat/")["Content-Security-Policy"], (
        "a nonce per response"
    )
    assert b'id="nickname-input"' in Client().get("/chat/").content
