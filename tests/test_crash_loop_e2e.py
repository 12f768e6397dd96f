"""Crash loops: a task fails for its own crashes only.

The rule lives on the record (``TaskRecord.interrupted``): a death of the service counts against the
running task only when the start it ended got no page further. First the rule itself, then real
processes: the service SIGKILLed 20 times while tasks run loses none of them, and a document whose
page kills the service every time (``tests.crashing_service``) still ends ``failed`` naming that
page, with the in-process queue and with the Redis queue's redelivery.
"""

from __future__ import annotations

import functools
import json
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.documents import DocumentKind
from app.records import MAX_STRIKES, Progress, SourceInfo, TaskOptions, TaskRecord, TaskStatus
from app.storage.local import LocalStore
from tests.crashing_service import crash_pdf
from tests.documents import make_pdf
from tests.scale_cluster import Cluster, Node, RedisServer, S3Server, submit, wait_until_ended
from tests.servers import REPO, ProcessServer, wait_for

FINAL = ("succeeded", "failed", "canceled")


def a_record(pages: int) -> TaskRecord:
    return TaskRecord(
        source=SourceInfo(filename="a.pdf", content_type="application/pdf", size_bytes=3, pages=pages),
        options=TaskOptions(),
        page_numbers=list(range(1, pages + 1)),
        input_name="document.pdf",
        input_kind=DocumentKind.PDF,
        progress=Progress(pages_total=pages),
    )


def run_pages(record: TaskRecord, done: int) -> None:
    """A start that gets ``done`` pages done (read back or new), in order, before its worker dies."""
    record.start()
    record.progress.pages_done = 0
    for number in record.page_numbers[:done]:
        record.count_page(number, truncated=False)


# --- the rule ---------------------------------------------------------------------------------------


def test_deaths_count_only_while_no_page_gets_done_and_name_the_page():
    record = a_record(6)
    run_pages(record, 2)
    assert not record.interrupted()  # two new pages: a restart loses nothing
    for strike in range(1, MAX_STRIKES):
        run_pages(record, 2)  # the two pages read back, then death on page 3
        assert record.interrupted()
        assert (record.strikes, record.crash_error()) == (strike, None)
    run_pages(record, 3)  # page 3 got done this time: the strikes were page 3's, not the task's
    assert not record.interrupted()
    assert record.strikes == 0
    for _ in range(MAX_STRIKES):
        run_pages(record, 3)
        record.interrupted()
    error = record.crash_error()
    assert error is not None
    assert error.code == "too_many_attempts"
    assert "page 4" in error.message
    assert record.attempts == 2 * MAX_STRIKES + 1


def test_a_record_stored_before_crash_accounting_still_loads(tmp_path):
    store = LocalStore(tmp_path)
    record = a_record(2)
    spooled = store.spool_path()
    spooled.write_bytes(b"%PDF-1.7")
    store.create(record, spooled)
    path = tmp_path / "tasks" / record.task_id / "task.json"
    old = record.model_dump_json(exclude={"pages_kept", "kept_at_start", "strikes"})
    path.write_text(old.replace('"status":"queued"', '"status":"running"'))
    loaded = store.load(record.task_id)
    assert (loaded.status, loaded.pages_kept, loaded.strikes) == (TaskStatus.RUNNING, 0, 0)
    assert loaded.interrupted()  # one strike of three: an upgrade never fails a task
    assert loaded.crash_error() is None


# --- real processes ---------------------------------------------------------------------------------


def service_env(tiny_model_dir: Path, data_dir: Path) -> dict[str, str]:
    return {
        "APP_DATA_DIR": str(data_dir),
        "APP_DS_MODEL_PATH": str(tiny_model_dir),
        "APP_DS_DTYPE": "float32",
        "APP_DS_MAX_NEW_TOKENS": "48",
        "APP_DS_BATCH_SIZE": "1",
        "APP_API_KEYS": "sk_test",
        # Random weights cut at 48 tokens leave every page suspect, and each would be asked for
        # again; tests/test_retry_ladder.py shows a resumed task keeps its retries too.
        "APP_PAGE_RETRIES": "0",
        "APP_LOG_LEVEL": "warning",
    }


