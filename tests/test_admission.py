"""Caps on held connections (event streams and long-polls) through real servers, and the bounded
Redis pool under them: 429 past a cap per key or in total, each slot back when its stream or wait
ends or its client hangs up, and a pool that answers ``backend_unavailable`` instead of hanging."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from app.errors import BackendUnavailable
from app.storage.redis_conn import async_client
from app.tasks.redis_events import RedisEventHub
from tests.documents import make_pdf
from tests.scale_cluster import RedisServer
from tests.servers import wait_for
from tests.sse import events_path, read_events
from tests.test_api_e2e import finished, upload
from tests.test_events import MIB, held_server
from tests.test_shared_backends import shared_settings

KEYS = ("sk_a", "sk_b", "sk_c")
CAPS = {"api_keys": ",".join(KEYS), "max_streams_per_key": 2, "max_streams_total": 3}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def held_open(client: httpx.Client, kind: str) -> float:
    """``dsocr_streams_open{kind}`` as /metrics shows it now."""
    found = re.search(rf'^dsocr_streams_open\{{kind="{kind}"\}} (\S+)$', client.get("/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


async def until(predicate: Callable[[], object]) -> None:
    """``wait_for`` (10 s) for async tests: it polls in a thread, so the event loop runs meanwhile."""
    await asyncio.to_thread(wait_for, predicate, 10)


@contextlib.contextmanager
def event_stream(client: httpx.Client, task_id: str) -> Iterator[httpx.Response]:
    """An event stream, open once its first event arrived (it is admitted and held); hung up on exit."""
    response = client.send(client.build_request("GET", events_path(task_id)), stream=True)
    try:
        assert response.status_code == 200, response.read()
        events = read_events(response)  # kept: dropping the reader would close the response
        assert next(events).event == "status"
        yield response
    finally:
        response.close()  # before its end: the server sees the client leave


def assert_refused(response: httpx.Response, limit: int, setting: str) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == "too_many_connections"
    assert f"{limit} event streams" in error["message"]
    assert setting in error["message"]
    assert response.headers["retry-after"] == "5"


@pytest.fixture
def clients(make_server, standin_gpu) -> Iterator[tuple[Any, dict[str, httpx.Client], dict[str, str]]]:
    """A server with caps of 2 per key and 3 in all, whose tasks stay queued (their streams open),
    a client per key and a task of each key's own."""
    server = held_server(make_server, standin_gpu, **CAPS)
    with contextlib.ExitStack() as stack:
        by_key = {k: stack.enter_context(httpx.Client(base_url=server.url, headers=auth(k))) for k in KEYS}
        tasks = {k: upload(c, make_pdf(1, picture_page=None)).json()["task_id"] for k, c in by_key.items()}
        yield server, by_key, tasks
        standin_gpu.free_bytes = 8000 * MIB  # let the held tasks end before the server stops


def test_event_streams_are_capped_per_key_and_in_total_and_every_closed_one_comes_back(clients):
    _, by_key, tasks = clients
    a, b, c = (by_key[k] for k in KEYS)
    for _round in range(3):  # a leaked slot would refuse a stream of the next round
        with event_stream(a, tasks["sk_a"]), event_stream(a, tasks["sk_a"]):
            assert_refused(a.get(events_path(tasks["sk_a"])), 2, "APP_MAX_STREAMS_PER_KEY")
            with event_stream(b, tasks["sk_b"]):  # another key is still admitted...
                assert_refused(c.get(events_path(tasks["sk_c"])), 3, "APP_MAX_STREAMS_TOTAL")  # ...up to 3
                assert held_open(a, "events") == 3
        wait_for(lambda: held_open(a, "events") == 0, timeout=10)
    metrics = a.get("/metrics").text
    assert 'dsocr_streams_refused_total{cap="per_key"} 3.0' in metrics
    assert 'dsocr_streams_refused_total{cap="total"} 3.0' in metrics
    # A refusal is not a stream: the task of the key refused is still there to follow.
    with event_stream(c, tasks["sk_c"]):
        pass


