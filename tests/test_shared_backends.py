"""The scale-out backends against real servers: the Redis queue, records and event streams
(Debian's redis-server) and the bucket store (moto's S3 server). Two clients stand for two
processes: what one writes, the other must see, and a stale writer must be refused."""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from botocore.exceptions import ClientError, EndpointConnectionError
from PIL import Image

from app import lossless
from app.documents import DocumentKind
from app.errors import (
    BackendUnavailable,
    BucketRefused,
    LeaseLost,
    ObjectMissing,
    QueueFull,
    RecordChanged,
    ResultNotFound,
    TaskNotFound,
)
from app.metrics import Metrics
from app.records import Progress, SourceInfo, TaskOptions, TaskRecord, TaskStatus
from app.storage.redis_conn import async_client, sync_client
from app.storage.redis_records import RedisRecords
from app.storage.s3 import BucketConfig, S3Bucket, bucket_errors
from app.storage.shared import SharedStore
from app.tasks.events import EventKind, TaskEvent
from app.tasks.idempotency import KEY_TTL
from app.tasks.redis_events import RedisEventHub
from app.tasks.redis_queue import RedisQueue
from tests.documents import make_pdf
from tests.s3_server import KEY_ID, SECRET
from tests.scale_cluster import RedisServer, S3Server
from tests.servers import wait_for
from tests.sse import events_path, read_events
from tests.standins import StandInGpu
from tests.test_api_e2e import PAGE_1, finished, upload


def a_record(**fields: object) -> TaskRecord:
    values: dict[str, object] = {
        "source": SourceInfo(filename="a.pdf", content_type="application/pdf", size_bytes=3, pages=2),
        "options": TaskOptions(),
        "page_numbers": [1, 2],
        "input_name": "document.pdf",
        "input_kind": DocumentKind.PDF,
        "progress": Progress(pages_total=2),
    }
    values.update(fields)
    return TaskRecord.model_validate(values)


@contextlib.asynccontextmanager
async def queues(server: RedisServer, count: int, **options: float) -> AsyncIterator[list[RedisQueue]]:
    """``count`` queues on their own connections, as ``count`` processes would have."""
    clients = [async_client(server.url) for _ in range(count)]
    made = [
        RedisQueue(
            client,
            maxsize=int(options.get("maxsize", 10)),
            visibility_seconds=options.get("visibility", 60),
            metrics=Metrics(StandInGpu()),
        )
        for client in clients
    ]
    try:
        for queue in made:
            await queue.setup()
        yield made
    finally:
        for client in clients:
            await client.aclose()


async def test_the_bound_holds_across_replicas_and_a_discard_frees_a_slot(redis_server):
    async with queues(redis_server, 2, maxsize=2) as (api_a, api_b):
        first = await api_a.reserve()
        await (await api_b.reserve()).commit("b" * 32, tenant=None, priority="interactive")
        assert await api_a.depth() == await api_b.depth() == 2
        with pytest.raises(QueueFull):
            await api_b.reserve()
        await first.release()
        await (await api_a.reserve()).commit("a" * 32, tenant=None, priority="interactive")
        assert await api_b.full()
        assert [await api_b.position("b" * 32), await api_b.position("a" * 32)] == [1, 2]
        await api_b.discard("a" * 32)  # canceled while waiting
        assert await api_a.depth() == 1
        assert await api_a.oldest_age() >= 0


async def test_a_task_goes_to_one_worker_and_to_another_only_after_the_first_goes_silent(redis_server):
    async with queues(redis_server, 3, visibility=0.5) as (api, worker_a, worker_b):
        await (await api.reserve()).commit("c" * 32, tenant=None, priority="interactive")
        assert await worker_a.get() == "c" * 32
        assert await api.depth() == 0  # taken: no longer waiting
        assert await api.position("c" * 32) is None
        # Renewed within the timeout, it stays worker A's.
        for _ in range(3):
            await asyncio.sleep(0.3)
            assert await worker_a.touch("c" * 32)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(worker_b.get(), timeout=0.4)
        # A goes silent: B gets it, and A's renewals now fail instead of stealing it back.
        await asyncio.sleep(0.6)
        assert await asyncio.wait_for(worker_b.get(), timeout=5) == "c" * 32
        assert worker_b._metrics.redeliveries._value.get() == 1
        assert not await worker_a.touch("c" * 32)
        assert await worker_b.touch("c" * 32)
        await worker_b.ack("c" * 32)
        await asyncio.sleep(0.6)
        with pytest.raises(TimeoutError):  # acknowledged: never delivered again
            await asyncio.wait_for(worker_a.get(), timeout=1)


