"""``APP_BACKEND=vllm`` end to end: the service under uvicorn, documents over HTTP, and the OCR
server a real ``transformers serve`` with the tiny DeepSeek-OCR-2 and a stand-in of vLLM's OpenAI
front end that enforces what vLLM does (the context length above all, which ``transformers serve``
never checks), or, for faults a real server cannot be made to commit on cue, a scripted one. The
random model's text is random, so tests against it assert on structure: statuses, progress, files,
page order, errors.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from app.engines.token_budget import DEFAULT_PROMPT_BOUND
from tests.documents import make_pdf
from tests.openai_servers import (
    DEEPSEEK_OCR,
    TINY_REPO_ID,
    FakeOpenAI,
    Reply,
    TransformersServe,
    VllmStandIn,
    completion,
    request_image,
)
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


@pytest.fixture
def vllm() -> Iterator[VllmStandIn]:
    """The stand-in of ``vllm serve deepseek-ai/DeepSeek-OCR`` with its 8192-token context."""
    server = VllmStandIn(max_model_len=8192)
    yield server
    server.close()


@dataclass
class OcrServer:
    """An OCR server under test, the model it names and the service settings that suit it."""

    kind: str  # "transformers-serve" or "vllm"
    url: str
    model: str
    settings: dict[str, Any] = field(default_factory=dict)
    standin: VllmStandIn | None = None  # the strict stand-in, when that is the server


@pytest.fixture(params=["transformers-serve", "vllm"])
def ocr_server(request: pytest.FixtureRequest) -> Iterator[OcrServer]:
    """Each end-to-end test below runs against the real ``transformers serve`` (which checks no
    length; 8 tokens a page keep the random model quick on CPU) and the strict vLLM stand-in
    (with the shipped default: no APP_VLLM_MAX_TOKENS)."""
    if request.param == "transformers-serve":
        serve = request.getfixturevalue("tiny_serve")
        # Random weights cut at 8 tokens leave every page suspect: no retry ladder, or each page
        # would be asked for again (tests/test_retry_ladder.py covers the ladder).
        settings = {"vllm_max_tokens": 8, "page_retries": 0}
        yield OcrServer("transformers-serve", serve.url, TINY_REPO_ID, settings)
        return
    standin = request.getfixturevalue("vllm")
    yield OcrServer("vllm", standin.url, DEEPSEEK_OCR, {"vllm_max_tokens": None}, standin)


def vllm_settings(url: str, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "default_engine": True,
        "backend": "vllm",
        "vllm_url": url,
        "vllm_max_tokens": 8,  # the tiny random model on CPU; tests of the cap itself override it
        "vllm_concurrency": 4,
        "vllm_retries": 1,
        "vllm_timeout_seconds": 60,
    }
    values.update(overrides)
    return values


def raw_pages(data_dir: Path, task_id: str) -> dict[str, dict[str, Any]]:
    raw = data_dir / "tasks" / task_id / "raw"
    return {path.name: json.loads(path.read_text()) for path in sorted(raw.iterdir())}


def test_a_pdf_converts_through_an_openai_compatible_server(make_server, ocr_server: OcrServer):
    server = make_server(**vllm_settings(ocr_server.url, **ocr_server.settings))
    client = server.client

    view = upload(client, make_pdf(5)).json()
    done = finished(client, view["task_id"])
    assert done["status"] == "succeeded", done
    assert done["progress"] == {"pages_done": 5, "pages_total": 5}
    assert done["model"] == ocr_server.model  # found through the server's /v1/models

    raw = raw_pages(server.data_dir, view["task_id"])
    assert list(raw) == [f"p{n:04d}.json" for n in range(1, 6)]
    for number, page in enumerate(raw.values(), start=1):
        assert page["page"] == number
        assert page["tokens"] > 0  # the server's count is kept
    if ocr_server.standin is None:
        # Random weights rarely say eos within 8 tokens; either way the server's count is kept.
        assert all(
            page["stop_reason"] in ("max_tokens", "eos") and page["tokens"] <= 8 for page in raw.values()
        )
        assert sorted(done["truncated_pages"]) == [
            n for n, page in enumerate(raw.values(), start=1) if page["stop_reason"] != "eos"
        ]
    else:
        # Every page within the context, none refused, each finished with its grounded blocks.
        standin = ocr_server.standin
        assert standin.statuses == [200] * 5
        for body in standin.chat_bodies():
            assert body["max_tokens"] + standin.prompt_tokens(body) <= standin.max_model_len
        assert done["truncated_pages"] == []
        assert all(page["stop_reason"] == "eos" for page in raw.values())

    assert client.get(done["links"]["markdown"]).status_code == 200
    layout = client.get(done["links"]["layout"]).json()
    assert [page["page"] for page in layout["pages"]] == [1, 2, 3, 4, 5]
    result = client.get(done["links"]["json"]).json()
    assert [page["page"] for page in result["pages"]] == [1, 2, 3, 4, 5]
    if ocr_server.standin is not None:
        assert all(
            [b["type"] for b in page["blocks"]] == ["title", "text", "table"] for page in layout["pages"]
        )
        assert "# Quarterly Report" in client.get(done["links"]["markdown"]).text

    ready = client.get("/readyz")
    assert ready.status_code == 200
    model = ready.json()["model"]
    assert model["loaded"] is True
    assert model["name"] == ocr_server.model
    assert model["server"]["url"] == ocr_server.url
    assert model["server"]["reachable"] is True


def test_readyz_shows_the_token_cap_and_where_it_comes_from(make_server, ocr_server: OcrServer):
    server = make_server(**vllm_settings(ocr_server.url, **ocr_server.settings))
    # Before any task: the cap comes from the server's answer, not from a loaded engine.
    ready = server.client.get("/readyz").json()["model"]
    assert ready["loaded"] is False
    reported = ready["server"]
    if ocr_server.standin is None:
        assert reported["max_model_len"] is None  # transformers serve does not say
        assert reported["max_tokens"] == 8
        assert reported["max_tokens_source"] == (
            "APP_VLLM_MAX_TOKENS=8, within DeepSeek-OCR's own context of 8192 (the server reports no "
            f"max_model_len), less up to {DEFAULT_PROMPT_BOUND} tokens of prompt"
        )
    else:
        assert reported["max_model_len"] == 8192
        assert reported["max_tokens"] == 8192 - DEFAULT_PROMPT_BOUND
        assert reported["max_tokens_source"] == (
            "clamped to max_model_len 8192 from /v1/models, "
            f"less up to {DEFAULT_PROMPT_BOUND} tokens of prompt"
        )
        # And it is what a page of a task in the default mode asks for.
        view = upload(server.client, make_pdf(1, picture_page=None)).json()
        assert finished(server.client, view["task_id"])["status"] == "succeeded"
        (body,) = ocr_server.standin.chat_bodies()
        assert body["max_tokens"] == reported["max_tokens"]


def test_the_old_default_of_8192_tokens_no_longer_fails_every_page_of_an_8192_token_server(make_server, vllm):
    # Before: every page asked for max_tokens 8192 from a model whose whole context is 8192, vLLM
    # answered 400 and every task failed on its first page. The stand-in still refuses that request.
    server = make_server(**vllm_settings(vllm.url, vllm_max_tokens=8192))
    view = upload(server.client, make_pdf(3)).json()
    done = finished(server.client, view["task_id"])
    assert done["status"] == "succeeded", done
    assert vllm.statuses == [200, 200, 200]
    sent = vllm.chat_bodies()
    assert {body["max_tokens"] for body in sent} == {8192 - DEFAULT_PROMPT_BOUND}

    old = {**sent[0], "max_tokens": 8192}
    refused = httpx.post(f"{vllm.url}/v1/chat/completions", json=old)
    assert refused.status_code == 400
    assert refused.json()["error"]["message"].startswith(
        "This model's maximum context length is 8192 tokens. However, you requested 8192 output tokens"
    )

    ready = server.client.get("/readyz").json()["model"]["server"]
    assert ready["max_tokens"] == 8192 - DEFAULT_PROMPT_BOUND
    assert ready["max_tokens_source"].startswith("APP_VLLM_MAX_TOKENS=8192 clamped to max_model_len 8192")


def test_a_page_whose_prompt_alone_overflows_the_context_fails_naming_the_numbers(make_server):
    standin = VllmStandIn(max_model_len=600)  # `vllm serve ... --max-model-len 600`: too small for a page
    try:
        server = make_server(**vllm_settings(standin.url, vllm_max_tokens=None))
        view = upload(server.client, make_pdf(2, picture_page=None)).json()
        done = finished(server.client, view["task_id"])
    finally:
        standin.close()
    assert done["status"] == "failed"
    assert done["error"]["code"] == "engine_error"
    prompt = standin.prompt_tokens(standin.chat_bodies()[0])
    assert done["error"]["message"].startswith(
        f"page 1: the page's prompt alone (its image and the instruction) is {prompt} tokens and the OCR "
        f"server at {standin.url} has a context (max_model_len) of 600"
    )


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
