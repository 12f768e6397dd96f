"""``GET /v1/tasks/{id}/events`` through a real server: order, reconnects, the end, auth, cost."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import httpx
import pytest

from app.tasks.events import EventKind, MemoryEventHub, TaskEvent
from tests.documents import make_pdf
from tests.sse import Event, events_path, read_events
from tests.test_api_e2e import PAGE_1, finished, upload

MIB = 1024 * 1024


def held_server(make_server, standin_gpu, **overrides):
    """A server whose GPU gate holds every task queued until ``standin_gpu.free_bytes`` is raised."""
    standin_gpu.free_bytes = 0
    return make_server(
        answers=[PAGE_1], gpu_probe=standin_gpu, gpu_min_free_mb=1, gpu_poll_seconds=0.05, **overrides
    )


def test_a_stream_reports_the_status_every_page_in_order_then_the_end(make_server, standin_gpu):
    server = held_server(make_server, standin_gpu, ds_batch_size=1)
    task_id = upload(server.client, make_pdf(3, picture_page=None)).json()["task_id"]

    with server.client.stream("GET", events_path(task_id)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response)
        first = next(events)  # the state on connecting, sent at once
        assert (first.event, first.data["status"], first.data["queue_position"]) == ("status", "queued", 1)
        standin_gpu.free_bytes = 8000 * MIB
        rest = list(events)  # the stream closes by itself after the end

    kinds = [event.event for event in rest]
    assert kinds == ["status", "page", "page", "page", "end"]
    assert rest[0].data["status"] == "running"
    pages = [event.data for event in rest[1:4]]
    assert [(p["page"], p["index"], p["pages_done"], p["pages_total"]) for p in pages] == [
        (1, 0, 1, 3),
        (2, 1, 2, 3),
        (3, 2, 3, 3),
    ]
    assert all(p["seconds"] > 0 for p in pages)
    end = rest[-1].data
    assert end["status"] == "succeeded"
    assert end["progress"] == {"pages_done": 3, "pages_total": 3}
    assert end["links"]["markdown"] == f"/v1/tasks/{task_id}/result.md"
    ids = [event.id for event in [first, *rest]]
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # increasing by one: nothing skipped


def test_a_client_that_reconnects_gets_what_it_missed_and_nothing_twice(make_server, standin_gpu):
    server = held_server(make_server, standin_gpu, ds_batch_size=1)
    task_id = upload(server.client, make_pdf(3, picture_page=None)).json()["task_id"]

    seen: list[Event] = []
    with server.client.stream("GET", events_path(task_id)) as response:
        for event in read_events(response):
            seen.append(event)
            if event.event == "status" and event.data["status"] == "queued":
                standin_gpu.free_bytes = 8000 * MIB
            if event.event == "page":
                break  # hang up after the first page
    assert finished(server.client, task_id)["status"] == "succeeded"

    resumed = server.client.stream("GET", events_path(task_id), headers={"Last-Event-ID": str(seen[-1].id)})
    with resumed as response:
        assert response.status_code == 200
        missed = list(read_events(response))
    assert [(e.event, e.data.get("page")) for e in missed] == [("page", 2), ("page", 3), ("end", None)]
    ids = [event.id for event in seen + missed]
    assert ids == sorted(set(ids))
    assert ids == list(range(ids[0], ids[0] + len(ids)))

    # A client that saw the end is told not to reconnect (204 stops an EventSource).
    done = server.client.get(events_path(task_id), headers={"Last-Event-ID": str(missed[-1].id)})
    assert done.status_code == 204


def test_a_finished_task_sends_its_end_at_once_even_after_a_restart(make_server):
    first = make_server(answers=[PAGE_1])
    task_id = upload(first.client, make_pdf(2, picture_page=None)).json()["task_id"]
    assert finished(first.client, task_id)["status"] == "succeeded"
    with first.client.stream("GET", events_path(task_id)) as response:
        events = list(read_events(response))
    assert [(e.event, e.data["status"]) for e in events] == [("end", "succeeded")]
    end_id = events[0].id

    again = make_server(answers=[PAGE_1], data_dir=first.data_dir)  # a new process's hub holds nothing
    started = time.monotonic()
    with again.client.stream("GET", events_path(task_id), headers={"Last-Event-ID": "1"}) as response:
        events = list(read_events(response))
    assert time.monotonic() - started < 5
    assert [(e.id, e.event) for e in events] == [(end_id, "end")]  # the state now, under the same id
    assert again.client.get(events_path(task_id), headers={"Last-Event-ID": str(end_id)}).status_code == 204
    garbage = again.client.get(events_path(task_id), headers={"Last-Event-ID": "99999"})
    assert garbage.status_code == 200  # an id never issued starts afresh
    assert "event: end" in garbage.text


def test_a_last_event_id_this_service_never_sent_starts_the_stream_afresh(make_server):
    server = make_server(answers=[PAGE_1])
    task_id = upload(server.client, make_pdf(1, picture_page=None)).json()["task_id"]
    assert finished(server.client, task_id)["status"] == "succeeded"
    # Digits that are not ASCII ("²" as Latin-1, as UTF-8, a fullwidth "1"), signs, exponents, hex,
    # and counters longer than any task reaches: none is an id we sent, none is an error.
    for header in (b"\xb2", b"\xc2\xb2", b"\xef\xbc\x91", b"-1", b"1e3", b"0x10", b"1" * 19, b"9" * 5000):
        response = server.client.get(events_path(task_id), headers={"Last-Event-ID": header})
        assert response.status_code == 200, (header, response.text)
        assert [event.event for event in read_events(response)] == ["end"]


def test_streams_need_a_key_and_show_only_the_callers_tasks(make_server):
    server = make_server(answers=[PAGE_1], api_keys="sk_one,sk_two")
    with (
        httpx.Client(base_url=server.url, headers={"Authorization": "Bearer sk_one"}) as one,
        httpx.Client(base_url=server.url, headers={"Authorization": "Bearer sk_two"}) as two,
        httpx.Client(base_url=server.url) as anonymous,
    ):
        task_id = upload(one, make_pdf(1, picture_page=None)).json()["task_id"]
        refused = anonymous.get(events_path(task_id))
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "unauthorized"
        hidden = two.get(events_path(task_id))
        assert hidden.status_code == 404
        assert hidden.json()["error"]["code"] == "task_not_found"
        assert two.get(events_path("f" * 32)).status_code == 404
        with one.stream("GET", events_path(task_id)) as response:
            assert response.status_code == 200
            assert list(read_events(response))[-1].event == "end"


def test_idle_streams_get_keep_alive_comments(make_server, standin_gpu):
    server = held_server(make_server, standin_gpu, events_ping_seconds=0.1)
    task_id = upload(server.client, make_pdf(1, picture_page=None)).json()["task_id"]
    with server.client.stream("GET", events_path(task_id)) as response:
        lines = response.iter_lines()
        assert "event: status" in iter(lines.__next__, "")  # the first event, up to its blank line
        comments = 0
        for line in lines:  # the task is held: nothing but keep-alives comes now
            comments += line.startswith(":")
            if comments == 2:
                break
        standin_gpu.free_bytes = 8000 * MIB
        assert "event: end" in list(lines)


async def test_many_open_streams_take_no_thread_each_and_all_see_the_end(make_server, standin_gpu):
    server = held_server(make_server, standin_gpu)
    task_id = upload(server.client, make_pdf(2, picture_page=None)).json()["task_id"]
    streams = 60
    threads_before = threading.active_count()
    first_events = 0
    connected = asyncio.Event()

    async def follow(client: httpx.AsyncClient) -> list[str]:
        nonlocal first_events
        kinds = []
        async with client.stream("GET", events_path(task_id)) as response:
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    kinds.append(line.removeprefix("event: "))
                    first_events += len(kinds) == 1
                    if first_events == streams:
                        connected.set()
        return kinds

    limits = httpx.Limits(max_connections=streams + 5)
    headers = {"Authorization": "Bearer sk_test"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, limits=limits, timeout=60) as client:
        followers = [asyncio.create_task(follow(client)) for _ in range(streams)]
        await asyncio.wait_for(connected.wait(), timeout=30)
        # uvicorn serves every stream on its one event loop; a thread per stream would show here.
        assert threading.active_count() - threads_before < 15
        standin_gpu.free_bytes = 8000 * MIB
        results = await asyncio.wait_for(asyncio.gather(*followers), timeout=60)
    assert all(kinds == ["status", "status", "page", "page", "end"] for kinds in results)


# --- the in-process hub on its own ----------------------------------------------------------------


def _event(event_id: int, kind: EventKind = EventKind.PAGE) -> TaskEvent:
    return TaskEvent(event_id, kind, "{}")


async def test_the_hub_replays_what_it_holds_then_wakes_followers_until_the_end():
    hub = MemoryEventHub()
    await hub.publish("t", _event(2, EventKind.STATUS))
    await hub.publish("t", _event(3))
    assert await hub.oldest("t") == 2
    assert await hub.oldest("other") is None

    async def collect(after: int) -> list[int]:
        async with contextlib.aclosing(hub.follow("t", after)) as events:
            return [event.id async for event in events]

    early, late = asyncio.create_task(collect(0)), asyncio.create_task(collect(2))
    await asyncio.sleep(0.01)
    await hub.publish("t", _event(4))
    await hub.publish("t", _event(5, EventKind.END))
    assert await asyncio.wait_for(asyncio.gather(early, late), 5) == [[2, 3, 4, 5], [3, 4, 5]]
    assert await collect(5) == []  # past the end: nothing to wait for
    with pytest.raises(ValueError, match="not after"):
        await hub.publish("t", _event(5))


async def test_the_hub_forgets_followers_that_leave_and_logs_after_the_end():
    hub = MemoryEventHub(keep_seconds=0.05)
    follower = asyncio.create_task(anext(aiter(hub.follow("quiet", 0))))
    await asyncio.sleep(0.01)
    assert hub.held_tasks() == 1
    follower.cancel()  # a client hanging up: the cancellation runs through the follower's cleanup
    with contextlib.suppress(asyncio.CancelledError):
        await follower
    assert hub.held_tasks() == 0
    await hub.publish("done", _event(1, EventKind.END))
    assert hub.held_tasks() == 1
    await asyncio.sleep(0.1)
    assert hub.held_tasks() == 0