async def test_tasks_queued_before_any_worker_existed_are_delivered(redis_server):
    async with queues(redis_server, 1) as (api,):
        await (await api.reserve()).commit("d" * 32, tenant=None, priority="interactive")
    async with queues(redis_server, 1) as (worker,):
        assert await asyncio.wait_for(worker.get(), timeout=5) == "d" * 32


async def test_queued_tasks_survive_a_redis_restart(redis_server):
    async with queues(redis_server, 1) as (api,):
        await (await api.reserve()).commit("e" * 32, tenant=None, priority="interactive")
    redis_server.restart()
    async with queues(redis_server, 1) as (worker,):
        assert await asyncio.wait_for(worker.get(), timeout=5) == "e" * 32


@pytest.fixture
def records(redis_server: RedisServer) -> Iterator[tuple[RedisRecords, RedisRecords]]:
    clients = [sync_client(redis_server.url) for _ in range(2)]
    yield (
        RedisRecords(clients[0], idempotency_ttl=KEY_TTL),
        RedisRecords(clients[1], idempotency_ttl=KEY_TTL),
    )
    for client in clients:
        client.close()


def test_a_stale_lease_cannot_write_the_record(records):
    api, worker = records
    record = a_record()
    api.create(record)
    with pytest.raises(LeaseLost):
        api.create(record)  # a task id exists once

    mine = worker.load(record.task_id)
    mine.lease += 1
    mine.status = TaskStatus.RUNNING
    worker.save(mine, expect_lease=0)  # taken
    stalled = api.load(record.task_id)
    taken_over = worker.load(record.task_id)
    taken_over.lease += 1
    worker.save(taken_over, expect_lease=1)

    mine.progress.pages_done = 2
    with pytest.raises(LeaseLost):
        worker.save(mine)  # the stalled worker's progress is refused
    stalled.status = TaskStatus.CANCELED
    with pytest.raises(LeaseLost):
        api.save(stalled)  # as is a cancel decided on a record read before the takeover
    assert api.load(record.task_id).progress.pages_done == 0
    assert api.load(record.task_id).lease == 2

    api.request_cancel(record.task_id)
    assert worker.load(record.task_id).cancel_requested  # seen by the worker, whatever it saves
    taken_over.progress.pages_done = 1
    worker.save(taken_over)
    assert worker.load(record.task_id).cancel_requested

    # Two processes change the same record (same lease): the one that read it before the other
    # wrote is refused, and its copy keeps the revision it read, to be read again and redone.
    first, second = api.load(record.task_id), worker.load(record.task_id)
    first.waiting_reason = "publish running"
    api.save(first)
    second.waiting_reason = "webhook running"
    with pytest.raises(RecordChanged):
        worker.save(second)
    assert second.revision == first.revision - 1
    assert worker.load(record.task_id).waiting_reason == "publish running"

    (summary,) = api.summaries()
    assert (summary.task_id, summary.status) == (record.task_id, TaskStatus.RUNNING)
    api.delete(record.task_id)
    with pytest.raises(TaskNotFound):
        worker.load(record.task_id)
    with pytest.raises(TaskNotFound):
        worker.save(taken_over)  # an expired task is not brought back by a late write
    assert api.summaries() == []


def test_a_record_stored_before_crash_accounting_loads_with_its_defaults(records, redis_server):
    api, worker = records
    record = a_record(status=TaskStatus.RUNNING, lease=1, attempts=2)
    api.create(record)
    old = record.model_dump_json(exclude={"pages_kept", "kept_at_start", "strikes"})
    with redis_server.client() as client:
        client.hset(f"dsocr:task:{record.task_id}", "record", old)
    loaded = worker.load(record.task_id)
    assert (loaded.attempts, loaded.pages_kept, loaded.kept_at_start, loaded.strikes) == (2, 0, 0, 0)
    assert loaded.interrupted()  # redelivered after an upgrade: one strike of three, not a failure
    loaded.start()
    worker.save(loaded, expect_lease=1)
    assert api.load(record.task_id).strikes == 1


