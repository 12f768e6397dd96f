"""Suite-wide setup: offline Hugging Face, caches under a temp dir, the tiny model built once.

The environment is set before anything imports huggingface_hub or transformers: both read these
variables once, at import. Servers the tests start as subprocesses inherit them.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

_HF_HOME = Path(tempfile.mkdtemp(prefix="dsocr-tests-hf-"))
os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the network; downloads must fail fast
os.environ["HF_HOME"] = str(_HF_HOME)  # never read or write the developer's own cache
os.environ["HF_MODULES_CACHE"] = str(_HF_HOME / "modules")  # where trust_remote_code copies model code
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)

import pytest  # noqa: E402 - after the environment above
import torch  # noqa: E402

from tests.tiny_model import build_tiny_ocr2  # noqa: E402

torch.set_num_threads(2)  # stable timings on shared CI runners; the tiny model gains nothing from more


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DeepSeek-OCR-2 checkpoint (transformers-native), built once per session (~0.3 s)."""
    return build_tiny_ocr2(tmp_path_factory.mktemp("tiny-ocr2"))


# --- the service under test -------------------------------------------------------------------

import http.server  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from app.config import Settings  # noqa: E402
from app.engines.base import OCREngine  # noqa: E402
from app.engines.hf import HFEngine  # noqa: E402
from app.main import create_app  # noqa: E402
from tests.servers import ThreadedServer  # noqa: E402
from tests.standins import InstrumentedEngine, StandInGpu  # noqa: E402
from tests.tiny_model import ScriptedAnswers  # noqa: E402


@dataclass
class RunningService:
    """A started service: its URL, an authorised client, the app and what its engine factory built."""

    url: str
    client: httpx.Client
    app: FastAPI
    data_dir: Path
    engines: list[InstrumentedEngine] = field(default_factory=list)

    def task_dirs(self) -> list[str]:
        return sorted(p.name for p in (self.data_dir / "tasks").iterdir())

    def spool_files(self) -> list[str]:
        return sorted(p.name for p in (self.data_dir / "spool").iterdir())


@pytest.fixture
def standin_gpu() -> StandInGpu:
    return StandInGpu()


@pytest.fixture
def make_server(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Callable[..., RunningService]]:
    """Start the service under real uvicorn; keyword arguments are ``Settings`` fields, plus:

    ``answers`` (scripted model output, page by page), ``page_delay`` and ``fail_on_call`` (see
    ``InstrumentedEngine``), ``gpu_probe``, and ``default_engine=True`` to build the engine from the
    settings exactly as production does.
    """
    stack: list[ThreadedServer] = []
    clients: list[httpx.Client] = []

    def start(
        *,
        answers: list[str] | None = None,
        page_delay: float = 0.0,
        fail_on_call: int | None = None,
        gpu_probe: Any = None,
        default_engine: bool = False,
        **overrides: Any,
    ) -> RunningService:
        data_dir = tmp_path / f"data{len(stack)}"
        values: dict[str, Any] = {
            "data_dir": data_dir,
            "ds_dtype": "float32",
            "ds_max_new_tokens": 256,
            "ds_batch_size": 2,
            "api_keys": "sk_test",
            "force_cpu": gpu_probe is None,
        }
        values.update(overrides)
        settings = Settings(**values)
        engines: list[InstrumentedEngine] = []
        factory = None
        if not default_engine:
            tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
            script = ScriptedAnswers(
                answers or ["<|ref|>text<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>\nhi"], tokenizer
            )

            def factory() -> tuple[OCREngine, str]:
                inner = HFEngine(
                    str(tiny_model_dir),
                    device="cpu",
                    dtype=settings.ds_dtype,
                    use_flash_attn=False,
                    batch_size=settings.ds_batch_size,
                    no_repeat_ngram_size=0,
                    logits_processors=lambda: [script],
                )
                engine = InstrumentedEngine(inner, page_delay=page_delay, fail_on_call=fail_on_call)
                engines.append(engine)
                return engine, "the tiny test model, scripted"

        app = create_app(settings, engine_factory=factory, gpu_probe=gpu_probe)
        server = ThreadedServer(app).__enter__()
        stack.append(server)
        client = httpx.Client(base_url=server.url, headers={"Authorization": "Bearer sk_test"}, timeout=60)
        clients.append(client)
        return RunningService(server.url, client, app, settings.data_dir, engines)

    yield start
    for client in clients:
        client.close()
    for server in reversed(stack):
        server.__exit__(None, None, None)


class StaticFiles:
    """Files served over plain HTTP on 127.0.0.1, for URL tasks."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        files = self.files

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = files.get(self.path.lstrip("/"))
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def add(self, name: str, data: bytes) -> str:
        self.files[name] = data
        return f"{self.url}/{name}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def static_server() -> Iterator[StaticFiles]:
    server = StaticFiles()
    yield server
    server.close()


# --- the scale-out backends: a real redis-server and moto's S3 server on loopback -------------

from tests.scale_cluster import REDIS_SERVER, RedisServer, S3Server  # noqa: E402


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """Debian's ``redis-server`` with its append-only file on; skips the test where it is missing."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (Debian package redis-server; .ci/run installs it)")
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def s3() -> Iterator[S3Server]:
    """moto's S3 server in a thread, with one bucket."""
    server = S3Server()
    yield server
    server.close()


# --- one headless Chromium for every test that needs a browser (console, result.html) ---

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; Playwright drives it, downloads nothing
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


# Module scope, not session: Playwright's sync API keeps an event loop of its own while it runs,
# which the asyncio tests of other modules must not find.
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, launched once per test module; skips where it is not installed."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium (/usr/bin/chromium) is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