class CrashingServer(ProcessServer):
    """``python -m tests.crashing_service`` (``python -m app`` whose engine dies on a crash page)."""

    def start(self, timeout: float = 60) -> CrashingServer:
        self.spawn([sys.executable, "-m", "tests.crashing_service"], self._env, cwd=REPO)
        self.wait_ready("/healthz", timeout)
        return self


class CrashingNode(Node):
    """A cluster worker running ``tests.crashing_service``."""

    def launch(self) -> Node:
        self.paused = False
        self.spawn([sys.executable, "-m", "tests.crashing_service"], self._env, cwd=REPO)
        return self


def views(client: httpx.Client, task_ids: list[str]) -> dict[str, dict[str, Any]] | None:
    """Each task's view, or ``None`` while the service does not answer (dead, or starting)."""
    try:
        answers = {task_id: client.get(f"/v1/tasks/{task_id}") for task_id in task_ids}
    except httpx.TransportError:
        return None
    for response in answers.values():
        assert response.status_code == 200, response.text
    return {task_id: response.json() for task_id, response in answers.items()}


def ended(client: httpx.Client, task_id: str) -> dict[str, Any] | None:
    """The task's view once it has ended, else ``None``."""
    view: dict[str, Any] = client.get(f"/v1/tasks/{task_id}").json()
    return view if view["status"] in FINAL else None


@pytest.fixture
def client_for() -> Iterator[Any]:
    clients: list[httpx.Client] = []

    def make(url: str) -> httpx.Client:
        client = httpx.Client(base_url=url, headers={"Authorization": "Bearer sk_test"}, timeout=30)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


KILLS = 20
PAGES = 5


def test_twenty_kills_while_tasks_run_lose_no_task(tiny_model_dir, tmp_path, client_for):
    """SIGKILL every few seconds while five tasks wait or run (one worker). Every other kill comes
    as soon as the service answers, before the model has even loaded: the running task gets no page
    further, a strike; the others come a moment after a page beyond the best any start had done,
    which clears it. Under the old rule (every start counts, three allowed) the first task failed
    after three kills."""
    rng = random.Random(14)
    data_dir = tmp_path / "data"
    server = ProcessServer(service_env(tiny_model_dir, data_dir), tmp_path / "server.log").start()
    client = client_for(server.url)
    started = time.monotonic()
    try:
        task_ids = [
            client.post("/v1/tasks/upload", files={"file": (f"t{n}.pdf", make_pdf(PAGES))}).json()["task_id"]
            for n in range(4)
        ]
        best = dict.fromkeys(task_ids, 0)  # the most pages any start of each task had done

        def got_further() -> bool:
            seen = views(client, task_ids)
            if seen is None:
                return False
            for view in seen.values():
                assert view["status"] != "failed", (view, server.log_tail())
            return any(view["progress"]["pages_done"] > best[task_id] for task_id, view in seen.items())

        for kill in range(KILLS):
            if kill % 2:
                wait_for(got_further, timeout=120, interval=0.05)
                time.sleep(rng.uniform(0, 0.5))  # anywhere in the next page: render, model, save
            else:
                time.sleep(rng.uniform(0, 1.0))  # the model has not even loaded: no page
            server.kill()
            for task_id in task_ids:  # what the dead service had saved, pages it saw done unseen here too
                stored = json.loads((data_dir / "tasks" / task_id / "task.json").read_text())
                best[task_id] = max(best[task_id], stored["progress"]["pages_done"])
            server.start()
            if kill == KILLS // 2:  # accepted between two kills
                late = client.post("/v1/tasks/upload", files={"file": ("late.pdf", make_pdf(PAGES))})
                assert late.status_code == 202, late.text
                task_ids.append(late.json()["task_id"])
                best[task_ids[-1]] = 0
        killing = time.monotonic() - started
        unfinished = [v for v in (views(client, task_ids) or {}).values() if v["status"] != "succeeded"]
        assert len(unfinished) >= 2  # the kills hit running work, and more was waiting

        for task_id in task_ids:
            done = wait_for(functools.partial(ended, client, task_id), timeout=180, interval=0.2)
            assert done["status"] == "succeeded", (done, server.log_tail())
            assert done["progress"] == {"pages_done": PAGES, "pages_total": PAGES}
            layout = client.get(f"/v1/tasks/{task_id}/layout.json").json()
            assert [page["page"] for page in layout["pages"]] == list(range(1, PAGES + 1))
            assert client.get(f"/v1/tasks/{task_id}/result.md").status_code == 200
            assert len(list((data_dir / "tasks" / task_id / "raw").iterdir())) == PAGES
        print(
            f"\n{len(task_ids)} tasks x {PAGES} pages, {KILLS} SIGKILLs in {killing:.0f} s, "
            f"all succeeded after {time.monotonic() - started:.0f} s"
        )
    finally:
        server.stop()


