"""``Idempotency-Key`` on the create routes: a retry finds the first task, across restarts too."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import httpx

from tests.documents import make_pdf, png_bytes
from tests.test_api_e2e import PAGE_1, finished

PDF = make_pdf(2, picture_page=None)


def upload(client: httpx.Client, key: str | None, data: bytes = PDF, **fields: str) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return client.post("/v1/tasks/upload", files={"file": ("a.pdf", data)}, data=fields, headers=headers)


def test_a_retried_upload_returns_the_first_task(make_server):
    server = make_server(answers=[PAGE_1])
    first = upload(server.client, "retry-1", pages="1")
    assert first.status_code == 202
    assert "idempotent-replayed" not in first.headers
    again = upload(server.client, "retry-1", options=json.dumps({"pages": "1"}))  # same options, other form
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["task_id"] == first.json()["task_id"]
    assert len(server.task_dirs()) == 1
    assert server.spool_files() == []

    other = upload(server.client, "retry-2", pages="1")  # another key: another task
    assert other.status_code == 202
    assert other.json()["task_id"] != first.json()["task_id"]
    no_key = [upload(server.client, None).json()["task_id"] for _ in range(2)]
    assert no_key[0] != no_key[1]
    for task_id in (first.json()["task_id"], other.json()["task_id"], *no_key):
        finished(server.client, task_id)
    done = upload(server.client, "retry-1", pages="1")  # the task is over: its view as it is now
    assert (done.status_code, done.json()["status"]) == (200, "succeeded")


def test_a_key_reused_for_another_request_is_refused(make_server):
    server = make_server(answers=[PAGE_1])
    task_id = upload(server.client, "k").json()["task_id"]
    for data, fields in ((png_bytes(), {}), (PDF, {"pages": "2"}), (PDF, {"mode": "free"})):
        refused = upload(server.client, "k", data, **fields)
        assert refused.status_code == 422
        assert refused.json()["error"]["code"] == "idempotency_key_reused"
    url_refused = server.client.post(
        "/v1/tasks", json={"url": "http://127.0.0.1:9/a.pdf"}, headers={"Idempotency-Key": "k"}
    )
    assert url_refused.json()["error"]["code"] == "idempotency_key_reused"  # before any download
    assert server.task_dirs() == [task_id]
    assert server.spool_files() == []
    for bad in ("", "with space", "x" * 300):
        response = server.client.post(
            "/v1/tasks/upload", files={"file": ("a.pdf", PDF)}, headers={"Idempotency-Key": bad}
        )
        assert response.status_code == 422, bad
        assert response.json()["error"]["code"] == "invalid_request", bad
    finished(server.client, task_id)


def test_keys_belong_to_their_api_key(make_server):
    server = make_server(answers=[PAGE_1], api_keys="sk_one,sk_two")
    with (
        httpx.Client(base_url=server.url, headers={"Authorization": "Bearer sk_one"}) as one,
        httpx.Client(base_url=server.url, headers={"Authorization": "Bearer sk_two"}) as two,
    ):
        mine = upload(one, "shared-name").json()["task_id"]
        theirs = upload(two, "shared-name")
        assert theirs.status_code == 202
        assert theirs.json()["task_id"] != mine
        for client, task_id in ((one, mine), (two, theirs.json()["task_id"])):
            finished(client, task_id)


def test_url_tasks_and_concurrent_retries_make_one_task(make_server, static_server):
    server = make_server(answers=[PAGE_1], url_allow_private=True)
    url = static_server.add("paper.pdf", PDF)
    body = {"url": url, "options": {"dpi": 72}}

    def create(_: int) -> httpx.Response:
        return server.client.post("/v1/tasks", json=body, headers={"Idempotency-Key": "url-1"})

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(create, range(4)))
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 202]
    assert len({r.json()["task_id"] for r in responses}) == 1
    assert len(server.task_dirs()) == 1
    static_server.files.clear()  # a retry must not download again
    assert create(0).status_code == 200
    finished(server.client, responses[0].json()["task_id"])


def test_keys_survive_a_restart_and_expire_after_a_day(make_server):
    first = make_server(answers=[PAGE_1])
    task_id = upload(first.client, "durable").json()["task_id"]
    finished(first.client, task_id)

    again = make_server(answers=[PAGE_1], data_dir=first.data_dir)
    replay = upload(again.client, "durable")
    assert (replay.status_code, replay.json()["task_id"]) == (200, task_id)

    (entry_path,) = (first.data_dir / "idempotency").iterdir()  # again.data_dir names its own default
    assert "durable" not in entry_path.read_text()  # named and filled by hashes, never the key

    def age(hours: float) -> None:
        entry = json.loads(entry_path.read_text())
        entry["created_at"] = (datetime.now(UTC) - timedelta(hours=hours)).isoformat()
        entry_path.write_text(json.dumps(entry))

    age(25)
    fresh = upload(again.client, "durable", png_bytes())  # an expired key is free again
    assert fresh.status_code == 202
    finished(again.client, fresh.json()["task_id"])
    age(25)
    again.app.state.tasks.expire()  # the janitor's sweep removes old entries
    assert list((first.data_dir / "idempotency").iterdir()) == []
