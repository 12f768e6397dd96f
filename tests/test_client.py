"""``dsocr_client`` against a real server: every call, the typed errors, retries, ownership, async."""

from __future__ import annotations

import asyncio
import datetime
import io
import threading
import time
from pathlib import Path

import httpx
import pytest

from dsocr_client import (
    AsyncClient,
    AuthError,
    Client,
    Conflict,
    ConnectionFailed,
    InvalidInput,
    NotFound,
    Progress,
    QueueFull,
    UnsupportedFile,
    WaitTimeout,
)
from dsocr_client._client import MAX_STREAM_FAILURES
from tests.documents import ANSWER_WELL, READ_BADLY, READ_WELL, RUNAWAY, make_pdf, png_bytes, text_pdf
from tests.proxy import LONGER_THAN_KEEP_ALIVE, EventStreamProxy, a_page_done
from tests.servers import wait_for
from tests.test_api_e2e import PAGE_1, PAGE_2, PAGE_3

MIB = 1024 * 1024


class CountingTransport(httpx.HTTPTransport):
    """A real transport that counts requests by path, and refuses event streams when told to."""

    def __init__(self, *, refuse_events: bool = False) -> None:
        super().__init__()
        self.paths: list[str] = []
        self.refuse_events = refuse_events

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        if self.refuse_events and request.url.path.endswith("/events"):
            raise httpx.ConnectError("event streams are blocked here", request=request)
        return super().handle_request(request)


@pytest.fixture
def pdf(tmp_path: Path) -> Path:
    path = tmp_path / "paper.pdf"
    path.write_bytes(make_pdf(3))
    return path


def test_submit_wait_download_list_and_get(make_server, pdf, tmp_path):
    server = make_server(answers=[PAGE_1, PAGE_2, PAGE_3], ds_batch_size=1)
    seen: list[Progress] = []
    with Client(server.url, "sk_test") as client:
        task = client.submit(pdf, dpi=100)
        assert task.status in ("queued", "running")
        done = client.wait(task.task_id, on_progress=seen.append, timeout=60)
        assert (done.status, done.pages_done, done.pages_total) == ("succeeded", 3, 3)
        assert [p.page for p in seen if p.page is not None] == [1, 2, 3]  # each page once, in order
        assert seen[-1].status == "succeeded"

        out = tmp_path / "out"
        client.download(task.task_id, out)
        assert "Page 1 heading" in (out / "full.md").read_text()
        assert (out / "layout.json").is_file()
        assert (out / "result.json").is_file()
        assert [p.name for p in (out / "images").iterdir()] == ["p0003_01.png"]
        assert not list(out.rglob("*.part"))

        assert client.get(task.task_id).raw["options"]["dpi"] == 100
        assert [t.task_id for t in client.list(status="succeeded")] == [task.task_id]
        assert client.result(task.task_id, "images/p0003_01.png").startswith(b"\x89PNG")

        # The exports: chunks with the limits asked for, and the other formats as files.
        chunk_set = client.chunks(task.task_id, max_tokens=64, overlap=8)
        assert (chunk_set["max_tokens"], chunk_set["overlap"], chunk_set["tokenizer"]) == (64, 8, "chars")
        assert all(
            chunk["tokens"] <= 64 for chunk in chunk_set["chunks"] if chunk["blocks"][0]["type"] == "text"
        )
        with pytest.raises(InvalidInput, match="not in this server's Hugging Face cache"):
            client.chunks(task.task_id, tokenizer="org/missing")
        with pytest.raises(ValueError, match="unknown format pdf"):
            client.download(task.task_id, tmp_path / "never", formats=["pdf"])
        assert not (tmp_path / "never").exists()
        client.download(task.task_id, tmp_path / "exports", formats=["html", "docx", "chunks"])
        written = sorted(p.name for p in (tmp_path / "exports").iterdir())
        assert written == ["chunks.json", "result.docx", "result.html", "result.json"]


