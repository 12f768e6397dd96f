"""``/readyz`` as probes and load balancers see it: each role of a scaled-out deployment, and the
503 answers that take a process out of rotation. (Who sees the model is in ``test_exposure.py``.)"""

from __future__ import annotations

import time

from tests.documents import make_pdf
from tests.servers import wait_for
from tests.test_api_e2e import PAGE_1, finished, upload
from tests.test_shared_backends import shared_settings


def test_an_api_replica_is_ready_without_workers_and_a_worker_serves_no_api(redis_server, s3, make_server):
    api = make_server(answers=[PAGE_1], role="api", **shared_settings(redis_server, s3))
    worker = make_server(answers=[PAGE_1], role="worker", max_workers=2, **shared_settings(redis_server, s3))

    ready = api.client.get("/readyz")
    assert ready.status_code == 200
    assert (ready.json()["status"], ready.json()["role"]) == ("ready", "api")
    assert ready.json()["workers"] == {"alive": 0, "configured": 0}  # its workers run elsewhere

    ready = worker.client.get("/readyz")
    assert ready.status_code == 200
    assert (ready.json()["status"], ready.json()["role"]) == ("ready", "worker")
    assert ready.json()["workers"] == {"alive": 2, "configured": 2}
    assert worker.client.get("/healthz").status_code == 200
    refused = worker.client.post("/v1/tasks/upload", files={"file": ("a.pdf", make_pdf(1))})
    assert refused.status_code == 404  # a worker takes tasks from the queue, never from a client

    task_id = upload(api.client, make_pdf(1, picture_page=None)).json()["task_id"]
    assert finished(api.client, task_id)["status"] == "succeeded"


def test_readyz_is_503_while_the_queue_is_unreachable(redis_server, s3, make_server):
    api = make_server(answers=[PAGE_1], role="api", **shared_settings(redis_server, s3))
    redis_server.stop()
    try:
        started = time.monotonic()
        refused = api.client.get("/readyz")
        answered_in = time.monotonic() - started
    finally:
        redis_server.start()
    assert refused.status_code == 503
    # Within the chart's probe timeout (5 s), though the Redis clients retry for about 15 s.
    assert answered_in < 5, answered_in
    assert (refused.json()["status"], refused.json()["queue_depth"]) == ("not_ready", None)
    assert refused.json()["storage_writable"] is False  # the task records live in Redis too
    wait_for(lambda: api.client.get("/readyz").status_code == 200, timeout=30)


def test_readyz_is_503_while_storage_is_unwritable(make_server):
    server = make_server(answers=[PAGE_1])
    tasks_dir = server.data_dir / "tasks"
    tasks_dir.rename(server.data_dir / "tasks-gone")  # as when the data volume is unmounted
    refused = server.client.get("/readyz")
    (server.data_dir / "tasks-gone").rename(tasks_dir)
    assert refused.status_code == 503
    assert (refused.json()["status"], refused.json()["storage_writable"]) == ("not_ready", False)
    assert refused.json()["queue_depth"] == 0
    assert server.client.get("/readyz").status_code == 200