def test_idempotency_entries_are_shared_locked_across_replicas_and_expire(records, redis_server):
    api_a, api_b = records
    api_a.write_key("f" * 64, {"task_id": "x", "fingerprint": "y", "created_at": "z"})
    assert api_b.read_key("f" * 64) == {"task_id": "x", "fingerprint": "y", "created_at": "z"}
    with redis_server.client() as client:
        assert 24 * 3600 < client.ttl("dsocr:idem:" + "f" * 64) <= 24 * 3600 + 300

    order: list[str] = []

    def second_replica() -> None:
        with api_b.key_lock("f" * 64):
            order.append("b")

    with api_a.key_lock("f" * 64):
        waiter = threading.Thread(target=second_replica)
        waiter.start()
        time.sleep(0.3)
        order.append("a")  # B is still waiting for A's lock
    waiter.join(timeout=10)
    assert order == ["a", "b"]


async def test_events_published_by_one_process_reach_followers_on_another(redis_server):
    clients = [async_client(redis_server.url) for _ in range(2)]
    worker_hub, api_hub = RedisEventHub(clients[0]), RedisEventHub(clients[1])
    task_id = "a" * 32
    try:
        await worker_hub.publish(task_id, TaskEvent(2, EventKind.STATUS, '{"status": "running"}'))
        follower = api_hub.follow(task_id, 0)
        assert await anext(follower) == TaskEvent(2, EventKind.STATUS, '{"status": "running"}')
        pending = asyncio.ensure_future(anext(follower))
        await asyncio.sleep(0.1)
        await worker_hub.publish(task_id, TaskEvent(3, EventKind.PAGE, '{"page": 1}'))
        assert (await asyncio.wait_for(pending, timeout=5)).id == 3
        with pytest.raises(ValueError, match="not after"):
            await worker_hub.publish(task_id, TaskEvent(3, EventKind.PAGE, "{}"))
        await worker_hub.publish(task_id, TaskEvent(4, EventKind.END, '{"status": "succeeded"}'))
        assert (await anext(follower)).kind is EventKind.END
        with pytest.raises(StopAsyncIteration):
            await anext(follower)
        assert await api_hub.oldest(task_id) == 2
        assert [event.id async for event in api_hub.follow(task_id, 2)] == [3, 4]  # a reconnect
        assert await clients[1].ttl(f"dsocr:events:{task_id}") > 0  # dropped a while after the end
    finally:
        for client in clients:
            await client.aclose()


@pytest.fixture
def store(redis_server: RedisServer, s3: S3Server, tmp_path: Path) -> Iterator[SharedStore]:
    client = sync_client(redis_server.url)
    bucket = S3Bucket(
        BucketConfig(
            bucket=s3.bucket_name,
            endpoint_url=s3.url,
            region="us-east-1",
            access_key_id=KEY_ID,
            secret_access_key=SECRET,
            max_attempts=2,
        )
    )
    shared = SharedStore(
        records=RedisRecords(client, idempotency_ttl=KEY_TTL),
        bucket=bucket,
        prefix="/team-a/",
        spool_dir=tmp_path / "spool",
        redirect_seconds=60,
    )
    yield shared
    shared.close()
    client.close()


