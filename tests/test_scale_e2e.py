"""Scale-out, end to end: API and worker processes sharing a real Redis and an S3 server.

Every process is ``python -m app`` with the tiny model, as a deployment runs it; workers are
SIGKILLed, SIGSTOPped and started again, Redis is restarted, and the tests check that no accepted
task is lost, none is written twice, and any API replica serves any task.
"""

from __future__ import annotations

import functools
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.documents import make_pdf
from tests.scale_cluster import (
    Cluster,
    Node,
    RedisServer,
    S3Server,
    listed_tasks,
    patiently,
    result_keys,
    submit,
    view,
    wait_until_ended,
)
from tests.servers import wait_for
from tests.sse import events_path, read_events

pytestmark = pytest.mark.slow  # the redis_server fixture skips where redis-server is missing

_OUT_KEY = re.compile(r"tasks/([0-9a-f]{32})/out/[^/]+/full\.md")


@pytest.fixture
def make_cluster(
    tiny_model_dir: Path, tmp_path: Path, redis_server: RedisServer, s3: S3Server
) -> Iterator[Callable[..., Cluster]]:
    """A cluster on this test's Redis and bucket; keyword arguments are ``APP_*`` variables."""
    clusters: list[Cluster] = []

    def make(**env: object) -> Cluster:
        cluster = Cluster(
            tmp_path / f"cluster{len(clusters)}",
            model_dir=tiny_model_dir,
            redis_server=redis_server,
            s3=s3,
            env={name: str(value) for name, value in env.items()},
        )
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        cluster.close()


def running_holder(cluster: Cluster) -> Node | None:
    """The worker whose ``dsocr_tasks_running`` gauge says it runs a task now (the first one)."""
    return next(
        (w for w in cluster.workers if w.alive() and (w.metric("dsocr_tasks_running") or 0) >= 1), None
    )


def results_by_task(s3: S3Server) -> dict[str, list[str]]:
    """Every ``tasks/<id>/out/<lease>/full.md`` of the bucket, by task."""
    found: dict[str, list[str]] = defaultdict(list)
    for key in s3.objects("tasks/"):
        if match := _OUT_KEY.fullmatch(key):
            found[match.group(1)].append(key)
    return found


# --- many tasks, a killed worker, a Redis restart -------------------------------------------------

TASKS = 40


