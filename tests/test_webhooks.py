"""Webhooks, delivered to real receivers on loopback: one that checks every signature, and ones
that answer with a gzip bomb or a byte at a time."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import http.server
import json
import os
import re
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.storage.webhooks import Attempt, WebhookSender, sign, verify_signature
from tests.documents import make_pdf
from tests.servers import wait_for
from tests.test_hostile_http import PeakRss
from tests.test_tenants import auth, tenant, write_tenants

WEBHOOK_SECRET = "whsec-test-0123456789"
TENANT_SECRET = "whsec-acme-own-9876543210"


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    signature_ok: bool
    answered: int


class Receiver:
    """An HTTP server that verifies signatures as the README tells receivers to, and answers
    ``fail_first`` requests with 500 (or every request, with ``always=...``) before it accepts."""

    def __init__(
        self, *, fail_first: int = 0, always: int | None = None, secret: str = WEBHOOK_SECRET
    ) -> None:
        self.deliveries: list[Delivery] = []
        self.secret = secret
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ok = receiver_verifies(self.headers, body, receiver.secret)
                count = len(receiver.deliveries)
                status = always or (500 if count < fail_first else 204)
                if not ok:
                    status = 401
                receiver.deliveries.append(Delivery(dict(self.headers), body, ok, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hooks/dsocr"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def receiver_verifies(headers: Mapping[str, str], body: bytes, secret: str, tolerance: int = 300) -> bool:
    """The receiver's side, written from the documented format (README "Webhooks", scheme v2), not
    from the service's code."""
    parts = dict(item.split("=", 1) for item in headers.get("X-Dsocr-Signature", "").split(","))
    timestamp = int(parts["t"])
    signed = f"{timestamp}.{headers['X-Dsocr-Delivery']}.{headers['X-Dsocr-Event']}.".encode() + body
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts["v2"]) and abs(time.time() - timestamp) <= tolerance


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    started: list[Receiver] = []
    yield started
    for receiver in started:
        receiver.close()


def webhook_ended(client: httpx.Client, task_id: str) -> dict:
    def poll() -> dict | None:
        view = client.get(f"/v1/tasks/{task_id}").json()
        hook = view.get("webhook")
        return view if hook is not None and hook["status"] in ("succeeded", "failed") else None

    return wait_for(poll, timeout=60)


def upload(client: httpx.Client, callback_url: str, pages: int = 1) -> httpx.Response:
    return client.post(
        "/v1/tasks/upload",
        files={"file": ("paper.pdf", make_pdf(pages, picture_page=None))},
        data={"callback_url": callback_url},
    )


def test_webhook_is_signed_and_retried_until_the_receiver_accepts(make_server, receivers):
    receiver = Receiver(fail_first=2)
    receivers.append(receiver)
    server = make_server(webhook_secret=WEBHOOK_SECRET, webhook_backoff_seconds=0.05, url_allow_private=True)
    submitted = upload(server.client, receiver.url)
    assert submitted.status_code == 202, submitted.text
    task_id = submitted.json()["task_id"]
    assert submitted.json()["options"]["callback_url"] == receiver.url

    view = webhook_ended(server.client, task_id)
    assert view["status"] == "succeeded"
    hook = view["webhook"]
    assert hook["status"] == "succeeded"
    assert hook["attempts"] == 3
    assert hook["response_status"] == 204
    assert hook["error"] is None

    assert [d.answered for d in receiver.deliveries] == [500, 500, 204]
    assert all(d.signature_ok for d in receiver.deliveries)
    first = receiver.deliveries[0]
    assert {d.headers["X-Dsocr-Delivery"] for d in receiver.deliveries} == {hook["delivery_id"]}
    assert {d.body for d in receiver.deliveries} == {first.body}  # the same body on every try
    assert first.headers["X-Dsocr-Event"] == "task.succeeded"
    assert first.headers["Content-Type"] == "application/json"
    sent = json.loads(first.body)
    assert sent["task_id"] == task_id
    assert sent["status"] == "succeeded"
    assert sent["links"]["markdown"] == f"/v1/tasks/{task_id}/result.md"
    metrics = server.client.get("/metrics").text
    assert 'dsocr_webhook_deliveries_total{outcome="succeeded"} 1.0' in metrics