async def test_long_polls_count_toward_the_same_caps_and_give_their_slot_back_on_hang_up(clients):
    server, by_key, tasks = clients
    a, c = by_key["sk_a"], by_key["sk_c"]

    async with contextlib.AsyncExitStack() as stack:
        polls = {
            k: await stack.enter_async_context(
                httpx.AsyncClient(base_url=server.url, headers=auth(k), timeout=60)
            )
            for k in KEYS
        }
        task_a = f"/v1/tasks/{tasks['sk_a']}"
        waiting = [asyncio.create_task(polls["sk_a"].get(task_a, params={"wait": 50})) for _ in range(2)]
        await until(lambda: held_open(a, "wait") == 2)
        assert_refused(await polls["sk_a"].get(task_a, params={"wait": 50}), 2, "APP_MAX_STREAMS_PER_KEY")
        assert_refused(a.get(events_path(tasks["sk_a"])), 2, "APP_MAX_STREAMS_PER_KEY")  # one count
        assert a.get(task_a).status_code == 200  # a read without wait holds nothing

        # POST /v1/convert's wait counts too, held from before the upload is read.
        document = {"file": ("b.pdf", make_pdf(1, picture_page=None))}
        waiting.append(asyncio.create_task(polls["sk_b"].post("/v1/convert", files=document)))
        await until(lambda: held_open(a, "wait") == 3)
        refused = c.post("/v1/convert", params={"wait": 50}, files={"file": ("c.pdf", make_pdf(1))})
        assert_refused(refused, 3, "APP_MAX_STREAMS_TOTAL")
        assert len(c.get("/v1/tasks").json()["tasks"]) == 1  # the refused convert stored no task
        assert c.post("/v1/convert", params={"wait": 0}, files=document).status_code == 202  # no wait held

        for poll in waiting:  # the clients hang up long before their waits are over
            poll.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        await until(lambda: held_open(a, "wait") == 0)

        # As many new ones are admitted, and each answers when its wait is over.
        again = [polls["sk_a"].get(task_a, params={"wait": 1}) for _ in range(2)]
        again.append(polls["sk_b"].get(f"/v1/tasks/{tasks['sk_b']}", params={"wait": 1}))
        answers = await asyncio.gather(*again)
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert all(r.json()["status"] == "queued" for r in answers)
    hung_up = re.findall(r'^dsocr_http_requests_total\{.*status="499"\} (\S+)$', a.get("/metrics").text, re.M)
    assert sum(map(float, hung_up)) == 3  # the hang-ups are counted apart from the answers


def test_with_auth_off_every_caller_shares_the_one_anonymous_owner(make_server, standin_gpu):
    server = held_server(make_server, standin_gpu, api_keys="", max_streams_per_key=1, max_streams_total=10)
    with httpx.Client(base_url=server.url) as one, httpx.Client(base_url=server.url) as other:
        task_id = upload(one, make_pdf(1, picture_page=None)).json()["task_id"]
        with event_stream(one, task_id):
            refused = other.get(events_path(task_id))
            assert_refused(refused, 1, "APP_MAX_STREAMS_PER_KEY")
            assert "anonymous" in refused.json()["error"]["message"]
        wait_for(lambda: held_open(one, "events") == 0, timeout=10)
        with event_stream(other, task_id):
            pass
    standin_gpu.free_bytes = 8000 * MIB


# --- on Redis: each held stream holds a connection of the bounded pool --------------------------


def test_on_redis_the_caps_hold_and_the_pool_gets_every_connection_back(
    make_server, standin_gpu, redis_server, s3
):
    server = held_server(make_server, standin_gpu, **CAPS, **shared_settings(redis_server, s3))
    with (
        httpx.Client(base_url=server.url, headers=auth("sk_a")) as a,
        httpx.Client(base_url=server.url, headers=auth("sk_b")) as b,
    ):
        task_a = upload(a, make_pdf(1, picture_page=None)).json()["task_id"]
        task_b = upload(b, make_pdf(1, picture_page=None)).json()["task_id"]
        # The pool holds 3 + 3 * 1 + 32 connections (APP_MAX_STREAMS_TOTAL, a worker, headroom):
        # 15 rounds of 3 streams would exhaust it if a closed stream kept its connection.
        for _round in range(15):
            with event_stream(a, task_a), event_stream(a, task_a), event_stream(b, task_b):
                assert_refused(b.get(events_path(task_b)), 3, "APP_MAX_STREAMS_TOTAL")
            wait_for(lambda: held_open(a, "events") == 0, timeout=10)
        poll = b.get(f"/v1/tasks/{task_b}", params={"wait": 0.5})
        assert (poll.status_code, poll.json()["status"]) == (200, "queued")
        # Ended before the server stops: a worker still waiting at the GPU gate delays its shutdown.
        standin_gpu.free_bytes = 8000 * MIB
        assert finished(a, task_a)["status"] == finished(b, task_b)["status"] == "succeeded"


async def test_an_exhausted_pool_answers_backend_unavailable_and_never_hangs(redis_server: RedisServer):
    client = async_client(redis_server.url, max_connections=2, pool_timeout=0.5)
    hub = RedisEventHub(client)
    try:
        # Two followers of a task with no events yet: each holds a connection in XREAD BLOCK.
        followers = [asyncio.create_task(anext(hub.follow("t", 0))) for _ in range(2)]
        with redis_server.client() as admin:
            await until(lambda: sum(c["cmd"] == "xread" for c in admin.client_list()) == 2)
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="Redis"):
            await hub.oldest("t")
        assert time.monotonic() - started < 3  # the pool's timeout, not the 15 s of reconnect retries
        for follower in followers:
            follower.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
        assert await hub.oldest("t") is None  # the cancelled reads gave their connections back
    finally:
        await client.aclose()
