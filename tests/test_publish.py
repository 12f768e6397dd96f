"""Publishing to object storage, against moto's S3 server on loopback (a real HTTP S3 API).

moto (``moto[server]``) runs its S3-compatible server in a thread of the test process; the service
talks to it over HTTP with boto3 exactly as it would to AWS, MinIO or OSS.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from pydantic import ValidationError

from app.config import Settings
from app.errors import RecordChanged
from app.metrics import Metrics
from app.records import TaskRecord, TaskStatus
from app.storage.links import LinkSigner
from app.storage.local import LocalStore
from app.storage.publish import BucketPublisher, LinkPublisher, publisher_from_settings
from app.tasks.downloads import Exports
from app.tasks.followups import FollowUps
from tests.documents import PICTURE_RECT, make_pdf, norm_box
from tests.s3_server import KEY_ID, SECRET, MotoS3
from tests.servers import REPO, wait_for
from tests.standins import StandInGpu
from tests.test_shared_backends import a_record

PICTURE_PAGE = (
    f"<|ref|>image<|/ref|><|det|>[{norm_box(PICTURE_RECT)}]<|/det|>\n\n"
    "<|ref|>image_caption<|/ref|><|det|>[[168, 600, 672, 630]]<|/det|>\nFigure 1."
)


@pytest.fixture
def make_moto() -> Iterator[Callable[[], MotoS3]]:
    started: list[MotoS3] = []

    def start() -> MotoS3:
        started.append(MotoS3())
        return started[-1]

    yield start
    for moto in started:
        moto.close()


def s3_settings(moto: MotoS3, bucket: str, **overrides: object) -> dict[str, object]:
    return {
        "publish_backend": "s3",
        "s3_endpoint_url": moto.url,
        "s3_bucket": bucket,
        "s3_access_key_id": KEY_ID,
        "s3_secret_access_key": SECRET,
        "s3_addressing_style": "path",
        "s3_prefix": "ocr/out",
        "publish_backoff_seconds": 0.05,
        **overrides,
    }


def succeeded_with_publish(client: httpx.Client, task_id: str) -> dict:
    """The task view once the task succeeded and its publish ended."""

    def poll() -> dict | None:
        view = client.get(f"/v1/tasks/{task_id}").json()
        assert view["status"] in ("queued", "running", "succeeded"), view
        publish = view.get("publish")
        done = publish is not None and publish["status"] in ("succeeded", "failed")
        return view if view["status"] == "succeeded" and done else None

    return wait_for(poll, timeout=60)


def test_auto_publish_uploads_every_result_with_links_that_work(make_server, make_moto, caplog):
    caplog.set_level(logging.DEBUG)  # botocore's debug logs included
    moto = make_moto()
    bucket = moto.bucket()
    server = make_server(answers=[PICTURE_PAGE], auto_publish=True, **s3_settings(moto, bucket))
    task_id = server.client.post(
        "/v1/tasks/upload", files={"file": ("paper.pdf", make_pdf(1, picture_page=1))}
    ).json()["task_id"]

    view = succeeded_with_publish(server.client, task_id)
    publish = view["publish"]
    assert publish["status"] == "succeeded", publish
    assert publish["backend"] == "s3"
    assert publish["error"] is None
    exports = ["chunks.json", "result.html", "result.docx"]
    names = ["full.md", "layout.json", "result.json", *exports, "result.zip", "images/p0001_01.png"]
    assert sorted(publish["links"]) == sorted(names)

    listed = moto.client.list_objects_v2(Bucket=bucket)["Contents"]
    assert sorted(obj["Key"] for obj in listed) == sorted(f"ocr/out/{task_id}/{name}" for name in names)
    expected_types = {
        "full.md": "text/markdown; charset=utf-8",
        "layout.json": "application/json",
        "result.json": "application/json",
        "chunks.json": "application/json",
        "result.html": "text/html; charset=utf-8",
        "result.docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "result.zip": "application/zip",
        "images/p0001_01.png": "image/png",
    }
    for name, content_type in expected_types.items():
        head = moto.client.head_object(Bucket=bucket, Key=f"ocr/out/{task_id}/{name}")
        assert head["ContentType"] == content_type, name

    # The links are presigned: anyone can fetch them over plain HTTP, no credentials, until they expire.
    with httpx.Client() as anonymous:
        for name, content_type in expected_types.items():
            fetched = anonymous.get(publish["links"][name])
            assert fetched.status_code == 200, (name, fetched.text)
            assert fetched.headers["content-type"] == content_type
            # Built again for each read: a DOCX's zip carries its build time, and chunks.json in
            # the bucket links its figures beside it (images/...), the route's to the image route.
            if name not in ("result.zip", "result.docx", "chunks.json"):
                own = server.client.get(f"/v1/tasks/{task_id}/{_route(name)}")
                assert fetched.content == own.content, name
        own_chunks = server.client.get(f"/v1/tasks/{task_id}/chunks.json").json()["chunks"]
        published_chunks = anonymous.get(publish["links"]["chunks.json"]).json()["chunks"]
        assert [c["text"] for c in published_chunks] == [c["text"] for c in own_chunks]
        archive = zipfile.ZipFile(io.BytesIO(anonymous.get(publish["links"]["result.zip"]).content))
        assert sorted(archive.namelist()) == sorted(n for n in names if n != "result.zip")
    link = urlsplit(publish["links"]["full.md"])
    assert parse_qs(link.query)["X-Amz-Expires"] == ["3600"]  # APP_OSS_SIGN_EXPIRE_SECONDS

    # The secret is nowhere a user or an operator can see it: the view, the record, the logs.
    stored = (server.data_dir / "tasks" / task_id / "task.json").read_text()
    assert any(record.name.startswith("botocore") for record in caplog.records)
    for text in (server.client.get(f"/v1/tasks/{task_id}").text, stored, caplog.text):
        assert SECRET not in text


def _route(name: str) -> str:
    return {"full.md": "result.md"}.get(name, name)


def test_publish_failures_are_recorded_and_never_fail_the_task(make_server, make_moto):
    moto = make_moto()
    bucket = moto.bucket(create=False)  # the bucket does not exist yet: a 404 that no retry can cure
    server = make_server(
        answers=[PICTURE_PAGE], auto_publish=True, publish_max_attempts=2, **s3_settings(moto, bucket)
    )
    client = server.client
    task_id = client.post(
        "/v1/tasks/upload", files={"file": ("paper.pdf", make_pdf(1, picture_page=1))}
    ).json()["task_id"]

    view = succeeded_with_publish(client, task_id)
    assert view["status"] == "succeeded"
    assert view["publish"]["status"] == "failed"
    assert view["publish"]["error"]["code"] == "publish_failed"
    message = view["publish"]["error"]["message"]
    assert "NoSuchBucket" in message
    assert "after 1 attempt" in message  # a 4xx is not retried
    assert view["publish"]["links"] == {}

    # Once the bucket exists, publishing on demand works and answers with the links.
    moto.client.create_bucket(Bucket=bucket)
    published = client.post(f"/v1/tasks/{task_id}/publish")
    assert published.status_code == 200, published.text
    assert published.json()["status"] == "succeeded"
    assert client.get(f"/v1/tasks/{task_id}").json()["publish"]["status"] == "succeeded"

    # The storage goes away: every try is refused, the publish fails, the task and its results stay.
    moto.stop()
    refused = client.post(f"/v1/tasks/{task_id}/publish")
    assert refused.status_code == 502
    error = refused.json()["error"]
    assert error["code"] == "publish_failed"
    assert "after 2 attempts" in error["message"]
    assert SECRET not in refused.text
    view = client.get(f"/v1/tasks/{task_id}").json()
    assert view["status"] == "succeeded"
    assert view["error"] is None
    assert view["publish"]["status"] == "failed"
    assert view["publish"]["error"]["message"] == error["message"]
    assert client.get(f"/v1/tasks/{task_id}/result.md").status_code == 200
    assert client.get(f"/v1/tasks/{task_id}/result.zip").status_code == 200
    metrics = client.get("/metrics").text
    assert 'dsocr_publishes_total{backend="s3",outcome="failed"} 2.0' in metrics
    assert 'dsocr_publishes_total{backend="s3",outcome="succeeded"} 1.0' in metrics


def test_publish_needs_a_succeeded_task(make_server):
    server = make_server(page_delay=1.0)
    task_id = server.client.post(
        "/v1/tasks/upload", files={"file": ("paper.pdf", make_pdf(1, picture_page=None))}
    ).json()["task_id"]
    response = server.client.post(f"/v1/tasks/{task_id}/publish")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "task_not_finished"
    assert server.client.delete(f"/v1/tasks/{task_id}").status_code == 200
    assert server.client.post(f"/v1/tasks/{'0' * 32}/publish").status_code == 404


@pytest.mark.parametrize(
    ("values", "missing"),
    [
        ({"publish_backend": "s3"}, ["APP_S3_BUCKET"]),
        (
            {"publish_backend": "s3", "s3_bucket": "b", "s3_secret_access_key": SECRET},
            ["APP_S3_ACCESS_KEY_ID"],
        ),
        (
            {"publish_backend": "oss", "oss_bucket": "b", "oss_access_key_secret": SECRET},
            ["APP_OSS_ENDPOINT", "APP_OSS_ACCESS_KEY_ID"],
        ),
    ],
)
def test_incomplete_publish_settings_are_refused(values, missing):
    with pytest.raises(ValidationError) as refused:
        Settings(**{"_env_file": None, **values})
    for name in missing:
        assert name in str(refused.value)
    assert SECRET not in str(refused.value)


def test_start_up_is_refused_with_incomplete_publish_settings(tmp_path):
    env = {
        **os.environ,
        "APP_DATA_DIR": str(tmp_path),
        "APP_PUBLISH_BACKEND": "oss",
        "APP_OSS_ACCESS_KEY_ID": KEY_ID,
        "APP_OSS_ACCESS_KEY_SECRET": SECRET,
    }
    started = subprocess.run(
        [sys.executable, "-m", "app"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert started.returncode != 0
    assert "APP_OSS_ENDPOINT, APP_OSS_BUCKET" in started.stderr
    assert SECRET not in started.stderr + started.stdout


def test_oss_backend_signs_as_alibaba_documents(tmp_path):
    values: dict[str, Any] = {
        "_env_file": None,
        "publish_backend": "oss",
        "oss_endpoint": "https://s3.oss-cn-hangzhou.aliyuncs.com",
        "oss_bucket": "my-results",
        "oss_access_key_id": KEY_ID,
        "oss_access_key_secret": SECRET,
        "oss_prefix": "/dsocr/",
        "oss_sign_expire_seconds": 600,
    }
    settings = Settings(**values)
    publisher = publisher_from_settings(settings, store=LocalStore(tmp_path), signer=LinkSigner(b"k"))
    try:
        assert isinstance(publisher, BucketPublisher)
        assert publisher.backend == "oss"
        key = publisher.key("a" * 32, "full.md")
        assert key == f"dsocr/{'a' * 32}/full.md"
        link = urlsplit(publisher.bucket.presign(key, 600))
        assert link.netloc == "my-results.s3.oss-cn-hangzhou.aliyuncs.com"  # virtual-hosted, as OSS needs
        query = parse_qs(link.query)
        assert query["AWSAccessKeyId"] == [KEY_ID]
        assert "Signature" in query
        assert "Expires" in query
        assert SECRET not in link.geturl()
    finally:
        publisher.close()


def test_local_backend_publishes_share_links_under_the_base_url(tmp_path):
    record = a_record(status=TaskStatus.SUCCEEDED, images=["p0001_01.png"])
    publisher = LinkPublisher(LinkSigner(b"k"), expire_seconds=60, base_url="https://ocr.example.org/")
    state = asyncio.run(publisher.publish(record, Exports(LocalStore(tmp_path))))
    assert state.status == "succeeded"
    assert sorted(state.links) == [
        "chunks.json",
        "full.md",
        "images/p0001_01.png",
        "layout.json",
        "result.docx",
        "result.html",
        "result.json",
        "result.zip",
    ]
    assert state.links["full.md"].startswith(f"https://ocr.example.org/v1/shared/{record.task_id}/full.md?")


class WrittenFirstElsewhere(LocalStore):
    """A store whose next ``conflicts`` saves find the record written by another process since it
    was read: what a shared store answers when an API replica and a worker update one task."""

    conflicts = 0

    def save(self, record: TaskRecord, *, expect_lease: int | None = None) -> None:
        if self.conflicts:
            self.conflicts -= 1
            raise RecordChanged(f"task {record.task_id} was written by another process since it was read")
        super().save(record, expect_lease=expect_lease)


async def test_a_publish_redoes_its_change_on_a_record_another_process_wrote_first(tmp_path):
    store = WrittenFirstElsewhere(tmp_path)
    spooled = store.spool_path()
    spooled.write_bytes(b"%PDF-1.7")
    record = a_record(status=TaskStatus.SUCCEEDED)
    store.create(record, spooled)
    followups = FollowUps(
        store=store,
        publisher=LinkPublisher(LinkSigner(b"k"), expire_seconds=60, base_url=None),
        webhooks=None,
        auto_publish=False,
        metrics=Metrics(StandInGpu()),
    )
    try:
        store.conflicts = 3  # the "running" state is written on the third try, the result at once
        state = await followups.publish(record.task_id)
        assert state.status == "succeeded"
        assert store.load(record.task_id).publish == state
        store.conflicts = 100  # a record that never stops changing: the publish gives up, saying so
        with pytest.raises(RecordChanged):
            await followups.publish(record.task_id)
    finally:
        await followups.stop()