def test_failed_and_canceled_tasks_are_reported_and_deliveries_give_up(make_server, receivers):
    accepting, refusing = Receiver(), Receiver(always=503)
    receivers.extend([accepting, refusing])
    server = make_server(
        webhook_secret=WEBHOOK_SECRET,
        webhook_backoff_seconds=0.05,
        webhook_max_attempts=2,
        url_allow_private=True,
        fail_on_call=1,
    )
    failing = upload(server.client, accepting.url).json()["task_id"]  # the engine's first call fails
    canceled = upload(server.client, refusing.url).json()["task_id"]  # waits behind it: one worker
    assert server.client.delete(f"/v1/tasks/{canceled}").json()["status"] == "canceled"

    view = webhook_ended(server.client, failing)
    assert view["status"] == "failed"
    assert view["webhook"]["status"] == "succeeded"
    (delivery,) = accepting.deliveries
    assert delivery.headers["X-Dsocr-Event"] == "task.failed"
    assert json.loads(delivery.body)["error"]["code"] == "engine_error"

    view = webhook_ended(server.client, canceled)
    assert view["status"] == "canceled"
    hook = view["webhook"]
    assert hook["status"] == "failed"
    assert hook["attempts"] == 2
    assert hook["response_status"] == 503
    assert hook["error"] == {"code": "webhook_failed", "message": "the receiver answered 503"}
    assert [d.headers["X-Dsocr-Event"] for d in refusing.deliveries] == ["task.canceled"] * 2


def test_callback_urls_are_checked_at_submit(make_server):
    server = make_server(webhook_secret=WEBHOOK_SECRET)
    # Loopback only: were a check to let one through, the delivery must not leave this machine.
    for url in ("http://127.0.0.1:9/hook", "http://localhost:9/hook", "http://[::1]:9/hook"):
        refused = upload(server.client, url)
        assert refused.status_code == 400, (url, refused.text)
        assert refused.json()["error"]["code"] == "url_not_allowed"
    for url in ("ftp://example.org/hook", "not a url"):
        refused = upload(server.client, url)
        assert refused.status_code == 422, (url, refused.text)
        assert refused.json()["error"]["code"] == "invalid_options"
    assert server.task_dirs() == []
    assert server.spool_files() == []

    unsigned = make_server()  # no APP_WEBHOOK_SECRET: webhooks could not be signed, so none are taken
    refused = upload(unsigned.client, "http://127.0.0.1:9/hook")
    assert refused.status_code == 422
    assert "APP_WEBHOOK_SECRET" in refused.json()["error"]["message"]
    assert unsigned.task_dirs() == []


def test_signature_reference_check():
    body = b'{"task_id": "x"}'
    signed = {"event": "task.succeeded", "delivery_id": "d1"}
    header = sign(b"secret", body, 1_700_000_000, **signed)
    assert header.startswith("t=1700000000,v2=")
    assert verify_signature(b"secret", body, header, **signed, now=1_700_000_100)
    assert not verify_signature(b"secret", body + b" ", header, **signed, now=1_700_000_100)  # body changed
    assert not verify_signature(b"other", body, header, **signed, now=1_700_000_100)  # another secret
    assert not verify_signature(b"secret", body, header, **signed, now=1_700_001_000)  # too old: a replay
    # The delivery id and the event are signed: a capture replayed as another delivery or event fails.
    assert not verify_signature(
        b"secret", body, header, event="task.failed", delivery_id="d1", now=1_700_000_100
    )
    assert not verify_signature(
        b"secret", body, header, event="task.succeeded", delivery_id="d2", now=1_700_000_100
    )


def test_each_tenant_s_webhooks_are_signed_with_its_own_secret_else_the_global_one(
    make_server, receivers, tmp_path
):
    own, shared = Receiver(secret=TENANT_SECRET), Receiver()
    receivers.extend([own, shared])
    path = write_tenants(
        tmp_path / "tenants.yaml",
        tenant("acme", "sk_acme", webhook_secret=TENANT_SECRET),
        tenant("beta", "sk_beta"),
    )
    server = make_server(webhook_secret=WEBHOOK_SECRET, url_allow_private=True, tenants_file=path)
    with (
        httpx.Client(base_url=server.url, headers=auth("sk_acme"), timeout=60) as acme,
        httpx.Client(base_url=server.url, headers=auth("sk_beta"), timeout=60) as beta,
    ):
        for client, receiver in ((acme, own), (beta, shared)):
            task_id = upload(client, receiver.url).json()["task_id"]
            hook = webhook_ended(client, task_id)["webhook"]
            assert (hook["status"], hook["attempts"], hook["response_status"]) == ("succeeded", 1, 204)
    (mine,), (theirs,) = own.deliveries, shared.deliveries
    assert mine.signature_ok
    assert theirs.signature_ok
    # acme's receiver holds no key that signs beta's deliveries, nor beta's (the global one) acme's.
    assert not receiver_verifies(mine.headers, mine.body, WEBHOOK_SECRET)
    assert not receiver_verifies(theirs.headers, theirs.body, TENANT_SECRET)

    unsigned = make_server(tenants_file=path, url_allow_private=True)  # no APP_WEBHOOK_SECRET
    with httpx.Client(base_url=unsigned.url, headers=auth("sk_beta"), timeout=60) as beta:
        refused = upload(beta, shared.url)
        assert refused.status_code == 422  # beta has no secret of its own: nothing could sign
        assert "webhook_secret" in refused.json()["error"]["message"]
    assert unsigned.task_dirs() == []


