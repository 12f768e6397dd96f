"""The ``vllm`` engine against OpenAI-compatible servers on loopback, and its manager.

What a real server cannot be made to do on cue (answer 503, send garbage, hang, say it is vLLM) is
scripted with ``FakeOpenAI``; what vLLM's front end enforces (the context length, its fields) is
enforced by ``VllmStandIn``; tests/test_vllm_e2e.py runs the same engine against a real
``transformers serve`` and the stand-in.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from pydantic import ValidationError

from app.config import Settings
from app.documents import DocumentKind
from app.engines.async_base import ConcurrentEngine
from app.engines.base import END_MARKER, RecognizeOptions
from app.engines.factory import engine_factory, server_health_check
from app.engines.manager import DispatchLimits, ModelManager
from app.engines.token_budget import DEFAULT_PROMPT_BOUND
from app.engines.vllm import (
    NGRAM_ARGS,
    RemoteEngine,
    check_server,
    encode_image,
    normalize_base_url,
)
from app.engines.vllm_local import VllmEngine
from app.errors import EngineError, ModelUnavailable
from app.metrics import Metrics
from app.pipeline.assemble import AssembledPage
from app.pipeline.run import PageJob, PagePipeline
from app.storage.local import LocalStore
from tests.openai_servers import FakeOpenAI, Reply, VllmStandIn, completion, request_image
from tests.servers import free_port
from tests.standins import StandInGpu

PROMPT = "<|grounding|>Convert the document to markdown."
OPTIONS = RecognizeOptions(
    prompt=PROMPT, base_size=1024, image_size=640, crop_mode=True, max_new_tokens=99, timeout_seconds=99
)


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI()
    yield server
    server.close()


def remote(url: str, **overrides: object) -> RemoteEngine:
    values: dict[str, object] = {
        "model": None,
        "api_key": None,
        "concurrency": 4,
        "max_tokens": 321,
        "timeout_seconds": 5.0,
        "retries": 2,
        "backoff_seconds": 0.01,
    }
    values.update(overrides)
    return RemoteEngine(url, **values)  # type: ignore[arg-type]


@pytest.fixture
async def engine(fake: FakeOpenAI) -> AsyncIterator[RemoteEngine]:
    started = remote(fake.url)
    await started.start()
    yield started
    await started.stop()


def page(size: tuple[int, int] = (300, 200), color: str = "white") -> Image.Image:
    return Image.new("RGB", size, color)


async def test_a_vllm_server_gets_one_chat_completion_per_page_with_its_extras(fake: FakeOpenAI) -> None:
    engine = remote(f"{fake.url}/v1/", api_key="sk-server")
    await engine.start()
    try:
        assert isinstance(engine, ConcurrentEngine)
        assert engine.model_name == "deepseek-ai/DeepSeek-OCR"  # from /v1/models
        assert engine.server_kind == "vllm"  # its owned_by
        text = await engine.recognize_page(page((300, 200), "red"), OPTIONS)
    finally:
        await engine.stop()
    assert text.text == "hello" + END_MARKER
    ((body, headers),) = fake.requests
    assert headers["Authorization"] == "Bearer sk-server"
    assert body["model"] == "deepseek-ai/DeepSeek-OCR"
    assert body["temperature"] == 0
    assert body["max_tokens"] == 321
    assert body["skip_special_tokens"] is False
    assert body["vllm_xargs"] == NGRAM_ARGS
    assert NGRAM_ARGS == {"ngram_size": 30, "window_size": 90, "whitelist_token_ids": [128821, 128822]}
    image_part, text_part = body["messages"][0]["content"]
    assert text_part == {"type": "text", "text": PROMPT}
    assert image_part["type"] == "image_url"
    assert image_part["image_url"]["url"].startswith("data:image/tiff;base64,")
    sent = request_image(body)
    assert sent.format == "TIFF"  # lossless, and the cheapest to make and read (``app.lossless``)
    assert sent.size == (300, 200)
    assert sent.convert("RGB").getpixel((150, 100)) == (255, 0, 0)


async def test_other_servers_get_plain_openai_requests_unless_told(fake: FakeOpenAI) -> None:
    fake.owned_by = "deepseek-ai"  # what transformers serve reports: the repo's author
    plain = remote(fake.url, model="my-ocr")
    told = remote(fake.url, server_kind="vllm")
    for engine in (plain, told):
        await engine.start()
        await engine.recognize_page(page(), OPTIONS)
        await engine.stop()
    plain_body, told_body = fake.chat_bodies()
    assert plain.server_kind == "openai"
    assert plain_body["model"] == "my-ocr"  # set: used as given, even when not listed
    assert "skip_special_tokens" not in plain_body
    assert "vllm_xargs" not in plain_body
    assert told_body["vllm_xargs"] == NGRAM_ARGS
    assert told_body["skip_special_tokens"] is False


async def test_a_server_that_lists_no_model_is_sent_none(fake: FakeOpenAI) -> None:
    fake.models = ()  # transformers serve pinned to a local directory lists nothing
    engine = remote(fake.url)
    await engine.start()
    await engine.recognize_page(page(), OPTIONS)
    await engine.stop()
    assert "model" not in fake.chat_bodies()[0]
    assert engine.model_name == f"{fake.url} (the server's default model)"


@pytest.mark.parametrize(
    ("content", "finish", "text", "stop"),
    [
        ("# Title", "stop", "# Title" + END_MARKER, "eos"),  # eos stripped by the server: put back
        ("# Title" + END_MARKER, "stop", "# Title" + END_MARKER, "eos"),  # kept: not doubled
        ("# Title and on", "length", "# Title and on", "max_tokens"),
        (None, "stop", END_MARKER, "eos"),
    ],
    ids=["eos-stripped", "eos-kept", "length", "null-content"],
)
async def test_completions_become_page_texts(
    fake: FakeOpenAI, engine: RemoteEngine, content: str | None, finish: str, text: str, stop: str
) -> None:
    fake.replies.append(Reply(completion(content, finish, tokens=12)))  # type: ignore[arg-type]
    result = await engine.recognize_page(page(), OPTIONS)
    assert (result.text, result.stop_reason, result.tokens) == (text, stop, 12)


@pytest.mark.parametrize(
    "bad",
    [
        Reply({"error": "overloaded"}, status=503),
        Reply({"error": "busy"}, status=429),
        Reply("<html>proxy error</html>"),
        Reply({"choices": []}),
        Reply(completion("partial", "abort")),
    ],
    ids=["503", "429", "not-json", "no-choices", "aborted"],
)
async def test_faults_are_retried(fake: FakeOpenAI, engine: RemoteEngine, bad: Reply) -> None:
    fake.replies.extend([bad, bad])
    result = await engine.recognize_page(page(), OPTIONS)
    assert result.text == "hello" + END_MARKER
    assert len(fake.requests) == 3


async def test_retries_are_bounded_and_the_error_names_the_server(fake: FakeOpenAI) -> None:
    fake.respond = lambda body: Reply({"detail": "CUDA error: an illegal memory access"}, status=500)
    engine = remote(fake.url, retries=2)
    await engine.start()
    with pytest.raises(EngineError) as caught:
        await engine.recognize_page(page(), OPTIONS)
    await engine.stop()
    assert len(fake.requests) == 3
    message = caught.value.message
    assert fake.url in message
    assert "after 3 attempt(s)" in message
    assert "HTTP 500" in message
    assert "illegal memory access" in message


async def test_a_request_the_server_refuses_is_not_retried(fake: FakeOpenAI, engine: RemoteEngine) -> None:
    refusal = {
        "message": "The model `ocr` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }
    fake.replies.append(Reply({"error": refusal}, status=404))
    with pytest.raises(EngineError, match="refused a page: HTTP 404") as caught:
        await engine.recognize_page(page(), OPTIONS)
    assert "The model `ocr` does not exist." in caught.value.message
    assert len(fake.requests) == 1


# --- the token cap: never more than the server's context ---------------------------------------------


@pytest.fixture
def vllm() -> Iterator[VllmStandIn]:
    server = VllmStandIn(max_model_len=8192)
    yield server
    server.close()


A4 = (1191, 1684)  # px, an A4 page at 144 dpi: 2 x 3 tiles, 903 image tokens on vLLM


@pytest.mark.parametrize(
    ("max_model_len", "configured"),
    [(8192, None), (8192, 8192), (8192, 2000), (4096, None), (4096, 8192)],
    ids=["8192-unset", "8192-old-default", "8192-below", "4096-unset", "4096-old-default"],
)
async def test_pages_ask_for_no_more_than_the_context_leaves(
    max_model_len: int, configured: int | None
) -> None:
    server = VllmStandIn(max_model_len=max_model_len)
    engine = remote(server.url, max_tokens=configured)
    try:
        await engine.start()
        text = await engine.recognize_page(page(A4), OPTIONS)
    finally:
        await engine.stop()
        server.close()
    assert server.statuses == [200]  # no refusal, no second try
    assert text.stop_reason == "eos"
    assert text.text.startswith("<|ref|>title<|/ref|>")  # skip_special_tokens: false kept the tags
    ((body, _),) = server.requests
    prompt = server.prompt_tokens(body)
    assert body["max_tokens"] + prompt <= max_model_len
    if configured is not None and configured < max_model_len - DEFAULT_PROMPT_BOUND:
        assert body["max_tokens"] == configured  # a cap that fits is the user's
    else:
        assert body["max_tokens"] > max_model_len - prompt - 150  # the page gets nearly all the room


async def test_a_server_that_reports_no_context_gets_the_models_own(fake: FakeOpenAI) -> None:
    # transformers serve lists no max_model_len; an omitted max_tokens would mean its 1024 tokens.
    fake.owned_by = "deepseek-ai"
    uncapped, capped = remote(fake.url, max_tokens=None), remote(fake.url, max_tokens=9000)
    for engine in (uncapped, capped):
        await engine.start()
        await engine.recognize_page(page(A4), OPTIONS)
        await engine.stop()
    first, second = fake.chat_bodies()
    assert 7000 < first["max_tokens"] <= 8192 - 933  # the model's 8192, less the worst image
    assert second["max_tokens"] == first["max_tokens"]  # 9000 is clamped likewise


async def test_a_page_refused_for_length_is_asked_again_once_with_exactly_the_room_left() -> None:
    # A server built with DeepSeek's own limit of 9 tiles: a tall strip costs 1263 image tokens,
    # more than the 933 vLLM's 6 tiles can, so the engine's bound is short and the server refuses.
    server = VllmStandIn(max_model_len=8192, max_tiles=9)
    engine = remote(server.url, max_tokens=None)
    try:
        await engine.start()
        text = await engine.recognize_page(page((100, 900)), OPTIONS)
    finally:
        await engine.stop()
        server.close()
    assert server.statuses == [400, 200]
    first, second = server.chat_bodies()
    prompt = server.prompt_tokens(first)
    assert prompt + first["max_tokens"] > 8192
    assert second["max_tokens"] == 8192 - prompt  # exactly what the refusal said was left
    assert text.stop_reason == "eos"


# Every wording vLLM has used for the refusal, with the room it leaves (context minus prompt).
WORDINGS = {
    "v0.9": (
        {
            "object": "error",
            "message": "This model's maximum context length is 8192 tokens. However, you requested 9207 "
            "tokens (1015 in the messages, 8192 in the completion). Please reduce the length of the "
            "messages or completion.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        },
        8192 - 1015,
    ),
    "v0.11": (
        {
            "error": {
                "message": "'max_tokens' or 'max_completion_tokens' is too large: 7163. This model's maximum "
                "context length is 8192 tokens and your request has 1050 input tokens (7163 > 8192 - 1050).",
                "type": "BadRequestError",
                "param": "max_tokens",
                "code": 400,
            }
        },
        8192 - 1050,
    ),
    "main, context shrunk": (
        {
            "error": {
                "message": "This model's maximum context length is 4096 tokens. However, you requested 7163 "
                "output tokens and your prompt contains 990 input tokens, for a total of 8153 tokens. Please "
                "reduce the length of the input prompt or the number of requested output tokens. "
                "(parameter=input_tokens, value=990)",
                "type": "BadRequestError",
                "param": "input_tokens",
                "code": 400,
            }
        },
        4096 - 990,
    ),
}


@pytest.mark.parametrize("wording", list(WORDINGS))
async def test_every_vllm_wording_of_the_refusal_is_read(
    fake: FakeOpenAI, engine: RemoteEngine, wording: str
) -> None:
    refusal, room = WORDINGS[wording]
    fake.replies.append(Reply(refusal, status=400))
    result = await engine.recognize_page(page(A4), OPTIONS)
    assert result.text == "hello" + END_MARKER
    _, second = fake.chat_bodies()
    assert second["max_tokens"] == min(room, 321)  # 321: this engine's own cap, still an upper bound
    uncapped = remote(fake.url, max_tokens=None)
    await uncapped.start()
    fake.replies.append(Reply(refusal, status=400))
    await uncapped.recognize_page(page(A4), OPTIONS)
    await uncapped.recognize_page(page(A4), OPTIONS)  # the next page starts from the context stated
    await uncapped.stop()
    *_, retried, following = fake.chat_bodies()
    assert retried["max_tokens"] == room
    context = 4096 if "shrunk" in wording else 8192
    assert following["max_tokens"] == context - DEFAULT_PROMPT_BOUND


async def test_a_page_refused_twice_fails_naming_the_numbers(fake: FakeOpenAI, engine: RemoteEngine) -> None:
    refusal = Reply(
        {
            "error": {
                "message": "This model's maximum context length is 8192 tokens. However, you requested 7163 "
                "output tokens and your prompt contains at least 1030 input tokens, for a total of at least "
                "8193 tokens. Please reduce the length of the input prompt or the number of requested output "
                "tokens. (parameter=input_tokens, value=1030)",
                "type": "BadRequestError",
                "param": "input_tokens",
                "code": 400,
            }
        },
        status=400,
    )
    fake.replies.extend([refusal, refusal])
    with pytest.raises(EngineError) as caught:
        await engine.recognize_page(page(A4), OPTIONS)
    assert len(fake.requests) == 2  # asked again once, not more
    message = caught.value.message
    assert "refused a page twice" in message
    assert "(8192 tokens)" in message
    assert "at least 1030 input tokens" in message


async def test_a_prompt_that_alone_overflows_the_context_fails_naming_both_numbers() -> None:
    server = VllmStandIn(max_model_len=512)  # a server started with --max-model-len 512
    engine = remote(server.url, max_tokens=None)
    try:
        await engine.start()
        with pytest.raises(EngineError) as caught:
            await engine.recognize_page(page(A4), OPTIONS)
    finally:
        await engine.stop()
        server.close()
    assert server.statuses == [400]  # no second try: no room would be left
    prompt = server.prompt_tokens(server.chat_bodies()[0])
    assert prompt > 512
    message = caught.value.message
    assert f"prompt alone (its image and the instruction) is {prompt} tokens" in message
    assert "max_model_len) of 512" in message
    assert "--max-model-len" in message


async def test_a_refusal_for_length_without_the_count_fails_with_the_servers_words(
    fake: FakeOpenAI, engine: RemoteEngine
) -> None:
    fake.replies.append(
        Reply({"error": {"message": "This model's maximum context length is 8192 tokens."}}, status=400)
    )
    with pytest.raises(EngineError, match="without saying the prompt's length") as caught:
        await engine.recognize_page(page(), OPTIONS)
    assert "maximum context length is 8192 tokens" in caught.value.message
    assert len(fake.requests) == 1


# --- the stand-in of vLLM refuses what vLLM refuses ---------------------------------------------------


def chat_body(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "deepseek-ai/DeepSeek-OCR",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": encode_image(page(A4))}},
                    {"type": "text", "text": PROMPT},
                ],
            }
        ],
        "max_tokens": 100,
    }
    body.update(fields)
    return {key: value for key, value in body.items() if value is not None}


@pytest.mark.parametrize(
    ("fields", "status", "said"),
    [
        (
            {"max_tokens": 8192},
            400,
            "This model's maximum context length is 8192 tokens. However, you requested 8192 output "
            "tokens and your prompt contains 912 input tokens, for a total of 9104 tokens.",
        ),
        ({"model": "ocr"}, 404, "The model `ocr` does not exist."),
        ({"messages": None}, 400, "'loc': ('body', 'messages'), 'msg': 'Field required'"),
        ({"max_tokens": 0}, 400, "max_tokens must be at least 1, got 0."),
        ({"max_tokens": "many"}, 400, "'loc': ('body', 'max_tokens')"),
        (
            {"vllm_xargs": {"ngram_size": 0}},
            400,
            "`ngram_size` has to be a strictly positive integer, got 0.",
        ),
    ],
    ids=["too-long", "unknown-model", "no-messages", "zero-tokens", "tokens-not-int", "bad-ngram"],
)
def test_the_vllm_stand_in_refuses_what_vllm_refuses(
    vllm: VllmStandIn, fields: dict[str, Any], status: int, said: str
) -> None:
    response = httpx.post(f"{vllm.url}/v1/chat/completions", json=chat_body(**fields))
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == status
    assert said in error["message"]
    served = httpx.post(f"{vllm.url}/v1/chat/completions", json=chat_body(model=None, max_tokens=None))
    assert served.status_code == 200  # no model: the served one; no max_tokens: the room left
    usage = served.json()["usage"]
    assert usage["prompt_tokens"] == 912  # 903 for the A4 page's image, 9 for the text
    assert served.json()["choices"][0]["finish_reason"] == "stop"


def test_the_vllm_stand_in_checks_its_key_and_lists_its_context() -> None:
    server = VllmStandIn(max_model_len=4096, api_key="sk-vllm")
    try:
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        listed = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer sk-vllm"}).json()
    finally:
        server.close()
    (entry,) = listed["data"]
    assert (entry["id"], entry["owned_by"], entry["max_model_len"]) == (
        "deepseek-ai/DeepSeek-OCR",
        "vllm",
        4096,
    )


async def test_a_server_that_is_down_fails_start_with_its_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    engine = remote(url, retries=1)
    with pytest.raises(EngineError) as caught:
        await engine.start()
    assert url in caught.value.message
    assert "cannot connect" in caught.value.message
    await engine.stop()  # nothing was opened; still safe


async def test_a_slow_answer_times_out_and_is_retried_then_fails(fake: FakeOpenAI) -> None:
    fake.respond = lambda body: Reply(completion("late"), delay=1.0)
    engine = remote(fake.url, timeout_seconds=0.2, retries=1)
    await engine.start()
    started = time.monotonic()
    with pytest.raises(EngineError, match=r"no answer within 0\.2 s"):
        await engine.recognize_page(page(), OPTIONS)
    assert time.monotonic() - started < 1.5
    assert len(fake.requests) == 2
    await engine.stop()


async def test_the_health_check_says_whether_the_server_answers_and_the_cap_it_allows(
    fake: FakeOpenAI, vllm: VllmStandIn
) -> None:
    up = await check_server(f"{fake.url}/v1", api_key=None, timeout_seconds=2)
    assert (up.url, up.reachable) == (fake.url, True)
    assert up.max_model_len is None
    assert up.max_tokens == 8192 - DEFAULT_PROMPT_BOUND
    assert "DeepSeek-OCR's own context of 8192 (the server reports no max_model_len)" in up.max_tokens_source

    strict = await check_server(vllm.url, api_key=None, timeout_seconds=2, max_tokens=8192)
    assert (strict.reachable, strict.max_model_len, strict.max_tokens) == (
        True,
        8192,
        8192 - DEFAULT_PROMPT_BOUND,
    )
    assert strict.max_tokens_source == (
        f"APP_VLLM_MAX_TOKENS=8192 clamped to max_model_len 8192 from /v1/models, "
        f"less up to {DEFAULT_PROMPT_BOUND} tokens of prompt"
    )
    modest = await check_server(vllm.url, api_key=None, timeout_seconds=2, max_tokens=2000)
    assert modest.max_tokens == 2000
    assert modest.max_tokens_source.startswith("APP_VLLM_MAX_TOKENS=2000, within max_model_len 8192")

    down_url = f"http://127.0.0.1:{free_port()}"
    down = await check_server(down_url, api_key=None, timeout_seconds=2)
    assert (down.url, down.reachable) == (down_url, False)
    assert "cannot connect" in down.detail
    assert (down.max_model_len, down.max_tokens) == (None, None)


def test_base_urls_are_normalised() -> None:
    for url in ("http://h:8000", "http://h:8000/", "http://h:8000/v1", " http://h:8000/v1/ "):
        assert normalize_base_url(url) == "http://h:8000"
    assert normalize_base_url("https://gw.example/ocr/v1") == "https://gw.example/ocr"


def test_vllm_settings_are_checked_at_start_up(tmp_path: Path) -> None:
    blanks: dict[str, Any] = {"vllm_url": " ", "vllm_model": "", "vllm_api_key": "", "vllm_max_tokens": ""}
    settings = Settings(data_dir=tmp_path, backend="vllm", **blanks)  # empty APP_VLLM_* in a compose file
    assert (settings.vllm_url, settings.vllm_model, settings.vllm_api_key) == (None, None, None)
    assert settings.vllm_max_tokens is None  # unset: the server's context decides
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, backend="vllm", vllm_max_tokens=0)
    with pytest.raises(ValidationError, match="APP_VLLM_URL must be an http"):
        Settings(data_dir=tmp_path, backend="vllm", vllm_url="vllm:8000")
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, backend="vllm", vllm_concurrency=0)
    assert server_health_check(Settings(data_dir=tmp_path)) is None  # hf: no server to ask


async def test_in_process_vllm_fails_clearly_where_vllm_is_missing(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, backend="vllm", ds_model_path="deepseek-ai/DeepSeek-OCR")
    engine, reason = engine_factory(settings)()
    assert isinstance(engine, VllmEngine)
    assert "inside this process" in reason
    with pytest.raises(ModelUnavailable) as caught:
        await engine.start()
    assert "vllm" in caught.value.message.lower()
    assert "APP_VLLM_URL" in caught.value.message


# --- the ModelManager with a concurrent engine -------------------------------------------------------


def manager_for(url: str, concurrency: int) -> ModelManager:
    def factory() -> tuple[RemoteEngine, str]:
        return remote(url, concurrency=concurrency), "scripted server"

    return ModelManager(factory, idle_seconds=0.2, metrics=Metrics(StandInGpu()))


async def test_pages_of_all_tasks_share_one_bound(fake: FakeOpenAI) -> None:
    fake.respond = lambda body: Reply(completion("p"), delay=0.1)
    models = manager_for(fake.url, concurrency=3)
    # sizes_apply: vLLM decides the image geometry, so the size options change nothing it is sent;
    # sends_encoded: the page's lossless encoding goes as it is, so the pipeline leaves its pixels undecoded.
    assert await models.limits() == DispatchLimits(
        pages_per_call=1, calls_in_flight=3, sizes_apply=False, sends_encoded=True
    )

    async def task(pages: int) -> None:
        async with models.hold():
            for texts in await asyncio.gather(*(models.recognize([page()], OPTIONS) for _ in range(pages))):
                assert [t.stop_reason for t in texts] == ["eos"]

    await asyncio.gather(task(6), task(6))
    assert len(fake.requests) == 12
    assert fake.max_in_flight == 3  # reached, never passed
    await models.unload()


async def test_a_batch_becomes_concurrent_pages_in_order(fake: FakeOpenAI) -> None:
    # Later pages answer first; the batch still comes back in page order.
    sizes = [(100 + 10 * n, 100) for n in range(4)]
    fake.respond = lambda body: Reply(
        completion(f"w{request_image(body).width}"), delay=0.05 * (140 - request_image(body).width) / 10
    )
    models = manager_for(fake.url, concurrency=4)
    texts = await models.recognize([page(size) for size in sizes], OPTIONS)
    assert [t.text for t in texts] == [f"w{w}{END_MARKER}" for w, _ in sizes]
    assert fake.max_in_flight == 4
    await models.unload()


async def test_an_idle_concurrent_engine_is_stopped_and_started_again(fake: FakeOpenAI) -> None:
    models = manager_for(fake.url, concurrency=2)
    async with models.hold():
        await models.recognize([page()], OPTIONS)
        await asyncio.sleep(0.3)  # past idle_seconds, but held by a task
        assert not await models.unload(only_if_idle=True)
    await asyncio.sleep(0.3)
    assert await models.unload(only_if_idle=True)
    assert not models.state.loaded
    await models.recognize([page()], OPTIONS)  # started again on demand
    assert models.state.loaded
    assert models.state.model == "deepseek-ai/DeepSeek-OCR"
    await models.unload()


# --- the PagePipeline with a concurrent engine ------------------------------------------------------


async def test_a_resumed_task_sends_only_its_missing_pages_and_keeps_page_order(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    # Pages are shades of red (page n: red 20n); raw/ already holds pages 2 and 4 from a run
    # that was interrupted; the server answers later pages sooner.
    def respond(body: dict[str, Any]) -> Reply:
        red, _, _ = request_image(body).convert("RGB").getpixel((5, 5))  # type: ignore[misc]
        return Reply(completion(f"sent {red // 20}"), delay=0.03 * (6 - red // 20))

    fake.respond = respond
    frames = [Image.new("RGB", (40, 30), (20 * n, 0, 0)) for n in range(1, 6)]
    document = tmp_path / "scan.tiff"
    frames[0].save(document, format="TIFF", save_all=True, append_images=frames[1:])
    store = LocalStore(tmp_path / "data")
    task_id = uuid.uuid4().hex
    (store.root / "tasks" / task_id).mkdir()
    for number in (2, 4):
        saved = {"page": number, "text": f"saved {number}{END_MARKER}", "stop_reason": "eos", "tokens": 3}
        store.write_raw(task_id, number, saved)
    models = manager_for(fake.url, concurrency=2)
    metrics = Metrics(StandInGpu())
    pipeline = PagePipeline(store=store, models=models, metrics=metrics)
    job = PageJob(
        task_id=task_id,
        input_path=document,
        kind=DocumentKind.TIFF,
        page_numbers=[1, 2, 3, 4, 5],
        dpi=144,
        max_pixels=10_000_000,
        batch_size=4,  # a batch engine's setting: a concurrent engine takes pages one by one
        recognize=OPTIONS,
    )
    progress: list[int] = []

    async def on_page(page: AssembledPage, seconds: float) -> None:
        progress.append(page.number)

    pages = await pipeline.run(job, on_page=on_page, check_interrupt=lambda: None)
    await models.unload()

    assert [p.number for p in pages] == progress == [1, 2, 3, 4, 5]
    assert [p.markdown.strip() for p in pages] == ["sent 1", "saved 2", "sent 3", "saved 4", "sent 5"]
    assert len(fake.requests) == 3  # pages 1, 3 and 5 only
    assert fake.max_in_flight <= 2
    stored = store.read_raw(task_id, 5)  # stored as it came
    assert stored is not None
    assert stored["text"] == f"sent 5{END_MARKER}"


# --- in-process vLLM, against a stand-in of vllm's API ---------------------------------------------

STANDIN_VLLM = '''
"""Stand-in for the few names of vLLM the in-process engine uses; records what it is given."""
import asyncio
from types import SimpleNamespace

built = []


class AsyncEngineArgs:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class AsyncLLMEngine:
    """Streams the script's pieces, one every ``step`` seconds, cumulative as vLLM's are."""

    script = ["# Ti", "# Title"]
    finish_reason = "stop"
    step = 0.0

    def __init__(self, args):
        self.args = args
        self.requests = []
        self.shut_down = False

    @classmethod
    def from_engine_args(cls, args):
        engine = cls(args)
        built.append(engine)
        return engine

    async def generate(self, request, params, request_id):
        self.requests.append((request, params))
        for n, text in enumerate(self.script, start=1):
            await asyncio.sleep(self.step)
            done = n == len(self.script)
            completion = SimpleNamespace(
                text=text, token_ids=list(range(n)), finish_reason=self.finish_reason if done else None
            )
            # RequestOutput.prompt_token_ids: the prompt as vLLM tokenised it (image tokens included).
            yield SimpleNamespace(outputs=[completion], prompt_token_ids=[0] * 7)

    def shutdown(self):
        self.shut_down = True
'''


@pytest.fixture
def standin_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A ``vllm`` package on ``sys.path`` for one test; forgotten afterwards."""
    package = tmp_path / "site" / "vllm"
    (package / "model_executor" / "models").mkdir(parents=True)
    (package / "__init__.py").write_text(STANDIN_VLLM)
    (package / "model_executor" / "__init__.py").write_text("")
    (package / "model_executor" / "models" / "__init__.py").write_text("")
    (package / "model_executor" / "models" / "deepseek_ocr.py").write_text(
        "class NGramPerReqLogitsProcessor:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield importlib.import_module("vllm")
    for name in [name for name in sys.modules if name == "vllm" or name.startswith("vllm.")]:
        del sys.modules[name]


def local_engine(timeout_seconds: float = 5.0, max_tokens: int | None = 4096) -> VllmEngine:
    return VllmEngine(
        "deepseek-ai/DeepSeek-OCR",
        concurrency=8,
        max_tokens=max_tokens,
        timeout_seconds=timeout_seconds,
        gpu_memory_utilization=0.8,
        max_model_len=8192,
    )


async def test_in_process_vllm_follows_the_recipe(standin_vllm: Any) -> None:
    engine = local_engine()
    await engine.start()
    (built,) = standin_vllm.built
    args = built.args.kwargs
    assert args["model"] == "deepseek-ai/DeepSeek-OCR"
    assert args["enable_prefix_caching"] is False
    assert args["mm_processor_cache_gb"] == 0
    assert [p.__name__ for p in args["logits_processors"]] == ["NGramPerReqLogitsProcessor"]
    assert (args["gpu_memory_utilization"], args["max_model_len"], args["max_num_seqs"]) == (0.8, 8192, 8)

    image = page()
    text = await engine.recognize_page(image, OPTIONS)
    assert (text.text, text.stop_reason, text.tokens) == ("# Title" + END_MARKER, "eos", 2)
    assert text.prompt_tokens == 7
    ((request, params),) = built.requests
    assert request == {"prompt": f"<image>\n{PROMPT}", "multi_modal_data": {"image": image}}
    sampling = params.kwargs
    assert (sampling["temperature"], sampling["max_tokens"], sampling["skip_special_tokens"]) == (
        0.0,
        4096,
        False,
    )
    assert sampling["extra_args"] == {
        "ngram_size": 30,
        "window_size": 90,
        "whitelist_token_ids": {128821, 128822},
    }

    built.finish_reason = "length"
    assert (await engine.recognize_page(image, OPTIONS)).stop_reason == "max_tokens"
    await engine.stop()
    assert built.shut_down


async def test_in_process_vllm_keeps_what_a_page_had_at_its_time_cap(standin_vllm: Any) -> None:
    standin_vllm.AsyncLLMEngine.step = 0.2
    engine = local_engine(timeout_seconds=0.3)  # the first piece arrives, the second does not
    await engine.start()
    text = await engine.recognize_page(page(), OPTIONS)
    assert (text.text, text.stop_reason, text.tokens) == ("# Ti", "timeout", 1)
    await engine.stop()


async def test_in_process_vllm_leaves_an_unset_cap_to_vllm(standin_vllm: Any) -> None:
    # vLLM's input processor gives a request without max_tokens what max_model_len leaves after it.
    engine = local_engine(max_tokens=None)
    await engine.start()
    await engine.recognize_page(page(), OPTIONS)
    ((_, params),) = standin_vllm.built[0].requests
    assert params.kwargs["max_tokens"] is None
    await engine.stop()
