"""``GET /v1/tasks``, task ownership between API keys, and queue positions with estimates."""

from __future__ import annotations

from datetime import datetime

import httpx

from tests.documents import make_pdf
from tests.servers import wait_for
from tests.sse import events_path, read_events
from tests.test_api_e2e import PAGE_1, finished, upload
from tests.test_events import MIB, held_server


def listed(client: httpx.Client, **params: object) -> dict:
    response = client.get("/v1/tasks", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_key_lists_reads_and_touches_only_its_own_tasks(make_server):
    server = make_server(answers=[PAGE_1], api_keys="sk_one,sk_two")
    with (
        httpx.Client(base_url=server.url, headers={"Authorization": "Bearer sk_one"}) as one,
        httpx.Client(base_url=server.url, headers={"Authorization": "Bearer sk_two"}) as two,
    ):
        mine = [upload(one, make_pdf(1, picture_page=None)).json()["task_id"] for _ in range(2)]
        theirs = upload(two, make_pdf(1, picture_page=None)).json()["task_id"]
        for task_id in mine:
            assert finished(one, task_id)["status"] == "succeeded"
        assert finished(two, theirs)["status"] == "succeeded"

        assert [t["task_id"] for t in listed(one)["tasks"]] == mine[::-1]
        assert [t["task_id"] for t in listed(two)["tasks"]] == [theirs]

        base = f"/v1/tasks/{mine[0]}"
        foreign = [
            ("GET", base),
            ("DELETE", base),
            ("GET", f"{base}/result.md"),
            ("GET", f"{base}/result.json"),
            ("GET", f"{base}/layout.json"),
            ("GET", f"{base}/result.zip"),
            ("GET", events_path(mine[0])),
            ("POST", f"{base}/publish"),
        ]
        for method, path in foreign:
            response = two.request(method, path)
            assert response.status_code == 404, (method, path)
            assert response.json()["error"]["code"] == "task_not_found"
        assert two.post(f"{base}/links", json={"file": "full.md"}).status_code == 404
        for method, path in foreign[2:6]:
            assert one.request(method, path).status_code == 200, path
        with one.stream("GET", events_path(mine[0])) as response:
            assert [e.event for e in read_events(response)] == ["end"]
        assert one.post(f"{base}/links", json={"file": "full.md"}).status_code == 201
        assert one.delete(base).status_code == 409  # visible, and already finished

    stored = (server.data_dir / "tasks" / mine[0] / "task.json").read_text()
    assert "sk_one" not in stored  # only a hash of the key is kept
    assert '"owner": "' in stored


def test_tasks_without_an_owner_are_everyones_and_auth_off_sees_all(make_server):
    open_server = make_server(answers=[PAGE_1], api_keys="")
    with httpx.Client(base_url=open_server.url) as anonymous:
        legacy = upload(anonymous, make_pdf(1, picture_page=None)).json()["task_id"]
        assert finished(anonymous, legacy)["status"] == "succeeded"
        assert [t["task_id"] for t in listed(anonymous)["tasks"]] == [legacy]

    keyed = make_server(answers=[PAGE_1], api_keys="sk_one,sk_two", data_dir=open_server.data_dir)
    with (
        httpx.Client(base_url=keyed.url, headers={"Authorization": "Bearer sk_one"}) as one,
        httpx.Client(base_url=keyed.url, headers={"Authorization": "Bearer sk_two"}) as two,
    ):
        owned = upload(one, make_pdf(1, picture_page=None)).json()["task_id"]
        for client in (one, two):
            assert client.get(f"/v1/tasks/{legacy}").status_code == 200
            assert legacy in [t["task_id"] for t in listed(client)["tasks"]]
        assert owned not in [t["task_id"] for t in listed(two)["tasks"]]
        finished(one, owned)


def test_pages_of_three_newest_first_and_the_status_filter(make_server, standin_gpu):
    server = held_server(make_server, standin_gpu)
    client = server.client
    created = [upload(client, make_pdf(1, picture_page=None)).json()["task_id"] for _ in range(7)]

    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = listed(client, **params)
        seen += [t["task_id"] for t in page["tasks"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == created[::-1]

    for task_id in created[1:3]:
        assert client.delete(f"/v1/tasks/{task_id}").json()["status"] == "canceled"
    assert [t["task_id"] for t in listed(client, status="canceled")["tasks"]] == created[2:0:-1]
    queued = listed(client, status="queued")
    assert [t["task_id"] for t in queued["tasks"]] == [created[0], *created[3:]][::-1]
    assert listed(client, status="succeeded") == {"tasks": [], "next_cursor": None}

    for bad in ({"cursor": "not-a-cursor"}, {"status": "lost"}, {"limit": 0}, {"limit": 101}):
        response = client.get("/v1/tasks", params=bad)
        assert response.status_code == 422, bad
        assert set(response.json()["error"]) == {"code", "message"}
    standin_gpu.free_bytes = 8000 * MIB
    for task_id in [created[0], *created[3:]]:
        finished(client, task_id)


def test_queued_tasks_carry_their_position_and_estimates(make_server, standin_gpu):
    server = held_server(make_server, standin_gpu, ds_batch_size=1)
    client = server.client
    first = upload(client, make_pdf(3, picture_page=None)).json()
    assert first["queue_position"] == 1
    assert first["estimated_start_at"] is None  # nothing timed yet: no estimate rather than a guess
    standin_gpu.free_bytes = 8000 * MIB
    done = finished(client, first["task_id"])
    assert (done["queue_position"], done["estimated_start_at"], done["estimated_end_at"]) == (None,) * 3

    standin_gpu.free_bytes = 0
    pages = {"a": 3, "b": 2, "c": 1}
    ids = {
        name: upload(client, make_pdf(n, picture_page=None)).json()["task_id"] for name, n in pages.items()
    }
    wait_for(lambda: client.get(f"/v1/tasks/{ids['a']}").json()["waiting_reason"])  # a is at the gate
    views = {t["task_id"]: t for t in listed(client)["tasks"]}
    a, b, c = (views[ids[name]] for name in "abc")
    assert [a["queue_position"], b["queue_position"], c["queue_position"]] == [1, 2, 3]

    def at(view: dict, field: str) -> datetime:
        return datetime.fromisoformat(view[f"estimated_{field}_at"])

    per_page = (at(a, "end") - at(a, "start")).total_seconds() / 3
    assert per_page > 0
    assert abs((at(b, "end") - at(b, "start")).total_seconds() - 2 * per_page) < 1e-3
    assert abs((at(b, "start") - at(a, "end")).total_seconds()) < 0.5  # b starts when a should end
    assert abs((at(c, "start") - at(b, "end")).total_seconds()) < 0.5
    assert client.delete(f"/v1/tasks/{ids['a']}").status_code == 200
    b_now = client.get(f"/v1/tasks/{ids['b']}").json()
    assert b_now["queue_position"] == 1
    standin_gpu.free_bytes = 8000 * MIB
    for name in "bc":
        finished(client, ids[name])
