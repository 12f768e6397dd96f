"""OpenAI-compatible servers for the ``vllm`` engine's tests and benchmark, all on loopback.

* ``TransformersServe``: the real ``transformers serve`` (``transformers[serving]``) serving the
  tiny DeepSeek-OCR-2 on CPU, offline, in its own process. The checkpoint is laid out as a Hub
  cache entry (``dsocr/tiny-ocr2``) so that ``GET /v1/models`` lists it, as a real deployment's
  server would, and the engine's model discovery runs for real.
* ``FakeOpenAI``: a small HTTP server whose chat answers a test scripts (status, body, delay), for
  what a real server cannot be made to do on cue: answer 503, send garbage, hang, report vLLM.
* ``VllmStandIn``: ``vllm serve deepseek-ai/DeepSeek-OCR`` as its OpenAI front end behaves, for
  what ``transformers serve`` does not check: the context length (a request whose prompt plus
  ``max_tokens`` overflows ``max_model_len`` is refused with vLLM's 400 and message), the fields
  vLLM validates, the served model's name, ``max_model_len`` in ``/v1/models``. Each rule cites
  the vLLM source it mirrors; it answers with DeepSeek-OCR-like grounded text.
"""

from __future__ import annotations

import base64
import binascii
import http.server
import io
import json
import math
import os
import shutil
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, ValidationError

from tests.servers import LoopbackProcess

TINY_REPO_ID = "dsocr/tiny-ocr2"
_SNAPSHOT = "0" * 40  # any 40-hex revision; refs/main points at it


def hub_cache_with(model_dir: Path, cache_dir: Path, repo_id: str = TINY_REPO_ID) -> Path:
    """Lay ``model_dir`` out in ``cache_dir`` as the Hub cache entry of ``repo_id``; returns ``cache_dir``."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / _SNAPSHOT
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(_SNAPSHOT, encoding="ascii")
    for path in model_dir.iterdir():
        if path.is_file():
            shutil.copyfile(path, snapshot / path.name)
    return cache_dir


class TransformersServe(LoopbackProcess):
    """``transformers serve dsocr/tiny-ocr2 --device cpu`` on a free loopback port, offline.

    ``start`` returns at once (the server takes 10-20 s to come up); ``wait_ready`` waits for its
    ``/health``. ``kill`` is SIGKILL, as when a server dies; ``stop`` terminates it gently.
    """

    def __init__(self, model_dir: Path, work_dir: Path) -> None:
        super().__init__(work_dir / "transformers-serve.log")
        self._cache = hub_cache_with(model_dir, work_dir / "hub")

    def start(self) -> TransformersServe:
        cli = Path(sys.executable).with_name("transformers")
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_CACHE": str(self._cache),  # must exist, or GET /v1/models answers 500
            "OMP_NUM_THREADS": "2",
        }
        command = [str(cli), "serve", TINY_REPO_ID, "--device", "cpu", "--host", "127.0.0.1"]
        self.spawn([*command, "--port", str(self.port)], env)
        return self

    def wait_ready(self, health_path: str = "/health", timeout: float = 90) -> TransformersServe:
        super().wait_ready(health_path, timeout)
        return self


# --- a scripted server ----------------------------------------------------------------------------


@dataclass
class Reply:
    """One scripted answer: a JSON body (or raw text), a status, and how long to wait first."""

    body: Any = None
    status: int = 200
    delay: float = 0.0


def completion(text: str, finish_reason: str | None = "stop", tokens: int = 7) -> dict[str, Any]:
    """A chat-completion body as OpenAI-compatible servers send it."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": "deepseek-ai/DeepSeek-OCR",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
            }
        ],
        "usage": {"prompt_tokens": 266, "completion_tokens": tokens, "total_tokens": 266 + tokens},
    }


