"""``APP_BACKEND=vllm`` end to end: the service under uvicorn, documents over HTTP, and the OCR
server a real ``transformers serve`` with the tiny DeepSeek-OCR-2 (or, for faults a real server
cannot be made to commit on cue, a scripted one). The random model's text is random, so these
tests assert on structure: statuses, progress, files, page order, errors.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.documents import make_pdf
from tests.openai_servers import TINY_REPO_ID, FakeOpenAI, Reply, TransformersServe, completion, request_image
from tests.servers import free_port, wait_for
from tests.test_api_e2e import finished, upload

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def tiny_serve(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransformersServe]:
    """``transformers serve`` with the tiny model, shared by the session (up in 10-20 s)."""
    server = TransformersServe(tiny_model_dir, tmp_path_factory.mktemp("serve")).start()
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI()
    yield server
    server.close()


def vllm_settings(url: str, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "default_engine": True,
        "backend": "vllm",
        "vllm_url": url,
        "vllm_max_tokens": 8,
        "vllm_concurrency": 4,
        "vllm_retries": 1,
        "vllm_timeout_seconds": 60,
    }
    values.update(overrides)
    return values


def raw_pages(data_dir: Path, task_id: str) -> dict[str, dict[str, Any]]:
    raw = data_dir / "tasks" / task_id / "raw"
    return {path.name: json.loads(path.read_text()) for path in sorted(raw.iterdir())}


def test_a_pdf_converts_through_a_real_openai_compatible_server(make_server, tiny_serve):
    server = make_server(**vllm_settings(tiny_serve.url))
    client = server.client

    view = upload(client, make_pdf(5)).json()
    done = finished(client, view["task_id"])
    assert done["status"] == "succeeded", done
    assert done["progress"] == {"pages_done": 5, "pages_total": 5}
    assert done["model"] == TINY_REPO_ID  # found through the server's /v1/models

    raw = raw_pages(server.data_dir, view["task_id"])
    assert list(raw) == [f"p{n:04d}.json" for n in range(1, 6)]
    for number, page in enumerate(raw.values(), start=1):
        assert page["page"] == number
        # Random weights rarely say eos within 8 tokens; either way the server's count is kept.
        assert page["stop_reason"] in ("max_tokens", "eos")
        assert 0 < page["tokens"] <= 8
    assert sorted(done["truncated_pages"]) == [
        n for n, page in enumerate(raw.values(), start=1) if page["stop_reason"] != "eos"
    ]

    assert client.get(done["links"]["markdown"]).status_code == 200
    layout = client.get(done["links"]["layout"]).json()
    assert [page["page"] for page in layout["pages"]] == [1, 2, 3, 4, 5]
    result = client.get(done["links"]["json"]).json()
    assert [page["page"] for page in result["pages"]] == [1, 2, 3, 4, 5]

    ready = client.get("/readyz")
    assert ready.status_code == 200
    model = ready.json()["model"]
    assert model["loaded"] is True
    assert model["name"] == TINY_REPO_ID
    assert model["server"]["url"] == tiny_serve.url
    assert model["server"]["reachable"] is True


def tiff(colors: list[tuple[int, int, int]]) -> bytes:
    frames = [Image.new("RGB", (160, 120), color) for color in colors]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="TIFF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def test_pages_of_every_task_are_in_flight_together_and_come_back_in_order(make_server, fake):
    # Page n is red n*20; the server names the page it saw, and answers later pages sooner.
    pages = 8

    def respond(body: dict[str, Any]) -> Reply:
        red, _, _ = request_image(body).convert("RGB").getpixel((80, 60))  # type: ignore[misc]
        number = red // 20
        text = f"<|ref|>text<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>\nframe {number}"
        return Reply(completion(text), delay=0.04 * (pages - number))

    fake.respond = respond
    server = make_server(**vllm_settings(fake.url, vllm_concurrency=3, max_workers=2))
    document = tiff([(20 * n, 0, 0) for n in range(1, pages + 1)])
    task_ids = [upload(server.client, document, "scan.tiff").json()["task_id"] for _ in range(2)]
    for task_id in task_ids:
        done = finished(server.client, task_id)
        assert done["status"] == "succeeded", done
        assert done["truncated_pages"] == []
        markdown = server.client.get(done["links"]["markdown"]).text
        positions = [markdown.index(f"frame {n}") for n in range(1, pages + 1)]
        assert positions == sorted(positions)
    assert len(fake.requests) == 2 * pages
    assert fake.max_in_flight == 3  # both tasks share the one bound, and fill it


def test_a_server_that_is_down_fails_the_task_naming_it(make_server):
    url = f"http://127.0.0.1:{free_port()}"
    server = make_server(**vllm_settings(url))
    view = upload(server.client, make_pdf(2, picture_page=None)).json()
    done = finished(server.client, view["task_id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "engine_error"
    message = done["error"]["message"]
    assert message.startswith("page 1: ")
    assert url in message
    assert "cannot connect" in message

    ready = server.client.get("/readyz")
    assert ready.status_code == 200  # reported, not required: results stay reachable
    assert ready.json()["model"]["server"]["reachable"] is False
    assert url in ready.json()["model"]["last_error"]


def test_a_server_killed_mid_task_fails_the_task_instead_of_hanging_it(
    make_server, tiny_model_dir: Path, tmp_path: Path
):
    doomed = TransformersServe(tiny_model_dir, tmp_path).start()
    try:
        doomed.wait_ready()
        server = make_server(**vllm_settings(doomed.url, vllm_max_tokens=48, vllm_concurrency=2))
        view = upload(server.client, make_pdf(8, picture_page=None)).json()
        task_url = f"/v1/tasks/{view['task_id']}"
        wait_for(lambda: server.client.get(task_url).json()["progress"]["pages_done"] >= 1, timeout=60)
        doomed.kill()
        killed_at = time.monotonic()
        done = finished(server.client, view["task_id"])
    finally:
        doomed.kill()
    assert time.monotonic() - killed_at < 15
    assert done["status"] == "failed"
    assert done["error"]["code"] == "engine_error"
    assert doomed.url in done["error"]["message"]
    assert 1 <= done["progress"]["pages_done"] < 8


def test_a_server_slower_than_the_timeout_fails_the_task(make_server, fake):
    fake.respond = lambda body: Reply(completion("too late"), delay=2.0)
    server = make_server(**vllm_settings(fake.url, vllm_timeout_seconds=0.3))
    started = time.monotonic()
    view = upload(server.client, make_pdf(1, picture_page=None)).json()
    done = finished(server.client, view["task_id"])
    assert time.monotonic() - started < 5
    assert done["status"] == "failed"
    assert fake.url in done["error"]["message"]
    assert "no answer within 0.3 s" in done["error"]["message"]
    assert len(fake.requests) == 2  # one retry


def test_in_process_vllm_without_vllm_fails_with_model_unavailable(make_server):
    server = make_server(default_engine=True, backend="vllm")
    view = upload(server.client, make_pdf(1, picture_page=None)).json()
    done = finished(server.client, view["task_id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "model_unavailable"
    assert "APP_VLLM_URL" in done["error"]["message"]
    model = server.client.get("/readyz").json()["model"]
    assert "vLLM" in model["last_error"]
    assert model["server"] is None  # no server in this mode


def test_the_gpu_gate_is_open_on_vllm(make_server, fake, standin_gpu):
    # vLLM holds most of the GPU by design; the gate that protects the hf engine must not wait on it.
    standin_gpu.free_bytes = 100 * 1024 * 1024
    server = make_server(**vllm_settings(fake.url, gpu_probe=standin_gpu, gpu_min_free_mb=4096))
    view = upload(server.client, make_pdf(1, picture_page=None)).json()
    assert finished(server.client, view["task_id"])["status"] == "succeeded"