def test_api_errors_become_typed_exceptions(make_server, tmp_path):
    server = make_server(answers=[PAGE_1])
    corrupt = tmp_path / "broken.pdf"
    corrupt.write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\n%%EOF garbage")
    text = tmp_path / "notes.txt"
    text.write_text("plain text is not a document")
    with Client(server.url, "sk_wrong") as wrong, pytest.raises(AuthError) as auth:
        wrong.get("anything")
    assert (auth.value.status, auth.value.code) == (401, "unauthorized")
    with Client(server.url, "sk_test") as client:
        with pytest.raises(NotFound) as missing:
            client.get("no-such-task")
        assert missing.value.status == 404
        with pytest.raises(InvalidInput) as invalid:
            client.submit(corrupt)
        assert invalid.value.code == "invalid_document"
        with pytest.raises(UnsupportedFile) as unsupported:
            client.submit(text)
        assert unsupported.value.status == 415
        with pytest.raises(InvalidInput) as options:
            client.submit(io.BytesIO(make_pdf(1)), pages="9")
        assert options.value.code == "invalid_options"
        task = client.submit(io.BytesIO(png_bytes()))
        client.wait(task.task_id, timeout=60)
        with pytest.raises(Conflict):
            client.cancel(task.task_id)  # already finished
    with Client("http://127.0.0.1:9", "sk_test") as nowhere, pytest.raises(ConnectionFailed):
        nowhere.get("x")


def test_a_full_queue_is_retried_honouring_retry_after(make_server, standin_gpu):
    standin_gpu.free_bytes = 0  # the GPU gate holds the first task in the worker
    server = make_server(answers=[PAGE_1], gpu_probe=standin_gpu, gpu_min_free_mb=1, queue_max=1)
    transport = CountingTransport()
    pdf = make_pdf(1, picture_page=None)
    with Client(server.url, "sk_test", max_retries=2, max_retry_wait=0.05, transport=transport) as client:
        held = client.submit(io.BytesIO(pdf))
        wait_for(lambda: client.get(held.task_id).raw["waiting_reason"])
        queued = client.submit(io.BytesIO(pdf))  # fills the queue (bound 1)
        with pytest.raises(QueueFull) as full:
            client.submit(io.BytesIO(pdf))
        assert full.value.retry_after >= 1
        assert transport.paths.count("/v1/tasks/upload") == 2 + 3  # then 1 try + 2 retries

        client.max_retries = 50
        room = threading.Timer(0.3, client.cancel, args=(queued.task_id,))  # room in the queue soon
        room.start()
        try:
            third = client.submit(io.BytesIO(pdf))  # its retries outlast the full queue
        finally:
            room.join()
        assert third.status == "queued"
        standin_gpu.free_bytes = 8000 * MIB
        assert client.wait(third.task_id, timeout=60).status == "succeeded"


def test_tasks_belong_to_the_key_that_created_them(make_server, pdf):
    server = make_server(api_keys="sk_a,sk_b", answers=[PAGE_1])
    with Client(server.url, "sk_a") as a, Client(server.url, "sk_b") as b:
        task = a.submit(pdf, pages="1")
        for call in (b.get, b.cancel, b.wait):
            with pytest.raises(NotFound):
                call(task.task_id)
        assert list(b.list()) == []
        assert [t.task_id for t in a.list()] == [task.task_id]
        a.wait(task.task_id, timeout=60)


def test_an_idempotent_retry_returns_the_first_task(make_server, pdf):
    server = make_server(answers=[PAGE_1])
    with Client(server.url, "sk_test") as client:
        first = client.submit(pdf, idempotency_key="upload-1", pages="1")
        again = client.submit(pdf, idempotency_key="upload-1", pages="1")
        assert again.task_id == first.task_id
        with pytest.raises(InvalidInput) as reused:
            client.submit(pdf, idempotency_key="upload-1", pages="2")
        assert reused.value.code == "idempotency_key_reused"
        client.wait(first.task_id, timeout=60)
        assert len(list(client.list())) == 1


