"""A property-based fuzzer (hypothesis) of a running chat: WebSocket frames (v1 and v2), handshakes and HTTP.

Each example is one client doing one odd thing: random JSON, JSON nested past any parser, huge numbers,
lone surrogates, control characters, invalid UTF-8 in a text frame, binary, fragmented and oversized
frames, floods, random paths, query strings, Origins, subprotocols and tokens, and random HTTP requests.
The property: every one is answered as docs/protocol.md says (its message back, or a documented error
code or close code, or an HTTP status below 500), and a socket that was refused gets one close only.
Whatever the server logs and whether its workers stayed up is judged by the caller (tests/test_fuzz.py).

    python -m loadtest.fuzz --target http://127.0.0.1:8000 --seconds 60
"""

import argparse
import http.client
import json
import string
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

# What the protocol documents (docs/protocol.md); the server's WebSocket library adds 1007 (a text frame
# that is no UTF-8) and 1009 (a frame over its size limit) before the chat sees the frame.
V1_CLOSES = {4400, 4401, 4403, 4404, 4413, 4415, 4429, 4503, 1013, 1007, 1009}
V2_ERRORS = {
    "bad_json",
    "bad_frame",
    "unknown_field",
    "bad_message",
    "message_too_long",
    "frame_too_large",
    "bad_nonce",
    "binary_frame",
    "rate_limited",
    "bad_room",
    "bad_resume",
    "bad_history",
    "token_missing",
    "token_invalid",
    "token_expired",
    "room_forbidden",
    "too_many_rooms",
    "too_many_sockets",
    "worker_full",
    "unavailable",
    "bad_presence",
    "bad_member_key",
}
HANDSHAKE_STATUSES = {403, 404}  # a foreign or missing Origin; not a WebSocket path at all
ANSWER_S = 5.0

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=200)  # surrogates and controls too
messages = st.one_of(
    any_text.map(lambda text: json.dumps({"message": text})),
    st.builds(lambda text, nonce: json.dumps({"message": text, "nonce": nonce}), any_text, json_values),
    st.dictionaries(st.sampled_from(["message", "nonce", "type", "name", "room"]), json_values, max_size=4).map(json.dumps),
    json_values.map(json.dumps),
    st.integers(1, 60_000).map(lambda depth: "[" * depth + "]" * depth),
    st.integers(1, 60_000).map(lambda depth: '{"message":' + "[" * depth),
    st.integers(300, 20_000).map(lambda digits: '{"message": 1' + "0" * digits + "}"),
    st.sampled_from(
        [
            '{"message": 1e999}',
            '{"message": NaN}',
            '{"message": "\\ud800"}',
            '{"message": "\\u0000"}',
            "",
            "null",
            "{",
            '{"message": "a"} trailing',
        ]
    ),
    st.integers(10_000, 120_000).map(lambda size: json.dumps({"message": "x" * size})),
    any_text,
)
frames = st.one_of(
    messages.map(lambda text: ("text", text)),
    st.binary(max_size=300).map(lambda data: ("binary", data)),
    st.binary(min_size=1, max_size=40).filter(lambda b: not _utf8(b)).map(lambda data: ("bad_utf8", data)),
    st.lists(st.text(max_size=30), min_size=2, max_size=5).map(lambda parts: ("fragments", parts)),
)
query_values = st.one_of(st.text(max_size=30), st.integers(-5, 10**20).map(str), st.sampled_from(["0", "1", "abc", "00ff"]))
queries = st.dictionaries(
    st.sampled_from(["since", "epoch", "history", "token", "presence", "member_key", "x"]), query_values, max_size=4
)
http_paths = st.one_of(
    st.sampled_from(
        [
            "/",
            "/chat/",
            "/chat/lobby/",
            "/chat/bad%20room/",
            "/auth/token",
            "/healthz",
            "/readyz",
            "/metrics",
            "/ws/chat/lobby/",
            "/static/x.js",
            "/chat/" + "a" * 300 + "/",
        ]
    ),
    st.text(string.printable.strip(), max_size=60).map(lambda p: "/" + urllib.parse.quote(p, safe="/?&=%")),
)


