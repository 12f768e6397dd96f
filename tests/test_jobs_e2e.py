"""The job system through HTTP: the queue bound, the GPU gate, cancel, failures, model lifecycle."""

from __future__ import annotations

from tests.documents import make_pdf
from tests.servers import wait_for
from tests.test_api_e2e import PAGE_1, finished, upload

MIB = 1024 * 1024


def test_gpu_gate_holds_tasks_and_full_queue_answers_429(make_server, standin_gpu):
    standin_gpu.free_bytes = 100 * MIB  # below the 1024 MiB the server is told to need
    server = make_server(answers=[PAGE_1], queue_max=1, gpu_min_free_mb=1024, gpu_probe=standin_gpu)
    client = server.client

    first = upload(client, make_pdf(1, picture_page=None)).json()  # taken by the worker, held at the gate
    waiting = wait_for(lambda: client.get(f"/v1/tasks/{first['task_id']}").json()["waiting_reason"])
    assert "GPU memory" in waiting
    assert "100 MiB free" in waiting
    assert client.get(f"/v1/tasks/{first['task_id']}").json()["status"] == "queued"
    assert client.get(f"/v1/tasks/{first['task_id']}/result.md").status_code == 409

    second = upload(client, make_pdf(1, picture_page=None))  # fills the queue (bound 1)
    assert second.status_code == 202
    dirs_before = server.task_dirs()
    refused = upload(client, make_pdf(1, picture_page=None))
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "queue_full"
    assert int(refused.headers["retry-after"]) >= 1
    url_refused = client.post("/v1/tasks", json={"url": "http://127.0.0.1:9/x.pdf"})
    assert url_refused.status_code == 429
    assert server.task_dirs() == dirs_before
    assert server.spool_files() == []

    standin_gpu.free_bytes = 8000 * MIB
    for task_id in (first["task_id"], second.json()["task_id"]):
        done = finished(client, task_id)
        assert done["status"] == "succeeded"
        assert done["waiting_reason"] is None
    assert upload(client, make_pdf(1, picture_page=None)).status_code == 202


def test_cancel_queued_and_running_tasks(make_server, standin_gpu):
    standin_gpu.free_bytes = 0
    server = make_server(
        answers=[PAGE_1], gpu_min_free_mb=1, gpu_probe=standin_gpu, page_delay=0.3, ds_batch_size=1
    )
    client = server.client
    held = upload(client, make_pdf(1, picture_page=None)).json()
    queued = upload(client, make_pdf(1, picture_page=None)).json()
    canceled = client.delete(f"/v1/tasks/{queued['task_id']}")
    assert canceled.status_code == 200
    assert canceled.json()["status"] == "canceled"
    assert client.delete(f"/v1/tasks/{queued['task_id']}").status_code == 409

    standin_gpu.free_bytes = 8000 * MIB
    assert finished(client, held["task_id"])["status"] == "succeeded"
    long = upload(client, make_pdf(12, picture_page=None)).json()
    wait_for(lambda: client.get(f"/v1/tasks/{long['task_id']}").json()["progress"]["pages_done"] >= 1)
    assert client.delete(f"/v1/tasks/{long['task_id']}").status_code == 200
    done = finished(client, long["task_id"])
    assert done["status"] == "canceled"
    assert 1 <= done["progress"]["pages_done"] < 12
    assert client.get(f"/v1/tasks/{long['task_id']}/result.md").status_code == 409
    assert finished(client, queued["task_id"])["progress"]["pages_done"] == 0


def test_a_crash_in_one_page_fails_that_task_only(make_server):
    server = make_server(answers=[PAGE_1], fail_on_call=2, ds_batch_size=1)
    client = server.client
    broken = upload(client, make_pdf(3, picture_page=None)).json()
    done = finished(client, broken["task_id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "engine_error"
    assert "page 2" in done["error"]["message"]
    assert "stand-in failure" in done["error"]["message"]
    assert done["progress"]["pages_done"] == 1

    healthy = upload(client, make_pdf(2, picture_page=None)).json()
    assert finished(client, healthy["task_id"])["status"] == "succeeded"
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["workers"]["alive"] == 1


def test_model_loads_lazily_unloads_when_idle_and_reloads(make_server):
    server = make_server(answers=[PAGE_1], model_idle_seconds=0.5)
    client = server.client
    assert client.get("/readyz").json()["model"]["loaded"] is False  # lazy: nothing loaded at start

    first = upload(client, make_pdf(1, picture_page=None)).json()
    assert finished(client, first["task_id"])["status"] == "succeeded"
    wait_for(lambda: client.get("/readyz").json()["model"]["loaded"] is False, timeout=10)
    engine = server.engines[-1]
    assert engine.loaded_model() is None  # the weights are unreachable: memory handed back

    second = upload(client, make_pdf(1, picture_page=None)).json()
    assert finished(client, second["task_id"])["status"] == "succeeded"
    metrics = client.get("/metrics").text
    assert "dsocr_model_load_seconds_count 2.0" in metrics
    assert "dsocr_model_unloads_total 1.0" in metrics


def test_missing_model_fails_the_task_with_a_clear_error(make_server, tmp_path):
    server = make_server(default_engine=True, ds_model_path=str(tmp_path / "no-such-model"))
    view = upload(server.client, make_pdf(1, picture_page=None)).json()
    done = finished(server.client, view["task_id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "model_unavailable"
    assert "no-such-model" in done["error"]["message"]
    ready = server.client.get("/readyz").json()
    assert ready["model"]["last_error"]


def test_url_tasks_refuse_private_hosts_unless_allowed(make_server, static_server):
    pdf_url = static_server.add("paper.pdf", make_pdf(1, picture_page=None))
    strict = make_server(answers=[PAGE_1])
    refused = strict.client.post("/v1/tasks", json={"url": pdf_url})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "url_not_allowed"
    assert strict.client.post("/v1/tasks", json={"url": "ftp://example.com/a.pdf"}).status_code in (400, 422)
    assert strict.task_dirs() == []

    relaxed = make_server(answers=[PAGE_1], url_allow_private=True)
    accepted = relaxed.client.post("/v1/tasks", json={"url": pdf_url, "options": {"dpi": 72}})
    assert accepted.status_code == 202, accepted.text
    view = accepted.json()
    assert view["source"]["url"] == pdf_url
    assert view["source"]["filename"] == "paper.pdf"
    assert finished(relaxed.client, view["task_id"])["status"] == "succeeded"
    missing = relaxed.client.post("/v1/tasks", json={"url": static_server.url + "/missing.pdf"})
    assert missing.status_code == 400
    assert missing.json()["error"]["code"] == "url_fetch_failed"


def test_finished_tasks_expire_after_the_ttl(make_server):
    server = make_server(answers=[PAGE_1], result_ttl_hours=1e-9)
    view = upload(server.client, make_pdf(1, picture_page=None)).json()
    finished(server.client, view["task_id"])
    assert server.app.state.tasks.expire() == 1
    assert server.client.get(f"/v1/tasks/{view['task_id']}").status_code == 404
    assert server.task_dirs() == []


def test_readyz_says_which_model_will_run_and_why_before_it_loads(make_server):
    server = make_server(default_engine=True)
    model = server.client.get("/readyz").json()["model"]
    assert model["loaded"] is False
    assert model["name"] == "deepseek-community/DeepSeek-OCR-2"
    assert "no CUDA device" in model["detail"]