def request_image(body: dict[str, Any]) -> Image.Image:
    """The page image of a chat-completion request (decoded from its data URL)."""
    parts = body["messages"][0]["content"]
    url = next(part["image_url"]["url"] for part in parts if part["type"] == "image_url")
    header, _, data = url.partition(",")
    # vLLM reads any image Pillow opens, whatever the media type says (``_data_url_image``).
    assert header.startswith("data:image/"), header
    assert header.endswith(";base64"), header
    return Image.open(io.BytesIO(base64.b64decode(data, validate=True)))


class FakeOpenAI:
    """An OpenAI-compatible server on 127.0.0.1 that answers as the test says.

    ``GET /v1/models`` lists ``models``, owned by ``owned_by`` (``"vllm"``: the engine sends vLLM's
    extras). Each ``POST /v1/chat/completions`` is recorded in ``requests`` (body, ``None`` when it
    is not JSON, and headers) and answered by the next queued ``replies`` entry, or else by
    ``chat_reply``: ``respond(body)`` here. ``statuses`` holds the status of every chat answer, in
    order; ``max_in_flight`` is the most chat requests it held at once. It listens on ``port`` (0:
    a free one).
    """

    def __init__(
        self,
        *,
        models: tuple[str, ...] = ("deepseek-ai/DeepSeek-OCR",),
        owned_by: str = "vllm",
        respond: Callable[[dict[str, Any]], Reply] | None = None,
        port: int = 0,
    ) -> None:
        self.models = models
        self.owned_by = owned_by
        self.respond = respond or (lambda body: Reply(completion("hello")))
        self.replies: deque[Reply] = deque()
        self.requests: list[tuple[Any, dict[str, str]]] = []
        self.statuses: list[int] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        # A short poll interval: close() waits up to one interval for the serving loop to notice.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def models_reply(self, headers: dict[str, str]) -> Reply:
        """The answer to ``GET /v1/models``."""
        data = [{"id": m, "object": "model", "owned_by": self.owned_by} for m in self.models]
        return Reply({"object": "list", "data": data})

    def chat_reply(self, body: Any, headers: dict[str, str]) -> Reply:
        """The answer to a chat request no queued reply claimed."""
        return self.respond(body)

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

            def do_GET(self) -> None:
                if self.path != "/v1/models":
                    self._send(Reply({"detail": "Not Found"}, status=404))
                    return
                self._send(fake.models_reply(dict(self.headers)))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                if self.path != "/v1/chat/completions":
                    self._send(Reply({"detail": "Not Found"}, status=404))
                    return
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                headers = dict(self.headers)
                with fake._lock:
                    fake.requests.append((body, headers))
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    reply = fake.replies.popleft() if fake.replies else None
                try:
                    reply = reply or fake.chat_reply(body, headers)
                    with fake._lock:
                        fake.statuses.append(reply.status)
                    time.sleep(reply.delay)
                    self._send(reply)
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

            def _send(self, reply: Reply) -> None:
                data = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
                payload = data.encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (its timeout): nothing to answer

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def chat_bodies(self) -> list[Any]:
        return [body for body, _ in self.requests]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


# --- a stand-in of vLLM's OpenAI front end serving DeepSeek-OCR --------------------------------------

DEEPSEEK_OCR = "deepseek-ai/DeepSeek-OCR"

# DeepSeek-OCR's image tokens as vLLM counts them: DeepseekOCRProcessingInfo.get_num_image_tokens
# (vllm/model_executor/models/deepseek_ocr.py) with the geometry vLLM fixes for it
# (vllm/transformers_utils/processors/deepseek_ocr.py: BASE_SIZE 1024, IMAGE_SIZE 640, CROP_MODE
# True, MIN_CROPS 2, MAX_CROPS 6). Written here from those rules, not copied.
_BASE_PX, _TILE_PX = 1024, 640