def test_wait_falls_back_to_long_polling_when_streams_fail(make_server, pdf):
    server = make_server(answers=[PAGE_1], ds_batch_size=1)
    transport = CountingTransport(refuse_events=True)
    seen: list[Progress] = []
    with Client(server.url, "sk_test", transport=transport, reconnect_backoff=0.01) as client:
        task = client.submit(pdf)
        done = client.wait(task.task_id, on_progress=seen.append, timeout=60)
    assert done.status == "succeeded"
    assert seen[-1].status == "succeeded"
    assert sum(path.endswith("/events") for path in transport.paths) == MAX_STREAM_FAILURES  # then ?wait=


def pages_seen(seen: list[Progress]) -> list[int]:
    return [p.page for p in seen if p.page is not None]


def test_wait_follows_a_task_longer_than_the_keep_alive_on_one_stream(make_server, pdf, tmp_path):
    server = make_server(answers=[PAGE_1, PAGE_2, PAGE_3], **LONGER_THAN_KEEP_ALIVE)
    seen: list[Progress] = []
    with EventStreamProxy(server.url) as proxy, Client(proxy.url, "sk_test") as client:
        task = client.submit(pdf)
        done = client.wait(task.task_id, on_progress=seen.append, timeout=60)
        client.download(task.task_id, tmp_path / "out")
    assert (done.status, done.pages_done) == ("succeeded", 3)
    assert pages_seen(seen) == [1, 2, 3]
    assert (tmp_path / "out" / "images" / "p0003_01.png").is_file()  # the last page's figure
    assert proxy.pings >= 5  # keep-alives did arrive while the pages ran ...
    assert len(proxy.events_requests()) == 1  # ... and the stream went on through them


def test_a_dropped_stream_is_resumed_with_last_event_id(make_server, pdf):
    server = make_server(answers=[PAGE_1, PAGE_2, PAGE_3], **LONGER_THAN_KEEP_ALIVE)
    seen: list[Progress] = []
    with (
        EventStreamProxy(server.url) as proxy,
        Client(proxy.url, "sk_test", reconnect_backoff=0.05) as client,
    ):
        task = client.submit(pdf)
        # mid-task the proxy cuts the stream, then answers 502 twice, as while its upstream restarts
        dropping = proxy.drop_streams_when(a_page_done(server.client), refuse=2)
        done = client.wait(task.task_id, on_progress=seen.append, timeout=60)
        dropping.join()
    assert proxy.dropped == 1
    assert (done.status, done.pages_done) == ("succeeded", 3)
    assert pages_seen(seen) == [1, 2, 3]  # every page once: none lost at the cut, none repeated
    assert seen[-1].status == "succeeded"
    streams = proxy.events_requests()
    assert len(streams) == 4  # the first, two refused, the one that resumed
    assert "last-event-id" not in streams[0].headers
    resumed_from = [int(request.headers["last-event-id"]) for request in streams[1:]]
    assert resumed_from[0] >= 1
    assert len(set(resumed_from)) == 1  # the refused tries asked for the same events
    assert not [r for r in proxy.requests if "wait=" in r.path]  # it resumed; it did not fall back to polling


def test_wait_times_out_while_only_keep_alives_arrive(make_server, pdf):
    server = make_server(answers=[PAGE_1], events_ping_seconds=0.1, page_delay=4, ds_batch_size=1)
    with Client(server.url, "sk_test") as client:
        task = client.submit(pdf, pages="1")
        started = time.monotonic()
        with pytest.raises(WaitTimeout):
            client.wait(task.task_id, timeout=1)
        assert time.monotonic() - started < 3  # not when the page ends, 4 s on
        assert client.cancel(task.task_id).status in ("running", "canceled")


def test_list_pages_through_every_task(make_server):
    server = make_server(answers=[PAGE_1])
    with Client(server.url, "sk_test") as client:
        ids = [client.submit(io.BytesIO(png_bytes()), idempotency_key=None).task_id for _ in range(3)]
        listed = [t.task_id for t in client.list(page_size=1)]
        assert listed == ids[::-1]  # newest first, across three pages
        assert len(list(client.list(limit=2, page_size=1))) == 2
        for task_id in ids:
            client.wait(task_id, timeout=60)


