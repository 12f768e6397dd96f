"""Fair share across tenants, in both queues: the same scenarios against ``MemoryQueue`` (one
process) and ``RedisQueue`` (several processes on a real redis-server), so the two schedules stay
one rule. Weights and limits come from a real tenants file (``app.tenants``)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from app.metrics import Metrics
from app.records import Priority
from app.storage.redis_conn import async_client
from app.tasks.queue import MemoryQueue, TaskQueue, TenantShares
from app.tasks.redis_queue import HELD_COUNT, WAITING_COUNT, RedisQueue
from app.tenants import Tenants
from tests.documents import make_pdf
from tests.scale_cluster import RedisServer
from tests.servers import wait_for
from tests.standins import StandInGpu
from tests.test_api_e2e import finished, upload

MakeQueues = Callable[..., contextlib.AbstractAsyncContextManager[list[TaskQueue]]]


def tenants_file(tmp_path: Path, **tenants: dict[str, int]) -> Tenants:
    """A registry from a real tenants file: ``name={"weight": 2, "running_tasks": 1}``."""
    lines = ["tenants:"]
    for name, spec in tenants.items():
        key = hashlib.sha256(name.encode()).hexdigest()
        lines += [f"  - name: {name}", f'    keys: ["sha256:{key}"]', f"    weight: {spec.get('weight', 1)}"]
        if "running_tasks" in spec:
            lines.append(f"    limits: {{running_tasks: {spec['running_tasks']}}}")
    path = tmp_path / "tenants.yaml"
    path.write_text("\n".join(lines) + "\n")
    return Tenants(file=path, api_keys=())


@pytest.fixture(params=["memory", "redis"])
def make_queues(request: pytest.FixtureRequest, tmp_path: Path) -> MakeQueues:
    """``make_queues(count, tenants)``: ``count`` handles on one queue, as ``count`` worker
    processes would have (memory: one process, so the same queue every time)."""

    @contextlib.asynccontextmanager
    async def make(
        count: int, tenants: Tenants | None = None, visibility: float = 60
    ) -> AsyncIterator[list[TaskQueue]]:
        shares = TenantShares(tenants) if tenants is not None else None
        if request.param == "memory":
            queue = MemoryQueue(maxsize=100, shares=shares)
            yield [queue] * count
            return
        async with redis_queues(
            request.getfixturevalue("redis_server"), count, tenants, visibility
        ) as queues:
            yield list(queues)

    return make


@contextlib.asynccontextmanager
async def redis_queues(
    server: RedisServer, count: int, tenants: Tenants | None = None, visibility: float = 60
) -> AsyncIterator[list[RedisQueue]]:
    """``count`` Redis queues on their own connections, as ``count`` processes would have."""
    shares = TenantShares(tenants) if tenants is not None else None
    clients = [async_client(server.url) for _ in range(count)]
    queues = [
        RedisQueue(
            c, maxsize=100, visibility_seconds=visibility, metrics=Metrics(StandInGpu()), shares=shares
        )
        for c in clients
    ]
    try:
        for queue in queues:
            await queue.setup()
        yield queues
    finally:
        for client in clients:
            await client.aclose()


async def submit(
    queue: TaskQueue, task_id: str, tenant: str | None, priority: Priority = "interactive"
) -> None:
    await (await queue.reserve()).commit(task_id, tenant=tenant, priority=priority)


async def take(queue: TaskQueue) -> str:
    return await asyncio.wait_for(queue.get(), timeout=5)


async def nothing_for(queue: TaskQueue) -> None:
    """The queue has nothing for this worker now (a Redis worker looks again every 2 s)."""
    getting = asyncio.ensure_future(queue.get())
    done, _ = await asyncio.wait([getting], timeout=0.3)
    getting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await getting
    assert not done, f"delivered {getting.result()!r}"


async def test_a_task_of_another_tenant_starts_next_despite_a_deep_queue(make_queues: MakeQueues):
    async with make_queues(1) as (queue,):
        for n in range(50):
            await submit(queue, f"a{n:02d}", "acme")
        assert await take(queue) == "a00"  # the first free worker: acme's turn
        await submit(queue, "b00", "bravo")
        assert await queue.position("b00") == 1
        assert await queue.position("a01") == 2
        assert await take(queue) == "b00"  # not after acme's 49 others
        assert [await take(queue) for _ in range(3)] == ["a01", "a02", "a03"]


async def test_a_tenant_arriving_before_any_start_waits_at_most_one_task(make_queues: MakeQueues):
    async with make_queues(1) as (queue,):
        for n in range(5):
            await submit(queue, f"a{n}", "acme")
        await submit(queue, "b0", "bravo")
        await submit(queue, "b1", "bravo")
        assert [await queue.position(t) for t in ("a0", "b0", "a1", "b1", "a2")] == [1, 2, 3, 4, 5]
        assert [await take(queue) for _ in range(6)] == ["a0", "b0", "a1", "b1", "a2", "a3"]


async def test_weights_give_turns_of_that_many_starts(make_queues: MakeQueues, tmp_path: Path):
    tenants = tenants_file(tmp_path, heavy={"weight": 2}, light={"weight": 1})
    async with make_queues(1, tenants) as (queue,):
        for n in range(6):
            await submit(queue, f"h{n}", "heavy")
            await submit(queue, f"l{n}", "light")
        positions = {
            t: await queue.position(t) for t in [f"h{n}" for n in range(6)] + [f"l{n}" for n in range(6)]
        }
        order = [await take(queue) for _ in range(12)]
        assert [t[0] for t in order] == list("hhlhhlhhllll")
        # Each waiting task's position was where it then started.
        assert sorted(positions, key=lambda t: positions[t]) == order


async def test_interactive_tasks_start_before_the_same_tenants_batch(make_queues: MakeQueues):
    async with make_queues(1) as (queue,):
        for n in range(3):
            await submit(queue, f"batch{n}", "acme", "batch")
        await submit(queue, "now", "acme", "interactive")
        await submit(queue, "other", "bravo", "batch")
        assert await queue.position("now") == 1
        # Across tenants the turn decides: bravo's batch task starts before acme's batch ones.
        assert [await take(queue) for _ in range(5)] == ["now", "other", "batch0", "batch1", "batch2"]


async def test_a_tenant_at_its_running_limit_is_passed_over_on_every_worker(
    make_queues: MakeQueues, tmp_path: Path
):
    tenants = tenants_file(tmp_path, acme={"running_tasks": 1})
    async with make_queues(2, tenants) as (worker_a, worker_b):
        for n in range(3):
            await submit(worker_a, f"a{n}", "acme")
        await submit(worker_a, "b0", "bravo")
        assert await take(worker_a) == "a0"
        assert await take(worker_b) == "b0"  # acme holds its one: bravo's task, though later
        await nothing_for(worker_b)  # only acme's left, and acme is at its limit
        await worker_a.ack("a0")
        assert await take(worker_b) == "a1"
        await nothing_for(worker_a)


async def test_tasks_without_a_tenant_share_like_one_tenant(make_queues: MakeQueues):
    async with make_queues(1) as (queue,):
        for n in range(3):
            await submit(queue, f"n{n}", None)
        await submit(queue, "t0", "acme")
        assert [await take(queue) for _ in range(4)] == ["n0", "t0", "n1", "n2"]


async def test_a_discard_empties_a_line_and_the_turns_go_on(make_queues: MakeQueues):
    async with make_queues(1) as (queue,):
        await submit(queue, "a0", "acme")
        await submit(queue, "b0", "bravo")
        await submit(queue, "c0", "charlie")
        await queue.discard("b0")
        assert await queue.position("b0") is None
        assert await queue.position("c0") == 2
        assert await queue.depth() == 2
        assert [await take(queue) for _ in range(2)] == ["a0", "c0"]
        await nothing_for(queue)


async def test_a_task_given_back_at_shutdown_is_not_held_any_more(redis_server, tmp_path: Path):
    # Only a shared queue is given tasks back at shutdown (the in-process one recovers at start-up).
    tenants = tenants_file(tmp_path, acme={"running_tasks": 1})
    async with redis_queues(redis_server, 2, tenants) as (stopping, other):
        await submit(stopping, "a0", "acme")
        assert await take(stopping) == "a0"
        # The worker's shutdown path: requeue, then ack (which must not drop the new hold).
        await stopping.requeue("a0", tenant="acme", priority="interactive")
        assert await stopping.position("a0") == 1
        assert await take(other) == "a0"
        await stopping.ack("a0")
        assert await other.touch("a0")
        await submit(stopping, "a1", "acme")
        await nothing_for(stopping)  # acme still holds a0, on the other worker


async def test_a_lapsed_hold_is_redelivered_and_still_counts_toward_the_limit(redis_server, tmp_path: Path):
    tenants = tenants_file(tmp_path, acme={"running_tasks": 1})
    async with redis_queues(redis_server, 2, tenants, visibility=0.5) as (silent, rescuer):
        await submit(silent, "a0", "acme")
        await submit(silent, "a1", "acme")
        assert await take(silent) == "a0"
        await nothing_for(rescuer)  # a0 is held (and acme at its limit)
        await asyncio.sleep(0.6)  # the silent worker never renews
        assert await take(rescuer) == "a0"
        assert not await silent.touch("a0")
        await nothing_for(rescuer)  # a1 waits: a0 still counts for acme
        await rescuer.ack("a0")
        assert await take(rescuer) == "a1"
        assert rescuer._metrics.redeliveries._value.get() == 1


async def test_tasks_left_in_the_stream_of_an_earlier_version_are_delivered(redis_server):
    client = async_client(redis_server.url)
    try:
        await client.xgroup_create("dsocr:queue", "workers", id="0", mkstream=True)
        await client.xadd("dsocr:queue", {"task": "f" * 32})
        queue = RedisQueue(client, maxsize=10, visibility_seconds=60, metrics=Metrics(StandInGpu()))
        await queue.setup()
        await queue.setup()  # every process runs it; the second finds nothing to move
        assert await queue.depth() == 1
        assert await take(queue) == "f" * 32
        assert not await client.exists("dsocr:queue")
    finally:
        await client.aclose()


async def test_the_lengths_an_autoscaler_reads_follow_the_queue(redis_server):
    async with redis_queues(redis_server, 2) as (api, worker):
        client = async_client(redis_server.url)

        async def lengths() -> tuple[int, int]:
            return int(await client.llen(WAITING_COUNT)), int(await client.llen(HELD_COUNT))

        try:
            for task_id in ("a", "b", "c"):
                await submit(api, task_id, "acme")
            assert await lengths() == (3, 0)
            assert await take(worker) == "a"
            await api.discard("c")
            assert await lengths() == (1, 1) == (await api.depth(), 1)
            await worker.requeue("a", tenant="acme", priority="interactive")  # given back at shutdown
            assert await lengths() == (2, 0)
            assert [await take(worker), await take(worker)] == ["b", "a"]
            await worker.ack("b")
            await worker.ack("b")  # twice: counted once
            assert await lengths() == (0, 1)
        finally:
            await client.aclose()


def test_through_the_service_a_second_tenant_and_interactive_work_start_first(make_server, tmp_path: Path):
    """One worker, acme's batch work queued deep: bravo's task, submitted last, starts next, and
    acme's interactive task before its own batch ones (read from each task's ``started_at``)."""
    tenants = tenants_file(tmp_path, acme={}, bravo={})
    server = make_server(tenants_file=tenants.file, max_workers=1, page_delay=0.3)
    clients = {
        name: httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {name}"}, timeout=60)
        for name in ("acme", "bravo")
    }

    def submit_as(name: str, priority: Priority) -> str:
        options = json.dumps({"priority": priority})
        response = upload(clients[name], make_pdf(1, picture_page=None), options=options)
        assert response.status_code == 202, response.text
        return response.json()["task_id"]

    first = submit_as("acme", "batch")
    wait_for(lambda: clients["acme"].get(f"/v1/tasks/{first}").json()["status"] == "running")
    batch = [submit_as("acme", "batch") for _ in range(3)]
    urgent = submit_as("acme", "interactive")
    other = submit_as("bravo", "batch")
    assert clients["bravo"].get(f"/v1/tasks/{other}").json()["queue_position"] == 1
    assert clients["acme"].get(f"/v1/tasks/{urgent}").json()["queue_position"] == 2
    started = {}
    for name, task_id in [("acme", t) for t in (first, *batch, urgent)] + [("bravo", other)]:
        view = finished(clients[name], task_id)
        assert view["status"] == "succeeded"
        started[task_id] = view["started_at"]
    assert sorted(started, key=started.__getitem__) == [first, other, urgent, *batch]
    for client in clients.values():
        client.close()
