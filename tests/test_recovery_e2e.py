"""No accepted task is lost: a server killed mid-task resumes it in a new process."""

from __future__ import annotations

import httpx

from tests.documents import make_pdf
from tests.servers import ProcessServer, wait_for

PAGES = 8


def test_killed_server_resumes_its_task_from_the_last_finished_page(tiny_model_dir, tmp_path):
    data_dir = tmp_path / "data"
    env = {
        "APP_DATA_DIR": str(data_dir),
        "APP_DS_MODEL_PATH": str(tiny_model_dir),
        "APP_DS_DTYPE": "float32",
        "APP_DS_MAX_NEW_TOKENS": "48",
        "APP_DS_BATCH_SIZE": "1",
        "APP_API_KEYS": "sk_test",
        "APP_LOG_LEVEL": "warning",
        # Random weights cut at 48 tokens leave every page suspect, and each would be asked for
        # again; tests/test_retry_ladder.py shows a resumed task keeps its retries too.
        "APP_PAGE_RETRIES": "0",
    }
    headers = {"Authorization": "Bearer sk_test"}
    first = ProcessServer(env, tmp_path / "server.log").start()
    try:
        with httpx.Client(base_url=first.url, headers=headers, timeout=30) as client:
            view = client.post("/v1/tasks/upload", files={"file": ("long.pdf", make_pdf(PAGES))}).json()
            task_id = view["task_id"]
            wait_for(
                lambda: client.get(f"/v1/tasks/{task_id}").json()["progress"]["pages_done"] >= 2, timeout=120
            )
            queued = client.post("/v1/tasks/upload", files={"file": ("next.pdf", make_pdf(1))}).json()
            first.kill()
    finally:
        first.stop()

    raw_dir = data_dir / "tasks" / task_id / "raw"
    survivors = {path.name: path.stat().st_mtime_ns for path in raw_dir.iterdir()}
    assert 2 <= len(survivors) < PAGES

    second = ProcessServer(env, tmp_path / "server.log").start()
    try:
        with httpx.Client(base_url=second.url, headers=headers, timeout=30) as client:
            for tid in (task_id, queued["task_id"]):
                done = wait_for(
                    lambda tid=tid: (
                        (v := client.get(f"/v1/tasks/{tid}").json())["status"] in ("succeeded", "failed")
                        and v
                    ),
                    timeout=180,
                )
                assert done["status"] == "succeeded", done
            done = client.get(f"/v1/tasks/{task_id}").json()
            assert done["progress"] == {"pages_done": PAGES, "pages_total": PAGES}
            assert client.get(f"/v1/tasks/{task_id}/result.md").status_code == 200
            layout = client.get(f"/v1/tasks/{task_id}/layout.json").json()
            assert [page["page"] for page in layout["pages"]] == list(range(1, PAGES + 1))
            # Usage counts each page once, however many starts the task took (tests/test_usage.py).
            wait_for(
                lambda: client.get("/v1/usage").json()["tenants"][0]["total"]["pages"] == PAGES + 1,
                timeout=10,
            )
            assert client.get("/v1/usage").json()["tenants"][0]["total"]["tasks"] == 2
    finally:
        second.stop()
    # Pages finished before the kill were not recognised again.
    for name, mtime in survivors.items():
        assert (raw_dir / name).stat().st_mtime_ns == mtime
    assert len(list(raw_dir.iterdir())) == PAGES