def readme_verifier() -> Callable[..., bool]:
    """The receiver's ``verify`` exactly as README "Webhooks" prints it."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text[text.index("## Webhooks") : text.index("## Downloads and share links")]
    start = section.index("```python") + len("```python")
    namespace: dict[str, object] = {}
    exec(section[start : section.index("```", start)], namespace)  # noqa: S102 - our own README
    verify = namespace["verify"]
    assert callable(verify)
    return verify


@pytest.mark.parametrize(
    "header",
    [
        "",
        "v2=abc",
        "t=1700000000",
        "t=1700000000,v2",  # a part without "="
        "garbage",
        ",,,",
        "t=1700000000,v1=" + "0" * 64,  # the old scheme alone
        "t=\u00b2,v2=" + "0" * 64,
        "t=1700000000,v2=" + "\u00e9" * 64,  # not ASCII: compare_digest would raise on it
        "t=1700000000,v2=" + "0" * 63,
        "t=1700000000,t=1700000001,v2=" + "0" * 64,  # a repeated field
        "t=" + "9" * 400 + ",v2=" + "0" * 64,  # more digits than int() converts
    ],
)
def test_malformed_signature_headers_are_refused_without_an_exception(header):
    assert not verify_signature(
        b"secret", b"{}", header, event="task.succeeded", delivery_id="d1", now=1_700_000_100
    )
    # The README's verifier, which receivers copy, refuses them as cleanly.
    headers = {"X-Dsocr-Signature": header, "X-Dsocr-Delivery": "d1", "X-Dsocr-Event": "task.succeeded"}
    assert readme_verifier()(b"secret", b"{}", headers) is False


def test_the_readme_verifier_accepts_what_the_service_signs_and_nothing_else():
    verify = readme_verifier()
    now = int(time.time())
    header = sign(b"secret", b"{}", now, event="task.succeeded", delivery_id="d1")
    headers = {"X-Dsocr-Signature": header, "X-Dsocr-Delivery": "d1", "X-Dsocr-Event": "task.succeeded"}
    assert verify(b"secret", b"{}", headers)
    assert not verify(b"other", b"{}", headers)
    assert not verify(b"secret", b"{}", {**headers, "X-Dsocr-Event": "task.failed"})
    assert not verify(b"secret", b"{}", {**headers, "X-Dsocr-Delivery": "d2"})
    assert not verify(b"secret", b"{} ", headers)
    assert not verify(b"secret", b"{}", {k: v for k, v in headers.items() if k != "X-Dsocr-Signature"})


def test_a_delivery_cut_short_by_a_restart_resumes(make_server, receivers):
    receiver = Receiver()
    receivers.append(receiver)
    settings = {"webhook_secret": WEBHOOK_SECRET, "url_allow_private": True}
    first = make_server(**settings)
    task_id = upload(first.client, receiver.url).json()["task_id"]
    delivery_id = webhook_ended(first.client, task_id)["webhook"]["delivery_id"]

    # As if the process had died mid-delivery: the record still says "running".
    record_path = first.data_dir / "tasks" / task_id / "task.json"
    record = json.loads(record_path.read_text())
    record["webhook"]["status"] = "running"
    record_path.write_text(json.dumps(record))

    second = make_server(data_dir=first.data_dir, **settings)
    view = webhook_ended(second.client, task_id)
    assert view["webhook"]["status"] == "succeeded"
    assert [d.headers["X-Dsocr-Delivery"] for d in receiver.deliveries] == [delivery_id, delivery_id]

    # The address guard runs again at connect time: once private targets are no longer allowed, the
    # same resumed delivery is refused without a connection, and not retried.
    record = json.loads(record_path.read_text())
    record["webhook"]["status"] = "pending"
    record_path.write_text(json.dumps(record))
    third = make_server(data_dir=first.data_dir, webhook_secret=WEBHOOK_SECRET)
    hook = webhook_ended(third.client, task_id)["webhook"]
    assert hook["status"] == "failed"
    assert hook["attempts"] == 3  # counted over the delivery's life: two runs delivered, this one refused
    assert "non-public address" in hook["error"]["message"]
    assert hook["response_status"] is None
    assert len(receiver.deliveries) == 2


# --- receivers that misbehave: the sender's memory and time stay bounded ---------------------------

BOMB_BYTES = 256 * 1024 * 1024  # what the gzip answer inflates to (it is about 250 kB on the wire)


class RawReceiver:
    """A TCP server on loopback that reads each request, then hands its socket to ``answer``, in a
    thread per connection: for receivers that misbehave below what http.server lets one write."""

    def __init__(self, answer: Callable[[socket.socket, threading.Event], None]) -> None:
        self.requests: list[bytes] = []  # the head of every request, as received
        self.stopped = threading.Event()
        self._answer = answer
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/hooks/dsocr"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # the listener is closed at the end
            while True:
                conn, _ = self._listener.accept()
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the sender hangs up: that is the point
            received = b""
            while b"\r\n\r\n" not in received:
                received += conn.recv(65536)
            head, _, body = received.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            while len(body) < length:
                body += conn.recv(65536)
            self.requests.append(head)
            self._answer(conn, self.stopped)

    def close(self) -> None:
        self.stopped.set()
        self._listener.close()


def gzip_bomb(size: int) -> bytes:
    """``size`` zero bytes, gzipped, made a MiB at a time (this process never holds ``size`` bytes)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # 16+: the gzip container
    zeros = bytes(1024 * 1024)
    return b"".join(packer.compress(zeros) for _ in range(size // len(zeros))) + packer.flush()


def answer_gzip_bomb(bomb: bytes) -> Callable[[socket.socket, threading.Event], None]:
    def answer(conn: socket.socket, stopped: threading.Event) -> None:
        head = f"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {len(bomb)}\r\n\r\n"
        conn.sendall(head.encode() + bomb)

    return answer


def dribble(head: bytes) -> Callable[[socket.socket, threading.Event], None]:
    """Send ``head``, then a byte every 50 ms until the sender hangs up: no read ever waits long
    enough for a per-read timeout to fire."""

    def answer(conn: socket.socket, stopped: threading.Event) -> None:
        conn.sendall(head)
        while not stopped.wait(0.05):
            conn.sendall(b"a")

    return answer


def deliver(receiver: RawReceiver, *, timeout_seconds: float, max_attempts: int = 1) -> tuple[Attempt, float]:
    """Deliver one webhook with a sender configured as the service configures it; the last try and
    the seconds the delivery took. A delivery that does not end within 30 s fails the test."""
    sender = WebhookSender(
        allow_private=True,  # the receiver is on loopback
        timeout_seconds=timeout_seconds,
        max_attempts=max_attempts,
        backoff_seconds=0.05,
        user_agent="dsocr-server/test",
    )

    async def run() -> Attempt:
        async def recorded(attempt: Attempt) -> None:
            pass

        return await asyncio.wait_for(
            sender.deliver(
                receiver.url,
                b'{"task_id": "x"}',
                secret=WEBHOOK_SECRET.encode(),
                event="task.succeeded",
                delivery_id="d1",
                on_attempt=recorded,
            ),
            timeout=30,
        )

    started = time.monotonic()
    attempt = asyncio.run(run())
    return attempt, time.monotonic() - started


@pytest.fixture
def raw_receivers() -> Iterator[list[RawReceiver]]:
    started: list[RawReceiver] = []
    yield started
    for receiver in started:
        receiver.close()


def test_a_gzip_bomb_answer_costs_the_sender_no_memory(raw_receivers):
    bomb = gzip_bomb(BOMB_BYTES)
    receiver = RawReceiver(answer_gzip_bomb(bomb))
    raw_receivers.append(receiver)
    with PeakRss(os.getpid()) as rss:  # the sender runs in this process
        attempt, _ = deliver(receiver, timeout_seconds=10)
    assert attempt.delivered, attempt
    assert attempt.status_code == 200
    assert rss.growth < 32 * 1024 * 1024, f"the sender grew by {rss.growth / 2**20:.0f} MiB"
    (head,) = receiver.requests
    assert re.search(rb"(?im)^accept-encoding: identity\r?$", head), head


@pytest.mark.parametrize(
    ("head", "delivered"),
    [
        # Headers that never end: only a deadline over the whole try stops it.
        (b"HTTP/1.1 200 OK\r\nX-Slow: ", False),
        # A 2xx whose body never ends: the status is the answer, the body is never read.
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n", True),
    ],
    ids=["endless-headers", "endless-body"],
)
def test_a_dribbling_receiver_is_cut_off_at_the_deadline(raw_receivers, head, delivered):
    receiver = RawReceiver(dribble(head))
    raw_receivers.append(receiver)
    attempt, seconds = deliver(receiver, timeout_seconds=1, max_attempts=2)
    if delivered:
        assert attempt.delivered, attempt
        assert attempt.number == 1
        assert seconds < 1
    else:
        assert attempt == Attempt(2, None, "no answer within 1 s")
        assert 2 <= seconds < 4  # two tries of one second each, and the wait between them
    assert len(receiver.requests) == attempt.number
