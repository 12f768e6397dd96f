"""Usage per tenant and day: the figures equal what the tasks did (their ``raw/`` files, their
uploads, the bytes downloaded), ``GET /v1/usage`` for a user and an admin key, its dates, the
tenant metrics, and both stores (an SQLite file that outlives the process, Redis hashes)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml

from app.documents import DocumentKind
from app.metrics import Metrics
from app.records import Progress, SourceInfo, TaskOptions, TaskRecord
from app.storage.local import LocalStore
from app.storage.redis_conn import sync_client
from app.tasks.usage import Figures, RedisUsage, SqliteUsage, UsageMeter
from app.tenants import Tenants
from tests.documents import make_pdf
from tests.servers import wait_for
from tests.standins import StandInGpu
from tests.test_api_e2e import PAGE_1, PAGE_2, finished, upload


def hashed(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture
def tenants_path(tmp_path: Path) -> Path:
    path = tmp_path / "tenants.yaml"
    entries = [
        {"name": "acme", "keys": [hashed("sk_acme")]},
        {"name": "bravo", "keys": [hashed("sk_bravo")]},
        {"name": "boss", "keys": [hashed("sk_boss")], "role": "admin"},
    ]
    path.write_text(yaml.safe_dump({"tenants": entries}))
    return path


def raw_totals(data_dir: Path, task_id: str) -> dict[str, float]:
    """What the task's raw/ files say it took: pages (first attempts), tokens and seconds of all."""
    payloads = [json.loads(p.read_text()) for p in (data_dir / "tasks" / task_id / "raw").glob("p*.json")]
    return {
        "pages": sum(1 for p in payloads if p.get("rung", 0) == 0),
        "prompt_tokens": sum(p.get("prompt_tokens", 0) for p in payloads),
        "completion_tokens": sum(p["tokens"] for p in payloads),
        "engine_seconds": sum(p["seconds"] for p in payloads),
    }


def usage_of(url: str, key: str, **params: str) -> httpx.Response:
    return httpx.get(f"{url}/v1/usage", params=params, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_usage_equals_what_the_tasks_did(make_server, tenants_path):
    server = make_server(answers=[PAGE_1, PAGE_2], tenants_file=tenants_path)
    acme = httpx.Client(base_url=server.url, headers={"Authorization": "Bearer sk_acme"}, timeout=60)
    bravo = httpx.Client(base_url=server.url, headers={"Authorization": "Bearer sk_bravo"}, timeout=60)
    documents = {"two.pdf": make_pdf(2, picture_page=None), "one.pdf": make_pdf(1, picture_page=None)}
    task_ids = []
    for name, data in documents.items():
        created = upload(acme, data, name, options=json.dumps({"priority": "batch"}))
        assert created.status_code == 202, created.text
        task_ids.append(created.json()["task_id"])
    bravo_task = upload(bravo, make_pdf(1, picture_page=None)).json()["task_id"]
    for task_id in [*task_ids, bravo_task]:
        assert finished(acme if task_id != bravo_task else bravo, task_id)["status"] == "succeeded"
    served = 0
    for task_id in task_ids:
        for name in ("result.md", "result.json"):
            served += len(acme.get(f"/v1/tasks/{task_id}/{name}").content)
    result = acme.get(f"/v1/tasks/{task_ids[0]}/result.json")
    served += len(result.content)

    raws = [raw_totals(server.data_dir, task_id) for task_id in task_ids]
    assert raws[0]["pages"] == len(result.json()["pages"]) == 2
    today = datetime.now(UTC).date().isoformat()

    def acme_usage() -> dict | None:
        body = usage_of(server.url, "sk_acme").json()
        return body if body["tenants"][0]["total"]["tasks"] == 2 else None

    body = wait_for(acme_usage, timeout=10)  # written just after each task's final record
    [entry] = body["tenants"]  # a user key: its own tenant only
    assert entry["tenant"] == "acme"
    assert [day["date"] for day in entry["days"]] == [today]
    assert body["to"] == today
    assert date.fromisoformat(body["to"]) - date.fromisoformat(body["from"]) == timedelta(days=29)
    total = entry["total"]
    assert total == {name: value for name, value in entry["days"][0].items() if name != "date"}
    assert total["pages"] == sum(r["pages"] for r in raws) == 3
    assert total["prompt_tokens"] == sum(r["prompt_tokens"] for r in raws)
    assert total["completion_tokens"] == sum(r["completion_tokens"] for r in raws) > 0
    assert total["engine_seconds"] == pytest.approx(sum(r["engine_seconds"] for r in raws), abs=0.002)
    assert total["bytes_in"] == sum(len(data) for data in documents.values())
    assert total["bytes_out"] == served

    # The task's record keeps what it cost.
    record = json.loads((server.data_dir / "tasks" / task_ids[1] / "task.json").read_text())
    assert record["usage"]["pages"] == 1
    assert record["usage"]["bytes_in"] == len(documents["one.pdf"])

    # Tenant metrics: labelled by the names in the file.
    metrics = acme.get("/metrics").text
    assert 'dsocr_tenant_pages_total{tenant="acme"} 3.0' in metrics
    assert 'dsocr_tenant_pages_total{tenant="bravo"} 1.0' in metrics
    tokens = (
        f'dsocr_tenant_tokens_total{{kind="completion",tenant="acme"}} {float(total["completion_tokens"])}'
    )
    assert tokens in metrics
    acme.close()
    bravo.close()


def test_a_user_sees_its_own_usage_and_an_admin_every_tenants(make_server, tenants_path):
    server = make_server(tenants_file=tenants_path)
    acme = httpx.Client(base_url=server.url, headers={"Authorization": "Bearer sk_acme"}, timeout=60)
    task_id = upload(acme, make_pdf(1, picture_page=None)).json()["task_id"]
    assert finished(acme, task_id)["status"] == "succeeded"
    wait_for(lambda: usage_of(server.url, "sk_acme").json()["tenants"][0]["total"]["tasks"] == 1, timeout=10)

    refused = usage_of(server.url, "sk_acme", tenant="bravo")
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "forbidden"
    assert usage_of(server.url, "sk_acme", tenant="acme").status_code == 200
    assert usage_of(server.url, "wrong-key").status_code == 401

    every = usage_of(server.url, "sk_boss").json()
    named = {entry["tenant"]: entry["total"]["tasks"] for entry in every["tenants"]}
    assert named["acme"] == 1
    assert named["bravo"] == named["boss"] == 0  # listed, idle
    picked = usage_of(server.url, "sk_boss", tenant="acme").json()
    assert [entry["tenant"] for entry in picked["tenants"]] == ["acme"]
    acme.close()


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"from": "2026-02-30"}, 422),
        ({"from": "yesterday"}, 422),
        ({"from": "2026-03-02", "to": "2026-03-01"}, 422),
        ({"from": "2025-01-01", "to": "2026-01-02"}, 422),  # 367 days
        ({"from": "2025-01-01", "to": "2026-01-01"}, 200),  # 366 days
    ],
)
def test_dates_are_checked(make_server, params, status):
    server = make_server()
    response = server.client.get("/v1/usage", params=params)
    assert response.status_code == status, response.text
    if status == 422:
        assert "error" in response.json()