def test_results_are_read_from_the_lease_the_record_ended_with(store, s3, tmp_path):
    spooled = store.spool_path()
    spooled.write_bytes(b"%PDF-1.7 fake")
    record = a_record()
    store.create(record, spooled)
    with store.input_file(record) as local:
        assert local.read_bytes() == b"%PDF-1.7 fake"
    assert not local.exists()  # the downloaded copy lives as long as the block

    store.write_raw(record.task_id, 1, {"text": "hi", "stop_reason": "eos"})
    assert store.read_raw(record.task_id, 1) == {"text": "hi", "stop_reason": "eos"}
    assert store.read_raw(record.task_id, 2) is None
    store.write_raw(record.task_id, 1, {"text": "again"}, attempt=2)  # retry rung 2: p0001.r2.json
    assert store.read_raw(record.task_id, 1, attempt=2) == {"text": "again"}
    assert store.read_raw(record.task_id, 1) == {"text": "hi", "stop_reason": "eos"}
    assert store.read_raw(record.task_id, 1, attempt=1) is None
    with pytest.raises(ResultNotFound):
        store.open_preview(record, 1)
    store.write_preview(record.task_id, 1, lossless.encode(Image.new("RGB", (2000, 1000), "white")))
    with store.open_preview(record, 1) as preview:
        assert Image.open(io.BytesIO(preview.read())).size == (1600, 800)
    # A page stored as PNG by a release before pages were TIFF still gets its preview.
    legacy = io.BytesIO()
    Image.new("RGB", (300, 200), "blue").save(legacy, format="PNG")
    legacy.seek(0)
    store._bucket.upload(f"team-a/tasks/{record.task_id}/pages/p0003.png", legacy, "image/png")
    with store.open_preview(record, 3) as preview:
        assert Image.open(io.BytesIO(preview.read())).size == (300, 200)
    assert f"team-a/tasks/{record.task_id}/pages/p0001.tiff" in s3.objects()

    # Lease 1 stalled; lease 2 took over and finished: what is read is lease 2's, whatever 1 writes.
    record.lease = 2
    store.save(record, expect_lease=0)
    store.write_result(record.task_id, "full.md", b"winner", lease=2)
    store.write_result(record.task_id, "full.md", b"stale", lease=1)
    red = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(red, format="PNG")
    store.write_image(record.task_id, "p0001_01.png", red.getvalue(), lease=2)
    with store.open_result(record, "full.md") as result:
        assert result.read() == b"winner"
    with store.open_result(record, "images/p0001_01.png") as image:
        assert Image.open(io.BytesIO(image.read())).getpixel((1, 1)) == (255, 0, 0)
    with pytest.raises(ResultNotFound):
        store.open_result(record, "layout.json")
    with pytest.raises(ResultNotFound):
        store.open_result(record, "../../secrets")
    # Files are read by the record the caller holds, which the store does not read again: a
    # download that read the record once serves the attempt that record ended with.
    with store.open_result(record.model_copy(update={"lease": 1}), "full.md") as result:
        assert result.read() == b"stale"
    keys = s3.objects()
    assert f"team-a/tasks/{record.task_id}/out/2/full.md" in keys
    assert f"team-a/tasks/{record.task_id}/input/document.pdf" in keys

    url = store.result_url(record, "full.md")
    assert url is not None
    assert "Signature" in url
    assert httpx.get(url).content == b"winner"  # the bucket serves it, with no credentials

    store.delete(record.task_id)
    assert s3.objects(f"team-a/tasks/{record.task_id}/") == {}
    with pytest.raises(TaskNotFound):
        store.load(record.task_id)


# What botocore raises from S3's answers: ``ClientError`` carries the parsed error document and the
# HTTP status (botocore.exceptions.ClientError, ``response["Error"]`` and ``["ResponseMetadata"]``).
def _client_error(code: str, status: int, message: str = "") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


@pytest.mark.parametrize(
    ("raised", "expected", "retriable", "status_code"),
    [
        (_client_error("NoSuchKey", 404), ObjectMissing, False, 500),
        (_client_error("404", 404), ObjectMissing, False, 500),  # HEAD answers have no error body
        (_client_error("SlowDown", 503, "Please reduce your request rate."), BucketRefused, True, 500),
        (_client_error("AccessDenied", 403, "Access Denied"), BucketRefused, False, 500),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), BackendUnavailable, True, 503),
    ],
)
def test_botocore_errors_are_translated_into_the_error_tree(raised, expected, retriable, status_code):
    with pytest.raises(expected) as translated, bucket_errors("reading tasks/x/full.md"):
        raise raised
    assert type(translated.value) is expected
    assert translated.value.status_code == status_code
    assert isinstance(translated.value, BackendUnavailable) or translated.value.retriable is retriable
    assert "reading tasks/x/full.md" in translated.value.message
    assert SECRET not in translated.value.message