async def test_the_async_client_follows_long_tasks_through_keep_alives_and_drops(make_server, pdf):
    server = make_server(answers=[PAGE_1, PAGE_2, PAGE_3], **LONGER_THAN_KEEP_ALIVE)
    seen: list[Progress] = []

    async def on_progress(progress: Progress) -> None:
        seen.append(progress)

    with EventStreamProxy(server.url) as proxy:
        async with AsyncClient(proxy.url, "sk_test", reconnect_backoff=0.05) as client:
            task = await client.submit(pdf)
            dropping = proxy.drop_streams_when(a_page_done(server.client), refuse=1)
            done = await client.wait(task.task_id, on_progress=on_progress, timeout=60)
        dropping.join()
    assert (done.status, pages_seen(seen)) == ("succeeded", [1, 2, 3])
    assert proxy.pings >= 5
    assert proxy.dropped == 1
    streams = proxy.events_requests()
    assert len(streams) == 3
    assert all(request.headers.get("last-event-id") for request in streams[1:])


async def test_the_async_client_does_the_same(make_server, tmp_path):
    server = make_server(answers=[PAGE_1], ds_batch_size=1)
    seen: list[Progress] = []

    async def on_progress(progress: Progress) -> None:
        seen.append(progress)

    async with AsyncClient(server.url, "sk_test") as client:
        task = await client.submit(io.BytesIO(make_pdf(2, picture_page=None)))
        done = await client.wait(task.task_id, on_progress=on_progress, timeout=60)
        assert done.status == "succeeded"
        assert [p.page for p in seen if p.page] == [1, 2]
        await client.download(task.task_id, tmp_path / "out")
        assert (tmp_path / "out" / "full.md").read_text().startswith("# Page 1 heading")
        assert [t.task_id async for t in client.list()] == [task.task_id]
        with pytest.raises(NotFound):
            await client.get("no-such-task")


def test_pages_carry_their_quality_and_usage_counts_what_the_tasks_did(make_server, tmp_path):
    # Page 2 runs away (no retries here): the server marks it suspect, and the client reads why.
    server = make_server(
        answers=[ANSWER_WELL, RUNAWAY], ds_max_new_tokens=300, ds_batch_size=1, page_retries=0
    )
    path = tmp_path / "report.pdf"
    path.write_bytes(text_pdf(READ_WELL, READ_BADLY))
    today = datetime.datetime.now(datetime.UTC).date()
    with Client(server.url, "sk_test") as client:
        done = client.wait(client.submit(path).task_id, timeout=120)
        assert (done.status, done.suspect_pages) == ("succeeded", 1)
        assert client.get(done.task_id).result_pages == []  # a task view lists page numbers only
        result = client.download(done.task_id, tmp_path / "out", formats=())
        assert [page.page for page in result.result_pages] == [1, 2]
        good, bad = (page.quality for page in result.result_pages)
        assert good is not None
        assert bad is not None
        assert (good.suspect, good.reasons, good.attempts) == (False, (), 1)
        assert good.text_layer_agreement is not None
        assert good.text_layer_agreement > 0.9
        assert bad.suspect
        assert "no_end_marker" in bad.reasons
        assert result.result_pages[1].truncated

        usage = client.usage(today, str(today))  # a date or its ISO text
        wire = server.client.get("/v1/usage", params={"from": str(today), "to": str(today)}).json()
    assert (usage.start, usage.end) == (str(today), str(today))
    [tenant] = usage.tenants
    assert tenant.tenant == wire["tenants"][0]["tenant"]
    assert (tenant.total.tasks, tenant.total.pages) == (1, 2)
    assert [day.date for day in tenant.days] == [str(today)]
    assert tenant.days[0].pages == 2
    assert tenant.total.completion_tokens == wire["tenants"][0]["total"]["completion_tokens"] > 0
    assert tenant.total.engine_seconds == wire["tenants"][0]["total"]["engine_seconds"] > 0

    async def read_async() -> None:
        async with AsyncClient(server.url, "sk_test") as aclient:
            assert (await aclient.usage(today, today)).tenants == usage.tenants
            with pytest.raises(InvalidInput):
                await aclient.usage("not-a-date")

    asyncio.run(read_async())