def a_record(store: LocalStore, pages: int, *, retries: int = 0) -> TaskRecord:
    record = TaskRecord(
        source=SourceInfo(filename="a.pdf", content_type="application/pdf", size_bytes=1234, pages=pages),
        options=TaskOptions(),
        page_numbers=list(range(1, pages + 1)),
        input_name="document.pdf",
        input_kind=DocumentKind.PDF,
        progress=Progress(pages_total=pages),
        tenant="acme",
        retries=retries,
        attempts=1,
    )
    spooled = store.spool_path()
    spooled.write_bytes(b"%PDF")
    store.create(record, spooled)
    return record


def test_a_task_counts_each_recognition_in_raw_once_retry_rungs_included(tmp_path):
    store = LocalStore(tmp_path / "data")
    meter = UsageMeter(
        usage=SqliteUsage(tmp_path / "usage.sqlite3"),
        store=store,
        metrics=Metrics(StandInGpu()),
        tenants=Tenants(file=None, api_keys=()),
    )
    record = a_record(store, 3, retries=1)
    for number in (1, 2):  # page 3 was never recognised (the task failed or was canceled there)
        store.write_raw(record.task_id, number, {"tokens": 10, "prompt_tokens": 100, "seconds": 0.5})
    store.write_raw(record.task_id, 2, {"tokens": 7, "prompt_tokens": 90, "seconds": 0.25, "rung": 2}, 2)
    usage = meter.measure(record)
    assert (usage.pages, usage.completion_tokens, usage.prompt_tokens) == (2, 27, 290)
    assert usage.engine_seconds == 1.25
    assert usage.bytes_in == 1234


def test_the_sqlite_store_outlives_its_process_and_adds_up(tmp_path):
    path = tmp_path / "data" / "usage.sqlite3"
    day = date(2026, 12, 7)
    SqliteUsage(path).add("acme", day, Figures(tasks=1, pages=2, engine_seconds=0.5))
    reopened = SqliteUsage(path)  # as after a restart
    reopened.add("acme", day, Figures(tasks=1, pages=3, engine_seconds=0.25, bytes_out=10))
    reopened.add(None, day, Figures(tasks=1))
    reopened.add("acme", day - timedelta(days=1), Figures(tasks=5))
    report = reopened.read(day, day, None)
    assert report["acme"][day] == Figures(tasks=2, pages=5, engine_seconds=0.75, bytes_out=10)
    assert report[None][day] == Figures(tasks=1)
    assert reopened.read(day - timedelta(days=1), day, ["acme"])["acme"][day - timedelta(days=1)].tasks == 5


def test_the_redis_store_is_shared_and_atomic(redis_server):
    day = date(2026, 12, 7)
    clients = [sync_client(redis_server.url) for _ in range(2)]
    try:
        first, second = (RedisUsage(client) for client in clients)

        def add(store: RedisUsage, figures: Figures) -> None:
            for _ in range(20):
                store.add("acme", day, figures)

        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two processes adding at once
            added = [
                pool.submit(add, first, Figures(tasks=1, pages=2, engine_seconds=0.125)),
                pool.submit(add, second, Figures(tasks=1, bytes_out=3)),
            ]
            for future in added:
                future.result()
        second.add(None, day + timedelta(days=1), Figures(tasks=1))
        report = first.read(day, day + timedelta(days=1), None)
        assert report["acme"][day] == Figures(tasks=40, pages=40, engine_seconds=2.5, bytes_out=60)
        assert report[None][day + timedelta(days=1)] == Figures(tasks=1)
        assert first.read(day, day, ["bravo"]) == {}
        ttl = clients[0].ttl(f"dsocr:usage:{day.isoformat()}:acme")
        assert 0 < ttl <= 400 * 86400
    finally:
        for client in clients:
            client.close()