def test_a_missing_bucket_and_a_stopped_one_are_told_apart(store, s3, tmp_path):
    record = a_record(status=TaskStatus.SUCCEEDED)
    elsewhere = S3Bucket(
        BucketConfig(
            bucket="no-such-bucket",
            endpoint_url=s3.url,
            region="us-east-1",
            access_key_id=KEY_ID,
            secret_access_key=SECRET,
        )
    )
    with contextlib.closing(elsewhere):
        with pytest.raises(BucketRefused) as refused:
            elsewhere.upload("tasks/x/full.md", io.BytesIO(b"x"), "text/markdown")
        assert "NoSuchBucket" in refused.value.message
        assert not refused.value.retriable  # publishing gives up at once

    s3.stop()
    assert not store.writable()
    with pytest.raises(BackendUnavailable) as unreachable:  # 503: the download may work later
        store.open_result(record, "full.md")
    assert SECRET not in unreachable.value.message


def record_reads(conn: redis.Redis) -> int:
    """Records read since the last ``CONFIG RESETSTAT``: ``RedisRecords.load`` reads one with one
    HMGET, and nothing else sends that command."""
    stats = conn.info("commandstats").get("cmdstat_hmget")
    return int(stats["calls"]) if stats else 0


def shared_settings(redis_server: RedisServer, s3: S3Server, **overrides: object) -> dict[str, object]:
    return {
        "queue_backend": "redis",
        "redis_url": redis_server.url,
        "storage_backend": "s3",
        "s3_endpoint_url": s3.url,
        "s3_bucket": s3.bucket_name,
        "s3_access_key_id": KEY_ID,
        "s3_secret_access_key": SECRET,
        "visibility_timeout_seconds": 3,
        **overrides,
    }


def test_one_process_on_redis_and_a_bucket_serves_streams_cancels_and_redirects(
    redis_server, s3, make_server
):
    server = make_server(
        answers=[PAGE_1],
        page_delay=0.3,
        ds_batch_size=1,
        **shared_settings(redis_server, s3, s3_redirect_downloads=True),
    )
    client = server.client
    ready = client.get("/readyz").json()
    assert (ready["status"], ready["role"], ready["queue_depth"]) == ("ready", "all", 0)

    task_id = upload(client, make_pdf(2, picture_page=None)).json()["task_id"]
    with client.stream("GET", events_path(task_id)) as response:
        kinds = [event.event for event in read_events(response)]
    assert kinds[-1] == "end"
    assert kinds.count("page") == 2
    done = finished(client, task_id)
    assert done["status"] == "succeeded"
    redirect = client.get(done["links"]["markdown"])
    assert redirect.status_code == 307
    assert httpx.get(redirect.headers["location"]).text.startswith("# Page 1 heading")
    converted = client.post("/v1/convert", files={"file": ("again.pdf", make_pdf(1, picture_page=None))})
    assert converted.status_code == 200  # the result itself, never a redirect of the POST
    assert converted.json()["status"] == "succeeded"
    streamed = client.get(done["links"]["markdown"], params={"redirect": "false"})  # as the console asks
    assert streamed.status_code == 200
    assert streamed.text == httpx.get(redirect.headers["location"]).text
    assert client.get(f"/v1/tasks/{task_id}/pages/2").headers["content-type"] == "image/webp"
    assert client.get(f"/v1/tasks/{task_id}/result.zip").status_code == 200
    # A download reads the task's record once, for the owner check, and serves the files by it:
    # not again in the store, nor once more per file of the zip.
    with redis_server.client() as conn:
        for path in (f"/v1/tasks/{task_id}/result.zip", done["links"]["markdown"]):
            conn.config_resetstat()
            assert client.get(path).status_code in (200, 307)
            assert record_reads(conn) == 1, path

    slow = upload(client, make_pdf(8, picture_page=None)).json()["task_id"]
    wait_for(lambda: client.get(f"/v1/tasks/{slow}").json()["progress"]["pages_done"] >= 1, timeout=60)
    assert client.delete(f"/v1/tasks/{slow}").status_code == 200
    canceled = finished(client, slow)
    assert canceled["status"] == "canceled"
    assert canceled["progress"]["pages_done"] < 8
    listed = {task["task_id"]: task["status"] for task in client.get("/v1/tasks").json()["tasks"]}
    assert listed == {task_id: "succeeded", converted.json()["task_id"]: "succeeded", slow: "canceled"}
    metrics = client.get("/metrics").text
    assert 'dsocr_queue_depth{role="all"} 0.0' in metrics
    assert 'dsocr_redeliveries_total{role="all"} 0.0' in metrics
