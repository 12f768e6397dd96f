"""``POST /v1/convert`` (the one-call path) and ``GET /v1/tasks/{id}?wait=`` (long-polling)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.documents import make_pdf
from tests.test_api_e2e import PAGE_1, PAGE_2
from tests.test_events import MIB, held_server

PDF = make_pdf(2, picture_page=None)


def convert(client: httpx.Client, wait: float | None = None, key: str | None = None) -> httpx.Response:
    params = {"wait": wait} if wait is not None else {}
    headers = {"Idempotency-Key": key} if key else {}
    return client.post("/v1/convert", files={"file": ("a.pdf", PDF)}, params=params, headers=headers)


def test_convert_answers_with_result_json_when_the_task_ends_in_time(make_server, static_server):
    server = make_server(answers=[PAGE_2], url_allow_private=True)
    response = convert(server.client)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    result = response.json()
    assert result["status"] == "succeeded"
    assert [page["page"] for page in result["pages"]] == [1, 2]
    assert result["pages"][0]["blocks"][0]["type"] == "table"

    by_url = server.client.post("/v1/convert", json={"url": static_server.add("a.pdf", PDF)})
    assert by_url.status_code == 200
    assert [page["page"] for page in by_url.json()["pages"]] == [1, 2]
    assert by_url.json()["source"]["url"].endswith("/a.pdf")

    for bad in ({"url": "notaurl"}, {"options": {}}):
        refused = server.client.post("/v1/convert", json=bad)
        assert (refused.status_code, refused.json()["error"]["code"]) == (422, "invalid_request")
    assert server.client.post("/v1/convert", content=b"{not json").status_code == 422
    assert convert(server.client, wait=301).status_code == 422


def test_a_short_wait_answers_202_and_a_retry_with_the_key_gets_the_result(make_server, standin_gpu):
    server = held_server(make_server, standin_gpu)
    started = time.monotonic()
    pending = convert(server.client, wait=0.3, key="convert-1")
    assert time.monotonic() - started >= 0.3
    assert pending.status_code == 202
    view = pending.json()
    assert (view["status"], view["queue_position"]) == ("queued", 1)

    standin_gpu.free_bytes = 8000 * MIB
    retried = convert(server.client, wait=60, key="convert-1")  # joins the first task, makes none
    assert retried.status_code == 200
    assert retried.headers["idempotent-replayed"] == "true"
    assert retried.json()["task_id"] == view["task_id"]
    assert "markdown" in retried.json()["pages"][0]  # result.json
    assert server.task_dirs() == [view["task_id"]]


def test_a_failed_task_is_answered_with_its_view(make_server):
    server = make_server(answers=[PAGE_1], fail_on_call=1)
    response = convert(server.client)
    assert response.status_code == 200  # the task ended; its status and error say how
    assert response.json()["status"] == "failed"
    assert response.json()["error"]["code"] == "engine_error"
    assert response.json()["pages"] == [1, 2]  # the view: page numbers, not result pages


def test_read_with_wait_returns_as_soon_as_the_task_ends(make_server, standin_gpu):
    server = held_server(make_server, standin_gpu)
    client = server.client
    task_id = client.post("/v1/tasks/upload", files={"file": ("a.pdf", PDF)}).json()["task_id"]

    started = time.monotonic()
    still = client.get(f"/v1/tasks/{task_id}", params={"wait": 0.3}).json()
    assert 0.3 <= time.monotonic() - started < 5
    assert still["status"] == "queued"

    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        polled = pool.submit(client.get, f"/v1/tasks/{task_id}", params={"wait": 30})
        time.sleep(0.5)
        assert not polled.done()
        standin_gpu.free_bytes = 8000 * MIB
        view = polled.result(timeout=30).json()
    assert view["status"] == "succeeded"
    assert 0.5 <= time.monotonic() - started < 20  # woken by the task's end, not by the 30 s limit

    started = time.monotonic()
    assert client.get(f"/v1/tasks/{task_id}", params={"wait": 30}).json()["status"] == "succeeded"
    assert time.monotonic() - started < 2  # a finished task answers at once
    for bad in (-1, 61):
        assert client.get(f"/v1/tasks/{task_id}", params={"wait": bad}).status_code == 422