def _side_tokens(pixels: int) -> int:
    return math.ceil((pixels // 16) / 4)  # 16 px patches, 4x4 patches per token


def tile_grid(width: int, height: int, *, max_tiles: int = 6) -> tuple[int, int]:
    """The (columns, rows) of 640 px tiles DeepSeek-OCR cuts a page into (count_tiles in vLLM).

    A page no larger than one tile is not cut. Otherwise the grid of 2 to ``max_tiles`` tiles whose
    shape is closest to the page's wins; between two equally close, the larger one when the page
    covers more than half of its area.
    """
    if width <= _TILE_PX and height <= _TILE_PX:
        return (1, 1)
    grids = sorted(
        (
            (cols, rows)
            for cols in range(1, max_tiles + 1)
            for rows in range(1, max_tiles + 1)
            if 2 <= cols * rows <= max_tiles
        ),
        key=lambda grid: grid[0] * grid[1],
    )
    aspect = width / height
    best, best_diff = grids[0], math.inf
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * _TILE_PX * _TILE_PX * cols * rows:
            best = (cols, rows)
    return best


def image_tokens(width: int, height: int, *, max_tiles: int = 6) -> int:
    """The prompt tokens one page image costs DeepSeek-OCR on vLLM: the 1024 px global view (16 rows
    of 16 + 1 tokens, a newline ending each row, and a separator), plus the tiles, if any."""
    q, t = _side_tokens(_BASE_PX), _side_tokens(_TILE_PX)
    tokens = q * (q + 1) + 1
    cols, rows = tile_grid(width, height, max_tiles=max_tiles)
    if cols > 1 or rows > 1:
        tokens += rows * t * (cols * t + 1)
    return tokens


GROUNDED_PAGE = (
    "<|ref|>title<|/ref|><|det|>[[117, 60, 560, 89]]<|/det|>\n# Quarterly Report\n\n"
    "<|ref|>text<|/ref|><|det|>[[117, 118, 880, 190]]<|/det|>\n"
    "Revenue rose 12% to 4.2 million euros, driven by new service contracts in the north.\n\n"
    "<|ref|>table<|/ref|><|det|>[[117, 220, 880, 390]]<|/det|>\n"
    "<table><tr><td>Region</td><td>2023</td><td>2024</td></tr>"
    "<tr><td>North</td><td>1.9</td><td>2.1</td></tr>"
    "<tr><td>South</td><td>2.3</td><td>2.1</td></tr></table>"
)
PLAIN_PAGE = (
    "Quarterly Report\n\nRevenue rose 12% to 4.2 million euros, driven by new service contracts in "
    "the north.\n\nRegion 2023 2024\nNorth 1.9 2.1\nSouth 2.3 2.1"
)


_PARAGRAPH = (
    "The committee reviewed the figures for each region and found that demand for maintenance "
    "contracts grew faster than demand for new installations, as customers kept older equipment "
    "in service for longer. Margins held steady because parts costs fell in the second half."
)
# A full report page as DeepSeek-OCR grounds it: a title, five paragraphs, a figure with its
# caption and a table, boxes in 0-999 page coordinates (about 2,100 characters, 420 tokens).
FULL_GROUNDED_PAGE = (
    "<|ref|>title<|/ref|><|det|>[[100, 40, 620, 72]]<|/det|>\n# Annual Report on Regional Services\n\n"
    + "".join(
        f"<|ref|>text<|/ref|><|det|>[[100, {90 + 80 * n}, 900, {150 + 80 * n}]]<|/det|>\n{_PARAGRAPH}\n\n"
        for n in range(5)
    )
    + "<|ref|>image<|/ref|><|det|>[[150, 500, 850, 760]]<|/det|>\n\n"
    "<|ref|>image_caption<|/ref|><|det|>[[150, 765, 850, 790]]<|/det|>\n"
    "Figure 3: Contracts signed per quarter, by region.\n\n"
    "<|ref|>table<|/ref|><|det|>[[100, 800, 900, 950]]<|/det|>\n"
    "<table><tr><td>Region</td><td>2023</td><td>2024</td><td>Change</td></tr>"
    "<tr><td>North</td><td>1.9</td><td>2.1</td><td>+10%</td></tr>"
    "<tr><td>South</td><td>2.3</td><td>2.1</td><td>-9%</td></tr>"
    "<tr><td>East</td><td>1.2</td><td>1.4</td><td>+17%</td></tr></table>"
)


def full_page_answer(prompt: str) -> str:
    """``deepseek_ocr_answer`` for a fuller page (``FULL_GROUNDED_PAGE``): what benchmarks send."""
    return FULL_GROUNDED_PAGE if "<|grounding|>" in prompt else PLAIN_PAGE


def deepseek_ocr_answer(prompt: str) -> str:
    """What DeepSeek-OCR says of a report page: grounded blocks for a ``<|grounding|>`` prompt
    (a title, a paragraph, a table, boxes in 0-999 page coordinates), plain text otherwise."""
    return GROUNDED_PAGE if "<|grounding|>" in prompt else PLAIN_PAGE


class _ChatRequest(BaseModel):
    """The fields of vLLM's ChatCompletionRequest (entrypoints/openai/chat_completion/protocol.py)
    the stand-in reads, typed as there; pydantic validates them as it does in vLLM."""

    model_config = ConfigDict(extra="allow")  # OpenAIBaseModel logs unknown fields, refuses none
    messages: list[dict[str, Any]]
    model: str | None = None  # optional: absent means the served model
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    skip_special_tokens: bool = True
    vllm_xargs: dict[str, str | int | float | list[str | int | float]] | None = None


def vllm_error(
    message: str, *, err_type: str = "BadRequestError", status: int = 400, param: str | None = None
) -> Reply:
    """An error as vLLM's create_error_response shapes it (entrypoints/serve/utils/error_response.py):
    ``{"error": {"message", "type", "param", "code"}}`` with the status as ``code``."""
    return Reply(
        {"error": {"message": message, "type": err_type, "param": param, "code": status}}, status=status
    )


def _validation_error(parameter: str, message: str, value: Any) -> Reply:
    # VLLMValidationError.__str__ (vllm/exceptions.py) appends "(parameter=..., value=...)".
    return vllm_error(f"{message} (parameter={parameter}, value={value})", param=parameter)


class _BadContent(Exception):
    """A message part the stand-in cannot read (it reads text and data-URL images only)."""


class VllmStandIn(FakeOpenAI):
    """``vllm serve deepseek-ai/DeepSeek-OCR --max-model-len <max_model_len>`` as its OpenAI front
    end answers, at least as strict as vLLM on every rule below (each cites the source it mirrors).

    Prompt tokens are counted honestly: each image as DeepSeek-OCR on vLLM counts it
    (``image_tokens``: 273 for a page within 640 px, up to 933 with tiles), the text through a
    byte-level BPE with DeepSeek's special tokens (the tiny model's tokenizer, BOS included) after
    the chat template the tiny checkpoint ships (an image part becomes ``<image>\\n``). One rule
    is stricter than vLLM's main branch, which checks prompt plus ``max_tokens`` on the text tokens
    and then trims ``max_tokens`` to what the image leaves: here the check counts the image too, as
    the issue's refusals did, so a client that relies on that silent trim is caught.

    Answers (``answer(prompt)``, DeepSeek-OCR-like text by default) are cut at the output cap with
    ``finish_reason: "length"``, and lose DeepSeek's special tokens unless the request says
    ``skip_special_tokens: false``, as vLLM's detokenizer does. ``max_tiles`` stands for a server
    patched to DeepSeek's own limit of 9 tiles. Queued ``replies`` still win, for faults.
    """

    def __init__(
        self,
        *,
        served_model_name: str = DEEPSEEK_OCR,
        max_model_len: int = 8192,
        max_tiles: int = 6,
        api_key: str | None = None,
        answer: Callable[[str], str] = deepseek_ocr_answer,
        port: int = 0,
    ) -> None:
        self.max_model_len = max_model_len
        self.max_tiles = max_tiles
        self.api_key = api_key
        self.answer = answer
        # Imported here: it brings torch and transformers, which the benchmarks' FakeOpenAI does not need.
        from tests.tiny_model import build_tiny_tokenizer

        self._tokenizer = build_tiny_tokenizer()
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer is not safe across threads
        # Last: the server answers from here on, so everything it reads must exist.
        super().__init__(models=(served_model_name,), owned_by="vllm", port=port)

    def models_reply(self, headers: dict[str, str]) -> Reply:
        if (refused := self._unauthorized(headers)) is not None:
            return refused
        # OpenAIModelRegistry.show_available_models (entrypoints/openai/models/serving.py) and
        # ModelCard (entrypoints/openai/engine/protocol.py): owned_by "vllm", max_model_len.
        data = [
            {
                "id": name,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "vllm",
                "root": name,
                "parent": None,
                "max_model_len": self.max_model_len,
                "permission": [],
            }
            for name in self.models
        ]
        return Reply({"object": "list", "data": data})

    def _unauthorized(self, headers: dict[str, str]) -> Reply | None:
        # AuthenticationMiddleware (entrypoints/serve/utils/server_utils.py): with --api-key, every
        # /v1 request needs "Authorization: Bearer <key>"; the answer is 401 {"error": "Unauthorized"}.
        if self.api_key is None or headers.get("Authorization") == f"Bearer {self.api_key}":
            return None
        return Reply({"error": "Unauthorized"}, status=401)

    def chat_reply(self, body: Any, headers: dict[str, str]) -> Reply:
        if (refused := self._unauthorized(headers)) is not None:
            return refused
        # ChatCompletionRequest's validation, answered 400 by validation_exception_handler
        # (entrypoints/serve/utils/server_utils.py): "N validation error(s):" and the errors, param
        # the first error's location. A body that is not a JSON object fails the same way.
        try:
            request = _ChatRequest.model_validate(body)
        except ValidationError as exc:
            errors = [{**err, "loc": ("body", *err["loc"])} for err in exc.errors(include_url=False)]
            label = "error" if len(errors) == 1 else "errors"
            message = f"{len(errors)} validation {label}:\n" + "".join(f"  {err}\n" for err in errors)
            param = ".".join(str(p) for p in errors[0]["loc"])
            return vllm_error(message.rstrip(), err_type="Bad Request", param=param)
        # OpenAIModelRegistry.check_model (entrypoints/openai/models/serving.py): no model means the
        # served one; another name is a 404 NotFoundError.
        if request.model and request.model not in self.models:
            return vllm_error(
                f"The model `{request.model}` does not exist.",
                err_type="NotFoundError",
                status=404,
                param="model",
            )
        # NGramPerReqLogitsProcessor.validate_params (model_executor/models/deepseek_ocr.py), which
        # `vllm serve` runs on every request when it loads the processor, as DeepSeek-OCR's recipe does.
        if (refused := _ngram_args_refused(request.vllm_xargs or {})) is not None:
            return refused
        try:
            prompt_text, images = self._render(request.messages)
        except _BadContent as exc:
            return vllm_error(str(exc))
        prompt = self._prompt_tokens(prompt_text, images)
        requested = (
            request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        )
        # TokenizeParams._token_len_check (renderers/params.py; serving_engine.py's _validate_input
        # before it): a prompt plus max_tokens over max_model_len is refused, in the current wording.
        wanted = requested or 0
        if prompt + wanted > self.max_model_len:
            return _validation_error(
                "input_tokens",
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {wanted} output tokens and your prompt contains {prompt} input tokens, for a "
                f"total of {prompt + wanted} tokens. Please reduce the length of the input prompt or the "
                "number of requested output tokens.",
                prompt,
            )
        # get_max_tokens (entrypoints/utils.py): the output cap is the request's, within the room the
        # prompt leaves; none asked for means all of that room.
        room = self.max_model_len - prompt
        cap = room if requested is None else min(requested, room)
        # SamplingParams._verify_args (sampling_params.py).
        if cap < 1:
            return _validation_error("max_tokens", f"max_tokens must be at least 1, got {cap}.", cap)
        if request.temperature is not None and request.temperature < 0:
            return _validation_error(
                "temperature",
                f"temperature must be non-negative, got {request.temperature}.",
                request.temperature,
            )
        return self._complete(prompt_text, prompt, cap, skip_special_tokens=request.skip_special_tokens)

    def _render(self, messages: list[dict[str, Any]]) -> tuple[str, list[Image.Image]]:
        """The prompt text through the tiny checkpoint's chat template, and the images in order."""
        text: list[str] = []
        images: list[Image.Image] = []
        for message in messages:
            content = message.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list):
                raise _BadContent(f"a message's content must be a string or a list of parts, not {content!r}")
            for part in parts:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    text.append(part["text"])
                elif kind == "image_url":
                    images.append(_data_url_image(part))
                    text.append("<image>\n")
                else:
                    raise _BadContent(f"the stand-in reads text and data-URL image parts, not {part!r}")
        return "".join(text), images

    def _prompt_tokens(self, prompt_text: str, images: list[Image.Image]) -> int:
        with self._tokenizer_lock:
            ids = self._tokenizer.encode(prompt_text)  # BOS first, each <image> one token
        # The processor replaces each <image> token with the image's own tokens.
        return len(ids) - len(images) + sum(image_tokens(*im.size, max_tiles=self.max_tiles) for im in images)

    def prompt_tokens(self, body: dict[str, Any]) -> int:
        """The prompt tokens this server counts for a chat request's ``body``."""
        text, images = self._render(body["messages"])
        return self._prompt_tokens(text, images)

    def _complete(self, prompt_text: str, prompt: int, cap: int, *, skip_special_tokens: bool) -> Reply:
        """The model's answer, cut at ``cap`` tokens, as vLLM's ChatCompletionResponse carries it."""
        with self._tokenizer_lock:
            ids = self._tokenizer.encode(self.answer(prompt_text), add_special_tokens=False)
            # An eos token ends a finished answer: it counts as generated; vLLM leaves it out of the text.
            finished = len(ids) + 1 <= cap
            generated = ids if finished else ids[:cap]
            text = self._tokenizer.decode(generated, skip_special_tokens=skip_special_tokens)
        completion_tokens = len(generated) + 1 if finished else cap
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "tool_calls": [], "reasoning": None},
            "logprobs": None,
            "finish_reason": "stop" if finished else "length",
            "stop_reason": None,
        }
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        }
        body = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.models[0],
            "choices": [choice],
            "usage": usage,
        }
        return Reply(body)


