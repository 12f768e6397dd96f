"""OpenAI-compatible servers for the ``vllm`` engine's tests and benchmark, all on loopback.

* ``TransformersServe``: the real ``transformers serve`` (``transformers[serving]``) serving the
  tiny DeepSeek-OCR-2 on CPU, offline, in its own process. The checkpoint is laid out as a Hub
  cache entry (``dsocr/tiny-ocr2``) so that ``GET /v1/models`` lists it, as a real deployment's
  server would, and the engine's model discovery runs for real.
* ``FakeOpenAI``: a small HTTP server whose chat answers a test scripts (status, body, delay), for
  what a real server cannot be made to do on cue: answer 503, send garbage, hang, report vLLM.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

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
    assert header == "data:image/png;base64", header
    return Image.open(io.BytesIO(base64.b64decode(data)))


class FakeOpenAI:
    """An OpenAI-compatible server on 127.0.0.1 that answers as the test says.

    ``GET /v1/models`` lists ``models``, owned by ``owned_by`` (``"vllm"``: the engine sends vLLM's
    extras). Each ``POST /v1/chat/completions`` is recorded in ``requests`` (body and headers) and
    answered by the next queued ``replies`` entry, or by ``respond(body)`` when none is queued.
    ``max_in_flight`` is the most chat requests it held at once.
    """

    def __init__(
        self,
        *,
        models: tuple[str, ...] = ("deepseek-ai/DeepSeek-OCR",),
        owned_by: str = "vllm",
        respond: Callable[[dict[str, Any]], Reply] | None = None,
    ) -> None:
        self.models = models
        self.owned_by = owned_by
        self.respond = respond or (lambda body: Reply(completion("hello")))
        self.replies: deque[Reply] = deque()
        self.requests: list[tuple[dict[str, Any], dict[str, str]]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        # A short poll interval: close() waits up to one interval for the serving loop to notice.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

            def do_GET(self) -> None:
                if self.path != "/v1/models":
                    self._send(Reply({"detail": "not found"}, status=404))
                    return
                data = [{"id": m, "object": "model", "owned_by": fake.owned_by} for m in fake.models]
                self._send(Reply({"object": "list", "data": data}))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                with fake._lock:
                    fake.requests.append((body, dict(self.headers)))
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    reply = fake.replies.popleft() if fake.replies else None
                try:
                    reply = reply or fake.respond(body)
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

    def chat_bodies(self) -> list[dict[str, Any]]:
        return [body for body, _ in self.requests]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