def supervise(process: ProcessServer, client: httpx.Client, task_ids: list[str], timeout: float) -> int:
    """Restart ``process`` whenever it dies, as a container runtime would, until every task ended;
    returns how many times it died."""
    deaths = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.process is not None
        if process.process.poll() is not None:
            deaths += 1
            process.start()
            continue
        seen = views(client, task_ids)
        if seen is not None and all(view["status"] in FINAL for view in seen.values()):
            return deaths
        time.sleep(0.1)
    raise AssertionError(f"tasks not ended in {timeout} s after {deaths} deaths: {process.log_tail()}")


def test_a_page_that_kills_the_service_every_time_fails_its_task_only(tiny_model_dir, tmp_path, client_for):
    server = CrashingServer(service_env(tiny_model_dir, tmp_path / "data"), tmp_path / "server.log").start()
    client = client_for(server.url)
    try:
        bad = client.post("/v1/tasks/upload", files={"file": ("bad.pdf", crash_pdf(5, crash_page=3))})
        good = client.post("/v1/tasks/upload", files={"file": ("good.pdf", make_pdf(2))})
        task_ids = [bad.json()["task_id"], good.json()["task_id"]]
        deaths = supervise(server, client, task_ids, timeout=240)
        failed, succeeded = (client.get(f"/v1/tasks/{task_id}").json() for task_id in task_ids)
    finally:
        server.stop()
    # The first death followed two new pages and is forgiven; then page 3 gets MAX_STRIKES.
    assert deaths == 1 + MAX_STRIKES, server.log_tail()
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "too_many_attempts"
    assert "page 3" in failed["error"]["message"]
    assert failed["progress"]["pages_done"] == 2
    assert succeeded["status"] == "succeeded", succeeded  # queued behind it, never started before


def test_a_page_that_kills_every_worker_fails_its_task_through_redelivery(
    tiny_model_dir, tmp_path, redis_server: RedisServer, s3: S3Server
):
    cluster = Cluster(
        tmp_path / "cluster",
        model_dir=tiny_model_dir,
        redis_server=redis_server,
        s3=s3,
        env={"APP_VISIBILITY_TIMEOUT_SECONDS": "3", "APP_LOG_LEVEL": "warning"},
    )
    try:
        cluster.start(apis=1, workers=0)
        data_dir = tmp_path / "cluster" / "worker0"
        data_dir.mkdir(parents=True)
        env = {**cluster.env, "APP_ROLE": "worker", "APP_DATA_DIR": str(data_dir)}
        worker = CrashingNode("worker0", "worker", env, tmp_path / "cluster" / "worker0.log")
        cluster.workers.append(worker)
        worker.start()
        client = cluster.client()
        bad = submit(client, crash_pdf(2, crash_page=1), "bad.pdf")
        good = submit(client, make_pdf(1), "good.pdf")
        deaths = supervise(worker, client, [bad, good], timeout=240)
        failed, succeeded = wait_until_ended(client, bad), wait_until_ended(client, good)
        assert deaths == MAX_STRIKES, cluster.logs()  # each on page 1, none got a page further
        assert failed["status"] == "failed", failed
        assert failed["error"]["code"] == "too_many_attempts"
        assert "page 1" in failed["error"]["message"]
        assert succeeded["status"] == "succeeded", succeeded
    finally:
        cluster.close()