def test_every_task_succeeds_once_through_a_killed_worker_and_a_redis_restart(make_cluster, redis_server, s3):
    cluster = make_cluster(APP_VISIBILITY_TIMEOUT_SECONDS=4).start(apis=2, workers=2)
    clients = [cluster.client(0), cluster.client(1)]
    documents = [make_pdf(1, picture_page=None), make_pdf(2, picture_page=None)]
    task_ids = [submit(clients[i % 2], documents[i % 2], f"doc{i}.pdf") for i in range(TASKS)]

    # A worker dies mid-task: once a two-page task is halfway, the first worker found running a task.
    def mid_task() -> Node | None:
        listing = patiently(lambda: clients[0].get("/v1/tasks", params={"status": "running", "limit": 100}))
        halfway = any(
            0 < t["progress"]["pages_done"] < t["progress"]["pages_total"] for t in listing.json()["tasks"]
        )
        return running_holder(cluster) if halfway else None

    victim = wait_for(mid_task, timeout=120, interval=0.1)
    victim.kill()
    victim.start()

    # Redis goes away and comes back while tasks are still queued and running.
    wait_for(lambda: sum(cluster.succeeded_log_ids().values()) >= TASKS // 2, timeout=120, interval=0.2)
    assert sum(cluster.succeeded_log_ids().values()) < TASKS, "every task ended before the Redis restart"
    redis_server.stop()
    # Down past the clients' own retries (about 15 s): callers see 503, to retry, not an error or a
    # hang. Longer than the visibility timeout too, so leases lapse and running tasks change hands.
    wait_for(lambda: clients[1].get(f"/v1/tasks/{task_ids[0]}").status_code == 503, timeout=60)
    redis_server.start()

    views = [wait_until_ended(clients[i % 2], task_id, timeout=150) for i, task_id in enumerate(task_ids)]
    assert [v["status"] for v in views] == ["succeeded"] * TASKS, cluster.logs()

    # Written once: one result directory per task, one "succeeded" line per task across all workers.
    written = results_by_task(s3)
    assert sorted(written) == sorted(task_ids)
    assert {task_id: len(keys) for task_id, keys in written.items() if len(keys) != 1} == {}
    logged = cluster.succeeded_log_ids()
    assert sorted(logged) == sorted(task_ids)
    assert {task_id: n for task_id, n in logged.items() if n != 1} == {}
    # Both workers did some of the work (the restarted one after its restart, or before).
    assert all(worker.succeeded_ids() for worker in cluster.workers)

    # Any replica serves any task, whichever accepted it.
    for task_id in task_ids:
        path = f"/v1/tasks/{task_id}/result.md"
        first, second = (patiently(functools.partial(c.get, path)) for c in clients)
        assert (first.status_code, second.status_code) == (200, 200), (first.text, second.text)
        assert first.content == second.content
    for client in clients:
        listed = dict(listed_tasks(client))
        assert listed == dict.fromkeys(task_ids, "succeeded")


# --- a stalled worker comes back after another one finished its task -------------------------------


def test_a_stalled_worker_cannot_overwrite_a_task_another_worker_finished(make_cluster, s3):
    pages = 8
    cluster = make_cluster(APP_VISIBILITY_TIMEOUT_SECONDS=3).start(apis=1, workers=2)
    client = cluster.client()
    task_id = submit(client, make_pdf(pages))
    wait_for(lambda: view(client, task_id)["progress"]["pages_done"] >= 1, timeout=180, interval=0.1)
    stalled = wait_for(lambda: running_holder(cluster), timeout=60, interval=0.1)
    stalled.pause()
    winner = next(w for w in cluster.workers if w is not stalled)

    # Past the visibility timeout the other worker takes the task over and finishes it.
    finished = wait_until_ended(client, task_id, timeout=120)
    assert finished["status"] == "succeeded", (finished, cluster.logs())
    assert finished["progress"] == {"pages_done": pages, "pages_total": pages}
    assert winner.succeeded_ids() == [task_id]
    before = {
        "view": finished,
        "markdown": client.get(f"/v1/tasks/{task_id}/result.md").content,
        "layout": client.get(f"/v1/tasks/{task_id}/layout.json").content,
        "objects": s3.objects(f"tasks/{task_id}/out/"),
    }
    assert len(result_keys(s3, task_id)) == 1
    [winner_md] = result_keys(s3, task_id)
    assert s3.read(winner_md) == before["markdown"]

    # The stalled worker wakes up. Once the other worker is gone, a new task can only go to it, and
    # it can only start once the stale one is behind it (one task at a time).
    stalled.resume()
    winner.stop()
    next_id = submit(client, make_pdf(1, picture_page=None))
    assert wait_until_ended(client, next_id, timeout=180)["status"] == "succeeded", cluster.logs()
    assert stalled.succeeded_ids() == [next_id]
    assert httpx.get(f"{stalled.url}/healthz", timeout=5).status_code == 200

    after = {
        "view": view(client, task_id),
        "markdown": client.get(f"/v1/tasks/{task_id}/result.md").content,
        "layout": client.get(f"/v1/tasks/{task_id}/layout.json").content,
        "objects": s3.objects(f"tasks/{task_id}/out/"),
    }
    assert after == before, cluster.logs()
    assert result_keys(s3, task_id) == [winner_md]
    assert cluster.succeeded_log_ids()[task_id] == 1


# --- cancel on one replica, events on the other -----------------------------------------------------


def test_a_cancel_reaches_the_worker_and_events_reach_the_other_replica(make_cluster, s3):
    pages = 12
    cluster = make_cluster().start(apis=2, workers=1)
    accepting, watching = cluster.client(0), cluster.client(1)
    task_id = submit(accepting, make_pdf(pages))

    events = []
    canceled = None
    with watching.stream("GET", events_path(task_id)) as response:
        assert response.status_code == 200
        for event in read_events(response):
            events.append(event)
            if event.event == "page" and canceled is None:
                canceled = accepting.delete(f"/v1/tasks/{task_id}")
    assert canceled is not None, [(e.event, e.data.get("status")) for e in events]
    assert canceled.status_code == 200, canceled.text

    kinds = Counter(event.event for event in events)
    assert kinds["page"] >= 1
    end = events[-1]
    assert end.event == "end", events
    assert end.data["status"] == "canceled"
    assert end.data["progress"]["pages_done"] < pages
    for client in (accepting, watching):
        assert view(client, task_id)["status"] == "canceled"
    assert result_keys(s3, task_id) == []
    assert task_id not in cluster.succeeded_log_ids()

    # The worker is free again: the next task runs to the end.
    next_id = submit(watching, make_pdf(1, picture_page=None))
    assert wait_until_ended(accepting, next_id, timeout=180)["status"] == "succeeded", cluster.logs()


# --- the queue bound holds across replicas -----------------------------------------------------------


def test_the_queue_bound_holds_across_api_replicas(make_cluster):
    cluster = make_cluster(APP_QUEUE_MAX=2).start(apis=2, workers=0)
    clients = [cluster.client(0), cluster.client(1)]
    document = make_pdf(1, picture_page=None)
    first = submit(clients[0], document)
    second = submit(clients[1], document)
    # Positions come from the shared queue, whichever replica is asked.
    assert view(clients[1], first)["queue_position"] == 1
    assert view(clients[0], second)["queue_position"] == 2
    for client in clients:
        refused = client.post("/v1/tasks/upload", files={"file": ("third.pdf", document)})
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "queue_full"
        assert int(refused.headers["Retry-After"]) >= 1
    listed = dict(listed_tasks(clients[1]))
    assert sorted(listed.values()) == ["queued", "queued"]


# --- a task whose worker keeps being killed ---------------------------------------------------------


def test_a_task_whose_worker_is_killed_after_each_new_page_still_succeeds(make_cluster):
    # Deaths that are not the task's fault (each start got a page further) never fail it; a page that
    # kills every worker does: tests/test_crash_loop_e2e.py.
    cluster = make_cluster(APP_VISIBILITY_TIMEOUT_SECONDS=3).start(apis=1, workers=1)
    client = cluster.client()
    [worker] = cluster.workers
    task_id = submit(client, make_pdf(12))
    done = 0

    def further() -> int:
        pages_done: int = view(client, task_id)["progress"]["pages_done"]
        return pages_done if pages_done > done else 0

    for _ in range(4):
        # Killed each time it is running again: a page more than before was recognised.
        done = wait_for(further, timeout=180, interval=0.05)
        worker.kill()
        worker.start()
    ended = wait_until_ended(client, task_id, timeout=180)
    assert ended["status"] == "succeeded", (ended, cluster.logs())
    assert ended["progress"]["pages_done"] == 12