def _utf8(data):
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


class Fuzzer:
    """Runs examples against ``target`` (http://127.0.0.1:port) until ``seconds`` pass; ``counts`` what came back."""

    def __init__(self, target, seconds, token=None):
        self.http = target.rstrip("/")
        self.ws = "ws" + self.http[4:]
        self.host = urllib.parse.urlsplit(self.http)
        self.deadline = time.monotonic() + seconds
        self.token = token  # a valid token to join with, where the chat asks for one
        self.counts = Counter()
        self.sockets = 0

    def socket(self, room, v2, query=None, **options):
        query = dict(query or {})
        if self.token and "token" not in query:
            query["token"] = self.token
        url = f"{self.ws}/ws/chat/{room}/" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        options.setdefault("origin", self.http)
        self.sockets += 1
        return connect(
            url,
            subprotocols=["chat.v2"] if v2 else None,
            proxy=None,
            compression=None,
            open_timeout=ANSWER_S,
            close_timeout=2,
            max_size=None,
            **options,
        )

    def frames(self, v2, sent):
        """Send ``sent`` on a fresh socket; each must be answered by its message or a documented code."""
        with self.socket(f"fuzz-{self.sockets % 7}", v2) as ws:
            if v2:
                assert json.loads(ws.recv(ANSWER_S))["type"] == "joined"
            for kind, data in sent:
                try:
                    if kind == "text" and not _utf8(data.encode("utf-8", "surrogatepass")):
                        ws.send(data.encode("utf-8", "surrogatepass"), text=True)  # a lone surrogate: no UTF-8
                    elif kind == "text":
                        ws.send(data)
                    elif kind == "binary":
                        ws.send(data)
                    elif kind == "bad_utf8":
                        ws.send(data, text=True)
                    else:
                        ws.send(iter(data))
                    answer = json.loads(ws.recv(ANSWER_S))
                except ConnectionClosed as closed:
                    code = closed.rcvd.code if closed.rcvd else None
                    assert code in V1_CLOSES, f"{kind} {str(data)[:80]!r}: closed with {code}"
                    self.counts[f"close {code}"] += 1
                    return
                if answer.get("type") == "error":
                    assert v2 and answer["error"] in V2_ERRORS and answer["detail"], answer
                    self.counts[f"error {answer['error']}"] += 1
                    continue
                text = data if kind == "text" else "".join(data) if kind == "fragments" else None
                assert text is not None and json.loads(text)["message"] == answer["message"], (kind, data, answer)
                self.counts["message back"] += 1

    def flood(self, v2, count):
        """More messages than the burst, at once: the room gets the burst, the rest is refused as documented."""
        with self.socket(f"flood-{self.sockets % 3}", v2) as ws:
            if v2:
                ws.recv(ANSWER_S)
            for n in range(count):
                ws.send(json.dumps({"message": f"flood {n}"}))
            answers = Counter()
            try:
                for _ in range(count):
                    frame = json.loads(ws.recv(ANSWER_S))
                    answers[frame.get("error", "message")] += 1
            except ConnectionClosed as closed:
                assert not v2 and closed.rcvd and closed.rcvd.code == 4429, closed
                answers["close 4429"] += 1
            assert set(answers) <= {"message", "rate_limited", "close 4429"}, answers
            self.counts.update({f"flood {k}": v for k, v in answers.items()})

    def handshake(self, path, query, origin, subprotocols):
        """A handshake with a random path, query, Origin and subprotocols: refused clearly or joined."""
        if self.token and "token" not in query:
            query = {**query, "token": self.token}
        url = f"{self.ws}/ws/{urllib.parse.quote(path, safe='/%')}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        try:
            with connect(
                url,
                origin=origin,
                subprotocols=subprotocols or None,
                proxy=None,
                open_timeout=ANSWER_S,
                close_timeout=2,
                compression=None,
            ) as ws:
                try:
                    frame = json.loads(ws.recv(ANSWER_S if ws.subprotocol else 0.3))
                    outcome = f"accepted, {frame.get('type')} {frame.get('error', '')}".strip()
                    if frame.get("type") == "error":
                        assert frame["error"] in V2_ERRORS, frame
                except TimeoutError:
                    outcome = "accepted"  # v1: nothing is said until the room talks
                except ConnectionClosed as closed:
                    code = closed.rcvd.code if closed.rcvd else None
                    assert code in V1_CLOSES or code == 1000, f"/ws/{path}: closed with {code}"
                    outcome = f"close {code}"
        except InvalidStatus as refused:
            status = refused.response.status_code
            assert status in HANDSHAKE_STATUSES, f"/ws/{path}: HTTP {status}"
            outcome = f"handshake {status}"
        self.counts[outcome] += 1

    def request(self, method, path, headers, body):
        """Any HTTP request: answered below 500, and the worker keeps serving."""
        connection = http.client.HTTPConnection(self.host.hostname, self.host.port, timeout=ANSWER_S)
        try:
            connection.putrequest(method, path, skip_host="host" in headers, skip_accept_encoding=True)
            for name, value in headers.items():
                connection.putheader(name, value)
            connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
            status = connection.getresponse().status
        finally:
            connection.close()
        assert status < 500, f"{method} {path} {headers}: HTTP {status}"
        self.counts[f"http {status}"] += 1

    def run(self, examples, batch=25):
        """Up to ``examples`` examples until the deadline, in batches of fresh random ones; what came back."""
        header_values = st.text(string.ascii_letters + string.digits + " ./:-_;=,", max_size=40)

        # derandomize off also under CI=true (hypothesis's CI profile would repeat one batch all run long).
        @settings(
            max_examples=batch,
            deadline=None,
            database=None,
            derandomize=False,
            phases=[Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        )
        @given(
            st.one_of(
                st.tuples(st.just("frames"), st.booleans(), st.lists(frames, min_size=1, max_size=3)),
                st.tuples(st.just("flood"), st.booleans(), st.integers(35, 60)),
                st.tuples(
                    st.just("handshake"),
                    st.one_of(
                        st.sampled_from(["chat/lobby/", "chat/fuzz/", "chat//", "chat/a b/", "other/"]), st.text(max_size=70)
                    ),
                    queries,
                    st.one_of(st.just(self.http), st.just(self.http), st.none(), header_values),
                    st.lists(st.sampled_from(["chat.v2", "chat.v3", "x"]), max_size=2, unique=True),
                ),
                st.tuples(
                    st.just("request"),
                    st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "BREW"]),
                    http_paths,
                    st.dictionaries(
                        st.sampled_from(["host", "content-type", "cookie", "x-forwarded-for", "origin"]),
                        header_values,
                        max_size=3,
                    ),
                    st.binary(max_size=300),
                ),
            )
        )
        def example(case):
            kind, *args = case
            getattr(self, kind)(*args)
            self.counts[f"examples {kind}"] += 1
            self.counts["examples"] += 1

        while time.monotonic() < self.deadline and self.counts["examples"] < examples:
            example()
        return self.counts


def nickname_token(target, name="fuzzer"):
    """A token from the chat's nickname form (CHAT_IDENTITY=nickname)."""
    data = urllib.parse.urlencode({"name": name}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{target}/auth/token", data=data), timeout=10) as response:
        return json.load(response)["token"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="http://127.0.0.1:8000")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--examples", type=int, default=1_000_000, help="at most this many, within --seconds")
    parser.add_argument("--nickname", action="store_true", help="join with a token from the nickname form")
    args = parser.parse_args()
    fuzzer = Fuzzer(args.target, args.seconds, nickname_token(args.target) if args.nickname else None)
    counts = fuzzer.run(args.examples)
    json.dump(dict(sorted(counts.items())), sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