def _ngram_args_refused(xargs: dict[str, Any]) -> Reply | None:
    """NGramPerReqLogitsProcessor.validate_params: no ngram_size, no check; else positive integers."""
    ngram = xargs.get("ngram_size")
    if ngram is None:
        return None
    window = xargs.get("window_size", 100)
    if not isinstance(ngram, int) or ngram <= 0:
        return vllm_error(f"`ngram_size` has to be a strictly positive integer, got {ngram}.")
    if not isinstance(window, int) or window <= 0:
        return vllm_error(f"`window_size` has to be a strictly positive integer, got {window}.")
    whitelist = xargs.get("whitelist_token_ids")
    if whitelist is not None and not isinstance(whitelist, list):
        return vllm_error(f"`whitelist_token_ids` has to be a sequence of integers, got {whitelist}.")
    return None


def _data_url_image(part: dict[str, Any]) -> Image.Image:
    """The image of an ``image_url`` part, which the stand-in takes as a base64 data URL only.

    vLLM takes a data URL only in base64 (``vllm/multimodal/media/connector.py``,
    ``_load_data_url``) and opens its bytes with Pillow whatever its media type says
    (``vllm/multimodal/media/image.py``, ``ImageMediaIO.load_bytes``): so does the stand-in.
    """
    url = part.get("image_url", {}).get("url") if isinstance(part.get("image_url"), dict) else None
    header, _, data = (url or "").partition(",")
    if not (header.startswith("data:image/") and header.endswith(";base64")):
        raise _BadContent(f"the stand-in reads base64 data URLs of images only, not {str(url)[:60]!r}")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
    except (binascii.Error, UnidentifiedImageError, OSError) as exc:
        raise _BadContent(f"the image_url cannot be read as an image: {exc}") from exc
    return image
